"""`load` computes on a thread of its own, so the caller's thread keeps no OpenMP pool (llama32/openmp.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from llama32.openmp import on_own_thread

REPO = Path(__file__).resolve().parent.parent


def test_on_own_thread_returns_the_result_and_raises_the_error_from_another_thread():
    here = threading.get_ident()
    assert on_own_thread(lambda a, b=0: (a + b, threading.get_ident()), 2, b=3)[0] == 5
    assert on_own_thread(threading.get_ident) != here

    def fail():
        raise KeyError("the fn's own error")

    with pytest.raises(KeyError, match="the fn's own error"):
        on_own_thread(fail)


GOMP = sys.platform == "linux" and "OpenMP" in torch.__config__.parallel_info()


@pytest.mark.skipif(not GOMP, reason="counts libgomp's pool threads in /proc (Linux, PyTorch's OpenMP backend)")
def test_a_bfloat16_load_and_generation_leave_the_callers_thread_without_a_pool(smollm2_dir):
    # libgomp gives a thread its pool of workers at its first parallel region and keeps it: a region opened here
    # afterwards makes a new worker thread only if loading and generating opened none on this thread. With two
    # pools on two CPUs, libgomp throttles every worker's spinning (openmp.py).
    script = textwrap.dedent("""
        import os, sys, torch
        sys.path.insert(0, sys.argv[2])
        import llama32
        threads = lambda: len(os.listdir("/proc/self/task"))
        llm = llama32.load(sys.argv[1], dtype="bfloat16", device="cpu")
        out = llm.generate(prompt="Count to three.", max_tokens=4, temperature=0)
        assert out["response"], out
        names = sorted(t.name for t in __import__("threading").enumerate())
        before = threads()
        torch.ones(1 << 22).sum()  # a parallel region on this thread
        print(threads() - before, names)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(smollm2_dir), str(REPO)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    made, names = done.stdout.strip().split(" ", 1)
    assert "llama32-load" not in names  # the loading thread ended
    assert int(made) == 1, f"this thread already had an OpenMP pool after load: {done.stdout}"
