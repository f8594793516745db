"""``python -m ih_sweep.summarize``: the older name of ``python -m ih_sweep.report`` (the
summary command, :func:`ih_sweep.report.command.main`), kept for scripts that use it."""

from ih_sweep.report.command import main

if __name__ == "__main__":
    raise SystemExit(main())
