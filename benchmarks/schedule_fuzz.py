"""A schedule fuzzer for the generation loop: random requests fired from threads at random moments, each result
checked against the same request run alone.

    python benchmarks/schedule_fuzz.py --minutes 120            # the soak: schedules until the time is up
    python benchmarks/schedule_fuzz.py --schedules 20 --seed 7  # a fixed number, from a seed

One schedule (`run_schedule`) runs on one handle under test: a small `max_batch` (2 or 3), a KV budget drawn
from tight (rows pause, resume, chunk and reuse prefixes) to ample (the batch fills up), a prefill chunk (64,
40 or 24 tokens beside decoding rows), and optionally speculative decoding ("ngram", or SmolLM2 drafting for
itself). 6-14 calls are fired from threads, in bursts and at random delays: `generate` (blocking), streams
read to the end, streams closed after k chunks or from another thread at a random moment, `score` of long
texts (prefilled in chunks beside decoding rows), `generate_batch`. Requests are greedy, seeded or penalised,
some JSON-constrained, many sharing a long system prompt; a schedule's `Mix` may add rows naming a LoRA
adapter beside base rows, and prompts asking to repeat a text (what n-gram proposals are accepted on), and
next turns: once a `generate` call's answer is in, its prompt, that answer and a new question (the prefix
index may serve the answer's keys and values). Closing at a random moment lands while the request waits behind
a full batch, between prompt chunks, while it is paused for memory, or (speculative handles) between verify
steps: where exactly is not observed, so the mix is wide.

A schedule may inject one fault into the handle under test, at its n-th occasion (`inject`):
- a forward: the runner's `prefill_rows`, `prefill` (one row's chunk), `decode` or `verify` (speculation)
  raises;
- an allocation: making or resizing the rows' KV cache (`engine.memory.Rows`) raises;
- a delivery: pushing a token into one request's output (`output.Output.push`) raises.
Only the handle under test fails: the oracle's calls of the same methods run untouched.

Checks, for every call: a finished result equals the same request (same adapter) run alone on an oracle handle
with an ample budget and no speculation: text, token counts, finish reason exactly, log-probabilities within
1e-4, in float32 and in bfloat16 (where the engine's answers are the same to the bit; speculation is token for
token the plain loop's in both). A closed stream's text and log-probabilities are a prefix of the solo answer's.
With a fault, a call either equals its solo result or fails with the injected error (`Injected`, or an error
caused by it), and no more calls fail than the fault's occasion concerned (one for a delivery or a one-row
prefill, `max_batch` otherwise). At the end nobody hangs and `stats()` is back to zero running, waiting and
paused, the KV bytes those the prefix index keeps.

SmolLM2-135M-Instruct (real weights, tests/fixtures.py builds it) on the CPU, in float32, (`--dtype bfloat16`)
bfloat16 or (`--dtype both`) each in turn, schedule by schedule, the report counting each apart; the LoRA adapter
is made by PEFT (random, from a fixed seed) and cached beside the checkpoint. In bfloat16 about a third of the
handles keep their decode steps on the masked kernel (`LLAMA32_STEP_ATTENTION=masked`), a fifth attend written
out, and the rest take the fused kernel where the load-time check verifies it (else written out, model.py); each
is checked against an oracle on the same path.
tests/test_schedules.py runs a few schedules in the suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import llama32  # noqa: E402
from llama32.engine import BLOCK  # noqa: E402

HANG_S = 240  # a call not finished after this long counts as a hang

PREFIX = ("You are the archivist of a small maritime museum. Visitors ask about ships, harbours, lighthouses and "
          "the people who kept them. Answer in two or three sentences, plainly, and say so when the records are "
          "silent. ") * 3
TAILS = ["Who kept the north light?", "What is a brigantine?", "Name a famous harbour.", "Why do ships have bells?",
         "Describe a storm at sea.", "List three knots.", "What did a purser do?", "Tell me about fog horns."]
WORDS = ("harbour tide lantern rope keel anchor gull pier mast sail compass chart reef swell beacon hull").split()
FAULTS = ("prefill", "decode", "prefill1", "alloc", "deliver", "verify")  # "verify": speculative handles only


def chatml(system: str | None, user: str) -> str:
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def long_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Mix:
    """What a schedule's requests draw beyond the plain ones. The extra draws come from a second random stream
    (`extras`), so a seed's plain schedule stays the same with or without them."""

    lora: str | None = None  # an adapter folder that about half the requests name
    copy: float = 0.0  # the share of prompts asking to repeat a text (where n-gram proposals are accepted)
    timed_closes: bool = False  # half the closed streams are closed from another thread at a random moment
    follow: float = 0.0  # the share of `generate` calls followed by a next turn that sends their answer back
    # a paused row's drawn blocks kept for its resume alone, as where a decode step is not a span (AMX;
    # engine/memory.py, `KVMemory.pause`), whatever this CPU's path says: `memory.answers` off for the schedule
    own_pauses: bool = False
    # the prompt tokens an iteration computes beside decoding rows (the loop's `prefill_chunk`) for the schedule,
    # None: the handle's own; chunks shorter than a prompt span's products pad to (`model.span_unit`) are what
    # rows decoding together round up (`Scheduler.prefill_budget`)
    prefill_chunk: int | None = None


