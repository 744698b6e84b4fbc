"""llama32.schema(): the published JSON Schemas, the validation generate does from them, and results against them.

The published document is checked with the `jsonschema` library (an independent validator of draft 2020-12),
not with the compiled validator generate uses, so the two are held to each other.
"""

import ast
import json
import math
import re
from pathlib import Path

import jsonschema
import pytest

import llama32
from llama32 import InvalidRequest
from llama32.generate import _collect
from llama32.output import Output
from llama32.requests import validate
from llama32.schemas import check_input

README = Path(__file__).resolve().parents[1] / "README.md"
EXTENSIONS = {"logprobs", "top_logprobs", "stop", "logit_bias", "response_format"}


@pytest.fixture(scope="module")
def llm(make_checkpoint, llama3_tokenizer_dir):
    return llama32.load(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), dtype="float32")


@pytest.fixture(scope="module")
def inp():
    return jsonschema.Draft202012Validator(llama32.schema()["input"])


@pytest.fixture(scope="module")
def out_schema():
    return llama32.schema()["output"]


def test_schemas_are_valid_draft_2020_12():
    s = llama32.schema()
    assert set(s) == {"input", "output"}
    for doc in s.values():
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(doc)
    assert [f["title"] for f in s["input"]["oneOf"]] == ["Prompt", "Messages"]
    assert s["input"]["oneOf"][0]["required"] == ["prompt"] and s["input"]["oneOf"][1]["required"] == ["messages"]


def test_every_field_has_a_type_range_and_default_where_the_contract_gives_one():
    prompt, messages = llama32.schema()["input"]["oneOf"]
    p = prompt["properties"]
    assert (p["temperature"]["type"], p["temperature"]["minimum"], p["temperature"]["maximum"],
            p["temperature"]["default"]) == ("number", 0, 5, 0.6)
    assert (p["max_tokens"]["type"], p["max_tokens"]["minimum"], p["max_tokens"]["default"]) == ("integer", 1, 256)
    assert (p["top_k"]["minimum"], p["top_k"]["maximum"]) == (1, 50)
    assert (p["seed"]["minimum"], p["seed"]["maximum"]) == (1, 9999999999)
    assert (p["prompt"]["minLength"], p["prompt"]["maxLength"]) == (1, 131072)
    for name in ("top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
        assert (p[name]["type"], p[name]["minimum"], p[name]["maximum"]) == ("number", 0, 2)
    assert p["raw"]["default"] is False and p["stream"]["default"] is False
    assert p["logit_bias"]["maxProperties"] == 300
    assert p["logit_bias"]["additionalProperties"] == {"type": "number", "minimum": -100, "maximum": 100}
    assert messages["properties"]["messages"]["items"]["properties"]["role"]["enum"] == [
        "system", "user", "assistant", "tool", "ipython"]
    assert "raw" not in messages["properties"] and "messages" not in p
    for form in (prompt, messages):
        for name, d in form["properties"].items():
            assert "type" in d or "oneOf" in d or "enum" in d, name
            assert d.get("description"), name
            assert bool(d.get("x-extension")) == (name in EXTENSIONS), name


def test_output_schema_lists_the_result_fields():
    out = llama32.schema()["output"]
    result = out["oneOf"][0]["properties"]
    assert set(result) == {"response", "tool_calls", "finish_reason", "usage", "logprobs"}
    assert set(result["usage"]["properties"]) == {"prompt_tokens", "completion_tokens", "total_tokens",
                                                 "cached_tokens"}
    assert out["oneOf"][1]["contentType"] == "text/event-stream"
    assert result["logprobs"]["x-extension"] is True


def test_schema_returns_a_fresh_copy():
    s = llama32.schema()
    s["input"]["oneOf"][0]["properties"]["temperature"]["maximum"] = 99
    assert llama32.schema()["input"]["oneOf"][0]["properties"]["temperature"]["maximum"] == 5
    assert check_input({"prompt": "Hi", "temperature": 5})["temperature"] == 5


# The request bodies the Workers AI model page shows in its Worker, Python and curl tabs.
SEED_EXAMPLES = [
    {"messages": [{"role": "system", "content": "You are a friendly assistant"},
                  {"role": "user", "content": "Why is pizza so good"}], "stream": True},
    {"messages": [{"role": "system", "content": "You are a friendly assistant"},
                  {"role": "user", "content": "Why is pizza so good"}]},
    {"prompt": "Tell me a joke about Cloudflare"},
    {"messages": [{"role": "system", "content": "You are a friendly assistant that helps write stories"},
                  {"role": "user", "content": "Write a short story about a llama that goes on a journey to find "
                                              "an orange cloud "}]},
    {"prompt": "Where did the phrase Hello World come from"},
]


def readme_requests() -> list[dict]:
    """Every request in the README: generate()/generate_batch() calls in its Python block, curl -d bodies."""
    text = README.read_text()
    found = [json.loads(body) for body in re.findall(r"-d '(\{.*?\})'", text)]
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    tree = ast.parse(block)
    names = {t.id: ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
             for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Dict)}

    def value(node):
        return names[node.id] if isinstance(node, ast.Name) else [value(e) for e in node.elts] \
            if isinstance(node, ast.List) else ast.literal_eval(node)

    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
        if call.func.attr == "generate" and call.args and getattr(call.args[0], "id", "") == "llm":
            found.append({k.arg: value(k.value) for k in call.keywords})
        elif call.func.attr == "generate_batch":
            found += value(call.args[1])
    return found


def test_readme_has_requests_to_check():
    reqs = readme_requests()
    assert len(reqs) >= 10 and any("tools" in r for r in reqs) and any("logprobs" in r for r in reqs)


