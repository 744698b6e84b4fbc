"""The generation loop package: one loop per handle (loop.py) and its KV memory beside the rows (memory.py).

`llama32.engine` re-exports what the rest of the package and its tests use.
"""

from .loop import (_END, _LOOPS, DEFAULT_KV_CACHE_BYTES, DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK, MAX_TOP_LOGPROBS,
                   GenerationLoop, Job, _Rows, decode_step, static_decode_step, token_logprobs)
from .memory import BLOCK, PrefixIndex

__all__ = ["BLOCK", "DEFAULT_KV_CACHE_BYTES", "DEFAULT_MAX_BATCH", "DEFAULT_PREFILL_CHUNK", "MAX_TOP_LOGPROBS",
           "GenerationLoop", "Job", "PrefixIndex", "decode_step", "static_decode_step", "token_logprobs", "_END",
           "_LOOPS", "_Rows"]
