"""The generation loop package, split where its jobs split:

* loop.py: the loop thread, `Job`, and the order of work in each iteration (the callers' side);
* scheduler.py: who runs, in how much KV memory, pausing, and how many prompt tokens per iteration;
* memory.py: the KV memory: the rows' cache (`Rows`) and the prompt-prefix index (`PrefixIndex`);
* runner.py: every forward (prompt spans, decode steps, verify forwards) and the compiled decode step;
* batch.py: what a decode step or a verify forward is fed (one builder; rows not decoding idle);
* speculate.py: speculative decoding's proposals and verification (through the runner and the loop's
  `deliver_one`/`retire`).

`llama32.engine` re-exports what the rest of the package and its tests use.
"""

from .loop import (_END, _LOOPS, DEFAULT_KV_CACHE_BYTES, DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK, GenerationLoop,
                   Job, _Rows)
from .memory import BLOCK, PrefixIndex, Rows
from .runner import MAX_TOP_LOGPROBS, Runner, decode_step, static_decode_step, token_logprobs
from .scheduler import Scheduler

__all__ = ["BLOCK", "DEFAULT_KV_CACHE_BYTES", "DEFAULT_MAX_BATCH", "DEFAULT_PREFILL_CHUNK", "MAX_TOP_LOGPROBS",
           "GenerationLoop", "Job", "PrefixIndex", "Rows", "Runner", "Scheduler", "decode_step",
           "static_decode_step", "token_logprobs", "_END", "_LOOPS", "_Rows"]
