"""Speculative decoding in the generation loop (`load(..., speculative=...)`, engine/speculative/): answers equal
to those without it, token for token in float32 (greedy and seeded, penalties, logprobs within 1e-4, streams,
stop strings, JSON mode, LoRA rows, max_tokens and the cache's end, 4 callers at once), for "ngram" and for
draft checkpoints (a tiny random pair sharing the Llama 3 tokenizer, the tiny target and SmolLM2 drafting for
themselves); proposals really are accepted and rejected in these runs; bad `speculative` values fail at load."""

from __future__ import annotations

import time

import pytest

import llama32
from llama32 import CheckpointError
from llama32.engine.scheduler import budget_for
from llama32.requests import validate
from fixtures import without_cached
from test_engine import in_threads, same
from test_lora import write_adapter

TEXT = ("Invoice 4471 was issued on 12 March 2024 by Harbor Lane Supplies to Meridian Foods Ltd. The order "
        "covers 40 crates of olive oil at 18.50 euros each and 12 crates of vinegar at 9.75 euros each. Payment "
        "is due within 30 days, and the goods ship from the Rotterdam warehouse on 15 March 2024.")
SCHEMA = {"type": "object", "properties": {"invoice": {"type": "integer"}, "seller": {"type": "string"},
                                           "buyer": {"type": "string"}, "warehouse": {"type": "string"}},
          "required": ["invoice", "seller", "buyer", "warehouse"]}


def smol_requests() -> list[dict]:
    """Input-grounded requests (so n-gram proposals are accepted) with every knob the loop delivers through."""
    repeat = f"Repeat the following text exactly, word for word:\n\n{TEXT}"
    extract = f"From the text below, list the invoice number, seller, buyer and warehouse, one per line.\n\n{TEXT}"
    return [
        dict(prompt=repeat, max_tokens=40, temperature=0),
        dict(prompt=repeat, max_tokens=40, temperature=0.7, seed=11, top_p=0.9, top_k=40, repetition_penalty=1.1,
             frequency_penalty=0.3, presence_penalty=0.2),
        dict(prompt=extract, max_tokens=32, temperature=0, logprobs=True, top_logprobs=3),
        dict(prompt=extract, max_tokens=32, temperature=0.9, seed=5, logprobs=True, top_logprobs=2,
             logit_bias={"30": -2.5, "198": 1.5}),
        dict(prompt=repeat, max_tokens=36, temperature=0.6, seed=3, stream=True),
        dict(prompt=repeat, max_tokens=3, temperature=0),
        dict(prompt=f"Give the invoice's fields as JSON.\n\n{TEXT}", max_tokens=48, temperature=0,
             response_format={"type": "json_schema", "json_schema": SCHEMA}),
    ]


def run(llm, request: dict) -> dict:
    out = llama32.generate(llm, **request)
    if not request.get("stream"):
        return out
    chunks = list(out)
    last = chunks[-1]
    result = {"response": "".join(c["response"] for c in chunks), "tool_calls": last.get("tool_calls", []),
              "finish_reason": last["finish_reason"], "usage": last["usage"]}
    if request.get("logprobs"):
        result["logprobs"] = [e for c in chunks for e in c.get("logprobs", [])]
    return result


