"""Row tiles: bfloat16 products on the CPU that give a row the same bits whatever the row count.

A prompt's rows, a decode step's rows and a verify step's rows all go through the same projections, and a
request's answer is its solo answer only if each of its rows comes out of a product with the same bits
whether that product held 1 row, 49 or 196. oneDNN does not promise that: it picks its blocking and, on some
CPUs, its instructions by the row count M. On an Intel Xeon with AMX, a 1536 -> 576 product of 160, 196, 224
or 256 rows gave 12 to 21 rows other bits than the same rows multiplied 16 at a time, while 32 to 128, 176,
192, 384 and 512 rows agreed; in bfloat16 that one rounding grew to a different greedy token.

So a product never runs at an arbitrary M. At load, `plan` finds, for each weight (by shape and kernel), a
ladder of row counts ("call sizes") at which every row comes out with the bits of the smallest one (the
unit) at any position in the call: checked on random rows, every row compared, each size at a shifted
offset. `run` then covers M rows with calls of those sizes only, zero rows padding the last (a zero row
changes no other row: a product's row depends on its own input row and the call's size alone). Which sizes
cover M is a small cost model (`RowTiles.calls`): each call costs its rows plus a fixed part, reading the
weight, measured in rows during the check. For a few rows that model is not enough: oneDNN's kernel may read a
weight faster at 4 or 6 rows than at 2, so the smallest call is timed at load on the model's own weights
(`least_call`), and fewer rows are padded up to it.

What it costs: on a 2-core AMD EPYC (AVX-512 BF16, no AMX) a 512- or 2,048-row product of the 1B's shapes
ran in 256-row calls within 2% of one call, either way (benchmarks/row_tiles.py measures the whole prefill
and decode). The check itself runs a few hundred rows per distinct weight shape, once per process.

A weight may have two ladders: where the one from a unit of 1 or 2 rows stops short (on an AMX Xeon the 1B's
down projection rounded one way up to 48 rows and another from 56), prompt spans take one from 64 rows, or 128
where 64 rows verify no other size (model.py's `span_tiles_for`): a prompt's positions are always computed in
spans, a drawn position in steps.

Where no ladder verifies (the unit itself disagrees with itself at a shifted offset, for every unit tried),
`plan` returns None and the product runs as before: `Linear.tiles` stays None and the model says so
(`row_invariant`).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

Product = Callable[[Tensor], Tensor]  # x [M, in] -> y [M, out]

# Multiples of the unit tried as call sizes, up to a cap: about 1.5x apart, so the cover of any M wastes
# little (the cost model splits or pads), and their sum, the check's rows, stays a few times the cap.
MULTIPLES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
UNITS = (1, 2, 4, 8, 16, 32)  # units tried, smallest first after the preferred one
CAP = 256  # the largest call: 256-row calls of a 2,048-row product ran within 2% of one call (module doc)
CAP_HEAD = 64  # the output head's largest call (prompt logits only when scoring; its check costs the most)


@dataclass(frozen=True)
class RowTiles:
    """The call sizes verified for one weight: `sizes` ascending, `sizes[0]` the unit; `fixed` the cost of
    one call beyond its rows, in rows (reading the weight); `least`: the smallest call the cover makes, where
    a larger verified size was timed faster than the smaller ones (`least_call`); None: the unit."""

    sizes: tuple[int, ...]
    fixed: float = 8.0
    least: int | None = None
    # covers by row count, cached; not an init field, so `dataclasses.replace` starts each copy afresh
    _covers: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def unit(self) -> int:
        return self.sizes[0]

    def calls(self, rows: int) -> tuple[int, ...]:
        """Call sizes, largest first, whose sum is at least `rows` (by less than the smallest call where one
        call can hold them), cheapest by the cost model: sum of (size + fixed), over the sizes from `least`."""
        got = self._covers.get(rows)
        if got is None:
            sizes = self.sizes
            if self.least is not None:
                sizes = tuple(s for s in sizes if s >= self.least) or sizes[-1:]
            got = self._covers[rows] = _cover(sizes, self.fixed, rows)
        return got


def _cover(sizes: tuple[int, ...], fixed: float, rows: int) -> tuple[int, ...]:
    """Cheapest multiset of `sizes` covering `rows` (dynamic programme over row counts in units: the sizes'
    greatest common divisor, the smallest size unless `least` left some out)."""
    unit, top = math.gcd(*sizes), sizes[-1]
    whole, rest = divmod(rows, top)
    if rest == 0:
        return (top,) * whole
    need = -(-rest // unit)  # the remainder, in units
    steps = [s // unit for s in sizes]
    best = [0.0] + [float("inf")] * need  # best[n]: cost of covering n units
    pick = [0] * (need + 1)
    for n in range(1, need + 1):
        for s in steps:
            cost = best[max(0, n - s)] + s * unit + fixed
            if cost < best[n]:
                best[n], pick[n] = cost, s
    out, n = [], need
    while n > 0:
        out.append(pick[n] * unit)
        n = max(0, n - pick[n])
    return (top,) * whole + tuple(sorted(out, reverse=True))


def run(product: Product, x: Tensor, tiles: RowTiles) -> Tensor:
    """`product(x)` for x [..., in], computed in calls of `tiles`' sizes: [..., out]."""
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    calls = tiles.calls(rows)
    if not calls or (len(calls) == 1 and calls[0] == rows):  # no rows (a prompt chunk needing no logits): one call
        y = product(flat)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    outs = [product(pad_rows(flat[start:start + n], size))[:n] for start, n, size in parts(calls, rows)]
    return torch.cat(outs).reshape(*x.shape[:-1], -1)


