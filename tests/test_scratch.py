"""scratch.linear_converted: a product with a weight converted into a per-thread buffer equals the plain one."""

import threading

import pytest
import torch
import torch.nn.functional as F

from llama32 import scratch


@pytest.mark.parametrize("src,dtype", [(torch.bfloat16, torch.float32), (torch.int8, torch.float32),
                                       (torch.int8, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(37, 64), (2, 19, 64)])
def test_equals_plain_product(src, dtype, shape):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 64, generator=g) * 40).to(src)
    x = torch.randn(*shape, generator=g).bfloat16()
    bias = torch.randn(96, generator=g).to(dtype)
    want = F.linear(x.to(dtype), w.to(dtype), bias)
    got = scratch.linear_converted(x, w, dtype, bias)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)


def test_buffer_is_reused_and_grows_once():
    w_small, w_big = torch.randn(16, 32).bfloat16(), torch.randn(64, 32).bfloat16()
    x = torch.randn(20, 32)

    def run():
        scratch.linear_converted(x, w_small, torch.float32)
        first = scratch._local.buffers[torch.float32]
        scratch.linear_converted(x, w_big, torch.float32)
        grown = scratch._local.buffers[torch.float32]
        scratch.linear_converted(x, w_small, torch.float32)
        assert scratch._local.buffers[torch.float32] is grown and grown.numel() >= w_big.numel()
        return first.numel()

    seen = []
    t = threading.Thread(target=lambda: seen.append(run()))  # a fresh thread: it starts with no buffer
    t.start(), t.join()
    assert seen == [w_small.numel()]


def test_large_weights_are_not_kept(monkeypatch):
    monkeypatch.setattr(scratch, "MAX_ELEMENTS", 100)
    w = torch.randn(16, 32).bfloat16()
    out = []

    def run():
        out.append(scratch.linear_converted(torch.randn(3, 32), w, torch.float32))
        out.append(getattr(scratch._local, "buffers", {}).get(torch.float32))

    t = threading.Thread(target=run)
    t.start(), t.join()
    assert out[0].shape == (3, 16) and out[1] is None


def test_threads_never_share_a_buffer():
    """Two threads converting different weights at once each get their own product, every time."""
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(256, 128, generator=g).bfloat16() for _ in range(2)]
    x = torch.randn(40, 128, generator=g)
    wants = [F.linear(x, w.float()) for w in weights]
    errors, start = [], threading.Barrier(2)

    def run(i):
        start.wait()
        for _ in range(200):
            got = scratch.linear_converted(x, weights[i], torch.float32)
            if not torch.allclose(got, wants[i], rtol=1e-5, atol=1e-4):
                errors.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
