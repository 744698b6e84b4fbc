"""`python -m llama32 serve`: real uvicorn servers on loopback over SmolLM2, called with httpx, the official
openai SDK, curl and headless Chromium. Every served answer equals the library's answer to the same request."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

import llama32
from fixtures import text_without_cached, without_cached

pytest.importorskip("starlette")
import uvicorn  # noqa: E402

from llama32.server import create_app  # noqa: E402

WAI = "/ai/run/@cf/meta/llama-3.2-1b-instruct"
WAI_LONG = "/client/v4/accounts/abc123/ai/run/@cf/meta/llama-3.2-1b-instruct"
GREEDY = dict(temperature=0, max_tokens=24)


@contextmanager
def running(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return llama32.load(smollm2_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def url(llm):
    with running(create_app(llm, model_name="smollm2")) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def sse_events(text: str) -> list:
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


# --- Workers AI ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [WAI, WAI_LONG])
def test_workers_ai_answer_equals_library(llm, client, path):
    body = dict(prompt="What is the capital of France?", **GREEDY)
    r = client.post(path, json=body)
    assert r.status_code == 200
    assert without_cached(r.json()) == without_cached(
        {"result": llama32.generate(llm, **body), "success": True, "errors": [], "messages": []})
    assert r.headers["x-llama32-replica"] == "0"  # one process is replica 0 (serve --replicas names its replicas)


def test_workers_ai_stream_is_to_sse_of_the_library_stream(llm, client):
    body = dict(messages=[{"role": "user", "content": "Name three colours."}], **GREEDY)
    r = client.post(WAI, json=dict(body, stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert text_without_cached(r.text) == text_without_cached(
        "".join(llama32.to_sse(llama32.generate(llm, stream=True, **body))))
    assert json.loads(sse_events(r.text)[-2])["usage"]["completion_tokens"] > 0


SEED_BODIES = [  # the seed page's request shapes, sent unchanged
    {"prompt": "Where did the phrase Hello World come from"},
    {"messages": [{"role": "system", "content": "You are a friendly assistant"},
                  {"role": "user", "content": "Why is pizza so good"}]},
    {"messages": [{"role": "user", "content": "What is the weather in Austin?"}],
     "tools": [{"name": "getWeather", "description": "Return the weather for a latitude and longitude",
                "parameters": {"type": "object", "properties": {"latitude": {"type": "string"},
                                                                "longitude": {"type": "string"}},
                               "required": ["latitude", "longitude"]}}]},
    {"messages": [{"role": "user", "content": "Say hello"}],
     "functions": [{"name": "hello", "code": "def hello(name): return 'hi ' + name"}]},
    {"prompt": "Tell me a story", "stream": True},
]


@pytest.fixture(scope="module")
def tiny(make_checkpoint, llama3_tokenizer_dir):
    """A tiny random checkpoint with the real Llama 3 tokenizer (its template renders tools), 8 rows a step."""
    return llama32.load(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), device="cpu",
                        dtype="float32", max_batch=8)


@pytest.fixture(scope="module")
def tiny_url(tiny):
    with running(create_app(tiny, max_queue=256)) as base:
        yield base


@pytest.mark.parametrize("body", SEED_BODIES)
def test_seed_page_bodies_are_answered(client, tiny_url, body):
    offers_tools = "tools" in body or "functions" in body
    if offers_tools:  # SmolLM2's template cannot show tools to the model: said, not silently dropped
        wai_error(client.post(WAI_LONG, json=dict(body, max_tokens=8, seed=1)), 400, "does not render tools")
    r = httpx.post((tiny_url if offers_tools else str(client.base_url)) + WAI_LONG, json=dict(body, max_tokens=8, seed=1),
                   timeout=120)
    assert r.status_code == 200, r.text
    if body.get("stream"):
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and "usage" in json.loads(events[-2])
    else:
        result = r.json()["result"]
        assert r.json()["success"] and result["usage"]["completion_tokens"] == 8
        assert {"response", "tool_calls", "usage"} <= set(result)


def test_curl(llm, url):
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed (the setup script installs it)")
    body = dict(prompt="Hello!", **GREEDY)
    proc = subprocess.run(["curl", "-sS", f"{url}{WAI}", "-H", "Content-Type: application/json", "-d", json.dumps(body)],
                          capture_output=True, text=True, timeout=120, check=True)
    assert without_cached(json.loads(proc.stdout)["result"]) == without_cached(llama32.generate(llm, **body))
    proc = subprocess.run(["curl", "-sSN", f"{url}/v1/chat/completions", "-H", "Content-Type: application/json",
                           "-d", json.dumps({"messages": [{"role": "user", "content": "Hello!"}], "stream": True,
                                             **GREEDY})], capture_output=True, text=True, timeout=120, check=True)
    pieces = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in sse_events(proc.stdout)[:-1]
              if json.loads(e)["choices"]]
    assert "".join(pieces) == llama32.generate(llm, messages=[{"role": "user", "content": "Hello!"}],
                                               **GREEDY)["response"]


# --- OpenAI ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oai(url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


def test_openai_models(oai):
    assert [m.id for m in oai.models.list().data] == ["smollm2"]


def test_openai_chat_equals_library(llm, oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    want = llama32.generate(llm, messages=messages, **GREEDY)
    got = oai.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0, user="u1", n=1)
    assert got.choices[0].message.content == want["response"]
    assert got.usage.completion_tokens == want["usage"]["completion_tokens"]
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert got.choices[0].finish_reason in ("stop", "length")
    stream = oai.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want["response"]
    assert chunks[-1].usage.completion_tokens == want["usage"]["completion_tokens"] and not chunks[-1].choices
    assert chunks[-2].choices[0].finish_reason == got.choices[0].finish_reason


def test_openai_chat_stop_and_logprobs(llm, oai):
    messages = [{"role": "user", "content": "Count from one to ten in words."}]
    first = llama32.generate(llm, messages=messages, stop=[","], logprobs=True, top_logprobs=2, **GREEDY)
    got = oai.chat.completions.create(model="smollm2", messages=messages, stop=[","], logprobs=True, top_logprobs=2,
                                      max_tokens=24, temperature=0)
    # The served request reused the first's prompt blocks; the library's next run reuses the same ones, so it
    # computes exactly what the server did (the first, computed in full, agrees to float32 rounding).
    want = llama32.generate(llm, messages=messages, stop=[","], logprobs=True, top_logprobs=2, **GREEDY)
    assert got.usage.prompt_tokens_details.cached_tokens == want["usage"]["cached_tokens"] > 0
    assert got.choices[0].message.content == want["response"] == first["response"]
    entries = got.choices[0].logprobs.content
    assert [e.logprob for e in entries] == [e["logprob"] for e in want["logprobs"]]
    assert [e["logprob"] for e in want["logprobs"]] == pytest.approx([e["logprob"] for e in first["logprobs"]],
                                                                     abs=1e-4)
    assert [[t.token for t in e.top_logprobs] for e in entries] == [
        [t["token"] for t in e["top_logprobs"]] for e in want["logprobs"]]


def test_openai_completions_with_echo_and_logprobs(llm, oai):
    prompt = "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
    want = llama32.generate(llm, prompt=prompt, raw=True, **GREEDY)
    got = oai.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0)
    assert got.choices[0].text == want["response"]
    # lm-eval-harness's loglikelihood: echo the prompt with its tokens' log-probabilities, generate nothing
    context, continuation = "The capital of France is", " Paris"
    got = oai.completions.create(model="smollm2", prompt=context + continuation, max_tokens=0, echo=True,
                                 logprobs=1, temperature=0)
    lp = got.choices[0].logprobs
    assert got.choices[0].text == context + continuation
    assert "".join(lp.tokens) == context + continuation
    assert lp.token_logprobs[0] is None  # SmolLM2 has no BOS: nothing predicts the first token
    n = len(llm.tokenizer.encode(continuation))
    ref = llama32.score(llm, continuation, context=context)
    assert lp.token_logprobs[-n:] == pytest.approx(ref["logprobs"], abs=1e-4)
    assert [max(t, key=t.get) == tok for t, tok in zip(lp.top_logprobs[-n:], lp.tokens[-n:])] == ref["is_greedy"]


def test_openai_completions_stream_equals_library(llm, client):
    prompt = "<|im_start|>user\nName a river.<|im_end|>\n<|im_start|>assistant\n"
    want = llama32.generate(llm, prompt=prompt, raw=True, **GREEDY)
    r = client.post("/v1/completions", json={"prompt": prompt, "stream": True, **GREEDY})
    events = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert "".join(e["choices"][0]["text"] for e in events) == want["response"]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(e["object"] == "text_completion" for e in events)


def test_cli_flags_and_sigterm_shut_the_server_down_cleanly(smollm2_dir):
    import os
    import signal
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama32", "serve", "--model", str(smollm2_dir), "--port", str(port),
                             "--device", "cpu", "--dtype", "float32", "--served-model-name", "smol-int8",
                             "--quantize", "int8", "--kv-cache-bytes", str(64 << 20),
                             "--allowed-origins", "https://app.example"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}{WAI}", json=dict(prompt="Hi", **GREEDY), timeout=60)
        assert r.status_code == 200
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Origin": "https://app.example"})
        assert models.json()["data"][0]["id"] == "smol-int8"
        assert models.headers["access-control-allow-origin"] == "https://app.example"
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert chat.json()["model"] == "smol-int8"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log = proc.stderr.read()
        assert f"POST {WAI} 200 tokens=" in log  # one line per request
        assert log.rstrip().endswith("shut down") and "Traceback" not in log
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)


def test_openai_tool_calls_shape(tiny_url, monkeypatch):
    """A model answer that is a call comes back in OpenAI's form with finish_reason tool_calls (the library's
    own tool-call parsing is tested on real token ids elsewhere; here the route's translation)."""
    from llama32.server.backend import Generation
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}]

    async def answer(self):  # what the loop would hand back for a call: one last chunk
        self.last = {"response": "", "tool_calls": calls,
                     "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}}
        yield self.last

    monkeypatch.setattr(Generation, "chunks", answer)
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 2,
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]}
    client = httpx.Client(base_url=tiny_url, timeout=120)  # a checkpoint whose template renders tools
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}
    events = [json.loads(e) for e in sse_events(client.post("/v1/chat/completions", json=dict(body, stream=True)).text)[:-1]]
    assert events[-2]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    client.close()



