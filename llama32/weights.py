"""Checkpoint loading: safetensors (single file or sharded index), or Meta's layout (meta.py), into a `Transformer`.

The model is built on the meta device and the checkpoint's tensors are assigned into it one by one, cast
to the requested dtype on the way, so peak memory stays about one copy of the weights. Every key and shape
is checked against the model before anything is assigned. Both layouts reach the model through the same
`TensorEntry` stream (`safetensors_entries` here, `MetaCheckpoint.entries` in meta.py) and the same strict
`load_state_dict`, packing and int8 quantization.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from .config import LlamaConfig
from .errors import CheckpointError
from .model import Transformer, can_pack_for_cpu, choose_cpu_path, choose_step_attention, pack_linear_weight
from .quant import is_quantized, quantize_int8

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}

# Keys some exporters write that carry nothing the model needs (RoPE tables are derived from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, shards in index order."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
        return files
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pth")):
        raise CheckpointError(f"{path}: only safetensors checkpoints are supported (found .bin/.pth files)")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found")


def _data_layout(file: Path) -> tuple[int, dict]:
    """The byte offset where tensor data starts, and the header's per-tensor entries."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _read_tensor(fh, base: int, entry: dict, name: str) -> torch.Tensor:
    """One tensor read into memory of its own.

    Plain reads rather than safetensors' memory map: a mapped tensor keeps the whole file mapped, and every
    page it touched counted against the process, for as long as any one tensor (the embedding, say) lives.
    """
    dtype = _ST_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(f"{name} has dtype {entry['dtype']}, not a floating-point type")
    start, end = entry["data_offsets"]
    t = torch.empty(entry["shape"], dtype=dtype)
    if t.numel():
        fh.seek(base + start)
        if fh.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - start:
            raise CheckpointError(f"{name} is truncated")
    return t


def _map_tensor(fh, base: int, entry: dict) -> torch.Tensor | None:
    """The tensor as a view of the checkpoint file's pages (a private, copy-on-write mapping; nothing is
    ever written), or None where its bytes are not aligned for its dtype. Only the rows that are read
    become resident."""
    dtype = _ST_DTYPES[entry["dtype"]]
    start, end = entry["data_offsets"]
    if (base + start) % dtype.itemsize or end == start:
        return None
    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapped, dtype=dtype, count=(end - start) // dtype.itemsize,
                            offset=base + start).view(entry["shape"])


@dataclass
class TensorEntry:
    """One tensor of a checkpoint, under the model's name, known by its shape before it is read."""

    key: str  # the model's state-dict name
    shape: tuple[int, ...]
    where: str  # for messages: the file (or files) it comes from
    read: Callable[[], torch.Tensor]  # the tensor (any floating dtype), converted to the model's layout
    name: str = ""  # its name in that file, when not `key` (Meta's names)
    owned: bool = True  # read() returns memory of its own (False: it may be a view of a mapped file)
    mapped: Callable[[], torch.Tensor | None] = field(default=lambda: None)  # a view of the file's pages, or None


def safetensors_entries(path: Path) -> Iterator[TensorEntry]:
    """The tensors of an HF-layout checkpoint directory, file by file."""
    for file in checkpoint_files(path):
        try:
            # safe_open checks the header and layout; the bytes are then read into memory of their own
            # (all but a packed model's tied embedding, see load_model)
            with safe_open(str(file), framework="pt", device="cpu") as f, open(file, "rb") as fh:
                base, entries = _data_layout(file)
                for key in f.keys():
                    yield TensorEntry(
                        key=key, shape=tuple(f.get_slice(key).get_shape()), where=file.name,
                        read=lambda fh=fh, entry=entries[key], name=f"{file.name}: tensor {key!r}":
                            _read_tensor(fh, base, entry, name),
                        mapped=lambda fh=fh, entry=entries[key]: _map_tensor(fh, base, entry))
        except SafetensorError as e:
            raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{file}: cannot read ({e})") from None


