"""Hydra's own refusals of a command line (an override it cannot parse, a value the schema's
type refuses, an unknown key or config group option) and output folders that cannot be made
end in ONE line of ours on stderr, ``ih_sweep: config error: ...``, with exit status 2, a
"did you mean" where a name is close, and no run or sweep folder left behind.

The bulk runs the console script's :func:`ih_sweep.cli.cli` in this process (sys.argv and
the working directory patched; Hydra clears its global state after each command); a handful
runs the real CLI (``python -m ih_sweep``) in a subprocess from a temporary folder."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from compose_config import cli as run_cli
from hydra.core.global_hydra import GlobalHydra

from ih_sweep import cli

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "ih_sweep: config error: "
N_HEADS = ("allowed: an integer >= 0 (heads), or a share of all the model's heads P% with "
           "0 < P <= 100, e.g. 1%, 0.5% (no ablation: n_heads=0 or condition=none)")
PARSE = ("; write key=value (n_heads=4), group=option (model=hub), a sweep a,b (n_heads=4,8) "
         "or quote a value with special characters ('stop=[\"a b\"]')")

# (command line, a part of the one line after "ih_sweep: config error: "; "^" at the start:
# the whole line)
CASES = [
    # overrides Hydra cannot parse
    ("=4", "^=4: an override needs a key before '='; write key=value, e.g. n_heads=4"),
    ("=abc", "=abc: an override needs a key before '='"),
    ("+foo", "^+foo: Hydra cannot read this override (no '=' after the key)" + PARSE),
    ("n_heads=4=5", "^n_heads=4=5: Hydra cannot read this override (unexpected '=')" + PARSE),
    ("n_heads==4", "n_heads==4: Hydra cannot read this override (unexpected '=')"),
    (".n_heads=4", ".n_heads=4: Hydra cannot read this override (unexpected '.' at character 1)"),
    ("'a b=1'", "a b=1: Hydra cannot read this override (unexpected ' ' at character 2)"),
    ("n_heads=4,,8", "n_heads=4,,8: Hydra cannot read this override (unexpected ',')"),
    ("hydra.verbose=[1", "hydra.verbose=[1: Hydra cannot read this override (cannot read '[1')"),
    # top-level keys: a value of the wrong type, outside an Enum, an unknown key
    ("n_heads=1.5", f"^n_heads=1.5 is not allowed; {N_HEADS}"),
    ("n_heads=true", f"^n_heads=true is not allowed; {N_HEADS}"),
    ("n_heads=[1,2]", f"^n_heads=[1,2] is not allowed; {N_HEADS}"),
    ("condition=best", "^condition=best is not allowed; allowed: high, low, random, none"),
    ("condition=hihg", "^condition=hihg is not allowed; allowed: high, low, random, none; "
                       "did you mean high?"),
    ("condition=HIGH", "condition=HIGH is not allowed; allowed: high, low, random, none; "
                       "did you mean high?"),
    ("job=train", "^job=train is not allowed; allowed: evaluate, score, scan, train_tiny; "
                  "did you mean train_tiny?"),
    ("job=", "^job= is not allowed; allowed: evaluate, score, scan, train_tiny"),
    ("control_seed=abc", "^control_seed=abc is not allowed; allowed: an integer"),
    ("control_seeds=1.5", "^control_seeds=1.5 is not allowed; allowed: an integer"),
    ("summarize=maybe", "^summarize=maybe is not allowed; allowed: true, false"),
    ("device=[cpu]", "^device=[cpu] is not allowed; allowed: a text"),
    ("foo=1", "foo: not a key of the config; keys of the config: job, n_heads, condition, "),
    ("n_head=4", "^n_head: not a key of the config; did you mean n_heads?"),
    ("+n_heads=3", "^+n_heads: n_heads is already in the config, so it cannot be added; write "
                   "n_heads=<value> to change it"),
    ("~foo", "^~foo: foo is not in the config, so it cannot be deleted"),
    ("~n_head", "^~n_head: n_head is not in the config, so it cannot be deleted; did you mean "
                "n_heads?"),
    ("'n_heads=${foo}'", "^n_heads: Interpolation key 'foo' not found"),
    ("paths.cache=x", "^paths.cache: not a key of paths; did you mean cache_dir?"),
    ("paths.cache_dir=[a]", "^paths.cache_dir=[a] is not allowed; allowed: a text"),
    # model
    ("model=foo", "model=foo: no such option of model; options: hub, mistral-7b, "),
    ("model=tinyy", "model=tinyy: no such option of model; options: hub, "),
    ("model=tinyy", "; did you mean tiny?"),
    ("model.dtype=fp16", "^model.dtype=fp16 is not allowed; allowed: auto, float32, bfloat16, "
                         "float16"),
    ("model.nme=x", "^model.nme: not a key of model; did you mean name?"),
    ("model.trust_remote_code=maybe", "^model.trust_remote_code=maybe is not allowed; allowed: "
                                      "true, false"),
    ("model.attn_implementation=flash", "model.attn_implementation=flash is not allowed; "
                                        "allowed: sdpa, eager, flash_attention_2, "),
    ("model={a:1}", "^model.a: not a key of model; keys of model: name, path, revision, dtype, "
                    "device_map, trust_remote_code, attn_implementation"),
    # quantization
    ("quantization=nf5", "quantization=nf5: no such option of quantization; options: int8, "
                         "nf4, none; did you mean nf4?"),
    ("quantization.name=fp4", "^quantization.name=fp4 is not allowed; allowed: none, nf4, int8; "
                              "did you mean nf4?"),
    ("quantization.double_quant=sometimes", "quantization.double_quant=sometimes is not "
                                            "allowed; allowed: true, false"),
    ("quantization.bits=4", "^quantization.bits: not a key of quantization; keys of "
                            "quantization: name, double_quant, compute_dtype"),
    # data
    ("data=babi", "data=babi: no such option of data; options: babi_files, babi_generated, "
                  "babi_hub; did you mean"),
    ("data.task=one", "^data.task=one is not allowed; allowed: an integer"),
    ("data.n_stories=many", "^data.n_stories=many is not allowed; allowed: an integer, or null"),
    ("data.split=tset", "^data.split=tset is not allowed; allowed: train, valid, test, "
                        "generated; did you mean test?"),
    ("data.seed=1.5", "^data.seed=1.5 is not allowed; allowed: an integer"),
    ("data.pth=x", "^data.pth: not a key of data; did you mean path?"),
    # scoring
    ("scoring=prefixx", "scoring=prefixx: no such option of scoring; options: combined, "),
    ("scoring=prefixx", "; did you mean prefix or prefix_not_fv?"),
    ("scoring.source=web", "^scoring.source=web is not allowed; allowed: compute, file"),
    ("scoring.rank_by=best", "^scoring.rank_by=best is not allowed; allowed: prefix, copying, "
                             "combined, fv"),
    ("scoring.seed=abc", "^scoring.seed=abc is not allowed; allowed: an integer"),
    ("scoring.batch_size=2.5", "^scoring.batch_size=2.5 is not allowed; allowed: auto, or an "
                               "integer"),
    ("scoring.exclude_share=lots", "^scoring.exclude_share=lots is not allowed; allowed: a "
                                   "number"),
    ("scoring.n_sequence=3", "^scoring.n_sequence: not a key of scoring; did you mean "
                             "n_sequences?"),
    # ablation
    ("ablation=drop", "ablation=drop: no such option of ablation; options: knockout, mean, "),
    ("ablation.n_reference=many", "^ablation.n_reference=many is not allowed; allowed: an "
                                  "integer"),
    ("ablation.sed=1", "^ablation.sed: not a key of ablation; did you mean seed?"),
    # eval
    ("eval.max_new_token=1", "^eval.max_new_token: not a key of eval; did you mean "
                             "max_new_tokens?"),
    ("eval.batch_size=1.5", "^eval.batch_size=1.5 is not allowed; allowed: auto, or an "
                            "integer"),
    ("eval.metric=exactt", "^eval.metric=exactt is not allowed; allowed: contains, exact, "
                           "quasi_exact, verbatim, helm_exact, prefix_exact, "
                           "quasi_prefix_exact; did you mean exact or helm_exact?"),
    ("eval.scope=first", "^eval.scope=first is not allowed; allowed: last, all"),
    ("eval.stop=abc", "^eval.stop=abc is not allowed; allowed: a list of texts, e.g. [a, b]"),
    ("eval.progress=maybe", "^eval.progress=maybe is not allowed; allowed: true, false"),
    ("eval=[a]", "eval=a: no such option of eval; options: helm, lm_eval, notebook"),
    ("eval=helmm", "eval=helmm: no such option of eval; options: helm, lm_eval, notebook; "
                   "did you mean helm?"),
    ("eval.foo.bar=1", "eval.foo: not a key of eval; keys of eval: metric, scope, "
                       "max_new_tokens, "),
    # train
    ("train.lr=fast", "^train.lr=fast is not allowed; allowed: a number"),
    ("train.schedule=linear", "train.schedule=linear is not allowed; allowed: cosine, "),
    ("train.repeat_len=[a,b]", "^train.repeat_len=[a,b] is not allowed; allowed: a list of "
                               "integers, e.g. [0, 1]"),
    ("train.layer=2", "^train.layer: not a key of train; did you mean layers?"),
    ("train=big", "train=big: no such option of train; options: tiny"),
    # scan
    ("scan.layers=[a]", "^scan.layers=[a] is not allowed; allowed: a list of integers, e.g. "
                        "[0, 1], or null"),
    ("scan.layers=abc", "scan.layers=abc is not allowed; allowed: a list of integers"),
    ("scan.attribution=maybe", "^scan.attribution=maybe is not allowed; allowed: true, false"),
    ("scan.heads_per_pass=1.5", "^scan.heads_per_pass=1.5 is not allowed; allowed: auto, or an "
                                "integer"),
    ("scan=full", "scan=full: no such option of scan; options: default"),
    # mechanism
    ("mechanism.enabled=maybe", "^mechanism.enabled=maybe is not allowed; allowed: true, "
                                "false"),
    ("mechanism.seq_len=long", "^mechanism.seq_len=long is not allowed; allowed: an integer"),
    ("mechanism.icl_window=wide", "^mechanism.icl_window=wide is not allowed; allowed: an "
                                  "integer, or null"),
    ("mechanism.repeat=2", "^mechanism.repeat: not a key of mechanism; did you mean repeats?"),
    # debug, experiment, hydra
    ("debug=slow", "^debug=slow: no such option of debug; options: fast"),
    ("experiment=foo", "experiment=foo: no such option of experiment; options: "
                       "notebook_replication"),
    ("hydra/launcher=slrum", "hydra/launcher=slrum: no such option of hydra/launcher; "
                             "options: basic, "),
    ("hydra/launcher=slrum", "; did you mean slurm?"),
    ("hydra.job.chdir=maybe", "^hydra.job.chdir=maybe is not allowed; allowed: true, false, "
                              "null"),
    ("hydra.foo=1", "hydra.foo: not a key of hydra; keys of hydra: "),
    ("hydra.job.nam=x", "hydra.job.nam: not a key of hydra.job; did you mean name"),
    ("hydra.run.dir=", "^hydra.run.dir='' is not allowed; allowed: a folder for the run's "
                       "files, e.g. hydra.run.dir=outputs/runs/my_run (an empty one would be "
                       "the working directory itself)"),
    ("-m hydra.sweep.dir=", "^hydra.sweep.dir='' is not allowed; allowed: a folder for the "
                            "sweep's files, e.g. hydra.sweep.dir=outputs/sweeps/my_sweep (an "
                            "empty one would be the working directory itself)"),
    # a bad value in one entry of a sweep
    ("-m n_heads=4,1.5", f"^n_heads=1.5 is not allowed; {N_HEADS}"),
    ("-m condition=high,best", "^condition=best is not allowed; allowed: high, low, random, "
                               "none"),
    ("-m condition=high,hihg", "; did you mean high?"),
    ("-m model=tiny,foo", "model=foo: no such option of model; options: hub, "),
    ("-m eval.max_new_token=1,2", "^eval.max_new_token: not a key of eval; did you mean "
                                  "max_new_tokens?"),
    ("-m 'n_heads=4,${foo}'", "^n_heads: Interpolation key 'foo' not found"),
    ("-m quantization=none,nf4,int9", "quantization=int9: no such option of quantization"),
    # --cfg prints the config without running: the same refusals
    ("--cfg job condition=best", "^condition=best is not allowed; allowed: high, low, random, "
                                 "none"),
    # Hydra's argument parser (its usage, 8 lines, then the error; more than one command
    # flag: a ValueError traceback)
    ("n_heads=4 -m condition=high,low", "^unrecognized arguments: condition=high,low; flags "
                                        "such as -m go before the overrides, e.g. ih-sweep -m "
                                        "n_heads=4,8 condition=high,low"),
    ("--bogus", "^unrecognized arguments: --bogus; allowed: the flags --hydra-help lists"),
    ("--cfg nope", "^argument --cfg/-c: invalid choice: 'nope' (choose from 'job', 'hydra', "
                   "'all')"),
    ("-m --cfg job", "^--multirun and --cfg given together; allowed: one of --run, "
                     "--multirun, --cfg, --info, --shell-completion"),
    # a rule of ours, refused in the job (its run folder made, then removed)
    ("n_heads=abc", f"^n_heads='abc' is not allowed; {N_HEADS}"),
    ("condition=random control_seeds=4 control.draws_per_pass=0",
     "^control.draws_per_pass=0 is not allowed; allowed: an integer >= 1"),
    ("-m condition=random control_seeds=4 control.draws_per_pass=4 ablation=zero,knockout",
     "^control.draws_per_pass=4 is not allowed; allowed with ablation.method=knockout: 1 "
     "(draws share a batch with ablation.method=zero, mean, position_mean: knockout edits "
     "attention) (job ablation=knockout); none of the sweep's 2 jobs ran"),
]


def in_process(args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, list[str]]:
    """The exit status and stderr's lines of the console script run with ``args`` in this
    process from ``cwd``."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["ih_sweep", *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    GlobalHydra.instance().clear()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.cli()
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


