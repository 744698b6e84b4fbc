"""JSON mode (`response_format`): answers constrained token by token to JSON and to a JSON Schema.

On the real SmolLM2 weights: 15 schemas (nested objects, bounded arrays, enums, ranges, optional fields,
anyOf, $defs/$ref, top-level arrays) answered greedily and with five seeds at temperature 1 all parse and
validate with `jsonschema`; streams equal blocking answers; a mixed batch gives every row its solo answer.
On a tiny random model with the real Llama 3 tokenizer (128k ids, three stop ids): random weights at
temperature 1 walk the grammar through improbable tokens, which is where an unenforced keyword shows.
The grammar layer itself: the cache, the stop ids, ids beyond the model's vocabulary, unsupported keywords.
"""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest
import torch

import llama32
from fixtures import without_cached
from llama32 import InvalidRequest
from llama32.constrain import grammars, schema_of, tool_call_schema

S = lambda maxlen=24: {"type": "string", "maxLength": maxlen}  # noqa: E731
I = lambda lo, hi: {"type": "integer", "minimum": lo, "maximum": hi}  # noqa: E731


def obj(required=None, **props):
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


POINT = obj(x=I(-10, 10), y=I(-10, 10))
# (name, prompt, schema): each prompt asks for what its schema holds
SCHEMAS = [
    ("person", "Describe a person: name and age.", obj(name=S(), age=I(0, 120))),
    ("nested", "Give a user with a name and an address (city, zip code).",
     obj(user=obj(name=S(), address=obj(city=S(), zip=I(10000, 99999))))),
    ("bounded_array", "List a few tags for a blog post about cooking.",
     obj(tags={"type": "array", "items": S(12), "minItems": 2, "maxItems": 4})),
    ("enums", "Pick a shirt colour and size.",
     obj(color={"enum": ["red", "green", "blue"]}, size={"enum": [1, 2, 3]})),
    ("number_range", "What is the temperature outside?",
     obj(temperature={"type": "number", "minimum": -50, "maximum": 50}, unit={"enum": ["C", "F"]})),
    ("optional_fields", "Describe a book.",
     obj(["title"], title=S(), subtitle=S(), year=I(1900, 2100))),
    ("any_of", "Give a value: a small number or a short word.",
     obj(value={"anyOf": [I(0, 100), S(10)]})),
    ("top_level_array", "List up to three tasks with an id and whether each is done.",
     {"type": "array", "items": obj(id=I(1, 100), done={"type": "boolean"}), "minItems": 1, "maxItems": 3}),
    ("defs_ref", "Give a line segment: start and end points.",
     {"$defs": {"point": POINT}, **obj(start={"$ref": "#/$defs/point"}, end={"$ref": "#/$defs/point"})}),
    ("bool_null", "Say whether the operation succeeded.",
     obj(ok={"type": "boolean"}, error={"type": "null"}, note={"anyOf": [S(16), {"type": "null"}]})),
    ("int_array", "Give between three and five digits.",
     {"type": "array", "items": I(1, 9), "minItems": 3, "maxItems": 5}),
    ("matrix", "Give a small matrix of digits.",
     obj(rows={"type": "array", "minItems": 2, "maxItems": 2,
               "items": {"type": "array", "items": I(0, 9), "minItems": 2, "maxItems": 3}})),
    ("top_level_enum", "Is the sky blue? Answer yes, no or maybe.", {"enum": ["yes", "no", "maybe"]}),
    ("order", "Write an order with one to three items.",
     obj(order=obj(id=I(1, 9999), items={"type": "array", "minItems": 1, "maxItems": 3,
                                         "items": obj(sku=S(8), qty=I(1, 9))}), express={"type": "boolean"})),
    ("prices", "Give a price and a discount fraction.",
     obj(price={"type": "number", "minimum": 0, "maximum": 1000},
         discount={"type": "number", "minimum": 0, "maximum": 1})),
    ("short_code", "Give a short product code.", obj(code={"type": "string", "minLength": 2, "maxLength": 6})),
]
SEEDS = (11, 22, 33, 44, 55)
MAX_TOKENS = 96


def request(prompt: str, schema: dict, **kw) -> dict:
    return dict(messages=[{"role": "system", "content": "You answer in JSON."}, {"role": "user", "content": prompt}],
                response_format={"type": "json_schema", "json_schema": schema}, max_tokens=MAX_TOKENS, **kw)


