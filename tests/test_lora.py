"""LoRA adapters against PEFT itself: adapters written by `get_peft_model(...).save_pretrained`, logits compared
with `PeftModel.from_pretrained` on the same tiny random checkpoint; per-request isolation; refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama32
from fixtures import hf_model, without_cached
from llama32 import InvalidRequest, lora
from llama32.model import Linear

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = dict(raw=True, temperature=0, max_tokens=8)


def write_adapter(base: Path, out: Path, *, seed: int = 0, **config) -> Path:
    """A PEFT adapter for `base` with random (non-zero) lora_A and lora_B, saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False keeps nn.Linear's random init for lora_B too (PEFT's default zeroes it).
    config = dict(dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False), **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        get_peft_model(hf_model(base), LoraConfig(**config)).save_pretrained(out)
    return out


def peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model(base), adapter).eval()
    with torch.no_grad():
        return model(ids).logits


def copy_adapter(src: Path, dst: Path, *, config: dict | None = None, tensors=None) -> Path:
    """A copy of `src` with config fields replaced and/or the tensor dict rewritten by `tensors(dict) -> dict`."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if tensors is not None:
        file = dst / "adapter_model.safetensors"
        save_file(tensors(load_file(file)), file)
    return dst


@pytest.fixture(scope="module")
def base(make_checkpoint, llama3_tokenizer_dir) -> Path:
    # Real Llama 3 tokenizer (vocab 128256) so that generate() runs; tied head, GQA: k/v are 64 -> 32.
    return make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "plain": write_adapter(base, root / "plain", seed=1),
        "rslora": write_adapter(base, root / "rslora", seed=2, r=8, lora_alpha=16, use_rslora=True),
        # a regex target, and per-module rank and alpha
        "patterns": write_adapter(base, root / "patterns", seed=3, target_modules=r".*\.(q_proj|v_proj|down_proj)",
                                  rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 32}),
    }


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128000, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llm(base):
    return llama32.load(base, device="cpu", dtype="float32")


def forward(llm, ids, adapter=None):
    """Logits of `ids` with `adapter` as every row's (None: the handle's own), as the loop runs it."""
    with torch.no_grad():
        return llm.model(ids, lora=lora.RowAdapters.of(llm, [adapter] * ids.shape[0]))


# --- numerics -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["plain", "rslora", "patterns"])
def test_logits_match_peft(base, adapters, ids, llm, which):
    want = peft_logits(base, adapters[which], ids)
    got = forward(llama32.load(base, device="cpu", dtype="float32", lora=str(adapters[which])), ids)
    plain = forward(llm, ids)
    scale = want.abs().max().item()
    err, effect = (got - want).abs().max().item(), (plain - want).abs().max().item()
    print(f"\n{which}: logit scale {scale:.3f}, max |ours - peft| {err:.2e} (rel {err / scale:.2e}), "
          f"max |base - adapted| {effect:.3f} (rel {effect / scale:.2e})")
    assert err <= 1e-4 * scale
    assert effect >= 1e-2 * scale  # the adapter really changes the logits, so the parity above can fail


def test_scale_follows_config(base, adapters, llm):
    plain, rs, pat = (lora.resolve(llm, str(adapters[k])) for k in ("plain", "rslora", "patterns"))
    assert (plain.r, plain.scale) == (4, 8 / 4)
    assert (rs.r, rs.scale) == (8, 16 / 8 ** 0.5)
    q, v, down = (pat.modules[f"model.layers.0.{m}"] for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert (q[2], v[2], down[2]) == (32 / 4, 8 / 4, 8 / 2)
    assert down[0].shape == (2, 128) and down[1].shape == (64, 2)
    assert len(pat.modules) == 3 * 3  # 3 layers x (q, v, down)
    assert len(plain.modules) == 3 * 7


def test_keys_with_adapter_name_and_fan_in_fan_out(base, adapters, ids, llm, tmp_path):
    """`lora_A.default.weight` (a live PeftModel's state dict), fan_in_fan_out (no effect unmerged) and the
    "all-linear" target load the same."""
    config = {"fan_in_fan_out": True, "target_modules": "all-linear"}
    named = copy_adapter(adapters["plain"], tmp_path / "named", config=config, tensors=lambda t: {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in t.items()})
    got = forward(llm, ids, lora.resolve(llm, str(named)))
    want = forward(llm, ids, lora.resolve(llm, str(adapters["plain"])))
    assert torch.equal(got, want)


def test_adapter_follows_handle_dtype(base, adapters):
    half = llama32.load(base, device="cpu", dtype="bfloat16", lora=str(adapters["plain"]))
    a, b, _ = next(iter(lora.resolve(half, str(adapters["plain"])).modules.values()))
    assert a.dtype == b.dtype == torch.bfloat16


# --- switching and isolation --------------------------------------------------------------------------------------


def test_row_adapters_leave_the_model_unchanged(base, adapters, ids, llm):
    plain = forward(llm, ids)
    adapted = forward(llama32.load(base, device="cpu", dtype="float32", lora=str(adapters["plain"])), ids)
    adapter = lora.resolve(llm, str(adapters["plain"]))
    assert torch.equal(forward(llm, ids, adapter), adapted)
    assert torch.equal(forward(llm, ids, None), plain)  # None: the handle's own state, which is no adapter here
    assert torch.equal(forward(llm, ids), plain)
    assert all(m.adapter is None for m in llm.model.modules() if isinstance(m, Linear))


def test_handle_adapter_is_the_default(base, adapters, ids):
    handle = llama32.load(base, device="cpu", dtype="float32", lora=str(adapters["plain"]))
    assert handle.lora == str(adapters["plain"])
    own = forward(handle, ids)
    other = lora.resolve(handle, str(adapters["rslora"]))
    switched = forward(handle, ids, other)
    assert not torch.equal(switched, own)
    assert torch.equal(forward(handle, ids), own)  # the handle's own adapter is untouched
    lora.apply_to_handle(handle, None)  # and it can be removed again
    assert handle.lora is None
    assert torch.equal(forward(handle, ids), forward(llama32.load(base, device="cpu", dtype="float32"), ids))


def test_generate_isolates_requests(base, adapters, llm):
    path = str(adapters["plain"])
    first = llama32.generate(llm, prompt="The capital of France is", **GREEDY)
    with_lora = llama32.generate(llm, prompt="The capital of France is", lora=path, **GREEDY)
    again = llama32.generate(llm, prompt="The capital of France is", **GREEDY)
    assert without_cached(first) == without_cached(again)
    assert with_lora["response"] != first["response"]

    handle = llama32.load(base, device="cpu", dtype="float32", lora=path)
    assert llama32.generate(handle, prompt="The capital of France is", **GREEDY) == with_lora  # both firsts
    assert without_cached(llama32.generate(handle, prompt="The capital of France is", lora=path, **GREEDY)) == \
        without_cached(with_lora)
    streamed = "".join(c["response"] for c in llama32.generate(
        llm, prompt="The capital of France is", lora=path, stream=True, **GREEDY))
    assert streamed == with_lora["response"]
    assert without_cached(llama32.generate(llm, prompt="The capital of France is", **GREEDY)) == without_cached(first)


def test_generate_batch_mixes_adapters(base, adapters, llm):
    path = str(adapters["plain"])
    reqs = [dict(prompt="Hello there", **GREEDY), dict(prompt="Hello there", lora=path, **GREEDY),
            dict(prompt="One two three", **GREEDY)]
    assert llama32.generate_batch(llm, reqs) == [llama32.generate(llm, **r) for r in reqs]


def _weight_ids(llm):
    """Each projection's weight object and, for dense weights, its storage address (CPU weights may be
    oneDNN-packed, which have no data_ptr)."""
    return {n: (id(m.weight), None if m.weight.is_mkldnn else m.weight.data_ptr())
            for n, m in llm.model.named_modules() if isinstance(m, Linear)}


def _dense(t):
    return t.to_dense() if t.is_mkldnn else t.clone()


def test_switching_never_touches_base_weights(base, adapters, ids, llm):
    before = {k: _dense(v) for k, v in llm.model.state_dict().items()}
    ptrs = _weight_ids(llm)
    assert len(ptrs) == 3 * 7 + 1  # seven projections a layer, plus the output head
    for which in ("plain", "rslora", "patterns", "plain"):
        forward(llm, ids, lora.resolve(llm, str(adapters[which])))
    llama32.generate(llm, prompt="hi", lora=str(adapters["rslora"]), **GREEDY)
    lora.apply_to_handle(llm, str(adapters["plain"]))
    lora.apply_to_handle(llm, None)
    after = llm.model.state_dict()
    assert after.keys() == before.keys()  # no adapter tensors in the state dict
    assert all(torch.equal(_dense(after[k]), v) for k, v in before.items())
    assert ptrs == _weight_ids(llm)


# --- resolution -----------------------------------------------------------------------------------------------------


def test_resolve_by_name_and_cache(adapters, llm, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA32_WEIGHTS", str(tmp_path))
    shutil.copytree(adapters["plain"], tmp_path / "loras" / "my-adapter")
    adapter = lora.resolve(llm, "my-adapter")
    assert adapter.path == (tmp_path / "loras" / "my-adapter").resolve() and adapter.name == "my-adapter"
    assert lora.resolve(llm, "my-adapter") is adapter  # cached, not reloaded
    assert lora.resolve(llm, str(tmp_path / "loras" / "my-adapter")) is adapter  # same directory, same object
    by_name = llama32.generate(llm, prompt="hi", lora="my-adapter", **GREEDY)
    assert by_name == llama32.generate(llm, prompt="hi", lora=str(adapters["plain"]), **GREEDY)


def _without(name):
    def edit(path: Path) -> None:
        (path / name).unlink()
    return edit


def _config(**fields):
    def edit(path: Path) -> None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**cfg, **fields}))
    return edit


def _tensors(fn):
    def edit(path: Path) -> None:
        file = path / "adapter_model.safetensors"
        save_file(fn(load_file(file)), file)
    return edit


def _rename(old: str, new: str):
    return _tensors(lambda t: {k.replace(old, new): v for k, v in t.items()})


REFUSALS = {
    "no-config": (_without("adapter_config.json"), r"has no adapter_config\.json"),
    "no-weights": (_without("adapter_model.safetensors"), r"has no adapter_model\.safetensors"),
    "bad-json": (lambda p: (p / "adapter_config.json").write_text("{not json"), r"cannot parse .*adapter_config"),
    "dora": (_config(use_dora=True), r"DoRA"),
    "bias": (_config(bias="all"), r"bias 'all' is not supported"),
    "lora-bias": (_config(lora_bias=True), r"lora_bias"),
    "modules-to-save": (_config(modules_to_save=["lm_head"]), r"modules_to_save"),
    "other-peft-type": (_config(peft_type="IA3"), r"peft_type 'IA3'"),
    "target-embed": (_config(target_modules=TARGETS + ["embed_tokens"]),
                     r"target_modules includes model\.embed_tokens"),
    "target-lm-head": (_config(target_modules="lm_head"), r"target_modules includes lm_head"),
    "target-unknown": (_config(target_modules=["c_attn"]), r"entry 'c_attn' names no module"),
    "untargeted-tensors": (_config(target_modules=["q_proj"]), r"_proj'.*which the config does not target"),
    "excluded-tensors": (_config(exclude_modules=["layers.1.mlp.up_proj"]),
                         r"layers\.1\.mlp\.up_proj'.*does not target"),
    "rank-mismatch": (_config(r=8), r"lora_A\.weight' has shape \[4, (64|128)\], but rank 8 .* needs \[8, \1\]"),
    "rank-pattern-mismatch": (_config(rank_pattern={"q_proj": 2}), r"q_proj.* has shape \[4, 64\], but rank 2"),
    "layer-out-of-range": (_rename("layers.2.", "layers.7."), r"layer 7, but the model has 3 layers"),
    "embedding-tensor": (_tensors(lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A":
                                             torch.zeros(4, 128256)}), r"unexpected tensor .*lora_embedding_A"),
    "lm-head-tensor": (_tensors(lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                                           "base_model.model.lm_head.lora_B.weight": torch.zeros(128256, 4)}),
                       r"adapts 'lm_head'; only q_proj"),
    "missing-b": (_tensors(lambda t: {k: v for k, v in t.items() if k != "base_model.model.model.layers.1.mlp.up_proj"
                                      ".lora_B.weight"}), r"layers\.1\.mlp\.up_proj' has no lora_B"),
    "dora-tensor": (_tensors(lambda t: {**t, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                                        torch.ones(64)}), r"DoRA magnitude"),
    "nan": (_tensors(lambda t: {k: v.fill_(float("nan")) if "layers.0.mlp.up_proj.lora_A" in k else v
                                for k, v in t.items()}), r"not a finite"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals(adapters, llm, tmp_path, case):
    edit, message = REFUSALS[case]
    path = shutil.copytree(adapters["plain"], tmp_path / case)
    edit(path)
    cached = dict(llm._adapters)
    with pytest.raises(InvalidRequest, match=r"^lora .*" + message):
        lora.resolve(llm, str(path))
    with pytest.raises(InvalidRequest, match=message):
        llama32.generate(llm, prompt="hi", lora=str(path), **GREEDY)
    assert llm._adapters == cached  # nothing half-loaded was kept


def test_refuses_missing_adapter_saying_where_it_looked(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA32_WEIGHTS", str(tmp_path))
    with pytest.raises(InvalidRequest, match=r"lora 'nope': no such adapter .*" + str(tmp_path / "loras" / "nope")):
        lora.resolve(llm, "nope")
    with pytest.raises(InvalidRequest, match=r"no such adapter"):
        llama32.load(llm.path, device="cpu", dtype="float32", lora=str(tmp_path / "missing"))
    with pytest.raises(InvalidRequest, match=r"^lora must be"):
        lora.resolve(llm, "")


def test_refuses_peft_dora_adapter(base, llm, tmp_path):
    path = write_adapter(base, tmp_path / "dora", use_dora=True)
    with pytest.raises(InvalidRequest, match=r"^lora .*DoRA"):
        lora.resolve(llm, str(path))


def test_refuses_adapter_for_another_base(make_checkpoint, llm, tmp_path):
    # An MHA model has k/v projections 64 -> 64; this base's are 64 -> 32 (GQA).
    other = write_adapter(make_checkpoint(kind="mha"), tmp_path / "mha")
    with pytest.raises(InvalidRequest, match=r"k_proj\.lora_B\.weight' has shape \[64, 4\].* needs \[32, 4\]"):
        lora.resolve(llm, str(other))


def test_refused_handle_adapter_leaves_load_failing_cleanly(base, tmp_path):
    with pytest.raises(InvalidRequest, match="^lora"):
        llama32.load(base, device="cpu", dtype="float32", lora=str(tmp_path))


def test_adapter_cache_keeps_the_most_recently_used(adapters, llm):
    llm.max_adapters = 2
    try:
        first = lora.resolve(llm, str(adapters["plain"]))
        second = lora.resolve(llm, str(adapters["rslora"]))
        assert lora.resolve(llm, str(adapters["plain"])) is first  # used again: now the most recent
        lora.resolve(llm, str(adapters["patterns"]))  # a third: the least recently used (rslora) goes
        assert len(llm._adapters) == 2 and second not in llm._adapters.values()
        assert lora.resolve(llm, str(adapters["plain"])) is first
        # a row still holding the dropped adapter keeps its own stack in the compiled step's form
        gathered = lora.GatheredAdapters.of(llm, [None, second])
        assert gathered.rows.tolist()[0] == 0 and gathered.rows.tolist()[1] > 0
        assert lora.resolve(llm, str(adapters["rslora"])) is not second  # reloaded
    finally:
        del llm.max_adapters


def test_named_accepts_only_a_folder_name(adapters, tmp_path):
    shutil.copytree(adapters["plain"], tmp_path / "good")
    (tmp_path / "empty").mkdir()
    assert lora.named(tmp_path, "good") == tmp_path / "good"
    for name in ("empty", "missing", "..", ".", "../good", "good/..", "./good", str(tmp_path / "good"), "/etc",
                 "", ".hidden", "a\\b", None, 3):
        assert lora.named(tmp_path, name) is None, name
