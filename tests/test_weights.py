"""Loading: config parsing, strict tensor checks, dtype casting, and every loading error by its message."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama32
from llama32.config import LlamaConfig
from llama32.errors import CheckpointError
from llama32.model import can_pack_for_cpu
from llama32.weights import load_model


@pytest.fixture
def ckpt(make_checkpoint, tmp_path):
    """A private, writable copy of the tiny Llama-3.2-like checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint(kind="llama32"), dst)
    return dst


def load(path, dtype=torch.float32, pack=True):
    return load_model(path, LlamaConfig.from_file(path / "config.json"), device="cpu", dtype=dtype, pack=pack)


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_config_fields_read_from_file(make_checkpoint):
    c = LlamaConfig.from_file(make_checkpoint(kind="llama32") / "config.json")
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 4, 2, 16)
    assert c.tie_word_embeddings and c.rope_theta == 500000.0
    assert c.rope_scaling.factor == 32.0 and c.rope_scaling.original_max_position_embeddings == 64
    assert c.eos_token_id == (2, 3, 4) and c.bos_token_id == 1 and c.torch_dtype == torch.float32
    legacy = LlamaConfig.from_file(make_checkpoint(kind="mha", legacy_config=True) / "config.json")
    assert legacy.rope_scaling is None and legacy.head_dim == 16 and legacy.rms_norm_eps == 1e-6


def test_llama_3_2_1b_config():
    """The published Llama 3.2 1B config (transformers 4.x spelling) parses to the right shapes."""
    c = LlamaConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256})
    assert c.rope_scaling.factor == 32.0 and c.num_key_value_heads == 8 and c.torch_dtype == torch.bfloat16
    assert c.eos_token_id == (128001, 128008, 128009)


