"""Meta's original layout (params.json + consolidated.NN.pth + tokenizer.model) loads to the same model, logits and
token ids as the Hugging Face layout of the same weights.

The Meta folders are written from tiny random HF checkpoints by tests/fixtures.py (`write_meta_checkpoint`, the
inverse of transformers' convert_llama_weights_to_hf.py). Two oracles keep that writer honest, independently of
llama32: the converter's own `permute` turns the written wq/wk back into the HF ones, and a forward pass written
the way Meta's reference model.py computes (complex rotary on interleaved pairs, Meta's apply_scaling) on the
written tensors gives transformers' logits. The HF "twin" of a Meta folder is the tiny checkpoint with the RoPE
settings the converter writes for Meta's files (llama3 scaling from an 8192-token context).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import fixtures
import llama32
from llama32.errors import CheckpointError

ORIGINAL_CONTEXT = 8192  # Meta's apply_scaling: old_context_len


def converter_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.py `permute` (Meta's wq/wk -> HF's q_proj/k_proj)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def twin_of(hf_dir: Path, out: Path, factor: float | None) -> Path:
    """The HF layout the converter makes of a Meta folder written from `hf_dir`: same tensors, Meta's RoPE numbers."""
    shutil.copytree(hf_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    rope = cfg["rope_parameters"]
    if factor is not None:
        cfg["rope_parameters"] = dict(rope_type="llama3", rope_theta=rope["rope_theta"], factor=factor,
                                      low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=ORIGINAL_CONTEXT)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


FACTORS = {"llama32": 32.0, "llama31": 8.0, "mha": None}  # tied -> Llama 3.2, untied with scaled rope -> 3.1


@pytest.fixture(scope="module")
def layouts(make_checkpoint, tmp_path_factory):
    """(kind, shards) -> (meta folder, HF twin folder), written once per module."""
    base = tmp_path_factory.mktemp("meta-layouts")
    made = {}

    def get(kind: str, shards: int = 1, tokenizer_dir=None):
        key = (kind, shards, tokenizer_dir)
        if key not in made:
            hf = make_checkpoint(kind=kind, tokenizer_dir=tokenizer_dir)
            name = f"{kind}-{shards}-{'tok' if tokenizer_dir else 'notok'}"
            meta = fixtures.write_meta_checkpoint(hf, base / f"meta-{name}", shards=shards)
            made[key] = meta, twin_of(hf, base / f"hf-{name}", FACTORS[kind])
        return made[key]

    return get


# --- the writer is Meta's layout (oracles independent of llama32) -----------------------------------------------------

def meta_reference_logits(state: dict, params: dict, ids: torch.Tensor, factor: float | None) -> torch.Tensor:
    """Logits of Meta's reference model.py (one pass, no cache) on a Meta state dict, in float32."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads", n_heads)
    hd = dim // n_heads
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if params.get("use_scaled_rope"):  # Meta's apply_scaling
        low_wavelen, high_wavelen = ORIGINAL_CONTEXT / 1.0, ORIGINAL_CONTEXT / 4.0
        wavelen = 2 * torch.pi / freqs
        new = torch.where(wavelen > low_wavelen, freqs / factor, freqs)
        smooth = (ORIGINAL_CONTEXT / wavelen - 1.0) / (4.0 - 1.0)
        freqs = torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen),
                            (1 - smooth) * new / factor + smooth * new, new)
    T = ids.shape[1]
    cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + params["norm_eps"]) * w

    def rotary(x):  # x (B, T, H, hd): pairs (0,1), (2,3)... as complex numbers
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)

    h = state["tok_embeddings.weight"][ids].float()
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = lambda name: state[f"layers.{i}.{name}"].float()  # noqa: E731
        x = norm(h, p("attention_norm.weight"))
        B = x.shape[0]
        q = rotary((x @ p("attention.wq.weight").T).view(B, T, n_heads, hd))
        k = rotary((x @ p("attention.wk.weight").T).view(B, T, n_kv, hd))
        v = (x @ p("attention.wv.weight").T).view(B, T, n_kv, hd)
        k, v = (t.repeat_interleave(n_heads // n_kv, dim=2) for t in (k, v))
        scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3) / hd ** 0.5 + mask
        out = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, -1)
        h = h + out @ p("attention.wo.weight").T
        x = norm(h, p("ffn_norm.weight"))
        h = h + (torch.nn.functional.silu(x @ p("feed_forward.w1.weight").T) * (x @ p("feed_forward.w3.weight").T)) \
            @ p("feed_forward.w2.weight").T
    head = state.get("output.weight", state["tok_embeddings.weight"]).float()
    return norm(h, state["norm.weight"].float()) @ head.T


def load_meta_state(folder: Path) -> dict:
    """A one-shard Meta folder's tensors, as Meta's code reads them."""
    return torch.load(folder / "consolidated.00.pth", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("kind", ["llama32", "llama31", "mha"])
def test_written_folder_is_metas_layout(layouts, make_checkpoint, kind):
    meta, twin = layouts(kind)
    state = load_meta_state(meta)
    params = json.loads((meta / "params.json").read_text())
    hf_state = {}
    from safetensors.torch import load_file
    hf_state.update(load_file(make_checkpoint(kind=kind) / "model.safetensors"))
    for i in range(params["n_layers"]):  # the converter's permute gives back the HF tensors exactly
        assert torch.equal(converter_permute(state[f"layers.{i}.attention.wq.weight"], params["n_heads"]),
                           hf_state[f"model.layers.{i}.self_attn.q_proj.weight"])
        assert torch.equal(converter_permute(state[f"layers.{i}.attention.wk.weight"], params["n_kv_heads"]),
                           hf_state[f"model.layers.{i}.self_attn.k_proj.weight"])
    assert ("output.weight" in state) == (kind != "llama32")  # Meta's 3.2 files carry no separate head
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 256, 3, 11, 64]])
    oracle = fixtures.hf_model(twin)(ids).logits
    assert torch.allclose(meta_reference_logits(state, params, ids, FACTORS[kind]), oracle, atol=1e-4, rtol=0)


# --- params.json -> LlamaConfig --------------------------------------------------------------------------------------

# Meta's published params.json files (the text models), and what the HF configs of the same releases say.
META_PARAMS = {
    "Llama-3.2-1B": ({"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                      "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                      "use_scaled_rope": True}, True, 8192, 32.0),
    "Llama-3.2-3B": ({"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "vocab_size": 128256,
                      "ffn_dim_multiplier": 1.0, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                      "use_scaled_rope": True}, True, 8192, 32.0),
    "Llama-3.1-8B": ({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                      "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
                      "use_scaled_rope": True}, False, 14336, 8.0),
    "Llama-3.1-70B": ({"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256,
                       "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "norm_eps": 1e-05, "rope_theta": 500000.0,
                       "use_scaled_rope": True}, False, 28672, 8.0),
}


@pytest.mark.parametrize("name", sorted(META_PARAMS))
def test_released_params_give_the_hf_configs_numbers(name):
    from llama32.meta import config_from_params
    params, tied, intermediate, factor = META_PARAMS[name]
    cfg = config_from_params(params, vocab_size=128256, tied=tied)
    assert cfg.intermediate_size == intermediate
    assert cfg.head_dim == params["dim"] // params["n_heads"] and cfg.num_key_value_heads == 8
    assert cfg.rope_scaling.factor == factor and cfg.rope_scaling.original_max_position_embeddings == 8192
    assert (cfg.rope_scaling.low_freq_factor, cfg.rope_scaling.high_freq_factor) == (1.0, 4.0)
    assert cfg.tie_word_embeddings is tied and cfg.max_position_embeddings == 131072
    assert cfg.eos_token_id == (128001, 128008, 128009) and cfg.bos_token_id == 128000


def test_a_factor_named_in_params_wins_and_unscaled_rope_has_none():
    from llama32.meta import config_from_params
    params = dict(META_PARAMS["Llama-3.2-1B"][0], rope_scaling_factor=16.0)
    assert config_from_params(params, vocab_size=128256, tied=True).rope_scaling.factor == 16.0
    llama3 = dict(META_PARAMS["Llama-3.1-8B"][0], use_scaled_rope=False)  # Llama 3 8B's params.json
    cfg = config_from_params(llama3, vocab_size=128256, tied=False)
    assert cfg.rope_scaling is None and cfg.max_position_embeddings == 8192


# --- the model: same logits as the HF layout --------------------------------------------------------------------------

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 256, 3, 11, 64, 1, 2], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 510, 511]])


@pytest.mark.parametrize("kind,shards", [("llama32", 1), ("llama32", 2), ("llama31", 1), ("llama31", 2), ("mha", 2)])
def test_logits_equal_the_hf_layout(layouts, kind, shards):
    meta, twin = layouts(kind, shards)
    a = llama32.load(meta, dtype="float32", device="cpu")
    b = llama32.load(twin, dtype="float32", device="cpu")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
                  "tie_word_embeddings"):
        assert getattr(a.config, field) == getattr(b.config, field), field
    with torch.no_grad():
        la, lb = a.model(IDS), b.model(IDS)
    assert (la - lb).abs().max().item() <= 1e-4
    if shards == 1 and kind == "llama32":  # and transformers agrees
        assert torch.allclose(la, fixtures.hf_model(twin)(IDS).logits, atol=1e-4, rtol=0)


def test_embedding_split_along_its_width_llama2_style(layouts, tmp_path):
    """Llama 2's model-parallel embedding split its width (dim 1), Llama 3's its vocabulary (dim 0): the shapes say."""
    meta, twin = layouts("mha", 2)
    folder = Path(shutil.copytree(meta, tmp_path / "llama2-style"))
    shards = [torch.load(folder / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    whole = torch.cat([s["tok_embeddings.weight"] for s in shards], 0)
    for i, piece in enumerate(whole.chunk(2, dim=1)):
        shards[i]["tok_embeddings.weight"] = piece.clone()
        shards[i]["rope.freqs"] = torch.zeros(8)  # Llama 2's files carry their RoPE table; it is ignored
        torch.save(shards[i], folder / f"consolidated.0{i}.pth")
    a, b = llama32.load(folder, dtype="float32", device="cpu"), llama32.load(twin, dtype="float32", device="cpu")
    assert torch.equal(a.model.model.embed_tokens.weight, b.model.model.embed_tokens.weight)
    assert (a.model(IDS) - b.model(IDS)).abs().max().item() <= 1e-4


def test_tied_head_written_as_a_copy_is_still_tied(make_checkpoint, tmp_path):
    meta = fixtures.write_meta_checkpoint(make_checkpoint(kind="llama32"), tmp_path / "m", output="copy")
    llm = llama32.load(meta, dtype="float32", device="cpu")
    assert llm.config.tie_word_embeddings and llm.config.rope_scaling.factor == 32.0
    twin = llama32.load(twin_of(make_checkpoint(kind="llama32"), tmp_path / "t", 32.0), dtype="float32", device="cpu")
    assert torch.allclose(llm.model(IDS), twin.model(IDS), atol=1e-4, rtol=0)


def test_bfloat16_checkpoint_packs_and_quantizes_like_the_hf_layout(make_checkpoint, tmp_path):
    """The dtype comes from the tensors; int8 and packing go through the same load path."""
    hf = make_checkpoint(kind="llama32", dtype="bfloat16")
    meta = fixtures.write_meta_checkpoint(hf, tmp_path / "m")
    twin = twin_of(hf, tmp_path / "t", 32.0)
    a, b = llama32.load(meta, device="cpu"), llama32.load(twin, device="cpu")
    assert a.dtype == b.dtype == torch.bfloat16 and a.model.cpu_path == b.model.cpu_path
    assert torch.equal(a.model(IDS), b.model(IDS))
    qa, qb = llama32.load(meta, device="cpu", quantize="int8"), llama32.load(twin, device="cpu", quantize="int8")
    assert torch.equal(qa.model(IDS), qb.model(IDS))


# --- the tokenizer ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def meta_tokenizer_dir(llama3_tokenizer_dir, tmp_path_factory):
    """A folder holding only Meta's tokenizer.model (ranks of the real Llama 3 tokenizer) and a params.json."""
    out = tmp_path_factory.mktemp("meta-tokenizer")
    fixtures.write_tokenizer_model(llama3_tokenizer_dir / "tokenizer.json", out / "tokenizer.model")
    (out / "params.json").write_text(json.dumps(META_PARAMS["Llama-3.2-1B"][0]))
    return out


@pytest.fixture(scope="session")
def tokenizers_pair(meta_tokenizer_dir, llama3_tokenizer_dir):
    """(Meta's tokenizer.model through llama32, the HF tokenizer.json through llama32): converted once a session."""
    from llama32.tokenizer import Tokenizer
    return Tokenizer.from_dir(meta_tokenizer_dir), Tokenizer.from_dir(llama3_tokenizer_dir)


CORPUS = [
    "Hello, world! How's it going? I'm fine; they'll see, we'd know.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n\n\nprint(fib(30))\n",
    "Emoji 🙂🎉👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, a lone surrogate-free zwj\u200d.",
    "日本語のテキストです。中文文本，한국어 텍스트. Ελληνικά και русский текст.",
    "Numbers: 1 12 123 1234 12345 3.14159 -0.5e-10 1,000,000 0xDEADBEEF 2024-11-25",
    "   leading spaces, trailing tabs\t\t\n\n\n    \n  mixed \r\n line endings \r and    runs       of    spaces   ",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\n<|python_tag|>{\"name\": \"f\"}<|eom_id|><|end_of_text|><|finetune_right_pad_id|>",
    "not special: <|eot_id| <|unknown_token|> <| begin_of_text |>",
    "{\"json\": [1, 2.5, null, true], \"nested\": {\"k\": \"v\\n\"}}   ",
    "Mixed CASE and 'S 'LL 'Re contractions, über naïve café — “quotes” … ",
    "a" * 300 + " " + "ab" * 200,
    "",
]


def test_merges_recovered_from_the_ranks_are_the_hf_files(meta_tokenizer_dir, llama3_tokenizer_dir, tokenizers_pair):
    meta, _ = tokenizers_pair
    ours = json.loads(meta.backend.to_str())["model"]["merges"]
    theirs = json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text())["model"]["merges"]
    ours = [" ".join(m) if isinstance(m, list) else m for m in ours]
    theirs = [" ".join(m) if isinstance(m, list) else m for m in theirs]
    assert len(ours) == len(theirs) and ours == theirs


@pytest.mark.parametrize("text", CORPUS)
def test_encode_decode_equal_the_hf_tokenizer(tokenizers_pair, text):
    meta, hf = tokenizers_pair
    ids = meta.encode(text)
    assert ids == hf.encode(text)
    assert meta.decode(ids) == hf.decode(ids) == text


def test_encode_equals_metas_tiktoken(meta_tokenizer_dir, tokenizers_pair):
    """tiktoken with Meta's pattern and ranks is Meta's own tokenizer (llama-models' Tokenizer)."""
    import tiktoken  # the test extra installs it (pyproject.toml)
    from llama32 import ranks as meta_module
    ranks = meta_module.read_ranks(meta_tokenizer_dir / "tokenizer.model")
    enc = tiktoken.Encoding("llama3", pat_str=meta_module.PATTERN, mergeable_ranks=ranks,
                            special_tokens={t: len(ranks) + i for i, t in enumerate(meta_module.SPECIAL_TOKENS)})
    ours, _ = tokenizers_pair
    text = "".join(CORPUS) + Path(llama32.__file__).read_text()
    assert ours.encode(text) == enc.encode(text, allowed_special="all")


def test_special_tokens_stop_ids_and_chat_format(tokenizers_pair):
    meta, hf = tokenizers_pair
    assert meta.vocab_size == 128256
    assert meta.is_llama3 and meta.bos_id == hf.bos_id == 128000
    for name in ("begin_of_text_id", "start_header_id", "end_header_id", "eot_id", "eom_id", "python_tag_id"):
        assert getattr(meta, name) == getattr(hf, name) is not None, name
    assert meta.stop_ids == {128001, 128008, 128009}
    # Meta's names (llama-models' Tokenizer) for the ids the HF file names otherwise
    assert [meta.token_id(t) for t in ("<|step_id|>", "<|image|>", "<|reserved_special_token_2|>",
                                       "<|reserved_special_token_245|>")] == [128005, 128011, 128012, 128255]
    assert meta.decode([128000, 128255]) == "<|begin_of_text|><|reserved_special_token_245|>"


def test_a_folder_without_tokenizer_model_loads_model_only(layouts):
    meta, _ = layouts("llama32")
    llm = llama32.load(meta, dtype="float32", device="cpu")
    assert llm.tokenizer is None and llm.model(IDS).shape == (2, 12, 512)


# --- generate, chat template, tool calls ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_pair(layouts, llama3_tokenizer_dir):
    meta, twin = layouts("llama32", 1, llama3_tokenizer_dir)
    return (llama32.load(meta, dtype="float32", device="cpu"), llama32.load(twin, dtype="float32", device="cpu"))


WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_generate_equals_the_hf_layout(chat_pair):
    meta, hf = chat_pair
    assert meta.stop_ids == hf.stop_ids
    for request in (dict(prompt="Tell me a story about 🦙 in 日本", max_tokens=12, temperature=0),
                    dict(messages=[{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "What is the weather in Paris?"}],
                         tools=[WEATHER], max_tokens=10, temperature=0),
                    dict(prompt="Once upon a time", max_tokens=10, seed=7, temperature=1.0)):
        a, b = meta.generate(**request), hf.generate(**request)
        assert a == b


def test_chat_template_and_tool_calls_are_unchanged(chat_pair):
    from llama32.generate import _collect  # noqa: F401  (the output stage generate() uses)
    from llama32.output import Output
    from llama32.requests import render_prompt, validate

    meta, hf = chat_pair
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    prompts = [render_prompt(llm.tokenizer, messages, [WEATHER], "messages") for llm in chat_pair]
    assert prompts[0] == prompts[1] and meta.tokenizer.encode(prompts[0]) == hf.tokenizer.encode(prompts[1])

    def answer(llm, text):
        out = Output(llm, validate(llm, dict(messages=messages, tools=[WEATHER], max_tokens=64)))
        ids = llm.tokenizer.encode(text) + [llm.tokenizer.eot_id]
        chunks = []
        for i, token in enumerate(ids):
            done = out.push(token, i == len(ids) - 1)
            chunks += list(out.chunks())
            if done:
                break
        return chunks[-1].get("tool_calls"), "".join(c["response"] for c in chunks)

    call = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert answer(meta, call) == answer(hf, call)
    assert answer(meta, call)[0] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]


