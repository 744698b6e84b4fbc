"""Request validation: every bad request is an InvalidRequest naming its field, raised before any compute."""

import math

import pytest

import llama32
from fixtures import without_cached
from llama32 import InvalidRequest
from llama32.engine import BLOCK


@pytest.fixture(scope="module")
def llm(make_checkpoint, llama3_tokenizer_dir):
    # a tiny random Llama 3.2-shaped model with the real tokenizer; its context is 256 tokens
    return llama32.load(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), dtype="float32")


OK = {"prompt": "Hi"}
BAD = [
    # (request, field named in the message)
    ({"prompt": "Hi", "foo": 1}, "foo"),
    ({}, "prompt"),
    ({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}, "messages"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 131073}, "prompt"),
    ({"prompt": "Hi", "raw": "yes"}, "raw"),
    ({"messages": [{"role": "user", "content": "Hi"}], "raw": True}, "raw"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": ["Hi"]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 131073}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "Hi", "colour": "red"}]}, "messages[0]"),
    ({"prompt": "Hi", "tools": {"name": "f"}}, "tools"),
    ({"prompt": "Hi", "tools": [{"description": "no name"}]}, "tools[0]"),
    ({"prompt": "Hi", "tools": [{"name": "f", "parameters": "x"}]}, "tools[0].parameters"),
    ({"prompt": "Hi", "functions": [{"name": "f"}]}, "functions[0].code"),
    ({"prompt": "Hi", "functions": [{"name": 3, "code": "x"}]}, "functions[0].name"),
    ({"prompt": "Hi", "functions": "f"}, "functions"),
    ({"prompt": "Hi", "stream": 1}, "stream"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": "10"}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": True}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 10_000}, "max_tokens"),  # beyond the 256-token context
    ({"prompt": "Hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "Hi", "temperature": 5.01}, "temperature"),
    ({"prompt": "Hi", "temperature": math.nan}, "temperature"),
    ({"prompt": "Hi", "temperature": math.inf}, "temperature"),
    ({"prompt": "Hi", "temperature": True}, "temperature"),
    ({"prompt": "Hi", "temperature": "0.5"}, "temperature"),
    ({"prompt": "Hi", "top_p": -0.01}, "top_p"),
    ({"prompt": "Hi", "top_p": 2.5}, "top_p"),
    ({"prompt": "Hi", "top_p": math.nan}, "top_p"),
    ({"prompt": "Hi", "top_k": 0}, "top_k"),
    ({"prompt": "Hi", "top_k": 51}, "top_k"),
    ({"prompt": "Hi", "top_k": 5.0}, "top_k"),
    ({"prompt": "Hi", "top_k": False}, "top_k"),
    ({"prompt": "Hi", "seed": 0}, "seed"),
    ({"prompt": "Hi", "seed": 10_000_000_000}, "seed"),
    ({"prompt": "Hi", "seed": 3.0}, "seed"),
    ({"prompt": "Hi", "repetition_penalty": -1}, "repetition_penalty"),
    ({"prompt": "Hi", "repetition_penalty": 2.1}, "repetition_penalty"),
    ({"prompt": "Hi", "repetition_penalty": math.inf}, "repetition_penalty"),
    ({"prompt": "Hi", "frequency_penalty": 3}, "frequency_penalty"),
    ({"prompt": "Hi", "frequency_penalty": -math.inf}, "frequency_penalty"),
    ({"prompt": "Hi", "presence_penalty": -0.5}, "presence_penalty"),
    ({"prompt": "Hi", "presence_penalty": True}, "presence_penalty"),
    ({"prompt": "Hi", "lora": "no-such-adapter", "max_tokens": 8}, "lora"),
    ({"prompt": "Hi", "lora": 7}, "lora"),
    ({"prompt": "<|image|> what is this?", "raw": True}, "prompt"),  # a token past the text vocabulary
    ({"prompt": "Hi", "logit_bias": [[5, 1]]}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"5": "1"}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"5": True}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"-1": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"1.0": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"hello": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"128256": 1}}, "logit_bias"),  # the vocabulary is 128256 ids
    ({"prompt": "Hi", "logit_bias": {"7": 1, 7: 2}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": {}}},
                                                         {"function": {"name": "b", "arguments": {}}}]}],
      "tools": [{"name": "a"}]}, "tool_calls"),
]


