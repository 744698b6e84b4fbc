"""The request and result shapes as one JSON Schema document (draft 2020-12): what `generate` checks, what
`llama32.schema()` returns and what the server publishes (its schema route, `/openapi.json`, `/docs`).

The fields, ranges and defaults are written once here, as JSON Schema, in the layout of the Workers AI model
page's "API Schemas": the input a `oneOf` of the prompt form and the messages form, the output the result
object (or, for `stream`, Server-Sent Events text whose events are `$defs.chunk`). Fields beyond the Workers AI
body carry `"x-extension": true`.

Why a JSON Schema document and not pydantic models: the document *is* the published contract, so there is no
generated schema to massage back into the seed page's shape (pydantic writes `Optional` fields as `anyOf` with
`null`, unions its own way, and marks extensions only through per-field hooks), and the validator is compiled
from the very dictionary that is served. Speed did not decide it; both are far below a millisecond, measured
side by side (benchmarks/validate_bench.py, benchmarks/RESULTS.md): `fastjsonschema` compiles each form into
plain Python once (~0.1 s, on first use), after which a prompt with sampling fields takes ~5 us, a chat with a
tool ~6 us, a 20-turn chat ~60 us. Pydantic v2 models of the same fields take 8, 16 and 60 us. The `jsonschema`
library's interpreter takes 0.3 to 1.7 ms, too slow for every request. For comparison, the template and the
tokenizer take 0.25 to 7 ms of `requests.validate` on the same requests. When a check fails, the compiled code
reports the first failing keyword, its path and its sub-schema, and this module turns that into a message that
names the field, what the schema allows there, and the value given.

Two rules JSON text cannot break but Python callers can, enforced from the same document after the schema
check: a field typed `integer` takes only an int (JSON Schema would take 5.0), a `number` only a finite one.
A field given as `None` (JSON null) is unset, as if absent. Checks that need the model (the prompt's length in
tokens, token ids against the vocabulary, the chat template, the adapter) stay in `requests.py`.
"""

from __future__ import annotations

import copy
import json
import math
import threading
from typing import Any

import fastjsonschema

from .errors import InvalidRequest

MAX_CHARS = 131072
ROLES = ("system", "user", "assistant", "tool", "ipython")
MAX_STOPS = 4
MAX_LOGIT_BIAS = 300
DRAFT = "https://json-schema.org/draft/2020-12/schema"
MODEL = "@cf/meta/llama-3.2-1b-instruct"


def _num(lo: float, hi: float, description: str, default: float | None = None, **extra: Any) -> dict:
    d = {"type": "number", "minimum": lo, "maximum": hi}
    if default is not None:
        d["default"] = default
    return {**d, "description": description, **extra}


def _int(lo: int, hi: int | None, description: str, default: int | None = None, **extra: Any) -> dict:
    d: dict = {"type": "integer", "minimum": lo}
    if hi is not None:
        d["maximum"] = hi
    if default is not None:
        d["default"] = default
    return {**d, "description": description, **extra}