def check(out: dict, schema: dict) -> None:
    assert out["finish_reason"] == "stop", out
    jsonschema.validate(json.loads(out["response"]), schema)


@pytest.fixture(scope="module")
def smol32(smollm2_dir):
    """SmolLM2 with 32 rows, so the sweep runs as a few wide batches."""
    return llama32.load(smollm2_dir, dtype="float32", device="cpu", max_batch=32)


@pytest.fixture(scope="module")
def sweep(smol32):
    """Every schema greedy and with five seeds at temperature 1, all in one generate_batch."""
    reqs = []
    for _, prompt, schema in SCHEMAS:
        reqs.append(request(prompt, schema, temperature=0))
        reqs += [request(prompt, schema, temperature=1, seed=s) for s in SEEDS]
    outs = llama32.generate_batch(smol32, reqs)
    return {name: outs[6 * i: 6 * i + 6] for i, (name, _, _) in enumerate(SCHEMAS)}


@pytest.mark.parametrize("name,prompt,schema", SCHEMAS, ids=[s[0] for s in SCHEMAS])
def test_answers_parse_and_validate(sweep, name, prompt, schema):
    outs = sweep[name]
    for out in outs:
        check(out, schema)
    assert len({o["response"] for o in outs}) > 1 or name == "top_level_enum", "temperature 1 changed nothing"


def test_free_text_is_not_json(smol):
    """The same prompt without response_format: the model's own answer is not this JSON (the mask is what
    made the answers above valid)."""
    out = llama32.generate(smol, messages=[{"role": "user", "content": SCHEMAS[0][1]}], temperature=0, max_tokens=24)
    with pytest.raises(ValueError):
        json.loads(out["response"])


