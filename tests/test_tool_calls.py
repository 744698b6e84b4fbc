"""llama32.parse_tool_calls / split_tool_calls: every call form, calls inside prose with the offered tools, the
peer parsers' cases (vLLM's llama3_json and pythonic, SGLang's Llama 3.2 and pythonic detectors), text that
must not count as a call, and the streaming promise of the scanner behind them."""

from __future__ import annotations

import pytest

from llama32 import InvalidRequest, parse_tool_calls, split_tool_calls
from llama32.tool_calls import Scanner

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


# --- with the offered tools: calls count wherever they stand ------------------------------------------------------

WEATHER_TOOL = {"name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Now", "parameters": {}}}
OFFERED = [WEATHER_TOOL, TIME_TOOL]
TIME = {"name": "get_time", "arguments": {}}
BERLIN = {"name": "get_weather", "arguments": {"city": "Berlin"}}

# (text, remaining text, calls) with get_weather and get_time offered: one or more cases per form.
OWN = [
    # JSON, before, after and between prose
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", PARIS),
    ('Let me look. {"name": "get_weather", "parameters": {"city": "Paris"}}', "Let me look.", PARIS),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}\nI asked for Paris.', "I asked for Paris.", PARIS),
    ('First: {"name": "get_weather", "parameters": {"city": "Paris"}} then {"name": "get_time", "parameters": {}}.',
     "First: then .", PARIS + [TIME]),
    ('{"type": "function", "name": "get_weather", "arguments": {"city": "Paris"}} ok', "ok", PARIS),
    # several calls: `;`, new lines, a JSON list
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}', "",
     PARIS + [TIME]),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}\n{"name": "get_time", "parameters": {}}\n', "",
     PARIS + [TIME]),
    ('Both: [{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]',
     "Both:", PARIS + [TIME]),
    # each call after its own <|python_tag|>, with or without prose before, end tokens after
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|python_tag|>{"name": "get_time", '
     '"parameters": {}}<|eom_id|>', "", PARIS + [TIME]),
    ('Checking.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}};'
     '<|python_tag|>[get_time()]', "Checking.", PARIS + [TIME]),
    # Python dict literals, as the 1B model writes them
    ("{'name': 'get_weather', 'arguments': {'city': 'Paris'}}", "", PARIS),
    ("Sure: {'name': 'get_weather', 'parameters': {'city': 'Paris'}} Done.", "Sure: Done.", PARIS),
    ("<|python_tag|>{'name': 'get_time', 'parameters': {}}; {'name': 'get_weather', 'parameters': {'city': 'Berlin'}}",
     "", [TIME, BERLIN]),
    ("{'name': 'get_weather', 'parameters': {'city': 'Paris', 'days': (1, 2), 'metric': True, 'x': None}}", "",
     [{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], "metric": True, "x": None}}]),
    ("[{'name': 'get_weather', 'arguments': {'city': 'Paris'}}]", "", PARIS),
    # pythonic lists, after and between prose; a bare call as the whole answer
    ("[get_weather(city='Paris'), get_time()]", "", PARIS + [TIME]),
    ("I'll check both. [get_weather(city='Paris')] and then [get_time()]", "I'll check both. and then",
     PARIS + [TIME]),
    ("[get_weather(city='Paris')]\n\nLet me know if you need more.", "Let me know if you need more.", PARIS),
    ('get_weather(city="Paris")', "", PARIS),
    ('  get_weather(city="Paris")<|eot_id|>', "", PARIS),
    ('<|python_tag|>get_weather(city="Paris")<|python_tag|>get_time()', "", PARIS + [TIME]),
    # <function=...> tags
    ('I will look it up.\n<function=get_weather>{"city": "Paris"}</function>\nOne moment.',
     "I will look it up.\nOne moment.", PARIS),
    ("<function=get_weather>{'city': 'Paris'}</function><function=get_time></function>", "", PARIS + [TIME]),
    # a call, then text that is not one
    ('{"name": "get_weather", "parameters": {"city": "Paris"}} (I used {"city": "Paris"} as input)',
     '(I used {"city": "Paris"} as input)', PARIS),
]


