"""A schedule fuzzer for the generation loop: random requests fired from threads at random moments, each result
checked against the same request run alone.

    python benchmarks/schedule_fuzz.py --minutes 120            # the soak: schedules until the time is up
    python benchmarks/schedule_fuzz.py --schedules 20 --seed 7  # a fixed number, from a seed

One schedule (`run_schedule`): a handle under test with a small `max_batch` and a KV budget drawn from tight
(rows pause, resume, chunk and reuse prefixes) to ample (the batch fills up), and 6-14 calls fired from threads,
in bursts and at random delays: `generate` (blocking), streams read to the end, streams closed after k chunks
(cancellation mid-prefill, mid-decode or while queued), `score` of long texts (prefilled in chunks beside
decoding rows), `generate_batch`; greedy, seeded and penalised sampling, JSON-constrained rows, prompts
sharing long prefixes. Optionally a fault: the n-th prefill or decode forward raises.

Checks, for every call: a finished result equals the same request run alone on an oracle handle with an
ample budget (text, token counts and finish reason exactly; log-probabilities within 1e-4); a closed stream's
text is a prefix of the solo answer; with a fault injected, a call either equals its solo result or fails with
the injected error. At the end nobody hangs and `stats()` is back to zero running, waiting and paused, the
KV bytes those the prefix index keeps.

SmolLM2-135M-Instruct (real weights, tests/fixtures.py builds it) on the CPU, in float32 or (`--dtype bfloat16`)
bfloat16. tests/test_schedules.py runs a few schedules in the suite.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import llama32  # noqa: E402

HANG_S = 240  # a call not finished after this long counts as a hang

PREFIX = ("You are the archivist of a small maritime museum. Visitors ask about ships, harbours, lighthouses and "
          "the people who kept them. Answer in two or three sentences, plainly, and say so when the records are "
          "silent. ") * 3
TAILS = ["Who kept the north light?", "What is a brigantine?", "Name a famous harbour.", "Why do ships have bells?",
         "Describe a storm at sea.", "List three knots.", "What did a purser do?", "Tell me about fog horns."]
WORDS = ("harbour tide lantern rope keel anchor gull pier mast sail compass chart reef swell beacon hull").split()


def chatml(system: str | None, user: str) -> str:
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def long_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Call:
    kind: str  # generate, stream, close, score, batch
    request: Any  # a request dict, a list of them (batch), or (text, context) for score
    delay: float  # seconds after the schedule starts
    close_after: int = 0  # stream chunks read before closing (close)


def make_calls(rng: random.Random, n: int) -> list[Call]:
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
            calls.append(Call("batch", [request(rng) for _ in range(rng.randint(2, 3))], delay))
        else:
            calls.append(Call(kind, request(rng), delay, close_after=rng.randint(0, 6)))
    return calls


def request(rng: random.Random) -> dict:
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


def same_logprobs(got, want) -> str | None:
    if (got is None) != (want is None):
        return "logprobs present in one only"
    for i, (g, w) in enumerate(zip(got or [], want or [], strict=True)):
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


class Injected(RuntimeError):
    """The fault a schedule injects."""


@dataclass
class Report:
    schedules: int = 0
    requests: int = 0
    mismatches: list = field(default_factory=list)
    hangs: int = 0
    leaked_bytes: int = 0
    injected_failures: int = 0
    errors: list = field(default_factory=list)

    def add(self, other: "Report") -> None:
        self.schedules += other.schedules
        self.requests += other.requests
        self.mismatches += other.mismatches
        self.hangs += other.hangs
        self.leaked_bytes += other.leaked_bytes
        self.injected_failures += other.injected_failures
        self.errors += other.errors

    def as_dict(self) -> dict:
        return {"schedules": self.schedules, "requests": self.requests, "mismatches": len(self.mismatches),
                "hangs": self.hangs, "leaked_bytes": self.leaked_bytes, "injected_failures": self.injected_failures,
                "unexpected_errors": len(self.errors), "first_mismatches": self.mismatches[:5],
                "first_errors": self.errors[:5]}


def run_schedule(llm, oracle: Oracle, seed: int, *, calls: int | None = None, fault: str | None = None) -> Report:
    """One schedule on `llm` (its budget and batch as loaded): see the module docstring."""
    rng = random.Random(seed)
    plan = make_calls(rng, calls or rng.randint(6, 14))
    report = Report(schedules=1)
    outcomes: list[tuple[Call, str, Any]] = [None] * len(plan)  # type: ignore[list-item]
    restore = inject(llm, fault, rng) if fault else None
    start = time.monotonic()

    def work(i: int, call: Call) -> None:
        time.sleep(max(0.0, start + call.delay - time.monotonic()))
        try:
            if call.kind == "generate":
                outcomes[i] = (call, "ok", llama32.generate(llm, **call.request))
            elif call.kind in ("stream", "close"):
                stream = llama32.generate(llm, **dict(call.request, stream=True))
                chunks = []
                for chunk in stream:
                    chunks.append(chunk)
                    if call.kind == "close" and len(chunks) >= call.close_after:
                        stream.close()
                        break
                outcomes[i] = (call, "ok", chunks)
            elif call.kind == "score":
                text, context = call.request
                outcomes[i] = (call, "ok", llama32.score(llm, text, context=context))
            else:
                outcomes[i] = (call, "ok", llama32.generate_batch(llm, call.request))
        except Injected as e:
            outcomes[i] = (call, "injected", e)
        except BaseException as e:  # noqa: BLE001
            outcomes[i] = (call, "error", e)

    threads = [threading.Thread(target=work, args=(i, c), daemon=True) for i, c in enumerate(plan)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + HANG_S
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    report.hangs = sum(t.is_alive() for t in threads)
    if restore:
        restore()
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
        problem = check(oracle, call, value)
        if problem:
            report.mismatches.append(f"{where}: {problem}")
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
    return max(0, stats["kv_bytes"] - llm.loop.prefixes.bytes - _idle_rows_bytes(llm))


def _idle_rows_bytes(llm) -> int:
    """The rows' cache an idle loop may keep allocated for its next request (not a leak: it holds no row)."""
    loop = llm.loop
    return 0 if loop.release_when_idle else loop._rows_bytes()


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
    text = "".join(c.get("response", "") for c in value)
    if call.kind == "close" and not (value and "usage" in value[-1]):  # closed before its last chunk
        return None if want["response"].startswith(text) else f"closed stream {text!r} is not a prefix of " \
                                                                f"{want['response']!r}"
    if text != want["response"]:
        return f"stream text {text!r} != {want['response']!r}"
    return None


