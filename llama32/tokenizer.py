"""The checkpoint's tokenizer: a thin wrapper over the `tokenizers` library, plus streaming detokenization.

Follows what transformers' fast tokenizer does with a Hugging Face checkpoint directory (`tokenizer.json`,
optional `tokenizer_config.json`, `config.json`, `generation_config.json`), with two deliberate
differences that suit a generation loop:
- `encode` never adds anything: no BOS, no post-processor. Special tokens written in the text
  (`<|eot_id|>`) are still honoured, so a rendered chat prompt, which already starts with
  `<|begin_of_text|>`, encodes without a second one. `bos_id` says what the checkpoint would prepend.
- `decode` keeps special tokens (the loop needs to see `<|python_tag|>`) and does no
  "clean up tokenization spaces", which is lossy for byte-level BPE (transformers 5 skips it too).

`StreamDecoder` is the prefix-offset / read-offset scheme used by text-generation servers: each step
decodes only a short window starting one emission back, so its cost does not grow with the output,
and the window's first token has the same left context in both decodes, which cancels decoders that
treat the first token specially (SentencePiece's leading space).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import tokenizers

from llama32.errors import CheckpointError
from llama32.templates import SPECIAL_TOKENS, template_source

REPLACEMENT_CHAR = "\ufffd"  # what a lossy UTF-8 decode shows for an incomplete multi-byte character


def _read_json(path: Path, *, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: not found; a checkpoint directory needs its {path.name}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as "..." or as an AddedToken {"content": "..."}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _int_ids(value: Any) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


class Tokenizer:
    """`encode`/`decode` plus the ids the chat format and the generation loop need."""

    def __init__(self, backend: tokenizers.Tokenizer, *, tokenizer_config: dict | None = None,
                 config: dict | None = None, generation_config: dict | None = None,
                 chat_template: str | None = None):
        self.backend = backend
        tokenizer_config = tokenizer_config or {}
        # The checkpoint's own chat template (templates.py), used unless this is a Llama 3 tokenizer.
        self.chat_template = template_source(tokenizer_config, chat_template)
        self.special_tokens = {name: text for name in SPECIAL_TOKENS
                               if (text := _token_content(tokenizer_config.get(name))) is not None}
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

        self.begin_of_text_id = self.token_id("<|begin_of_text|>")
        self.start_header_id = self.token_id("<|start_header_id|>")
        self.end_header_id = self.token_id("<|end_header_id|>")
        self.eot_id = self.token_id("<|eot_id|>")
        self.eom_id = self.token_id("<|eom_id|>")
        self.python_tag_id = self.token_id("<|python_tag|>")

        self.bos_id: int | None = self._find_bos(tokenizer_config)
        self.bos_token: str | None = None if self.bos_id is None else backend.id_to_token(self.bos_id)

        stop = _int_ids((config or {}).get("eos_token_id")) | _int_ids((generation_config or {}).get("eos_token_id"))
        if not stop:  # no model config says: fall back to the tokenizer's own eos token
            eos = self.token_id(_token_content(tokenizer_config.get("eos_token")) or "")
            stop = set() if eos is None else {eos}
        self.stop_ids: frozenset[int] = frozenset(stop)

    @property
    def is_llama3(self) -> bool:
        """Whether this is the Llama 3 tokenizer, whose chat format `chat.render_chat` writes."""
        return None not in (self.begin_of_text_id, self.start_header_id, self.end_header_id, self.eot_id)

    def _find_bos(self, tokenizer_config: dict) -> int | None:
        """The id the checkpoint's tokenizer prepends to a plain encode, or None."""
        add_bos = tokenizer_config.get("add_bos_token")
        if isinstance(add_bos, bool):
            # transformers rebuilds the post-processor from this flag (Llama/Gemma tokenizers), so it wins.
            return self.token_id(_token_content(tokenizer_config.get("bos_token")) or "") if add_bos else None
        # Otherwise ask the post-processor: whatever it puts before the plain ids is the BOS.
        plain = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a", add_special_tokens=True).ids
        if len(full) > len(plain) and full[1:1 + len(plain)] == plain:
            return full[0]
        return None

    @staticmethod
    def present(path: str | Path) -> bool:
        """Whether the checkpoint directory has a tokenizer: tokenizer.json, or in Meta's layout tokenizer.model
        (an HF-layout folder's tokenizer.model is SentencePiece's, which is not read)."""
        from llama32.meta import TOKENIZER_MODEL, is_meta_dir
        path = Path(path)
        return (path / "tokenizer.json").is_file() or (is_meta_dir(path) and (path / TOKENIZER_MODEL).is_file())

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` and the optional configs beside it; without tokenizer.json, Meta's
        `tokenizer.model` (tiktoken ranks, converted by ranks.py) with Meta's special tokens and stop ids."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            from llama32.meta import TOKENIZER_MODEL, is_meta_dir
            if is_meta_dir(path) and (path / TOKENIZER_MODEL).is_file():
                from llama32.ranks import meta_tokenizer

                backend, tokenizer_config, config = meta_tokenizer(path / TOKENIZER_MODEL)
                return cls(backend, tokenizer_config=tokenizer_config, config=config)
        if not file.is_file():
            raise CheckpointError(f"{file}: not found; a checkpoint directory needs its tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise CheckpointError(f"{file}: not a valid tokenizers file ({e})") from None
        jinja = path / "chat_template.jinja"
        return cls(backend,
                   tokenizer_config=_read_json(path / "tokenizer_config.json", required=False),
                   config=_read_json(path / "config.json", required=False),
                   generation_config=_read_json(path / "generation_config.json", required=False),
                   chat_template=jinja.read_text(encoding="utf-8") if jinja.is_file() else None)

    def token_id(self, name: str) -> int | None:
        """The id of a token spelled exactly `name` (e.g. "<|eot_id|>"), or None."""
        return self.backend.token_to_id(name) if name else None

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as written: special tokens honoured, nothing added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included."""
        return self.backend.decode(list(ids), skip_special_tokens=False)


class StreamDecoder:
    """Turns ids, one at a time, into text pieces that concatenate to `tokenizer.decode(all ids)`.

    A piece never ends inside a multi-byte character: while the decoded tail is U+FFFD the text is
    held back (a real U+FFFD at the very end waits one token, or until `flush`).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._decode = tokenizer.decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window: where the previous piece began
        self._read = 0    # ids before this are already emitted

    def _pending(self) -> str:
        window = self._ids[self._prefix:]
        done = self._decode(window[: self._read - self._prefix])
        full = self._decode(window)
        # Holds for byte-level BPE once the window starts on a character boundary, which _prefix always does.
        assert full.startswith(done), "decoder is not prefix-stable"
        return full[len(done):]

    def push(self, token_id: int) -> str:
        """The text completed by `token_id` ("" while a character is still incomplete)."""
        self._ids.append(token_id)
        new = self._pending()
        if not new or new.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new

    def flush(self) -> str:
        """Whatever is still held back, incomplete characters included (as U+FFFD)."""
        new = self._pending() if self._read < len(self._ids) else ""
        self._prefix = self._read = len(self._ids)
        return new
