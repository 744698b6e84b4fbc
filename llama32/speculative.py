"""Speculative decoding's building blocks: proposers, the exact verification rule, adaptive proposal counts.

The generation loop calls these from engine/speculate.py when a handle is loaded with `speculative=`
("ngram" or a draft checkpoint); that module turns them into loop steps (per-row proposals, one verify forward,
delivery token by token).

Shapes: V the logits width (the target's vocabulary), k a row's number of proposals, so a verify forward
gives (k + 1, V) logits for the row: position i scores the token that follows the request's tokens plus the
first i proposals.

Speculation must change speed only, never output. That holds because the sampler (sampling.py) is a pure
function of a row's logits, its knobs and history, and `counter_noise` of (seed, token index, vocabulary id):
the token the target would have drawn at each of the k + 1 positions is computable in one verify step, with
the history (penalties) as it would have been had the earlier proposals been drawn and the noise of that
position's token index. A proposal is accepted exactly when it equals that token, so the tokens delivered
are those of sequential decoding, token for token (greedy and seeded alike), provided the verify forward's
logits at each position equal those a one-position decode step would give; the first mismatch delivers the
target's own token, and a fully accepted run also delivers the target's token after the last proposal.
(In float32 they agree to rounding, as a bigger batch's do; in bfloat16 one fused attention call over k + 1
positions rounds differently from one-position steps and near ties flip, so the loop's verify forward attends
one position at a time: engine/speculate.py, benchmarks/RESULTS.md.) This
is not the rejection-sampling rule of Leviathan et al. (2023) / Chen et al. (2023), which keeps the output
*distribution* but not a seed's *tokens*; with a draw that is deterministic given the noise, plain equality is
both exact and (for a greedy draft) the best acceptance available.

Proposers:
* `NgramProposer`: prompt-lookup decoding (Saxena 2023; transformers' `prompt_lookup_num_tokens`, vLLM's
  n-gram proposer): the longest recent n-gram of the request's tokens (prompt and output) that also occurs
  earlier, and the tokens that followed it there.
* `DraftProposer`: a smaller model with the same tokenizer, greedy from its own KV cache, kept in step with
  the target's accepted tokens (positions after the last accepted token are simply overwritten later).

`AdaptiveK` picks each row's number of proposals from its recent acceptance and a cost model of the verify
step, and turns speculation off for a row where it does not pay (probing again now and then).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .model import KVCache
from .sampling import StepKnobs, sample_static

# ---------------------------------------------------------------------------------------------------------
# Proposers


class NgramProposer:
    """Prompt lookup for one request: propose what followed the most recent earlier occurrence of the
    longest suffix n-gram (max_n down to min_n tokens) of the request's tokens.

    An index from each n-gram to where it last ended is built once over the prompt and extended as tokens
    arrive, so a proposal costs O(max_n) dictionary look-ups, not a scan of the text. `ids` must only grow
    between calls (rejected proposals never enter it); a shorter or different history rebuilds the index.
    """

    def __init__(self, max_n: int = 4, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"NgramProposer: need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        self._ids: list[int] = []
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]  # n -> gram -> end
        self.matched = 0  # the length of the n-gram the last proposal matched (0: none)

    def _sync(self, ids: Sequence[int]) -> None:
        """Index every n-gram that ends before the last token of `ids` (the one ending at the last token is
        the query). The check that `ids` extends what was seen looks at its length and the last token seen."""
        known = len(self._ids)
        if len(ids) < known or (known and ids[known - 1] != self._ids[-1]):
            self._ids, known = [], 0
            self._index = [{} for _ in range(self.max_n + 1)]
        self._ids.extend(int(t) for t in ids[known:])
        for end in range(max(known, 1), len(self._ids)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._index[n][tuple(self._ids[end - n:end])] = end

    def propose(self, ids: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens to follow `ids` (the request's prompt and output so far); [] when no match."""
        self._sync(ids)
        self.matched = 0
        L = len(self._ids)
        if k <= 0 or L < self.min_n + 1:
            return []
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            end = self._index[n].get(tuple(self._ids[L - n:]))
            if end is not None:
                self.matched = n
                return self._ids[end:min(end + k, L)]
        return []


