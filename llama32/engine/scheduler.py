"""The scheduler: who runs, in how much KV memory, and how many prompt tokens each iteration computes.

Memory is taken on demand. A row holds the positions it has filled plus the one it writes next, not its
prompt + max_tokens: a request is admitted when the rows' cache, grown to hold it, still fits the rows' share
of the budget `kv_cache_bytes` (`rows_budget`: all of it but room for one layer's tensor, so that growing
the cache never holds more than the budget; the prefix index gives way first). The cache is `batch` x
`length`: a power of two of rows covering every live row, and positions from 256 up in powers of two (at
the budget's edge, as many as fit); from 512 on the CPU, where attention over fewer keys pads them with a copy
(model.py's `attention_floor`).
As rows produce tokens the cache grows; when it cannot, the most recently arrived running requests are
paused (their rows released; memory.py may keep their keys and values in the prefix index) until the rest
fit, and go back to the head of the queue. A resumed request recomputes its context (prompt and the tokens
it has produced) without sampling and carries on from the same token, seed counter and penalty history, so
its result is the one it would have had. A request that cannot fit even alone is refused when it is made
(`requests.py` checks prompt + max_tokens against `max_positions`), so nothing waits forever.

Prefill is chunked: while some row is decoding, at most `prefill_chunk` prompt tokens are computed per
iteration (so a long prompt arriving never stops the running streams for long); when none is, each prompt
goes whole. Scoring (`score`, `score_batch`) takes a row and goes through the same chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

MIN_LENGTH = 256  # the shortest cache the rows get (positions); on the CPU model.py's KEY_BLOCK (512)
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


def need(job: Any) -> int:
    """Positions the job's row must hold now: everything its forwards have written or will write before
    the next check (a prompt or context in full, plus the position of its first decode step)."""
    if job.req is None:  # scoring
        return len(job.ids)
    if job.decoding:
        return job.pos + 1 + job.lookahead
    return len(job.context) + 1


class Scheduler:
    """Admission, memory shapes and pausing for one loop (see the module docstring). Pure decisions: the
    loop applies them."""

    def __init__(self, *, max_batch: int, capacity: int, budget: int, position_bytes: int, context: int,
                 prefill_chunk: int, tensors: int, min_length: int = MIN_LENGTH):
        self.max_batch, self.capacity = max_batch, capacity
        self.min_length = min_length  # the shortest cache (positions), at the budget's edge fewer
        self.budget, self.position_bytes, self.context = budget, position_bytes, context
        self.prefill_chunk = prefill_chunk
        self.rows_budget = rows_budget(budget, tensors)

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

    def prefill_budget(self, rows: Sequence[Any]) -> int | None:
        """Prompt tokens to compute this iteration: `prefill_chunk` while some row decodes, else no limit."""
        return self.prefill_chunk if any(j is not None and j.decoding for j in rows) else None
