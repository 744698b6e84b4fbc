"""The hand-written model against transformers' LlamaForCausalLM on checkpoints it wrote itself."""

import pytest
import torch

from fixtures import hf_model
from llama32.config import LlamaConfig
from llama32.model import KVCache, rope_frequencies
from llama32.weights import load_model


def ours(path, dtype=torch.float32):
    config = LlamaConfig.from_file(path / "config.json")
    return load_model(path, config, device="cpu", dtype=dtype)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", ["llama32", "llama31", "mha"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_logits_match_transformers(make_checkpoint, kind, sharded):
    path = make_checkpoint(kind=kind, sharded=sharded)
    model, ref = ours(path), hf_model(path)
    # 200 positions: far past the 32-token original context the llama3 scaling bands are measured against.
    ids = torch.randint(0, model.config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids), ref(ids).logits
    assert got.shape == (2, 200, model.config.vocab_size)
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_norm_over_many_rows_gives_each_row_the_bits_it_has_alone(dtype):
    """`RMSNorm` over more than `NORM_ROWS` rows (a prompt's) goes a block of rows at a time: every row keeps the
    bits of the norm over it alone, and the result is the model dtype's, as whole."""
    from llama32.model import NORM_ROWS, RMSNorm

    norm = RMSNorm(576, 1e-5)
    norm.weight = torch.nn.Parameter(torch.randn(576, generator=torch.Generator().manual_seed(2)).to(dtype))
    x = (torch.randn(3, NORM_ROWS + 77, 576, generator=torch.Generator().manual_seed(3)) * 5).to(dtype)
    with torch.no_grad():
        got = norm(x)
        alone = torch.stack([torch.cat([norm(x[b, i:i + 1]) for i in range(x.shape[1])]) for b in range(3)])
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, alone)


def test_legacy_config_spelling_loads_the_same(make_checkpoint):
    """rope_theta + rope_scaling (transformers 4.x files) and rope_parameters (5.x) give the same model."""
    new, old = make_checkpoint(kind="llama32"), make_checkpoint(kind="llama32", legacy_config=True)
    assert "rope_scaling" in (old / "config.json").read_text()
    ids = torch.arange(100)[None] % 500
    with torch.no_grad():
        assert torch.equal(ours(new)(ids), ours(old)(ids))


def test_llama3_scaling_changes_frequencies(make_checkpoint):
    """The scaled band is not a no-op at this size: some frequencies are divided by the factor, some kept."""
    config = LlamaConfig.from_file(make_checkpoint(kind="llama32") / "config.json")
    plain = LlamaConfig(**{**config.__dict__, "rope_scaling": None})
    scaled, base = rope_frequencies(config), rope_frequencies(plain)
    ratio = base / scaled
    assert torch.isclose(ratio[0], torch.tensor(1.0))  # highest frequency kept
    assert torch.isclose(ratio[-1], torch.tensor(config.rope_scaling.factor))  # lowest divided by 32
    assert ((ratio > 1.01) & (ratio < 31.9)).any()  # and some blended in between


def test_tied_head_is_the_embedding(make_checkpoint):
    path = make_checkpoint(kind="llama32")
    config = LlamaConfig.from_file(path / "config.json")
    model = load_model(path, config, device="cpu", dtype=torch.float32, pack=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    packed = ours(path)  # the packed head is its own copy of the embedding
    assert torch.equal(packed.lm_head.weight.to_dense(), packed.model.embed_tokens.weight)
    untied = load_model(p := make_checkpoint(kind="llama31"), LlamaConfig.from_file(p / "config.json"),
                        device="cpu", dtype=torch.float32, pack=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("kind", ["llama32", "mha"])
def test_prefill_then_decode_equals_full_forward(make_checkpoint, kind):
    model = ours(make_checkpoint(kind=kind))
    ids = torch.randint(0, model.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.config, 2, 64, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :40], cache=cache)]
        for t in range(40, 60):
            steps.append(model(ids[:, t : t + 1], cache=cache, input_pos=torch.full((2, 1), t)))
    assert rel_err(torch.cat(steps, 1), full) <= 1e-5


