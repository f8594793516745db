"""The model-side mistakes of issue 29 end in one line with exit status 2, decided before any
job runs (``pipeline/preflight.py``: config.json and file headers, never the weights), or, for
attention implementations that cannot run here, fall back to sdpa with one log line. Real
files: the tiny model written to a tmp folder with ``save_pretrained``, then damaged;
unreadable files are tested through the real CLI run as an unprivileged user when the tests
run as root (root reads files whatever their mode)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from compose_config import ROOT, cli, compose, run_job

from ih_sweep.config.errors import UserError
from ih_sweep.config.schema import AttnImplementation, DType, ModelConfig, QuantizationConfig
from ih_sweep.model import loading
from ih_sweep.model.loading import ASSET_DIR, ModelPathError, load_model
from ih_sweep.model.tokens import NoPadToken, pad_id
from ih_sweep.pipeline.preflight import check_job

QUICK = ("data.n_stories=4", "mechanism.enabled=false")
NOBODY = 65534  # the unprivileged user the CLI runs as when the tests run as root


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """The tiny model and its tokenizer, written by save_pretrained into a tmp folder."""
    model, tok = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    folder = tmp_path_factory.mktemp("models") / "good"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def copy_of(good: Path, root: Path, name: str) -> Path:
    folder = root / name
    shutil.copytree(good, folder)
    return folder


def edit_json(file: Path, **changes) -> None:
    """``file``'s JSON with ``changes`` (a value None: the key removed)."""
    content = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    file.write_text(json.dumps(content))


def refusal(*overrides: str) -> str:
    """The one-line message of the UserError that check_job (every check before any job
    runs) raises on ``overrides``."""
    with pytest.raises(UserError) as err:
        check_job(compose(*overrides))
    text = str(err.value)
    assert "\n" not in text
    return text


def hub(folder: Path) -> list[str]:
    return ["model=hub", f"model.path={folder}"]


