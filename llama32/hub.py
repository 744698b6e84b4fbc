"""Resolving a checkpoint source: a local directory, or a Hugging Face repo id downloaded into `weights/`.

Only what the model needs is fetched (configs, tokenizer, safetensors), with the hub's own progress bars.
Every failure (offline, gated, missing repo) becomes a `CheckpointError` that says what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

DEFAULT_MODEL = "meta-llama/Llama-3.2-1B-Instruct"
CHECKPOINT_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def weights_dir() -> Path:
    """Where downloads go: $LLAMA32_WEIGHTS, else the checkout's `weights/` folder, else ./weights."""
    if os.environ.get("LLAMA32_WEIGHTS"):
        return Path(os.environ["LLAMA32_WEIGHTS"])
    checkout = Path(__file__).resolve().parents[1] / "weights"
    return checkout if checkout.is_dir() else Path.cwd() / "weights"


def _complete(path: Path) -> bool:
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return (path / "config.json").is_file() and (path / "tokenizer.json").is_file() and has_weights


def resolve(source: str | os.PathLike) -> Path:
    """A local checkpoint directory for `source`, downloading a repo id on first use."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"source {text!r}: no such directory, and not a Hugging Face repo id (org/name)")
    local = weights_dir() / text.split("/")[1]
    if _complete(local):
        return local
    return download(text, local)


def download(repo_id: str, local: Path | None = None) -> Path:
    """Fetch the checkpoint files of `repo_id` into `weights/<name>/` (or `local`)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    local = local or weights_dir() / repo_id.split("/")[-1]
    token = os.environ.get("HF_TOKEN") or None
    try:
        snapshot_download(repo_id, local_dir=str(local), allow_patterns=CHECKPOINT_FILES, token=token)
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} while logged in, "
            "create a read token at https://huggingface.co/settings/tokens and set HF_TOKEN=<token> "
            "(or pass a local checkpoint directory instead)"
        ) from None
    except RepositoryNotFoundError:
        hint = "" if token else " (if it is private or gated, set HF_TOKEN)"
        raise CheckpointError(f"{repo_id}: no such repository on the Hugging Face hub{hint}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: cannot download (no network, or HF_HUB_OFFLINE is set) and it is not in {local}. "
            "Download it on a connected machine with `python -m llama32 download "
            f"{repo_id}` and copy the folder it prints to {local}, or pass a local checkpoint directory"
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{repo_id}: download failed ({e}); set HF_TOKEN if the repo is gated") from None
    except OSError as e:  # connection errors that surface as plain OS errors
        raise CheckpointError(
            f"{repo_id}: download failed ({e}); check the network, or pass a local checkpoint directory"
        ) from None
    if not _complete(local):
        raise CheckpointError(f"{repo_id}: the download in {local} has no config.json, tokenizer.json or safetensors")
    return local
