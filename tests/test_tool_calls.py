"""parse_tool_calls / split_tool_calls on the three Llama 3 call forms, and on text that must not count as a call."""

from __future__ import annotations

import pytest

from llama32.chat import parse_tool_calls, split_tool_calls

PARIS = [{"name": "get_weather", "arguments": {"city": "Paris"}}]

CALLS = [
    # JSON, the format the template asks for
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', PARIS),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', PARIS),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>', PARIS),
    ('\n  {"name": "get_weather", "parameters": {"city": "Paris"}}  <|eot_id|>\n', PARIS),
    ('{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}', PARIS),
    ('{"name": "get_time", "parameters": {}}', [{"name": "get_time", "arguments": {}}]),
    ('{"name": "f", "parameters": {"q": "東京 🦙", "n": [1, 2.5, null, true]}}',
     [{"name": "f", "arguments": {"q": "東京 🦙", "n": [1, 2.5, None, True]}}]),
    ('[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "arguments": {}}]',
     [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]),
    ('{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
     [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]),
    ('{"name": "a", "parameters": {"x": 1}}\n{"name": "b", "parameters": {}}\n',
     [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]),
    # pythonic, what Llama 3.2 1B/3B emit
    ("[get_weather(city='Paris'), sum(a=1, b=2.5)]",
     [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "sum", "arguments": {"a": 1, "b": 2.5}}]),
    ('get_weather(city="Paris")', PARIS),
    ("<|python_tag|>[get_weather(city='Paris')]<|eom_id|>", PARIS),
    ("[get_time()]", [{"name": "get_time", "arguments": {}}]),
    ("f(a=-1, b=[1, (2, 3)], c={'k': None}, d=True, e='é')",
     [{"name": "f", "arguments": {"a": -1, "b": [1, [2, 3]], "c": {"k": None}, "d": True, "e": "é"}}]),
    ("f(a=true, b=false, c=null)", [{"name": "f", "arguments": {"a": True, "b": False, "c": None}}]),
    # <function=...> tags
    ('<function=get_weather>{"city": "Paris"}</function>', PARIS),
    ('<function=a>{"x": 1}</function><function=b>{}</function>',
     [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]),
    ("<function=get_time></function>", [{"name": "get_time", "arguments": {}}]),
    ('<|python_tag|><function=get_weather>{"city": "Paris"}</function><|eom_id|>', PARIS),
]

NOT_CALLS = [
    "", "   ", "The weather in Paris is sunny.", "Hello!<|eot_id|>",
    "[1, 2]", "[]", "{}", "42", '"get_weather"', "null",
    # attribute, nested and positional calls, splats, non-literals
    "os.system('rm -rf /')", "[os.system(cmd='rm -rf /')]", "__import__('os').system('ls')",
    "f(g(1))", "f(x=g(1))", "f(x=__import__('os'))", "f(x=lambda: 1)", "f(x=y)", "f(x=1+a)",
    "get_weather('Paris')", "f(**{'a': 1})", "f(*args)", "f(a=1)(b=2)", "[f(a=1), 2]",
    "f(a=1); g(b=2)", "f(x={1, 2})", "f(x=b'a')", "f(x={1: 'a'})", "f(x=...)", "f(a=1, a=2)",
    "print('hello')", "<|python_tag|>print('hi')",
    # JSON that is not a call
    '{"name": "get_weather", "parameters": {"city": "Paris"}',
    '{"parameters": {"city": "Paris"}}', '{"name": "", "parameters": {}}', '{"name": 3, "parameters": {}}',
    '{"name": "f", "parameters": [1]}', '{"name": "f", "parameters": "{\\"a\\": 1}"}',
    '{"name": "Bob", "age": 3}', '{"type": "person", "name": "Bob", "parameters": {}}', '{"name": "f"}',
    '{"name": "f", "parameters": {}, "extra": 1}',
    '[{"name": "a", "parameters": {}}, 3]', '{"name": "a", "parameters": {}} trailing prose',
    'Sure! {"name": "get_weather", "parameters": {"city": "Paris"}}',
    # broken tags
    "<function=f>{oops}</function>", "<function=f>[1]</function>", "<function=f>{}",
    # hostile sizes: deep nesting must not crash
    "[" * 10_000, "f(x=" + "[" * 10_000 + "]" * 10_000 + ")",
    '{"name": "f", "parameters": ' + "[" * 100_000 + "]" * 100_000 + "}",
]


@pytest.mark.parametrize("text, want", CALLS)
def test_parse_tool_calls(text, want):
    assert parse_tool_calls(text) == want


@pytest.mark.parametrize("text", NOT_CALLS)
def test_not_a_call(text):
    assert parse_tool_calls(text) == []


ALLOWED = {"get_weather", "get_time"}

SPLITS = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', ALLOWED, ("", PARIS)),
    ("[get_weather(city='Paris')]<|eom_id|>", ALLOWED, ("", PARIS)),
    # prose before <|python_tag|> is the remaining text
    ("Let me check. <|python_tag|>[get_weather(city='Paris')]", ALLOWED, ("Let me check.", PARIS)),
    # text around <function=...> tags is the remaining text
    ('I will look it up.\n<function=get_weather>{"city": "Paris"}</function>\n', ALLOWED,
     ("I will look it up.", PARIS)),
    # a name that was not offered: plain text, untouched
    ("[os_system(cmd='ls')]", ALLOWED, ("[os_system(cmd='ls')]", [])),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', set(),
     ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [])),
    # all or nothing: one unoffered name makes the whole answer text
    ("[get_weather(city='Paris'), delete_all()]", ALLOWED, ("[get_weather(city='Paris'), delete_all()]", [])),
    ("Paris is sunny today.", ALLOWED, ("Paris is sunny today.", [])),
    ("<|python_tag|>print('hi') ", ALLOWED, ("<|python_tag|>print('hi') ", [])),
    ("  \n", ALLOWED, ("  \n", [])),
]


@pytest.mark.parametrize("text, allowed, want", SPLITS)
def test_split_tool_calls(text, allowed, want):
    assert split_tool_calls(text, allowed) == want


def test_split_accepts_any_collection_of_names():
    text = "[get_weather(city='Paris')]"
    assert split_tool_calls(text, ["get_weather"]) == split_tool_calls(text, frozenset({"get_weather"})) == ("", PARIS)
