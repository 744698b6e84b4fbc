"""glibc's malloc keeps freed memory for reuse once a CPU handle is loaded (llama32/malloc.py)."""

import subprocess
import sys

import pytest

import llama32
from llama32 import malloc

# Three rounds of twelve 10 MB tensors, each written and then all freed, as a forward's temporaries are made and
# freed; prints the page faults of the third round. With glibc's own settings the freed heap top goes back to the
# kernel and the third round faults its pages in again; with `keep_freed_memory` it reuses them.
CHURN = """
import resource, sys, torch
if sys.argv[1] == "kept":
    from llama32.malloc import keep_freed_memory
    assert keep_freed_memory()
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = [torch.empty(10 << 20, dtype=torch.uint8).fill_(1) for _ in range(12)]
    del ts
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not glibc(), reason="the settings are glibc's (malloc.py does nothing elsewhere)")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    runs = {how: int(subprocess.run([sys.executable, "-c", CHURN, how], capture_output=True, text=True,
                                    check=True).stdout) for how in ("default", "kept")}
    assert runs["default"] > 20000  # 120 MB in 4 KiB pages, faulted in again
    assert runs["kept"] < 2000, runs


@pytest.mark.skipif(not glibc(), reason="the settings are glibc's (malloc.py does nothing elsewhere)")
def test_a_cpu_handle_keeps_freed_memory_unless_told_not_to(make_checkpoint, monkeypatch):
    monkeypatch.setattr(malloc, "_state", {})  # (as in a fresh process)
    llama32.load(make_checkpoint(kind="llama32"), device="cpu")
    assert malloc._state.get("kept") is True
    monkeypatch.setattr(malloc, "_state", {})
    monkeypatch.setenv("LLAMA32_MALLOC", "default")
    llama32.load(make_checkpoint(kind="llama32"), device="cpu")
    assert malloc._state.get("kept") is False
