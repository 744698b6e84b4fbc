"""Speculative decoding inside the generation loop: the `Speculator`, its per-request state (`RowSpec`) and
its totals (`SpecStats`).

A handle loaded with `speculative` gets a `Speculator` (`llm.loop.speculator`). The loop (engine/loop.py)
calls it in one place, marked "speculative decoding" in `_step`: `step(loop, rows)` at the start of a decode
step (after cancelled rows left) either runs the whole step itself, verifying proposals, and returns True, or
returns False and the loop takes its ordinary step (the compiled one where the handle compiles). It reads a
job's `req`, `generated`, `token`, `pos`, `produced`, `adapter`, `constraint` and `decoding`, keeps its own
state in `job.spec`, sets `job.progress.lookahead` (the positions past the next one its proposals may write, which the
scheduler keeps room for: scheduler.py, `need`), and delivers through the loop's `delivery.token` and `retire`.

What `step` does, for the rows [0, n) of the step (a row prefilling or free takes part as in the ordinary
step, at its next prompt position; its writes there are overwritten before anything reads them):
1. ask: each decoding row whose request can still take more than one token asks its `AdaptiveK` for a number
   of proposals k (0: its acceptance does not pay for the verify forward's cost), cut to fit max_tokens
   (k <= max_tokens - produced - 1) and the cache (pos + k < length for every decoding row; after a verify
   step `job.progress.lookahead` asks the scheduler for MAX_PROPOSALS more positions for the row's next step).
2. decide, propose, decide: the step compares a plain step of the n rows (cost 1 + c (n - 1), one token per
   decoding row) with one forward over n rows x T positions (cost 1 + c (n T - 1), the tokens each row is
   expected to deliver from its recent acceptance), c being `cost_per_token` (the extra cost of one more
   position per forward, relative to a one-position step; benchmarks/RESULTS.md); with several rows the
   longer forward must move every decoding row faster than plain steps would (`_positions`). If it pays,
   each asking row gets up to T - 1 proposals (`NgramProposer` over the request's tokens, or `DraftProposer`
   on the draft model with the request's own sampler, `RowSampler`), cut at any id the target cannot draw
   and, for a JSON-constrained row, at the first token its grammar does not allow there; then the comparison
   is made again with what the rows got. No proposal, or a plain step that pays better: return False.
3. verify: one eager forward over [n, T] (row r's token and its k_r proposals at its own positions
   pos..pos+k_r, the rest of the T positions padding written past the row's present, T - 1 never more than
   any decoding row has room for), each row with its LoRA adapter; then for each row `verify` (verification.py):
   the token the sampler would draw at each position, with the history and counter noise it would have
   after the earlier proposals and, for a JSON row, the matcher's mask after them (walked through the
   proposals and rolled back). Accepted proposals and the target's own token at the first mismatch are
   delivered one by one through the loop's `delivery.token` (engine/deliver.py: stop ids, max_tokens, the
   JSON matcher's advance; the text work, stop strings included, on the output thread, which drops what
   follows a stop string); a row that finishes inside the run drops the rest. The sampler's history and
   counter record the delivered tokens as that many plain steps would (`record`). Rejected positions' keys
   and values stay in the cache past the row's position, to be overwritten by its next step.

Exactness (the delivered tokens are the plain loop's), and why the verify forward attends one position at a
time in bfloat16 on the CPU (`per_position`): the package docstring.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ...sampling import steps_used
from ..batch import step_batch
from ..runner import token_logprobs
from .adaptive import DEFAULT_COST, AdaptiveK
from .proposers import DraftProposer, NgramProposer, RowSampler
from .verification import record, verify

MAX_PROPOSALS = 8
# "ngram": each row's acceptance is learnt per length of the n-gram matched, starting from these rates (near the
# acceptance measured on SmolLM2, 13%, 21%, 50%, 77%: RowSpec). With the CPU's cost, a 1-token match is not worth
# a verify until the row has shown otherwise (AdaptiveK probes it now and then).
NGRAM_PRIOR = {1: 0.15, 2: 0.25, 3: 0.45, 4: 0.7}


@dataclass
class RowSpec:
    """One request's speculation: its proposer, its numbers of proposals, its counts.

    `adaptive`: a draft's `AdaptiveK`, or for "ngram" one per length of the n-gram matched (1..4), since how
    often a proposal is right depends mostly on that: measured on SmolLM2 over five prompts, 13% of the proposals
    after a 1-token match were accepted, 21% after 2, 50% after 3, 77% after 4 (benchmarks/RESULTS.md).
    `current` is the one this step's proposals are judged by; `pending` an n-gram row's proposals, found while
    asking (a look-up costs nothing next to a forward)."""

    proposer: Any
    adaptive: AdaptiveK | dict[int, AdaptiveK]
    current: AdaptiveK | None = None
    pending: list[int] = field(default_factory=list)
    verify_steps: int = 0
    proposed: int = 0
    accepted: int = 0


@dataclass
class SpecStats:
    """Totals over the handle's life: verify steps taken, proposals made and accepted, plain steps declined."""

    verify_steps: int = 0
    proposed: int = 0
    accepted: int = 0
    declined: int = 0  # steps where rows asked for proposals but a plain step was expected to pay better

    def as_dict(self) -> dict:
        return {"verify_steps": self.verify_steps, "proposed": self.proposed, "accepted": self.accepted,
                "declined": self.declined}