class DraftProposer:
    """Greedy proposals from a draft model (a `model.Transformer` sharing the target's tokenizer) for one
    request, from the draft's own KV cache.

    The cache remembers which tokens it holds; each call feeds only the part of `ids` past the longest
    prefix it already holds (the target's accepted tokens and its own token at a mismatch), so proposals
    the target rejected are dropped by forgetting their positions. Proposals stop before any id outside
    `vocab_size` (the target's logits width), which the target could never draw.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None, *, chunk: int = 256):
        self.model = model
        self.vocab_size = vocab_size if vocab_size is not None else model.config.vocab_size
        self.chunk = chunk  # the cache grows by whole multiples of this many positions
        p = next(model.parameters())
        self.device, self.dtype = p.device, model.model.norm.weight.dtype
        self.cache: KVCache | None = None
        self.held: list[int] = []  # the tokens whose keys and values the cache holds, positions 0..

    def _room(self, length: int) -> None:
        if self.cache is not None and self.cache.length >= length:
            return
        size = -(-length // self.chunk) * self.chunk
        new = KVCache(self.model.config, 1, size, device=self.device, dtype=self.dtype)
        if self.cache is not None:
            n = len(self.held)
            for old, fresh in zip(self.cache.k + self.cache.v, new.k + new.v):
                fresh[:, :, :n] = old[:, :, :n]
        self.cache = new

    def _feed(self, tokens: list[int], start: int) -> Tensor:
        """Forward `tokens` at positions start.. through the cache; the logits (V,) after the last one."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(tokens), device=self.device)[None]
        last = torch.tensor([len(tokens) - 1], device=self.device)
        return self.model(ids, cache=self.cache, input_pos=pos, logits_at=last)[0, -1]

    @torch.inference_mode()
    def propose(self, ids: Sequence[int], k: int, draw=None) -> list[int]:
        """Up to `k` tokens to follow `ids` (the request's prompt and output so far): greedy, or chosen by
        `draw(logits, i)` -> token id for the i-th proposal from the draft's (V_draft,) logits (the loop passes
        the request's own sampler: its settings, history and counter noise, `RowSampler`)."""
        ids = list(ids)
        if k <= 0 or not ids:
            return []
        keep = 0
        for a, b in zip(self.held, ids[:-1]):  # always re-feed the last token: its logits are needed
            if a != b:
                break
            keep += 1
        self._room(len(ids) + k)
        logits = self._feed(ids[keep:], keep)
        self.held = ids
        out: list[int] = []
        for i in range(k):
            t = int(logits.argmax()) if draw is None else int(draw(logits, i))
            if t >= self.vocab_size:
                break
            out.append(t)
            if len(out) == k:
                break
            logits = self._feed([t], len(self.held))
            self.held = self.held + [t]
        return out


# ---------------------------------------------------------------------------------------------------------
# Verification


@dataclass
class Verdict:
    """One row's verify result: `tokens` to deliver (the accepted proposals, then the target's own token),
    and `accepted`, how many proposals were taken (len(tokens) - 1)."""

    tokens: list[int]
    accepted: int


def _expanded(knobs: StepKnobs, row: int, proposals: Tensor, with_history: bool) -> StepKnobs:
    """A k+1-row `StepKnobs` for position i = 0..k of `row`: its settings, its counter + i, and (when
    `with_history`) its history with proposals[:i] recorded, as sequential decoding would have it.

    Settings are stride-0 views of the row (read only); the history tensors are copied only when some
    penalty of the row reads them (with neutral penalties a history changes no logit, bit for bit).
    """
    k1 = proposals.shape[0] + 1
    history = {"seen", "counts", "bias", "counters"}
    out = StepKnobs.__new__(StepKnobs)
    out.vocab_size = knobs.vocab_size
    for name, t in knobs.tensors().items():
        one = t[row:row + 1]
        if name in history and (with_history or name == "counters"):
            setattr(out, name, one.repeat(k1, *([1] * (t.dim() - 1))))
        else:
            setattr(out, name, one.expand(k1, *t.shape[1:]))
    if with_history:
        # Position i has seen proposals 0..i-1: record proposal j into positions j+1..k (StepKnobs.update
        # over a view, the loop's own bookkeeping; it also advances those positions' counters).
        for j in range(k1 - 1):
            out.view(j + 1, k1).update(proposals[j].expand(k1 - 1 - j))
    else:
        out.counters += torch.arange(k1, device=out.counters.device)
    return out


