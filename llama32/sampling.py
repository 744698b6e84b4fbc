"""Next-token selection: penalties, temperature, top-k, top-p and the draw, batched with per-row parameters.

Shapes: B rows (one request each), V the logits width (the model's vocabulary; tokenizer ids >= V are
treated as absent), K the candidates kept by `torch.topk`. Parameter tensors are (B, 1) so they broadcast
over V. The semantics are those of the API contract (docs/API.md, "Generating"), which follow HF
transformers' RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper and
TopPLogitsWarper; OpenAI's frequency/presence penalties; and gpt-fast's sync-free sampling.

Per step, in this order: penalties, temperature, top_k, top_p, draw. Every function is a pure tensor
function on the logits' device; randomness comes only from each request's own `torch.Generator`, never the
global RNG, and a row's draw depends only on its own logits, parameters and generator, so a request gives
the same tokens alone or in any batch.

Two choices that go beyond the contract's words:
* Ties are kept at the cut of both top_k (as HF does) and top_p (HF keeps whichever tied token its sort puts
  first; keeping all of them makes the kept set independent of sort order, hence of device and batch).
* The draw is the exponential race (see `draw`), not an inverse CDF, so it needs no sort and no cumulative sum
  whose rounding depends on the batch's layout.
* top_p looks for the nucleus among the largest logits (the top-k candidates, else the top 1024) and sorts a
  whole row only when the nucleus is bigger than that; the result is the full sort's (tested against it).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

_NEG_INF = float("-inf")
_F32_MAX = torch.finfo(torch.float32).max
# Temperatures and repetition penalties are floored here so a divisor can never round to 0 in float32 (0/0
# is NaN). Below 1e-6 a temperature is greedy in all but name: any two logits 1e-4 apart differ by e^100.
_MIN_DIVISOR = 1e-6
# How many of the largest logits top_p looks at before it sorts the whole row (see _warp).
_NUCLEUS_CANDIDATES = 1024


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling knobs, already range-checked by `requests.py` (None means unset)."""

    temperature: float = 0.6  # 0..5; 0 is greedy
    top_p: float | None = None  # 0..2; >= 1 is off
    top_k: int | None = None  # 1..50
    repetition_penalty: float | None = None  # 0..2; 0 and 1 are off
    frequency_penalty: float | None = None  # 0..2
    presence_penalty: float | None = None  # 0..2

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_top_k(self) -> bool:
        return not self.greedy and self.top_k is not None

    @property
    def uses_top_p(self) -> bool:
        return not self.greedy and self.top_p is not None and self.top_p < 1

    @property
    def uses_repetition(self) -> bool:
        return self.repetition_penalty not in (None, 0, 1)

    @property
    def uses_frequency_presence(self) -> bool:
        return bool(self.frequency_penalty) or bool(self.presence_penalty)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator for one request on `device`: seeded from `seed`, or from the OS's randomness when None."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else secrets.randbits(63))
    return g


# ---------------------------------------------------------------------------------------------------------
# The steps, as pure functions over (B, V) float32 logits.


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """HF's repetition penalty on the ids in `seen` (B, V) bool: positive logits / p, the others * p.

    `seen` is a set, so an id counts once however often it occurred. A row with p = 1 is unchanged.
    """
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty).clamp_max_(_F32_MAX)
    return torch.where(seen, scaled, logits)


def frequency_presence_bias(counts: Tensor, frequency: Tensor, presence: Tensor) -> Tensor:
    """What `apply_frequency_presence` subtracts: count * f + (count > 0) * p, per id."""
    return counts * frequency + (counts > 0) * presence


def apply_frequency_presence(logits: Tensor, counts: Tensor, frequency: Tensor, presence: Tensor) -> Tensor:
    """OpenAI-style penalties from `counts` (B, V), how often each id was generated (the prompt not counted)."""
    return logits - frequency_presence_bias(counts, frequency, presence)


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """logits / T for T > 0 (greedy rows carry T = 1 here); an overflow saturates instead of becoming inf."""
    return (logits / temperature).clamp_max_(_F32_MAX)


def _kth_largest(sorted_logits: Tensor, top_k: Tensor) -> Tensor:
    """(B, 1) the k-th of each row's logits sorted largest first (K >= k columns), -inf where k is 0 (off)."""
    kth = sorted_logits.gather(-1, top_k.clamp(1, sorted_logits.shape[-1]) - 1)
    return torch.where(top_k > 0, kth, _NEG_INF)


