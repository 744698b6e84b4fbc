"""The compiled decode step (torch.compile: inductor on CPU here, CUDA graphs on a GPU).

What it must show on a CPU, since CI has no GPU: compiling ahead (`Runner.warm_up`, what `load` starts on CUDA)
leaves nothing to compile while serving requests of any batch size and length, nor for a mix of every sampler
setting with LoRA on and off; no graph break and no cache-sized temporary in the generated code; answers equal
the eager step's, greedy and sampled alike (one sampler, one noise); a failed compile warns once and answers
eagerly.
"""

from __future__ import annotations

import re
import threading
import warnings
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch._inductor.graph import GraphLowering

import llama32
from fixtures import without_cached
from llama32.engine import Rows, static_decode_step
from llama32.lora import GatheredAdapters
from llama32.sampling import SamplingParams, StepKnobs
from test_lora import write_adapter

MAX_BATCH = 4


@pytest.fixture(scope="module")
def handle(make_checkpoint, llama3_tokenizer_dir, tmp_path_factory):
    """A tiny Llama 3.2 with two adapters loaded, dense weights (inductor traces dense weights, not
    oneDNN-packed ones), eager by default on CPU."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAMA32_CPU_PACK", "0")
    base = make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir)
    tmp = tmp_path_factory.mktemp("compiled-adapters")
    a = str(write_adapter(base, tmp / "a", seed=1))
    b = str(write_adapter(base, tmp / "b", seed=2, r=8, lora_alpha=16))
    llm = llama32.load(base, dtype="float32", device="cpu", max_batch=MAX_BATCH)
    mp.undo()
    assert not llm.compiled
    yield llm, a, b
    llm.compiled = False


def mix(a, b):
    """Greedy and sampled requests with every knob, adapters on and off; short raw prompts, so every step
    attends over the same 16 positions."""
    sampled = dict(raw=True, temperature=0.9, max_tokens=8)
    return [
        dict(prompt="Hello there", raw=True, temperature=0, max_tokens=8),
        dict(prompt="One two", raw=True, temperature=0, max_tokens=8, lora=a, repetition_penalty=1.3),
        dict(prompt="Three", **sampled, seed=1, top_k=5),
        dict(prompt="Four five", **sampled, seed=2, top_k=40, lora=b),
        dict(prompt="Six", **sampled, seed=3, top_k=50, top_p=0.8),
        dict(prompt="Seven", **sampled, seed=4, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.4),
        dict(prompt="Eight nine", **sampled, seed=5, top_p=0.999, repetition_penalty=1.2, lora=a),
        dict(prompt="Ten", raw=True, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3, lora=b),
    ]


def in_threads(llm, requests):
    """Each request on its own thread, all at once (so they share steps); results in order."""
    results = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def work(i):
        barrier.wait()
        results[i] = llama32.generate(llm, **requests[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    return results


def tokens(results):
    return [(r["response"], r["usage"]) for r in results]


@pytest.fixture(scope="module")
def warmed(handle):
    """`Runner.warm_up` from nothing (dynamo reset), with the code inductor writes for each of its graphs kept in
    order (as `run_and_get_code` keeps it: the hook is global, so the warm-up's thread is seen too); then
    requests at every batch size, several attended lengths and two cache lengths. Shared by the warm-up test
    and the generated-code test and the settings test, so the suite compiles these graphs once. Both adapters are
    loaded first, so the graphs take the adapters' stacks as the loop passes them."""
    llm, a, b = handle
    for lora in (a, b):
        llama32.generate(llm, prompt="x", raw=True, lora=lora, max_tokens=1)
    requests = [dict(prompt="word " * n, raw=True, temperature=t, seed=i + 1, top_p=0.9, max_tokens=6)
                for i, (n, t) in enumerate([(3, 0), (40, 0.8), (100, 0), (12, 0.9)])]
    want = [llama32.generate(llm, **r) for r in requests]  # eager
    runner = llm.loop.runner
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()  # no graph or seen size left from the other tests
    counters.clear()
    llm.compiled, llm._compiled_step = True, None
    llm.compiled_shapes.clear()
    runner.warmed.clear()
    code = []
    try:
        with mock.patch.object(GraphLowering, "save_output_code", code.append):
            runner.warm_up()
            warming = runner.warming
            during = llama32.generate(llm, **requests[0])
            finished = runner.wait_warm(timeout=900)
        compiled = llm.compiled  # it compiled (a failure would have turned it off)
        warmed = counters["stats"]["unique_graphs"]
        seen = dict(runner.warmed), dict(llm.compiled_shapes)
        alone = [llama32.generate(llm, **r) for r in requests]
        together = [in_threads(llm, requests[:size]) for size in range(2, MAX_BATCH + 1)]
    finally:
        llm.compiled = False  # (its compiled step is kept for the settings test)
    return SimpleNamespace(
        llm=llm, a=a, b=b, step=llm._compiled_step, warming=warming, finished=finished, compiled=compiled,
        warmed=warmed, seen=seen, code=code,
        want=want, during=during, alone=alone, together=together, graphs=counters["stats"]["unique_graphs"],
        breaks=dict(counters["graph_break"]), shapes=set(llm.compiled_shapes))


def test_warm_up_leaves_nothing_to_compile_while_serving(warmed):
    """`Runner.warm_up` compiles the step at four shapes on a scratch cache; afterwards requests at every
    batch size, several attended lengths and two cache lengths run compiled and compile nothing more. While
    it compiles (in the background), steps run eagerly and answer the same."""
    w = warmed
    runner = w.llm.loop.runner
    assert w.warming and w.finished and w.compiled
    warm, lazy = w.seen
    assert set(warm) == set(runner.warm_shapes()) and not lazy
    assert w.warmed == len(runner.warm_shapes()) == 4
    assert w.graphs == w.warmed  # nothing compiled while serving
    assert not w.breaks
    want = tokens(without_cached(w.want))  # (the prompts' prefixes are reused in the later runs)
    assert tokens(without_cached([w.during])) == want[:1]
    assert tokens(without_cached(w.alone)) == want
    for results in w.together:
        assert tokens(without_cached(results)) == want[:len(results)]
    assert {rows for rows, _ in w.shapes} == {1, 2, 4}
    assert len({attended for _, attended in w.shapes}) >= 3  # 16, 32 and longer: the 100-token prompt's


def test_every_setting_and_batch_size_runs_the_warm_up_graphs(warmed):
    """After `warm_up`, a mix of every sampler setting, adapters on and off, and every batch size (more requests
    than rows too) runs compiled and compiles nothing more, with no graph break: the warm-up's graph for a shape
    serves whatever the settings. Its answers are the eager step's and the same static step's run uncompiled,
    greedy and sampled alike (one sampler, one noise), and each request's in any batch is its solo answer."""
    llm = warmed.llm
    requests = mix(warmed.a, warmed.b)
    greedy = [i for i, r in enumerate(requests) if r["temperature"] == 0]
    eager = [llama32.generate(llm, **r) for r in requests]  # the reference step

    # The same static step, uncompiled: what the compiled one must reproduce, sampled rows included.
    llm.compiled, llm._compiled_step = True, static_decode_step
    try:
        static_alone = [llama32.generate(llm, **r) for r in requests]
    finally:
        llm.compiled, llm._compiled_step = False, warmed.step

    counters = torch._dynamo.utils.counters
    counters.clear()
    llm.compiled_shapes.clear()
    llm.compiled = True
    try:
        alone = [llama32.generate(llm, **r) for r in requests]  # batch size 1
        together = [in_threads(llm, requests[:size]) for size in range(2, MAX_BATCH + 1)]
        together.append(in_threads(llm, requests))  # more than max_batch: some wait, rows come and go
        reversed_ = in_threads(llm, requests[::-1][:MAX_BATCH])
    finally:
        llm.compiled = False

    assert tokens([alone[i] for i in greedy]) == tokens([eager[i] for i in greedy])
    assert tokens(alone) == tokens(static_alone) == tokens(eager)  # sampled rows too: one sampler, one noise
    for results in together:  # every request gets its solo answer in any batch
        assert tokens(results) == tokens(alone[:len(results)])
    assert tokens(reversed_) == tokens(alone[::-1][:MAX_BATCH])
    lp = [e["logprob"] for e in alone[-1]["logprobs"]]
    assert lp == pytest.approx([e["logprob"] for e in eager[-1]["logprobs"]], abs=1e-4)

    shapes = set(llm.compiled_shapes)
    assert {rows for rows, _ in shapes} == {1, 2, 4}  # every batch bucket ran, compiled
    assert {n for _, n in shapes} == {16}
    assert counters["stats"]["unique_graphs"] == 0, "a setting or batch size compiled a graph of its own"
    assert not counters["graph_break"]


def step_args(llm, rows=MAX_BATCH, attended=256, adapters=True):
    """One decode step's arguments over a fresh cache of `attended` positions, rows with mixed settings."""
    state = Rows(llm, rows, attended)
    knobs = StepKnobs(rows, llm.config.vocab_size, llm.device)
    settings = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9),
                SamplingParams(temperature=1.2, top_k=40, top_p=0.5, repetition_penalty=1.3),
                SamplingParams(temperature=0.8, top_k=5, frequency_penalty=0.2, presence_penalty=0.1)]
    for i in range(rows):
        knobs.set_row(i, settings[i % len(settings)], seed=i, prompt_ids=[1, 2, 3])
    loaded = list(llm._adapters.values())
    lora = GatheredAdapters.of(llm, [loaded[i % len(loaded)] if i % 2 else None for i in range(rows)]) \
        if adapters else None
    tokens = torch.arange(rows) + 5
    pos = torch.arange(rows) + 3
    return (llm.model, tokens, pos, state.cache.k, state.cache.v, attended, knobs, None, lora)