def inject(llm, fault: str, rng: random.Random):
    """Make the n-th prefill or decode forward of `llm`'s runner raise `Injected`; returns the undo."""
    runner = llm.loop.runner
    name = {"prefill": "prefill_rows", "decode": "decode", "prefill1": "prefill"}[fault]
    real = getattr(runner, name)
    count = {"n": 0, "at": rng.randint(1, 6)}

    def failing(*args, **kwargs):
        count["n"] += 1
        if count["n"] == count["at"]:
            raise Injected(f"injected failure of {name} #{count['at']}")
        return real(*args, **kwargs)

    setattr(runner, name, failing)
    return lambda: setattr(runner, name, real)


def handles(smollm2_dir, *, max_batch: int, budget: str, dtype: str = "float32"):
    """A SmolLM2 handle to fuzz. budget: "tight" (1,800 positions in all) or "ample" (the default). In bfloat16
    the oracle must be bfloat16 too: a row's answer alone and beside others is the same to the bit there as
    well (the CPU's row tiles and attention padding, model.py)."""
    from llama32.engine.loop import position_bytes
    from llama32.config import LlamaConfig
    import torch

    config = LlamaConfig.from_file(Path(smollm2_dir) / "config.json")
    per = position_bytes(config, getattr(torch, dtype))
    kv = {"tight": 1800 * per, "ample": None}[budget]
    llm = llama32.load(smollm2_dir, dtype=dtype, device="cpu", max_batch=max_batch, kv_cache_bytes=kv)
    return llm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=0, help="run schedules until this much time has passed")
    ap.add_argument("--schedules", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--out", default=str(HERE / "out" / "schedule_fuzz.json"))
    args = ap.parse_args()
    import fixtures

    ckpt = fixtures.build_smollm2_checkpoint()
    oracle = Oracle(llama32.load(ckpt, dtype=args.dtype, device="cpu", max_batch=1))
    under = {(b, budget): handles(ckpt, max_batch=b, budget=budget, dtype=args.dtype)
             for b in (2, 3) for budget in ("tight", "ample")}
    total, started, seed = Report(), time.monotonic(), args.seed
    while (time.monotonic() - started < args.minutes * 60) if args.minutes else (total.schedules < args.schedules):
        rng = random.Random(seed)
        llm = under[(rng.choice([2, 3]), rng.choice(["tight", "ample"]))]
        fault = rng.choice([None, None, None, "prefill", "decode", "prefill1"])
        one = run_schedule(llm, oracle, seed, fault=fault)
        total.add(one)
        print(f"seed {seed}: {json.dumps(one.as_dict())}", flush=True)
        seed += 1
        if one.hangs:
            break  # a hung loop leaves the handle unusable for the next schedules
    result = dict(total.as_dict(), minutes=(time.monotonic() - started) / 60)
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
