"""generate_batch: many requests in one forward per step, each row equal to generate() alone."""

import pytest

import llama32
from llama32 import InvalidRequest


def chatml(text):
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"




def test_batch_equals_one_by_one(smol):
    requests = [
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
    batch = llama32.generate_batch(smol, requests)
    single = [llama32.generate(smol, **r) for r in requests]
    assert batch == single
    counts = [r["usage"]["completion_tokens"] for r in single]
    assert counts[0] < 30 and counts[2] == 6  # one row stopped on end-of-turn, one on max_tokens
    assert len({r["usage"]["prompt_tokens"] for r in single}) > 3  # mixed prompt lengths


def test_batch_validates_every_request_first(smol):
    with pytest.raises(InvalidRequest, match=r"requests\[1\].*temperature"):
        llama32.generate_batch(smol, [dict(prompt="a"), dict(prompt="b", temperature=-1)])
    with pytest.raises(InvalidRequest, match=r"requests\[0\].stream"):
        llama32.generate_batch(smol, [dict(prompt="a", stream=True)])
    assert llama32.generate_batch(smol, []) == []
