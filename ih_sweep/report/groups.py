"""Which jobs of a sweep may be compared: groups of jobs with the same settings but for
which heads are ablated (the unablated job joins every group with its evaluation settings),
each with its title and one job per cell ``(n_heads, condition, control_seed)``; and the
families of groups that differ only in how heads are ablated (the robustness table)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from ih_sweep.config.schema import FV_KEYS
from ih_sweep.pipeline.records import EvaluationRecord
from ih_sweep.report.discover import FinishedJob

GROUP_KEYS = ["model", "quantization", "data", "babi_task", "split", "metric", "scope",
              "ablation", "rank_by"]
SELECTION = ("n_heads", "condition", "control_seed", "job")  # which heads: not a group's
# how condition=random draws (job.json settings hold it for control.match=layer_norm only):
# not an arm of its own but the null the arm's high and low rows are tested against, so
# the draws of each match form a group with the arm's other jobs (:func:`group_jobs`)
CONTROL = ("control",)
ARM = ("scoring", "ablation")  # how heads are chosen and ablated: absent for `none`
# named in a group's title whenever its jobs have them, also in a sweep of one group: an
# exclusion arm (Yin & Steinhardt's) must not read as plain top-N by rank_by
TITLE_ALWAYS = ("scoring.exclude_by", "scoring.exclude_share")
# dotted settings the base title (group_title) already names under GROUP_KEYS
_FV = {f"scoring.{key}" for key in FV_KEYS}
_IN_BASE_TITLE = {"model.name", "quantization.name", "data.name", "data.task", "data.split",
                  "eval.metric", "eval.scope", "ablation.method", "scoring.rank_by"}
_ABLATION_KEY = re.compile(r", ablation(\.[\w.]+)?=[^,]*")


def as_float(value: Any) -> float:
    """A recorded number as float; nan where it is missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def unablated(record: EvaluationRecord) -> bool:
    """Whether the job ablates nothing (condition ``none`` or N = 0)."""
    return record.condition == "none" or record.n_heads == 0


def share(job: FinishedJob) -> float:
    """The share of all heads the job was asked for (percent; ``n_heads=10%``: 10.0), nan
    where it was asked a count, ablates nothing, or was recorded before shares existed."""
    r = job.record
    return math.nan if unablated(r) else as_float(getattr(r, "n_heads_share", None))


def group_of(job: FinishedJob) -> dict[str, Any]:
    """The job's values of :data:`GROUP_KEYS` (summary.csv's columns of the same names)."""
    r = job.record
    generated = r.data.get("name") == "babi_generated"
    return {"model": r.model, "quantization": r.quantization, "data": r.data.get("name"),
            "babi_task": r.data.get("task"),
            "split": "generated" if generated else r.data.get("split"),
            "metric": r.eval["metric"], "scope": r.eval["scope"], "ablation": r.ablation,
            "rank_by": r.rank_by}


def group_title(group: dict[str, Any]) -> str:
    """``key=value`` for every setting of :data:`GROUP_KEYS` a group shares."""
    return ", ".join(f"{k}={group[k]}" for k in GROUP_KEYS)


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_of(record: EvaluationRecord) -> dict[str, Any]:
    """The job's settings (its semantic config, job.json ``settings``); for records without
    them (older jobs) what the record says of the model, data, evaluation and ablation."""
    if record.settings:
        return record.settings
    return {"model": {"name": record.model}, "quantization": {"name": record.quantization},
            "data": record.data, "eval": record.eval,
            "ablation": {"method": record.ablation}, "scoring": {"rank_by": record.rank_by}}


def settings_key(record: EvaluationRecord, keys: tuple[str, ...]) -> str:
    """The job's settings (:func:`settings_of`) except the top-level ``keys``, as a
    comparable string (sorted JSON)."""
    return json.dumps({k: v for k, v in settings_of(record).items() if k not in keys},
                      sort_keys=True, default=str)


def control_match(record: EvaluationRecord) -> str | None:
    """How a ``random`` job drew its heads: ``control.match`` (``layer`` where its settings
    do not say, as before the setting existed); None for any other condition."""
    if record.condition != "random":
        return None
    control = settings_of(record).get("control")
    match = control.get("match") if isinstance(control, dict) else None
    return str(match or "layer")


def control_title(match: str | None, record: EvaluationRecord) -> str:
    """What a group's title adds for its random draws' matching: nothing for the layer
    match, ``control.match=layer_norm (factor F)`` for the norm match."""
    if match in (None, "layer"):
        return ""
    control = settings_of(record).get("control") or {}
    factor = control.get("norm_factor")
    return f", control.match={match}" + (f" (norm_factor={factor:g})"
                                          if isinstance(factor, (int, float)) else "")


def group_jobs(jobs: list[FinishedJob]) -> tuple[list[list[FinishedJob]], list[str]]:
    """Jobs that may be compared: same settings but for which heads are ablated. The
    unablated job joins every group with its evaluation settings, and an arm's ablated jobs
    that draw nothing (``high``, ``low``) join each of its random nulls: an arm with random
    draws of two matches (``control.match=layer`` and ``layer_norm``) makes two groups, each
    testing the same high and low jobs against its own null. Returns (groups, the dotted
    settings that differ between groups, ``control`` left out: the title names it)."""
    by_eval: dict[str, dict[str | None, list[FinishedJob]]] = {}
    for job in jobs:
        arm = None if unablated(job.record) else settings_key(job.record, SELECTION + CONTROL)
        arms = by_eval.setdefault(settings_key(job.record, SELECTION + ARM + CONTROL), {})
        arms.setdefault(arm, []).append(job)
    groups = []
    for arms in by_eval.values():
        none = arms.pop(None, [])
        for ablated in arms.values() or [[]]:
            nulls: dict[str, list[FinishedJob]] = {}
            for job in ablated:
                match = control_match(job.record)
                if match is not None:
                    nulls.setdefault(match, []).append(job)
            fixed = [j for j in ablated if control_match(j.record) is None]
            groups += [none + fixed + draws for draws in nulls.values()] if nulls \
                else [none + fixed]
    return groups, differing_settings(groups) if len(groups) > 1 else []


