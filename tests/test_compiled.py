"""The compiled decode step (torch.compile; CUDA graphs on a GPU) gives what the eager step gives."""

import pytest
import torch

import llama32

REQUESTS = [
    dict(prompt="Hello there", temperature=0, max_tokens=12),
    dict(prompt="Tell me a story", temperature=0.9, seed=5, top_p=0.9, top_k=20, repetition_penalty=1.2,
         frequency_penalty=0.3, max_tokens=10),
]


def run(llm, compiled):
    llm.compiled = compiled
    try:
        single = [llama32.generate(llm, **r) for r in REQUESTS]
        batch = llama32.generate_batch(llm, REQUESTS)
    finally:
        llm.compiled = False
    return single, batch


def test_compiled_equals_eager_on_cpu(make_checkpoint, llama3_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("LLAMA32_CPU_PACK", "0")  # inductor traces dense weights, not oneDNN-packed ones
    llm = llama32.load(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), dtype="float32",
                       device="cpu")
    assert not llm.compiled  # eager by default on CPU
    eager = run(llm, False)
    compiled = run(llm, True)
    assert compiled == eager
    assert llm.compiled_shapes and all(s > 0 for s in llm.compiled_shapes.values())
    assert eager[0] == eager[1]  # and batch equals one by one
    # batches and attended lengths are powers of two, so few shapes get compiled; the same requests again
    # compile nothing
    assert all(b & (b - 1) == 0 and n & (n - 1) == 0 for b, n in llm.compiled_shapes)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert run(llm, True) == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_graph_step_equals_eager_cuda(make_checkpoint, llama3_tokenizer_dir):
    llm = llama32.load(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), dtype="float32",
                       device="cuda")
    assert llm.compiled  # compiled by default on CUDA
    eager = run(llm, False)
    compiled = run(llm, True)
    again = run(llm, True)  # same shapes: served from the compiled graphs
    assert compiled == eager == again
