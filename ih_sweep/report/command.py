"""The command ``python -m ih_sweep.report DIR [DIR ...] [--out OUT]``: one sweep's summary
(:func:`ih_sweep.report.summarize.summarize`, files written into the sweep) or, given several,
one cross-model table and figure (:func:`ih_sweep.report.cross_model.compare`, files in
``--out``).

It sits above both modules and is run by ``ih_sweep/report/__main__.py`` (and the alias
``python -m ih_sweep.summarize``); no module of the library is run as a script, so each is
imported once and the classes it catches are those the library raises.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ih_sweep.report import cross_model as cm
from ih_sweep.report.errors import SummaryError, SummaryIncomplete
from ih_sweep.report.render import console_report
from ih_sweep.report.summarize import summarize

PROG = "python -m ih_sweep.report"


def main(argv: list[str] | None = None) -> int:
    """``python -m ih_sweep.report <sweep dir>``: (re)build a sweep's summary files;
    ``python -m ih_sweep.report A B [...] [--out OUT]``: one cross-model table of several
    sweeps (:mod:`ih_sweep.report.cross_model`). Exit status 0; 2 when there is nothing to
    summarize (or the sweeps cannot share a table); 1 when the summary is incomplete (a step
    failed, jobs left out), with one line on stderr saying what."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Summarize an ih_sweep multirun folder (its summary files are written "
                    "into it); given several, write one cross-model table and figure with a "
                    "row group per model (model, quantization, dtype) into --out, leaving "
                    "the sweeps untouched.")
    parser.add_argument("sweep_dir", nargs="+", help="the multirun folder(s) "
                        "(hydra.sweep.dir); several: sweeps of different models or of one "
                        "model in different quantizations or dtypes, one sweep per model")
    parser.add_argument("--out", help="several sweeps only: the folder for cross_model.csv, "
                        ".md, .tex and .png (created; not inside a sweep; default "
                        "outputs/compare/<time> under the working directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if len(args.sweep_dir) > 1:
        return _compare_main(args.sweep_dir, args.out)
    if args.out is not None:
        print("ih_sweep.report: --out is for several sweeps; a single sweep's summary is "
              "written into the sweep folder", file=sys.stderr)
        return 2
    args.sweep_dir = args.sweep_dir[0]
    try:
        df = summarize(args.sweep_dir)
    except SummaryError as err:
        print(f"ih_sweep.report: {err}", file=sys.stderr)
        return 2
    except SummaryIncomplete as err:
        if err.table is not None and not err.table.empty:
            print(console_report(err.table, Path(args.sweep_dir)), flush=True)
        print(f"ih_sweep.report: {err}", file=sys.stderr)
        return 1
    print(console_report(df, Path(args.sweep_dir)))
    return 0


def _compare_main(sweep_dirs: list[str], out: str | None) -> int:
    """main's several-sweeps branch: :func:`ih_sweep.report.cross_model.compare`, the same exit
    statuses as one sweep's summary."""
    out_dir = Path(out) if out is not None else cm.default_out()
    try:
        table = cm.compare(sweep_dirs, out_dir)
    except SummaryError as err:
        print(f"ih_sweep.report: {err}", file=sys.stderr)
        return 2
    except SummaryIncomplete as err:
        if err.table is not None and not err.table.empty:
            print(cm.markdown_table(cm.display_table(err.table)), flush=True)
        print(f"ih_sweep.report: {err}", file=sys.stderr)
        return 1
    print(f"{cm.markdown_table(cm.display_table(table))}\n\nCross-model summary (cross_model.md, "
          f".csv, .tex, .png) in: {out_dir}")
    return 0
