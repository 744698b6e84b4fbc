"""The scheduler: who runs, in how much KV memory, and how many prompt tokens each iteration computes.

Memory is taken on demand. A row holds the positions it has filled plus the one it writes next, not its
prompt + max_tokens: a request is admitted when the rows' cache, grown to hold it, still fits the rows' share
of the budget `kv_cache_bytes` (`rows_budget`: all of it but room for one layer's tensor, so that growing
the cache never holds more than the budget; the prefix index gives way first). The cache is `batch` x
`length`: a power of two of rows covering every live row, and positions from 256 up in powers of two (at
the budget's edge, as many as fit); from 512 on the CPU where the fused attention kernels over fewer keys pad
them with a copy (model.py's `attention_floor`).
As rows produce tokens the cache grows; when it cannot, the most recently arrived running requests are
paused (their rows released; memory.py may keep their keys and values in the prefix index) until the rest
fit, and go back to the head of the queue. A resumed request recomputes its context (prompt and the tokens
it has produced) without sampling and carries on from the same token, seed counter and penalty history, so
its result is the one it would have had. A request that cannot fit even alone is refused when it is made
(`requests.py` checks prompt + max_tokens against `max_positions`), so nothing waits forever.

Prefill is chunked: while some row is decoding, at most `prefill_chunk` prompt tokens are computed per
iteration, one chunk more for each further `chunk_rows` rows decoding (so a long prompt arriving never stops
the running streams for long beside their own step: `prefill_budget`); when none is, each prompt goes whole.
Scoring (`score`, `score_batch`) takes a row and goes through the same chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

MIN_LENGTH = 256  # the shortest cache the rows get (positions); on the CPU model.py's `attention_floor` if more
MIN_POSITIONS = 16  # the fewest positions a budget must hold for one row


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def rows_budget(budget: int, tensors: int) -> int:
    """The most bytes the rows' cache may take of `budget`: all but one of its `tensors` (per layer, k and v)
    parts. A resize holds the larger cache plus one tensor of the other (memory.py, `Rows.resize`), so with
    both caches within this share, that moment too stays within the budget. The prefix index may use the
    rest whenever no resize runs."""
    return budget - budget // tensors


def budget_for(positions: int, position_bytes: int, tensors: int) -> int:
    """The smallest `kv_cache_bytes` whose rows' share (`rows_budget`) holds `positions` positions."""
    want = positions * position_bytes
    budget = want + want // tensors  # rows_budget(b) >= want needs b >= want + b // tensors
    while rows_budget(budget, tensors) < want:
        budget += 1
    return budget


def position_bytes(config: Any, dtype: Any) -> int:
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


def need(job: Any) -> int:
    """Positions the job's row must hold now: everything its forwards have written or will write before
    the next check (a prompt or context in full, plus the position of its first decode step)."""
    if job.scoring is not None:
        return len(job.scoring.ids)
    p = job.progress
    return p.pos + 1 + p.lookahead if p.decoding else len(p.context) + 1


@dataclass
class Applied:
    """What applying a plan did: the jobs that took rows, those paused (for the head of the queue), those
    that failed with their errors (out of their rows; the loop tells their callers), and the rows the cache
    moved, as (new slot, old slot) (the loop moves their sampler rows with them)."""
    admitted: list = field(default_factory=list)
    paused: list = field(default_factory=list)
    failed: list[tuple[Any, BaseException]] = field(default_factory=list)
    moved: list[tuple[int, int]] = field(default_factory=list)


