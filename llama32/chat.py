"""Llama 3.2 chat prompts and tool calls, in plain Python.

`render_chat` reproduces, byte for byte, what the official Llama 3.2 Instruct chat template
(`shared/spec/llama-3.2-instruct-chat-template.jinja`) renders through transformers'
`apply_chat_template(..., add_generation_prompt=True)` with bos_token `<|begin_of_text|>` and the
template's default `tools_in_user_message=true`. Transformers' environment swaps jinja's `tojson` for
`json.dumps(x, ensure_ascii=False, indent=...)`: keys keep their given order, non-ASCII is kept, and
`tojson(indent=4)` is `json.dumps(..., indent=4)`. Tool-call forms follow Meta's `llama-models`
(`models/llama3/`): JSON `{"name", "parameters"}`, the pythonic list `[f(a=1)]` the 1B/3B models emit,
and `<function=f>{...}</function>`, each possibly after `<|python_tag|>`.

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

`split_tool_calls` counts an answer as calls only when all of it (after any prose before
`<|python_tag|>`, or around `<function=...>` tags) parses, and every name was offered; otherwise the
text is returned untouched. The remaining text is that prose, stripped.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from llama32.errors import InvalidRequest

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


# ----------------------------------------------------------------------------------------------------
# Parsing the model's tool calls

_FUNCTION_TAG = re.compile(r"<function=([^>\s]+)>(.*?)</function>", re.DOTALL)
_JSON_LITERALS = {"true": True, "false": False, "null": None}  # the 1B model sometimes writes these


def _as_json(v: Any) -> Any:
    """`v` with tuples as lists; ValueError for anything JSON cannot hold (sets, bytes, complex, ...)."""
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    if isinstance(v, (list, tuple)):
        return [_as_json(x) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: _as_json(x) for k, x in v.items()}
    raise ValueError(f"not a JSON value: {type(v).__name__}")


def _json_call(obj: Any) -> dict | None:
    """A call from a JSON object {"name", "parameters" | "arguments"}; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if obj.get("type", "function") != "function":
        return None
    keys = set(obj) - {"name", "type"}
    if len(keys) != 1 or not keys <= {"parameters", "arguments"}:
        return None
    args = obj[keys.pop()]
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else None


def _parse_json(body: str) -> list[dict] | None:
    """One JSON call, a JSON list of calls, or several calls separated by `;` or newlines."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    try:
        while pos < len(body):
            value, pos = decoder.raw_decode(body, pos)
            values.append(value)
            while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
                pos += 1
    except (ValueError, RecursionError):
        return None
    if len(values) == 1 and isinstance(values[0], list):
        values = values[0]
    calls = [_json_call(v) for v in values]
    return calls if calls and all(calls) else None


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in _JSON_LITERALS:
        return _JSON_LITERALS[node.id]
    return _as_json(ast.literal_eval(node))  # constants and containers only: a call or a name raises


def _parse_pythonic(body: str) -> list[dict] | None:
    """`[f(a=1), g(b='x')]` or a single `f(a=1)`: plain names, keyword literal arguments only."""
    if not body or not (body[0] == "[" or body[0].isidentifier()):
        return None
    try:
        tree = ast.parse(body, mode="eval").body
        nodes = tree.elts if isinstance(tree, ast.List) else [tree]
        calls = []
        for node in nodes:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
                return None
            names = [kw.arg for kw in node.keywords]
            if None in names or len(set(names)) != len(names):  # **kwargs, or f(a=1, a=2)
                return None
            calls.append({"name": node.func.id,
                          "arguments": {kw.arg: _literal(kw.value) for kw in node.keywords}})
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None
    return calls or None


def _parse_function_tags(text: str) -> tuple[str, list[dict]] | None:
    """`<function=name>{json}</function>` tags, wherever they are; (text around them, calls)."""
    calls = []
    for m in _FUNCTION_TAG.finditer(text):
        body = m.group(2).strip()
        try:
            args = json.loads(body) if body else {}
        except (ValueError, RecursionError):
            return None
        if not isinstance(args, dict):
            return None
        calls.append({"name": m.group(1), "arguments": args})
    return (_FUNCTION_TAG.sub("", text).strip(), calls) if calls else None


def _strip_end_tokens(text: str) -> str:
    text = text.strip()
    while text.endswith((EOT, EOM)):
        text = text[: -len(EOT)].strip()  # both tokens have the same length
    return text


def _split(text: str, allowed_names: Collection[str] | None) -> tuple[str, list[dict]]:
    core = _strip_end_tokens(text)
    prose, tag, body = core.partition(PYTHON_TAG)
    if not tag:
        prose, body = "", core
    body = body.strip()
    calls, remaining = _parse_json(body) or _parse_pythonic(body), prose.strip()
    if not calls:  # tags last: a JSON call may well quote "<function=" inside a string
        remaining, calls = _parse_function_tags(core.replace(PYTHON_TAG, "")) or (text, [])
    if not calls or (allowed_names is not None and any(c["name"] not in allowed_names for c in calls)):
        return text, []
    return remaining, calls


def split_tool_calls(text: str, allowed_names: Collection[str]) -> tuple[str, list[dict]]:
    """(remaining text, calls) of a model answer; (text, []) unless it is calls to offered names only."""
    return _split(text, allowed_names)


def parse_tool_calls(text: str) -> list[dict]:
    """The calls `[{"name", "arguments"}]` in a model answer, to any name; `[]` when it is not a call."""
    return _split(text, None)[1]
