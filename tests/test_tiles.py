"""Row tiles (llama32/tiles.py): a bfloat16 product gives a row the same bits whatever the row count.

The kernels of this machine may well be row-invariant already (an AMD EPYC's are; an AMX Xeon's are not), so
the planning is also tested on made-up kernels that round by row count the way oneDNN's AMX kernel was seen
to (other bits at 160, 224 and 256 rows), or by a row's position in the call, or by nothing but the count.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import llama32
from llama32.model import Linear
from llama32.tiles import CAP, CAP_HEAD, SMALL, RowTiles, _cover, least_call, plan, run

K, N = 64, 48
W = torch.randn(N, K, generator=torch.Generator().manual_seed(1)).bfloat16()


def exact(x: torch.Tensor, w: torch.Tensor = W) -> torch.Tensor:
    """A row's product in float32, summed the same way whatever the call (elementwise, then one reduction)."""
    return (x.float()[:, None, :] * w.float()[None]).sum(-1)


def halves(x: torch.Tensor) -> torch.Tensor:
    """Another kernel's rounding: each half of K summed and rounded to bfloat16 before the two are added."""
    h = K // 2
    return exact(x[:, :h], W[:, :h]).bfloat16().float() + exact(x[:, h:], W[:, h:])


def kernel(rounds_other_way):
    """A product that rounds rows the other way where `rounds_other_way(M, position)` says so; records the call
    sizes it was given."""
    sizes = []

    def product(x):
        M = x.shape[0]
        sizes.append(M)
        out = exact(x)
        other = torch.tensor([rounds_other_way(M, i) for i in range(M)])
        return torch.where(other[:, None], halves(x), out).bfloat16()

    product.sizes = sizes
    return product


AMX_LIKE = kernel(lambda M, i: M in (160, 196, 224, 256))  # as measured on the Xeon, for 1536 -> 576
SMALL_ROWS_BY_POSITION = kernel(lambda M, i: M < 8 and i % 2 == 1)  # the odd rows of a small call
UNIT_SIXTEEN = kernel(lambda M, i: M % 16 != 0 and i >= M - M % 16)  # a tail of fewer than 16 rows


@pytest.mark.parametrize("name", ["amx-like", "position", "tail"])
def test_every_row_count_gives_every_row_its_solo_bits(name):
    product = {"amx-like": AMX_LIKE, "position": SMALL_ROWS_BY_POSITION, "tail": UNIT_SIXTEEN}[name]
    tiles = plan(product, K, torch.bfloat16, ("fake", name), prefer=1, cap=CAP)
    assert tiles is not None
    x = torch.randn(2 * CAP + 40, K, generator=torch.Generator().manual_seed(2)).bfloat16()
    alone = torch.cat([run(product, x[i:i + 1], tiles) for i in range(x.shape[0])])
    product.sizes.clear()
    for m in range(1, x.shape[0] + 1):
        got = run(product, x[:m], tiles)
        assert got.shape == (m, N)
        assert torch.equal(got, alone[:m]), f"{m} rows"
    assert set(product.sizes) <= set(tiles.sizes)  # no call at a size the check did not verify
    # and the made-up kernel does round by row count: without tiles these row counts part from the rows alone
    plain = torch.cat([product(x[i:i + 1]) for i in range(300)])
    assert any(not torch.equal(product(x[:m]), plain[:m]) for m in (2, 3, 17, 160, 224, 256))


def test_the_plan_leaves_out_what_rounds_otherwise():
    tiles = plan(AMX_LIKE, K, torch.bfloat16, ("fake", "amx"), prefer=16, cap=CAP)
    assert tiles.unit == 16 and 256 not in tiles.sizes and {32, 64, 128, 192} <= set(tiles.sizes)
    # a kernel whose tail rows (past the last whole 16) round otherwise: 1-row calls agree with calls of up to
    # 12 rows (all tail), not with 16 or more
    tail = plan(UNIT_SIXTEEN, K, torch.bfloat16, ("fake", "tail-1"), prefer=1, cap=CAP)
    assert tail.sizes == (1, 2, 3, 4, 6, 8, 12)


