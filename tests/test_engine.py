"""The generation loop (engine/): many callers on threads, each result equal to its solo run; streams that
close cancel their row; a bad request disturbs nothing; max_batch and the KV-cache budget are honoured."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import llama32
from fixtures import without_cached
from llama32 import InvalidRequest
from llama32.engine.scheduler import budget_for
from llama32.model import DecoderLayer, Linear, span_unit
from test_lora import write_adapter

GREEDY = dict(raw=True, temperature=0)


def chatml(text):
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


MIXED = [
    dict(prompt=chatml("What is the capital of France?"), max_tokens=20, **GREEDY),
    dict(prompt=chatml("Write a poem about the sea."), max_tokens=24, **GREEDY, repetition_penalty=1.3),
    dict(prompt=chatml("Name three colours."), raw=True, temperature=0.8, seed=5, top_p=0.9, max_tokens=16),
    dict(prompt=chatml("Tell me a joke."), raw=True, temperature=1.0, seed=17, top_k=40, max_tokens=18,
         frequency_penalty=0.5, presence_penalty=0.4),
    dict(prompt=chatml("Count to ten."), max_tokens=30, stream=True, **GREEDY),
    dict(prompt=chatml("Why is the sky blue?"), raw=True, temperature=0.7, seed=99, top_k=5, top_p=0.8,
         max_tokens=22, stream=True),
    dict(prompt=chatml("Say hello in French."), max_tokens=12, logprobs=True, top_logprobs=3, **GREEDY),
    dict(prompt=chatml("List two fruits."), max_tokens=25, stop=["\n", "."], **GREEDY),
]


def run(llm, request):
    out = llama32.generate(llm, **request)
    if request.get("stream"):
        chunks = list(out)
        return {"text": "".join(c["response"] for c in chunks), "usage": chunks[-1]["usage"]}
    return out


def same(got: list[dict], want: list[dict]) -> bool:
    """Equal results: text, calls, usage but for cached_tokens (what an earlier request left to reuse) and
    tokens exactly; log-probabilities to float32 rounding (a batched matrix product may sum in another order
    than a single row's)."""
    def split(r):
        entries = r.get("logprobs", [])
        rest = without_cached({k: v for k, v in r.items() if k != "logprobs"})
        return rest, [(e["id"], [t["id"] for t in e["top_logprobs"]]) for e in entries], \
            [e["logprob"] for e in entries] + [t["logprob"] for e in entries for t in e["top_logprobs"]]
    for g, w in zip(got, want, strict=True):
        (g_rest, g_ids, g_lp), (w_rest, w_ids, w_lp) = split(g), split(w)
        assert g_rest == w_rest and g_ids == w_ids
        assert g_lp == pytest.approx(w_lp, abs=1e-4)
    return True


def logprob_bits(r: dict) -> list:
    """A result's log-probabilities as they are, for comparing bit for bit: (id, logprob, [(id, logprob)...])
    per token."""
    return [(e["id"], e["logprob"], [(t["id"], t["logprob"]) for t in e["top_logprobs"]]) for e in r["logprobs"]]


def in_threads(fn, args_list):
    results, errors = [None] * len(args_list), []

    def work(i, args):
        try:
            results[i] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    return results


SYSTEM = ("You are a careful assistant for a small public library. Answer briefly, in plain words, and say so "
          "when you do not know something.")
BF16_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue to a ten-year-old, in a few paragraphs.",
    "List three uses of copper.",
    "Write a haiku about autumn rain.",
    "What is 17 times 23? Show the steps.",
    "Describe a cat.",
    "Give me a recipe for pancakes, with quantities, and tell me which step people most often get wrong.",
    "Hi",
]


@pytest.fixture(scope="module")
def smol_bf16_solo(smollm2_dir):
    """SmolLM2 in bfloat16 and each BF16 request's answer run alone, every prompt computed (no reuse)."""
    llm = llama32.load(smollm2_dir, dtype="bfloat16", device="cpu")
    if llm.model.cpu_path == "widened":
        pytest.skip("bfloat16 on a CPU without native bfloat16 (AVX2 only) is not row-invariant: a row rounds "
                    "one way in products of up to 16 rows and another in larger ones (docs/API.md)")
    llm.loop.reuse_prefixes = False
    requests = [dict(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}],
                     temperature=0, max_tokens=40, logprobs=True, top_logprobs=2) for p in BF16_PROMPTS]
    return llm, requests, [llama32.generate(llm, **r) for r in requests]


@pytest.mark.parametrize("reuse", [False, True], ids=["reuse-off", "reuse-on"])
@pytest.mark.parametrize("count", [4, 6, 8])
def test_bfloat16_answers_sent_together_are_their_solo_answers(smol_bf16_solo, count, reuse):
    """bfloat16 answers and log-probabilities sent together are the solo ones, to the bit: every product runs in
    row tiles verified at load (tiles.py) and every prompt span takes the masked attention
    (`Runner.one_attention`), so a row's bits depend on neither the rows beside it nor how its prompt is
    chunked. With prefix reuse on, the shared system prompt's keys and values come from another request's
    prefill: they are the same bits too. (Set `one_attention` to False, and the first prompt's answer parts.)"""
    llm, requests, alone = smol_bf16_solo
    assert llm.model.row_invariant and llm.loop.runner.one_attention
    llm.loop.reuse_prefixes = reuse
    try:
        if reuse:  # one request first, so that the group finds the system prompt's blocks stored
            assert llama32.generate(llm, **requests[-1])["response"] == alone[-1]["response"]
        picked = list(range(count))
        together = in_threads(lambda r: llama32.generate(llm, **r), [(requests[i],) for i in picked])
    finally:
        llm.loop.reuse_prefixes = False
    for i, got in zip(picked, together):
        want = alone[i]
        assert got["response"] == want["response"], BF16_PROMPTS[i]
        assert logprob_bits(got) == logprob_bits(want)
    assert all((r["usage"]["cached_tokens"] >= 32) == reuse for r in together)  # 32: one block (engine/memory.py)