@pytest.mark.parametrize("text, remaining, calls", OWN)
def test_offered_calls_anywhere(text, remaining, calls):
    assert split_tool_calls(text, OFFERED) == (remaining, calls)
    assert parse_tool_calls(text, OFFERED) == calls


# Text that must stay text (untouched, no calls) with get_weather and get_time offered.
NO_FALSE_CALLS = [
    # JSON objects that call no offered tool, or lack the call's keys
    '{"name": "delete_files", "parameters": {"path": "/"}}',
    'Sure: {"name": "delete_files", "arguments": {}} done',
    '{"name": "get_weather"}', '{"name": "get_weather", "parameters": {"city": "Paris"}, "extra": 1}',
    '{"name": "get_weather", "parameters": "Paris"}', '{"city": "Paris", "name": "get_weather"}',
    '{"type": "tool", "name": "get_weather", "parameters": {}}', '{"tool": "get_weather", "args": {"city": "Paris"}}',
    '{"parameters": {"city": "Paris"}}', '{"weather": {"name": "get_weather", "parameters": {}}}',
    '[{"name": "get_weather", "parameters": {}}, {"name": "delete_files", "parameters": {}}]',
    '[{"name": "get_weather", "parameters": {}}, 3]',
    "{'name': 'get_weather', 'arguments': {'city': open('x')}}",
    '{"name": "get_weather", "parameters": {"n": NaN}}', "{'name': 'get_weather', 'parameters': {'n': 1e999}}",
    '{"name": "get_weather", "parameters": {"n": 1e999}}', '<function=get_weather>{"n": -Infinity}</function>',
    # prose that mentions a tool, even with parentheses
    "You can use get_weather to find the weather in Paris.",
    "I would call get_weather(city='Paris') for that.",
    "get_weather(city='Paris') is the call you want.",
    "The get_time() function returns the time. [get_time is a tool]",
    "Tools: [get_weather, get_time]", "[get_weather]", "[get_weather(city='Paris'), delete_all()]",
    "[get_weather('Paris')]", "[get_weather(city=)]", "[get_weather(city=city)]", "[os.get_weather(city='x')]",
    "<function=delete_files>{}</function>", "<function=get_weather>[1]</function>",
    "<function=get_weather>{\"city\": \"Paris\"}", "Use <function=...> tags like this.",
    "<|python_tag|>print('hi')", "<|python_tag|>", "Let me check.<|python_tag|>",
    "<|python_tag|>get_weather(city='Paris') and more", "{it's} [not] <a call>", "{", "[", "<",
    # deep nesting, a broken string
    "{\"name\": \"get_weather\", \"parameters\": " + "[" * 5000 + "]" * 5000 + "}",
    "[get_weather(city='Paris)]",
]


@pytest.mark.parametrize("text", NO_FALSE_CALLS)
def test_no_false_calls(text):
    assert split_tool_calls(text, OFFERED) == (text, [])


def test_tools_in_every_shape():
    text = "Here: [get_weather(city='Paris')]"
    want = ("Here:", PARIS)
    functions = [{"name": "get_weather", "code": "def get_weather(city): ..."}]
    for tools in ([WEATHER_TOOL], [{"type": "function", "function": WEATHER_TOOL}], functions, ["get_weather"],
                  {"get_weather"}, frozenset({"get_weather", "get_time"}), ("get_weather",)):
        assert split_tool_calls(text, tools) == want
    assert split_tool_calls(text, []) == (text, [])  # nothing offered: nothing counts
    assert split_tool_calls(text, ["get_time"]) == (text, [])
    assert split_tool_calls(text) == (text, [])  # no tools: the whole answer must be calls


@pytest.mark.parametrize("tools, field", [
    ("get_weather", "tools"), ({"name": "get_weather"}, "tools"), ([3], r"tools\[0\]"),
    ([{"description": "x"}], r"tools\[0\]\.name"), ([{"function": {"name": ""}}], r"tools\[0\]\.function\.name"),
])
def test_bad_tools_are_invalid_requests(tools, field):
    with pytest.raises(InvalidRequest, match=field):
        split_tool_calls("[get_weather(city='Paris')]", tools)


