"""How the report shows numbers and names, in one place: accuracies and differences in
percent (points) with one decimal, intervals as ``[low, high]``, p-values with three
significant digits, N as its count with the share of all heads asked for, and how a group's
heads were chosen. Every function returns ``""`` for a missing value (None or nan)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

# the title part of an exclusion arm (Yin & Steinhardt's), as cell_groups writes it
EXCLUSION = re.compile(r"scoring\.exclude_by=(\w+), scoring\.exclude_share=([\d.e-]+)")


def missing(x: Any) -> bool:
    """Whether a value is missing: None or a float nan."""
    return x is None or (isinstance(x, float) and np.isnan(x))


def percent(x: Any) -> str:
    """A share (0-1) in percent with one decimal: ``0.125`` -> ``12.5``."""
    return "" if missing(x) else f"{100 * x:.1f}"


def interval(low: Any, high: Any) -> str:
    """An interval of shares in percent: ``[12.5, 20.0]`` (empty where either is missing)."""
    return "" if missing(low) or missing(high) else f"[{percent(low)}, {percent(high)}]"


def p_value(p: Any) -> str:
    """A p-value with three significant digits."""
    return "" if missing(p) else f"{p:.3g}"


def n_text(n: Any, share: Any = None) -> str:
    """How tables show N: the count, with the share of all heads asked for where the job
    was asked one (``7 (10%)``), else the count alone (``7``)."""
    return f"{int(n)}" + ("" if missing(share) else f" ({float(share):.10g}%)")


def number(x: Any, digits: int = 3) -> str:
    """A continuous value (nats, logits) with ``digits`` significant digits, trailing zeros
    kept (``-3.00 [-3.15, -2.84]``, not ``-3 [-3.15, -2.84]``)."""
    return "" if missing(x) else f"{x:#.{digits}g}"


def fixed(x: Any, decimals: int = 3) -> str:
    """A loss in nats with ``decimals`` decimals (values of one scale, compared by row)."""
    return "" if missing(x) else f"{x:.{decimals}f}"


def draws_text(k: int) -> str:
    """``1 draw``, ``3 draws``."""
    return f"{int(k)} draw" + ("" if int(k) == 1 else "s")


def value_ci(x: Any, low: Any, high: Any) -> str:
    """``value [low, high]`` of a continuous difference, or its value alone (no CI)."""
    if missing(x):
        return ""
    ci = "" if missing(low) or missing(high) else f" [{number(low)}, {number(high)}]"
    return number(x) + ci


def inside(flag: Any) -> str:
    """Whether a difference lies within the near-tie floor: inside / outside."""
    return "" if missing(flag) else ("inside" if bool(flag) else "outside")


def heads_phrase(row: Any) -> str:
    """How a group's ``high`` heads are chosen, for titles and legends: ``top-N by prefix``,
    with Yin & Steinhardt's exclusion where the group has one (``, outside the top 2% by
    fv``). ``row``: a summary row (its ``group`` title and ``rank_by``)."""
    found = EXCLUSION.search(str(getattr(row, "group", "")))
    rank = getattr(row, "rank_by", "")
    outside = f", outside the top {100 * float(found[2]):.3g}% by {found[1]}" if found else ""
    return f"top-N by {rank}{outside}" if isinstance(rank, str) and rank else "top-N"
