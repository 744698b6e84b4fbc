"""Serving through the generation loop: many requests at once on one handle, against one after another.

Two scenarios, both with greedy or seeded requests through `llama32.generate` on threads (what a server does):
- `concurrent`: N (8) requests of `--new-tokens` (64) greedy tokens submitted together, against one alone: the
  wall-time ratio shows whether batching is real (the issue's CPU target: at most 2x for 8 rows on the 1B).
- `poisson`: `--requests` (64) requests with mixed prompt and output lengths arriving as a Poisson process
  (`--rate` per second, fixed seed), streamed: total tok/s, latency and time-to-first-token p50/p99, against
  the same requests run one after another.

    python benchmarks/serve_bench.py --ckpt benchmarks/out/ckpt-1b --scenarios concurrent      # random 1B, bf16
    python benchmarks/serve_bench.py --ckpt <smollm2 dir> --dtype float32 --scenarios poisson

Writes one JSON report to --out (and prints a table). The CPU's flags are recorded with every run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import llama32  # noqa: E402
from bench import cpu_flags  # noqa: E402  (re-exported for batch_bench and load_client)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def words(n: int, rng: random.Random) -> str:
    vocab = ["river", "mountain", "blue", "quietly", "seven", "engine", "paper", "light", "garden", "storm"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def timed_stream(llm, request: dict) -> dict:
    """One streamed request: seconds to the first chunk and to the end, and tokens."""
    start = time.perf_counter()
    first = None
    usage = None
    for chunk in llama32.generate(llm, stream=True, **request):
        if first is None:
            first = time.perf_counter() - start
        usage = chunk.get("usage", usage)
    return {"ttft_s": first, "latency_s": time.perf_counter() - start, "tokens": usage["completion_tokens"]}


def in_threads(fn, items, delays=None) -> tuple[float, list]:
    results = [None] * len(items)
    start = time.perf_counter()

    def work(i):
        if delays is not None:
            time.sleep(max(0.0, start + delays[i] - time.perf_counter()))
        results[i] = fn(items[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def concurrent(llm, n: int, new_tokens: int, prompt_words: int) -> dict:
    rng = random.Random(0)
    reqs = [dict(prompt=words(prompt_words, rng), raw=True, temperature=0, max_tokens=new_tokens) for _ in range(n)]
    llama32.generate(llm, **dict(reqs[0], max_tokens=4))  # warm-up
    alone, out = in_threads(lambda r: llama32.generate(llm, **r), reqs[:1])
    together, outs = in_threads(lambda r: llama32.generate(llm, **r), reqs)
    tokens = sum(o["usage"]["completion_tokens"] for o in outs)
    return {"rows": n, "new_tokens": new_tokens, "one_alone_s": alone, "all_together_s": together,
            "ratio": together / alone, "tokens": tokens, "together_tok_s": tokens / together,
            "alone_tok_s": out[0]["usage"]["completion_tokens"] / alone}


def poisson(llm, n: int, rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    reqs, arrivals, t = [], [], 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        arrivals.append(t)
        reqs.append(dict(prompt=words(rng.randint(8, 160), rng), raw=True, max_tokens=rng.randint(8, 96),
                         temperature=rng.choice([0, 0.7]), seed=i + 1))
    llama32.generate(llm, **dict(reqs[0], max_tokens=2))  # warm-up
    wall, served = in_threads(lambda r: timed_stream(llm, r), reqs, arrivals)
    seq_start = time.perf_counter()
    sequential = [timed_stream(llm, r) for r in reqs]
    seq_wall = time.perf_counter() - seq_start
    tokens = sum(r["tokens"] for r in served)

    def summary(rows, wall_s):
        return {"wall_s": wall_s, "tok_s": sum(r["tokens"] for r in rows) / wall_s,
                "latency_p50_s": percentile([r["latency_s"] for r in rows], 50),
                "latency_p99_s": percentile([r["latency_s"] for r in rows], 99),
                "ttft_p50_s": percentile([r["ttft_s"] for r in rows], 50),
                "ttft_p99_s": percentile([r["ttft_s"] for r in rows], 99)}

    return {"requests": n, "rate_per_s": rate, "tokens": tokens, "arrival_span_s": arrivals[-1],
            "loop": summary(served, wall), "one_after_another": summary(sequential, seq_wall),
            "speedup": seq_wall / wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--scenarios", default="concurrent,poisson")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second")
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "serve.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = llama32.load(args.ckpt, device=args.device, dtype=args.dtype, max_batch=args.max_batch)
    llm.loop.runner.wait_warm()  # timed once the compile-ahead at load has ended, as a warmed-up server
    report = {"machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_flags": cpu_flags(),
                          "device": args.device, "date": time.strftime("%Y-%m-%d %H:%M:%S")},
              "settings": {k: str(v) for k, v in vars(args).items()}, "max_batch": llm.loop.max_batch}
    for name in args.scenarios.split(","):
        if name == "concurrent":
            report["concurrent"] = r = concurrent(llm, args.rows, args.new_tokens, args.prompt_words)
            print(f"concurrent: {r['rows']} x {r['new_tokens']} greedy tokens: one alone {r['one_alone_s']:.2f} s, "
                  f"all together {r['all_together_s']:.2f} s (ratio {r['ratio']:.2f}; {r['together_tok_s']:.1f} tok/s "
                  f"vs {r['alone_tok_s']:.1f})", flush=True)
        elif name == "poisson":
            report["poisson"] = r = poisson(llm, args.requests, args.rate, args.seed)
            for label in ("loop", "one_after_another"):
                s = r[label]
                print(f"poisson {label}: {s['tok_s']:.1f} tok/s, wall {s['wall_s']:.1f} s, latency p50/p99 "
                      f"{s['latency_p50_s']:.2f}/{s['latency_p99_s']:.2f} s, TTFT p50/p99 {s['ttft_p50_s']:.2f}/"
                      f"{s['ttft_p99_s']:.2f} s", flush=True)
            print(f"poisson: loop is {r['speedup']:.2f}x faster in wall time", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