def test_prompt_spans_get_a_ladder_of_their_own_where_the_usual_one_stops_short():
    """A kernel that rounds one way in calls of up to 48 rows and another in calls of more (as an AMX Xeon's
    did for the 1B's down projection) verifies a ladder from one row only to 48; prompt spans take one from 64
    rows (`model.span_tiles_for`), on which every row count gives every row its solo bits. A kernel whose ladder
    reaches 128 rows keeps it for spans."""
    from types import SimpleNamespace

    from llama32.model import span_tiles_for

    product = kernel(lambda M, i: M > 48)
    tiles = plan(product, K, torch.bfloat16, ("fake", "two-class"), prefer=1, cap=CAP)
    assert tiles.sizes[-1] == 48
    module = SimpleNamespace(product=product, in_features=K, weight=W, tiles=tiles)
    span = span_tiles_for(module, ("fake", "two-class"))
    assert span.sizes == (64, 128, 192, 256)
    x = torch.randn(600, K, generator=torch.Generator().manual_seed(4)).bfloat16()
    alone = torch.cat([run(product, x[i:i + 1], span) for i in range(x.shape[0])])
    assert not torch.equal(alone[:48], run(product, x[:48], tiles))  # (the two ladders' bits part)
    product.sizes.clear()
    for m in range(1, x.shape[0] + 1):
        assert torch.equal(run(product, x[:m], span), alone[:m]), f"{m} rows"
    assert set(product.sizes) <= set(span.sizes)
    amx = SimpleNamespace(product=AMX_LIKE, in_features=K, weight=W,
                          tiles=plan(AMX_LIKE, K, torch.bfloat16, ("fake", "amx-1"), prefer=1, cap=CAP))
    assert amx.tiles.sizes[-1] >= 128 and span_tiles_for(amx, ("fake", "amx-1")) is None


def test_prompt_spans_take_a_unit_of_128_where_64_rows_verify_only_themselves():
    """A kernel with three roundings, as the AMX Xeon's k/v and down projections had with weights packed for many
    rows: calls of up to 32 rows one way, 64 rows a second, 128 and 256 a third. The ladder from 64 rows would be
    64 alone; spans take 128 and 256, on which every row count gives every row its solo bits."""
    from types import SimpleNamespace

    from llama32.model import span_tiles_for

    def quarters(x):
        q = K // 4
        parts = [exact(x[:, a:a + q], W[:, a:a + q]).bfloat16().float() for a in range(0, K, q)]
        return parts[0] + parts[1] + parts[2] + parts[3]

    sizes = []

    def product(x):
        sizes.append(x.shape[0])
        return (exact(x) if x.shape[0] <= 32 else halves(x) if x.shape[0] == 64 else quarters(x)).bfloat16()

    key = ("fake", "three-way")
    tiles = plan(product, K, torch.bfloat16, key, prefer=1, cap=CAP)
    assert tiles.sizes[-1] == 32
    assert plan(product, K, torch.bfloat16, key, prefer=64, cap=CAP).sizes == (64,)
    span = span_tiles_for(SimpleNamespace(product=product, in_features=K, weight=W, tiles=tiles), key)
    assert span.sizes == (128, 256)
    x = torch.randn(600, K, generator=torch.Generator().manual_seed(5)).bfloat16()
    alone = torch.cat([run(product, x[i:i + 1], span) for i in range(x.shape[0])])
    assert not torch.equal(alone[:64], product(x[:64]))  # (64-row calls do round otherwise)
    sizes.clear()
    for m in range(1, x.shape[0] + 1):
        assert torch.equal(run(product, x[:m], span), alone[:m]), f"{m} rows"
    assert set(sizes) <= {128, 256}
    # where 128-row calls verify nothing (a row's bits move with its place in them), 64 rows alone serve
    def moving(x):
        M = x.shape[0]
        if M <= 64:
            return (exact(x) if M <= 32 else halves(x)).bfloat16()
        odd = (torch.arange(M) % 2 == 1)[:, None]
        return torch.where(odd, quarters(x), exact(x)).bfloat16()

    key = ("fake", "three-way-moving")
    tiles = plan(moving, K, torch.bfloat16, key, prefer=1, cap=CAP)
    assert tiles.sizes[-1] == 32
    assert span_tiles_for(SimpleNamespace(product=moving, in_features=K, weight=W, tiles=tiles), key).sizes == (64,)