def apply_top_k(logits: Tensor, top_k: Tensor, max_k: int | None = None) -> Tensor:
    """Keep each row's k largest logits, and every logit tied with the k-th (HF's rule); k = 0 is off.

    `top_k` is (B, 1) long; `max_k` is its maximum, passed by callers that know it to spare a host sync.
    """
    if max_k is None:
        max_k = int(top_k.max())
    cut = _kth_largest(torch.topk(logits, min(max(max_k, 1), logits.shape[-1]), dim=-1).values, top_k)
    return logits.masked_fill(logits < cut, _NEG_INF)


def _nucleus(sorted_logits: Tensor, top_p: Tensor, total: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(cutoff, n_kept), each (B, 1): the smallest logit nucleus filtering keeps, and how many of the columns.

    `sorted_logits` holds each row's largest logits, largest first: all of them, or the top K with `total`
    (B, 1) the whole row's sum of exp(logit - row max). A token is kept when the probability ranked above it
    is below p: that keeps the smallest set whose probability reaches p (HF's rule, written from the top),
    and always the top token, so p = 0 keeps exactly it. Mass is summed in float64, so rounding could only
    move a cut that sits within ~1e-16 of p. Rows with p >= 1 get cutoff -inf (keep all).
    """
    e = torch.exp(sorted_logits - sorted_logits[:, :1]).double()  # unnormalised probabilities
    cum = e.cumsum(-1)
    if total is None:
        total = cum[:, -1:]
    above = torch.nn.functional.pad(cum[:, :-1], (1, 0))  # mass ranked strictly above each token
    n_kept = (above < top_p * total).sum(-1, keepdim=True).clamp_min_(1)
    cutoff = sorted_logits.gather(-1, n_kept - 1)
    return torch.where(top_p < 1, cutoff, _NEG_INF), n_kept


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Nucleus filtering with one full sort per row (the reference for `sample`'s faster path).

    `top_p` is (B, 1); logits tied with the last one kept are kept too.
    """
    cutoff, _ = _nucleus(torch.sort(logits, dim=-1, descending=True).values, top_p.double())
    return logits.masked_fill(logits < cutoff, _NEG_INF)


def exponential_noise(generators: Sequence[torch.Generator | None], width: int, device: torch.device) -> Tensor:
    """(B, width) independent Exp(1) noise, row b from `generators[b]` only; rows without one (greedy) are 1.

    Each sampling row always consumes `width` uniforms per step, whatever the batch around it. -log(u) of a
    uniform is used rather than `exponential_` (about 6x slower on CPU): u in [0, 1) makes the noise (0, inf],
    and the floor keeps it > 0 should u ever round to 1, so `draw` never divides by zero.
    """
    noise = torch.empty(len(generators), width, device=device)
    for b, g in enumerate(generators):
        if g is None:
            noise[b].fill_(1.0)
        else:
            noise[b].uniform_(generator=g).log_().neg_().clamp_min_(torch.finfo(torch.float32).tiny)
    return noise


def draw(logits: Tensor, noise: Tensor) -> Tensor:
    """(B,) long: one token per row, distributed as softmax(logits), given `noise` of Exp(1) draws.

    The exponential race: argmax_j p_j / E_j picks j with probability p_j (equivalently the Gumbel-max trick),
    with p unnormalised because the argmax ignores scale. Each token's score depends only on its own logit,
    the row's maximum and its own noise value, so filtering that changes nothing for a token changes nothing
    for the draw; -inf logits score 0 and are never drawn.
    """
    probs = torch.exp(logits - logits.amax(-1, keepdim=True))
    return (probs / noise).argmax(-1)


# ---------------------------------------------------------------------------------------------------------
# Running state for a batch, and the per-step entry point.


class SamplerState:
    """The per-row parameters and token history of a batch, as device tensors.

    Which steps run is decided here, once, from the Python-side parameters rather than from tensors: a step
    that every row leaves off costs nothing, and a step holds no host sync (but see top_p in `_warp`).
    Rebuilt by `select` when rows leave, so a batch stops paying for the knobs of requests that finished.
    """

    def __init__(
        self,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
        generators: Sequence[torch.Generator | None],
    ):
        """`generators[b]` is row b's generator; it may be None for greedy rows, which draw nothing."""
        self._setup(params, vocab_size, torch.device(device), generators)
        B, V, dev = len(self.params), vocab_size, self.device
        assert len(prompt_ids) == B
        self.counts: Tensor | None = None  # (B, V) float32: generated ids only
        self.bias: Tensor | None = None  # (B, V): frequency_presence_bias(counts, ...), kept up to date
        if self.uses_frequency_presence:
            self.counts = torch.zeros(B, V, device=dev)
            self.bias = torch.zeros(B, V, device=dev)
        self.seen: Tensor | None = None  # (B, V) bool: prompt and generated ids
        if self.uses_repetition:
            rows = [b for b, ids in enumerate(prompt_ids) for i in ids if 0 <= i < V]
            cols = [i for ids in prompt_ids for i in ids if 0 <= i < V]
            self.seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
            self.seen[torch.tensor(rows, device=dev, dtype=torch.long),
                      torch.tensor(cols, device=dev, dtype=torch.long)] = True

    @classmethod
    def over(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None], vocab_size: int,
             device: torch.device | str, *, seen: Tensor, counts: Tensor, bias: Tensor) -> SamplerState:
        """A state whose history lives in the caller's (B, V) tensors (the generation loop's slot rows):
        `update` writes into them in place. `seen` must hold each repetition-penalised row's prompt ids."""
        new = cls.__new__(cls)
        new._setup(params, vocab_size, torch.device(device), generators)
        new.seen = seen if new.uses_repetition else None
        new.counts, new.bias = (counts, bias) if new.uses_frequency_presence else (None, None)
        return new

    def _setup(self, params, vocab_size, device, generators) -> None:
        self.params = tuple(params)
        # Greedy rows never touch a generator, even when given one.
        self.generators = tuple(None if p.greedy else g for p, g in zip(self.params, generators, strict=True))
        self.vocab_size, self.device = vocab_size, device
        ps, dev = self.params, device
        assert len(ps) == len(self.generators) >= 1
        assert all(g is not None for p, g in zip(ps, self.generators) if not p.greedy), "sampling rows need one"
        self._arange = torch.arange(len(ps), device=dev)

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=dev)[:, None]

        self.all_greedy = all(p.greedy for p in ps)
        self.any_greedy = any(p.greedy for p in ps)
        self.greedy_mask = column([p.greedy for p in ps], torch.bool)[:, 0] if self.any_greedy else None
        # Greedy rows get neutral values for temperature, top_k and top_p: their token is the argmax anyway.
        self.temperature = None
        if any(not p.greedy and p.temperature != 1 for p in ps):
            self.temperature = column([1.0 if p.greedy else max(p.temperature, _MIN_DIVISOR) for p in ps])
        self.uses_repetition = any(p.uses_repetition for p in ps)
        self.repetition = None
        if self.uses_repetition:
            self.repetition = column([max(p.repetition_penalty, _MIN_DIVISOR) if p.uses_repetition else 1.0
                                      for p in ps])
        self.uses_frequency_presence = any(p.uses_frequency_presence for p in ps)
        self.frequency = column([p.frequency_penalty or 0.0 for p in ps])
        self.presence = column([p.presence_penalty or 0.0 for p in ps])
        self.top_k = self.max_k = None
        if any(p.uses_top_k for p in ps):
            self.top_k = column([p.top_k if p.uses_top_k else 0 for p in ps], torch.long)
            self.max_k = min(max(p.top_k for p in ps if p.uses_top_k), vocab_size)
        self.top_p = self.n_candidates = self.nucleus_may_overflow = self.top_p_without_k = None
        if any(p.uses_top_p for p in ps):
            self.top_p = column([p.top_p if p.uses_top_p else 1.0 for p in ps], torch.float64)
            without_k = [p.uses_top_p and not p.uses_top_k for p in ps]
            # Rows with top_k find their nucleus among their k candidates; the others among the largest
            # _NUCLEUS_CANDIDATES, falling back to a sort of the row when the nucleus is bigger than that.
            wanted = _NUCLEUS_CANDIDATES if any(without_k) else self.max_k
            self.n_candidates = min(max(wanted, self.max_k or 0), vocab_size)
            self.nucleus_may_overflow = any(without_k) and self.n_candidates < vocab_size
            self.top_p_without_k = column(without_k, torch.bool)

    def update(self, tokens: Tensor) -> None:
        """Record the tokens (B,) just drawn (ids < V) in the history the penalties read."""
        _record(self._arange, tokens, self.seen, self.counts, self.bias, self.frequency, self.presence)

    def select(self, rows: Tensor | Sequence[int]) -> SamplerState:
        """A state holding only `rows` (in that order), for when finished rows leave the batch."""
        rows = rows.tolist() if isinstance(rows, Tensor) else list(rows)
        new = SamplerState.__new__(SamplerState)
        new._setup([self.params[r] for r in rows], self.vocab_size, self.device,
                   [self.generators[r] for r in rows])
        idx = torch.tensor(rows, device=self.device, dtype=torch.long)
        new.counts = new.bias = new.seen = None
        if new.uses_frequency_presence:
            new.counts, new.bias = self.counts[idx], self.bias[idx]
        if new.uses_repetition:
            new.seen = self.seen[idx]
        return new


