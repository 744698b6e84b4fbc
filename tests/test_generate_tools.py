"""Tool calls in generate's output stage: token ids of a model answer in, chunks and tool_calls out.

A random model never writes a tool call, so these tests feed the real Llama 3 token ids of answers
through the same output stage generate() and streaming use.
"""

import pytest

import llama32
from llama32.output import Output
from llama32.requests import validate

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture(scope="module")
def llm(make_checkpoint, llama3_tokenizer_dir):
    return llama32.load(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), dtype="float32")


def answer(llm, text, **request):
    """Push `text`'s tokens, then <|eot_id|>, through the output stage; return (chunks, result)."""
    req = validate(llm, dict(prompt="What is the weather?", max_tokens=64, **request))
    out = Output(llm, req)
    ids = llm.tokenizer.encode(text) + [llm.tokenizer.eot_id]
    chunks = []
    for i, token in enumerate(ids):
        out.push(token, i == len(ids) - 1)
        chunks += list(out.chunks())
    return chunks, {"response": "".join(c["response"] for c in chunks), "tool_calls": chunks[-1].get("tool_calls", [])}


CALL = [{"name": "get_weather", "arguments": {"city": "Paris"}}]


@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '[get_weather(city="Paris")]',
    '<function=get_weather>{"city": "Paris"}</function>',
])
def test_offered_call_is_extracted(llm, text):
    chunks, result = answer(llm, text, tools=[WEATHER])
    assert result == {"response": "", "tool_calls": CALL}
    assert chunks[-1]["usage"]["completion_tokens"] == len(llm.tokenizer.encode(text)) + 1


def test_functions_are_offered_as_tools(llm):
    _, result = answer(llm, '[get_weather(city="Paris")]', functions=[{"name": "get_weather", "code": "..."}])
    assert result["tool_calls"] == CALL


def test_call_to_a_name_not_offered_stays_text(llm):
    text = '{"name": "delete_files", "parameters": {"path": "/"}}'
    _, result = answer(llm, text, tools=[WEATHER])
    assert result == {"response": text, "tool_calls": []}


def test_without_tools_a_call_is_plain_text(llm):
    text = '[get_weather(city="Paris")]'
    chunks, result = answer(llm, text)
    assert result == {"response": text, "tool_calls": []}
    assert len(chunks) > 2  # streamed as it came, not held back


def test_prose_streams_even_when_tools_are_offered(llm):
    text = "The weather in Paris is mild today, with light rain in the evening."
    chunks, result = answer(llm, text, tools=[WEATHER])
    assert result == {"response": text, "tool_calls": []}
    assert len(chunks) > 5  # released as soon as it could not be a call
