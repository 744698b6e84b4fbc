"""Weight-only int8: one scale per output channel, symmetric, for every projection and the output head.

A decode step reads every weight once, so its speed is memory bandwidth over weight bytes: int8 reads half the
bytes of bfloat16. Quantizing: `scale = max|w| / 127` per output row, `q = round(w / scale)` in [-127, 127];
the product is `(x @ q.T) * scale`. The embedding stays in the model dtype (a tied model's head gets its own
int8 copy: the lookup needs the exact rows, the head only a product).

Which kernel runs (measured on a 2-core AMD EPYC with AVX-512 and avx512_bf16, torch 2.13, 2 threads, an
8192 x 2048 weight; see benchmarks/RESULTS.md for whole-model figures):
- CPU, a few rows (decode): `torch.ops.aten._weight_int8pack_mm` with bfloat16 activations, 15-16 GB/s of
  int8 weights streaming from memory at one row (22 GB/s at 2048 x 8192). With float32 activations the same
  kernel moved 1.7 GB/s. A float32 model's products go the many-rows way below at any row count (rounding its
  activations to bfloat16 for the kernel would make a row's result depend on how many rows share the step).
- CPU, many rows (a prompt): dequantize the weight to the activations' dtype into a buffer the thread reuses
  and multiply through oneDNN (`scratch.linear_converted`): 42 ms for 512 rows of bfloat16 and 85 ms of
  float32, against 134 ms for `_weight_int8pack_mm` and 51 / 134 ms dequantizing into a fresh tensor for
  `F.linear`. To float32 on a CPU without native bfloat16, where a bfloat16 product of many rows runs at a
  sixth of float32's speed.
- CUDA: dequantize-and-multiply, `F.linear(x, q.to(x.dtype)) * scale`, which `torch.compile` fuses into one
  kernel reading int8 (as gpt-fast does).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .scratch import linear_converted

# Leaf names of the modules that are quantized (every projection, and the output head).
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# Up to this many rows the CPU uses the int8 kernel, above it dequantize-and-multiply. At 8192 x 2048 with bf16
# activations: 8 rows 2.5 against 4.6 ms, 12 rows 4.1 against 4.8, 14 rows 5.6 against 5.1, 16 rows 5.5 against 5.3.
_FEW_ROWS = 12


def quantize_int8(weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(int8 [out, in], scale [out] in `dtype`) for a float weight [out, in], computed in float32."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(dtype)


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    return q.to(scale.dtype) * scale[:, None]


def int8_linear(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x [..., in] times an int8 weight [out, in] with per-row `scale`: [..., out] in x's dtype."""
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        # bfloat16 activations only: a float32 model's would be rounded to bfloat16 for a few rows and not
        # for many, so a request's result would depend on how many others share its step.
        if rows <= _FEW_ROWS and x.dtype == torch.bfloat16:
            flat = x.reshape(rows, x.shape[-1])
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), q, scale.to(torch.bfloat16))
            return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])
        # On an AVX2-only CPU bf16 products crawl, so many rows are multiplied in float32 there.
        dtype = torch.float32 if x.dtype == torch.bfloat16 and not _native_bf16() else x.dtype
        return (linear_converted(x, q, dtype) * scale.to(dtype)).to(x.dtype)
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


@lru_cache(maxsize=1)
def _native_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def is_quantized(name: str) -> bool:
    """Whether the checkpoint tensor `name` is a weight that int8 loading quantizes."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANTIZED
