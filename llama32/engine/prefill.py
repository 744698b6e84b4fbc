"""Prefill: the contexts of the rows not yet decoding (prompts, resumed rows' contexts, texts being scored)
computed into their rows, within the scheduler's budget of prompt tokens for the iteration.

While some row decodes, contexts go in chunks (at most `prefill_chunk` tokens per iteration, in slot
order); when none decodes, every waiting prompt goes whole. Where the runner packs spans (`Runner.packs`: the
CPU, prompt spans attending written out or fused), the iteration's prompt spans share forwards, their tokens
one after another (`Runner.prefill_packed`, about `PACK_TOKENS` a forward, one adapter each); elsewhere each
row's chunk takes a forward of its own, and prompts going whole share one (`Runner.prefill_rows`) unless their
lengths differ so much that padding them to the longest would waste more than it saves (`padding_wasted`).
A resumed row's context and a text being scored always take forwards of their own. A context's end: a prompt
draws its first token (sampled with its row's settings and delivered) and keeps its whole blocks in the prefix
index; a resumed row takes decode steps again with its sampler row restored; a scored text gets its result.
"""

from __future__ import annotations

import secrets
import weakref
from typing import Any

from torch import Tensor

from ..sampling import sample_static
from .batch import allowed_mask, logprobs_wanted, steps_of
from .job import Job
from .runner import token_logprobs


# A packed forward (`Runner.prefill_packed`) takes no further span once it holds this many prompt tokens. Its
# products run in row tiles of up to 256 rows whatever the total, so more buys little, while every prompt packed
# waits for the whole forward for its first token: 64 chat requests from 32 clients (the 1B, an AMX Xeon,
# benchmarks/RESULTS.md) ran at the same throughput with 512 as with 4,096, time to first token p50 0.8 s
# against 2.8-3.7 s.
PACK_TOKENS = 512


