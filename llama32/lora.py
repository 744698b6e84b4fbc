"""LoRA adapters in PEFT's on-disk format, applied unmerged to the model's projections.

An adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`, as written by PEFT's
`save_pretrained` (the format follows PEFT's `LoraConfig` and `lora.Linear`). It is named by path, or by
name as `weights/loras/<name>/` (`hub.weights_dir()`). Each adapted projection W [out, in] gets

    y = W x + scale * B (A x),    A [r, in], B [out, r],    scale = lora_alpha / r  (or / sqrt(r): rsLoRA)

computed beside the base weight (`model.Linear.adapter`), never merged into it: switching adapters per
request is a handful of attribute assignments and the base weights stay bit-identical.

Supported: targets among q/k/v/o/gate/up/down_proj (a list, a regex, or "all-linear"), `use_rslora`,
`rank_pattern` / `alpha_pattern`, tensor keys with or without an adapter name (`lora_A.default.weight`).
Refused, with a message that starts with `lora` and says why: DoRA and the other LoRA variants, biases,
`modules_to_save`, other target modules, and tensors whose rank or shape does not fit the base model.
Every check runs before an adapter is cached or applied.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .errors import InvalidRequest
from .hub import weights_dir
from .model import Linear, keep_address
from .openmp import on_own_thread

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# LoraConfig fields that change what the adapter computes beyond plain `scale * B A x` (or add weights
# that are not A/B pairs). Any of them set to something truthy is refused.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora: true) is not supported, only plain LoRA",
    "lora_bias": "lora_bias: true (a bias on lora_B) is not supported",
    "modules_to_save": "modules_to_save (fully fine-tuned copies of whole modules) is not supported",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported",
    "layer_replication": "layer_replication (a model with repeated layers) is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QALoRA (use_qalora: true) is not supported",
    "velora_config": "the VeLoRA variant (velora_config) is not supported",
    "monteclora_config": "the MonteCLoRA variant (monteclora_config) is not supported",
    "use_bdlora": "the block-diagonal LoRA variant (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "the KaSA variant (kasa_config) is not supported",
}

# `base_model.model.<module>.lora_A[.<adapter name>].weight`; the adapter name appears in state dicts taken
# from a live PeftModel (`.default.`), while `save_pretrained` strips it.
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


_SERIALS = itertools.count(1)  # `Adapter.serial`: next() on a count is atomic under the GIL


@dataclass(eq=False)
class Adapter:
    """A loaded, validated LoRA adapter, on the handle's device and in its dtype.

    `modules` maps a module name (`model.layers.3.self_attn.q_proj`) to exactly the tuple that
    `model.Linear.adapter` takes: `(A [r, in], B [out, r], scale)`. `r` and `scale` are the config's
    defaults; a module matched by `rank_pattern` / `alpha_pattern` carries its own scale in its tuple.
    """

    name: str  # the adapter's directory name
    path: Path  # the resolved adapter directory (also the cache key)
    r: int
    scale: float
    modules: dict[str, tuple[Tensor, Tensor, float]] = field(repr=False)
    # This loaded copy's number, one more than the last load's: what the prefix index and the compiled step's
    # stacks know it by. Not id(): the LRU frees adapters and CPython reuses their addresses (issue 34).
    serial: int = field(default_factory=lambda: next(_SERIALS), repr=False)

    def __repr__(self) -> str:
        return f"Adapter({self.name!r}, r={self.r}, scale={self.scale:g}, modules={len(self.modules)})"


_LOADING = threading.Lock()  # one adapter load at a time, so two threads never load (and cache) it twice
CACHED_ADAPTERS = 8  # adapters kept loaded per handle (`llm.max_adapters` overrides); least recently used out
# An adapter *name* (what a server client may send): one folder name, no separators, no leading dot.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")


def resolve(llm: Any, lora: str, *, name: str | None = None) -> Adapter:
    """The adapter `lora` (a path, or a name under `weights/loras/`), loaded once per handle and cached.

    The cache holds the `llm.max_adapters` (default `CACHED_ADAPTERS`) most recently used adapters; a request
    already holding an evicted one keeps it until it ends. `name`, when given, stands for `lora` in error
    messages (a server shows its clients adapter names, never the paths behind them).
    Loaded adapters are never changed afterwards, so requests on any thread may share them."""
    if not isinstance(lora, str) or not lora.strip():
        raise InvalidRequest(f"lora must be a non-empty adapter name or path, got {lora!r}")
    shown = lora if name is None else name
    path = _locate(lora, shown)
    key = str(path.resolve())
    with _LOADING:
        cached = llm._adapters.pop(key, None)  # re-inserted below: dicts keep insertion order, newest last
        if cached is None:  # on the CPU on a thread of its own, as `load` (openmp.py)
            cached = (on_own_thread(_load, llm, shown, path, name="llama32-adapter")
                      if torch.device(llm.device).type == "cpu" else _load(llm, shown, path))
        llm._adapters[key] = cached
        limit = max(1, getattr(llm, "max_adapters", CACHED_ADAPTERS))
        while len(llm._adapters) > limit:
            llm._adapters.pop(next(iter(llm._adapters)))
    return cached


def named(folder: str | Path, name: Any) -> Path | None:
    """The adapter directory `folder/name` when `name` is a plain folder name (no separator, not `.`/`..`, no
    leading dot) holding both adapter files; else None. What a server resolves a client's `lora` with: the
    answer is the same None whether the name is malformed, a path, or simply not there."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        return None
    where = Path(folder) / name
    if (where / CONFIG_FILE).is_file() and (where / WEIGHTS_FILE).is_file():
        return where
    return None


