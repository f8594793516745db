"""What the checks before any job found about a local model folder, kept in the score cache
(:mod:`ih_sweep.pipeline.model_facts`): a later command with the same files answers the
checks from the record (without the checks' own work, so without torch); a changed file
is checked afresh and refused as before; a refused command keeps nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from compose_config import ROOT, compose

from ih_sweep.model.files import ModelFileError
from ih_sweep.model.loading import ASSET_DIR
from ih_sweep.pipeline import model_facts, preflight


@pytest.fixture
def folder(tmp_path):
    """A copy of the bundled model's folder, its record kept in ``tmp_path/cache``."""
    model_facts.forget_facts()
    copy = tmp_path / "tiny"
    shutil.copytree(ASSET_DIR, copy)
    yield copy
    model_facts.forget_facts()


def _cfg(folder, tmp_path, *overrides):
    return compose(f"model.path={folder}", f"paths.cache_dir={tmp_path / 'cache'}",
                   "n_heads=4", "condition=high", *overrides)


def _refuse_work(monkeypatch):
    """Make the checks' own work fail: only a record can answer them now."""
    def boom(*_, **__):
        raise AssertionError("a check ran that its record should have answered")

    import ih_sweep.model.loading as loading

    for name in ("check_local_model", "layers_and_heads", "load_config", "local_tokenizer"):
        monkeypatch.setattr(loading, name, boom)


def test_an_unchanged_folder_is_answered_from_its_record(folder, tmp_path, monkeypatch):
    preflight.check_job(_cfg(folder, tmp_path))
    assert not (tmp_path / "cache").exists(), "kept before every job's checks passed"
    model_facts.keep_facts()
    records = list((tmp_path / "cache" / "checks").glob("*.json"))
    assert len(records) == 1
    facts = json.loads(records[0].read_text())
    assert facts["files_checked"] is True and facts["layers_and_heads"] == [2, 32]
    model_facts.forget_facts()  # a new command
    _refuse_work(monkeypatch)
    preflight.check_job(_cfg(folder, tmp_path))


def test_a_changed_file_is_checked_again(folder, tmp_path, monkeypatch):
    preflight.check_job(_cfg(folder, tmp_path))
    model_facts.keep_facts()
    model_facts.forget_facts()
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3  # no longer fits the weights
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="num_hidden_layers=3"):
        preflight.check_job(_cfg(folder, tmp_path))
    model_facts.forget_facts()
    _refuse_work(monkeypatch)  # and a record of the changed folder is never found
    with pytest.raises(AssertionError, match="should have answered"):
        preflight.check_job(_cfg(folder, tmp_path))


def test_a_record_of_a_folder_answers_only_for_its_own_content(folder, tmp_path):
    preflight.check_job(_cfg(folder, tmp_path))
    model_facts.keep_facts()
    model_facts.forget_facts()
    (folder / "tokenizer_config.json").write_text(
        (folder / "tokenizer_config.json").read_text() + "\n")  # same meaning, new bytes
    preflight.check_job(_cfg(folder, tmp_path))
    model_facts.keep_facts()
    assert len(list((tmp_path / "cache" / "checks").glob("*.json"))) == 2


def test_the_checks_of_a_recorded_folder_import_no_torch(folder, tmp_path):
    """In a fresh process, the checks of a folder its record answers import neither
    torch nor transformers (what lets a full-reuse rerun do without them)."""
    preflight.check_job(_cfg(folder, tmp_path))
    model_facts.keep_facts()
    probe = (
        "import sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from compose_config import compose\n"
        "from ih_sweep.pipeline.preflight import check_job\n"
        f"check_job(compose('model.path={folder}', 'paths.cache_dir={tmp_path / 'cache'}',"
        " 'n_heads=4', 'condition=high'))\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
