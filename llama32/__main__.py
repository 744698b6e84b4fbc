"""`python -m llama32`: the command line over `llama32.load` and `llama32.generate`.

    python -m llama32 "What is the capital of France?"         # stream one answer
    python -m llama32 --chat                                   # a conversation on stdin
    python -m llama32 download [REPO_ID]                       # fetch a checkpoint ahead of time
    python -m llama32 download [REPO_ID] --original            # ... in Meta's layout (its original/ folder)

Every request field of docs/API.md has a flag; only the flags given are sent, so the defaults are the
library's. Errors are one line on stderr, never a traceback; the exit status says which kind (see EXIT_HELP).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import sys
import time
from collections.abc import Iterator

import torch

import llama32
from llama32.hub import DEFAULT_MODEL
from llama32.hub import download as hub_download

PROG = "llama32"
DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
CHAT_EXIT = ("/exit", "/quit")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

EXIT_HELP = """\
exit status:
  0    success
  1    the checkpoint cannot be had or loaded (not downloaded and no network, gated repo without
       HF_TOKEN, missing or corrupt files); the message says what to do
  2    a usage error: a bad flag or value (argparse, or a request the library rejects, such as
       --temperature 9), or an unreadable --tools file
  130  interrupted (Ctrl-C)
  141  stdout was closed early (piped into head, ...)

