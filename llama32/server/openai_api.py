"""The OpenAI-compatible shape: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, for the clients, SDKs
and benchmark tools that speak it. Fields are translated into a library request (the library validates them);
fields OpenAI clients send that change nothing here (`user`, `n: 1`) are accepted, fields that would change the
output and are not supported (`n > 1`, `logit_bias`, `suffix`) are a 400 naming the field."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import llama32
from llama32.generate import _collect, score_ids

from . import Backend, handler, sse
from .errors import ApiError

# OpenAI name -> library name, for the fields that mean the same thing
_SAME = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "stop", "top_k",
         "repetition_penalty", "lora")
_IGNORED = ("model", "user", "n", "stream_options", "parallel_tool_calls", "logit_bias", "best_of", "tool_choice",
            "echo", "logprobs", "top_logprobs", "max_tokens", "max_completion_tokens", "stream", "suffix",
            "service_tier", "store", "metadata")


def _unsupported(body: dict, known: tuple[str, ...]) -> None:
    for key in body:
        if key not in known:
            raise ApiError(400, f"{key}: not a supported field", param=key)
    n = body.get("n")
    if n not in (None, 1):
        raise ApiError(400, f"n: only n=1 is supported (one choice per request), got {n!r}", param="n")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of: only best_of=1 is supported", param="best_of")
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    if body.get("suffix"):
        raise ApiError(400, "suffix is not supported", param="suffix")


def _common(body: dict) -> dict:
    fields = {k: body[k] for k in _SAME if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    return fields


def _text_content(content, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: only text content parts are supported", param="messages")
            texts.append(part["text"])
        return "".join(texts)
    return content  # the library says what is wrong with it


def _messages(messages) -> list:
    if not isinstance(messages, list):
        return messages  # the library's error names it
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            m = dict(m)
            if m.get("role") == "developer":
                m["role"] = "system"
            if "content" in m:
                m["content"] = _text_content(m["content"], f"messages[{i}].content")
            if m.get("role") == "assistant" and m.get("content") is None and m.get("tool_calls"):
                m.pop("content")
        out.append(m)
    return out


def _finish(out: dict, reason: str | None) -> str:
    return "tool_calls" if out["tool_calls"] else (reason or "stop")


def _tool_calls(calls: list[dict]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def _chat_logprobs(entries: list[dict] | None) -> dict | None:
    if entries is None:
        return None

    def one(e):
        return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode("utf-8"))}
    return {"content": [dict(one(e), top_logprobs=[one(t) for t in e["top_logprobs"]]) for e in entries]}


def routes(backend: Backend) -> list[Route]:
    llm = backend.llm

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": backend.model_name, "object": "model", "created": 0, "owned_by": "llama32"}]})

    async def run(request: Request, fields: dict) -> tuple[dict, str | None]:
        """The whole answer, and why it ended."""
        backend.admit()

        def work():
            stream = llama32.generate(llm, stream=True, **fields)
            out = _collect(stream)
            return out, stream.finish_reason
        out, reason = await run_in_threadpool(work)
        request.state.tokens = out["usage"]["completion_tokens"]
        return out, reason

    async def chat(request: Request):
        body = await backend.body(request)
        _unsupported(body, _SAME + _IGNORED + ("messages", "tools"))
        fields = _common(body)
        fields["messages"] = _messages(body.get("messages"))
        if body.get("tools") and body.get("tool_choice") not in (None, "auto", "none"):
            raise ApiError(400, "tool_choice: only 'auto' and 'none' are supported", param="tool_choice")
        if body.get("tools") and body.get("tool_choice") != "none":
            fields["tools"] = body["tools"]
        if body.get("logprobs"):
            fields["logprobs"] = True
            fields["top_logprobs"] = body.get("top_logprobs") or 0
        elif body.get("top_logprobs"):
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        fields = await backend.adapter(fields)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": backend.model_name}
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            meta: dict = {}
            chunks = await backend.stream(request, fields, meta)
            return StreamingResponse(sse(_chat_stream(head, chunks, usage, meta)), media_type="text/event-stream")
        out, reason = await run(request, fields)
        message = {"role": "assistant", "content": out["response"] if out["response"] or not out["tool_calls"]
                   else None}
        if out["tool_calls"]:
            message["tool_calls"] = _tool_calls(out["tool_calls"])
        return JSONResponse({**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "logprobs": _chat_logprobs(out.get("logprobs")),
             "finish_reason": _finish(out, reason)}], "usage": out["usage"]})

    async def completions(request: Request):
        body = await backend.body(request)
        _unsupported(body, _SAME + _IGNORED + ("prompt",))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string (one prompt per request)", param="prompt")
        fields = await backend.adapter(dict(_common(body), prompt=prompt, raw=True))
        fields.setdefault("max_tokens", 16)  # OpenAI's default for completions
        k = body.get("logprobs")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 20):
            raise ApiError(400, f"logprobs must be an integer in [0, 20], got {k!r}", param="logprobs")
        echo = bool(body.get("echo"))
        if fields["max_tokens"] == 0 and not echo:
            raise ApiError(400, "max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            if echo:
                raise ApiError(400, "echo is not supported with stream", param="echo")
            if k is not None:
                fields.update(logprobs=True, top_logprobs=k)
            meta = {}
            chunks = await backend.stream(request, fields, meta)
            return StreamingResponse(sse(_completion_stream(rid, created, backend.model_name, chunks, meta)),
                                     media_type="text/event-stream")
        tok = llama32.requests.require_tokenizer(llm)
        scoring_only = fields["max_tokens"] == 0
        if scoring_only:
            fields["max_tokens"] = 1  # validated as a request, then only the prompt is scored
        if k is not None:
            fields.update(logprobs=True, top_logprobs=k)
        prompt_ids = await run_in_threadpool(lambda: llama32.requests.validate(llm, dict(fields)).prompt_ids)
        if scoring_only:
            out, reason = {"response": "", "tool_calls": [], "logprobs": [],
                           "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": 0,
                                     "total_tokens": len(prompt_ids)}}, "length"
        else:
            out, reason = await run(request, fields)
        text, logprobs = out["response"], None
        if k is not None:
            logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            offset = 0
            if echo:
                bos = 1 if prompt_ids and prompt_ids[0] == tok.bos_id else 0
                shown = prompt_ids[bos:]
                scored = await run_in_threadpool(score_ids, llm, prompt_ids, 1, max(k, 1)) if len(prompt_ids) > 1 \
                    else ([], [], [], [])
                lps, _, top_ids, top_lps = scored
                if not bos:  # the first token has nothing before it to be predicted from
                    lps, top_ids, top_lps = [None] + lps, [[]] + top_ids, [[]] + top_lps
                for t, lp, ids, values in zip(shown, lps, top_ids, top_lps):
                    piece = tok.decode([t])
                    _add(logprobs, piece, lp, {tok.decode([i]): v for i, v in zip(ids[:k], values[:k])}, offset)
                    offset += len(piece)
            for e in out["logprobs"]:
                _add(logprobs, e["token"], e["logprob"], {t["token"]: t["logprob"] for t in e["top_logprobs"]}, offset)
                offset += len(e["token"])
        if echo:
            text = prompt + text
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": backend.model_name,
                             "choices": [{"text": text, "index": 0, "logprobs": logprobs,
                                          "finish_reason": _finish(out, reason)}], "usage": out["usage"]})

    return [Route("/v1/models", handler(models), methods=["GET"]),
            Route("/v1/chat/completions", handler(chat), methods=["POST"]),
            Route("/v1/completions", handler(completions), methods=["POST"])]


def _add(logprobs: dict, token: str, lp: float | None, top: dict, offset: int) -> None:
    logprobs["tokens"].append(token)
    logprobs["token_logprobs"].append(lp)
    logprobs["top_logprobs"].append(top or None)
    logprobs["text_offset"].append(offset)


async def _chat_stream(head: dict, chunks: AsyncIterator[dict], include_usage: bool, meta: dict) -> AsyncIterator[dict]:
    def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": extra.get("logprobs"), "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    usage, calls = None, []
    async for c in chunks:
        if c["response"] or c.get("logprobs"):
            yield chunk({"content": c["response"]}, logprobs=_chat_logprobs(c.get("logprobs")))
        if "usage" in c:
            usage, calls = c["usage"], c.get("tool_calls", [])
    if calls:
        yield chunk({"tool_calls": [dict(call, index=i) for i, call in enumerate(_tool_calls(calls))]})
    yield chunk({}, "tool_calls" if calls else meta.get("finish_reason") or "stop")
    if include_usage and usage is not None:
        yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}


async def _completion_stream(rid: str, created: int, model: str, chunks: AsyncIterator[dict],
                             meta: dict) -> AsyncIterator[dict]:
    def chunk(text: str, logprobs: dict | None = None, finish: str | None = None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}

    async for c in chunks:
        logprobs = None
        if c.get("logprobs"):
            logprobs = {"tokens": [e["token"] for e in c["logprobs"]],
                        "token_logprobs": [e["logprob"] for e in c["logprobs"]],
                        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} or None
                                         for e in c["logprobs"]]}
        if c["response"] or logprobs:
            yield chunk(c["response"], logprobs)
    yield chunk("", None, meta.get("finish_reason") or "stop")
