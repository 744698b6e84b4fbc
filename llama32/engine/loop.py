"""The generation loop: one per handle, serving every `generate`, stream, `generate_batch` and `score` in flight.

Callers validate their request on their own thread (so a bad request raises there, before any compute),
then submit it as a `Job`. One loop thread owns the model's generation state and runs, over and over:
1. admit: waiting jobs, in arrival order, take free rows ("slots") of one KV cache, up to `max_batch` at
   once; a prompt whose first blocks were computed before (by an earlier request with the same adapter)
   gets those keys and values copied from the prefix index (memory.py) instead of computing them;
2. prefill: the rest of each new prompt is computed at its own slot, in chunks of at most `prefill_chunk`
   tokens per iteration while other rows are decoding (so a long prompt never stops their streams for
   long), all at once when none is; its last chunk draws the first token, and its whole blocks go into
   the prefix index;
3. step: one decode forward for every decoding row, each at its own position (no left padding), then the
   sampler with each row's own parameters, seed and LoRA adapter;
4. retire: a row leaves when its output is complete (stop id, max_tokens, stop string) or its caller
   cancelled (a stream closed or dropped), freeing its slot for the next waiting job.
Tokens reach each caller through its `Output` (output.py) and a queue. A row's arithmetic does not depend on
the other rows (its own positions, its own noise, its own adapter's product), so a request gets the same
tokens alone or in any batch (float32 greedy token for token; seeded sampling the same draws).

Memory: the KV cache holds `capacity` slots of up to `slot_length` positions, each position costing
2 (k and v) x layers x kv_heads x head_dim x dtype bytes (32 KiB for Llama 3.2 1B in bfloat16). The slot
length is what the budget `kv_cache_bytes` allows (default 1 GiB on CPU, 4 GiB on CUDA), at most the model's
context; slots start at what the first requests need (a power of two, at least 256) and grow up to it. A
request longer than a slot (prompt + max_tokens) is served alone, in a cache of its own sized to it (rounded
up to a power of two, at most the context), once the rows ahead of it have finished. Each decode step
attends only over the positions in use (rounded up to a power of two), not the whole slot.

Two forms of the step, one sampler: `decode_step`, the readable eager reference (the sampler skips, from
Python, the steps no row uses), and `static_decode_step`, the one `llm.compiled` runs through torch.compile:
rows [0, n) for n a power of two, every sampler step always run, LoRA through `GatheredAdapters`, so it
compiles one graph per (n, positions attended). Both read each row's settings from `StepKnobs` and draw with
`counter_noise`, so a seed gives the same tokens eager or compiled, alone or batched.

JSON mode's hook: a job whose `constraint` is set (an object with `fill(row)`, writing the (V,) bool
allowed-token row for the next token, and `advance(token)`, called with each token delivered) has its
row of the allowed-token mask filled before every draw; rows without one allow every token.
"""

from __future__ import annotations

import atexit
import queue
import secrets
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..lora import GatheredAdapters, RowAdapters
from ..model import KVCache, keep_address
from ..output import Output
from ..requests import Request
from ..sampling import StepKnobs, sample_static, steps_used
from .memory import PrefixIndex

DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 32}
DEFAULT_KV_CACHE_BYTES = {"cpu": 1 << 30, "cuda": 4 << 30}
# Prompt tokens prefilled per loop iteration while other rows decode: on a 2-core CPU a 1B decode step takes
# ~0.1 s and 64 prompt tokens about 0.3 s, so a running stream's longest gap stays a few steps long.
DEFAULT_PREFILL_CHUNK = {"cpu": 64, "cuda": 2048}
_END = object()  # a job's last event
_MIN_ATTENDED = 16  # the fewest cache positions a step attends over (rounded up to powers of two from here)
MAX_TOP_LOGPROBS = 20  # the contract's top_logprobs range is 0..20; the compiled step always computes 20


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _positions(req: Request) -> int:
    """The cache positions a request needs: its prompt and every token it may generate."""
    return len(req.prompt_ids) + req.max_tokens


