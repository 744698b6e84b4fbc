"""Meta's `tokenizer.model`: tiktoken's ranks file (one `<base64 token bytes> <rank>` a line) as a `tokenizers`
byte-level BPE that gives tiktoken's ids.

The merges are recovered from the ranks (`tokenizer_from_ranks`); Meta's pre-tokenizer pattern and Meta's 256
special tokens from id 128000 (llama-models' llama3 Tokenizer) are added. meta.py reads the rest of Meta's
layout; tokenizer.py builds its `Tokenizer` from what `meta_tokenizer` returns.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# Meta's tokenizer (llama-models' llama3 Tokenizer): pre-tokenizer pattern and special tokens.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL = 256
_NAMED_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
SPECIAL_TOKENS = _NAMED_SPECIAL + [f"<|reserved_special_token_{2 + i}|>"
                                   for i in range(NUM_SPECIAL - len(_NAMED_SPECIAL))]
# Meta's generation stops at any of these (Tokenizer.stop_tokens).
STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")




def _byte_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte, as the `tokenizers` ByteLevel pre-tokenizer writes them."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def read_ranks(file: Path) -> dict[bytes, int]:
    """tiktoken's ranks file: `<base64 token bytes> <rank>` a line; ranks 0..N-1, every byte among them."""
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    not_ranks = (f"{file}: not a tiktoken ranks file (Llama 3's tokenizer.model has one '<base64 token> <rank>' "
                 "per line")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CheckpointError(not_ranks + "; this looks binary, e.g. a SentencePiece model like Llama 2's, "
                              "which does not load)") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        fields = line.split(" ")
        try:
            if len(fields) != 2:
                raise ValueError
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error):
            raise CheckpointError(f"{not_ranks}; line {number} is {line[:60]!r})") from None
        if not token or token in ranks:
            raise CheckpointError(f"{file}: line {number}: token {fields[0]!r} is empty or listed twice")
        ranks[token] = rank
    if not ranks:
        raise CheckpointError(not_ranks + "; it is empty)")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{file}: the ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(f"{file}: {len(missing)} single bytes (e.g. {bytes([missing[0]])!r}) have no rank; "
                              "a byte-level BPE needs all 256")
    return ranks


def tokenizer_from_ranks(ranks: dict[bytes, int]):
    """A `tokenizers.Tokenizer` that gives tiktoken's ids for Meta's tokenizer: byte-level BPE over the ranks.

    tiktoken merges, at each step, the adjacent pair whose joined bytes have the lowest rank. A BPE merge
    list gives the same result when the merge making token t comes at t's rank, for every way of splitting t
    into two tokens (which split BPE meets depends on the text); so that is the list: every such split,
    ordered by the rank of the result, then of the two halves. A piece that is itself a token is taken
    whole (`ignore_merges`), as tiktoken does before merging.
    """
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

    to_text = _byte_to_unicode()
    text = [""] * len(ranks)  # by rank (read_ranks checked they are 0..N-1)
    for token, rank in ranks.items():
        text[rank] = "".join([to_text[b] for b in token])
    vocab = {t: rank for rank, t in enumerate(text)}
    get = ranks.get
    merges = [(rank, left, right) for token, rank in ranks.items() if len(token) > 1 for i in range(1, len(token))
              if (left := get(token[:i])) is not None and (right := get(token[i:])) is not None]
    merges.sort()  # by the result's rank, then the halves'; 280,147 of them for Llama 3's 128,000 ranks
    merge_pairs = [(text[left], text[right]) for _, left, right in merges]

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    n = len(ranks)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != n + i:
            raise CheckpointError(f"tokenizer.model: special token {t} did not get id {n + i}")
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, n)]),
    ])
    return tok


def meta_tokenizer(file: Path) -> tuple[Any, dict, dict]:
    """What tokenizer.py's `Tokenizer` is made of for Meta's `tokenizer.model` at `file`: the converted
    backend, a tokenizer_config (BOS added, `<|eot_id|>` the end of turn) and a config naming Meta's stop ids."""
    backend = tokenizer_from_ranks(read_ranks(file))
    stops = [backend.token_to_id(t) for t in STOP_TOKENS]
    return (backend, {"bos_token": SPECIAL_TOKENS[0], "add_bos_token": True, "eos_token": "<|eot_id|>"},
            {"eos_token_id": stops})