def _record(rows: Tensor, tokens: Tensor, seen: Tensor | None, counts: Tensor | None, bias: Tensor | None,
            frequency: Tensor, presence: Tensor) -> None:
    """Mark `tokens[i]` seen in row `rows[i]` of `seen`, count it in `counts` and refresh `bias` (None: not
    kept); `frequency` and `presence` are (len(rows), 1)."""
    if seen is not None:
        seen[rows, tokens] = True
    if counts is not None:
        c = counts[rows, tokens] + 1
        counts[rows, tokens] = c
        # Same elementwise arithmetic as frequency_presence_bias, so the cached bias equals the formula.
        bias[rows, tokens] = c * frequency[:, 0] + presence[:, 0]


def _penalise(logits: Tensor, state: SamplerState) -> Tensor:
    x = logits.float()
    if state.repetition is not None:
        x = apply_repetition_penalty(x, state.seen, state.repetition)
    if state.bias is not None:
        x = x - state.bias
    return x


def _warp(x: Tensor, state: SamplerState) -> Tensor:
    """Temperature, top_k and top_p on penalised logits; removed tokens become -inf."""
    if state.temperature is not None:
        x = apply_temperature(x, state.temperature)
    if state.top_p is None:
        return x if state.top_k is None else apply_top_k(x, state.top_k, state.max_k)
    # Sorting V logits costs ~10 ms per row on a small CPU; the nucleus is nearly always among the top few
    # hundred, so look there first. One topk serves both the top_k cut and the nucleus candidates.
    cand = torch.topk(x, state.n_candidates, dim=-1).values  # (B, K), largest first
    if state.top_k is not None:
        k_cut = _kth_largest(cand, state.top_k)
        x = x.masked_fill(x < k_cut, _NEG_INF)
        cand = cand.masked_fill(cand < k_cut, _NEG_INF)
    # The whole row's mass, which also counts the ties with a top-k cut that topk left out.
    total = torch.exp(x - cand[:, :1]).sum(-1, keepdim=True, dtype=torch.float64)
    cutoff, n_kept = _nucleus(cand, state.top_p, total)
    if state.nucleus_may_overflow:
        # A row without top_k that kept every candidate may need more: sort just those rows. (The one host
        # sync of a step, and only for such batches; free on CPU, where it matters.)
        rows = ((n_kept == cand.shape[-1]) & state.top_p_without_k)[:, 0].nonzero()[:, 0]
        if len(rows):
            full = torch.sort(x.index_select(0, rows), dim=-1, descending=True).values
            cutoff = cutoff.index_copy(0, rows, _nucleus(full, state.top_p.index_select(0, rows))[0])
    return x.masked_fill(x < cutoff, _NEG_INF)


