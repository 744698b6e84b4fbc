"""JSON mode: `response_format` compiled into a grammar and enforced token by token (llguidance).

The grammar engine is llguidance (chosen by measurement against xgrammar and outlines-core: see
benchmarks/RESULTS.md, "JSON mode"). It reads the checkpoint's own `tokenizer.json` (byte-level BPE: Llama 3's
128k vocabulary, SmolLM2's 49k), so a mask allows exactly the tokens whose bytes keep the answer inside the
grammar, and it allows an end-of-sequence id (the checkpoint's stop ids) only where the JSON is complete.

Three layers:
- `Grammars`, one per handle (`grammars(llm)`): the engine's view of the tokenizer, built once on the first
  JSON request (a second or so for a 128k vocabulary), and the compiled schemas, a bounded LRU cache keyed by
  the schema's canonical JSON. Thread-safe: any number of callers compile through it at once.
- `Grammar`: one compiled schema; `matcher()` gives a request its own matcher, a copy of a compiled template.
- `Matcher`: one request's position in its grammar. `fill(row)` writes the allowed-token mask of the next
  token into a bool row (V,), `accept(token)` advances it by a drawn token, `complete` says whether the JSON
  is whole.

A schema feature the engine cannot enforce (`not`, `if`/`then`, `uniqueItems`, `contains`, ...) is an
`InvalidRequest` naming it, raised by `compile` on the caller's thread before any compute.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import InvalidRequest

# How many compiled schemas a handle keeps (least recently used dropped first).
CACHE_SIZE = 256
# The JSON the model writes: no free white space (the engine would otherwise let a model pad forever), and
# the separators json.dumps writes by default, which models have seen most.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
JSON_OBJECT = {"type": "object"}  # what {"type": "json_object"} asks for: any JSON object


def _engine():
    try:
        import llguidance
    except ImportError as e:  # a runtime dependency (pyproject.toml); say what to do if it is missing
        raise InvalidRequest("response_format needs the llguidance package (pip install llguidance)") from e
    return llguidance


def schema_of(response_format: dict) -> dict:
    """The JSON Schema a (schema-checked) `response_format` asks for: `{"type": "json_object"}` is any object;
    `json_schema` is the schema itself (Workers AI's shape) or OpenAI's `{"name", "schema", "strict"}` wrapper."""
    if response_format["type"] == "json_object":
        return JSON_OBJECT
    inner = response_format["json_schema"]
    if isinstance(inner.get("schema"), dict) and set(inner) <= {"name", "schema", "strict", "description"}:
        return inner["schema"]
    if "schema" in inner and set(inner) <= {"name", "schema", "strict", "description"}:
        raise InvalidRequest("response_format.json_schema.schema must be an object (a JSON Schema)")
    return inner


def tool_call_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON Schema of one Llama 3.2 JSON tool call, `{"name": ..., "parameters": {...}}`, to one of
    `tools` (each `{name, parameters}` or `{type: "function", function: {...}}`), or to `name` only."""
    options = []
    for i, t in enumerate(tools if isinstance(tools, list) else []):
        spec = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidRequest(f"tools[{i}] must be {{name, description, parameters}} or "
                                 "{type: 'function', function: {name, description, parameters}}")
        if name is not None and spec["name"] != name:
            continue
        params = spec.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": spec["name"]}, "parameters": params},
                        "required": ["name", "parameters"], "additionalProperties": False})
    if not options:
        raise InvalidRequest(f"tool_choice: no offered tool is named {name!r}")
    return options[0] if len(options) == 1 else {"anyOf": options}


class Grammar:
    """One compiled schema: the engine's matcher at the start of the answer, copied for each request."""

    def __init__(self, template: Any, vocab_size: int, words: int, stop_ids: list[int], key: str):
        self._template, self._lock = template, threading.Lock()
        self.vocab_size, self.words, self.stop_ids, self.key = vocab_size, words, stop_ids, key

    def matcher(self) -> "Matcher":
        with self._lock:
            return Matcher(self._template.deep_copy(), self.vocab_size, self.words, self.stop_ids)


