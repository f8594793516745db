"""examples/quickstart.ipynb runs top to bottom on a real kernel (nbclient, ipykernel) from a
fresh folder, as a new user runs it, and is committed without outputs. The GPU notebook
(examples/mistral_7b_nf4_colab.ipynb) cannot run here (CUDA, the hub): its every ``ih.run``
composes and passes the config checks, and the batch size it states is the memory model's."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
GPU_NOTEBOOK = ROOT / "examples" / "mistral_7b_nf4_colab.ipynb"


@pytest.mark.parametrize("path", [NOTEBOOK, GPU_NOTEBOOK], ids=lambda p: p.name)
def test_the_notebook_is_committed_without_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def _run_calls(path: Path) -> list[list[str]]:
    """The string arguments of every ``ih.run(...)`` in the notebook's code cells."""
    calls = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        lines = [line for line in source.splitlines() if not line.startswith(("%", "!"))]
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "run":
                calls.append([ast.literal_eval(a) for a in node.args])
    return calls


def test_the_gpu_notebooks_sweeps_compose_and_pass_the_checks():
    from ih_sweep import api
    from ih_sweep.config.hydra import settings

    calls = _run_calls(GPU_NOTEBOOK)
    assert len(calls) == 3
    for overrides in calls:
        jobs = api.expand(overrides)
        assert len(jobs) == 3, overrides
        for job in jobs:
            config = settings(api.compose(job))
            assert config.model.name == "mistral-7b-colab-sharded"
            assert config.quantization.name.value == "nf4"
            assert config.quantization.compute_dtype.value == "bfloat16"
            assert config.data.n_stories == 2000 and config.n_heads == 16


def test_the_gpu_notebook_states_the_memory_models_batch_size_and_dtype():
    from transformers import MistralConfig

    from ih_sweep.model import batching

    text = GPU_NOTEBOOK.read_text()
    shape = batching.model_shape(MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8))  # Mistral-7B-v0.1's config.json
    free = (15.0 - 0.4 - 3.9) * batching.GIB  # the notebook's T4 numbers
    fit = batching.rows_that_fit(free, shape, 2, 200, 3)
    rows = batching.rows_per_batch(free, shape, 2, 200, 3)
    assert f"so {fit} rows fit" in text and f"**{rows} rows a batch**" in text
    assert f"eval.batch_size=auto: {rows} (10.7 GiB free" in text
    assert "including_emulation=False" in text and "quantization.compute_dtype=float16" in text


@pytest.mark.slow
def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # the kernel inherits the environment: this checkout first, as in the README's venv
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # nbclient waits 4 s for a cell's output after its reply and then drops it (a warning),
    # 60 s for the kernel: too short on a busy CI machine; a late output now fails loudly
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     iopub_timeout=60, raise_on_iopub_timeout=True,
                                     startup_timeout=300,
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
