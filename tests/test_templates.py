"""Each checkpoint's own chat template (templates.py), against transformers' apply_chat_template."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import llama32
from llama32 import InvalidRequest

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about café owners 😀"}],
]


@pytest.fixture(scope="module")
def hf_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_rendering_equals_transformers(smol, hf_tok, messages):
    from llama32.requests import render_prompt

    assert not smol.tokenizer.is_llama3 and smol.tokenizer.chat_template
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_prompt(smol.tokenizer, messages, None, "messages") == want
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    out = llama32.generate(smol, messages=messages, temperature=0, max_tokens=1)
    assert out["usage"]["prompt_tokens"] == len(ids)


def test_smollm2_chat_equals_transformers_greedy(smol, smol_hf, hf_tok):
    question = "What is the capital of France?"
    got = llama32.generate(smol, prompt=question, temperature=0, max_tokens=32)
    ids = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = smol_hf.generate(ids, do_sample=False, max_new_tokens=32, temperature=None, top_p=None, top_k=None)
    new = out[0, ids.shape[1]:].tolist()
    if new and new[-1] in smol.stop_ids:
        new = new[:-1]
    assert got["response"] == smol.tokenizer.decode(new)
    assert "Paris" in got["response"]  # the model understood its own format


def _copy_with(smollm2_dir, tmp_path, edit):
    dst = tmp_path / "ckpt"
    shutil.copytree(smollm2_dir, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    edit(dst, cfg)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return llama32.load(dst, dtype="float32", device="cpu")


def test_no_template_suggests_raw(smollm2_dir, tmp_path):
    def edit(dst, cfg):
        cfg.pop("chat_template", None)
        (dst / "chat_template.jinja").unlink(missing_ok=True)

    llm = _copy_with(smollm2_dir, tmp_path, edit)
    with pytest.raises(InvalidRequest, match="prompt: .*no chat template.*raw=true"):
        llama32.generate(llm, prompt="Hi")
    with pytest.raises(InvalidRequest, match="messages: .*no chat template"):
        llama32.generate(llm, messages=[{"role": "user", "content": "Hi"}])
    assert llama32.generate(llm, prompt="Hi", raw=True, temperature=0, max_tokens=2)["usage"]["completion_tokens"]


def test_template_file_named_list_and_errors(smollm2_dir, tmp_path):
    def edit(dst, cfg):
        (dst / "chat_template.jinja").unlink(missing_ok=True)
        cfg["chat_template"] = [{"name": "default", "template": "{{ bos_token }}[{{ messages[0]['content'] }}]"},
                                {"name": "tool_use", "template": "unused"}]

    llm = _copy_with(smollm2_dir, tmp_path, edit)
    from llama32.requests import render_prompt
    assert render_prompt(llm.tokenizer, [{"role": "user", "content": "Hi"}], None, "prompt") == "<|im_start|>[Hi]"
    (tmp_path / "ckpt" / "chat_template.jinja").write_text(
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{% for m in messages %}<{{ m['content'] | tojson }}>{% endfor %}")
    llm = llama32.load(tmp_path / "ckpt", dtype="float32", device="cpu")  # the .jinja file wins
    assert render_prompt(llm.tokenizer, [{"role": "user", "content": "é"}], None, "prompt") == '<"é">'
    with pytest.raises(InvalidRequest, match="refused the conversation: one message only"):
        llama32.generate(llm, messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    (tmp_path / "ckpt" / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")
    llm = llama32.load(tmp_path / "ckpt", dtype="float32", device="cpu")
    with pytest.raises(InvalidRequest, match="refused"):  # the sandbox stops attribute games
        llama32.generate(llm, prompt="Hi")


def test_llama3_tokenizer_keeps_render_chat(make_checkpoint, llama3_tokenizer_dir):
    llm = llama32.load(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), dtype="float32")
    assert llm.tokenizer.is_llama3
    from llama32.requests import render_prompt
    messages = [{"role": "user", "content": "Hi"}]
    assert render_prompt(llm.tokenizer, messages, None, "prompt") == llama32.render_chat(messages)


@pytest.mark.parametrize("offered", [{"tools": [{"name": "get_weather", "description": "Weather in a city"}]},
                                     {"functions": [{"name": "hello", "code": "def hello(): pass"}]}])
def test_tools_the_template_cannot_render_are_refused(smol, offered):
    # SmolLM2's template has no tools section: they would be dropped silently, so the request is refused
    for form in ({"prompt": "Weather in Paris?"}, {"messages": [{"role": "user", "content": "Weather in Paris?"}]}):
        with pytest.raises(llama32.InvalidRequest, match="tools/functions: this checkpoint's chat template does not"):
            llama32.generate(smol, max_tokens=1, **form, **offered)
