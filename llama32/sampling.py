"""Next-token selection: logit_bias, penalties, the allowed-token mask, temperature, top-k, top-p and the
draw, batched with per-row parameters. One sampler, used by the eager and the compiled decode step alike.

Shapes: B (or n) rows (one request each), V the logits width (the model's vocabulary; tokenizer ids >= V are
treated as absent), K the candidates kept by `torch.topk`. Parameter tensors are (B, 1) so they broadcast
over V. The semantics are those of the API contract (docs/API.md, "Generating"), which follow HF
transformers' RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper and
TopPLogitsWarper; OpenAI's logit_bias and frequency/presence penalties; and gpt-fast's sync-free sampling.

Per step, in this order: logit_bias, penalties, the allowed-token mask (JSON mode), temperature, top_k,
top_p, draw. Every knob is a row of a tensor in `StepKnobs` (neutral where a row leaves a step off), and the
randomness is `counter_noise`: a hash of (request seed, tokens drawn so far, vocabulary id), never the
global RNG. A row's draw depends only on its own logits, knobs and counter, so a request gives the same
tokens alone or in any batch, eager or compiled.

Choices that go beyond the contract's words:
* Ties are kept at the cut of both top_k (as HF does) and top_p (HF keeps whichever tied token its sort puts
  first; keeping all of them makes the kept set independent of sort order, hence of device and batch).
* The draw is the exponential race (see `draw`), not an inverse CDF, so it needs no sort and no cumulative sum
  whose rounding depends on the batch's layout.
* top_p looks for the nucleus among the largest 1024 logits, and over the whole row by bisection only when
  the nucleus is bigger than that; the result is the full sort's (`apply_top_p`, tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

_NEG_INF = float("-inf")
_F32_MAX = torch.finfo(torch.float32).max
# Temperatures and repetition penalties are floored here so a divisor can never round to 0 in float32 (0/0
# is NaN). Below 1e-6 a temperature is greedy in all but name: any two logits 1e-4 apart differ by e^100.
_MIN_DIVISOR = 1e-6
# How many of the largest logits top_p looks at before it searches the whole row (see process_static).
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
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id < V, -100..100) pairs added to the logits

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

    @property
    def uses_temperature(self) -> bool:
        return not self.greedy and self.temperature != 1


ALL_STEPS = frozenset({"logit_bias", "repetition", "frequency_presence", "sampling", "temperature", "filter"})


_CHANGE_GREEDY = frozenset({"logit_bias", "repetition", "frequency_presence", "sampling"})  # steps a greedy row sees


def steps_used(params: Sequence[SamplingParams]) -> frozenset[str]:
    """The sampler steps some row of `params` uses (see `process_static`'s `steps`). The eager decode step
    passes it to skip, from Python, what no row uses: a step left off by every row is neutral for all of
    them, bit for bit, so skipping it changes no token."""
    used = set()
    for p in params:
        used.update(name for name, on in (
            ("logit_bias", bool(p.logit_bias)), ("repetition", p.uses_repetition),
            ("frequency_presence", p.uses_frequency_presence), ("sampling", not p.greedy),
            ("temperature", p.uses_temperature), ("filter", p.uses_top_k or p.uses_top_p)) if on)
    return frozenset(used)


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
# The sampler over per-row tensor knobs.
#
# Every step can always run, with neutral values for rows that leave it off (logit_bias 0, temperature 1,
# top_k 0, top_p 1, penalties 1 and 0, mask all True: each leaves a logit bit for bit as it was), so shapes
# never depend on a setting, nothing reads a tensor back to the host (the compiled step's form), and the
# noise is a hash of (seed, step, token id) computed by a fixed number of tensor ops for all rows at once.
# The eager step passes `steps_used(...)` to skip the steps no row uses; results are the same.

class StepKnobs:
    """Per-row sampler settings and history as (rows, ...) tensors, neutral where a row leaves a step off.

    The generation loop keeps one per batch of rows, and writes a request's row when it is admitted
    (`set_row`); a step samples rows [0, n) with `sample_static(logits, knobs)`, logits (n, V).

    `allowed` (rows, V) bool is the allowed-token mask's buffer (JSON mode): all True unless a constrained
    row's matcher wrote its row before the step; a step passes `allowed[:n]` to the sampler only when some
    row is constrained.
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
        self.logit_bias = torch.zeros(rows, vocab_size, device=dev)  # the request's logit_bias, dense
        self.allowed = torch.ones(rows, vocab_size, dtype=torch.bool, device=dev)  # the allowed-token mask

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
        self.logit_bias[row] = 0
        self.allowed[row] = True
        if p.logit_bias:
            ids, values = zip(*p.logit_bias)
            self.logit_bias[row, torch.tensor(ids, dtype=torch.long, device=self.seen.device)] = torch.tensor(
                values, dtype=torch.float32, device=self.seen.device)
        if p.uses_repetition:
            ids = [i for i in prompt_ids if 0 <= i < V]
            self.seen[row, torch.tensor(ids, dtype=torch.long, device=self.seen.device)] = True

    def restore_row(self, row: int, p: SamplingParams, seed: int, prompt_ids: Sequence[int],
                    generated: Sequence[int]) -> None:
        """Row `row` for a request resumed after a pause: as `set_row`, then its `generated` tokens recorded
        (history, counts, penalty bias, counter) as the steps that drew them recorded them."""
        self.set_row(row, p, seed, prompt_ids)
        if not generated:
            return
        ids = torch.tensor(list(generated), dtype=torch.long, device=self.seen.device)
        counts = torch.bincount(ids, minlength=self.vocab_size).to(self.counts.dtype)
        self.seen[row, ids] = True
        self.counts[row] = counts
        # the same elementwise arithmetic as _record, for every id drawn at least once
        self.bias[row] = torch.where(counts > 0, counts * self.frequency[row, 0] + self.presence[row, 0],
                                     torch.zeros_like(counts))
        self.counters[row] = len(generated)

    def move(self, moves: Sequence[tuple[int, int]]) -> None:
        """Row `dst` takes row `src`'s settings and history, for each (dst, src) in order (the rows' cache
        packing its live rows into its lowest slots: engine/memory.py, `Rows.resize`)."""
        for dst, src in moves:
            for t in self.tensors().values():
                t[dst] = t[src]

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


def _record(rows: Tensor, tokens: Tensor, seen: Tensor, counts: Tensor, bias: Tensor, frequency: Tensor,
            presence: Tensor) -> None:
    """Mark `tokens[i]` seen in row `rows[i]` of `seen`, count it in `counts` and refresh `bias`;
    `frequency` and `presence` are (len(rows), 1)."""
    seen[rows, tokens] = True
    c = counts[rows, tokens] + 1
    counts[rows, tokens] = c
    # Same elementwise arithmetic as frequency_presence_bias, so the cached bias equals the formula.
    bias[rows, tokens] = c * frequency[:, 0] + presence[:, 0]


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


def process_static(logits: Tensor, knobs: StepKnobs, allowed: Tensor | None = None,
                   steps: frozenset[str] | None = None) -> tuple[Tensor, Tensor]:
    """(filtered logits (n, V), greedy tokens (n,)) for logits (n, V), rows [0, n) of `knobs`.

    `allowed`: the allowed-token mask, (n, V) bool or None (no row constrained: costs nothing). Tokens it
    leaves out become -inf after the penalties and before temperature, for greedy and sampling rows alike.
    `steps`: which steps to run (`steps_used`: the eager step, which may also read a tensor on the host to
    skip work); None runs them all with no host sync (the compiled step). A greedy row's token is the
    argmax of its biased, penalised, masked logits; its filtered logits are those (neutral knobs), and a
    sampling row's are the full-sort reference's (`apply_top_p`), ties kept at both cuts.
    """
    n, V = logits.shape[0], knobs.vocab_size
    compiled = steps is None
    steps = ALL_STEPS if compiled else steps
    x = logits.float()
    if "logit_bias" in steps:
        x = x + knobs.logit_bias[:n]
    if "repetition" in steps:
        x = apply_repetition_penalty(x, knobs.seen[:n], knobs.repetition[:n])
    if "frequency_presence" in steps:
        x = x - knobs.bias[:n]
    if allowed is not None:
        x = x.masked_fill(~allowed, _NEG_INF)
    greedy_tokens = first_max(x)
    if "sampling" not in steps:
        return x, greedy_tokens
    if "temperature" in steps:
        x = apply_temperature(x, knobs.temperature[:n])
    if "filter" not in steps:
        return x, greedy_tokens
    K = min(_NUCLEUS_CANDIDATES, V)
    cand = torch.topk(x, K, dim=-1).values
    k_cut = _kth_largest(cand, knobs.top_k[:n])
    x = x.masked_fill(x < k_cut, _NEG_INF)
    cand = cand.masked_fill(cand < k_cut, _NEG_INF)
    top_p = knobs.top_p[:n]
    total = torch.exp(x - cand[:, :1]).sum(-1, keepdim=True, dtype=torch.float64)
    cutoff, n_kept = _nucleus(cand, top_p, total)
    if K < V:  # a nucleus bigger than the candidates: found over the whole row
        overflow = (n_kept == K) & (top_p < 1)
        # The compiled step always computes it; the eager one asks the host first.
        if compiled or bool(overflow.any()):
            cutoff = torch.where(overflow, _nucleus_by_bisection(x, top_p, total), cutoff)
    return x.masked_fill(x < cutoff, _NEG_INF), greedy_tokens


def first_max(x: Tensor) -> Tensor:
    """The greedy token of each row of x (..., V): long (...), `argmax`'s index, the first among ties, NaN above
    all. Every greedy choice takes it: a decode step's, a draft's proposal, a scored text's is-greedy flags.

    `max(-1).indices` gives the same index (ties, NaN, -inf: tests/test_sampling.py) and is what PyTorch's CPU
    kernels do fastest: on 32 rows of a 128,256-token vocabulary on an AMX Xeon (2 threads), 1.6 ms in
    bfloat16 and 1.2 in float32, against `argmax`'s 7.4 and 3.0."""
    return x.max(-1).indices


def sample_static(logits: Tensor, knobs: StepKnobs, allowed: Tensor | None = None,
                  steps: frozenset[str] | None = None) -> Tensor:
    """(n,) long: the next token of rows [0, n) of `knobs` from logits (n, V): `process_static` (with the
    allowed-token mask `allowed` and the `steps` to run), then the exponential race with `counter_noise`.
    Call `knobs.update(tokens)` after."""
    n = logits.shape[0]
    if steps is not None and allowed is None and not steps & _CHANGE_GREEDY:
        # Greedy rows with nothing to apply: the argmax of the logits as they are. Widened to float32 first
        # (exactly) the argmax is the same index, first among ties either way; the copy it skips (32 rows of
        # a 128,256-token vocabulary: a fresh 16 MB) took 14 ms a step on an AMX Xeon VM, its pages faulted in.
        return first_max(logits)
    x, greedy_tokens = process_static(logits, knobs, allowed, steps)
    if steps is not None and "sampling" not in steps:
        return greedy_tokens
    tokens = draw(x, counter_noise(knobs.seeds[:n], knobs.counters[:n], knobs.vocab_size))
    return torch.where(knobs.greedy[:n], greedy_tokens, tokens)