def differing_settings(groups: list[list[FinishedJob]]) -> list[str]:
    """The dotted settings whose values differ between groups (a setting absent from some
    groups differs from the value it has in others), but the FV settings
    (``schema.FV_KEYS``): they differ only where two groups computing FV scores set them
    apart; an arm that computes none has none, and ``rank_by``/``exclude_by`` name FV."""
    flats = [flat({k: v for k, v in settings_of(g[-1].record).items()
                   if k not in SELECTION + CONTROL}) for g in groups]
    keys = sorted(set().union(*flats))
    return [k for k in keys if len({str(f.get(k)) for f in flats if k in f or k not in _FV}) > 1]


@dataclass
class Group:
    """One group of comparable jobs (:func:`group_jobs`): its title and one job per cell
    ``(n_heads, condition, control_seed)`` (``none`` is the cell ``(0, "none", 0)``)."""

    name: str
    cells: dict[tuple[int, str, int], FinishedJob]

    def control(self, n: int, condition: str) -> list[FinishedJob]:
        """The jobs of ``condition`` at ``n`` (every random draw)."""
        return [j for (nn, c, _), j in self.cells.items() if nn == n and c == condition]


def cell_groups(jobs: list[FinishedJob]) -> tuple[list[Group], list[str]]:
    """The groups of :func:`group_jobs`, each with its title and one job per cell, and
    notes on what was merged: jobs with the same cell (e.g. ``none`` at every N, or
    non-random conditions crossed with control seeds) evaluate the same thing: one row."""
    notes = []
    groups, differing = group_jobs(jobs)
    if differing:
        notes.append("Jobs differ in " + ", ".join(differing) + "; each group is "
                     "summarized on its own and never pooled.")
    out = []
    for gjobs in groups:
        gjobs = sorted(gjobs, key=lambda j: (j.record.n_heads, j.record.condition,
                                             j.record.control_seed))
        base = group_of(gjobs[-1])
        settings = flat(settings_of(gjobs[-1].record))
        # a setting the group's jobs do not have (resample's ablation.seed) names nothing
        named = [k for k in differing if k not in _IN_BASE_TITLE] + \
            [k for k in TITLE_ALWAYS if k not in differing]
        gname = group_title(base) + "".join(f", {k}={settings.get(k)}" for k in named
                                            if k not in base and k in settings)
        draws = [j for j in gjobs if control_match(j.record) is not None]
        if draws:
            gname += control_title(control_match(draws[0].record), draws[0].record)
        by_cell: dict[tuple[int, str, int], FinishedJob] = {}
        merged: dict[tuple[int, str, int], list[FinishedJob]] = {}
        for j in gjobs:
            r = j.record
            if unablated(r):
                cell = (0, "none", 0)
            else:
                cell = (r.n_heads, r.condition, r.control_seed if r.condition == "random" else 0)
            if cell in by_cell:
                merged.setdefault(cell, [by_cell[cell]]).append(j)
            else:
                by_cell[cell] = j
        for (n, cond, seed), same in merged.items():
            folders = ", ".join(str(j.path.name) for j in same)
            what = "the unablated model (no head is ablated at any N)" if cond == "none" \
                else f"{cond} N={n}" + (" (the control seed only draws random heads)"
                                        if cond != "random" else f" seed {seed}")
            notes.append(f"{len(same)} jobs evaluate {what}: one row ({folders}).")
        if {c for _, c, _ in by_cell} == {"random"}:
            notes.append(f"{gname}: only random draws, so nothing is compared: add "
                         "condition=none (the unablated model) and condition=high (the "
                         "induction heads) to the sweep to test the random draws against.")
        out.append(Group(gname, by_cell))
    return out, notes


def ablation_families(groups: list[Group]) -> list[tuple[str, list[tuple[str, Group]]]]:
    """Groups that differ only in their ablation settings, as (family title, [(ablation
    label, group)]) for families of at least two groups. The title is the groups' title
    without its ``ablation...=`` settings; the label is the method, with the other ablation
    settings in which the family's groups differ (``mean (n_reference=128)``)."""
    found: dict[str, list[tuple[dict, Group]]] = {}
    for g in groups:
        ablated = [j for (_, c, _), j in g.cells.items() if c != "none"]
        if not ablated:
            continue
        record = ablated[0].record
        ablation = flat(settings_of(record).get("ablation") or {"method": record.ablation})
        ablation.setdefault("method", record.ablation)
        matches = {control_match(j.record) for (_, c, _), j in g.cells.items() if c == "random"}
        key = settings_key(record, SELECTION + ("ablation",) + CONTROL) + str(sorted(matches))
        found.setdefault(key, []).append((ablation, g))
    out = []
    for members in found.values():
        if len(members) < 2:
            continue
        keys = sorted(set().union(*(a for a, _ in members)) - {"method"})
        # settings that differ where set (resample's seed is absent from other methods')
        differ = [k for k in keys if len({str(a[k]) for a, _ in members if k in a}) > 1]
        labelled = []
        for ablation, g in members:
            extra = ", ".join(f"{k}={ablation[k]}" for k in differ if k in ablation)
            labelled.append((str(ablation["method"]) + (f" ({extra})" if extra else ""), g))
        out.append((_ABLATION_KEY.sub("", members[0][1].name), labelled))
    return out
