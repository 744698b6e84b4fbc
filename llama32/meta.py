"""Meta's original checkpoint layout: `params.json`, `consolidated.NN.pth` and `tokenizer.model`.

This is what Meta's own download (`llama model download`) gives and what every Llama 3.2 hub repo carries in
its `original/` folder. It is read into exactly what the Hugging Face layout gives (weights.py and
tokenizer.py are shared), so the same weights load to the same model, logits and token ids:

- `params.json` -> `LlamaConfig` (`config_from_params`). Meta's files hold no RoPE scaling numbers, only
  `use_scaled_rope`; Meta's code scales with the llama3 rule from an 8192-token original context, low/high
  frequency factors 1 and 4, and a factor that differs by release: 8 for Llama 3.1, 32 for Llama 3.2 1B/3B.
  A file that names the factor (`rope_scaling_factor`, llama-models' spelling) wins; otherwise the factor
  comes from the one thing that tells the two releases apart in the files themselves: every Llama 3.2 text
  model ties its output head to the embedding and every Llama 3.1 model has a head of its own.
- The weights (`MetaCheckpoint.entries`): Meta's names become the model's (`tok_embeddings` ->
  `model.embed_tokens`, `layers.N.attention.wq` -> `model.layers.N.self_attn.q_proj`, ...), and wq/wk go from
  Meta's rotary layout (each head's dimensions in interleaved pairs, rotated as complex numbers) to the
  rotate-half layout the model uses (first half, second half): the same permutation transformers'
  `convert_llama_weights_to_hf.py` applies. Each shard is opened with `torch.load(mmap=True)`, and each
  tensor is converted on its own as the model is filled, so memory holds one copy of the weights plus the
  tensor in hand. Model-parallel shards are joined along the dimension Meta's code split them: wq, wk, wv,
  w1, w3 and output are column-parallel (dim 0), wo and w2 row-parallel (dim 1), the embedding
  vocab-parallel in Llama 3 (dim 0; Llama 2 split its width, dim 1: told apart by the shapes), and the
  norms are the same in every shard.
- `tokenizer.model`: tiktoken's ranks file, read by ranks.py (tokenizer.py loads it from such a folder).
"""

from __future__ import annotations

import json
import math
import mmap
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import LlamaConfig, RopeScaling
from .errors import CheckpointError

PARAMS = "params.json"
TOKENIZER_MODEL = "tokenizer.model"
SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")

# Meta's llama3 rope scaling (llama-models' apply_scaling): everything but the factor is fixed there.
ORIGINAL_CONTEXT = 8192
LOW_FREQ_FACTOR = 1.0
HIGH_FREQ_FACTOR = 4.0
FACTOR_LLAMA31 = 8.0
FACTOR_LLAMA32 = 32.0

def is_meta_dir(path: Path) -> bool:
    """A folder in Meta's layout: params.json and no config.json (a folder with both is read as HF)."""
    return (path / PARAMS).is_file() and not (path / "config.json").is_file()


# --- params.json --------------------------------------------------------------------------------------------