_PARAMETERS = {
    "type": "object",
    "description": "Schema defining the parameters accepted by the tool (a JSON Schema object).",
    "properties": {
        "type": {"type": "string", "description": "The type of the parameters object (usually 'object')."},
        "required": {"type": "array", "items": {"type": "string"}, "description": "List of required parameter names."},
        "properties": {"type": "object", "description": "Definitions of each parameter.",
                       "additionalProperties": {"type": "object", "properties": {
                           "type": {"type": "string", "description": "The data type of the parameter."},
                           "description": {"type": "string", "description": "A description of the expected parameter."},
                       }}},
    },
}
_NAME = {"type": "string", "minLength": 1}
TOOL_FLAT = {
    "type": "object", "title": "Tool",
    "properties": {
        "name": {**_NAME, "description": "The name of the tool. More descriptive the better."},
        "description": {"type": "string", "description": "A brief description of what the tool does."},
        "parameters": _PARAMETERS,
    },
    "required": ["name"],
}
TOOL_FUNCTION = {
    "type": "object", "title": "Function tool (OpenAI's shape)",
    "properties": {
        "type": {"type": "string", "description": "Specifies the type of tool (e.g., 'function')."},
        "function": {"type": "object", "description": "Details of the function tool.", "properties": {
            "name": {**_NAME, "description": "The name of the function."},
            "description": {"type": "string", "description": "A brief description of what the function does."},
            "parameters": {**_PARAMETERS,
                           "description": "Schema defining the parameters accepted by the function."},
        }, "required": ["name"]},
    },
    "required": ["function"],
}
TOOL_CALL_IN = {
    "type": "object",
    "description": "A call the assistant made: {type, function: {name, arguments}} or {name, arguments}.",
    "properties": {"type": {"type": "string"}, "id": {"type": "string"},
                   "function": {"type": "object", "properties": {
                       "name": _NAME, "arguments": {"type": ["object", "string"]}}, "required": ["name"]},
                   "name": _NAME, "arguments": {"type": ["object", "string"]}},
}
MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"enum": list(ROLES), "description": "The role of the message sender (e.g., 'user', 'assistant', "
                                                     "'system', 'tool')."},
        "content": {"type": ["string", "object", "array", "null"], "maxLength": MAX_CHARS,
                    "description": "The content of the message as a string (a tool result may be a JSON object "
                                   "or list; an assistant turn that carries tool_calls may have none)."},
        "tool_calls": {"type": "array", "items": TOOL_CALL_IN, "x-extension": True,
                       "description": "OpenAI-style calls made by an assistant turn (Llama 3.2: one per turn)."},
        "tool_call_id": {"type": "string", "x-extension": True},
        "name": {"type": "string", "x-extension": True},
    },
    "required": ["role"],
    "additionalProperties": False,
}

