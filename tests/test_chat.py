"""render_chat against prompts written out by hand, and against the official template run by transformers."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama32.chat import functions_to_tools, render_chat, tool_names
from llama32.errors import InvalidRequest

# The official Llama 3.2 instruct chat template (the `chat_template` of meta-llama/Llama-3.2-1B-Instruct's
# tokenizer_config.json), the oracle: a byte-for-byte copy kept in the repository, pinned by its SHA-256.
TEMPLATE = Path(__file__).resolve().parent / "data" / "llama-3.2-instruct-chat-template.jinja"
TEMPLATE_SHA256 = "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4"
DATE = "26 Jul 2024"

WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
# OpenAI shape, keys deliberately out of alphabetical order, non-ASCII kept.
TIME_FN = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}},
                                            "description": "Heure à Zürich"}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

# --- hand-written expected prompts ------------------------------------------------------------------------------------

SYS_NO_TOOLS = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")
SYS_TOOLS = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
             "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")
TOOLS_INTRO = ("<|start_header_id|>user<|end_header_id|>\n\n"
               "Given the following functions, please respond with a JSON for a function call with its proper "
               "arguments that best answers the given prompt.\n\n"
               'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
               'value}.Do not use variables.\n\n')
WEATHER_JSON = """{
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {
                "type": "string"
            }
        },
        "required": [
            "city"
        ]
    }
}

"""
TIME_JSON = """{
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {}
        },
        "description": "Heure à Zürich"
    }
}

"""
ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"

CASES = {
    "user only: system header still emitted": (
        [{"role": "user", "content": "Hi"}], None,
        SYS_NO_TOOLS + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" + ASSISTANT),
    "system and user trimmed": (
        [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": "\n What is 2+2? \t"}], None,
        SYS_NO_TOOLS + "You are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        + ASSISTANT),
    "multi-turn": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello! "}, {"role": "user", "content": "Bye"}], None,
        SYS_NO_TOOLS + "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>" + ASSISTANT),
    "system message only": (
        [{"role": "system", "content": "Be brief."}], None,
        SYS_NO_TOOLS + "Be brief.<|eot_id|>" + ASSISTANT),
    "a later system message is a plain turn": (
        [{"role": "user", "content": "Hi"}, {"role": "system", "content": " Now in French. "}], None,
        SYS_NO_TOOLS + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>system<|end_header_id|>\n\nNow in French.<|eot_id|>" + ASSISTANT),
    "unicode content kept": (
        [{"role": "user", "content": "Où est 東京? 🦙"}], None,
        SYS_NO_TOOLS + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nOù est 東京? 🦙<|eot_id|>"
        + ASSISTANT),
    "tools in the first user message": (
        [{"role": "system", "content": "Use tools."}, {"role": "user", "content": " Weather in Paris? "}], [WEATHER],
        SYS_TOOLS + "Use tools.<|eot_id|>" + TOOLS_INTRO + WEATHER_JSON + "Weather in Paris?<|eot_id|>" + ASSISTANT),
    "two tools, OpenAI shape dumped as given": (
        [{"role": "user", "content": "Time?"}], [WEATHER, TIME_FN],
        SYS_TOOLS + "<|eot_id|>" + TOOLS_INTRO + WEATHER_JSON + TIME_JSON + "Time?<|eot_id|>" + ASSISTANT),
    "empty tools list still switches tools on": (
        [{"role": "user", "content": "Hi"}], [],
        SYS_TOOLS + "<|eot_id|>" + TOOLS_INTRO + "Hi<|eot_id|>" + ASSISTANT),
    "tool call, dict result, answer": (
        [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "tool_calls": [CALL]},
         {"role": "tool", "content": {"temp_c": 21, "sky": "clair"}},
         {"role": "assistant", "content": "It is 21°C."}, {"role": "user", "content": "Thanks"}], [WEATHER],
        SYS_TOOLS + "<|eot_id|>" + TOOLS_INTRO + WEATHER_JSON + "Weather in Paris?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        "<|eot_id|>"
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp_c": 21, "sky": "clair"}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 21°C.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nThanks<|eot_id|>" + ASSISTANT),
    "string tool result is JSON-quoted, not trimmed": (
        [{"role": "user", "content": "Q"}, {"role": "tool", "content": ' 21 "C"\n'}], None,
        SYS_NO_TOOLS + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
        '<|start_header_id|>ipython<|end_header_id|>\n\n" 21 \\"C\\"\\n"<|eot_id|>' + ASSISTANT),
    "ipython role with a list result": (
        [{"role": "user", "content": "Q"}, {"role": "ipython", "content": [1, "été", None]}], None,
        SYS_NO_TOOLS + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
        '<|start_header_id|>ipython<|end_header_id|>\n\n[1, "été", null]<|eot_id|>' + ASSISTANT),
    "OpenAI arguments as a JSON string, content dropped": (
        [{"role": "user", "content": "Q"},
         {"role": "assistant", "content": "Let me check.",
          "tool_calls": [{"id": "c1", "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city":"Zürich","days":2}'}}]}], None,
        SYS_NO_TOOLS + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
        '{"city": "Zürich", "days": 2}}<|eot_id|>' + ASSISTANT),
    "flat call as generate() returns it": (
        [{"role": "user", "content": "Q"},
         {"role": "assistant", "tool_calls": [{"name": "get_time", "arguments": {}}]}], None,
        SYS_NO_TOOLS + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_time", "parameters": {}}<|eot_id|>'
        + ASSISTANT),
    "tool_calls None or empty means a plain turn": (
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "tool_calls": None},
         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "tool_calls": []}], None,
        SYS_NO_TOOLS + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>" + ASSISTANT),
    "functions offered as tools": (
        [{"role": "user", "content": "Add 1 and 2"}],
        functions_to_tools([{"name": "add", "code": "function add(a, b) { return a + b }"}]),
        SYS_TOOLS + "<|eot_id|>" + TOOLS_INTRO + """{
    "type": "function",
    "function": {
        "name": "add",
        "description": "Defined by the following code:\\nfunction add(a, b) { return a + b }",
        "parameters": {
            "type": "object"
        }
    }
}

