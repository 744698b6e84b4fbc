"""`llama32.load` and the `Llama` handle it returns: model + tokenizer + config, on one device and dtype."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch

from .config import LlamaConfig
from .constrain import Grammars
from .engine import GenerationLoop
from .engine.scheduler import check_budget, position_bytes
from .engine.speculative import Speculator
from .errors import CheckpointError
from .generate import generate
from .hub import resolve
from .lora import apply_to_handle
from .lora import projections as lora_projections
from .malloc import keep_freed_memory
from .meta import MetaCheckpoint, is_meta_dir
from .openmp import on_own_thread
from .tokenizer import Tokenizer
from .weights import load_model

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} is not supported (float32, bfloat16 or float16)")
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of float32, bfloat16, float16") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Llama:
    """A loaded checkpoint: `.model` (a torch.nn.Module), `.tokenizer`, `.config`, `.generate(**request)`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer | None, config: LlamaConfig, *, path: Path,
                 device: torch.device, dtype: torch.dtype, max_batch: int | None = None,
                 kv_cache_bytes: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.path = path
        self.device = device
        self.dtype = dtype
        self.lora: str | None = None  # the adapter applied to this handle by load(..., lora=...)
        self.speculative: str | None = None  # load(..., speculative=...): "ngram", the draft's path, or None
        self._adapters: dict[str, Any] = {}  # loaded LoRA adapters, by resolved path
        self._default_adapter: Any = None  # the adapter of load(..., lora=...), used when a request names none
        self._installed_adapter: Any = None  # what the model's projections carry right now
        # the projections a LoRA adapter may change, by module name (lora.py reads them)
        self.lora_projections = lora_projections(model)
        self._grammars: Any = None  # JSON mode's grammar compiler and cache (`grammars`), made on first use
        self._grammars_lock = threading.Lock()
        # The one generation loop that serves every request on this handle (its thread starts on first use).
        self.loop = GenerationLoop(self, max_batch=max_batch, kv_cache_bytes=kv_cache_bytes)

    # The compile state lives in the loop's runner (engine/runner.py); these read and write it.
    @property
    def compiled(self) -> bool:
        """Whether decode steps run through torch.compile (on CUDA by default, unless LLAMA32_COMPILE=0)."""
        return self.loop.runner.compiled

    @compiled.setter
    def compiled(self, value: bool) -> None:
        self.loop.runner.compiled = bool(value)

    @property
    def compiled_shapes(self) -> dict[tuple[int, int], float]:
        """(rows, positions attended) -> seconds its first call took (compiling), for each compiled shape."""
        return self.loop.runner.compiled_shapes

    @property
    def _compiled_step(self) -> Any:
        return self.loop.runner.step_fn

    @_compiled_step.setter
    def _compiled_step(self, fn: Any) -> None:
        self.loop.runner.step_fn = fn

    @property
    def grammars(self) -> Any:
        """JSON mode's `constrain.Grammars` for this handle's tokenizer (built on first use: it reads the whole
        vocabulary)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self)
            return self._grammars

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def stop_ids(self) -> frozenset[int]:
        own = self.tokenizer.stop_ids if self.tokenizer is not None else frozenset()
        return own | frozenset(self.config.eos_token_id)

    def generate(self, **request: Any):
        return generate(self, **request)

    def __repr__(self) -> str:
        return f"Llama({str(self.path)!r}, device={self.device}, dtype={self.dtype})"


def load(source: str | os.PathLike, *, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, lora: str | None = None, quantize: str | None = None,
         max_batch: int | None = None, kv_cache_bytes: int | None = None,
         speculative: str | os.PathLike | None = None) -> Llama:
    """Load a Llama-family checkpoint from a local directory (Hugging Face layout, or Meta's original layout:
    params.json + consolidated.NN.pth + tokenizer.model, see meta.py) or a hub repo id.

    `max_batch`: the most requests the handle's generation loop decodes together (default 8 on CPU, 32 on
    CUDA); `kv_cache_bytes`: the loop's KV-cache budget (default 1 GiB on CPU, 4 GiB on CUDA; see engine/loop.py).
    A checkpoint without tokenizer.json (or Meta's tokenizer.model) loads model-only: `llm.tokenizer` is None.
    `quantize="int8"`: weight-only int8 for every projection and the head (quant.py), quantized while loading.
    `speculative`: None, "ngram" (prompt lookup) or a draft checkpoint (path or hub repo id of a smaller model
    with the same tokenizer, loaded on the same device and dtype): the generation loop then verifies proposed
    tokens several at a time (engine/speculative/). It changes speed, not the tokens: greedy and seeded results
    are token for token those without it in float32, and in bfloat16 on CPUs whose bfloat16 products give a
    row the same bits whatever the row count (the AVX-512 BF16 EPYC measured; elsewhere an answer may part from
    the plain one at a near tie). docs/API.md, "Speculative decoding".

    On the CPU the work is done on a short-lived thread of its own, so that the caller's thread keeps no OpenMP
    pool to slow the generation loop's (openmp.py), and glibc's malloc is told to keep freed memory for reuse
    (malloc.py; `LLAMA32_MALLOC=default` leaves it as it is).
    """
    args = dict(device=device, dtype=dtype, lora=lora, quantize=quantize, max_batch=max_batch,
                kv_cache_bytes=kv_cache_bytes, speculative=speculative)
    try:
        on_cpu = (torch.device(device) if device is not None else default_device()).type == "cpu"
    except (RuntimeError, TypeError):  # a bad device: `_load` names it
        on_cpu = False
    if on_cpu:
        keep_freed_memory()
    # (not on CUDA: a thread's current CUDA device is its own, and "cuda" means the caller's)
    return on_own_thread(_load, source, **args) if on_cpu else _load(source, **args)


def _load(source: str | os.PathLike, *, device, dtype, lora, quantize, max_batch, kv_cache_bytes,
          speculative) -> Llama:
    for name, value in (("max_batch", max_batch), ("kv_cache_bytes", kv_cache_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use device='cpu'")
    draft_path = _speculative_source(speculative)  # before the (slow) load: a bad value fails at once
    path = resolve(source)
    if is_meta_dir(path):  # Meta's own layout: params.json, consolidated.NN.pth, tokenizer.model (meta.py)
        checkpoint = MetaCheckpoint(path)
        config, entries, config_name = checkpoint.config, checkpoint.entries(), "params.json"
    else:
        config = LlamaConfig.from_file(path / "config.json")
        checkpoint, entries, config_name = None, None, "the config"
    dtype = parse_dtype(dtype) or config.torch_dtype or torch.float32
    if kv_cache_bytes is not None:  # refused before the weights are read (engine/loop.py checks it again)
        check_budget(kv_cache_bytes, position_bytes(config, dtype), 2 * config.num_hidden_layers)
    tokenizer = Tokenizer.from_dir(path) if Tokenizer.present(path) else None
    # LLAMA32_CPU_PACK=0 keeps plain dense weights on CPU (slower decoding; needed to torch.compile on CPU);
    # LLAMA32_STEP_ATTENTION=masked keeps decode steps on the masked kernel, =written off the fused one where it
    # would verify (an AMX CPU) (model.choose_step_attention)
    steps = os.environ.get("LLAMA32_STEP_ATTENTION", "fused")
    if steps not in ("fused", "written", "masked"):
        raise ValueError(f"LLAMA32_STEP_ATTENTION must be 'fused', 'written' or 'masked', got {steps!r}")
    # LLAMA32_SPAN_ATTENTION=written keeps prompt spans off the fused kernel where it would verify (an AMX CPU)
    spans = os.environ.get("LLAMA32_SPAN_ATTENTION", "fused")
    if spans not in ("fused", "written"):
        raise ValueError(f"LLAMA32_SPAN_ATTENTION must be 'fused' or 'written', got {spans!r}")
    model = load_model(path, config, device=device, dtype=dtype, pack=os.environ.get("LLAMA32_CPU_PACK", "1") != "0",
                       quantize=quantize, entries=entries, config_name=config_name,
                       written_steps=steps != "masked", fused_spans=spans == "fused", fused_steps=steps == "fused")
    del checkpoint, entries  # the shards' mappings go with them (a packed tied embedding keeps its own view)
    llm = Llama(model, tokenizer, config, path=path, device=device, dtype=dtype, max_batch=max_batch,
                kv_cache_bytes=kv_cache_bytes)
    if lora is not None:
        apply_to_handle(llm, lora)
    if speculative is not None:
        _attach_speculator(llm, draft_path, quantize)
    if llm.compiled:  # CUDA: the decode step's graphs compile now, in the background (engine/runner.py)
        llm.loop.runner.warm_up()
    return llm


def _speculative_source(speculative: Any) -> Path | str | None:
    """`load`'s `speculative`, checked: None, "ngram", or the local directory of a draft checkpoint (a hub repo
    id is downloaded first). Anything else raises an error naming `speculative`."""
    if speculative is None:
        return None
    if not isinstance(speculative, (str, os.PathLike)):
        raise ValueError(f"speculative must be None, 'ngram' or a draft checkpoint (a directory or a hub repo id), "
                         f"got {speculative!r}")
    if isinstance(speculative, str) and speculative == "ngram":
        return "ngram"
    try:
        draft = resolve(speculative)
    except CheckpointError as e:
        raise CheckpointError(f"speculative: {e} (speculative takes 'ngram' or a draft checkpoint)") from None
    if not (is_meta_dir(draft) or (draft / "config.json").is_file()):
        raise CheckpointError(f"speculative: {draft} is not a checkpoint: it has no config.json (nor Meta's "
                              "params.json); give 'ngram' or a draft model's checkpoint directory")
    return draft


def _attach_speculator(llm: Llama, draft_path: Path | str, quantize: str | None) -> None:
    """Give the handle's generation loop its `Speculator`, loading and checking the draft model if any."""
    if draft_path == "ngram":
        llm.loop.speculator = Speculator(llm, "ngram")
        llm.speculative = "ngram"
        return
    if Path(draft_path).resolve() == Path(llm.path).resolve():
        draft = llm  # the model drafting for itself: one copy of the weights
    else:
        try:
            draft = load(draft_path, device=llm.device, dtype=llm.dtype, quantize=quantize)
        except CheckpointError as e:
            raise CheckpointError(f"speculative: the draft checkpoint cannot be loaded: {e}") from None
    if draft.tokenizer is None or llm.tokenizer is None:
        which = "draft" if draft.tokenizer is None else "model"
        raise CheckpointError(f"speculative: the {which} checkpoint has no tokenizer, so the draft's vocabulary "
                              "cannot be checked against the model's; a draft must share the model's tokenizer")
    ours, theirs = (t.backend.get_vocab(with_added_tokens=True) for t in (llm.tokenizer, draft.tokenizer))
    if ours != theirs:
        differ = len(set(ours.items()) ^ set(theirs.items()))
        raise CheckpointError(f"speculative: the draft {draft_path} has another tokenizer than the model "
                              f"({len(theirs)} tokens against {len(ours)}, {differ} (text, id) pairs not shared); "
                              "a draft must use the model's own tokenizer")
    llm.loop.speculator = Speculator(llm, str(draft_path), draft)
    llm.speculative = str(draft_path)
