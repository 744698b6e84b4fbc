"""A client-side load generator for `python -m llama32 serve`, like the serving benchmarks people already use:
N concurrent clients stream mixed-length requests from the OpenAI route; reports tok/s, time to first token and
inter-token latency p50/p99, then runs the same requests through the library directly (threads on one handle)
for the server's overhead.

    python benchmarks/load_client.py --model <checkpoint dir> --dtype float32 --clients 8 --requests 32

Starts its own server on a free loopback port (or `--url` for a running one). One JSON report to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_bench import cpu_flags, percentile, words  # noqa: E402


def workload(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": words(rng.randint(8, 120), rng)}],
             "max_tokens": rng.randint(16, 96), "temperature": 0} for _ in range(n)]


def stream_one(client: httpx.Client, body: dict) -> dict:
    start = time.perf_counter()
    stamps, tokens = [], 0
    with client.stream("POST", "/v1/chat/completions", json=dict(body, stream=True,
                                                                  stream_options={"include_usage": True})) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter() - start)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft_s": stamps[0] if stamps else None, "latency_s": time.perf_counter() - start, "tokens": tokens,
            "itl_s": gaps}


def drain(items: list, work, workers: int, open_client=None) -> tuple[float, list]:
    """`work(client, item)` for every item, by `workers` threads taking the next item as they free up (each
    with its own `open_client()` context, if given); returns (wall seconds, results in item order)."""
    queue = list(enumerate(items))
    lock = threading.Lock()
    results: list = [None] * len(items)

    def worker():
        with open_client() if open_client else contextlib.nullcontext() as client:
            while True:
                with lock:
                    if not queue:
                        return
                    i, item = queue.pop(0)
                results[i] = work(client, item)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def run_clients(url: str, bodies: list[dict], clients: int) -> dict:
    wall, results = drain(bodies, stream_one, clients, lambda: httpx.Client(base_url=url, timeout=600))
    itl = [g for r in results for g in r["itl_s"]]
    return {"wall_s": wall, "tokens": sum(r["tokens"] for r in results),
            "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": percentile([r["ttft_s"] for r in results if r["ttft_s"] is not None], 50),
            "ttft_p99_s": percentile([r["ttft_s"] for r in results if r["ttft_s"] is not None], 99),
            "itl_p50_s": percentile(itl, 50) if itl else None, "itl_p99_s": percentile(itl, 99) if itl else None,
            "latency_p50_s": percentile([r["latency_s"] for r in results], 50),
            "latency_p99_s": percentile([r["latency_s"] for r in results], 99)}


def run_library(model: str, device: str, dtype: str, bodies: list[dict], clients: int) -> dict:
    """The same requests through the library on threads, `clients` at a time (no HTTP)."""
    import llama32

    llm = llama32.load(model, device=device, dtype=dtype)
    llama32.generate(llm, **dict(bodies[0], max_tokens=2))
    wall, outs = drain(bodies, lambda _, body: llama32.generate(llm, **body), clients)
    tokens = sum(o["usage"]["completion_tokens"] for o in outs)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--url", default=None, help="a running server (else one is started here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "load.json")
    args = p.parse_args(argv)
    bodies = workload(args.requests, args.seed)
    server = None
    url = args.url
    if url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "llama32", "serve", "--model", args.model, "--port", str(port),
                                   "--device", args.device, "--dtype", args.dtype], stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
    try:
        with httpx.Client(base_url=url, timeout=600) as c:  # warm-up
            stream_one(c, dict(bodies[0], max_tokens=2))
        served = run_clients(url, bodies, args.clients)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    direct = run_library(args.model, args.device, args.dtype, bodies, args.clients)
    report = {"machine": {"cpu_flags": cpu_flags(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
              "settings": {k: str(v) for k, v in vars(args).items()}, "server": served, "library": direct,
              "server_over_library": served["tok_s"] / direct["tok_s"]}
    print(f"server: {served['tok_s']:.1f} tok/s, TTFT p50/p99 {served['ttft_p50_s']:.3f}/{served['ttft_p99_s']:.3f} s, "
          f"ITL p50/p99 {served['itl_p50_s'] * 1000:.1f}/{served['itl_p99_s'] * 1000:.1f} ms; library directly: "
          f"{direct['tok_s']:.1f} tok/s ({report['server_over_library']:.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