class Job:
    """One request in the loop: a generation (with its `Output`) or a scoring forward (`ids`)."""

    def __init__(self, req: Request | None = None, output: Output | None = None, ids: list[int] | None = None,
                 n_context: int = 0, top: int = 0):
        self.req, self.output = req, output
        # scoring: all ids, how many of them are context, how many most likely alternatives to report
        self.ids, self.n_context, self.top = ids, n_context, top
        self.events: queue.SimpleQueue = queue.SimpleQueue()  # chunk lists, a result, then _END or an exception
        # JSON mode: fills this row's allowed-token mask before each draw and advances per token (module doc);
        # a request with response_format gets its own matcher of the compiled grammar (constrain.py)
        self.constraint: Any = req.grammar.matcher() if req is not None and req.grammar is not None else None
        self.cancelled = False
        self.finished = False
        # Called (on the loop thread) after each event put on `events`: lets an asyncio caller (the server) be
        # woken with call_soon_threadsafe instead of parking a thread on the queue. Must be quick, never raise.
        self.notify: Callable[[], None] | None = None
        # generation state, kept by the loop
        self.adapter = None
        self.seed = 0  # the request's seed, or a random one: the sampler's noise (counter_noise)
        self.token = 0  # the last drawn token, fed to the next step
        self.pos = 0  # where that token goes
        self.produced = 0
        self.prefilled = 0  # prompt positions whose keys and values are in the cache (copied or computed)
        self.decoding = False  # the prompt is done and the first token drawn: the row takes decode steps

    def put(self, item: Any) -> None:
        """Hand the caller an event (chunk list, result, _END or an exception), then `notify` it."""
        self.events.put(item)
        if self.notify is not None:
            try:
                self.notify()
            except Exception:  # noqa: BLE001 - a caller's wake-up hook must not take the loop down
                pass

    def results(self) -> Iterator[Any]:
        """What the loop sends this job, as it comes; raises the loop's error for it, if any."""
        while True:
            item = self.events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class _Rows:
    """A KV cache and the jobs in its rows, with each row's sampler settings and penalty history (`knobs`)."""

    def __init__(self, llm: Any, capacity: int, length: int):
        self.cache = KVCache(llm.config, capacity, length, device=llm.device, dtype=llm.dtype)
        self.knobs = StepKnobs(capacity, llm.config.vocab_size, llm.device)
        self.jobs: list[Job | None] = [None] * capacity
        keep_address(self.cache.k + self.cache.v + list(self.knobs.tensors().values()))

    def live(self) -> list[int]:
        return [i for i, j in enumerate(self.jobs) if j is not None]

    def grow(self, length: int) -> None:
        """Longer slots, the running rows' keys and values copied over (between steps, by the loop)."""
        old = self.cache
        self.cache = KVCache.over(*([torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[2])) for t in ts]
                                    for ts in (old.k, old.v)))
        keep_address(self.cache.k + self.cache.v)