def with_stop(plain_llm, request: dict) -> dict:
    """`request` with a stop string taken from the middle of its own plain answer, so it stops inside a run."""
    text = run(plain_llm, request)["response"]
    cut = text[len(text) // 2: len(text) // 2 + 6]
    assert cut.strip(), text
    return dict(request, stop=["@@never@@", cut])


def check_equal(plain_llm, spec_llm, requests: list[dict], want: list[dict] | None = None) -> None:
    """`spec_llm`'s answers equal `plain_llm`'s (or `want`, computed by it before), alone and 4 at once."""
    want = want if want is not None else [run(plain_llm, r) for r in requests]
    got = [run(spec_llm, r) for r in requests]
    assert same(got, want)
    # and 4 callers at once (rows verified in one forward, each at its own positions), in any order
    got = in_threads(lambda r: run(spec_llm, r), [(r,) for r in requests[:4]])
    assert same(got, want[:4])


def accepted_and_rejected(llm, before: dict) -> tuple[int, int]:
    now = llm.loop.speculator.stats.as_dict()
    accepted = now["accepted"] - before["accepted"]
    return accepted, (now["proposed"] - before["proposed"]) - accepted


# --- SmolLM2 (real weights), float32 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_plain(smol) -> list[dict]:
    """The plain loop's answers to `smol_requests()` (computed once for the tests below)."""
    return [run(smol, r) for r in smol_requests()]


@pytest.fixture(scope="module")
def smol_ngram(smollm2_dir):
    return llama32.load(smollm2_dir, dtype="float32", device="cpu", speculative="ngram")


@pytest.fixture(scope="module")
def smol_self(smollm2_dir):
    """SmolLM2 drafting for itself (the same weights: one copy, `llm.loop.speculator.draft is llm`)."""
    return llama32.load(smollm2_dir, dtype="float32", device="cpu", speculative=str(smollm2_dir))


def test_ngram_on_smollm2_changes_nothing_but_speed(smol, smol_ngram, smol_plain, monkeypatch):
    from llama32.engine.speculative import Speculator

    assert smol_ngram.speculative == "ngram"
    requests = smol_requests()
    requests.append(with_stop(smol, requests[0]))
    steps = []  # (rows proposing, positions) of each verify forward
    verify = Speculator._verify
    monkeypatch.setattr(Speculator, "_verify", lambda self, loop, rows, n, T, live, plan, masks: (
        steps.append((len(plan), T)), verify(self, loop, rows, n, T, live, plan, masks))[-1])
    before = smol_ngram.loop.speculator.stats.as_dict()
    check_equal(smol, smol_ngram, requests, smol_plain + [run(smol, requests[-1])])
    accepted, rejected = accepted_and_rejected(smol_ngram, before)
    assert accepted >= 40 and rejected > 0
    assert any(rows > 1 for rows, _ in steps), "some verify forward checked several rows' proposals"
    # the stop string ended the answer inside a verified run, as it does without speculation
    assert run(smol_ngram, requests[-1])["finish_reason"] == "stop"
    # the JSON row's proposals were checked against its grammar's masks, and some were taken (alone: the row the
    # stop string ended leaves at the next step, engine/deliver.py, and beside it the first steps may not speculate)
    deadline = time.time() + 10
    while smol_ngram.loop.stats()["running"] and time.time() < deadline:
        time.sleep(0.01)
    before = smol_ngram.loop.speculator.stats.as_dict()
    assert same([run(smol_ngram, requests[6])], [smol_plain[6]])
    assert accepted_and_rejected(smol_ngram, before)[0] > 0


def test_a_dropped_handle_is_freed_at_once(smollm2_dir):
    """The speculator refers to its handle (and to the handle as its own draft) weakly, as the loop does: a
    dropped handle goes as soon as the loop thread has let go of it, without waiting for the cycle collector."""
    import gc
    import time
    import weakref

    for source in ("ngram", str(smollm2_dir)):
        llm = llama32.load(smollm2_dir, dtype="float32", device="cpu", speculative=source)
        llama32.generate(llm, prompt="Say hi.", max_tokens=4, temperature=0)
        ref = weakref.ref(llm)
        gc.disable()
        try:
            del llm
            deadline = time.time() + 5  # the loop thread may still be finishing the step that answered
            while ref() is not None and time.time() < deadline:
                time.sleep(0.01)
            assert ref() is None, source
        finally:
            gc.enable()


def test_smollm2_drafting_for_itself_changes_nothing(smol, smol_self, smol_plain):
    assert smol_self.loop.speculator.draft is smol_self
    requests = smol_requests()
    before = smol_self.loop.speculator.stats.as_dict()
    check_equal(smol, smol_self, requests[:4] + requests[5:], smol_plain[:4] + smol_plain[5:])
    accepted, rejected = accepted_and_rejected(smol_self, before)
    # the draft draws with the request's own settings and noise: its proposals are the target's own tokens
    # except where one-position rounding differs (or penalties read what the draft has not seen)
    assert accepted >= 100 and accepted > 5 * rejected


def test_proposals_fit_the_cache_to_its_last_position(smollm2_dir, smol, monkeypatch):
    """A budget of exactly prompt + max_tokens positions: the rows' cache can never be longer, so the last
    steps' proposals must be cut to the room left (and padding kept inside it); the answer is the plain one."""
    body = dict(prompt=" ".join(["red green blue"] * 40), raw=True, temperature=0)  # it goes on and on
    P = 300  # positions: more than the 256 the cache starts at, not a power of two
    body["max_tokens"] = P - len(validate(smol, body).prompt_ids)
    budget = budget_for(P, smol.loop.position_bytes, 2 * smol.config.num_hidden_layers)
    plain = llama32.load(smollm2_dir, dtype="float32", device="cpu", kv_cache_bytes=budget)
    spec = llama32.load(smollm2_dir, dtype="float32", device="cpu", kv_cache_bytes=budget, speculative="ngram")
    verified = []
    forward = spec.model.forward

    def watch(ids, **kw):
        if ids.shape[1] > 1 and kw.get("input_pos") is not None:
            verified.append((int(kw["input_pos"].max()), kw["cache"].whole_k[0].shape[2]))
        return forward(ids, **kw)

    monkeypatch.setattr(spec.model, "forward", watch)
    want, got = run(plain, body), run(spec, body)
    assert got == want and want["usage"]["completion_tokens"] == body["max_tokens"]
    assert accepted_and_rejected(spec, {"accepted": 0, "proposed": 0})[0] > 100
    assert all(last < length <= P for last, length in verified)
    assert max(last for last, _ in verified) >= P - 4, "speculation ran up to the cache's end"


def test_bfloat16_speculation_is_exact(smollm2_dir):
    """bfloat16: the verify forward attends one position at a time (the decode step's own attention) and its
    products run in row tiles (llama32/tiles.py), so its logits are bit for bit a one-position step's: answers
    and log-probabilities equal the plain loop's, alone and four callers at once. Prompts whose answers parted
    from the plain ones with one fused attention call (benchmarks/RESULTS.md, 2026-11-25) match to the bit."""
    plain = llama32.load(smollm2_dir, dtype="bfloat16", device="cpu")
    if plain.model.cpu_path == "widened":
        pytest.skip("bfloat16 on a CPU without native bfloat16 (AVX2 only) is not row-invariant (docs/API.md)")
    spec = llama32.load(smollm2_dir, dtype="bfloat16", device="cpu", speculative="ngram")
    assert spec.loop.speculator.per_position and plain.model.row_invariant and spec.model.row_invariant
    prompts = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
               "Explain why the sky is blue to a ten-year-old, in a few paragraphs.",
               f"From the text below, list the invoice number, seller, buyer and warehouse.\n\n{TEXT}"]
    requests = [dict(prompt=prompt, max_tokens=48, logprobs=True, top_logprobs=2, **knobs) for prompt in prompts
                for knobs in (dict(temperature=0), dict(temperature=0.8, seed=9, frequency_penalty=0.3))]
    want = [run(plain, r) for r in requests]
    before = spec.loop.speculator.stats.as_dict()
    got = [run(spec, r) for r in requests]
    assert accepted_and_rejected(spec, before)[0] > 20
    assert without_cached(got) == without_cached(want)  # log-probabilities included, to the bit
    together = in_threads(lambda r: run(spec, r), [(r,) for r in requests[:4]])
    assert without_cached(together) == without_cached(want[:4])


