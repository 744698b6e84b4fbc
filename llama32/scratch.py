"""A product with a weight converted to another dtype just before it, into a buffer each thread reuses.

Two CPU paths multiply a prompt's many rows by a weight converted first: bfloat16 widened to float32 where the
CPU has no native bfloat16, and int8 dequantized (`quant.int8_linear`). `weight.to(dtype)` allocates a fresh
tensor every time, and one that size (tens of MB) comes from fresh pages: on a 2-core EPYC, widening an
8192 x 2048 bfloat16 weight took 22 ms that way and 3.4 ms into a buffer written before (the product itself:
about 110 ms at 512 rows), so the buffer is kept. The product then runs through oneDNN (`_linear_pointwise`
on the dense weight): at 512 rows of float32 it took 85 ms there against 118 ms for `F.linear`.

Each thread has its own buffer, so concurrent forwards never share one, and the converted weight never leaves
`linear_converted`: the product is done before the thread converts the next. Weights above
`MAX_ELEMENTS` (a whole vocabulary's head, when `score` wants logits at every position) are converted fresh,
so a thread never holds a gigabyte for a rare call.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_ELEMENTS = 1 << 25  # 32M elements: every projection of Llama 3.2 1B and 3B (the largest 8192 x 3072)

_local = threading.local()


def linear_converted(x: Tensor, weight: Tensor, dtype: torch.dtype, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x.to(dtype), weight.to(dtype), bias)` (`bias` already in `dtype`): the same product, faster."""
    x = x.to(dtype).contiguous()
    n = weight.numel()
    if weight.device.type != "cpu" or n > MAX_ELEMENTS or torch.compiler.is_compiling():
        return F.linear(x, weight.to(dtype), bias)
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < n:
        buf = buffers[dtype] = torch.empty(n, dtype=dtype)
    w = buf[:n].view(weight.shape).copy_(weight)
    if torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16):
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)