def one_refusal(code: int, lines: list[str]) -> str:
    """The refusal's line after the prefix, checking it is one line of ours, exit 2."""
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(PREFIX), lines
    assert "Traceback" not in lines[0] and "HYDRA_FULL_ERROR" not in lines[0]
    return lines[0][len(PREFIX):]


def left_behind(folder: Path) -> list[str]:
    """Everything under ``folder`` (relative paths), sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("command,expected", CASES,
                         ids=[f"{c} ({i})" for i, (c, _) in enumerate(CASES)])
def test_each_refusal_is_one_line_exit_2_and_leaves_no_folder(command, expected, tmp_path,
                                                              monkeypatch, capsys):
    code, lines = in_process(shlex.split(command), tmp_path, monkeypatch, capsys)
    message = one_refusal(code, lines)
    if expected.startswith("^"):
        assert message == expected[1:]
    else:
        assert expected in message
    assert left_behind(tmp_path) == []


# --- output folders ------------------------------------------------------------------


def read_only_folder(tmp_path: Path) -> Path:
    """A folder nobody here can make folders in: a 0o555 folder, or (as root, whom modes do
    not stop) a folder of the read-only /sys; skips where there is neither."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").mkdir()
    except OSError:
        return folder
    (folder / "probe").rmdir()
    sysfs = Path("/sys/kernel")
    try:
        (sysfs / "ih_sweep_probe").mkdir()
    except OSError:
        return sysfs
    (sysfs / "ih_sweep_probe").rmdir()
    pytest.skip("no read-only folder here")


