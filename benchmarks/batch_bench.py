"""The same batch job (`--requests`, 256, mixed short requests) without Ray, and on a local Ray with 1 and 2
workers: tok/s of each; Ray's overhead is the wall time it adds over the job without Ray (start-up, an actor
and a model load per worker, moving records). On a GPU cluster, run it with `--address auto --gpus-per-worker 1 --workers N` for scaling.

    python benchmarks/batch_bench.py --model <checkpoint dir> --dtype float32
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_bench import cpu_flags, words  # noqa: E402

from llama32.batch import run_file  # noqa: E402


def write_job(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            request = {"prompt": words(rng.randint(4, 40), rng), "raw": True, "max_tokens": rng.randint(8, 32),
                       "temperature": rng.choice([0, 0.8]), "seed": i + 1}
            f.write(json.dumps({"id": i, "request": request}) + "\n")


def timed_job(src: Path, **kwargs) -> dict:
    out = Path(tempfile.mkdtemp()) / "out.jsonl"
    start = time.perf_counter()
    run_file(src, out, progress=False, **kwargs)
    wall = time.perf_counter() - start
    tokens = sum(json.loads(line)["result"]["usage"]["completion_tokens"] for line in out.read_text().splitlines())
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "file": out.read_bytes()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--address", default=None, help="a Ray cluster (default: a local Ray)")
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "batch.json")
    args = p.parse_args(argv)
    src = Path(tempfile.mkdtemp()) / "in.jsonl"
    write_job(src, args.requests, 0)
    common = dict(model=args.model, device=args.device, dtype=args.dtype)
    runs = {"no_ray": timed_job(src, **common)}
    for w in (int(x) for x in args.workers.split(",")):
        runs[f"ray_{w}"] = timed_job(src, use_ray=True, workers=w, ray_address=args.address,
                                     gpus_per_worker=args.gpus_per_worker, **common)
    same = len({r.pop("file") for r in runs.values()}) == 1
    report = {"machine": {"cpu_flags": cpu_flags(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
              "settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "identical_files": same}
    for name, r in runs.items():
        print(f"{name}: {r['tokens']} tokens in {r['wall_s']:.1f} s = {r['tok_s']:.1f} tok/s")
    print(f"output files identical: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
