"""The generation loop package, split where its jobs split:

* loop.py: the loop thread, the callers' side (submit, cancel, stats) and the order of work in each
  iteration (plan, prefill, step, deliver);
* job.py: `Job`, one request in the loop: what was asked, its caller's events, how far it has got;
* scheduler.py: who runs, in how much KV memory, pausing, and how many prompt tokens per iteration; it
  applies its plans to the KV memory it owns;
* memory.py: the KV memory (`KVMemory`): the rows' cache (`Rows`) and the prompt-prefix index (`PrefixIndex`);
* prefill.py: prompts, resumed contexts and scored texts computed into their rows, chunk by chunk;
* batch.py: what a decode step or a verify forward is fed (one builder; rows not decoding idle) and the
  sampler's inputs for a step's rows;
* runner.py: every forward (prompt spans, decode steps, verify forwards) and the compiled decode step;
* deliver.py: each drawn token into its request's output and out to its caller; scored texts' results;
* speculative/: speculative decoding: the proposers, the exact verify rule, the adaptive number of proposals,
  and the loop's speculative step (through the runner and the loop's delivery).

`llama32.engine` re-exports what the rest of the package and its tests use.
"""

from .job import _END, Job
from .loop import _LOOPS, DEFAULT_KV_CACHE_BYTES, DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK, GenerationLoop
from .memory import BLOCK, KVMemory, PrefixIndex, Rows
from .runner import MAX_TOP_LOGPROBS, Runner, decode_step, static_decode_step, token_logprobs
from .scheduler import Scheduler

__all__ = ["BLOCK", "DEFAULT_KV_CACHE_BYTES", "DEFAULT_MAX_BATCH", "DEFAULT_PREFILL_CHUNK", "MAX_TOP_LOGPROBS",
           "GenerationLoop", "Job", "KVMemory", "PrefixIndex", "Rows", "Runner", "Scheduler", "decode_step",
           "static_decode_step", "token_logprobs", "_END", "_LOOPS"]
