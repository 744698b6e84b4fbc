"""Smoke test of benchmarks/bench.py: the whole script, end to end, at the tiny size on CPU.

It checks that every scenario runs for both implementations and lands in the JSON (and the chart), not how
fast anything is: no timing assertions.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")  # the baseline

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench.py"


def test_bench_smoke_tiny_cpu(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(SCRIPT), "--device", "cpu", "--size", "tiny", "--dtype", "float32",
        "--scenarios", "decode1,decode32,prefill,load", "--prompt-tokens", "16", "--new-tokens", "8",
        "--batch", "3", "--prefill-tokens", "64", "--threads", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    report = json.loads((out / "results-cpu-float32.json").read_text())
    # The JSON printed on stdout is the same report.
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == report
    assert (out / "ckpt-tiny" / "model.safetensors").is_file()

    settings = report["settings"]
    assert settings["device"] == "cpu" and settings["dtype"] == "float32" and settings["threads"] == 1
    assert settings["weight_bytes"] == settings["n_params"] * 4
    for key in ("date", "torch", "device_name", "threads", "cpu_model"):
        assert report["machine"][key], key

    results = report["results"]
    assert list(results) == ["decode1", "decode32", "prefill_64", "load"]
    for scenario, by_impl in results.items():
        assert set(by_impl) == {"llama32", "hf"}, scenario
    for impl in ("llama32", "hf"):
        d1, d32 = results["decode1"][impl], results["decode32"][impl]
        assert d1["batch"] == 1 and d32["batch"] == 3
        for d in (d1, d32):
            assert d["prompt_tokens"] == 16
            assert d["completion_tokens"] == [8] * d["batch"]  # every row produced all its tokens
            assert d["ttft_s"] > 0 and d["total_s"] > 0 and d["e2e_tok_s"] > 0 and d["first_s"] > 0
        p = results["prefill_64"][impl]
        assert p["tokens"] == 64 and p["seconds"] > 0 and p["tok_s"] > 0
        load = results["load"][impl]
        assert load["load_s"] > 0 and load["peak_bytes"] > 0 and load["peak_ratio"] > 0
    assert results["prefill_64"]["llama32"]["method"] == "model.forward"

    metrics = {(r["scenario"], r["key"]) for r in report["table"]}
    assert metrics == {
        ("decode1", "decode_tok_s"), ("decode1", "ttft_s"), ("decode1", "fraction_of_limit"),
        ("decode32", "decode_tok_s"), ("decode32", "ttft_s"),
        ("prefill_64", "tok_s"), ("load", "load_s"), ("load", "peak_ratio"), ("load", "host_anon_peak_ratio"),
    }  # fmt: skip
    # batch 1 against the read-bandwidth limit measured around each of its timed calls
    assert report["machine"]["cpu_flags"] is not None
    for impl in ("llama32", "hf"):
        d1 = results["decode1"][impl]
        assert d1["weight_bytes"] > 0 and len(d1["bandwidth_gb_s_runs"]) == len(d1["decode_tok_s_runs"])
        assert all(b > 0 and a > 0 for b, a in d1["bandwidth_gb_s_runs"])
        assert d1["fraction_of_limit"] == statistics.median(d1["fraction_of_limit_runs"]) > 0
    assert results["decode1"]["llama32"]["weight_bytes"] == results["decode1"]["hf"]["weight_bytes"]
    for row in report["table"]:
        # decode_tok_s can only be missing if a whole run beat its own first token: none of that here
        assert row["llama32"] > 0 and row["hf"] > 0 and row["ratio"] > 0, row

    if importlib.util.find_spec("matplotlib") is not None:
        chart = out / "chart-cpu-float32.png"
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_alternates_and_keeps_medians(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(SCRIPT), "--device", "cpu", "--size", "tiny", "--dtype", "float32",
        "--scenarios", "decode1,prefill", "--prompt-tokens", "16", "--new-tokens", "12", "--prefill-tokens", "32",
        "--repeats", "5", "--threads", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "results-cpu-float32.json").read_text())
    assert report["settings"]["repeats"] == 5
    for impl in ("llama32", "hf"):
        d = report["results"]["decode1"][impl]
        assert len(d["ttft_runs_s"]) == len(d["total_runs_s"]) == len(d["decode_tok_s_runs"]) == 5
        assert d["total_s"] == statistics.median(d["total_runs_s"])
        p = report["results"]["prefill_32"][impl]
        assert len(p["tok_s_runs"]) == 5 and p["seconds"] == statistics.median(p["runs_s"])
    ours, base = (report["results"]["decode1"][impl]["decode_tok_s_runs"] for impl in ("llama32", "hf"))
    row = next(r for r in report["table"] if r["key"] == "decode_tok_s")
    # a run's decode rate is (n-token call - 1-token call); on a busy machine the difference can be <= 0 and
    # the run has no rate (None), never a negative or infinite one, and its ratio is None too
    assert all(r is None or r > 0 for r in ours + base)
    assert row["ratio_runs"] == [a / b if a and b else None for a, b in zip(ours, base)]


def test_bench_rejects_unknown_scenario(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--scenarios", "decode1,warp", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "warp" in proc.stderr
    assert not any(tmp_path.iterdir())  # rejected before building anything


def test_bench_int8_rows(tmp_path):
    """--quantize int8: llama32 in int8 next to the baseline in the run dtype, in a file of its own, its decode
    set against the bandwidth limit of the int8 bytes it reads."""
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(SCRIPT), "--device", "cpu", "--size", "tiny", "--dtype", "float32", "--quantize", "int8",
        "--scenarios", "decode1", "--prompt-tokens", "16", "--new-tokens", "4", "--repeats", "1", "--threads", "1",
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "results-cpu-float32-int8.json").read_text())
    assert report["settings"]["quantize"] == "int8"
    d1 = report["results"]["decode1"]
    assert d1["llama32"]["weight_bytes"] * 4 == d1["hf"]["weight_bytes"]  # int8 reads a quarter of float32
    assert d1["llama32"]["completion_tokens"] == [4] and d1["llama32"]["fraction_of_limit"] > 0
