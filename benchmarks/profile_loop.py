"""Where the generation loop's time goes (issue 35): `torch.profiler` over whole calls through the public API.

    python benchmarks/profile_loop.py [--ckpt DIR] [--scenario decode1|decode32|concurrent8|concurrent32|prefill2048]

Without --ckpt the random-weight Llama 3.2 1B of `bench.py` (bfloat16, on the CPU). Each scenario runs once
unprofiled (warm-up), then once under the profiler, which records every thread (the loop's included). Prints
the wall time, the op time by group (projections, attention, copies and cats, elementwise, the sampler, the
rest) and the top ops by self CPU time, and the share of wall time spent outside torch ops (Python, waiting,
the output thread): what a compiled step or fused kernels could win, and what they could not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))
sys.path.append(str(REPO / "benchmarks"))

import llama32  # noqa: E402

GROUPS = [  # (group, substrings of an op's name), first match wins
    ("projections", ("_linear_pointwise", "aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("copies and cats", ("aten::cat", "aten::copy_", "aten::index_put", "aten::clone", "aten::contiguous",
                         "aten::to", "aten::_to_copy", "aten::stack", "aten::index")),
    ("sampler", ("aten::topk", "aten::sort", "aten::softmax", "aten::log_softmax", "aten::argmax", "aten::multinomial",
                 "aten::cumsum", "aten::exponential", "aten::max")),
    ("elementwise", ("aten::mul", "aten::add", "aten::silu", "aten::rsqrt", "aten::pow", "aten::mean", "aten::neg",
                     "aten::where", "aten::sub", "aten::div", "aten::exp", "aten::sin", "aten::cos", "aten::fill_",
                     "aten::zero_", "aten::masked_fill")),
]


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other ops"


def scenario_calls(name: str, maker):
    """The call to profile: a function of no arguments, and the tokens it generates."""
    if name == "decode1":
        prompt = maker.make(128, 1).text
        return [dict(prompt=prompt, raw=True, temperature=0, max_tokens=64)]
    if name.startswith("decode"):  # decodeN: N rows decoding, prompts too short to matter
        return [dict(prompt=maker.make(16, 300 + i).text, raw=True, temperature=0, max_tokens=128)
                for i in range(int(name[6:]))]
    if name.startswith("concurrent"):
        return [dict(prompt=maker.make(128, 100 + i).text, raw=True, temperature=0, max_tokens=64)
                for i in range(int(name[10:]))]
    if name.startswith("prefill"):
        return [dict(prompt=maker.make(int(name[7:]), 7).text, raw=True, temperature=0, max_tokens=1)]
    raise SystemExit(f"unknown scenario {name}")


def main() -> None:
    import torch
    from bench import PromptMaker, build_checkpoint
    from serve_bench import cpu_flags

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--scenario", default="concurrent8")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ckpt = args.ckpt or build_checkpoint(REPO / "benchmarks" / "out", "1b", 0)
    llm = llama32.load(ckpt, dtype="bfloat16", device="cpu", max_batch=32)
    llm.loop.reuse_prefixes = False  # every prompt computed, warm-up or not
    maker = PromptMaker(ckpt)
    requests = scenario_calls(args.scenario, maker)
    llama32.generate_batch(llm, requests)  # warm-up
    every_thread = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)  # the loop's own thread too
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                experimental_config=every_thread) as prof:
        started = time.perf_counter()
        out = llama32.generate_batch(llm, requests)
        wall = time.perf_counter() - started
    tokens = sum(r["usage"]["completion_tokens"] for r in out)
    by_group: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        by_group[group_of(e.key)] += e.self_cpu_time_total / 1e6
        by_op[e.key] += e.self_cpu_time_total / 1e6
    ops = sum(by_group.values())
    # self CPU time sums over threads; with the loop thread doing nearly all the work it approximates its busy time
    report = {"scenario": args.scenario, "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
              "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "op_s": ops,
              "outside_ops_s": max(wall - ops, 0.0),
              "groups_s": dict(sorted(by_group.items(), key=lambda kv: -kv[1])),
              "top_ops_s": dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top])}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
