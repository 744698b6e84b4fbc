"""What a request's schema check costs: llama32's compiled check against the alternatives it was chosen over.

    python benchmarks/validate_bench.py [--model CHECKPOINT] [--repeat 20000]

Per request shape (a short prompt with sampling fields, a chat with a tool, a 20-turn conversation), the
microseconds per call of:
- `schema.check_input`: the input schema compiled by fastjsonschema, plus the Python-only checks (what
  `generate` runs before touching the model);
- the `jsonschema` library's Draft202012Validator on the same published document (`iter_errors`);
- pydantic v2 models written to the same fields and ranges (strict, extra="forbid"), `model_validate`;
- with `--model`, `requests.validate` in full: schema check, chat template, tokenization, context checks.
The best of 7 rounds (the machine may be shared: the minimum is the least disturbed); a table and one JSON
line. Timings are per call on one thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Literal, Optional, Union

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

import llama32
from llama32.schemas import check_input

WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
REQUESTS = {
    "prompt+sampling": {"prompt": "Tell me a joke", "max_tokens": 64, "temperature": 0.8, "top_p": 0.9,
                        "top_k": 40, "seed": 42, "repetition_penalty": 1.1},
    "chat+tool": {"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
                  "max_tokens": 128, "stream": True},
    "20-turn chat": {"messages": [{"role": ("user", "assistant")[i % 2], "content": "Some words " * 20}
                                  for i in range(20)], "temperature": 0.2, "stop": ["\n\n"], "logprobs": True},
}


# The same fields as pydantic models (the alternative measured, not used by the package).
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Common(_Strict):
    stream: bool = False
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.6, ge=0, le=5, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=1, le=50)
    seed: Optional[int] = Field(None, ge=1, le=9999999999)
    repetition_penalty: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False)
    presence_penalty: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False)
    lora: Optional[str] = None
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    stop: Union[str, list[str], None] = None
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[dict] = None
    tools: Optional[list[dict]] = None
    functions: Optional[list[dict]] = None


class _Message(_Strict):
    role: Literal["system", "user", "assistant", "tool", "ipython"]
    content: Union[str, dict, list, None] = Field(None, max_length=131072)
    tool_calls: Optional[list[dict]] = None


class _PromptForm(_Common):
    prompt: str = Field(min_length=1, max_length=131072)
    raw: bool = False


class _MessagesForm(_Common):
    messages: list[_Message] = Field(min_length=1)


def _pydantic(r: dict):
    return (_PromptForm if "prompt" in r else _MessagesForm).model_validate(r)


def per_call_us(fn, request: dict, repeat: int) -> float:
    fn(request)  # compile / warm up
    rounds = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(repeat):
            fn(request)
        rounds.append((time.perf_counter() - t) / repeat * 1e6)
    return min(rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a checkpoint with a tokenizer, to time requests.validate in full")
    ap.add_argument("--repeat", type=int, default=20000)
    args = ap.parse_args()

    t = time.perf_counter()
    check_input({"prompt": "x"})
    check_input({"messages": [{"role": "user", "content": "x"}]})
    compile_ms = (time.perf_counter() - t) * 1e3
    published = jsonschema.Draft202012Validator(llama32.schema()["input"])
    ways = {"check_input (fastjsonschema)": check_input,
            "jsonschema Draft202012": lambda r: list(published.iter_errors(r)),
            "pydantic v2 models": _pydantic}
    if args.model:
        from llama32.requests import validate
        llm = llama32.load(args.model, dtype="float32")
        ways["requests.validate (full)"] = lambda r: validate(llm, r)
    rows = {}
    for name, fn in ways.items():
        rows[name] = {shape: round(per_call_us(fn, r, max(args.repeat // (50 if "jsonschema" in name or
                                                                          "full" in name else 1), 200)), 2)
                      for shape, r in REQUESTS.items()}
    print(f"compiling both forms on first use: {compile_ms:.1f} ms")
    print(f"{'validator':32s}" + "".join(f"{s:>18s}" for s in REQUESTS))
    for name, row in rows.items():
        print(f"{name:32s}" + "".join(f"{v:>15.2f} us" for v in row.values()))
    print(json.dumps({"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                      "compile_ms": round(compile_ms, 1), "us_per_call": rows}))


if __name__ == "__main__":
    main()