# The fields both forms share, in the seed page's order, then the extensions.
_COMMON = {
    "stream": {"type": "boolean", "default": False, "description": "If true, the response will be streamed "
               "back incrementally using SSE, Server Sent Events."},
    "max_tokens": _int(1, None, "The maximum number of tokens to generate in the response; the prompt's tokens "
                       "plus max_tokens must fit the model's context.", default=256),
    "temperature": _num(0, 5, "Controls the randomness of the output; higher values produce more random "
                        "results. 0 means greedy.", default=0.6),
    "top_p": _num(0, 2, "Nucleus sampling: the smallest set of words whose probabilities add up to top_p; "
                  ">= 1 is off."),
    "top_k": _int(1, 50, "Limits the AI to choose from the top 'k' most probable words; unset is off."),
    "seed": _int(1, 9999999999, "Random seed for reproducibility of the generation."),
    "repetition_penalty": _num(0, 2, "Penalty for repeated tokens (prompt and answer, HF semantics); "
                               "0 and 1 are off."),
    "frequency_penalty": _num(0, 2, "Decreases the likelihood of the model repeating the same lines verbatim."),
    "presence_penalty": _num(0, 2, "Increases the likelihood of the model introducing new topics."),
    "lora": {"type": "string", "description": "Name of the LoRA (Low-Rank Adaptation) adapter to apply: a PEFT "
             "adapter directory by path, or by name under weights/loras/ (over HTTP: a name only)."},
    "logprobs": {"type": "boolean", "default": False, "x-extension": True,
                 "description": "The result carries `logprobs`: one entry per generated token."},
    "top_logprobs": _int(0, 20, "How many most likely alternatives each logprobs entry lists (needs logprobs).",
                         default=0, **{"x-extension": True}),
    "stop": {"oneOf": [{"type": "string", "minLength": 1, "maxLength": MAX_CHARS},
                       {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": MAX_CHARS},
                        "minItems": 1, "maxItems": MAX_STOPS}],
             "x-extension": True, "description": "Generation ends as soon as the text contains one of these "
                                                 "strings; the text ends before it."},
    "logit_bias": {"type": "object", "maxProperties": MAX_LOGIT_BIAS,
                   "propertyNames": {"pattern": "^(0|[1-9][0-9]*)$"},
                   "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                   "x-extension": True, "description": "Token id (an int, or its decimal string) -> a number "
                   "added to its logit before penalties (OpenAI's semantics): -100 bans it, 100 all but forces it."},
    "response_format": {"oneOf": [
        {"type": "object", "title": "JSON object", "properties": {"type": {"const": "json_object"}},
         "required": ["type"], "additionalProperties": False},
        {"type": "object", "title": "JSON schema", "properties": {
            "type": {"const": "json_schema"},
            "json_schema": {"type": "object", "description": "A JSON Schema, or OpenAI's {name, schema, strict} "
                                                            "wrapper around one."}},
         "required": ["type", "json_schema"], "additionalProperties": False},
    ], "x-extension": True, "description": "Constrain the answer, token by token, to JSON (matching the schema)."},
}
_TOOLS = {
    "tools": {"type": "array", "items": {"oneOf": [TOOL_FLAT, TOOL_FUNCTION]},
              "description": "A list of tools available for the assistant to use."},
    "functions": {"type": "array", "description": "Functions offered to the model as tools named `name` "
                  "(never executed).", "items": {"type": "object", "properties": {
                      "name": _NAME, "code": {"type": "string"}},
                      "required": ["name", "code"], "additionalProperties": False}},
}
PROMPT_FORM = {
    "title": "Prompt", "type": "object",
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_CHARS,
                   "description": "The input text prompt for the model to generate a response."},
        "raw": {"type": "boolean", "default": False, "description": "If true, a chat template is not applied "
                "and you must adhere to the specific model's expected formatting."},
        **_COMMON, **_TOOLS,
    },
    "required": ["prompt"],
    "additionalProperties": False,
}
MESSAGES_FORM = {
    "title": "Messages", "type": "object",
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE,
                     "description": "An array of message objects representing the conversation history."},
        **_TOOLS, **_COMMON,
    },
    "required": ["messages"],
    "additionalProperties": False,
}
INPUT = {
    "$schema": DRAFT,
    "title": "llama-3.2-1b-instruct input",
    "description": "A request: the prompt form or the messages form. A field given as null is unset.",
    "type": "object",
    "oneOf": [PROMPT_FORM, MESSAGES_FORM],
}

_USAGE = {
    "type": "object", "description": "Usage statistics for the inference request",
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0, "description": "Total number of tokens in input"},
        "completion_tokens": {"type": "integer", "minimum": 0, "description": "Total number of tokens in output"},
        "total_tokens": {"type": "integer", "minimum": 0, "description": "Total number of input and output tokens"},
        "cached_tokens": {"type": "integer", "minimum": 0, "x-extension": True,
                          "description": "Prompt tokens whose keys and values were reused from an earlier request"},
    },
    "required": ["prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"],
}
_TOOL_CALL_OUT = {"type": "object", "properties": {
    "name": {"type": "string", "description": "The name of the tool to be called"},
    "arguments": {"type": "object", "description": "The arguments passed to be passed to the tool call request"},
}, "required": ["name", "arguments"]}
_TOP = {"type": "object", "properties": {"token": {"type": "string"}, "id": {"type": "integer", "minimum": 0},
                                         "logprob": {"type": "number", "maximum": 0}},
        "required": ["token", "id", "logprob"]}
_LOGPROBS = {"type": "array", "x-extension": True,
             "description": "One entry per generated token (stop token included), when the request asked for them.",
             "items": {"type": "object", "properties": {**_TOP["properties"],
                                                        "top_logprobs": {"type": "array", "items": _TOP}},
                       "required": ["token", "id", "logprob", "top_logprobs"]}}
_FINISH = {"enum": ["stop", "length", "tool_calls"], "description": "Why generation ended: an end-of-sequence "
           "token or a stop string, max_tokens, or calls to the offered tools."}