# --- bad input: a CheckpointError that names the problem -------------------------------------------------------------

@pytest.fixture
def meta_copy(layouts, tmp_path):
    def copy(kind="llama32", shards=1):
        return Path(shutil.copytree(layouts(kind, shards)[0], tmp_path / f"{kind}-{shards}"))
    return copy


def _edit_params(folder: Path, **changes):
    p = json.loads((folder / "params.json").read_text())
    p.update(changes)
    (folder / "params.json").write_text(json.dumps(p))


@pytest.mark.parametrize("changes,message", [
    (dict(dim=128), r"params.json needs \[512, 128\]"),
    (dict(n_layers=4), r"missing tensor\(s\) model.layers.3"),
    (dict(n_layers=2), r"unexpected tensor 'layers.2.attention.wq.weight'"),
    (dict(n_kv_heads=4), r"tensor 'layers.0.attention.wk.weight' \(model.layers.0.self_attn.k_proj.weight\) has "
                         r"shape \[32, 64\], params.json needs \[64, 64\]"),
    (dict(multiple_of=1024), r"feed_forward.w1.weight.*params.json needs \[1024, 64\]"),
    (dict(vocab_size=1000), r"vocab_size 1000 does not match the checkpoint's embedding \(512 rows\)"),
    (dict(n_heads=3), r"dim 64 is not divisible by n_heads 3"),
    (dict(dim="64"), r"dim must be a positive integer"),
    (dict(use_scaled_rope="yes"), r"use_scaled_rope must be true or false"),
    (dict(vision_chunk_size=560), r"Llama 3.2 Vision"),
    (dict(quantization_args={"scheme": "int4_weight_int8_dynamic_activation"}), r"int4"),
])
def test_params_that_do_not_match_the_tensors(meta_copy, changes, message):
    folder = meta_copy()
    _edit_params(folder, **changes)
    with pytest.raises(CheckpointError, match=message):
        llama32.load(folder, dtype="float32", device="cpu")