# ------------------------------------------------------------------ damaged weights files
def test_damaged_safetensors_are_refused_from_the_header(good, tmp_path):
    weights = good / "model.safetensors"
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    trunc = copy_of(good, tmp_path, "trunc")
    (trunc / "model.safetensors").write_bytes(data[:len(data) // 2])
    empty = copy_of(good, tmp_path, "empty")
    (empty / "model.safetensors").write_bytes(b"")
    noise = copy_of(good, tmp_path, "noise")
    (noise / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + bytes(
        range(16)) + b"\xff" * 100)
    huge = copy_of(good, tmp_path, "huge")
    (huge / "model.safetensors").write_bytes(b"\xff" * 4096)
    header = json.loads(data[8:8 + n])
    held = len(data) // 2 - 8 - n
    cut = _first_past(header, held)
    begin, end = header[cut]["data_offsets"]
    assert refusal(*hub(trunc)) == (
        f"{trunc}/model.safetensors: truncated or damaged: tensor {cut} lies at bytes "
        f"{begin}-{end} of the data, but the file holds {held} bytes of data; save or "
        "download the weights again")
    assert refusal(*hub(empty)) == (
        f"{empty}/model.safetensors: not a safetensors file: 0 bytes, fewer than the 8 of its "
        "header length (empty or truncated); save or download the weights again")
    assert refusal(*hub(noise)) == (
        f"{noise}/model.safetensors: not a safetensors file: its header is not a JSON object "
        "(damaged, or not safetensors); save or download the weights again")
    assert refusal(*hub(huge)) == (
        f"{huge}/model.safetensors: not a safetensors file: its first 8 bytes give a header "
        f"of {2**64 - 1} bytes, the file has 4088 after them "
        "(truncated, or not safetensors); save or download the weights again")


def _first_past(header: dict, held: int) -> str:
    """The first tensor (in header order) whose bytes end past ``held``."""
    return next(k for k, v in header.items()
                if k != "__metadata__" and v["data_offsets"][1] > held)


def test_damaged_pytorch_bin_is_refused_and_a_whole_one_loads(good, tmp_path):
    """transformers 5 still loads ``pytorch_model.bin`` (a zip with data.pkl): a whole one
    passes and loads; an empty, random or cut one is refused from its zip directory."""
    model, _ = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                          QuantizationConfig(), "cpu")
    whole = copy_of(good, tmp_path, "bin")
    (whole / "model.safetensors").unlink()
    torch.save(model.state_dict(), whole / "pytorch_model.bin")
    check_job(compose(*hub(whole)))
    loaded, _ = load_model(ModelConfig(name="bin", path=str(whole), dtype=DType.float32),
                           QuantizationConfig(), "cpu")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    data = (whole / "pytorch_model.bin").read_bytes()
    for name, content in (("bin_empty", b""), ("bin_noise", b"PK\x03\x04" + b"\x01" * 500),
                          ("bin_cut", data[:len(data) // 2])):
        folder = copy_of(whole, tmp_path, name)
        (folder / "pytorch_model.bin").write_bytes(content)
        assert refusal(*hub(folder)) == (
            f"{folder}/pytorch_model.bin: not a PyTorch file ({len(content)} bytes; neither a "
            "zip archive nor a pickle: empty, truncated or another format); save or "
            "download the weights again")


# ------------------------------------------------------------ config.json against weights
def test_a_config_that_does_not_fit_the_weights_is_refused(good, tmp_path):
    heads = copy_of(good, tmp_path, "heads8")
    edit_json(heads / "config.json", num_attention_heads=8)
    more = copy_of(good, tmp_path, "layers3")
    edit_json(more / "config.json", num_hidden_layers=3)
    fewer = copy_of(good, tmp_path, "layers1")
    edit_json(fewer / "config.json", num_hidden_layers=1)
    wide = copy_of(good, tmp_path, "mlp")
    edit_json(wide / "config.json", intermediate_size=128)
    assert refusal(*hub(heads)) == (
        f"{heads}/config.json: num_attention_heads=8 does not fit the weights: "
        "model.safetensors holds model.layers.0.self_attn.q_proj.weight of shape [512, 64], "
        "32 heads of head_dim 16 (the config's 8 heads give [128, 64]); set "
        "num_attention_heads=32")
    assert refusal(*hub(more)) == (
        f"{more}/config.json: num_hidden_layers=3, but the weights (model.safetensors) hold 2 "
        "layer(s) (indices 0-1); transformers would fill the missing layers with random "
        "weights; set num_hidden_layers=2 or use the weights it was saved with")
    assert refusal(*hub(fewer)) == (
        f"{fewer}/config.json: num_hidden_layers=1, but the weights (model.safetensors) hold 2 "
        "layer(s) (indices 0-1); the extra layers would be left out; set num_hidden_layers=2 "
        "or use the weights it was saved with")
    assert refusal(*hub(wide)) == (
        f"{wide}/config.json: does not fit the weights: model.safetensors holds "
        "model.layers.0.mlp.gate_proj.weight of shape [256, 64], the config's model has "
        "[128, 64]; use the config.json the weights were saved with")


def test_a_load_missing_weights_is_refused_after_loading_too(good, tmp_path):
    """The second guard (hub models, where no header is read before the job): transformers'
    loading report lists weights it filled at random."""
    more = copy_of(good, tmp_path, "layers3")
    edit_json(more / "config.json", num_hidden_layers=3)
    with pytest.raises(ModelPathError) as err:
        load_model(ModelConfig(name="l3", path=str(more), dtype=DType.float32),
                   QuantizationConfig(), "cpu")
    assert str(err.value).startswith(
        f"model.path={more}: the weights lack 9 tensor(s) the config's model has (e.g. "
        "model.layers.2.")
    assert str(err.value).endswith("which transformers would fill with random values; "
                                   "config.json does not fit the weights")


def test_a_job_on_a_config_with_more_layers_is_refused_not_run(good, tmp_path):
    """Before: the job ran with a random third layer and wrote its results (exit 0)."""
    more = copy_of(good, tmp_path, "layers3")
    edit_json(more / "config.json", num_hidden_layers=3)
    with pytest.raises(UserError, match=r"num_hidden_layers=3, but the weights"):
        run_job(tmp_path / "job", *hub(more), *QUICK)
    assert not (tmp_path / "job" / "results.csv").exists()


# ---------------------------------------------------------------- devices and attention
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device_map", ["cuda", "cuda:1"])
def test_device_map_cuda_without_a_gpu_is_refused(device_map):
    assert refusal(f"model.device_map={device_map}") == (
        f"model.device_map={device_map}: torch sees 0 CUDA device(s) here (torch "
        f"{torch.__version__}); use model.device_map=null with device=cpu or device=auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_flash_attention_without_its_package_falls_back_to_sdpa(tmp_path, caplog):
    """Decided in the checks before the job (one line), and the job's model is loaded with
    sdpa (before: each job raised transformers' ImportError)."""
    from transformers.utils import is_flash_attn_2_available

    assert not is_flash_attn_2_available()
    loading._TOLD_ATTENTION.clear()
    caplog.set_level(logging.INFO, logger="ih_sweep.model.loading")
    run_job(tmp_path / "job", "model.attn_implementation=flash_attention_2", *QUICK)
    line = ("model.attn_implementation=flash_attention_2: the flash_attn package (with a CUDA "
            "GPU) is not available here; using sdpa")
    assert [r.getMessage() for r in caplog.records].count(line) == 1
    assert (tmp_path / "job" / "results.csv").is_file()
    used, _ = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32,
                                     attn_implementation=AttnImplementation.flash_attention_2),
                         QuantizationConfig(), "cpu")  # the job's model, from the cache
    assert used.config._attn_implementation == "sdpa"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_flex_attention_on_cpu_falls_back_to_sdpa_before_any_job(caplog):
    """Before: torch.compile's C++ kernel for flex attention failed to build inside the job
    after about a minute (a 1300-line traceback, exit 1)."""
    loading._TOLD_ATTENTION.clear()
    caplog.set_level(logging.INFO, logger="ih_sweep.model.loading")
    check_job(compose("model.attn_implementation=flex_attention"))
    assert caplog.messages == [
        "model.attn_implementation=flex_attention: it compiles its kernels for CUDA GPUs "
        "(torch.compile), and the model runs on cpu; using sdpa"]


# --------------------------------------------------------------------------- head count
def test_too_many_heads_are_refused_before_any_job_of_a_sweep(tmp_path):
    """The head count comes from config.json in the checks before the sweep's first job:
    the n_heads=4 job never runs."""
    proc = cli("-m", "n_heads=4,65", *QUICK, f"hydra.sweep.dir={tmp_path / 'sweep'}",
               f"paths.cache_dir={tmp_path / 'cache'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "ih_sweep: config error: n_heads=65 is larger than the model's 64 heads (2 x 32) "
        "(job n_heads=65); none of the sweep's 2 jobs ran"]
    assert not list(tmp_path.glob("sweep/*/results.csv"))
    assert refusal("n_heads=65") == "n_heads=65 is larger than the model's 64 heads (2 x 32)"


# ---------------------------------------------------------------------------- tokenizer
def test_a_tokenizer_without_pad_or_eos_uses_the_configs_pad_id(good, tmp_path):
    folder = copy_of(good, tmp_path, "nopad")
    edit_json(folder / "tokenizer_config.json", pad_token=None, eos_token=None)
    model_cfg = ModelConfig(name="nopad", path=str(folder), dtype=DType.float32)
    check_job(compose(*hub(folder)))
    _, tok = load_model(model_cfg, QuantizationConfig(), "cpu")
    assert tok.eos_token_id is None and pad_id(tok) == 0  # config.json's pad_token_id
    run_job(tmp_path / "job", *hub(folder), *QUICK)
    assert (tmp_path / "job" / "results.csv").is_file()


def test_a_tokenizer_without_any_pad_is_refused_naming_its_folder(good, tmp_path):
    folder = copy_of(good, tmp_path, "nopad_none")
    edit_json(folder / "tokenizer_config.json", pad_token=None, eos_token=None)
    edit_json(folder / "config.json", pad_token_id=None, eos_token_id=None)
    edit_json(folder / "generation_config.json", pad_token_id=None, eos_token_id=None)
    assert refusal(*hub(folder)) == (
        f"{folder}: the tokenizer has neither a pad nor an eos token, and the model's "
        "config.json and generation_config.json name no pad_token_id; add pad_token (or "
        "eos_token) to tokenizer_config.json, or pad_token_id to config.json")
    from transformers import AutoTokenizer

    with pytest.raises(NoPadToken, match=r"neither a pad nor an eos token"):
        pad_id(AutoTokenizer.from_pretrained(folder))


# ------------------------------------------------------------------- through the real CLI
AS_ROOT = os.geteuid() == 0
SETPRIV = shutil.which("setpriv")


def cli_as_user(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m ih_sweep ARGS`` in ``cwd``, as the unprivileged user (util-linux's
    setpriv) when this process is root, so that file modes apply; else as this user."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(cwd), "OMP_NUM_THREADS": "2"}
    as_user = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] \
        if AS_ROOT else []
    return subprocess.run([*as_user, sys.executable, "-m", "ih_sweep", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def open_tmp():
    """A folder every user may enter and write (pytest's own tmp folders are root's
    alone when the tests run as root)."""
    folder = Path(tempfile.mkdtemp(prefix="ih_sweep_perm_"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(AS_ROOT and SETPRIV is None, reason="root without setpriv: file modes "
                    "do not apply to root")
@pytest.mark.parametrize("what", ["folder", "weights", "config"])
def test_unreadable_model_files_end_in_one_line(good, open_tmp, what):
    """chmod 000 on the folder, its weights or its config.json: one line naming the path
    "not readable (permission denied)" (before: a PermissionError traceback from the
    fingerprints or from resolving the path)."""
    folder = copy_of(good, open_tmp, "model")
    for entry in [folder, *folder.iterdir()]:
        entry.chmod(0o755 if entry.is_dir() else 0o644)
    target = {"folder": folder, "weights": folder / "model.safetensors",
              "config": folder / "config.json"}[what]
    target.chmod(0)
    try:
        proc = cli_as_user([*hub(folder), *QUICK, f"hydra.run.dir={open_tmp / 'run'}",
                            f"paths.cache_dir={open_tmp / 'cache'}"], open_tmp)
    finally:
        target.chmod(0o755 if target.is_dir() else 0o644)
    hint = "read and execute permission on the folder (chmod a+rx)" if what == "folder" \
        else "read permission on it (chmod a+r)"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"ih_sweep: model error: {target}: not readable (permission denied); give this user "
        f"{hint}"]


@pytest.mark.parametrize("damage", ["truncated", "heads"])
def test_the_cli_refuses_a_damaged_model_in_one_line(good, tmp_path, damage):
    folder = copy_of(good, tmp_path, damage)
    if damage == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:len(data) - 1000])
    else:
        edit_json(folder / "config.json", num_attention_heads=8)
    proc = cli(*hub(folder), *QUICK, f"hydra.run.dir={tmp_path / 'run'}",
               f"paths.cache_dir={tmp_path / 'cache'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    if damage == "truncated":
        n = int.from_bytes(data[:8], "little")
        cut = _first_past(json.loads(data[8:8 + n]), len(data) - 1000 - 8 - n)
        expected = f"ih_sweep: model error: {folder}/model.safetensors: truncated or " \
            f"damaged: tensor {cut} lies at bytes"
    else:
        expected = f"ih_sweep: model error: {folder}/config.json: num_attention_heads=8 " \
            "does not fit the weights"
    assert lines[0].startswith(expected), lines[0]
    assert not (tmp_path / "run" / "results.csv").exists()


def test_the_shipped_model_passes_every_check():
    check_job(compose())
    assert (ASSET_DIR / "model.safetensors").is_file()


def census_cases(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """This module's refusals as (name, CLI arguments), the damaged model folders made from
    the shipped model under ``tmp_path``, for scripts/bad_inputs_census.py (which runs each
    through the real CLI, bound by file permissions when run as root)."""
    cases = []

    def damaged(name: str, damage) -> Path:
        folder = copy_of(ASSET_DIR, tmp_path, name)
        damage(folder)
        cases.append((f"model {name.replace('_', ' ')}", [*hub(folder), *QUICK]))
        return folder

    weights = (ASSET_DIR / "model.safetensors").read_bytes()

    def write(file: str, content: bytes):
        return lambda folder: (folder / file).write_bytes(content)

    def as_bin(content: bytes):
        def damage(folder: Path) -> None:
            (folder / "model.safetensors").unlink()
            (folder / "pytorch_model.bin").write_bytes(content)
        return damage

    damaged("safetensors_truncated", write("model.safetensors", weights[:len(weights) // 2]))
    damaged("safetensors_empty", write("model.safetensors", b""))
    damaged("safetensors_random", write("model.safetensors", b"\x10" + bytes(7) + bytes(
        range(16)) + b"\xff" * 100))
    damaged("safetensors_huge_header", write("model.safetensors", b"\xff" * 4096))
    damaged("bin_empty", as_bin(b""))
    damaged("bin_random", as_bin(b"PK\x03\x04" + b"\x01" * 500))
    for name, change in (("config_8_heads", {"num_attention_heads": 8}),
                         ("config_3_layers", {"num_hidden_layers": 3}),
                         ("config_1_layer", {"num_hidden_layers": 1}),
                         ("config_wider_mlp", {"intermediate_size": 128})):
        damaged(name, lambda folder, change=change: edit_json(folder / "config.json",
                                                              **change))

    def no_pad(folder: Path) -> None:
        edit_json(folder / "tokenizer_config.json", pad_token=None, eos_token=None)
        edit_json(folder / "config.json", pad_token_id=None, eos_token_id=None)
        if (folder / "generation_config.json").is_file():
            edit_json(folder / "generation_config.json", pad_token_id=None, eos_token_id=None)

    damaged("tokenizer_without_pad_or_eos", no_pad)
    damaged("folder_unreadable", lambda folder: folder.chmod(0))
    damaged("weights_unreadable", lambda folder: (folder / "model.safetensors").chmod(0))
    damaged("config_unreadable", lambda folder: (folder / "config.json").chmod(0))
    if not torch.cuda.is_available():
        cases += [(f"model.device_map={d}", [f"model.device_map={d}"]) for d in
                  ("cuda", "cuda:1")]
    cases.append(("sweep n_heads=4,65", ["-m", "n_heads=4,65",
                                         f"hydra.sweep.dir={tmp_path / 'sweep'}"]))
    return cases