def process_logits(logits: Tensor, state: SamplerState) -> Tensor:
    """(B, V) float32: the logits `sample` draws from, removed tokens at -inf; softmax gives the distribution.

    Greedy rows get the penalties only (their token is the argmax of these).
    """
    x = _penalise(logits, state)
    return x if state.all_greedy else _warp(x, state)


def sample(logits: Tensor, state: SamplerState, noise: Tensor | None = None) -> Tensor:
    """(B,) long: the next token of each row from its logits (B, V); call `state.update` with the result.

    `noise`: this step's `exponential_noise`, when the caller draws it (the compiled decode step takes it as
    an input, since per-request generators stay outside a compiled graph).
    """
    assert logits.shape == (len(state.params), state.vocab_size), (logits.shape, state.vocab_size)
    x = _penalise(logits, state)
    greedy_tokens = x.argmax(-1) if state.any_greedy else None
    if state.all_greedy:
        return greedy_tokens
    if noise is None:
        noise = exponential_noise(state.generators, state.vocab_size, x.device)
    tokens = draw(_warp(x, state), noise)
    if greedy_tokens is not None:
        tokens = torch.where(state.greedy_mask, greedy_tokens, tokens)
    return tokens


# ---------------------------------------------------------------------------------------------------------
# The same sampler with every knob a tensor: the compiled decode step's (see engine.py, "compiling").
#
# `SamplerState` skips, from Python, the steps no row uses, and draws noise from each request's generator:
# right for the eager loop, but each distinct setting would be a new graph for torch.compile, and the
# generators are B launches outside any graph. Here every step always runs, with neutral values for rows that
# leave it off (temperature 1, top_k 0, top_p 1, penalties 1 and 0: each leaves a logit bit for bit as it
# was), shapes never depend on a setting, nothing reads a tensor back to the host, and the noise is a hash of
# (seed, step, token id) computed by a fixed number of tensor ops for all rows at once.

