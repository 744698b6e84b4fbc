"""The Llama transformer, hand-written in PyTorch.

Follows transformers' `modeling_llama.py` numerically (the oracle: RMSNorm and RoPE in float32, HF's
`rotate_half` layout) and gpt-fast's shape for speed (a preallocated KV cache written at explicit positions,
so every decode step has the same shapes). Module names mirror the checkpoint keys, so loading is a strict
state-dict load.

Shapes: B batch, T new tokens this call, S cache length, D hidden size, H query heads, K key/value heads,
hd head dim, V vocabulary.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LlamaConfig
from .quant import int8_linear
from .scratch import linear_converted
from .tiles import CAP, CAP_HEAD, RowTiles, least_call, pad_rows
from .tiles import parts as tile_parts
from .tiles import plan as plan_tiles
from .tiles import run as run_tiles


class Linear(nn.Linear):
    """`nn.Linear` that can add LoRA adapters, unmerged.

    `adapter` is the handle's own adapter (`load(..., lora=...)`): `(A [r, in], B [out, r], scale)` or None,
    a plain attribute, not a parameter, so the state dict keeps the checkpoint's keys. Per-request adapters
    never touch it: they come in as `lora`, a `lora.RowAdapters` that gives each row of the batch its own.
    """

    adapter: tuple[Tensor, Tensor, float] | None = None
    # On a CPU without native bfloat16 (see `choose_cpu_path`): inputs of more rows than this are multiplied in
    # float32, the bfloat16 weight widened just before its product. None: always in the weight's dtype.
    widen_above: int | None = None
    lora_name: str | None = None  # the module's name, set when LoRA adapters look for it (lora._projections)
    # bfloat16 on CPU: the row counts this product runs at, so a row's bits do not depend on how many rows
    # share the product (tiles.py; set by `choose_cpu_path`). None: one call at whatever row count comes.
    tiles: RowTiles | None = None
    # bfloat16 on CPU: the row counts for the rows of prompt spans, where a ladder of larger calls verifies and
    # `tiles` stops short (`span_tiles_for`); None: spans take `tiles` too
    span_tiles: RowTiles | None = None

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # see Embedding
            super().reset_parameters()

    def forward(self, x: Tensor, lora=None, span: bool = False) -> Tensor:
        """`span`: x holds rows of prompt spans (not decode, verify or resume steps), which take `span_tiles`."""
        tiles = self.span_tiles if span and self.span_tiles is not None else self.tiles
        if tiles is not None and not torch.compiler.is_compiling():
            y = run_tiles(self.product, x, tiles)
        elif self.weight.dtype == torch.int8:  # load(..., quantize="int8"), see quant.py
            y = int8_linear(x, self.weight, self.weight_scale)
            if self.bias is not None:
                y = y + self.bias
        elif self.widen_above is not None and x.numel() > self.widen_above * x.shape[-1]:
            bias = None if self.bias is None else self.bias.float()
            y = linear_converted(x, self.weight, torch.float32, bias).to(x.dtype)
        else:
            y = self.product(x)
        if lora is not None:
            return lora.add(self, x, y)
        if self.adapter is not None:
            from .lora import adapter_term  # (lora.py imports this module)

            a, b, scale = self.adapter
            y = y + adapter_term(self, x, a, b) * scale
        return y

    def product(self, x: Tensor) -> Tensor:
        """x [..., in] times the weight (prepacked or dense floating point), plus the bias: one kernel call."""
        if self.weight.is_mkldnn:  # prepacked for the CPU at load, see pack_for_cpu
            return packed_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        # Loading builds the model on the meta device, where any computation (random init included) does
        # nothing but import torch._dynamo, about a second.
        if not self.weight.is_meta:
            super().reset_parameters()


NORM_ROWS = 256  # rows normalised at a time (see RMSNorm.forward)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= NORM_ROWS or x.device.type != "cpu" or torch.compiler.is_compiling():
            return self._norm(x)
        # A prompt's rows, NORM_ROWS at a time: each row's arithmetic is the same, and the float32 temporaries stay
        # small. Whole, a forward of 32 prompts of 180 tokens made four 47 MB temporaries per norm, each a fresh
        # allocation whose pages the kernel faulted in: 75 ms for one `pow` on an AMX Xeon VM, 3 s of a 29 s run.
        flat = x.reshape(rows, x.shape[-1])
        out = torch.empty(flat.shape, dtype=torch.promote_types(self.weight.dtype, x.dtype), device=x.device)
        for start in range(0, rows, NORM_ROWS):
            out[start:start + NORM_ROWS] = self._norm(flat[start:start + NORM_ROWS])
        return out.view(*x.shape[:-1], -1)

    def _norm(self, x: Tensor) -> Tensor:
        # Normalise in float32 and scale in the model dtype, exactly as the reference does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(config: LlamaConfig, device: torch.device | str | None = None) -> Tensor:
    """Inverse frequencies [hd/2] in float32, with Llama 3 scaling when the config asks for it.

    Llama 3 scaling divides low frequencies (wavelength longer than original_ctx / low_freq_factor) by
    `factor`, keeps high frequencies (wavelength shorter than original_ctx / high_freq_factor), and blends
    linearly in between. All four numbers come from the config: 3.1 uses factor 8, 3.2 uses 32.
    """
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    ctx = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > ctx / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= ctx / s.high_freq_factor) & (wavelen <= ctx / s.low_freq_factor)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, T, hd] for positions [B, T], computed in float32 then cast to the model dtype.

    HF layout: the two halves of the head carry the same frequencies (`cat(freqs, freqs)`), paired with
    `rotate_half`. Meta's checkpoints interleave pairs instead; HF's conversion permutes the q/k weights so
    the two forms agree, which is why HF checkpoints load here without any reordering.
    """
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def keep_address(tensors: list[Tensor]) -> None:
    """Tell torch.compile that these tensors keep their address (the KV cache, the sampler's rows, adapter
    stacks): CUDA graphs then read and write them in place rather than copy them in and out each step."""
    if tensors and tensors[0].device.type == "cuda":
        for t in tensors:
            torch._dynamo.mark_static_address(t)


