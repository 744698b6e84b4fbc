"""What a step over the rows' cache is fed: one builder for the decode step and the verify forward (ids,
positions, adapters), and the sampler's inputs for a step's rows (the allowed-token mask, the sampler steps
used, the log-probabilities asked for).

A step runs over rows [0, n) of the cache, not only the decoding ones (a forward takes a contiguous slice, and
the compiled step a power of two of rows). Each decoding row feeds its run (its last token, then any proposals
being verified) from its own position. Every other row is fed token 0 at `idle_position`: a free row at 0, a
row still prefilling (or a text being scored) at its next context position, which its next chunk overwrites,
so a step never writes over keys and values a row holds. Positions past a row's run are padding: written past
its present and overwritten before anything reads them (kept inside the cache).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..sampling import StepKnobs, steps_used
from .runner import attended_for


def idle_position(job: Any) -> int:
    """Where a step writes a row that is not decoding (see the module docstring)."""
    return 0 if job is None else job.progress.prefilled


class StepBatch(NamedTuple):
    tokens: Tensor  # (n, T) ids, on the host
    pos: Tensor  # (n, T) the position each is written at
    adapters: list[Any]  # per row: its LoRA adapter (None for base rows and rows not decoding)
    attended: int  # cache positions the step attends over


def step_batch(rows: Any, n: int, runs: dict[int, list[int]], floor: int | None = None) -> StepBatch:
    """The inputs of a step over rows [0, n) of `rows` in which decoding row r feeds `runs[r]` from its position
    `pos` and every other row idles (module docstring). `floor`: the fewest positions attended, the rows' own
    (`Rows.floor`) unless given (the compiled step, CUDA's, is given 1 on the CPU too: its shapes stay CUDA's)."""
    T = max(len(seq) for seq in runs.values())
    last = rows.length - 1
    ids, pos = [], []
    for r in range(n):
        job, seq = rows.jobs[r], runs.get(r)
        start = idle_position(job) if seq is None else job.progress.pos
        seq = seq or []
        ids.append(seq + [0] * (T - len(seq)))
        pos.append([min(start + i, last) for i in range(T)])
    attended = attended_for(rows.length, max(rows.jobs[r].progress.pos + len(seq) for r, seq in runs.items()),
                            rows.floor if floor is None else floor)
    adapters = [rows.jobs[r].adapter if r in runs else None for r in range(n)]
    return StepBatch(torch.tensor(ids), torch.tensor(pos), adapters, attended)


def allowed_mask(knobs: StepKnobs, jobs: list[Any], first: int = 0) -> Tensor | None:
    """The allowed-token mask for rows [first, first + len(jobs)) (None for a row not in the step): each
    JSON-constrained row's filled by its matcher, the others all True; None when no row is constrained."""
    if not any(j is not None and j.constraint is not None for j in jobs):
        return None
    for i, j in enumerate(jobs, start=first):
        if j is not None and j.constraint is not None:
            j.constraint.fill(knobs.allowed[i])
    return knobs.allowed[first: first + len(jobs)]


def steps_of(jobs: list[Any]) -> frozenset[str]:
    """The sampler steps some row of `jobs` uses (the eager step skips the others)."""
    return steps_used([j.req.params for j in jobs if j is not None])


def logprobs_wanted(jobs: list[Any]) -> int | None:
    """None when no row asks for log-probabilities, else the most alternatives any row asks for."""
    asks = [j.req.top_logprobs for j in jobs if j is not None and j.req.logprobs]
    return max(asks) if asks else None