def test_ngram_rows_judge_a_proposal_by_the_length_of_its_match():
    """A proposal after a 4-token match is worth a verify from the start; one after a 1-token match is not
    (measured acceptance: engine/speculative/speculator.py, NGRAM_PRIOR), until the row shows otherwise."""
    import torch

    from llama32.engine.loop import Job
    from llama32.engine.speculative import Speculator

    class Handle:
        device, dtype = torch.device("cpu"), torch.float32

    handle = Handle()
    speculator = Speculator(handle, "ngram")

    def asks(prompt: list[int]) -> int:
        job = Job()
        job.req = type("Req", (), {"prompt_ids": prompt})()
        job.spec = speculator._new_state(job)
        return speculator._ask(job, 8)

    long_match = [5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 5, 6, 7, 8]  # (5, 6, 7, 8) again: 9, 10, 11, ... follow
    short_match = [5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3, 4, 8]  # only (8,) occurred before
    assert asks(long_match) >= 3
    assert asks(short_match) == 0


# --- tiny random checkpoints sharing the Llama 3 tokenizer --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(make_checkpoint, llama3_tokenizer_dir):
    target = make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir, seed=0)
    draft = make_checkpoint(kind="llama31", tokenizer_dir=llama3_tokenizer_dir, seed=3)
    return target, draft


