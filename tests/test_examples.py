"""examples/quickstart.ipynb runs top to bottom on a real kernel (nbclient, ipykernel) from a
fresh folder, as a new user runs it, and is committed without outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def test_the_notebook_is_committed_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.slow
def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # the kernel inherits the environment: this checkout first, as in the README's venv
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on any error

    def text(i: int) -> str:
        out = nb.cells[i].outputs
        return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                       for o in out)

    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    table = text(code[0])
    for column in ("N", "high", "low", "none"):
        assert column in table
    assert "76.7 [74.0, 79.2]" in table  # the README's N=8 high cell
    assert any("image/png" in o.get("data", {}) for o in nb.cells[code[2]].outputs)
    assert "random" in text(code[3]) and "draws" in text(code[3])
    assert text(code[-1]).strip() == "True"
    assert (tmp_path / "outputs" / "multirun").is_dir()