def padding_wasted(lengths: list[int]) -> bool:
    """Whether one forward over spans of these lengths would waste too much on padding: it computes every span
    at the longest one's length, and when that adds more than a quarter of the spans' own positions (and more
    than a few dozen per extra forward, about what a forward of few positions costs beyond them: reading every
    weight once), each span goes in a forward of its own instead. 32 chat prompts of 40-190 tokens arriving at
    once (benchmarks/RESULTS.md, 2026-12-05): padded to the longest, 1.7x their positions; one forward each
    gave 1.04-1.15x the throughput and put their first tokens out as each prompt was done."""
    real = sum(lengths)
    pad = len(lengths) * max(lengths) - real
    return pad > max(real // 4, 32 * (len(lengths) - 1))


class Prefill:
    """The loop's prefill (module docstring). `loop` gives it the handle (`llm`), the runner, the KV memory,
    the scheduler's budget, the sampler's rows (`knobs`), delivery and `guarded` (a failure fails the jobs
    it was for)."""

    def __init__(self, loop: Any):
        self._loop = weakref.ref(loop)  # the loop owns this

    @property
    def loop(self) -> Any:
        return self._loop()

    def begin(self, job: Job) -> None:
        """A job new to its row: its adapter and seed (kept when resuming), and the keys and values of its
        context's longest stored prefix copied in (the chunks compute the rest)."""
        job.progress.prefilled = 0
        if job.scoring is not None:  # scoring: always computed in full
            job.scoring.logits = []
            return
        llm, req = self.loop.llm, job.req
        if not job.progress.resuming:
            job.adapter = req.adapter if req.adapter is not None else llm._default_adapter
            job.seed = req.seed if req.seed is not None else secrets.randbits(63)
        self.loop.memory.begin(job)
        if not job.progress.resuming:
            job.output.cached_tokens = job.progress.prefilled

    def run(self, rows: Any) -> None:
        """Prefill the contexts not yet done, in slot order, within the scheduler's budget for this
        iteration."""
        loop = self.loop
        budget = loop.scheduler.prefill_budget(rows.jobs)
        packs = loop.runner.packs
        if budget is None and not packs:  # nothing decodes: the waiting prompts go whole, several in one forward
            spans = [j for j in rows.jobs if j is not None and not j.progress.decoding and not j.cancelled and j.req
                     and self.drawn_from(j) > len(j.progress.context)]  # (a resumed row's drawn positions: below)
            if len(spans) > 1 and not padding_wasted([len(j.progress.context) - j.progress.prefilled for j in spans]):
                loop.guarded(spans, lambda: self._together(rows, spans))
        chunks = []  # (slot, job, tokens to take), in slot order
        for slot, job in enumerate(rows.jobs):
            if job is None or job.progress.decoding or job.cancelled:
                continue
            if budget is not None and budget <= 0:
                break
            left = len(job.progress.context) - job.progress.prefilled
            take = left if budget is None else min(budget, left)
            if budget is not None:
                budget -= take
            chunks.append((slot, job, take))
        if packs:
            chunks = self._pack(rows, chunks)
        for slot, job, take in chunks:
            loop.guarded([job], lambda: self._chunk(rows, slot, job, take))

    def _pack(self, rows: Any, chunks: list[tuple[int, Job, int]]) -> list[tuple[int, Job, int]]:
        """Run the prompt chunks of `chunks` that may share forwards in packed forwards (`Runner.prefill_packed`):
        those of new prompts (not a resumed row's context, not a text being scored), grouped by adapter, each
        forward closed once it holds `PACK_TOKENS` tokens. Returns the chunks left for forwards of their own, in
        slot order."""
        rest, groups = [], {}
        for chunk in chunks:
            job = chunk[1]
            if job.scoring is not None or job.progress.resuming:
                rest.append(chunk)
            else:
                groups.setdefault(id(job.adapter), []).append(chunk)
        for group in groups.values():
            packs: list[list[tuple[int, Job, int]]] = [[]]
            for chunk in group:
                if sum(take for _, _, take in packs[-1]) >= PACK_TOKENS:
                    packs.append([])
                packs[-1].append(chunk)
            for pack in packs:
                if len(pack) == 1:
                    rest.append(pack[0])
                else:
                    self.loop.guarded([job for _, job, _ in pack], lambda: self._packed(rows, pack))
        return sorted(rest, key=lambda chunk: chunk[0])

    def _packed(self, rows: Any, pack: list[tuple[int, Job, int]]) -> None:
        """The chunks of `pack` (new prompts, one adapter) in one forward, then each as its chunk would end."""
        spans = []
        for slot, job, take in pack:
            p = job.progress
            spans.append((slot, p.context[p.prefilled:p.prefilled + take], p.prefilled,
                          p.prefilled + take == len(p.context)))
        logits = self.loop.runner.prefill_packed(rows, spans, pack[0][1].adapter)
        for slot, job, take in pack:
            p = job.progress
            p.prefilled += take
            if p.prefilled == len(p.context):
                self._done(rows, slot, job, logits[slot])

    def _together(self, rows: Any, jobs: list[Job]) -> None:
        """The rest of several contexts in one forward (none decoding; see `Runner.prefill_rows`), then
        each as its last chunk would end."""
        progress = [j.progress for j in jobs]
        spans = {p.slot: (p.context[p.prefilled:], p.prefilled, j.adapter) for j, p in zip(jobs, progress)}
        logits = self.loop.runner.prefill_rows(rows, spans)
        for job, p in zip(jobs, progress):
            p.prefilled = len(p.context)
            self._done(rows, p.slot, job, logits[p.slot])

    def _chunk(self, rows: Any, slot: int, job: Job, take: int) -> None:
        """Compute context positions [prefilled, prefilled + take) of `job` at `slot`."""
        runner, p = self.loop.runner, job.progress
        start, n = p.prefilled, len(p.context)
        end = start + take
        span = p.context[start:end]
        if job.scoring is not None:  # the head only at the positions predicting a text token
            lo, hi = max(start, job.scoring.n_context - 1, 0), min(end, n - 1)
            logits = runner.prefill(rows, slot, span, start, None, list(range(lo - start, hi - start)))
            if hi > lo:
                job.scoring.logits.append(logits.float())
            p.prefilled = end
            if end == n:
                self.loop.delivery.scored(job)
            return
        drawn_from = self.drawn_from(job)
        if start < drawn_from < end:  # a resumed row's prompt, then what it drew, each as its own chunk
            end = drawn_from
            take, span = end - start, p.context[start:end]
        draw = end == n and not p.resuming
        logits = runner.prefill(rows, slot, span, start, job.adapter, [take - 1] if draw else [],
                                per_position=start >= drawn_from)
        p.prefilled = end
        if end == n:
            self._done(rows, slot, job, logits)

    def drawn_from(self, job: Job) -> int:
        """Where a resumed row's drawn positions start in its context, when they must be recomputed as its decode
        steps computed them: on the CPU where a decode step does not write a prompt span's bits (not
        `memory.answers`: bfloat16 on AMX or without native bfloat16). Its own blocks, kept when it was paused,
        serve it first (memory.py); the positions they no longer hold attend one at a time, as decode steps do
        (`per_position`), so the row goes on with the bits it had. Past the context (never) elsewhere."""
        loop, p = self.loop, job.progress
        if p.resuming and loop.runner.one_attention and not loop.memory.answers:
            return len(job.req.prompt_ids)
        return len(p.context) + 1

    def _done(self, rows: Any, slot: int, job: Job, logits: Tensor) -> None:
        """`job`'s context is in the cache: a prompt draws its first token from `logits` (1, V) and keeps
        its whole blocks in the prefix index; a resumed row takes decode steps again."""
        loop, req, p = self.loop, job.req, job.progress
        if p.resuming:  # its cache is back to [0, p.pos); the same token, counter and history go on
            loop.knobs.restore_row(slot, req.params, job.seed, req.prompt_ids, p.generated)
            p.resuming, p.decoding = False, True
            return
        loop.memory.keep(job, p.context)
        loop.knobs.set_row(slot, req.params, job.seed, req.prompt_ids)  # now: the decode steps before wrote it
        p.pos = len(p.context)
        p.decoding = True
        # its first token, drawn with its own sampler row
        knobs = loop.knobs.view(slot, slot + 1)
        tokens = sample_static(logits, knobs, allowed_mask(loop.knobs, [job], slot), steps_of([job]))
        knobs.update(tokens)
        loop.delivery.step(rows, [slot], tokens, *token_logprobs(logits, tokens, logprobs_wanted([job])), first=slot)