@pytest.mark.parametrize("mode", ["", "-m"])
def test_an_output_folder_on_a_file_is_refused(mode, tmp_path, monkeypatch, capsys):
    file = tmp_path / "taken"
    file.write_text("mine")
    key = "hydra.sweep.dir" if mode else "hydra.run.dir"
    for value in (file, file / "sub"):
        code, lines = in_process([*filter(None, [mode]), f"{key}={value}"], tmp_path,
                                 monkeypatch, capsys)
        assert one_refusal(code, lines) == (
            f"{key}={value}: {file} is a file, not a folder; give a folder (a new one, or one "
            "of your runs)")
    assert file.read_text() == "mine" and left_behind(tmp_path) == ["taken"]


@pytest.mark.parametrize("mode", ["", "-m"])
def test_an_output_folder_in_a_read_only_folder_is_refused(mode, tmp_path, monkeypatch,
                                                           capsys):
    ro = read_only_folder(tmp_path)
    key = "hydra.sweep.dir" if mode else "hydra.run.dir"
    code, lines = in_process([*filter(None, [mode]), f"{key}={ro}/out/run"], tmp_path,
                             monkeypatch, capsys)
    message = one_refusal(code, lines)
    assert message.startswith(f"{key}={ro}/out/run: cannot make the folder {ro}/out: ")
    assert message.endswith(f" in {ro}; give a folder you can write, or run from one")


