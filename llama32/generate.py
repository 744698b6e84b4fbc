"""`generate()`: a Workers AI request body in, a Workers AI result (or stream of chunks) out.

Pipeline: validate the whole request (`requests.py`) → prompt ids → prefill into a KV cache sized to the
request → decode one token per step with the sampler → text, tool calls and usage. `generate_batch` runs
the same loop with many rows in one forward per step; `generate` is that loop with one row, so the two
agree by construction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from . import lora as lora_mod
from .api import Llama
from .errors import InvalidRequest
from .model import KVCache
from .output import Output
from .requests import Request, validate
from .sampling import SamplerState, exponential_noise, make_generator, sample

def generate(llm: Llama, **request: Any) -> dict | Iterator[dict]:
    """Run one request. Returns the result dict, or an iterator of chunks when `stream=True`.

    The request is validated in full before this returns, streaming or not.
    """
    req = validate(llm, request)
    if req.stream:
        return _stream(llm, req)
    return _collect(_stream(llm, req))


def generate_batch(llm: Llama, requests: list[dict]) -> list[dict]:
    """Run many requests, batched: one forward per step for all rows that share an adapter.

    Results equal calling `generate` on each request (each row keeps its own parameters, seed and stop).
    """
    if not isinstance(requests, (list, tuple)):
        raise InvalidRequest(f"requests must be a list of request dicts, got {type(requests).__name__}")
    reqs = []
    for i, r in enumerate(requests):
        if not isinstance(r, dict):
            raise InvalidRequest(f"requests[{i}] must be a dict, got {type(r).__name__}")
        try:
            req = validate(llm, r)
        except InvalidRequest as e:
            raise InvalidRequest(f"requests[{i}]: {e}") from None
        if req.stream:
            raise InvalidRequest(f"requests[{i}].stream: streaming is not available in generate_batch")
        reqs.append(req)
    results: list[dict | None] = [None] * len(reqs)
    groups: dict[Any, list[int]] = {}
    for i, req in enumerate(reqs):
        groups.setdefault(req.adapter_key, []).append(i)
    for rows in groups.values():
        outputs = [Output(llm, reqs[i]) for i in rows]
        for row, token, done in _decode([reqs[i] for i in rows], llm):
            outputs[row].push(token, done)
        for i, out in zip(rows, outputs):
            results[i] = _collect(out.chunks())
    return results  # type: ignore[return-value]


def to_sse(chunks: Iterable[dict] | dict) -> Iterator[str]:
    """Server-Sent Events text: `data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`."""
    if isinstance(chunks, dict):
        chunks = [chunks]
    for chunk in chunks:
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


def _stream(llm: Llama, req: Request) -> Iterator[dict]:
    out = Output(llm, req)
    for _, token, done in _decode([req], llm):
        out.push(token, done)
        yield from out.chunks()


def _collect(chunks: Iterable[dict]) -> dict:
    text, last = [], {}
    for chunk in chunks:
        text.append(chunk["response"])
        last = chunk
    return {"response": "".join(text), "tool_calls": last.get("tool_calls", []), "usage": last["usage"]}


def decode_step(model: torch.nn.Module, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                state: SamplerState, noise: torch.Tensor | None) -> torch.Tensor:
    """One decode step for every live row: forward at each row's position, then the sampler.

    This is the unit that is compiled (`Llama.compiled`): static shapes for a given batch and cache size,
    no host sync, the sampler inside; the per-request random noise is drawn outside and passed in.
    """
    logits = model(tokens[:, None], cache=cache, input_pos=pos)[:, -1]
    return sample(logits, state, noise)


def _step_function(llm: Llama):
    if not llm.compiled:
        return decode_step
    if llm._compiled_step is None:
        if any(p.is_mkldnn for p in llm.model.parameters()):
            raise RuntimeError("the compiled decode step needs dense weights: on CPU, load with LLAMA32_CPU_PACK=0")
        # CUDA: "reduce-overhead" records each shape's step as a CUDA graph, replayed every token. Each batch
        # size a shrinking batch passes through is a shape of its own, so allow more than dynamo's default.
        mode = "reduce-overhead" if llm.device.type == "cuda" else None
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        llm._compiled_step = torch.compile(decode_step, mode=mode, dynamic=False)
    return llm._compiled_step


def _cache_for(llm: Llama, batch: int, length: int) -> KVCache:
    """A KV cache for this request. The compiled path reuses one per (batch, length), the length rounded up
    to a power of two (at least 256), so that few shapes are ever compiled and a graph compiled (and
    CUDA-graph-recorded) for one serves later requests at the same addresses. Caches of one length are
    kept for every batch size a shrinking batch passes through; a request of another length drops them."""
    if not llm.compiled:
        return KVCache(llm.config, batch, length, device=llm.device, dtype=llm.dtype)
    length = min(max(256, 1 << (length - 1).bit_length()), llm.context_length)
    if any(n != length for _, n in llm._cache_pool):
        llm._cache_pool.clear()  # a cache can be large
    cache = llm._cache_pool.get((batch, length))
    if cache is None:
        cache = llm._cache_pool[(batch, length)] = KVCache(llm.config, batch, length, device=llm.device,
                                                           dtype=llm.dtype)
        # The step writes into the cache in place: a CUDA graph may do so only into inputs marked static
        # (others would be copied in and out at every replay, or keep the step from being recorded at all).
        torch._dynamo.mark_static_address(cache.k)
        torch._dynamo.mark_static_address(cache.v)
    return cache


class _Readback:
    """Tokens on their way to the host. On CUDA, an asynchronous copy into pinned memory that is waited for
    only when read, so a step launched after it can already run while the host reads these tokens."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.copied = tokens, None
        if tokens.device.type == "cuda":
            self.tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.tokens.copy_(tokens, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()

    def tolist(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.tokens.tolist()


def _batch_size(live: int, compiled: bool) -> int:
    """The batch a decode step runs with `live` unfinished rows: exactly those, or on the compiled path
    the next power of two, so a shrinking batch passes through few compiled shapes (each one a compile)."""
    return live if not compiled else 1 << (live - 1).bit_length()


@torch.inference_mode()
def _decode(reqs: list[Request], llm: Llama) -> Iterator[tuple[int, int, bool]]:
    """The generation loop for a batch of rows: yields (row, token, finished) as tokens are drawn.

    Rows sit at their own positions in one KV cache (right-padded prefill, per-row decode positions), so
    prompts of different lengths need no left padding. Rows that finish leave the batch: at once, or on the
    compiled path when the batch can halve (until then they ride along, their tokens ignored).
    With `llm.lookahead` (CUDA), each step is launched before the previous step's tokens are read, so the
    device never waits for the host; a step computed for rows that turn out to have finished is dropped.
    """
    model, device, stop_ids = llm.model, llm.device, llm.stop_ids
    lens = [len(r.prompt_ids) for r in reqs]
    cache = _cache_for(llm, len(reqs), max(n + r.max_tokens for n, r in zip(lens, reqs)))
    prompt = torch.zeros(len(reqs), max(lens), dtype=torch.long)
    for i, r in enumerate(reqs):
        prompt[i, : lens[i]] = torch.tensor(r.prompt_ids)
    generators = [None if r.params.greedy else make_generator(r.seed, device) for r in reqs]
    state = SamplerState([r.params for r in reqs], [r.prompt_ids for r in reqs], llm.config.vocab_size,
                         device, generators)
    step = _step_function(llm)
    last = torch.tensor(lens, device=device) - 1

    def advance(tokens, pos, cache, state):
        """Launch one decode step; returns the next tokens (on the device, not yet read)."""
        noise = None if state.all_greedy else exponential_noise(state.generators, state.vocab_size, device)
        shape = (len(tokens), cache.length)
        first_call = llm.compiled and shape not in llm.compiled_shapes  # compiles: timed, reported apart
        started = time.perf_counter() if first_call else 0.0
        with lora_mod.active(llm, reqs[0].adapter):
            tokens = step(model, tokens, pos, cache, state, noise)
        if llm.compiled:
            tokens = tokens.clone()  # a CUDA graph's output buffer is overwritten by its next replay
        if first_call:
            llm.compiled_shapes[shape] = time.perf_counter() - started
        return tokens

    with lora_mod.active(llm, reqs[0].adapter):
        tokens = sample(model(prompt.to(device), cache=cache, logits_at=last)[:, -1], state)
    rows: list[int | None] = list(range(len(reqs)))  # original index of each batch row; None once finished
    produced = [0] * len(reqs)
    pos = last[:, None] + 1  # (B, 1): where each row's next token goes
    while True:
        state.update(tokens)
        drawn = _Readback(tokens)
        if llm.lookahead:
            following = advance(tokens, pos, cache, state)
        finished = []
        for i, token in enumerate(drawn.tolist()):
            row = rows[i]
            if row is None:
                continue
            produced[row] += 1
            done = token in stop_ids or produced[row] >= reqs[row].max_tokens
            yield row, token, done
            if done:
                rows[i] = None
                finished.append(i)
        live = [i for i, row in enumerate(rows) if row is not None]
        if not live:
            return
        if llm.lookahead:  # the step already launched is the one that carries on
            tokens, pos = following, pos + 1
        if finished:
            # A finished row that stays writes from position 0 of its own cache row again, which keeps it
            # inside the cache for as long as any row can still run.
            pos = pos.index_fill(0, torch.tensor(finished, device=device), 0)
        size = _batch_size(len(live), llm.compiled)
        if size < len(rows):  # finished rows stop costing work
            keep = live + [i for i, row in enumerate(rows) if row is None][: size - len(live)]
            idx = torch.tensor(keep, device=device)
            cache = cache.select(idx, out=_cache_for(llm, size, cache.length) if llm.compiled else None)
            state = state.select(idx)
            tokens, pos = tokens[idx], pos[idx]
            rows = [rows[i] for i in keep]
        if not llm.lookahead:
            tokens = advance(tokens, pos, cache, state)
            pos = pos + 1
