"""A few schedules of the schedule fuzzer (benchmarks/schedule_fuzz.py) in the suite: random calls fired from
threads at random moments on handles with a small batch and a tight or ample KV budget, every finished result
equal to its solo run, nobody hanging, the loop settling with no KV bytes but the prefix index's. The soak
runs thousands of schedules (`python benchmarks/schedule_fuzz.py --minutes 120`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import llama32

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import schedule_fuzz  # noqa: E402


@pytest.fixture(scope="module")
def oracle(smollm2_dir):
    return schedule_fuzz.Oracle(llama32.load(smollm2_dir, dtype="float32", device="cpu", max_batch=1))


@pytest.mark.parametrize("seed,max_batch,budget,fault", [
    (1, 3, "ample", None),
    (3, 3, "tight", "decode"),
    (4, 3, "ample", "prefill"),
])  # an ample budget (the batch fills: issue 34's race), a tight one (pauses, chunks, reuse), both faults
def test_a_schedule_gives_every_call_its_solo_result(smollm2_dir, oracle, seed, max_batch, budget, fault):
    llm = schedule_fuzz.handles(smollm2_dir, max_batch=max_batch, budget=budget)
    report = schedule_fuzz.run_schedule(llm, oracle, seed, calls=8, fault=fault)
    summary = report.as_dict()
    assert summary["hangs"] == 0, summary
    assert summary["mismatches"] == 0 and summary["unexpected_errors"] == 0, summary
    assert summary["leaked_bytes"] == 0, summary
    assert summary["requests"] >= 8
