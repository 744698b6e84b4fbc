"""What row invariance costs: the 1B shape's prefill (512 and 2,048 tokens) and batch-1 decode, this tree
against another (today's main), in one run, alternating processes.

    python benchmarks/row_tiles.py --before /path/to/other/checkout [--pairs 3]

Each side runs in a fresh process with `PYTHONPATH` set to its tree, loads the random-weight Llama 3.2 1B
checkpoint (benchmarks/bench.py writes it once) in bfloat16 on the CPU, and times through the engine: one
forward over each prompt with max_tokens 1 (prefill) and 33 greedy tokens after a short prompt (decode; the
first token's time is subtracted). It also reports how long the load's row-tile check took (tiles.py) where
the tree has one. Prints the medians, the ratios this / before, and the CPU's flags; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(ckpt: str, prefill: list[int], decode_tokens: int) -> dict:
    import torch

    import llama32

    started = time.perf_counter()
    llm = llama32.load(ckpt, dtype="bfloat16", device="cpu")
    out = {"load_s": time.perf_counter() - started, "threads": torch.get_num_threads(),
           "row_invariant": bool(getattr(llm.model, "row_invariant", False))}
    llm.loop.reuse_prefixes = False
    words = ("river", "stone", "light", "window", "garden", "paper", "music", "salt", "cloud", "engine")

    def prompt(n: int, seed: int) -> str:  # about n tokens of plain words
        return " ".join(words[(seed * 7 + i * i) % len(words)] for i in range(n))

    def run(text: str, n: int) -> float:
        t = time.perf_counter()
        out = llama32.generate(llm, prompt=text, raw=True, max_tokens=n, temperature=0)
        run.tokens = out["usage"]["completion_tokens"]
        return time.perf_counter() - t

    run(prompt(16, 0), 2)  # warm-up
    for n in prefill:
        run(prompt(n, 1), 1)
        out[f"prefill_{n}_s"] = min(run(prompt(n, 2 + i), 1) for i in range(2))
    first = run(prompt(32, 5), 1)
    whole = run(prompt(32, 5), decode_tokens + 1)
    out["decode_s_per_token"] = (whole - first) / max(run.tokens - 1, 1)
    return out


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                keep = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512_vnni")
                return " ".join(f for f in line.split(":", 1)[1].split() if f in keep)
    except OSError:
        pass
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="another checkout of llama32 to compare against (its repository root)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--prefill", default="512,2048")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(HERE / "out" / "row_tiles.json"))
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # the child's mode: a checkpoint path
    args = ap.parse_args()
    prefill = [int(n) for n in args.prefill.split(",") if n]
    if args.measure:
        print(json.dumps(measure(args.measure, prefill, args.decode_tokens)))
        return
    sys.path.insert(0, str(HERE))
    from bench import build_checkpoint
    ckpt = build_checkpoint(HERE / "out", "1b", seed=0)
    trees = {"this": HERE.parent}
    if args.before:
        trees["before"] = Path(args.before).resolve()
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for pair in range(args.pairs):
        for name, tree in (trees.items() if pair % 2 == 0 else reversed(trees.items())):
            env = dict(os.environ, PYTHONPATH=str(tree))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", str(ckpt), f"--prefill={args.prefill}",
                   "--decode-tokens", str(args.decode_tokens)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=tree)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    keys = [k for k in runs["this"][0] if k.endswith("_s") or k.endswith("_token")]
    table = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    print(f"\nCPU flags: {cpu_flags()}; {args.pairs} runs each, medians")
    for k in keys:
        line = f"{k:>22}: this {table['this'][k]:.4f}"
        if "before" in table:
            line += f"  before {table['before'][k]:.4f}  this/before {table['this'][k] / table['before'][k]:.3f}"
        print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu_flags": cpu_flags(), "runs": runs, "medians": table}, indent=1))


if __name__ == "__main__":
    main()