def read_params(path: Path) -> dict[str, Any]:
    file = path / PARAMS
    try:
        params = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if isinstance(params, dict) and isinstance(params.get("model"), dict):
        params = params["model"]  # some exports nest the model's arguments
    if not isinstance(params, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return params


def ffn_width(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden width exactly as Meta's FeedForward computes it from `4 * dim`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def config_from_params(params: dict[str, Any], *, vocab_size: int | None, tied: bool,
                       dtype: torch.dtype | None = None, embedding: str = "the checkpoint's embedding") -> LlamaConfig:
    """The `LlamaConfig` of a params.json. `vocab_size`: the embedding's rows (used when the file gives
    none, and checked against it otherwise); `tied`: the checkpoint has no output head of its own."""
    def field(key: str, default: Any = None, *, required: bool = False) -> Any:
        if key not in params or params[key] is None:
            if required:
                raise CheckpointError(f"params.json: required field {key!r} is missing")
            return default
        return params[key]

    def positive_int(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"params.json: {key} must be a positive integer, got {value!r}")
        return value

    def positive_number(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise CheckpointError(f"params.json: {key} must be a positive number, got {value!r}")
        return float(value)

    for key in ("vision_chunk_size", "vision_num_cross_attention_layers", "vision_model"):
        if key in params and params[key] not in (None, -1):
            raise CheckpointError(f"params.json: {key!r} marks a Llama 3.2 Vision checkpoint; only text models load")
    if params.get("quantization_args"):
        raise CheckpointError("params.json: 'quantization_args' marks one of Meta's int4 (QAT/SpinQuant) "
                              "checkpoints, which do not load; use the bfloat16 release")
    if params.get("lora_args"):
        raise CheckpointError("params.json: 'lora_args' marks a checkpoint with LoRA layers merged in Meta's "
                              "format, which does not load; use the bfloat16 release")

    dim = positive_int("dim", field("dim", required=True))
    n_layers = positive_int("n_layers", field("n_layers", required=True))
    n_heads = positive_int("n_heads", field("n_heads", required=True))
    n_kv_heads = positive_int("n_kv_heads", field("n_kv_heads", n_heads))
    if dim % n_heads:
        raise CheckpointError(f"params.json: dim {dim} is not divisible by n_heads {n_heads}")
    if n_heads % n_kv_heads:
        raise CheckpointError(f"params.json: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    head_dim = dim // n_heads
    if head_dim % 2:
        raise CheckpointError(f"params.json: dim / n_heads = {head_dim} must be even for RoPE")
    multiple_of = positive_int("multiple_of", field("multiple_of", 256))
    multiplier = field("ffn_dim_multiplier")
    if multiplier is not None:
        multiplier = positive_number("ffn_dim_multiplier", multiplier)
    norm_eps = positive_number("norm_eps", field("norm_eps", 1e-5))
    rope_theta = positive_number("rope_theta", field("rope_theta", 500000.0))  # llama3 ModelArgs' default

    file_vocab = field("vocab_size", -1)  # Llama 2's params.json says -1 (read from the tokenizer)
    if isinstance(file_vocab, int) and not isinstance(file_vocab, bool) and file_vocab <= 0:
        file_vocab = None
    if file_vocab is None:
        if vocab_size is None:
            raise CheckpointError("params.json: vocab_size is not given and there is no embedding to read it from")
        file_vocab = vocab_size
    file_vocab = positive_int("vocab_size", file_vocab)
    if vocab_size is not None and vocab_size != file_vocab:
        raise CheckpointError(f"params.json: vocab_size {file_vocab} does not match {embedding} ({vocab_size} rows)")

    use_scaled = field("use_scaled_rope", False)
    if not isinstance(use_scaled, bool):
        raise CheckpointError(f"params.json: use_scaled_rope must be true or false, got {use_scaled!r}")
    scaling = None
    if use_scaled:
        default_factor = FACTOR_LLAMA32 if tied else FACTOR_LLAMA31
        factor = positive_number("rope_scaling_factor", field("rope_scaling_factor", default_factor))
        high = positive_number("rope_high_freq_factor", field("rope_high_freq_factor", HIGH_FREQ_FACTOR))
        if high <= LOW_FREQ_FACTOR:
            raise CheckpointError(f"params.json: rope_high_freq_factor must be above {LOW_FREQ_FACTOR}, got {high}")
        scaling = RopeScaling(factor=factor, low_freq_factor=LOW_FREQ_FACTOR, high_freq_factor=high,
                              original_max_position_embeddings=ORIGINAL_CONTEXT)
    # The context each release supports (transformers' converter writes the same): 128k with scaled RoPE
    # (3.1, 3.2), 8192 for Llama 3, 4096 for Llama 2 (RoPE base 10000).
    context = 131072 if use_scaled else 8192 if rope_theta > 10000.0 else 4096
    llama3 = file_vocab >= 128256
    return LlamaConfig(
        vocab_size=file_vocab,
        hidden_size=dim,
        intermediate_size=ffn_width(dim, multiple_of, multiplier),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=context,
        rms_norm_eps=norm_eps,
        rope_theta=rope_theta,
        rope_scaling=scaling,
        tie_word_embeddings=tied,
        bos_token_id=128000 if llama3 else None,
        eos_token_id=(128001, 128008, 128009) if llama3 else (),  # Meta's stop tokens, by id
        torch_dtype=dtype,
        extra=dict(params),
    )


# --- consolidated.NN.pth ------------------------------------------------------------------------------------

# Meta's name -> (the model's name, how model-parallel shards split it)
_LAYER_NAMES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", "column"),
    "attention.wk.weight": ("self_attn.k_proj.weight", "column"),
    "attention.wv.weight": ("self_attn.v_proj.weight", "column"),
    "attention.wo.weight": ("self_attn.o_proj.weight", "row"),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", "column"),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", "row"),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", "column"),
    "attention_norm.weight": ("input_layernorm.weight", "replicated"),
    "ffn_norm.weight": ("post_attention_layernorm.weight", "replicated"),
}
_TOP_NAMES = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "embedding"),
    "norm.weight": ("model.norm.weight", "replicated"),
    "output.weight": ("lm_head.weight", "column"),
}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_IGNORED = ("rope.freqs",)  # Llama 2's checkpoints carry their RoPE table; it is derived from the config
EMBED = "tok_embeddings.weight"
OUTPUT = "output.weight"