def parts(calls: tuple[int, ...], rows: int) -> list[tuple[int, int, int]]:
    """(start, rows taken, call size) for each of `calls` covering `rows` (`RowTiles.calls`): the last call's
    size may exceed the rows left, which zero rows pad (`pad_rows`)."""
    out, start = [], 0
    for size in calls:
        out.append((start, min(size, rows - start), size))
        start += size
    return out


def pad_rows(t: Tensor, size: int) -> Tensor:
    """t [n, d] with zero rows appended up to `size` (a zero row changes no other row of a product)."""
    return t if t.shape[0] == size else torch.cat([t, t.new_zeros(size - t.shape[0], t.shape[1])])


_lock = threading.Lock()
_plans: dict[tuple, RowTiles | None] = {}


def plan(product: Product, in_features: int, dtype: torch.dtype, key: tuple, *, prefer: int = 1,
         cap: int = CAP) -> RowTiles | None:
    """The verified call sizes for `product` (a weight's kernel), or None where no unit verifies.

    `key` names what the kernel's blocking can depend on (kernel, weight shape, dtype, threads); plans are
    kept per key for the process, so a second load of the same shapes checks nothing. `prefer`: the unit to
    try first (a speed choice; see model.choose_cpu_path)."""
    key = (*key, in_features, dtype, prefer, cap, torch.get_num_threads())
    with _lock:
        if key in _plans:
            return _plans[key]
    units = (prefer,) + tuple(u for u in UNITS if u > prefer)
    found = None
    for unit in units:
        found = _verify(product, in_features, dtype, unit, cap)
        if found is not None:
            break
    with _lock:
        _plans[key] = found
    return found


