"""The generation loop: one per handle, serving every `generate`, stream, `generate_batch` and `score` in flight.

Callers validate their request on their own thread (so a bad request raises there, before any compute),
then submit it as a `Job` (job.py). One loop thread owns the generation state and runs, over and over:
1. plan (scheduler.py): which waiting jobs take rows, in arrival order, as far as KV memory allows (memory
   is taken on demand: a row holds what it has filled, and the cache grows as tokens come); which running
   jobs to pause when the growing rows no longer fit (they resume later with an unchanged result); the
   scheduler then applies the plan to the KV memory it owns (memory.py's `KVMemory`: the rows' cache resized,
   paused rows' blocks kept in the prefix index);
2. prefill (prefill.py): prompts, resumed contexts and texts being scored, in chunks of at most
   `prefill_chunk` tokens per iteration while other rows decode, all at once when none does; a new prompt
   whose first blocks were computed before (by an earlier request with the same adapter) gets them copied
   from the prefix index; a prompt's last chunk draws its first token;
3. step (here, with batch.py and runner.py): one decode forward for every decoding row, each at its own
   position (no left padding), then the sampler with each row's own parameters, seed and LoRA adapter (its
   per-row state, `knobs`, is the loop's); or, with speculative decoding, a step verifying proposals
   (engine/speculative/);
4. deliver and retire (deliver.py): each new token goes to its caller through the job's `Output` (output.py)
   and a queue; a row leaves when its output is complete (stop id, max_tokens, stop string) or its caller
   cancelled (a stream closed or dropped).
A row's arithmetic does not depend on the other rows (its own positions, its own noise, its own adapter's
product), so a request gets the same tokens alone or in any batch (float32 greedy token for token; seeded
sampling the same draws). benchmarks/schedule_fuzz.py checks that under random schedules.

Failures: an error in a forward fails the requests that forward was for; an error delivering one row's
token fails that row; a failed allocation fails the requests it was for. The loop itself lives on.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from typing import Any

import torch

from ..model import attention_floor, decode_is_span, keep_address, span_unit
from ..sampling import StepKnobs
from .batch import allowed_mask, logprobs_wanted, step_batch, steps_of
from .deliver import Delivery
from .job import Job
from .memory import KVMemory
from .prefill import Prefill
from .runner import Runner
from .scheduler import MIN_LENGTH, Scheduler, _pow2, check_budget, need, position_bytes, rows_budget

DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 32}
DEFAULT_KV_CACHE_BYTES = {"cpu": 1 << 30, "cuda": 4 << 30}
# Prompt tokens prefilled per loop iteration while other rows decode: on a 2-core CPU a 1B decode step takes
# ~0.1 s and 64 prompt tokens about 0.3 s, so a running stream's longest gap stays a few steps long.
DEFAULT_PREFILL_CHUNK = {"cpu": 64, "cuda": 2048}
# On the CPU, a chunk per iteration for every 8 rows decoding (scheduler.py, `prefill_budget`): the step they wait
# for is longer anyway. CUDA's chunk is already a long prompt's whole.
CHUNK_ROWS = {"cpu": 8}
# A loop with nothing running that receives a request waits this long after the latest submit (at most
# GATHER_MAX_S in all, or until max_batch are waiting) before its first forward, so requests sent together
# (threads started at once arrive 3-8 ms apart here) share their prompts' prefill instead of the later ones
# being prefilled in chunks beside the first one's decoding (8 such 64-token requests: the last one's first
# token came 0.7 s later, the whole batch 5% later, than with one forward for all: benchmarks/RESULTS.md).
GATHER_S, GATHER_MAX_S = 0.01, 0.05
_IDLE = "idle"  # what `_run_once` returns when it found nothing to do

__all__ = ["DEFAULT_KV_CACHE_BYTES", "DEFAULT_MAX_BATCH", "DEFAULT_PREFILL_CHUNK", "GenerationLoop", "Job",
           "check_budget", "position_bytes"]


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
        self.memory = KVMemory(llm, capacity=self.capacity, budget=self.kv_cache_bytes,
                               position_bytes=self.position_bytes,
                               rows_budget=rows_budget(self.kv_cache_bytes, tensors))
        self.memory.answers = decode_is_span(llm.model, llm.device, llm.dtype)
        self.scheduler = Scheduler(self.memory, max_batch=self.max_batch, context=llm.context_length,
                                   prefill_chunk=DEFAULT_PREFILL_CHUNK.get(device, 64),
                                   min_length=max(MIN_LENGTH, attention_floor(llm.device, llm.model)),
                                   chunk_rows=CHUNK_ROWS.get(device), span_unit=span_unit(llm.model))
        self.runner = Runner(llm)
        # The sampler's per-row state (settings, seed counter, history), one row per slot of the rows' cache
        # (a step over rows [0, n) samples with rows [0, n) of it).
        self.knobs = StepKnobs(self.capacity, llm.config.vocab_size, llm.device)
        keep_address(list(self.knobs.tensors().values()))
        self.prefill = Prefill(self)
        self.delivery = Delivery(self)
        # On CPU an idle loop gives its rows' cache back (the next request allocates what it needs); on CUDA
        # it keeps it, since the compiled step's CUDA graphs are recorded against the cache's addresses.
        self.release_when_idle = device != "cuda"
        # speculative decoding: set by llama32.load(..., speculative=...) (engine/speculative/, `Speculator`)
        self.speculator: Any = None
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._last_submit = 0.0  # perf_counter() of the latest submit (the gathering wait: GATHER_S)
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
    def reuse_prefixes(self) -> bool:
        """Whether prompts reuse stored prefixes (memory.py); False computes every prompt in full."""
        return self.memory.reuse_prefixes

    @reuse_prefixes.setter
    def reuse_prefixes(self, value: bool) -> None:
        self.memory.reuse_prefixes = bool(value)

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

    def shutdown(self) -> None:
        """Cancel every request, queued or running, and stop the loop thread (at interpreter exit: a thread still
        inside torch while the interpreter finalises aborts the process, "terminate called without an active
        exception", and a stream its caller left open would keep the loop busy past `close`'s wait)."""
        with self._cond:
            rows = self.memory.rows
            for job in [*self._waiting, *(rows.jobs if rows is not None else [])]:
                if job is not None:
                    job.cancelled = True
            self._cond.notify_all()
        self.close()

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
            rows = self.memory.rows
            running = len(rows.live()) if rows is not None else 0
            paused = sum(1 for j in self._waiting if j.progress.resuming)
            return {"running": running, "waiting": len(self._waiting), "paused": paused,
                    "kv_bytes": self.memory.bytes, "kv_bytes_total": self.kv_cache_bytes}

    # -- the loop -----------------------------------------------------------------------------------------

    def _run_once(self, idle: float) -> bool | str:
        """Plan, prefill and step once: True. With nothing to do, `_IDLE` (the thread then waits up to `idle`
        seconds for a submit, holding the condition, not the loop), or False when the thread must end: the loop
        is closing and idle. That is decided under the lock, where `_thread` is cleared, so a job submitted a
        moment later starts a new thread instead of being left to one that is ending."""
        with self._cond:
            live = self.memory.rows is not None and self.memory.rows.live()
            if not self._waiting and not live:
                if self.release_when_idle:
                    self.memory.rows = None
                if self._closing:
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return False
                return _IDLE
            if not live:
                self._gather()
            plan = self._plan()
        # Outside the lock (issue 34), and outside inference mode, as the runner's warm-up makes its scratch
        # rows: the cache's tensors are then ordinary ones, whose dispatch keys the compiled step's guards
        # were made for.
        applied = self.scheduler.apply(*plan)
        for job, error in applied.failed:
            self.delivery.fail(job, error)
        if applied.paused:
            with self._cond:
                self._waiting.extendleft(reversed(applied.paused))  # the paused go first, in arrival order
        self.knobs.move(applied.moved)  # the sampler's rows follow their rows' keys and values
        with torch.inference_mode():
            for job in applied.admitted:
                self.guarded([job], lambda: self.prefill.begin(job))
            rows = self.memory.rows
            if rows is not None and rows.live():
                self.prefill.run(rows)
                self.guarded([j for j in rows.jobs if j is not None], lambda: self._step(rows))
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
        queue, and so do the jobs admitted (the scheduler's `apply` gives them rows). Returns (running, admit,
        pause, shape)."""
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            self.delivery.end(job)
        rows = self.memory.rows
        running = [j for j in rows.jobs if j is not None] if rows is not None else []
        admit, pause, refuse, shape = self.scheduler.plan(running, self._waiting)
        for job in refuse:  # cannot fit even alone (requests.py refuses these first; kept as a backstop)
            self._waiting.remove(job)
            self.delivery.fail(job, MemoryError(f"kv_cache_bytes: {self.kv_cache_bytes} bytes cannot hold this "
                                                f"request's {need(job)} positions ({self.position_bytes} bytes each)"))
        for job in admit:
            self._waiting.remove(job)
        return running, admit, pause, shape

    def _fail_running(self, error: BaseException) -> None:
        """The loop's last resort: every running job fails with `error` (the waiting ones stay queued)."""
        with self._cond:
            rows = self.memory.rows
            running = [j for j in rows.jobs if j is not None] if rows is not None else []
        for job in running:
            self.delivery.fail(job, error)

    def guarded(self, jobs: list[Job], work) -> None:
        """Run `work`; if it raises, the jobs it was for fail with that error and leave. Others go on."""
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - the error goes to the callers; the loop must live
            for job in jobs:
                self.delivery.fail(job, e)

    def _step(self, rows: Any) -> None:
        """One decode step for every decoding row of `rows`."""
        for i in rows.live():
            job = rows.jobs[i]
            if job.cancelled:  # a closed stream leaves before the step, not after it
                self.delivery.end(job)
        live = [i for i in rows.live() if rows.jobs[i].progress.decoding]
        if not live:
            return
        # -- speculative decoding (engine/speculative/): a step verifying proposals, run there in full --------
        if self.speculator is not None and self.speculator.step(self, rows):
            return
        # ----------------------------------------------------------------------------------------------------
        n = self.runner.rows_for(live[-1], rows.batch)
        # the rows not decoding idle (batch.py); the sampler's row for one still prefilling is set when it
        # starts decoding
        batch = step_batch(rows, n, {i: [rows.jobs[i].progress.token] for i in live}, self.runner.decode_floor)
        jobs = [j if j is not None and j.progress.decoding else None for j in rows.jobs[:n]]
        device = self.llm.device
        out = self.runner.decode(rows, self.knobs, n, batch.tokens[:, 0].to(device), batch.pos[:, 0].to(device),
                                 batch.attended, allowed_mask(self.knobs, jobs), batch.adapters, steps_of(jobs),
                                 logprobs_wanted(jobs))
        for j in jobs:
            if j is not None:
                j.progress.pos += 1
        self.delivery.step(rows, [i for i in range(n) if jobs[i] is not None], *out)

    def retire(self, job: Job, failed: bool = False) -> None:
        """`job` is done: it leaves its row (its caller has been or is about to be sent its last event: deliver.py's
        `end` and `fail` call this; `token` too, for a row's last token). Unless it `failed`, what its row holds
        may stay in the prefix index first (memory.py's `finished`)."""
        job.finished = True
        if not failed:
            self.memory.finished(job)
        with self._cond:
            self.memory.leave(job)


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
        loop.shutdown()