class KVCache:
    """Preallocated keys and values: one [B, K, S, hd] tensor per layer for each of k and v.

    Rows are written at their own positions, so a batch of prompts of different lengths shares one cache
    without left padding. `view(rows, length)` gives a cache over some rows and the first positions of this
    one, sharing its memory (the generation loop's slots; see engine/loop.py).
    """

    def __init__(self, config: LlamaConfig, batch: int, length: int, *, device, dtype: torch.dtype):
        shape = (batch, config.num_key_value_heads, length, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        # A view's decode steps write through the whole tensors (rows offset by row0), not through the view:
        # torch.compile then updates the cache in place instead of copying the view out and back.
        self.whole_k, self.whole_v, self.row0 = self.k, self.v, 0

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    @classmethod
    def over(cls, k: list[Tensor], v: list[Tensor]) -> "KVCache":
        """A cache made of these per-layer tensors."""
        out = cls.__new__(cls)
        out.k, out.v = k, v
        out.whole_k, out.whole_v, out.row0 = k, v, 0
        return out

    def layer(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Layer i's (k, v) to read, the whole (k, v) tensors to write decode steps into, and the row offset."""
        return self.k[i], self.v[i], self.whole_k[i], self.whole_v[i], self.row0

    def view(self, rows: slice, length: int | None = None) -> "KVCache":
        """Rows `rows` (a slice) and positions [0, length) of this cache, in the same memory."""
        assert rows.step is None
        out = KVCache.__new__(KVCache)
        out.k = [t[rows, :, :length] for t in self.k]
        out.v = [t[rows, :, :length] for t in self.v]
        out.whole_k, out.whole_v, out.row0 = self.whole_k, self.whole_v, self.row0 + (rows.start or 0)
        return out


class Segments:
    """Several cache rows' prompt spans packed one after another into the one row of a forward
    (`Transformer.forward`'s `segments`): `parts` lists (cache row, first, end), the packed row's tokens
    [first, end) belonging to that row of the forward's cache; `rows` gives each token's cache row."""

    def __init__(self, parts: list[tuple[int, int, int]], device: torch.device | str = "cpu"):
        self.parts = list(parts)
        self.rows = torch.cat([torch.full((e - a,), r, dtype=torch.long) for r, a, e in self.parts]).to(device)


class Attention(nn.Module):
    # Whether one-position attention (`step_attention`) runs written out (`written_attention`): set at load where
    # a check finds it gives every row the bits it has alone (`choose_step_attention`)
    written_steps: bool = False
    # Where `written_steps`: whether they take PyTorch's fused kernel (`fused_step_attention`) instead, set at
    # load where its own check verifies it
    fused_steps: bool = False
    # How prompt spans over the cache (input positions given, not `per_position`) attend: "written"
    # (`written_span_attention`) or "fused" (`fused_span_attention`), set at load beside `written_steps` where
    # a check verifies it; "kernel": PyTorch's fused kernels as `causal_attention` and `masked_attention` pad them
    span_attention: str = "kernel"

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.n_heads * self.hd, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.n_kv * self.hd, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.n_kv * self.hd, bias=bias)
        self.o_proj = Linear(self.n_heads * self.hd, config.hidden_size, bias=bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor] | None,
                input_pos: Tensor | None, mask: Tensor | None, lora=None, probs: list[Tensor] | None = None,
                per_position: bool = False) -> Tensor:
        """`probs`: a list to append this layer's attention probabilities [B, H, T, S] to (see `explicit_attention`);
        None (every generation step) keeps `scaled_dot_product_attention`. `per_position`: with a mask, attend
        one query position at a time (see `Transformer.forward`)."""
        return self.o_proj(self.mix(x, cos, sin, kv, input_pos, mask, lora, probs, per_position), lora,
                           not per_position)

    def mix(self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor] | None, input_pos: Tensor | None,
            mask: Tensor | None, lora=None, probs: list[Tensor] | None = None, per_position: bool = False,
            segments: "Segments | None" = None) -> Tensor:
        """`forward` up to the output projection: the heads' attention outputs side by side, [B, T, H * hd].
        `segments`: several cache rows' prompt spans packed into one row (see `Transformer.forward`)."""
        B, T, _ = x.shape
        span = not per_position  # (see Linear.span_tiles)
        q = self.q_proj(x, lora, span).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x, lora, span).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x, lora, span).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, K, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if segments is not None:  # each token written into its own row, each row's span attending alone
            k_cache, v_cache, k_whole, v_whole, row0 = kv
            k_whole[segments.rows + row0, :, input_pos[0]] = k[0].transpose(0, 1)
            v_whole[segments.rows + row0, :, input_pos[0]] = v[0].transpose(0, 1)
            spans = span_kernel(self.span_attention)
            return torch.cat([spans(q[:, :, a:e], k_cache[r:r + 1], v_cache[r:r + 1], input_pos[:, a:e])
                              for r, a, e in segments.parts], dim=1)
        if kv is not None:
            k_cache, v_cache, k_whole, v_whole, row0 = kv  # (B, K, S, hd); see KVCache.layer
            if input_pos is None:  # prefill from position 0: store, then attend causally to the fresh keys
                k_cache[:, :, :T] = k
                v_cache[:, :, :T] = v
            else:  # each row writes at its own positions, then attends over the whole cache under `mask`
                rows = torch.arange(row0, row0 + B, device=x.device)[:, None]
                k_whole[rows, :, input_pos] = k.transpose(1, 2)
                v_whole[rows, :, input_pos] = v.transpose(1, 2)
                k, v = k_cache, v_cache

        if probs is not None:
            y, p = explicit_attention(q, k, v, mask, self.n_heads // self.n_kv)
            probs.append(p)
        elif self.span_attention != "kernel" and input_pos is not None and not per_position \
                and not torch.compiler.is_compiling():
            return span_kernel(self.span_attention)(q, k, v, input_pos)  # (already [B, T, H * hd])
        elif mask is None and input_pos is not None:  # spans from position 0, over the cache (`causal`)
            y = causal_attention(q, k, v, self.n_kv != self.n_heads)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.n_kv != self.n_heads)
        else:
            # Fold each key/value head's group of query heads into the query length, so that one plain
            # attention per key/value head serves its group: the same arithmetic as `enable_gqa`, which on
            # CPU in bfloat16 with a mask runs about 8x slower (1 ms a layer at 512 cached positions).
            G, S = self.n_heads // self.n_kv, k.shape[2]
            q = q.reshape(B, self.n_kv, G * T, self.hd)
            mask = mask[:, :, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
            # (reshape, not view: on CUDA the kernels may return the folded output in a layout view can't split)
            if per_position:  # each position's G query rows alone, as a decode step attends (`step_attention`)
                ys = [self.step_attention(q[:, :, t::T], k, v, mask[:, :, t::T]) for t in range(T)]
                y = ys[0][:, :, :, None] if T == 1 else torch.stack(ys, dim=3)  # (B, K, G, T, hd)
            else:
                y = masked_attention(q, k, v, mask, STEP_ROWS if T == 1 else SPAN_ROWS)
            y = y.reshape(B, self.n_heads, T, self.hd)
        return y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)

    def step_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """One query position's attention, as every decode step (and a verify or resume position) takes it:
        q [B, K, G, hd] (each key/value head's G query heads), k, v [B, K, S, hd], mask [B, 1, G, S] ->
        [B, K, G, hd]. `written_steps` (set at load, `choose_step_attention`): `written_attention`, or
        `fused_step_attention` where `fused_steps`; else the masked kernel with the query rows padded to
        `STEP_ROWS`."""
        if self.written_steps and not torch.compiler.is_compiling():  # (the compiled step is CUDA's)
            return (fused_step_attention if self.fused_steps else written_attention)(q, k, v, mask[:, :, :1])
        return masked_attention(q.contiguous(), k, v, mask.contiguous(), STEP_ROWS)


# On the CPU the query rows of a masked attention are padded to a multiple of these (see masked_attention)
STEP_ROWS = 8  # a decode step's (and a verify position's) G rows
SPAN_ROWS = 32  # a prompt span's G * T rows
KEY_BLOCK = 512  # see attend


SHORT_KEYS = 256  # the CPU's floor where every attention is written out (see attention_floor)