@torch.inference_mode()
def _verify(product: Product, in_features: int, dtype: torch.dtype, unit: int, cap: int) -> RowTiles | None:
    """The sizes `unit * m` (m in MULTIPLES, at most `cap`) whose every row equals the unit's, or None when the
    unit's own rows move with their position in the call."""
    sizes = [unit * m for m in MULTIPLES if unit * m <= max(cap, unit)]
    gen = torch.Generator().manual_seed(0)
    offset = 1 if unit > 1 else 0
    x = torch.randn(sizes[-1] + unit + offset, in_features, generator=gen).to(dtype)
    # the reference: every row in a call of `unit` rows at its aligned place
    started = time.perf_counter()
    ref = torch.cat([product(x[i:i + unit]) for i in range(0, x.shape[0] - unit + 1, unit)])
    unit_time = (time.perf_counter() - started) / (ref.shape[0] // unit)
    # the unit's rows at another place in the call, and beside zero rows, must not move
    if offset and not torch.equal(product(x[offset:offset + unit]), ref[offset:offset + unit]):
        return None
    lone = torch.cat([x[:1], x.new_zeros(unit - 1, in_features)]) if unit > 1 else x[:1]
    if not torch.equal(product(lone)[:1], ref[:1]):
        return None
    good = [unit]
    for size in sizes[1:]:
        if torch.equal(product(x[offset:offset + size]), ref[offset:offset + size]):
            good.append(size)
    started = time.perf_counter()  # again: the first call at a row count includes oneDNN's code generation
    product(x[:good[-1]])
    top_time = time.perf_counter() - started
    # the fixed part of a call, in rows: t(size) = a + b * size from the unit's call and the largest one
    per_row = max((top_time - unit_time) / max(good[-1] - unit, 1), 1e-9)
    fixed = min(max((unit_time - per_row * unit) / per_row, 2.0), 64.0)
    return RowTiles(tuple(good), fixed)


SMALL = 16  # the largest call size `least_call` times: past it a call's rows, not its weight, set its cost
_leasts: dict[tuple, int | None] = {}


@torch.inference_mode()
def least_call(products: list[Product], in_features: int, dtype: torch.dtype, tiles: RowTiles, key: tuple,
               repeats: int = 3) -> RowTiles:
    """`tiles` with `least` set where a larger verified call size runs faster than the smaller ones: each size
    of the ladder up to `SMALL` rows timed over `products` (every weight of one shape, one after another, so
    the weights are read from memory as a decode step reads them), the best of `repeats` rounds. The smallest
    size within 2% of the fastest is taken; every size of the ladder gives a row its unit's bits, so this moves
    time only, never a result.

    Why: on a 2-core AMD EPYC (AVX-512 BF16, no AMX) oneDNN's bfloat16 products of the 1B's shapes took about
    20% less time at 4 or 6 rows than at 2 (its unit there): the 8,192 x 2,048 weights 1.60 ms a call at 2
    rows, 1.28 at 4, 1.20 at 6, 1.37 at 8; a batch-1 decode padded to 6 rows ran 10.1-11.6 tok/s against
    8.1-9.0 at 2 (benchmarks/RESULTS.md). Another day, another EPYC VM had measured 2 rows faster than 4, so
    it is timed here, per weight shape and process, rather than fixed per CPU."""
    small = [s for s in tiles.sizes if s <= SMALL]
    if len(small) < 2:
        return tiles
    key = (*key, in_features, dtype, tiles.sizes, len(products), torch.get_num_threads())
    with _lock:
        known = key in _leasts
        least = _leasts.get(key)
    if not known:
        gen = torch.Generator().manual_seed(0)
        xs = {s: torch.randn(s, in_features, generator=gen).to(dtype) for s in small}
        for s in small:  # the first call at a row count includes oneDNN's code generation
            products[0](xs[s])
        best = dict.fromkeys(small, float("inf"))
        for _ in range(repeats):  # sizes interleaved, so a drift of the machine's speed slows them alike
            for s in small:
                started = time.perf_counter()
                for product in products:
                    product(xs[s])
                best[s] = min(best[s], time.perf_counter() - started)
        fastest = min(best.values())
        least = next(s for s in small if best[s] <= 1.02 * fastest)
        least = None if least == tiles.unit else least
        with _lock:
            _leasts[key] = least
    return tiles if least is None else replace(tiles, least=least)