@pytest.mark.parametrize("mode", ["", "-m"])
def test_a_read_only_working_directory_is_refused(mode, tmp_path, monkeypatch, capsys):
    ro = read_only_folder(tmp_path)
    code, lines = in_process([*filter(None, [mode]), "n_heads=4"], ro, monkeypatch, capsys)
    message = one_refusal(code, lines)
    key = "hydra.sweep.dir=outputs/multirun/" if mode else "hydra.run.dir=outputs/runs/"
    assert message.startswith(key)
    assert ": cannot make the folder outputs: " in message
    assert message.endswith(f" in the working directory {ro.resolve()}; give a folder you can "
                            "write, or run from one")


def test_a_refused_run_keeps_what_was_there_before(tmp_path, monkeypatch, capsys):
    """Only the folders the command made go: outputs/ with a cache stays, a run folder that
    existed (empty, or with a file of the user's) stays with its file."""
    (tmp_path / "outputs" / "cache").mkdir(parents=True)
    (tmp_path / "outputs" / "cache" / "keep.csv").write_text("x")
    one_refusal(*in_process(["n_heads=abc"], tmp_path, monkeypatch, capsys))
    assert left_behind(tmp_path) == ["outputs", "outputs/cache", "outputs/cache/keep.csv"]

    empty = tmp_path / "empty_run"
    empty.mkdir()
    one_refusal(*in_process(["n_heads=abc", f"hydra.run.dir={empty}"], tmp_path, monkeypatch,
                            capsys))
    assert empty.is_dir()

    mine = tmp_path / "my_run"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    one_refusal(*in_process(["n_heads=abc", f"hydra.run.dir={mine}/sub"], tmp_path,
                            monkeypatch, capsys))
    assert (mine / "notes.txt").read_text() == "mine" and not (mine / "sub").exists()


