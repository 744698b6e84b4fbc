"""Keep freed memory for reuse on the CPU: two glibc malloc settings that `load` applies once per process.

A forward on the CPU makes large temporaries (a prompt's activations, a step's logits), and frees them before
the next forward makes them again. glibc's malloc serves a block above its mmap threshold (128 KiB at first,
raised as such blocks are freed, to 32 MiB at most) with fresh pages from the kernel, and gives the top of its
heap back once more than the trim threshold (twice the mmap threshold) lies free there. Fresh pages are faulted
in, one 4 KiB page at a time, on first touch. On a 2-core Intel Xeon VM (AMX) a 47 MB float32 `pow` took
12.7 ms with 11,521 page faults against 2.7 ms into a tensor it had already written, and in the generation
loop, with both cores busy, one such `pow` took 75 ms; 32 prompts of 180 tokens and 64 new tokens each took
29.1 s, and 27.3 s with the settings below (benchmarks/RESULTS.md).

So `keep_freed_memory` sets the mmap threshold to its largest value (blocks up to 32 MiB come from the heap and
go back to it) and the trim threshold to 1 GiB (free memory at the heap's top is kept up to that much). What it
costs: a process keeps up to 1 GiB more than it uses, once it has used that much. What it changes: speed only,
never a result. It is process-wide, as any malloc setting is; `LLAMA32_MALLOC=default` leaves glibc's own
settings, and it does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import threading

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30

_lock = threading.Lock()
_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Apply the settings (the module doc), once per process; whether they are in force."""
    with _lock:
        if "kept" not in _state:
            _state["kept"] = _apply()
        return _state["kept"]


def _apply() -> bool:
    if os.environ.get("LLAMA32_MALLOC", "").strip().lower() == "default":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only (musl has no mallopt parameters of these numbers)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