class RowAdapters:
    """Each row of a batch with its own adapter, or none: what `model.Linear` adds per row.

    Rows are grouped by adapter and each group's `scale * B (A x)` is computed on just its rows and added
    into theirs (the S-LoRA / punica idea in plain PyTorch: one small product per adapter in the batch, not
    one per row). A row's arithmetic is the same as with its adapter alone, and no module is changed, so
    requests with different adapters share one forward from any number of threads.
    """

    def __init__(self, llm: Any, adapters: Sequence[Adapter | None]):
        groups: dict[int, tuple[Adapter, list[int]]] = {}
        for row, adapter in enumerate(adapters):
            if adapter is not None:
                groups.setdefault(id(adapter), (adapter, []))[1].append(row)
        projections = _projections(llm)
        device = llm.device
        # id(linear) -> [(rows, A, B, scale)]; rows None when the group is the whole batch
        self.by_module: dict[int, list[tuple[Tensor | None, Tensor, Tensor, float]]] = {}
        for adapter, rows in groups.values():
            idx = None if len(rows) == len(adapters) else torch.tensor(rows, device=device)
            for name, (a, b, scale) in adapter.modules.items():
                self.by_module.setdefault(id(projections[name]), []).append((idx, a, b, scale))

    @classmethod
    def of(cls, llm: Any, adapters: Sequence[Adapter | None]) -> "RowAdapters | None":
        """None when no row has an adapter (the plain forward then needs nothing)."""
        return cls(llm, adapters) if any(a is not None for a in adapters) else None

    def add(self, linear: Linear, x: Tensor, y: Tensor) -> Tensor:
        """y (the base product of `linear` on x [B, T, in]) plus each row's adapter, if any."""
        for rows, a, b, scale in self.by_module.get(id(linear), ()):
            if rows is None:
                y = y + adapter_term(linear, x, a, b) * scale
            else:
                y = y.index_add(0, rows, adapter_term(linear, x.index_select(0, rows), a, b) * scale)
        return y


def adapter_term(linear: Linear, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """B (A x) for x [..., in], in x's dtype.

    Where `linear`'s own product runs in row tiles (bfloat16 on the CPU: tiles.py), a row's term must not
    depend on how many rows share the product either. The rank-r products are too narrow for the tiles'
    check to see it (r outputs a row: a sum that rounds one way in a call of 3 rows and another in a call of
    1 reaches the bfloat16 result once in a few thousand values), and it happened: bfloat16 LoRA answers sent
    together parted from their solo ones (found by benchmarks/schedule_fuzz.py). So there both products sum
    in float64, in which a bfloat16 product is exact and a sum of a few thousand of them is exact or within
    2^-53 of it, so the order the kernel picks for a row count cannot reach the bfloat16 result; each is rounded
    to the dtype as the plain product would be (A x first, as `F.linear(F.linear(x, a), b)` rounds it)."""
    if linear.tiles is None or torch.compiler.is_compiling():
        return F.linear(F.linear(x, a), b)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], b.shape[0], dtype=x.dtype, device=x.device)
    a64, b64 = a.double(), b.double()
    for start in range(0, rows.shape[0], 256):  # bounded float64 scratch
        part = rows[start:start + 256].double()
        inner = F.linear(part, a64).to(x.dtype).double()
        out[start:start + 256] = F.linear(inner, b64).to(x.dtype)
    return out.reshape(*x.shape[:-1], b.shape[0])


