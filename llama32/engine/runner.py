"""The runner: every forward the loop makes, and the compiled decode step.

Three forwards, all over the rows' cache (memory.py's `Rows`), each row at its own positions:
* `prefill`: a span of one row's prompt (or a resumed row's context, or a text being scored) written at
  its positions, attending over the positions before it; the output head only where asked (a prompt's last
  position, or the positions whose log-probabilities `score` returns);
* `decode`: one token for each of rows [0, n), then the sampler with each row's settings (`StepKnobs`),
  seed (counter noise) and LoRA adapter.
Two forms of the decode step, one sampler: `decode_step`, the readable eager reference (the sampler skips,
from Python, the steps no row uses), and `static_decode_step`, the one run through torch.compile when
`compiled` is on (on CUDA by default): rows [0, n) for n a power of two, every sampler step always run,
LoRA through `GatheredAdapters`. Both draw with `counter_noise`, so a seed gives the same tokens eager or
compiled, alone or batched.

Compiling: torch.compile specialises a graph to the sizes it first sees and, when a size changes, compiles once
more with that size symbolic (`dynamic=None`), so the step's sizes (rows, positions attended, the cache's
rows and length) need four graphs in all, not one per combination: the first shape, a second with every size
changed (all symbolic after it), and two for one row (a size of 1 is always specialised: `warm_shapes`).
On CUDA each costs 25-38 s for the 1B (measured on an H200, benchmarks/RESULTS.md), so `load` compiles them at
once, in the background (`warm_up`), on a scratch cache of their shapes; until that is done decode steps run
eagerly, and afterwards no shape meets the compiler while serving (a JSON mask or LoRA adapters, which change
the step's inputs, compile their variant on first sight). Each new size of a CUDA graph is then only recorded (~0.05 s).

The runner owns the compile state (the compiled function, which shapes have compiled and how long each
took; the handle's `compiled`, `compiled_shapes` and `_compiled_step` read and write it) and the stacked
LoRA adapters the compiled step gathers from. The adapters themselves (loaded by name, least recently used
out) stay with the handle: requests resolve them on their callers' threads.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor

from ..lora import GatheredAdapters, RowAdapters
from ..model import KVCache, Segments, causal_spans, keep_address
from ..sampling import SamplingParams, StepKnobs, sample_static
from .memory import Rows
from .scheduler import _pow2

MAX_TOP_LOGPROBS = 20  # the contract's top_logprobs range is 0..20; the compiled step always computes 20
_MIN_ATTENDED = 16  # the fewest cache positions a step attends over (rounded up to powers of two from here)


def attended_for(length: int, end: int, floor: int = _MIN_ATTENDED) -> int:
    """Positions a forward attends over when its furthest position is `end - 1`: a power of two (so the
    compiled step meets few shapes), at least `floor` (the rows' `floor`: model.py's `attention_floor`), at
    most the cache's length."""
    return min(length, max(_MIN_ATTENDED, floor, _pow2(end)))