class Speculator:
    """The loop's speculative decoding (module docstring). `draft` is the draft model's handle for a draft
    checkpoint, None for "ngram"."""

    def __init__(self, llm: Any, source: str, draft: Any = None):
        # The handle owns its loop and the loop this: refer to the handle (and to it as its own draft) weakly,
        # so that dropping the handle frees it at once (engine/loop.py does the same).
        self._llm = weakref.ref(llm)
        self._own_draft = draft is llm
        self._draft = None if draft is llm else draft
        self.source = source
        cost = DEFAULT_COST.get((llm.device.type, llm.dtype)) or DEFAULT_COST.get((llm.device.type, None), (0.0, 0.1))
        self.cost_fixed, self.cost_per_token = cost
        # The verify forward's attention one position at a time where that makes its logits those of one-position
        # steps: in bfloat16 (and float16) on the CPU, whose product kernels give each row the same bits
        # whatever the row count (measured: package docstring). In float32 the products already differ in the last
        # bits with the row count (as in a bigger batch), so splitting would cost without making anything exact;
        # on CUDA it is not measured.
        self.per_position = llm.device.type == "cpu" and llm.dtype != torch.float32
        self.max_k = MAX_PROPOSALS
        self.stats = SpecStats()

    @property
    def llm(self) -> Any:
        return self._llm()

    @property
    def draft(self) -> Any:
        """The draft model's handle (the handle itself when it drafts for itself), None for "ngram"."""
        return self._llm() if self._own_draft else self._draft

    # -- the loop's hook -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, loop: Any, rows: Any) -> bool:
        """Run this decode step speculatively when some row has proposals and it is expected to pay; True
        when it ran (every decoding row got its tokens), False to let the loop take its ordinary step."""
        jobs = rows.jobs
        live = [i for i, j in enumerate(jobs) if j is not None and j.progress.decoding and not j.cancelled]
        if not live:
            return False
        # the most positions past its next one that every decoding row has room for in the cache
        room = min(rows.length - 1 - jobs[i].progress.pos for i in live)
        wanted: dict[int, int] = {}  # row -> the most proposals it asks for
        for i in live:
            job = jobs[i]
            if job.spec is None:
                job.spec = self._new_state(job)
            left = job.req.max_tokens - job.produced - 1  # tokens it may take after this step's first
            k = self._ask(job, min(left, room, self.max_k))
            if k > 0:
                wanted[i] = k
        if not wanted:
            return self._plain(jobs, live)
        n = live[-1] + 1
        # Decide on what the rows ask for before proposing (a draft's proposals cost forwards), then again on
        # what they got (an n-gram row may find no match).
        T = self._positions(n, live, jobs, wanted)
        plan: dict[int, list[int]] = {}
        masks: dict[int, torch.Tensor] = {}
        if T > 1:
            for i, k in wanted.items():
                props, mask = self._propose(jobs[i], min(k, T - 1), loop.knobs, i)
                if props:
                    plan[i] = props
                    if mask is not None:
                        masks[i] = mask
            if not plan:
                return self._plain(jobs, live)
            T = self._positions(n, live, jobs, {i: len(p) for i, p in plan.items()})
        if T == 1:
            self.stats.declined += 1
            return self._plain(jobs, live)
        for i in list(plan):  # a shorter forward than some row got proposals for: cut to fit
            if len(plan[i]) > T - 1:
                plan[i] = plan[i][:T - 1]
                if i in masks:
                    masks[i] = masks[i][:T]
        self._verify(loop, rows, n, T, live, plan, masks)
        return True

    # -- proposing ------------------------------------------------------------------------------------------

    def _look_ahead(self, job: Any, k: int) -> None:
        """Ask the scheduler to keep room for `k` proposals in the row's next step (`need` = pos + 1 + lookahead),
        never beyond its prompt + max_tokens (the budget admitted it for that). Only rows that speculate ask: a
        longer cache costs every step (a 512-position cache's steps took ~15% longer than a 256-position one's
        on 8 SmolLM2 rows attending over the same 256 positions)."""
        job.progress.lookahead = max(0, min(k, job.req.max_tokens - job.produced - 2))

    def _plain(self, jobs: list, live: list[int]) -> bool:
        """No speculation this step: the rows ask for no room beyond their next position; the loop steps."""
        for i in live:
            jobs[i].progress.lookahead = 0
        return False

    def _new_state(self, job: Any) -> RowSpec:
        if self.draft is None:
            adaptive = {n: self._adaptive(rate) for n, rate in NGRAM_PRIOR.items()}
            return RowSpec(NgramProposer(max_n=max(NGRAM_PRIOR)), adaptive)
        proposer = DraftProposer(self.draft.model, self.llm.config.vocab_size)
        return RowSpec(proposer, self._adaptive(AdaptiveK.rate))

    def _adaptive(self, rate: float) -> AdaptiveK:
        return AdaptiveK(max_k=self.max_k, cost_per_token=self.cost_per_token, cost_fixed=self.cost_fixed, rate=rate)

    def _ask(self, job: Any, most: int) -> int:
        """How many proposals the row asks for this step (at most `most`); sets `job.spec.current`."""
        state = job.spec
        state.current, state.pending = None, []
        if most <= 0:
            return 0
        if isinstance(state.proposer, NgramProposer):
            props = state.proposer.propose(job.req.prompt_ids + job.progress.generated, most)
            if not props:
                return 0
            state.current = state.adaptive[state.proposer.matched]
            state.pending = props
            return min(state.current.next_k(), len(props))
        state.current = state.adaptive
        return min(state.current.next_k(), most)

    def _propose(self, job: Any, k: int, knobs: Any, row: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to `k` proposals for the row ([] for none) and, for a JSON row, its allowed-token mask at each of
        the len + 1 positions."""
        proposer = job.spec.proposer
        if isinstance(proposer, DraftProposer):
            ids = job.req.prompt_ids + job.progress.generated
            props = proposer.propose(ids, k, RowSampler(knobs, row, steps_used([job.req.params])))
        else:
            props = job.spec.pending[:k]
        V = self.llm.config.vocab_size
        for i, t in enumerate(props):  # the target can never draw an id outside its logits
            if not 0 <= t < V:
                props = props[:i]
                break
        if not props or job.constraint is None:
            return props, None
        return self._constrained(job, props)

    def _constrained(self, job: Any, props: list[int]) -> tuple[list[int], torch.Tensor | None]:
        """Walk the JSON matcher through the proposals for the mask at each position, then roll it back.
        Proposals end at the first token the grammar does not allow there, and after a stop token."""
        matcher = job.constraint
        masks = torch.ones(len(props) + 1, self.llm.config.vocab_size, dtype=torch.bool)
        stop_ids = self.llm.stop_ids
        consumed = 0
        try:
            matcher.fill(masks[0])
            for i, t in enumerate(props):
                if not masks[i, t]:
                    props = props[:i]
                    break
                if t in stop_ids:  # the answer would end here; a stop is not rolled back (constrain.py)
                    props = props[:i + 1]
                    break
                if not matcher.accept(t):
                    raise RuntimeError(f"the JSON matcher refused token {t} that its mask allowed")
                consumed += 1
                matcher.fill(masks[i + 1])
        finally:
            matcher.rollback(consumed)
        masks = masks[:len(props) + 1].to(self.llm.device)
        return props, masks

    def _positions(self, n: int, live: list[int], jobs: list, plan: dict[int, int]) -> int:
        """How many positions the step's forward takes (1: a plain step), given each proposing row's number of
        proposals (`plan`: row -> k).

        A single row keeps its own choice (its `AdaptiveK` weighed the same cost, and probes). With several rows,
        a forward over n rows x T positions costs 1 + c (n T - 1) one-position steps against 1 + c (n - 1) for a
        plain step, and row r with m = min(k_r, T - 1) proposals and recent acceptance a_r is expected to move
        (1 - a^(m+1)) / (1 - a) tokens instead of 1 (`AdaptiveK.gain`'s model). A longer forward is taken only
        when it moves every decoding row faster than plain steps would, by `AdaptiveK.min_gain`: a row without
        proposals would only wait longer for its tokens, and the batch is done when its slowest row is (measured:
        8 callers, some copying and some not, lost 4-9% of their throughput when the total of tokens per cost
        decided; benchmarks/RESULTS.md). Among such T, the most tokens per cost."""
        if n == 1:
            return 1 + plan[live[0]]
        c = self.cost_per_token
        plain = 1 + c * (n - 1)

        def moved(i: int, T: int) -> float:
            m = min(plan.get(i, 0), T - 1)
            if m == 0:
                return 1.0
            a = min(jobs[i].spec.current.rate, 1 - 1e-9)
            return (1 - a ** (m + 1)) / (1 - a)

        best, best_value = 1, n / plain
        for T in sorted({k + 1 for k in plan.values()}):
            cost = 1 + c * (n * T - 1)
            if any(moved(i, T) < cost / plain * AdaptiveK.min_gain for i in live):
                continue
            value = sum(moved(i, T) for i in live) / cost
            if value > best_value:
                best, best_value = T, value
        return best

    # -- verifying ------------------------------------------------------------------------------------------

    def _verify(self, loop: Any, rows: Any, n: int, T: int, live: list[int], plan: dict[int, list[int]],
                masks: dict[int, torch.Tensor]) -> None:
        jobs = rows.jobs
        # each decoding row's last token and proposals from its position, the other rows idle (engine/batch.py;
        # T - 1 positions past a decoding row's present are within its room)
        batch = step_batch(rows, n, {r: [jobs[r].progress.token] + plan.get(r, []) for r in live})
        assert batch.tokens.shape[1] == T
        logits = loop.runner.verify(rows, n, batch, self.per_position)
        for r in live:
            job = jobs[r]
            props = plan.get(r, [])
            try:
                self._finish_row(loop, r, job, logits[r, :len(props) + 1], props, masks.get(r))
            except Exception as e:  # noqa: BLE001 - this row's output failed: it alone fails (as in Delivery.step)
                loop.delivery.fail(job, e)

    def _finish_row(self, loop: Any, r: int, job: Any, logits: torch.Tensor, props: list[int],
                    mask: torch.Tensor | None) -> None:
        verdict = verify(logits, loop.knobs, r, props, mask, steps_used([job.req.params]))
        tokens = verdict.tokens
        record(loop.knobs, r, tokens)
        state = job.spec
        if props:
            state.current.observe(len(props), verdict.accepted)
            state.verify_steps += 1
            state.proposed += len(props)
            state.accepted += verdict.accepted
            self.stats.verify_steps += 1
            self.stats.proposed += len(props)
            self.stats.accepted += verdict.accepted
        lps = tops = None
        if job.req.logprobs:
            chosen, (ids, values) = token_logprobs(logits[:len(tokens)], torch.tensor(tokens, device=logits.device),
                                                   job.req.top_logprobs)
            lps, tops = chosen.tolist(), (ids.tolist(), values.tolist())
        for i, t in enumerate(tokens):
            job.progress.pos += 1
            loop.delivery.token(job, t, lps, tops, i)
            if job.finished:  # a stop id, max_tokens, a stop string or a cancel: the rest is dropped
                return
        self._look_ahead(job, self.max_k if props else 0)

