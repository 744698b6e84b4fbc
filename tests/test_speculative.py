"""Speculative decoding's pieces (llama32/engine/speculative/): the n-gram and draft proposers, the verification
rule (equal to sequential sampling token for token, greedy and seeded, penalties on) on hand-made logits and
on tiny random checkpoints, and the adaptive number of proposals."""

from __future__ import annotations

import pytest
import torch

import llama32
from llama32.engine.speculative import (AdaptiveK, DraftProposer, NgramProposer, record, target_tokens, verify,
                                        verify_rows)
from llama32.sampling import SamplingParams, StepKnobs, sample_static



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny products on one thread: on a loaded 2-core machine a second intra-op thread makes each of these
    microsecond kernels wait for a scheduler slice (8 ms per 64-wide linear measured, 0.3 ms on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# n-gram proposer


def test_ngram_proposes_what_followed_the_longest_recent_match():
    p = NgramProposer(max_n=3, min_n=1)
    #        0  1  2  3  4  5  6  7  8  9
    ids = [5, 6, 7, 8, 9, 1, 6, 7, 2, 6, 7]
    # suffix 3-gram (2, 6, 7) never occurred before; 2-gram (6, 7) last ended at 8 (followed by 2, 6, 7)
    assert p.propose(ids, 3) == [2, 6, 7] and p.matched == 2
    assert p.propose(ids, 1) == [2]
    # growing: (7, 8) is now the suffix... after appending 8, the 3-gram (6, 7, 8) occurred at 1..3 -> 9, 1, 6
    ids = ids + [8]
    assert p.propose(ids, 3) == [9, 1, 6] and p.matched == 3
    # the most recent occurrence wins over an older one
    assert NgramProposer(max_n=2, min_n=1).propose([1, 2, 3, 1, 2, 4, 1, 2], 1) == [4]
    # the longest match wins over a more recent shorter one
    assert NgramProposer(max_n=3, min_n=1).propose([9, 1, 2, 3, 8, 2, 5, 1, 2], 2) == [3, 8]


def test_ngram_edges():
    p = NgramProposer(max_n=3, min_n=2)
    assert p.propose([1, 2, 3, 4], 4) == [] and p.matched == 0  # nothing repeats
    assert p.propose([1, 2, 3, 4, 1], 4) == []  # a 1-gram match is below min_n
    assert p.propose([1, 2, 3, 4, 1, 2], 4) == [3, 4, 1, 2]  # continuation runs up to the present
    assert p.propose([1, 2, 3, 4, 1, 2], 0) == []
    assert NgramProposer(max_n=2, min_n=1).propose([7, 7], 3) == [7]  # overlapping repeat
    with pytest.raises(ValueError, match="min_n"):
        NgramProposer(max_n=1, min_n=2)


def test_ngram_incremental_equals_fresh_and_rebuilds_on_a_new_history():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (300,), generator=g).tolist()
    inc = NgramProposer(max_n=4, min_n=1)
    for L in range(1, len(ids) + 1, 7):
        assert inc.propose(ids[:L], 5) == NgramProposer(max_n=4, min_n=1).propose(ids[:L], 5), L
    other = [int(t) + 6 for t in ids[:50]]  # a different request reusing the proposer: the index is rebuilt
    assert inc.propose(other, 5) == NgramProposer(max_n=4, min_n=1).propose(other, 5)
    assert all(t >= 6 for t in inc.propose(other, 5))


# ---------------------------------------------------------------------------------------------------------
# verification on hand-made logits

V = 40
CASES = {
    "greedy": SamplingParams(temperature=0),
    "greedy, penalties": SamplingParams(temperature=0, repetition_penalty=1.8, frequency_penalty=0.7,
                                        presence_penalty=0.4),
    "seeded": SamplingParams(temperature=0.9),
    "seeded, top_k top_p, penalties": SamplingParams(temperature=1.3, top_k=7, top_p=0.8, repetition_penalty=1.5,
                                                     frequency_penalty=0.5, presence_penalty=0.3),
}