def test_the_step_has_no_graph_break(handle):
    llm, a, b = handle
    llama32.generate(llm, prompt="x", raw=True, lora=a, max_tokens=1)
    llama32.generate(llm, prompt="x", raw=True, lora=b, max_tokens=1)
    with torch.inference_mode():
        explained = torch._dynamo.explain(static_decode_step)(*step_args(llm))
    assert explained.graph_count == 1
    assert explained.graph_break_count == 0, explained.break_reasons


def buffers(code: str) -> list[list[str]]:
    """The sizes of the buffers a graph's generated code allocates, each as its dimensions (digits or symbols)."""
    found = re.findall(r"empty_strided\w*\(\(([^)]*)\)", code)
    return [[d.strip() for d in dims.split(",") if d.strip()] for dims in found]


def test_the_step_holds_no_cache_sized_temporary(warmed):
    """Inductor's code for the step allocates no buffer of a layer cache's form (rows, KV heads, positions,
    head_dim) over the positions attended, and nothing as big as a layer's cache: the cache is updated in
    place. (Writing through a view of the cache instead made inductor copy the view out and back.) Read from
    the warm-up's graphs, the ones the loop runs: the first with every size static, the others symbolic."""
    c = warmed.llm.config
    shapes = warmed.llm.loop.runner.warm_shapes()
    assert len(warmed.code) == len(shapes)  # one graph's code per warm-up shape, in their order
    graphs = [buffers(code) for code in warmed.code]
    assert all(graphs), "no buffer found: the generated code's form changed"
    assert all(d.isdigit() for dims in graphs[0] for d in dims)
    assert all(any(not d.isdigit() for dims in g for d in dims) for g in graphs[1:]), "no symbolic size"
    rows, _, _, attended = shapes[0]
    layer = rows * c.num_key_value_heads * attended * c.head_dim
    # the logits and the sampler's (rows, vocabulary) buffers are allowed; nothing cache-sized or bigger
    big = [dims for dims in graphs[0] if torch.Size([int(d) for d in dims]).numel() >= layer
           and dims[-1] not in (str(c.vocab_size), "1024")]
    assert not big, big
    # (rows, KV heads, positions, head_dim) over the positions attended, or a symbolic number of them (fewer:
    # the step's own new key and value, its queries padded)
    cache_like = [dims for g in graphs for dims in g if len(dims) == 4 and dims[1] == str(c.num_key_value_heads)
                  and dims[3] == str(c.head_dim) and not (dims[2].isdigit() and int(dims[2]) < attended)]
    assert not cache_like, cache_like


