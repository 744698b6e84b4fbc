"""Llama 3.2 chat prompts and tool calls, in plain Python.

`render_chat` reproduces, byte for byte, what the official Llama 3.2 Instruct chat template
(a copy is `tests/data/llama-3.2-instruct-chat-template.jinja`) renders through transformers'
`apply_chat_template(..., add_generation_prompt=True)` with bos_token `<|begin_of_text|>` and the
template's default `tools_in_user_message=true`. Transformers' environment swaps jinja's `tojson` for
`json.dumps(x, ensure_ascii=False, indent=...)`: keys keep their given order, non-ASCII is kept, and
`tojson(indent=4)` is `json.dumps(..., indent=4)`. Assistant tool calls are rendered in the JSON
form the template writes, `{"name": ..., "parameters": {...}}`.

Where the template is silent or odd, this module decides as follows (the tests pin each point):
- A tool result (`tool`/`ipython`) that is a plain string is rendered as a JSON string, quotes and all,
  because in jinja a string `is iterable` and so goes through `tojson`. Dicts and lists are JSON too.
- An assistant tool call's `arguments` may be a dict or, OpenAI style, a JSON string of an object; the
  string is parsed first, so both render `"parameters": {...}` as the model itself writes it. (The raw
  template would double-encode a string; that is never what a caller means.) A flat call
  `{"name", "arguments"}` -- the shape `generate()` returns -- is accepted beside `{"function": {...}}`.
  Missing `arguments` mean `{}`. An assistant turn's `content` is dropped when it carries a tool call,
  as the template does.
  `tool_calls: None` or `[]` means no call (the template would fail on both).
- With tools, the first message after the system message must be a `user` turn: the template pastes the
  tool list into it whatever its role, which is never a sensible prompt, so that is an InvalidRequest.
- `tools=[]` is not `None`: as in the template, it still switches on the tool preamble.

`functions` (Workers AI `{name, code}`) are offered to the model as ordinary tools, never executed:
    {"type": "function", "function": {"name": name,
                                      "description": "Defined by the following code:\\n" + code,
                                      "parameters": {"type": "object"}}}
The code goes into the description so the model can see what arguments it takes; the schema is open
because nothing here reads the code.

The model's tool calls are read by `llama32.tool_calls` (`parse_tool_calls`, `split_tool_calls`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from llama32.errors import InvalidRequest
from llama32.tool_calls import parse_tool_calls, split_tool_calls  # noqa: F401 (their old home)

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
PYTHON_TAG = "<|python_tag|>"
ROLES = ("system", "user", "assistant", "tool", "ipython")

# The two fixed instruction lines of the template's tools-in-user-message block, verbatim.
_TOOLS_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _tojson(value: Any, field: str, indent: int | None = None) -> str:
    # transformers' tojson filter: json.dumps with ensure_ascii=False, keys unsorted.
    try:
        return json.dumps(value, ensure_ascii=False, indent=indent)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"{field}: must be JSON-serialisable ({e})") from None


# ----------------------------------------------------------------------------------------------------
# Rendering


def _tool_call_text(call: Any, field: str) -> str:
    """The assistant turn the template writes for one OpenAI-style or flat tool call."""
    if not isinstance(call, dict):
        raise InvalidRequest(f"{field}: must be an object {{type, function: {{name, arguments}}}}")
    fn = call.get("function", call)
    where = f"{field}.function" if "function" in call else field
    if not isinstance(fn, dict):
        raise InvalidRequest(f"{where}: must be an object {{name, arguments}}")
    name, args = fn.get("name"), fn.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{where}.name: must be a non-empty string")
    if isinstance(args, str):  # OpenAI sends arguments as a JSON-encoded string
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise InvalidRequest(f"{where}.arguments: a string must hold a JSON object") from None
    if not isinstance(args, dict):
        raise InvalidRequest(f"{where}.arguments: must be an object (or a JSON string of one)")
    return f'{{"name": "{name}", "parameters": {_tojson(args, f"{where}.arguments")}}}'


def _validate_messages(messages: Any) -> list[dict]:
    """Check shapes; returns {role, text, trim}: the header role, the text, whether the template trims it."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequest("messages: must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{field}: must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{field}.role: must be one of {', '.join(ROLES)}; got {role!r}")
        calls = m.get("tool_calls")
        if calls:
            if role != "assistant":
                raise InvalidRequest(f"{field}.tool_calls: only an assistant message may carry tool calls")
            if not isinstance(calls, (list, tuple)):
                raise InvalidRequest(f"{field}.tool_calls: must be a list")
            if len(calls) != 1:
                # The template's own error: "This model only supports single tool-calls at once!"
                raise InvalidRequest(
                    f"{field}.tool_calls: Llama 3.2 supports a single tool call per assistant turn; "
                    f"got {len(calls)}"
                )
            out.append({"role": role, "text": _tool_call_text(calls[0], f"{field}.tool_calls[0]"), "trim": False})
            continue
        content = m.get("content")
        if role in ("tool", "ipython"):
            if not isinstance(content, (str, dict, list)):
                raise InvalidRequest(f"{field}.content: a tool result must be a string, object or list")
            # JSON, a string too (see module docstring), under the ipython header whichever role.
            out.append({"role": "ipython", "text": _tojson(content, f"{field}.content"), "trim": False})
            continue
        if not isinstance(content, str):
            raise InvalidRequest(f"{field}.content: must be a string")
        out.append({"role": role, "text": content, "trim": True})
    return out