class GatheredAdapters:
    """Every adapter loaded on a handle, stacked per projection, and each row's index into the stacks: the
    compiled step's form of `RowAdapters`.

    Index 0 is "no adapter" (zeros); adapter i has A [r, in] and B [out, r] at i, padded with zeros to the
    largest rank, and its scale. A row's update is `scale[i] * (x A[i]^T) B[i]^T` with A and B gathered by
    its index (punica's batched gather), so the shapes, and the compiled graph, depend only on which adapters
    the handle has loaded, never on which rows use which. A row without an adapter adds exact zeros.
    """

    def __init__(self, stacks: dict[str, tuple[Tensor, Tensor, Tensor]], index: dict[int, int]):
        self.stacks = stacks  # module name -> (A [N+1, r, in], B [N+1, out, r], scale [N+1])
        self.index = index  # adapter.serial -> its position in the stacks
        self.rows: Tensor | None = None  # (n,) this step's rows' indices

    @classmethod
    def of(cls, llm: Any, adapters: Sequence[Adapter | None]) -> "GatheredAdapters | None":
        """The handle's stacks with `adapters[b]` as row b's; None when the handle has loaded no adapter.
        The stacks are kept by the loop's runner (engine/runner.py), remade when the loaded set changes."""
        # the cached adapters, and any a running row holds after the cache dropped it
        loaded = list(dict.fromkeys([*llm._adapters.values(), *(a for a in adapters if a is not None)]))
        if not loaded:
            return None
        key = tuple(a.serial for a in loaded)  # serials, never reused (an id() may name another adapter later)
        runner = llm.loop.runner
        cached = runner.adapter_stacks
        if cached is None or cached[0] != key:
            cached = runner.adapter_stacks = (key, cls._stack(llm, loaded))
        base = cached[1]
        step = cls(base.stacks, base.index)
        step.rows = torch.tensor([0 if a is None else base.index[a.serial] for a in adapters], device=llm.device)
        return step

    @classmethod
    def _stack(cls, llm: Any, loaded: list[Adapter]) -> "GatheredAdapters":
        stacks = {}
        for name, linear in _projections(llm).items():
            parts = [a.modules.get(name) for a in loaded]
            if all(p is None for p in parts):
                continue
            r = max(p[0].shape[0] for p in parts if p is not None)
            w = linear.weight
            a_all = torch.zeros(len(loaded) + 1, r, linear.in_features, device=w.device, dtype=llm.dtype)
            b_all = torch.zeros(len(loaded) + 1, linear.out_features, r, device=w.device, dtype=llm.dtype)
            scale = torch.zeros(len(loaded) + 1, device=w.device, dtype=llm.dtype)
            for i, part in enumerate(parts, start=1):
                if part is not None:
                    a, b, s = part
                    a_all[i, :a.shape[0]] = a
                    b_all[i, :, :b.shape[1]] = b
                    scale[i] = s
            stacks[name] = (a_all, b_all, scale)
            keep_address([a_all, b_all, scale])
        return cls(stacks, {a.serial: i for i, a in enumerate(loaded, start=1)})

    def add(self, linear: Linear, x: Tensor, y: Tensor) -> Tensor:
        """y (the base product of `linear` on x [n, T, in]) plus each row's adapter."""
        stack = self.stacks.get(linear.lora_name)
        if stack is None:
            return y
        a, b, scale = (t[self.rows] for t in stack)
        return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * scale[:, None, None]


def apply_to_handle(llm: Any, lora: str | None) -> None:
    """Make `lora` the handle's own adapter: plain `llm.model(ids)` calls include it from now on.

    `None` removes the handle's adapter again.
    """
    adapter = resolve(llm, lora) if lora is not None else None
    llm._default_adapter = adapter
    llm.lora = lora
    _install(llm, adapter)


def _install(llm: Any, adapter: Adapter | None) -> None:
    modules = adapter.modules if adapter is not None else {}
    for name, linear in _projections(llm).items():
        # object.__setattr__ skips nn.Module.__setattr__'s parameter/buffer/module bookkeeping, which a plain
        # tuple does not need: 112 assignments (Llama 3.2 1B) take ~15 us instead of ~200 us per switch.
        object.__setattr__(linear, "adapter", modules.get(name))
    llm._installed_adapter = adapter


def projections(model: Any) -> dict[str, Linear]:
    """Every adaptable projection of `model` by its module name (the handle keeps them: `lora_projections`),
    each told its name (how GatheredAdapters finds a projection's stacks)."""
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, Linear) and name.rsplit(".", 1)[-1] in TARGETS}
    for name, m in found.items():
        m.lora_name = name
    return found


def _projections(llm: Any) -> dict[str, Linear]:
    return llm.lora_projections