@dataclass
class Call:
    kind: str  # generate, stream, close, score, batch
    request: Any  # a request dict, a list of them (batch), or (text, context) for score
    delay: float  # seconds after the schedule starts
    close_after: int | None = 0  # stream chunks read before closing (close); None: read until closed
    close_at: float | None = None  # seconds after the call starts when another thread closes the stream
    parent: int | None = None  # a next turn: the call whose answer it sends back (its request is made from it)


def extras(seed: int) -> random.Random:
    return random.Random(f"extras {seed}")


def make_calls(rng: random.Random, n: int, mix: Mix = Mix(), more: random.Random | None = None) -> list[Call]:
    more = more or extras(0)
    calls = []
    burst = 0.0
    for _ in range(n):
        if rng.random() < 0.4:  # a new burst: calls sent together
            burst += rng.uniform(0.05, 1.5)
        delay = burst + (rng.uniform(0, 0.02) if rng.random() < 0.6 else rng.uniform(0, 0.8))
        kind = rng.choices(["generate", "stream", "close", "score", "batch"], [4, 3, 2, 2, 1])[0]
        if kind == "score":
            calls.append(Call("score", (long_text(rng, rng.randint(40, 700)), rng.choice(["Notes:", PREFIX])), delay))
        elif kind == "batch":
            calls.append(Call("batch", [request(rng, mix, more) for _ in range(rng.randint(2, 3))], delay))
        else:
            call = Call(kind, request(rng, mix, more), delay, close_after=rng.randint(0, 6))
            if kind == "close" and mix.timed_closes and more.random() < 0.5:
                # soon (still queued behind a full batch, or gathering) or later (mid-chunk, paused, verifying)
                call.close_after = None
                call.close_at = more.uniform(0, 0.05) if more.random() < 0.4 else more.uniform(0.05, 1.5)
            calls.append(call)
    if mix.follow:  # next turns, fired as soon as their call's answer is in (drawn last: the calls above stay)
        calls += [Call("generate", None, c.delay, parent=i) for i, c in enumerate(list(calls))
                  if c.kind == "generate" and more.random() < mix.follow]
    return calls


def next_turn(request: dict, answer: str) -> dict:
    """A conversation's next turn after `request` was answered `answer`: its prompt, the answer and a new
    question (the prefix index may serve the answer's positions: engine/memory.py, `finished`)."""
    prompt = request["prompt"] + answer + "<|im_end|>\n" + chatml(None, "Tell me more about that.")
    return dict(request, prompt=prompt)