environment:
  HF_TOKEN         token for gated repos such as meta-llama/*
  LLAMA32_WEIGHTS  where repo ids are downloaded (default: the checkout's weights/ folder)
  HF_HUB_OFFLINE   set to 1 to never touch the network
"""

# (flag, request field, type, help). Flags left out are not sent, so the library's defaults apply.
REQUEST_FLAGS = [
    ("--max-tokens", "max_tokens", int, "most tokens to generate (library default 256)"),
    ("--temperature", "temperature", float, "0..5; 0 is greedy (library default 0.6)"),
    ("--top-p", "top_p", float, "0..2; nucleus sampling, >= 1 is off"),
    ("--top-k", "top_k", int, "1..50; sample among the k most likely tokens"),
    ("--seed", "seed", int, "1..9999999999; same request + seed + device + dtype gives the same output"),
    ("--repetition-penalty", "repetition_penalty", float, "0..2; over prompt and answer (0 and 1 are off)"),
    ("--frequency-penalty", "frequency_penalty", float, "0..2; by how often a token already appeared"),
    ("--presence-penalty", "presence_penalty", float, "0..2; once a token has appeared at all"),
    ("--lora", "lora", str, "a PEFT adapter: a directory, or a name under weights/loras/"),
]


SPECULATIVE_HELP = ("speculative decoding: 'ngram' (propose tokens from the request's own text) or a draft "
                    "checkpoint sharing the model's tokenizer; changes speed only (exact in float32)")


class UsageError(Exception):
    """A mistake in the command line found after argparse (reported like argparse's own: exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text with Llama 3.2 1B Instruct (or any Llama-family checkpoint).\n"
                    "The answer streams to stdout; errors and --verbose statistics go to stderr.",
        epilog="subcommand:\n  download [REPO_ID]   fetch a checkpoint ahead of time (default\n"
               f"                       {DEFAULT_MODEL}) and print the directory it went to;\n"
               "                       --original fetches Meta's layout (the repo's original/ folder)\n\n"
               + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="?",
                   help="the user message (read from stdin when left out and stdin is not a terminal)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a Hugging Face repo id or a local checkpoint directory (default {DEFAULT_MODEL}; "
                        "a repo id is downloaded into weights/ on first use)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, metavar="DTYPE",
                   help="float32, bfloat16 or float16 (default: the checkpoint's torch_dtype)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="weight-only int8 for the projections and the head (half the bytes of bf16 a step)")
    p.add_argument("--speculative", metavar="ngram|CHECKPOINT", default=None, help=SPECULATIVE_HELP)

    req = p.add_argument_group("request fields (sent only when given)")
    for flag, _, typ, text in REQUEST_FLAGS:
        req.add_argument(flag, type=typ, help=text, metavar={str: "ADAPTER"}.get(typ, typ.__name__.upper()))
    req.add_argument("--raw", action="store_true",
                     help="send the prompt as written, without the chat template (special tokens honoured)")
    req.add_argument("--system", metavar="TEXT", help="a system message (the request then uses messages)")
    req.add_argument("--tools", metavar="FILE.json", help="a JSON file holding a list of tools to offer")
    req.add_argument("--json-schema", metavar="FILE.json",
                     help="JSON mode: the answer is constrained to JSON matching the JSON Schema in this file "
                          "(response_format json_schema); {\"type\": \"object\"} for any object")

    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help="print the whole result {response, tool_calls, usage} as one line of JSON, no streaming")
    out.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    out.add_argument("--chat", action="store_true",
                     help="a conversation: one user line at a time from stdin, history kept; "
                          f"ends at end of input or {CHAT_EXIT[0]}")
    out.add_argument("--verbose", action="store_true",
                     help="after each answer, print token counts, time to first token and tok/s to stderr")
    return p


def build_download_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} download",
        description="Fetch a checkpoint from the Hugging Face hub into weights/ (or $LLAMA32_WEIGHTS)\n"
                    "and print the directory it went to. Gated repos (meta-llama/*) need HF_TOKEN.",
        epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("repo_id", nargs="?", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    p.add_argument("--original", action="store_true",
                   help="fetch Meta's original layout instead (the repo's original/ folder: params.json, "
                        "consolidated.NN.pth, tokenizer.model) into weights/<name>/original/; load that folder")
    return p


def build_serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} serve",
        description="Serve a checkpoint over HTTP: the Workers AI REST API (/ai/run/@cf/meta/llama-3.2-1b-instruct,\n"
                    "/client/v4/accounts/<id>/ai/run/...), an OpenAI-compatible API (/v1/models,\n"
                    "/v1/chat/completions, /v1/completions), GET /health and a playground page at /.\n"
                    "Needs the serve extra: pip install 'llama32[serve]'.",
        epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or hub repo id (default {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--max-batch", type=int, default=None, help="rows decoded together (default 8 on CPU, 32 on CUDA)")
    p.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait; more get 503 (default 64)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set LLAMA32_API_KEY)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument("--lora", default=None, help="a LoRA adapter applied to every request that names none")
    p.add_argument("--lora-dir", default=None, help="the folder of adapters a request may name in 'lora' "
                                                   "(default weights/loras/); a request never names a path")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="weight-only int8 for the projections and the head")
    p.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="the generation loop's KV memory budget (default 1 GiB on CPU, 4 GiB on CUDA)")
    p.add_argument("--speculative", metavar="ngram|CHECKPOINT", default=None, help=SPECULATIVE_HELP)
    p.add_argument("--served-model-name", default=None,
                   help="the model id in /v1/models and in responses (default: the checkpoint folder's name)")
    p.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="browser origins allowed to call the server (CORS; none by default), e.g. https://app.example")
    r = p.add_argument_group("on Ray Serve (any of these; needs the ray extra: pip install 'llama32[ray]')",
                             "the same server in front of model replicas, each with its own copy of the model")
    r.add_argument("--replicas", type=int, default=None, metavar="N", help="model replicas (default 1)")
    r.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="alone or left out: start a local Ray; auto or ray://host:10001: join that cluster")
    r.add_argument("--router", choices=["prefix", "pow2"], default=None,
                   help="prefix: a prompt goes to the replica that holds its prefix (default with more than one "
                        "replica); pow2: Ray Serve's default, the less busy of two random replicas")
    r.add_argument("--router-imbalance", type=int, default=None, metavar="N",
                   help="with --router prefix: when the replicas' requests in flight differ by more than N, a "
                        "request goes to the less busy of two instead of where its prefix is (default 2)")
    r.add_argument("--cpus-per-replica", type=float, default=None, metavar="C", help="default 1")
    r.add_argument("--gpus-per-replica", type=float, default=None, metavar="G", help="default 0 (CPU replicas)")
    r.add_argument("--min-replicas", type=int, default=None, metavar="A",
                   help="with --max-replicas: autoscale between A and B replicas, aiming at a full batch each")
    r.add_argument("--max-replicas", type=int, default=None, metavar="B")
    return p


RAY_FLAGS = ("replicas", "ray", "router", "router_imbalance", "cpus_per_replica", "gpus_per_replica", "min_replicas",
             "max_replicas")


def serve(argv: list[str]) -> int:
    args = build_serve_parser().parse_args(argv)
    if any(getattr(args, flag) is not None for flag in RAY_FLAGS):
        try:
            from llama32.server.ray import run
        except ImportError as e:
            raise UsageError(f"serve --replicas needs the serve and ray extras ({e}); "
                             "pip install 'llama32[serve,ray]'") from None
        try:
            run(vars(args))
        except ValueError as e:
            raise UsageError(f"serve: {e}") from None
        return 0
    try:
        from llama32.server import serve as run_server
    except ImportError as e:
        raise UsageError(f"serve needs the serve extra ({e}); pip install 'llama32[serve]'") from None
    run_server(args.model, host=args.host, port=args.port, max_batch=args.max_batch, api_key=args.api_key,
               device=args.device, dtype=args.dtype, lora=args.lora, max_queue=args.max_queue,
               lora_dir=args.lora_dir, quantize=args.quantize, kv_cache_bytes=args.kv_cache_bytes,
               served_model_name=args.served_model_name, allowed_origins=args.allowed_origins,
               speculative=args.speculative)
    return 0


def build_batch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} batch",
        description="Run a JSONL file of requests ({\"id\": ..., \"request\": {...}} per line) and write one\n"
                    "{\"id\", \"result\"} or {\"id\", \"error\"} line per request to OUT, in input order.\n"
                    "Run it again with the same OUT after an interruption: finished ids are skipped.",
        epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="requests, one JSON record per line")
    p.add_argument("output", help="results, appended one JSON record per line")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or hub repo id (default {DEFAULT_MODEL})")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data: alone, a local Ray; with an address (ray://host:10001 or auto), a cluster")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each with its own copy of the model (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per Ray actor (default 0: CPU actors)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def batch(argv: list[str]) -> int:
    args = build_batch_parser().parse_args(argv)
    if not os.path.isfile(args.input):
        raise UsageError(f"batch: no such input file {args.input!r}")
    if args.workers < 1:
        raise UsageError(f"batch: --workers must be at least 1, got {args.workers}")
    from llama32.batch import run_file
    if args.ray is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("batch --ray needs the ray extra: pip install 'llama32[ray]'") from None
    summary = run_file(args.input, args.output, model=args.model, device=args.device, dtype=args.dtype,
                       use_ray=args.ray is not None, ray_address=args.ray or None, workers=args.workers,
                       gpus_per_worker=args.gpus_per_worker, progress=not args.no_progress)
    print(f"{PROG} batch: {summary['written']} written ({summary['errors']} errors), "
          f"{summary['skipped']} already in {args.output}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------------
# The request


def request_fields(args: argparse.Namespace) -> dict:
    """The request fields the user set: everything else is left to the library's defaults."""
    request = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _, _ in REQUEST_FLAGS}
    request = {k: v for k, v in request.items() if v is not None}
    if args.raw:
        request["raw"] = True
    if args.tools is not None:
        request["tools"] = read_tools(args.tools)
    if args.json_schema is not None:
        schema = read_json_file(args.json_schema, "--json-schema", dict, "a JSON object (a JSON Schema)")
        request["response_format"] = {"type": "json_schema", "json_schema": schema}
    return request


def read_json_file(path: str, flag: str, kind: type, what: str):
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as e:
        raise UsageError(f"{flag}: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"{flag}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, kind):
        raise UsageError(f"{flag}: {path} must hold {what}, got {type(data).__name__}")
    return data


def read_tools(path: str) -> list:
    return read_json_file(path, "--tools", list, "a JSON list of tools")


def first_turn(args: argparse.Namespace) -> dict:
    """The prompt part of a one-shot request: `prompt`, or `messages` when there is a system message."""
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise UsageError("a prompt is required (as an argument or on stdin), or use --chat")
        prompt = sys.stdin.read().rstrip("\n")
        if not prompt.strip():
            raise UsageError("stdin held no prompt; give one as an argument, or use --chat")
    if args.system is None:
        return {"prompt": prompt}
    return {"messages": [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]}


# ----------------------------------------------------------------------------------------------------
# Running and printing


def format_call(call: dict) -> str:
    return f"[tool call] {call['name']}({json.dumps(call.get('arguments', {}), ensure_ascii=False)})"


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_once(llm: llama32.Llama, request: dict, args: argparse.Namespace) -> dict:
    """Generate one answer, print it as the flags say, and return the result dict."""
    start = time.perf_counter()
    if args.json or args.no_stream:
        result = llama32.generate(llm, **request)
        first = None
        if args.json:
            write(json.dumps(result, ensure_ascii=False) + "\n")
        else:
            write(result["response"] + "\n" + "".join(format_call(c) + "\n" for c in result["tool_calls"]))
    else:
        chunks: Iterator[dict] = llama32.generate(llm, stream=True, **request)
        pieces, first, last = [], None, {}
        for chunk in chunks:
            if first is None:
                first = time.perf_counter()
            if chunk["response"]:
                write(chunk["response"])
                pieces.append(chunk["response"])
            last = chunk
        result = {"response": "".join(pieces), "tool_calls": last.get("tool_calls", []), "usage": last["usage"]}
        write("\n" + "".join(format_call(c) + "\n" for c in result["tool_calls"]))
    if args.verbose:
        print(stats_line(result["usage"], start, first, time.perf_counter()), file=sys.stderr, flush=True)
    return result


def stats_line(usage: dict, start: float, first: float | None, end: float) -> str:
    n = usage["completion_tokens"]
    head = f"{PROG}: {usage['prompt_tokens']} prompt tokens, {n} completion tokens"
    if first is None:  # not streamed: only the whole time is known
        return f"{head}, {end - start:.3f} s in all, {n / max(end - start, 1e-9):.1f} tok/s"
    # The first chunk comes after prefill and one decode step; the rate is over the steps after it.
    rate = (n - 1) / (end - first) if n > 1 and end > first else n / max(end - start, 1e-9)
    return f"{head}, time to first token {first - start:.3f} s, {rate:.1f} tok/s"


def assistant_turn(result: dict) -> dict:
    """The history entry for an answer; Llama 3.2's format carries at most one tool call per turn."""
    calls = result["tool_calls"]
    if len(calls) == 1:
        return {"role": "assistant", "content": result["response"], "tool_calls": calls}
    text = result["response"]
    if calls:
        text = (text + "\n" if text else "") + json.dumps([{"name": c["name"], "parameters": c["arguments"]}
                                                            for c in calls], ensure_ascii=False)
    return {"role": "assistant", "content": text}


def chat(llm: llama32.Llama, request: dict, args: argparse.Namespace) -> int:
    """Read user lines, answer each with the whole conversation so far. Returns the exit status."""
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    # Check the flags once before the first line is read (validation happens before any compute).
    # Closed here, not left to the garbage collector: a Ctrl-C arriving inside a finalizer (`Stream.__del__`)
    # would be printed and swallowed instead of ending the chat with 130.
    llama32.generate(llm, stream=True, messages=messages + [{"role": "user", "content": "hi"}], **request).close()
    status = 0
    pending = [args.prompt] if args.prompt is not None else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{PROG}: chatting with {args.model}; {CHAT_EXIT[0]} or Ctrl-D to end", file=sys.stderr)
    while True:
        if pending:
            line = pending.pop()
        else:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:  # end of input
                if interactive:
                    sys.stderr.write("\n")
                return status
        line = line.strip()
        if not line:
            continue
        if line in CHAT_EXIT:
            return status
        messages.append({"role": "user", "content": line})
        try:
            result = run_once(llm, dict(request, messages=messages), args)
        except llama32.InvalidRequest as e:  # e.g. the conversation outgrew the context: drop this turn
            messages.pop()
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
            status = 2
            continue
        messages.append(assistant_turn(result))


def download(argv: list[str]) -> int:
    args = build_download_parser().parse_args(argv)
    if not _REPO_ID.match(args.repo_id):
        raise UsageError(f"download: {args.repo_id!r} is not a Hugging Face repo id (org/name)")
    print(hub_download(args.repo_id, original=args.original).resolve())
    return 0


def generate_main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.raw and (args.system is not None or args.chat):
        parser.error("--raw sends the prompt as written: it cannot be combined with --system or --chat")
    if args.json and args.no_stream:
        args.no_stream = False  # --json already means no streaming
    request = request_fields(args)
    turn = None if args.chat else first_turn(args)  # read stdin before the (slow) load
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device: {args.device!r} is not a device (cpu, cuda, cuda:1, ...)")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is available here; use --device cpu")

    start = time.perf_counter()
    llm = llama32.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                       speculative=args.speculative)
    if args.verbose:
        print(f"{PROG}: loaded {llm.path} on {llm.device} as {str(llm.dtype).removeprefix('torch.')} "
              f"in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    if args.chat:
        return chat(llm, request, args)
    run_once(llm, dict(request, **turn), args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `llama32` command. Returns the exit status (see EXIT_HELP)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        # A subcommand beside an optional positional prompt: argparse subparsers would take any prompt for a
        # command name, so `download` is recognised here (`llama32 -- download` asks about the word instead).
        if argv[:1] == ["download"]:
            return download(argv[1:])
        if argv[:1] == ["serve"]:
            return serve(argv[1:])
        if argv[:1] == ["batch"]:
            return batch(argv[1:])
        return generate_main(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `llama32 ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    # The library's two user-facing errors; anything else is a bug and keeps its traceback.
    except llama32.InvalidRequest as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except llama32.CheckpointError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


def exit_with(status: int) -> None:
    """End the process with `status`: the `atexit` functions run and the output is flushed, then the process ends
    past the interpreter's own exit, whose native teardown is not needed once the work is done and can fail:
    - a run that had answered and printed in full sometimes ended by SIGABRT ("terminate called without an active
      exception", from a native thread still held at teardown; tests/test_cli.py saw it about once in a suite);
    - CPython 3.11 marks a KeyboardInterrupt that passed through `exec` of a string (fastjsonschema compiles the
      request schemas so, in `schemas.py`, on a chat's first check) as never handled, even once `main` caught it,
      and then ends the process by SIGINT instead of with 130 (tests/test_cli.py saw it in about a third of its
      runs)."""
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more to say
                pass
        os._exit(status or 0)


if __name__ == "__main__":
    exit_with(main())