def test_a_stream_that_fails_midway_ends_with_an_error_event(url, monkeypatch):
    """Once a stream has started its status is sent: a failure after that is one last event holding the error
    in the route's envelope, and no [DONE] (a client can tell a cut answer from a whole one)."""
    from llama32.server.backend import Generation

    async def failing(self):
        self.llm.loop.cancel(self.job)  # what a failure leaves: no job in the loop
        yield {"response": "Hel"}
        raise RuntimeError("the loop failed")

    monkeypatch.setattr(Generation, "chunks", failing)
    r = httpx.post(url + WAI, json=dict(prompt="Hi", stream=True, **GREEDY), timeout=60)
    events = sse_events(r.text)
    assert r.status_code == 200 and json.loads(events[0])["response"] == "Hel" and "[DONE]" not in events
    assert json.loads(events[-1]) == {"result": None, "success": False, "messages": [], "errors": [
        {"code": 500, "message": "internal error while generating; see the server log"}]}
    r = httpx.post(url + "/v1/chat/completions", json=dict(messages=[{"role": "user", "content": "Hi"}], stream=True,
                                                           **GREEDY), timeout=60)
    last = json.loads(sse_events(r.text)[-1])
    assert last["error"]["code"] == 500 and last["error"]["type"] == "server_error"
    deadline = time.time() + 5
    while httpx.get(url + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.05)


CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
SHORT = dict(temperature=0, max_tokens=8)


def test_completions_prompt_forms_and_n(llm, client):
    """A string, a list of strings, token ids or a list of id lists: one choice per prompt (n each), in order,
    each the library's answer to that prompt (what lm-eval's local-completions sends by default)."""
    texts = [CHATML.format("Name a river."), CHATML.format("Name a mountain.")]
    want = [llama32.generate(llm, prompt=t, raw=True, **SHORT) for t in texts]
    ids = [[llm.tokenizer.bos_id] + llm.tokenizer.encode(t) if llm.tokenizer.bos_id is not None
           else llm.tokenizer.encode(t) for t in texts]
    for prompt, which in ((texts[0], [0]), (texts, [0, 1]), (ids[1], [1]), (ids, [0, 1])):
        r = client.post("/v1/completions", json=dict(prompt=prompt, n=2, **SHORT))
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == list(range(2 * len(which)))
        assert [c["text"] for c in choices] == [want[w]["response"] for w in which for _ in range(2)]
        usage = r.json()["usage"]
        assert usage["completion_tokens"] == 2 * sum(want[w]["usage"]["completion_tokens"] for w in which)
        assert usage["prompt_tokens"] == sum(want[w]["usage"]["prompt_tokens"] for w in which)
        assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    streamed = [json.loads(e) for e in sse_events(client.post("/v1/completions", json=dict(
        prompt=ids, stream=True, **SHORT)).text)[:-1]]
    for i in range(2):
        mine = [e["choices"][0] for e in streamed if e["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == want[i]["response"] and mine[-1]["finish_reason"]


def test_n_seeded_choices_are_seed_plus_index(llm, client):
    messages = [{"role": "user", "content": "Tell me a joke."}]
    sampled = dict(temperature=1.0, max_tokens=8, seed=41)
    r = client.post("/v1/chat/completions", json=dict(messages=messages, n=3, **sampled))
    got = [c["message"]["content"] for c in r.json()["choices"]]
    assert got == [llama32.generate(llm, messages=messages, **dict(sampled, seed=41 + i))["response"]
                   for i in range(3)]
    events = [json.loads(e) for e in sse_events(client.post("/v1/chat/completions", json=dict(
        messages=messages, n=3, stream=True, stream_options={"include_usage": True}, **sampled)).text)[:-1]]
    for i in range(3):
        mine = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content", "") for c in mine) == got[i]
        assert mine[-1]["finish_reason"] in ("stop", "length")
    assert events[-1]["usage"]["completion_tokens"] == sum(
        llama32.generate(llm, messages=messages, **dict(sampled, seed=41 + i))["usage"]["completion_tokens"]
        for i in range(3))


def test_usage_counts_the_reused_prompt_tokens(llm, client):
    """Prompt-prefix reuse (on by default) shows in usage: Workers AI's `usage.cached_tokens` and OpenAI's
    `usage.prompt_tokens_details.cached_tokens`, streamed or not. A prompt's first request reuses nothing; a
    repeat reuses its whole 32-token blocks but the one holding its last position, and answers the same."""
    from llama32.engine import BLOCK

    system = "You answer questions about the lighthouses of the Baltic coast, briefly and plainly. " * 6
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name one."}]
    body = dict(messages=messages, **SHORT)
    first = client.post(WAI, json=body).json()["result"]
    n = first["usage"]["prompt_tokens"]
    whole = (n - 1) // BLOCK * BLOCK
    assert first["usage"]["cached_tokens"] == 0 and whole >= 2 * BLOCK
    second = client.post(WAI, json=body).json()["result"]
    assert second["usage"]["cached_tokens"] == whole
    assert without_cached(second) == without_cached(first)
    last = json.loads(sse_events(client.post(WAI, json=dict(body, stream=True)).text)[-2])
    assert last["usage"] == dict(second["usage"])
    chat = client.post("/v1/chat/completions", json=body).json()
    assert chat["choices"][0]["message"]["content"] == first["response"]
    assert chat["usage"]["prompt_tokens"] == n and chat["usage"]["prompt_tokens_details"] == {"cached_tokens": whole}
    events = [json.loads(e) for e in sse_events(client.post("/v1/chat/completions", json=dict(
        body, stream=True, stream_options={"include_usage": True})).text)[:-1]]
    assert events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": whole}
    # another question after the same system prompt: the blocks they share
    other = client.post("/v1/chat/completions", json=dict(body, messages=[
        messages[0], {"role": "user", "content": "Which is the tallest?"}])).json()["usage"]
    assert 0 < other["prompt_tokens_details"]["cached_tokens"] <= whole
    assert other["prompt_tokens_details"]["cached_tokens"] % BLOCK == 0
    # /v1/completions with two prompts, each seen before: their reused tokens add up (a prompt counted once)
    texts = [f"Note {i}: the lighthouse at Cape {i} was lit in 18{i}0 and kept for ninety years. " * 5 for i in (1, 2)]
    alone = [client.post("/v1/completions", json=dict(prompt=t, max_tokens=2)).json()["usage"] for t in texts]
    wholes = [(u["prompt_tokens"] - 1) // BLOCK * BLOCK for u in alone]
    assert min(wholes) >= BLOCK
    both = client.post("/v1/completions", json=dict(prompt=texts, max_tokens=2, n=2)).json()["usage"]
    assert both["prompt_tokens"] == sum(u["prompt_tokens"] for u in alone)
    assert both["prompt_tokens_details"] == {"cached_tokens": sum(wholes)}


@pytest.mark.parametrize("prefix", ["/ai/v1", "/client/v4/accounts/abc123/ai/v1"])
def test_workers_ai_openai_compatible_paths(client, prefix):
    body = {"messages": [{"role": "user", "content": "Hi"}], **GREEDY}
    a, b = client.post("/v1/chat/completions", json=body).json(), client.post(f"{prefix}/chat/completions", json=body).json()
    assert a["choices"] == b["choices"] and without_cached(a)["usage"] == without_cached(b)["usage"]
    c = client.post(f"{prefix}/completions", json={"prompt": "Hello", **GREEDY})
    assert c.status_code == 200 and c.json()["object"] == "text_completion"
    assert client.get(f"{prefix}/models").json()["data"][0]["id"] == "smollm2"
    assert client.get(f"{prefix}/models/smollm2").json()["id"] == "smollm2"
    oai_error(client.post(f"{prefix}/chat/completions", json=dict(body, n=0)), 400, "n", "n must")


def test_metrics_and_sse_headers(client, llm):
    def metrics() -> dict:
        values = {}
        for line in client.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    before = metrics()
    r = client.post(WAI, json=dict(prompt="Count to three.", stream=True, **GREEDY))
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    client.post(WAI, json={"prompt": "Hi", "max_tokens": 3})
    client.post(WAI, json={"prompt": "Hi", "temperature": 9})
    # a long prompt twice: the second reuses the first one's whole blocks, and the counter says how many
    long = "Here is a list of rivers: " + ", ".join(f"river number {i}" for i in range(40)) + ". Name one."
    cached = [client.post(WAI, json={"prompt": long, "max_tokens": 2}).json()["result"]["usage"]["cached_tokens"]
              for _ in range(2)]
    values = metrics()
    ok = 'llama32_requests_total{route="/ai/run",status="200"}'
    assert values[ok] - before.get(ok, 0) == 4
    bad = 'llama32_requests_total{route="/ai/run",status="400"}'
    assert values[bad] - before.get(bad, 0) == 1
    assert values["llama32_generation_tokens_total"] >= 3 and values["llama32_prompt_tokens_total"] > 0
    assert cached[1] >= 32 and values["llama32_cached_tokens_total"] - before["llama32_cached_tokens_total"] == \
        sum(cached)
    assert values["llama32_time_to_first_token_seconds_count"] >= 2
    assert values["llama32_time_per_output_token_seconds_count"] >= 1
    assert values["llama32_running"] == 0 and values["llama32_waiting"] == 0
    assert values["llama32_kv_bytes"] == llm.loop.stats()["kv_bytes"] > 0


def test_cors_only_for_allowed_origins(llm):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with running(create_app(llm, allowed_origins=["https://app.example"], api_key="k")) as base:
        r = httpx.options(base + "/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.options(base + "/v1/chat/completions", headers=dict(preflight, Origin="https://evil.example"))
        assert "access-control-allow-origin" not in r.headers
    with running(create_app(llm)) as base:  # none by default
        r = httpx.get(base + "/health", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in r.headers


def test_a_client_that_gives_up_cancels_its_request(llm, url, client, caplog):
    """Non-streamed and streamed: the row leaves within a step, and the log counts the tokens produced."""
    import logging
    caplog.set_level(logging.INFO, logger="llama32.server")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + WAI, json=dict(prompt="Write a very long story.", max_tokens=2000, temperature=0), timeout=1.5)
    deadline = time.time() + 5
    while client.get("/health").json()["running"] and time.time() < deadline:
        time.sleep(0.02)
    assert client.get("/health").json()["running"] == 0
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"POST {WAI} 499")]
    assert int(line.split("tokens=")[1].split()[0]) < 2000
    with httpx.Client(base_url=url, timeout=120) as c:
        with c.stream("POST", WAI, json=dict(prompt="Write a very long story.", stream=True, max_tokens=2000,
                                             temperature=0)) as r:
            lines = r.iter_lines()
            next(lines)
            next(lines)
    deadline = time.time() + 5
    while client.get("/health").json()["running"] and time.time() < deadline:
        time.sleep(0.02)
    assert client.get("/health").json()["running"] == 0
    streamed = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"POST {WAI} 200")][-1]
    assert 0 < int(streamed.split("tokens=")[1].split()[0]) < 2000