def test_a_failed_compile_warns_once_and_answers_eagerly(handle, monkeypatch):
    llm, _, _ = handle
    requests = [dict(prompt="Hello there", raw=True, temperature=0, max_tokens=5),
                dict(prompt="Three", raw=True, temperature=0.9, seed=1, top_p=0.9, max_tokens=5)]
    want = [llama32.generate(llm, **r) for r in requests]

    def broken(*args):
        raise RuntimeError("no Triton here")

    llm.compiled, llm._compiled_step = True, broken
    llm.compiled_shapes.clear()  # a new step function: no shape of it has compiled
    try:
        with pytest.warns(RuntimeWarning, match="compiling the decode step failed") as caught:
            got = [llama32.generate(llm, **requests[0])]
        assert not llm.compiled  # eager from now on
        got.append(llama32.generate(llm, **requests[1]))
    finally:
        llm.compiled, llm._compiled_step = False, None
    assert len([w for w in caught if "compiling" in str(w.message)]) == 1
    assert tokens(got) == tokens(want)


def test_only_a_compile_failure_falls_back_to_eager(handle):
    """Out of memory, or any error at a shape that compiled before, is a runtime error: the step's requests
    fail with it (never rerun eagerly, which would record the sampler's history twice), and the handle stays
    compiled and usable."""
    llm, _, _ = handle
    request = dict(prompt="Hello there", raw=True, temperature=0, max_tokens=5)
    want = llama32.generate(llm, **request)
    failures = [torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("an illegal memory access")]

    def failing(*args):
        raise failures[0]

    llm.compiled, llm._compiled_step = True, failing
    llm.compiled_shapes.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "compiling failed" warning
            with pytest.raises(torch.OutOfMemoryError):
                llama32.generate(llm, **request)
            assert llm.compiled
            failures.pop(0)
            llm.compiled_shapes[(1, 16)] = 1.0  # this shape compiled before: an error now is a runtime one
            with pytest.raises(RuntimeError, match="illegal memory access"):
                llama32.generate(llm, **request)
            assert llm.compiled
    finally:
        llm.compiled, llm._compiled_step = False, None
        llm.compiled_shapes.clear()
    assert without_cached(llama32.generate(llm, **request)) == without_cached(want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_graph_step_equals_eager_cuda(make_checkpoint, llama3_tokenizer_dir):
    llm = llama32.load(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), dtype="float32",
                       device="cuda")
    assert llm.compiled  # compiled by default on CUDA, and compiling ahead, in the background
    assert llm.loop.runner.wait_warm(timeout=900) and llm.compiled
    assert set(llm.loop.runner.warmed) == set(llm.loop.runner.warm_shapes())
    requests = [dict(prompt="Hello there", temperature=0, max_tokens=12),
                dict(prompt="Tell me a story", temperature=0.9, seed=5, top_p=0.9, top_k=20,
                     repetition_penalty=1.2, frequency_penalty=0.3, max_tokens=10)]
    llm.compiled = False
    eager = [llama32.generate(llm, **r) for r in requests]
    llm.compiled, llm._compiled_step = True, static_decode_step
    static = [llama32.generate(llm, **r) for r in requests]
    llm.compiled, llm._compiled_step = True, None
    compiled = [llama32.generate(llm, **r) for r in requests]
    again = llama32.generate_batch(llm, requests)  # same shapes: served from the compiled graphs
    assert tokens(compiled[:1]) == tokens(eager[:1])
    assert tokens(compiled) == tokens(static) == tokens(again)
