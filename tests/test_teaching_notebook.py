"""A notebook of typical teaching cells, run whole in each tier and compared with native.

Switching a notebook from ``native`` to ``%tier wasm`` or ``%tier sandbox`` should change where
it runs, not what it shows. ``tests/notebooks/teaching/`` holds a notebook of the cells teaching
notebooks use most (``%matplotlib inline``, ``%timeit``, ``%%time``, ``_``/``Out``/``In``,
``%%writefile``, ``%%capture``, ``IPython.display``, pandas on a CSV file beside the notebook,
scikit-learn, scipy, seaborn, ``%who``, ``%env``, an error). nbclient runs it as a user would
(the kernel started in the notebook's folder), once natively and once per tier with a first
cell ``%tier NAME``; every code cell must then show the same outputs as natively, output by
output: the same kinds in the same order, the same text, the same error. Cells tagged
``timing`` print measured times, so only their kinds of output are compared.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from tests import sandbox_support
from tierkernel.backends.wasm import runtime as wasm_runtime

SOURCE = Path(__file__).parent / "notebooks" / "teaching"

needs_wasm = pytest.mark.skipif(
    wasm_runtime.runtime_problem() is not None or not wasm_runtime.is_compiled(),
    reason="the wasm runtime is not installed or not compiled: run 'tierkernel warm'",
)


def _run(folder: Path, tier: str | None) -> list[Any]:
    """Execute a copy of the notebook in ``folder``; return its code cells (prefix dropped)."""
    nb = nbformat.read(folder / "teaching.ipynb", as_version=4)
    if tier is not None:
        nb.cells.insert(0, nbformat.v4.new_code_cell(f"%tier {tier}"))
    NotebookClient(nb, kernel_name="tierkernel", timeout=300, allow_errors=True,
                   resources={"metadata": {"path": str(folder)}}).execute()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    return cells[1:] if tier is not None else cells


def _shape(cell: Any) -> list[tuple[Any, ...]]:
    """What a user sees of a cell's outputs, in order, as comparable tuples."""
    timing = "timing" in cell.metadata.get("tags", [])
    shown: list[tuple[Any, ...]] = []
    for out in cell.outputs:
        kind = out.output_type
        if kind == "stream":
            # Consecutive pieces of one stream show as one text (as JupyterLab shows them):
            # where a tier's output was cut into messages is not something a user sees.
            if shown and shown[-1][:2] == (kind, out.name):
                shown[-1] = (kind, out.name) if timing else (kind, out.name,
                                                             shown[-1][2] + out.text)
                continue
            shown.append((kind, out.name) if timing else (kind, out.name, out.text))
        elif kind == "error":
            shown.append((kind, out.ename, out.evalue))
        else:
            data = out.get("data", {})
            text = None if timing or "image/png" in data else data.get("text/plain")
            shown.append((kind, tuple(sorted(k for k in data if k != "text/plain")), text))
    return shown


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    folder = tmp_path_factory.mktemp("native") / "teaching"
    shutil.copytree(SOURCE, folder)
    return _run(folder, None)


def test_the_notebook_runs_natively_without_errors_but_the_planned_one(native: list[Any]) -> None:
    errors = [(c.source, o) for c in native for o in c.outputs if o.output_type == "error"
              and "error" not in c.metadata.get("tags", [])]
    assert errors == []


@pytest.mark.parametrize("tier", [
    pytest.param("process"),
    pytest.param("wasm", marks=needs_wasm),
    pytest.param("sandbox"),
])
def test_every_cell_shows_what_it_shows_natively(
        tier: str, native: list[Any], tmp_path: Path) -> None:
    if tier == "sandbox":
        sandbox_support.need_sandbox()
    folder = tmp_path / "teaching"
    shutil.copytree(SOURCE, folder)
    cells = _run(folder, tier)
    assert len(cells) == len(native)
    different = [(n.source, _shape(n), _shape(c)) for n, c in zip(native, cells, strict=True)
                 if _shape(n) != _shape(c)]
    assert different == [], "\n\n".join(
        f"cell:\n{src}\nnative: {want}\n{tier}: {got}" for src, want, got in different)
    # What the sandboxed tiers write goes to the workspace, never into the notebook's folder.
    if tier != "process":
        assert not (folder / "notes.txt").exists()