class StepKnobs:
    """Per-row sampler settings and history as (rows, ...) tensors, neutral where a row leaves a step off.

    The generation loop keeps one per KV cache, a row per slot, and writes a request's row when it is
    admitted (`set_row`); a step samples rows [0, n) with `sample_static(logits, knobs)`, logits (n, V).
    """

    def __init__(self, rows: int, vocab_size: int, device: torch.device | str):
        dev = torch.device(device)
        self.vocab_size = vocab_size

        def column(fill, dtype=torch.float32):
            return torch.full((rows, 1), fill, dtype=dtype, device=dev)

        self.greedy = torch.ones(rows, dtype=torch.bool, device=dev)
        self.temperature = column(1.0)
        self.top_k = column(0, torch.long)
        self.top_p = column(1.0, torch.float64)
        self.repetition = column(1.0)
        self.frequency = column(0.0)
        self.presence = column(0.0)
        self.seeds = torch.zeros(rows, dtype=torch.long, device=dev)
        self.counters = torch.zeros(rows, dtype=torch.long, device=dev)  # tokens drawn so far
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=dev)  # prompt and generated ids
        self.counts = torch.zeros(rows, vocab_size, device=dev)  # generated ids
        self.bias = torch.zeros(rows, vocab_size, device=dev)  # frequency_presence_bias(counts, ...)

    def tensors(self) -> dict[str, Tensor]:
        return {name: t for name, t in vars(self).items() if isinstance(t, Tensor)}

    def set_row(self, row: int, p: SamplingParams, seed: int, prompt_ids: Sequence[int]) -> None:
        """Row `row` for a new request (between steps): its settings, a fresh history and counter."""
        V = self.vocab_size
        self.greedy[row] = p.greedy
        self.temperature[row] = 1.0 if p.greedy else max(p.temperature, _MIN_DIVISOR)
        self.top_k[row] = p.top_k if p.uses_top_k else 0
        self.top_p[row] = p.top_p if p.uses_top_p else 1.0
        self.repetition[row] = max(p.repetition_penalty, _MIN_DIVISOR) if p.uses_repetition else 1.0
        self.frequency[row] = p.frequency_penalty or 0.0
        self.presence[row] = p.presence_penalty or 0.0
        self.seeds[row] = seed & ((1 << 63) - 1)
        self.counters[row] = 0
        self.seen[row] = False
        self.counts[row] = 0
        self.bias[row] = 0
        if p.uses_repetition:
            ids = [i for i in prompt_ids if 0 <= i < V]
            self.seen[row, torch.tensor(ids, dtype=torch.long, device=self.seen.device)] = True

    def view(self, start: int, stop: int) -> "StepKnobs":
        """Rows [start, stop), sharing this one's memory."""
        out = StepKnobs.__new__(StepKnobs)
        out.vocab_size = self.vocab_size
        for name, t in self.tensors().items():
            setattr(out, name, t[start:stop])
        return out

    def update(self, tokens: Tensor) -> None:
        """Record the tokens (n,) just drawn by rows [0, n) (inside the compiled step: no host sync)."""
        n = tokens.shape[0]
        _record(torch.arange(n, device=tokens.device), tokens, self.seen, self.counts, self.bias,
                self.frequency[:n], self.presence[:n])
        self.counters[:n] += 1


_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (Wellons' "lowbias32") on int64 tensors holding values < 2**32; products stay
    below 2**63, so int64 arithmetic never overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def counter_noise(seeds: Tensor, counters: Tensor, width: int) -> Tensor:
    """(B, width) Exp(1) noise for draw number `counters[b]` of the request seeded `seeds[b]` (int64, (B,)).

    A counter-based generator: each value is a hash of (seed, counter, column), so a row's noise depends on
    nothing but its own seed and how many tokens it has drawn, whatever the batch, and all rows cost the same
    few elementwise ops (which the compiled step fuses into one kernel). Uniforms have 23 bits, centred in
    their interval (so u is exactly representable and strictly inside (0, 1)): the noise is finite and > 0.
    """
    key = _mix32(_mix32(seeds & _M32) ^ (seeds >> 32))
    key = _mix32((key + counters * 0x9E3779B9) & _M32)  # (B,)
    columns = torch.arange(width, dtype=torch.long, device=seeds.device)
    h = _mix32(_mix32(((key[:, None] + columns) & _M32) ^ 0x5BD1E995))
    u = ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))  # exact in float32: 24 significant bits
    return -torch.log(u)


