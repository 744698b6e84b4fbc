"""How long torch.compile takes per decode-step shape on CUDA, specialised (dynamic=False, the setting before
2026-11-26) against automatic dynamic shapes (dynamic=None, the runner's now: a size becomes symbolic after
the first recompile that sees it change, so later sizes reuse the graph and only record a new CUDA graph;
engine/runner.py compiles such graphs ahead at load). Also decode tokens/s once warm.

    python benchmarks/cuda_compile_probe.py --ckpt DIR      # prints JSON
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama32  # noqa: E402
from llama32.engine import Rows, static_decode_step  # noqa: E402
from llama32.sampling import SamplingParams, StepKnobs  # noqa: E402


def probe(llm, dynamic, shapes):
    torch._dynamo.reset()
    cfg = torch._dynamo.config
    cfg.recompile_limit = cfg.accumulated_recompile_limit = 256
    step = torch.compile(static_decode_step, mode="reduce-overhead", dynamic=dynamic)
    rows = Rows(llm, 8, 2048)
    knobs = StepKnobs(8, llm.config.vocab_size, llm.device)
    for i in range(8):
        knobs.set_row(i, SamplingParams(temperature=0.0), i, [1, 2, 3])
    out = {}
    for n, attended in shapes:
        tokens = torch.arange(n, device="cuda") + 100
        pos = torch.full((n,), attended - 1, device="cuda")
        args = (llm.model, tokens, pos, rows.cache.k, rows.cache.v, attended, knobs, None, None)
        torch.cuda.synchronize()
        t = time.perf_counter()
        step(*args)
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        for _ in range(3):
            step(*args)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            step(*args)
        torch.cuda.synchronize()
        out[f"{n}x{attended}"] = {"first_call_s": round(first, 2), "step_ms": round((time.perf_counter() - t) / 20 * 1e3, 3)}
        print(dynamic, n, attended, out[f"{n}x{attended}"], file=sys.stderr, flush=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", type=Path, required=True)
    args = p.parse_args()
    llm = llama32.load(args.ckpt, device="cuda", dtype="bfloat16")
    shapes = [(1, 256), (1, 512), (1, 1024), (8, 256), (8, 512), (8, 1024), (1, 2048)]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    result["dynamic_none"] = probe(llm, None, shapes)
    result["static"] = probe(llm, False, shapes[:4])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
