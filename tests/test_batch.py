"""generate_batch: many requests in one forward per step, each row equal to generate() alone."""

import pytest

import llama32
from fixtures import without_cached
from llama32 import InvalidRequest


def chatml(text):
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"




REQUESTS = [
    dict(prompt=chatml("What is the capital of France?"), raw=True, temperature=0, max_tokens=30),  # stops early
    dict(prompt=chatml("Write a long story about a dragon who learns to bake bread in a small village."),
         raw=True, temperature=0, max_tokens=24, repetition_penalty=1.2),
    dict(prompt=chatml("List three colours."), raw=True, temperature=0, max_tokens=6),  # stops at max_tokens
    dict(prompt=chatml("Say hi."), raw=True, temperature=0.9, top_p=0.9, seed=11, max_tokens=16),
    dict(prompt=chatml("Describe the sea in detail, please, using many adjectives."), raw=True, temperature=0,
         max_tokens=20, frequency_penalty=0.7, presence_penalty=0.3),
    dict(messages=[{"role": "user", "content": "Count to five."}], temperature=1.1, top_k=5, seed=3,
         max_tokens=12),
]


# Three rows end at once (max_tokens), leaving three that sample with their own seeds: a batch that halves
# to four then carries one finished row along.
TOGETHER = [dict(prompt=chatml(f"Name a {thing}."), raw=True, temperature=0, max_tokens=3)
            for thing in ("fruit", "river", "planet")] + [
    dict(prompt=chatml(f"Tell me about {thing}."), raw=True, temperature=0.9, seed=seed, max_tokens=10)
    for thing, seed in (("cats", 1), ("the moon", 2), ("tea", 3))]


@pytest.fixture(scope="module")
def one_by_one(smol):
    return [llama32.generate(smol, **r) for r in REQUESTS]


@pytest.fixture(scope="module")
def together_one_by_one(smol):
    return [llama32.generate(smol, **r) for r in TOGETHER]


def test_batch_equals_one_by_one(smol, one_by_one):
    assert without_cached(llama32.generate_batch(smol, REQUESTS)) == without_cached(one_by_one)
    counts = [r["usage"]["completion_tokens"] for r in one_by_one]
    assert counts[0] < 30 and counts[2] == 6  # one row stopped on end-of-turn, one on max_tokens
    assert len({r["usage"]["prompt_tokens"] for r in one_by_one}) > 3  # mixed prompt lengths


def batch_sizes(llm, monkeypatch):
    """Records the batch size of every forward the model runs."""
    sizes, forward = [], llm.model.forward
    monkeypatch.setattr(llm.model, "forward", lambda ids, **kw: sizes.append(len(ids)) or forward(ids, **kw))
    return sizes


@pytest.mark.parametrize("together", [False, True])
def test_rows_share_steps_and_leave_as_they_finish(smol, one_by_one, together_one_by_one, monkeypatch, together):
    """The loop decodes the rows together (one forward for many rows) and each still equals its solo run,
    also when several rows end on the same step and the others go on sampling with their own seeds."""
    requests, expected = (TOGETHER, together_one_by_one) if together else (REQUESTS, one_by_one)
    sizes = batch_sizes(smol, monkeypatch)
    assert without_cached(llama32.generate_batch(smol, requests)) == without_cached(expected)
    counts = [r["usage"]["completion_tokens"] for r in expected]
    if together:
        assert counts[:3] == [3, 3, 3] and min(counts[3:]) > 3
    assert max(sizes) <= len(requests)
    assert max(sizes) > 1  # batching is real: some step ran several rows at once
    # every token after each row's first comes from a decode step; batched, there are far fewer steps
    assert len(sizes) - len(requests) < sum(counts) - len(requests)
    assert smol.loop.stats().items() >= {"running": 0, "waiting": 0}.items()


def test_batch_validates_every_request_first(smol):
    with pytest.raises(InvalidRequest, match=r"requests\[1\].*temperature"):
        llama32.generate_batch(smol, [dict(prompt="a"), dict(prompt="b", temperature=-1)])
    with pytest.raises(InvalidRequest, match=r"requests\[0\].stream"):
        llama32.generate_batch(smol, [dict(prompt="a", stream=True)])
    assert llama32.generate_batch(smol, []) == []