# --- many clients ---------------------------------------------------------------------------------------------------


def test_eight_concurrent_streams_get_their_solo_answers(llm, url):
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]
    want = [llama32.generate(llm, prompt=p, **GREEDY)["response"] for p in prompts]
    got = [None] * 8

    def client_thread(i):
        with httpx.Client(base_url=url, timeout=300) as c:
            with c.stream("POST", WAI, json=dict(prompt=prompts[i], stream=True, **GREEDY)) as r:
                text = "".join(line for line in r.iter_text())
        got[i] = "".join(json.loads(e)["response"] for e in sse_events(text)[:-1])

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert got == want


def test_disconnect_frees_the_row(llm, url, client):
    with httpx.Client(base_url=url, timeout=120) as c:
        with c.stream("POST", WAI, json=dict(prompt="Write a very long story.", stream=True, max_tokens=2000,
                                             temperature=0)) as r:
            lines = r.iter_lines()
            next(lines)
            assert client.get("/health").json()["running"] == 1
    deadline = time.time() + 5  # far less than 2000 tokens would take
    while client.get("/health").json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    health = client.get("/health").json()  # the loop's stats, KV memory included
    assert health.items() >= {"status": "ok", "model": "smollm2", "running": 0, "waiting": 0}.items()
    assert 0 <= health["kv_bytes"] <= health["kv_bytes_total"]
    (replica,) = health["replicas"]  # the one loop is replica 0, and the totals are its numbers
    assert replica["id"] == "0" and replica["running"] == 0 and replica["kv_bytes"] == health["kv_bytes"]
    assert client.post(WAI, json=dict(prompt="Hi", **GREEDY)).status_code == 200