def test_params_json_not_json(meta_copy):
    folder = meta_copy()
    (folder / "params.json").write_text("{dim: 64")
    with pytest.raises(CheckpointError, match=r"params.json: not valid JSON"):
        llama32.load(folder)


def test_missing_and_mismatched_shards(make_checkpoint, meta_copy, tmp_path):
    folder = meta_copy("llama32", 2)
    (folder / "consolidated.00.pth").unlink()
    with pytest.raises(CheckpointError, match=r"shard\(s\) missing: consolidated.00.pth \(found 1 of 2\)"):
        llama32.load(folder)
    # the last of four shards gone: no gap in the names, so the joined shapes tell
    four = fixtures.write_meta_checkpoint(make_checkpoint(kind="mha"), tmp_path / "four", shards=4)
    (four / "consolidated.03.pth").unlink()
    with pytest.raises(CheckpointError, match=r"vocab_size 512 does not match the embedding of 3 shards "
                                              r"\(is one missing\?\) \(384 rows\)"):
        llama32.load(four)
    folder = meta_copy("llama32", 1)
    (folder / "consolidated.00.pth").rename(folder / "model.pth")
    with pytest.raises(CheckpointError, match=r"no consolidated.00.pth \(found model.pth\)"):
        llama32.load(folder)


def test_shards_from_different_checkpoints(make_checkpoint, meta_copy):
    folder = meta_copy("llama32", 2)
    other = torch.load(folder / "consolidated.01.pth", weights_only=True)
    del other["layers.1.attention.wq.weight"]
    torch.save(other, folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth: holds other tensors than consolidated.00.pth"):
        llama32.load(folder)


@pytest.mark.parametrize("damage,message", [
    (lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]), r"not a readable PyTorch checkpoint"),
    (lambda f: f.write_bytes(b"not a zip at all"), r"not a readable PyTorch checkpoint"),
    (lambda f: torch.save({"x": [1, 2]}, f), r"expected a dict of tensors"),
    (lambda f: torch.save({"tok_embeddings.weight": torch.zeros(512, 64, dtype=torch.int32)}, f),
     r"not a floating-point type"),
])
def test_corrupt_shard(meta_copy, damage, message):
    folder = meta_copy()
    damage(folder / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=message):
        llama32.load(folder, dtype="float32", device="cpu")