def test_json_object_and_openai_wrapper(smol):
    out = llama32.generate(smol, messages=[{"role": "user", "content": "Give a JSON object with a cat's name and age."}],
                           response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    assert out["finish_reason"] == "stop" and isinstance(json.loads(out["response"]), dict)
    schema = SCHEMAS[0][2]
    wrapped = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    a = llama32.generate(smol, prompt="A person, please.", response_format=wrapped, temperature=0, max_tokens=48)
    b = llama32.generate(smol, prompt="A person, please.", temperature=0, max_tokens=48,
                         response_format={"type": "json_schema", "json_schema": schema})
    assert without_cached(a) == without_cached(b)
    check(a, schema)


@pytest.mark.parametrize("i", [1, 7])
def test_stream_concatenates_to_the_blocking_answer(smol, i):
    _, prompt, schema = SCHEMAS[i]
    req = request(prompt, schema, temperature=1, seed=7)
    blocking = llama32.generate(smol, **req)
    chunks = list(llama32.generate(smol, stream=True, **req))
    assert "".join(c["response"] for c in chunks) == blocking["response"]
    assert chunks[-1]["finish_reason"] == blocking["finish_reason"] == "stop"
    check(blocking, schema)


def test_mixed_batch_gives_each_row_its_solo_answer(smol):
    reqs = [request(SCHEMAS[0][1], SCHEMAS[0][2], temperature=0),
            dict(prompt="Tell me about the moon.", temperature=0, max_tokens=16),
            request(SCHEMAS[3][1], SCHEMAS[3][2], temperature=1, seed=5),
            dict(prompt="Write a haiku.", temperature=1, seed=9, max_tokens=16),
            request(SCHEMAS[7][1], SCHEMAS[7][2], temperature=0.8, seed=3, top_p=0.9)]
    batched = llama32.generate_batch(smol, reqs)
    solo = [llama32.generate(smol, **r) for r in reqs]
    assert without_cached(batched) == without_cached(solo)
    for k in (0, 2, 4):
        check(batched[k], reqs[k]["response_format"]["json_schema"])


def test_cut_by_max_tokens_is_length_with_the_partial_text(smol):
    _, prompt, schema = SCHEMAS[1]
    full = llama32.generate(smol, **request(prompt, schema, temperature=0))
    cut = llama32.generate(smol, **{**request(prompt, schema, temperature=0), "max_tokens": 5})
    assert cut["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 5
    assert full["response"].startswith(cut["response"]) and cut["response"]
    with pytest.raises(ValueError):
        json.loads(cut["response"])


@pytest.mark.parametrize("response_format,fragment", [
    ({"type": "json_schema", "json_schema": {"type": "string", "not": {"enum": ["a"]}}}, '"not"'),
    ({"type": "json_schema", "json_schema": {"type": "array", "uniqueItems": True}}, '"uniqueItems"'),
    ({"type": "json_schema", "json_schema": {"if": {"type": "string"}, "then": {"maxLength": 2}}}, '"if"'),
    ({"type": "json_schema", "json_schema": {"type": "object", "propertyNames": {"maxLength": 2}}},
     '"propertyNames"'),
    ({"type": "json_schema", "json_schema": {"$ref": "#/$defs/missing"}}, "/$defs/missing"),
    ({"type": "json_schema", "json_schema": {"type": "strnig"}}, "strnig"),
    ({"type": "json_schema", "json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "minimum"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}}, "json_schema.schema"),
    ({"type": "json_schema"}, "response_format"),
    ({"type": "xml"}, "response_format"),
])
def test_unenforceable_or_malformed_schema_is_invalid_request(smol, response_format, fragment):
    with pytest.raises(InvalidRequest, match="response_format") as e:
        llama32.generate(smol, prompt="hi", response_format=response_format)
    assert fragment in str(e.value)
    # and nothing was left behind: the handle still answers
    assert llama32.generate(smol, prompt="hi", max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2


# --- the grammar layer ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny3(make_checkpoint, llama3_tokenizer_dir):
    """A tiny random Llama 3.2 with the real 128k tokenizer (whose tokenizer.json holds one id, <|image|>,
    beyond the model's vocabulary of 128256) and Llama 3.2's three stop ids."""
    return llama32.load(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), dtype="float32",
                        device="cpu", max_batch=16)


def test_mask_respects_vocabulary_and_stop_ids(tiny3):
    V = tiny3.config.vocab_size
    assert tiny3.tokenizer.backend.get_vocab_size(with_added_tokens=True) > V
    g = grammars(tiny3).compile(obj(a=I(0, 9)))
    m = g.matcher()
    stops = sorted(i for i in tiny3.stop_ids if i < V)
    assert len(stops) == 3
    ids = tiny3.tokenizer.encode('{"a": 7}')
    for t in ids:
        row = m.allowed()
        assert row.shape == (V,) and row.dtype == torch.bool
        assert row[t] and not row[stops].any(), "the answer may not end before the JSON does"
        assert m.accept(t)
    assert m.complete
    row = m.allowed()
    assert row[stops].all() and row.sum() == len(stops), "a complete object may only end"
    # a disallowed token leaves the matcher in its error state, which then allows only the end
    m2 = g.matcher()
    assert not m2.accept(tiny3.tokenizer.encode("hello")[0])
    assert m2.allowed().nonzero()[:, 0].tolist() == stops


def test_compiled_once_per_schema_whatever_the_key_order_and_callers(tiny3):
    G = grammars(tiny3)
    a = {"type": "object", "properties": {"k": {"type": "integer"}, "j": {"type": "string"}}, "required": ["k"]}
    b = json.loads(json.dumps(a))
    b["properties"] = dict(reversed(list(b["properties"].items())))  # same schema, other key order
    assert G.compile(a) is G.compile(b)
    fresh = {"type": "array", "items": {"type": "integer", "minimum": 3}, "maxItems": 7}
    got, barrier = [], threading.Barrier(8)

    def work():
        barrier.wait()
        got.append(G.compile(fresh))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(g) for g in got}) == 1
    # each request gets its own matcher: advancing one leaves the other at the start
    m1, m2 = got[0].matcher(), got[0].matcher()
    assert m1.accept(tiny3.tokenizer.encode("[")[0])
    assert not torch.equal(m1.allowed(), m2.allowed())


EXTRA = [  # keywords beyond the required list, each walked by a random model through improbable tokens
    obj(s={"type": "string", "pattern": "^[a-c]{2,4}$"}),
    obj(s={"type": "string", "format": "date"}),
    obj(c={"const": "fixed"}, n={"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5}),
    obj(t={"type": "array", "prefixItems": [I(0, 3), {"type": "boolean"}], "items": False}),
    {"oneOf": [obj(a=I(0, 5)), obj(b=S(4))]},
    {"type": "array", "items": S(3), "minItems": 2, "maxItems": 2},
    {"allOf": [obj(["a"], a=I(0, 3), b=S(3)), {"required": ["b"]}]},
    {"definitions": {"d": I(5, 7)}, "type": "array", "items": {"$ref": "#/definitions/d"}, "maxItems": 3},
    {"$defs": {"n": obj(["v"], v=I(0, 9), kids={"type": "array", "items": {"$ref": "#/$defs/n"}, "maxItems": 1})},
     "$ref": "#/$defs/n"},
]


def test_random_weights_walk_the_grammar_and_stay_valid(tiny3):
    """A random model at temperature 1 draws tokens a trained one never would (long multi-byte pieces,
    digits, quotes, escapes): every answer that ends is still valid, for the sweep's schemas and more."""
    schemas = [s for _, _, s in SCHEMAS] + EXTRA
    reqs = [dict(prompt="x", raw=True, response_format={"type": "json_schema", "json_schema": s},
                 temperature=1, seed=seed, max_tokens=160) for s in schemas for seed in (1, 2)]
    outs = llama32.generate_batch(tiny3, reqs)
    ended = 0
    for r, out in zip(reqs, outs):
        if out["finish_reason"] == "stop":
            ended += 1
            jsonschema.validate(json.loads(out["response"]), r["response_format"]["json_schema"])
    assert ended >= len(reqs) * 2 // 3, f"only {ended} of {len(reqs)} walks ended"


def test_compiled_step_takes_the_mask_as_an_input(make_checkpoint, llama3_tokenizer_dir, monkeypatch):
    """torch.compile (inductor on CPU): a constrained row's compiled step gives the eager step's answer, and
    another schema in the same shape compiles nothing new (the mask is an input, not part of the graph)."""
    monkeypatch.setenv("LLAMA32_CPU_PACK", "0")  # inductor traces dense weights
    llm = llama32.load(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), dtype="float32",
                       device="cpu", max_batch=1)
    monkeypatch.undo()
    reqs = [dict(prompt="a", raw=True, temperature=1, seed=seed, max_tokens=8,
                 response_format={"type": "json_schema", "json_schema": schema})
            for schema, seed in ((SCHEMAS[0][2], 1), (SCHEMAS[10][2], 2))]
    eager = [llama32.generate(llm, **r) for r in reqs]
    counters = torch._dynamo.utils.counters
    counters.clear()
    llm.compiled = True
    try:
        got = [llama32.generate(llm, **reqs[0])]
        graphs = counters["stats"]["unique_graphs"]
        got.append(llama32.generate(llm, **reqs[1]))
    finally:
        llm.compiled = False
    assert got == eager
    assert graphs == 1 and counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]


def test_schema_of_and_tool_call_schema():
    s = {"type": "integer"}
    assert schema_of({"type": "json_schema", "json_schema": s}) is s
    assert schema_of({"type": "json_schema", "json_schema": {"name": "n", "schema": s, "strict": True}}) is s
    assert schema_of({"type": "json_object"}) == {"type": "object"}
    tools = [{"name": "a", "parameters": obj(x=I(0, 1))},
             {"type": "function", "function": {"name": "b", "parameters": obj(y=S())}}]
    both, only_b = tool_call_schema(tools), tool_call_schema(tools, "b")
    jsonschema.validate({"name": "a", "parameters": {"x": 1}}, both)
    jsonschema.validate({"name": "b", "parameters": {"y": "q"}}, only_b)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "a", "parameters": {"x": 1}}, only_b)
    with pytest.raises(InvalidRequest, match="tool_choice"):
        tool_call_schema(tools, "c")