def model_name(meta_name: str) -> tuple[str, str] | None:
    """(the model's name, split kind) of one of Meta's tensor names, or None for a name Meta never writes."""
    if meta_name in _TOP_NAMES:
        return _TOP_NAMES[meta_name]
    m = _LAYER_KEY.match(meta_name)
    if m and m.group(2) in _LAYER_NAMES:
        name, split = _LAYER_NAMES[m.group(2)]
        return f"model.layers.{m.group(1)}.{name}", split
    return None


def shard_files(path: Path) -> list[Path]:
    """`consolidated.00.pth`, `consolidated.01.pth`, ... in order; a gap in the numbers is a missing shard."""
    found = {}
    for f in path.iterdir():
        m = SHARD_PATTERN.match(f.name)
        if m and f.is_file():
            found[int(m.group(1))] = f
    if not found:
        others = sorted(f.name for f in path.glob("*.pth"))
        hint = f" (found {', '.join(others)})" if others else ""
        raise CheckpointError(f"{path}: params.json but no consolidated.00.pth{hint}; Meta's layout needs "
                              "params.json, consolidated.NN.pth and tokenizer.model")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        width = len(next(iter(found.values())).name.split(".")[1])
        names = ", ".join(f"consolidated.{i:0{width}d}.pth" for i in missing)
        raise CheckpointError(f"{path}: model-parallel shard(s) missing: {names} "
                              f"(found {len(found)} of {max(found) + 1})")
    return [found[i] for i in range(len(found))]


