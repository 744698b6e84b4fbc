"""The research surface on real weights (SmolLM2-135M-Instruct) against transformers: log-probabilities of
generated tokens, scoring text, stop strings end to end."""

from __future__ import annotations

import math

import pytest
import torch

import llama32
from llama32 import InvalidRequest

PROMPT = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"


def hf_logprobs(llm, hf, ids):
    """transformers' float32 log_softmax at every position of `ids`."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.4, top_p=0.9, seed=3)])
def test_logprobs_are_the_models_own(smol, smol_hf, sampling):
    """Each entry is log_softmax of the raw logits at that step (before temperature and filtering)."""
    out = llama32.generate(smol, prompt=PROMPT, raw=True, max_tokens=24, logprobs=True, top_logprobs=5, **sampling)
    entries = out["logprobs"]
    assert len(entries) == out["usage"]["completion_tokens"]
    prompt = smol.tokenizer.encode(PROMPT)
    generated = [e["id"] for e in entries]
    ref = hf_logprobs(smol, smol_hf, prompt + generated)[len(prompt) - 1: -1]  # each token's predicting position
    got = torch.tensor([e["logprob"] for e in entries])
    want = ref.gather(-1, torch.tensor(generated)[:, None])[:, 0]
    assert (got - want).abs().max().item() < 1e-4
    for e, row in zip(entries, ref):
        top = row.topk(5)
        assert [t["id"] for t in e["top_logprobs"]] == top.indices.tolist()
        assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert e["token"] == smol.tokenizer.decode([e["id"]])
    if sampling["temperature"] == 0:
        assert all(e["id"] == e["top_logprobs"][0]["id"] for e in entries)
    else:  # sampling at temperature 1.4 picked some token that was not the most likely one
        assert any(e["id"] != e["top_logprobs"][0]["id"] for e in entries)


def test_streamed_logprobs_equal_the_result(smol):
    req = dict(prompt=PROMPT, raw=True, max_tokens=20, seed=8, logprobs=True, top_logprobs=2)
    whole = llama32.generate(smol, **req)
    chunks = list(llama32.generate(smol, stream=True, **req))
    assert [e for c in chunks for e in c["logprobs"]] == whole["logprobs"]
    assert "logprobs" not in llama32.generate(smol, prompt=PROMPT, raw=True, max_tokens=3)


def test_stop_string_ends_generation(smol):
    full = llama32.generate(smol, prompt=PROMPT, raw=True, temperature=0, max_tokens=40)["response"]
    stop = full.split()[3]  # a word from the middle of the answer
    cut = full[: full.index(stop)]
    out = llama32.generate(smol, prompt=PROMPT, raw=True, temperature=0, max_tokens=40, stop=[stop, "zzqx"])
    assert out["response"] == cut
    assert out["usage"]["completion_tokens"] < len(smol.tokenizer.encode(full))
    streamed = list(llama32.generate(smol, prompt=PROMPT, raw=True, temperature=0, max_tokens=40, stop=stop,
                                     stream=True))
    assert "".join(c["response"] for c in streamed) == cut
    assert streamed[-1]["usage"] == out["usage"]


@pytest.mark.parametrize("bad, field", [
    ([], "stop"), ([""], r"stop\[0\]"), ("", "stop"), (["a", "b", "c", "d", "e"], "stop"), ([3], r"stop\[0\]"),
    (7, "stop"),
])
def test_bad_stop_values_are_rejected(smol, bad, field):
    with pytest.raises(InvalidRequest, match=field):
        llama32.generate(smol, prompt="Hi", stop=bad)


@pytest.mark.parametrize("bad, field", [
    (dict(logprobs="yes"), "logprobs"), (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=-1), "top_logprobs"), (dict(top_logprobs=2), "top_logprobs needs logprobs"),
])
def test_bad_logprob_values_are_rejected(smol, bad, field):
    with pytest.raises(InvalidRequest, match=field):
        llama32.generate(smol, prompt="Hi", **bad)


def test_score_equals_transformers(smol, smol_hf):
    context, text = "The capital of France is", " Paris, a city on the Seine."
    got = llama32.score(smol, text, context=context)
    tok = smol.tokenizer
    head = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(context)
    tail = tok.encode(text)
    assert got["ids"] == tail and got["tokens"] == [tok.decode([t]) for t in tail]
    ref = hf_logprobs(smol, smol_hf, head + tail)[len(head) - 1: -1]
    want = ref.gather(-1, torch.tensor(tail)[:, None])[:, 0]
    assert torch.tensor(got["logprobs"]).sub(want).abs().max().item() < 1e-4
    assert got["is_greedy"] == (ref.argmax(-1) == torch.tensor(tail)).tolist()
    assert any(got["is_greedy"]) and not all(got["is_greedy"])  # so both answers are checked
    assert got["sum_logprob"] == pytest.approx(sum(got["logprobs"]))
    assert got["perplexity"] == pytest.approx(math.exp(-got["sum_logprob"] / len(tail)))
    # a likelier continuation scores higher
    assert llama32.score(smol, " London.", context=context)["sum_logprob"] < llama32.score(
        smol, " Paris.", context=context)["sum_logprob"]


def test_score_batch_equals_score(smol):
    items = [{"text": " Paris.", "context": "The capital of France is"}, {"text": " Hello world", "context": "Say:"},
             {"text": " blue.", "context": "The sky is"}]
    assert llama32.score_batch(smol, items) == [llama32.score(smol, i["text"], context=i.get("context", ""))
                                               for i in items]


@pytest.mark.parametrize("call, field", [
    (lambda llm: llama32.score(llm, 3), "text"), (lambda llm: llama32.score(llm, "a", context=None or 5), "context"),
    (lambda llm: llama32.score(llm, ""), "text"), (lambda llm: llama32.score_batch(llm, "abc"), "items"),
    (lambda llm: llama32.score_batch(llm, [{"txt": "a"}]), r"items\[0\]"),
    (lambda llm: llama32.score(llm, "Hello"), "no BOS token"),  # SmolLM2 prepends nothing: nothing to predict from
])
def test_bad_score_requests_are_rejected(smol, call, field):
    with pytest.raises(InvalidRequest, match=field):
        call(smol)