def test_unknown_tensor_name(meta_copy):
    folder = meta_copy()
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    state["layers.0.attention.wqkv.weight"] = torch.zeros(4, 4)
    torch.save(state, folder / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"tensor 'layers.0.attention.wqkv.weight' is not one of Meta's"):
        llama32.load(folder)


@pytest.mark.parametrize("content,message", [
    (b"\x0a\x0b\x08\x80\xff\x01binary protobuf", r"not a tiktoken ranks file.*SentencePiece"),
    (b"IQ== 0\nnot-base64!! 1\n", r"not a tiktoken ranks file.*line 2"),
    (b"IQ== 0\nIg== 5\n", r"ranks are not 0..1"),
    (b"IQ== 0\nIQ== 1\n", r"line 2: token 'IQ==' is empty or listed twice"),
    (b"IQ== 0\nIg== 1\n", r"254 single bytes .* have no rank"),
    (b"", r"it is empty"),
])
def test_tokenizer_model_that_is_not_a_ranks_file(meta_copy, content, message):
    folder = meta_copy()
    (folder / "tokenizer.model").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        llama32.load(folder, dtype="float32", device="cpu")


# --- python -m llama32 download REPO --original ----------------------------------------------------------------------

def test_download_original_fetches_the_original_folder(monkeypatch, tmp_path, layouts, llama3_tokenizer_dir, capsys):
    import huggingface_hub
    from llama32.__main__ import main
    monkeypatch.setenv("LLAMA32_WEIGHTS", str(tmp_path / "weights"))
    meta, twin = layouts("llama32", 1, llama3_tokenizer_dir)
    calls = []

    def snapshot_download(repo_id, *, local_dir, allow_patterns, token):  # a hub repo: HF files + original/
        calls.append(allow_patterns)
        repo = tmp_path / "hub-repo"
        if not repo.exists():
            shutil.copytree(twin, repo)
            shutil.copytree(meta, repo / "original")
        import fnmatch
        for f in repo.rglob("*"):
            rel = f.relative_to(repo).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, Path(local_dir) / rel)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert main(["download", "meta-llama/Tiny-Llama", "--original"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder == (tmp_path / "weights" / "Tiny-Llama" / "original").resolve()
    assert calls == [["original/params.json", "original/consolidated.*.pth", "original/tokenizer.model"]]
    assert sorted(f.name for f in folder.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert not (folder.parent / "config.json").exists() and not (folder.parent / "model.safetensors").exists()
    a, b = llama32.load(folder, dtype="float32", device="cpu"), llama32.load(twin, dtype="float32", device="cpu")
    assert torch.allclose(a.model(IDS), b.model(IDS), atol=1e-4, rtol=0)
    assert a.tokenizer.encode("Hello 🦙") == b.tokenizer.encode("Hello 🦙")
    # the plain download still fetches the HF layout, into the same repo folder
    assert main(["download", "meta-llama/Tiny-Llama"]) == 0
    assert Path(capsys.readouterr().out.strip()) == folder.parent
    assert calls[1] != calls[0] and "model.safetensors" in calls[1]


def test_download_original_of_a_repo_without_one(monkeypatch, tmp_path):
    import huggingface_hub
    from llama32.hub import download
    monkeypatch.setenv("LLAMA32_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: None)
    with pytest.raises(CheckpointError, match=r"no original/ folder with params.json.*without --original"):
        download("someone/Plain-HF-Model", original=True)


def test_released_file_pages_read_back_and_own_memory_is_never_dropped(tmp_path):
    """The load drops each converted tensor's file pages (madvise); only pages of the shard files' mappings."""
    import sys
    from llama32 import meta
    torch.save({"w": torch.randn(1024, 1024)}, tmp_path / "consolidated.00.pth")
    state = torch.load(tmp_path / "consolidated.00.pth", mmap=True, weights_only=True)
    ranges = meta._file_mappings([tmp_path / "consolidated.00.pth"])
    assert bool(ranges) == sys.platform.startswith("linux")
    before = state["w"].clone()
    meta._drop_pages(state["w"], ranges)
    assert torch.equal(state["w"], before)  # faulted back in from the file, unchanged
    own = torch.randn(1024, 1024)
    copy = own.clone()
    meta._drop_pages(own, ranges)  # not in the file's mapping: left alone (dropping would zero it)
    assert torch.equal(own, copy)