def attention_floor(device: torch.device, model: "Transformer | None" = None) -> int:
    """The fewest key positions a forward should attend over on `device`: on the CPU `KEY_BLOCK`, where fewer
    are padded with a copy of the keys and values each layer (`attend`; 9% of a batch-1 1B decode step at 256
    positions), or `SHORT_KEYS` where `model` attends written out both in decode steps and in prompt spans
    (`choose_step_attention`): decode steps then take a shorter set of keys in one product and spans take only
    the keys they need (`written_attention`, `written_span_attention`). 1 elsewhere. The engine's caches on
    the CPU hold at least this many positions and its forwards attend over at least this many
    (engine/scheduler.py, engine/runner.py's `attended_for`), so a copy is made only at a tight budget's edge,
    where the cache holds as many positions as fit.

    What the shorter floor saves: decode steps whose rows hold fewer than 256 positions read half the keys and
    values (8 requests of 128-token prompts and 64 new tokens: the attention's products fell from about 0.5 to
    0.3 s, benchmarks/RESULTS.md). A step's keys are a view of the rows' cache; over fewer positions than the
    cache holds, with more than one row, the CPU's batched product copies them first, which is why the floor
    is the shortest cache the scheduler makes (256: engine/scheduler.py's `MIN_LENGTH`) and not lower."""
    if torch.device(device).type != "cpu":
        return 1
    written = model is not None and model.span_attention != "kernel"  # (only where steps are written too)
    return SHORT_KEYS if written else KEY_BLOCK


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, rows: int) -> Tensor:
    """q [B, K, R, hd], k, v [B, K, S, hd], mask [B, 1, R, S] (True: may attend) -> [B, K, R, hd]:
    `scaled_dot_product_attention`, on the CPU with the R query rows padded to a multiple of `rows` (the
    padding rows repeat the last row's mask and are dropped) and the keys to `KEY_BLOCK` (`attend`).

    The CPU kernel's bits for a row depended on what shared its call, twice over:
    - A decode step on this kernel (`STEP_ROWS`; bfloat16 steps take `written_attention` where it verified): the
      same row, cache and mask came out 1 bf16 ulp apart at one head of a SmolLM2 layer-9 step whenever the row
      sat in the second half of a batch of 4, which the second worker thread takes. Each thread works in its
      own slice of one scratch buffer, R x (keys + head dim + 2) floats long: with R = 3 or 4 the second slice
      starts off a 64-byte line and the kernel's vector loops round otherwise there. With 8 rows every slice is
      aligned and the captured step agreed on both threads. Writing the attention out as products and a softmax
      agreed as well but cost 4% of a batch-1 1B decode step (102 against 98 ms; at 8 and 32 rows it is the
      faster, `written_attention`); the padding cost nothing measurable (97 ms).
    - A prompt span (`SPAN_ROWS`): the kernel cuts the R rows into blocks (32, 64 or 256 rows by R); a small
      last block (R = 771 at 257 positions: 256, 256, 256 and 3) rounded its rows otherwise, so a prefix's keys
      and values depended on how long the prompt around it was (SmolLM2 in bfloat16: layers 22 and up differed
      at positions below 256 between a 257-position prefill and a 286-position one). Padded, every block
      holds a multiple of 32 rows, and those agreed.
    CUDA takes the kernel as it is."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    R = q.shape[2]
    extra = -R % rows
    if extra:
        q = _pad_positions(q, extra)
        mask = torch.cat([mask, mask[:, :, -1:].expand(*mask.shape[:2], extra, mask.shape[3])], dim=2)
    return attend(q, k, v, mask)[:, :, :R]


def written_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q [B, K, G, hd], k, v [B, K, S, hd], mask [B, 1, 1, S] (True: may attend) -> [B, K, G, hd]: attention
    written out as Meta's reference model computes it: the scores a product in the model dtype (summed in
    float32, rounded to the dtype), scaled, the softmax in float32, its probabilities cast back for the product
    with the values. The CPU decode step's attention where `choose_step_attention` verified it.

    At 8 or 32 rows it takes well under half the masked kernel's time (benchmarks/RESULTS.md: 32 rows, 512
    keys, bfloat16, 1.2 against 3.0 ms a layer): the kernel pads each row's G query rows to `STEP_ROWS` and
    works a query block at a time, where here each product runs once over every row. Its bits are not the
    span kernel's, so a decode step no longer gives a position a prompt span's keys and values
    (`decode_is_span`); and they are a row's own only as far as oneDNN runs each row's products alike
    whatever the batch and the attended length, which the load-time check establishes on each CPU."""
    # (a tight budget's edge: see `attend`; the check covers 256 keys and multiples of 512)
    k, v, mask = _pad_keys(k, v, mask, SHORT_KEYS if k.shape[2] < KEY_BLOCK else KEY_BLOCK)
    # (the keys times the queries, transposed: the same products, in a third less time on an AMX Xeon at 32
    # rows of 256 keys, 0.57 against 0.85 ms a layer, where the other way runs G-row products)
    scores = torch.matmul(k, q.transpose(-1, -2)).transpose(-1, -2).float()  # (B, K, G, S)
    bias = torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    probs = scores.mul_(q.shape[-1] ** -0.5).add_(bias).softmax(-1).to(q.dtype)
    B, K, G, S = probs.shape
    if S <= KEY_BLOCK:  # (256 keys where the floor is `SHORT_KEYS`: one product, as over 512)
        return torch.matmul(probs, v)
    # Over more keys, one product per 512-key block, the blocks' sums added in float32 in block order: oneDNN
    # blocks a product's sum otherwise for a longer one (SmolLM2's heads: a row's output over 1,024 keys parted
    # from the same row's over 2,048 with the keys past 1,024 masked), and blocks of masked keys add exactly 0.
    n = S // KEY_BLOCK
    parts = torch.matmul(probs.view(B, K, G, n, KEY_BLOCK).transpose(2, 3), v.reshape(B, K, n, KEY_BLOCK, -1))
    out = parts[:, :, 0].float()
    for j in range(1, n):
        out += parts[:, :, j]
    return out.to(q.dtype)


def fused_step_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """`written_attention`'s arguments and result, through PyTorch's fused (flash) CPU kernel: each query head
    one query row, over its key/value head's keys (`enable_gqa`), the keys padded as `written_attention` pads
    them (256 keys, or a multiple of 512). The decode step's attention on a CPU with AMX in bfloat16 where
    `choose_step_attention` verified it (`step_attention_verified`: every row its solo bits at batch sizes 1-64
    and attended lengths 256-32,768).

    Each (row, head) is worked alone by one thread, one query row over blocks of 512 keys from key 0, so a row's
    bits depend on neither the rows beside it nor masked keys past its own (as `fused_span_attention` has it:
    whole blocks of masked keys, and masked keys past a multiple of 32, add nothing). Every one-position forward
    takes it, so all of them round alike. On a 2-core AMX Xeon (the 1B's 32 query heads over 8 key/value heads,
    a layer, benchmarks/RESULTS.md): 1 row over 256 keys 0.038 against 0.123 ms written out, 8 rows 0.28 against
    0.58, 32 rows 1.19 against 1.76, 32 rows over 512 keys 2.07 against 3.55."""
    k, v, mask = _pad_keys(k, v, mask, SHORT_KEYS if k.shape[2] < KEY_BLOCK else KEY_BLOCK)
    B, K, G, hd = q.shape
    y = F.scaled_dot_product_attention(q.reshape(B, K * G, 1, hd), k, v, attn_mask=mask, enable_gqa=G > 1)
    return y.view(B, K, G, hd)


SPAN_QUERIES = 64  # query positions per product of `written_span_attention` (its rows: G times as many)
SPAN_KEYS = 128  # key positions per product of its probabilities with the values


