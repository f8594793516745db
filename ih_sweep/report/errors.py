"""The report's errors: nothing to summarize (a user error) and a summary written in part,
and the one-line form of any error that the summary lists as a failed step."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ih_sweep.config.errors import one_line


class SummaryError(ValueError):
    """Nothing to summarize (not a folder, no jobs): the user gave the wrong folder."""


class SummaryIncomplete(RuntimeError):
    """The summary was written, but some step failed or some jobs are missing from it.
    ``table``: the summary table (None where it could not be made); ``failed``: (step,
    why) for each output not written; ``left_out``: (job folder, why)."""

    def __init__(self, sweep_dir: Path, table: pd.DataFrame | None,
                 failed: list[tuple[str, str]], left_out: list[tuple[str, str]]):
        self.table, self.failed, self.left_out = table, failed, left_out
        parts = [f"{step} failed ({why})" for step, why in failed]
        if left_out:
            parts.append(f"{len(left_out)} job(s) left out ("
                         + "; ".join(f"{f}: {why}" for f, why in left_out) + ")")
        super().__init__(f"the summary in {sweep_dir} is incomplete: " + "; ".join(parts))


def why(err: BaseException) -> str:
    """An error as one line: its type and the first line of its message (at most 300
    characters of it), e.g. ``ValueError: bad value``; the type alone without a message."""
    first = one_line(err, 300)
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