class Runner:
    """The forwards of one handle's loop, and its compiled decode step (see the module docstring)."""

    def __init__(self, llm: Any):
        self._llm = weakref.ref(llm)  # the handle owns the loop, which owns the runner
        # The decode step runs through torch.compile (CUDA graphs) on CUDA unless LLAMA32_COMPILE=0.
        self.compiled = llm.device.type == "cuda" and os.environ.get("LLAMA32_COMPILE", "1") != "0"
        self.compiled_shapes: dict[tuple[int, int], float] = {}  # (rows, positions attended) -> compile seconds
        self.step_fn: Any = None  # the compiled static_decode_step, made on first use
        self._warming: threading.Thread | None = None  # `warm_up`'s thread while it compiles
        # (rows, cache rows, cache length, positions attended) -> seconds, for each step `warm_up` ran. The loop
        # thread's own first call at a shape still counts as first sight in `compiled_shapes` (a failure there
        # falls back to eager): CUDA graphs are recorded per thread, so the loop records its own.
        self.warmed: dict[tuple[int, int, int, int], float] = {}
        # (ids of the loaded adapters, their GatheredAdapters stacks): the compiled step's LoRA input (lora.py)
        self.adapter_stacks: tuple | None = None
        self._warned = False
        # On the CPU every prompt span attends over the rows' cache, never over its own fresh keys alone: a span
        # from position 0 with the causal kernel (`model.causal_attention`, where `model.causal_spans`), any
        # other under a mask (`model.masked_attention`), the two padded alike so that they give a position the
        # same bits. The causal kernel over the fresh keys alone rounds otherwise (a short last key block), which
        # flipped SmolLM2's greedy answer in bfloat16 to a request sent with others (benchmarks/RESULTS.md). So a
        # position's bits do not depend on how its prompt is chunked, grouped with others' or padded, and a
        # request's result is the one it has alone. (In bfloat16 where decode steps attend written out, the spans
        # do too, whatever `causal` says: `model.written_span_attention`.) On CUDA the fresh-key causal (flash)
        # kernel is kept.
        self.one_attention = llm.device.type == "cpu"
        self.causal_spans = causal_spans(llm.device, llm.dtype)

    @property
    def llm(self) -> Any:
        return self._llm()

    # -- prompt spans ------------------------------------------------------------------------------------

    def prefill(self, rows: Rows, slot: int, ids: list[int], start: int, adapter: Any,
                logits_at: list[int], per_position: bool = False) -> Tensor:
        """Write `ids` at positions [start, start + len(ids)) of row `slot` (attending over everything
        before), and return the logits (P, V) at the span's indices `logits_at` (P may be 0). `per_position`
        (start > 0): attention one position at a time, as decode steps attend (the model's option, as
        speculative decoding's verify uses it), for a resumed row's drawn positions."""
        llm = self.llm
        end = start + len(ids)
        chunk = torch.tensor([ids], device=llm.device)
        at = torch.tensor([logits_at], dtype=torch.long, device=llm.device)
        lora = RowAdapters.of(llm, [adapter])
        if start == 0 and not self.one_attention:  # from position 0: the plain causal prefill
            cache = rows.cache.view(slice(slot, slot + 1))
            return llm.model(chunk, cache=cache, logits_at=at, lora=lora)[0]
        cache = rows.cache.view(slice(slot, slot + 1), attended_for(rows.length, end, rows.floor))
        pos = torch.arange(start, end, device=llm.device)[None]
        return llm.model(chunk, cache=cache, input_pos=pos, logits_at=at, lora=lora,
                         causal=start == 0 and self.causal_spans and not per_position,
                         per_position=per_position)[0]

    def prefill_rows(self, rows: Rows, spans: dict[int, tuple[list[int], int, Any]]) -> dict[int, Tensor]:
        """Several rows' spans: `spans` maps a slot to (ids, start, adapter); each row's ids go at its own
        positions [start, start + len(ids)), attending over its positions before. Returns each slot's logits
        (1, V) at its span's last token.

        One forward per run of consecutive slots (`_prefill_run`): a forward takes a contiguous slice of the
        cache, and a row in that slice without a span would be written too. That row may hold real keys and
        values (a text being scored, prefilled in chunks beside them: issue 34, where its position 0 was
        overwritten with token 0's), so no forward covers a row it is not prefilling."""
        out: dict[int, Tensor] = {}
        run: list[int] = []
        for slot in sorted(spans):
            if run and slot != run[-1] + 1:
                out.update(self._prefill_run(rows, {s: spans[s] for s in run}))
                run = []
            run.append(slot)
        out.update(self._prefill_run(rows, {s: spans[s] for s in run}))
        return out

    def _prefill_run(self, rows: Rows, spans: dict[int, tuple[list[int], int, Any]]) -> dict[int, Tensor]:
        """`prefill_rows` for consecutive slots, in one forward; a shorter span is padded with its next
        position (where its first decode step writes anyway)."""
        llm = self.llm
        lo, hi = min(spans), max(spans) + 1
        assert hi - lo == len(spans), "a forward covers only the rows it prefills"
        T = max(len(ids) for ids, _, _ in spans.values())
        ids = torch.zeros(hi - lo, T, dtype=torch.long)
        pos = torch.zeros(hi - lo, T, dtype=torch.long)
        last = torch.zeros(hi - lo, dtype=torch.long)
        adapters: list[Any] = [None] * (hi - lo)
        for slot, (span, start, adapter) in spans.items():
            r, n = slot - lo, len(span)
            ids[r, :n] = torch.tensor(span)
            pos[r, :n] = torch.arange(start, start + n)
            pos[r, n:] = start + n
            last[r], adapters[r] = n - 1, adapter
        end = max(start + len(span) for span, start, _ in spans.values()) + 1
        cache = rows.cache.view(slice(lo, hi), attended_for(rows.length, end, rows.floor))
        # every span from position 0, on the CPU: `model.causal_attention` (the masked attention's bits, less work)
        causal = self.causal_spans and all(start == 0 for _, start, _ in spans.values())
        logits = llm.model(ids.to(llm.device), cache=cache, input_pos=pos.to(llm.device),
                           logits_at=last.to(llm.device), lora=RowAdapters.of(llm, adapters), causal=causal)
        return {slot: logits[slot - lo] for slot in spans}

    def prefill_packed(self, rows: Rows, spans: list[tuple[int, list[int], int, bool]],
                       adapter: Any) -> dict[int, Tensor]:
        """Several rows' prompt spans in one forward, their tokens one after another in one row (the model's
        `segments`), where `packs` says it may: `spans` lists (slot, ids, start, draw), each row's ids going at
        its positions [start, start + len(ids)) and attending over its positions before, all with `adapter`.
        Returns the logits (1, V) at the last token of each span that draws. Each position gets the bits a
        forward of its own span gives it (`prefill`)."""
        llm = self.llm
        ids, pos, parts, at, drawing = [], [], [], [], []
        for slot, span, start, draw in spans:
            parts.append((slot, len(ids), len(ids) + len(span)))
            ids += span
            pos += range(start, start + len(span))
            if draw:
                at.append(len(ids) - 1)
                drawing.append(slot)
        end = max(start + len(span) for _, span, start, _ in spans)
        cache = rows.cache.view(slice(0, rows.batch), attended_for(rows.length, end, rows.floor))
        device = llm.device
        logits = llm.model(torch.tensor([ids], device=device), cache=cache,
                           input_pos=torch.tensor([pos], device=device),
                           logits_at=torch.tensor([at], dtype=torch.long, device=device),
                           lora=RowAdapters.of(llm, [adapter]), segments=Segments(parts, device))[0]
        return {slot: logits[i:i + 1] for i, slot in enumerate(drawing)}

    @property
    def packs(self) -> bool:
        """Whether prompt spans of several rows may share one forward (`prefill_packed`): on the CPU where
        prompt spans attend written out or through the fused kernel (`model.span_attention`), whose calls are
        per row of the cache anyway."""
        return self.one_attention and self.llm.model.span_attention != "kernel"

    def verify(self, rows: Rows, n: int, batch: Any, per_position: Any) -> Tensor:
        """Speculative decoding's verify forward over rows [0, n), fed `batch` (engine/batch.py's `StepBatch`):
        the logits at every position fed, (n, T, V) (`per_position`: the model's per-position head option)."""
        llm = self.llm
        cache = rows.cache.view(slice(0, n), batch.attended)
        return llm.model(batch.tokens.to(llm.device), cache=cache, input_pos=batch.pos.to(llm.device),
                         lora=RowAdapters.of(llm, batch.adapters), per_position=per_position)

    # -- decode steps ------------------------------------------------------------------------------------

    def decode(self, rows: Rows, knobs: StepKnobs, n: int, tokens: Tensor, pos: Tensor, attended: int,
               allowed: Tensor | None, adapters: list[Any], steps: frozenset[str], logprobs: int | None):
        """One decode step for rows [0, n) of `rows`, sampled with rows [0, n) of `knobs`: (tokens, logprob,
        top) as `token_logprobs`."""
        llm = self.llm
        if self.compiled and not self.warming:
            return self._compiled(rows, knobs, tokens, pos, attended, allowed, GatheredAdapters.of(llm, adapters))
        cache = rows.cache.view(slice(0, n), attended)
        return decode_step(llm.model, tokens, pos, cache, knobs.view(0, n), steps, allowed,
                           RowAdapters.of(llm, adapters), logprobs)

    @property
    def decode_floor(self) -> int | None:
        """The fewest positions a decode step attends over: the rows' own (`Rows.floor`, None here) eagerly; 1
        for the compiled step (CUDA's: its shapes stay CUDA's on the CPU too)."""
        return 1 if self.compiled else None

    def rows_for(self, last: int, batch: int) -> int:
        """How many rows a step over slots [0, last] runs: all of them eagerly, a power of two compiled."""
        return min(_pow2(last + 1), batch) if self.compiled else last + 1

    def _compiled(self, rows: Rows, knobs: StepKnobs, tokens: Tensor, pos: Tensor, attended: int,
                  allowed: Tensor | None, lora: GatheredAdapters | None):
        """`static_decode_step` through torch.compile (graphs with symbolic sizes: the module docstring), per set
        of loaded adapters, whatever the requests' settings. If compiling fails: warn once, run it eagerly."""
        args = (self.llm.model, tokens, pos, rows.cache.k, rows.cache.v, attended, knobs, allowed, lora)
        shape = (tokens.shape[0], attended)
        started = time.perf_counter()
        try:
            out = self._step()(*args)
        except Exception as e:  # noqa: BLE001
            # Compiling a shape happens before its graph runs, so a failure on a new shape left the cache and
            # the sampler's history untouched: answer eagerly (once more, safely), say so once. An error at a
            # shape that compiled before, or out of memory, is a runtime error: it fails this step's requests.
            if shape in self.compiled_shapes or isinstance(e, (torch.OutOfMemoryError, MemoryError)):
                raise
            self._compile_failed(e)
            return static_decode_step(*args)
        if shape not in self.compiled_shapes:
            self.compiled_shapes[shape] = time.perf_counter() - started
        return out

    # -- compiling ahead of time --------------------------------------------------------------------------

    @property
    def warming(self) -> bool:
        """Whether `warm_up` is still compiling (decode steps run eagerly meanwhile)."""
        thread = self._warming
        return thread is not None and thread.is_alive()

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Wait for `warm_up`'s thread to end (True when it has)."""
        thread = self._warming
        if thread is not None:
            thread.join(timeout)
        return not self.warming

    def warm_shapes(self) -> list[tuple[int, int, int, int]]:
        """What `warm_up` runs the step at, as (rows, cache rows, cache length, positions attended). After the
        first, the second changes every size (to values unlike each other: equal sizes would share a symbol
        and be guarded equal), so the rows, the cache's rows and length and the positions attended are all
        symbolic from then on; one row is always specialised, so the third and fourth give it the same with
        the cache's rows at 1 and above 1. Later shapes run one of these graphs."""
        llm = self.llm
        capacity, longest = llm.loop.capacity, llm.context_length
        first, second = min(256, longest), min(512, longest)
        shapes = [(1, 1, first, attended_for(first, 1)), (1, 1, second, attended_for(second, 17))]
        if capacity >= 2:
            shapes.insert(1, (2, min(4, capacity), second, attended_for(second, 17)))
            shapes.append((1, 2, second, attended_for(second, 17)))
        return shapes

    def warm_up(self, background: bool = True) -> None:
        """Compile the decode step's graphs now rather than on the first requests that need them: a step on a
        scratch cache (freed after) at each of `warm_shapes`, its seconds in `warmed`. `background`:
        on a thread of its own, decode steps running eagerly until it ends. Nothing to do unless `compiled`."""
        if not self.compiled or self.warming:
            return
        if not background:
            self._warm()
            return
        self._warming = threading.Thread(target=self._warm, name="llama32-compile", daemon=True)
        self._warming.start()

    def _warm(self) -> None:
        llm = self.llm
        if llm is None:
            return
        try:
            for rows, batch, length, attended in self.warm_shapes():
                # made as the loop makes its rows (outside inference mode: a tensor's dispatch keys are guarded)
                scratch = Rows(llm, llm.loop.capacity, length, batch)
                knobs = StepKnobs(llm.loop.capacity, llm.config.vocab_size, llm.device)
                keep_address(list(knobs.tensors().values()))
                for r in range(rows):
                    knobs.set_row(r, SamplingParams(temperature=0), seed=0, prompt_ids=[0])
                started = time.perf_counter()
                with torch.inference_mode():  # as the loop's thread makes its inputs and runs its steps
                    tokens, pos = (torch.zeros(rows, dtype=torch.long, device=llm.device) for _ in range(2))
                    # the adapters input the loop passes (the stacks of the adapters loaded now, if any)
                    lora = GatheredAdapters.of(llm, [None] * rows)
                    args = (llm.model, tokens, pos, scratch.cache.k, scratch.cache.v, attended, knobs, None, lora)
                    self._step()(*args)
                if llm.device.type == "cuda":
                    torch.cuda.synchronize(llm.device)
                self.warmed[(rows, batch, length, attended)] = time.perf_counter() - started
                del scratch, knobs, args, tokens, pos, lora
        except Exception as e:  # noqa: BLE001 - a compile failure: eager from now on, as on first sight
            self._compile_failed(e)

    def _step(self):
        llm = self.llm
        if self.step_fn is None:
            if any(p.is_mkldnn for p in llm.model.parameters()):
                raise RuntimeError("the compiled decode step needs dense weights: on CPU, load with LLAMA32_CPU_PACK=0")
            # CUDA: "reduce-overhead" records each shape's step as a CUDA graph, replayed every token.
            mode = "reduce-overhead" if llm.device.type == "cuda" else None
            # At most one graph per (rows, positions attended) (fewer once sizes are symbolic): raise dynamo's
            # limit (8) above the number of such shapes, or the step would silently run eagerly past it.
            shapes = llm.loop.capacity.bit_length() * (llm.context_length.bit_length() + 1)
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, 2 * shapes)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * shapes)
            # dynamic=None: a size seen to change becomes symbolic in the next graph (module docstring)
            self.step_fn = torch.compile(static_decode_step, mode=mode, dynamic=None)
        return self.step_fn

    def _compile_failed(self, error: Exception) -> None:
        if not self._warned:
            warnings.warn(f"llama32: compiling the decode step failed ({type(error).__name__}: {error}); "
                          "running eagerly from now on", RuntimeWarning, stacklevel=2)
            self._warned = True
        self.compiled = False