class Matcher:
    """One request's matcher (used by the loop thread only)."""

    def __init__(self, m: Any, vocab_size: int, words: int, stop_ids: list[int]):
        self._m, self.vocab_size, self.stop_ids = m, vocab_size, stop_ids
        self._words = np.zeros(words, dtype=np.uint32)  # the engine's packed mask: bit i of word i // 32

    def fill(self, row: Tensor) -> None:
        """Write the next token's allowed set into `row`, a (V,) bool tensor (tokens >= V do not exist)."""
        self._words[:] = 0
        if not self._m.is_error():
            self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), count=self.vocab_size, bitorder="little").view(np.bool_)
        if not bits.any():  # a dead end (never for a grammar the engine compiled): let the answer end
            bits = bits.copy()
            bits[self.stop_ids] = True
        row.copy_(torch.from_numpy(bits), non_blocking=row.device.type != "cpu")

    def allowed(self) -> Tensor:
        """The next token's allowed set as a new (V,) bool CPU tensor."""
        row = torch.empty(self.vocab_size, dtype=torch.bool)
        self.fill(row)
        return row

    def accept(self, token: int) -> bool:
        """Advance by the drawn `token`; False if the grammar did not allow it (the matcher then stays in
        its error state and `fill` allows only the end)."""
        return bool(self._m.consume_token(token)) and not self._m.is_error()

    advance = accept  # the generation loop's name for it (engine/loop.py, "JSON mode's hook")

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens (speculative decoding walks proposals through the matcher for
        their masks, then rolls back: engine/speculative/speculator.py). A stop token does not count: never roll
        one back."""
        if n > 0 and not self._m.rollback(n):
            raise RuntimeError(f"the JSON matcher could not roll back {n} tokens: {self._m.get_error()}")

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole answer (the JSON may end here)."""
        return bool(self._m.is_accepting()) and not self._m.is_error()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


class Grammars:
    """A handle's compiled grammars (see the module docstring). `compile` from any thread."""

    def __init__(self, llm: Any):
        self._backend = llm.tokenizer.backend
        self.vocab_size = llm.config.vocab_size
        self.stop_ids = sorted(i for i in llm.stop_ids if 0 <= i < self.vocab_size)
        self._tokenizer: Any = None
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()  # the cache and the tokenizer
        self._compiling: dict[str, threading.Lock] = {}  # one compile per schema at a time

    def _engine_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                ll = _engine()
                self._tokenizer = ll.LLTokenizer(self._backend.to_str(), eos_token=self.stop_ids)
            return self._tokenizer

    def compile(self, schema: Any, field: str = "response_format.json_schema") -> Grammar:
        """The compiled grammar of `schema` (a JSON Schema dict), from the cache or compiled now (once, however
        many callers ask at the same moment). Raises InvalidRequest naming what cannot be enforced."""
        if not isinstance(schema, dict):
            raise InvalidRequest(f"{field} must be an object (a JSON Schema), got {type(schema).__name__}")
        try:
            key = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"{field} must be plain JSON ({e})") from None
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            gate = self._compiling.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    return hit
            try:
                grammar = self._compile(schema, key, field)
            finally:
                with self._lock:
                    self._compiling.pop(key, None)
            with self._lock:
                self._cache[key] = grammar
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            return grammar

    def _compile(self, schema: dict, key: str, field: str) -> Grammar:
        ll = _engine()
        try:
            text = ll.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise InvalidRequest(f"{field}: not a usable JSON Schema ({e})") from None
        # what the schema asks is checked before the tokenizer is needed: a bad schema costs no tokenizer build
        for tok in (None, self._engine_tokenizer()):
            failed, messages = ll.LLMatcher.validate_grammar_with_warnings(text, tok)
            if failed:
                raise InvalidRequest(f"{field}: cannot be enforced: {_explain(messages[0] if messages else '')}")
        template = ll.LLMatcher(tok, text, log_level=0)
        if template.is_error():
            raise InvalidRequest(f"{field}: cannot be enforced: {_explain(template.get_error())}")
        # The engine's mask covers the tokenizer's ids, which may outnumber the model's (Llama 3's <|image|>).
        words = (max(tok.vocab_size, self.vocab_size) + 31) // 32
        return Grammar(template, self.vocab_size, words, self.stop_ids, key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)


def _explain(message: str) -> str:
    """The engine's message, with the JSON Schema keywords it does not implement said in words."""
    message = message.strip()
    if message.startswith("Unimplemented keys:"):
        keys = message.removeprefix("Unimplemented keys:").strip()
        return f"the JSON Schema keyword(s) {keys} are not supported in JSON mode (remove them from the schema)"
    return message


def grammars(llm: Any) -> Grammars:
    """The handle's `Grammars` (`Llama.grammars`: the handle makes it on first use and keeps it)."""
    return llm.grammars
