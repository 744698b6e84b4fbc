"""`python -m llama32 serve --replicas 2` on a local Ray: one server (the command itself, two CPU replicas of
SmolLM2) shared by every test, driven over HTTP. Answers equal the library's; a shared prompt prefix stays on
one replica and is reused there; unrelated prefixes spread; the openai SDK streams; a disconnect frees its row
on its replica; a replica killed mid-traffic loses no request that had not started streaming; SIGTERM drains
and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import llama32
from fixtures import without_cached

pytest.importorskip("ray.serve")
psutil = pytest.importorskip("psutil")

WAI = "/ai/run/@cf/meta/llama-3.2-1b-instruct"
GREEDY = dict(temperature=0, max_tokens=12)
STORY = dict(stream=True, max_tokens=2000, temperature=0)
LONG = dict(STORY, prompt="Write a very long story about a lighthouse keeper.")


def system_prompt(topic: str) -> str:
    return (f"You are a patient guide to {topic}. Answer briefly, in plain words, and name one source. " * 8).strip()


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log
        self.client = httpx.Client(base_url=url, timeout=120)

    def health(self) -> dict:
        r = self.client.get("/health")
        r.raise_for_status()  # Serve's proxy answers 404 until the application is deployed
        return r.json()

    def replicas(self) -> dict[str, dict]:
        return {r["id"]: r for r in self.health()["replicas"]}

    def wait(self, condition, seconds: float, what: str):
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                value = condition()
                if value:
                    return value
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"not within {seconds} s: {what}\n{self.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory, request):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("ray-serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llama32", "serve", "--model", str(smollm2_dir), "--device", "cpu",
                                 "--dtype", "float32", "--replicas", "2", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        request.getfixturevalue("smol")  # the library's oracle loads while the server starts
        server.wait(lambda: len(server.replicas()) == 2, 240, "two replicas up")
        yield server
    finally:
        server.client.close()
        if proc.poll() is None:
            family = proc_family(proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            finally:
                for p in family:
                    if alive(p):
                        p.kill()


def proc_family(pid: int) -> list:
    """The process and every process it started (Ray's GCS, raylet and workers among them)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def alive(p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("flags, fragment", [
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--min-replicas", "2"], "--min-replicas and --max-replicas go together"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas (3) is more than --max-replicas (2)"),
    (["--replicas", "5", "--min-replicas", "1", "--max-replicas", "3"], "must be within"),
    (["--replicas", "2", "--router-imbalance", "-1"], "--router-imbalance must be at least 0"),
])
def test_bad_ray_flags_are_usage_errors(flags, fragment, capsys):
    from llama32.__main__ import main

    assert main(["serve", "--model", "some/dir", *flags]) == 2  # refused before Ray starts
    assert fragment in capsys.readouterr().err


def test_prefix_routing_gives_way_beyond_the_router_imbalance():
    from llama32.server.ray import engine_options, settings

    def router(**options):
        return engine_options(settings(dict(model="some/dir", replicas=2, **options))).get("request_router_config")

    assert router().request_router_kwargs == {"imbalanced_threshold": 2}  # not a batch (8): see RESULTS.md
    assert router(router_imbalance=5).request_router_kwargs == {"imbalanced_threshold": 5}
    assert router(router="pow2") is None  # Ray Serve's default router


def test_answers_equal_the_library(server, smol):
    body = dict(prompt="What is the capital of France?", **GREEDY)
    r = server.client.post(WAI, json=body)
    assert r.status_code == 200, r.text
    assert without_cached(r.json()["result"]) == without_cached(llama32.generate(smol, **body))
    assert r.headers["x-llama32-replica"] in server.replicas()
    messages = [{"role": "system", "content": system_prompt("tides")}, {"role": "user", "content": "Why?"}]
    chat = server.client.post("/v1/chat/completions", json=dict(messages=messages, **GREEDY)).json()
    assert chat["choices"][0]["message"]["content"] == llama32.generate(smol, messages=messages, **GREEDY)["response"]
    bad = server.client.post("/v1/chat/completions", json=dict(messages=messages, temperature=9))
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
    too_long = server.client.post(WAI, json=dict(prompt="Hi", max_tokens=10**6))  # checked on the replica
    assert too_long.status_code == 400 and "max_tokens" in too_long.json()["errors"][0]["message"], too_long.text
    assert server.client.get("/v1/models").json()["data"][0]["id"] == smol.path.name