def test_a_sweep_refused_by_its_checks_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """The launcher's check of every job (a rule of ours: n_heads=abc) refuses the sweep
    after Hydra made its folder and wrote multirun.yaml; both go."""
    code, lines = in_process(["-m", "n_heads=4,abc", "debug=fast"], tmp_path, monkeypatch,
                             capsys)
    assert code == 2 and "n_heads='abc' is not allowed" in lines[-1], lines
    assert left_behind(tmp_path) == []


def test_the_readme_quotes_the_real_messages(tmp_path, monkeypatch, capsys):
    """Each ``command``: ``ih_sweep: ...`` pair the README quotes is what that command
    prints (up to a closing "...")."""
    text = (ROOT / "README.md").read_text()
    pairs = re.findall(r"`([^`\n]+)`:\s*`(ih_sweep: [^`]+)`", text)
    assert len(pairs) >= 4, pairs
    for command, quoted in pairs:
        code, lines = in_process(shlex.split(command), tmp_path, monkeypatch, capsys)
        assert code == 2 and len(lines) == 1, (command, lines)
        assert lines[0].startswith(quoted.removesuffix("...").rstrip(" ,.")), (command, lines)
        assert left_behind(tmp_path) == []


# --- the real CLI --------------------------------------------------------------------

REAL = [
    ("eval.max_new_token=1", "eval.max_new_token: not a key of eval; did you mean "
                             "max_new_tokens?"),
    ("=4", "=4: an override needs a key before '='"),
    ("-m condition=high,hihg", "condition=hihg is not allowed; allowed: high, low, random, "
                               "none; did you mean high?"),
    ("-m hydra.sweep.dir=", "hydra.sweep.dir='' is not allowed"),
    ("n_heads=abc", "n_heads='abc' is not allowed"),
]


@pytest.mark.slow
@pytest.mark.parametrize("command,expected", REAL, ids=[c for c, _ in REAL])
def test_the_real_cli_refuses_in_one_line(command, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout, run from elsewhere
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    proc = run_cli(*shlex.split(command), cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines == [PREFIX + lines[0][len(PREFIX):]] and expected in lines[0], lines
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert left_behind(tmp_path) == []


@pytest.mark.slow
def test_hydra_full_error_shows_hydras_full_text(tmp_path, monkeypatch):
    """The same refusal: one line of ours, or with HYDRA_FULL_ERROR=1 Hydra's traceback."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    short = run_cli("eval.max_new_token=1", cwd=tmp_path, check=False)
    assert short.stderr.strip().splitlines() == [
        PREFIX + "eval.max_new_token: not a key of eval; did you mean max_new_tokens?"]
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    proc = run_cli("eval.max_new_token=1", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigCompositionException" in proc.stderr
    assert "Could not override 'eval.max_new_token'" in proc.stderr
    assert PREFIX not in proc.stderr


def census_cases(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """Every command line of this module's refusals as (name, CLI arguments), for
    scripts/bad_inputs_census.py (which runs each through the real CLI)."""
    return [(command, shlex.split(command)) for command, _ in CASES + REAL]
