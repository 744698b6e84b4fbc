"""A client-side load generator for `python -m llama32 serve`, like the serving benchmarks people already use:
for each concurrency level (default 8, 32 and 128 clients), that many clients stream mixed-length chat requests
from the OpenAI route at once (each takes the next request as it finishes one); then the same requests, at the
same concurrency, stream through the library in-process (threads on one handle, no HTTP). For both: throughput
(generated tokens per second of wall time), time to first token and inter-token latency p50/p99.

    python benchmarks/load_client.py --model <checkpoint dir> --dtype float32 --clients 8 32 128 --max-batch 32

Starts its own server on a free loopback port (or `--url` for a running one). The clients are asyncio tasks on
one httpx.AsyncClient, so the load generator itself needs no thread per client. One JSON report to --out, and a
Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
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


def workload(n: int, seed: int, max_new: int = 64) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": words(rng.randint(8, 120), rng)}],
             "max_tokens": rng.randint(max(1, max_new // 4), max_new), "temperature": 0} for _ in range(n)]


def summary(wall: float, results: list[dict]) -> dict:
    """Throughput and latency percentiles of one run (each result: ttft_s, latency_s, tokens, itl_s)."""
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    itl = [g for r in results for g in r["itl_s"]]
    tokens = sum(r["tokens"] for r in results)
    pct = (lambda v, q: percentile(v, q) if v else None)
    return {"requests": len(results), "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
            "latency_p50_s": pct([r["latency_s"] for r in results], 50),
            "latency_p99_s": pct([r["latency_s"] for r in results], 99)}


def timing(start: float, stamps: list[float], tokens: int) -> dict:
    return {"ttft_s": stamps[0] - start if stamps else None, "latency_s": time.perf_counter() - start,
            "tokens": tokens, "itl_s": [b - a for a, b in zip(stamps, stamps[1:])]}


async def stream_one(client: httpx.AsyncClient, body: dict) -> dict:
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", "/v1/chat/completions",
                             json=dict(body, stream=True, stream_options={"include_usage": True})) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return timing(start, stamps, tokens)


async def run_server(url: str, bodies: list[dict], clients: int) -> dict:
    """`clients` asyncio clients, each streaming the next request as it finishes one."""
    todo = list(enumerate(bodies))
    results: list = [None] * len(bodies)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        async def worker():
            while todo:
                i, body = todo.pop(0)
                results[i] = await stream_one(client, body)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return summary(time.perf_counter() - start, results)


def run_library(llm, bodies: list[dict], clients: int) -> dict:
    """The same requests streamed through the library in-process: `clients` threads on one handle."""
    import llama32

    todo = list(enumerate(bodies))
    lock = threading.Lock()
    results: list = [None] * len(bodies)

    def one(body):
        start, stamps, tokens = time.perf_counter(), [], 0
        for chunk in llama32.generate(llm, stream=True, **body):
            if chunk["response"]:
                stamps.append(time.perf_counter())
            if "usage" in chunk:
                tokens = chunk["usage"]["completion_tokens"]
        return timing(start, stamps, tokens)

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, body = todo.pop(0)
            results[i] = one(body)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(time.perf_counter() - start, results)


def start_server(args, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """`python -m llama32 serve` on a free loopback port, with `extra` flags (cluster_bench: --replicas ...)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llama32", "serve", "--model", args.model, "--port", str(port), "--device",
           args.device, "--dtype", args.dtype, "--max-queue", str(max(args.clients) + 16), *extra]
    if args.max_batch:
        cmd += ["--max-batch", str(args.max_batch)]
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not start")


def table(rows: list[dict]) -> str:
    ms = (lambda s: "" if s is None else f"{s * 1000:.0f}")
    out = ["| clients | path | requests | tok/s | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) | server / library |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        for path in ("server", "library"):
            m = r[path]
            ratio = f"{r['server']['tok_s'] / r['library']['tok_s']:.3f}" if path == "server" else ""
            out.append(f"| {r['clients']} | {path} | {m['requests']} | {m['tok_s']:.1f} | "
                       f"{ms(m['ttft_p50_s'])} / {ms(m['ttft_p99_s'])} | {ms(m['itl_p50_s'])} / {ms(m['itl_p99_s'])} | "
                       f"{ratio} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--url", default=None, help="a running server (else one is started here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--requests-per-client", type=float, default=2.0,
                   help="requests per concurrency level = clients x this (at least 16)")
    p.add_argument("--max-new", type=int, default=64, help="new tokens per request: uniform in [max/4, max]")
    p.add_argument("--max-batch", type=int, default=None, help="rows decoded together, server and library alike")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "load.json")
    args = p.parse_args(argv)
    import llama32

    levels = {c: workload(max(16, round(c * args.requests_per_client)), args.seed + c, args.max_new)
              for c in args.clients}
    rows = {c: {"clients": c} for c in args.clients}
    server, url = (None, args.url) if args.url else start_server(args)
    try:
        asyncio.run(run_server(url, [dict(levels[args.clients[0]][0], max_tokens=2)], 1))  # warm-up
        for c, bodies in levels.items():
            rows[c]["server"] = asyncio.run(run_server(url, bodies, c))
            print(f"server, {c} clients: {rows[c]['server']['tok_s']:.1f} tok/s", flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    llm = llama32.load(args.model, device=args.device, dtype=args.dtype, max_batch=args.max_batch)
    llama32.generate(llm, **dict(levels[args.clients[0]][0], max_tokens=2))  # warm-up
    for c, bodies in levels.items():
        rows[c]["library"] = run_library(llm, bodies, c)
        print(f"library, {c} clients: {rows[c]['library']['tok_s']:.1f} tok/s", flush=True)
    report = {"machine": {"cpu_flags": cpu_flags(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
              "settings": {k: str(v) for k, v in vars(args).items()}, "max_batch": llm.loop.max_batch,
              "rows": list(rows.values())}
    print(table(report["rows"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
