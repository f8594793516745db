"""Difficulty strata of a bAbI question, read from its story alone, and accuracy per stratum.

Per item (:func:`item_strata`, the results.csv columns of the same names):

- ``support_distance``: how many statements back the latest supporting fact lies (1 = the
  statement just before the question; questions are not statements). bAbI lines carry the
  ids of their supporting facts (the released files and the built-in generator alike); the
  latest one counts. Empty when the question names no supporting fact found in the story.
- ``recency_correct``: whether "the most recent location of anyone", the location the last
  statement before the question moves someone to, is the gold answer: how far the shortcut
  of answering with the last-mentioned place gets. Defined when the question is
  ``Where is <Name>?`` and that statement is a bAbI move (``... moved | went | went back |
  journeyed | travelled to the <place>.``): every task-1 question; also tasks 11-13, whose
  moves name their subject as a pronoun or a pair. Empty otherwise (a question about an
  object, a yes/no question, a last statement that moves nobody).
- ``mentions``: how many times the asked person's name occurs in the statements before the
  question (pronouns not counted). The asked person is the one capitalized word of the
  question after its first word (``Where is Mary?``, ``Is Bill in the office?``,
  ``How many objects is Sandra carrying?``); empty when there is none (``Where is the
  football?``, task 15's lowercase names) or more than one (``What did Fred give to
  Jeff?``).
- ``question_position``: the 0-based index of the question among the story's questions.

Pure functions of the story; :func:`stratum_table` and :func:`plot_strata` aggregate a
results table by stratum.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .data import MOVE_PHRASES, Story
from .records import STRATA_COLUMNS

# a bAbI move ending a statement: "<anyone> <phrase> the <place>." (task 1's five phrases)
_MOVE = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in sorted(MOVE_PHRASES, key=len,
                                                                   reverse=True))
                   + r") the (\w+)\.?$")
_WHERE_PERSON = re.compile(r"^Where is ([A-Z]\w*)\s*\?$")
_WORD = re.compile(r"[A-Za-z]+")
TOP = 5  # integer strata are bucketed 0, 1, ..., TOP - 1, "TOP+"


def _asked_person(question: str) -> str | None:
    names = {w for w in _WORD.findall(question)[1:] if w[0].isupper()}
    return names.pop() if len(names) == 1 else None


def item_strata(story: Story, item: Any) -> dict[str, Any]:
    """The four strata of one question: ``item`` is a :class:`ih_sweep.data.Item` (or
    anything with ``line``, the question's index into the story's lists). Values are int,
    bool or None (empty: not defined for this question, see the module docstring).
    Raises ValueError when ``item.line`` is not a question of ``story``."""
    line = int(item.line)
    if not 0 <= line < len(story["type"]) or story["type"][line] != 1:
        raise ValueError(f"line {line} of the story is not a question")
    statements = [i for i in range(line) if story["type"][i] == 0]
    where = {story["id"][i]: i for i in range(line)}
    support = [where[s] for s in story["supporting_ids"][line] if s in where]
    distance = sum(1 for i in statements if i >= max(support)) if support else None
    question = story["text"][line].strip()
    recency = None
    if _WHERE_PERSON.match(question) and statements:
        move = _MOVE.search(story["text"][statements[-1]].strip())
        if move:
            recency = move.group(1) == story["answer"][line].strip()
    person = _asked_person(question)
    mentions = None if person is None else sum(
        _WORD.findall(story["text"][i]).count(person) for i in statements)
    return {"support_distance": distance, "recency_correct": recency, "mentions": mentions,
            "question_position": sum(1 for i in range(line) if story["type"][i] == 1)}


def strata_frame(stories: Sequence[Story], items: Sequence[Any]) -> pd.DataFrame:
    """:func:`item_strata` of each item (``items[k].story_index`` into ``stories``), one row
    each in :data:`~ih_sweep.records.STRATA_COLUMNS`; empty values are missing (nullable
    integer and boolean columns)."""
    rows = [item_strata(stories[it.story_index], it) for it in items]
    df = pd.DataFrame(rows, columns=STRATA_COLUMNS)
    return df.astype({"support_distance": "Int64", "recency_correct": "boolean",
                      "mentions": "Int64", "question_position": "Int64"})


# --------------------------------------------------------------------------- aggregation
def _as_bool(col: pd.Series) -> pd.Series:
    """True/False from bools or their text (a CSV read with keep_default_na=False); else NA."""
    text = col.astype("string").str.strip().str.lower()
    return text.map({"true": True, "false": False, "1": True, "0": False}).astype("boolean")


def bucket(value: Any, top: int = TOP) -> str | None:
    """An integer stratum's label: ``"0"`` ... ``str(top - 1)``, then ``f"{top}+"``; None
    for a missing value."""
    if value is None or pd.isna(value):
        return None
    return f"{top}+" if int(value) >= top else str(int(value))


def stratum_table(results: pd.DataFrame, by: Sequence[str] = ("condition", "n_heads")
                  ) -> pd.DataFrame:
    """Accuracy per stratum level per group: one row per (stratum, level, *by) with
    ``n_items``, ``n_correct``, ``accuracy`` (0-1) and, when ``results`` has them,
    ``mean_gold_logprob`` and ``mean_logit_diff``. Strata: ``support_distance`` and
    ``mentions`` bucketed 1, 2, 3, 4, 5+ (mentions also 0), ``question_position`` 0 ... 4,
    5+, ``recency_correct`` True / False. Items with an empty stratum are left out of that
    stratum only. ``results``: results.csv rows (bools may be text); ``by``: the grouping
    columns present in it. ``order`` sorts the levels (the bucket's lower end; False = 0)."""
    df = results.copy()
    keys = [k for k in by if k in df.columns]
    df["correct"] = _as_bool(df["correct"])
    extra = [c for c in ("gold_logprob", "logit_diff") if c in df.columns]
    for col in extra:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    frames = []
    for name in STRATA_COLUMNS:
        if name not in df.columns:
            continue
        if name == "recency_correct":
            values = _as_bool(df[name])
            level = values.map({True: "True", False: "False"})
            order = values.map({True: 1, False: 0})
        else:
            values = pd.to_numeric(df[name], errors="coerce")
            level = values.map(bucket)
            order = values.clip(upper=TOP)
        part = df.assign(stratum=name, level=level, order=order).dropna(subset=["level"])
        if part.empty:
            continue
        agg = {"n_items": ("correct", "size"), "n_correct": ("correct", "sum")}
        agg.update({f"mean_{c}": (c, "mean") for c in extra})
        table = part.groupby(["stratum", "level", "order", *keys], dropna=False).agg(**agg)
        frames.append(table.reset_index())
    columns = ["stratum", "level", "order", *keys, "n_items", "n_correct", "accuracy",
               *[f"mean_{c}" for c in extra]]
    if not frames:
        return pd.DataFrame(columns=columns)
    out = pd.concat(frames, ignore_index=True)
    out["n_correct"] = out["n_correct"].astype(int)
    out["accuracy"] = out["n_correct"] / out["n_items"]
    out["order"] = out["order"].astype(int)
    rank = {n: i for i, n in enumerate(STRATA_COLUMNS)}
    out = out.sort_values(["stratum", *keys, "order"], key=lambda s: s.map(rank)
                          if s.name == "stratum" else s, kind="stable")
    return out[columns].reset_index(drop=True)


_COLOURS = {"high": "Reds", "low": "Blues", "random": "Greens", "none": "Greys"}


def _style(groups: list[tuple], keys: list[str]) -> list[dict[str, Any]]:
    """A line style per group: a colour map per condition (darker = more heads), a marker
    per number of heads; other groupings get the default colour cycle."""
    from .figures import pyplot

    plt = pyplot()
    if "condition" not in keys:
        return [{} for _ in groups]
    ci = keys.index("condition")
    ni = keys.index("n_heads") if "n_heads" in keys else None
    styles = []
    for group in groups:
        same = [g for g in groups if g[ci] == group[ci]]
        ns = sorted({g[ni] for g in same}) if ni is not None else [None]
        rank = ns.index(group[ni]) if ni is not None else 0
        cmap = plt.get_cmap(_COLOURS.get(str(group[ci]), "Purples"))
        shade = 0.75 if len(ns) == 1 else 0.45 + 0.5 * rank / (len(ns) - 1)
        styles.append({"color": cmap(shade), "marker": "osD^v"[rank % 5]})
    return styles


def plot_strata(table: pd.DataFrame, path: str | Path, title: str = "",
                by: Sequence[str] = ("condition", "n_heads")) -> Path:
    """One panel per stratum of a :func:`stratum_table` that has more than one level:
    accuracy (%) per level, one line per group of ``by`` (legend; conditions in their own
    colours, darker for more heads), points nudged sideways so equal values stay visible,
    and each level's item count (of the first group) above it."""
    from .figures import pyplot
    from .io_utils import write_figure

    plt = pyplot()
    present = set(table["stratum"]) if len(table) else set()
    names = [n for n in STRATA_COLUMNS if n in present
             and table.loc[table["stratum"] == n, "level"].nunique() > 1]
    if not names:
        raise ValueError("the stratum table is empty (or every stratum has one level): "
                         "nothing to plot")
    keys = [k for k in by if k in table.columns]
    groups = [tuple(g) for g in table[keys].drop_duplicates().itertuples(index=False)] \
        if keys else [()]
    styles = _style(groups, keys)
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names) + 1.2, 3.3),
                             sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        part = table[table["stratum"] == name]
        levels = part.drop_duplicates("level").sort_values("order")["level"].tolist()
        x = {lv: i for i, lv in enumerate(levels)}
        width = 0.3 / max(len(groups) - 1, 1)
        for g, (group, style) in enumerate(zip(groups, styles)):
            rows = part
            for k, v in zip(keys, group):
                rows = rows[rows[k] == v]
            if rows.empty:
                continue
            rows = rows.sort_values("order")
            label = ", ".join(f"N={v}" if k == "n_heads" else str(v)
                              for k, v in zip(keys, group)) or "all"
            xs = [x[lv] - 0.15 + g * width for lv in rows["level"]]
            ax.plot(xs, 100 * rows["accuracy"], label=label, markersize=4, linewidth=1.2,
                    **style)
        counts = part.drop_duplicates("level").set_index("level")["n_items"]
        for lv, i in x.items():
            ax.annotate(f"n={counts[lv]}", (i, 104), ha="center", fontsize=6, color="0.35")
        ax.set_xticks(range(len(levels)), levels)
        ax.set_xlim(-0.5, len(levels) - 0.5)
        ax.set_xlabel(name.replace("_", " "))
        ax.set_ylim(-3, 110)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.92),
               frameon=False, title=" / ".join(keys) or None, title_fontsize=7)
    fig.suptitle(title or "accuracy by difficulty stratum", fontsize=10)
    fig.tight_layout()
    written = write_figure(path, fig)
    plt.close(fig)
    return written
