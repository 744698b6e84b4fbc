"""Request validation: every field of the request (docs/API.md, "Generating") checked before any compute.

Each mistake raises `InvalidRequest` naming the field and what is allowed. Validation reads the model handle
(tokenizer, context length, adapters) but never changes it, so a rejected request leaves it as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import lora as lora_mod
from .chat import functions_to_tools, render_chat, tool_names
from .errors import CheckpointError, InvalidRequest
from .sampling import SamplingParams
from .templates import render_template

MAX_CHARS = 131072
ROLES = ("system", "user", "assistant", "tool", "ipython")
FIELDS = ("prompt", "raw", "messages", "tools", "functions", "stream", "max_tokens", "temperature", "top_p",
          "top_k", "seed", "repetition_penalty", "frequency_penalty", "presence_penalty", "lora",
          "logprobs", "top_logprobs", "stop")
MAX_STOPS = 4


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    seed: int | None
    stream: bool
    tool_names: frozenset[str]  # names offered through tools/functions; empty: no tool-call parsing
    adapter: Any  # the resolved LoRA adapter for this request, or None for the handle's own
    adapter_key: Any  # requests with equal keys can share a batch
    logprobs: bool = False  # report each generated token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives per token
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one that appears


def _number(request: dict, name: str, lo: float, hi: float, default: float | None = None) -> float | None:
    v = request.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidRequest(f"{name} must be a number in [{lo}, {hi}], got {type(v).__name__} {v!r}")
    if not math.isfinite(v) or not lo <= v <= hi:
        raise InvalidRequest(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _integer(request: dict, name: str, lo: int, hi: int | None, default: int | None = None) -> int | None:
    v = request.get(name)
    if v is None:
        return default
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(f"{name} must be {allowed}, got {type(v).__name__} {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise InvalidRequest(f"{name} must be {allowed}, got {v}")
    return v


def _boolean(request: dict, name: str) -> bool:
    v = request.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise InvalidRequest(f"{name} must be true or false, got {type(v).__name__} {v!r}")
    return v


def _text(name: str, v: Any, *, min_chars: int = 0) -> str:
    if not isinstance(v, str):
        raise InvalidRequest(f"{name} must be a string of {min_chars}..{MAX_CHARS} characters, got {type(v).__name__}")
    if not min_chars <= len(v) <= MAX_CHARS:
        raise InvalidRequest(f"{name} must be a string of {min_chars}..{MAX_CHARS} characters, got {len(v)}")
    return v


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object with role and content, got {type(m).__name__}")
        unknown = set(m) - {"role", "content", "tool_calls", "tool_call_id", "name"}
        if unknown:
            raise InvalidRequest(f"{where}: unknown key(s) {sorted(unknown)}; allowed: role, content, tool_calls")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        if role in ("tool", "ipython") and isinstance(content, (dict, list)):
            continue
        if role == "assistant" and m.get("tool_calls") is not None and content in (None, ""):
            continue
        _text(f"{where}.content", content)
    return messages


def _check_tools(tools: Any) -> list[str]:
    """The offered names; `chat.tool_names` checks each entry's shape and name."""
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list of {name, description, parameters} objects")
    names = tool_names(tools)
    for i, t in enumerate(tools):
        spec = t.get("function", t)
        if "parameters" in spec and not isinstance(spec["parameters"], dict):
            raise InvalidRequest(f"tools[{i}].parameters must be an object (a JSON schema)")
    return names


def _stops(request: dict) -> tuple[str, ...]:
    v = request.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    allowed = f"a non-empty string or a list of 1..{MAX_STOPS} non-empty strings"
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOPS:
        raise InvalidRequest(f"stop must be {allowed}, got {v!r}"[:300])
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s or len(s) > MAX_CHARS:
            where = "stop" if isinstance(v, str) else f"stop[{i}]"
            raise InvalidRequest(f"{where} must be a non-empty string (stop is {allowed}), got {s!r}"[:300])
    return tuple(stops)


def render_prompt(tok: Any, messages: list[dict], tools: list | None, field: str) -> str:
    """The prompt text for a conversation: Llama 3's own format, or the checkpoint's chat template."""
    if tok.is_llama3:
        return render_chat(messages, tools)
    if tok.chat_template is None:
        raise InvalidRequest(f"{field}: this checkpoint has no chat template (no chat_template in "
                             "tokenizer_config.json, no chat_template.jinja); send a prompt in the model's own "
                             "format with raw=true")
    return render_template(tok.chat_template, tok.special_tokens, messages, tools)


