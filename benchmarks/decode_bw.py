"""Decode speed against the memory-bandwidth limit, per dtype and with int8, on one machine in one run.

A batch-1 decode step reads every weight once, so its ceiling is (read bandwidth) / (bytes of the weights). The
bandwidth drifts on shared VMs, so it is measured right before and after every timed call (a full read of a
buffer far larger than the caches), and each decode figure is reported as a fraction of the limit taken around
it. Also: time to first token for a `--prompt-tokens` (512) prompt per variant, and the CPU's flags.

    python benchmarks/decode_bw.py --ckpt benchmarks/out/ckpt-1b --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import llama32  # noqa: E402
from bench import Bandwidth, cpu_flags, streamed_bytes  # noqa: E402

VARIANTS = {"bf16": ("bfloat16", None), "fp32": ("float32", None), "int8": ("bfloat16", "int8")}


def decode_once(llm, prompt_ids: list[int], new_tokens: int) -> tuple[float, int]:
    """Decode tok/s of one greedy request: (n - 1) tokens over (total - time to the first token)."""
    req = dict(prompt=llm.tokenizer.decode(prompt_ids), raw=True, temperature=0, max_tokens=new_tokens)
    start = time.perf_counter()
    llama32.generate(llm, **dict(req, max_tokens=1))
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = llama32.generate(llm, **req)
    total = time.perf_counter() - start
    n = out["usage"]["completion_tokens"]
    return (n - 1) / (total - ttft), n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--variants", default="bf16,fp32,int8")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "decode_bw.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = Bandwidth(torch.device("cpu"))
    report = {"machine": {"cpu_flags": cpu_flags(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "mkldnn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                          "date": time.strftime("%Y-%m-%d %H:%M:%S")}, "variants": {}}
    for name in args.variants.split(","):
        dtype, quantize = VARIANTS[name]
        llm = llama32.load(args.ckpt, device="cpu", dtype=dtype, quantize=quantize)
        ids = [i % 100000 + 1000 for i in range(args.prompt_tokens)]
        llama32.generate(llm, prompt="warm up", raw=True, temperature=0, max_tokens=4)
        # time to first token: a prompt of prompt_tokens, one token out
        ttft_start = time.perf_counter()
        llama32.generate(llm, prompt=llm.tokenizer.decode(ids), raw=True, temperature=0, max_tokens=1)
        ttft = time.perf_counter() - ttft_start
        weight_bytes = streamed_bytes(llm.model)
        runs = []
        for _ in range(args.repeats):
            before = bandwidth.gb_s()
            tok_s, _ = decode_once(llm, ids[:128], args.new_tokens)
            after = bandwidth.gb_s()
            limit = min(before, after) * 1e9 / weight_bytes
            runs.append({"tok_s": tok_s, "bandwidth_gb_s": [before, after], "limit_tok_s": limit,
                         "fraction_of_limit": tok_s / limit})
        med = statistics.median(r["tok_s"] for r in runs)
        frac = statistics.median(r["fraction_of_limit"] for r in runs)
        report["variants"][name] = {"dtype": dtype, "quantize": quantize, "weight_bytes": weight_bytes,
                                    "decode_tok_s": med, "fraction_of_limit": frac, "ttft_s": ttft,
                                    "prompt_tokens": args.prompt_tokens, "runs": runs}
        print(f"{name}: decode {med:.2f} tok/s = {frac:.0%} of the bandwidth limit "
              f"({weight_bytes / 1e9:.2f} GB a step); TTFT {args.prompt_tokens} tokens {ttft:.2f} s", flush=True)
        del llm
    v = report["variants"]
    if "int8" in v and "bf16" in v:
        report["int8_over_bf16"] = v["int8"]["decode_tok_s"] / v["bf16"]["decode_tok_s"]
        print(f"int8 / bf16 decode: {report['int8_over_bf16']:.2f}x")
    if "bf16" in v and "fp32" in v:
        report["bf16_ttft_over_fp32"] = v["bf16"]["ttft_s"] / v["fp32"]["ttft_s"]
        print(f"bf16 / fp32 time to first token: {report['bf16_ttft_over_fp32']:.2f}x")
    print("cpu flags:", " ".join(report["machine"]["cpu_flags"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