def test_tool_call_constrained_by_response_format_is_a_parsed_call(tiny3):
    """The machinery `tool_choice: "required"` uses on /v1: the call format as the schema, tools offered,
    so the JSON answer comes back as a parsed call (SmolLM2's template does not render tools: Llama 3's
    format on random weights, which the grammar alone makes a call)."""
    tools = [{"name": "get_weather", "description": "Weather in a city",
              "parameters": obj(city=S(6), unit={"enum": ["celsius", "fahrenheit"]})}]
    out = llama32.generate(tiny3, prompt="What's the weather in Paris?", tools=tools, temperature=0, max_tokens=40,
                           response_format={"type": "json_schema", "json_schema": tool_call_schema(tools)})
    assert out["finish_reason"] == "tool_calls"
    assert len(out["tool_calls"]) == 1 and out["tool_calls"][0]["name"] == "get_weather"
    jsonschema.validate(out["tool_calls"][0]["arguments"], tools[0]["parameters"])


# --- over HTTP -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(smol):
    pytest.importorskip("starlette")
    import httpx
    from llama32.server import create_app
    from test_server import running

    with running(create_app(smol, model_name="smollm2")) as base, httpx.Client(base_url=base, timeout=300) as c:
        yield base, c


WAI = "/ai/run/@cf/meta/llama-3.2-1b-instruct"