def load_model(path: str | Path, config: LlamaConfig, *, device: torch.device | str,
               dtype: torch.dtype, pack: bool = True, quantize: str | None = None,
               entries: Iterator[TensorEntry] | None = None, config_name: str = "the config",
               written_steps: bool = True, fused_spans: bool = True, fused_steps: bool = True) -> Transformer:
    """Build the model for `config` and fill it from the checkpoint at `path` (strict).

    `entries`: the checkpoint's tensors (default: the safetensors files at `path`; meta.py gives Meta's
    layout); `config_name` names where `config` came from in shape errors.
    `pack`: on CPU, store the projection weights prepacked for oneDNN (see `pack_for_cpu`). A packed head
    cannot serve embedding lookups, so a tied checkpoint then gets a packed head and an embedding mapped
    from the checkpoint file: lookups touch a few rows per step, and memory stays about one copy of the
    weights. (That one tensor does follow the file: overwrite the checkpoint in place and lookups change.)
    `written_steps`: let decode steps attend written out where a check verifies it (`choose_step_attention`);
    `fused_spans`, `fused_steps`: let prompt spans and decode steps then take PyTorch's fused kernel where it
    verifies (else written out).
    """
    path = Path(path)
    packing = pack and can_pack_for_cpu(device, dtype)
    embed_key = "model.embed_tokens.weight"
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # filled by the tie below; a tied checkpoint may still carry it

    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (int8 weight, scale)
    for entry in (safetensors_entries(path) if entries is None else entries):
        key = entry.key
        what = f"tensor {key!r}" if entry.name in ("", key) else f"tensor {entry.name!r} ({key})"
        if key.endswith(_IGNORED_SUFFIXES) or (key == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if key not in expected:
            raise CheckpointError(f"{entry.where}: unexpected {what} (not part of this config's model)")
        if entry.shape != expected[key]:
            raise CheckpointError(
                f"{entry.where}: {what} has shape {list(entry.shape)}, {config_name} needs {list(expected[key])}"
            )
        if key in state or key in quantized:
            raise CheckpointError(f"{entry.where}: {what} appears in more than one file")
        tensor = entry.read()
        if quantize and is_quantized(key):
            quantized[key] = tuple(t.to(device) for t in quantize_int8(tensor, dtype))
            continue
        converted = tensor.to(device=device, dtype=dtype)
        if not entry.owned and converted.data_ptr() == tensor.data_ptr():
            converted = converted.clone()  # memory of its own, not pages of the checkpoint file
        state[key] = converted
        del tensor, converted
        if key == embed_key and quantize and config.tie_word_embeddings:
            quantized["lm_head.weight"] = tuple(t.to(device) for t in quantize_int8(state[key], dtype))
        elif key == embed_key and packing and config.tie_word_embeddings:
            # pack the head now, while little else is in memory, then drop the dense copy
            mapped = entry.mapped()
            if mapped is not None:
                state["lm_head.weight"] = pack_linear_weight(state[key])
                state[key] = mapped

    missing = sorted(set(expected) - set(state) - set(quantized))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: checkpoint is missing tensor(s) {shown}")

    tied = config.tie_word_embeddings and "lm_head.weight" not in state and "lm_head.weight" not in quantized
    if tied:
        state["lm_head.weight"] = state[embed_key]
    result = model.load_state_dict(state, strict=not quantized, assign=True)
    assert not quantized or set(result.missing_keys) == set(quantized) and not result.unexpected_keys, result
    for key, (q, scale) in quantized.items():
        module = model.get_submodule(key.removesuffix(".weight"))
        module.weight = torch.nn.Parameter(q, requires_grad=False)
        module.register_buffer("weight_scale", scale)
    del state  # the model holds the only reference now, so packing below frees each dense weight
    if tied:
        model.tie_weights()  # one Parameter object, not two sharing storage
    model.reset_rope(device)
    model.eval().requires_grad_(False)
    model.cpu_path = choose_cpu_path(model, device, dtype, packing)
    choose_step_attention(model, device, dtype, written_steps, fused_spans, fused_steps)
    return model