def test_chunk_through_the_cache_equals_full_forward(make_checkpoint):
    """Many new tokens in one call at explicit positions (the masked path, with grouped query heads): each
    sees the cache up to its own position and no further."""
    model = ours(make_checkpoint(kind="llama32"))
    ids = torch.randint(0, model.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(4))
    cache = KVCache(model.config, 2, 64, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        full = model(ids)
        head = model(ids[:, :25], cache=cache)
        rest = model(ids[:, 25:], cache=cache, input_pos=torch.arange(25, 60).expand(2, 35))
    assert rel_err(torch.cat([head, rest], 1), full) <= 1e-5


def test_batch_rows_equal_rows_alone(make_checkpoint):
    """Rows of different lengths share one cache at their own positions and match single-row runs."""
    model = ours(make_checkpoint(kind="llama32"))
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 512, (1, 30), generator=g), torch.randint(0, 512, (1, 18), generator=g)
    batch = torch.zeros(2, 30, dtype=torch.long)
    batch[0], batch[1, :18] = a[0], b[0]
    cache = KVCache(model.config, 2, 40, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        last = model(batch, cache=cache, logits_at=torch.tensor([29, 17]))
        assert rel_err(last[0, 0], model(a)[0, -1]) <= 1e-5
        assert rel_err(last[1, 0], model(b)[0, -1]) <= 1e-5
        nxt = torch.tensor([[5], [7]])
        step = model(nxt, cache=cache, input_pos=torch.tensor([[30], [18]]))
        assert rel_err(step[0, 0], model(torch.cat([a, nxt[:1]], 1))[0, -1]) <= 1e-5
        assert rel_err(step[1, 0], model(torch.cat([b, nxt[1:]], 1))[0, -1]) <= 1e-5
    # and a plain batch equals its rows
    with torch.no_grad():
        both = model(torch.cat([a[:, :18], b], 0))
        assert rel_err(both[1], model(b)[0]) <= 1e-5


def test_bfloat16_follows_transformers_bfloat16(make_checkpoint):
    path = make_checkpoint(kind="llama32")
    ids = torch.arange(64)[None] % 500
    with torch.no_grad():
        lo = ours(path, torch.bfloat16)(ids)
        ref = hf_model(path, dtype=torch.bfloat16, attn_implementation="sdpa")(ids).logits
        hi = ours(path)(ids)
    assert lo.dtype == torch.bfloat16
    # same operations in the same dtype: far closer to transformers-bf16 than either is to float32
    to_ref = ((lo.float() - ref.float()).abs().mean() / ref.float().abs().mean()).item()
    to_fp32 = ((lo.float() - hi).abs().mean() / hi.abs().mean()).item()
    assert to_ref < 0.01 and to_fp32 < 0.05, (to_ref, to_fp32)


def test_cpu_packed_weights_give_the_same_logits(make_checkpoint):
    """bf16 on CPU loads prepacked weights (the fast decode path); results equal the plain F.linear path."""
    from llama32.model import can_pack_for_cpu
    if not can_pack_for_cpu("cpu", torch.bfloat16):
        pytest.skip("this CPU has no oneDNN bf16 support")
    path = make_checkpoint(kind="llama31")
    config = LlamaConfig.from_file(path / "config.json")
    packed = load_model(path, config, device="cpu", dtype=torch.bfloat16)
    plain = load_model(path, config, device="cpu", dtype=torch.bfloat16, pack=False)
    assert packed.lm_head.weight.is_mkldnn and packed.model.layers[0].mlp.up_proj.weight.is_mkldnn
    assert not plain.lm_head.weight.is_mkldnn
    assert torch.equal(packed.model.layers[1].self_attn.q_proj.weight.to_dense(),
                       plain.model.layers[1].self_attn.q_proj.weight)
    ids = torch.arange(40)[None] % 500
    cache_a, cache_b = (KVCache(config, 1, 48, device="cpu", dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        a, b = packed(ids), plain(ids)
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < 1e-2
        packed(ids, cache=cache_a), plain(ids, cache=cache_b)
        step = torch.tensor([[7]]), torch.tensor([[40]])
        assert torch.allclose(packed(step[0], cache=cache_a, input_pos=step[1]).float(),
                              plain(step[0], cache=cache_b, input_pos=step[1]).float(), rtol=1e-2, atol=1e-2)


def test_packed_bf16_runs_in_row_tiles_with_the_unit_chosen(make_checkpoint, monkeypatch):
    """Prepacked bf16 products run in row tiles (tiles.py). On AVX-512 BF16 without AMX the unit tried first is
    2 rows (oneDNN's 1-row kernel rounds otherwise there), so 1 row runs as 2: each row equals the same row of
    a product of the unit's rows, bit for bit. Elsewhere the unit tried first is 1 row; float32 is not tiled."""
    from llama32.model import PREFERRED_UNIT, Linear, can_pack_for_cpu
    if not can_pack_for_cpu("cpu", torch.bfloat16):
        pytest.skip("this CPU has no oneDNN bf16 support")
    path = make_checkpoint(kind="llama31")
    config = LlamaConfig.from_file(path / "config.json")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    model = load_model(path, config, device="cpu", dtype=torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.tiles is not None and m.tiles.unit >= PREFERRED_UNIT > 1 for m in linears)
    assert model.row_invariant
    up = model.model.layers[0].mlp.up_proj
    unit = up.tiles.unit  # the preferred unit where its calls verify (AVX-512 BF16), more where they do not
    x = torch.randn(unit, config.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        whole = up.product(x)
        for rows in range(1, unit):
            got = up(x[None, :rows])  # (1, rows, D) in, (1, rows, out) back
            assert got.shape == (1, rows, config.intermediate_size)
            assert torch.equal(got[0], whole[:rows])
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    other = load_model(path, config, device="cpu", dtype=torch.bfloat16)
    assert other.cpu_path == "packed" and all(m.tiles is not None for m in other.modules() if isinstance(m, Linear))
    wide = load_model(path, config, device="cpu", dtype=torch.float32)
    assert wide.cpu_path == "packed" and all(m.tiles is None for m in wide.modules() if isinstance(m, Linear))


def test_bf16_without_native_bf16_widens_prompt_products(make_checkpoint, monkeypatch):
    """On a CPU whose oneDNN has no bfloat16 (AVX2 only, faked here), bfloat16 weights stay bfloat16 (decode reads
    half the bytes of float32) and a prompt's many-row products run in float32: same model, chosen at load."""
    import llama32.model as model_mod
    path = make_checkpoint(kind="llama31")
    config = LlamaConfig.from_file(path / "config.json")
    monkeypatch.setattr(model_mod, "can_pack_for_cpu", lambda device, dtype: dtype == torch.float32)
    widened = load_model(path, config, device="cpu", dtype=torch.bfloat16)
    assert widened.cpu_path == "widened"
    assert widened.lm_head.weight.dtype == torch.bfloat16 and not widened.lm_head.weight.is_mkldnn
    monkeypatch.undo()
    plain = load_model(path, config, device="cpu", dtype=torch.bfloat16, pack=False)
    reference = load_model(path, config, device="cpu", dtype=torch.float32, pack=False)
    assert plain.cpu_path in ("plain", "widened")
    converted, plain_products = [], []
    real_converted, real_linear = model_mod.linear_converted, torch.nn.functional.linear
    monkeypatch.setattr(model_mod, "linear_converted",
                        lambda x, w, dtype, b=None: converted.append(dtype) or real_converted(x, w, dtype, b))
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: plain_products.append(x.dtype) or real_linear(x, w, b))
    ids = torch.arange(40)[None] % 500
    with torch.no_grad():
        got = widened(ids)
        # every projection of the 40-token prompt ran in float32, the head included (logits at every position)
        assert converted == [torch.float32] * (7 * config.num_hidden_layers + 1) and plain_products == []
        converted.clear()
        widened(ids[:, :1])
        assert converted == [] and set(plain_products) == {torch.bfloat16}  # one row: bfloat16, as a decode step
        monkeypatch.undo()
        want, low = reference(ids), plain(ids)
    assert got.dtype == torch.bfloat16
    err_widened = (got.float() - want).abs().mean().item()
    assert err_widened < 0.05 * want.abs().mean().item()
    assert err_widened <= (low.float() - want).abs().mean().item() * 1.5  # as close to float32 as plain bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", [(32, 8), (9, 3)], ids=["1B", "SmolLM2"])
def test_causal_attention_gives_the_masked_attentions_bits(dtype, heads):
    """A span from position 0 takes the causal kernel over the cache (`causal_attention`), any other span the
    masked one: for a position's bits not to depend on how its prompt was cut, the two must agree bit for bit,
    whatever the span's length (short query blocks, lengths just past a key block) and however long the cache
    is (keys past the span hold other values). Without its query-row padding, 2-, 3- and 513-position spans
    parted."""
    from llama32.model import KEY_BLOCK, SPAN_ROWS, causal_attention, causal_spans, masked_attention

    if not causal_spans("cpu", dtype):
        pytest.skip("the engine keeps the masked attention for this dtype on this CPU (AMX: model.causal_spans)")
    H, K = heads
    G, hd = H // K, 64
    gen = torch.Generator().manual_seed(0)
    for T in (1, 2, 3, 37, 300, 512, 513, 777, 1500):
        for S in sorted({max(KEY_BLOCK, 1 << (T - 1).bit_length()), 2048, 885 if T < 885 else 2048}):
            q = torch.randn(1, H, T, hd, generator=gen).to(dtype)
            k = torch.randn(1, K, S, hd, generator=gen).to(dtype)
            v = torch.randn(1, K, S, hd, generator=gen).to(dtype)
            mask = torch.zeros(T, S, dtype=torch.bool)
            mask[:, :T] = torch.ones(T, T, dtype=torch.bool).tril()
            masked = masked_attention(q.reshape(1, K, G * T, hd), k, v, mask.repeat(G, 1)[None, None], SPAN_ROWS)
            assert torch.equal(causal_attention(q, k, v, gqa=True), masked.reshape(1, H, T, hd)), (T, S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_decode_step_gives_a_position_the_bits_a_span_gives_it(make_checkpoint, dtype):
    """Where `decode_is_span` says so, the prefix index may serve positions a request drew (engine/memory.py):
    their keys and values came from decode steps, and a prompt that repeats them must find what computing them
    as a span gives. So a prompt spanned whole and the same positions decoded one at a time after its head agree:
    logits and every layer's keys and values, to the bit in bfloat16 (float32: to rounding), across the
    512-key block and with the cache longer than the rows need. With decode steps on the masked kernel
    (`choose_step_attention`: LLAMA32_STEP_ATTENTION=masked); written out they round otherwise, and
    `decode_is_span` says so (test_written_steps_are_not_spans)."""
    from llama32.model import choose_step_attention, decode_is_span

    model = ours(make_checkpoint(kind="llama32"), dtype)
    choose_step_attention(model, "cpu", dtype, allow=False)
    if not decode_is_span(model, "cpu", dtype):
        pytest.skip("drawn positions stay out of the prefix index on this path (model.decode_is_span: AMX or "
                    "a CPU without native bfloat16)")
    config = model.config
    gen = torch.Generator().manual_seed(5)
    for head, drawn, length in ((40, 24, 512), (500, 24, 1024)):
        ids = torch.randint(0, config.vocab_size, (1, head + drawn), generator=gen)
        whole = KVCache(config, 1, length, device="cpu", dtype=dtype)
        steps = KVCache(config, 1, length, device="cpu", dtype=dtype)
        with torch.no_grad():
            span = model(ids, cache=whole, input_pos=torch.arange(head + drawn)[None], causal=True)[0, head:]
            model(ids[:, :head], cache=steps, input_pos=torch.arange(head)[None], causal=True)
            decoded = torch.cat([model(ids[:, t:t + 1], cache=steps, input_pos=torch.tensor([[t]]))[0]
                                 for t in range(head, head + drawn)])
        kv = [(a[:, :, :head + drawn], b[:, :, :head + drawn])
              for a, b in zip(whole.k + whole.v, steps.k + steps.v)]
        if dtype == torch.float32:
            assert rel_err(decoded, span) <= 1e-5, head
            assert all(rel_err(a, b) <= 1e-5 for a, b in kv), head
        else:
            assert torch.equal(decoded, span), head
            assert all(torch.equal(a, b) for a, b in kv), head


@pytest.mark.parametrize("steps", ["written", "fused"])
@pytest.mark.parametrize("S", [512, 1024, 1800], ids=["one-block", "two-blocks", "padded"])
def test_step_attention_is_attention(S, steps):
    """`written_attention` and `fused_step_attention` (decode steps' attention where verified) against attention
    in float64 over the same bfloat16 inputs: each row's keys past its own masked, over one 512-key block, two
    (written out: one product per block, the blocks' sums added in float32) and a length the padding takes to
    four."""
    from llama32.model import fused_step_attention, written_attention

    attention = fused_step_attention if steps == "fused" else written_attention
    gen = torch.Generator().manual_seed(11)
    B, K, G, hd = 3, 2, 3, 64
    q, k, v = (torch.randn(B, K, n, hd, generator=gen).bfloat16() for n in (G, S, S))
    ends = torch.tensor([S, S // 2 + 7, 1])  # keys [0, end) of each row
    mask = (torch.arange(S)[None] < ends[:, None])[:, None, None]  # (B, 1, 1, S)
    scores = q.double() @ k.double().transpose(-1, -2) / hd ** 0.5
    want = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double()
    got = attention(q, k, v, mask)
    assert got.dtype == torch.bfloat16 and got.shape == (B, K, G, hd)
    assert (got.double() - want).abs().max().item() <= 0.02 * want.abs().max().item()


@pytest.mark.parametrize("spans", ["written", "fused"])
@pytest.mark.parametrize("heads", [(32, 8), (9, 3)], ids=["1B", "SmolLM2"])
def test_span_attention_is_attention(heads, spans):
    """`written_span_attention` and `fused_span_attention` (prompt spans' attention where verified) against
    attention in float64 over the same bfloat16 inputs: two rows, one from position 0 and one continuing at 100
    with its last positions repeated (a batched span's padding), each query seeing the keys at or before its
    position; spans across query pieces and key blocks, and one that reaches past a cache whose length is no
    multiple of `SPAN_KEYS`. The queries come as the layer gives them, a transposed view."""
    from llama32 import model as M

    attention = M.fused_span_attention if spans == "fused" else M.written_span_attention
    H, K = heads
    G, hd = H // K, 64
    gen = torch.Generator().manual_seed(12)
    for T, S in ((1, 512), (70, 512), (300, 512), (300, 405)):
        q = torch.randn(2, T, H, hd, generator=gen).bfloat16().transpose(1, 2)
        k, v = (torch.randn(2, K, S, hd, generator=gen).bfloat16() for _ in range(2))
        pos = torch.stack([torch.arange(T), torch.arange(100, 100 + T).clamp(max=min(100 + T - 3, S - 1))])
        pos = pos.clamp(max=S - 1)
        scores = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) / hd ** 0.5  # (2, H, T, S)
        hide = torch.arange(S)[None, None] > pos[:, :, None]  # (2, T, S)
        want = scores.masked_fill(hide[:, None], float("-inf")).softmax(-1) @ v.double().repeat_interleave(G, 1)
        got = attention(q, k, v, pos)
        assert got.dtype == torch.bfloat16 and got.shape == (2, T, H * hd)
        want = want.transpose(1, 2).reshape(2, T, H * hd)
        assert (got.double() - want).abs().max().item() <= 0.02 * want.abs().max().item(), (T, S)


def two_class_products(model, monkeypatch) -> None:
    """Give every projection but the head a kernel that rounds as an AMX Xeon's did for the 1B's down projection
    (benchmarks/RESULTS.md): one set of bits in calls of up to 48 rows, another in calls of more (here the
    product's own, nudged by a relative 2^-7), and plan the row tiles again (`tile_products`). Each projection's
    ladder from one row then stops at 48, and prompt spans take a ladder of their own from 64 (`span_tiles_for`)."""
    from llama32 import tiles
    from llama32.model import Linear, tile_products

    def two_class(real):
        def product(x):
            y = real(x)
            return y if x.numel() <= 48 * x.shape[-1] else (y.float() * (1 + 2 ** -7)).to(y.dtype)
        return product

    monkeypatch.setattr(tiles, "_plans", {})
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name != "lm_head":
            module.product = two_class(module.product)
    tile_products(model)
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name != "lm_head":
            assert module.tiles.sizes[-1] == 48 and module.span_tiles.unit == 64, name
    assert all(layer.span_tiles.unit == 64 for layer in model.model.layers)


def spans_model(path, spans: str):
    """The bfloat16 model of `path` with prompt spans on `spans` ("written" or "fused"), or a skip where no load
    on this CPU would take that path: where its check (`span_attention_verified`) fails here, or decode steps
    stay on the masked kernel. The fused kernel verified on a CPU without AMX is set by hand, since the load
    takes it only with AMX, where it measured faster."""
    from llama32.model import span_attention_verified

    config = LlamaConfig.from_file(path / "config.json")
    model = load_model(path, config, device="cpu", dtype=torch.bfloat16, fused_spans=spans == "fused")
    if model.span_attention != spans and spans == "fused" and model.span_attention == "written" \
            and span_attention_verified(config, torch.bfloat16, "fused"):
        for layer in model.model.layers:
            layer.self_attn.span_attention = "fused"
    if model.span_attention != spans:
        pytest.skip(f"prompt spans cannot take the {spans} attention on this CPU (model.span_attention_verified, "
                    f"or decode steps on the masked kernel)")
    return model


@pytest.mark.parametrize("spans", ["written", "fused"])
@pytest.mark.parametrize("kernel", ["as-is", "two-class"])
def test_span_attention_gives_a_position_one_set_of_bits_however_its_prompt_is_cut(make_checkpoint, kernel, spans,
                                                                                   monkeypatch):
    """Where prompt spans attend written out or through the fused kernel as `fused_span_attention` calls it
    (`model.span_attention`), a position's logits and its keys and values must not depend on how its prompt was
    cut into spans, what shared their forward or how long the cache was (the prefix index serves one request's
    prompt positions to another): a prompt spanned whole from position 0, the same cut at odd places (spans
    continuing at 1, 70 and 333 positions), and the same beside a shorter row in one forward (that row padded
    with its next position, as the engine pads) in a longer cache, all to the bit. Decode steps round otherwise,
    so `decode_is_span` is False. "two-class": with products whose ladder stops at 48 rows, spans taking their
    own from 64 (a 1-position span runs 64 rows)."""
    from llama32.model import decode_is_span

    model = spans_model(make_checkpoint(kind="llama32"), spans)
    if kernel == "two-class":
        two_class_products(model, monkeypatch)
    assert model.step_attention != "masked" and not decode_is_span(model, "cpu", torch.bfloat16)
    config = model.config
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, config.vocab_size, (2, 600), generator=gen)
    whole = KVCache(config, 1, 1024, device="cpu", dtype=torch.bfloat16)
    cut = KVCache(config, 1, 610, device="cpu", dtype=torch.bfloat16)  # (the last span reaches past it)
    beside = KVCache(config, 2, 2048, device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        at = torch.arange(600)[None]
        want = model(ids[:1], cache=whole, input_pos=torch.arange(600)[None], logits_at=at, causal=True)[0]
        parts = []
        for a, e in ((0, 1), (1, 70), (70, 333), (333, 600)):
            parts.append(model(ids[:1, a:e], cache=cut, input_pos=torch.arange(a, e)[None],
                               logits_at=torch.arange(e - a)[None], causal=a == 0)[0])
        pos = torch.arange(600).expand(2, 600).clone()
        pos[1, 250:] = 250
        both = model(ids, cache=beside, input_pos=pos, logits_at=at.expand(2, 600), causal=True)[0]
    assert torch.equal(torch.cat(parts), want)
    assert torch.equal(both, want)
    for a, b, c in zip(whole.k + whole.v, cut.k + cut.v, beside.k + beside.v):
        assert torch.equal(a[:, :, :600], b[:, :, :600]) and torch.equal(a[:1, :, :600], c[:1, :, :600])


@pytest.mark.parametrize("spans", ["written", "fused"])
@pytest.mark.parametrize("kernel", ["as-is", "two-class"])
def test_spans_packed_into_one_row_have_the_bits_of_a_forward_each(make_checkpoint, kernel, spans, monkeypatch):
    """Several rows' prompt spans packed one after another into one row (`segments`, as engine/prefill.py packs
    the spans of an iteration) give every position the logits, keys and values it has in a forward of its own
    span, to the bit: spans of 37, 150, 1 and 90 positions, two from position 0 and two continuing a context
    already in their rows, packed out of row order. "two-class": products whose ladder stops at 48 rows, spans
    on a ladder of their own from 64."""
    from llama32.model import Segments

    model = spans_model(make_checkpoint(kind="llama32"), spans)
    if kernel == "two-class":
        two_class_products(model, monkeypatch)
    config = model.config
    gen = torch.Generator().manual_seed(9)
    starts, lengths = (0, 0, 5, 200), (37, 150, 1, 90)
    ids = [torch.randint(0, config.vocab_size, (s + n,), generator=gen) for s, n in zip(starts, lengths)]
    alone = KVCache(config, 4, 512, device="cpu", dtype=torch.bfloat16)
    packed = KVCache(config, 4, 512, device="cpu", dtype=torch.bfloat16)
    order = (2, 0, 3, 1)
    with torch.no_grad():
        for r, start in enumerate(starts):  # the context before a continuing span, in both caches alike
            for cache in (alone, packed) if start else ():
                model(ids[r][None, :start], cache=cache.view(slice(r, r + 1)), input_pos=torch.arange(start)[None],
                      logits_at=torch.tensor([[start - 1]]), causal=True)
        want = {r: model(ids[r][None, starts[r]:], cache=alone.view(slice(r, r + 1)),
                         input_pos=torch.arange(starts[r], starts[r] + lengths[r])[None],
                         logits_at=torch.arange(lengths[r])[None], causal=starts[r] == 0)[0] for r in order}
        parts, flat, pos, a = [], [], [], 0
        for r in order:
            parts.append((r, a, a + lengths[r]))
            flat.append(ids[r][starts[r]:])
            pos.append(torch.arange(starts[r], starts[r] + lengths[r]))
            a += lengths[r]
        got = model(torch.cat(flat)[None], cache=packed, input_pos=torch.cat(pos)[None],
                    logits_at=torch.arange(a)[None], segments=Segments(parts))[0]
    assert torch.equal(got, torch.cat([want[r] for r in order]))
    for k_alone, k_packed in zip(alone.k + alone.v, packed.k + packed.v):
        assert torch.equal(k_alone, k_packed)


@pytest.mark.parametrize("spans", ["written", "fused"])
def test_span_attention_is_taken_only_where_a_position_keeps_its_bits(make_checkpoint, monkeypatch, spans):
    """The load-time check (`span_attention_verified`) turns a span attention down where a position's result
    depends on how its span was cut: here one that moves with the span's length. Spans then fall back (from the
    fused kernel to written out, from written out to PyTorch's kernels as padded) while decode steps stay
    written; with decode steps on the masked kernel (LLAMA32_STEP_ATTENTION=masked) spans keep the kernels too,
    and LLAMA32_SPAN_ATTENTION=written keeps them off the fused kernel."""
    import llama32
    from llama32 import model as M

    path = make_checkpoint(kind="llama32")
    config = LlamaConfig.from_file(path / "config.json")
    fused = spans == "fused"
    honest = load_model(path, config, device="cpu", dtype=torch.bfloat16, fused_spans=fused)
    if honest.span_attention != spans:
        pytest.skip(f"a load does not take the {spans} span attention on this CPU (model.choose_step_attention)")
    name = f"{spans}_span_attention"
    real = getattr(M, name)
    monkeypatch.setattr(M, "_span_checks", {})
    monkeypatch.setattr(M, name, lambda q, k, v, pos: real(q, k, v, pos) * (1 + q.shape[2] / 4096))
    swayed = load_model(path, config, device="cpu", dtype=torch.bfloat16, fused_spans=fused)
    fallback = "written" if fused else "kernel"
    assert swayed.span_attention == fallback and swayed.step_attention != "masked"
    assert all(layer.self_attn.span_attention == fallback for layer in swayed.model.layers)
    monkeypatch.setattr(M, name, real)
    if fused:
        monkeypatch.setenv("LLAMA32_SPAN_ATTENTION", "written")
        assert llama32.load(path, dtype="bfloat16", device="cpu").model.span_attention == "written"
    monkeypatch.setenv("LLAMA32_STEP_ATTENTION", "masked")
    assert llama32.load(path, dtype="bfloat16", device="cpu").model.span_attention == "kernel"


def test_spans_on_a_ladder_of_their_own_are_not_decode_steps(make_checkpoint, monkeypatch):
    """Where prompt spans' products take row tiles of their own (`span_tiles_for`), a decode step does not write
    a span's bits, so `decode_is_span` (whether the prefix index may serve drawn positions to other prompts) is
    False, even where it held before: decode steps on the masked kernel, spans from position 0 on the causal
    one (as on a CPU with AVX-512 BF16 and no AMX)."""
    from llama32 import model as M

    model = ours(make_checkpoint(kind="llama32"), torch.bfloat16)
    if model.cpu_path == "widened":
        pytest.skip("bfloat16 on a CPU without native bfloat16 has no row tiles (docs/API.md)")
    for layer in model.model.layers:
        layer.self_attn.written_steps, layer.self_attn.span_attention = False, "kernel"
    monkeypatch.setattr(M, "causal_spans", lambda device, dtype: True)
    assert M.decode_is_span(model, "cpu", torch.bfloat16)
    two_class_products(model, monkeypatch)
    assert not M.decode_is_span(model, "cpu", torch.bfloat16)


def steps_model(path, steps: str):
    """The bfloat16 model of `path` with one-position forwards on `steps` ("written" or "fused"), or a skip where
    no load on this CPU would take that path (its check, `step_attention_verified`, fails here). The fused kernel
    verified on a CPU without AMX is set by hand, since the load takes it only with AMX, where it measured
    faster."""
    from llama32.model import step_attention_verified

    config = LlamaConfig.from_file(path / "config.json")
    model = load_model(path, config, device="cpu", dtype=torch.bfloat16, fused_steps=steps == "fused")
    if steps == "fused" and model.step_attention == "written" and step_attention_verified(config, torch.bfloat16,
                                                                                          "fused"):
        for layer in model.model.layers:
            layer.self_attn.fused_steps = True
    if model.step_attention != steps:
        pytest.skip(f"one-position forwards cannot take the {steps} attention on this CPU "
                    f"(model.step_attention_verified)")
    return model


@pytest.mark.parametrize("steps", ["written", "fused"])
@pytest.mark.parametrize("kernel", ["as-is", "two-class"])
def test_step_attention_gives_a_position_one_set_of_bits_however_it_is_fed(make_checkpoint, kernel, steps,
                                                                            monkeypatch):
    """Where decode steps attend written out or through the fused kernel (`choose_step_attention`), every
    one-position forward must too, with the same bits: a resume recomputing drawn positions and a verify
    forward pass several positions at once
    (`per_position`), beside other rows; decode steps run rows of other lengths beside each other. A position's
    logits and keys and values are the same whichever way, to the bit, and `decode_is_span` is False (a prompt
    span rounds otherwise: the prefix index keeps drawn positions out). "two-class": with products whose
    ladder stops at 48 rows, where a forward of several positions must not take the spans' ladder."""
    from llama32.model import decode_is_span

    model = steps_model(make_checkpoint(kind="llama32"), steps)
    if kernel == "two-class":
        two_class_products(model, monkeypatch)
    assert not decode_is_span(model, "cpu", torch.bfloat16)
    config = model.config
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, config.vocab_size, (3, 560), generator=gen)
    heads, drawn = (520, 40, 300), 20  # row r's prompt: ids[r, :heads[r]]; then `drawn` positions

    def prompts(cache):
        for r, h in enumerate(heads):
            model(ids[r:r + 1, :h], cache=cache.view(slice(r, r + 1)), input_pos=torch.arange(h)[None], causal=True)

    one = KVCache(config, 3, 1024, device="cpu", dtype=torch.bfloat16)  # each row stepped alone
    together = KVCache(config, 3, 1024, device="cpu", dtype=torch.bfloat16)  # the rows stepped in one batch
    fed = KVCache(config, 3, 1024, device="cpu", dtype=torch.bfloat16)  # each row's positions in one forward
    with torch.no_grad():
        for cache in (one, together, fed):
            prompts(cache)
        alone, batched, spans = [], [], []
        for r, h in enumerate(heads):
            alone.append(torch.cat([model(ids[r:r + 1, t:t + 1], cache=one.view(slice(r, r + 1)),
                                          input_pos=torch.tensor([[t]]), per_position=True)[0]
                                    for t in range(h, h + drawn)]))
            pos = torch.arange(h, h + drawn)[None]
            spans.append(model(ids[r:r + 1, h:h + drawn], cache=fed.view(slice(r, r + 1)), input_pos=pos,
                               per_position=True)[0])
        for i in range(drawn):
            pos = torch.tensor([[h + i] for h in heads])
            tokens = torch.stack([ids[r, h + i] for r, h in enumerate(heads)])[:, None]
            batched.append(model(tokens, cache=together, input_pos=pos, per_position=True)[:, 0])
    batched = torch.stack(batched, dim=1)
    for r, h in enumerate(heads):
        assert torch.equal(alone[r], batched[r]), r
        assert torch.equal(alone[r], spans[r]), r
        kv = [(a[r, :, :h + drawn], b[r, :, :h + drawn], c[r, :, :h + drawn])
              for a, b, c in zip(one.k + one.v, together.k + together.v, fed.k + fed.v)]
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in kv), r


@pytest.mark.parametrize("steps", ["written", "fused"])
def test_step_attention_is_taken_only_where_every_row_keeps_its_bits(make_checkpoint, monkeypatch, steps):
    """The load-time check (`step_attention_verified`) turns a decode attention down where a row's result
    depends on what shares its call: here one that moves with the batch size. The layers then fall back (from
    the fused kernel to written out, from written out to the masked kernel); `LLAMA32_STEP_ATTENTION=written`
    keeps decode steps off the fused kernel, `=masked` on the masked one; any other value is refused by name."""
    import llama32
    from llama32 import model as M

    path = make_checkpoint(kind="llama32")
    config = LlamaConfig.from_file(path / "config.json")
    fused = steps == "fused"
    honest = load_model(path, config, device="cpu", dtype=torch.bfloat16, fused_steps=fused)
    if honest.step_attention != steps:
        pytest.skip(f"a load does not take the {steps} decode attention on this CPU (model.choose_step_attention)")
    assert all(layer.self_attn.written_steps for layer in honest.model.layers)
    name = "fused_step_attention" if fused else "written_attention"
    real = getattr(M, name)
    monkeypatch.setattr(M, "_step_checks", {})
    monkeypatch.setattr(M, name, lambda q, k, v, mask: real(q, k, v, mask) * (1 + q.shape[0] / 256))
    swayed = load_model(path, config, device="cpu", dtype=torch.bfloat16, fused_steps=fused)
    fallback = "written" if fused else "masked"
    assert swayed.step_attention == fallback
    assert all(layer.self_attn.written_steps == fused and not layer.self_attn.fused_steps
               for layer in swayed.model.layers)
    monkeypatch.setattr(M, name, real)
    if fused:
        monkeypatch.setenv("LLAMA32_STEP_ATTENTION", "written")
        assert llama32.load(path, dtype="bfloat16", device="cpu").model.step_attention == "written"
    monkeypatch.setenv("LLAMA32_STEP_ATTENTION", "masked")
    assert llama32.load(path, dtype="bfloat16", device="cpu").model.step_attention == "masked"
    monkeypatch.setenv("LLAMA32_STEP_ATTENTION", "fast")
    with pytest.raises(ValueError, match="LLAMA32_STEP_ATTENTION"):
        llama32.load(path, dtype="bfloat16", device="cpu")