def _row_reads_history(knobs: StepKnobs, row: int) -> bool:
    return bool((knobs.repetition[row] != 1).any() | (knobs.frequency[row] != 0).any()
                | (knobs.presence[row] != 0).any())


def target_tokens(logits: Tensor, knobs: StepKnobs, row: int, proposals: Sequence[int] | Tensor,
                  allowed: Tensor | None = None, steps: frozenset[str] | None = None) -> Tensor:
    """(k+1,) long: the token sequential decoding would draw at each verify position of `row`.

    `logits` (k+1, V): the target's logits at the row's last token and after each of its k `proposals`.
    Position i uses the row's knobs with the history it would have after drawing proposals[:i] and the
    noise of token index counters[row] + i. `allowed` (k+1, V) bool: the allowed-token mask at each
    position (the JSON matcher advanced through the proposals), or None. `steps`: the sampler steps to run
    (`sampling.steps_used` of the row's settings: the eager loop's choice, bit for bit the same tokens); None
    runs them all, as the compiled step does.
    """
    device = logits.device
    props = torch.as_tensor(list(proposals) if not isinstance(proposals, Tensor) else proposals,
                            dtype=torch.long, device=device).reshape(-1)
    assert logits.shape == (props.shape[0] + 1, knobs.vocab_size), (logits.shape, props.shape)
    view = _expanded(knobs, row, props, _row_reads_history(knobs, row))
    return sample_static(logits, view, allowed, steps)


def verify(logits: Tensor, knobs: StepKnobs, row: int, proposals: Sequence[int],
           allowed: Tensor | None = None, steps: frozenset[str] | None = None) -> Verdict:
    """Accept `proposals` while each equals the target's own token at its position (`target_tokens`), and
    deliver the accepted ones plus the target's token at the first mismatch (or after the last proposal).

    The result is what sequential decoding of the row would deliver next, token for token. `knobs` is not
    changed: the caller records the delivered tokens (`record`) once it knows how many it keeps (a stop
    token or max_tokens may end the request inside them).
    """
    proposals = [int(p) for p in proposals]
    drawn = target_tokens(logits, knobs, row, proposals, allowed, steps).tolist()
    n = 0
    while n < len(proposals) and proposals[n] == drawn[n]:
        n += 1
    return Verdict(drawn[:n + 1], n)


def verify_rows(logits: Tensor, knobs: StepKnobs, rows: Sequence[int], proposals: Sequence[Sequence[int]],
                allowed: Tensor | None = None) -> list[Verdict]:
    """`verify` for several rows whose positions are packed in `logits` (sum(k_r + 1), V), row by row in
    the order of `rows` (each row its own number of proposals); `allowed` packed the same way, or None."""
    out, start = [], 0
    for row, props in zip(rows, proposals, strict=True):
        stop = start + len(props) + 1
        out.append(verify(logits[start:stop], knobs, row, props, None if allowed is None else allowed[start:stop]))
        start = stop
    assert start == logits.shape[0], (start, logits.shape)
    return out


def record(knobs: StepKnobs, row: int, tokens: Sequence[int]) -> None:
    """Record delivered `tokens` of `row` in its history and counter, as that many sequential steps would."""
    one = knobs.view(row, row + 1)
    for t in tokens:
        one.update(torch.tensor([int(t)], dtype=torch.long, device=knobs.counters.device))