def tiny_requests() -> list[dict]:
    tools = [{"name": "get_weather", "description": "Weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    return [
        dict(prompt="One two three four", raw=True, max_tokens=40, temperature=0),
        dict(prompt="Alpha beta gamma", raw=True, max_tokens=40, temperature=0, repetition_penalty=1.3,
             frequency_penalty=0.5),
        dict(prompt="Hello there", raw=True, max_tokens=30, temperature=1.0, seed=7, top_p=0.95,
             presence_penalty=0.4, logprobs=True, top_logprobs=4),
        dict(prompt="The weather", raw=True, max_tokens=30, temperature=0.8, seed=21, stream=True),
        dict(prompt="What's the weather in Paris?", tools=tools, max_tokens=24, temperature=0),
    ]


@pytest.mark.parametrize("which", ["draft", "self"])
def test_tiny_pair_changes_nothing(tiny_pair, which):
    """A random draft's proposals are (nearly) all rejected, the target's own (nearly) all accepted: both
    exact. ("ngram" is SmolLM2's test: a random model's text never repeats itself.)"""
    target, draft = tiny_pair
    plain = llama32.load(target, dtype="float32", device="cpu")
    source = {"draft": draft, "self": target}[which]
    spec = llama32.load(target, dtype="float32", device="cpu", speculative=source)
    assert (spec.loop.speculator.draft is spec) == (which == "self")
    requests = tiny_requests()
    requests.append(with_stop(plain, requests[0]))
    check_equal(plain, spec, requests)
    accepted, rejected = accepted_and_rejected(spec, {"accepted": 0, "proposed": 0})
    if which == "draft":
        assert rejected > 20
    else:
        assert accepted > 100 and accepted > 5 * rejected


def test_lora_rows_are_verified_with_their_adapter(tiny_pair, tmp_path):
    target, _ = tiny_pair
    a = str(write_adapter(target, tmp_path / "a", seed=1))
    b = str(write_adapter(target, tmp_path / "b", seed=2, r=8, lora_alpha=16))
    plain = llama32.load(target, dtype="float32", device="cpu")
    spec = llama32.load(target, dtype="float32", device="cpu", speculative=str(target))  # the base model drafts
    requests = [dict(prompt=p, raw=True, temperature=t, seed=3, max_tokens=24, **({"lora": lo} if lo else {}))
                for p, t in (("Hello there", 0), ("One two three", 0.8)) for lo in (None, a, b)]
    want = [run(plain, r) for r in requests]
    assert len({w["response"] for w in want[:3]}) == 3  # each adapter changes the answer
    assert same([run(spec, r) for r in requests], want)
    assert same(in_threads(lambda r: run(spec, r), [(r,) for r in requests]), want)
    accepted, rejected = accepted_and_rejected(spec, {"accepted": 0, "proposed": 0})
    assert accepted > 10 and rejected > 10  # the base model's proposals: right for plain rows, not adapted ones


def test_plain_rows_keep_the_compiled_step(tiny_pair, monkeypatch):
    """With the compiled step on, steps without proposals still run compiled; verify steps run eagerly; the
    answers are the eager plain loop's. (A random draft: its rows stop proposing after a few misses, so both
    kinds of step happen.)"""
    target, draft = tiny_pair
    monkeypatch.setenv("LLAMA32_CPU_PACK", "0")  # inductor traces dense weights
    plain = llama32.load(target, dtype="float32", device="cpu", max_batch=1)
    spec = llama32.load(target, dtype="float32", device="cpu", max_batch=1, speculative=str(draft))
    monkeypatch.undo()
    # short enough that every step attends over the same 16 positions: one graph to compile
    requests = [dict(prompt="One two three four", raw=True, max_tokens=10, temperature=0),
                dict(prompt="Hello there", raw=True, max_tokens=10, temperature=0.9, seed=2, frequency_penalty=0.2)]
    want = [run(plain, r) for r in requests]
    spec.compiled = True
    got = [run(spec, r) for r in requests]
    assert spec.compiled, "compiling did not fail"
    assert got == want
    assert set(spec.compiled_shapes) == {(1, 16)}, "plain steps ran compiled"
    assert spec.loop.speculator.stats.verify_steps > 0


# --- bad values ---------------------------------------------------------------------------------------------------


def test_bad_speculative_values_fail_at_load_naming_it(smollm2_dir, make_checkpoint, llama3_tokenizer_dir,
                                                       tmp_path, monkeypatch):
    import llama32.api as api

    def never(*a, **k):
        raise AssertionError("the model was loaded before `speculative` was checked")

    with monkeypatch.context() as m:  # values wrong in themselves fail before the model loads
        m.setattr(api, "load_model", never)
        for value in (42, True, ["ngram"]):
            with pytest.raises(ValueError, match="speculative"):
                llama32.load(smollm2_dir, speculative=value)
        with pytest.raises(CheckpointError, match="speculative.*no such directory"):
            llama32.load(smollm2_dir, speculative=str(tmp_path / "no" / "such" / "dir"))
        (tmp_path / "empty").mkdir()
        with pytest.raises(CheckpointError, match="speculative.*not a checkpoint"):
            llama32.load(smollm2_dir, speculative=tmp_path / "empty")
        with pytest.raises(CheckpointError, match="speculative.*no such directory"):
            llama32.load(smollm2_dir, speculative="NGRAM")  # a typo is not taken for a draft
    # drafts that cannot serve this model: another tokenizer, none at all, a broken checkpoint
    llama3_tiny = make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir)
    with pytest.raises(CheckpointError, match="speculative.*another tokenizer"):
        llama32.load(smollm2_dir, dtype="float32", speculative=llama3_tiny)
    with pytest.raises(CheckpointError, match="speculative.*no tokenizer"):
        llama32.load(llama3_tiny, dtype="float32", speculative=make_checkpoint(kind="llama31"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="speculative.*cannot be loaded"):
        llama32.load(llama3_tiny, dtype="float32", speculative=broken)
    assert smollm2_dir and llama32.load(llama3_tiny, dtype="float32").loop.speculator is None  # off by default


# --- the command line ---------------------------------------------------------------------------------------------


def test_cli_speculative_flag(tiny_pair, tmp_path):
    from test_cli import assert_clean_error, run_cli

    target, draft = tiny_pair
    args = ["--model", str(target), "--raw", "--temperature", "0", "--max-tokens", "12", "--json", "--dtype",
            "float32", "Hello there"]
    plain = run_cli(*args)
    assert plain.returncode == 0, plain.stderr
    for value in ("ngram", str(draft)):
        spec = run_cli("--speculative", value, *args)
        assert spec.returncode == 0, spec.stderr
        assert spec.stdout == plain.stdout
    line = assert_clean_error(run_cli("--speculative", str(tmp_path), *args), 1)
    assert "speculative" in line and "not a checkpoint" in line


def test_serve_passes_speculative_to_load(monkeypatch):
    import llama32.server
    from llama32.__main__ import main

    seen = {}
    monkeypatch.setattr(llama32.server, "serve", lambda model, **kw: seen.update(kw, model=model))
    assert main(["serve", "--model", "some/dir", "--speculative", "ngram"]) == 0
    assert seen["speculative"] == "ngram" and seen["model"] == "some/dir"
    assert main(["serve", "--model", "some/dir"]) == 0
    assert seen["speculative"] is None
