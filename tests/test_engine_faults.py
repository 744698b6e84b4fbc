"""Failure paths of the generation loop and the server (issue 34): each test reproduces one defect
deterministically and checks the fix.

The loop tests drive `GenerationLoop._run_once` from the test's own thread (jobs appended to `_waiting`
by hand, no loop thread started), so the schedule is exactly the one written down, not a race."""

from __future__ import annotations

import pytest
import torch

import llama32
from llama32.engine import _END, Job
from llama32.output import Output
from llama32.requests import validate


# --- helpers ----------------------------------------------------------------------------------------------------------


def _job(llm, **request) -> Job:
    req = validate(llm, {"temperature": 0, **request})
    return Job(req, Output(llm, req))


def _add(loop, *jobs: Job) -> None:
    """Queue `jobs` as `submit` does, without starting the loop thread (the test runs the iterations)."""
    with loop._cond:
        loop._waiting.extend(jobs)


def _events(job: Job) -> list:
    """Every event `job`'s caller is sent, to its last (an ended job's reach it through the output thread)."""
    items = []
    while not items or not (items[-1] is _END or isinstance(items[-1], BaseException)):
        items.append(job.reply.events.get(timeout=60))
    return items


def _drain(job: Job) -> list:
    """Everything `job` was sent (it must have ended without an error)."""
    items = _events(job)
    assert items[-1] is _END, items
    return items[:-1]


def _score_alone(llm, ids: list[int], n_context: int) -> list[float]:
    job = Job(ids=ids, n_context=n_context)
    _add(llm.loop, job)
    while not job.finished:
        llm.loop._run_once(0)
    [(logprobs, _greedy)] = _drain(job)
    return logprobs


@pytest.fixture(scope="module")
def smol3(smollm2_dir):
    """SmolLM2 in float32 with three rows, as in the issue's reproduction (its own handle: tests drive its loop)."""
    return llama32.load(smollm2_dir, dtype="float32", device="cpu", max_batch=3)