_RESULT_PROPS = {
    "response": {"type": "string", "description": "The generated text response from the model"},
    "tool_calls": {"type": "array", "items": _TOOL_CALL_OUT,
                   "description": "An array of tool calls requests made during the response generation"},
    "finish_reason": _FINISH,
    "usage": _USAGE,
    "logprobs": _LOGPROBS,
}
RESULT = {"type": "object", "contentType": "application/json", "properties": _RESULT_PROPS,
          "required": ["response", "tool_calls", "finish_reason", "usage"], "additionalProperties": False}
CHUNK = {"type": "object", "description": "One Server-Sent Event of a stream: the next piece of text; the last "
         "carries usage, finish_reason and any tool_calls.", "properties": _RESULT_PROPS,
         "required": ["response"], "additionalProperties": False}
OUTPUT = {
    "$schema": DRAFT,
    "title": "llama-3.2-1b-instruct output",
    "oneOf": [RESULT, {"type": "string", "contentType": "text/event-stream", "format": "binary",
                       "description": "With stream: `data: <chunk JSON>` events (see $defs.chunk), then "
                                      "`data: [DONE]`."}],
    "$defs": {"chunk": CHUNK},
}


def schema() -> dict:
    """The request and the result as JSON Schema (draft 2020-12): `{"input": ..., "output": ...}`, like the
    Workers AI model page's "API Schemas". A fresh copy: the caller may change it."""
    return {"input": copy.deepcopy(INPUT), "output": copy.deepcopy(OUTPUT)}


# ----------------------------------------------------------------------------------------------------
# Validation: the forms compiled once, errors turned into messages


_compiled: dict[str, Any] = {}
_compile_lock = threading.Lock()


def _validator(key: str, definition: dict):
    """`definition` compiled to a Python function by fastjsonschema (once per process, on first use)."""
    fn = _compiled.get(key)
    if fn is None:
        with _compile_lock:
            fn = _compiled.get(key)
            if fn is None:
                # Only keywords whose meaning is the same in draft 7 (fastjsonschema's newest) and 2020-12 are used.
                fn = _compiled[key] = fastjsonschema.compile(_bare(definition), use_default=True)
    return fn


def _bare(d: Any) -> Any:
    """`d` as compiled: without the keywords that only document (descriptions, titles, x-extension), and each
    `oneOf` as `anyOf`, which stops at the first branch that fits instead of trying them all (fastjsonschema
    raises an exception per branch ruled out: a chat with a tool took ~70 us instead of ~10). The same thing
    here, since the branches exclude each other (stop: string or list; response_format: by its type), except a
    tool with both `name` and `function`: accepted, and offered in its function form (`chat.tool_names`)."""
    if isinstance(d, list):
        return [_bare(x) for x in d]
    if not isinstance(d, dict):
        return d
    out = {}
    for k, v in d.items():
        if k in ("description", "title", "contentType", "format") or k.startswith("x-"):
            continue
        if k == "properties":  # names, not keywords: a property may be called "description"
            out[k] = {p: _bare(x) for p, x in v.items()}
        else:
            out["anyOf" if k == "oneOf" else k] = v if k in ("const", "enum", "default") else _bare(v)
    return out


