"""Every kind of bad input a user gives ends as a user's mistake, never as a traceback and
never silently: Hydra refuses it while composing (a wrong type, an unknown enum value), or
the tool raises a ``UserError`` whose one-line message names the key or file. In-process
(compose + ``launch.run``), with real files; the CLI's exit status 2 for both is tested in
test_launch.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from compose_config import run_job
from hydra.errors import HydraException

from ih_sweep.config.errors import UserError
from ih_sweep.model.loading import ASSET_DIR

HYDRA = "hydra"  # refused by Hydra while composing

# (overrides, expected: HYDRA or a fragment of the one-line message)
CONFIG_CASES = [
    (["condition=best"], HYDRA), (["condition=HIGH"], HYDRA),
    (["n_heads=abc"], "n_heads='abc' is not allowed; allowed: an integer >= 0 (heads), or a "
                      "share of all the model's heads P% with 0 < P <= 100, e.g. 1%, 0.5%"),
    (["n_heads=0%"], "n_heads='0%' is not allowed"), (["n_heads=150%"], "n_heads='150%'"),
    (["n_heads=-5%"], "n_heads='-5%' is not allowed"), (["n_heads=5 %"], "n_heads='5 %'"),
    (["n_heads=1.5"], HYDRA), (["n_heads=true"], HYDRA),
    (["n_heads=-2"], "n_heads=-2 is not allowed"),
    (["n_heads=65"], "n_heads=65 is larger than the model's 64 heads"),
    (["control_seed=abc"], HYDRA), (["condition=random", "control_seed=-1"],
                                    "control_seed=-1 is not allowed"),
    (["job=train"], HYDRA), (["job="], HYDRA), (["device=quantum"], "device='quantum'"),
    (["device=cuda"], "device=cuda: torch sees 0 CUDA device(s)"),
    (["device=cuda:1"], "device=cuda:1: torch sees"), (["device=mps"], "device=mps"),
    (["summarize=maybe"], HYDRA), (["paths.cache_dir="], "paths.cache_dir='' is not allowed"),
    (["+foo=bar"], "foo='bar' is not a config key"), (["+n_head=4"], "n_head=4 is not a"),
    (["model=foo"], HYDRA), (["model.path="], "model.path='' is not allowed"),
    (["model.dtype=float8"], HYDRA), (["model.attn_implementation=magic"], HYDRA),
    (["model.trust_remote_code=maybe"], HYDRA), (["+model.foo=1"], "model.foo=1 is not"),
    (["model=hub"], "model.path is missing"),
    (["quantization=int4"], HYDRA), (["quantization.name=fp4"], HYDRA),
    (["quantization=nf4", "quantization.compute_dtype=int8"], HYDRA),
    (["+quantization.bits=4"], "quantization.bits=4 is not a config key"),
    (["data=foo"], HYDRA), (["data.name=files"], HYDRA), (["data.task=0"], "data.task=0"),
    (["data.task=2"], "data.task=2 is not allowed; allowed with data=babi_generated: 1"),
    (["data.task=abc"], HYDRA), (["data.n_stories=0"], "data.n_stories=0 is not allowed"),
    (["data.n_stories=-5"], "data.n_stories=-5"),
    (["data.n_stories=100000000"], "data.n_stories=100000000 is not allowed; allowed: 1 to"),
    (["data.seed=x"], HYDRA), (["data=babi_files", "data.lang=fr"], "data.lang='fr'"),
    (["data=babi_files", "data.split=dev"], HYDRA),
    (["data=babi_files", "data.task=21"], "data.task=21 is not allowed; allowed: 1 to 20"),
    (["+data.foo=1"], "data.foo=1 is not a config key"),
    (["eval.metric=fuzzy"], HYDRA), (["eval.scope=first"], HYDRA),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens=0 is not allowed"),
    (["eval.max_new_tokens=x"], HYDRA), (["eval.batch_size=0"], "eval.batch_size=0"),
    (["eval.batch_size=-1"], "eval.batch_size=-1"), (["eval.cpu_workers=0"], "cpu_workers=0"),
    (["eval.batch_size=many"],
     "eval.batch_size='many' is not allowed; allowed: auto, or an integer >= 1"),
    (["eval.batch_size=Auto"], "eval.batch_size='Auto' is not allowed"),
    (["eval.batch_size=1.5"], HYDRA), (["eval.batch_size=true"], HYDRA),
    (["eval.batch_size=null"], HYDRA),
    (["eval.cpu_workers=many"], "eval.cpu_workers='many' is not allowed"),
    (["eval.cpu_workers=1.5"], HYDRA), (["eval.progress=maybe"], HYDRA),
    (["eval.checkpoint_items=0"], "eval.checkpoint_items=0 is not allowed"),
    (["eval.checkpoint_items=-1"], "eval.checkpoint_items=-1"),
    (["eval.checkpoint_items=abc"], HYDRA), (["eval.fast_layers=perhaps"], HYDRA),
    (["eval.layer_store_mb=-5"], "eval.layer_store_mb=-5 is not allowed"),
    (["eval.layer_store_mb=1.5"], HYDRA),
    (["+eval.max_new_token=1"], "eval.max_new_token=1 is not a config key"),
    (["scoring.source=web"], HYDRA), (["scoring.rank_by=best"], HYDRA),
    (["scoring.source=file"], "scoring.file=None is not allowed"),
    (["scoring.source=file", "scoring.file=/nonexistent.csv"], "no such score file"),
    (["scoring.seed=abc"], HYDRA), (["scoring.n_sequences=0"], "scoring.n_sequences=0"),
    (["scoring.seq_len=0"], "scoring.seq_len=0"), (["scoring.repeats=1"], "scoring.repeats=1"),
    (["scoring.batch_size=0"], "scoring.batch_size=0"),
    (["scoring.batch_size=big"],
     "scoring.batch_size='big' is not allowed; allowed: auto, or an integer >= 1"),
    (["scoring.batch_size=2.5"], HYDRA),
    (["scoring.exclude_frequent_frac=2.0"], "scoring.exclude_frequent_frac=2.0"),
    (["scoring.exclude_rare_frac=-1"], "scoring.exclude_rare_frac=-1"),
    (["scoring.exclude_frequent_frac=0.6", "scoring.exclude_rare_frac=0.6"],
     "exclude_frequent_frac + exclude_rare_frac < 1"),
    (["scoring.seq_len=100000"], "scoring.seq_len=100000: a repeated sequence of"),
    (["ablation=drop"], HYDRA), (["ablation.method=shuffle"], "ablation.method='shuffle' is "
                                 "not allowed; allowed: zero, mean, position_mean, resample, "
                                 "knockout"),
    (["ablation.n_reference=0"], "ablation.n_reference=0"),
    (["scan.layers=[-1]"], "scan.layers[]=-1"), (["scan.layers=abc"], HYDRA),
    (["job=scan", "scan.layers=[7]"], "scan.layers=[7]: the model has 2 layers"),
    (["scan.n_stories=0"], "scan.n_stories=0"), (["scan.heads_per_pass=0"], "heads_per_pass"),
    (["scan.heads_per_pass=all"],
     "scan.heads_per_pass='all' is not allowed; allowed: auto, or an integer >= 1"),
    (["scan.repeat_sequences=0"], "scan.repeat_sequences=0"),
    (["train.schedule=linear"], HYDRA), (["train.task_steps=-5"], "train.task_steps=-5"),
    (["train.warmup_steps=-1"], "train.warmup_steps=-1"),
    (["train.warmup_steps=0", "train.task_steps=0"], "warmup_steps + task_steps >= 1"),
    (["train.repeat_len=[5,2]"], "train.repeat_len=[5, 2] is not allowed"),
    (["train.repeat_len=[5]"], "train.repeat_len=[5] is not allowed"),
    (["train.layers=0"], "train.layers=0"), (["train.lr=fast"], HYDRA),
    (["debug=slow"], HYDRA), (["experiment=foo"], HYDRA), (["hydra/launcher=foo"], HYDRA),
    (["~model"], "model is missing; choose one"), (["model.device_map=banana"],
                                                   "model.device_map='banana' is not allowed"),
    (["model.name="], "model.name='' is not allowed"), (["scan.layers=[]"], "scan.layers=[]"),
    (["train.lr=-0.1"], "train.lr=-0.1 is not allowed"),
    (["train.heads=30"], "train.kv_heads=8 is not allowed; allowed: a divisor of"),
    (["train.rope_theta=-1"], "train.rope_theta=-1.0 is not allowed"),
    (["train.warmup_active_heads=100"], "train.warmup_active_heads=100 is not allowed"),
    (["train.repeat_share=1.5"], "train.repeat_share=1.5 is not allowed"),
    (["train.decay_frac=2"], "train.decay_frac=2.0 is not allowed"),
    (["train.out_dir="], "train.out_dir='' is not allowed"),
    (["job=train_tiny", f"train.out_dir={Path(__file__)}"], "is a file; give a new folder"),
    (["job=train_tiny", f"train.out_dir={Path(__file__).parent}"],
     "is a folder with other files in it"),
    (["data.n_stories=null"], "data.n_stories=None is not allowed; allowed with data=babi_gen"),
    (["data.lang=fr"], "data.lang='fr' is not allowed; it applies to data=babi_files"),
    (["data.path=/tmp"], "data.path='/tmp' is not allowed; it applies to data=babi_files"),
    (["data.split=test"], "data.split"),
    (["scoring.file=/tmp/x.csv"], "scoring.file='/tmp/x.csv' is not allowed; it is read with"),
    (["model.revision=main"], "model.revision=main: model.path=builtin:tiny is a local folder"),
    (["job=score", "scoring.exclude_frequent_frac=0.5", "scoring.seq_len=200"],
     "scoring.seq_len=200: a sequence of distinct"),
]


def _outcome(tmp_path: Path, overrides: list[str]) -> str:
    try:
        run_job(tmp_path / "job", "debug=fast", *overrides)
    except HydraException:
        return HYDRA
    except UserError as err:
        message = f"{err.kind} error: {err}"
        assert "\n" not in message, message
        return message
    return "accepted"


@pytest.mark.parametrize("overrides,expected", CONFIG_CASES,
                         ids=[" ".join(o) for o, _ in CONFIG_CASES])
def test_bad_config_values(tmp_path, overrides, expected):
    got = _outcome(tmp_path, overrides)
    assert got == HYDRA if expected == HYDRA else expected in got, got


def _model_folder(tmp_path: Path, keep: tuple[str, ...]) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in keep:
        (folder / name).write_bytes((ASSET_DIR / name).read_bytes())
    return folder


def _files(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Cases that need a real file or folder."""
    babi = tmp_path / "babi" / "en"
    babi.mkdir(parents=True)
    cases: dict[str, tuple[list[str], str]] = {}

    def babi_case(name: str, content: bytes, expected: str) -> None:
        folder = tmp_path / f"babi_{name}" / "en"
        folder.mkdir(parents=True)
        (folder / "qa1_single-supporting-fact_train.txt").write_bytes(content)
        cases[f"babi {name}"] = (["data=babi_files", f"data.path={folder.parent}",
                                  "data.lang=en"], expected)

    babi_case("empty", b"", "no story in it")
    babi_case("binary", bytes(range(256)), "not UTF-8 text")
    babi_case("malformed", b"1 Mary went home.\nMary went home.\n", ":2: expected 'ID text'")
    babi_case("no question", b"1 Mary went home.\n", ":1: the story starting here has no")
    babi_case("starts at 2", b"2 Mary went home.\n", ":1: a story must start at id 1")
    cases["babi empty folder"] = (["data=babi_files", f"data.path={tmp_path / 'babi'}",
                                   "data.lang=en"], "no qa1_single-supporting-fact_train.txt")
    cases["babi no such folder"] = (["data=babi_files", f"data.path={tmp_path / 'nope'}",
                                     "data.lang=en"], "no folder en/ in it")

    def score_case(name: str, suffix: str, content: bytes, expected: str) -> None:
        path = tmp_path / f"scores_{name.replace(' ', '_')}{suffix}"
        path.write_bytes(content)
        cases[f"scores {name}"] = (["scoring.source=file", f"scoring.file={path}"], expected)

    rows = "\n".join(f"{la},{h},{0.1 * h}" for la in range(2) for h in range(32))
    score_case("empty csv", ".csv", b"", "the file is empty")
    score_case("header only", ".csv", b"layer,head,prefix\n", "a header but no rows")
    score_case("all nan", ".csv", b"layer,head,prefix\n0,0,\n", "no finite score")
    score_case("text scores", ".csv", b"layer,head,prefix\n0,0,high\n", "is not a number")
    score_case("duplicate rows", ".csv", f"layer,head,prefix\n{rows}\n0,0,1\n".encode(),
               "appears twice")
    score_case("negative layer", ".csv", b"layer,head,prefix\n-1,0,1\n", "layer=-1")
    score_case("layer 99", ".csv", f"layer,head,prefix\n{rows}\n99,0,1\n".encode(),
               "layers up to 99")
    score_case("head 40", ".csv", b"layer,head,prefix\n0,40,1\n", "heads up to 40")
    score_case("no score column", ".csv", b"layer,head,x\n0,0,1\n", "needs columns")
    score_case("infinite score", ".csv", b"layer,head,prefix\n0,0,inf\n", "an infinite score")
    score_case("empty pickle", ".pkl", b"", "the file is empty")
    score_case("truncated pickle", ".pkl", pickle.dumps({3: np.ones(32)})[:30], "not loaded")
    score_case("wrong structure", ".pkl", pickle.dumps([1, 2]), "expected a non-empty dict")
    score_case("malicious pickle", ".pkl", b"cos\nsystem\n(S'true'\ntR.", "it asks for os.system")
    cases["model path a file"] = (["model=hub", f"model.path={ASSET_DIR / 'config.json'}"],
                                  "is a file")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    cases["model path empty folder"] = (["model=hub", f"model.path={empty}"],
                                        "the folder holds no config.json")
    cases["model path missing"] = (["model=hub", f"model.path={tmp_path / 'x' / 'y'}"],
                                   "no such folder")
    cases["model no weights"] = (["model=hub", "model.path=" + str(_model_folder(
        tmp_path, ("config.json",)))], "the folder does not hold its weights")
    cases["model hub offline"] = (["model=hub", "model.path=nobody/no-such-model-xyz"],
                                  "is not in the local Hugging Face cache and")
    return cases


FILE_CASES = ["babi empty", "babi binary", "babi malformed", "babi no question",
              "babi starts at 2", "babi empty folder", "babi no such folder",
              "scores empty csv", "scores header only", "scores all nan", "scores text scores",
              "scores duplicate rows", "scores negative layer", "scores layer 99",
              "scores head 40", "scores no score column", "scores infinite score",
              "scores empty pickle",
              "scores truncated pickle", "scores wrong structure", "scores malicious pickle",
              "model path a file", "model path empty folder", "model path missing",
              "model no weights", "model hub offline"]


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_files_and_paths(tmp_path, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is never asked from the tests
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    overrides, expected = _files(tmp_path)[case]
    got = _outcome(tmp_path, overrides)
    assert expected in got, got


def census_cases(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """Every case of this module as (name, CLI arguments), for
    scripts/bad_inputs_census.py (which runs each through the real CLI)."""
    return [(" ".join(o), list(o)) for o, _ in CONFIG_CASES] + \
        [(name, overrides) for name, (overrides, _) in _files(tmp_path).items()]
