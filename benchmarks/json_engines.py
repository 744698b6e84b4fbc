"""Which grammar engine for JSON mode: xgrammar, llguidance and outlines-core side by side.

For each engine installed (`pip install xgrammar llguidance outlines-core`; those missing are skipped) and
each tokenizer (the real Llama 3 one, 128k, and SmolLM2's 49k), this measures:
- the tokenizer setup (once per checkpoint),
- each schema's compile time (cold: a fresh compiler, no cache),
- the per-token mask fill time, over random walks through the grammar (at each step a token the mask
  allows is drawn, biased towards short tokens so walks end),
- coverage: whether the schema compiles, and whether every finished walk's text parses and validates
  against the schema with `jsonschema` (an engine that accepts a keyword but does not enforce it fails here).

    python benchmarks/json_engines.py --llama3 DIR --smol DIR [--walks 6] [--json out.json]

DIR: a folder with tokenizer.json (the test fixtures' llama3-tokenizer and smollm2-135m-instruct).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import jsonschema

SCHEMAS: dict[str, dict] = {
    "types": {"type": "object", "properties": {
        "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"}, "b": {"type": "boolean"},
        "z": {"type": "null"}}, "required": ["s", "i", "n", "b", "z"], "additionalProperties": False},
    "required_optional": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                          "email": {"type": "string"}},
                          "required": ["name"], "additionalProperties": False},
    "enum_str_int": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                      "size": {"enum": [1, 2, 3]}},
                     "required": ["color", "size"], "additionalProperties": False},
    "array_bounds": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                               "minItems": 2, "maxItems": 4}},
                     "required": ["tags"], "additionalProperties": False},
    "int_range": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 99}},
                  "required": ["n"], "additionalProperties": False},
    "number_range": {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
                     "required": ["x"], "additionalProperties": False},
    "max_length": {"type": "object", "properties": {"code": {"type": "string", "maxLength": 5}},
                   "required": ["code"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "string",
                                                                                       "maxLength": 8}]}},
               "required": ["v"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "integer"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "defs_ref": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"},
                                                                      "y": {"type": "integer"}},
                                     "required": ["x", "y"], "additionalProperties": False}},
                 "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
                 "required": ["a", "b"], "additionalProperties": False},
    "top_array": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}},
                                             "required": ["id"], "additionalProperties": False},
                  "minItems": 1, "maxItems": 3},
    "recursive": {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
        "required": ["v"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
    "json_object": {"type": "object"},
}

BYTES_TO_UNICODE: dict[int, str] = {}


def _byte_map() -> dict[str, int]:
    """GPT-2's byte <-> printable-character map of byte-level BPE (the inverse: char -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def load_vocab(directory: Path, vocab_size: int):
    """(tokenizer.json text, [bytes per id], special ids, stop ids) for a byte-level BPE checkpoint."""
    text = (directory / "tokenizer.json").read_text()
    data = json.loads(text)
    inv = _byte_map()
    tokens: list[bytes | None] = [None] * vocab_size
    for tok, i in data["model"]["vocab"].items():
        if i < vocab_size:
            tokens[i] = bytes(inv[c] for c in tok)
    special = set()
    for added in data["added_tokens"]:
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"].encode()
            if added["special"]:
                special.add(added["id"])
    return text, [t if t is not None else b"" for t in tokens], special


class Engine:
    name = "?"

    def setup(self, tok_json: str, vocab: list[bytes], special: set[int], stops: list[int], V: int): ...

    def compile(self, schema: dict): ...

    def matcher(self, compiled): ...


class XGrammar(Engine):
    name = "xgrammar"

    def setup(self, tok_json, vocab, special, stops, V):
        import torch
        import xgrammar as xgr
        self.xgr, self.torch = xgr, torch
        # RAW: the vocabulary given as the bytes each token stands for
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=V, stop_token_ids=stops)
        self.V = V

    def compile(self, schema):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)

    def walker(self, compiled):
        xgr, torch = self.xgr, self.torch
        m = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, self.V)

        def fill():
            m.fill_next_token_bitmask(mask, 0)
            return mask[0]

        return fill, m.accept_token, m.is_terminated


class LLGuidance(Engine):
    name = "llguidance"

    def setup(self, tok_json, vocab, special, stops, V):
        import llguidance
        import llguidance.torch  # noqa: F401
        self.ll = llguidance
        # the tokenizer may hold ids beyond the model's vocabulary (Llama 3's <|image|>): the mask is wider
        self.tok = llguidance.LLTokenizer(tok_json, eos_token=stops)
        self.V = max(V, self.tok.vocab_size)

    def compile(self, schema):
        ll = self.ll
        g = ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = ll.LLMatcher(self.tok, g)  # compiles the grammar against the tokenizer
        if m.is_error():
            raise ValueError(m.get_error())
        return g

    def walker(self, compiled):
        ll = self.ll
        m = ll.LLMatcher(self.tok, compiled)
        mask = ll.torch.allocate_token_bitmask(1, self.V)

        def fill():
            ll.torch.fill_next_token_bitmask(m, mask, 0)
            return mask[0]

        def accept(t):
            ok = m.consume_token(t)
            return ok and not m.is_error()

        return fill, accept, lambda: m.is_stopped()