def _describe(d: dict) -> str:
    """What a sub-schema allows, in words."""
    if "enum" in d:
        return "one of " + ", ".join(map(str, d["enum"]))
    if "const" in d:
        return repr(d["const"])
    if d.get("type") == "object" and any("const" in p for p in d.get("properties", {}).values()):
        return " ".join(f"{{{k}: {p['const']!r}, ...}}" for k, p in d["properties"].items() if "const" in p)
    if "oneOf" in d or "anyOf" in d:
        return " or ".join(_describe(b) for b in d.get("oneOf", d.get("anyOf")))
    t = d.get("type")
    if isinstance(t, list):
        return " or ".join(_describe({**d, "type": one}) for one in t if one != "null")
    lo, hi = d.get("minimum"), d.get("maximum")
    if t == "integer":
        return f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}" if lo is not None \
            else "an integer"
    if t == "number":
        return f"a number in [{lo}, {hi}]" if lo is not None else "a number"
    if t == "boolean":
        return "true or false"
    if t == "string":
        lo, hi = d.get("minLength", 0), d.get("maxLength")
        return f"a string of {lo}..{hi} characters" if hi is not None else \
            "a non-empty string" if lo else "a string"
    if t == "array":
        lo, hi = d.get("minItems", 0), d.get("maxItems")
        n = f"{lo}..{hi} " if hi is not None else "a non-empty " if lo else "a "
        items = d.get("items", {})
        what = _plural(items)
        return f"{n}list of {what}" if n.startswith("a") else f"a list of {n}{what}"
    if t == "object":
        keys = list(d.get("properties", {}))
        return "an object {" + ", ".join(keys) + "}" if keys else "an object"
    return "valid"


def _plural(items: dict) -> str:
    if items.get("type") == "object" and items.get("properties"):
        return "{" + ", ".join(items["properties"]) + "} objects"
    if "oneOf" in items or "anyOf" in items:
        return " or ".join(_plural(b) for b in items.get("oneOf", items.get("anyOf")))
    if items.get("type") == "string":
        return "non-empty strings" if items.get("minLength") else "strings"
    return f"{items.get('type', 'value')}s"


def _field(name: str) -> str:
    """fastjsonschema's 'data.messages[0].role' -> 'messages[0].role'."""
    return name[5:] if name.startswith("data.") else name[4:] if name.startswith("data") else name


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _branch(branches: list[dict], value: Any) -> dict | None:
    """The `oneOf` branch a value meant: one of its type whose constants (`"type": "json_schema"`), required
    keys and known keys it matches most (`{"function": ...}` is the OpenAI-shaped tool, a list is `stop`'s list
    form); None when no branch has the value's type or a dict matches no branch's constant."""
    def score(b: dict) -> tuple:
        if isinstance(value, dict):
            props, req = b.get("properties", {}), b.get("required", [])
            consts = [k for k, p in props.items() if "const" in p and k in value]
            return (all(value[k] == props[k]["const"] for k in consts), all(k in value for k in req),
                    sum(k in props for k in value))
        return ()
    typed = [b for b in branches if b.get("type") is None or _is_type(value, b["type"])]
    best = max(typed, key=score, default=None)
    return best if best is not None and (not score(best) or score(best)[0]) else None


def _is_type(value: Any, t: str | list) -> bool:
    if isinstance(t, list):
        return any(_is_type(value, one) for one in t)
    return {"object": isinstance(value, dict), "array": isinstance(value, list), "string": isinstance(value, str),
            "boolean": isinstance(value, bool), "null": value is None,
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool)}.get(t, True)


