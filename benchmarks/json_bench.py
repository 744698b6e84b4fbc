"""JSON mode's cost: decode throughput of 8 rows, half of them constrained by a JSON Schema, against 8 free
rows, in the same process, alternating rounds; and what compiling a schema costs.

    flock /tmp/llama32-heavy.lock python benchmarks/json_bench.py --ckpt benchmarks/out/ckpt-1b --dtype bfloat16
    python benchmarks/json_bench.py --ckpt <smollm2 dir> --dtype float32

--ckpt: a checkpoint folder (the random 1B of `bench.py`, written there with `python benchmarks/bench.py`
first, or any checkpoint); without it the random 1B is written to benchmarks/out/ckpt-1b.

Every row generates exactly its max_tokens: the end-of-sequence ids are banned with logit_bias (on every row,
both configurations, so both pay the same), and the constrained rows' schema asks for more items than fit, so
their JSON never completes before max_tokens. Decode throughput is measured as the difference between a long
and a short run of the same batch ((tokens_long - tokens_short) / (time_long - time_short)), so prefill and
admission cancel out. The constrained rows write strings, the mask's most expensive case (inside a string
nearly every token of the vocabulary is allowed, and the matcher checks them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import llama32  # noqa: E402
from bench import build_checkpoint, machine_info  # noqa: E402
from llama32.constrain import Grammars, Matcher  # noqa: E402

MASK_SECONDS = [0.0, 0]  # time in Matcher.fill and Matcher.accept, and how many fills


def _timed(fn, count: bool):
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            MASK_SECONDS[0] += time.perf_counter() - t0
            MASK_SECONDS[1] += count
    return wrapper


Matcher.fill = _timed(Matcher.fill, True)
Matcher.accept = Matcher.advance = _timed(Matcher.accept, False)

SCHEMA = {"type": "object", "properties": {
    "items": {"type": "array", "minItems": 500,
              "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                         "qty": {"type": "integer", "minimum": 0, "maximum": 999}},
                        "required": ["name", "qty"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False}
COMPILE_SCHEMAS = {
    "this benchmark's": SCHEMA,
    "person (3 fields)": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                           "email": {"type": "string", "format": "email"}},
                          "required": ["name", "age"]},
    "nested + $defs + anyOf": {
        "$defs": {"addr": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                            "zip": {"type": "integer", "minimum": 0}},
                           "required": ["city"]}},
        "type": "object", "properties": {
            "home": {"$ref": "#/$defs/addr"}, "work": {"anyOf": [{"$ref": "#/$defs/addr"}, {"type": "null"}]},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 5},
            "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["home", "tags"]},
    "json_object": {"type": "object"},
}


def requests(llm, constrained: int, rows: int, max_tokens: int) -> list[dict]:
    bans = {str(i): -100 for i in llm.stop_ids if i < llm.config.vocab_size}
    out = []
    for r in range(rows):
        req = dict(prompt=f"List the items in warehouse {r} as JSON.", temperature=1, seed=r + 1,
                   max_tokens=max_tokens, logit_bias=bans)
        if r < constrained:
            req["response_format"] = {"type": "json_schema", "json_schema": SCHEMA}
        out.append(req)
    return out


def timed_batch(llm, reqs: list[dict]) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = llama32.generate_batch(llm, reqs)
    dt = time.perf_counter() - t0
    return dt, sum(o["usage"]["completion_tokens"] for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--short", type=int, default=8, help="max_tokens of the short run")
    ap.add_argument("--long", type=int, default=40, help="max_tokens of the long run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    ckpt = args.ckpt or build_checkpoint(REPO / "benchmarks" / "out", "1b", 0)
    info = machine_info(torch.device("cpu"))
    llm = llama32.load(ckpt, device="cpu", dtype=args.dtype, max_batch=args.rows)
    print(f"{ckpt.name}: {llm.dtype}, vocab {llm.config.vocab_size}, {args.rows} rows, "
          f"{torch.get_num_threads()} threads, load average {info['loadavg_start']}", flush=True)

    # compile times: the tokenizer once per handle, then each schema cold (a fresh Grammars each time)
    t0 = time.perf_counter()
    g = Grammars(llm)
    g._engine_tokenizer()
    tokenizer_s = time.perf_counter() - t0
    compile_ms = {}
    for name, schema in COMPILE_SCHEMAS.items():
        times = []
        for _ in range(3):
            fresh = Grammars(llm)
            fresh._tokenizer = g._tokenizer
            t0 = time.perf_counter()
            fresh.compile(schema)
            times.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        for _ in range(100):
            fresh.compile(schema)
        cached_us = (time.perf_counter() - t0) / 100 * 1e6
        compile_ms[name] = {"cold_ms": statistics.median(times), "cached_us": cached_us}
        print(f"  compile {name:24s} cold {statistics.median(times):7.2f} ms   cached {cached_us:6.1f} us", flush=True)
    print(f"  tokenizer setup (once per handle): {tokenizer_s:.2f} s", flush=True)

    half = args.rows // 2
    timed_batch(llm, requests(llm, half, args.rows, 4))  # warm up: the loop, the grammar, the caches
    runs = {"free": [], "half constrained": []}
    MASK_SECONDS[:] = [0.0, 0]
    step_seconds = {"free": [], "half constrained": []}
    for _ in range(args.rounds):
        for name, k in (("free", 0), ("half constrained", half)):
            ts, ns = timed_batch(llm, requests(llm, k, args.rows, args.short))
            tl, nl = timed_batch(llm, requests(llm, k, args.rows, args.long))
            assert ns == args.rows * args.short and nl == args.rows * args.long, (ns, nl)
            rate = (nl - ns) / (tl - ts)
            runs[name].append(rate)
            step_seconds[name].append((tl - ts) / (args.long - args.short))
            print(f"  {name:18s} {rate:8.2f} tok/s  (short {ts:.2f} s, long {tl:.2f} s)", flush=True)
    free, con = statistics.median(runs["free"]), statistics.median(runs["half constrained"])
    print(f"decode throughput, {args.rows} rows: free {free:.2f} tok/s, {half} of them constrained {con:.2f} tok/s "
          f"-> constrained rows cost {100 * (1 - con / free):.1f}%", flush=True)
    fills = MASK_SECONDS[1]
    per_row_us = MASK_SECONDS[0] / max(fills, 1) * 1e6
    step_ms = statistics.median(step_seconds["free"]) * 1000
    print(f"mask work (fill + advance) per constrained row per step: {per_row_us:.0f} us over {fills} fills; "
          f"{half} rows: {half * per_row_us / 1000:.2f} ms of a {step_ms:.1f} ms free step "
          f"({100 * half * per_row_us / 1000 / step_ms:.1f}%)", flush=True)
    # one answer, to show what the constrained rows wrote
    sample = llama32.generate(llm, **{**requests(llm, 1, 1, args.long)[0], "logit_bias": None})
    print("  e.g.", json.dumps(sample["response"][:160]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "ckpt": str(ckpt), "dtype": str(llm.dtype),
                                         "rows": args.rows, "tokenizer_setup_s": tokenizer_s,
                                         "compile": compile_ms, "runs": runs, "free_tok_s": free,
                                         "mask_us_per_row_step": per_row_us, "free_step_ms": step_ms,
                                         "half_constrained_tok_s": con}, indent=1))


if __name__ == "__main__":
    main()