@pytest.mark.parametrize("request_", SEED_EXAMPLES + readme_requests(), ids=lambda r: json.dumps(r)[:60])
def test_example_requests_validate(inp, request_):
    inp.validate(request_)  # the published schema takes it
    check_input(request_)  # and so does what generate runs


def _bad_cases():
    from test_requests import BAD  # the existing suite's bad requests
    return BAD


@pytest.mark.parametrize("request_, field", _bad_cases(), ids=lambda x: str(x)[:40])
def test_bad_requests_are_refused_by_the_schema_or_the_model_checks(llm, inp, request_, field):
    """Every bad request of the suite: refused naming the field; where the schema refuses it, the published
    schema refuses it too (except the two Python-only cases it cannot express: 5.0 for an integer, NaN/inf)."""
    try:
        check_input(request_)
    except InvalidRequest as e:
        assert field in str(e)
        python_only = any(isinstance(v, float) and (not math.isfinite(v) or v.is_integer())
                          for v in request_.values())
        assert python_only or not inp.is_valid(request_)
    else:  # needs the model: the prompt's tokens, the context, the adapter, the template
        with pytest.raises(InvalidRequest, match=re.escape(field)):
            validate(llm, request_)


@pytest.mark.parametrize("request_, message", [
    ({"prompt": "Hi", "stop": ["a", ""]}, "stop[1] must be a string of 1..131072 characters, got 0 characters"),
    ({"prompt": "Hi", "stop": 5}, "stop must be a string of 1..131072 characters or a list of 1..4 non-empty "
                                  "strings, got int 5"),
    ({"prompt": "Hi", "logit_bias": {1: 200}}, "logit_bias.1 must be a number in [-100, 100], got 200"),
    ({"prompt": "Hi", "logit_bias": {"01": 1}}, "logit_bias: keys must be token ids"),
    ({"prompt": "Hi", "logit_bias": {i: 1 for i in range(301)}}, "logit_bias may have at most 300 entries, got 301"),
    ({"prompt": "Hi", "logit_bias": {"5": math.nan}}, "logit_bias.5 must be a number in [-100, 100], got nan"),
    ({"prompt": "Hi", "response_format": {"type": "xml"}}, "response_format must be {type: 'json_object', ...} or "
                                                           "{type: 'json_schema', ...}, got dict"),
    ({"prompt": "Hi", "response_format": {"type": "json_schema"}}, "response_format.json_schema is required"),
    ({"prompt": "Hi", "tools": [{"function": {"description": "x"}}]}, "tools[0].function.name is required"),
    ({"prompt": "Hi", "top_logprobs": 21}, "top_logprobs must be an integer in [0, 20], got 21"),
    ({"prompt": "Hi", "temperature": 7}, "temperature must be a number in [0, 5], got 7"),
    ({"prompt": "Hi", "max_tokens": 3.0}, "max_tokens must be an integer >= 1, got float 3.0"),
    ({"messages": [{"role": "user", "content": "Hi"}], "raw": True}, "raw applies only to the prompt form"),
])
def test_messages_name_the_field_the_range_and_the_value(request_, message):
    with pytest.raises(InvalidRequest) as info:
        check_input(request_)
    assert message in str(info.value)


def test_defaults_come_from_the_schema():
    r = check_input({"prompt": "Hi", "temperature": None})
    p = llama32.schema()["input"]["oneOf"][0]["properties"]
    for name in ("max_tokens", "temperature", "raw", "stream", "logprobs", "top_logprobs"):
        assert r[name] == p[name]["default"]
    assert "seed" not in r and "top_k" not in r


def _check(schema: dict, result: dict) -> None:
    jsonschema.Draft202012Validator(schema).validate(result)


def test_results_validate_against_the_output_schema(llm, out_schema):
    chunk = {**out_schema["$defs"]["chunk"], "$defs": out_schema["$defs"]}
    for request in ({"prompt": "Hi", "max_tokens": 5},
                    {"prompt": "Hi", "max_tokens": 5, "logprobs": True, "top_logprobs": 3},
                    {"messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 4,
                     "tools": [{"name": "get_weather", "parameters": {"type": "object"}}]},
                    {"prompt": "Hi", "max_tokens": 4, "stop": ["."], "seed": 5, "temperature": 1.0}):
        result = llama32.generate(llm, **request)
        _check(out_schema, result)
        chunks = list(llama32.generate(llm, stream=True, **request))
        for c in chunks:
            _check(chunk, c)
        _check(out_schema, "".join(llama32.to_sse(iter(chunks))))
        if request.get("logprobs"):
            assert len(result["logprobs"]) == result["usage"]["completion_tokens"]
    with pytest.raises(jsonschema.ValidationError):  # the schema can fail: a result with a wrong field type
        _check(out_schema, {**result, "usage": {**result["usage"], "prompt_tokens": "3"}})
    with pytest.raises(jsonschema.ValidationError):  # every result says why it ended
        _check(out_schema, {k: v for k, v in result.items() if k != "finish_reason"})


def test_a_result_with_tool_calls_validates(llm, out_schema):
    """A random model never writes a call: push a real call's tokens through generate's output stage."""
    req = validate(llm, {"prompt": "Weather?", "max_tokens": 64, "logprobs": True,
                         "tools": [{"name": "get_weather", "parameters": {"type": "object"}}]})
    out = Output(llm, req)
    ids = llm.tokenizer.encode('[get_weather(city="Paris")]') + [llm.tokenizer.eot_id]
    chunks = []
    for i, token in enumerate(ids):
        out.push(token, i == len(ids) - 1, (-0.5, [(token, -0.5)]))
        chunks += list(out.chunks())
    result = _collect(chunks)
    assert result["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    _check(out_schema, result)
    for c in chunks:
        _check({**out_schema["$defs"]["chunk"], "$defs": out_schema["$defs"]}, c)
