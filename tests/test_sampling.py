"""The sampler on hand-made logits: each step's formula, the step order, seeds, batch-vs-single, the draw's
distribution, a property test over the contract's ranges, and HF's logits processors as the oracle.

There is one sampler (`process_static` / `sample_static` over `StepKnobs`); every check below runs it both
as the eager step does (skipping, from Python, the steps no row uses) and as the compiled step does (every
step), and asserts the two agree bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama32.sampling import (
    SamplingParams,
    StepKnobs,
    apply_frequency_presence,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    counter_noise,
    draw,
    process_static,
    sample_static,
    steps_used,
)

INF = math.inf
P = SamplingParams


class Rows:
    """Rows of `StepKnobs` for `params`, sampled as the generation loop samples them."""

    def __init__(self, params, prompts, vocab, seeds, mask=None):
        self.params = list(params)
        self.knobs = StepKnobs(len(self.params), vocab, "cpu")
        for b, (p, prompt, seed) in enumerate(zip(self.params, prompts, seeds, strict=True)):
            self.knobs.set_row(b, p, seed, prompt)
        self.mask = mask

    def set_row(self, b, p, seed, prompt=()):
        self.params[b] = p
        self.knobs.set_row(b, p, seed, prompt)

    def update(self, tokens):
        self.knobs.update(tokens)


def state_for(params, prompts=None, vocab=None, generated=(), seeds=None, logits=None, mask=None):
    """Sampler rows for `params` (one SamplingParams or a list), with `generated[b]` already drawn."""
    params = [params] if isinstance(params, SamplingParams) else list(params)
    vocab = vocab if vocab is not None else logits.shape[-1]
    prompts = prompts if prompts is not None else [[] for _ in params]
    seeds = seeds if seeds is not None else list(range(1, len(params) + 1))
    state = Rows(params, prompts, vocab, seeds, mask)
    generated = [list(g) for g in generated] if generated else [[] for _ in params]
    for step in range(max((len(g) for g in generated), default=0)):
        state.update(torch.tensor([g[step] for g in generated]))
    return state


def process_logits(logits, state):
    """(B, V) the logits the sampler draws from (greedy rows: biased, penalised and masked only), checked
    equal, bit for bit, whether the steps no row uses are skipped (eager) or run with neutral knobs (compiled)."""
    skipped, greedy = process_static(logits, state.knobs, state.mask, steps_used(state.params))
    every, greedy_all = process_static(logits, state.knobs, state.mask)
    assert torch.equal(skipped, every) and torch.equal(greedy, greedy_all)
    return every


def sample(logits, state):
    """(B,) the next tokens, checked equal between the eager (steps skipped) and the compiled (all) form."""
    eager = sample_static(logits, state.knobs, state.mask, steps_used(state.params))
    assert torch.equal(eager, sample_static(logits, state.knobs, state.mask))
    return eager


def kept(row: torch.Tensor) -> set[int]:
    """The ids a (V,) or (1, V) row of processed logits keeps."""
    return set(torch.isfinite(row.reshape(-1)).nonzero()[:, 0].tolist())


# ---------------------------------------------------------------------------------------------------------
# Penalties


def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True, True]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([[2.0]]))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, -4.0, 0.0]]
    out = apply_repetition_penalty(logits, seen, torch.tensor([[0.5]]))  # < 1 favours repeats
    assert out.tolist() == [[4.0, -0.5, 0.5, 3.0, -1.0, 0.0]]


def test_repetition_penalty_uses_prompt_and_generated_ids_each_once():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    # Prompt ids repeat (0 three times) and include ids beyond the logits' width (99), which are ignored.
    state = state_for(P(temperature=0, repetition_penalty=2.0), prompts=[[0, 1, 0, 0, 99]], logits=logits)
    assert process_logits(logits, state).tolist() == [[1.0, -2.0, 0.5, 3.0, -2.0]]
    for _ in range(3):  # generating id 3 three times still divides it once
        state.update(torch.tensor([3]))
    assert process_logits(logits, state).tolist() == [[1.0, -2.0, 0.5, 1.5, -2.0]]


@pytest.mark.parametrize("off", [None, 0.0, 1.0])
def test_repetition_penalty_off_values(off):
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    state = state_for(P(temperature=0, repetition_penalty=off), prompts=[[0, 1, 2]], generated=[[0]],
                      logits=logits)
    assert torch.equal(process_logits(logits, state), logits)


def test_frequency_presence_formula():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    out = apply_frequency_presence(logits, counts, torch.tensor([[0.5]]), torch.tensor([[0.25]]))
    assert out.tolist() == [[1.0, 1.0 - 2 * 0.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0]]


def test_frequency_presence_count_generated_ids_only():
    logits = torch.zeros(1, 4)
    params = P(temperature=0, frequency_penalty=0.5, presence_penalty=0.25)
    # id 3 is in the prompt only: no penalty. id 1 generated twice, id 2 once.
    state = state_for(params, prompts=[[3, 3, 0]], generated=[[1, 2, 1]], logits=logits)
    assert process_logits(logits, state).tolist() == [[0.0, -1.25, -0.75, 0.0]]
    # Each penalty alone.
    state = state_for(P(temperature=0, frequency_penalty=2.0), generated=[[1, 2, 1]], logits=logits)
    assert process_logits(logits, state).tolist() == [[0.0, -4.0, -2.0, 0.0]]
    state = state_for(P(temperature=0, presence_penalty=2.0), generated=[[1, 2, 1]], logits=logits)
    assert process_logits(logits, state).tolist() == [[0.0, -2.0, -2.0, 0.0]]


def test_penalties_are_per_row():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    rows = [P(temperature=0, repetition_penalty=2.0), P(temperature=0, frequency_penalty=1.0)]
    state = state_for(rows, prompts=[[0], [0]], generated=[[2], [1]], logits=logits)
    assert process_logits(logits, state).tolist() == [[0.5, 2.0, 1.5], [1.0, 1.0, 3.0]]


# ---------------------------------------------------------------------------------------------------------
# Temperature, top-k, top-p


def test_temperature_divides():
    out = apply_temperature(torch.tensor([[1.0, -2.0], [1.0, -2.0]]), torch.tensor([[0.5], [2.0]]))
    assert out.tolist() == [[2.0, -4.0], [0.5, -1.0]]


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -INF]])
    assert kept(apply_top_k(logits, torch.tensor([[2]]))) == {1, 2, 4}
    assert kept(apply_top_k(logits, torch.tensor([[1]]))) == {1, 2, 4}
    assert kept(apply_top_k(logits, torch.tensor([[4]]))) == {1, 2, 3, 4}
    assert kept(apply_top_k(logits, torch.tensor([[5]]))) == {0, 1, 2, 3, 4}
    assert kept(apply_top_k(logits, torch.tensor([[50]]))) == {0, 1, 2, 3, 4}  # k beyond the width
    assert kept(apply_top_k(logits, torch.tensor([[0]]))) == {0, 1, 2, 3, 4}  # 0 is off
    # Per row, and the kept logits are unchanged.
    two = torch.tensor([[5.0, 4.0, 3.0], [1.0, 2.0, 3.0]])
    assert apply_top_k(two, torch.tensor([[1], [2]])).tolist() == [[5.0, -INF, -INF], [-INF, 2.0, 3.0]]


def test_top_p_sets():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    p = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    assert kept(apply_top_p(logits, p(0.0))) == {0}  # 0 keeps exactly the top token
    assert kept(apply_top_p(logits, p(0.45))) == {0}
    assert kept(apply_top_p(logits, p(0.6))) == {0, 1}
    assert kept(apply_top_p(logits, p(0.9))) == {0, 1, 2}
    assert kept(apply_top_p(logits, p(0.97))) == {0, 1, 2, 3}
    far = torch.tensor([[0.0, -200.0, -INF]])  # probability e^-200 underflows, yet p >= 1 is off
    assert kept(apply_top_p(far, p(1.0))) == {0, 1}
    assert kept(apply_top_p(far, p(2.0))) == {0, 1}
    assert kept(apply_top_p(far, p(0.999999))) == {0}
    # Ties with the last kept logit are kept (whatever order a sort put them in).
    assert kept(apply_top_p(torch.tensor([[1.0, 0.0, 1.0, 1.0]]), p(0.1))) == {0, 2, 3}


def test_greedy_is_argmax_of_penalised_logits_whatever_the_seed():
    logits = torch.tensor([[3.0, 2.9, 1.0, -5.0]])
    for seed in (7, 8, 2**40):
        state = state_for(P(temperature=0, top_k=3, top_p=0.1), seeds=[seed], logits=logits)
        assert sample(logits, state).tolist() == [0]
        state = state_for(P(temperature=0, repetition_penalty=2.0), prompts=[[0]], seeds=[seed], logits=logits)
        assert sample(logits, state).tolist() == [1]  # 3.0 / 2 < 2.9
    # beside sampling rows, greedy rows still take their argmax
    state = state_for([P(temperature=0), P(temperature=5.0)], logits=logits.expand(2, 4))
    for _ in range(20):
        assert sample(logits.expand(2, 4), state)[0] == 0
        state.update(torch.tensor([0, 0]))


# ---------------------------------------------------------------------------------------------------------
# logit_bias and the allowed-token mask


def test_logit_bias_is_added_before_penalties():
    logits = torch.tensor([[1.0, 0.5, -1.0, 2.0]])
    bias = ((0, 3.0), (2, -100.0))
    state = state_for(P(temperature=0, logit_bias=bias), logits=logits)
    assert process_logits(logits, state).tolist() == [[4.0, 0.5, -101.0, 2.0]]
    assert sample(logits, state).tolist() == [0]
    # repetition divides the biased logit: (1 + 3) / 2 = 2; the bias added after it would give 3.5
    state = state_for(P(temperature=0, logit_bias=bias, repetition_penalty=2.0), prompts=[[0]], logits=logits)
    assert process_logits(logits, state).tolist() == [[2.0, 0.5, -101.0, 2.0]]
    # per row: a row without a bias is untouched by its neighbour's
    two = logits.expand(2, 4)
    state = state_for([P(temperature=0, logit_bias=bias), P(temperature=0)], logits=two)
    assert process_logits(two, state).tolist() == [[4.0, 0.5, -101.0, 2.0], [1.0, 0.5, -1.0, 2.0]]
    # -100 bans a token for sampling rows too
    state = state_for([P(temperature=1.0, logit_bias=((3, -100.0),))] * 200, logits=logits.expand(200, 4),
                      seeds=list(range(1, 201)))
    assert 3 not in sample(logits.expand(200, 4), state).tolist()


def test_allowed_mask_applies_after_penalties_and_before_temperature():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    mask = torch.tensor([[False, True, True, True], [True, True, False, True]])
    rows = [P(temperature=0, repetition_penalty=4.0), P(temperature=0.5, top_k=2)]
    state = state_for(rows, prompts=[[1], []], logits=logits, mask=mask)
    got = process_logits(logits, state)
    # row 0 greedy: 3.0 masked, 2.0 / 4 = 0.5 after the penalty, so id 2 (1.0) wins
    assert got[0].tolist() == [-INF, 0.5, 1.0, 0.0]
    assert sample(logits, state)[0] == 2
    # row 1: the mask before temperature and top_k: the two kept are ids 0 and 1, scaled by 1 / 0.5
    assert got[1].tolist() == [6.0, 4.0, -INF, -INF]
    # sampling rows never draw a masked token
    many = torch.zeros(300, 4)
    only = torch.tensor([False, False, True, False]).expand(300, 4)
    state = state_for([P(temperature=2.0)] * 300, logits=many, seeds=list(range(1, 301)), mask=only)
    assert set(sample(many, state).tolist()) == {2}
    # an all-True mask changes nothing
    state = state_for(rows, prompts=[[1], []], logits=logits)
    full = state_for(rows, prompts=[[1], []], logits=logits, mask=torch.ones(2, 4, dtype=torch.bool))
    assert torch.equal(process_logits(logits, state), process_logits(logits, full))


# ---------------------------------------------------------------------------------------------------------
# Order: penalties, temperature, top_k, top_p


def test_order_penalty_before_temperature():
    logits = torch.tensor([[1.0, 0.0]])
    state = state_for(P(temperature=0.5, frequency_penalty=1.0), generated=[[0]], logits=logits)
    # (1 - 1) / 0.5 = 0; temperature first would give 1 / 0.5 - 1 = 1.
    assert process_logits(logits, state).tolist() == [[0.0, 0.0]]


def test_order_temperature_before_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    # softmax at T=1: .665 .245 .090 -> top_p .7 keeps two; at T=0.5: .867 .117 .016 -> keeps one.
    assert kept(process_logits(logits, state_for(P(temperature=1.0, top_p=0.7), logits=logits))[0]) == {0, 1}
    assert kept(process_logits(logits, state_for(P(temperature=0.5, top_p=0.7), logits=logits))[0]) == {0}


def test_order_top_k_before_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    # top_k=2 renormalises to .731 .269, so top_p .7 keeps one; top_p first (on .665 .245 .090) would keep two.
    state = state_for(P(temperature=1.0, top_k=2, top_p=0.7), logits=logits)
    assert kept(process_logits(logits, state)[0]) == {0}
    # And top_k cuts after temperature: T=5 does not change the top 2.
    state = state_for(P(temperature=5.0, top_k=2), logits=logits)
    assert torch.equal(process_logits(logits, state), torch.tensor([[2.0 / 5.0, 1.0 / 5.0, -INF]]))


# ---------------------------------------------------------------------------------------------------------
# Seeds, batches, distribution


def _draws(params, logits_steps, seeds, prompts=None):
    """Tokens (steps, B) from a run over a list of (B, V) logits, with update after each step."""
    state = state_for(params, prompts=prompts, vocab=logits_steps[0].shape[-1], seeds=seeds)
    out = []
    for logits in logits_steps:
        tokens = sample(logits, state)
        state.update(tokens)
        out.append(tokens)
    return torch.stack(out)


def test_seed_reproducibility():
    torch.manual_seed(0)
    steps = [torch.randn(1, 1000) * 2 for _ in range(100)]
    a = _draws(P(temperature=1.0), steps, [1234])
    b = _draws(P(temperature=1.0), steps, [1234])
    c = _draws(P(temperature=1.0), steps, [1235])
    d = _draws(P(temperature=1.0), steps, [9999999999])  # the contract's largest seed
    assert torch.equal(a, b)
    assert (a != c).sum() > 50 and (a != d).sum() > 50


def test_sampling_does_not_touch_the_global_rng():
    torch.manual_seed(5)
    steps = [torch.randn(2, 50)] * 3
    before = torch.get_rng_state()
    _draws([P(temperature=1.0, top_p=0.9)] * 2, steps, [1, 2])
    assert torch.equal(torch.get_rng_state(), before)


MIXED = [
    P(temperature=0, repetition_penalty=1.3),  # greedy
    P(temperature=0.7, top_k=5, top_p=0.8),  # nucleus among the top-k candidates
    P(temperature=1.3, top_p=0.9, presence_penalty=0.5),  # top_p without top_k
    P(temperature=1.0),  # plain sampling
    P(temperature=0.9, top_k=40, frequency_penalty=1.0, repetition_penalty=0.8),
    P(temperature=2.0, top_p=0.95),  # flat enough that the nucleus outgrows the candidates: full sort
]


@pytest.mark.parametrize("vocab", [50, 3000])
def test_batch_equals_single_with_mixed_params_and_compaction(vocab):
    torch.manual_seed(1)
    steps = [torch.randn(len(MIXED), vocab) * 1.5 for _ in range(24)]
    seeds = [11, 22, 33, 44, 55, 66]
    prompts = [[1, 2, 3, 2], [4, 4], [5], [], [6, 7], [8]]
    keep = [0, 2, 3, 5]  # after step 12, rows 1 and 4 finish and new requests take their rows
    newcomer = {1: (P(temperature=1.1, top_p=0.7, frequency_penalty=0.5), 77), 4: (P(temperature=0), 88)}
    state = state_for(MIXED, prompts=prompts, vocab=vocab, seeds=seeds)
    batch = {b: [] for b in range(len(MIXED))}
    late = {b: [] for b in newcomer}
    for i, logits in enumerate(steps):
        if i == 12:
            for b, (p, seed) in newcomer.items():
                state.set_row(b, p, seed, [9])
        tokens = sample(logits, state).tolist()
        state.update(torch.tensor(tokens))
        for b, t in enumerate(tokens):
            (batch if i < 12 or b in keep else late)[b].append(t)
    for b, params in enumerate(MIXED):
        n = 24 if b in keep else 12
        alone = _draws(params, [s[b : b + 1] for s in steps[:n]], [seeds[b]], prompts=[prompts[b]])
        assert batch[b] == alone[:, 0].tolist(), b
    for b, (p, seed) in newcomer.items():
        alone = _draws(p, [s[b : b + 1] for s in steps[12:]], [seed], prompts=[[9]])
        assert late[b] == alone[:, 0].tolist(), b


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize(
    "params, expected",
    [
        (P(temperature=1.0), torch.tensor([1.0, 0.0, -1.0, 2.0]).softmax(-1)),
        (P(temperature=0.5), torch.tensor([2.0, 0.0, -2.0, 4.0]).softmax(-1)),
        (P(temperature=1.0, top_k=2), torch.tensor([1.0, -INF, -INF, 2.0]).softmax(-1)),
    ],
)
def test_draws_follow_the_softmax(params, expected):
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, -INF])
    n_rows, n_steps = 500, 40  # 20000 draws: 500 seeds, 40 counters each
    state = state_for([params] * n_rows, vocab=5, seeds=list(range(1, n_rows + 1)))
    tokens = []
    for _ in range(n_steps):
        tokens.append(sample(logits.expand(n_rows, 5), state))
        state.update(tokens[-1])
    tokens = torch.cat(tokens)
    assert (tokens < 4).all()  # the -inf token is never drawn
    support = expected > 0
    assert set(tokens.tolist()) == set(support.nonzero()[:, 0].tolist())
    counts = torch.bincount(tokens, minlength=5)[:4][support].numpy()
    # Critical values at p = 0.001: 10.83 (1 dof), 16.27 (3 dof).
    assert _chi_square(counts, expected[support].double().numpy()) < (16.27 if support.sum() == 4 else 10.83)


def test_draw_is_argmax_of_probability_over_noise():
    logits = torch.tensor([[0.0, math.log(2.0), -INF], [0.0, 0.0, 0.0]])
    noise = torch.tensor([[0.1, 0.3, 1e-30], [1.0, 0.5, 0.7]])
    assert draw(logits, noise).tolist() == [0, 1]  # 1/0.1 > 2/0.3; the -inf token scores 0
    noise = counter_noise(torch.tensor([3, 3]), torch.tensor([0, 1]), 1000)
    assert (noise > 0).all() and abs(noise[0].mean().item() - 1.0) < 0.1 and not torch.equal(noise[0], noise[1])


def test_extreme_values_stay_finite():
    logits = torch.tensor([[1e30, -1e30, 3e38, 0.0, -INF], [1.0, 2.0, 3.0, 4.0, 5.0]])
    rows = [P(temperature=1e-30, repetition_penalty=1e-30, top_p=0.5), P(temperature=5.0, top_k=1)]
    state = state_for(rows, prompts=[[0, 1, 2, 3], []], logits=logits)
    probs = process_logits(logits, state).softmax(-1)
    assert torch.isfinite(probs).all()
    assert sample(logits, state).tolist()[1] == 4
    assert sample(logits, state).tolist()[0] in {0, 2}


# ---------------------------------------------------------------------------------------------------------
# The fast paths (top-k candidates, partial nucleus) against the plain full-sort reference


@pytest.mark.parametrize("scale", [0.02, 3.0])
@pytest.mark.parametrize("rows", [
    [P(temperature=0.8, top_k=7, top_p=0.6), P(temperature=1.2, top_k=2, top_p=0.3), P(temperature=0)],
    [P(temperature=0.8, top_p=0.6), P(temperature=1.2, top_k=2, top_p=0.3), P(temperature=1.0, top_k=9)],
    [P(temperature=1.0, top_p=0.95), P(temperature=0.7, top_p=0.0), P(temperature=1.0, top_p=1.5)],
])
def test_fast_paths_match_reference(rows, scale):
    torch.manual_seed(2)
    logits = torch.randn(len(rows), 3000) * scale
    logits[0] = (logits[0] * 4).round()  # bfloat16-like: many ties, also at the top-k cut
    state = state_for(rows, logits=logits)
    ref = logits.clone()
    for b, p in enumerate(rows):
        if p.greedy:
            continue
        x = apply_temperature(logits[b : b + 1], torch.tensor([[p.temperature]]))
        if p.top_k is not None:
            x = apply_top_k(x, torch.tensor([[p.top_k]]))
        if p.top_p is not None:
            x = apply_top_p(x, torch.tensor([[p.top_p]]))
        ref[b] = x[0]
    assert torch.equal(process_logits(logits, state), ref)


# ---------------------------------------------------------------------------------------------------------
# HF's logits processors as the oracle


def _hf_processed(logits_row, p: SamplingParams, input_ids):
    lp = pytest.importorskip("transformers.generation.logits_process")
    x = logits_row[None].clone()
    ids = torch.tensor([input_ids])
    if p.repetition_penalty not in (None, 0, 1):
        x = lp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
    if not p.greedy:
        x = lp.TemperatureLogitsWarper(p.temperature)(ids, x)
        if p.top_k is not None:
            x = lp.TopKLogitsWarper(p.top_k)(ids, x)
        if p.top_p is not None and p.top_p < 1:
            x = lp.TopPLogitsWarper(p.top_p)(ids, x)
    return x[0]


HF_ROWS = [
    P(temperature=0.7, repetition_penalty=1.3),
    P(temperature=1.0, top_k=10),
    P(temperature=0.6, top_p=0.9),
    P(temperature=1.5, top_k=40, top_p=0.75, repetition_penalty=0.7),
    P(temperature=0, repetition_penalty=2.0),
    P(temperature=2.0, top_p=0.5),
    P(temperature=0.3, top_k=50, top_p=0.0),
    P(temperature=5.0, top_p=0.999),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_hf_logits_processors(seed):
    gen = torch.Generator().manual_seed(seed)
    B, V = len(HF_ROWS), 2000
    logits = torch.randn(B, V, generator=gen) * 3
    prompts = [torch.randint(0, V, (30,), generator=gen).tolist() for _ in range(B)]
    generated = torch.randint(0, V, (B, 5), generator=gen).tolist()
    state = state_for(HF_ROWS, prompts=prompts, generated=generated, logits=logits)
    ours = process_logits(logits, state)
    for b, p in enumerate(HF_ROWS):
        theirs = _hf_processed(logits[b], p, prompts[b] + generated[b])
        assert torch.equal(torch.isfinite(ours[b]), torch.isfinite(theirs)), b
        torch.testing.assert_close(ours[b], theirs, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Property: any valid parameters on any logits give a finite distribution and a token from the allowed set

finite_logit = st.floats(-1e6, 1e6, width=32)
logit = st.one_of(finite_logit, finite_logit.map(lambda v: round(v)), st.just(-INF))


def _maybe(strategy):
    return st.one_of(st.none(), strategy)


params_strategy = st.builds(
    SamplingParams,
    temperature=st.one_of(st.sampled_from([0.0, 5.0]), st.floats(0.01, 5.0)),
    top_p=_maybe(st.one_of(st.sampled_from([0.0, 1.0, 2.0]), st.floats(0.0, 2.0))),
    top_k=_maybe(st.sampled_from([1, 2, 3, 50]) | st.integers(1, 50)),
    repetition_penalty=_maybe(st.one_of(st.sampled_from([0.0, 1.0, 2.0]), st.floats(0.05, 2.0))),
    frequency_penalty=_maybe(st.one_of(st.sampled_from([0.0, 2.0]), st.floats(0.0, 2.0))),
    presence_penalty=_maybe(st.one_of(st.sampled_from([0.0, 2.0]), st.floats(0.0, 2.0))),
)


def _allowed(logits: np.ndarray, p: SamplingParams, prompt: list[int], generated: list[int]) -> set[int]:
    """The tokens that may be drawn, computed independently in float64, with a little slack for rounding."""
    x = logits.astype(np.float64)
    V = len(x)
    if p.repetition_penalty not in (None, 0, 1):
        for j in {i for i in prompt + generated if i < V}:
            x[j] = x[j] / p.repetition_penalty if x[j] > 0 else x[j] * p.repetition_penalty
    counts = np.bincount(np.array(generated, dtype=np.int64), minlength=V)[:V]
    x = x - counts * (p.frequency_penalty or 0.0) - (counts > 0) * (p.presence_penalty or 0.0)
    finite = np.isfinite(x)
    tol = 1e-5 * (1.0 + np.abs(x[finite]).max())
    if p.greedy:
        return set(np.nonzero(finite & (x >= x[finite].max() - tol))[0].tolist())
    z = x / p.temperature
    tol /= p.temperature
    ok = finite.copy()
    if p.top_k is not None:
        kth = np.sort(z[finite])[::-1][min(p.top_k, finite.sum()) - 1]
        ok &= z >= kth - tol
    if p.top_p is not None and p.top_p < 1:
        w = np.where(ok, np.exp(z - z[ok].max()), 0.0)
        order = np.argsort(-z[ok], kind="stable")
        sorted_w = w[ok][order] / w.sum()
        above = np.concatenate([[0.0], np.cumsum(sorted_w)[:-1]])
        n_kept = max(1, int((above < p.top_p + 1e-6).sum()))
        ok &= z >= z[ok][order][n_kept - 1] - tol
    return set(np.nonzero(ok)[0].tolist())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_valid_params_give_finite_probs_and_allowed_tokens(data):
    V = data.draw(st.integers(1, 40))
    n_rows = data.draw(st.integers(1, 3))
    rows = data.draw(st.lists(params_strategy, min_size=n_rows, max_size=n_rows))
    logits = np.array(data.draw(st.lists(st.lists(logit, min_size=V, max_size=V).filter(
        lambda r: any(math.isfinite(v) for v in r)), min_size=n_rows, max_size=n_rows)), dtype=np.float32)
    prompts = data.draw(st.lists(st.lists(st.integers(0, V + 5), max_size=8), min_size=n_rows, max_size=n_rows))
    n_gen = data.draw(st.integers(0, 6))
    generated = data.draw(st.lists(st.lists(st.integers(0, V - 1), min_size=n_gen, max_size=n_gen),
                                   min_size=n_rows, max_size=n_rows))
    seeds = data.draw(st.lists(st.integers(1, 9999999999), min_size=n_rows, max_size=n_rows))

    t_logits = torch.from_numpy(logits)
    state = state_for(rows, prompts=prompts, generated=generated if n_gen else None, seeds=seeds, logits=t_logits)
    processed = process_logits(t_logits, state)
    probs = processed.softmax(-1)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(n_rows))
    tokens = sample(t_logits, state).tolist()
    for b, p in enumerate(rows):
        allowed = _allowed(logits[b], p, prompts[b], generated[b])
        assert tokens[b] in allowed, (b, tokens[b], allowed)
        if not p.greedy:
            assert kept(processed[b]) <= allowed


# ---------------------------------------------------------------------------------------------------------
# The compiled step's sampler: every knob a tensor, counter-based noise


def knobs_for(params, vocab, prompts=None, seeds=None):
    knobs = StepKnobs(len(params) + 2, vocab, "cpu")  # spare rows: a step samples rows [0, n) only
    for b, p in enumerate(params):
        knobs.set_row(b, p, (seeds or {}).get(b, b + 1), prompts[b] if prompts else [])
    return knobs


@pytest.mark.parametrize("vocab", [3000, 200])  # with more logits than the nucleus candidates, and fewer
@pytest.mark.parametrize("scale", [0.02, 3.0, 30.0])
def test_static_sampler_filters_as_the_reference(vocab, scale):
    """For every setting at once (neutral values where a row leaves a step off), the logits the static
    sampler draws from are the reference's, bit for bit, ties and wide nuclei (found by bisection) included;
    greedy rows take the argmax of their penalised logits."""
    torch.manual_seed(3)
    rows = HF_ROWS + [P(temperature=1.0, top_p=0.9999), P(temperature=4.0, top_p=0.99), P(temperature=0)]
    logits = torch.randn(len(rows), vocab) * scale
    logits[1] = (logits[1] * 4).round()  # many ties, at the top-k cut too
    prompts = [[1, 5, 9, 5]] * len(rows)
    state = state_for(rows, prompts=prompts, logits=logits)
    knobs = knobs_for(rows, vocab, prompts)
    drawn = torch.randint(0, vocab, (len(rows),))
    state.update(drawn)
    knobs.update(drawn)
    ref = process_logits(logits, state)
    got, greedy = process_static(logits, knobs)
    for b, p in enumerate(rows):
        if p.greedy:
            assert greedy[b] == ref[b].argmax()
        else:
            assert torch.equal(got[b], ref[b]), (b, p)
    assert (knobs.counters[:len(rows)] == 1).all() and (knobs.counters[len(rows):] == 0).all()


def test_counter_noise_is_exponential_and_per_row():
    seeds = torch.tensor([1, 2, 1, 2**62 + 5])
    noise = counter_noise(seeds, torch.tensor([0, 0, 1, 0]), 200_000)
    assert (noise > 0).all() and torch.isfinite(noise).all()
    for row in noise:  # Exp(1): mean 1, P(E > 1) = 1/e
        assert abs(row.mean().item() - 1) < 0.01 and abs((row > 1).double().mean().item() - math.exp(-1)) < 0.005
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    # a row's noise depends only on its own seed and counter, not on the batch around it
    assert torch.equal(counter_noise(seeds[2:3], torch.tensor([1]), 200_000)[0], noise[2])
    # neighbouring columns and draws are uncorrelated
    assert abs(np.corrcoef(noise[0, :-1], noise[0, 1:])[0, 1]) < 0.01
    assert abs(np.corrcoef(noise[0], noise[2])[0, 1]) < 0.01


@pytest.mark.parametrize(
    "params, expected",
    [
        (P(temperature=1.0), torch.tensor([1.0, 0.0, -1.0, 2.0]).softmax(-1)),
        (P(temperature=0.5, top_p=0.9), torch.tensor([2.0, -INF, -INF, 4.0]).softmax(-1)),
        (P(temperature=1.0, top_k=2), torch.tensor([1.0, -INF, -INF, 2.0]).softmax(-1)),
    ],
)
def test_static_draws_follow_the_softmax(params, expected):
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, -INF])
    n_rows, n_steps = 500, 40
    knobs = knobs_for([params] * n_rows, 5, seeds={b: 1000 + b for b in range(n_rows)})
    tokens = []
    for _ in range(n_steps):
        drawn = sample_static(logits.expand(n_rows, 5), knobs)
        knobs.counters[:n_rows] += 1  # the next draw (update's counter, without the penalty history)
        tokens.append(drawn)
    tokens = torch.cat(tokens)
    support = expected > 0
    assert set(tokens.tolist()) == set(support.nonzero()[:, 0].tolist())
    counts = torch.bincount(tokens, minlength=5)[:4][support].numpy()
    assert _chi_square(counts, expected[support].double().numpy()) < (16.27 if support.sum() == 4 else 10.83)


def test_static_sampler_seed_reproducibility_and_batch_independence():
    logits = torch.randn(3, 500)
    rows = [P(temperature=0.9, top_p=0.9), P(temperature=1.1, top_k=20), P(temperature=0)]
    a = sample_static(logits, knobs_for(rows, 500, seeds={0: 7, 1: 8}))
    b = sample_static(logits, knobs_for(rows, 500, seeds={0: 7, 1: 8}))
    alone = sample_static(logits[1:2], knobs_for(rows[1:2], 500, seeds={0: 8}))
    assert torch.equal(a, b) and a[1] == alone[0]


def test_greedy_rows_with_nothing_to_apply_take_the_argmax_of_the_logits_as_they_are(monkeypatch):
    """Where every row is greedy with no bias, penalty or mask (`steps_used` empty), `sample_static` takes the
    argmax of the bfloat16 logits without widening them to float32 first: the same token as the full sampler,
    first among ties, and without running the sampler's float32 path (`process_static`, watched here)."""
    import llama32.sampling as S

    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 500, generator=gen) * 4).bfloat16()
    logits[1, 7] = logits[1, 300] = logits[1].max() + 1  # a tie: the first index wins
    logits[2, 499] = logits[2].max() + 1  # the last token
    knobs = knobs_for([P(temperature=0)] * 6, 500)
    steps = steps_used([P(temperature=0)] * 6)
    want = process_static(logits, knobs, None, steps)[1]
    assert want[1] == 7 and want[2] == 499
    real, called = S.process_static, []
    monkeypatch.setattr(S, "process_static", lambda *a, **k: called.append(1) or real(*a, **k))
    assert torch.equal(sample_static(logits, knobs, None, steps), want) and not called
    # with a penalty (or any step a greedy row sees) the full sampler runs
    penalised = knobs_for([P(temperature=0, repetition_penalty=1.3)] * 6, 500, prompts=[[7]] * 6)
    sample_static(logits, penalised, None, steps_used([P(temperature=0, repetition_penalty=1.3)]))
    assert called


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_first_max_is_argmax_among_ties_nan_and_minus_infinity(dtype):
    """The greedy token (`first_max`) is `argmax`'s index on every row: the first of tied maxima, a NaN above
    all, a row of -inf at index 0, at the row counts and vocabulary sizes a step meets."""
    from llama32.sampling import first_max

    gen = torch.Generator().manual_seed(5)
    for rows, V in [(2, 128256), (3, 49152), (32, 1000), (8, 17)]:
        x = torch.randint(-3, 4, (rows, V), generator=gen).to(dtype)  # few values: ties on every row
        assert torch.equal(first_max(x), x.argmax(-1))
        x[0, [V // 2, V - 1]] = float("nan")
        x[-1] = float("-inf")
        got = first_max(x)
        assert torch.equal(got, x.argmax(-1)) and got[0] == V // 2 and got[-1] == 0
        assert torch.equal(first_max(x[:1]), got[:1])  # one row alone
