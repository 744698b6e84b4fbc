"""Speculation's exactness rule: which proposals a row accepts, and what it delivers (why this is exact:
the package docstring).

Shapes: V the logits width (the target's vocabulary), k a row's number of proposals, so a verify forward
gives (k + 1, V) logits for the row: position i scores the token that follows the request's tokens plus the
first i proposals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ...sampling import StepKnobs, sample_static


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

