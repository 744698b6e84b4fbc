"""glibc's malloc keeps freed memory for reuse once a CPU handle is loaded (llama32/malloc.py)."""

import subprocess
import sys

import pytest

import llama32
from llama32 import malloc

# Three rounds of twelve 10 MB tensors, each written and then all freed, as a forward's temporaries are made and
# freed; prints the page faults of the third round and how much of the 120 MB stays resident once it is freed.
# "released" fixes glibc's mmap threshold at 1 MiB, so every block is mapped for it and unmapped when freed: the
# control, whatever glibc's own dynamic thresholds and the machine's heap would do (a CI machine's default run
# faulted in 10 MB in its third round where this one faulted in 120 MB, and with transparent huge pages a fresh
# page can be 2 MiB, so fault counts alone are no control). With `keep_freed_memory` the memory stays and the
# third round reuses it.
CHURN = """
import ctypes, resource, sys, torch
if sys.argv[1] == "kept":
    from llama32.malloc import keep_freed_memory
    assert keep_freed_memory()
else:
    from llama32.malloc import M_MMAP_THRESHOLD
    assert ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)  # fixed: no dynamic raising
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
start = resident()
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = [torch.empty(10 << 20, dtype=torch.uint8).fill_(1) for _ in range(12)]
    del ts
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, resident() - start)
"""


def glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not glibc(), reason="the settings are glibc's (malloc.py does nothing elsewhere)")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    runs = {how: tuple(map(int, subprocess.run([sys.executable, "-c", CHURN, how], capture_output=True, text=True,
                                               check=True).stdout.split())) for how in ("released", "kept")}
    assert runs["released"][1] < 20 << 20, runs  # the control: freed memory went back to the kernel
    assert runs["kept"][1] > 100 << 20, runs  # kept: the 120 MB stay with the process...
    assert runs["kept"][0] < 2000, runs  # ...and the third round faults nothing in


@pytest.mark.skipif(not glibc(), reason="the settings are glibc's (malloc.py does nothing elsewhere)")
def test_a_cpu_handle_keeps_freed_memory_unless_told_not_to(make_checkpoint, monkeypatch):
    monkeypatch.setattr(malloc, "_state", {})  # (as in a fresh process)
    llama32.load(make_checkpoint(kind="llama32"), device="cpu")
    assert malloc._state.get("kept") is True
    monkeypatch.setattr(malloc, "_state", {})
    monkeypatch.setenv("LLAMA32_MALLOC", "default")
    llama32.load(make_checkpoint(kind="llama32"), device="cpu")
    assert malloc._state.get("kept") is False
