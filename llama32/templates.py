"""Chat templates of checkpoints other than Llama 3: the checkpoint's own Jinja template, rendered as transformers'
`apply_chat_template(..., add_generation_prompt=True)` renders it.

A Llama 3 tokenizer (one that has the header and end-of-turn tokens) keeps `chat.render_chat`, the official
template in plain Python. Any other checkpoint (a community Llama such as SmolLM2) brings its template in
`tokenizer_config.json` (`chat_template`: a string, or a list of named templates whose "default" is used) or in
`chat_template.jinja`. Templates are code from the hub, so they run in jinja2's immutable sandbox, set up as
transformers sets it up: `trim_blocks` and `lstrip_blocks`, the loop-controls extension, a `tojson` that keeps
non-ASCII and key order (`json.dumps`), and the globals `raise_exception` and `strftime_now`. The template
sees `messages`, `tools` (None when none were offered), `add_generation_prompt=True` and the tokenizer's special
tokens by name (`bos_token`, `eos_token`, `unk_token`, `pad_token`).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from .errors import InvalidRequest

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def template_source(tokenizer_config: dict, jinja_file_text: str | None) -> str | None:
    """The checkpoint's chat template: `chat_template.jinja` if present, else tokenizer_config's, else None."""
    if jinja_file_text is not None:
        return jinja_file_text
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    return source if isinstance(source, str) else None


@lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise InvalidRequest(f"messages: this checkpoint's chat template does not parse ({e}); use raw=true with "
                             "a prompt written in its format") from None


def render_template(source: str, special_tokens: dict[str, str], messages: list[dict],
                    tools: list[dict] | None = None) -> str:
    """The prompt text `source` renders for `messages` (and `tools`), with the generation prompt added."""
    import jinja2

    template = _compile(source)
    try:
        return template.render(messages=_plain(messages), tools=_plain(tools), add_generation_prompt=True,
                               **special_tokens)
    except jinja2.exceptions.TemplateError as e:  # raise_exception in the template, or a sandbox refusal
        raise InvalidRequest(f"messages: this checkpoint's chat template refused the conversation: {e}") from None


def _plain(value: Any) -> Any:
    """A copy built from plain JSON types only: the template never sees the caller's objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