def test_a_kernel_whose_rows_move_with_their_place_gets_no_plan():
    shifted = kernel(lambda M, i: i % 2 == 1)  # every call: odd positions the other way
    assert plan(shifted, K, torch.bfloat16, ("fake", "shift-2"), prefer=2, cap=64) is None
    # one row a call is the one size left where a row has no other place
    assert plan(shifted, K, torch.bfloat16, ("fake", "shift-1"), prefer=1, cap=64).sizes == (1,)


def test_covers_use_the_sizes_and_hold_the_rows():
    tiles = RowTiles((4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256), fixed=8.0)
    for rows in range(1, 2100):
        calls = tiles.calls(rows)
        assert set(calls) <= set(tiles.sizes) and sum(calls) >= rows
        assert sum(calls) - rows < 64 or rows < 64  # little padding: the cost counts every row
    assert tiles.calls(2048) == (256,) * 8 and tiles.calls(3) == (4,)
    # the cheapest cover by brute force, for small counts
    for rows in range(1, 60):
        best = min(sum(c) + 8 * len(c) for n in (1, 2, 3) for c in itertools.product(tiles.sizes, repeat=n)
                   if sum(c) >= rows)
        assert sum(tiles.calls(rows)) + 8 * len(tiles.calls(rows)) == best
    assert _cover((16, 32, 64), 100.0, 20) == (32,)  # a costly call: pad rather than split


