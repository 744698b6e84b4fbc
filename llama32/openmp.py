"""Keep the generation loop's thread the only OpenMP pool llama32 makes, so the loop's parallel work starts at once.

PyTorch's CPU builds for Linux run their parallel regions (every oneDNN product, and ATen ops over many elements)
on libgomp, GNU's OpenMP. libgomp gives each host thread that opens a parallel region a pool of worker threads of
its own, and counts the workers of every pool together. Between regions a worker spins for a while before it
sleeps, so the next region finds it awake; but once the count exceeds the CPUs the process may use, libgomp
spins 100 times instead of about 300,000 (its "throttled" spin count), and nearly every region starts by waking
a sleeping worker. `GOMP_SPINCOUNT` only caps that throttled count, and `OMP_WAIT_POLICY=active` raises it to 1,000.

The generation loop computes on a thread of its own (engine/loop.py). Loading used to compute on the caller's
thread (converting, packing and checking weights), which gave that thread a pool too: on a 2-CPU machine, the
loop's worker, the caller's worker and the caller itself made 3 managed threads against 2 CPUs, throttled. On a
2-core AMD EPYC, a decode step's attention scores (8 heads, 4 query rows by 512 keys, bfloat16) right after a
weight's product took 94 us there against 43 us with one pool, and a softmax over 32 x 512 floats 61 against 8 us;
a decode step opens well over a hundred regions (benchmarks/RESULTS.md, "seventh stop", has the whole-loop figures).

So `load` does its work on a thread of its own that ends when loading ends: libgomp releases a thread's pool,
and takes its workers off the count, when the thread exits. The loop's pool is then the only one llama32 keeps.
A caller whose own thread runs large torch operations makes a pool of its own, and the loop's regions are
throttled again (docs/API.md says so); that changes speed only, never results.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def on_own_thread(fn: Callable[..., T], *args, name: str = "llama32-load", **kwargs) -> T:
    """`fn(*args, **kwargs)` computed on a short-lived thread, its result returned and its exception raised here.

    The thread is a daemon: a caller interrupted while waiting (Ctrl-C) leaves it to finish or die with the
    process rather than holding the interpreter's exit."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            box["error"] = e

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box.pop("error")  # (popped: no local keeps the exception, so no cycle through this frame)
    return box["value"]
