"""`serve --replicas` on Ray Serve: a multi-turn, shared-prefix chat workload against N replicas (`--replicas`, 2)
routed by prompt prefix, N replicas on Ray Serve's default router (pow2), 1 replica with the same CPU cores, and
the plain single-process server.

Each of `--users` (16) users has its own long system prompt and talks for `--rounds` (4) rounds: every round
sends the whole conversation so far (system prompt, earlier questions and the server's answers) plus a new
question, streamed from the OpenAI route, so a user's prompts grow and each starts with the one before. Users
run at once, each waiting for its answer and then a random pause (`--think`, mean 2 s) before its next round.
With `--think 0` users run in step; with 2 replicas Ray Serve's pow2 router then compares both replicas' queues
for every request, and users in step tend to land where their last round did, which no real set of users does
(benchmarks/RESULTS.md, 2026-12-05 fifth stop). Per configuration: time to first token p50 /
p90, generated tokens per second of wall time, the share of prompt tokens whose keys and values were reused
(`usage.prompt_tokens_details.cached_tokens`), and how many requests each replica answered.
`--kv-cache-bytes` sets each replica's KV budget: small enough, one replica's prefix index holds only some of
the users' conversations, as on a server with more users than memory.

    python benchmarks/cluster_bench.py --model <checkpoint dir> --dtype float32
    python benchmarks/cluster_bench.py --model <checkpoint dir> --users 8 --rounds 6 --replicas 4 --configs prefix pow2

Each configuration is its own `python -m llama32 serve [--replicas N]` (started as load_client.py starts a
server; with --replicas it starts and stops a local Ray). One JSON report to --out, with the CPU's flags, and a
Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from load_client import start_server  # noqa: E402
from serve_bench import cpu_flags, percentile, words  # noqa: E402

CONFIGS = ("prefix", "pow2", "1 replica", "1 process, no Ray")


def configs(replicas: int, imbalance: int | None = None) -> dict[str, list[str]]:
    """Each configuration's name and serve flags: `replicas` replicas routed by prefix and by pow2, one replica,
    and the plain server (what Ray Serve's hops cost), on the same 2 CPU cores."""
    share = str(2 / replicas)
    prefix = ["--router-imbalance", str(imbalance)] if imbalance is not None else []
    return {"prefix": ["--replicas", str(replicas), "--router", "prefix", "--cpus-per-replica", share, *prefix],
            "pow2": ["--replicas", str(replicas), "--router", "pow2", "--cpus-per-replica", share],
            "1 replica": ["--replicas", "1", "--cpus-per-replica", "2"],
            "1 process, no Ray": []}


def users(n: int, system_words: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    # random words first: two users' prompts share no more than the chat template's first line
    return [{"system": words(system_words, rng) + f". You are assistant number {u}.",
             "questions": [words(rng.randint(8, 20), rng) + "?" for _ in range(8)]} for u in range(n)]


async def turn(client: httpx.AsyncClient, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat request: time to first token, the answer, its usage and the replica that answered."""
    start, first, text, usage = time.perf_counter(), None, [], {}
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        replica = r.headers.get("x-llama32-replica")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                text.append(chunk["choices"][0]["delta"]["content"])
    return {"ttft_s": first - start if first else None, "text": "".join(text), "replica": replica,
            "tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


async def workload(url: str, people: list[dict], rounds: int, max_tokens: int, think: float = 0.0,
                   seed: int = 0) -> dict:
    """Every person talks for `rounds` rounds. With `think` > 0 each waits a random time (exponential, mean
    `think` seconds, drawn from `seed`) before each round, its first included: people read and type at their
    own pace, so their requests do not arrive in step."""
    results: list[dict] = []

    async def talk(user: int, person: dict, rng: random.Random):
        messages = [{"role": "system", "content": person["system"]}]
        for k in range(rounds):
            if think > 0:
                await asyncio.sleep(rng.expovariate(1 / think))
            messages.append({"role": "user", "content": person["questions"][k]})
            out = await turn(client, messages, max_tokens)
            results.append(dict(out, round=k, user=user))
            messages.append({"role": "assistant", "content": out["text"]})

    limits = httpx.Limits(max_connections=len(people) + 4, max_keepalive_connections=len(people) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(talk(i, p, random.Random(seed * 1000 + i)) for i, p in enumerate(people)))
        wall = time.perf_counter() - start
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    later = [r["ttft_s"] for r in results if r["ttft_s"] is not None and r["round"] > 0]
    prompt = sum(r["prompt_tokens"] for r in results)
    by_round = [[r for r in results if r["round"] == k] for k in range(rounds)]
    where = {(r["user"], r["round"]): r["replica"] for r in results}
    later_rounds = [r for r in results if r["round"] > 0]
    return {"requests": len(results), "wall_s": wall, "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
            "ttft_later_rounds_p50_s": percentile(later, 50) if later else None,
            "prompt_tokens": prompt, "cached_share": sum(r["cached_tokens"] for r in results) / prompt,
            "per_replica": dict(Counter(r["replica"] for r in results)),
            # of rounds after the first, the share answered by the replica that answered the user's round before
            "stayed": sum(where[r["user"], r["round"] - 1] == r["replica"] for r in later_rounds) / len(later_rounds)
            if later_rounds else None,
            "rounds": [{"ttft_p50_s": percentile([r["ttft_s"] for r in rs], 50),
                        "prompt_tokens": sum(r["prompt_tokens"] for r in rs),
                        "cached_tokens": sum(r["cached_tokens"] for r in rs)} for rs in by_round]}


def run_config(args, name: str, flags: list[str]) -> dict:
    budget = ["--kv-cache-bytes", str(args.kv_cache_bytes)] if args.kv_cache_bytes else []
    server, url = start_server(args, flags + budget)
    try:
        want = int(flags[flags.index("--replicas") + 1]) if flags else 1
        deadline = time.time() + 300
        while len(httpx.get(url + "/health").json()["replicas"]) < want:  # the last replica may still load
            assert time.time() < deadline, "replicas did not come up"
            time.sleep(0.5)
        warm = users(4, 8, args.seed + 99)  # short unrelated prompts: the first forwards on every replica
        asyncio.run(workload(url, warm, 1, 2))
        result = asyncio.run(workload(url, users(args.users, args.system_words, args.seed), args.rounds,
                                      args.max_tokens, args.think, args.seed))
    finally:
        server.terminate()
        server.wait(timeout=120)
    print(f"{name}: {result['tok_s']:.1f} tok/s, TTFT p50 {result['ttft_p50_s']:.2f} s, cached "
          f"{result['cached_share']:.0%}, stayed {result['stayed']:.0%}, {result['per_replica']}", flush=True)
    return dict(result, config=name, flags=flags)


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["config"].endswith(", pow2")), None)
    out = ["| configuration | requests | tok/s | TTFT p50 / p90 (s) | later rounds' TTFT p50 (s) | cached share of "
           "prompt tokens | later rounds on the last round's replica | requests per replica |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f" ({r['tok_s'] / base['tok_s']:.2f}x, TTFT p50 {r['ttft_p50_s'] / base['ttft_p50_s']:.2f}x)" \
            if base and r is not base else ""
        out.append(f"| {r['config']} | {r['requests']} | {r['tok_s']:.1f}{ratio} | {r['ttft_p50_s']:.2f} / "
                   f"{r['ttft_p90_s']:.2f} | {r['ttft_later_rounds_p50_s']:.2f} | {r['cached_share']:.0%} | "
                   f"{r['stayed']:.0%} | "
                   f"{', '.join(str(n) for n in sorted(r['per_replica'].values(), reverse=True))} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--system-words", type=int, default=300, help="words in each user's system prompt")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="each replica's KV budget (serve's flag): rows plus prefix index; small enough, one replica's "
                        "index holds only some users' conversations")
    p.add_argument("--think", type=float, default=2.0,
                   help="mean seconds a user waits before each round (exponential; 0: users run in step, each "
                        "sending its next round as soon as its answer is in)")
    p.add_argument("--replicas", type=int, default=2, help="replicas in the prefix and pow2 configurations")
    p.add_argument("--router-imbalance", type=int, default=None, help="serve's flag, for the prefix configuration")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                   help="of " + ", ".join(repr(c) for c in CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "cluster.json")
    args = p.parse_args(argv)
    args.clients = [args.users]  # what load_client.start_server sizes --max-queue by
    flags = configs(args.replicas, args.router_imbalance)
    rows = [run_config(args, f"{args.replicas} replicas, {name}" if name in ("prefix", "pow2") else name,
                       flags[name]) for name in args.configs]
    report = {"machine": {"cpu_flags": cpu_flags(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
              "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