@pytest.mark.parametrize("request_, field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_request_names_its_field(llm, request_, field):
    with pytest.raises(InvalidRequest) as info:
        llama32.generate(llm, **request_)
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_streaming_requests_are_validated_before_returning(llm):
    with pytest.raises(InvalidRequest, match="temperature"):
        llama32.generate(llm, prompt="Hi", stream=True, temperature=-1)


def test_context_error_says_how_much_fits(llm):
    with pytest.raises(InvalidRequest, match=r"max_tokens.*context of 256 tokens.*at most \d+"):
        llama32.generate(llm, prompt="Hi", max_tokens=256)
    with pytest.raises(InvalidRequest, match=r"prompt is 3\d\d tokens, .*context of 256 tokens"):
        llama32.generate(llm, prompt="word " * 300, max_tokens=1)


EDGES = [
    {"temperature": 0}, {"temperature": 5}, {"top_p": 0}, {"top_p": 2}, {"top_k": 1}, {"top_k": 50},
    {"seed": 1}, {"seed": 9999999999}, {"repetition_penalty": 0}, {"repetition_penalty": 2},
    {"frequency_penalty": 0}, {"frequency_penalty": 2}, {"presence_penalty": 0}, {"presence_penalty": 2},
    {"top_p": 0.5, "top_k": 10, "temperature": 1.2, "seed": 3, "repetition_penalty": 1.1,
     "frequency_penalty": 0.3, "presence_penalty": 0.2},
    {"temperature": None, "top_p": None, "seed": None},  # JSON nulls mean unset
    {"logit_bias": {"15": -100, 16: 100, "128255": 0.5}}, {"logit_bias": {str(i): 1 for i in range(300)}},
    {"logit_bias": {}}, {"logit_bias": None},
]


@pytest.mark.parametrize("extra", EDGES, ids=[",".join(f"{k}={v}" for k, v in e.items()) for e in EDGES])
def test_edge_values_accepted(llm, extra):
    out = llama32.generate(llm, prompt="Hi", max_tokens=2, **extra)
    assert set(out) == {"response", "tool_calls", "finish_reason", "usage"}
    assert 1 <= out["usage"]["completion_tokens"] <= 2
    assert out["finish_reason"] in ("stop", "length")
    cached = out["usage"]["cached_tokens"]  # "Hi" again: its prompt's first blocks may be reused
    assert isinstance(cached, int) and cached % BLOCK == 0 and 0 <= cached < out["usage"]["prompt_tokens"]


def test_rejected_request_leaves_model_usable(llm):
    before = llama32.generate(llm, prompt="Tell me a story", temperature=0, max_tokens=12)
    dense = lambda t: t.to_dense() if t.is_mkldnn else t.clone()  # noqa: E731  (CPU weights may be packed)
    params = {k: dense(v) for k, v in llm.model.state_dict().items()}
    for bad, _ in BAD:
        with pytest.raises(InvalidRequest):
            llm.generate(**bad)
    assert all(dense(v).equal(params[k]) for k, v in llm.model.state_dict().items())
    after = llama32.generate(llm, prompt="Tell me a story", temperature=0, max_tokens=12)
    assert without_cached(after) == without_cached(before)


def test_a_stream_abandoned_midway_leaves_model_usable(llm):
    before = llama32.generate(llm, prompt="Count", temperature=0, max_tokens=10)
    it = llama32.generate(llm, prompt="Other", temperature=0, max_tokens=10, stream=True)
    next(it)
    del it
    assert without_cached(llama32.generate(llm, prompt="Count", temperature=0, max_tokens=10)) == without_cached(before)


def test_chat_request_uses_the_template(llm):
    out = llama32.generate(llm, messages=[{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
    rendered = llama32.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert out["usage"]["prompt_tokens"] == len(llm.tokenizer.encode(rendered))
    raw = llama32.generate(llm, prompt=rendered, raw=True, max_tokens=3, temperature=0)
    # a raw prompt that already starts with <|begin_of_text|> gets no second one
    assert without_cached(raw) == without_cached(out)
