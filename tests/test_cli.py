"""`python -m llama32`, run as a user runs it: a subprocess from the repo root, checked on stdout, stderr and exit
status.

Most cases use a tiny random checkpoint with the real Llama 3 tokenizer (fast; the text is noise but deterministic
under --temperature 0); one uses the real SmolLM2-135M-Instruct weights to see a sensible streamed answer.
Every run sets HF_HUB_OFFLINE=1 so nothing here can touch the network.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GREEDY = ["--temperature", "0", "--max-tokens", "8"]
STATS = re.compile(r"^llama32: (\d+) prompt tokens, (\d+) completion tokens, "
                   r"time to first token \d+\.\d+ s, \d+\.\d+ tok/s$", re.M)


def cli_env(**extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def run_cli(*args: str, stdin: str = "", env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama32", *args], cwd=REPO, input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env or cli_env())


@lru_cache(maxsize=None)
def greedy_json(model: str, *args: str) -> dict:
    """The --json result of a greedy request (cached: the same request gives the same answer in every process)."""
    proc = run_cli("--model", model, *GREEDY, "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_clean_error(proc: subprocess.CompletedProcess, status: int, *, one_line: bool = True) -> str:
    """A user-facing failure: the given status, no traceback, a `llama32: error:` line last on stderr."""
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    if one_line:
        assert len(lines) == 1, proc.stderr
    assert lines[-1].startswith("llama32: error: ") and len(lines[-1]) > len("llama32: error: ") + 10, proc.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def tiny(make_checkpoint, llama3_tokenizer_dir) -> str:
    return str(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir))


# --- output ----------------------------------------------------------------------------------------------------------


def test_json_has_exactly_the_contract_keys(tiny):
    proc = run_cli("--model", tiny, *GREEDY, "--json", "Hello")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1  # one line of JSON, easy to pipe
    result = json.loads(proc.stdout)
    assert result == greedy_json(tiny, "Hello")
    assert set(result) == {"response", "tool_calls", "finish_reason", "usage"}
    assert set(result["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"}
    assert isinstance(result["response"], str) and result["tool_calls"] == []
    usage = result["usage"]
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streamed_and_unstreamed_output_equal_the_json_response(tiny):
    prompt = "Hello"
    result = greedy_json(tiny, prompt)
    assert result["response"], "a random tiny model should say something in 8 greedy tokens"
    streamed = run_cli("--model", tiny, *GREEDY, prompt)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == result["response"] + "\n"
    assert streamed.stderr == ""  # nothing but the answer unless --verbose
    whole = run_cli("--model", tiny, *GREEDY, "--no-stream", prompt)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout == result["response"] + "\n"


def test_only_the_flags_given_are_sent(tiny):
    # --system turns the request into messages: the prompt grows by the system text.
    plain = greedy_json(tiny, "Hello")
    system = greedy_json(tiny, "--system", "Answer in French.", "Hello")
    assert system["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    # --raw skips the chat template: "<|begin_of_text|>" + "Hello" is two tokens.
    raw = greedy_json(tiny, "--raw", "Hello")
    assert raw["usage"]["prompt_tokens"] == 2
    # Sampling with a seed is reproducible across processes; max_tokens is honoured.
    args = ["--model", tiny, "--json", "--temperature", "1", "--top-k", "40", "--top-p", "0.9", "--seed", "7",
            "--repetition-penalty", "1.1", "--frequency-penalty", "0.5", "--presence-penalty", "0.5",
            "--max-tokens", "5", "Hello"]
    a, b = (json.loads(run_cli(*args).stdout) for _ in range(2))
    assert a == b and a["usage"]["completion_tokens"] <= 5


def test_prompt_from_stdin(tiny):
    by_stdin = run_cli("--model", tiny, *GREEDY, "--json", stdin="Hello\n")
    assert by_stdin.returncode == 0, by_stdin.stderr
    assert json.loads(by_stdin.stdout) == greedy_json(tiny, "Hello")


def test_tools_file_is_offered(tiny, tmp_path):
    tools = [{"name": "get_weather", "description": "Weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(tools))
    plain = greedy_json(tiny, "Hello")
    offered = greedy_json(tiny, "--tools", str(path), "Hello")
    assert offered["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 20  # the tool list is in the prompt
    assert isinstance(offered["tool_calls"], list)


def test_verbose_prints_statistics_to_stderr(tiny):
    proc = run_cli("--model", tiny, *GREEDY, "--verbose", "Hello")
    assert proc.returncode == 0, proc.stderr
    stats = STATS.findall(proc.stderr)
    assert len(stats) == 1, proc.stderr
    assert "tok/s" not in proc.stdout
    result = greedy_json(tiny, "Hello")
    assert [int(n) for n in stats[0]] == [result["usage"]["prompt_tokens"], result["usage"]["completion_tokens"]]


def test_real_weights_answer_sensibly(smollm2_dir):
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    proc = run_cli("--model", str(smollm2_dir), "--raw", "--temperature", "0", "--max-tokens", "12", prompt)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "<|im_end|>" not in proc.stdout  # the stop token is not part of the text


# --- chat ------------------------------------------------------------------------------------------------------------


def test_chat_keeps_history(tiny):
    proc = run_cli("--model", tiny, *GREEDY, "--chat", "--json", stdin="Hi there.\nAnd what else?\n")
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.splitlines())
    # The second request carries the first question, the first answer and the new question.
    grown = second["usage"]["prompt_tokens"] - first["usage"]["prompt_tokens"]
    assert grown > first["usage"]["completion_tokens"], (first, second)
    assert "> " not in proc.stderr  # no prompt when stdin is not a terminal


def test_chat_streams_each_answer_and_stops_at_exit(tiny):
    proc = run_cli("--model", tiny, *GREEDY, "--chat", "--verbose", stdin="Hello\n\nAnd what else?\n/exit\nNot this.\n")
    assert proc.returncode == 0, proc.stderr
    stats = [tuple(map(int, s)) for s in STATS.findall(proc.stderr)]
    assert len(stats) == 2, proc.stderr  # the empty line is skipped; nothing after /exit is answered
    (p1, c1), (p2, _) = stats
    assert p2 > p1 + c1
    # Each streamed answer equals the one-shot answer to the same first question.
    one_shot = greedy_json(tiny, "Hello")
    assert proc.stdout.startswith(one_shot["response"] + "\n")


def test_chat_rejects_bad_flags_before_reading_input(tiny):
    proc = run_cli("--model", tiny, "--chat", "--temperature", "9", stdin="Hi\n")
    assert "temperature" in assert_clean_error(proc, 2)
    assert proc.stdout == ""


def test_ctrl_c_exits_130_quietly(tiny):
    args = ["--model", tiny, "--chat", "--verbose", "--max-tokens", "8"]
    # The child starts with Ctrl-C's default disposition whatever this run inherited: a test runner started
    # in the background by a non-interactive shell ignores SIGINT, its children inherit that, and Python
    # then installs no KeyboardInterrupt handler (the chat would just read on to the end of its input).
    proc = subprocess.Popen([sys.executable, "-m", "llama32", *args], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # loaded: the chat checks its flags (compiling the request schemas the first time), then reads stdin; the
        # signal lands in either
        assert proc.stderr.readline().startswith("llama32: loaded ")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (out, err)
    assert out == "" and err == ""


# --- errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, status, needle", [
    (["--no-such-flag"], 2, "unrecognized arguments"),
    (["--max-tokens", "abc"], 2, "--max-tokens"),
    (["--dtype", "int8"], 2, "--dtype"),
    (["--raw", "--system", "be brief"], 2, "--raw"),
    (["--temperature", "9"], 2, "temperature"),
    (["--top-k", "0"], 2, "top_k"),
    (["--max-tokens", "100000"], 2, "max_tokens"),
])
def test_bad_flags_exit_2_without_traceback(tiny, args, status, needle):
    proc = run_cli("--model", tiny, *args, "Hello")
    line = assert_clean_error(proc, status, one_line=False)  # argparse adds its usage lines above
    assert needle in line
    assert proc.stdout == ""


def test_unreadable_tools_file(tiny, tmp_path):
    proc = run_cli("--model", tiny, "--tools", str(tmp_path / "missing.json"), "Hello")
    assert "--tools" in assert_clean_error(proc, 2)
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "not a list"}')
    proc = run_cli("--model", tiny, "--tools", str(bad), "Hello")
    assert "list" in assert_clean_error(proc, 2)


def test_missing_model_is_one_actionable_line(tmp_path):
    proc = run_cli("--model", "nobody/nothing", "Hello", env=cli_env(LLAMA32_WEIGHTS=str(tmp_path)))
    line = assert_clean_error(proc, 1)
    assert "nobody/nothing" in line
    assert "download" in line and "local checkpoint directory" in line  # says what to do
    assert proc.stdout == ""


def test_model_that_is_neither_a_directory_nor_a_repo_id(tmp_path):
    proc = run_cli("--model", str(tmp_path / "no-such-dir"), "Hello")
    assert "no such directory" in assert_clean_error(proc, 1)


def test_download_offline_fails_cleanly(tmp_path):
    proc = run_cli("download", "nobody/nothing", env=cli_env(LLAMA32_WEIGHTS=str(tmp_path)))
    assert "nobody/nothing" in assert_clean_error(proc, 1)
    assert proc.stdout == ""
    proc = run_cli("download", env=cli_env(LLAMA32_WEIGHTS=str(tmp_path)))  # the default checkpoint
    assert "meta-llama/Llama-3.2-1B-Instruct" in assert_clean_error(proc, 1)


def test_download_rejects_what_is_not_a_repo_id():
    proc = run_cli("download", "not-a-repo-id")
    assert "repo id" in assert_clean_error(proc, 2)


def test_help_mentions_download_and_exit_codes():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for text in ("--max-tokens", "--chat", "--json", "download [REPO_ID]", "exit status", "130"):
        assert text in proc.stdout


def test_tool_calls_are_printed_and_kept_in_the_chat_history():
    from llama32.__main__ import assistant_turn, format_call

    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert format_call(call) == '[tool call] get_weather({"city": "Paris"})'
    one = {"response": "", "tool_calls": [call], "usage": {}}
    assert assistant_turn(one) == {"role": "assistant", "content": "", "tool_calls": [call]}
    # Llama 3.2's format has one call per assistant turn: more are kept as the JSON the model would write.
    two = {"response": "", "tool_calls": [call, call], "usage": {}}
    assert json.loads(assistant_turn(two)["content"]) == [{"name": "get_weather", "parameters": {"city": "Paris"}}] * 2