def test_bfloat16_prompts_share_packed_forwards_with_their_solo_answers(smol_bf16_solo, monkeypatch):
    """Where the runner packs prompt spans (`Runner.packs`: the CPU, spans attending written out or fused), the
    prompts of unlike lengths that an iteration prefills share forwards, their tokens one after another
    (`Runner.prefill_packed`): sent together, and again while a long answer decodes (chunks beside its steps),
    each answer and its log-probabilities are the solo ones, to the bit, and forwards carried several spans."""
    llm, requests, alone = smol_bf16_solo
    if not llm.loop.runner.packs:
        pytest.skip("prompt spans attend through PyTorch's kernels as padded here (model.span_attention), so each "
                    "row's span takes a forward of its own")
    packed, real = [], llm.loop.runner.prefill_packed
    monkeypatch.setattr(llm.loop.runner, "prefill_packed",
                        lambda rows, spans, adapter: packed.append(len(spans)) or real(rows, spans, adapter))
    together = llama32.generate_batch(llm, requests)  # submitted at once: nothing decoding yet
    assert packed and max(packed) > 1
    del packed[:]
    stream = llama32.generate(llm, stream=True, **dict(requests[0], max_tokens=120))
    next(stream)  # its first token: it decodes from now on
    later = in_threads(lambda r: llama32.generate(llm, **r), [(r,) for r in requests[1:]])
    assert "usage" in list(stream)[-1]
    assert packed and max(packed) > 1
    for i, (a, b) in enumerate(zip(together, alone)):
        assert a["response"] == b["response"] and logprob_bits(a) == logprob_bits(b), BF16_PROMPTS[i]
    for i, (a, b) in enumerate(zip(later, alone[1:]), start=1):
        assert a["response"] == b["response"] and logprob_bits(a) == logprob_bits(b), BF16_PROMPTS[i]


