"""Resolving a checkpoint source: a local directory, or a Hugging Face repo id downloaded into `weights/`.

Only what the model needs is fetched (configs, tokenizer, safetensors; or with `original=True` Meta's layout from
the repo's `original/` folder), with the hub's own progress bars.
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
# Meta's own layout, which the Llama repos carry in their original/ folder (`download(..., original=True)`).
ORIGINAL_DIR = "original"
ORIGINAL_FILES = [f"{ORIGINAL_DIR}/params.json", f"{ORIGINAL_DIR}/consolidated.*.pth", f"{ORIGINAL_DIR}/tokenizer.model"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Written into every folder a download fills: which repo it holds. `weights/<name>` drops the organisation,
# so without it `unsloth/Llama-3.2-1B-Instruct` would load an earlier `meta-llama/Llama-3.2-1B-Instruct`.
REPO_MARKER = ".llama32-repo"


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
    local = local_dir(text)
    if _complete(local):
        return local
    return download(text, local)


def holds(path: Path) -> str | None:
    """The repo id a download into `path` recorded, or None (an unmarked folder, e.g. copied by hand)."""
    marker = path / REPO_MARKER
    return marker.read_text(encoding="utf-8").strip() if marker.is_file() else None


def local_dir(repo_id: str) -> Path:
    """Where `repo_id` lives: `weights/<name>/`, unless that folder holds another repo (its marker says so):
    then `weights/<org>--<name>/`. An unmarked `weights/<name>/` is taken to be what the user put there."""
    org, name = repo_id.split("/")
    short = weights_dir() / name
    held = holds(short)
    if held is None or held == repo_id:
        return short
    return weights_dir() / f"{org}--{name}"


def _complete_original(path: Path) -> bool:
    return all((path / name).is_file() for name in ("params.json", "consolidated.00.pth", "tokenizer.model"))


def download(repo_id: str, local: Path | None = None, *, original: bool = False) -> Path:
    """Fetch the checkpoint files of `repo_id` into `weights/<name>/` (or `local`).

    `original`: fetch Meta's layout from the repo's `original/` folder instead (params.json,
    consolidated.NN.pth, tokenizer.model) into `<local>/original/`, and return that folder.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    local = local or local_dir(repo_id)
    held = holds(local)
    if held is not None and held != repo_id:
        raise CheckpointError(f"{local} holds {held}, not {repo_id}; remove it or choose another folder")
    token = os.environ.get("HF_TOKEN") or None
    try:
        snapshot_download(repo_id, local_dir=str(local), allow_patterns=ORIGINAL_FILES if original else CHECKPOINT_FILES,
                          token=token)
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
    if original and not _complete_original(local / ORIGINAL_DIR):
        raise CheckpointError(f"{repo_id}: the repo has no {ORIGINAL_DIR}/ folder with params.json, consolidated.00.pth "
                              "and tokenizer.model (Meta's layout); download it without --original")
    if not original and not _complete(local):
        raise CheckpointError(f"{repo_id}: the download in {local} has no config.json, tokenizer.json or safetensors")
    (local / REPO_MARKER).write_text(repo_id + "\n", encoding="utf-8")
    return local / ORIGINAL_DIR if original else local
