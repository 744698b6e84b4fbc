"""Tool calls in generate's output stage: token ids of a model answer in, chunks and tool_calls out.

A random model never writes a tool call, so these tests feed the real Llama 3 token ids of answers
through the same output stage generate() and streaming use.
"""

import pytest
import torch

import llama32
from fixtures import without_cached
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
    assert chunks[-1]["finish_reason"] == "tool_calls"


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
    assert chunks[-1]["finish_reason"] == "stop"
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
    assert _collect(chunks) == {"response": prose, "tool_calls": CALL, "finish_reason": "tool_calls",
                                "usage": chunks[-1]["usage"]}
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


# --- every form and every peer case, token by token through the output stage -----------------------------------

from test_tool_calls import OFFERED, OWN, PEER_TOOLS, PEERS  # noqa: E402



def _peer_tools(text):
    """The peer tools the text names (all of them would not fit the tiny checkpoint's context)."""
    return [{"name": n} for n in PEER_TOOLS if n in text]

_END_TOKENS = ("<|eom_id|>", "<|eot_id|>")  # stop tokens: they end generation, so never part of an answer's text


def _without_end_tokens(text):
    for t in _END_TOKENS:
        text = text.replace(t, "")
    return text


@pytest.mark.parametrize("text, tools", [(_without_end_tokens(t), OFFERED) for t, _, _ in OWN]
                         + [(_without_end_tokens(p[1]), _peer_tools(p[1])) for p in PEERS])
def test_streamed_output_equals_the_parser(llm, text, tools):
    """The output stage (what generate and streams use) gives split_tool_calls' answer, and its chunks never
    show any part of a call: at every point the text shown so far is a prefix of the final response."""
    response, calls = llama32.split_tool_calls(text, tools)
    chunks, result = answer(llm, text, tools=tools)
    assert result == {"response": response, "tool_calls": calls}
    shown = ""
    for c in chunks:
        shown += c["response"]
        assert response.startswith(shown)


def test_tagged_calls_and_dict_calls_token_by_token(llm):
    text = ("Checking both.<|python_tag|>{'name': 'get_weather', 'arguments': {'city': 'Paris'}}"
            '<|python_tag|>{"name": "get_time", "parameters": {}}')
    chunks, result = answer(llm, text, tools=OFFERED)
    assert result == {"response": "Checking both.", "tool_calls": CALL + [{"name": "get_time", "arguments": {}}]}
    assert chunks[0]["response"] and len([c for c in chunks if c["response"]]) >= 2  # the prose streamed first


def test_prose_after_a_call_streams(llm):
    text = '[get_weather(city="Paris")] The forecast follows once the tool answers, in a moment or two.'
    chunks, result = answer(llm, text, tools=OFFERED)
    assert result == {"response": "The forecast follows once the tool answers, in a moment or two.",
                      "tool_calls": CALL}
    assert len([c for c in chunks if c["response"]]) > 3  # released as it came, once the call had closed


def test_a_json_object_that_is_not_a_call_is_released_when_it_closes(llm):
    text = 'Here is data: {"city": "Paris", "temp": 21} and more words after it, streaming along.'
    chunks, result = answer(llm, text, tools=OFFERED)
    assert result == {"response": text, "tool_calls": []}
    assert len([c for c in chunks if c["response"]]) > 3


def test_stop_string_inside_a_call_leaves_text(llm):
    """A stop string cuts the answer first; what is left of a call is then no call, and shows as text."""
    text = 'Sure: {"name": "get_weather", "parameters": {"city": "Paris"}}'
    _, result = answer(llm, text, tools=OFFERED, stop="Paris")
    assert result == {"response": 'Sure: {"name": "get_weather", "parameters": {"city": "', "tool_calls": []}


# --- generate itself, with a scripted answer ------------------------------------------------------------------

def _script(llm, request, text):
    """Make the model answer `text` (then <|eot_id|>) to `request` under greedy decoding: a hook on the model
    puts all the weight, at each position the answer is predicted from, on that position's scripted token.
    Returns the hook's handle (remove it after)."""
    ids = llm.tokenizer.encode(text) + [llm.tokenizer.eot_id]
    n_prompt = len(validate(llm, dict(request)).prompt_ids)

    def hook(module, args, kwargs, logits):
        input_ids = args[0] if args else kwargs["input_ids"]
        B, T = input_ids.shape
        pos = kwargs.get("input_pos")
        pos = torch.arange(T).expand(B, T) if pos is None else pos.cpu()
        at = kwargs.get("logits_at")
        last = pos[torch.arange(B), at.cpu()] if at is not None else pos[:, -1]
        logits = logits.clone()
        for b in range(B):
            g = int(last[b]) + 1 - n_prompt  # the index, in the answer, of the token predicted here
            if 0 <= g < len(ids):
                logits[b, -1] = -1e4
                logits[b, -1, ids[g]] = 1e4
        return logits

    return llm.model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("text, response, calls", [
    ("Let me check that.<|python_tag|>{'name': 'get_weather', 'arguments': {'city': 'Paris'}}",
     "Let me check that.", CALL),
    ('Here is the call: {"name": "get_weather", "parameters": {"city": "Paris"}} Anything else?',
     "Here is the call: Anything else?", CALL),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|python_tag|>[get_time()]', "",
     CALL + [{"name": "get_time", "arguments": {}}]),
    ('I know {"name": "delete_files", "parameters": {}} is not offered.',
     'I know {"name": "delete_files", "parameters": {}} is not offered.', []),
])
def test_generate_returns_calls_and_prose_streamed_and_not(llm, text, response, calls):
    tools = [WEATHER, {"type": "function", "function": {"name": "get_time", "description": "Now", "parameters": {}}}]
    request = dict(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, temperature=0,
                   max_tokens=64)
    handle = _script(llm, request, text)
    try:
        out = llama32.generate(llm, **request)
        stream = llama32.generate(llm, **request, stream=True)
        chunks = list(stream)
    finally:
        handle.remove()
    assert (out["response"], out["tool_calls"]) == (response, calls)
    assert out["usage"]["completion_tokens"] == len(llm.tokenizer.encode(text)) + 1
    assert "".join(c["response"] for c in chunks) == response
    assert chunks[-1].get("tool_calls", []) == calls
    assert without_cached(chunks[-1])["usage"] == without_cached(out)["usage"]
    assert stream.finish_reason == ("tool_calls" if calls else "stop")
