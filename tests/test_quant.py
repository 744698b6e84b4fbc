"""Weight-only int8 (quant.py, load(..., quantize="int8")): the arithmetic, the kernels' agreement, quality on
real weights (SmolLM2) against float32 with fixed thresholds, and LoRA on top."""

from __future__ import annotations

import pytest
import torch

import llama32
from llama32.model import Linear
from llama32.quant import dequantize_int8, int8_linear, quantize_int8
from test_lora import write_adapter

LONG = ("The history of the Roman Empire spans many centuries. It began when Augustus became the first emperor, "
        "and over the following centuries the empire grew to cover the Mediterranean world, from Britain to Egypt, "
        "with roads, laws and cities that shaped Europe for a thousand years after its fall. Trade moved grain, "
        "wine and olive oil across the sea; the legions guarded long frontiers on the Rhine and the Danube; and "
        "Latin became the language of government, while Greek remained the language of learning in the east. "
        "Historians still argue about why the western half fell in the fifth century while the eastern half, "
        "ruled from Constantinople, lasted almost another thousand years.")


def test_quantize_round_trip():
    w = torch.randn(64, 48) * torch.logspace(-3, 0, 64)[:, None]  # rows of very different sizes
    q, scale = quantize_int8(w, torch.float32)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (64,)
    assert ((dequantize_int8(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-7).all()  # half a step at most
    assert (q.abs().amax(1) == 127).all()  # each row uses the whole range


@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernels_agree_with_the_dequantized_product(rows, dtype):
    w = torch.randn(96, 64) * 0.05
    q, scale = quantize_int8(w, dtype)
    x = torch.randn(2, rows, 64).to(dtype)
    want = torch.nn.functional.linear(x.float(), dequantize_int8(q, scale.float()))
    got = int8_linear(x, q, scale)
    assert got.dtype == dtype and got.shape == (2, rows, 96)
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-2


@pytest.fixture(scope="module")
def smol_int8(smollm2_dir):
    return {dt: llama32.load(smollm2_dir, dtype=dt, device="cpu", quantize="int8") for dt in ("float32", "bfloat16")}


def test_projections_and_head_are_int8_and_the_embedding_is_not(smol_int8):
    llm = smol_int8["float32"]
    linears = [m for m in llm.model.modules() if isinstance(m, Linear)]
    assert len(linears) == 7 * llm.config.num_hidden_layers + 1
    assert all(m.weight.dtype == torch.int8 and m.weight_scale.shape == (m.weight.shape[0],) for m in linears)
    assert llm.model.model.embed_tokens.weight.dtype == torch.float32
    assert llm.model.lm_head.weight.data_ptr() != llm.model.model.embed_tokens.weight.data_ptr()  # its own copy


@pytest.mark.parametrize("dtype, max_kl", [("float32", 0.01), ("bfloat16", 0.02)])
def test_int8_quality_against_float32(smol, smol_int8, dtype, max_kl):
    """Fixed thresholds; measured 2026-11-24 on SmolLM2-135M-Instruct: see the README's int8 table."""
    ids = torch.tensor([smol.tokenizer.encode(LONG)])
    assert ids.shape[1] > 100
    with torch.no_grad():
        ref = smol.model(ids)[0].float().log_softmax(-1)
        got = smol_int8[dtype].model(ids)[0].float().log_softmax(-1)
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    assert agree >= 0.9, agree
    assert kl <= max_kl, kl
    for prompt in ("What is the capital of France?", "Write a haiku about rain.", "List three colours."):
        req = dict(prompt=prompt, temperature=0, max_tokens=24, logprobs=True, top_logprobs=2)
        got, want = (llama32.generate(llm, **req)["logprobs"] for llm in (smol_int8[dtype], smol))
        ids, wanted = [t["id"] for t in got], [t["id"] for t in want]
        if ids != wanted:
            # a greedy answer may part only at an exact tie, where the lower token id wins: in bfloat16 the
            # first token of the first prompt is one ('L' and 'The' at the same log-probability)
            i = next((i for i, (a, b) in enumerate(zip(ids, wanted)) if a != b), None)
            assert i is not None, (prompt, ids, wanted)  # one answer stopped where the other went on
            top = {t["id"]: t["logprob"] for t in got[i]["top_logprobs"]}
            assert top.get(wanted[i]) == got[i]["logprob"], (prompt, i, got[i])


def test_bad_quantize_value(smollm2_dir):
    with pytest.raises(ValueError, match="quantize"):
        llama32.load(smollm2_dir, quantize="int4")


def test_lora_on_top_of_int8(make_checkpoint, llama3_tokenizer_dir, tmp_path):
    base = make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir)
    adapter = str(write_adapter(base, tmp_path / "a", seed=1))
    ids = torch.randint(0, 128000, (1, 16), generator=torch.Generator().manual_seed(0))
    full = {lora: llama32.load(base, dtype="float32", lora=lora) for lora in (None, adapter)}
    q = {lora: llama32.load(base, dtype="float32", lora=lora, quantize="int8") for lora in (None, adapter)}
    with torch.no_grad():
        delta_full = full[adapter].model(ids) - full[None].model(ids)
        delta_q = q[adapter].model(ids) - q[None].model(ids)
    assert delta_full.abs().max() > 0.1  # the adapter matters
    assert ((delta_q - delta_full).abs().max() / delta_full.abs().max()).item() < 0.1
    req = dict(prompt="Hello there", raw=True, temperature=0, max_tokens=6)
    assert llama32.generate(q[None], lora=adapter, **req) == llama32.generate(q[adapter], **req)


def test_a_float32_rows_result_does_not_depend_on_how_many_rows_share_the_product():
    """int8 with float32 activations: one row alone equals the same row among 16 (the few-rows kernel would
    round it to bfloat16 alone and not among many)."""
    g = torch.Generator().manual_seed(3)
    q, scale = quantize_int8(torch.randn(256, 512, generator=g), torch.float32)
    x = torch.randn(16, 512, generator=g)
    alone = torch.cat([int8_linear(x[i:i + 1], q, scale) for i in range(16)])
    torch.testing.assert_close(alone, int8_linear(x, q, scale), rtol=1e-4, atol=1e-4)  # bfloat16: ~1e-2