def require_tokenizer(llm: Any):
    """The handle's tokenizer; a model-only checkpoint has none, and text in or out needs one."""
    if llm.tokenizer is None:
        raise CheckpointError(f"{llm.path}: this checkpoint has no tokenizer.json, so it cannot take or give "
                              "text (llm.model(ids) works); copy the tokenizer files of its base model beside it")
    return llm.tokenizer


def validate(llm: Any, request: dict) -> Request:
    """Check `request` against the contract and the loaded model; return what the loop needs."""
    unknown = [k for k in request if k not in FIELDS]
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(FIELDS)}")
    has_prompt, has_messages = request.get("prompt") is not None, request.get("messages") is not None
    if has_prompt == has_messages:
        raise InvalidRequest("exactly one of prompt and messages is required")

    raw = _boolean(request, "raw")
    stream = _boolean(request, "stream")
    max_tokens = _integer(request, "max_tokens", 1, None, default=256)
    params = SamplingParams(
        temperature=_number(request, "temperature", 0, 5, default=0.6),
        top_p=_number(request, "top_p", 0, 2),
        top_k=_integer(request, "top_k", 1, 50),
        repetition_penalty=_number(request, "repetition_penalty", 0, 2),
        frequency_penalty=_number(request, "frequency_penalty", 0, 2),
        presence_penalty=_number(request, "presence_penalty", 0, 2),
    )
    seed = _integer(request, "seed", 1, 9999999999)
    logprobs = _boolean(request, "logprobs")
    top_logprobs = _integer(request, "top_logprobs", 0, 20, default=0)
    if top_logprobs and not logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true")
    stop = _stops(request)

    tools = request.get("tools")
    offered = _check_tools(tools) if tools is not None else []
    functions = request.get("functions")
    if functions is not None:
        tools = list(tools or []) + functions_to_tools(functions)  # checks each {name, code}
        for i, f in enumerate(functions):
            if set(f) - {"name", "code"}:
                raise InvalidRequest(f"functions[{i}] must have exactly the keys name and code")
        offered += [f["name"] for f in functions]

    lora = request.get("lora")
    if lora is not None and not isinstance(lora, str):
        raise InvalidRequest(f"lora must be a string (an adapter name or path), got {type(lora).__name__}")

    tok = require_tokenizer(llm)
    if has_prompt:
        prompt = _text("prompt", request["prompt"], min_chars=1)
        if raw:
            if tools is not None:
                raise InvalidRequest("tools/functions cannot be combined with raw: a raw prompt is used as written")
            ids = tok.encode(prompt)
            if tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
                ids = [tok.bos_id] + ids
        else:
            ids = tok.encode(render_prompt(tok, [{"role": "user", "content": prompt}], tools, "prompt"))
    else:
        if raw:
            raise InvalidRequest("raw applies only to prompt, not to messages")
        ids = tok.encode(render_prompt(tok, _check_messages(request["messages"]), tools, "messages"))

    vocab = llm.config.vocab_size
    outside = sorted({i for i in ids if i >= vocab})
    if outside:
        field = "prompt" if has_prompt else "messages"
        raise InvalidRequest(
            f"{field} contains token(s) {outside} ({tok.decode(outside[:1])!r}) outside the model's "
            f"vocabulary of {vocab} ids"
        )
    context = llm.context_length
    if len(ids) >= context:
        field = "prompt" if has_prompt else "messages"
        raise InvalidRequest(f"{field}: the prompt is {len(ids)} tokens, which leaves no room in the model's "
                             f"context of {context} tokens; shorten it")
    if len(ids) + max_tokens > context:
        raise InvalidRequest(
            f"max_tokens: the prompt is {len(ids)} tokens and max_tokens is {max_tokens}, together beyond the "
            f"model's context of {context} tokens; allowed max_tokens here: at most {max(context - len(ids), 0)}"
        )
    # Last, so a request rejected for anything else loads (and caches) no adapter.
    adapter = lora_mod.resolve(llm, lora) if lora is not None else None
    effective = adapter if adapter is not None else llm._default_adapter
    return Request(ids, params, max_tokens, seed, stream, frozenset(offered), adapter,
                   adapter_key=None if effective is None else id(effective), logprobs=logprobs,
                   top_logprobs=top_logprobs, stop=stop)