def _knobs(params: SamplingParams, prompt, row=1, rows=3, seed=1234) -> StepKnobs:
    knobs = StepKnobs(rows, V, "cpu")
    for r in range(rows):  # neighbours with other settings: a row is verified on its own knobs only
        knobs.set_row(r, SamplingParams(temperature=0.5, repetition_penalty=1.9), 99 + r, [0, 1, 2])
    knobs.set_row(row, params, seed, prompt)
    return knobs


def _sequential(logits, knobs: StepKnobs, row: int) -> list[int]:
    """The reference: one sample_static + update per position, as the decode loop does."""
    one, out = knobs.view(row, row + 1), []
    for i in range(logits.shape[0]):
        t = sample_static(logits[i:i + 1], one)
        one.update(t)
        out.append(int(t))
    return out


def _peaked_logits(k1: int, seed: int) -> torch.Tensor:
    """Logits whose favourites repeat, so that penalties (reading the history) change the tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k1, V, generator=g)
    x[:, 3] += 4.0
    x[:, 5] += 3.5
    return x


@pytest.mark.parametrize("name", list(CASES))
def test_verify_equals_sequential_sampling(name):
    params, prompt, row = CASES[name], [3, 7, 7, 9], 1
    for trial in range(6):
        k = 1 + trial
        logits = _peaked_logits(k + 1, trial)
        # a history before the verify step: 3 tokens already drawn (counter 3, counts/seen set)
        knobs = _knobs(params, prompt)
        record(knobs, row, [5, 3, 11])
        ref = _sequential(logits, _clone(knobs), row)
        assert target_tokens(logits, knobs, row, ref[:k]).tolist() == ref
        for first_wrong in range(k + 1):  # proposals right up to first_wrong, then wrong
            props = ref[:first_wrong] + [(t + 1) % V for t in ref[first_wrong:k]]
            props += [(t + 2) % V for t in ref[len(props):k]]
            v = verify(logits, knobs, row, props)
            assert v.accepted == min(first_wrong, k)
            assert v.tokens == ref[:v.accepted + 1]
        # the knobs were not changed by verifying; recording the delivered tokens equals sequential steps
        after = _clone(knobs)
        record(after, row, ref)
        seq = _clone(knobs)
        _sequential(logits, seq, row)
        for name_, t in after.tensors().items():
            assert torch.equal(t, seq.tensors()[name_]), name_


def test_penalties_read_the_history_of_earlier_proposals():
    """Greedy with a strong repetition penalty on a token every position favours: without the proposals'
    history the same token would win at every position; with it, the answer alternates."""
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    logits = torch.zeros(5, V)
    logits[:, 3], logits[:, 5], logits[:, 8] = 4.0, 3.0, 2.5
    knobs = _knobs(params, [1])
    ref = _sequential(logits, _clone(knobs), 1)
    # 3 wins, then (3 halved to 2.0) 5, then (5 halved to 1.5) 8, then 3 for good: a token's penalty applies once
    assert ref == [3, 5, 8, 3, 3]
    v = verify(logits, knobs, 1, ref[:4])
    assert v.tokens == ref and v.accepted == 4


def test_verify_rows_packs_rows_with_their_own_counts_and_seeds():
    knobs = StepKnobs(4, V, "cpu")
    params = [CASES["seeded"], CASES["greedy, penalties"], CASES["seeded, top_k top_p, penalties"]]
    for r, p in enumerate(params):
        knobs.set_row(r, p, 10 + r, [2, 3])
    ks = [3, 0, 5]
    logits = [_peaked_logits(k + 1, 100 + r) for r, k in enumerate(ks)]
    refs = [_sequential(lg, _clone(knobs), r) for r, lg in enumerate(logits)]
    props = [refs[0][:3], [], refs[2][:2] + [(refs[2][2] + 1) % V, 0, 0]]
    out = verify_rows(torch.cat(logits), knobs, [0, 1, 2], props)
    assert [v.tokens for v in out] == [refs[0][:4], refs[1][:1], refs[2][:3]]
    assert [v.accepted for v in out] == [3, 0, 2]


def test_seeded_noise_follows_the_token_index():
    """Two equal logit rows draw differently at different token indices (the counter), so position i of a
    verify step must use counter + i; the same seed at the same index draws the same."""
    params = SamplingParams(temperature=1.0)
    logits = torch.zeros(8, V)
    knobs = _knobs(params, [1])
    drawn = target_tokens(logits, knobs, 1, [0] * 7).tolist()
    assert len(set(drawn)) > 1
    assert drawn == _sequential(logits, _clone(knobs), 1)


def test_verify_with_logit_bias_and_the_allowed_mask():
    """logit_bias is a setting (the same at every position); the allowed-token mask is given per position,
    as the JSON matcher advanced through the proposals would give it."""
    params = SamplingParams(temperature=0.8, repetition_penalty=1.4, logit_bias=((5, -3.0), (9, 2.5)))
    g = torch.Generator().manual_seed(4)
    allowed = torch.rand(6, V, generator=g) < 0.6
    allowed[:, 3] = True
    logits = _peaked_logits(6, 8)
    knobs = _knobs(params, [3, 9])
    one, ref = _clone(knobs).view(1, 2), []
    for i in range(6):
        t = sample_static(logits[i:i + 1], one, allowed[i:i + 1])
        one.update(t)
        ref.append(int(t))
    assert all(allowed[i, t] for i, t in enumerate(ref))
    v = verify(logits, knobs, 1, ref[:5], allowed)
    assert v.tokens == ref and v.accepted == 5
    wrong = ref[:2] + [(ref[2] + 1) % V] + ref[3:5]
    assert verify(logits, knobs, 1, wrong, allowed).tokens == ref[:3]
    # without the bias or the mask the tokens differ (both are read)
    assert target_tokens(logits, knobs, 1, ref[:5]).tolist() != ref
    plain = _knobs(SamplingParams(temperature=0.8, repetition_penalty=1.4), [3, 9])
    assert target_tokens(logits, plain, 1, ref[:5], allowed).tolist() != ref


def _clone(knobs: StepKnobs) -> StepKnobs:
    out = StepKnobs.__new__(StepKnobs)
    out.vocab_size = knobs.vocab_size
    for name, t in knobs.tensors().items():
        setattr(out, name, t.clone())
    return out


# ---------------------------------------------------------------------------------------------------------
# verification with a model: speculative decoding reproduces sequential decoding


def _decode(model, prompt, params, seed, n, proposer=None, max_k=4):
    """Decode `n` tokens with plain causal forwards; with a proposer, verify its proposals in one forward
    per step. Returns (tokens, verify steps, proposals made, proposals accepted)."""
    V = model.config.vocab_size
    knobs = StepKnobs(1, V, "cpu")
    knobs.set_row(0, params, seed, prompt)
    ids, out, steps, made, taken = list(prompt), [], 0, 0, 0
    with torch.inference_mode():
        while len(out) < n:
            props = proposer.propose(ids, min(max_k, n - len(out) - 1)) if proposer else []
            logits = model(torch.tensor([ids + props]))[0, -(len(props) + 1):].float()
            v = verify(logits, knobs, 0, props)
            record(knobs, 0, v.tokens)
            ids += v.tokens
            out += v.tokens
            steps, made, taken = steps + 1, made + len(props), taken + v.accepted
    return out, steps, made, taken


class _Scripted:
    """Proposes the known answer's next tokens with every third one changed."""

    def __init__(self, prompt, answer):
        self.n, self.answer, self.calls = len(prompt), answer, 0

    def propose(self, ids, k):
        self.calls += 1
        done = len(ids) - self.n
        out = list(self.answer[done:done + k])
        for i in range((self.calls + 1) % 3, len(out), 3):
            out[i] = (out[i] + 1) % 512
        return out