def test_a_shared_system_prompt_stays_on_one_replica_and_is_reused(server):
    system = system_prompt("the lighthouses of the Baltic coast")
    seen, cached = set(), []
    questions = ("Name one.", "Which is the tallest?", "Which is the oldest?", "Who kept them?", "Are any open?",
                 "Which is the newest?")  # six: with a random router all would share one replica 1 time in 32
    for question in questions:
        r = server.client.post("/v1/chat/completions", json=dict(
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}], max_tokens=2))
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-llama32-replica"])
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert len(seen) == 1, seen
    assert cached[0] == 0 and min(cached[1:]) >= 64, cached  # the system prompt's whole blocks


def test_unrelated_prefixes_use_both_replicas(server):
    seen = []
    for topic in ("volcanoes", "medieval music", "knitting patterns", "the moons of Jupiter"):
        r = server.client.post(WAI, json=dict(messages=[{"role": "system", "content": system_prompt(topic)},
                                                        {"role": "user", "content": "Hello."}], max_tokens=2))
        assert r.status_code == 200, r.text
        seen.append(r.headers["x-llama32-replica"])
    assert set(seen) == set(server.replicas()), seen


def test_the_openai_sdk_streams(server, smol):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "Name three colours."}]
    chunks = list(client.chat.completions.create(model="smol", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == llama32.generate(smol, messages=messages, **GREEDY)["response"]
    assert chunks[-1].usage.completion_tokens == GREEDY["max_tokens"]


def test_more_streams_than_serves_default_limit_all_start_at_once(server):
    """Serve lets a deployment replica hold 5 requests unless told otherwise, and a stream holds its slot until
    it ends: the HTTP deployment must take more (`ingress_options`), or an eighth user waits for whole answers
    before its prompt reaches a replica (and `/health` waits too)."""
    from contextlib import ExitStack

    with ExitStack() as streams, httpx.Client(base_url=server.url, timeout=60) as c:
        reading = []  # each stream's lines (a dropped line iterator closes its response)
        for i in range(8):
            r = streams.enter_context(c.stream("POST", WAI, json=dict(LONG, prompt=f"{i}: {LONG['prompt']}")))
            assert r.status_code == 200
            reading.append(r.iter_lines())
            assert next(reading[-1]).startswith("data: ")  # its answer has started
        server.wait(lambda: server.health()["running"] == 8, 10, "every row at once, none waiting for an end")
    server.wait(lambda: all(r["running"] == 0 for r in server.replicas().values()), 10, "no row left running")


def test_a_disconnect_frees_the_row_on_its_replica(server):
    with pytest.raises(httpx.ReadTimeout):  # a blocking request whose client gives up
        httpx.post(server.url + WAI, json=dict(LONG, stream=False), timeout=2)
    server.wait(lambda: all(r["running"] == 0 for r in server.replicas().values()), 5, "no row left running")
    gave_up = server.wait(lambda: [line for line in server.log.read_text().splitlines()
                                   if f"POST {WAI} 499 tokens=" in line], 10, "the request logged as 499")
    assert 0 < int(gave_up[-1].split("tokens=")[1].split()[0]) < 2000  # it had run, and stopped
    with httpx.Client(base_url=server.url, timeout=120) as c:
        with c.stream("POST", WAI, json=LONG) as r:
            replica = r.headers["x-llama32-replica"]
            lines = r.iter_lines()
            next(lines)
            server.wait(lambda: server.replicas()[replica]["running"] == 1, 10, "the row shows on its replica")
    server.wait(lambda: server.replicas()[replica]["running"] == 0, 5, "the row left its replica")
    metrics = server.client.get("/metrics").text
    assert f'llama32_replica_running{{replica="{replica}"}} 0.0' in metrics
    assert 'llama32_requests_total{route="/ai/run",status="200"}' in metrics


# Kills the replica actors named on its stdin. A process of its own joins the server's Ray (with the token
# that Ray's local cluster wrote to ~/.ray/auth_token): a process that has imported ray cannot switch to token
# authentication afterwards through a public API, and joining takes seconds, so it is ready before the test.
KILLER = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("ready", flush=True)
for replica in sys.stdin:
    ray.kill(ray.get_actor("SERVE_REPLICA::llama32#Engine#" + replica.strip(), namespace="serve"))
    print("killed", flush=True)
"""


def test_a_killed_replica_loses_no_request_that_had_not_streamed(server, smol):
    """A stream runs on a replica, three blocking requests sharing its prompt's prefix follow it there, and
    the replica's actor is killed: the stream ends with an error event, the three are answered by the other
    replica (the ingress sent them again) with the library's answers, nothing hangs, and Serve starts a new
    replica."""
    killer = subprocess.Popen([sys.executable, "-c", KILLER, address(server.log)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, RAY_AUTH_MODE="token"))
    try:
        system = system_prompt("the history of clocks")
        chats = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
                 for q in ("Who made the first one?", "How do they work?", "What is a pendulum?")]
        slow = dict(temperature=0, max_tokens=48)
        want = [llama32.generate(smol, messages=m, **slow)["response"] for m in chats]
        answers = {}

        def ask(i):  # the same system prompt: routed to the stream's replica
            answers[i] = httpx.post(server.url + "/v1/chat/completions", json=dict(messages=chats[i], **slow),
                                    timeout=120)

        assert killer.stdout.readline().strip() == "ready"
        with httpx.Client(base_url=server.url, timeout=120) as c:
            story = [{"role": "system", "content": system}, {"role": "user", "content": "Tell a long story."}]
            with c.stream("POST", WAI, json=dict(STORY, messages=story)) as r:
                victim = r.headers["x-llama32-replica"]
                lines = r.iter_lines()
                next(lines)
                askers = [threading.Thread(target=ask, args=(i,)) for i in range(len(chats))]
                for t in askers:
                    t.start()
                time.sleep(0.5)
                killer.stdin.write(victim + "\n")
                killer.stdin.flush()
                assert killer.stdout.readline().strip() == "killed"
                events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        for t in askers:
            t.join(timeout=120)
    finally:
        killer.kill()
        killer.wait()
    last = json.loads(events[-1])
    assert last["success"] is False and last["errors"][0]["code"] == 502, last  # an error event, no [DONE]
    assert sorted(answers) == [0, 1, 2]
    for i, r in answers.items():
        assert r.status_code == 200, r.text
        assert r.headers["x-llama32-replica"] != victim
        assert r.json()["choices"][0]["message"]["content"] == want[i]
    assert "sending the request to another replica" in server.log.read_text()  # they went to the victim first
    server.wait(lambda: len(server.replicas()) == 2 and victim not in server.replicas(), 90,
                "Serve restarts the replica")


def address(log: Path) -> str:
    """The local Ray's address, as the server logged it."""
    for line in log.read_text().splitlines():
        if "Ray at " in line and "(started here)" in line:
            return line.split("Ray at ")[1].split()[0]
    raise AssertionError("the server did not log its Ray address")


def test_sigterm_drains_and_leaves_no_process(server):
    family = proc_family(server.proc.pid)
    assert len(family) > 3  # Ray's own processes are the server's children
    with httpx.Client(base_url=server.url, timeout=120) as c:
        with c.stream("POST", WAI, json=dict(LONG, max_tokens=24)) as r:
            lines = r.iter_lines()
            next(lines)
            server.proc.send_signal(signal.SIGTERM)
            events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"  # the stream in flight finished
    assert server.proc.wait(timeout=60) == 0
    assert "shut down" in server.log.read_text()
    time.sleep(1)
    assert [p.pid for p in family if alive(p)] == []
