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
def oracles(smollm2_dir):
    made = {}

    def oracle(dtype: str):
        if dtype not in made:
            made[dtype] = schedule_fuzz.Oracle(llama32.load(smollm2_dir, dtype=dtype, device="cpu", max_batch=1))
        return made[dtype]
    return oracle


@pytest.mark.parametrize("seed,max_batch,budget,fault,dtype", [
    (2, 3, "ample", None, "bfloat16"),
    (3, 3, "tight", "decode", "float32"),
    (4, 3, "ample", "prefill", "float32"),
])  # an ample budget (the batch fills: issue 34's race) in bfloat16 (a row's answer beside others is its solo
#    answer to the bit there too; this seed failed 2 calls when a prompt chunk needing no logits broke the CPU's row
#    tiles), a tight one (pauses, chunks, reuse), both faults
def test_a_schedule_gives_every_call_its_solo_result(smollm2_dir, oracles, seed, max_batch, budget, fault, dtype):
    llm = schedule_fuzz.handles(smollm2_dir, max_batch=max_batch, budget=budget, dtype=dtype)
    report = schedule_fuzz.run_schedule(llm, oracles(dtype), seed, calls=8, fault=fault)
    summary = report.as_dict()
    assert summary["hangs"] == 0, summary
    assert summary["mismatches"] == 0 and summary["unexpected_errors"] == 0, summary
    assert summary["leaked_bytes"] == 0, summary
    assert summary["requests"] >= 8
