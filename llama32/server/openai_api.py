"""The OpenAI-compatible shape: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, for the clients, SDKs
and benchmark tools that speak it, also under Workers AI's own OpenAI-compatible prefixes `/ai/v1/...` and
`/client/v4/accounts/{id}/ai/v1/...`. Fields are translated into library requests (the library validates
them); fields OpenAI clients send that change nothing here (`user`, `store`) are accepted, fields that would
change the output and are not supported (`best_of > 1`, `suffix`) are a 400 naming the field."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llama32.constrain import tool_call_schema
from llama32.requests import require_tokenizer

from . import Backend, event_stream, handler
from .backend import Answer, merged
from .errors import ApiError

PREFIXES = ("/v1", "/ai/v1", "/client/v4/accounts/{account_id}/ai/v1")
MAX_N = 8
# The most prompts one /v1/completions request may list (each is validated, and then queued n times): a
# bound on the work one body can ask for; more is a 400 (issue 34), rather than validating them all first.
MAX_PROMPTS = 256
# OpenAI fields that mean the same thing as the library's (passed through; the library checks them)
_SAME = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "stop", "top_k",
         "repetition_penalty", "lora", "logit_bias")
_IGNORED = ("model", "user", "n", "stream_options", "parallel_tool_calls", "best_of", "tool_choice",
            "echo", "logprobs", "top_logprobs", "max_tokens", "max_completion_tokens", "stream", "suffix",
            "service_tier", "store", "metadata")


def _unsupported(body: dict, known: tuple[str, ...]) -> int:
    """Refuse what cannot take effect; return `n`."""
    for key in body:
        if key not in known:
            raise ApiError(400, f"{key}: not a supported field", param=key)
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be an integer in [1, {MAX_N}], got {n!r}", param="n")
    if body.get("best_of") not in (None, 1, n):
        raise ApiError(400, "best_of: only best_of equal to n is supported", param="best_of")
    if body.get("suffix"):
        raise ApiError(400, "suffix is not supported", param="suffix")
    return n


def _response_format(body: dict, fields: dict) -> dict:
    """OpenAI's response_format into `fields`: json_object, or json_schema with its {name, schema, strict}
    wrapper, both taken by the library as they are (JSON mode); {"type": "text"}, the default, is no constraint."""
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        fields["response_format"] = rf
    return fields


def _forced_call(choice, tools) -> dict | None:
    """`tool_choice` "required" or `{"type": "function", "function": {"name": ...}}`: the answer is constrained
    (JSON mode) to one Llama 3.2 JSON call to an offered tool (or that one), which comes back as a tool call."""
    if choice in (None, "auto"):
        return None
    name = None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        name = choice["function"]["name"]
    elif choice != "required":
        raise ApiError(400, "tool_choice must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", param="tool_choice")
    return {"type": "json_schema", "json_schema": tool_call_schema(tools, name)}


def _common(body: dict) -> dict:
    fields = {k: body[k] for k in _SAME if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    return fields


def _usage(usages: list[dict], prompt_tokens: int | None = None, per_prompt: int | None = None) -> dict:
    """OpenAI's usage of several choices: their generated tokens summed, the prompt counted once per prompt.
    `per_prompt`: how many consecutive choices share a prompt (None: all of them). A prompt's cached tokens are
    the most any of its choices reused (counted once, as its tokens are), summed over the prompts."""
    prompt = sum(u["prompt_tokens"] for u in usages) if prompt_tokens is None else prompt_tokens
    completion = sum(u["completion_tokens"] for u in usages)
    step = per_prompt or max(len(usages), 1)
    cached = sum(max(u.get("cached_tokens", 0) for u in usages[i:i + step]) for i in range(0, len(usages), step))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


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


def _finish(calls: list, reason: str | None) -> str:
    return "tool_calls" if calls else (reason or "stop")


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


def _prompts(prompt) -> list[tuple[str | None, list[int] | None]]:
    """/v1/completions' prompt forms: a string, a list of strings, a list of token ids, or a list of such
    lists; one (text, None) or (None, ids) per prompt, at most MAX_PROMPTS of them."""
    found = _prompt_forms(prompt)
    if len(found) > MAX_PROMPTS:
        raise ApiError(400, f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(found)}", param="prompt")
    return found


def _prompt_forms(prompt) -> list[tuple[str | None, list[int] | None]]:
    def ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    if isinstance(prompt, str):
        return [(prompt, None)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [(p, None) for p in prompt]
        if ids(prompt):
            return [(None, prompt)]
        if all(ids(p) for p in prompt):
            return [(None, p) for p in prompt]
    raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists "
                        "(none empty)", param="prompt")


def routes(backend: Backend) -> list[Route]:
    llm = backend.llm

    def model_card() -> dict:
        return {"id": backend.model_name, "object": "model", "created": 0, "owned_by": "llama32"}

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request):
        if request.path_params["model_id"] != backend.model_name:
            raise ApiError(404, f"no such model: {request.path_params['model_id']}; this server runs "
                                f"{backend.model_name}", param="model")
        return JSONResponse(model_card())

    async def chat(request: Request):
        body = await backend.body(request)
        n = _unsupported(body, _SAME + _IGNORED + ("messages", "tools", "response_format"))
        fields = _common(body)
        fields["messages"] = _messages(body.get("messages"))
        _response_format(body, fields)
        if body.get("tools") and body.get("tool_choice") != "none":
            fields["tools"] = body["tools"]
            forced = _forced_call(body.get("tool_choice"), body["tools"])
            if forced is not None:
                if "response_format" in fields:
                    raise ApiError(400, "tool_choice: a required tool call cannot be combined with "
                                        "response_format", param="tool_choice")
                fields["response_format"] = forced
        if body.get("logprobs"):
            fields["logprobs"] = True
            fields["top_logprobs"] = body.get("top_logprobs") or 0
        elif body.get("top_logprobs"):
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        fields = await backend.adapter(fields)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": backend.model_name}
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            gens = await backend.stream(request, fields, n)
            return event_stream(request, _chat_stream(head, gens, usage))
        outs = await backend.generate(request, fields, n)
        choices = []
        for i, out in enumerate(outs):
            message = {"role": "assistant",
                       "content": out["response"] if out["response"] or not out["tool_calls"] else None}
            if out["tool_calls"]:
                message["tool_calls"] = _tool_calls(out["tool_calls"])
            choices.append({"index": i, "message": message, "logprobs": _chat_logprobs(out.get("logprobs")),
                            "finish_reason": _finish(out["tool_calls"], out.get("finish_reason"))})
        return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                             "usage": _usage([o["usage"] for o in outs], outs[0]["usage"]["prompt_tokens"])})

    async def completions(request: Request):
        body = await backend.body(request)
        n = _unsupported(body, _SAME + _IGNORED + ("prompt", "response_format"))
        prompts = _prompts(body.get("prompt"))
        fields = await backend.adapter(_response_format(body, dict(_common(body), raw=True)))
        fields.setdefault("max_tokens", 16)  # OpenAI's default for completions
        k = body.get("logprobs")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 20):
            raise ApiError(400, f"logprobs must be an integer in [0, 20], got {k!r}", param="logprobs")
        if k is not None:
            fields.update(logprobs=True, top_logprobs=k)
        echo = bool(body.get("echo"))
        if fields["max_tokens"] == 0 and not echo:
            raise ApiError(400, "max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
        scoring_only = fields["max_tokens"] == 0
        if scoring_only:
            fields["max_tokens"] = 1  # validated as a request, then only the prompt is scored
        if body.get("stream") and echo:
            raise ApiError(400, "echo is not supported with stream", param="echo")
        tok = require_tokenizer(llm)
        reqs = []  # per prompt: its n validated requests
        for text, ids in prompts:
            if ids is not None:
                _check_ids(llm, ids, fields["max_tokens"])
            reqs.append(await backend.validate(dict(fields, prompt=text if text is not None else "x"), n, ids))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            gens = await backend.start(request, [r for rs in reqs for r in rs])
            return event_stream(request, _completion_stream(rid, created, backend.model_name, gens))
        if scoring_only:
            outs = [{"response": "", "tool_calls": [], "logprobs": [], "finish_reason": "length",
                     "usage": {"prompt_tokens": len(r.prompt_ids), "completion_tokens": 0,
                               "total_tokens": len(r.prompt_ids)}} for rs in reqs for r in rs]
        else:
            outs = await backend.collect(request, await backend.start(request, [r for rs in reqs for r in rs]))
        choices = []
        for c, out in enumerate(outs):
            p = c // n
            text, ids = prompts[p]
            prompt_ids = reqs[p][0].prompt_ids
            logprobs = None
            if k is not None:
                logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                offset = 0
                if echo:
                    offset = await _echo_logprobs(backend, tok, logprobs, prompt_ids, k)
                for e in out["logprobs"]:
                    _add(logprobs, e["token"], e["logprob"], {t["token"]: t["logprob"] for t in e["top_logprobs"]},
                         offset)
                    offset += len(e["token"])
            shown = out["response"]
            if echo:
                shown = (text if text is not None else tok.decode(ids)) + shown
            choices.append({"text": shown, "index": c, "logprobs": logprobs,
                            "finish_reason": _finish(out["tool_calls"], out.get("finish_reason"))})
        usage = _usage([o["usage"] for o in outs], sum(len(rs[0].prompt_ids) for rs in reqs), per_prompt=n)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": backend.model_name,
                             "choices": choices, "usage": usage})

    out = []
    for prefix in PREFIXES:
        out += [Route(f"{prefix}/models", handler(models, "/v1/models"), methods=["GET"]),
                Route(f"{prefix}/models/{{model_id:path}}", handler(model, "/v1/models/{id}"), methods=["GET"]),
                Route(f"{prefix}/chat/completions", handler(chat, "/v1/chat/completions"), methods=["POST"]),
                Route(f"{prefix}/completions", handler(completions, "/v1/completions"), methods=["POST"])]
    return out


def _check_ids(llm, ids: list[int], max_tokens: int) -> None:
    vocab, context = llm.config.vocab_size, llm.context_length
    outside = sorted({t for t in ids if not 0 <= t < vocab})
    if outside:
        raise ApiError(400, f"prompt: token id(s) {outside[:5]} are outside the vocabulary of {vocab} ids",
                       param="prompt")
    if len(ids) + max_tokens > context:
        raise ApiError(400, f"prompt: {len(ids)} tokens and max_tokens {max_tokens} are together beyond the "
                            f"model's context of {context} tokens", param="prompt")


async def _echo_logprobs(backend: Backend, tok, logprobs: dict, prompt_ids: list[int], k: int) -> int:
    """The prompt's tokens and their log-probabilities (each predicted from those before it; the first has
    none), added to `logprobs`; a leading BOS is not shown. Returns the text offset after them."""
    bos = 1 if prompt_ids and prompt_ids[0] == tok.bos_id else 0
    shown = prompt_ids[bos:]
    scored = await backend.score(prompt_ids, max(k, 1)) if len(prompt_ids) > 1 else ([], [], [], [])
    lps, _, top_ids, top_lps = scored
    if not bos:  # the first token has nothing before it to be predicted from
        lps, top_ids, top_lps = [None] + lps, [[]] + top_ids, [[]] + top_lps
    offset = 0
    for t, lp, ids, values in zip(shown, lps, top_ids, top_lps):
        piece = tok.decode([t])
        _add(logprobs, piece, lp, {tok.decode([i]): v for i, v in zip(ids[:k], values[:k])}, offset)
        offset += len(piece)
    return offset


def _add(logprobs: dict, token: str, lp: float | None, top: dict, offset: int) -> None:
    logprobs["tokens"].append(token)
    logprobs["token_logprobs"].append(lp)
    logprobs["top_logprobs"].append(top or None)
    logprobs["text_offset"].append(offset)


async def _chat_stream(head: dict, gens: list[Answer], include_usage: bool) -> AsyncIterator[dict]:
    def chunk(i: int, delta: dict, finish: str | None = None, **extra) -> dict:
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": i, "delta": delta, "logprobs": extra.get("logprobs"), "finish_reason": finish}]}

    for i in range(len(gens)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for i, c in merged([g.chunks() for g in gens]):
        if c is None:  # choice i has ended
            calls = gens[i].last.get("tool_calls", [])
            if calls:
                yield chunk(i, {"tool_calls": [dict(call, index=j) for j, call in enumerate(_tool_calls(calls))]})
            yield chunk(i, {}, _finish(calls, gens[i].finish_reason))
        elif c["response"] or c.get("logprobs"):
            yield chunk(i, {"content": c["response"]}, logprobs=_chat_logprobs(c.get("logprobs")))
    if include_usage:
        usages = [g.last["usage"] for g in gens]
        yield {**head, "object": "chat.completion.chunk", "choices": [],
               "usage": _usage(usages, usages[0]["prompt_tokens"])}


async def _completion_stream(rid: str, created: int, model: str, gens: list[Answer]) -> AsyncIterator[dict]:
    def chunk(i: int, text: str, logprobs: dict | None = None, finish: str | None = None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": text, "index": i, "logprobs": logprobs, "finish_reason": finish}]}

    async for i, c in merged([g.chunks() for g in gens]):
        if c is None:
            yield chunk(i, "", None, _finish(gens[i].last.get("tool_calls", []), gens[i].finish_reason))
            continue
        logprobs = None
        if c.get("logprobs"):
            logprobs = {"tokens": [e["token"] for e in c["logprobs"]],
                        "token_logprobs": [e["logprob"] for e in c["logprobs"]],
                        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} or None
                                         for e in c["logprobs"]]}
        if c["response"] or logprobs:
            yield chunk(i, c["response"], logprobs)