@pytest.fixture(scope="module")
def tiny_pair(make_checkpoint):
    """A target and a draft (another architecture, same 512-token vocabulary). Loaded unpacked: oneDNN's
    packed products build a kernel per new row count, which every verify step of a growing text is."""
    import os

    old = os.environ.get("LLAMA32_CPU_PACK")
    os.environ["LLAMA32_CPU_PACK"] = "0"
    try:
        target = llama32.load(make_checkpoint(seed=0), dtype="float32", device="cpu")
        draft = llama32.load(make_checkpoint(kind="llama31", seed=3), dtype="float32", device="cpu")
    finally:
        if old is None:
            del os.environ["LLAMA32_CPU_PACK"]
        else:
            os.environ["LLAMA32_CPU_PACK"] = old
    return target, draft


MODEL_CASES = [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.3),
               SamplingParams(temperature=0.8, top_k=20, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.2)]


@pytest.mark.parametrize("params", MODEL_CASES, ids=["greedy", "greedy+rep", "seeded+penalties"])
def test_speculative_decoding_equals_sequential_on_a_tiny_checkpoint(tiny_pair, params):
    target, draft = tiny_pair
    prompt = [1] + [10, 11, 12, 13, 14, 10, 11, 12, 13] * 3
    ref, steps, _, _ = _decode(target.model, prompt, params, 77, 40)
    assert steps == 40
    for proposer in (NgramProposer(max_n=3, min_n=1), DraftProposer(draft.model, target.config.vocab_size),
                     DraftProposer(target.model)):
        got, steps, made, taken = _decode(target.model, prompt, params, 77, 40, proposer)
        assert got == ref, type(proposer).__name__
        assert made > 0
        assert steps == 40 - taken
    # proposals that are partly the answer itself: acceptance and rejection inside one run
    got, steps, made, taken = _decode(target.model, prompt, params, 77, 40, _Scripted(prompt, ref))
    assert got == ref and 0 < taken < made and steps == 40 - taken
    # the target drafting for itself greedily: (nearly) every proposal is its own next token
    if params.greedy and not params.uses_repetition:
        _, steps, made, taken = _decode(target.model, prompt, params, 77, 40, DraftProposer(target.model))
        assert taken >= 0.9 * made and steps < 15


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, repetition_penalty=1.1),
                                    SamplingParams(temperature=0.7, top_p=0.9, frequency_penalty=0.3)],
                         ids=["greedy+rep", "seeded"])