def request(rng: random.Random, mix: Mix = Mix(), more: random.Random | None = None) -> dict:
    system = rng.choice([PREFIX, PREFIX, None, "Be brief."])
    user = rng.choice(TAILS)
    if rng.random() < 0.2:
        user += " " + long_text(rng, rng.randint(50, 400))
    r: dict[str, Any] = dict(prompt=chatml(system, user), raw=True, max_tokens=rng.randint(4, 40))
    style = rng.choice(["greedy", "greedy", "seeded", "penalised", "json"])
    if style == "greedy":
        r.update(temperature=0)
    elif style == "seeded":
        r.update(temperature=rng.choice([0.7, 1.0]), seed=rng.randint(0, 10_000), top_p=rng.choice([1.0, 0.9]),
                 top_k=rng.choice([40, 50]))
    elif style == "penalised":
        r.update(temperature=0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
    else:
        r.update(temperature=0, response_format={"type": "json_object"}, max_tokens=rng.randint(8, 24))
    if rng.random() < 0.3:
        r.update(logprobs=True, top_logprobs=rng.choice([0, 2]))
    more = more or extras(0)
    if more.random() < mix.copy:
        words = long_text(more, more.randint(15, 60))
        r["prompt"] = chatml(system, f"Repeat the following text exactly, word for word:\n\n{words}")
        if style != "json":
            r["max_tokens"] = more.randint(20, 60)
    if mix.lora and more.random() < 0.5:
        r["lora"] = mix.lora
    return r


def key(x: Any) -> str:
    return json.dumps(x, sort_keys=True)


class Oracle:
    """Each request's result run alone, on a handle with an ample budget, computed once."""

    def __init__(self, llm):
        self.llm, self.done, self.lock = llm, {}, threading.Lock()

    def generate(self, r: dict) -> dict:
        with self.lock:
            k = key(r)
            if k not in self.done:
                self.done[k] = llama32.generate(self.llm, **dict(r, stream=False))
            return self.done[k]

    def score(self, text: str, context: str) -> dict:
        with self.lock:
            k = key(["score", text, context])
            if k not in self.done:
                self.done[k] = llama32.score(self.llm, text, context=context)
            return self.done[k]


def same_result(got: dict, want: dict) -> str | None:
    """None when equal as the guarantee says, else what differs."""
    for name in ("response", "finish_reason", "tool_calls"):
        if got.get(name) != want.get(name):
            return f"{name}: {got.get(name)!r} != {want.get(name)!r}"
    gu, wu = dict(got.get("usage", {})), dict(want.get("usage", {}))
    gu.pop("cached_tokens", None), wu.pop("cached_tokens", None)
    if gu != wu:
        return f"usage {gu} != {wu}"
    return same_logprobs(got.get("logprobs"), want.get("logprobs"))


def same_logprobs(got, want, *, prefix: bool = False) -> str | None:
    """`prefix`: `got` may stop short of `want` (a closed stream)."""
    if (got is None) != (want is None):
        return "logprobs present in one only"
    got, want = got or [], want or []
    if prefix and len(got) <= len(want):
        want = want[:len(got)]
    if len(got) != len(want):
        return f"{len(got)} logprob entries != {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g.get("id", g.get("token")) != w.get("id", w.get("token")):
            return f"token {i}: {g} != {w}"
        if abs(g["logprob"] - w["logprob"]) > 1e-4:
            return f"token {i}: logprob {g['logprob']} != {w['logprob']}"
        gt, wt = g.get("top_logprobs") or [], w.get("top_logprobs") or []
        if [t["id"] for t in gt] != [t["id"] for t in wt] or any(
                abs(a["logprob"] - b["logprob"]) > 1e-4 for a, b in zip(gt, wt)):
            return f"token {i}: top_logprobs differ"
    return None


def same_score(got: dict, want: dict) -> str | None:
    for name in ("ids", "tokens", "is_greedy"):
        if got[name] != want[name]:
            return f"score {name} differ"
    worst = max((abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"])), default=0.0)
    return None if worst <= 1e-4 else f"score logprobs differ by up to {worst:.3g}"


def collected(chunks: list[dict], logprobs: bool) -> dict:
    """A stream's chunks as one result (as `generate` without `stream` gathers them); a stream closed early
    has no finish_reason or usage."""
    last = chunks[-1] if chunks else {}
    result = {"response": "".join(c.get("response", "") for c in chunks), "tool_calls": last.get("tool_calls", []),
              "finish_reason": last.get("finish_reason"), "usage": last.get("usage")}
    if logprobs:
        result["logprobs"] = [e for c in chunks for e in c.get("logprobs", [])]
    return result


class Injected(RuntimeError):
    """The fault a schedule injects."""


def injected(error: BaseException | None) -> bool:
    """`error` is the injected fault, or was caused by it."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Injected):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


@dataclass
class Report:
    schedules: int = 0
    requests: int = 0
    mismatches: list = field(default_factory=list)
    hangs: int = 0
    leaked_bytes: int = 0
    injected_failures: int = 0
    errors: list = field(default_factory=list)
    faults_fired: int = 0  # injected faults that reached their occasion
    closed_early: int = 0  # streams closed before their last chunk
    lora_rows: int = 0  # requests naming the adapter
    spec_accepted: int = 0  # proposals the handle's speculation accepted during the schedule
    next_turns: int = 0  # next turns that ran (`Mix.follow`)
    answers_reused: int = 0  # next turns that copied stored blocks past their first turn's prompt

    def add(self, other: "Report") -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict:
        return {"schedules": self.schedules, "requests": self.requests, "mismatches": len(self.mismatches),
                "hangs": self.hangs, "leaked_bytes": self.leaked_bytes, "injected_failures": self.injected_failures,
                "unexpected_errors": len(self.errors), "faults_fired": self.faults_fired,
                "closed_early": self.closed_early, "lora_rows": self.lora_rows, "spec_accepted": self.spec_accepted,
                "next_turns": self.next_turns, "answers_reused": self.answers_reused,
                "first_mismatches": self.mismatches[:5], "first_errors": self.errors[:5]}


def run_schedule(llm, oracle: Oracle, seed: int, *, calls: int | None = None, fault: str | None = None,
                 mix: Mix = Mix()) -> Report:
    """One schedule on `llm` (its budget, batch and speculation as loaded): see the module docstring."""
    rng, more = random.Random(seed), extras(seed)
    plan = make_calls(rng, calls or rng.randint(6, 14), mix, more)
    report = Report(schedules=1)
    outcomes: list[tuple[Call, str, Any]] = [None] * len(plan)  # type: ignore[list-item]
    spec = llm.loop.speculator
    accepted = spec.stats.accepted if spec is not None else 0
    fired, restore = inject(llm, fault, rng) if fault else ([0], None)
    answers = llm.loop.memory.answers  # (the loop is idle between schedules)
    llm.loop.memory.answers = answers and not mix.own_pauses
    chunk = llm.loop.prefill_chunk
    llm.loop.prefill_chunk = mix.prefill_chunk or chunk
    start = time.monotonic()

    def work(i: int, call: Call) -> None:
        time.sleep(max(0.0, start + call.delay - time.monotonic()))
        if call.parent is not None:  # a next turn: once its call's answer is in, and only if it has one
            while outcomes[call.parent] is None and time.monotonic() < start + HANG_S:
                time.sleep(0.01)
            done = outcomes[call.parent]
            if done is None or done[1] != "ok":
                return
            call.request = next_turn(plan[call.parent].request, done[2]["response"])
        try:
            if call.kind == "generate":
                outcomes[i] = (call, "ok", llama32.generate(llm, **call.request))
            elif call.kind in ("stream", "close"):
                stream = llama32.generate(llm, **dict(call.request, stream=True))
                if call.close_at is not None:
                    threading.Timer(call.close_at, stream.close).start()
                chunks = []
                for chunk in stream:
                    chunks.append(chunk)
                    if call.kind == "close" and call.close_after is not None and len(chunks) >= call.close_after:
                        stream.close()
                        break
                outcomes[i] = (call, "ok", chunks)
            elif call.kind == "score":
                text, context = call.request
                outcomes[i] = (call, "ok", llama32.score(llm, text, context=context))
            else:
                outcomes[i] = (call, "ok", llama32.generate_batch(llm, call.request))
        except BaseException as e:  # noqa: BLE001
            outcomes[i] = (call, "injected" if injected(e) else "error", e)

    threads = [threading.Thread(target=work, args=(i, c), daemon=True) for i, c in enumerate(plan)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + HANG_S
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    report.hangs = sum(t.is_alive() for t in threads)
    if restore:
        restore()
    if not report.hangs:
        llm.loop.memory.answers, llm.loop.prefill_chunk = answers, chunk
    report.faults_fired = fired[0]
    report.spec_accepted = spec.stats.accepted - accepted if spec is not None else 0
    report.lora_rows = sum("lora" in r for c in plan if c.kind != "score" and c.request is not None
                           for r in (c.request if c.kind == "batch" else [c.request]))
    for i, out in enumerate(outcomes):
        if out is None:
            continue
        call, status, value = out
        report.requests += len(call.request) if call.kind == "batch" else 1
        where = f"seed {seed} call {i} ({call.kind})"
        if status == "injected":
            report.injected_failures += 1
            continue
        if status == "error":
            report.errors.append(f"{where}: {type(value).__name__}: {value}")
            continue
        if call.kind == "close" and not (value and "usage" in value[-1]):
            report.closed_early += 1
        if call.parent is not None:
            report.next_turns += 1
            first_prompt = outcomes[call.parent][2]["usage"]["prompt_tokens"]
            report.answers_reused += value["usage"]["cached_tokens"] > first_prompt // BLOCK * BLOCK
        problem = check(oracle, call, value)
        if problem:
            report.mismatches.append(f"{where}: {problem}")
    most = 1 if fault in ("deliver", "prefill1") else llm.loop.max_batch
    if report.injected_failures > most:
        report.errors.append(f"seed {seed}: the {fault} fault failed {report.injected_failures} calls, more than "
                             f"the {most} it can concern")
    if report.injected_failures and not fired[0]:
        report.errors.append(f"seed {seed}: calls failed with the injected error, but the fault never fired")
    # the loop settles: nothing running, waiting or paused; KV memory is the prefix index's (an idle loop on
    # the CPU gives its rows' cache back on its next turn, a moment after the last row leaves)
    settle = time.monotonic() + 10
    while time.monotonic() < settle:
        stats = llm.loop.stats()
        if not (stats["running"] or stats["waiting"] or stats.get("paused")) and not _held(llm, stats):
            break
        time.sleep(0.02)
    stats = llm.loop.stats()
    if stats["running"] or stats["waiting"] or stats.get("paused"):
        report.errors.append(f"seed {seed}: the loop did not settle: {stats}")
    report.leaked_bytes = _held(llm, stats)
    return report


def _held(llm, stats: dict) -> int:
    """KV bytes in use beyond the prefix index's and an idle loop's rows."""
    return max(0, stats["kv_bytes"] - llm.loop.memory.prefixes.bytes - _idle_rows_bytes(llm))


def _idle_rows_bytes(llm) -> int:
    """The rows' cache an idle loop may keep allocated for its next request (not a leak: it holds no row)."""
    loop = llm.loop
    return 0 if loop.release_when_idle else loop.memory.rows_bytes()


def check(oracle: Oracle, call: Call, value: Any) -> str | None:
    if call.kind == "generate":
        return same_result(value, oracle.generate(call.request))
    if call.kind == "batch":
        for got, r in zip(value, call.request, strict=True):
            problem = same_result(got, oracle.generate(r))
            if problem:
                return problem
        return None
    if call.kind == "score":
        return same_score(value, oracle.score(*call.request))
    want = oracle.generate(call.request)
    got = collected(value, bool(call.request.get("logprobs")))
    if call.kind == "close" and got["usage"] is None:  # closed before its last chunk
        if not want["response"].startswith(got["response"]):
            return f"closed stream {got['response']!r} is not a prefix of {want['response']!r}"
        return same_logprobs(got.get("logprobs"), want.get("logprobs"), prefix=True)
    return same_result(got, want)


def inject(llm, fault: str, rng: random.Random) -> tuple[list[int], Any]:
    """Make the n-th occasion of `fault` (module docstring) on `llm` raise `Injected`; the same methods called
    for another handle (the oracle) run as usual. Returns ([times fired], the undo)."""
    import weakref

    from llama32.engine.memory import Rows
    from llama32.output import Output

    loop = llm.loop
    count, fired = {"n": 0, "at": rng.randint(1, 6)}, [0]
    if fault == "deliver":  # tokens are many: the fault may come late in the schedule
        count["at"] = rng.randint(1, 150)

    def failing(real, what: str, ours):
        def call(*args, **kwargs):
            if ours(*args, **kwargs):
                count["n"] += 1
                if count["n"] == count["at"]:
                    fired[0] += 1
                    raise Injected(f"injected failure of {what} #{count['at']}")
            return real(*args, **kwargs)
        return call

    patches = []  # (owner, attribute, replacement)
    if fault in ("prefill", "decode", "prefill1", "verify"):  # the handle's own runner: patch the instance
        name = {"prefill": "prefill_rows", "decode": "decode", "prefill1": "prefill", "verify": "verify"}[fault]
        patches.append((loop.runner, name, failing(getattr(loop.runner, name), name, lambda *a, **k: True)))
    elif fault == "alloc":  # the class every handle's cache is: only the loop thread of `llm` allocates for it
        on_loop = lambda *a, **k: loop._thread is threading.current_thread()  # noqa: E731
        for name in ("__init__", "resize"):
            patches.append((Rows, name, failing(Rows.__dict__[name], f"Rows.{name}", on_loop)))
    else:  # "deliver": Output is every handle's; `llm`'s are known from their making (Output(llm, req))
        outputs, made = weakref.WeakSet(), Output.__init__

        def init(self, handle, *args, **kwargs):
            made(self, handle, *args, **kwargs)
            if handle is llm:
                outputs.add(self)
        patches.append((Output, "__init__", init))
        patches.append((Output, "push", failing(Output.push, "Output.push", lambda self, *a, **k: self in outputs)))
    undo = [(owner, name, vars(owner).get(name)) for owner, name, _ in patches]  # None: the class's method
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)

    def restore():
        for owner, name, real in undo:
            if real is None:
                delattr(owner, name)
            else:
                setattr(owner, name, real)
    return fired, restore


def build_adapter(smollm2_dir, cache: Path | None = None) -> Path:
    """A PEFT LoRA adapter for SmolLM2 (rank 4 on q, v, o and down projections), written by PEFT from random
    lora_A and lora_B (a fixed seed), lora_B scaled down so that answers change but stay sentences. Built once
    into the tests' cache (`fixtures.cache_dir()`); later calls return the folder."""
    import fixtures
    import torch
    from peft import LoraConfig, get_peft_model

    out = (cache or fixtures.cache_dir()) / "smollm2-lora-fuzz"
    with fixtures.file_lock(out.with_name(out.name + ".lock")):
        if (out / "adapter_model.safetensors").is_file():
            return out
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                            init_lora_weights=False)  # False: lora_B random too (PEFT's default zeroes it)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            model = get_peft_model(fixtures.hf_model(smollm2_dir), config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.3)
        model.save_pretrained(tmp)
        tmp.rename(out)
    return out


def handles(smollm2_dir, *, max_batch: int, budget: str, dtype: str = "float32", speculative: str | None = None,
            steps: str = "fused"):
    """A SmolLM2 handle to fuzz. budget: "tight" (1,800 positions in all) or "ample" (the default).
    speculative: None, "ngram" or "draft" (SmolLM2 drafting for itself). In bfloat16 the oracle must be
    bfloat16 too: a row's answer alone and beside others is the same to the bit there as well (the CPU's row
    tiles and attention padding, model.py). steps: the decode steps' attention in bfloat16 ("fused" on AMX where
    the load-time check verifies it, else "written"; "written"; or "masked": `model.choose_step_attention`), the
    oracle's alike (`load`)."""
    from llama32.engine.loop import position_bytes
    from llama32.config import LlamaConfig
    import torch

    config = LlamaConfig.from_file(Path(smollm2_dir) / "config.json")
    per = position_bytes(config, getattr(torch, dtype))
    kv = {"tight": 1800 * per, "ample": None}[budget]
    source = {None: None, "ngram": "ngram", "draft": str(smollm2_dir)}[speculative]
    return load(smollm2_dir, steps, dtype=dtype, device="cpu", max_batch=max_batch, kv_cache_bytes=kv,
                speculative=source)


def load(ckpt, steps: str = "fused", **kwargs):
    """`llama32.load` with decode steps' attention `steps` ("fused", "written" or "masked";
    LLAMA32_STEP_ATTENTION)."""
    before = os.environ.get("LLAMA32_STEP_ATTENTION")
    os.environ["LLAMA32_STEP_ATTENTION"] = steps
    try:
        return llama32.load(ckpt, **kwargs)
    finally:
        if before is None:
            del os.environ["LLAMA32_STEP_ATTENTION"]
        else:
            os.environ["LLAMA32_STEP_ATTENTION"] = before


def draw(rng: random.Random, adapter: str) -> tuple[tuple, str | None, Mix]:
    """The soak's pick for one schedule: the handle (batch, budget, speculation), the fault and the mix."""
    spec = rng.choice([None, None, "ngram", "draft"])
    kind = (rng.choice([2, 3]), rng.choice(["tight", "ample"]), spec)
    faults = [None, None, None] + [f for f in FAULTS if spec or f != "verify"]
    mix = Mix(lora=adapter if rng.random() < 0.4 else None, copy=0.6 if spec else rng.choice([0.0, 0.3]),
              timed_closes=True, follow=rng.choice([0.0, 0.5]))
    fault = rng.choice(faults)
    mix.own_pauses = rng.random() < 0.3  # drawn after the above, which stay what they were for a seed
    u = rng.random()  # bfloat16: also the masked decode attention, and written out where fused would verify
    steps = "masked" if u < 0.3 else "written" if u < 0.5 else "fused"
    mix.prefill_chunk = rng.choice([64, 64, 24, 40])
    return (*kind, steps), fault, mix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=0, help="run schedules until this much time has passed")
    ap.add_argument("--schedules", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "both"),
                    help="both: float32 and bfloat16 schedules in turn")
    ap.add_argument("--out", default=str(HERE / "out" / "schedule_fuzz.json"))
    args = ap.parse_args()
    import fixtures

    ckpt = fixtures.build_smollm2_checkpoint()
    adapter = str(build_adapter(ckpt))
    dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
    oracles: dict[tuple, Oracle] = {}  # (dtype, decode steps' attention) -> the oracle
    under: OrderedDict[tuple, Any] = OrderedDict()  # handles under test, the 4 most recently used
    total, started, seed = Report(), time.monotonic(), args.seed
    by_dtype = {d: Report() for d in dtypes}
    while (time.monotonic() - started < args.minutes * 60) if args.minutes else (total.schedules < args.schedules):
        dtype = dtypes[seed % len(dtypes)]
        kind, fault, mix = draw(random.Random(seed), adapter)
        key = (*kind, dtype)
        if key not in under:
            if len(under) >= 4:
                under.popitem(last=False)
            batch, budget, spec, steps = kind
            under[key] = handles(ckpt, max_batch=batch, budget=budget, dtype=dtype, speculative=spec, steps=steps)
        under.move_to_end(key)
        steps = under[key].model.step_attention
        if (dtype, steps) not in oracles:
            oracles[dtype, steps] = Oracle(load(ckpt, steps, dtype=dtype, device="cpu", max_batch=1))
        one = run_schedule(under[key], oracles[dtype, steps], seed, fault=fault, mix=mix)
        total.add(one)
        by_dtype[dtype].add(one)
        handle = {"dtype": dtype, "max_batch": kind[0], "budget": kind[1], "speculative": kind[2],
                  "lora": bool(mix.lora), "fault": fault, "own_pauses": mix.own_pauses, "steps": steps,
                  "prefill_chunk": mix.prefill_chunk}
        print(f"seed {seed}: {json.dumps(dict(handle, **one.as_dict()))}", flush=True)
        seed += 1
        if one.hangs:
            break  # a hung loop leaves the handle unusable for the next schedules
    result = dict(total.as_dict(), minutes=(time.monotonic() - started) / 60)
    if len(dtypes) > 1:
        result["by_dtype"] = {d: r.as_dict() for d, r in by_dtype.items()}
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
