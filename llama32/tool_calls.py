"""Tool calls in a model answer: which calls it makes, and what text remains around them.

The forms Llama 3.2 writes (Meta's `llama-models`, `models/llama3/`) and the ones vLLM's and SGLang's Llama
parsers also read:
- JSON `{"name": ..., "parameters": {...}}` (or `"arguments"`, or with `"type": "function"`), a JSON list of
  them, several of them separated by `;` or white space, or each after its own `<|python_tag|>`;
- the same object as a Python dict literal (`{'name': 'f', 'arguments': {'a': 1}}`), as the 1B model often
  writes it;
- the pythonic list `[f(a=1), g(b="x")]` that Llama 3.2 1B/3B emit; a single bare `f(a=1)` counts only when
  it is the whole answer (or all that follows a `<|python_tag|>`);
- `<function=f>{"a": 1}</function>`.
Only plain names with literal arguments count: everything is read with `json` or `ast` (`ast.literal_eval` on
the argument nodes), never evaluated. Arguments must be JSON values (no sets, bytes, infinities).

With `tools` (the request's `tools`/`functions` list, or just the names) a call to one of those names counts
wherever it stands: before, after or between prose. A candidate that names anything else, lacks the call's
keys, or does not parse stays text. Without `tools` the answer counts as calls only when all of it is calls
(after any prose that ends in `<|python_tag|>`; text around `<function=...>` tags excepted), as before.

The remaining text, when calls were found, is the text outside them with the `;`, white space and
`<|eom_id|>`/`<|eot_id|>` that directly follow each call dropped, and trailing white space (and end tokens)
removed. When no call is found the text is returned untouched.

`Scanner` does the work left to right and can be fed a growing text: every decision it makes about a prefix
(this is prose, this is a call) holds whatever text follows, and where the text so far could still become a
call it stops and waits. `llama32.output` uses that to stream prose while holding back what may be a call, so
that the streamed text never shows a call that the final result lists.
"""

from __future__ import annotations

import ast
import bisect
import json
import math
import re
from collections.abc import Collection, Iterable
from typing import Any

from .errors import InvalidRequest

PYTHON_TAG = "<|python_tag|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
_FUNCTION = "<function="
_FUNCTION_END = "</function>"
_FUNCTION_TAG = re.compile(r"<function=([^>\s]+)>")
_STARTS = re.compile(r"[{\[<]")  # where a call (or the python tag) may begin, outside the answer's start
_BRACKETS = re.compile(r"[\\\"'{}\[\]()]")
_CLOSE = {"{": "}", "[": "]", "(": ")"}
_KEYS = ("name", "type", "parameters", "arguments")  # the first key of a call object is one of these
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JSON_LITERALS = {"true": True, "false": False, "null": None}  # the 1B model sometimes writes these in Python

INCOMPLETE = "incomplete"  # a candidate that more text could still turn into a call


# ----------------------------------------------------------------------------------------------------
# Values


def _as_json(v: Any) -> Any:
    """`v` with tuples as lists; ValueError for anything JSON cannot hold (sets, bytes, inf, ...)."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError("not a finite number")
        return v
    if isinstance(v, (list, tuple)):
        return [_as_json(x) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: _as_json(x) for k, x in v.items()}
    raise ValueError(f"not a JSON value: {type(v).__name__}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _literal(node: ast.expr) -> Any:
    """A literal expression node: constants and containers, `true`/`false`/`null` as JSON's."""
    if isinstance(node, ast.Name) and node.id in _JSON_LITERALS:
        return _JSON_LITERALS[node.id]
    if isinstance(node, ast.Dict) and any(k is None for k in node.keys):  # {**x}
        raise ValueError("dict unpacking")
    if isinstance(node, (ast.Dict, ast.List, ast.Tuple)):
        if isinstance(node, ast.Dict):
            return _as_json({_literal(k): _literal(v) for k, v in zip(node.keys, node.values)})
        return [_literal(x) for x in node.elts]
    return _as_json(ast.literal_eval(node))  # a call, a name or an operator raises


