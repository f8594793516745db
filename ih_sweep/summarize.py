"""``python -m ih_sweep.summarize <sweep dir>``: (re)build a sweep's summary files."""

from __future__ import annotations

import argparse
import logging
import sys

from .summary import SummaryError, summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ih_sweep.summarize",
                                     description="Summarize an ih_sweep multirun folder.")
    parser.add_argument("sweep_dir", help="the multirun folder (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        df = summarize(args.sweep_dir)
    except SummaryError as err:
        print(f"ih_sweep.summarize: {err}", file=sys.stderr)
        return 2
    print(df[["n_heads", "condition", "control_seed", "n_items", "accuracy", "delta_vs_none",
              "p_vs_none"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
