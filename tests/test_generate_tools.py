"""Tool calls in generate's output stage: token ids of a model answer in, chunks and tool_calls out.

A random model never writes a tool call, so these tests feed the real Llama 3 token ids of answers
through the same output stage generate() and streaming use.
"""

import pytest

import llama32
from llama32.generate import _collect
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
        complete = out.push(token, i == len(ids) - 1)
        chunks += list(out.chunks())
        if complete:  # the loop retires the row here
            break
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


# --- tool calls after prose, and stop strings, in the same output stage ----------------------------------------------


@pytest.mark.parametrize("text, prose", [
    ('Let me check that for you.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
     "Let me check that for you."),
    ('Sure! <function=get_weather>{"city": "Paris"}</function>', "Sure!"),
])
def test_call_after_prose_is_extracted(llm, text, prose):
    """Prose is released as it comes; from the call marker on the text is held, then parsed as a call."""
    assert llama32.parse_tool_calls(text) == CALL
    chunks, result = answer(llm, text, tools=[WEATHER])
    assert result == {"response": prose, "tool_calls": CALL}
    assert _collect(chunks) == {"response": prose, "tool_calls": CALL, "usage": chunks[-1]["usage"]}
    assert len([c for c in chunks if c["response"]]) >= 2  # the prose streamed before the call was known
    assert all("<" not in c["response"] for c in chunks)  # no part of the call was shown


def test_marker_that_is_not_a_call_is_released_at_the_end(llm):
    text = "Use <function=...> tags, like this."
    _, result = answer(llm, text, tools=[WEATHER])
    assert result == {"response": text, "tool_calls": []}


@pytest.mark.parametrize("stop, want", [
    ("Paris", "The weather in "),
    (["rain", "mild"], "The weather in Paris is "),
    ([" in Paris is m"], "The weather"),  # spans several tokens
    ("snow", "The weather in Paris is mild today, with light rain in the evening."),  # never appears
])
def test_stop_strings_cut_the_text_and_never_stream_a_part(llm, stop, want):
    text = "The weather in Paris is mild today, with light rain in the evening."
    chunks, result = answer(llm, text, stop=stop)
    assert result["response"] == want
    stopped = want != text
    n_tokens = len(llm.tokenizer.encode(text)) + 1
    used = chunks[-1]["usage"]["completion_tokens"]
    assert (used < n_tokens) if stopped else (used == n_tokens)
    shown = ""
    for c in chunks:  # at no point did the stream show text beyond the cut
        shown += c["response"]
        assert want.startswith(shown)


def test_logprob_entries_ride_with_their_text(llm):
    """Each chunk carries the entries of the tokens whose text it carries; all entries, one per token."""
    req = validate(llm, dict(prompt="Hi", max_tokens=64, logprobs=True, top_logprobs=2))
    out = Output(llm, req)
    ids = llm.tokenizer.encode("Hello, world! Café") + [llm.tokenizer.eot_id]
    chunks = []
    for i, token in enumerate(ids):
        out.push(token, i == len(ids) - 1, (-0.5 - i, [(token, -0.5 - i), (7, -3.0)]))
        chunks += list(out.chunks())
    entries = [e for c in chunks for e in c["logprobs"]]
    assert [e["id"] for e in entries] == ids
    assert [e["logprob"] for e in entries] == [-0.5 - i for i in range(len(ids))]
    assert entries[0]["top_logprobs"] == [{"token": llm.tokenizer.decode([ids[0]]), "id": ids[0], "logprob": -0.5},
                                          {"token": llm.tokenizer.decode([7]), "id": 7, "logprob": -3.0}]
    for c in chunks:  # a chunk's entries spell its text
        assert "".join(e["token"] for e in c["logprobs"] if e["id"] != llm.tokenizer.eot_id) == c["response"]