def _locate(lora: str, shown: str) -> Path:
    path = Path(lora).expanduser()
    if path.is_dir():
        where = path
    else:
        named_dir = weights_dir() / "loras" / lora
        # Only a bare name is looked up under weights/loras/; anything with a separator is a path.
        if Path(lora).name == lora and lora not in (".", "..") and named_dir.is_dir():
            where = named_dir
        else:
            looked = f"no directory {str(path)!r}"
            if Path(lora).name == lora:
                looked += f", and no {str(named_dir)!r}"
            raise InvalidRequest(f"lora {shown!r}: no such adapter ({looked})")
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not (where / file).is_file():
            hint = " (only safetensors adapters are supported)" if file == WEIGHTS_FILE and (
                where / "adapter_model.bin").is_file() else ""
            raise InvalidRequest(f"lora {shown!r}: {where if shown == lora else 'the adapter'} has no {file}{hint}")
    return where


def _read_config(lora: str, path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else e  # an OSError's text would name the full path
        raise InvalidRequest(f"lora {lora!r}: cannot parse {CONFIG_FILE} ({why})") from None
    if not isinstance(cfg, dict):
        raise InvalidRequest(f"lora {lora!r}: {CONFIG_FILE} must hold a JSON object")

    def bad(why: str) -> InvalidRequest:
        return InvalidRequest(f"lora {lora!r}: {why}")

    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise bad(f"peft_type {peft_type!r} is not supported, only 'LORA'")
    for key, why in _UNSUPPORTED.items():
        if cfg.get(key):
            raise bad(why)
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise bad(f"bias {bias!r} is not supported, only 'none' (the adapter would change the base biases)")
    # PEFT's defaults where a field is missing.
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise bad(f"r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise bad(f"lora_alpha must be a number, got {alpha!r}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise bad(f"use_rslora must be true or false, got {cfg['use_rslora']!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(name) or {}
        kind = int if name == "rank_pattern" else (int, float)
        if not isinstance(pattern, dict) or not all(
                isinstance(v, kind) and not isinstance(v, bool) and v > 0 for v in pattern.values()):
            what = "positive integers" if name == "rank_pattern" else "positive numbers"
            raise bad(f"{name} must map module-name patterns to {what}, got {pattern!r}")
        for p in pattern:
            _compile(lora, name, p)
        cfg[name] = pattern
    # fan_in_fan_out says the *base* weight is stored [in, out] (GPT-2's Conv1D). lora_A / lora_B are
    # [r, in] / [out, r] either way and PEFT's unmerged forward ignores the flag (it forces it off for
    # nn.Linear targets), so it changes nothing here; the shape checks still apply.
    return cfg


def _compile(lora: str, field_name: str, pattern: Any) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise InvalidRequest(f"lora {lora!r}: {field_name} has an invalid pattern {pattern!r} ({e})") from None


def _targeted(lora: str, cfg: dict[str, Any], llm: Any) -> set[str]:
    """The projections `target_modules` selects, following PEFT's matching; anything else is refused."""
    supported = _projections(llm)
    names = [name for name, _ in llm.model.named_modules() if name]
    target = cfg.get("target_modules")
    if target is None or target == "all-linear":  # all-linear: every Linear but the output head
        selected = set(supported)
    elif isinstance(target, str):  # a regex over full module names
        rx = _compile(lora, "target_modules", target)
        selected = {n for n in names if rx.fullmatch(n)}
        if not selected:
            raise InvalidRequest(f"lora {lora!r}: target_modules {target!r} matches no module of this model")
    elif isinstance(target, list) and all(isinstance(t, str) for t in target):
        selected = set()
        for t in target:  # an entry names a module by its last dotted components
            hits = {n for n in names if n == t or n.endswith("." + t)}
            if not hits:
                raise InvalidRequest(
                    f"lora {lora!r}: target_modules entry {t!r} names no module of this model "
                    f"(supported: {', '.join(TARGETS)})"
                )
            selected |= hits
    else:
        raise InvalidRequest(f"lora {lora!r}: target_modules must be a list of names or a regex, got {target!r}")
    exclude = cfg.get("exclude_modules")
    if isinstance(exclude, str):
        rx = _compile(lora, "exclude_modules", exclude)
        selected = {n for n in selected if not rx.fullmatch(n)}
    elif isinstance(exclude, list):
        selected = {n for n in selected if not any(n == e or n.endswith("." + str(e)) for e in exclude)}
    outside = sorted(selected - set(supported))
    if outside:
        raise InvalidRequest(
            f"lora {lora!r}: target_modules includes {', '.join(outside[:3])}"
            f"{' and more' if len(outside) > 3 else ''}; only {', '.join(TARGETS)} can be adapted"
        )
    layers = cfg.get("layers_to_transform")
    if layers is not None:
        keep = {layers} if isinstance(layers, int) else set(layers) if isinstance(layers, list) else None
        if keep is None:
            raise InvalidRequest(f"lora {lora!r}: layers_to_transform must be an int or a list, got {layers!r}")
        selected = {n for n in selected if (m := _LAYER.match(n)) and int(m.group(1)) in keep}
    return selected


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule (`get_pattern_key`): the first pattern that matches the end of the module name, at a dot.
    for p, value in patterns.items():
        if re.match(rf"(.*\.)?({p})$", module):
            return value
    return default


def _load(llm: Any, lora: str, path: Path) -> Adapter:
    cfg = _read_config(lora, path)
    targeted = _targeted(lora, cfg, llm)
    projections = _projections(llm)
    n_layers = len(llm.model.model.layers)

    def bad(why: str) -> InvalidRequest:
        return InvalidRequest(f"lora {lora!r}: {WEIGHTS_FILE}: {why}")

    file = path / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            # Pass 1: names, pairs and shapes, from the header alone.
            pairs: dict[str, dict[str, str]] = {}
            adapter_names = set()
            for key in f.keys():
                m = _KEY.match(key)
                if m is None:
                    if "lora_magnitude_vector" in key:
                        raise bad(f"tensor {key!r} is a DoRA magnitude; DoRA is not supported")
                    raise bad(f"unexpected tensor {key!r}; expected base_model.model.<module>.lora_A.weight / "
                              "lora_B.weight")
                module, ab = m.group("module"), m.group("ab")
                adapter_names.add(m.group("adapter"))
                if module not in projections:
                    layer = _LAYER.match(module)
                    if layer and int(layer.group(1)) >= n_layers:
                        raise bad(f"{key!r} is for layer {layer.group(1)}, but the model has {n_layers} layers "
                                  f"(0..{n_layers - 1})")
                    raise bad(f"{key!r} adapts {module!r}; only {', '.join(TARGETS)} can be adapted")
                if module not in targeted:
                    raise bad(f"{key!r} adapts {module!r}, which the config does not target "
                              "(target_modules / exclude_modules / layers_to_transform)")
                if ab in pairs.setdefault(module, {}):
                    raise bad(f"{module!r} has more than one lora_{ab} tensor")
                pairs[module][ab] = key
            if len(adapter_names) > 1:
                raise bad(f"tensors of several adapters ({sorted(map(str, adapter_names))}); expected one")
            if not pairs:
                raise bad("no LoRA tensors")

            use_rslora = cfg.get("use_rslora", False)
            shapes: dict[str, tuple[int, float]] = {}
            for module, pair in sorted(pairs.items()):
                if set(pair) != {"A", "B"}:
                    missing = ({"A", "B"} - set(pair)).pop()
                    raise bad(f"{module!r} has no lora_{missing} tensor")
                base = projections[module].weight  # (out, in)
                r = _pattern_value(cfg["rank_pattern"], module, cfg.get("r", 8))
                want = {"A": [r, base.shape[1]], "B": [base.shape[0], r]}
                for ab in "AB":
                    shape = list(f.get_slice(pair[ab]).get_shape())
                    if shape != want[ab]:
                        raise bad(
                            f"{pair[ab]!r} has shape {shape}, but rank {r} on this model's {module} "
                            f"({base.shape[1]} -> {base.shape[0]}) needs {want[ab]}"
                        )
                alpha = _pattern_value(cfg["alpha_pattern"], module, cfg.get("lora_alpha", 8))
                shapes[module] = (r, alpha / math.sqrt(r) if use_rslora else alpha / r)

            # Pass 2: the tensors themselves.
            modules: dict[str, tuple[Tensor, Tensor, float]] = {}
            for module, (r, scale) in shapes.items():
                a, b = (f.get_tensor(pairs[module][ab]) for ab in "AB")
                for ab, t in (("A", a), ("B", b)):
                    if not t.is_floating_point() or not torch.isfinite(t).all():
                        raise bad(f"{pairs[module][ab]!r} is not a finite floating-point tensor")
                modules[module] = (a.to(llm.device, llm.dtype), b.to(llm.device, llm.dtype), float(scale))
    except SafetensorError as e:
        raise bad(f"corrupt or unreadable ({e})") from None
    except OSError as e:
        raise bad(f"cannot read ({e})") from None

    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora", False) else alpha / r
    return Adapter(name=path.resolve().name, path=path.resolve(), r=r, scale=float(scale), modules=modules)