def token_logprobs(logits: Tensor, tokens: Tensor, k: int | None) -> tuple[Tensor | None, tuple[Tensor, Tensor] | None]:
    """The model's own log-probabilities (float32 log_softmax of the raw logits, before any penalty or
    temperature) of the drawn `tokens`, and the `k` most likely (ids, values); (None, None) when k is None."""
    if k is None:
        return None, None
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    values, ids = logp.topk(max(k, 1), dim=-1)
    return chosen, (ids, values)


def decode_step(model: torch.nn.Module, tokens: Tensor, pos: Tensor, cache: KVCache, knobs: StepKnobs,
                steps: frozenset[str], allowed: Tensor | None, lora: RowAdapters | None, logprobs: int | None):
    """One decode step for rows [0, B): forward at each row's position, then the sampler over rows [0, B) of
    `knobs`, running only `steps` (the eager reference; `static_decode_step` is the compiled form). Returns
    (tokens, logprob, top) as `token_logprobs`."""
    logits = model(tokens[:, None], cache=cache, input_pos=pos[:, None], lora=lora, per_position=True)[:, -1]
    drawn = sample_static(logits, knobs, allowed, steps)
    knobs.update(drawn)
    return (drawn, *token_logprobs(logits, drawn, logprobs))


def static_decode_step(model: torch.nn.Module, tokens: Tensor, pos: Tensor, k: list[Tensor], v: list[Tensor],
                       attended: int, knobs: StepKnobs, allowed: Tensor | None, lora: GatheredAdapters | None):
    """`decode_step` in the form that is compiled: rows [0, n) of the cache tensors `k`, `v` (each layer's,
    whole) over their first `attended` positions, every sampler step run (neutral where a row leaves it off),
    `allowed` the allowed-token mask or None, and always the top `MAX_TOP_LOGPROBS` log-probabilities.
    Shapes depend only on (n, attended), whether a mask is given and the loaded adapters; nothing reads a
    tensor back to the host, and the cache and the knobs are written in place. Returns (tokens, logprob,
    (top ids, top values))."""
    n = tokens.shape[0]
    cache = KVCache.over(k, v).view(slice(0, n), attended)
    logits = model(tokens[:, None], cache=cache, input_pos=pos[:, None], lora=lora, per_position=True)[:, -1]
    drawn = sample_static(logits, knobs, allowed)
    knobs.update(drawn)
    return (drawn, *token_logprobs(logits, drawn, MAX_TOP_LOGPROBS))