def test_text_must_be_a_string():
    with pytest.raises(InvalidRequest, match="text"):
        parse_tool_calls(None)


# Without tools: the whole answer must be calls; several tagged calls and dict literals count too.
WHOLE = [
    ('<|python_tag|>{"name": "a", "parameters": {}}<|python_tag|>{"name": "b", "parameters": {"x": 1}}',
     ("", [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}])),
    ("{'name': 'get_weather', 'arguments': {'city': 'Paris'}}", ("", PARIS)),
    ("Let me see.<|python_tag|>{'name': 'get_weather', 'arguments': {'city': 'Paris'}}", ("Let me see.", PARIS)),
    ('<|python_tag|>{"name": "a", "parameters": {}} and prose <|python_tag|>{"name": "b", "parameters": {}}', None),
    ('{"name": "a", "parameters": {}} and prose', None),
    ('Prose first. {"name": "a", "parameters": {}}', None),
]


@pytest.mark.parametrize("text, want", WHOLE)
def test_whole_answer_without_tools(text, want):
    assert split_tool_calls(text) == (want or (text, []))


# --- the peers' cases, in this project's words ----------------------------------------------------------------------
# Each row: (source and case, text, offered names, remaining text, calls). Where llama32 differs from the peer the
# row holds llama32's answer and a comment says what the peer does and why llama32 does not.

def _c(_name, **arguments):
    return {"name": _name, "arguments": arguments}


PEER_TOOLS = ["getOpenIncidentsTool", "searchTool", "complexTool", "simpleTool", "parserTool", "invalidTool",
              "toolWithoutParams", "get_weather", "register_user", "do_something_cool", "calc", "bad", "f", "g", "foo",
              "search", "get_tourist_attractions", "set_temperature", "move"]
SF = _c("get_weather", city="San Francisco", metric="celsius")
JOHN = _c("register_user", name="John Doe", age=37, address={"city": "San Francisco", "state": "CA"}, role=None,
          passed_test=True, aliases=["John", "Johnny"])
THREE = [_c("searchTool", query="test1"), _c("getOpenIncidentsTool"), _c("searchTool", query="test2")]
S1 = '{"name": "searchTool", "parameters": {"query": "test1"}}'
S2 = '{"name": "getOpenIncidentsTool", "parameters": {}}'

