"""The generation loop: one per handle, serving every `generate`, stream, `generate_batch` and `score` in flight.

Callers validate their request on their own thread (so a bad request raises there, before any compute),
then submit it as a `Job`. One loop thread owns the generation state and runs, over and over:
1. plan (scheduler.py): which waiting jobs take rows, in arrival order, as far as KV memory allows (memory
   is taken on demand: a row holds what it has filled, and the cache grows as tokens come); which running
   jobs to pause when the growing rows no longer fit (they resume later with an unchanged result);
2. memory (memory.py): the rows' cache resized to the plan; a new prompt whose first blocks were computed
   before (by an earlier request with the same adapter) gets those keys and values copied from the prefix
   index instead of computing them;
3. prefill (runner.py): prompts, resumed contexts and texts being scored, in chunks of at most
   `prefill_chunk` tokens per iteration while other rows decode, all at once when none does; a prompt's
   last chunk draws its first token, and its whole blocks go into the prefix index;
4. step (runner.py): one decode forward for every decoding row, each at its own position (no left
   padding), then the sampler with each row's own parameters, seed and LoRA adapter;
5. deliver and retire: each new token goes to its caller through the job's `Output` (output.py) and a
   queue; a row leaves when its output is complete (stop id, max_tokens, stop string) or its caller
   cancelled (a stream closed or dropped).
A row's arithmetic does not depend on the other rows (its own positions, its own noise, its own adapter's
product), so a request gets the same tokens alone or in any batch (float32 greedy token for token; seeded
sampling the same draws).

Failures: an error in a forward fails the requests that forward was for; an error delivering one row's
token fails that row; a failed allocation fails the requests it was for. The loop itself lives on.

JSON mode's hook: a job whose `constraint` is set (an object with `fill(row)`, writing the (V,) bool
allowed-token row for the next token, and `advance(token)`, called with each token delivered) has its
row of the allowed-token mask filled before every draw; rows without one allow every token.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..model import attention_floor
from ..output import Output
from ..requests import Request
from ..sampling import sample_static, steps_used
from .batch import step_batch
from .memory import PrefixIndex, Rows
from .runner import (MAX_TOP_LOGPROBS, Runner, attended_for, decode_step, static_decode_step,  # noqa: F401
                     token_logprobs)
from .scheduler import MIN_LENGTH, MIN_POSITIONS, Scheduler, _pow2, budget_for, need, rows_budget

DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 32}
DEFAULT_KV_CACHE_BYTES = {"cpu": 1 << 30, "cuda": 4 << 30}
# Prompt tokens prefilled per loop iteration while other rows decode: on a 2-core CPU a 1B decode step takes
# ~0.1 s and 64 prompt tokens about 0.3 s, so a running stream's longest gap stays a few steps long.
DEFAULT_PREFILL_CHUNK = {"cpu": 64, "cuda": 2048}
# A loop with nothing running that receives a request waits this long after the latest submit (at most
# GATHER_MAX_S in all, or until max_batch are waiting) before its first forward, so requests sent together
# (threads started at once arrive 3-8 ms apart here) share their prompts' prefill instead of the later ones
# being prefilled in chunks beside the first one's decoding (8 such 64-token requests: the last one's first
# token came 0.7 s later, the whole batch 5% later, than with one forward for all: benchmarks/RESULTS.md).
GATHER_S, GATHER_MAX_S = 0.01, 0.05
_END = object()  # a job's last event
_IDLE = "idle"  # what `_run_once` returns when it found nothing to do
_ARRIVAL = itertools.count()  # submission order: pausing takes the latest arrivals first

_Rows = Rows  # the name the tests patch to make an allocation fail


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
        self.arrival = next(_ARRIVAL)
        self.slot: int | None = None  # its row, while it has one
        self.adapter = None
        self.seed = 0  # the request's seed, or a random one: the sampler's noise (counter_noise)
        self.token = 0  # the last drawn token, fed to the next step
        self.pos = 0  # where that token goes
        self.produced = 0
        self.generated: list[int] = []  # the tokens drawn so far (a resumed row recomputes them)
        self.context: list[int] = req.prompt_ids if req is not None else ids  # what its prefill computes
        self.resuming = False  # the prefill is a paused row's context: no token is drawn at its end
        self.prefilled = 0  # context positions whose keys and values are in the cache (copied or computed)
        self.decoding = False  # the prompt is done and the first token drawn: the row takes decode steps
        self.lookahead = 0  # positions beyond the next one a step may write (speculation's proposals)
        self.spec: Any = None  # speculative decoding: this request's proposer state (engine/speculate.py)
        self.scored: list[Tensor] = []  # scoring: the log-softmax rows computed so far

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


class GenerationLoop:
    """The handle's one generation loop (see the module docstring). Thread-safe: `submit` from anywhere."""

    def __init__(self, llm: Any, max_batch: int | None = None, kv_cache_bytes: int | None = None):
        # The handle owns its loop; the loop only refers to it, so dropping the handle frees both at once.
        self._llm = weakref.ref(llm)
        device = llm.device.type
        self.max_batch = max_batch or DEFAULT_MAX_BATCH.get(device, 8)
        self.kv_cache_bytes = kv_cache_bytes or DEFAULT_KV_CACHE_BYTES.get(device, 1 << 30)
        self.position_bytes = position_bytes(llm.config, llm.dtype)
        tensors = 2 * llm.config.num_hidden_layers  # the rows' cache is made of this many tensors (k, v per layer)
        check_budget(self.kv_cache_bytes, self.position_bytes, tensors)
        self.capacity = _pow2(self.max_batch)  # compiled steps run power-of-two batches of the first rows
        self.scheduler = Scheduler(max_batch=self.max_batch, capacity=self.capacity, budget=self.kv_cache_bytes,
                                   position_bytes=self.position_bytes, context=llm.context_length,
                                   prefill_chunk=DEFAULT_PREFILL_CHUNK.get(device, 64), tensors=tensors,
                                   min_length=max(MIN_LENGTH, attention_floor(llm.device)))
        self.runner = Runner(llm)
        self.prefixes = PrefixIndex(self.position_bytes)  # reusable prompt prefixes (memory.py)
        # On by default: a reused prefix changes only usage.cached_tokens (tokens exact, log-probabilities to
        # float32 rounding). False computes every prompt in full and stores nothing (a no-reuse reference).
        self.reuse_prefixes = True
        # On CPU an idle loop gives its rows' cache back (the next request allocates what it needs); on CUDA
        # it keeps it, since the compiled step's CUDA graphs are recorded against the cache's addresses.
        self.release_when_idle = device != "cuda"
        # speculative decoding: set by llama32.load(..., speculative=...) (engine/speculate.py, `Speculator`)
        self.speculator: Any = None
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._last_submit = 0.0  # perf_counter() of the latest submit (the gathering wait: GATHER_S)
        self._rows: Rows | None = None  # the running rows' cache, allocated on demand
        self._thread: threading.Thread | None = None
        self._closing = False

    @property
    def llm(self) -> Any:
        return self._llm()

    @property
    def prefill_chunk(self) -> int:
        return self.scheduler.prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, value: int) -> None:
        self.scheduler.prefill_chunk = value

    @property
    def max_positions(self) -> int:
        """The most positions (prompt + max_tokens) one request may hold in the budget."""
        return self.scheduler.max_positions

    # -- the callers' side ------------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._cond:
            self._waiting.append(job)
            self._last_submit = time.perf_counter()
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
        """{"running": rows prefilling or decoding now, "waiting": requests queued behind them (paused ones
        included), "paused": how many of those were paused, "kv_bytes": KV memory in use (the rows' cache and
        the prefix index), "kv_bytes_total": the budget}."""
        with self._cond:
            running = len(self._rows.live()) if self._rows is not None else 0
            paused = sum(1 for j in self._waiting if j.resuming)
            used = self._rows_bytes() + self.prefixes.bytes
            return {"running": running, "waiting": len(self._waiting), "paused": paused, "kv_bytes": used,
                    "kv_bytes_total": self.kv_cache_bytes}

    def _rows_bytes(self) -> int:
        return self._rows.bytes(self.position_bytes) if self._rows is not None else 0

    # -- the loop -----------------------------------------------------------------------------------------

    def _run_once(self, idle: float) -> bool | str:
        """Plan, prefill and step once: True. With nothing to do, `_IDLE` (the thread then waits up to `idle`
        seconds for a submit, holding the condition, not the loop), or False when the thread must end: the loop
        is closing and idle. That is decided under the lock, where `_thread` is cleared, so a job submitted a
        moment later starts a new thread instead of being left to one that is ending."""
        with self._cond:
            if not self._waiting and not (self._rows and self._rows.live()):
                if self.release_when_idle:
                    self._rows = None
                if self._closing:
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return False
                return _IDLE
            if not (self._rows and self._rows.live()):
                self._gather()
            plan = self._plan()
        # Outside inference mode, as the runner's warm-up makes its scratch rows: the cache's tensors are then
        # ordinary ones, whose dispatch keys the compiled step's guards were made for.
        admitted = self._apply(*plan)
        with torch.inference_mode():
            for job in admitted:
                self._guarded([job], lambda: self._begin(job))
            rows = self._rows
            if rows is not None and rows.live():
                self._prefill_chunks(rows)
                self._guarded([j for j in rows.jobs if j is not None], lambda: self._step(rows))
        return True

    def _gather(self) -> None:
        """Nothing is running and requests wait: give the ones sent with them a moment to arrive (GATHER_S),
        so that their prompts go in one forward. Called holding the condition (`wait` releases it)."""
        started = time.perf_counter()
        while len(self._waiting) < self.max_batch:
            now = time.perf_counter()
            left = min(self._last_submit + GATHER_S, started + GATHER_MAX_S) - now
            if left <= 0:
                return
            self._cond.wait(left)

    def _plan(self) -> tuple[list[Job], list[Job], list[Job], tuple[int, int] | None]:
        """The scheduler's plan for this iteration, taken under the lock: cancelled and refused jobs leave the
        queue, and so do the jobs admitted (`_apply` gives them rows). Returns (running, admit, pause, shape)."""
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            job.finished = True
            job.put(_END)
        rows = self._rows
        running = [j for j in rows.jobs if j is not None] if rows is not None else []
        admit, pause, refuse, shape = self.scheduler.plan(running, self._waiting)
        for job in refuse:  # cannot fit even alone (requests.py refuses these first; kept as a backstop)
            self._waiting.remove(job)
            job.finished = True
            job.put(MemoryError(f"kv_cache_bytes: {self.kv_cache_bytes} bytes cannot hold this request's "
                                f"{need(job)} positions ({self.position_bytes} bytes each)"))
        for job in admit:
            self._waiting.remove(job)
        return running, admit, pause, shape

    def _apply(self, running: list[Job], admit: list[Job], pause: list[Job],
               shape: tuple[int, int] | None) -> list[Job]:
        """The plan applied to KV memory: pause, size the cache, give the admitted jobs their slots. Outside
        the lock (on the loop thread, which alone changes the rows and the prefix index), so the copies and
        clones here never hold up `submit`, `stats` or `cancel`, nor the server's event loop behind them
        (issue 34). Returns the jobs admitted."""
        paused = []
        for job in pause:
            # Pausing copies the row's blocks into the prefix index, which may fail (out of memory). Each job
            # is paused on its own: one that fails fails alone (its caller gets the error; it leaves its row),
            # and those paused before it still go back to the queue, so none is left in neither (issue 34).
            try:
                self._pause(job)
            except Exception as e:  # noqa: BLE001 - the error goes to its caller; the loop must live
                self.retire(job)
                job.put(e)
                continue
            paused.append(job)
        if paused:
            with self._cond:
                self._waiting.extendleft(reversed(paused))  # the paused go first, in arrival order
        remaining = [j for j in running if j not in pause]
        if remaining and shape is None:  # one running row outgrew the whole budget (the scheduler's backstop)
            [job] = remaining
            self.retire(job)
            job.put(MemoryError(f"kv_cache_bytes: {self.kv_cache_bytes} bytes cannot hold this request's "
                                f"{need(job)} positions"))
        if shape is None:
            return []
        try:  # KV memory is allocated here: if that fails, the requests it was for fail, and the loop goes on
            self._fit(shape, len(admit))
        except Exception as e:  # noqa: BLE001 - out of memory, most likely
            for job in admit:
                job.finished = True
                job.put(e)
            self._fail_outgrown(e)
            return []
        for job in admit:
            slot = self._rows.free_slot()
            self._rows.jobs[slot] = job
            job.slot = slot
        return admit

    def _fail_outgrown(self, error: BaseException) -> None:
        """After a failed allocation: the running rows the cache as it is cannot hold fail with `error` (they
        would write past its end), the others go on; if a resize failed part way, the rows' keys and values
        are lost and every running row fails."""
        rows = self._rows
        if rows is None:
            return
        if not rows.intact:
            self._fail_running(error)
            with self._cond:
                self._rows = None
            return
        for job in [j for j in rows.jobs if j is not None and need(j) > rows.length]:
            self.retire(job)
            job.put(error)

    def _fit(self, shape: tuple[int, int], admitting: int) -> None:
        """The rows' cache made at least `shape` = (batch, length) with `admitting` free slots below batch
        (the scheduler's shape already counts the live rows and those admitted). Before it is allocated, the
        prefix index gives up what the allocation holds at its peak (a resize: the larger cache and one
        tensor of the other), so KV memory stays within `kv_cache_bytes` throughout."""
        batch, length = shape
        rows, per = self._rows, self.position_bytes
        if rows is not None:
            free_below = sum(1 for s in range(rows.batch) if rows.jobs[s] is None)
            if (rows.batch >= batch and rows.length >= length and free_below >= admitting
                    and rows.bytes(per) <= self.scheduler.rows_budget):
                return
        peak = batch * length * per if rows is None else rows.transient_bytes(batch, length, per)
        self.prefixes.fit(self.kv_cache_bytes - peak)
        if rows is None:
            self._rows = _Rows(self.llm, self.capacity, length, batch)
        else:
            rows.resize(batch, length)

    def _pause(self, job: Job) -> None:
        """Release `job`'s row (memory ran short): it will recompute its context and carry on unchanged.
        With prefix reuse on, its context's whole blocks are kept in the index first, if they fit."""
        rows, slot = self._rows, job.slot
        if job.req is not None and job.decoding:
            context = job.req.prompt_ids + job.generated[:-1]  # the positions its cache holds: [0, job.pos)
            if self.reuse_prefixes:
                self.prefixes.store(job.adapter, context, [t[slot] for t in rows.cache.k],
                                    [t[slot] for t in rows.cache.v], self.kv_cache_bytes - self._rows_bytes())
            job.context, job.resuming = context, True
        rows.jobs[slot] = None
        job.slot, job.prefilled, job.decoding, job.scored = None, 0, False, []

    def _fail_running(self, error: BaseException) -> None:
        """The loop's last resort: every running job fails with `error` (the waiting ones stay queued)."""
        with self._cond:
            running = [j for j in self._rows.jobs if j is not None] if self._rows is not None else []
        for job in running:
            self.retire(job)
            job.put(error)

    def _guarded(self, jobs: list[Job], work) -> None:
        """Run `work`; if it raises, the jobs it was for fail with that error and leave. Others go on."""
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - the error goes to the callers; the loop must live
            for job in jobs:
                self.retire(job)
                job.put(e)

    def _begin(self, job: Job) -> None:
        """A job new to its row: its adapter and seed (kept when resuming), and the keys and values of its
        context's longest stored prefix copied in (`_prefill_chunks` computes the rest)."""
        rows, slot = self._rows, job.slot
        job.prefilled, job.scored = 0, []
        if job.req is None:  # scoring: always computed in full
            return
        llm, req = self.llm, job.req
        if not job.resuming:
            job.adapter = req.adapter if req.adapter is not None else llm._default_adapter
            job.seed = req.seed if req.seed is not None else secrets.randbits(63)
        blocks = self.prefixes.lookup(job.adapter, job.context) if self.reuse_prefixes else []
        job.prefilled = self.prefixes.copy_into(blocks, [t[slot] for t in rows.cache.k],
                                                [t[slot] for t in rows.cache.v])
        if not job.resuming:
            job.output.cached_tokens = job.prefilled

    def _prefill_chunks(self, rows: Rows) -> None:
        """Prefill the contexts not yet done, in slot order, within the scheduler's budget for this
        iteration. A prompt's last chunk draws its first token."""
        budget = self.scheduler.prefill_budget(rows.jobs)
        if budget is None:  # nothing decodes: the waiting prompts go whole, several in one forward
            spans = [j for j in rows.jobs if j is not None and not j.decoding and not j.cancelled and j.req]
            if len(spans) > 1:
                self._guarded(spans, lambda: self._prefill_together(rows, spans))
        for slot, job in enumerate(rows.jobs):
            if job is None or job.decoding or job.cancelled:
                continue
            if budget is not None and budget <= 0:
                break
            left = len(job.context) - job.prefilled
            take = left if budget is None else min(budget, left)
            if budget is not None:
                budget -= take
            self._guarded([job], lambda: self._prefill_chunk(rows, slot, job, take))

    def _prefill_together(self, rows: Rows, jobs: list[Job]) -> None:
        """The rest of several contexts in one forward (none decoding; see `Runner.prefill_rows`), then
        each as its last chunk would end: first tokens drawn, resumed rows decoding again."""
        spans = {j.slot: (j.context[j.prefilled:], j.prefilled, j.adapter) for j in jobs}
        logits = self.runner.prefill_rows(rows, spans)
        for job in jobs:
            job.prefilled = len(job.context)
            self._prefilled(rows, job.slot, job, logits[job.slot])

    def _prefill_chunk(self, rows: Rows, slot: int, job: Job, take: int) -> None:
        """Compute context positions [prefilled, prefilled + take) of `job` at `slot`. After the last: a
        prompt samples its first token (and keeps its whole blocks in the prefix index), a resumed row
        takes decode steps again, a scored text gets its result."""
        start, n = job.prefilled, len(job.context)
        end = start + take
        span = job.context[start:end]
        if job.req is None:  # scoring: the head only at the positions predicting a text token
            lo, hi = max(start, job.n_context - 1, 0), min(end, n - 1)
            logits = self.runner.prefill(rows, slot, span, start, None, list(range(lo - start, hi - start)))
            if hi > lo:
                job.scored.append(logits.float())
            job.prefilled = end
            if end == n:
                self._scored(job)
            return
        draw = end == n and not job.resuming
        logits = self.runner.prefill(rows, slot, span, start, job.adapter, [take - 1] if draw else [])
        job.prefilled = end
        if end == n:
            self._prefilled(rows, slot, job, logits)

    def _prefilled(self, rows: Rows, slot: int, job: Job, logits: Tensor) -> None:
        """`job`'s context is in the cache: a prompt draws its first token from `logits` (1, V) and keeps
        its whole blocks in the prefix index; a resumed row takes decode steps again."""
        req, n = job.req, len(job.context)
        if job.resuming:  # its cache is back to [0, job.pos); the same token, counter and history go on
            rows.knobs.restore_row(slot, req.params, job.seed, req.prompt_ids, job.generated)
            job.resuming, job.decoding = False, True
            return
        if self.reuse_prefixes:
            self.prefixes.store(job.adapter, job.context, [t[slot] for t in rows.cache.k],
                                [t[slot] for t in rows.cache.v], self.kv_cache_bytes - self._rows_bytes())
        rows.knobs.set_row(slot, req.params, job.seed, req.prompt_ids)  # now: the decode steps before wrote it
        job.pos = n
        job.decoding = True
        self._emit(rows, slot, logits)

    def _scored(self, job: Job) -> None:
        """A scored text's result: (log-probabilities, is-greedy[, top ids, top log-probabilities])."""
        device = self.llm.device
        V = self.llm.config.vocab_size
        logits = torch.cat(job.scored) if job.scored else torch.empty(0, V, device=device)
        targets = torch.tensor(job.ids[job.n_context:], dtype=torch.long, device=device)
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(-1, targets[:, None])[:, 0]
        result = (chosen.tolist(), (logits.argmax(-1) == targets).tolist())
        if job.top:
            values, ids = logp.topk(job.top, dim=-1)
            result += (ids.tolist(), values.tolist())
        self.retire(job)
        job.put(result)
        job.put(_END)

    def _step(self, rows: Rows) -> None:
        """One decode step for every decoding row of `rows`."""
        for i in rows.live():
            job = rows.jobs[i]
            if job.cancelled:  # a closed stream leaves before the step, not after it
                self.retire(job)
                job.put(_END)
        live = [i for i in rows.live() if rows.jobs[i].decoding]
        if not live:
            return
        # -- speculative decoding (engine/speculate.py): a step verifying proposals, run there in full ------
        if self.speculator is not None and self.speculator.step(self, rows):
            return
        # ----------------------------------------------------------------------------------------------------
        n = self.runner.rows_for(live[-1], rows.batch)
        # the rows not decoding idle (batch.py); the sampler's row for one still prefilling is set when it
        # starts decoding
        batch = step_batch(rows, n, {i: [rows.jobs[i].token] for i in live}, 1 if self.runner.compiled else None)
        jobs = [j if j is not None and j.decoding else None for j in rows.jobs[:n]]
        device = self.llm.device
        out = self.runner.decode(rows, n, batch.tokens[:, 0].to(device), batch.pos[:, 0].to(device), batch.attended,
                                 self._allowed(rows, jobs), batch.adapters, self._steps(jobs),
                                 self._logprobs_wanted(jobs))
        for j in jobs:
            if j is not None:
                j.pos += 1
        self._deliver(rows, [i for i in range(n) if jobs[i] is not None], *out)

    @staticmethod
    def _steps(jobs: list[Job | None]) -> frozenset[str]:
        """The sampler steps some row of `jobs` uses (the eager step skips the others)."""
        return steps_used([j.req.params for j in jobs if j is not None])

    @staticmethod
    def _allowed(rows: Rows, jobs: list[Job | None], first: int = 0) -> Tensor | None:
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

    def _emit(self, rows: Rows, slot: int, logits: Tensor) -> None:
        """Sample row `slot`'s first token from its prompt's last logits (1, V) and deliver it."""
        job = rows.jobs[slot]
        knobs = rows.knobs.view(slot, slot + 1)
        tokens = sample_static(logits, knobs, self._allowed(rows, [job], slot), self._steps([job]))
        knobs.update(tokens)
        want = self._logprobs_wanted([job])
        self._deliver(rows, [slot], tokens, *token_logprobs(logits, tokens, want), first=slot)

    def _deliver(self, rows: Rows, slots: list[int], tokens: Tensor, logprob: Tensor | None,
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
                self.deliver_one(job, drawn[s - first], lps, tops, s - first, stop_ids)
            except Exception as e:  # noqa: BLE001 - this row's output failed: it alone fails
                self.retire(job)
                job.put(e)

    def deliver_one(self, job: Job, token: int, lps: list | None, tops: tuple | None, k: int,
                    stop_ids: frozenset[int]) -> None:
        """Row `job`'s new `token` (column `k` of the step's log-probabilities) into its output (the loop's
        steps and speculation's verify forwards deliver every token through here)."""
        if job.cancelled:
            self.retire(job)
            job.put(_END)
            return
        job.token = token
        job.generated.append(token)
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
            self.retire(job)
            job.put(_END)

    def retire(self, job: Job) -> None:
        """`job` is done: it leaves its row (its caller has been or is about to be sent its last event)."""
        job.finished = True
        with self._cond:
            rows = self._rows
            if rows is not None and job.slot is not None and rows.jobs[job.slot] is job:
                rows.jobs[job.slot] = None
            job.slot = None


def position_bytes(config: Any, dtype: torch.dtype) -> int:
    """KV memory per cached position: k and v, every layer, every key/value head."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def check_budget(kv_cache_bytes: int, per_position: int, tensors: int) -> None:
    """A budget too small to hold any request is refused where it is given (load), not found out later.
    `tensors`: how many the rows' cache is made of (2 per layer; see scheduler.py's `rows_budget`)."""
    if rows_budget(kv_cache_bytes, tensors) < MIN_POSITIONS * per_position:
        held = rows_budget(kv_cache_bytes, tensors) // per_position
        raise ValueError(f"kv_cache_bytes: {kv_cache_bytes} bytes hold {held} positions of this model's keys and "
                         f"values ({per_position} bytes each, with room kept for one layer's tensor while the "
                         f"cache grows); give at least {budget_for(MIN_POSITIONS, per_position, tensors)} "
                         f"({MIN_POSITIONS} positions)")


_LOOPS: weakref.WeakSet = weakref.WeakSet()


def _serve(ref: weakref.ref) -> None:
    """The loop thread. It holds its loop only while working, never while waiting for work, so a handle
    nobody uses any more is freed, and its thread ends within `idle` seconds."""
    idle = 0.5
    while True:
        loop = ref()
        if loop is None:
            return
        state = True
        try:
            state = loop._run_once(idle)
        except BaseException as e:  # noqa: BLE001 - nothing may end the loop: fail what was running, go on
            loop._fail_running(e)
        if state is False:
            return
        cond, waiting = loop._cond, loop._waiting
        del loop
        if state is _IDLE:
            with cond:  # a submit appends and notifies under this lock: none is missed
                if not waiting:
                    cond.wait(idle)


@atexit.register
def _close_all() -> None:
    # Threads still inside torch when the interpreter finalises can abort the process: end them first.
    for loop in list(_LOOPS):
        loop.close()