@pytest.mark.parametrize("changes, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope type 'yarn'"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"head_dim": None, "hidden_size": 66}, "not divisible by num_attention_heads"),
    ({"hidden_size": None}, "'hidden_size' is missing"),
    ({"vocab_size": -5}, "vocab_size must be a positive integer"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "missing 'low_freq_factor'"),
    ({"dtype": "int8"}, "dtype 'int8'"),
])
def test_bad_config_is_named(ckpt, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(CheckpointError, match=message):
        LlamaConfig.from_file(ckpt / "config.json")


def test_missing_and_corrupt_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        LlamaConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        LlamaConfig.from_file(tmp_path / "config.json")


def test_missing_tensor(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model.layers.1.mlp.up_proj.weight"):
        load(ckpt)


def test_unexpected_tensor(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    sd["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.9.mlp.up_proj.weight'"):
        load(ckpt)


def test_wrong_shape(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \[64, 64\], "
                                               r"the config needs \[32, 64\]"):
        load(ckpt)


def test_corrupt_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or unreadable"):
        load(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load(ckpt)


def test_no_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load(ckpt)


def test_missing_shard(make_checkpoint, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(make_checkpoint(kind="llama31", sharded=True), dst)
    victim = sorted(dst.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard file\\(s\\) missing: {victim.name}"):
        load(dst)


def test_untied_checkpoint_without_head(make_checkpoint, tmp_path):
    dst = tmp_path / "untied"
    shutil.copytree(make_checkpoint(kind="llama31"), dst)
    sd = load_file(dst / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load(dst)


def test_tied_checkpoint_carrying_a_head_is_fine(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    model = load(ckpt, pack=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_cast_to_requested_dtype(make_checkpoint):
    model = load(make_checkpoint(kind="llama31"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32  # RoPE stays in float32
    assert not any(p.is_meta for p in model.parameters()) and not model.inv_freq.is_meta


def test_load_defaults_to_checkpoint_dtype(make_checkpoint, llama3_tokenizer_dir):
    path = make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir, dtype="bfloat16")
    llm = llama32.load(path)
    assert llm.dtype == torch.bfloat16 and llm.device == torch.device("cpu")
    assert llama32.load(path, dtype="float32").model.lm_head.weight.dtype == torch.float32


def test_model_only_checkpoint(make_checkpoint):
    """A checkpoint straight from a model's save_pretrained (no tokenizer.json) loads: the model works, and
    anything that takes or gives text says the tokenizer is missing, before any compute."""
    llm = llama32.load(make_checkpoint(kind="mha"), dtype="float32")
    assert llm.tokenizer is None
    assert llm.model(torch.tensor([[1, 2, 3]])).shape == (1, 3, llm.config.vocab_size)
    for call in (lambda: llama32.generate(llm, prompt="Hi"), lambda: llama32.generate(llm, prompt="Hi", stream=True),
                 lambda: llama32.generate_batch(llm, [{"prompt": "Hi"}]), lambda: llama32.score(llm, "Hi"),
                 lambda: llama32.score_batch(llm, [{"text": "Hi"}])):
        with pytest.raises(CheckpointError, match="no tokenizer.json"):
            call()
    assert llm.loop.stats().items() >= {"running": 0, "waiting": 0}.items()


def test_plain_call_returns_logits(make_checkpoint, llama3_tokenizer_dir):
    llm = llama32.load(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), dtype="float32")
    ids = torch.tensor([llm.tokenizer.encode("Hello there")])
    logits = llm.model(ids)
    assert logits.shape == (1, ids.shape[1], 128256)


def test_integer_tensor_is_refused(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.safetensors: tensor 'model.norm.weight' has dtype I32"):
        load(ckpt)


def test_weights_do_not_keep_the_file_mapped(ckpt):
    """Loaded tensors own their memory: the checkpoint file can change underneath without changing them."""
    model = load(ckpt, pack=False)
    before = model.model.norm.weight.clone()
    (ckpt / "model.safetensors").write_bytes(b"\0" * (ckpt / "model.safetensors").stat().st_size)
    assert torch.equal(model.model.norm.weight, before)


@pytest.mark.skipif(not can_pack_for_cpu("cpu", torch.float32), reason="no oneDNN on this CPU build")
def test_packed_tied_model_maps_only_its_embedding(ckpt):
    """With a packed head, the tied embedding is the one tensor read from the file's pages (by design: it
    saves a second copy of the largest matrix); the head, packed at load, and the rest are the model's own."""
    model = load(ckpt)
    assert model.lm_head.weight.is_mkldnn and model.lm_head.weight is not model.model.embed_tokens.weight
    head, norm = model.lm_head.weight.to_dense(), model.model.norm.weight.clone()
    assert torch.equal(head, model.model.embed_tokens.weight)
    (ckpt / "model.safetensors").write_bytes(b"\0" * (ckpt / "model.safetensors").stat().st_size)
    assert torch.equal(model.lm_head.weight.to_dense(), head) and torch.equal(model.model.norm.weight, norm)
    assert not model.model.embed_tokens.weight.any()  # it follows the file


# Each case maps the embedding only where its run dtype is packed: skip exactly where that packing is absent
# (an AVX2-only CPU packs float32 but has no oneDNN bfloat16).
@pytest.mark.parametrize("stored, run", [
    pytest.param(stored, run, marks=pytest.mark.skipif(not can_pack_for_cpu("cpu", run),
                                                       reason=f"this CPU has no oneDNN {run} packing"))
    for stored, run in (("bfloat16", torch.float32), ("float32", torch.bfloat16))])
def test_mapped_embedding_in_another_dtype(make_checkpoint, stored, run):
    """A mapped embedding keeps the file's dtype; its rows are cast on lookup, exactly as a cast table."""
    path = make_checkpoint(kind="llama32", dtype=stored)
    packed, plain = load(path, dtype=run), load(path, dtype=run, pack=False)
    assert packed.model.embed_tokens.weight.dtype == getattr(torch, stored)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(packed.model.embed_tokens(ids).to(run), plain.model.embed_tokens(ids))
    a, b = packed(ids).float(), plain(ids).float()
    assert (a - b).abs().max() <= (1e-4 if run == torch.float32 else 5e-2) * b.abs().max()


_ANON_AFTER_LOAD = """
import re, sys, pathlib, torch
from llama32.config import LlamaConfig
from llama32.model import can_pack_for_cpu
from llama32.weights import load_model
anon = lambda: int(re.search(r"RssAnon:\\s+(\\d+)", pathlib.Path("/proc/self/status").read_text()).group(1)) * 1024
path = pathlib.Path(sys.argv[1])
before = anon()
model = load_model(path, LlamaConfig.from_file(path / "config.json"), device="cpu", dtype=torch.float32,
                   pack=sys.argv[2] == "1")
model(torch.tensor([[1, 2, 3]]))
print(anon() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or not can_pack_for_cpu("cpu", torch.float32),
                    reason="needs Linux /proc and oneDNN")
def test_packed_tied_model_holds_one_copy_of_the_embedding(make_checkpoint):
    """A big vocabulary makes the embedding nearly all of the weights (64 MiB of 65): a packed head next to a
    second, dense embedding would double the memory the loaded model holds."""
    path = make_checkpoint(kind="llama32", vocab_size=262144)
    weight_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    grown = {pack: int(subprocess.run([sys.executable, "-c", _ANON_AFTER_LOAD, str(path), pack], check=True,
                                      capture_output=True, text=True).stdout) for pack in ("0", "1")}
    assert grown["0"] < 1.2 * weight_bytes, grown
    assert grown["1"] < 1.2 * weight_bytes, grown