def _message(e: fastjsonschema.JsonSchemaValueException, name: str | None = None) -> str:
    """The error as a sentence: the field, what it allows, the value given."""
    name = name or e.name
    where = _field(name)
    d, v, rule = e.definition or {}, e.value, e.rule
    if rule in ("oneOf", "anyOf"):
        # Which branch was meant, and what is wrong with the value against it.
        branch = _branch(d[rule], v)
        if branch is None:
            return f"{where} must be {_describe(d)}, got {type(v).__name__} {_short(v)}"
        try:
            # compiled once per branch: branches are the schema's own (a handful), never the request's
            _validator(json.dumps(branch, sort_keys=True), branch)(copy.deepcopy(v))
        except fastjsonschema.JsonSchemaValueException as inner:
            return _message(inner, name + inner.name[4:])
        return f"{where} must be {_describe(d)}, got {_short(v)}"
    if rule == "required":
        missing = [k for k in d.get("required", []) if not isinstance(v, dict) or k not in v]
        return f"{where}.{missing[0]} is required ({where} must be {_describe(d)})"
    if rule == "additionalProperties":
        known = list(d.get("properties", {}))
        unknown = [k for k in v if k not in known]
        return f"{where}: unknown key(s) {unknown}; allowed: {', '.join(known)}"
    if rule == "propertyNames":
        bad = [k for k in v if not str(k).isdigit() or (len(k) > 1 and k[0] == "0")]
        return f"{where}: keys must be token ids (an int or its decimal string), got {_short(bad[0])}"
    if rule == "maxProperties":
        return f"{where} may have at most {d['maxProperties']} entries, got {len(v)}"
    if rule in ("minLength", "maxLength"):
        return f"{where} must be {_describe(d)}, got {len(v)} characters"
    if rule in ("minItems", "maxItems"):
        return f"{where} must be {_describe(d)}, got {len(v)} items"
    if rule == "type":
        return f"{where} must be {_describe(d)}, got {type(v).__name__} {_short(v)}"
    return f"{where} must be {_describe(d)}, got {_short(v)}"


def _not_json_number(name: str, d: dict, v: Any) -> None:
    """What JSON cannot say but Python can: 5.0 for an integer, NaN or infinity for a number."""
    if v.__class__ is float and (d["type"] == "integer" or not math.isfinite(v)):
        raise InvalidRequest(f"{name} must be {_describe(d)}, got {'float ' if d['type'] == 'integer' else ''}{v!r}")


# Per form, the fields typed integer or number (checked by _not_json_number after the schema)
_NUMBERS = {form["title"]: [(name, d) for name, d in form["properties"].items()
                            if d.get("type") in ("integer", "number")] for form in (PROMPT_FORM, MESSAGES_FORM)}
_BIAS = PROMPT_FORM["properties"]["logit_bias"]["additionalProperties"]


def check_input(request: dict) -> dict:
    """`request` checked against the input schema; returns a copy with nulls dropped and defaults filled.

    Raises `InvalidRequest` naming the field, what the schema allows there and the value given."""
    data = {k: v for k, v in request.items() if v is not None}
    if isinstance(data.get("logit_bias"), dict):  # Python callers key it by int; JSON by decimal string
        data["logit_bias"] = {k if isinstance(k, str) else str(k): v for k, v in data["logit_bias"].items()}
    has_prompt, has_messages = "prompt" in data, "messages" in data
    if has_prompt == has_messages:
        unknown = [k for k in data if k not in PROMPT_FORM["properties"] and k not in MESSAGES_FORM["properties"]]
        if unknown:
            raise InvalidRequest(_unknown(unknown, PROMPT_FORM, MESSAGES_FORM))
        raise InvalidRequest("exactly one of prompt and messages is required"
                             + (", got both" if has_prompt else ""))
    form, other = (PROMPT_FORM, MESSAGES_FORM) if has_prompt else (MESSAGES_FORM, PROMPT_FORM)
    unknown = [k for k in data if k not in form["properties"]]
    if unknown:
        raise InvalidRequest(_unknown(unknown, form, other))
    try:
        data = _validator(form["title"], form)(data)
    except fastjsonschema.JsonSchemaValueException as e:
        raise InvalidRequest(_message(e)) from None
    for name, d in _NUMBERS[form["title"]]:
        if name in data:
            _not_json_number(name, d, data[name])
    for k, v in data.get("logit_bias", {}).items():
        _not_json_number(f"logit_bias.{k}", _BIAS, v)
    return data


def _unknown(unknown: list, form: dict, other: dict) -> str:
    elsewhere = [k for k in unknown if k in other["properties"]]
    if elsewhere:
        return (f"{elsewhere[0]} applies only to the {other['title'].lower()} form, not to "
                f"{'messages' if form is MESSAGES_FORM else 'prompt'}")
    allowed = sorted(set(PROMPT_FORM["properties"]) | set(MESSAGES_FORM["properties"]))
    return f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