class OutlinesCore(Engine):
    name = "outlines-core"

    def setup(self, tok_json, vocab, special, stops, V):
        import torch
        import outlines_core as oc
        self.oc, self.torch = oc, torch
        mapping: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if i not in special and i not in stops and b:
                mapping.setdefault(b, []).append(i)
        self.vocabulary = oc.Vocabulary(stops[0], mapping)  # one eos id only
        self.stops, self.V = stops, V

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def walker(self, compiled):
        torch = self.torch
        g = self.oc.Guide(compiled)
        words = (self.V + 31) // 32
        mask = torch.zeros(words, dtype=torch.int32)

        def fill():
            mask.zero_()
            g.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            return mask

        def accept(t):
            g.advance(t if t not in self.stops else self.stops[0])
            return True

        return fill, accept, g.is_finished


ENGINES = [XGrammar, LLGuidance, OutlinesCore]


def allowed_ids(mask, V) -> list[int]:
    import torch
    bits = (mask[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:V].nonzero()[:, 0].tolist()


def walk(engine: Engine, compiled, vocab: list[bytes], stops: list[int], V: int, rng: random.Random,
         max_steps: int = 200) -> tuple[str | None, list[float]]:
    """A random walk through the grammar: (text, or None when unfinished, per-step fill seconds)."""
    fill, accept, done = engine.walker(compiled)
    out, times = b"", []
    for _ in range(max_steps):
        t0 = time.perf_counter()
        mask = fill()
        times.append(time.perf_counter() - t0)
        ids = allowed_ids(mask, V)
        if not ids:
            return None, times
        ends = [i for i in ids if i in stops]
        if ends:
            accept(ends[0])
            return out.decode("utf-8", errors="replace"), times
        short = [i for i in ids if len(vocab[i]) <= 2]
        # short tokens most of the time, and the closing characters often: walks end
        closing = [i for i in short if vocab[i][:1] in (b'"', b"}", b"]", b",")]
        pool = closing if closing and rng.random() < 0.4 else (short if short and rng.random() < 0.8 else ids)
        t = rng.choice(pool)
        if not accept(t):
            return None, times
        out += vocab[t]
        if done():
            return out.decode("utf-8", errors="replace"), times
    return None, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama3", type=Path, required=True)
    ap.add_argument("--smol", type=Path, required=True)
    ap.add_argument("--walks", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = {"machine": {"platform": platform.platform(), "python": sys.version.split()[0]}, "rows": []}
    for tname, directory, V, stops in (("llama3-128k", args.llama3, 128256, [128001, 128008, 128009]),
                                       ("smollm2-49k", args.smol, 49152, [2])):
        tok_json, vocab, special = load_vocab(directory, V)
        for cls in ENGINES:
            engine = cls()
            try:
                t0 = time.perf_counter()
                engine.setup(tok_json, vocab, special, stops, V)
                setup_s = time.perf_counter() - t0
            except ImportError as e:
                print(f"{cls.name}: not installed ({e})", file=sys.stderr)
                continue
            print(f"== {cls.name} on {tname}: tokenizer setup {setup_s * 1000:.0f} ms", flush=True)
            for sname, schema in SCHEMAS.items():
                row = {"engine": cls.name, "tokenizer": tname, "schema": sname, "setup_ms": setup_s * 1000}
                try:
                    t0 = time.perf_counter()
                    compiled = engine.compile(schema)
                    row["compile_ms"] = (time.perf_counter() - t0) * 1000
                except Exception as e:  # noqa: BLE001 - an unsupported schema is a result
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    print(f"  {sname:18s} compile FAILED {row['error']}", flush=True)
                    results["rows"].append(row)
                    continue
                rng = random.Random(0)
                fills, valid, invalid, unfinished, bad = [], 0, 0, 0, []
                for _ in range(args.walks):
                    text, times = walk(engine, compiled, vocab, stops, V, rng)
                    fills += times
                    if text is None:
                        unfinished += 1
                        continue
                    try:
                        jsonschema.validate(json.loads(text), schema)
                        valid += 1
                    except Exception as e:  # noqa: BLE001
                        invalid += 1
                        bad.append(f"{text[:80]!r}: {str(e).splitlines()[0][:80]}")
                fills.sort()
                row.update(valid=valid, invalid=invalid, unfinished=unfinished, steps=len(fills),
                           fill_us_median=statistics.median(fills) * 1e6 if fills else None,
                           fill_us_p90=fills[int(0.9 * (len(fills) - 1))] * 1e6 if fills else None,
                           fill_us_mean=statistics.fmean(fills) * 1e6 if fills else None, bad=bad[:2])
                print(f"  {sname:18s} compile {row['compile_ms']:8.1f} ms  fill median {row['fill_us_median'] or 0:8.0f} us"
                      f" p90 {row['fill_us_p90'] or 0:8.0f} us  valid {valid} invalid {invalid} unfinished {unfinished}"
                      + (f"  e.g. {bad[0]}" if bad else ""), flush=True)
                results["rows"].append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