# --- errors ---------------------------------------------------------------------------------------------------------


def test_logit_bias_reaches_the_sampler_on_both_apis(llm, client, oai):
    """+100 on one token all but forces it: every generated token is that id (Workers AI and OpenAI routes),
    and the answer equals the library's with the same bias."""
    forced = llm.tokenizer.encode(" banana")[0]
    body = {"prompt": "Name a colour.", "temperature": 0, "max_tokens": 4, "logit_bias": {str(forced): 100}}
    want = llama32.generate(llm, **body)
    assert want["response"] == llm.tokenizer.decode([forced] * 4)
    assert client.post(WAI, json=body).json()["result"]["response"] == want["response"]
    chat = oai.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Name a colour."}],
                                       temperature=0, max_tokens=4, logit_bias={str(forced): 100})
    assert chat.choices[0].message.content == want["response"]


def wai_error(r, status, fragment):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["result"] is None and body["messages"] == []
    assert body["errors"][0]["code"] == status and fragment in body["errors"][0]["message"]
    assert "Traceback" not in r.text


def oai_error(r, status, param, fragment):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"] and err["code"] == status


def test_workers_ai_errors(client):
    wai_error(client.post(WAI, json={"prompt": "Hi", "temperature": 9}), 400, "temperature")
    wai_error(client.post(WAI, json={"prompt": "Hi", "bogus": 1}), 400, "bogus")
    wai_error(client.post(WAI, json={"prompt": "Hi", "stream": True, "top_k": 99}), 400, "top_k")
    wai_error(client.post(WAI, content=b'{"prompt": '), 400, "not valid JSON")
    wai_error(client.post(WAI, json=["prompt"]), 400, "JSON object")
    wai_error(client.post(WAI, content=b"x" * (5 << 20)), 413, "bytes")
    wai_error(client.post("/ai/run/@cf/meta/llama-3.1-8b-instruct", json={"prompt": "Hi"}), 404, "no such model")
    wai_error(client.post("/nope", json={}), 404, "no such path")
    wai_error(client.get(WAI), 405, "not allowed")