def test_bfloat16_lora_answers_sent_together_are_their_solo_answers(smol_bf16_solo, smollm2_dir):
    """The same to the bit for rows with a LoRA adapter: its rank-4 products sum in float64 where the base
    products run in row tiles (lora.adapter_term). In one bfloat16 call their sums rounded otherwise for 3 or 4
    rows than for 1 (too rarely for the tiles' check to see: r outputs a row), and the second and fourth of these
    answers parted from their solo ones, by 0.057 in a log-probability and in a token (found by the schedule
    fuzzer, benchmarks/schedule_fuzz.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from schedule_fuzz import build_adapter, chatml

    llm = smol_bf16_solo[0]
    lora = str(build_adapter(smollm2_dir))
    requests = [dict(prompt=chatml(None, t), raw=True, max_tokens=30, temperature=0, logprobs=True, lora=lora)
                for t in ("What is a brigantine?", "Describe a storm at sea.", "Why do ships have bells?",
                          "List three knots.")]
    alone = [llama32.generate(llm, **r) for r in requests]
    assert alone[0]["response"] != llama32.generate(llm, **dict(requests[0], lora=None))["response"]
    together = llama32.generate_batch(llm, requests)
    for got, want in zip(together, alone):
        assert got["response"] == want["response"]
        assert [(e["id"], e["logprob"]) for e in got["logprobs"]] == [(e["id"], e["logprob"]) for e in want["logprobs"]]


def test_threads_get_their_solo_answers(smol, monkeypatch):
    solo = [run(smol, r) for r in MIXED]
    sizes, forward = [], smol.model.forward
    monkeypatch.setattr(smol.model, "forward", lambda ids, **kw: sizes.append(len(ids)) or forward(ids, **kw))
    together = in_threads(run, [(smol, r) for r in MIXED + MIXED])
    assert same(together, solo + solo)
    assert max(sizes) > 1  # the threads really shared forward passes
    assert smol.loop.stats().items() >= {"running": 0, "waiting": 0}.items()


def test_threads_with_different_adapters_share_steps(make_checkpoint, llama3_tokenizer_dir, tmp_path):
    base = make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir)
    a = str(write_adapter(base, tmp_path / "a", seed=1))
    b = str(write_adapter(base, tmp_path / "b", seed=2, r=8, lora_alpha=16))
    llm = llama32.load(base, device="cpu", dtype="float32")
    reqs = [dict(prompt=p, raw=True, temperature=0, max_tokens=10, **({"lora": l} if l else {}))
            for p in ("Hello there", "One two three") for l in (None, a, b)]
    solo = [llama32.generate(llm, **r) for r in reqs]
    assert len({s["response"] for s in solo[:3]}) == 3  # each adapter changes the answer
    assert without_cached(in_threads(lambda r: llama32.generate(llm, **r), [(r,) for r in reqs * 2])) == \
        without_cached(solo * 2)
    # and nothing was left installed on the shared modules
    assert all(getattr(m, "adapter", None) is None for m in llm.model.modules())


def test_closing_a_stream_cancels_its_row(smol):
    want = without_cached(run(smol, MIXED[0]))
    stream = llama32.generate(smol, prompt=chatml("Write a very long story."), max_tokens=2000, stream=True,
                              **GREEDY)
    next(stream), next(stream)
    assert smol.loop.stats()["running"] == 1
    stream.close()
    deadline = time.time() + 3  # far less than the 2000 tokens would take
    while smol.loop.stats()["running"] and time.time() < deadline:
        time.sleep(0.01)
    assert smol.loop.stats().items() >= {"running": 0, "waiting": 0}.items()
    assert without_cached(run(smol, MIXED[0])) == want  # and the model answers as before


def test_dropping_a_stream_cancels_its_row(smol):
    stream = llama32.generate(smol, prompt=chatml("Write a very long story."), max_tokens=2000, stream=True,
                              **GREEDY)
    next(stream)
    del stream  # the generator is closed when collected
    deadline = time.time() + 3  # far less than the 2000 tokens would take
    while smol.loop.stats()["running"] and time.time() < deadline:
        time.sleep(0.01)
    assert smol.loop.stats()["running"] == 0


def test_a_bad_request_mid_flight_disturbs_nothing(smol):
    want = run(smol, MIXED[1])
    stream = llama32.generate(smol, **dict(MIXED[1], stream=True))
    first = next(stream)
    with pytest.raises(InvalidRequest, match="temperature"):
        llama32.generate(smol, prompt="x", temperature=9)
    rest = [first] + list(stream)
    assert "".join(c["response"] for c in rest) == want["response"]


def test_max_batch_bounds_the_rows_and_the_rest_wait(smollm2_dir, monkeypatch):
    llm = llama32.load(smollm2_dir, dtype="float32", device="cpu", max_batch=2)
    assert llm.loop.max_batch == 2
    solo = [run(llm, r) for r in MIXED[:5]]
    sizes, forward = [], llm.model.forward
    waiting_seen = []

    def counting(ids, **kw):
        sizes.append(len(ids))
        waiting_seen.append(llm.loop.stats()["waiting"])
        return forward(ids, **kw)

    monkeypatch.setattr(llm.model, "forward", counting)
    results = in_threads(run, [(llm, r) for r in MIXED[:5]])
    assert same(results, solo)
    assert max(sizes) == 2 and max(waiting_seen) > 0


def test_a_request_that_outgrows_memory_is_paused_and_resumed_unchanged(smollm2_dir, monkeypatch):
    roomy = llama32.load(smollm2_dir, dtype="float32", device="cpu")
    # 256 positions for the rows (and room to grow them: scheduler.py's budget_for): two rows of 128 each, or
    # one of 256
    tensors = 2 * roomy.config.num_hidden_layers
    tight = llama32.load(smollm2_dir, dtype="float32", device="cpu", max_batch=2,
                         kv_cache_bytes=budget_for(256, roomy.loop.position_bytes, tensors))
    assert tight.loop.max_positions == 256
    reqs = [dict(prompt=chatml("Write a long story about a dragon."), max_tokens=150, **GREEDY),
            dict(prompt=chatml("Write a long poem about the sea."), max_tokens=150, raw=True, temperature=0.9,
                 seed=3, repetition_penalty=1.2, frequency_penalty=0.3, logprobs=True, top_logprobs=2)]
    assert all(len(roomy.tokenizer.encode(r["prompt"])) + 150 > 128 for r in reqs)  # both outgrow a half
    want = [run(roomy, r) for r in reqs]
    assert all(w["usage"]["completion_tokens"] == 150 for w in want)
    paused, real = [], tight.loop.memory.pause
    monkeypatch.setattr(tight.loop.memory, "pause", lambda job: paused.append(job.produced) or real(job))
    got = in_threads(run, [(tight, r) for r in reqs])
    assert paused and all(0 < p < 150 for p in paused)  # paused mid-generation, then resumed
    assert same(got, want)
    assert _settle(tight) == {"running": 0, "waiting": 0}


def test_no_request_is_served_alone_for_its_max_tokens(smollm2_dir, monkeypatch):
    # each request's prompt + max_tokens is more than half the budget: they still decode side by side
    probe = llama32.load(smollm2_dir, dtype="float32", device="cpu")
    llm = llama32.load(smollm2_dir, dtype="float32", device="cpu", max_batch=2,
                       kv_cache_bytes=2048 * probe.loop.position_bytes)
    streams = [llama32.generate(llm, prompt=chatml(f"Count to {n}."), max_tokens=1500, stream=True, **GREEDY)
               for n in (50, 60)]
    sizes, forward = [], llm.model.forward
    monkeypatch.setattr(llm.model, "forward", lambda ids, **kw: sizes.append(ids.shape) or forward(ids, **kw))
    for s in streams:
        next(s)
    for _ in range(4):
        for s in streams:
            next(s)
    for s in streams:
        s.close()
    assert (2, 1) in sizes  # one decode forward carried both rows


def test_prompts_arriving_together_are_prefilled_in_one_forward(smollm2_dir, monkeypatch):
    llm = llama32.load(smollm2_dir, dtype="float32", device="cpu")
    reqs = [r for r in MIXED if not r.get("stream")][:4]
    solo = [run(llm, r) for r in reqs]
    sizes, forward = [], llm.model.forward
    monkeypatch.setattr(llm.model, "forward", lambda ids, **kw: sizes.append(tuple(ids.shape)) or forward(ids, **kw))
    got = llama32.generate_batch(llm, reqs)  # submitted at once: admitted together, nothing decoding yet
    assert same(got, solo)
    assert any(b > 1 and t > 1 for b, t in sizes)  # several prompts, each many tokens, in one forward


def test_prompts_of_very_different_lengths_arriving_together_get_a_forward_each(smollm2_dir, monkeypatch):
    """Padded to the longest, one forward over a 300-token prompt and three short ones would compute 4 x 300
    positions for about 330: each goes in a forward of its own, with the answers they have alone."""
    from llama32.engine.prefill import padding_wasted

    assert padding_wasted([300, 10, 12, 9]) and not padding_wasted([128, 128, 120]) and not padding_wasted([20, 9])
    llm = llama32.load(smollm2_dir, dtype="float32", device="cpu")
    long = " ".join(["the river runs to the sea and back again"] * 30)
    reqs = [dict(prompt=p, max_tokens=6, **GREEDY) for p in (long, "Hi there", "One two", "Say it")]
    solo = [run(llm, r) for r in reqs]
    llm.loop.reuse_prefixes = False  # every prompt computed again
    sizes, forward = [], llm.model.forward
    monkeypatch.setattr(llm.model, "forward", lambda ids, **kw: sizes.append(tuple(ids.shape)) or forward(ids, **kw))
    got = llama32.generate_batch(llm, reqs)  # submitted at once: admitted together, nothing decoding yet
    assert same(got, solo)
    assert not any(b > 1 and t > 1 for b, t in sizes)  # no forward carried several prompts
    assert sum(1 for b, t in sizes if t > 1) == 4


def test_an_impossible_kv_budget_is_an_error_not_a_hang(smollm2_dir):
    probe = llama32.load(smollm2_dir, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        llama32.load(smollm2_dir, dtype="float32", device="cpu", kv_cache_bytes=1000)
    small = llama32.load(smollm2_dir, dtype="float32", device="cpu", kv_cache_bytes=64 * probe.loop.position_bytes)
    with pytest.raises(InvalidRequest, match="max_tokens.*kv_cache_bytes"):
        llama32.generate(small, prompt=chatml("Hello there, how are you today?"), max_tokens=60, **GREEDY)
    with pytest.raises(InvalidRequest, match="text.*kv_cache_bytes"):
        llama32.score(small, "word " * 80, context="Say:")
    ok = llama32.generate(small, prompt="Hi", max_tokens=8, **GREEDY)  # what fits runs
    assert ok["usage"]["completion_tokens"] == 8


def test_an_error_in_a_step_fails_only_its_requests(smollm2_dir, monkeypatch):
    llm = llama32.load(smollm2_dir, dtype="float32", device="cpu")
    want = run(llm, MIXED[0])
    forward, calls = llm.model.forward, []

    def failing_once(ids, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return forward(ids, **kw)

    monkeypatch.setattr(llm.model, "forward", failing_once)
    with pytest.raises(RuntimeError, match="boom"):
        run(llm, MIXED[0])
    assert without_cached(run(llm, MIXED[0])) == without_cached(want)  # the loop lives on, and the model is unharmed
    assert llm.loop.stats().items() >= {"running": 0, "waiting": 0}.items()


def test_load_checks_max_batch(smollm2_dir):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_batch"):
            llama32.load(smollm2_dir, max_batch=bad)


def test_scoring_does_not_wait_for_running_rows(smol):
    """A score request is served between two decode steps, not after the batch drains."""
    want = llama32.score(smol, " Paris.", context="The capital of France is")
    stream = llama32.generate(smol, prompt=chatml("Write a very long story."), max_tokens=2000, stream=True,
                              **GREEDY)
    next(stream)
    started = time.time()
    assert llama32.score(smol, " Paris.", context="The capital of France is") == want
    assert smol.loop.stats()["running"] == 1  # the story is still being written
    stream.close()
    assert time.time() - started < 30


def test_notify_is_called_after_every_event(smol):
    # the hook the server wakes its event loop with: once per event, each already on the queue when it runs
    from llama32.engine import Job
    from llama32.output import Output
    from llama32.requests import validate

    req = validate(smol, dict(prompt=chatml("Count to five."), max_tokens=6, **GREEDY))
    job = Job(req, Output(smol, req))
    seen = []
    job.reply.notify = lambda: seen.append(job.reply.events.qsize())
    smol.loop.submit(job)
    events = list(job.reply.results())
    assert len(seen) == len(events) + 1  # every chunk list, then the end
    assert all(n >= 1 for n in seen)  # the event was on the queue before the caller was woken


# --- hardening: nothing a request does can stop the loop or strand a caller ------------------------------------


def _within(seconds, fn, *args):
    """fn(*args) on a thread; its result, or its error re-raised; fails (instead of hanging) past `seconds`."""
    box = {}

    def work():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"no answer within {seconds} s: the caller would wait forever"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _settle(llm, seconds=5.0):
    deadline = time.time() + seconds
    busy = lambda: {k: llm.loop.stats()[k] for k in ("running", "waiting")}  # noqa: E731
    while any(busy().values()) and time.time() < deadline:
        time.sleep(0.01)
    return busy()


def test_a_failed_kv_allocation_fails_its_request_and_the_loop_lives(smollm2_dir, monkeypatch):
    import llama32.engine as engine

    llm = llama32.load(smollm2_dir, dtype="float32", device="cpu")
    real = engine.Rows.__init__

    def no_memory(self, *args, **kwargs):
        raise MemoryError("no room for the KV cache")

    monkeypatch.setattr(engine.Rows, "__init__", no_memory)
    with pytest.raises(MemoryError, match="KV cache"):
        _within(60, run, llm, MIXED[0])
    with pytest.raises(MemoryError, match="KV cache"):  # and the next caller is answered too
        _within(60, run, llm, MIXED[0])
    monkeypatch.setattr(engine.Rows, "__init__", real)
    assert _within(120, run, llm, MIXED[0]) == run(llm, MIXED[0])


def test_an_error_delivering_one_row_fails_only_that_row(smol, monkeypatch):
    from llama32.output import Output

    want = run(smol, MIXED[0])
    push = Output.push

    def failing(self, token, done, logprob=None):
        if self.req.max_tokens == 9 and self.completion_tokens == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a broken token")
        return push(self, token, done, logprob)

    monkeypatch.setattr(Output, "push", failing)
    bad = dict(prompt=chatml("Count to ten."), max_tokens=9, **GREEDY)

    def bad_run():
        with pytest.raises(UnicodeDecodeError):
            run(smol, bad)
        return "failed"

    got = in_threads(lambda f: f(), [(lambda: run(smol, MIXED[0]),), (bad_run,)])
    assert got == [want, "failed"]


def test_generate_batch_stops_the_others_when_the_caller_is_interrupted(smol, monkeypatch):
    import sys

    gen = sys.modules["llama32.generate"]  # (llama32.generate is also the function)

    def interrupted(chunks):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "_collect", interrupted)
    long = dict(prompt=chatml("Write a very long story."), max_tokens=2000, **GREEDY)
    with pytest.raises(KeyboardInterrupt):
        llama32.generate_batch(smol, [long, long, long])
    assert _settle(smol) == {"running": 0, "waiting": 0}  # not 2000 tokens each, unread


def test_a_close_racing_the_first_read_leaves_nothing_running(smol):
    stream = llama32.generate(smol, prompt=chatml("Write a very long story."), max_tokens=2000, stream=True,
                              **GREEDY)
    stream.close()
    stream._closed = False  # a reader on another thread that passed the closed check just before close()
    assert next(stream, None) is None  # the cancelled job was dropped unrun
    assert _settle(smol) == {"running": 0, "waiting": 0}


def test_a_job_submitted_as_the_loop_thread_ends_is_served(smollm2_dir, monkeypatch):
    from llama32.engine import GenerationLoop, Job
    from llama32.output import Output
    from llama32.requests import validate

    llm = llama32.load(smollm2_dir, dtype="float32", device="cpu")
    want = run(llm, MIXED[0])
    req = validate(llm, MIXED[0])
    job = Job(req, Output(llm, req))
    real, sent = GenerationLoop._run_once, []

    def run_once(self, idle):
        go_on = real(self, idle)
        if not go_on and not sent:  # the thread decided to end: a caller submits right then
            sent.append(self.submit(job))
        return go_on

    monkeypatch.setattr(GenerationLoop, "_run_once", run_once)
    llm.loop.close()
    chunks = _within(120, lambda: [c for batch in job.reply.results() for c in batch])
    assert sent and "".join(c["response"] for c in chunks) == want["response"]


def test_score_applies_the_head_only_at_the_text(smol, monkeypatch):
    want = llama32.score(smol, " Paris.", context="The capital of France is")
    rows, head = [], smol.model.lm_head.forward
    monkeypatch.setattr(smol.model.lm_head, "forward", lambda x: rows.append(x.shape[:-1].numel()) or head(x))
    context = "The capital of France is " * 40
    got = llama32.score(smol, " Paris.", context=context)
    assert rows == [len(got["ids"])]  # not the ~240 context positions
    monkeypatch.setattr(smol.model.lm_head, "forward", head)
    assert llama32.score(smol, " Paris.", context="The capital of France is") == want
    # equal to the head over every position
    tok = smol.tokenizer
    ids = [tok.bos_id] * (tok.bos_id is not None) + tok.encode(context) + tok.encode(" Paris.")
    with torch.no_grad():
        full = torch.log_softmax(smol.model(torch.tensor([ids]))[0].float(), -1)
    n = len(got["ids"])
    ref = full[-n - 1:-1].gather(-1, torch.tensor(ids[-n:])[:, None])[:, 0]
    assert got["logprobs"] == pytest.approx(ref.tolist(), abs=1e-4)


# --- chunked prefill and prompt-prefix reuse ----------------------------------------------------------------------

SYSTEM = ("<|im_start|>system\nYou are a careful assistant. Answer briefly, cite nothing, and never invent "
          "facts. " * 12 + "<|im_end|>\n")


def ask(question, **extra):
    return dict(prompt=SYSTEM + chatml(question), max_tokens=12, logprobs=True, top_logprobs=2, **GREEDY, **extra)


def no_reuse(llm):
    """`llm` with prompt-prefix reuse turned off: every prompt computed in full, nothing stored."""
    llm.loop.reuse_prefixes = False
    return llm


def test_a_shared_prefix_is_reused_exactly(smollm2_dir):
    """With the default settings, a second prompt sharing a system prompt copies its whole blocks, and its
    result equals a handle that computes everything (float32 greedy token for token, log-probabilities within
    1e-4); streamed too."""
    from llama32.engine import BLOCK

    llm = llama32.load(smollm2_dir, dtype="float32", device="cpu")
    assert llm.loop.reuse_prefixes  # the default
    fresh = no_reuse(llama32.load(smollm2_dir, dtype="float32", device="cpu"))
    first = run(llm, ask("What is the capital of France?"))
    assert first["usage"]["cached_tokens"] == 0
    second = run(llm, ask("Name a large ocean."))
    shared = len(llm.tokenizer.encode(SYSTEM))
    cached = second["usage"]["cached_tokens"]
    assert cached % BLOCK == 0 and shared - BLOCK < cached <= shared + BLOCK  # whole blocks of the system prompt
    want = run(fresh, ask("Name a large ocean."))
    assert want["usage"]["cached_tokens"] == 0
    assert second["response"] == want["response"] and len(second["logprobs"]) == 12
    assert same([second], [want])  # tokens exact, logprobs within 1e-4
    again = run(llm, ask("Name a large ocean.", stream=True))  # the whole prompt but its last position
    assert again["usage"]["cached_tokens"] == (again["usage"]["prompt_tokens"] - 1) // BLOCK * BLOCK >= cached
    assert again["text"] == want["response"]
    assert run(fresh, ask("Name a large ocean."))["usage"]["cached_tokens"] == 0  # off: nothing reused
    assert not fresh.loop.memory.prefixes.blocks  # nor stored
    stats = llm.loop.stats()
    assert 0 < stats["kv_bytes"] <= stats["kv_bytes_total"] == llm.loop.kv_cache_bytes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_follow_up_turn_copies_the_answer_it_sends_back(smollm2_dir, dtype, monkeypatch):
    """A chat's next turn repeats the last answer: a finished request's drawn positions stay in the prefix index
    beside its prompt's (engine/memory.py, `finished`), so the follow-up copies the answer's whole blocks too,
    and its result is a handle's that computes everything: bfloat16 to the bit (where `model.decode_is_span`:
    decode steps on the masked kernel, LLAMA32_STEP_ATTENTION=masked), float32 tokens exact and
    log-probabilities within 1e-4."""
    from llama32.engine import BLOCK

    monkeypatch.setenv("LLAMA32_STEP_ATTENTION", "masked")
    llm = llama32.load(smollm2_dir, dtype=dtype, device="cpu")
    if not llm.loop.memory.answers:
        pytest.skip("drawn positions stay out of the prefix index on this path (model.decode_is_span: bfloat16 "
                    "on AMX or on a CPU without native bfloat16)")
    fresh = no_reuse(llama32.load(smollm2_dir, dtype=dtype, device="cpu"))
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Explain why the sky is blue."}]
    answer = llama32.generate(llm, messages=first, temperature=0, max_tokens=60)
    fed = answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"] - 1  # the last drawn: never fed
    follow = first + [{"role": "assistant", "content": answer["response"]}, {"role": "user", "content": "And at dusk?"}]
    request = dict(messages=follow, temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    got, want = llama32.generate(llm, **request), llama32.generate(fresh, **request)
    assert got["usage"]["cached_tokens"] == fed // BLOCK * BLOCK > answer["usage"]["prompt_tokens"]
    assert want["usage"]["cached_tokens"] == 0
    if dtype == "bfloat16":
        assert got["response"] == want["response"]
        assert logprob_bits(got) == logprob_bits(want)
    else:
        assert same([got], [want])


def test_with_written_decode_steps_a_follow_up_turn_copies_its_prompt_and_recomputes_the_answer(smollm2_dir):
    """Where decode steps attend written out (`model.choose_step_attention`), they do not give a position the
    bits a prompt span gives it, so a finished request's drawn positions stay out of the prefix index: the next
    turn copies the blocks of the first turn's prompt alone, computes the answer it sends back as a span, and
    gets, to the bit, the result of a handle that computes everything."""
    from llama32.engine import BLOCK

    llm = llama32.load(smollm2_dir, dtype="bfloat16", device="cpu")
    if llm.model.step_attention == "masked":
        pytest.skip("decode steps take the masked kernel on this CPU (model.step_attention_verified found rows "
                    "parting from their solo bits, or no native bfloat16)")
    assert not llm.loop.memory.answers
    fresh = no_reuse(llama32.load(smollm2_dir, dtype="bfloat16", device="cpu"))
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Explain why the sky is blue."}]
    answer = llama32.generate(llm, messages=first, temperature=0, max_tokens=60)
    follow = first + [{"role": "assistant", "content": answer["response"]}, {"role": "user", "content": "And at dusk?"}]
    request = dict(messages=follow, temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    got, want = llama32.generate(llm, **request), llama32.generate(fresh, **request)
    assert got["usage"]["cached_tokens"] == answer["usage"]["prompt_tokens"] // BLOCK * BLOCK > 0
    assert got["response"] == want["response"]
    assert logprob_bits(got) == logprob_bits(want)


def test_a_prefix_is_never_reused_across_adapters(make_checkpoint, llama3_tokenizer_dir, tmp_path):
    base = make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir)
    a = str(write_adapter(base, tmp_path / "a", seed=1))
    llm = llama32.load(base, device="cpu", dtype="float32")  # reuse on: the default
    fresh = no_reuse(llama32.load(base, device="cpu", dtype="float32"))
    prompt = "word " * 100
    req = dict(prompt=prompt, raw=True, temperature=0, max_tokens=6, logprobs=True)
    plain = llama32.generate(llm, **req)
    adapted = llama32.generate(llm, **req, lora=a)
    assert adapted["usage"]["cached_tokens"] == 0  # the base model's blocks were not used
    assert adapted["response"] != plain["response"]
    assert same([adapted], [llama32.generate(fresh, **req, lora=a)])  # what computing everything gives
    again = llama32.generate(llm, **req, lora=a)
    assert again["usage"]["cached_tokens"] > 0 and same([again], [adapted])
    base_again = llama32.generate(llm, **req)
    assert base_again["usage"]["cached_tokens"] > 0 and same([base_again], [plain])
    assert same([plain], [llama32.generate(fresh, **req)])


def test_prefixes_stay_within_the_budget_least_recently_used_first(smollm2_dir):
    roomy = llama32.load(smollm2_dir, dtype="float32", device="cpu")
    # the rows' allocation for one such request (memory on demand)
    rows = roomy.loop.scheduler.min_length * roomy.loop.position_bytes
    llm = llama32.load(smollm2_dir, dtype="float32", device="cpu",
                       kv_cache_bytes=rows + 8 * 32 * roomy.loop.position_bytes)  # and 8 blocks beside
    prompts = [dict(prompt=f"{i} " + "alpha beta gamma delta " * 40, raw=True, temperature=0, max_tokens=2)
               for i in range(4)]  # 5 blocks each
    for p in prompts:
        run(llm, p)
        stats = llm.loop.stats()
        assert stats["kv_bytes"] <= stats["kv_bytes_total"]
    assert len(llm.loop.memory.prefixes.blocks) == 8
    assert run(llm, prompts[3])["usage"]["cached_tokens"] > 0  # the most recent is kept
    assert run(llm, prompts[0])["usage"]["cached_tokens"] == 0  # the oldest went first


def test_the_prefill_budget_grows_with_the_rows_decoding(smol):
    """While rows decode, each iteration computes `prefill_chunk` prompt tokens per 8 decoding rows (on the CPU;
    at least one chunk): a step of many rows is long anyway, so a new prompt may take more of it."""
    from types import SimpleNamespace

    from llama32.engine import Scheduler

    def rows(decoding: int, prefilling: int = 1) -> list:
        return ([SimpleNamespace(progress=SimpleNamespace(decoding=True))] * decoding
                + [SimpleNamespace(progress=SimpleNamespace(decoding=False))] * prefilling + [None])

    scheduler = Scheduler(None, max_batch=32, context=4096, prefill_chunk=64, chunk_rows=8)
    assert scheduler.prefill_budget(rows(0, 3)) is None  # nothing decodes: prompts go whole
    assert [scheduler.prefill_budget(rows(n)) for n in (1, 7, 8, 15, 16, 31, 32)] == [64, 64, 64, 64, 128, 192, 256]
    # where prompt spans' products run in calls of 128 rows, two rows decoding or more take whole such units;
    # a lone stream keeps its chunk
    scheduler.span_unit = 128
    assert [scheduler.prefill_budget(rows(n)) for n in (1, 2, 8, 16, 24, 32)] == [64, 128, 128, 128, 256, 256]
    scheduler.span_unit = 1
    scheduler.chunk_rows = None
    assert scheduler.prefill_budget(rows(32)) == 64
    assert smol.loop.scheduler.chunk_rows == 8 and smol.loop.prefill_chunk == 64  # the CPU's defaults
    assert smol.loop.scheduler.span_unit == span_unit(smol.model)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_span_unit_is_what_a_short_prompt_span_pays(smollm2_dir, dtype):
    """`model.span_unit`: the most rows a prompt-span product (not the head) computes for a span of one row,
    what shorter spans pay, leaving out a smallest call timed at load (`RowTiles.least`, which pads only spans
    shorter than itself); 1 where no product runs in tiles (float32 here, bfloat16 widened)."""
    llm = llama32.load(smollm2_dir, dtype=dtype, device="cpu")
    unit = span_unit(llm.model)
    tiles = [m.span_tiles or m.tiles for n, m in llm.model.named_modules()
             if isinstance(m, (Linear, DecoderLayer)) and n != "lm_head"]
    tiles = [t for t in tiles if t is not None]
    if not tiles:
        assert unit == 1
        return
    untimed = [replace(t, least=None) for t in tiles]
    assert all(sum(t.calls(1)) <= unit for t in untimed)
    assert any(sum(t.calls(1)) == unit for t in untimed)
    assert all(sum(t.calls(1)) <= max(unit, t.least or 0) for t in tiles)
    assert llm.loop.scheduler.span_unit == unit


def test_chunked_prefill_equals_transformers_greedy_on_a_long_prompt(smollm2_dir, smol_hf):
    from test_generate import hf_text

    probe = llama32.load(smollm2_dir, dtype="float32", device="cpu")
    two_rows = budget_for(2 * 4096, probe.loop.position_bytes, 2 * probe.config.num_hidden_layers)  # of 4,096 each
    llm = llama32.load(smollm2_dir, dtype="float32", device="cpu", max_batch=2, kv_cache_bytes=two_rows)
    prompt = chatml("Summarise: " + " ".join(f"item {i} is {i * 7 % 13}" for i in range(270)))
    n = len(llm.tokenizer.encode(prompt))
    assert n > 2048  # past the cache's first lengths and several attention key blocks
    want, _ = hf_text(llm, smol_hf, prompt, 16)
    llm.loop.prefill_chunk = 256
    stream = llama32.generate(llm, prompt=chatml("Write a very long story."), max_tokens=2000, stream=True,
                              **GREEDY)
    next(stream)  # a row is decoding, so the long prompt is prefilled in chunks between its steps
    sizes, forward = [], llm.model.forward
    llm.model.forward = lambda ids, **kw: sizes.append(ids.shape[1]) or forward(ids, **kw)
    try:
        got = llama32.generate(llm, prompt=prompt, raw=True, temperature=0, max_tokens=16)
    finally:
        del llm.model.forward
        stream.close()
    assert got["response"] == want
    assert max(sizes) == 256 and sizes.count(256) >= n // 256  # chunks, interleaved with 1-token steps


def test_bfloat16_score_at_the_budgets_edge_is_its_solo_score(smol_bf16_solo, smollm2_dir):
    """A budget of 885 positions gives a text of ~800 tokens a cache of 885 positions, not the 1,024 an ample
    budget gives it, and the forward attends over all 885. The CPU kernel walks keys in blocks of 512, so the last
    block held 373 keys against 512, summed otherwise, and the scores parted from the ample handle's by up to 0.17
    (found by the schedule fuzzer's soak, benchmarks/schedule_fuzz.py --dtype bfloat16 --seed 2001). model.py's
    `attend` pads the keys to a multiple of 512 with masked zero keys, and the scores are the same bits."""
    ample = smol_bf16_solo[0]
    per, tensors = ample.loop.position_bytes, 2 * ample.config.num_hidden_layers
    tight = llama32.load(smollm2_dir, dtype="bfloat16", device="cpu", kv_cache_bytes=budget_for(885, per, tensors))
    tight.loop.reuse_prefixes = False
    words = "the harbour master counted ships while gulls argued over nets and the tide came slowly in".split()
    text = " ".join(words[(i * 7) % len(words)] + ("." if i % 13 == 12 else "") for i in range(700))
    context = "A day at the port."
    n = len(tight.tokenizer.encode(context)) + len(tight.tokenizer.encode(text))
    assert 700 < n < 880 and tight.loop.scheduler.shape(1, n) == (1, 885)  # the budget's edge
    got, want = llama32.score(tight, text, context=context), llama32.score(ample, text, context=context)
    assert (got["ids"], got["logprobs"], got["is_greedy"]) == (want["ids"], want["logprobs"], want["is_greedy"])


def test_a_process_leaving_a_stream_open_exits_cleanly(smollm2_dir, tmp_path):
    """A script that stops reading a stream and ends (the stream still referenced, so never closed) exits with 0.
    The loop thread was still generating while the interpreter finalised, and the process aborted ("terminate
    called without an active exception", exit 134): at exit every loop now cancels its requests and stops."""
    import subprocess
    import sys

    script = tmp_path / "leave.py"
    script.write_text(
        "import sys, llama32\n"
        "llm = llama32.load(sys.argv[1], dtype='float32', device='cpu')\n"
        "stream = llama32.generate(llm, prompt='Tell me a long story about the sea.', max_tokens=3000, stream=True)\n"
        "for i, chunk in enumerate(stream):\n"
        "    if i == 3:\n"
        "        break\n"
        "print('left', flush=True)\n")
    done = subprocess.run([sys.executable, str(script), str(smollm2_dir)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert "left" in done.stdout, done.stderr[-2000:]
    assert done.returncode == 0 and "terminate called" not in done.stderr, (done.returncode, done.stderr[-2000:])


def test_with_every_attention_written_a_short_request_attends_over_256_keys(smollm2_dir, monkeypatch):
    """Where decode steps and prompt spans attend written out or through the fused kernel as
    `fused_step_attention` and `fused_span_attention` call it (bfloat16 on the CPU where the load-time checks
    verify), the CPU's floor is
    256 key positions, not 512 (`model.attention_floor`): a short request's prompt goes through its span
    attention over its own positions and each decode step attends over
    256 keys; its answer and log-probabilities are, to the bit, what the same attention over the 512 floor
    gives. (With `LLAMA32_STEP_ATTENTION=masked` the floor is 512 again.)"""
    import llama32.engine.loop
    import llama32.model as model

    llm = llama32.load(smollm2_dir, dtype="bfloat16", device="cpu")
    if llm.model.span_attention == "kernel":
        pytest.skip("prompt spans take PyTorch's fused kernels as padded on this CPU (model.span_attention_verified, "
                    "or no native bfloat16)")
    assert model.attention_floor("cpu", llm.model) == 256 and llm.loop.scheduler.min_length == 256
    spans, steps = [], []
    span_name = f"{llm.model.span_attention}_span_attention"  # (written out, or the fused kernel on AMX)
    step_name = "fused_step_attention" if llm.model.step_attention == "fused" else "written_attention"
    real_span, real_step = getattr(model, span_name), getattr(model, step_name)
    monkeypatch.setattr(model, span_name, lambda q, k, v, pos: spans.append(q.shape[2]) or real_span(q, k, v, pos))
    monkeypatch.setattr(model, step_name, lambda q, k, v, mask: steps.append(k.shape[2]) or real_step(q, k, v, mask))
    prompt = chatml("Which floor is this? A question asked once, so that no prefix is reused.")
    n = len(llm.tokenizer.encode(prompt))
    request = dict(prompt=prompt, raw=True, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2)
    out = llama32.generate(llm, **request)
    layers = llm.config.num_hidden_layers
    assert spans == [n] * layers and steps == [256] * (3 * layers)
    del steps[:]
    for where in (model, llama32.engine.loop):  # the same attention over the 512 floor
        monkeypatch.setattr(where, "attention_floor", lambda device, m=None: 512)
    wide = llama32.load(smollm2_dir, dtype="bfloat16", device="cpu")
    got = llama32.generate(wide, **request)
    assert steps == [512] * (3 * layers)
    assert got["response"] == out["response"] and logprob_bits(got) == logprob_bits(out)
    monkeypatch.undo()
    monkeypatch.setenv("LLAMA32_STEP_ATTENTION", "masked")
    assert model.attention_floor("cpu", llama32.load(smollm2_dir, dtype="bfloat16", device="cpu").model) == 512


def test_a_prompt_from_position_0_takes_the_causal_kernel(smol, monkeypatch):
    """A prompt prefilled whole from position 0 attends with `model.causal_attention` (about half the masked
    attention's work, the same bits: tests/test_model.py), every layer over its whole span; its decode steps keep
    the mask."""
    import llama32.model as model

    spans, real = [], model.causal_attention
    monkeypatch.setattr(model, "causal_attention", lambda q, *rest: spans.append(q.shape[2]) or real(q, *rest))
    prompt = chatml("Which causal kernel is this? A question asked once, so that no prefix is reused.")
    n = len(smol.tokenizer.encode(prompt))
    out = llama32.generate(smol, prompt=prompt, raw=True, temperature=0, max_tokens=3)
    assert smol.loop.runner.causal_spans and out["usage"]["completion_tokens"] == 3
    assert spans == [n] * smol.config.num_hidden_layers