def _load_shard(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        # torch raises RuntimeError (not a zip / legacy format), pickle.UnpicklingError (weights_only refused
        # an object), EOFError or zip errors (truncated); none of them should reach the caller raw.
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # training checkpoints wrap the weights
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{file}: expected a dict of tensors (Meta's consolidated.NN.pth)")
    return state


class MetaCheckpoint:
    """The shards of a Meta-layout folder, memory-mapped, with its config; `entries()` feeds `load_model`."""

    def __init__(self, path: Path):
        self.path = path
        params = read_params(path)
        self.files = shard_files(path)
        self.shards = [_load_shard(f) for f in self.files]
        self._mapped = _file_mappings(self.files)  # where the shards' pages are, for _drop_pages
        names = set(self.shards[0])
        for file, shard in zip(self.files[1:], self.shards[1:]):
            if set(shard) != names:
                diff = sorted(names ^ set(shard))
                raise CheckpointError(f"{file.name}: holds other tensors than {self.files[0].name} "
                                      f"(e.g. {diff[0]!r}); the shards are not from one checkpoint")
        if EMBED not in names:
            raise CheckpointError(f"{self.files[0]}: no {EMBED!r} tensor; not one of Meta's Llama checkpoints")
        embeds = [s[EMBED] for s in self.shards]
        if any(e.dim() != 2 for e in embeds):
            raise CheckpointError(f"{self.files[0].name}: {EMBED!r} is not a matrix")
        self.embed_dim = self._embedding_split(params)
        vocab = sum(e.shape[0] for e in embeds) if self.embed_dim == 0 else embeds[0].shape[0]
        self.tied = OUTPUT not in names or self._output_is_embedding()
        dtype = embeds[0].dtype
        if not dtype.is_floating_point:
            raise CheckpointError(f"{self.files[0].name}: {EMBED!r} has dtype {dtype}, not a floating-point type")
        n = len(self.shards)
        self.config = config_from_params(params, vocab_size=vocab, tied=self.tied, dtype=dtype,
                                         embedding="the checkpoint's embedding" if n == 1 else
                                         f"the embedding of {n} shards (is one missing?)")

    def _embedding_split(self, params: dict) -> int:
        """The dimension the shards split the embedding along: 0 (Llama 3's vocab-parallel embedding) or 1
        (Llama 2's, split along its width). One shard: 0. Told apart by the shapes, which differ."""
        if len(self.shards) == 1:
            return 0
        shapes = {tuple(s[EMBED].shape) for s in self.shards}
        dim = params.get("dim")
        if len(shapes) == 1:
            (rows, cols), = shapes
            if cols == dim:
                return 0
            if cols * len(self.shards) == dim:
                return 1
        raise CheckpointError(f"{self.path}: the shards' {EMBED!r} shapes {sorted(shapes)} split neither the "
                              f"vocabulary nor the width dim={dim} of params.json")

    def _output_is_embedding(self) -> bool:
        """Whether the checkpoint's output head is its embedding (a tied model saved with both)."""
        out = [s[OUTPUT] for s in self.shards]
        emb = [s[EMBED] for s in self.shards]
        if self.embed_dim != 0:
            out, emb = [torch.cat(out, 0)], [torch.cat(emb, 1)]
        for o, e in zip(out, emb):
            if o.shape != e.shape or o.dtype != e.dtype:
                return False
            same_memory = (o.untyped_storage().data_ptr() == e.untyped_storage().data_ptr()
                           and o.storage_offset() == e.storage_offset() and o.stride() == e.stride())
            if not same_memory:
                equal = torch.equal(o, e)
                _drop_pages(o, self._mapped)
                _drop_pages(e, self._mapped)
                if not equal:
                    return False
        return True

    def _split_dim(self, split: str, meta_name: str) -> int | None:
        if split == "column":
            return 0
        if split == "row":
            return 1
        if split == "embedding":
            return self.embed_dim
        return None  # replicated

    def entries(self) -> Iterator["TensorEntry"]:
        from .weights import TensorEntry

        cfg = self.config
        n = len(self.shards)
        label = self.files[0].name if n == 1 else f"consolidated.*.pth ({n} shards)"
        for meta_name in self.shards[0]:
            if meta_name.endswith(_IGNORED):
                continue
            if self.tied and meta_name == OUTPUT:
                continue
            where = f"{label}: tensor {meta_name!r}"  # for this function's own messages
            mapped_name = model_name(meta_name)
            if mapped_name is None:
                raise CheckpointError(f"{where} is not one of Meta's Llama tensor names")
            key, split = mapped_name
            parts = [s[meta_name] for s in self.shards]
            if any(p.dim() != parts[0].dim() for p in parts) or not parts[0].is_floating_point():
                raise CheckpointError(f"{where} is not a floating-point tensor of the same rank in every shard")
            dim = self._split_dim(split, meta_name)
            shape = list(parts[0].shape)
            if dim is None or n == 1:
                if any(p.shape != parts[0].shape for p in parts):
                    raise CheckpointError(f"{where} has different shapes in the shards, which must replicate it")
            else:
                if parts[0].dim() != 2 or any(p.shape[1 - dim] != parts[0].shape[1 - dim] for p in parts):
                    raise CheckpointError(f"{where}: the shards' pieces {[list(p.shape) for p in parts]} do not "
                                          f"join along dimension {dim}")
                shape[dim] = sum(p.shape[dim] for p in parts)
            heads = (cfg.num_attention_heads if meta_name.endswith("attention.wq.weight")
                     else cfg.num_key_value_heads if meta_name.endswith("attention.wk.weight") else None)
            yield TensorEntry(key=key, shape=tuple(shape), where=label, name=meta_name,
                              read=_reader(parts, dim, heads, cfg.head_dim, shape),
                              owned=(dim is not None and n > 1) or heads is not None,
                              mapped=(lambda p=parts[0]: p) if n == 1 else (lambda: None))
            for part in parts:  # converted by now: its file pages need not stay in this process
                _drop_pages(part, self._mapped)


def _file_mappings(files: list[Path]) -> list[tuple[int, int]]:
    """The address ranges this process maps the shard files at, from /proc/self/maps (Linux), where the file
    was saved little-endian like this machine (else torch.load may have byte-swapped pages in place, which
    dropping would undo); empty elsewhere, which turns `_drop_pages` off."""
    if sys.byteorder != "little":
        return []
    names = set()
    for f in files:
        try:
            with zipfile.ZipFile(f) as z:
                order = [n for n in z.namelist() if n.endswith("/byteorder")]
                if order and z.read(order[0]).strip() != b"little":
                    return []
        except (OSError, zipfile.BadZipFile):
            return []
        names.add(str(f.resolve()))
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in names and fields[1].endswith("p"):  # a private mapping of a shard
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _drop_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Tell the kernel this process is done with the file pages under `t` (madvise MADV_DONTNEED), so a load
    does not keep a second copy of the weights resident as mapped file pages. They stay in the page cache; a
    later read (a mapped embedding's lookups) faults them back in from the file, unchanged, since nothing
    writes to the mapping. Only pages inside `mapped` (the shard files' private mappings) are ever dropped,
    so memory of the process's own is never touched. Linux only; elsewhere a no-op."""
    global _madvise
    if not mapped or t.numel() == 0:
        return
    if _madvise is None:
        try:
            import ctypes
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first = (start + page - 1) // page * page  # whole pages only: a neighbour's partial page stays
    last = end // page * page
    if last > first and any(lo <= first and last <= hi for lo, hi in mapped):
        _madvise(first, last - first, 4)  # MADV_DONTNEED


_madvise = None


def _reader(parts: list[torch.Tensor], dim: int | None, heads: int | None, head_dim: int,
            shape: list[int]) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        t = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim)
        if heads is not None:
            if shape[0] != heads * head_dim:
                return t  # wrong shape: load_model reports it against the config before using it
            t = to_rotate_half(t, heads)
        return t
    return read


def to_rotate_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """A q/k projection [heads * head_dim, in] from Meta's rotary layout, where each head's output dimensions
    come in (real, imaginary) pairs (0,1), (2,3)... to the rotate-half layout, where pair i is (i, i + head_dim/2):
    within each head, the even rows first, then the odd ones (transformers' converter's `permute`)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_rotate_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `to_rotate_half`: a model's q/k projection back in Meta's rotary layout."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