def written_span_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
    """q [B, H, T, hd] at positions pos [B, T] (non-decreasing along a row), k, v [B, K, S, hd] the rows' cache
    -> [B, T, H * hd]: each query attends to the keys at or before its own position. A prompt span's attention
    on the CPU in bfloat16 where `choose_step_attention` verified it, spans from position 0 and later ones alike.

    Written out as `written_attention` is, in pieces of fixed shape, so that a position's bits do not depend on
    how its prompt was cut into spans, on what shares the forward or on how long the cache is:
    - each row's queries go `SPAN_QUERIES` positions at a time (the last piece padded with zero queries), a
      key/value head's G query heads folded into the rows: one product of [K, G * SPAN_QUERIES, hd] queries
      with the keys up to the piece's furthest position, rounded up to `SPAN_KEYS` (padded with zero keys at
      a tight budget's edge, where the cache holds fewer);
    - the scores scaled (the queries instead, where the scale is a power of two: the same bits, on a tensor
      a piece's key count times smaller), the keys past each query's position set to -inf, the softmax in
      float32 rounded to the model dtype (as transformers' eager attention does; masked keys get exactly 0);
    - the probabilities times the values `SPAN_KEYS` keys at a time (one batched product of every block),
      those products summed in float32 in key order (a product's sum over more keys is blocked otherwise by
      oneDNN; blocks of masked keys add 0).
    What is left to oneDNN (a row's bits the same at any place in a product's rows, and over more keys) is
    what the load-time check (`span_attention_verified`) establishes on each CPU.

    What it saves against PyTorch's fused causal kernel (padded as `causal_attention` pads it; one layer of the
    1B's 32 query heads over 8 key/value heads, a 2-core AMD EPYC with AVX-512 BF16): 128 positions 0.7 against
    3.7 ms, 512 positions 5.4 against 13.3 ms, 2,048 positions 80 against 110 ms. The kernel attends over the
    CPU's 512-key floor however short the prompt and walks its queries in blocks the prompt's length decides.
    """
    B, H, T, hd = q.shape
    K = k.shape[1]
    G, S, Q, KB = H // K, k.shape[2], SPAN_QUERIES, SPAN_KEYS
    q, pos, extra = _pad_queries(q, pos, Q)
    out = q.new_empty(B, T + extra, K, G, hd)
    keys = torch.arange(max(S, int(pos.max()) + KB), device=q.device)
    scale = hd ** -0.5
    exact = math.frexp(scale)[0] == 0.5  # a power of two (head dims 16, 64, 256): scaling the queries is exact
    for b in range(B):
        kb, vb = k[b], v[b]  # (K, S, hd)
        for a in range(0, T + extra, Q):
            at = pos[b, a:a + Q]
            first, last = int(at[0]), int(at[-1])
            n = -(-(last + 1) // KB) * KB
            if n > kb.shape[1]:  # a tight budget's edge: zero keys, masked below
                kb, vb = (torch.cat([t, t.new_zeros(K, n - t.shape[1], hd)], dim=1) for t in (kb, vb))
            rows = (q[b, :, a:a + Q] * scale if exact else q[b, :, a:a + Q]).reshape(K, G * Q, hd)
            scores = torch.matmul(rows, kb[:, :n].transpose(-1, -2))  # (K, G * Q, n)
            if not exact:
                scores.mul_(scale)
            scores.view(K, G, Q, n)[..., first:].masked_fill_(keys[first:n] > at[:, None], float("-inf"))
            probs = scores.softmax(-1)  # (float32 inside, rounded to the dtype)
            blocks = n // KB  # one batched product of each block of probabilities with its block of values
            per_block = torch.bmm(probs.view(K, G * Q, blocks, KB).transpose(1, 2).reshape(K * blocks, G * Q, KB),
                                  vb[:, :n].reshape(K * blocks, KB, hd)).view(K, blocks, G * Q, hd)
            y = per_block[:, 0].float()
            for j in range(1, blocks):
                y += per_block[:, j]
            out[b, a:a + Q] = y.view(K, G, Q, hd).permute(2, 0, 1, 3)
    return out[:, :T].reshape(B, T, H * hd)


FUSED_QUERIES = 256  # query positions per call of `fused_span_attention`


def fused_span_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
    """q [B, H, T, hd] at positions pos [B, T] (non-decreasing along a row), k, v [B, K, S, hd] the rows' cache
    -> [B, T, H * hd]: each query attends to the keys at or before its own position. A prompt span's attention
    on a CPU with AMX in bfloat16, where `choose_step_attention` verified it: PyTorch's fused (flash) CPU kernel
    under a mask, called so that a position's bits do not depend on how its prompt was cut into spans:
    - every call attends over a multiple of `SPAN_KEYS` keys (the keys past the call's furthest position
      masked; zero keys appended at a tight budget's edge, where the cache holds fewer). The kernel walks the
      keys in blocks of 512 from key 0, and a block that ends on no multiple of 32 keys rounded its rows
      otherwise (on an AMX Xeon a prompt of 777 positions attended whole parted from the same positions in a
      longer prompt from position 550 on); masked keys past a multiple of 32, and whole masked blocks, add
      exactly nothing.
    - queries go `FUSED_QUERIES` positions a call, each call over the keys up to its own furthest position, so
      a long prompt does about the causal half of the work. The kernel cuts a call's queries into blocks by
      their count (of 32, 64 or 256 rows), and a last block of one row rounded otherwise (on the same Xeon,
      SmolLM2's position 288 of a 289-position prompt spanned whole, alone in its block, parted from the same
      position at the end of a 61-position span), so the queries are padded with zero queries to a multiple
      of `SPAN_ROWS`: every block then holds 32 rows or more, and calls of 32, 64, 128, 256 and 2,048 queries
      gave every position the same bits.
    What is left to the kernel (a row's bits the same at any place among a call's queries, and over more keys)
    is what the load-time check (`span_attention_verified`) establishes on each CPU.

    Against `written_span_attention` on a 2-core Xeon with AMX (one layer of the 1B's 32 query heads over 8
    key/value heads, benchmarks/RESULTS.md): 512 positions 3.0-3.2 against 9-10 ms, 2,048 positions 35-36
    against 85-88 ms. The written form materialises a query piece's scores and probabilities, the kernel keeps
    them in blocks in cache."""
    B, H, T, hd = q.shape
    K, S = k.shape[1], k.shape[2]
    q, pos, extra = _pad_queries(q, pos, SPAN_ROWS)
    end = -(-(int(pos[:, -1].max()) + 1) // SPAN_KEYS) * SPAN_KEYS
    if end > S:  # a tight budget's edge: zero keys, masked below
        k, v = _pad_positions(k, end - S), _pad_positions(v, end - S)
    keys = torch.arange(end, device=q.device)
    out = q.new_empty(B, T + extra, H, hd)
    for a in range(0, T + extra, FUSED_QUERIES):
        at = pos[:, a:a + FUSED_QUERIES]
        n = -(-(int(at[:, -1].max()) + 1) // SPAN_KEYS) * SPAN_KEYS
        mask = (keys[:n] <= at[:, :, None])[:, None]  # (B, 1, queries, n)
        y = F.scaled_dot_product_attention(q[:, :, a:a + FUSED_QUERIES], k[:, :, :n], v[:, :, :n], attn_mask=mask,
                                           enable_gqa=K != H)
        out[:, a:a + FUSED_QUERIES] = y.transpose(1, 2)
    return out[:, :T].reshape(B, T, H * hd)


def span_kernel(name: str):
    """The prompt span attention named "fused" (`fused_span_attention`) or "written" (`written_span_attention`),
    looked up when called (`Attention.span_attention` and `span_attention_verified` take it by name)."""
    return fused_span_attention if name == "fused" else written_span_attention


def _pad_queries(q: Tensor, pos: Tensor, multiple: int) -> tuple[Tensor, Tensor, int]:
    """q [B, H, T, hd] at positions pos [B, T] padded with zero queries at each row's last position to a multiple
    of `multiple` positions: (q, pos, the positions added), the caller dropping their outputs."""
    extra = -q.shape[2] % multiple
    if extra:
        q = _pad_positions(q, extra)
        pos = torch.cat([pos, pos[:, -1:].expand(pos.shape[0], extra)], dim=1)
    return q, pos, extra


def _pad_positions(t: Tensor, extra: int) -> Tensor:
    """t [B, heads, positions, hd] with `extra` zero positions appended (query rows or keys and values)."""
    return torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)


def causal_spans(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the engine's prompt spans from position 0 take `causal_attention` (else `masked_attention`): on the
    CPU but for bfloat16 / float16 on one with AMX. There PyTorch's kernel may run its products on keys and values
    it packs first, deciding per call from the query count and the causal flag (a 32-row causal span would not
    pack where the same span masked, 4 x 32 rows, would), so the two calls could round otherwise; the masked
    path alone keeps a position's bits there. Elsewhere both calls run the same products."""
    if torch.device(device).type != "cpu":
        return False
    return dtype == torch.float32 or not _cpu_has("amx_tile")


def decode_is_span(model: "Transformer", device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether a decode step gives a position the keys and values a prompt span gives it, so that positions a
    request drew may serve another prompt from the prefix index (engine/memory.py, `KVMemory.answers`).

    - float32: to rounding (oneDNN sums a product in another order for another row count), the standard the
      index already keeps for prompts computed in other chunks or batches.
    - bfloat16 on the CPU: to the bit where every projection runs in verified row tiles
      (`row_invariant`) and spans from position 0 take the causal kernel (`causal_spans`): a decode step's
      masked attention (query rows padded to `STEP_ROWS`) and a span's (padded to `SPAN_ROWS`) then run the same
      per-row arithmetic over the same 512-key blocks (tests/test_model.py checks it). Not on an AMX CPU, whose
      kernel may pack keys for one query count and not another, nor on the widened path (AVX2 only), which is
      not row-invariant at all. Nor where decode steps attend written out (`choose_step_attention`): their
      products round otherwise than the span's kernel, and prompt spans then attend written out in pieces of
      their own shape (`written_span_attention`). Nor where spans' products take row tiles of their own
      (`span_tiles_for`).
    - float16 anywhere, bfloat16 on CUDA: not established (no GPU in this project's checks)."""
    if dtype == torch.float32:
        return True
    return (torch.device(device).type == "cpu" and model.row_invariant and causal_spans(device, dtype)
            and model.step_attention == "masked"  # (masked steps keep spans on the kernels too)
            and not any(isinstance(m, Linear) and m.span_tiles is not None for m in model.modules()))


def causal_attention(q: Tensor, k: Tensor, v: Tensor, gqa: bool) -> Tensor:
    """q [B, H, T, hd] at positions 0..T-1 of each row, k, v [B, K, S, hd] the rows' cache (S >= T; keys past a
    query's position are ignored) -> [B, H, T, hd]: each position attends to the keys at or before it.

    The same bits as `masked_attention` under the causal mask, at about half its work and with no mask made (at
    2,048 positions the mask is 32 MiB of float per layer): the CPU kernel, given the causal flag (top-left
    aligned: query i sees keys 0..i), skips the key blocks past each block of queries, which under a mask add
    exactly nothing, and fills the rest of a query's block with -inf where the mask adds -inf. As there, on the
    CPU the query rows are padded to a multiple of `SPAN_ROWS` (a short last block of queries rounds otherwise)
    and the keys to a multiple of `KEY_BLOCK` (`attend`). tests/test_model.py checks the agreement bit for bit
    across lengths and dtypes, where the engine uses it (`causal_spans`)."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    T = q.shape[2]
    extra = -T % SPAN_ROWS
    if extra:
        q = _pad_positions(q, extra)
    extra = -k.shape[2] % KEY_BLOCK
    if extra:
        k, v = _pad_positions(k, extra), _pad_positions(v, extra)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)[:, :, :T]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """`scaled_dot_product_attention` over a multiple of `KEY_BLOCK` key positions: the rest are padded with masked
    zero keys. The CPU kernel walks the keys in blocks of min(512, S), the last one shorter where S is not a
    multiple of 512, and a short block sums otherwise than a full one with the same keys and more masked. S (the
    attended length) depends on what else is in the batch, so without the padding a row's bits did too:
    - below 512 (S a power of two past the furthest position in the forward): in float32 a 639-token text scored
      in 64-token chunks (S 256, 512, 1024) parted from the text scored whole by up to 9e-5, and beside decoding
      rows by up to 1e-3 after 600 tokens (benchmarks/schedule_fuzz.py), in bfloat16 by up to 0.56;
    - above 512, at a tight budget's edge, where the cache holds as many positions as fit (engine/scheduler.py):
      a text scored in an 885-position cache (a last block of 373) parted from the text scored in 1,024 by up
      to 0.0018 in float32 and 0.25 in bfloat16 (tests/test_engine.py).
    Blocks that hold only masked keys add exactly nothing, so padded, every S agrees. The padding is a copy of
    the keys and values, made only where S is not a multiple of 512: a batch-1 1B decode step at 64 cached
    positions took 115 ms against 110 ms without it. (Attending over 512 cache positions at least, with no copy,
    measured no slower, 86 against 90 ms, but changes the compiled CUDA step's shapes: left for a change to the
    engine.)"""
    if not torch.compiler.is_compiling():  # (the compiled step is CUDA's; see engine/runner.py)
        k, v, mask = _pad_keys(k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _pad_keys(k: Tensor, v: Tensor, mask: Tensor, block: int = KEY_BLOCK) -> tuple[Tensor, Tensor, Tensor]:
    """k, v [B, K, S, hd] and mask [..., S] padded to a multiple of `block` key positions with masked zero
    keys and values (unchanged where S is one already)."""
    extra = -k.shape[2] % block
    if not extra:
        return k, v, mask
    return (_pad_positions(k, extra), _pad_positions(v, extra),
            torch.cat([mask, mask.new_zeros(*mask.shape[:-1], extra)], dim=-1))


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, groups: int) -> tuple[Tensor, Tensor]:
    """Attention written out, as transformers' eager attention computes it, for the probabilities it returns.

    q [B, H, T, hd]; k, v [B, K, S, hd], each key/value head serving `groups` query heads; mask [B, 1, T, S]
    (True: may attend) or None: causal, the T queries being the last T of the S positions. Scores are scaled
    in the model dtype, the softmax runs in float32 and is cast back. Returns (y [B, H, T, hd], probs [B, H, T, S]).
    """
    k = k.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
    v = v.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    if mask is None:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
    return probs @ v, probs


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, i, bias=bias)
        self.up_proj = Linear(d, i, bias=bias)
        self.down_proj = Linear(i, d, bias=bias)

    def forward(self, x: Tensor, lora=None, span: bool = False) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, lora, span)) * self.up_proj(x, lora, span), lora, span)


class DecoderLayer(nn.Module):
    # bfloat16 on CPU: call sizes verified for every projection after attention (`tile_products`), so that the
    # rest of the layer runs one row tile at a time (`_rest_in_tiles`); None: as written in `forward`'s tail
    tiles: RowTiles | None = None
    # the same for the rows of prompt spans, where a product after attention has `Linear.span_tiles`; None: spans
    # take `tiles`
    span_tiles: RowTiles | None = None

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv, input_pos: Tensor | None,
                mask: Tensor | None, lora=None, probs: list[Tensor] | None = None, per_position: bool = False,
                segments: "Segments | None" = None) -> Tensor:
        attn, span = self.self_attn, not per_position  # (see Linear.span_tiles)
        a = attn.mix(self.input_layernorm(x), cos, sin, kv, input_pos, mask, lora, probs, per_position, segments)
        tiles = self.span_tiles if span and self.span_tiles is not None else self.tiles
        if tiles is not None and lora is None and not self._adapted() and not torch.compiler.is_compiling():
            return self._rest_in_tiles(x, a, tiles)
        x = x + attn.o_proj(a, lora, span)
        return x + self.mlp(self.post_attention_layernorm(x), lora, span)

    def _adapted(self) -> bool:
        """Whether a projection after attention carries the handle's own adapter (`Linear.adapter`)."""
        return any(p.adapter is not None for p in self._after_attention())

    def _after_attention(self) -> tuple[Linear, ...]:
        return self.self_attn.o_proj, self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj

    def _rest_in_tiles(self, x: Tensor, a: Tensor, tiles: RowTiles) -> Tensor:
        """The layer after attention (output projection, residual, norm, MLP, residual), one row tile at a
        time: x [B, T, D] the layer's input, a [B, T, H * hd] the attention's output, `tiles` the layer's
        (`tiles`, or `span_tiles` for a prompt span's rows).

        Every step after attention works row by row, so a tile of rows can go through all of them before the
        next tile starts. Each product then runs once per tile at a size its row tiles verified (tiles.py:
        a row's bits are the same at any verified size), and every elementwise step works row by row, so the
        result has the bits of the layer run whole. What it saves on a prompt's rows: the copies that join a
        product's tiles (`tiles.run`; the MLP's 8,192-wide outputs most of all), and the passes over
        prompt-sized temporaries, which now stay tile-sized (256 rows of the 1B's MLP: 4 MiB)."""
        D = x.shape[-1]
        rows = x.numel() // D
        xs, as_ = x.reshape(rows, D), a.reshape(rows, a.shape[-1])
        out = torch.empty_like(xs)
        o, mlp = self.self_attn.o_proj, self.mlp
        for start, n, size in tile_parts(tiles.calls(rows), rows):  # as tiles.run covers a product's rows
            y = pad_rows(xs[start:start + n], size) + o.product(pad_rows(as_[start:start + n], size))
            h = self.post_attention_layernorm(y)
            g = mlp.gate_proj.product(h)
            F.silu(g, inplace=True)
            g.mul_(mlp.up_proj.product(h))
            torch.add(y[:n], mlp.down_proj.product(g)[:n], out=out[start:start + n])
        return out.view_as(x)


class LlamaModel(nn.Module):
    """The body: embedding, L decoder layers, final norm (checkpoint prefix `model.`)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class ModelOutput:
    """What `Transformer.forward` returns when asked for more than logits (transformers' field names).

    - logits [B, T, V] (or [B, 1, V] with `logits_at`).
    - hidden_states: L + 1 tensors [B, T, D], or None: the embeddings' output, then each layer's output,
      the last one after the final norm (as transformers gives them: the last layer's output before the
      norm is not among them).
    - attentions: L tensors [B, H, T, S] of attention probabilities (each row sums to 1), or None.
    """

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


class Transformer(nn.Module):
    """Body plus output head: `Transformer(config)(input_ids)` gives logits [B, T, V]."""

    # bfloat16 on CPU: whether every projection runs in verified row tiles (tiles.py, `choose_cpu_path`), so a
    # row's logits do not depend on how many rows share its forward
    row_invariant: bool = False

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # Not persistent: derived from the config, never read from a checkpoint. On the meta device (while
        # loading) it is a placeholder until `reset_rope`.
        device = self.lm_head.weight.device
        meta = device.type == "meta"
        inv_freq = torch.empty(config.head_dim // 2, device=device) if meta else rope_frequencies(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    @property
    def step_attention(self) -> str:
        """The attention of one-position forwards, "fused" (`fused_step_attention`), "written"
        (`written_attention`) or "masked" (`masked_attention`): what `choose_step_attention` set on the layers."""
        attn = self.model.layers[0].self_attn
        return ("fused" if attn.fused_steps else "written") if attn.written_steps else "masked"

    @property
    def span_attention(self) -> str:
        """The attention of prompt spans over the cache, "fused" (`fused_span_attention`), "written"
        (`written_span_attention`) or "kernel" (PyTorch's fused kernels as `causal_attention` and
        `masked_attention` pad them): what `choose_step_attention` set on the layers."""
        return self.model.layers[0].self_attn.span_attention

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self, device: torch.device | str) -> None:
        """Recompute the RoPE frequencies (after building on the meta device)."""
        self.inv_freq = rope_frequencies(self.config, device)

    def forward(self, input_ids: Tensor, *, cache: KVCache | None = None, input_pos: Tensor | None = None,
                logits_at: Tensor | None = None, lora=None, output_hidden_states: bool = False,
                output_attentions: bool = False, per_position: bool = False,
                causal: bool = False, segments: "Segments | None" = None) -> Tensor | ModelOutput:
        """Logits for `input_ids` [B, T].

        - no cache: a plain causal forward over positions 0..T-1.
        - cache, no input_pos: prefill at positions 0..T-1, keys and values stored in the cache.
        - cache and input_pos [B, T]: each row's tokens sit at its own positions; they attend to every
          cached position at or before their own (decode, or continuing a prompt).
        `logits_at` [B]: apply the head only at that position of each row and return [B, 1, V]; [B, P]: at
        those P positions of each row, [B, P, V] (scoring: the head over the context would be wasted).
        `lora`: per-row LoRA adapters (`lora.RowAdapters`) in place of the handle's own.
        `output_hidden_states` / `output_attentions`: return a `ModelOutput` with them (attention then runs
        written out, `explicit_attention`, for its probabilities); without either, the logits tensor alone.
        `per_position` (with input_pos): attention runs one query position at a time (`Attention.step_attention`),
        as every decode step does, so that each position's attention rounds exactly as a decode step's
        (speculative decoding's verify forward, engine/speculative/, and a resume's drawn positions: on a CPU in
        bfloat16 one fused call over several positions rounds differently). Every other forward is a prompt
        span, whose products take `Linear.span_tiles` where a projection has them.
        `causal` (with input_pos): every row's span starts at position 0 (its i-th token at position i; a row's
        padding, if any, after its tokens), so attention runs `causal_attention` over the cache instead of
        under a mask: the same bits, about half the work (engine/runner.py's prompt spans).
        `segments` (with input_pos, B = 1; where prompt spans attend written out or through the fused kernel,
        `span_attention`): the one row holds several cache rows' prompt spans one after another (`Segments`):
        every product and norm runs over all their tokens at once, and each span attends over its own cache row
        as it would in a forward of its own, with the same bits (the products run in row tiles, every other
        step works a row at a time). Several short prompts then share their products' row tiles instead of
        each padding its own (engine/prefill.py).
        """
        B, T = input_ids.shape
        if input_pos is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            mask = None
        else:
            assert cache is not None, "input_pos needs a cache"
            positions = input_pos
            assert segments is None or (B == 1 and self.span_attention != "kernel" and not per_position), \
                "segments need one row, and prompt spans written out or fused"
            key_pos = torch.arange(cache.length, device=input_ids.device)
            mask = None if causal or segments else (key_pos <= input_pos[:, :, None])[:, None]  # (B, 1, T, S)
            assert not (causal and output_attentions), "output_attentions needs the mask"
        dtype = self.model.norm.weight.dtype  # the embedding may be mapped from the file, in its dtype
        cos, sin = rope_cos_sin(self.inv_freq, positions, dtype)

        x = self.model.embed_tokens(input_ids).to(dtype)  # (B, T, D)
        hidden = [x] if output_hidden_states else None
        probs = [] if output_attentions else None
        for i, layer in enumerate(self.model.layers):
            kv = cache.layer(i) if cache is not None else None
            x = layer(x, cos, sin, kv, input_pos, mask, lora, probs, per_position, segments)
            if hidden is not None:
                hidden.append(x)
        if hidden is not None or probs is not None:
            x = self.model.norm(x)
            if hidden is not None:
                hidden[-1] = x
            if logits_at is not None:
                x = x[torch.arange(B, device=x.device), logits_at][:, None]  # (B, 1, D)
            return ModelOutput(self.lm_head(x), None if hidden is None else tuple(hidden),
                               None if probs is None else tuple(probs))
        if logits_at is not None:
            rows = torch.arange(B, device=x.device)
            if logits_at.dim() == 2:
                x = x[rows[:, None], logits_at]  # (B, P, D)
            else:
                x = x[rows, logits_at][:, None]  # (B, 1, D)
        return self.lm_head(self.model.norm(x))  # the head is never adapted


def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x times a prepacked weight (`pack_linear_weight`)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


PREFERRED_UNIT = 2  # see choose_cpu_path
WIDEN_ABOVE_ROWS = 16  # a decode step (a few rows) stays in bfloat16: it is bound by reading the weights


def choose_cpu_path(model: Transformer, device: torch.device | str, dtype: torch.dtype, pack: bool) -> str:
    """Pick the CPU kernels from what this CPU can do, once, at load; returns the path's name.

    - "packed": oneDNN has kernels for this dtype (float32 anywhere; bfloat16 where the CPU has AVX-512 BF16
      or AMX): every projection is prepacked (`pack_for_cpu`).
    - "widened": bfloat16 on a CPU without native bfloat16 (AVX2 only). There a bfloat16 matrix-matrix product
      runs at about a sixth of float32's speed, so a prompt's products (many rows) widen each weight to float32
      just before multiplying; decode steps (a few rows, bound by reading the weights) stay in bfloat16,
      which reads half the bytes of float32. Not row-invariant: a row rounds one way in a product of at most
      16 rows and another in a larger one (with oneDNN held to AVX2, bfloat16 calls of up to 16 rows agreed
      with each other and float32 calls of more did not agree with them), so a request's answer sent with
      others may part from its solo answer at a near tie. Row tiles there would mean float32 decode steps
      (widening every weight each step) or bfloat16 prompts at a sixth of the speed.
    - "plain": `F.linear` as it is (dense weights asked for, or another dtype / device).

    In bfloat16, packed or dense with native bfloat16, every product runs in row tiles (tiles.py): row counts
    checked here, per weight shape, to give each row the bits it has alone, so a request's logits do not depend on
    what shares its forward. On AVX-512 BF16 without AMX the unit tried first is 2 rows (a decode step of one
    request runs as 2): there oneDNN's 1-row kernel rounds otherwise than its kernel for more rows, so a 1-row unit
    verified no other size for the 1B's larger weights (tiles.py), while 2 rows verify every size of the ladder.
    Elsewhere the unit tried first is 1 row. Which call size is fastest for a few rows is timed at load instead
    (`tiles.least_call`): on one 2-core EPYC VM a token's products in layer order (16 layers' distinct weights
    and the head) took 35 ms at 1 row, 36 at 2, 40.5 at 4 and 50 at 8; on another (2026-12-06), 90 ms
    at 2 rows and 61 at 4.
    """
    if torch.device(device).type != "cpu":
        return "plain"
    if pack and can_pack_for_cpu(device, dtype):
        pack_for_cpu(model)
        if dtype == torch.bfloat16:
            tile_products(model)
        return "packed"
    if dtype == torch.bfloat16 and not can_pack_for_cpu(device, dtype):
        for module in model.modules():
            if isinstance(module, Linear) and module.weight.is_floating_point():
                module.widen_above = WIDEN_ABOVE_ROWS
        return "widened"
    if dtype == torch.bfloat16:
        tile_products(model)
    return "plain"


def tile_products(model: Transformer) -> None:
    """Give every floating-point projection its row tiles (tiles.py), checked once per weight shape and kernel;
    `model.row_invariant` says whether every one verified. Then each weight shape's smallest call is timed on
    the model's own weights of that shape (`tiles.least_call`: where a larger verified size runs faster, fewer
    rows are padded up to it, which changes no bits)."""
    prefer = PREFERRED_UNIT if _cpu_has("avx512_bf16") and not _cpu_has("amx_tile") else 1
    every = True
    shapes: dict[tuple, list[Linear]] = {}  # the projections of one kernel, shape and ladder, in layer order
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or module.weight.dtype != torch.bfloat16:
            continue
        kernel = "packed" if module.weight.is_mkldnn else "dense"
        key = (kernel, module.out_features, module.bias is not None)
        cap = CAP_HEAD if name == "lm_head" else CAP
        module.tiles = plan_tiles(module.product, module.in_features, module.weight.dtype, key, prefer=prefer,
                                  cap=cap)
        every = every and module.tiles is not None
        if module.tiles is not None:
            shapes.setdefault((key, module.in_features, cap), []).append(module)
        if name != "lm_head":  # (the head runs on prompt rows only when scoring; its own ladder serves them)
            module.span_tiles = span_tiles_for(module, key)
    model.row_invariant = every
    for (key, in_features, _), modules in shapes.items():
        fastest = least_call([m.product for m in modules], in_features, torch.bfloat16, modules[0].tiles, key)
        for module in modules:
            module.tiles = fastest
    for layer in model.model.layers:
        products = layer._after_attention()
        layer.tiles = common_tiles([p.tiles for p in products])
        own = any(p.span_tiles is not None for p in products)
        layer.span_tiles = common_tiles([p.span_tiles or p.tiles for p in products]) if own else None


SPAN_UNIT = 64  # the unit of a prompt span's ladder where the usual one stops short (see span_tiles_for)


def span_tiles_for(module: Linear, key: tuple) -> RowTiles | None:
    """A ladder of larger calls for the rows of prompt spans, where `module.tiles` stops short of `2 * SPAN_UNIT`
    rows and one of `SPAN_UNIT` rows and up verifies and goes further; else None (spans take `tiles`).

    On an Intel Xeon with AMX (2 cores), oneDNN's bfloat16 kernel for the 1B's down projection (8,192 -> 2,048)
    gives a row one set of bits in calls of 1 to 48 rows and another in calls of 56 to 512, so its ladder from
    one row stops at 48 rows, where it ran at 1.06 TFLOP/s, against 1.4 at 64 rows and 1.7 at 128 and 256; every
    product after attention then ran at 48 rows (the layer's common sizes, `DecoderLayer._rest_in_tiles`). A
    position's bits need only be the same wherever it is computed, and a prompt's positions are always computed
    in prompt spans (a prefill, a prefix another request computed, a resumed row's prompt), a drawn position
    always in one-position steps (a decode step, a verify or a resumed row's drawn positions: `per_position`).
    So spans may take a ladder of their own, and positions stay the same kind: a decode step then does not
    write a span's bits (`decode_is_span`), as where attention is written out. The cost: a span's rows are
    padded to a multiple of the unit in that product (a 5-token span runs 64 rows).

    Where 64 rows verify only themselves, the unit is 128: on the same Xeon, with weights packed for calls of
    many rows (`pack_linear_weight`), the k/v and down projections give a 64-row call bits of its own, while 128
    and 256 rows agree. A ladder of one size would hold every prompt product after attention to 64-row calls
    (the layer takes the sizes its products share)."""
    tiles = module.tiles
    if tiles is None or tiles.sizes[-1] >= 2 * SPAN_UNIT:
        return None
    alone = None  # a ladder of its unit alone, taken where a unit of 128 verifies nothing longer
    for unit in (SPAN_UNIT, 2 * SPAN_UNIT):
        wide = plan_tiles(module.product, module.in_features, module.weight.dtype, key, prefer=unit, cap=CAP)
        if wide is not None and wide.sizes[-1] > tiles.sizes[-1]:
            if len(wide.sizes) > 1:
                return wide
            alone = alone or wide
    return alone


def span_unit(model: Transformer) -> int:
    """The rows a prompt span's products are padded to a multiple of: the largest of the units (`span_tiles`,
    else `tiles`) of the projections prompts run through and of the layers (whose products after attention
    take the sizes they share); 1 where none runs in tiles. On the Xeon with AMX the 1B's k/v and down
    projections take 128-row calls for spans (`span_tiles_for`), so a 64-token span costs about what a
    128-token one does (the scheduler's `prefill_budget`). A timed smallest call (`RowTiles.least`, at most
    16 rows) is left out: it pads only spans shorter than itself, and its multiples need not be sizes of the
    ladder (6 rows, where 64 is one)."""
    unit = 1
    for name, module in model.named_modules():
        if isinstance(module, (Linear, DecoderLayer)) and name != "lm_head":
            tiles = module.span_tiles or module.tiles
            if tiles is not None:
                unit = max(unit, tiles.sizes[0])
    return unit


def common_tiles(plans: list[RowTiles | None]) -> RowTiles | None:
    """The call sizes verified for every one of these products, or None (a product without tiles, or no size
    common to all). At any of its verified sizes a product gives each row the bits of its own unit, so a size
    verified for every product serves them all, whatever their units. The sizes kept are multiples of the
    smallest common one (what `RowTiles` covers rows with); the smallest call, the largest of theirs."""
    if not plans or any(p is None for p in plans):
        return None
    sizes = sorted(set.intersection(*(set(p.sizes) for p in plans)))
    if not sizes:
        return None
    least = max((p.least or p.unit) for p in plans)
    return RowTiles(tuple(s for s in sizes if s % sizes[0] == 0), max(p.fixed for p in plans),
                    least if least > sizes[0] else None)


def choose_step_attention(model: Transformer, device: torch.device | str, dtype: torch.dtype,
                          allow: bool = True, fused: bool = True, fused_steps: bool = True) -> None:
    """Pick the attention of one-position forwards (decode steps, and a verify's or a resume's positions, which
    must round as they do), once, at load: sets every layer's `Attention.written_steps` and `fused_steps`
    (`model.step_attention` names the choice).

    - "fused" (`fused_step_attention`): bfloat16 on a CPU with AMX where every projection runs in verified row
      tiles (`row_invariant`) and `step_attention_verified` finds that it gives each row its solo bits; about
      twice as fast as written out there. `fused_steps` False (LLAMA32_STEP_ATTENTION=written) keeps it off.
    - "written" (`written_attention`): the same elsewhere, or where the fused kernel does not verify. `allow`
      False (LLAMA32_STEP_ATTENTION=masked) keeps the masked kernel.
    - "masked": the fused masked kernel, query rows padded to `STEP_ROWS` (`masked_attention`): everywhere
      else. Where its padding makes a decode step round as a prompt span does (`decode_is_span`), a request's
      drawn positions may serve later prompts from the prefix index; with "written" or "fused" they may not.

    Prompt spans over the cache (`Attention.span_attention`, `model.span_attention`) leave PyTorch's kernels as
    they are padded today only where decode steps attend written out, and then take the first of these that
    `span_attention_verified` finds gives a position bits independent of how its prompt is cut:
    - "fused" (`fused_span_attention`): on a CPU with AMX (where it measured about three times faster than the
      written form), unless `fused` is False (LLAMA32_SPAN_ATTENTION=written);
    - "written" (`written_span_attention`).
    Else they keep PyTorch's kernels as padded (`causal_attention`, `masked_attention`), which is also what lets
    a decode step on the masked kernel give a position a span's bits."""
    leave = allow and torch.device(device).type == "cpu" and dtype == torch.bfloat16 and model.row_invariant
    fast = leave and fused_steps and _cpu_has("amx_tile") and step_attention_verified(model.config, dtype, "fused")
    written = fast or (leave and step_attention_verified(model.config, dtype))
    spans = "kernel"
    if written and fused and _cpu_has("amx_tile") and span_attention_verified(model.config, dtype, "fused"):
        spans = "fused"
    elif written and span_attention_verified(model.config, dtype, "written"):
        spans = "written"
    for layer in model.model.layers:
        layer.self_attn.written_steps, layer.self_attn.fused_steps = written, fast
        layer.self_attn.span_attention = spans


# (rows, attended keys, cache length) at which `step_attention_verified` compares every row with the row alone:
# batch sizes a loop runs (at the 256-key floor where every attention is written out, every one up to 16 at the
# CPU's 512-key floor, up to 8 over 1,024 keys), attended lengths from the floor up (1,536: a tight budget's
# edge), and steps over the first positions of a longer cache (the loop's views)
STEP_CHECKS = (tuple((B, 256, 256) for B in (*range(1, 9), 16, 32)) + ((1, 256, 512), (3, 256, 1024))
               + tuple((B, 512, 512) for B in (*range(1, 17), 24, 32, 48, 64))
               + tuple((B, 1024, 1024) for B in (*range(1, 9), 16)) + ((4, 1024, 2048), (3, 512, 2048))
               + ((6, 1536, 1536), (1, 2048, 2048), (3, 2048, 2048), (8, 2048, 2048), (1, 4096, 4096),
                  (4, 4096, 4096), (2, 8192, 8192), (1, 32768, 32768)))
_step_lock = threading.Lock()
_step_checks: dict[tuple, bool] = {}


@torch.inference_mode()
def step_attention_verified(config: LlamaConfig, dtype: torch.dtype, kernel: str = "written") -> bool:
    """Whether `written_attention` (`kernel` "written") or `fused_step_attention` ("fused"), at this config's
    heads and in `dtype`, gives every row the bits it has alone
    at each of `STEP_CHECKS`: 16 random rows attending to 1-1,024 keys, each computed alone over the fewest
    512-key blocks that hold it, then at every place of larger batches (the rows repeated) over more keys
    (masked past each row's own, holding other values). oneDNN picks its blocking by the product's sizes and
    the thread count, so the answer is kept per (kernel, heads, dtype, threads) for the process."""
    K, hd = config.num_key_value_heads, config.head_dim
    G = config.num_attention_heads // K
    key = (kernel, K, G, hd, dtype, torch.get_num_threads())
    attention = fused_step_attention if kernel == "fused" else written_attention
    with _step_lock:
        if key in _step_checks:
            return _step_checks[key]
    gen = torch.Generator().manual_seed(0)
    base, most = 16, 2 * KEY_BLOCK
    q = torch.randn(base, K, G, hd, generator=gen).to(dtype)
    k = torch.randn(base, K, most, hd, generator=gen).to(dtype)
    v = torch.randn(base, K, most, hd, generator=gen).to(dtype)
    ends = torch.randint(1, most + 1, (base,), generator=gen)  # row r attends to keys [0, ends[r])

    def mask(rows: Tensor, S: int) -> Tensor:
        return (torch.arange(S)[None] < ends[rows][:, None])[:, None, None]  # (B, 1, 1, S)

    def alone(r: int) -> Tensor:
        S = SHORT_KEYS if ends[r] <= SHORT_KEYS else -(-int(ends[r]) // KEY_BLOCK) * KEY_BLOCK
        return attention(q[r:r + 1], k[r:r + 1, :, :S], v[r:r + 1, :, :S], mask(torch.tensor([r]), S))

    want = [alone(r) for r in range(base)]
    same = True
    for B, S, length in STEP_CHECKS:
        rows = (torch.arange(B) + B) % base  # each size puts the rows at other places
        reps = -(-length // most)
        kb = k[rows].repeat(1, 1, reps, 1)[:, :, :length]  # past a row's keys: copies of them, masked
        vb = v[rows].repeat(1, 1, reps, 1)[:, :, :length]
        got = attention(q[rows], kb[:, :, :S], vb[:, :, :S], mask(rows, S))
        same = same and all(torch.equal(got[i:i + 1], want[r]) for i, r in enumerate(rows.tolist()) if ends[r] <= S)
        if not same:
            break
    with _step_lock:
        _step_checks[key] = same
    return same


_span_checks: dict[tuple, bool] = {}
# (first position, end, cache length) of the spans `span_attention_verified` cuts its positions into, each way
# against the positions spanned whole from 0: cuts inside and across query pieces and key blocks, one position
# alone, a cache length that is no multiple of `SPAN_KEYS` (the padded edge) and longer caches
SPAN_CUTS = (((0, 1, 1536), (1, 70, 1536), (70, 333, 1536), (333, 700, 1536)),
             ((0, 200, 700), (200, 700, 717)),
             ((0, 129, 2048), (129, 640, 2048), (640, 700, 4096)))
SPAN_FAR = (4000, 4100, 8192)  # positions far into a cache, against the same spanned from 3,990 and 3,999
# positions each spanned alone, against the whole: a one-row call is where a kernel's last block of queries may
# hold a single row, which rounded otherwise in about 2% of heads (PyTorch's fused kernel on an AMX Xeon)
SPAN_ALONE = range(640, 700)


@torch.inference_mode()
def span_attention_verified(config: LlamaConfig, dtype: torch.dtype, kernel: str = "written") -> bool:
    """Whether a prompt span's attention (`kernel`: "written", `written_span_attention`, or "fused",
    `fused_span_attention`), at this config's heads and in `dtype`, gives every query position the same bits
    however its span is cut and placed (`SPAN_CUTS`, `SPAN_ALONE`, `SPAN_FAR`), beside a second row, over random
    queries, keys and values (keys past the positions hold other values). The queries are a transposed view, as
    the layer gives them. Kept per (kernel, heads, dtype, threads) for the process, as `step_attention_verified` is."""
    K, hd = config.num_key_value_heads, config.head_dim
    H = config.num_attention_heads
    key = (kernel, K, H, hd, dtype, torch.get_num_threads())
    with _step_lock:
        if key in _span_checks:
            return _span_checks[key]
    gen = torch.Generator().manual_seed(1)
    far, end_far, most = SPAN_FAR
    q = torch.randn(1, end_far, H, hd, generator=gen).to(dtype)  # (positions before heads, as `Attention.mix`)
    k = torch.randn(1, K, most, hd, generator=gen).to(dtype)
    v = torch.randn(1, K, most, hd, generator=gen).to(dtype)
    spans = span_kernel(kernel)

    def run(a: int, e: int, length: int) -> Tensor:  # positions [a, e) in a cache of `length`, beside a row
        rows = torch.cat([q[:, a:e], q[:, a:e].flip(1)]).transpose(1, 2)
        pos = torch.arange(a, e).expand(2, e - a)
        return spans(rows, k[:, :, :length].expand(2, -1, -1, -1), v[:, :, :length].expand(2, -1, -1, -1), pos)[:1]

    whole = run(0, 700, 1024)
    same = all(torch.equal(run(a, e, length), whole[:, a:e]) for cuts in SPAN_CUTS for a, e, length in cuts)
    same = same and all(torch.equal(run(a, a + 1, 1024), whole[:, a:a + 1]) for a in SPAN_ALONE)
    if same:
        want = run(far, end_far, end_far + 12)
        same = all(torch.equal(run(a, end_far, most)[:, far - a:], want) for a in (3990, 3999))
    with _step_lock:
        _span_checks[key] = same
    return same


def _cpu_has(feature: str) -> bool:
    """Whether PyTorch reports this CPU feature (False where this torch cannot tell)."""
    return bool(getattr(torch.cpu, f"_is_{feature}_supported", lambda: False)())


def can_pack_for_cpu(device: torch.device | str, dtype: torch.dtype) -> bool:
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_for_cpu(model: Transformer) -> None:
    """Store every projection's weight in oneDNN's blocked layout (float32 and bfloat16 on CPU).

    A decode step multiplies one row of input by every weight, so it is bound by memory bandwidth. PyTorch's
    plain `F.linear` stays at about 17 GB/s on a 2-core EPYC (bfloat16 and float32 alike); on prepacked
    weights the same product reaches 22-30 GB/s, what the machine's memory gives. The packed weight
    replaces the dense one (`.to_dense()` gives it back), so memory stays one copy. A tied head is untied
    here (the embedding lookup needs the dense matrix); `load_model` avoids that second copy by mapping
    the embedding from the checkpoint file.
    """
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.is_floating_point() and not module.weight.is_mkldnn:
            module.weight = nn.Parameter(pack_linear_weight(module.weight.detach()), requires_grad=False)


def pack_linear_weight(weight: Tensor) -> Tensor:
    """A [out, in] weight in oneDNN's blocked layout, for `torch.ops.mkldnn._linear_pointwise`.

    The layout is chosen for a row count. Packed for 1 row, the AMX Xeon's bfloat16 products ran 15-20% slower at
    32 to 128 rows than packed for many rows (all 16 layers and the head, weights out of cache: 146-152 against
    127-129 ms at 32 rows, 259-262 against 212-216 ms at 128) and no faster at 1 or 8 (benchmarks/RESULTS.md). So
    on AMX bfloat16 weights are packed for many rows. The ladders the load-time check then finds (`tile_products`)
    run decode steps in calls of up to 32 rows and prompt spans in 128- and 256-row calls (`span_tiles_for`).
    Elsewhere (CPUs without AMX, and float32) weights stay packed for 1 row, the layout those paths were
    measured and verified on; the other has not been measured there."""
    hint = None if weight.dtype == torch.bfloat16 and _cpu_has("amx_tile") else 1
    return torch.ops.mkldnn._reorder_linear_weight(weight, hint)