def test_speculative_decoding_equals_sequential_on_smollm2(smol, params):
    """Real weights on an input-grounded prompt: n-gram proposals are accepted, SmolLM2 drafts for itself,
    and both deliver the sequential tokens."""
    tok = smol.tokenizer
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    prompt = tok.encode(f"<|im_start|>user\nRepeat exactly: {text}<|im_end|>\n<|im_start|>assistant\n")
    ref, _, _, _ = _decode(smol.model, prompt, params, 5, 16)
    for proposer in (NgramProposer(), DraftProposer(smol.model)):
        got, steps, made, taken = _decode(smol.model, prompt, params, 5, 16, proposer)
        assert got == ref, (type(proposer).__name__, tok.decode(got), tok.decode(ref))
        assert taken > 0 and steps == 16 - taken


def test_draft_proposer_keeps_its_cache_in_step(tiny_pair):
    """After the target rejects proposals, the draft's proposals for the new history equal those of a fresh
    draft (its stale positions are overwritten, never read)."""
    _, draft = tiny_pair
    kept = DraftProposer(draft.model)
    ids = [1, 20, 21, 22, 23]
    first = kept.propose(ids, 4)
    assert len(first) == 4
    for step in range(6):
        ids = ids + first[:step % 3] + [(first[step % 3] + 5) % 512]  # accept some, then the target's token
        first = kept.propose(ids, 4)
        assert first == DraftProposer(draft.model).propose(ids, 4)
    assert kept.cache.length >= len(ids) + 3