PEERS = [
    # vLLM, tests/tool_parsers/test_llama3_json_tool_parser.py
    ("vllm-json simple, prose around",  # vLLM drops all content once a call is found; we keep the prose
     'Here is the result: {"name": "getOpenIncidentsTool", "parameters": {}} Would you like to know more?',
     "Here is the result: Would you like to know more?", [_c("getOpenIncidentsTool")]),
    ("vllm-json with arguments", '{"name": "searchTool", "parameters": {"query": "test query", "limit": 10}}',
     "", [_c("searchTool", query="test query", limit=10)]),
    ("vllm-json no JSON", "This is just some text without any tool calls", None, []),
    ("vllm-json invalid JSON", '{"name": "invalidTool", "parameters": {invalid json}', None, []),
    ("vllm-json arguments key", '{"name": "searchTool", "arguments": {"query": "test"}}', "",
     [_c("searchTool", query="test")]),
    ("vllm-json three with ;", f"{S1}; {S2}; " + S1.replace("test1", "test2"), "", THREE),
    ("vllm-json three with ' ; '", f"{S1} ; {S2} ; " + S1.replace("test1", "test2"), "", THREE),
    ("vllm-json three in prose", f"Here are the results: {S1}; {S2}; " + S1.replace("test1", "test2")
     + " Would you like to know more?", "Here are the results: Would you like to know more?", THREE),
    ("vllm-json deep nesting",
     '{"name": "complexTool", "parameters": {"level1": {"level2": {"level3": {"level4": {"value": "deep"}}}}}}', "",
     [_c("complexTool", level1={"level2": {"level3": {"level4": {"value": "deep"}}}})]),
    ("vllm-json two, one deep", '{"name": "simpleTool", "parameters": {"value": "test"}}; {"name": "complexTool", '
     '"parameters": {"config": {"database": {"connection": {"pool": {"size": 10}}}}}}', "",
     [_c("simpleTool", value="test"), _c("complexTool", config={"database": {"connection": {"pool": {"size": 10}}}})]),
    ("vllm-json brackets in strings", '{"name": "searchTool", "parameters": {"query": "test {value} [complex]",'
     '"nested": {"inner": "more {brackets}"}}}', "",
     [_c("searchTool", query="test {value} [complex]", nested={"inner": "more {brackets}"})]),
    ("vllm-json escaped quotes", '{"name": "parserTool", "parameters": {"text": "He said \\"Hello {world}\\""}}', "",
     [_c("parserTool", text='He said "Hello {world}"')]),
    ("vllm-json no name", '{"parameters": {}}', None, []),
    ("vllm-json no parameters", '{"name": "toolWithoutParams"}', None, []),
    ("vllm-json brace in trailing prose", '{"name": "searchTool", "parameters": {"query": "test"}} '
     "I used {searchTool} for this.", "I used {searchTool} for this.", [_c("searchTool", query="test")]),
    ("vllm-json JSON fragment in trailing prose", '{"name": "searchTool", "parameters": {"query": "test"}} '
     'The arguments I passed were {"query": "test"}', 'The arguments I passed were {"query": "test"}',
     [_c("searchTool", query="test")]),
    ("vllm-json separator '; '", f"{S1}; {S2}", "", THREE[:2]),
    ("vllm-json separator ';'", f"{S1};{S2}", "", THREE[:2]),
    ("vllm-json separator ';\\n'", f"{S1};\n{S2}", "", THREE[:2]),
    ("vllm-json separator '\\n'", f"{S1}\n{S2}", "", THREE[:2]),
    ("vllm-json pathological input", "{hello world[A(A=" + "\t)A(A=,\t" * 2, None, []),
    # vLLM, tests/tool_parsers/test_pythonic_tool_parser.py
    ("vllm-pythonic no call", "How can I help you today?", None, []),
    ("vllm-pythonic simple", "[get_weather(city='San Francisco', metric='celsius')]", "", [SF]),
    ("vllm-pythonic more types", "[register_user(name='John Doe', age=37, address={'city': 'San Francisco', "
     "'state': 'CA'}, role=None, passed_test=True, aliases=['John', 'Johnny'])]", "", [JOHN]),
    ("vllm-pythonic no parameters", "[get_weather()]", "", [_c("get_weather")]),
    ("vllm-pythonic empty dict", "[do_something_cool(additional_data={})]", "",
     [_c("do_something_cool", additional_data={})]),
    ("vllm-pythonic empty list", "[do_something_cool(steps=[])]", "", [_c("do_something_cool", steps=[])]),
    ("vllm-pythonic escaped strings", r"""[get_weather(city='Martha\'s Vineyard', metric='\"cool units\"')]""", "",
     [_c("get_weather", city="Martha's Vineyard", metric='"cool units"')]),
    ("vllm-pythonic parallel", "[get_weather(city='San Francisco', metric='celsius'), register_user(name='John Doe', "
     "age=37, address={'city': 'San Francisco', 'state': 'CA'}, role=None, passed_test=True, "
     "aliases=['John', 'Johnny'])]", "", [SF, JOHN]),
    ("vllm-pythonic three", "[get_weather(city='San Francisco', metric='celsius'), get_weather(), "
     "do_something_cool(steps=[])]", "", [SF, _c("get_weather"), _c("do_something_cool", steps=[])]),
    ("vllm-pythonic pathological input", "hello world[A(A=" + "\t)A(A=,\t" * 2, None, []),
    # vLLM keeps the readable siblings of an unreadable call; llama32 reads a list all or nothing, so a list
    # with one call it cannot read (bytes, an infinity, a broken string) stays text rather than half-run
    ("vllm-pythonic bytes sibling", "[bad(x=b'z'), get_weather(city='San Francisco', metric='celsius')]", None, []),
    ("vllm-pythonic infinite sibling", "[calc(x=1e999), get_weather(city='San Francisco', metric='celsius')]",
     None, []),
    ("vllm-pythonic broken sibling", "[get_weather(city='San Francisco', metric='celsius'), f(a='x 'y', b='z')]",
     None, []),
    ("vllm-pythonic all broken", "[f(a='x 'y' 'z), g(b='p 'q' 'r)]", None, []),
    ("vllm-pythonic mismatched brackets", "[foo(x=1])]", None, []),
    # SGLang, test/srt/test_function_call_parser.py, TestLlama32Detector
    ("sglang-llama32 single", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", PARIS),
    ("sglang-llama32 tagged, ;", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}};'
     '{"name": "get_tourist_attractions", "parameters": {"city": "Paris"}}', "",
     PARIS + [_c("get_tourist_attractions", city="Paris")]),
    ("sglang-llama32 each tagged", '<|python_tag|>{"name": "get_weather", "parameters": {}}'
     '<|python_tag|>{"name": "get_tourist_attractions", "parameters": {}}', "",
     [_c("get_weather"), _c("get_tourist_attractions")]),
    ("sglang-llama32 trailing text", '{"name": "get_weather", "parameters": {}} Some follow-up text',
     "Some follow-up text", [_c("get_weather")]),
    ("sglang-llama32 invalid then valid",
     '{"name": "get_weather", "parameters": {{"name": "get_weather", "parameters": {}}',
     '{"name": "get_weather", "parameters": {', [_c("get_weather")]),
    ("sglang-llama32 plain text", "This is just plain explanation text.", None, []),
    ("sglang-llama32 intro", 'Some intro. <|python_tag|>{"name": "get_weather", "parameters": {}}', "Some intro.",
     [_c("get_weather")]),
    # SGLang, unit tests of Llama32Detector (detect_and_parse, streaming)
    ("sglang-llama32 tagged", '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Beijing"}}', "",
     [_c("get_weather", city="Beijing")]),
    ("sglang-llama32 untagged", '{"name": "get_weather", "arguments": {"city": "Beijing"}}', "",
     [_c("get_weather", city="Beijing")]),
    # SGLang keeps the space before the tag ("Let me check. "); llama32's response ends unpadded
    ("sglang-llama32 text before tag", 'Let me check. <|python_tag|>{"name": "get_weather", "arguments": '
     '{"city": "Tokyo"}}', "Let me check.", [_c("get_weather", city="Tokyo")]),
    ("sglang-llama32 no call", "The weather is nice today.", None, []),
    ("sglang-llama32 two, ;", '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Beijing"}};'
     '{"name": "search", "arguments": {"query": "restaurants"}}', "",
     [_c("get_weather", city="Beijing"), _c("search", query="restaurants")]),
    ("sglang-llama32 two arguments", '<|python_tag|>{"name": "get_weather", "arguments": {"city": "London", '
     '"unit": "celsius"}}', "", [_c("get_weather", city="London", unit="celsius")]),
    ("sglang-llama32 Python dict", "{'name': 'get_weather', 'arguments': {'city': 'Beijing'}}", "",
     [_c("get_weather", city="Beijing")]),
    ("sglang-llama32 text after tag", "I'll look that up. <|python_tag|>{\"name\": \"get_weather\", \"arguments\": "
     '{"city": "Tokyo", "unit": "celsius"}}', "I'll look that up.", [_c("get_weather", city="Tokyo", unit="celsius")]),
    ("sglang-llama32 empty object", "{}", None, []),
    ("sglang-llama32 object in prose", '{"a": 1} is a dict', None, []),
    ("sglang-llama32 name nested", '{"nested": {"name": "get_weather"}, "items": [1, 2]}', None, []),
    ("sglang-llama32 quotes in a string", "{\"text\": \"你好 — 'key': 'value'\"}  trailing: 'text'\n", None, []),
    ("sglang-llama32 Python dict not a call", "{'text': '你好', 'number': 1} is a Python dict", None, []),
    ("sglang-llama32 arguments before name", '{"arguments": {"city": "Tokyo"}, "name": "get_weather"}', "",
     [_c("get_weather", city="Tokyo")]),
    ("sglang-llama32 arguments before name, dict", "{'arguments': {'city': 'Tokyo'}, 'name': 'get_weather'}", "",
     [_c("get_weather", city="Tokyo")]),
    ("sglang-llama32 arguments before name, tagged",
     '<|python_tag|>{"arguments": {"city": "Tokyo"}, "name": "get_weather"}', "", [_c("get_weather", city="Tokyo")]),
    ("sglang-llama32 arguments before name, tagged dict",
     "<|python_tag|>{'arguments': {'city': 'Tokyo'}, 'name': 'get_weather'}", "", [_c("get_weather", city="Tokyo")]),
    ("sglang-llama32 {} before tag", '{}<|python_tag|>{"name": "get_weather", "arguments": {"city": "Tokyo"}}', "{}",
     [_c("get_weather", city="Tokyo")]),
    ("sglang-llama32 object before tag", '{"a": 1} <|python_tag|>{"name": "get_weather", "arguments": '
     '{"city": "Tokyo"}}', '{"a": 1}', [_c("get_weather", city="Tokyo")]),
    # SGLang hides these from the text too; llama32 never hides text that is not a call
    ("sglang-llama32 tagged non-call", '<|python_tag|>{"a": 1}', None, []),
    ("sglang-llama32 unknown tool", '{"name": "unknown", "arguments": {"city": "Tokyo"}}', None, []),
    ("sglang-llama32 unknown tool, tagged", '<|python_tag|>{"name": "unknown", "arguments": {"city": "Tokyo"}}',
     None, []),
    # SGLang, unit tests of PythonicDetector
    ("sglang-pythonic no brackets", "This is just normal text without any tool calls.", None, []),
    ("sglang-pythonic text before", "Here's a tool call: [get_weather(location='New York', unit='celsius')]",
     "Here's a tool call:", [_c("get_weather", location="New York", unit="celsius")]),
    ("sglang-pythonic text before 2", "This is some text before [get_weather(location='London')]",
     "This is some text before", [_c("get_weather", location="London")]),
    ("sglang-pythonic split call", "Let me check the weather: [get_weather(location='Paris')]",
     "Let me check the weather:", [_c("get_weather", location="Paris")]),
    ("sglang-pythonic at the start", "[search(query='python programming')]", "",
     [_c("search", query="python programming")]),
    ("sglang-pythonic text after", "[get_weather(location='Tokyo')] Here's the forecast:", "Here's the forecast:",
     [_c("get_weather", location="Tokyo")]),
    # SGLang's text is " and " (spaces kept); llama32 drops the white space after a call
    ("sglang-pythonic two lists", "[get_weather(location='Berlin')] and [search(query='restaurants')]", "and",
     [_c("get_weather", location="Berlin"), _c("search", query="restaurants")]),
    ("sglang-pythonic open bracket", "Let's try this: [", None, []),
    ("sglang-pythonic nested list", "[get_weather(location='New York', unit='celsius', data=[1, 2, 3])]", "",
     [_c("get_weather", location="New York", unit="celsius", data=[1, 2, 3])]),
    ("sglang-pythonic nested dict", "[search(query='test', config={'options': [1, 2], 'nested': {'key': 'value'}})]",
     "", [_c("search", query="test", config={"options": [1, 2], "nested": {"key": "value"}})]),
    ("sglang-pythonic two nested", "[get_weather(location='Paris', data=[10, 20]), search(query='test', "
     "filters=['a', 'b'])]", "", [_c("get_weather", location="Paris", data=[10, 20]),
                                  _c("search", query="test", filters=["a", "b"])]),
    ("sglang-pythonic nested, text before", "Here's a call: [get_weather(location='Tokyo', data=[1, 2, 3])]",
     "Here's a call:", [_c("get_weather", location="Tokyo", data=[1, 2, 3])]),
    # <|python_start|>/<|python_end|> are Llama 4's markers, not Llama 3.2's tokens: SGLang drops them,
    # llama32 finds the call and leaves them in the text like any other text
    ("sglang-pythonic Llama 4 markers", "User wants to get the weather in Mars. <|python_start|>[get_weather("
     "location='Mars', unit='celsius')]<|python_end|> In this way we will get the weather in Mars.",
     "User wants to get the weather in Mars. <|python_start|><|python_end|> In this way we will get the weather in "
     "Mars.", [_c("get_weather", location="Mars", unit="celsius")]),
    ("sglang-pythonic int argument", "[get_weather(city=123)]", "", [_c("get_weather", city=123)]),
    # SGLang reads a positional argument as no argument at all ({}); llama32 cannot name it, so it is no call
    ("sglang-pythonic positional", "[get_weather('Tokyo')]", None, []),
    ("sglang-pythonic two calls", "[get_weather(city='Tokyo'), search(query='restaurants')]", "",
     [_c("get_weather", city="Tokyo"), _c("search", query="restaurants")]),
    ("sglang-pythonic leading text", "I will check the weather for you. [get_weather(city='Tokyo')]",
     "I will check the weather for you.", [_c("get_weather", city="Tokyo")]),
    ("sglang-pythonic dict argument", "[search(query={'key': 'value', 'nested': {'a': 1}})]", "",
     [_c("search", query={"key": "value", "nested": {"a": 1}})]),
    ("sglang-pythonic list argument", "[search(query=['a', 'b', 'c'])]", "", [_c("search", query=["a", "b", "c"])]),
    ("sglang-pythonic unknown tool", "[unknown_func(arg=1)]", None, []),
    ("sglang-pythonic malformed", "[get_weather(city=)]", None, []),
    # SGLang needs the brackets; a bare call that is the whole answer is a call to llama32 (as it always was)
    ("sglang-pythonic no brackets", "get_weather(city='Tokyo')", "", [_c("get_weather", city="Tokyo")]),
    ("sglang-pythonic double quotes", '[get_weather(city="Beijing", unit="celsius")]', "",
     [_c("get_weather", city="Beijing", unit="celsius")]),
    ("sglang-pythonic preceding text", 'Let me check that. [get_weather(city="Shanghai")]', "Let me check that.",
     [_c("get_weather", city="Shanghai")]),
    ("sglang-pythonic positive", "[set_temperature(value=5)]", "", [_c("set_temperature", value=5)]),
    ("sglang-pythonic negative", "[set_temperature(value=-5)]", "", [_c("set_temperature", value=-5)]),
    ("sglang-pythonic negative float", "[move(x=-1.5, y=2.0)]", "", [_c("move", x=-1.5, y=2.0)]),
    ("sglang-pythonic negative in list", "[move(x=0, y=0, deltas=[-1, -2, 3])]", "",
     [_c("move", x=0, y=0, deltas=[-1, -2, 3])]),
    ("sglang-pythonic negative sibling", "[set_temperature(value=-5), move(x=1, y=2)]", "",
     [_c("set_temperature", value=-5), _c("move", x=1, y=2)]),
    ("sglang-pythonic minus a string", '[move(x=-"hello", y=0)]', None, []),
    ("sglang-pythonic minus True", "[move(x=-True, y=0)]", None, []),
    ("sglang-pythonic unfinished at the end", "hi [get_weather(city=", None, []),
    ("sglang-pythonic unfinished after text", "Hello! [search(query=", None, []),
]


@pytest.mark.parametrize("case, text, remaining, calls", PEERS, ids=[p[0] for p in PEERS])
def test_peer_cases(case, text, remaining, calls):
    assert split_tool_calls(text, PEER_TOOLS) == ((text if remaining is None else remaining), calls)


# --- the streaming promise ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, tools", [(t, OFFERED) for t, _, _ in OWN] + [(t, OFFERED) for t in NO_FALSE_CALLS]
                         + [(p[1], PEER_TOOLS) for p in PEERS])
def test_scanner_decisions_hold_as_text_grows(text, tools):
    """Fed character by character, the text the scanner has decided (less trailing white space, which
    output.py holds) is always a prefix of the final response: no call is ever shown as text."""
    response, calls = split_tool_calls(text, tools)
    names = {t if isinstance(t, str) else t.get("function", t)["name"] for t in tools}
    scanner = Scanner(names)
    for i in range(len(text) + 1):
        scanner.feed(text[:i])
        assert response.startswith(scanner.settled()), (i, scanner.text())
        assert len(scanner.calls) <= len(calls) and calls[: len(scanner.calls)] == scanner.calls
    scanner.feed(text, final=True)
    assert (scanner.remaining() if scanner.calls else text, scanner.calls) == (response, calls)