def test_openai_errors(client):
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    for n in (0, 9, "2", 1.5, True):
        oai_error(client.post("/v1/chat/completions", json=dict(chat, n=n)), 400, "n", "[1, 8]")
        oai_error(client.post("/v1/completions", json={"prompt": "x", "n": n}), 400, "n", "[1, 8]")
    # passed to the library, which names it (out of range)
    oai_error(client.post("/v1/chat/completions", json=dict(chat, logit_bias={"1": 500})), 400, None, "logit_bias")
    oai_error(client.post("/v1/chat/completions", json=dict(chat, frobnicate=True)), 400, "frobnicate", "frobnicate")
    oai_error(client.post("/v1/chat/completions", json=dict(chat, temperature=9)), 400, None, "temperature")
    for prompt in (3, [], [[]], [1, "a"], [[1], "a"], [True], None, {"a": 1}):
        oai_error(client.post("/v1/completions", json={"prompt": prompt}), 400, "prompt", "prompt")
    oai_error(client.post("/v1/completions", json={"prompt": [1, 10 ** 9]}), 400, "prompt", "vocabulary")
    oai_error(client.get("/v1/models/another-model"), 404, "model", "another-model")
    oai_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}), 400, "max_tokens", "echo")
    oai_error(client.post("/v1/chat/completions", content=b"{"), 400, None, "JSON")
    oai_error(client.get("/v1/chat/completions"), 405, None, "not allowed")
    oai_error(client.get("/v1/nothing"), 404, None, "no such path")


