"""Speculation's proposers: where a row's proposed tokens come from.

* `NgramProposer`: prompt-lookup decoding (Saxena 2023; transformers' `prompt_lookup_num_tokens`, vLLM's
  n-gram proposer): the longest recent n-gram of the request's tokens (prompt and output) that also occurs
  earlier, and the tokens that followed it there.
* `DraftProposer`: a smaller model with the same tokenizer, greedy from its own KV cache, kept in step with
  the target's accepted tokens (positions after the last accepted token are simply overwritten later).
* `RowSampler`: a draft's draw with the row's own sampler instead of greedy (what `DraftProposer` is given by
  the loop: speculator.py).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ...model import KVCache
from ...sampling import StepKnobs, first_max, sample_static


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
            t = int(first_max(logits)) if draw is None else int(draw(logits, i))
            if t >= self.vocab_size:
                break
            out.append(t)
            if len(out) == k:
                break
            logits = self._feed([t], len(self.held))
            self.held = self.held + [t]
        return out


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
