"""``python -m ih_sweep.report DIR [DIR ...] [--out OUT]``: :func:`ih_sweep.report.command.main`."""

from ih_sweep.report.command import main

if __name__ == "__main__":
    raise SystemExit(main())