def _float_key(x: Tensor) -> Tensor:
    """float32 -> int64 with the same order (for bisecting over floats)."""
    b = x.view(torch.int32).long()
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b)


def _key_float(k: Tensor) -> Tensor:
    b = torch.where(k < 0, k ^ 0x7FFFFFFF, k)
    return b.int().view(torch.float32)


_LOWEST_KEY = int(_float_key(torch.tensor([-_F32_MAX]))[0])


def _nucleus_by_bisection(x: Tensor, top_p: Tensor, total: Tensor) -> Tensor:
    """(B, 1) the cutoff of `_nucleus` over whole rows, without a sort and without a host sync.

    The cutoff is the smallest logit v with mass(x > v) < p * total (the mass ranked above its first copy);
    mass(x > t) only falls as t rises, so 32 halvings of the floats, in their integer order, find the smallest
    float t with mass(x > t) < p * total, and the cutoff is the smallest logit >= t. A fixed 32 passes over
    the row, in place of a sort.
    """
    top = x.amax(-1, keepdim=True)
    e = torch.exp(x - top)
    bound = top_p * total
    hi = _float_key(top)  # mass(x > max) = 0 < bound (p > 0)
    lo = torch.full_like(hi, _LOWEST_KEY)  # mass(x > lowest float) = total >= bound (p < 1)
    for _ in range(32):
        mid = (lo + hi) // 2
        above = torch.where(x > _key_float(mid), e, 0.0).sum(-1, keepdim=True, dtype=torch.float64)
        below = above < bound
        hi = torch.where(below, mid, hi)
        lo = torch.where(below, lo, mid)
    t = _key_float(hi)
    return torch.where(x >= t, x, float("inf")).amin(-1, keepdim=True)


def process_static(logits: Tensor, knobs: StepKnobs) -> tuple[Tensor, Tensor]:
    """(filtered logits (n, V), greedy tokens (n,)) for logits (n, V), rows [0, n) of `knobs`, every step
    always applied.

    For a sampling row the filtered logits equal `process_logits`' for the same settings (penalties,
    temperature, top_k, top_p, ties kept at both cuts); a greedy row's token is the argmax of its penalised
    logits, as in `sample`.
    """
    n, V = logits.shape[0], knobs.vocab_size
    x = apply_repetition_penalty(logits.float(), knobs.seen[:n], knobs.repetition[:n])
    x = x - knobs.bias[:n]
    greedy_tokens = x.argmax(-1)
    x = apply_temperature(x, knobs.temperature[:n])
    K = min(_NUCLEUS_CANDIDATES, V)
    cand = torch.topk(x, K, dim=-1).values
    k_cut = _kth_largest(cand, knobs.top_k[:n])
    x = x.masked_fill(x < k_cut, _NEG_INF)
    cand = cand.masked_fill(cand < k_cut, _NEG_INF)
    top_p = knobs.top_p[:n]
    total = torch.exp(x - cand[:, :1]).sum(-1, keepdim=True, dtype=torch.float64)
    cutoff, n_kept = _nucleus(cand, top_p, total)
    if K < V:  # a nucleus bigger than the candidates: found over the whole row (always computed, used if so)
        overflow = (n_kept == K) & (top_p < 1)
        cutoff = torch.where(overflow, _nucleus_by_bisection(x, top_p, total), cutoff)
    return x.masked_fill(x < cutoff, _NEG_INF), greedy_tokens


def sample_static(logits: Tensor, knobs: StepKnobs) -> Tensor:
    """(n,) long: the next token of rows [0, n) of `knobs` from logits (n, V): `process_static`, then the
    exponential race with `counter_noise` in place of a generator's. Call `knobs.update(tokens)` after."""
    n = logits.shape[0]
    x, greedy_tokens = process_static(logits, knobs)
    tokens = draw(x, counter_noise(knobs.seeds[:n], knobs.counters[:n], knobs.vocab_size))
    return torch.where(knobs.greedy[:n], greedy_tokens, tokens)