Add 1 and 2<|eot_id|>""" + ASSISTANT),
}


@pytest.mark.parametrize("name", list(CASES))
def test_render_chat_by_hand(name):
    messages, tools, want = CASES[name]
    assert render_chat(messages, tools, date_string=DATE) == want


def test_default_date_is_today():
    before = datetime.now().strftime("%d %b %Y")
    text = render_chat([{"role": "user", "content": "Hi"}])
    after = datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {before}\n" in text or f"Today Date: {after}\n" in text


def test_tool_names():
    assert tool_names([WEATHER, TIME_FN]) == ["get_weather", "get_time"]


ERRORS = [
    ([], None, "messages"),
    ("hi", None, "messages"),
    ([{"role": "user", "content": "a"}, "b"], None, r"messages\[1\]"),
    ([{"role": "bot", "content": "a"}], None, r"messages\[0\]\.role"),
    ([{"content": "a"}], None, r"messages\[0\]\.role"),
    ([{"role": "user", "content": ["a"]}], None, r"messages\[0\]\.content"),
    ([{"role": "user"}], None, r"messages\[0\]\.content"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": 3}], None, r"messages\[1\]\.content"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": {"x": {1, 2}}}], None, r"messages\[1\]\.content"),
    # The template's own error: one tool call per turn.
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [CALL, CALL]}], None,
     r"messages\[1\]\.tool_calls"),
    ([{"role": "user", "content": "a", "tool_calls": [CALL]}], None, r"messages\[0\]\.tool_calls"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}], None,
     r"messages\[0\]\.tool_calls\[0\]\.function\.name"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}], None,
     r"messages\[0\]\.tool_calls\[0\]\.function\.arguments"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}], None,
     r"messages\[0\]\.tool_calls\[0\]\.function\.arguments"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"name": "f", "arguments": {"x": {1}}}]}],
     None, r"messages\[1\]\.tool_calls\[0\]\.arguments"),
    ([{"role": "assistant", "tool_calls": "f()"}], None, r"messages\[0\]\.tool_calls"),
    # The template's own error: tools but no user message to put them in.
    ([{"role": "system", "content": "s"}], [WEATHER], "tools"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], [WEATHER], r"messages\[1\]\.role"),
    ([{"role": "user", "content": "a"}], WEATHER, "tools"),
    ([{"role": "user", "content": "a"}], ["get_weather"], r"tools\[0\]"),
    ([{"role": "user", "content": "a"}], [{"description": "no name"}], r"tools\[0\]\.name"),
    ([{"role": "user", "content": "a"}], [{"type": "function", "function": {"name": 3}}],
     r"tools\[0\]\.function\.name"),
]


@pytest.mark.parametrize("messages, tools, field", ERRORS)
def test_render_chat_errors(messages, tools, field):
    with pytest.raises(InvalidRequest, match=field):
        render_chat(messages, tools, date_string=DATE)


@pytest.mark.parametrize("functions, field", [
    ({"name": "f", "code": "x"}, "functions"),
    (["f"], r"functions\[0\]"),
    ([{"name": "f"}], r"functions\[0\]\.code"),
    ([{"code": "x"}], r"functions\[0\]\.name"),
    ([{"name": "", "code": "x"}], r"functions\[0\]\.name"),
    ([{"name": "f", "code": 1}], r"functions\[0\]\.code"),
])
def test_functions_errors(functions, field):
    with pytest.raises(InvalidRequest, match=field):
        functions_to_tools(functions)


# --- cross-check against the official template, rendered the way transformers renders it ------------------------------

@pytest.fixture(scope="module")
def hf_render():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                               chat_template=TEMPLATE.read_text())

    def render(messages, tools=None, **kwargs):
        return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
    return render


# The hand-written cases the raw template renders the same way (not: string arguments, flat calls,
# tool_calls None/[], which are this module's documented choices).
SAME_AS_TEMPLATE = [n for n in CASES if n not in {"OpenAI arguments as a JSON string, content dropped",
                                                  "flat call as generate() returns it",
                                                  "tool_calls None or empty means a plain turn"}]


@pytest.mark.parametrize("name", SAME_AS_TEMPLATE)
def test_matches_transformers(hf_render, name):
    messages, tools, _ = CASES[name]
    assert render_chat(messages, tools, date_string=DATE) == hf_render(messages, tools, date_string=DATE)


def test_string_arguments_render_like_dict_arguments(hf_render):
    as_string = [{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "n": [1, 2]}'}}]}]
    as_dict = [{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "n": [1, 2]}}}]}]
    assert render_chat(as_string, date_string=DATE) == hf_render(as_dict, date_string=DATE)


def test_default_date_matches_transformers(hf_render):
    messages = [{"role": "user", "content": "Hi"}]
    assert render_chat(messages) == hf_render(messages)


@pytest.mark.parametrize("messages, tools", [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [CALL, CALL]}], None),
    ([{"role": "system", "content": "s"}], [WEATHER]),
])
def test_template_errors_are_invalid_requests(hf_render, messages, tools):
    with pytest.raises(jinja2.TemplateError):
        hf_render(messages, tools, date_string=DATE)
    with pytest.raises(InvalidRequest):
        render_chat(messages, tools, date_string=DATE)


# Text with the whitespace the template trims, quotes and braces it must not touch, and non-ASCII.
_text = st.text(alphabet=st.sampled_from(list(" \t\n\r\u3000ab\"'{}<|>\\éü東🦙")), max_size=12)
_json = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | _text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=6)
_plain = st.builds(lambda role, content: {"role": role, "content": content},
                   st.sampled_from(["user", "assistant", "system"]), _text)
_tool_result = st.builds(lambda role, content: {"role": role, "content": content},
                         st.sampled_from(["tool", "ipython"]), _text | st.lists(_json, max_size=3)
                         | st.dictionaries(_text, _json, max_size=3))
_call = st.builds(lambda name, args: {"role": "assistant", "tool_calls": [
    {"type": "function", "function": {"name": name, "arguments": args}}]},
    st.sampled_from(["get_weather", "f"]), st.dictionaries(_text, _json, max_size=3))


@settings(max_examples=150, deadline=None)
@given(system=st.none() | _text, first=_text, rest=st.lists(_plain | _tool_result | _call, max_size=5),
       tools=st.none() | st.lists(st.sampled_from([WEATHER, TIME_FN]), max_size=2), date=_text)
def test_random_conversations_match_transformers(hf_render, system, first, rest, tools, date):
    messages = ([] if system is None else [{"role": "system", "content": system}])
    messages += [{"role": "user", "content": first}] + rest
    assert render_chat(messages, tools, date_string=date) == hf_render(messages, tools, date_string=date)


def test_template_copy_is_the_official_one():
    assert hashlib.sha256(TEMPLATE.read_bytes()).hexdigest() == TEMPLATE_SHA256