class Scheduler:
    """Admission, memory shapes and pausing for one loop (see the module docstring): `plan` decides (a pure
    function of the jobs), `apply` carries a plan out on the KV memory the scheduler owns (`memory`, memory.py's
    `KVMemory`)."""

    def __init__(self, memory: Any, *, max_batch: int, context: int, prefill_chunk: int, min_length: int = MIN_LENGTH,
                 chunk_rows: int | None = None, span_unit: int = 1):
        self.memory = memory  # its budget, its rows' share of it, the bytes of a position, the rows it may hold
        self.max_batch, self.context, self.prefill_chunk = max_batch, context, prefill_chunk
        # `prefill_budget`: one more `prefill_chunk` per this many decoding rows (None: one chunk however many)
        self.chunk_rows = chunk_rows
        # `prefill_budget`: with several rows decoding, budgets in whole units of the rows a prompt span's
        # products are padded to (model.py's `span_unit`)
        self.span_unit = span_unit
        self.min_length = min_length  # the shortest cache (positions), at the budget's edge fewer

    @property
    def budget(self) -> int:
        return self.memory.budget

    @property
    def rows_budget(self) -> int:
        return self.memory.rows_budget

    @property
    def position_bytes(self) -> int:
        return self.memory.position_bytes

    @property
    def capacity(self) -> int:
        return self.memory.capacity

    @property
    def max_positions(self) -> int:
        """The most positions one request may hold: alone, in the rows' share of the budget, within the
        context."""
        return min(self.context, self.rows_budget // self.position_bytes)

    def shape(self, rows: int, positions: int) -> tuple[int, int] | None:
        """The cache (batch, length) for `rows` live rows the longest of which needs `positions`, or None
        when that does not fit the budget."""
        batch = min(_pow2(max(rows, 1)), self.capacity)
        room = min(self.context, self.rows_budget // (batch * self.position_bytes))
        length = min(max(self.min_length, _pow2(positions)), room)
        return (batch, length) if length >= positions else None

    def bytes(self, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1] * self.position_bytes

    def plan(self, running: Sequence[Any], waiting: Iterable[Any]) -> tuple[list, list, list, tuple[int, int] | None]:
        """(admit, pause, refuse, shape): which waiting jobs take rows now (in queue order, stopping at the
        first that does not fit, so nothing overtakes), which running jobs to pause (the latest arrivals
        first) so the rest fit, which waiting jobs can never fit, and the cache shape for the result."""
        live = sorted(running, key=lambda j: j.arrival)
        pause: list = []
        while live and self.shape(len(live), max(map(need, live))) is None:
            if len(live) == 1:
                break  # alone and still too big: requests.py refuses such requests; the loop fails it
            pause.append(live.pop())
        admit, refuse = [], []
        if not pause:
            for job in waiting:
                if job.cancelled:
                    continue
                if len(live) >= self.max_batch:
                    break
                if self.shape(len(live) + 1, max(map(need, [*live, job]))) is None:
                    if not live and not admit:
                        refuse.append(job)
                        continue
                    break
                live.append(job)
                admit.append(job)
        shape = self.shape(len(live), max(map(need, live))) if live else None
        return admit, pause, refuse, shape

    def apply(self, running: list, admit: list, pause: list, shape: tuple[int, int] | None) -> Applied:
        """Carry out a plan (`plan`'s, with `running` the jobs it was made for) on `memory`: pause, size the
        cache, give the admitted jobs their rows. On the loop thread, outside its lock (the copies and clones
        here never hold up `submit`, `stats` or `cancel`: issue 34). Each failure fails only the jobs it
        was for, and leaves none of them in a row or in neither the rows nor the queue."""
        memory, out = self.memory, Applied()
        for job in pause:
            # Pausing copies the row's blocks into the prefix index, which may fail (out of memory). Each job
            # is paused on its own: one that fails fails alone, and those paused before it still go back to
            # the queue (issue 34).
            try:
                memory.pause(job)
            except Exception as e:  # noqa: BLE001 - the error goes to its caller; the loop must live
                self._fail(out, [job], e)
                continue
            out.paused.append(job)
        remaining = [j for j in running if j not in pause]
        if remaining and shape is None:  # one running row outgrew the whole budget (`plan`'s backstop)
            self._fail(out, remaining, MemoryError(f"kv_cache_bytes: {self.budget} bytes cannot hold this "
                                                   f"request's {need(remaining[0])} positions"))
        if shape is None:
            return out
        try:  # KV memory is allocated here: if that fails, the requests it was for fail, and the loop goes on
            out.moved = memory.fit(shape, len(admit))
        except Exception as e:  # noqa: BLE001 - out of memory, most likely
            rows = memory.rows
            if rows is not None and not rows.intact:  # a resize failed part way: every row's keys are lost
                self._fail(out, admit + [j for j in rows.jobs if j is not None], e)
                memory.rows = None
            else:  # the running rows the cache as it is cannot hold would write past its end
                self._fail(out, admit + memory.outgrown(need), e)
            return out
        for job in admit:
            memory.place(job)
        out.admitted = list(admit)
        return out

    def _fail(self, out: Applied, jobs: list, error: BaseException) -> None:
        for job in jobs:
            self.memory.leave(job)
            out.failed.append((job, error))

    def prefill_budget(self, rows: Sequence[Any]) -> int | None:
        """Prompt tokens to compute this iteration: while some row decodes, `prefill_chunk` for every
        `chunk_rows` rows decoding (at least one chunk); with none decoding, no limit.

        The chunk bounds how long a prompt arriving holds up the running rows' next token. A decode step costs
        more as rows join it (on the 2-core EPYC, a 1B step takes about 60 ms at 1 row and 200 ms at 32), so
        the same hold-up relative to a step allows more prompt tokens: at 32 rows, 4 chunks (256 tokens, about
        0.7 s). 32 streamed chat requests in process (benchmarks/RESULTS.md): 1.01-1.10x the throughput and time
        to first token p50 1.3 s against 3.1-3.4 s, inter-token p99 unchanged.

        With two rows or more decoding, the budget is rounded up to whole `span_unit`s: the span's products
        compute that many rows anyway (on the Xeon with AMX the 1B's k/v and down projections run a 64-token
        chunk as a 128-row call: a 64-token prompt took 235-252 ms there, a 128-token one 249-255, a 192-token
        one 351-371). Streamed chat clients in process there (benchmarks/RESULTS.md): 1.08-1.11x
        the throughput at 8, 1.00-1.04x at 32. A lone stream keeps `prefill_chunk`: its step is the shortest,
        so its chunk is what its stall is (at most 4x its median gap, benchmarks/peers.py)."""
        decoding = sum(1 for j in rows if j is not None and j.progress.decoding)
        if not decoding:
            return None
        budget = self.prefill_chunk * (max(1, decoding // self.chunk_rows) if self.chunk_rows else 1)
        if decoding > 1:
            budget = -(-budget // self.span_unit) * self.span_unit
        return budget
