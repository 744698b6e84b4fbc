"""The generation loop through the public API only: prompt-prefix reuse, a long prompt arriving while a stream
decodes, long-max_tokens requests side by side, and the no-regression figures.

    flock /tmp/llama32-heavy.lock python benchmarks/loop_bench.py [--ckpt DIR] [--device cpu] [--dtype bfloat16]

Without --ckpt a random checkpoint of the exact Llama 3.2 1B shape is written once under benchmarks/out/
(bench.py's recipe). Rows (each a ratio measured in the same run, since the machine may be shared):
- reuse: time to first token of a request sharing a 1,500-token prefix with the one before it, against the
  first's (target <= 0.15x);
- long prompt: a 2,000-token prompt arrives while a stream decodes: the stream's longest gap between tokens
  against its median gap (target <= 4x);
- long max_tokens: 8 concurrent requests with max_tokens 6000 (each closed after 12 tokens) against one alone
  (target <= 2.5x);
- no regression: 8 concurrent greedy 64-token requests against one alone (<= 1.3x), batch-1 decode speed.
Prints one JSON object (and writes it to --json when given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # after PYTHONPATH, so another checkout's llama32 can be measured the same way
sys.path.append(str(REPO / "benchmarks"))

import llama32  # noqa: E402


def words(n_tokens: int, tag: str, tok) -> str:
    """Raw text of about `n_tokens` tokens, distinct per `tag`."""
    text, unit = f"{tag}:", " alpha beta gamma delta epsilon zeta eta theta"
    while len(tok.encode(text)) < n_tokens:
        text += unit
    return text


def ttft(llm, prompt: str) -> tuple[float, int]:
    started = time.perf_counter()
    out = llama32.generate(llm, prompt=prompt, raw=True, temperature=0, max_tokens=1)
    return time.perf_counter() - started, out["usage"].get("cached_tokens", 0)


def reuse_row(llm) -> dict:
    prefix = words(1500, "system", llm.tokenizer)
    first, _ = ttft(llm, prefix + " Question one: what is alpha?")
    second, cached = ttft(llm, prefix + " Question two: what is beta?")
    return {"first_s": first, "second_s": second, "ratio": second / first, "cached_tokens": cached}


def long_prompt_row(llm, decode_tokens: int = 60) -> dict:
    stream = llama32.generate(llm, prompt=words(32, "story", llm.tokenizer), raw=True, temperature=0,
                              max_tokens=decode_tokens, stream=True)
    times, arrived = [], {}
    long = words(2000, "document", llm.tokenizer)

    def late():
        started = time.perf_counter()
        llama32.generate(llm, prompt=long, raw=True, temperature=0, max_tokens=1)
        arrived["ttft_s"] = time.perf_counter() - started

    thread = None
    for i, _ in enumerate(stream):
        times.append(time.perf_counter())
        if i == 10:
            thread = threading.Thread(target=late)
            thread.start()
    thread.join()
    gaps = [b - a for a, b in zip(times, times[1:])]
    median = statistics.median(gaps)
    return {"median_gap_s": median, "longest_gap_s": max(gaps), "ratio": max(gaps) / median,
            "long_prompt_ttft_s": arrived["ttft_s"], "chunks": len(times)}


def concurrent(llm, requests: list[dict], read: int | None) -> float:
    """Seconds until every request has produced `read` chunks (then closed) or finished."""
    def work(req):
        if read is None:
            llama32.generate(llm, **req)
            return
        stream = llama32.generate(llm, stream=True, **req)
        for i, _ in enumerate(stream):
            if i + 1 >= read:
                break
        stream.close()

    threads = [threading.Thread(target=work, args=(r,)) for r in requests]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def long_max_tokens_row(llm) -> dict:
    reqs = [dict(prompt=words(24, f"r{i}", llm.tokenizer), raw=True, temperature=0, max_tokens=6000)
            for i in range(8)]
    one = concurrent(llm, reqs[:1], read=12)
    eight = concurrent(llm, reqs, read=12)
    return {"one_s": one, "eight_s": eight, "ratio": eight / one}


def no_regression_rows(llm) -> dict:
    reqs = [dict(prompt=words(24, f"g{i}", llm.tokenizer), raw=True, temperature=0, max_tokens=64)
            for i in range(8)]
    concurrent(llm, reqs[:1], read=None)  # warm
    one = concurrent(llm, reqs[:1], read=None)
    eight = concurrent(llm, reqs, read=None)
    started = time.perf_counter()
    stream = llama32.generate(llm, prompt=words(128, "decode", llm.tokenizer), raw=True, temperature=0,
                              max_tokens=65, stream=True)
    stamps = [time.perf_counter() for _ in stream]
    decode = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    return {"concurrent64": {"one_s": one, "eight_s": eight, "ratio": eight / one},
            "batch1_decode": {"s_per_token": decode, "tokens_per_s": 1 / decode,
                              "first_chunk_s": stamps[0] - started}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", default="reuse,long_prompt,long_max_tokens,no_regression")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="the compiled decode step: the handle's default (auto), or forced on/off")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out", help="where the 1B checkpoint is written")
    args = p.parse_args(argv)
    ckpt = args.ckpt
    if ckpt is None:
        from bench import build_checkpoint
        ckpt = build_checkpoint(args.out, "1b", 0)
    from bench import machine_info
    import torch

    llm = llama32.load(ckpt, device=args.device, dtype=args.dtype)
    if args.compile != "auto":
        llm.compiled = args.compile == "on"
    started = time.perf_counter()  # rows are timed once the compile-ahead at load has ended (a server warmed up)
    warm_s = time.perf_counter() - started if llm.loop.runner.wait_warm() else None
    if hasattr(llm.loop, "reuse_prefixes"):
        llm.loop.reuse_prefixes = True
    result = {"machine": machine_info(torch.device(args.device)), "checkpoint": str(ckpt), "dtype": args.dtype,
              "llama32": str(Path(llama32.__file__).parent),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "compiled": llm.compiled,
              "warm_wait_s": warm_s, "rows": {}}
    rows = {"reuse": reuse_row, "long_prompt": long_prompt_row, "long_max_tokens": long_max_tokens_row,
            "no_regression": no_regression_rows}
    for name in args.rows.split(","):
        result["rows"][name] = rows[name](llm)
        print(name, json.dumps(result["rows"][name]), file=sys.stderr, flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
