"""The example notebooks (examples/*.ipynb) run top to bottom on SmolLM2 and show plots; git keeps them stripped."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def test_there_are_four_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quick_start.ipynb", "02_looking_inside.ipynb", "03_interventions.ipynb", "04_measuring.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {i} has outputs"
        assert "execution" not in cell.metadata, f"{path.name} cell {i} keeps execution timings"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_plots(path, smollm2_dir, monkeypatch):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # The kernel is a subprocess: it finds this checkout's llama32 and the small checkpoint through the environment.
    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("LLAMA32_EXAMPLE_MODEL", str(smollm2_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    seconds = time.perf_counter() - start
    print(f"\n{path.name}: {seconds:.1f} s", file=sys.stderr)
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
              if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert images, f"{path.name} showed no plot"
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors


def test_readme_notebook_snippet_runs(smol, monkeypatch):
    """The README's "In a notebook" code block, with SmolLM2 standing in for the checkpoint it names."""
    import llama32

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### In a notebook\n\n```python\n(.*?)```", readme, re.S)
    assert block, "README.md has no python block under '### In a notebook'"
    *body, last = block.group(1).strip().splitlines()
    monkeypatch.setattr(llama32, "load", lambda *args, **kwargs: smol)
    scope: dict = {}
    exec("\n".join(body), scope)
    top = eval(last, scope)
    assert len(top) == 5 and all(isinstance(t, str) and 0 <= p <= 1 for t, p in top)