class RowSampler:
    """A draft's draw for one row: the row's own sampler (settings, history, counter noise) applied to the
    draft's logits, proposal i at token index counters[row] + i with proposals[:i] in its history.

    A greedy row proposes the argmax of its penalised draft logits; a seeded row proposes what the target
    would draw if its logits were the draft's. With the same noise, a draft close to the target proposes
    the target's own draws far more often than its argmax would (speculative decoding's "coupling").
    `draw(logits, i)` must be called for i = 0, 1, ... in order. Draft logits are cut or padded (with -inf)
    to the target's width V.
    """

    def __init__(self, knobs: StepKnobs, row: int, steps: frozenset[str] | None = None):
        self.knobs = _row_copy(knobs, row)
        self.steps, self.vocab_size = steps, knobs.vocab_size

    def __call__(self, logits: Tensor, i: int) -> int:
        V = self.vocab_size
        x = logits.float()[:V]
        if x.shape[0] < V:
            x = torch.nn.functional.pad(x, (0, V - x.shape[0]), value=float("-inf"))
        t = sample_static(x[None], self.knobs, None, self.steps)
        self.knobs.update(t)
        return int(t[0])


def _row_copy(knobs: StepKnobs, row: int) -> StepKnobs:
    """A one-row StepKnobs of `row`: settings as views, history and counter copied (`update` writes those)."""
    out = StepKnobs.__new__(StepKnobs)
    out.vocab_size = knobs.vocab_size
    for name, t in knobs.tensors().items():
        one = t[row:row + 1]
        setattr(out, name, one.clone() if name in ("counters", "seen", "counts", "bias") else one)
    return out


# ---------------------------------------------------------------------------------------------------------
# Adaptive number of proposals


@dataclass
class AdaptiveK:
    """One row's number of proposals, from its recent acceptance and the verify step's cost.

    Model: each proposal is accepted with probability `rate` (until the first rejection), so k proposals
    deliver E(k) = (1 - rate^(k+1)) / (1 - rate) tokens for a verify step costing
    (1 + cost_fixed + cost_per_token * k) plain steps (measured on this CPU, benchmarks/RESULTS.md: bfloat16 about
    0 + 0.1 k on the 1B shape; float32 about 0.2-0.35 + 0.11 k, a one-row float32 product having a kernel of its
    own that several rows leave; the loop's defaults: engine/speculate.py). `next_k` picks the k in 0..max_k with
    the best E(k) / cost; when even that is below `min_gain` the row stops speculating, and after `probe_after`
    plain steps it tries once more (doubling the wait each time the probe fails, up to `max_wait`), so an
    open-ended answer pays for one probe in many steps.

    `rate` is an exponential moving average over proposal trials: a verify with k proposals of which n were
    accepted is n successes in n + (n < k) trials.
    """

    max_k: int = 8
    cost_per_token: float = 0.1
    cost_fixed: float = 0.0  # what any verify step costs beyond a plain one before its proposals' share
    min_gain: float = 1.05
    rate: float = 0.6  # the prior: an optimistic start, quickly corrected
    decay: float = 0.7  # weight of the past in the moving average
    probe_after: int = 16
    max_wait: int = 256
    _off_for: int = field(default=0, repr=False)  # plain steps left before the next probe
    _wait: int = field(default=0, repr=False)

    def gain(self, k: int) -> float:
        """Expected tokens per plain-step cost for k proposals."""
        a = min(self.rate, 1 - 1e-9)
        return (1 - a ** (k + 1)) / (1 - a) / (1 + (self.cost_fixed if k else 0.0) + self.cost_per_token * k)

    def best_k(self) -> int:
        return max(range(self.max_k + 1), key=lambda k: (self.gain(k), -k))

    def next_k(self) -> int:
        """Proposals to ask for in this step (0: a plain step)."""
        if self._off_for > 0:
            self._off_for -= 1
            return 0 if self._off_for > 0 else min(2, self.max_k)  # the probe
        k = self.best_k()
        if self.gain(k) < self.min_gain:
            self._wait = min(max(self._wait * 2, self.probe_after), self.max_wait)
            self._off_for = self._wait
            return 0
        return k

    def observe(self, proposed: int, accepted: int) -> None:
        """Fold in one verify: `accepted` of `proposed` proposals taken (proposed 0: nothing learned)."""
        if proposed <= 0:
            return
        trials = accepted + (accepted < proposed)
        self.rate = self.decay * self.rate + (1 - self.decay) * accepted / trials
        if accepted > 0 and self.gain(self.best_k()) >= self.min_gain:
            self._wait = 0  # it pays again: the next time it stops, wait from the start