def _validate_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise InvalidRequest("tools: must be a list of tool objects")
    tool_names(tools)  # raises on a malformed entry
    return list(tools)


def tool_names(tools: Sequence[dict]) -> list[str]:
    """Names of tools given as `{name, ...}` or `{type: "function", function: {name, ...}}`."""
    names = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise InvalidRequest(f"tools[{i}]: must be an object {{name, description, parameters}}")
        fn, where = (t["function"], f"tools[{i}].function") if "function" in t else (t, f"tools[{i}]")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"{where}.name: must be a non-empty string")
        names.append(name)
    return names


def render_chat(messages: Sequence[dict], tools: Sequence[dict] | None = None, *,
                date_string: str | None = None) -> str:
    """The prompt text the official template renders for `messages` (+ `tools`), ending with the
    assistant header, i.e. `add_generation_prompt=True`."""
    msgs = _validate_messages(messages)
    tool_list = _validate_tools(tools)
    if date_string is None:
        date_string = datetime.now().strftime("%d %b %Y")  # as transformers' strftime_now

    parts = [BOS, _header("system")]
    if msgs[0]["role"] == "system":
        system, rest, first = msgs[0]["text"].strip(), msgs[1:], 1
    else:
        system, rest, first = "", msgs, 0
    if tool_list is not None:
        parts.append("Environment: ipython\n")
    parts += ["Cutting Knowledge Date: December 2023\n", f"Today Date: {date_string}\n\n", system, EOT]

    if tool_list is not None:
        if not rest:
            # The template's own error: "Cannot put tools in the first user message when there's no
            # first user message!"
            raise InvalidRequest("tools: offering tools needs a user message to put them in; "
                                 "messages has none after the system message")
        if rest[0]["role"] != "user":
            raise InvalidRequest(f"messages[{first}].role: with tools, the first message after the "
                                 f"system message must be a user message; got {rest[0]['role']!r}")
        parts += [_header("user"), _TOOLS_PREAMBLE]
        for i, t in enumerate(tool_list):
            parts += [_tojson(t, f"tools[{i}]", indent=4), "\n\n"]
        parts += [rest[0]["text"].strip(), EOT]
        rest = rest[1:]

    for m in rest:
        parts += [_header(m["role"]), m["text"].strip() if m["trim"] else m["text"], EOT]
    parts.append(_header("assistant"))
    return "".join(parts)


def functions_to_tools(functions: Any) -> list[dict]:
    """Workers AI `functions` ({name, code}) as tools the template can offer; see module docstring."""
    if not isinstance(functions, (list, tuple)):
        raise InvalidRequest("functions: must be a list of {name, code} objects")
    tools = []
    for i, f in enumerate(functions):
        if not isinstance(f, dict):
            raise InvalidRequest(f"functions[{i}]: must be an object {{name, code}}")
        if not isinstance(f.get("name"), str) or not f["name"]:
            raise InvalidRequest(f"functions[{i}].name: required, must be a non-empty string")
        if not isinstance(f.get("code"), str):
            raise InvalidRequest(f"functions[{i}].code: required, must be a string")
        tools.append({"type": "function", "function": {
            "name": f["name"],
            "description": "Defined by the following code:\n" + f["code"],
            "parameters": {"type": "object"},
        }})
    return tools

