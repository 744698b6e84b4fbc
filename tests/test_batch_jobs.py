"""Offline batch jobs (llama32/batch.py, `python -m llama32 batch`): on one handle and on a local Ray, every result
equal to `generate` on that request, bad records as error lines, and a killed job that resumes to the same file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

import llama32
from fixtures import text_without_cached, without_cached
from llama32.batch import done_ids, run, run_file

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def requests() -> list[dict]:
    """~20 mixed records: greedy, seeded sampling, penalties, tools, a bad request, a record without id.

    On SmolLM2 the tools record is an error too: its chat template cannot render tools (said, never dropped)."""
    out = []
    for i in range(6):
        out.append({"id": f"greedy-{i}", "request": {"prompt": f"Name a famous person born in year {1900 + i}.",
                                                    "temperature": 0, "max_tokens": 12 + i}})
    for i in range(6):
        out.append({"id": f"seeded-{i}", "request": {"messages": [{"role": "user", "content": f"A word for {i}?"}],
                                                    "temperature": 0.9, "top_p": 0.95, "seed": 100 + i,
                                                    "max_tokens": 10}})
    out.append({"id": "penalties", "request": {"prompt": "List some fruits.", "temperature": 0, "max_tokens": 20,
                                               "repetition_penalty": 1.3, "frequency_penalty": 0.5}})
    out.append({"id": "top-k", "request": {"prompt": "Say something.", "temperature": 1.2, "top_k": 5, "seed": 9,
                                           "max_tokens": 10}})
    out.append({"id": "tools", "request": {"messages": [{"role": "user", "content": "Weather in Paris?"}],
                                           "tools": [WEATHER], "temperature": 0, "max_tokens": 16}})
    out.append({"id": "bad", "request": {"prompt": "Hi", "temperature": 7}})
    out.append({"request": {"prompt": "No id here.", "temperature": 0, "max_tokens": 6}})  # id: its line number
    out.append({"id": 42, "request": {"raw": True, "prompt": "<|im_start|>user\nHi<|im_end|>\n", "max_tokens": 5,
                                      "temperature": 0, "stop": ["\n"]}})
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    src = root / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests()))
    return src


def expected(llm) -> list[dict]:
    rows = []
    for line, record in enumerate(requests(), start=1):
        rid = record.get("id", line)
        try:
            rows.append({"id": rid, "result": llama32.generate(llm, **record["request"])})
        except llama32.InvalidRequest as e:
            rows.append({"id": rid, "error": str(e)})
    return rows


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_local_job_equals_generate(smol, smollm2_dir, job, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_file(job, out, model=str(smollm2_dir), device="cpu", dtype="float32", progress=False)
    assert summary == {"skipped": 0, "written": len(requests()), "errors": 2}  # the bad record and the tools one
    want = expected(smol)
    assert without_cached(read(out)) == without_cached(json.loads(json.dumps(want)))
    assert [r["id"] for r in read(out)][-3:] == ["bad", 17, 42]
    assert "temperature" in read(out)[-3]["error"]


def test_ray_job_with_two_actors_writes_the_same_file(smollm2_dir, job, tmp_path):
    pytest.importorskip("ray")
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    run_file(job, local, model=str(smollm2_dir), device="cpu", dtype="float32", progress=False)
    summary = run_file(job, on_ray, model=str(smollm2_dir), device="cpu", dtype="float32", use_ray=True, workers=2,
                       progress=False)
    assert summary["written"] == len(requests())
    assert text_without_cached(on_ray.read_text()) == text_without_cached(local.read_text())


def test_python_api(smol):
    results = run(smol, [r["request"] for r in requests()[:3]] + [{"prompt": "x", "top_k": 99}])
    assert without_cached(results[:3]) == without_cached([{"result": llama32.generate(smol, **r["request"])}
                                                          for r in requests()[:3]])
    assert "top_k" in results[3]["error"]


def test_torn_last_line_is_dropped(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "result": {}}\n{"id": "b", "resu')
    assert done_ids(out) == {'"a"'}
    assert out.read_text() == '{"id": "a", "result": {}}\n'


def test_killed_job_resumes_to_the_same_file(smollm2_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "request": {"prompt": f"Tell me about the number {i}.",
                                                            "temperature": 0.7, "seed": i + 1, "max_tokens": 24}})
                           + "\n" for i in range(24)))
    cmd = [sys.executable, "-m", "llama32", "batch", str(src), None, "--model", str(smollm2_dir), "--device", "cpu",
           "--dtype", "float32", "--no-progress"]
    whole = tmp_path / "whole.jsonl"
    subprocess.run([c if c else str(whole) for c in cmd], check=True, capture_output=True, timeout=600)

    resumed = tmp_path / "resumed.jsonl"
    proc = subprocess.Popen([c if c else str(resumed) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if resumed.exists() and resumed.read_text().count("\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    partial = resumed.read_text().count("\n")
    assert proc.returncode == -signal.SIGKILL and 3 <= partial < 24  # it really stopped half-way
    rerun = subprocess.run([c if c else str(resumed) for c in cmd], check=True, capture_output=True, text=True,
                           timeout=600)
    assert f"{partial} already in" in rerun.stderr
    # byte for byte but for the counts of reused prompt tokens, which depend on what ran before in each process
    assert text_without_cached(resumed.read_text()) == text_without_cached(whole.read_text())
    ids = [r["id"] for r in read(resumed)]
    assert ids == list(range(24))  # every id exactly once, in input order
