"""Looking inside the model: `llm.model(ids, output_hidden_states=True, output_attentions=True)` against
transformers' eager attention (real SmolLM2 weights and tiny random Llama 3 configs), and forward hooks."""

from __future__ import annotations

import pytest
import torch

import llama32
from fixtures import hf_model
from llama32.model import KVCache, ModelOutput

TEXT = "The capital of France is Paris, and the capital of Italy is"


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_like_transformers(got: ModelOutput, want, layers: int):
    """Same count, shapes and values (relative 1e-4) of hidden states and attention probabilities."""
    assert len(got.hidden_states) == len(want.hidden_states) == layers + 1
    assert len(got.attentions) == len(want.attentions) == layers
    for i, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert a.shape == b.shape, i
        assert rel_err(a, b) <= 1e-4, f"hidden_states[{i}]: {rel_err(a, b):.2e}"
    for i, (a, b) in enumerate(zip(got.attentions, want.attentions)):
        assert a.shape == b.shape, i
        assert rel_err(a, b) <= 1e-4, f"attentions[{i}]: {rel_err(a, b):.2e}"
    assert rel_err(got.logits, want.logits) <= 1e-4


def test_smollm2_hidden_states_and_attentions_match_transformers(smol, smol_hf):
    ids = torch.tensor([smol.tokenizer.encode(TEXT)] * 2)
    with torch.no_grad():
        got = smol.model(ids, output_hidden_states=True, output_attentions=True)
        want = smol_hf(ids, output_hidden_states=True, output_attentions=True)
    cfg = smol.config
    assert_like_transformers(got, want, cfg.num_hidden_layers)
    B, T = ids.shape
    assert got.attentions[0].shape == (B, cfg.num_attention_heads, T, T)
    assert got.hidden_states[0].shape == (B, T, cfg.hidden_size)
    # the first entry is the embeddings' output, the last the final norm's (not the last layer's raw output)
    model = smol.model.model
    raw = []
    handle = model.layers[-1].register_forward_hook(lambda mod, args, out: raw.append(out))
    try:
        with torch.no_grad():
            again = smol.model(ids, output_hidden_states=True)
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(again.hidden_states[0], model.embed_tokens(ids))
        assert torch.equal(again.hidden_states[-1], model.norm(raw[0]))
        assert not torch.allclose(again.hidden_states[-1], raw[0])
        assert rel_err(again.hidden_states[-2], got.hidden_states[-2]) <= 1e-5
    # probabilities: rows sum to 1, nothing above the diagonal
    p = got.attentions[3]
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
    assert p.triu(1).abs().max().item() == 0


@pytest.mark.parametrize("kind", ["llama32", "mha"])
def test_tiny_llama3_hidden_states_and_attentions_match_transformers(make_checkpoint, kind):
    """Grouped query heads (llama32: 4 query heads on 2 key/value heads, llama3 RoPE) and plain multi-head."""
    path = make_checkpoint(kind=kind)
    llm, ref = llama32.load(path, device="cpu", dtype="float32"), hf_model(path)
    ids = torch.randint(0, llm.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = llm.model(ids, output_hidden_states=True, output_attentions=True)
        want = ref(ids, output_hidden_states=True, output_attentions=True)
    assert_like_transformers(got, want, llm.config.num_hidden_layers)
    # either flag alone: only what was asked for
    with torch.no_grad():
        only_h = llm.model(ids, output_hidden_states=True)
        only_a = llm.model(ids, output_attentions=True)
    assert only_h.attentions is None and len(only_h.hidden_states) == llm.config.num_hidden_layers + 1
    assert only_a.hidden_states is None and len(only_a.attentions) == llm.config.num_hidden_layers
    assert all(torch.equal(a, b) for a, b in zip(only_a.attentions, got.attentions))


def test_flags_leave_the_default_call_unchanged(make_checkpoint):
    llm = llama32.load(make_checkpoint(kind="llama32"), device="cpu", dtype="float32")
    ids = torch.randint(0, llm.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = llm.model(ids)
        both = llm.model(ids, output_hidden_states=True, output_attentions=True)
        hidden = llm.model(ids, output_hidden_states=True)
        after = llm.model(ids)
        last = llm.model(ids, logits_at=torch.tensor([29, 11]), output_hidden_states=True)
    assert type(before) is torch.Tensor and type(after) is torch.Tensor
    assert torch.equal(before, after)
    # hidden states alone keep the fast attention: the very same logits
    assert torch.equal(hidden.logits, before)
    # the written-out attention agrees with scaled_dot_product_attention to rounding
    assert rel_err(both.logits, before) <= 1e-5
    assert torch.equal(last.logits[:, 0], hidden.logits[[0, 1], [29, 11]])
    assert last.hidden_states[-1].shape == (2, 30, llm.config.hidden_size)


def test_attentions_through_the_cache_equal_the_full_forward(make_checkpoint):
    """A decode step at explicit positions (the masked path) gives the last row of the full forward's
    probabilities, zero past its own position."""
    llm = llama32.load(make_checkpoint(kind="llama32"), device="cpu", dtype="float32")
    ids = torch.randint(0, llm.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(7))
    cache = KVCache(llm.config, 2, 32, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        full = llm.model(ids, output_attentions=True)
        llm.model(ids[:, :20], cache=cache)
        step = llm.model(ids[:, 20:], cache=cache, input_pos=torch.full((2, 1), 20), output_attentions=True)
    for a, b in zip(step.attentions, full.attentions):
        assert a.shape == (2, llm.config.num_attention_heads, 1, 32)
        assert rel_err(a[..., :21], b[:, :, 20:]) <= 1e-5
        assert a[..., 21:].abs().max().item() == 0
    assert rel_err(step.logits, full.logits[:, 20:]) <= 1e-5


def test_a_hook_that_zeroes_a_block_changes_the_logits(smol):
    """Module names are the checkpoint's, so a forward hook finds `model.layers.3.mlp` by name."""
    ids = torch.tensor([smol.tokenizer.encode(TEXT)])
    modules = dict(smol.model.named_modules())
    with torch.no_grad():
        clean = smol.model(ids, output_hidden_states=True)
        handle = modules["model.layers.3"].register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
        try:
            hooked = smol.model(ids, output_hidden_states=True)
        finally:
            handle.remove()
        handle = modules["model.layers.3.mlp"].register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
        try:
            no_mlp = smol.model(ids)
        finally:
            handle.remove()
        again = smol.model(ids)
    assert hooked.hidden_states[4].abs().max().item() == 0  # layer 3's output, as the hook left it
    assert torch.equal(hooked.hidden_states[3], clean.hidden_states[3])  # earlier layers untouched
    assert (hooked.logits - clean.logits).abs().max().item() > 1.0
    assert (no_mlp - clean.logits).abs().max().item() > 1e-2
    assert torch.equal(again, clean.logits)  # removing the hook restores the model
