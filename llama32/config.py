"""Model configuration, parsed from a Hugging Face `config.json`.

Field names mirror `config.json` (see transformers' `LlamaConfig`) so a reader can hold the two side by
side. Both spellings of the RoPE settings are accepted: `rope_theta` + `rope_scaling` (transformers 4.x,
Meta's published files) and `rope_parameters` (transformers 5.x `save_pretrained`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's frequency-dependent RoPE scaling ("llama3" rope type); all four numbers from the config."""

    factor: float  # how much longer the context is than in pre-training (8 for 3.1, 32 for 3.2)
    low_freq_factor: float  # wavelengths beyond original_ctx / low_freq_factor are divided by `factor`
    high_freq_factor: float  # wavelengths below original_ctx / high_freq_factor are kept as they are
    original_max_position_embeddings: int  # the pre-training context the bands are measured against


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int  # rows of the embedding and the output head
    hidden_size: int  # model width D
    intermediate_size: int  # SwiGLU hidden width
    num_hidden_layers: int  # L transformer blocks
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (< query heads: grouped-query attention)
    head_dim: int  # per-head width; hidden_size // num_attention_heads unless given
    max_position_embeddings: int  # the longest context the model supports
    rms_norm_eps: float = 1e-5  # epsilon inside every RMSNorm
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: RopeScaling | None = None  # None: plain RoPE (Llama 2 style)
    tie_word_embeddings: bool = False  # output head shares the embedding matrix (Llama 3.2 1B/3B)
    attention_bias: bool = False  # q/k/v/o projections carry a bias
    mlp_bias: bool = False  # gate/up/down projections carry a bias
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()  # every id that ends generation
    torch_dtype: torch.dtype | None = None  # the checkpoint's own dtype
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the raw config

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        def need(key: str) -> Any:
            if key not in d:
                raise CheckpointError(f"config.json: required field {key!r} is missing")
            return d[key]

        def positive_int(key: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise CheckpointError(f"config.json: {key} must be a positive integer, got {value!r}")
            return value

        model_type = d.get("model_type", "llama")
        if model_type not in ("llama", None):
            raise CheckpointError(f"config.json: model_type {model_type!r} is not a Llama-family model")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"config.json: hidden_act {act!r} is not supported (Llama uses 'silu')")

        hidden = positive_int("hidden_size", need("hidden_size"))
        heads = positive_int("num_attention_heads", need("num_attention_heads"))
        kv_heads = positive_int("num_key_value_heads", d.get("num_key_value_heads") or heads)
        if d.get("head_dim") is None and hidden % heads:
            raise CheckpointError(
                f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                "and no head_dim is given"
            )
        head_dim = positive_int("head_dim", d.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        if head_dim % 2:
            raise CheckpointError(f"config.json: head_dim {head_dim} must be even for RoPE")

        theta, scaling = _parse_rope(d)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        dtype_name = d.get("torch_dtype") or d.get("dtype")
        if dtype_name is not None and dtype_name not in _DTYPES:
            raise CheckpointError(f"config.json: dtype {dtype_name!r} is not one of {sorted(_DTYPES)}")
        return cls(
            vocab_size=positive_int("vocab_size", need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=positive_int("intermediate_size", need("intermediate_size")),
            num_hidden_layers=positive_int("num_hidden_layers", need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=positive_int(
                "max_position_embeddings", d.get("max_position_embeddings", 2048)
            ),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos_ids,
            torch_dtype=_DTYPES.get(dtype_name) if dtype_name else None,
            extra=dict(d),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: config.json not found (is this a Hugging Face checkpoint directory?)")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_dict(d)


def _parse_rope(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read the RoPE base and scaling from either spelling; anything but default/llama3 is an error."""
    params = d.get("rope_parameters")
    if params is None:
        params = dict(d.get("rope_scaling") or {})
        params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    else:
        params = dict(params)
        params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    theta = float(params["rope_theta"])
    if not (theta > 0 and math.isfinite(theta)):
        raise CheckpointError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(
            f"config.json: rope type {rope_type!r} is not supported (only 'llama3' scaling or plain RoPE)"
        )
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise CheckpointError(f"config.json: llama3 rope scaling is missing {e.args[0]!r}") from None
    if scaling.factor <= 0 or scaling.original_max_position_embeddings <= 0:
        raise CheckpointError("config.json: llama3 rope scaling needs a positive factor and original context")
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise CheckpointError("config.json: llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return theta, scaling
