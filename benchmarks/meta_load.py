"""Load time and peak memory of Meta's original layout against the Hugging Face layout of the same weights.

    flock /tmp/llama32-heavy.lock python benchmarks/meta_load.py [--rounds 3] [--dtype bfloat16] [--keep DIR]

Writes a random-weight checkpoint of the exact Llama 3.2 1B shape (bench.py's, bfloat16, tied head, the real
Llama 3 tokenizer) in both layouts into a temporary folder: the HF one (model.safetensors, tokenizer.json) and
Meta's (params.json, consolidated.00.pth, tokenizer.model; written by tests/fixtures.py's inverse of
transformers' converter). Then loads each with `llama32.load` in a fresh process, alternating the two for
`--rounds` rounds, and reports per load: wall time, the process's peak RSS growth (VmHWM: counts mapped file
pages too), the peak of its anonymous memory (RssAnon, sampled), both over the load plus one 16-token forward,
and then, in the same process, the tokenizer's load alone and the weights' load alone (wall and CPU seconds:
the machine is shared, and CPU time moves less with other work). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

import bench  # noqa: E402  (bench.py: the 1B checkpoint writer and the load measurement)


def fixtures_module():
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import fixtures
    finally:
        sys.path.remove(str(REPO / "tests"))
    return fixtures


def child(layout: str, ckpt: Path, dtype: str) -> None:
    result = bench.load_child("llama32", ckpt, torch.device("cpu"), getattr(torch, dtype), "off")
    from llama32.tokenizer import Tokenizer
    start, cpu = time.perf_counter(), time.process_time()
    Tokenizer.from_dir(ckpt)
    result["tokenizer_s"] = time.perf_counter() - start
    result["tokenizer_cpu_s"] = time.process_time() - cpu
    # the weights alone (a second load in this process: the file is in the page cache, as it was above)
    gc.collect()
    from llama32.config import LlamaConfig
    from llama32.meta import MetaCheckpoint, is_meta_dir
    from llama32.weights import load_model
    start, cpu = time.perf_counter(), time.process_time()
    if is_meta_dir(ckpt):
        checkpoint = MetaCheckpoint(ckpt)
        model = load_model(ckpt, checkpoint.config, device="cpu", dtype=getattr(torch, dtype),
                           entries=checkpoint.entries(), config_name="params.json")
    else:
        model = load_model(ckpt, LlamaConfig.from_file(ckpt / "config.json"), device="cpu", dtype=getattr(torch, dtype))
    result["weights_s"] = time.perf_counter() - start
    result["weights_cpu_s"] = time.process_time() - cpu
    del model
    result["layout"] = layout
    print(json.dumps(result))


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--keep", type=Path, help="write (or reuse) the two checkpoints here and leave them")
    p.add_argument("--_child", nargs=2, metavar=("LAYOUT", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        child(args._child[0], Path(args._child[1]), args.dtype)
        return

    base = args.keep or Path(tempfile.mkdtemp(prefix="llama32-meta-load-"))
    try:
        t0 = time.perf_counter()
        hf = bench.build_checkpoint(base, "1b", seed=0)
        meta = base / "meta-1b"
        if not (meta / "params.json").is_file():
            fixtures_module().write_meta_checkpoint(hf, meta)
        write_s = time.perf_counter() - t0
        sizes = {"hf": sum(f.stat().st_size for f in hf.glob("*.safetensors")),
                 "meta": sum(f.stat().st_size for f in meta.glob("consolidated.*.pth"))}
        weight_bytes = bench.parameter_count(hf) * (2 if args.dtype == "bfloat16" else 4)
        runs: dict[str, list[dict]] = {"hf": [], "meta": []}
        for _ in range(args.rounds):
            for layout, ckpt in (("hf", hf), ("meta", meta)):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--dtype", args.dtype, "--_child", layout, str(ckpt)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
                if proc.returncode:
                    raise SystemExit(f"{layout} load failed:\n{proc.stderr[-4000:]}")
                runs[layout].append(json.loads(proc.stdout.strip().splitlines()[-1]))

        def summary(rs: list[dict]) -> dict:
            med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
            return {"load_s": med("load_s"), "load_s_runs": [round(r["load_s"], 2) for r in rs],
                    "tokenizer_s": med("tokenizer_s"), "tokenizer_cpu_s": med("tokenizer_cpu_s"),
                    "weights_s": med("weights_s"), "weights_cpu_s": med("weights_cpu_s"),
                    "vmhwm_growth_over_weights": med("host_peak_growth_bytes") / weight_bytes,
                    "anon_peak_growth_over_weights": med("host_anon_peak_growth_bytes") / weight_bytes}

        out = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "flags": cpu_flags(), "torch": torch.__version__, "threads": torch.get_num_threads()},
            "dtype": args.dtype, "weight_bytes": weight_bytes, "file_bytes": sizes, "write_s": write_s,
            "hf": summary(runs["hf"]), "meta": summary(runs["meta"]),
            "runs": runs,
        }
        out["meta_over_hf_load_s"] = [m["load_s"] / h["load_s"] for h, m in zip(runs["hf"], runs["meta"])]
        print(json.dumps(out, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
