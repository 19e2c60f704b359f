"""papermill runs parameterised notebooks under the tierkernel kernel with ``-p`` values.

papermill inserts the ``-p`` values as a plain cell (no ``%%tier`` line) right after the cell
tagged ``parameters``, so they are assigned in the default tier. In the native test that is the
kernel's IPython; notebooks/parameters.ipynb switches the default tier to ``wasm`` before its
parameters cell, so the values land in the wasm interpreter where its ``%%tier wasm`` cells
use them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
PARAMETERS = REPO / "notebooks" / "parameters.ipynb"


def _papermill(source: Path, out: Path, env: dict[str, str], *params: str) -> Any:
    """Run the papermill CLI under the tierkernel kernel; return the output notebook."""
    argv = [sys.executable, "-m", "papermill", str(source), str(out), "-k", "tierkernel",
            "--cwd", str(out.parent), "--execution-timeout", "120", "--no-progress-bar"]
    for pair in params:
        name, value = pair.split("=", 1)
        argv += ["-p", name, value]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    assert done.returncode == 0, f"papermill failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return nbformat.read(out, as_version=4)


def _text(cell: Any) -> str:
    """A cell's printed text and text/plain results, joined."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "text/plain" in out.get("data", {}):
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def _check_ran_cleanly(nb: Any) -> None:
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is not None, f"cell {index} did not run"
        errors = [o for o in cell.outputs if o["output_type"] == "error"]
        assert not errors, f"cell {index} failed: {errors}"


def _injected(nb: Any) -> tuple[int, Any]:
    """The cell papermill inserted, and its index; it must follow the parameters cell."""
    tagged = [(i, c) for i, c in enumerate(nb.cells)
              if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "papermill inserted no parameters cell"
    index, cell = tagged[0]
    assert "parameters" in nb.cells[index - 1].metadata.get("tags", [])
    return index, cell


def test_parameters_reach_wasm_cells(tmp_path: Path, e2e_env: dict[str, str]) -> None:
    """notebooks/parameters.ipynb with -p values: the wasm cells compute with them."""
    out = _papermill(PARAMETERS, tmp_path / "parameters.out.ipynb", e2e_env,
                     "n=10", "label=cubes", "power=3")
    _check_ran_cleanly(out)
    assert out.metadata.papermill.parameters == {"n": 10, "label": "cubes", "power": 3}
    index, injected = _injected(out)
    assert "n = 10" in injected.source and 'label = "cubes"' in injected.source

    texts = [_text(c) for c in out.cells if c.cell_type == "code"]
    # The values were assigned in wasm: the wasm cell reports wasi and uses all three.
    assert "cubes computed in wasi: n=10, power=3" in "".join(texts), texts
    summaries = [ast.literal_eval(t) for t in texts if t.startswith("{'label'")]
    assert summaries == [{"label": "cubes", "n": 10, "power": 3,
                          "total": sum(k ** 3 for k in range(10))}], texts
    # ...and only there: the native cell at the end does not see them.
    assert texts[-1] == "(False, False)", texts
    # The injected cell itself ran after the default tier became wasm.
    assert out.cells[index].execution_count == out.cells[index - 1].execution_count + 1


def test_parameters_in_native(tmp_path: Path, e2e_env: dict[str, str]) -> None:
    """A notebook whose parameters stay in the default (native) tier: -p values arrive there,
    in cells without a %%tier line and in %%tier native cells."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "tierkernel", "display_name": "Python (tierkernel)",
                                 "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("rows = 2\nword = 'default'",
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import os\nprint('native', os.getpid(), word * rows)"),
        nbformat.v4.new_code_cell("%%tier native\n{'rows': rows, 'word': word}"),
    ]
    source = tmp_path / "native.ipynb"
    nbformat.write(nb, source)

    out = _papermill(source, tmp_path / "native.out.ipynb", e2e_env, "rows=3", "word=ab")
    _check_ran_cleanly(out)
    assert out.metadata.papermill.parameters == {"rows": 3, "word": "ab"}
    index, _ = _injected(out)
    assert index == 1
    assert "ababab" in _text(out.cells[2])
    assert ast.literal_eval(_text(out.cells[3])) == {"rows": 3, "word": "ab"}