def test_api_key_and_full_queue(llm):
    with running(create_app(llm, api_key="sekrit")) as base:
        assert httpx.post(base + WAI, json={"prompt": "Hi", "max_tokens": 1}).status_code == 401
        for header in ("Bearer nope", "Bearer sekrit2", "Basic sekrit", "sekrit", "Bearer"):
            wrong = httpx.post(base + "/v1/chat/completions", json={}, headers={"Authorization": header})
            oai_error(wrong, 401, None, "API key")
        for scheme in ("Bearer", "bearer", "BEARER"):  # the scheme is case-insensitive (RFC 7235)
            ok = httpx.post(base + WAI, json={"prompt": "Hi", "max_tokens": 1},
                            headers={"Authorization": f"{scheme} sekrit"}, timeout=60)
            assert ok.status_code == 200, scheme
        page = httpx.get(base + "/")  # the playground holds nothing; its own calls send the key typed into it
        assert page.status_code == 200 and "<html" in page.text.lower()
    with running(create_app(llm, max_queue=0)) as base:  # no room to wait: every request is turned away
        r = httpx.post(base + WAI, json={"prompt": "Hi", "max_tokens": 1})
        wai_error(r, 503, "busy")
        assert r.headers["retry-after"] == "1"
        assert httpx.get(base + "/health").status_code == 200


def write_named_adapter(llm, folder) -> None:
    """A rank-2 adapter of layer 0's q_proj, written by hand in PEFT's format (enough to change the answer)."""
    from safetensors.torch import save_file

    import torch

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 64, "target_modules": ["q_proj"]}))
    hidden = llm.config.hidden_size
    g = torch.Generator().manual_seed(0)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    save_file({key.format("A"): torch.randn(2, hidden, generator=g),
               key.format("B"): torch.randn(hidden, 2, generator=g)}, folder / "adapter_model.safetensors")


def test_lora_is_only_an_adapter_name_in_lora_dir(llm, tmp_path):
    write_named_adapter(llm, tmp_path / "loras" / "tuned")
    (tmp_path / "loras" / "half").mkdir()  # a folder that is not an adapter
    (tmp_path / "outside").mkdir()
    write_named_adapter(llm, tmp_path / "outside" / "adapter")  # a real adapter, but not in --lora-dir
    body = dict(prompt="What is 2+2?", **GREEDY)
    with running(create_app(llm, lora_dir=tmp_path / "loras")) as base:
        named = httpx.post(base + WAI, json=dict(body, lora="tuned"), timeout=120)
        assert named.status_code == 200, named.text
        served = without_cached(named.json()["result"])
        assert served == without_cached(llama32.generate(llm, lora=str(tmp_path / "loras" / "tuned"), **body))
        assert served != without_cached(llama32.generate(llm, **body))
        answers = []
        for name in ("/etc", "/nonexistent/dir", "..", "../loras/tuned", "tuned/..", "./tuned", "unknown", "half",
                     str(tmp_path / "loras" / "tuned"), str(tmp_path / "outside" / "adapter"), "../outside/adapter",
                     "~", ".tuned", "", 7, ["tuned"]):
            r = httpx.post(base + WAI, json=dict(body, lora=name), timeout=60)
            answers.append((r.status_code, r.text))
            assert (r.status_code, r.text) == answers[0], name  # the same 400 whatever exists on the machine
        status, text = answers[0]
        assert status == 400 and "lora" in text and str(tmp_path) not in text and "/etc" not in text
        oai = httpx.post(base + "/v1/chat/completions", timeout=60,
                         json={"messages": [{"role": "user", "content": "hi"}], "lora": "/etc", "max_tokens": 2})
        oai_error(oai, 400, "lora", "not the name of an adapter")


# --- the playground, in a real browser ---------------------------------------------------------------------------------