LADDER = (2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # a unit of 2, as on an AMD EPYC


def test_covers_from_a_least_size_use_only_ladder_sizes():
    """With `least` set, rows fewer than it are padded up to it, and every cover takes only ladder sizes from it
    up (6 leaves 8, 16, 32 ... which are not its multiples: a cover in units of 6 would make 30-row calls, a
    size never verified)."""
    tiles = RowTiles(LADDER, fixed=8.0, least=6)
    assert [tiles.calls(rows) for rows in (1, 2, 6, 7, 8)] == [(6,), (6,), (6,), (8,), (8,)]
    for rows in range(1, 1100):
        calls = tiles.calls(rows)
        assert set(calls) <= {s for s in LADDER if s >= 6} and sum(calls) >= rows, (rows, calls)
        assert sum(calls) - rows < 64 or rows < 64
    # the same ladder without it covers as before, from its unit
    assert RowTiles(LADDER, fixed=8.0).calls(1) == (2,) and RowTiles(LADDER, fixed=8.0).calls(7) == (8,)


def timed(seconds: dict[int, float]):
    """A product that takes `seconds[rows]` (every call at a size, so rounds of timing agree)."""
    import time

    def product(x):
        time.sleep(seconds.get(x.shape[0], 0.02))
        return exact(x)

    return product


def test_the_least_call_is_the_smallest_size_about_as_fast_as_the_fastest():
    """`least_call` times the ladder's sizes up to `SMALL` rows over the given products and keeps the smallest
    within 2% of the fastest; where that is the unit, the tiles come back as they were."""
    tiles = RowTiles(LADDER, fixed=8.0)
    slow_two = {2: 0.04, 4: 0.03, 6: 0.02, 8: 0.0245, 12: 0.045, 16: 0.06}
    got = least_call([timed(slow_two)] * 2, K, torch.bfloat16, tiles, ("fake", "slow-two"), repeats=2)
    assert got.least == 6 and got.sizes == tiles.sizes and got.calls(3) == (6,)
    near = {**slow_two, 4: 0.0202}  # 4 rows within 2% of 6 (1% slower): the smaller size is taken
    assert least_call([timed(near)] * 4, K, torch.bfloat16, tiles, ("fake", "near"), repeats=2).least == 4
    fast_two = {2: 0.01, 4: 0.02, 6: 0.03, 8: 0.04, 12: 0.05, 16: 0.06}
    assert least_call([timed(fast_two)], K, torch.bfloat16, tiles, ("fake", "fast-two"), repeats=2) is tiles
    assert max(s for s in LADDER if s <= SMALL) == 16  # (sizes past SMALL are not timed: 24 was given 20 ms)


def test_a_least_call_changes_no_bits(smol_bf16):
    """Every projection with its smallest call held at the largest size `least_call` may choose: each row count
    from 1 to 40 gives every row the bits it had with the ladder's own unit, and a greedy answer is unchanged."""
    from dataclasses import replace

    model = smol_bf16.model
    if model.cpu_path == "widened":
        pytest.skip("bfloat16 on a CPU without native bfloat16 is not row-invariant (docs/API.md)")
    tiled = {m: m.tiles for m in model.modules() if getattr(m, "tiles", None) is not None}
    request = dict(prompt="Name three rivers of Europe.", temperature=0, max_tokens=12)
    gen = torch.Generator().manual_seed(5)
    xs = {}
    with torch.inference_mode():
        for m in tiled:
            if isinstance(m, Linear):
                xs.setdefault(m.in_features, torch.randn(40, m.in_features, generator=gen).bfloat16())
        shapes = {(m.in_features, m.out_features): m for m in tiled if isinstance(m, Linear)}
        try:
            for m, tiles in tiled.items():
                m.tiles = replace(tiles, least=None)
            want = {shape: [m(xs[shape[0]][None, :n])[0] for n in range(1, 41)] for shape, m in shapes.items()}
            plain = llama32.generate(smol_bf16, **request)
            for m, tiles in tiled.items():
                m.tiles = replace(tiles, least=max(s for s in tiles.sizes if s <= SMALL))
            for shape, m in shapes.items():
                assert m.tiles.calls(1) == (m.tiles.least,)
                for n in range(1, 41):
                    assert torch.equal(m(xs[shape[0]][None, :n])[0], want[shape][n - 1]), (shape, n)
            assert llama32.generate(smol_bf16, **request)["response"] == plain["response"]
        finally:
            for m, tiles in tiled.items():
                m.tiles = tiles


@pytest.fixture(scope="module")
def smol_bf16(smollm2_dir):
    return llama32.load(smollm2_dir, dtype="bfloat16", device="cpu")


@pytest.mark.parametrize("pack", ["1", "0"], ids=["packed", "dense"])
def test_every_product_shape_every_row_every_row_count(smollm2_dir, smol_bf16, monkeypatch, pack):
    """The check that would catch the AMX kernel: every projection shape SmolLM2 runs, every row, every row count
    from 1 to twice the largest call (beyond it a product is more of the same calls), the head to its own."""
    if pack == "0":
        monkeypatch.setenv("LLAMA32_CPU_PACK", "0")
        model = llama32.load(smollm2_dir, dtype="bfloat16", device="cpu").model
    else:
        model = smol_bf16.model
    if model.cpu_path == "widened":
        pytest.skip("bfloat16 on a CPU without native bfloat16 is not row-invariant (docs/API.md)")
    assert model.row_invariant
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            seen.setdefault((module.in_features, module.out_features), (name, module))
    assert len(seen) == 5  # q/o, k/v, gate/up, down, head
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for (k, _), (name, module) in seen.items():
            top = 2 * (CAP_HEAD if name == "lm_head" else CAP)
            x = torch.randn(top, k, generator=gen).bfloat16()
            for span in {False, module.span_tiles is not None}:  # (a prompt span's ladder, where it has its own)
                alone = torch.cat([module(x[i:i + 1], span=span) for i in range(top)])
                for m in range(1, top + 1):
                    got = module(x[None, :m], span=span)[0]
                    bad = (got != alone[:m]).any(-1).nonzero().flatten().tolist()
                    assert not bad, f"{name}: {m} rows, rows {bad[:10]} differ from the rows alone (span {span})"


def test_a_layer_takes_the_sizes_its_products_share_whatever_their_units():
    from llama32.model import common_tiles

    one = RowTiles((1, 2, 3, 4, 6, 8, 12, 16, 24, 32), 8.0)
    four = RowTiles((4, 8, 12, 16, 24, 32, 48), 5.0)
    assert common_tiles([one, four, four, one]) == RowTiles((4, 8, 12, 16, 24, 32), 8.0)
    # a smallest common size that does not divide the others: only its multiples are kept
    assert common_tiles([RowTiles((1, 8, 12, 16)), RowTiles((4, 8, 12, 16))]).sizes == (8, 16)
    assert common_tiles([one, RowTiles((64, 128))]) is None
    assert common_tiles([one, None]) is None
    # the layer's smallest call: the largest of its products' (`least_call`)
    assert common_tiles([RowTiles(LADDER, 8.0, 6), RowTiles(LADDER, 8.0, 4), RowTiles(LADDER)]).least == 6
    assert common_tiles([RowTiles(LADDER), RowTiles(LADDER)]).least is None


def test_no_rows_is_one_call():
    """A product over no rows (a prompt chunk that needs no logits runs the head on none) is one call of none."""
    tiles = RowTiles((4, 8), fixed=8.0)
    weight = torch.randn(6, 5)
    got = run(lambda x: x @ weight.T, torch.randn(1, 0, 5), tiles)
    assert got.shape == (1, 0, 6)


def test_a_prompt_chunked_beside_a_stream_is_answered(smol_bf16):
    """A prompt arriving while a stream decodes is prefilled in chunks, and its early chunks compute no logits:
    the head ran on no rows and the bfloat16 row tiles raised (torch.cat of nothing), failing the request.
    Both answers must equal their solo ones."""
    import threading

    llm = smol_bf16
    late = dict(prompt=" ".join(["alpha beta gamma delta"] * 60), raw=True, temperature=0, max_tokens=3)
    early = dict(prompt="Count on: one two three", raw=True, temperature=0, max_tokens=24)
    got = {}
    chunks = []
    for i, chunk in enumerate(llama32.generate(llm, stream=True, **early)):
        chunks.append(chunk)
        if i == 2:
            thread = threading.Thread(target=lambda: got.setdefault("late", llama32.generate(llm, **late)))
            thread.start()
    thread.join()
    assert llm.loop.scheduler.prefill_chunk < 200  # so the late prompt (~240 tokens) went in several chunks
    solo = llama32.generate(llm, **late)
    assert got["late"]["response"] == solo["response"]
    assert "".join(c.get("response", "") for c in chunks) == llama32.generate(llm, **early)["response"]


def test_the_layer_after_attention_runs_in_tiles_with_the_bits_of_the_layer_whole(smol_bf16, monkeypatch):
    """Each decoder layer's steps after attention (output projection, residual, norm, MLP, residual) run one row
    tile at a time (`DecoderLayer._rest_in_tiles`); every hidden state and logit must keep the bits of the
    layer run whole, at row counts that fill tiles, pad the last one, or fit in one."""
    from llama32.model import DecoderLayer

    model = smol_bf16.model
    if model.cpu_path == "widened":
        pytest.skip("bfloat16 on a CPU without native bfloat16 has no row tiles (docs/API.md)")
    layers = list(model.model.layers)
    assert all(layer.tiles is not None for layer in layers)
    calls = []
    tiled = DecoderLayer._rest_in_tiles
    monkeypatch.setattr(DecoderLayer, "_rest_in_tiles",
                        lambda self, x, a, tiles: calls.append(x.shape) or tiled(self, x, a, tiles))
    gen = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for batch, length in [(1, 3), (2, 200), (3, 301)]:
            ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)
            calls.clear()
            got = model(ids, output_hidden_states=True)
            assert len(calls) == len(layers)
            plans = [(layer.tiles, layer.span_tiles) for layer in layers]
            for layer in layers:
                layer.tiles = layer.span_tiles = None
            try:
                whole = model(ids, output_hidden_states=True)
            finally:
                for layer, (tiles, span_tiles) in zip(layers, plans):
                    layer.tiles, layer.span_tiles = tiles, span_tiles
            assert len(calls) == len(layers)  # the whole run did not take the tiles
            assert torch.equal(got.logits, whole.logits), (batch, length)
            for i, (a, b) in enumerate(zip(got.hidden_states, whole.hidden_states)):
                assert torch.equal(a, b), (batch, length, i)