class GenerationLoop:
    """The handle's one generation loop (see the module docstring). Thread-safe: `submit` from anywhere."""

    def __init__(self, llm: Any, max_batch: int | None = None, kv_cache_bytes: int | None = None):
        self.llm = llm
        device = llm.device.type
        self.max_batch = max_batch or DEFAULT_MAX_BATCH.get(device, 8)
        self.kv_cache_bytes = kv_cache_bytes or DEFAULT_KV_CACHE_BYTES.get(device, 1 << 30)
        c = llm.config
        self.position_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * llm.dtype.itemsize
        self.prefill_chunk = DEFAULT_PREFILL_CHUNK.get(device, 64)
        self.prefixes = PrefixIndex(self.position_bytes)  # reusable prompt prefixes (memory.py)
        # Off by default for now: a reused prefix changes only usage.cached_tokens, but much of the test
        # suite compares whole results of repeated requests. `llm.loop.reuse_prefixes = True` turns it on.
        self.reuse_prefixes = False
        self.capacity = _pow2(self.max_batch)  # compiled steps run power-of-two batches of the first rows
        self.slot_length = max(1, min(llm.context_length, self.kv_cache_bytes // (self.capacity * self.position_bytes)))
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._rows: _Rows | None = None  # the shared cache, allocated on first use
        self._solo: _Rows | None = None  # a request longer than a slot, in a cache of its own
        self._thread: threading.Thread | None = None
        self._closing = False
        self._warned = False

    # -- the callers' side ------------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._cond:
            self._waiting.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._closing = False
                self._thread = threading.Thread(target=_serve, args=(weakref.ref(self),), name="llama32-loop",
                                                daemon=True)
                self._thread.start()
                _LOOPS.add(self)
            self._cond.notify()
        return job

    def close(self) -> None:
        """Stop the loop thread once it is idle (it starts again on the next submit)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def cancel(self, job: Job) -> None:
        """Stop `job`: it leaves the batch (or the queue) at the next step."""
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def stats(self) -> dict:
        """{"running": rows prefilling or decoding now, "waiting": requests queued behind them, "kv_bytes":
        KV memory in use (the rows' caches and the prefix index), "kv_bytes_total": the budget}."""
        with self._cond:
            running = sum(len(r.live()) for r in (self._rows, self._solo) if r is not None)
            used = self._rows_bytes() + self.prefixes.bytes
            return {"running": running, "waiting": len(self._waiting), "kv_bytes": used,
                    "kv_bytes_total": self.kv_cache_bytes}

    def _rows_bytes(self) -> int:
        return sum(r.cache.batch * r.cache.length * self.position_bytes for r in (self._rows, self._solo)
                   if r is not None)

    # -- the loop -----------------------------------------------------------------------------------------

    def _run_once(self, idle: float) -> bool:
        """Admit and step once (or wait up to `idle` seconds for work); False when the thread must end: the
        loop is closing and idle. That is decided under the lock, where `_thread` is cleared, so a job
        submitted a moment later starts a new thread instead of being left to one that is ending."""
        with self._cond:
            if not self._waiting and not (self._rows and self._rows.live()):
                if self._closing:
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return False
                self._cond.wait(idle)
                if not self._waiting:
                    return True
            admitted = self._admit()
        with torch.inference_mode():
            for job in admitted:
                self._guarded([job], lambda: self._start(job))
            rows = self._rows
            if rows is not None and rows.live():
                self._prefill_chunks(rows)
                self._guarded([rows.jobs[i] for i in rows.live()], lambda: self._step(rows))
        return True

    def _admit(self) -> list[Job]:
        """Move waiting jobs into free slots, in arrival order (under the lock). A scoring job needs no slot:
        it runs between two steps. A request too long for a slot is taken only from the head of the queue,
        once the rows ahead of it are done, so nothing overtakes it."""
        admitted = []
        rows = self._rows
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                job.put(_END)
                continue
            if job.req is None:
                admitted.append(self._waiting.popleft())
                continue
            need = _positions(job.req)
            if need > self.slot_length:
                if admitted or (rows is not None and rows.live()):
                    break  # served alone: once the rows ahead of it are done
                admitted.append(self._waiting.popleft())
                break
            try:  # KV memory is allocated here: if that fails, this request fails, and the loop goes on
                if rows is None:
                    rows = self._rows = _Rows(self.llm, self.capacity, self._length_for(need))
                free = [i for i, j in enumerate(rows.jobs) if j is None]
                if not free or len(rows.live()) >= self.max_batch:
                    break
                if need > rows.cache.length:
                    length = self._length_for(need)
                    self.prefixes.fit(self.kv_cache_bytes - rows.cache.batch * length * self.position_bytes)
                    rows.grow(length)
            except Exception as e:  # noqa: BLE001 - out of memory, most likely
                self._waiting.popleft()
                job.finished = True
                job.put(e)
                continue
            rows.jobs[free[0]] = job
            admitted.append(self._waiting.popleft())
        return admitted

    def _length_for(self, need: int) -> int:
        """Slots grow in powers of two (from 256) as requests need them, up to the budget's slot length, so a
        small model or short requests never hold the whole budget."""
        return min(self.slot_length, max(256, _pow2(need)))

    def _fail_running(self, error: BaseException) -> None:
        """The loop's last resort: every running job fails with `error` (the waiting ones stay queued)."""
        with self._cond:
            running = [j for r in (self._rows, self._solo) if r is not None for j in r.jobs if j is not None]
        for job in running:
            self._retire(job)
            job.put(error)

    def _guarded(self, jobs: list[Job], work) -> None:
        """Run `work`; if it raises, the jobs it was for fail with that error and leave. Others go on."""
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - the error goes to the callers; the loop must live
            for job in jobs:
                self._retire(job)
                job.put(e)

    def _start(self, job: Job) -> None:
        if job.req is None:
            self._score(job)
            return
        if job in (self._rows.jobs if self._rows else ()):
            rows, slot = self._rows, self._rows.jobs.index(job)
        else:  # longer than a slot: a cache of its own, for as long as it runs
            # (a power of two, so the compiled step meets few cache shapes)
            rows, slot = _Rows(self.llm, 1, min(self.llm.context_length, _pow2(_positions(job.req)))), 0
            rows.jobs[0] = job
            with self._cond:
                self._solo = rows
        if rows is not self._solo:
            self._begin(rows, slot, job)
            return
        try:
            self._prefill(rows, slot, job)
            while rows.live():
                self._step(rows)
        finally:
            with self._cond:
                self._solo = None  # its cache goes with it

    def _begin(self, rows: _Rows, slot: int, job: Job) -> None:
        """A new request at `slot` of the shared rows: its adapter and seed, and the keys and values of its
        prompt's longest stored prefix copied in (`_prefill_chunks` computes the rest)."""
        llm, req = self.llm, job.req
        job.adapter = req.adapter if req.adapter is not None else llm._default_adapter
        job.seed = req.seed if req.seed is not None else secrets.randbits(63)
        blocks = self.prefixes.lookup(job.adapter, req.prompt_ids) if self.reuse_prefixes else []
        job.prefilled = self.prefixes.copy_into(blocks, [t[slot] for t in rows.cache.k],
                                                [t[slot] for t in rows.cache.v])
        job.output.cached_tokens = job.prefilled

    def _prefill_chunks(self, rows: _Rows) -> None:
        """Prefill the prompts not yet done, in slot order: at most `prefill_chunk` tokens this iteration
        while some row is decoding, everything when none is. A prompt's last chunk draws its first token."""
        budget = self.prefill_chunk if any(j is not None and j.decoding for j in rows.jobs) else None
        for slot, job in enumerate(rows.jobs):
            if job is None or job.decoding or job.cancelled:
                continue
            if budget is not None and budget <= 0:
                break
            n = len(job.req.prompt_ids)
            take = n - job.prefilled if budget is None else min(budget, n - job.prefilled)
            if budget is not None:
                budget -= take
            self._guarded([job], lambda: self._prefill_chunk(rows, slot, job, take))

    def _prefill_chunk(self, rows: _Rows, slot: int, job: Job, take: int) -> None:
        """Compute prompt positions [prefilled, prefilled + take) of `job` at `slot`; after the last, sample
        the first token and keep the prompt's whole blocks in the prefix index."""
        llm, req = self.llm, job.req
        ids, start, n = req.prompt_ids, job.prefilled, len(req.prompt_ids)
        end = start + take
        chunk = torch.tensor([ids[start:end]], device=llm.device)
        lora = RowAdapters.of(llm, [job.adapter])
        last = torch.tensor([take - 1], device=llm.device)
        if start == 0:  # the whole prompt from position 0 (the plain causal prefill)
            cache = rows.cache.view(slice(slot, slot + 1))
            logits = llm.model(chunk, cache=cache, logits_at=last, lora=lora)[:, -1]
        else:  # continuing at its own positions, attending over those before (copied or computed)
            cache = rows.cache.view(slice(slot, slot + 1), min(rows.cache.length, max(_MIN_ATTENDED, _pow2(end))))
            pos = torch.arange(start, end, device=llm.device)[None]
            logits = llm.model(chunk, cache=cache, input_pos=pos, logits_at=last, lora=lora)[:, -1]
        job.prefilled = end
        if end < n:
            return
        if self.reuse_prefixes:
            self.prefixes.store(job.adapter, ids, [t[slot] for t in rows.cache.k],
                                [t[slot] for t in rows.cache.v], self.kv_cache_bytes - self._rows_bytes())
        rows.knobs.set_row(slot, req.params, job.seed, ids)  # now: the decode steps before wrote this row
        job.pos = n
        job.decoding = True
        self._emit(rows, [slot], logits)

    def _prefill(self, rows: _Rows, slot: int, job: Job) -> None:
        """A request served alone: its whole prompt at once, then its first token."""
        llm, req = self.llm, job.req
        job.adapter = req.adapter if req.adapter is not None else llm._default_adapter
        job.seed = req.seed if req.seed is not None else secrets.randbits(63)
        rows.knobs.set_row(slot, req.params, job.seed, req.prompt_ids)
        ids = torch.tensor([req.prompt_ids], device=llm.device)
        n = ids.shape[1]
        logits = llm.model(ids, cache=rows.cache.view(slice(slot, slot + 1)),
                           logits_at=torch.tensor([n - 1], device=llm.device),
                           lora=RowAdapters.of(llm, [job.adapter]))[:, -1]
        job.pos = n
        job.decoding = True
        self._emit(rows, [slot], logits)

    def _step(self, rows: _Rows) -> None:
        """One decode step for every running row of `rows`."""
        llm = self.llm
        for i in rows.live():
            job = rows.jobs[i]
            if job.cancelled:  # a closed stream leaves before the step, not after it
                self._retire(job)
                job.put(_END)
        live = [i for i in rows.live() if rows.jobs[i].decoding]
        if not live:
            return
        n = live[-1] + 1
        compiled = llm.compiled
        if compiled:
            n = min(_pow2(n), len(rows.jobs))
        # A row still prefilling takes part as a free row does, writing at its next prompt position (which
        # its next chunk overwrites); the sampler's row for it is set when its first token is drawn.
        pos = torch.tensor([0 if j is None else j.pos if j.decoding else j.prefilled for j in rows.jobs[:n]],
                           device=llm.device)
        jobs = [j if j is not None and j.decoding else None for j in rows.jobs[:n]]
        tokens = torch.tensor([j.token if j else 0 for j in jobs], device=llm.device)
        attended = min(rows.cache.length, max(_MIN_ATTENDED, _pow2(max(j.pos for j in jobs if j) + 1)))
        adapters = [j.adapter if j else None for j in jobs]
        allowed = self._allowed(rows, jobs)
        if compiled:
            out = self._compiled(rows, tokens, pos, attended, allowed, GatheredAdapters.of(llm, adapters))
        else:
            cache = rows.cache.view(slice(0, n), attended)
            out = decode_step(llm.model, tokens, pos, cache, rows.knobs.view(0, n), self._steps(jobs), allowed,
                              RowAdapters.of(llm, adapters), self._logprobs_wanted(jobs))
        for j in jobs:
            if j is not None:
                j.pos += 1
        self._deliver(rows, [i for i in range(n) if jobs[i] is not None], *out)

    @staticmethod
    def _steps(jobs: list[Job | None]) -> frozenset[str]:
        """The sampler steps some row of `jobs` uses (the eager step skips the others)."""
        return steps_used([j.req.params for j in jobs if j is not None])

    @staticmethod
    def _allowed(rows: _Rows, jobs: list[Job | None], first: int = 0) -> Tensor | None:
        """The allowed-token mask for rows [first, first + len(jobs)): each constrained row's filled by its
        matcher, the others all True; None when no row is constrained."""
        if not any(j is not None and j.constraint is not None for j in jobs):
            return None
        for i, j in enumerate(jobs, start=first):
            if j is not None and j.constraint is not None:
                j.constraint.fill(rows.knobs.allowed[i])
        return rows.knobs.allowed[first: first + len(jobs)]

    @staticmethod
    def _logprobs_wanted(jobs: list[Job | None]) -> int | None:
        """None when no row asks for log-probabilities, else the most alternatives any row asks for."""
        asks = [j.req.top_logprobs for j in jobs if j is not None and j.req.logprobs]
        return max(asks) if asks else None

    def _emit(self, rows: _Rows, slots: list[int], logits: Tensor) -> None:
        """Sample from a prefill's logits (rows `slots`, in order) and deliver."""
        assert len(slots) == 1
        s = slots[0]
        job = rows.jobs[s]
        knobs = rows.knobs.view(s, s + 1)
        tokens = sample_static(logits, knobs, self._allowed(rows, [job], s), self._steps([job]))
        knobs.update(tokens)
        want = self._logprobs_wanted([rows.jobs[s]])
        self._deliver(rows, slots, tokens, *token_logprobs(logits, tokens, want), first=s)

    def _deliver(self, rows: _Rows, slots: list[int], tokens: Tensor, logprob: Tensor | None,
                 top: tuple[Tensor, Tensor] | None, *, first: int = 0) -> None:
        """Push each row's new token into its output; retire the rows that are complete or cancelled.

        Row `s` of `slots` reads column `s - first` of the step's outputs."""
        stop_ids = self.llm.stop_ids
        drawn = tokens.tolist()
        lps = logprob.tolist() if logprob is not None else None
        tops = (top[0].tolist(), top[1].tolist()) if top is not None else None
        for s in slots:
            job = rows.jobs[s]
            try:
                self._deliver_one(job, drawn[s - first], lps, tops, s - first, stop_ids)
            except Exception as e:  # noqa: BLE001 - this row's output failed: it alone fails
                self._retire(job)
                job.put(e)

    def _deliver_one(self, job: Job, token: int, lps: list | None, tops: tuple | None, k: int,
                     stop_ids: frozenset[int]) -> None:
        """Row `job`'s new `token` (column `k` of the step's log-probabilities) into its output."""
        if job.cancelled:
            self._retire(job)
            job.put(_END)
            return
        job.token = token
        job.produced += 1
        if job.constraint is not None:
            job.constraint.advance(job.token)
        lp = None
        if job.req.logprobs:
            n = job.req.top_logprobs
            lp = (lps[k], list(zip(tops[0][k][:n], tops[1][k][:n])))
        done = job.token in stop_ids or job.produced >= job.req.max_tokens
        done = job.output.push(job.token, done, lp)
        chunks = list(job.output.chunks())
        if chunks:
            job.put(chunks)
        if done:
            self._retire(job)
            job.put(_END)

    def _retire(self, job: Job) -> None:
        job.finished = True
        with self._cond:
            for rows in (self._rows, self._solo):
                if rows is not None and job in rows.jobs:
                    rows.jobs[rows.jobs.index(job)] = None

    def _score(self, job: Job) -> None:
        llm = self.llm
        ids = torch.tensor([job.ids], device=llm.device)
        # the head only at each text token's predicting position, not over the context
        at = torch.arange(job.n_context - 1, ids.shape[1] - 1, device=llm.device)[None]
        logits = llm.model(ids, logits_at=at)[0].float()
        targets = ids[0, job.n_context:]
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(-1, targets[:, None])[:, 0]
        result = (chosen.tolist(), (logits.argmax(-1) == targets).tolist())
        if job.top:
            values, ids = logp.topk(job.top, dim=-1)
            result += (ids.tolist(), values.tolist())
        job.put(result)
        job.finished = True
        job.put(_END)

    # -- compiling ---------------------------------------------------------------------------------------

    def _compiled(self, rows: _Rows, tokens: Tensor, pos: Tensor, attended: int, allowed: Tensor | None,
                  lora: GatheredAdapters | None):
        """`static_decode_step` through torch.compile: one graph per (rows, positions attended) and set of
        loaded adapters, whatever the requests' settings. If compiling fails: warn once, run it eagerly."""
        llm = self.llm
        args = (llm.model, tokens, pos, rows.cache.k, rows.cache.v, attended, rows.knobs, allowed, lora)
        shape = (tokens.shape[0], attended)
        started = time.perf_counter()
        try:
            out = self._compiled_step()(*args)
        except Exception as e:  # noqa: BLE001
            # Compiling a shape happens before its graph runs, so a failure on a new shape left the cache and
            # the sampler's history untouched: answer eagerly (once more, safely), say so once. An error at a
            # shape that compiled before, or out of memory, is a runtime error: it fails this step's requests.
            if shape in llm.compiled_shapes or isinstance(e, (torch.OutOfMemoryError, MemoryError)):
                raise
            self._compile_failed(e)
            return static_decode_step(*args)
        if shape not in llm.compiled_shapes:
            llm.compiled_shapes[shape] = time.perf_counter() - started
        return out

    def _compiled_step(self):
        llm = self.llm
        if llm._compiled_step is None:
            if any(p.is_mkldnn for p in llm.model.parameters()):
                raise RuntimeError("the compiled decode step needs dense weights: on CPU, load with LLAMA32_CPU_PACK=0")
            # CUDA: "reduce-overhead" records each shape's step as a CUDA graph, replayed every token.
            mode = "reduce-overhead" if llm.device.type == "cuda" else None
            # One graph per (rows, positions attended): raise dynamo's limit (8) above the number of such
            # shapes, or the step would silently run eagerly past it.
            shapes = self.capacity.bit_length() * (self.slot_length.bit_length() + 1)
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, 2 * shapes)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * shapes)
            llm._compiled_step = torch.compile(static_decode_step, mode=mode, dynamic=False)
        return llm._compiled_step

    def _compile_failed(self, error: Exception) -> None:
        if not self._warned:
            warnings.warn(f"llama32: compiling the decode step failed ({type(error).__name__}: {error}); "
                          "running eagerly from now on", RuntimeWarning, stacklevel=2)
            self._warned = True
        self.llm.compiled = False


_LOOPS: weakref.WeakSet = weakref.WeakSet()


def _serve(ref: weakref.ref) -> None:
    """The loop thread. It holds its loop only while working or briefly waiting, so a handle nobody uses
    any more is collected, and its thread ends soon after."""
    while True:
        loop = ref()
        if loop is None:
            return
        try:
            if not loop._run_once(idle=0.5):
                return
        except BaseException as e:  # noqa: BLE001 - nothing may end the loop: fail what was running, go on
            loop._fail_running(e)
        del loop


@atexit.register
def _close_all() -> None:
    # Threads still inside torch when the interpreter finalises can abort the process: end them first.
    for loop in list(_LOOPS):
        loop.close()


def token_logprobs(logits: Tensor, tokens: Tensor, k: int | None) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None]:
    """The model's own log-probabilities (float32 log_softmax of the raw logits, before any penalty or
    temperature) of the drawn `tokens`, and the `k` most likely (ids, values); (None, None) when k is None."""
    if k is None:
        return None, None
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    values, ids = logp.topk(max(k, 1), dim=-1)
    return chosen, (ids, values)


def decode_step(model: torch.nn.Module, tokens: Tensor, pos: Tensor, cache: KVCache, knobs: StepKnobs,
                steps: frozenset[str], allowed: Tensor | None, lora: RowAdapters | None, logprobs: int | None):
    """One decode step for rows [0, B): forward at each row's position, then the sampler over rows [0, B) of
    `knobs`, running only `steps` (the eager reference; `static_decode_step` is the compiled form). Returns
    (tokens, logprob, top) as `token_logprobs`."""
    logits = model(tokens[:, None], cache=cache, input_pos=pos[:, None], lora=lora)[:, -1]
    drawn = sample_static(logits, knobs, allowed, steps)
    knobs.update(drawn)
    return (drawn, *token_logprobs(logits, drawn, logprobs))


def static_decode_step(model: torch.nn.Module, tokens: Tensor, pos: Tensor, k: list[Tensor], v: list[Tensor],
                       attended: int, knobs: StepKnobs, allowed: Tensor | None, lora: GatheredAdapters | None):
    """`decode_step` in the form that is compiled: rows [0, n) of the cache tensors `k`, `v` (each layer's,
    whole) over their first `attended` positions, every sampler step run (neutral where a row leaves it off),
    `allowed` the allowed-token mask or None, and always the top `MAX_TOP_LOGPROBS` log-probabilities.
    Shapes depend only on (n, attended), whether a mask is given and the loaded adapters; nothing reads a
    tensor back to the host, and the cache and the knobs are written in place. Returns (tokens, logprob,
    (top ids, top values))."""
    n = tokens.shape[0]
    cache = KVCache.over(k, v).view(slice(0, n), attended)
    logits = model(tokens[:, None], cache=cache, input_pos=pos[:, None], lora=lora)[:, -1]
    drawn = sample_static(logits, knobs, allowed)
    knobs.update(drawn)
    return (drawn, *token_logprobs(logits, drawn, MAX_TOP_LOGPROBS))