def _text_ids(llm, n: int) -> list[int]:
    tok = llm.tokenizer
    words = "The quick brown fox jumps over the lazy dog while the river runs to the sea and back. "
    ids = tok.encode(words * (n // 8 + 2))[:n - 1]
    return [tok.bos_id if tok.bos_id is not None else ids[0]] + ids


# --- 1. a prefill forward over rows it was not prefilling ---------------------------------------------------------


def test_prefill_together_leaves_a_scoring_row_between_its_rows_untouched(smol3):
    """The issue's schedule: A decodes; a score S prefills 64 tokens per iteration beside it in row 1; B takes
    row 2 and waits for the prefill budget; C queues; A is closed, C takes row 0; nothing decodes, so B and C
    are prefilled together, and that forward must not write S's row (it wrote token 0 at its position 0)."""
    llm, loop = smol3, smol3.loop
    assert loop.prefill_chunk == 64 and loop.max_batch == 3
    ids = _text_ids(llm, 260)
    want = _score_alone(llm, ids, 1)

    a = _job(llm, prompt="Count from one to a hundred:", max_tokens=200)
    _add(loop, a)
    loop._run_once(0)
    assert a.progress.decoding and a.progress.slot == 0
    s = Job(ids=ids, n_context=1)
    _add(loop, s)
    loop._run_once(0)
    assert s.progress.slot == 1 and s.progress.prefilled == 64
    b = _job(llm, prompt="Name three colours.", max_tokens=4)
    _add(loop, b)
    loop._run_once(0)
    # B waits for the prefill budget
    assert b.progress.slot == 2 and b.progress.prefilled == 0 and s.progress.prefilled == 128
    c = _job(llm, prompt="Say hello.", max_tokens=4)
    _add(loop, c)
    loop.cancel(a)
    loop._run_once(0)  # A leaves after this iteration's step; S gets another 64 tokens, C still waits
    assert c.progress.slot is None and a.finished and s.progress.prefilled == 192
    # The next iteration: C takes row 0, nothing decodes: B and C are prefilled in one go, S beside them.
    loop._run_once(0)
    assert c.progress.slot == 0 and b.progress.decoding and c.progress.decoding
    while not (s.finished and b.finished and c.finished):
        loop._run_once(0)
    [(got, _greedy)] = _drain(s)
    assert got == pytest.approx(want, abs=1e-5)


def test_prefill_rows_writes_only_the_rows_it_prefills(smol3):
    """Runner level: the rows between the spans' slots, not in the forward's batch, keep their cache bits."""
    from llama32.engine.memory import Rows

    llm = smol3
    runner = llm.loop.runner
    rows = Rows(llm, 4, 256, 4)
    with torch.inference_mode():
        for t in rows.cache.k + rows.cache.v:
            t.normal_()
        before = [t.clone() for t in rows.cache.k + rows.cache.v]
        ids = _text_ids(llm, 20)
        runner.prefill_rows(rows, {0: (ids[:12], 0, None), 3: (ids, 0, None)})
        for old, new in zip(before, rows.cache.k + rows.cache.v):
            assert torch.equal(old[1:3], new[1:3])  # rows 1 and 2 were not prefilled
            assert not torch.equal(old[0, :, :12], new[0, :, :12]) and not torch.equal(old[3], new[3])


# --- 2a. a failure while pausing ------------------------------------------------------------------------------------


def _iterate(loop, jobs: list[Job], limit: int = 200) -> None:
    """Run iterations as the loop thread does (an error out of one fails the running rows) until `jobs` end."""
    for _ in range(limit):
        if all(j.finished for j in jobs):
            return
        try:
            loop._run_once(0)
        except BaseException as e:  # noqa: BLE001 - as `_serve`
            loop._fail_running(e)


def _outcome(job: Job):
    """The text `job` produced, or the exception it got."""
    items = _events(job)
    if isinstance(items[-1], BaseException):
        return items[-1]
    return "".join(c["response"] for batch in items[:-1] for c in batch)


PROMPTS = ["Write a short poem about the sea and the wind.", "List three fruits that are red.",
           "What is the capital of France? Explain in one sentence."]


def test_a_failed_pause_fails_only_its_request_and_orphans_none(smol3, monkeypatch):
    llm, loop = smol3, smol3.loop
    solo = []
    for prompt in PROMPTS:
        job = _job(llm, prompt=prompt, max_tokens=6)
        _add(loop, job)
        _iterate(loop, [job])
        solo.append(_outcome(job))
    a, b, c = jobs = [_job(llm, prompt=p, max_tokens=6) for p in PROMPTS]
    _add(loop, *jobs)
    loop._run_once(0)
    assert all(j.progress.decoding for j in jobs)
    # Memory runs short (as the scheduler would say): the latest arrivals, C then B, are paused; keeping B's
    # blocks in the prefix index fails (out of memory while cloning them).
    plan, store, calls = loop.scheduler.plan, loop.memory.prefixes.store, []

    def short_once(running, waiting):
        admit, pause, refuse, shape = plan(running, waiting)
        if not calls:
            calls.append("plan")
            pause = [c, b]
        return admit, pause, refuse, shape

    def failing_store(adapter, ids, *args):
        calls.append("store")
        if calls.count("store") == 2:
            raise MemoryError("no memory for B's blocks")
        return store(adapter, ids, *args)

    monkeypatch.setattr(loop.scheduler, "plan", short_once)
    monkeypatch.setattr(loop.memory.prefixes, "store", failing_store)
    _iterate(loop, jobs)
    assert calls[:3] == ["plan", "store", "store"]
    got = [_outcome(j) if j.finished else "never finished" for j in jobs]
    assert isinstance(got[1], MemoryError), got  # B's caller gets the error
    assert got[0] == solo[0] and got[2] == solo[2], got  # A went on; C was paused, resumed, and finished
    assert not loop._waiting and not loop.memory.rows.live()


# --- 2a'. a failed resize, the resize's peak, copies under the lock ---------------------------------------------------


def _decode_to_the_cache_end(llm, loop) -> Job:
    """A job decoding alone whose next step needs a longer cache (it has written every position): its prompt
    (15 tokens short of it) starts it in the shortest cache (256 positions; 512 on the CPU: 241 and 496 tokens)."""
    assert not loop._waiting and not (loop.memory.rows and loop.memory.rows.live())
    loop.memory.rows = None  # as an idle loop thread leaves it (tests drive `_run_once` themselves)
    shortest = loop.scheduler.min_length
    a = _job(llm, prompt=" ".join(["red green blue"] * ((shortest - 16) // 3)), raw=True, max_tokens=40)
    _add(loop, a)
    for _ in range(40):
        loop._run_once(0)
        assert not a.finished and loop.memory.rows.length == shortest
        if a.progress.decoding and a.progress.pos == loop.memory.rows.length:
            return a
    raise AssertionError("never reached the end of its cache")


def _watch_decode_positions(loop, monkeypatch) -> list[tuple[int, int]]:
    """Every decode step's (highest position written, cache length)."""
    seen, decode = [], loop.runner.decode

    def watched(rows, knobs, n, tokens, pos, *args, **kwargs):
        seen.append((int(pos.max()), rows.length))
        return decode(rows, knobs, n, tokens, pos, *args, **kwargs)

    monkeypatch.setattr(loop.runner, "decode", watched)
    return seen


def test_a_resize_failing_while_admitting_fails_the_rows_that_needed_it(smol3, monkeypatch):
    """A decodes at its cache's last position when B arrives: the one resize that would admit B and grow A's
    row fails. B fails, and so must A (with the allocation's error): it must not step past the cache's end
    (an IndexError on CPU, a device assert on CUDA). The loop then serves the next request as before."""
    from llama32.engine.memory import Rows

    llm, loop = smol3, smol3.loop
    after = _job(llm, prompt=PROMPTS[1], max_tokens=6)
    _add(loop, after)
    _iterate(loop, [after])
    solo = _outcome(after)
    a = _decode_to_the_cache_end(llm, loop)
    b = _job(llm, prompt=PROMPTS[0], max_tokens=6)
    _add(loop, b)
    seen = _watch_decode_positions(loop, monkeypatch)

    def no_memory(self, batch, length):
        raise MemoryError("no memory to grow the cache")

    monkeypatch.setattr(Rows, "resize", no_memory)
    _iterate(loop, [a, b])
    got = [_outcome(a), _outcome(b)]
    assert all(isinstance(g, MemoryError) and "grow the cache" in str(g) for g in got), got
    assert all(p < length for p, length in seen), seen  # no step wrote past the cache
    monkeypatch.undo()
    again = _job(llm, prompt=PROMPTS[1], max_tokens=6)
    _add(loop, again)
    _iterate(loop, [again])
    assert _outcome(again) == solo
    assert not loop._waiting and not loop.memory.rows.live()


def test_a_resize_failing_part_way_fails_every_running_row_and_leaves_the_loop_usable(smol3, monkeypatch):
    """The resize moves one layer at a time; if a layer's new tensor cannot be made, the cache holds two shapes:
    every running row fails with the error (none steps on the mixed cache), and the next request runs."""
    llm, loop = smol3, smol3.loop
    a = _decode_to_the_cache_end(llm, loop)
    seen = _watch_decode_positions(loop, monkeypatch)
    made, new_zeros = [], torch.Tensor.new_zeros

    def third_fails(self, *args, **kwargs):
        made.append(1)
        if len(made) == 3:
            raise MemoryError("no memory for layer 1's keys")
        return new_zeros(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_zeros", third_fails)
    _iterate(loop, [a])
    monkeypatch.setattr(torch.Tensor, "new_zeros", new_zeros)
    got = _outcome(a)
    assert isinstance(got, MemoryError) and "layer 1" in str(got), got
    assert len(made) == 3 and all(p < length for p, length in seen), seen
    nxt = _job(llm, prompt=PROMPTS[2], max_tokens=6)
    _add(loop, nxt)
    _iterate(loop, [nxt])
    assert isinstance(_outcome(nxt), str) and loop.memory.rows.intact


class _KVBytes:
    """Counts the bytes of the tensors given to `track` and of every tensor made while `on` (a dispatch mode
    sees each op's outputs; a new storage is an allocation), minus those freed since, and keeps the peak."""

    def __init__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.live = self.peak = 0
        self.seen: set[int] = set()
        self._finalize = weakref.finalize

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (list, tuple)) else [out]:
                    if isinstance(t, torch.Tensor):
                        counter.track(t)
                return out

        self.on = Mode

    def _free(self, ptr: int, n: int) -> None:
        self.live -= n
        self.seen.discard(ptr)

    def track_all(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            self.track(t)

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(ptr)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        self._finalize(t, self._free, ptr, storage.nbytes())


def test_growing_the_cache_holds_no_more_than_the_budget(smollm2_dir):
    """A live row's cache grows 256 -> 512 -> the budget's edge while the prefix index holds all the budget
    leaves it: at every moment of each allocation, the rows' cache and the index together hold at most
    kv_cache_bytes (the resize held the old and the new cache at once: up to 1.5x the rows' share)."""
    from types import SimpleNamespace

    from llama32.engine.scheduler import budget_for

    probe = llama32.load(smollm2_dir, dtype="float32", device="cpu")
    per, tensors = probe.loop.position_bytes, 2 * probe.config.num_hidden_layers
    budget = budget_for(1024, per, tensors)
    llm = llama32.load(smollm2_dir, dtype="float32", device="cpu", max_batch=1, kv_cache_bytes=budget)
    loop = llm.loop
    peaks = []

    def fit(length: int) -> None:
        kv = _KVBytes()  # (no local name may hold a tracked tensor: it would not be freed)
        if loop.memory.rows is not None:
            kv.track_all(loop.memory.rows.cache.k + loop.memory.rows.cache.v)
        kv.track_all([t for k, v in loop.memory.prefixes.blocks.values() for t in k + v])
        with kv.on(), torch.inference_mode():
            loop.memory.fit((1, length), 0)
        peaks.append(kv.peak)

    fit(256)
    rows = loop.memory.rows
    # a live row: its keys and values are moved at each resize
    rows.jobs[0] = SimpleNamespace(progress=SimpleNamespace(slot=0))
    for i in range(6):  # the index takes what the rows leave of the budget
        loop.memory.prefixes.store(None, [i] + list(range(255)), [t[0] for t in rows.cache.k], [t[0] for t in rows.cache.v],
                            budget - rows.bytes(per))
    assert loop.memory.prefixes.bytes + rows.bytes(per) > budget - 32 * per
    fit(512)
    fit(1024)
    assert loop.memory.rows.length == 1024 and loop.memory.rows.jobs[0].progress.slot == 0
    assert max(peaks) <= budget, (peaks, budget)


PAUSED_PROMPTS = ["Write a long story about a dragon who learns to fly.", "Write a long poem about the sea."]


def _paused_beside(llm, monkeypatch, max_tokens: int, produced: int) -> tuple[list, list[Job]]:
    """On `llm` with `memory.answers` off (as where a decode step does not write a prompt span's bits: bfloat16 on
    AMX or without native bfloat16), each of `PAUSED_PROMPTS` alone (their outcomes), then both queued together
    (the jobs, A and B), the scheduler pausing B once, when it has drawn `produced` tokens. The test runs them."""
    loop = llm.loop
    monkeypatch.setattr(loop.memory, "answers", False)
    loop.memory.prefixes.blocks.clear()
    solo = []
    for prompt in PAUSED_PROMPTS:
        job = _job(llm, prompt=prompt, max_tokens=max_tokens)
        _add(loop, job)
        _iterate(loop, [job])
        solo.append(_outcome(job))
    loop.memory.prefixes.blocks.clear()
    a, b = jobs = [_job(llm, prompt=p, max_tokens=max_tokens) for p in PAUSED_PROMPTS]
    _add(loop, *jobs)
    plan, paused = loop.scheduler.plan, []

    def pause_b_once(running, waiting):  # memory runs short once, when B has drawn `produced` tokens
        admit, pause, refuse, shape = plan(running, waiting)
        if not paused and b.progress.decoding and b.produced >= produced:
            paused.append(b)
            pause = [b]
        return admit, pause, refuse, shape

    monkeypatch.setattr(loop.scheduler, "plan", pause_b_once)
    return solo, jobs


def test_where_a_decode_step_is_not_a_span_a_paused_rows_drawn_blocks_serve_only_its_resume(smol3, monkeypatch):
    """On a path where a decode step does not write a prompt span's bits (`memory.answers` False: bfloat16 on AMX or
    without native bfloat16; set by hand here), a paused row's blocks past its prompt's are its own: its resume
    copies them back and takes them out, and no other prompt's lookup finds them (one that repeats the text would
    otherwise be served decode bits where computing it gives span bits)."""
    from llama32.engine import BLOCK

    llm, loop = smol3, smol3.loop
    memory = loop.memory
    solo, jobs = _paused_beside(llm, monkeypatch, max_tokens=80, produced=2 * BLOCK)
    b = jobs[1]
    begin, resumed = memory.begin, []

    def begin_noting(job):
        was = job.progress.resuming
        begin(job)
        if was:
            resumed.append(job.progress.prefilled)

    monkeypatch.setattr(memory, "begin", begin_noting)
    _iterate(loop, jobs)
    assert [_outcome(j) for j in jobs] == solo
    prompt_blocks = len(b.req.prompt_ids) // BLOCK
    assert len(resumed) == 1 and resumed[0] > (prompt_blocks + 1) * BLOCK, (resumed, len(b.req.prompt_ids))
    drawn = b.req.prompt_ids + b.progress.generated
    found = len(memory.prefixes.lookup(b.adapter, drawn))
    assert found == prompt_blocks, found  # the prompt's blocks, none of what B drew
    assert all(key[0] is None for key in memory.prefixes.blocks)  # and nothing of B's own is left


def test_where_a_decode_step_is_not_a_span_a_resume_recomputes_drawn_positions_as_decode_steps(smol3, monkeypatch):
    """The same path as above, with the paused row's own blocks gone before it resumes (evicted): it recomputes
    its prompt as a span and what it drew one position at a time (`per_position`, as decode steps attend), so it
    goes on with the bits it had; its answer equals its solo one."""
    from llama32.engine import BLOCK

    llm, loop = smol3, smol3.loop
    memory = loop.memory
    solo, jobs = _paused_beside(llm, monkeypatch, max_tokens=60, produced=BLOCK + 5)
    b = jobs[1]
    pause, prefill, spans = memory.pause, loop.runner.prefill, []

    def pause_and_evict(job):
        pause(job)
        memory.prefixes.blocks.clear()  # its blocks are gone before it resumes

    def noting(rows, slot, ids, start, adapter, logits_at, per_position=False):
        if rows.jobs[slot] is b and b.progress.resuming:
            spans.append((start, len(ids), per_position))
        return prefill(rows, slot, ids, start, adapter, logits_at, per_position)

    monkeypatch.setattr(memory, "pause", pause_and_evict)
    monkeypatch.setattr(loop.runner, "prefill", noting)
    _iterate(loop, jobs)
    assert [_outcome(j) for j in jobs] == solo
    prompt = len(b.req.prompt_ids)
    assert spans and spans[0][0] == 0, spans  # computed from position 0: nothing was left to copy
    assert all(per_position == (start >= prompt) for start, n, per_position in spans), spans
    assert all(start + n <= prompt for start, n, per_position in spans if not per_position), spans
    assert sum(n for start, n, per_position in spans if per_position) >= BLOCK + 4, spans  # what it drew


def test_submit_stats_and_cancel_do_not_wait_for_a_resize_or_a_pause(smol3, monkeypatch):
    """The loop thread copies keys and values (a resize; a paused row's blocks into the prefix index) outside
    the condition that `submit`, `stats` and `cancel` take (the asyncio server calls them on its event loop)."""
    import threading

    from llama32.engine.memory import Rows

    llm, loop = smol3, smol3.loop
    inside, release = threading.Event(), threading.Event()
    resize, store = Rows.resize, loop.memory.prefixes.store

    def slow(real):
        def held(*args, **kwargs):
            inside.set()
            assert release.wait(30)
            return real(*args, **kwargs)
        return held

    def callers_do_not_wait() -> None:
        """While the loop thread is inside the copy: the callers' calls return at once."""
        assert inside.wait(30)
        done = threading.Event()
        other = _job(llm, prompt="Hi", max_tokens=1)

        def call():
            loop.stats()
            loop.cancel(other)
            with loop._cond:  # what submit takes (submit itself would start a loop thread)
                pass
            done.set()

        threading.Thread(target=call, daemon=True).start()
        finished = done.wait(5)
        release.set()
        assert finished, "stats/cancel/submit waited for the copy"

    # a resize: A decodes at its cache's end, so the next iteration grows the cache
    a = _decode_to_the_cache_end(llm, loop)
    monkeypatch.setattr(Rows, "resize", lambda self, *a: slow(resize)(self, *a))
    worker = threading.Thread(target=_iterate, args=(loop, [a]), daemon=True)
    worker.start()
    callers_do_not_wait()
    worker.join(60)
    assert isinstance(_outcome(a), str)

    # a pause: B is paused (the plan says so once) and its blocks are cloned into the index
    monkeypatch.undo()
    inside.clear(), release.clear()
    b, c = _job(llm, prompt=PROMPTS[0], max_tokens=8), _job(llm, prompt=PROMPTS[1], max_tokens=8)
    _add(loop, b, c)
    loop._run_once(0)
    assert b.progress.decoding and c.progress.decoding
    plan, once = loop.scheduler.plan, []

    def pause_c(running, waiting):
        admit, pause, refuse, shape = plan(running, waiting)
        if not once:
            once.append(1)
            pause = [c]
        return admit, pause, refuse, shape

    monkeypatch.setattr(loop.scheduler, "plan", pause_c)
    monkeypatch.setattr(loop.memory.prefixes, "store", slow(store))
    worker = threading.Thread(target=_iterate, args=(loop, [b, c]), daemon=True)
    worker.start()
    callers_do_not_wait()
    worker.join(60)
    assert isinstance(_outcome(b), str) and isinstance(_outcome(c), str)
    assert not loop._waiting and not loop.memory.rows.live()


# --- 2b, 2c. what names a stored prefix, and an adapter ----------------------------------------------------------


def _blocks(n: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, 4, generator=g)], [torch.randn(2, n, 4, generator=g)]


def test_a_prefix_chain_collision_in_pythons_hash_serves_nothing(monkeypatch):
    """Prompt P1 = X + Z is stored, then P2 = Y; a prompt Y + Z finds Y, and its second block must not be
    P1's Z (computed after X) however the prefixes X and Y hash: here every hash() collides, as the old
    chain (linked by hash() of the block before) would let a rare real collision do."""
    from llama32.engine import memory
    from llama32.engine.memory import BLOCK, PrefixIndex

    monkeypatch.setattr(memory, "hash", lambda key: 0, raising=False)  # what the old chain was linked by
    index = PrefixIndex(position_bytes=8)
    x, y, z = [5] * BLOCK, [6] * BLOCK, list(range(100, 100 + BLOCK))
    index.store(None, x + z + [7], *_blocks(2 * BLOCK + 1, 0), limit=1 << 30)
    index.store(None, y + [7], *_blocks(BLOCK + 1, 1), limit=1 << 30)
    assert len(index.lookup(None, x + z + [7])) == 2
    assert len(index.lookup(None, y + z + [7])) == 1  # Y only: Z after Y was never stored


def _adapters_share_an_address(monkeypatch, *modules):
    """Make id() of every adapter the same, as when CPython gives a new adapter a freed one's address (the
    LRU frees them): for the modules that identified adapters by id()."""
    for module in modules:
        monkeypatch.setattr(module, "id", lambda obj: 1, raising=False)


def test_an_adapter_at_a_freed_adapters_address_gets_none_of_its_prefixes(monkeypatch):
    """A new adapter (same files, other weights: say they were replaced) at the address of a freed one must
    not be served the freed one's keys and values."""
    from pathlib import Path

    from llama32.engine import memory
    from llama32.engine.memory import BLOCK, PrefixIndex
    from llama32.lora import Adapter

    _adapters_share_an_address(monkeypatch, memory)
    index, ids = PrefixIndex(position_bytes=8), list(range(1, 2 * BLOCK + 2))
    first = Adapter(name="x", path=Path("/adapters/x"), r=1, scale=1.0, modules={})
    index.store(first, ids, *_blocks(len(ids), 0), limit=1 << 30)
    assert len(index.lookup(first, ids)) == 2
    del first
    second = Adapter(name="x", path=Path("/adapters/x"), r=1, scale=1.0, modules={})
    assert index.lookup(second, ids) == []


def test_the_compiled_steps_adapter_stacks_are_not_reused_for_an_adapter_at_a_freed_address(smol3, monkeypatch):
    from llama32 import lora
    from llama32.lora import Adapter, GatheredAdapters, _projections

    llm = smol3
    name, linear = next(iter(_projections(llm).items()))

    def adapter(value: float):
        a = torch.full((1, linear.in_features), value)
        b = torch.full((linear.out_features, 1), value)
        return Adapter(name="x", path=llm.path, r=1, scale=1.0, modules={name: (a, b, 1.0)})

    _adapters_share_an_address(monkeypatch, lora)
    try:
        first = adapter(1.0)
        assert GatheredAdapters.of(llm, [first]).stacks[name][0][1, 0, 0].item() == 1.0
        del first
        second = adapter(2.0)
        assert GatheredAdapters.of(llm, [second]).stacks[name][0][1, 0, 0].item() == 2.0  # not the freed one's
    finally:
        llm.loop.runner.adapter_stacks = None


# --- 2d. stop strings: the held-back tail, linear in the stop string's length ---------------------------------------


def _partial_suffix_reference(text: str, needles: tuple[str, ...]) -> int:
    """The former implementation (every prefix of every needle tried): the answers to match."""
    best = 0
    for needle in needles:
        for n in range(min(len(needle) - 1, len(text)), best, -1):
            if text.endswith(needle[:n]):
                best = n
                break
    return best


def test_partial_suffix_gives_the_former_answers():
    import random

    from llama32.output import _partial_suffix

    rng = random.Random(34)
    word = lambda n, abc: "".join(rng.choice(abc) for _ in range(n))  # noqa: E731
    for case in range(20_000):
        abc = "ab" if case % 2 else "abc"
        needles = tuple(word(rng.randint(0, 9), abc) for _ in range(rng.randint(1, 3)))
        text = word(rng.randint(0, 14), abc)
        assert _partial_suffix(text, needles) == _partial_suffix_reference(text, needles), (text, needles)
    assert _partial_suffix("", ("abc",)) == 0 and _partial_suffix("xab", ("", "abc")) == 2


class _CountedStr(str):
    """A stop string that counts the characters read out of it (slices and indexing), and refuses to be read
    past `budget` characters in all: a quadratic algorithm stops at once instead of running for minutes."""

    def __new__(cls, value: str, budget: int):
        self = super().__new__(cls, value)
        self.read, self.budget = 0, budget
        return self

    def __getitem__(self, key):
        out = str.__getitem__(self, key)
        self.read += len(out)
        if self.read > self.budget:
            raise AssertionError(f"read {self.read} characters of a {len(self)}-character stop string")
        return out

    __hash__ = str.__hash__


def test_partial_suffix_reads_a_100k_stop_string_a_linear_number_of_times():
    from llama32.output import _partial_suffix

    m = 100_000
    stop = "a" * (m - 1) + "b"
    # The worst case for trying every prefix: a long text ending in a character no prefix ends with, then
    # a few tokens' more text; each call may read the stop string a few times over, not m / 2 times.
    text = "a" * m + "c"
    counted = _CountedStr(stop, budget=20 * m)
    assert _partial_suffix(text, (counted,)) == 0
    for piece, held in (("a", 1), ("aa", 3), ("aaa" * 10, 33), ("aab", 0)):
        text += piece
        counted.read, counted.budget = 0, 10 * m
        assert _partial_suffix(text, (counted,)) == held
    assert _partial_suffix("x" + "a" * 500, (stop,)) == 500


# --- 2e. HTTP: what a body can make the server do ------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_client(make_checkpoint, llama3_tokenizer_dir):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from llama32.server import create_app

    tiny = llama32.load(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), device="cpu",
                        dtype="float32")
    with TestClient(create_app(tiny), raise_server_exceptions=False) as client:
        yield client


WAI = "/ai/run/@cf/meta/llama-3.2-1b-instruct"


@pytest.mark.parametrize("path", ["/v1/chat/completions", WAI])
def test_json_nested_50000_deep_is_a_400(app_client, path):
    deep = '{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}"
    r = app_client.post(path, content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "nested" in r.text
    # deep enough to be refused, still within what the parser takes
    r = app_client.post(path, content='{"messages": ' + "[" * 500 + "]" * 500 + "}",
                        headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested" in r.text, r.text


def test_completions_bounds_the_number_of_prompts(app_client):
    from llama32.server import openai_api

    MAX_PROMPTS = getattr(openai_api, "MAX_PROMPTS", 256)  # the documented bound (the old code had none)
    r = app_client.post("/v1/completions", json={"prompt": ["Hi"] * (MAX_PROMPTS + 1), "max_tokens": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt" and str(MAX_PROMPTS) in r.json()["error"]["message"]
    r = app_client.post("/v1/completions", json={"prompt": [[1, 2]] * (MAX_PROMPTS + 1), "max_tokens": 1})
    assert r.status_code == 400, r.text
    r = app_client.post("/v1/completions", json={"prompt": list(range(1, 2 * MAX_PROMPTS)), "max_tokens": 1})
    assert "prompts per request" not in r.text  # one prompt of many token ids is one prompt (too long here)


@pytest.mark.parametrize("path", ["/v1/completions", WAI])
def test_a_checkpoint_error_does_not_show_server_paths(app_client, monkeypatch, caplog, path):
    from llama32.errors import CheckpointError
    from llama32.server.backend import Backend

    secret = "/srv/private/models/llama/tokenizer.json"

    def broken(self, *args, **kwargs):
        raise CheckpointError(f"{secret}: cannot read (Permission denied)")

    monkeypatch.setattr(Backend, "validate", broken)
    body = {"prompt": "Hi", "max_tokens": 1}
    with caplog.at_level("ERROR", logger="llama32.server"):
        r = app_client.post(path, json=body)
    assert r.status_code == 500
    assert "/srv" not in r.text and "Permission" not in r.text, r.text
    assert secret in caplog.text  # the operator still sees it


# --- 2f. HTTP: token-id prompts and the KV budget; an adapter loaded only for a request that is taken -------------


@pytest.fixture(scope="module")
def small_budget_client(make_checkpoint, llama3_tokenizer_dir, tmp_path_factory):
    """A tiny model whose KV budget holds 64 positions per request, with one adapter in its --lora-dir, behind
    a server that lets one request wait."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from llama32.engine.scheduler import budget_for
    from llama32.server import create_app
    from test_server import write_named_adapter

    path = make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir)
    probe = llama32.load(path, device="cpu", dtype="float32")
    budget = budget_for(64, probe.loop.position_bytes, 2 * probe.config.num_hidden_layers)
    tiny = llama32.load(path, device="cpu", dtype="float32", kv_cache_bytes=budget)
    loras = tmp_path_factory.mktemp("loras")
    write_named_adapter(tiny, loras / "tuned")
    with TestClient(create_app(tiny, lora_dir=loras, max_queue=1), raise_server_exceptions=False) as client:
        yield tiny, client


def test_token_id_prompts_beyond_the_kv_budget_are_a_400(small_budget_client):
    tiny, client = small_budget_client
    assert tiny.loop.max_positions == 64
    r = client.post("/v1/completions", json={"prompt": list(range(10, 60)), "max_tokens": 30})
    assert r.status_code == 400, r.text  # a 500 (the loop's MemoryError) before
    error = r.json()["error"]
    assert error["message"].startswith("max_tokens") and "kv_cache_bytes" in error["message"]
    assert tiny.loop.stats()["waiting"] == 0
    r = client.post("/v1/completions", json={"prompt": list(range(10, 40)), "max_tokens": 4})
    assert r.status_code == 200, r.text  # what fits runs


def test_an_adapter_is_loaded_only_for_a_request_the_server_takes(small_budget_client, monkeypatch):
    """A request refused for a bad field (400) or a full queue (503) loads no adapter; one taken does."""
    tiny, client = small_budget_client
    tiny._adapters.clear()
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "lora": "tuned",
                                                  "temperature": 99, "max_tokens": 2})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"], r.text
    assert not tiny._adapters  # loaded before validation before
    stats = tiny.loop.stats

    monkeypatch.setattr(tiny.loop, "stats", lambda: dict(stats(), waiting=1))  # the one place in the queue is taken
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "lora": "tuned",
                                                  "max_tokens": 2})
    assert r.status_code == 503, r.text
    assert not tiny._adapters  # loaded before the queue check before
    monkeypatch.undo()
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "lora": "tuned",
                                                  "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert len(tiny._adapters) == 1