def test_playground_in_chromium_with_an_api_key(llm, browser):
    """The page opens without the key, shows the model, sends the typed key with its calls, honours the system
    prompt and the knobs (its greedy answer is the library's), shows speed, and its Stop button cancels."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    system, question = "You answer in one short sentence.", "What is the capital of France?"
    want = llama32.generate(llm, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                            temperature=0, top_k=5, seed=3, max_tokens=12)["response"]
    with running(create_app(llm, api_key="sekrit", model_name="smollm2")) as url:
        driver.get(url + "/")
        assert httpx.get(url + "/favicon.ico").headers["content-type"].startswith("image/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == "model: smollm2")

        def field(name, value):
            box = driver.find_element(By.ID, name)
            box.clear()
            box.send_keys(value)

        for name, value in (("temperature", "0"), ("top_k", "5"), ("seed", "3"), ("max_tokens", "12"),
                            ("system", system), ("message", question), ("key", "sekrit")):
            field(name, value)
        driver.find_element(By.ID, "send").click()
        seen = []  # the answer grows in steps while it streams
        WebDriverWait(driver, 120, poll_frequency=0.02).until(
            lambda d: seen.append(d.find_element(By.CSS_SELECTOR, ".assistant").text) or "tokens/s" in d.find_element(
                By.ID, "status").text)
        assert driver.find_element(By.CSS_SELECTOR, ".assistant").text == want.strip()
        assert len({s for s in seen if s}) > 2, seen  # several partial texts: it streamed
        status = driver.find_element(By.ID, "status").text
        assert "time to first token" in status and "tokens/s" in status
        assert driver.find_element(By.CSS_SELECTOR, ".user").text.endswith(question)

        # Stop: a long answer is cancelled in the server, not just hidden
        field("max_tokens", "2000")
        field("message", "Write a very long story about the sea.")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 60, poll_frequency=0.02).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) == 2
            and d.find_elements(By.CSS_SELECTOR, ".assistant")[1].text)
        driver.find_element(By.ID, "stop").click()
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "status").text == "stopped")
        deadline = time.time() + 5
        while httpx.get(url + "/health").json()["running"] and time.time() < deadline:
            time.sleep(0.02)
        assert httpx.get(url + "/health").json()["running"] == 0

        field("key", "wrong")  # the typed key is what the calls send
        field("message", "Hi")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 30).until(lambda d: "API key" in d.find_element(By.ID, "status").text)


# --- lm-eval-harness ------------------------------------------------------------------------------------------------

MC_DOCS = [{"question": "What is the capital of France?", "choices": ["Paris", "London", "Rome"], "answer": 0},
           {"question": "How many legs does a cat have?", "choices": ["four", "two", "six"], "answer": 0},
           {"question": "What colour is the sky on a clear day?", "choices": ["green", "blue"], "answer": 1},
           {"question": "Which animal barks?", "choices": ["a dog", "a fish", "a bird"], "answer": 0},
           {"question": "What is 2 + 2?", "choices": ["3", "4", "5"], "answer": 1}]
MC_TASK = """task: llama32_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: llama32_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


def test_lm_eval_local_completions_defaults_batch_4(llm, url, smollm2_dir, tmp_path, monkeypatch):
    """lm-eval's `local-completions` with its default arguments (token-id prompts, lists of them per request)
    and --batch_size 4, offline on local tasks: every loglikelihood equals the model's own, computed here from
    the same token ids, and generation tasks are answered."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (tmp_path / "mc.yaml").write_text(MC_TASK.format(data=data))
    (tmp_path / "gen.yaml").write_text(GEN_TASK.format(data=data))
    out = simple_evaluate(model="local-completions", model_args=f"model={smollm2_dir},base_url={url}/v1/completions",
                          tasks=["llama32_tiny_mc", "llama32_tiny_gen"], batch_size=4, log_samples=True,
                          task_manager=TaskManager(include_path=str(tmp_path)))
    hf = out["samples"]["llama32_tiny_mc"]
    assert len(hf) == len(MC_DOCS)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)  # what lm-eval tokenized with
    for sample in hf:
        for (context, continuation), [(logprob, greedy)] in zip(sample["arguments"], sample["resps"]):
            head, tail = tok.encode(context, add_special_tokens=False), tok.encode(continuation, add_special_tokens=False)
            ids = torch.tensor([head + tail])
            with torch.no_grad():
                logp = torch.log_softmax(llm.model(ids)[0].float(), dim=-1)
            rows = logp[len(head) - 1: -1]
            want = rows.gather(-1, torch.tensor(tail)[:, None]).sum().item()
            assert logprob == pytest.approx(want, abs=1e-3)
            assert greedy == bool((rows.argmax(-1) == torch.tensor(tail)).all())
    assert out["results"]["llama32_tiny_mc"]["acc,none"] >= 0.6  # real weights answer most of these
    answers = [s["resps"][0][0] for s in out["samples"]["llama32_tiny_gen"]]
    assert len(answers) == len(MC_DOCS) and all(isinstance(a, str) and "\n" not in a for a in answers)
    assert any(a.strip() for a in answers)