def test_workers_ai_route_answers_json_mode_and_says_when_it_could_not_be_met(smol, served):
    _, client = served
    _, prompt, schema = SCHEMAS[0]
    body = request(prompt, schema, temperature=0)
    r = client.post(WAI, json=body)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result == llama32.generate(smol, **body)
    check(result, schema)
    r = client.post(WAI, json={**body, "max_tokens": 4})
    assert r.status_code == 400
    env = r.json()
    assert env["success"] is False and "JSON Mode couldn't be met" in env["errors"][0]["message"]
    r = client.post(WAI, json={**body, "response_format": {"type": "json_schema", "json_schema": {"not": {}}}})
    assert r.status_code == 400 and '"not"' in r.json()["errors"][0]["message"]


def test_openai_sdk_response_format_and_required_tool_choice(smol, served):
    openai = pytest.importorskip("openai")
    base, client = served
    oai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    _, prompt, schema = SCHEMAS[3]
    messages = request(prompt, schema)["messages"]
    rf = {"type": "json_schema", "json_schema": {"name": "shirt", "schema": schema, "strict": True}}
    got = oai.chat.completions.create(model="smollm2", messages=messages, response_format=rf, temperature=0,
                                      max_tokens=MAX_TOKENS)
    want = llama32.generate(smol, **request(prompt, schema, temperature=0))
    assert got.choices[0].message.content == want["response"]
    jsonschema.validate(json.loads(got.choices[0].message.content), schema)
    # json_object, streamed through the SDK: the pieces make one JSON object
    stream = oai.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=48,
                                         response_format={"type": "json_object"}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == llama32.generate(smol, messages=messages, temperature=0, max_tokens=48,
                                    response_format={"type": "json_object"})["response"]
    assert text.startswith("{")


def test_openai_sdk_tool_choice_required_or_named_is_a_parsed_call(tiny3, tmp_path):
    """tool_choice "required" or a named function: one call to an offered tool (to that one), parsed, whatever
    the model would have said (random weights, Llama 3's template, which renders tools: a context of 1024 for
    its tool preamble)."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("starlette")
    import shutil

    import httpx
    from llama32.server import create_app
    from test_server import running

    ckpt = shutil.copytree(tiny3.path, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    llm = llama32.load(ckpt, dtype="float32", device="cpu")
    with running(create_app(llm, model_name="tiny")) as base, httpx.Client(base_url=base, timeout=300) as client:
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        # tool_choice "required": one call to an offered tool, parsed, whatever the model would have said
        tools = [{"type": "function", "function": {"name": "weather", "parameters": obj(city=S(6))}},
                 {"type": "function", "function": {"name": "time", "parameters": obj(city=S(6))}}]
        for choice, names in (("required", {"weather", "time"}),
                              ({"type": "function", "function": {"name": "time"}}, {"time"})):
            got = oai.chat.completions.create(model="tiny", temperature=0, max_tokens=24, tools=tools,
                                              tool_choice=choice,
                                              messages=[{"role": "user", "content": "Oslo?"}])
            c = got.choices[0]
            assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
            assert c.message.tool_calls[0].function.name in names
            assert isinstance(json.loads(c.message.tool_calls[0].function.arguments)["city"], str)
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "tools": tools, "tool_choice": "sometimes"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_cli_json_schema_file(tiny3, tmp_path):
    from test_cli import assert_clean_error, run_cli

    schema = obj(n=I(0, 9), ok={"type": "boolean"})
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    proc = run_cli("--model", str(tiny3.path), "--temperature", "1", "--seed", "3", "--max-tokens", "40", "--json",
                   "--json-schema", str(path), "Hello")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    check(out, schema)
    path.write_text(json.dumps({"type": "string", "not": {"const": "x"}}))
    err = assert_clean_error(run_cli("--model", str(tiny3.path), "--max-tokens", "8", "--json-schema", str(path), "Hello"), 2)
    assert '"not"' in err
    path.write_text("[1]")
    assert "--json-schema" in assert_clean_error(run_cli("--model", str(tiny3.path), "--max-tokens", "8", "--json-schema", str(path), "x"), 2)