def test_draft_proposals_stop_at_ids_the_target_cannot_draw(tiny_pair):
    _, draft = tiny_pair
    full = DraftProposer(draft.model).propose([1, 2, 3], 6)
    assert DraftProposer(draft.model, vocab_size=0).propose([1, 2, 3], 6) == []
    assert min(full) < max(full)  # so that a cut between them stops the proposals somewhere
    cut = min(full) + 1
    short = DraftProposer(draft.model, vocab_size=cut).propose([1, 2, 3], 6)
    assert all(t < cut for t in short) and short == full[:len(short)] and len(short) < len(full)


# ---------------------------------------------------------------------------------------------------------
# adaptive k


def test_adaptive_k_grows_with_acceptance_and_switches_off_when_it_does_not_pay():
    a = AdaptiveK(max_k=8, cost_per_token=0.1, probe_after=4, max_wait=16)
    for _ in range(10):
        k = a.next_k()
        a.observe(k, k)  # everything accepted
    assert a.next_k() == 8
    ks = []
    for _ in range(40):  # nothing accepted any more
        k = a.next_k()
        ks.append(k)
        a.observe(k, 0)
    assert 0 in ks and ks[-1] in (0, 2)
    off_runs, run = [], 0  # plain steps between probes: 4, 8, 16, 16 (probe_after 4, doubling, max_wait 16)
    for k in ks[ks.index(0):]:
        if k == 0:
            run += 1
        else:
            off_runs.append(run)
            run = 0
    assert off_runs[:3] == [4, 8, 16] and all(r == 16 for r in off_runs[3:])
    # acceptance returns: the probe succeeds and the row speculates again
    for _ in range(40):
        k = a.next_k()
        a.observe(k, k)
    assert a.next_k() >= 4


def test_adaptive_k_costs_the_verify_step():
    cheap, dear = AdaptiveK(rate=0.7, cost_per_token=0.02), AdaptiveK(rate=0.7, cost_per_token=0.5)
    assert cheap.best_k() > dear.best_k() >= 0
    assert AdaptiveK(rate=0.05).next_k() == 0
    # a fixed part (float32 on the CPU: a one-row product has its own, faster kernel) turns a middling row off
    assert AdaptiveK(rate=0.4, cost_per_token=0.1).next_k() > 0
    assert AdaptiveK(rate=0.4, cost_per_token=0.12, cost_fixed=0.35).next_k() == 0
    assert AdaptiveK(rate=0.9, cost_per_token=0.12, cost_fixed=0.35).next_k() >= 4


@pytest.mark.parametrize("request_", [
    {"temperature": 0.8, "seed": 4242, "repetition_penalty": 1.2, "frequency_penalty": 0.4},
    {"temperature": 0, "presence_penalty": 0.5},
], ids=["seeded", "greedy"])
def test_speculative_decoding_reproduces_the_generation_loop(smol, request_):
    """The loop's own answer (llm.generate, its counter noise, its knobs) is what n-gram speculation verified
    with `verify` delivers: the same request's prompt ids, settings and seed through this module's path."""
    from llama32.requests import validate

    text = "The quick brown fox jumps over the lazy dog near the river bank."
    body = {"prompt": f"Repeat exactly: {text}", "max_tokens": 12, **request_}
    req = validate(smol, body)
    loop_text = llama32.generate(smol, **body)["response"]
    seed = req.seed if req.seed is not None else 0
    got = _decode(smol.model, req.prompt_ids, req.params, seed, 12, NgramProposer())[0]
    stops = set(smol.config.eos_token_id if isinstance(smol.config.eos_token_id, (list, tuple))
                else [smol.config.eos_token_id])
    end = next((i for i, t in enumerate(got) if t in stops), len(got))
    assert smol.tokenizer.decode(got[:end]) == loop_text and loop_text
