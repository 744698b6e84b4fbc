"""Request validation: every field of the request (docs/API.md, "Generating") checked before any compute.

The fields' types, ranges and defaults are the input JSON Schema of `schemas.py` (the one `llama32.schema()`
returns and the server publishes): `schema.check_input` validates a request against it and fills the defaults.
What a schema cannot know stays here, as code after it: the fields that depend on each other, and the
checks that need the model (tokenizer present, chat template renders, prompt tokens within the vocabulary,
prompt + max_tokens within the context, the LoRA adapter). Each mistake raises `InvalidRequest` naming the
field and what is allowed. Validation reads the model handle but never changes it, so a rejected request
leaves it as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import constrain
from . import lora as lora_mod
from .chat import functions_to_tools, render_chat, tool_names
from .errors import CheckpointError, InvalidRequest
from .sampling import SamplingParams
from .schemas import MAX_CHARS, MAX_STOPS, ROLES, check_input  # noqa: F401  (re-exported names)
from .templates import render_template

@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    seed: int | None
    stream: bool
    tool_names: frozenset[str]  # names offered through tools/functions; empty: no tool-call parsing
    adapter: Any  # the resolved LoRA adapter for this request, or None for the handle's own
    logprobs: bool = False  # report each generated token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives per token
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one that appears
    grammar: Any = None  # response_format's compiled grammar (constrain.Grammar), or None: free text


def render_prompt(tok: Any, messages: list[dict], tools: list | None, field: str) -> str:
    """The prompt text for a conversation: Llama 3's own format, or the checkpoint's chat template."""
    if tok.is_llama3:
        return render_chat(messages, tools)
    if tok.chat_template is None:
        raise InvalidRequest(f"{field}: this checkpoint has no chat template (no chat_template in "
                             "tokenizer_config.json, no chat_template.jinja); send a prompt in the model's own "
                             "format with raw=true")
    text = render_template(tok.chat_template, tok.special_tokens, messages, tools)
    if tools and text == render_template(tok.chat_template, tok.special_tokens, messages, None):
        # the template ignores them: the model would never see the tools, and the caller must know
        raise InvalidRequest("tools/functions: this checkpoint's chat template does not render tools, so the "
                             "model would never see them; describe them in a system message instead, or use a "
                             "checkpoint whose template renders tools (Llama 3.2 does)")
    return text


def require_tokenizer(llm: Any):
    """The handle's tokenizer; a model-only checkpoint has none, and text in or out needs one."""
    if llm.tokenizer is None:
        raise CheckpointError(f"{llm.path}: this checkpoint has no tokenizer.json, so it cannot take or give "
                              "text (llm.model(ids) works); copy the tokenizer files of its base model beside it")
    return llm.tokenizer


