"""Repo ids: download into weights/<name>/, and every hub failure turned into an error that says what to do."""

import pytest
import torch

import llama32
from llama32.errors import CheckpointError


@pytest.fixture(autouse=True)
def weights_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA32_WEIGHTS", str(tmp_path / "weights"))
    return tmp_path / "weights"


def fake_download(exc):
    def download(*args, **kwargs):
        raise exc
    return download


def _http_error(cls, message):
    """An instance of a hub HTTP error without a live response (its constructor differs across versions)."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


def test_gated_repo_says_accept_licence_and_set_token(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(_http_error(GatedRepoError, "gated")))
    with pytest.raises(CheckpointError, match=r"gated: accept its licence.*HF_TOKEN"):
        llama32.load("meta-llama/Llama-3.2-1B-Instruct")


def test_missing_repo(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        fake_download(_http_error(RepositoryNotFoundError, "404")))
    with pytest.raises(CheckpointError, match="no such repository.*HF_TOKEN"):
        llama32.load("nobody/no-such-model")


def test_offline_says_what_to_do(monkeypatch, weights_tmp):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"cannot download .*python -m llama32 download"):
        llama32.load("meta-llama/Llama-3.2-1B-Instruct")


def test_download_goes_to_weights_name_with_only_checkpoint_files(monkeypatch, weights_tmp, make_checkpoint,
                                                                   llama3_tokenizer_dir):
    import shutil
    import huggingface_hub
    src = make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir)
    calls = []

    def download(repo_id, *, local_dir, allow_patterns, token):
        calls.append((repo_id, local_dir, allow_patterns, token))
        shutil.copytree(src, local_dir, dirs_exist_ok=True)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    llm = llama32.load("someone/Tiny-Llama", dtype="float32")
    assert llm.path == weights_tmp / "Tiny-Llama"
    (repo_id, local_dir, patterns, token), = calls
    assert repo_id == "someone/Tiny-Llama" and token == "hf_test"
    assert "*.safetensors" not in patterns and "model.safetensors" in patterns and "tokenizer.json" in patterns
    assert not any(p.endswith((".bin", ".pth", ".gguf")) for p in patterns)
    # a second load uses the local copy without asking the hub
    llama32.load("someone/Tiny-Llama", dtype="float32")
    assert len(calls) == 1


def test_not_a_directory_nor_repo_id():
    with pytest.raises(CheckpointError, match="no such directory, and not a Hugging Face repo id"):
        llama32.load("./does/not/exist")


def test_same_name_from_another_org_is_not_the_earlier_download(monkeypatch, weights_tmp, make_checkpoint,
                                                                 llama3_tokenizer_dir):
    """weights/<name> drops the organisation: a folder records which repo it holds, and another repo of the
    same name gets a folder of its own instead of silently loading the first one."""
    import shutil
    import huggingface_hub
    from llama32.hub import REPO_MARKER
    sources = {"meta-llama/Tiny": make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir, seed=1),
               "unsloth/Tiny": make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir, seed=2)}
    calls = []

    def download(repo_id, *, local_dir, allow_patterns, token):
        calls.append(repo_id)
        shutil.copytree(sources[repo_id], local_dir, dirs_exist_ok=True)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    meta = llama32.load("meta-llama/Tiny", dtype="float32")
    unsloth = llama32.load("unsloth/Tiny", dtype="float32")
    assert calls == ["meta-llama/Tiny", "unsloth/Tiny"]
    assert meta.path == weights_tmp / "Tiny" and unsloth.path == weights_tmp / "unsloth--Tiny"
    assert (meta.path / REPO_MARKER).read_text().strip() == "meta-llama/Tiny"
    ids = torch.tensor([[1, 2, 3]])
    assert not torch.equal(meta.model(ids), unsloth.model(ids))  # really the two different checkpoints
    # both are found again without the hub
    assert llama32.load("unsloth/Tiny", dtype="float32").path == unsloth.path
    assert llama32.load("meta-llama/Tiny", dtype="float32").path == meta.path
    assert len(calls) == 2


def test_a_folder_copied_by_hand_is_used(monkeypatch, weights_tmp, make_checkpoint, llama3_tokenizer_dir):
    import shutil
    import huggingface_hub
    shutil.copytree(make_checkpoint(kind="llama32", tokenizer_dir=llama3_tokenizer_dir), weights_tmp / "Tiny")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(AssertionError("no download")))
    assert llama32.load("meta-llama/Tiny", dtype="float32").path == weights_tmp / "Tiny"
