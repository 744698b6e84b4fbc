"""Everything CUDA-side in one command, for a machine with an NVIDIA GPU (CI has none):

    python benchmarks/cuda_check.py            # writes benchmarks/out/cuda/check.json and check.md

1. the CUDA tests (`pytest -k cuda`): the CUDA-graph decode step equals the eager one, int8 on CUDA, ...;
2. compiled against eager on the random-weight Llama 3.2 1B in bfloat16: greedy tokens of a batch of mixed
   requests; how long the compile-ahead that `load` starts took, and how many graphs serving still compiled
   (none expected);
3. the benchmark: `bench.py` (decode batch 1 and 32, prefill up to 8k, load; against HF; `--quick`: llama32
   alone, no load);
4. the generation loop's rows, `loop_bench.py`: prompt-prefix reuse, a long prompt arriving while a stream
   decodes, 8 long-max_tokens requests, and the no-regression figures;
5. `serve_bench.py` (8 concurrent requests; 64 Poisson arrivals against one after another).

Each part's outcome goes into one JSON file, and a table of the figures that have targets into a Markdown
file, to copy into benchmarks/RESULTS.md. A part that fails is recorded as failed and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path, limit: float | None = None) -> dict:
    """Run one part in its own process, its output in `log`; past `limit` seconds it is killed (rc "timeout")."""
    started = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - started, 1), "log": str(log)}


def compiled_against_eager(ckpt: Path) -> dict:
    """Greedy mixed requests through the compiled loop and the eager one, on the 1B in bfloat16; how long the
    compile-ahead at load (`Runner.warm_up`, in the background) took, and that serving compiled nothing more."""
    import torch

    import llama32

    counters = torch._dynamo.utils.counters
    counters.clear()
    started = time.perf_counter()
    llm = llama32.load(ckpt, device="cuda", dtype="bfloat16", max_batch=8)
    loaded = time.perf_counter() - started
    warmed = llm.loop.runner.wait_warm(timeout=1200)
    warm_s = time.perf_counter() - started - loaded
    warm_graphs = counters["stats"]["unique_graphs"]
    requests = [dict(prompt=" ".join(["word"] * n), raw=True, temperature=0, max_tokens=m,
                     **({"repetition_penalty": 1.2} if n % 2 else {}))
                for n, m in ((5, 40), (60, 24), (130, 32), (7, 64), (300, 16), (33, 48))]
    llm.compiled = False
    eager = llama32.generate_batch(llm, requests)
    llm.compiled = True
    compiled = llama32.generate_batch(llm, requests)
    again = llama32.generate_batch(llm, requests)
    same = [a["response"] == b["response"] for a, b in zip(eager, compiled)]
    return {"requests": len(requests), "equal_to_eager": sum(same), "repeat_equal": compiled == again,
            "load_s": round(loaded, 1), "warm_up_s": round(warm_s, 1), "warmed": warmed,
            "warm_graphs": warm_graphs, "graphs_while_serving": counters["stats"]["unique_graphs"] - warm_graphs,
            "warmed_s": {str(list(k)): round(v, 1) for k, v in llm.loop.runner.warmed.items()},
            "shapes": sorted(map(list, llm.compiled_shapes)),
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}


def table(report: dict) -> str:
    rows = ["| check | figure | target |", "|---|---|---|"]
    tests = report.get("tests", {})
    rows.append(f"| CUDA tests | rc {tests.get('rc')} ({tests.get('seconds')} s) | pass |")
    ce = report.get("compiled_vs_eager", {})
    if "graphs" in ce:
        rows.append(f"| compiled = eager, greedy, 1B bf16 | {ce['equal_to_eager']}/{ce['requests']} requests; "
                    f"{ce['graphs']} graphs for {len(ce['shapes'])} shapes, {ce['graph_breaks']} breaks | "
                    "all equal; 0 breaks |")
        rows.append(f"| compile ahead at load (background) | {ce['warm_graphs']} graphs in {ce['warm_up_s']} s after a "
                    f"{ce['load_s']} s load; {ce['graphs_while_serving']} compiled while serving | 0 while serving |")
    bench = report.get("bench", {}).get("results", {})
    for scenario, key, target in (("decode1", "decode_tok_s", "≥ 900 tok/s"),
                                  ("decode32", "decode_tok_s", "≥ 15,000 tok/s")):
        figures = bench.get(scenario, {})
        ours, hf = figures.get("llama32", {}).get(key), figures.get("hf", {}).get(key)
        if ours is not None:
            rows.append(f"| {scenario}, bf16 | {ours:,.0f} tok/s (HF {hf or 0:,.0f}) | {target} |")
    for scenario, figures in bench.items():
        if scenario.startswith("prefill_") and "tok_s" in figures.get("llama32", {}):
            ours, hf = figures["llama32"]["tok_s"], figures.get("hf", {}).get("tok_s") or 0
            target = "≥ 250,000 tok/s" if scenario == "prefill_8192" else ""
            rows.append(f"| prefill {scenario[8:]} tokens, bf16 | {ours:,.0f} tok/s (HF {hf:,.0f}) | {target} |")
    loop = report.get("loop", {}).get("results", {}).get("rows", {})
    for name, label, target in (("reuse", "TTFT sharing a 1,500-token prefix / first", "≤ 0.15×"),
                                ("long_prompt", "longest stream gap as a 2,000-token prompt arrives / median",
                                 "≤ 4×"),
                                ("long_max_tokens", "8 requests max_tokens 6000 (12 tokens read) / one", "≤ 2.5×")):
        if name in loop:
            rows.append(f"| {label} | {loop[name]['ratio']:.2f}× | {target} |")
    if "no_regression" in loop:
        nr = loop["no_regression"]
        rows.append(f"| 8 concurrent greedy 64-token requests / one (loop_bench) | "
                    f"{nr['concurrent64']['ratio']:.2f}× | ≤ 1.3× |")
    serve = report.get("serve", {}).get("results", {})
    if "concurrent" in serve:
        c = serve["concurrent"]
        rows.append(f"| {c['rows']} concurrent greedy requests / one alone | {c['ratio']:.2f}× wall | ≤ 2× |")
    if "poisson" in serve:
        p = serve["poisson"]
        rows.append(f"| {p['requests']} Poisson requests | {p['loop']['tok_s']:,.0f} tok/s, p50/p99 latency "
                    f"{p['loop']['latency_p50_s']:.2f}/{p['loop']['latency_p99_s']:.2f} s, TTFT p50 "
                    f"{p['loop']['ttft_p50_s']:.3f} s; {p['speedup']:.1f}× one after another | |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "cuda")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: tests,compiled,bench,serve,loop")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole check: each part gets its share, and a part past it is killed")
    p.add_argument("--quick", action="store_true",
                   help="bench.py without the HF baseline or the load scenario: decode batch 1 and 32 (128 tokens), "
                        "an 8k prefill, 2 repeats (for a short lease)")
    p.add_argument("--compile", choices=("auto", "off"), default="auto",
                   help="off: bench.py and loop_bench.py run the eager decode step (no compile at all)")
    p.add_argument("--_compiled", dest="compiled_child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("cuda_check: no CUDA device here; run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    if args.compiled_child:  # the compiled-against-eager part, in its own process so a hang can be killed
        print(json.dumps(compiled_against_eager(args.compiled_child)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    # shares of the budget, in the order the parts run; a part left time by an earlier one may use it
    shares = {"tests": 0.10, "compiled": 0.28, "bench": 0.30, "loop": 0.22, "serve": 0.10}
    deadline = time.perf_counter() + args.budget if args.budget else None

    def limit(part: str) -> float | None:
        if deadline is None:
            return None
        later = sum(v for k, v in shares.items() if k not in skip and list(shares).index(k) > list(shares).index(part))
        left = deadline - time.perf_counter()
        return max(5.0, left - later * args.budget)

    def save() -> None:  # after every part, so a check cut short still leaves what it measured
        (args.out / "check.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "check.md").write_text(table(report))

    py = sys.executable
    if "tests" not in skip:
        # only the files that hold CUDA tests: the others import test-only packages a GPU box may lack
        files = [str(f.relative_to(REPO)) for f in sorted((REPO / "tests").glob("test_*.py"))
                 if "cuda.is_available()" in f.read_text()]
        report["tests"] = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", *files],
                              args.out / "tests.log", limit("tests"))
        save()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench import build_checkpoint

    ckpt = build_checkpoint(args.out, "1b", 0)  # the random-weight 1B every later part runs
    if "compiled" not in skip:
        part = run([py, __file__, "--_compiled", str(ckpt)], args.out / "compiled.log", limit("compiled"))
        try:
            part.update(json.loads((args.out / "compiled.log").read_text().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            part["error"] = f"no result (rc {part['rc']}); see {part['log']}"
        report["compiled_vs_eager"] = part
        save()
    if "bench" not in skip:
        quick = ["--baseline", "none", "--scenarios", "decode1,decode32,prefill", "--prefill-tokens", "8192",
                 "--new-tokens", "128", "--repeats", "2"] if args.quick else ["--baseline", "hf"]
        report["bench"] = run([py, "benchmarks/bench.py", "--device", "cuda", *quick, "--compile", args.compile,
                               "--out", str(args.out)],
                              args.out / "bench.log", limit("bench"))
        found = sorted(args.out.glob("results-cuda-*.json"))
        if found:
            report["bench"]["results"] = json.loads(found[-1].read_text()).get("results", {})
        else:  # cut short: the scenarios it finished, from its log
            report["bench"]["results"] = {k: v for line in (args.out / "bench.log").read_text().splitlines()
                                          if "RESULT " in line
                                          for k, v in json.loads(line.split("RESULT ", 1)[1]).items()}
        save()
    if "loop" not in skip:
        loop_json = args.out / "loop.json"
        report["loop"] = run([py, "benchmarks/loop_bench.py", "--ckpt", str(ckpt), "--device", "cuda",
                              "--compile", args.compile, "--json", str(loop_json)], args.out / "loop.log", limit("loop"))
        if loop_json.exists():
            report["loop"]["results"] = json.loads(loop_json.read_text())
        save()
    if "serve" not in skip:
        serve_json = args.out / "serve.json"
        report["serve"] = run([py, "benchmarks/serve_bench.py", "--ckpt", str(ckpt), "--device", "cuda",
                               "--rows", "8", "--requests", "64", "--rate", "8", "--out", str(serve_json)],
                              args.out / "serve.log", limit("serve"))
        if serve_json.exists():
            report["serve"]["results"] = json.loads(serve_json.read_text())
        save()
    save()
    print(table(report))
    failed = [k for k in ("tests", "bench", "compiled_vs_eager", "loop", "serve")
              if report.get(k, {}).get("rc", 0) != 0]
    return 1 if failed or "error" in report.get("compiled_vs_eager", {}) else 0


if __name__ == "__main__":
    raise SystemExit(main())