def _load(text: str) -> Any:
    """`text` as JSON, else as a Python literal; None when it is neither (None is never a call anyway)."""
    try:
        return _as_json(json.loads(text, parse_constant=_no_constant))  # 1e999 reads as inf: not JSON
    except (ValueError, RecursionError):
        pass
    try:
        return _literal(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


def _json_call(obj: Any) -> dict | None:
    """A call from an object {"name", "parameters" | "arguments"} (and optionally "type": "function")."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if obj.get("type", "function") != "function":
        return None
    keys = set(obj) - {"name", "type"}
    if len(keys) != 1 or not keys <= {"parameters", "arguments"}:
        return None
    args = obj[keys.pop()]
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else None


def _pythonic(text: str) -> list[dict] | None:
    """`[f(a=1), g(b='x')]` or one `f(a=1)`: plain names, keyword literal arguments only."""
    try:
        tree = ast.parse(text, mode="eval").body
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


def _match(text: str, p: int, state: tuple | None = None) -> tuple[int | None, tuple]:
    """End (one past) of the bracket opened at `text[p]`, strings of either quote skipped; -1 when it is
    still open at the end of `text`; None when a bracket closes with the wrong kind. Also the scan's state,
    from which a later call on a longer text (`state=`) resumes instead of starting over."""
    i, stack, quote = state if state is not None else (p, [], None)
    stack = list(stack)
    n = len(text)
    while i < n:
        m = _BRACKETS.search(text, i)
        if m is None:
            i = n
            break
        i, ch = m.start(), m.group()
        if quote:
            if ch == "\\":
                if i + 1 == n:
                    break  # the escaped character is still to come
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in _CLOSE:
            stack.append(_CLOSE[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                return None, (i, stack, quote)
            if not stack:
                return i + 1, (i, stack, quote)
        i += 1
    return -1, (i, stack, quote)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _skip_separators(text: str, i: int) -> int:
    """Past the `;`, white space and end tokens that follow a call."""
    while i < len(text):
        if text[i].isspace() or text[i] == ";":
            i += 1
        elif text.startswith(EOT, i) or text.startswith(EOM, i):
            i += len(EOT)  # both have the same length
        else:
            break
    return i


def _partial_marker(tail: str) -> bool:
    """Whether `tail` (the end of the text) may be the start of a marker still arriving."""
    return any(m.startswith(tail) for m in (PYTHON_TAG, EOT, EOM, _FUNCTION))


def _strip_end(text: str) -> str:
    text = text.rstrip()
    while text.endswith((EOT, EOM)):
        text = text[: -len(EOT)].rstrip()
    return text


# ----------------------------------------------------------------------------------------------------
# Offered names


def offered_names(tools: Any) -> frozenset[str] | None:
    """The names in `tools`: a request's `tools` (either shape), `functions` ({name, code}), or names; None
    stays None (no tools: any name, whole answer only)."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, dict)) or not isinstance(tools, Iterable):
        raise InvalidRequest("tools: must be a list of tools ({name, ...} or {type, function: {name, ...}}) "
                             "or of their names")
    names = set()
    for i, t in enumerate(tools):
        if isinstance(t, str):
            name, where = t, f"tools[{i}]"
        elif isinstance(t, dict):
            fn, where = (t["function"], f"tools[{i}].function") if "function" in t else (t, f"tools[{i}]")
            name = fn.get("name") if isinstance(fn, dict) else None
        else:
            raise InvalidRequest(f"tools[{i}]: must be a tool object or a name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"{where}.name: must be a non-empty string")
        names.add(name)
    return frozenset(names)


# ----------------------------------------------------------------------------------------------------
# The scanner


class Scanner:
    """Finds the calls in a text fed to it whole or as it grows (see the module docstring).

    `feed(text, final)` takes the whole text so far (each call's text extends the last one's); it decides
    as much of it as it can and returns how far that is (`pos`). With `final` nothing more will come, so
    every candidate is decided. `remaining()` is the text outside the calls so far, `calls` the calls.
    """

    def __init__(self, names: Collection[str] | None):
        self.names = names
        self.pos = 0  # text[:pos] is decided
        self.calls: list[dict] = []
        self.kinds: list[str] = []  # per call: "tag" (after <|python_tag|>), "function" (<function=>), "plain"
        self.first_call_out = -1  # length of the remaining text when the first call was found
        self._out: list[str] = []
        self._out_len = 0
        self._spans: list[tuple[int, int, int]] = []  # (remaining-text offset, text offset, length) per piece
        self._after_call = False  # dropping the separators that follow a call
        self._at_start = True  # only white space so far: a bare `f(a=1)` may start here
        self._open: tuple[int, tuple] | None = None  # (where, scan state) of the bracket still open at the end

    # -- results ----------------------------------------------------------------------------------------

    def text(self) -> str:
        """The text outside the calls decided so far."""
        if len(self._out) > 1:
            self._out = ["".join(self._out)]
        return self._out[0] if self._out else ""

    def settled(self) -> str:
        """The text outside the calls so far that no later text can change: without the trailing white space
        (and end tokens) that `remaining()` drops when there are calls."""
        return _strip_end(self.text())

    def remaining(self) -> str:
        """What the answer's text is: the text outside the calls (tidied) when there are calls."""
        return _strip_end(self.text()) if self.calls else self.text()

    def source_offset(self, n: int) -> int:
        """The offset in the fed text where the first `n` characters of `text()` end (past any calls
        before them)."""
        i = bisect.bisect_right(self._spans, (n, math.inf, math.inf)) - 1
        if i < 0:
            return 0
        out, src, length = self._spans[i]
        return src + min(n - out, length)

    # -- scanning ---------------------------------------------------------------------------------------

    def feed(self, text: str, final: bool = False) -> int:
        i, n = self.pos, len(text)
        while i < n:
            if self._after_call:
                i = _skip_separators(text, i)
                if i == n or (not final and _partial_marker(text[i:])):
                    break
                self._after_call = False
            if self._at_start:
                k = _skip_space(text, i)
                self._emit(text, i, k)
                if k == n:
                    i = k
                    break
                self._at_start = False
                if text[k].isalpha() or text[k] == "_":
                    res = self._bare(text, k, final)
                    if res == INCOMPLETE:
                        self._at_start = True
                        i = k
                        break
                    if res is not None and res[1] is not None:
                        i = self._take(res, "plain")
                        continue
                i = k
            m = _STARTS.search(text, i)
            p = m.start() if m else n
            self._emit(text, i, p)
            if p == n:
                i = n
                break
            res, kind = self._candidate(text, p, final)
            if res == INCOMPLETE:
                i = p
                break
            if res is None or res[1] is None:  # not a call: text (a closed bracket that is no call, as a whole)
                step = len(PYTHON_TAG) if text.startswith(PYTHON_TAG, p) else 1
                end = p + step if res is None else res[0]
                self._emit(text, p, end)
                i = end
                continue
            i = self._take(res, kind)
        self.pos = i
        return i

    def _emit(self, text: str, a: int, b: int) -> None:
        if b > a:
            self._spans.append((self._out_len, a, b - a))
            self._out.append(text[a:b])
            self._out_len += b - a

    def _take(self, res: tuple[int, list[dict]], kind: str) -> int:
        end, calls = res
        if not self.calls:
            self.first_call_out = self._out_len
        self.calls += calls
        self.kinds += [kind] * len(calls)
        self._after_call = True
        return end

    def _offered(self, name: str) -> bool:
        return self.names is None or name in self.names

    def _candidate(self, text: str, p: int, final: bool) -> tuple[Any, str]:
        """The call(s) starting at `text[p]` (one of `{`, `[`, `<`): ((end, calls) | None | INCOMPLETE, kind)."""
        if text.startswith(PYTHON_TAG, p):
            q = _skip_space(text, p + len(PYTHON_TAG))
            if q == len(text):
                return (None if final else INCOMPLETE), "tag"
            return self._call_at(text, q, final, bare=True), "tag"
        res = self._call_at(text, p, final, bare=False)
        return res, "function" if text.startswith(_FUNCTION, p) else "plain"

    def _call_at(self, text: str, p: int, final: bool, bare: bool) -> Any:
        """(end, calls) for a call at `text[p]`; (end, None) for a closed bracket that is not one; None when
        it is not a call; INCOMPLETE when more text could still make it one."""
        c = text[p]
        if c == "{":
            return self._object(text, p, final)
        if c == "[":
            return self._list(text, p, final)
        if c == "<":
            return self._function(text, p, final)
        if bare and (c.isalpha() or c == "_"):
            return self._bare(text, p, final)
        return None

    def _key(self, text: str, p: int, final: bool) -> Any:
        """Whether the object opened at `text[p]` starts with a call's key: True, False or INCOMPLETE."""
        q = _skip_space(text, p + 1)
        if q == len(text):
            return not final and INCOMPLETE
        quote = text[q]
        if quote not in "\"'":
            return False
        close = text.find(quote, q + 1)
        key = text[q + 1: close if close >= 0 else len(text)]
        if close < 0:
            return not final and any(k.startswith(key) for k in _KEYS) and INCOMPLETE
        return key in _KEYS

    def _name(self, text: str, p: int, final: bool) -> Any:
        """Whether `text[p:]` starts with an offered name and `(`: True, False or INCOMPLETE."""
        m = _IDENT.match(text, p)
        if m is None:
            return False
        if m.end() == len(text):
            if final:
                return False
            if self.names is None or any(n.startswith(m.group()) for n in self.names):
                return INCOMPLETE
            return False
        return text[m.end()] == "(" and self._offered(m.group())

    def _closed(self, text: str, p: int, final: bool) -> Any:
        state = self._open[1] if self._open is not None and self._open[0] == p else None
        end, state = _match(text, p, state)
        self._open = (p, state) if end == -1 else None
        if end == -1:
            return None if final else INCOMPLETE
        return end

    def _object(self, text: str, p: int, final: bool) -> Any:
        q = _skip_space(text, p + 1)
        if q == len(text):
            return None if final else INCOMPLETE
        if text[q] not in "\"'":
            return None  # a brace in prose
        # An object: a call if it is one, else text as a whole (a call inside other data is data).
        ok = self._key(text, p, final)
        end = self._closed(text, p, final)
        if not isinstance(end, int):
            return end
        call = _json_call(_load(text[p:end])) if ok is True else None
        return (end, [call]) if call and self._offered(call["name"]) else (end, None)

    def _list(self, text: str, p: int, final: bool) -> Any:
        q = _skip_space(text, p + 1)
        if q == len(text):
            return None if final else INCOMPLETE
        ok = self._key(text, q, final) if text[q] == "{" else self._name(text, q, final)
        if ok is not True:
            return ok or None
        end = self._closed(text, p, final)
        if not isinstance(end, int):
            return end
        body = text[p:end]
        value = _load(body) if text[q] == "{" else None
        calls = [_json_call(v) for v in value] if isinstance(value, list) and value else _pythonic(body)
        if not calls or not all(c and self._offered(c["name"]) for c in calls):
            return end, None
        return end, calls

    def _bare(self, text: str, p: int, final: bool) -> Any:
        ok = self._name(text, p, final)
        if ok is not True:
            return ok or None
        end = self._closed(text, text.index("(", p), final)
        if not isinstance(end, int):
            return end
        calls = _pythonic(text[p:end])
        if not calls or not self._offered(calls[0]["name"]):
            return None
        # the whole answer, or all before the next <|python_tag|>
        rest = _skip_separators(text, end)
        if rest == len(text) and not final:
            return INCOMPLETE
        if rest == len(text) or text.startswith(PYTHON_TAG, rest):
            return end, calls
        return INCOMPLETE if not final and _partial_marker(text[rest:]) else None

    def _function(self, text: str, p: int, final: bool) -> Any:
        if not text.startswith(_FUNCTION, p):
            return INCOMPLETE if not final and _partial_marker(text[p:]) else None
        m = _FUNCTION_TAG.match(text, p)
        if m is None:
            rest = text[p + len(_FUNCTION):]
            still_naming = ">" not in rest and not any(ch.isspace() for ch in rest)
            return INCOMPLETE if still_naming and not final else None
        close = text.find(_FUNCTION_END, m.end())
        if close < 0:
            return None if final else INCOMPLETE
        body = text[m.end(): close].strip()
        args = _load(body) if body else {}
        if not isinstance(args, dict) or not self._offered(m.group(1)):
            return None
        return close + len(_FUNCTION_END), [{"name": m.group(1), "arguments": args}]

    # -- the whole-answer rule without tools -----------------------------------------------------------------

    def whole_answer(self) -> bool:
        """Without tools: the calls are the whole answer (prose only before a tagged first call, or around
        <function=...> tags)."""
        if not self.calls:
            return False
        if all(k == "function" for k in self.kinds):
            return True
        out = self.text()
        before, after = out[: self.first_call_out], out[self.first_call_out:]
        if _strip_end(after).strip():
            return False
        return not before.strip() or self.kinds[0] in ("tag", "function")


# ----------------------------------------------------------------------------------------------------
# Public helpers


def split_tool_calls(text: str, tools: Any = None) -> tuple[str, list[dict]]:
    """(remaining text, calls `[{"name", "arguments"}]`) of a model answer; `(text, [])` when it makes none.

    `tools`: the request's `tools` or `functions` list (either shape), or the offered names. With it, calls
    to those names count wherever they stand; without it (None) the whole answer must be calls.
    """
    if not isinstance(text, str):
        raise InvalidRequest(f"text: must be a string, got {type(text).__name__}")
    names = offered_names(tools)
    scanner = Scanner(names)
    scanner.feed(text, final=True)
    if not scanner.calls or (names is None and not scanner.whole_answer()):
        return text, []
    return scanner.remaining(), scanner.calls


def parse_tool_calls(text: str, tools: Any = None) -> list[dict]:
    """The calls `[{"name", "arguments"}]` in a model answer (see `split_tool_calls`); `[]` when none."""
    return split_tool_calls(text, tools)[1]