def _logit_bias(request: dict, r: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    """The schema-checked `logit_bias` as sorted (token id, bias) pairs, each id below the model's vocabulary
    and given once (an int key and its decimal string are the same id)."""
    biases = r.get("logit_bias")
    if not biases:
        return ()
    if len(biases) < len(request["logit_bias"]):
        raise InvalidRequest("logit_bias: a token id is given twice (as an integer and as its decimal string)")
    pairs = sorted((int(k), float(v)) for k, v in biases.items())
    if pairs[-1][0] >= vocab:
        raise InvalidRequest(f"logit_bias: token id {pairs[-1][0]} is outside the model's vocabulary of {vocab} ids")
    return tuple(pairs)


def _tools(r: dict) -> tuple[list | None, list[str]]:
    """The tools a schema-checked request offers (`functions` as tools after its `tools`), and their names."""
    tools = r.get("tools")
    offered = tool_names(tools) if tools is not None else []
    functions = r.get("functions")
    if functions is not None:
        tools = list(tools or []) + functions_to_tools(functions)
        offered += [f["name"] for f in functions]
    return tools, offered


def prompt(tok: Any, r: dict) -> tuple[str, list[int]]:
    """The prompt of schema-checked request `r` as the model reads it: its text (the chat template applied,
    tools and roles included, unless `raw`) and its token ids. The text is what a prefix router keys on
    (server/ray.py), so requests that share a text prefix share the prefix index's blocks."""
    tools, _ = _tools(r)
    if "prompt" not in r:
        text = render_prompt(tok, r["messages"], tools, "messages")
        return text, tok.encode(text)
    if not r.get("raw", False):
        text = render_prompt(tok, [{"role": "user", "content": r["prompt"]}], tools, "prompt")
        return text, tok.encode(text)
    if tools is not None:
        raise InvalidRequest("tools/functions cannot be combined with raw: a raw prompt is used as written")
    ids = tok.encode(r["prompt"])
    if tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids
    return r["prompt"], ids


def validate(llm: Any, request: dict, *, prompt_ids: list[int] | None = None, lora_name: str | None = None) -> Request:
    """Check `request` against the input schema, then against the loaded model; return what the loop needs.

    `prompt_ids`: the prompt's tokens as given (the server's /v1/completions takes token ids), checked as a
    rendered prompt's are (vocabulary, context, KV budget). `lora_name`: what error messages call the
    request's adapter (a server names its adapters, never the folders behind them)."""
    r = check_input(request)  # nulls dropped, the schema's defaults filled in
    has_prompt = "prompt" in r
    stream, max_tokens = r["stream"], r["max_tokens"]
    num = lambda k: float(r[k]) if k in r else None  # noqa: E731
    params = SamplingParams(temperature=float(r["temperature"]), top_p=num("top_p"), top_k=r.get("top_k"),
                            repetition_penalty=num("repetition_penalty"),
                            frequency_penalty=num("frequency_penalty"), presence_penalty=num("presence_penalty"),
                            logit_bias=_logit_bias(request, r, llm.config.vocab_size))
    seed, logprobs, top_logprobs = r.get("seed"), r["logprobs"], r["top_logprobs"]
    if top_logprobs and not logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true")
    stop = r.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)

    _, offered = _tools(r)
    lora = r.get("lora")
    tok = require_tokenizer(llm)
    ids = prompt(tok, r)[1] if prompt_ids is None else list(prompt_ids)

    vocab = llm.config.vocab_size
    outside = sorted({i for i in ids if i >= vocab})
    if outside:
        field = "prompt" if has_prompt else "messages"
        raise InvalidRequest(
            f"{field} contains token(s) {outside} ({tok.decode(outside[:1])!r}) outside the model's "
            f"vocabulary of {vocab} ids"
        )
    context = llm.context_length
    if len(ids) >= context:
        field = "prompt" if has_prompt else "messages"
        raise InvalidRequest(f"{field}: the prompt is {len(ids)} tokens, which leaves no room in the model's "
                             f"context of {context} tokens; shorten it")
    if len(ids) + max_tokens > context:
        raise InvalidRequest(
            f"max_tokens: the prompt is {len(ids)} tokens and max_tokens is {max_tokens}, together beyond the "
            f"model's context of {context} tokens; allowed max_tokens here: at most {max(context - len(ids), 0)}"
        )
    room = llm.loop.max_positions  # what one request may hold of the KV budget, alone
    if len(ids) + max_tokens > room:
        raise InvalidRequest(
            f"max_tokens: the prompt is {len(ids)} tokens and max_tokens is {max_tokens}, together more than the "
            f"{room} positions this handle's kv_cache_bytes ({llm.loop.kv_cache_bytes}) can hold for one request; "
            f"allowed max_tokens here: at most {max(room - len(ids), 0)}"
        )
    grammar = None
    if "response_format" in r:  # compiled (or found in the handle's cache) here: an unenforceable schema
        grammar = constrain.grammars(llm).compile(constrain.schema_of(r["response_format"]))  # fails now
    # Last, so a request rejected for anything else loads (and caches) no adapter.
    adapter = lora_mod.resolve(llm, lora, name=lora_name) if lora is not None else None
    return Request(ids, params, max_tokens, seed, stream, frozenset(offered), adapter, logprobs=logprobs,
                   top_logprobs=top_logprobs, stop=stop, grammar=grammar)
