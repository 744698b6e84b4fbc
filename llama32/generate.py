"""`generate()`, `generate_batch()` and `score()`: thin clients of the handle's generation loop (engine/loop.py).

Each validates its whole request on the caller's thread (`requests.py`: a bad request raises here, before
any compute), submits it to `llm.loop`, and reads what comes back: response chunks (output.py) or a
scoring forward's log-probabilities. Every request in flight on a handle, from any thread, shares the loop's
batched forward passes; each result equals the same request run alone.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .engine import _END, Job
from .errors import InvalidRequest
from .output import Output
from .requests import Request, require_tokenizer, validate

if TYPE_CHECKING:  # api.py imports this module (Llama.generate); at run time nothing here needs api.py
    from .api import Llama


def generate(llm: Llama, **request: Any) -> dict | Iterator[dict]:
    """Run one request. Returns the result dict, or an iterator of chunks when `stream=True`.

    The request is validated in full before this returns, streaming or not. A stream joins the loop when
    first read; closing it (or dropping it) cancels the request within one step.
    """
    req = validate(llm, request)
    if req.stream:
        return _stream(llm, req)
    return _collect(_stream(llm, req))


def generate_batch(llm: Llama, requests: list[dict]) -> list[dict]:
    """Run many requests at once through the loop; results equal calling `generate` on each request.

    Every request is validated before any is submitted, so a bad one fails the call and runs nothing.
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
    jobs = [llm.loop.submit(Job(req, Output(llm, req))) for req in reqs]
    try:
        return [_collect(_chunks(llm, job)) for job in jobs]
    finally:  # one failed or the caller was interrupted: the others stop too, rather than run to max_tokens
        _cancel_unfinished(llm, jobs)


def score(llm: Llama, text: str, *, context: str = "") -> dict:
    """How likely the model finds `text` after `context` (both raw text): one entry per token of `text`.

    The ids are BOS (when the tokenizer has one) + encode(context) + encode(text), scored in one forward.
    """
    return score_batch(llm, [{"text": text, "context": context}], _where="")[0]


def score_batch(llm: Llama, items: list[dict], *, _where: str = "items") -> list[dict]:
    """`score` for each `{"text", "context"}` item (context optional), all submitted to the loop at once."""
    tok = require_tokenizer(llm)
    if not isinstance(items, (list, tuple)):
        raise InvalidRequest(f"items must be a list of {{text, context}} dicts, got {type(items).__name__}")
    prepared = []
    for i, item in enumerate(items):
        where = f"{_where}[{i}]." if _where else ""
        if not isinstance(item, dict) or set(item) - {"text", "context"}:
            raise InvalidRequest(f"{_where}[{i}] must be a dict with keys text and (optionally) context")
        text, context = item.get("text"), item.get("context", "")
        if context is None:
            context = ""
        for name, value in (("text", text), ("context", context)):
            if not isinstance(value, str):
                raise InvalidRequest(f"{where}{name} must be a string, got {type(value).__name__}")
        head = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(context)
        tail = tok.encode(text)
        if not tail:
            raise InvalidRequest(f"{where}text must encode to at least one token, got {text!r}")
        if not head:
            raise InvalidRequest(f"{where}context: this tokenizer has no BOS token, so the first token of "
                                 "text has nothing to be predicted from; give a non-empty context")
        ids = head + tail
        if len(ids) > llm.context_length:
            raise InvalidRequest(f"{where}text: context and text are {len(ids)} tokens, beyond the model's "
                                 f"context of {llm.context_length}")
        if len(ids) > llm.loop.max_positions:
            raise InvalidRequest(f"{where}text: context and text are {len(ids)} tokens, more than the "
                                 f"{llm.loop.max_positions} positions kv_cache_bytes ({llm.loop.kv_cache_bytes}) "
                                 "can hold for one request")
        outside = sorted({t for t in ids if t >= llm.config.vocab_size})
        if outside:
            raise InvalidRequest(f"{where}text: token(s) {outside} are outside the model's vocabulary")
        prepared.append((ids, len(head)))
    jobs = [llm.loop.submit(Job(ids=ids, n_context=n)) for ids, n in prepared]
    results = []
    try:
        for job, (ids, n) in zip(jobs, prepared):
            logprobs, greedy = next(iter(job.reply.results()))
            total = sum(logprobs)
            results.append({"tokens": [tok.decode([t]) for t in ids[n:]], "ids": ids[n:], "logprobs": logprobs,
                            "is_greedy": greedy, "sum_logprob": total,
                            "perplexity": math.exp(-total / len(logprobs))})
    finally:
        _cancel_unfinished(llm, jobs)
    return results


def score_ids(llm: Llama, ids: list[int], n_context: int, top: int = 0) -> tuple:
    """The loop's scoring forward on raw ids: (logprobs, is_greedy[, top ids, top logprobs]) of ids[n_context:],
    each token predicted from the ids before it (for the server's echoed prompts)."""
    return next(iter(llm.loop.submit(Job(ids=ids, n_context=n_context, top=top)).reply.results()))


def to_sse(chunks: Iterable[dict] | dict) -> Iterator[str]:
    """Server-Sent Events text: `data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`."""
    if isinstance(chunks, dict):
        chunks = [chunks]
    for chunk in chunks:
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


class Stream:
    """The chunks of one request, as the loop produces them. It joins the loop when first read; `close()`
    (from any thread) or dropping it cancels the request, which leaves the batch within one step."""

    def __init__(self, llm: Llama, req: Request):
        self._loop = llm.loop
        self._job = Job(req, Output(llm, req))
        self._submitted = self._closed = False
        self._pending: deque[dict] = deque()
        self._lock = threading.Lock()  # the first read's submit and a close() from another thread

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> dict:
        with self._lock:
            if self._closed:
                raise StopIteration
            if not self._submitted:
                self._submitted = True
                self._loop.submit(self._job)
        while not self._pending:
            item = self._job.reply.events.get()
            if item is _END:
                self._closed = True
                raise StopIteration
            if isinstance(item, BaseException):
                self._closed = True
                raise item
            self._pending.extend(item)
        return self._pending.popleft()

    @property
    def finish_reason(self) -> str | None:
        """Why the request ended, once it has: "stop" (a stop token or stop string), "length" (max_tokens) or
        "tool_calls" (the answer is tool calls)."""
        return self._job.output.finish_reason

    def close(self) -> None:
        # The job is cancelled even when not submitted yet: a first read racing this close() then submits
        # a cancelled job, which the loop drops unrun.
        with self._lock:
            self._closed = True
        if not self._job.finished:
            self._loop.cancel(self._job)

    def __del__(self) -> None:
        self.close()


def _stream(llm: Llama, req: Request) -> Stream:
    return Stream(llm, req)


def _cancel_unfinished(llm: Llama, jobs: list[Job]) -> None:
    for job in jobs:
        if not job.finished:
            llm.loop.cancel(job)


def _chunks(llm: Llama, job: Job) -> Iterator[dict]:
    try:
        for chunks in job.reply.results():
            yield from chunks
    finally:
        if not job.finished:
            llm.loop.cancel(job)


def _collect(chunks: Iterable[dict]) -> dict:
    text, last, logprobs, any_logprobs = [], {}, [], False
    for chunk in chunks:
        text.append(chunk["response"])
        if "logprobs" in chunk:
            any_logprobs = True
            logprobs.extend(chunk["logprobs"])
        last = chunk
    result = {"response": "".join(text), "tool_calls": last.get("tool_calls", []),
              "finish_reason": last["finish_reason"], "usage": last["usage"]}
    if any_logprobs:
        result["logprobs"] = logprobs
    return result
