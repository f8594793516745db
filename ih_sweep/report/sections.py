"""What each table of the summary shows: its columns as (markdown header, LaTeX header,
cell of a row) triples over the rows of summary.csv (or robustness.csv), and the legend
that explains them. The main accuracy table (:data:`DISPLAY`), the sections beside it
(:data:`SECTIONS`: near-tie floor, continuous metrics, mechanism check), the table against
the random null (:data:`NULL`) and the robustness table (:data:`ROBUSTNESS`);
:mod:`ih_sweep.report.render` lays them out as markdown and LaTeX."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ih_sweep.report.cells import (
    EXCLUSION,
    fixed,
    heads_phrase,
    inside,
    interval,
    missing,
    n_text,
    number,
    p_value,
    percent,
    value_ci,
)
from ih_sweep.report.groups import GROUP_KEYS, group_title
from ih_sweep.report.rows import CONTINUOUS, MECHANISM_COLUMNS

Spec = list[tuple[str, str, Callable[[Any], str]]]  # (markdown header, LaTeX header, cell)


def _vs_none(row, text: str) -> str:
    return "" if row.condition == "none" else text  # `none` against itself means nothing


DISPLAY: Spec = [
    ("N", "$N$", lambda r: "" if r.condition == "none" else n_text(r.n_heads,
                                                                     r.n_heads_share)),
    ("condition", "condition", lambda r: r.condition),
    ("control seed", "control seed",
     lambda r: str(r.control_seed) if r.condition == "random" else ""),
    ("items", "items", lambda r: str(r.n_items)),
    ("accuracy %", r"accuracy (\%)", lambda r: percent(r.accuracy)),
    ("95% CI", r"95\% CI", lambda r: interval(r.ci_low, r.ci_high)),
    ("Δ vs none (pts)", r"$\Delta$ vs none (pts)", lambda r: _vs_none(r, percent(r.delta_vs_none))),
    ("95% CI of Δ", r"95\% CI of $\Delta$",
     lambda r: _vs_none(r, interval(r.delta_ci_low, r.delta_ci_high))),
    ("p vs none", "$p$ vs none", lambda r: _vs_none(r, p_value(r.p_vs_none))),
    ("p vs none (Holm)", "$p$ vs none (Holm)", lambda r: p_value(r.p_vs_none_holm)),
    ("Δ vs low (pts)", r"$\Delta$ vs low (pts)", lambda r: percent(r.delta_vs_low)),
    ("p vs low", "$p$ vs low", lambda r: p_value(r.p_vs_low)),
    ("p vs low (Holm)", "$p$ vs low (Holm)", lambda r: p_value(r.p_vs_low_holm)),
    ("random 2.5-97.5% (draws)", r"random 2.5--97.5\% (draws)",
     lambda r: "" if missing(r.n_random) else
     f"{interval(r.random_acc_p2_5, r.random_acc_p97_5)} ({int(r.n_random)})"),
    ("p vs random", "$p$ vs random", lambda r: p_value(r.p_vs_random)),
    ("p vs random (Holm)", "$p$ vs random (Holm)", lambda r: p_value(r.p_vs_random_holm)),
]

LEGEND = [
    "**N**: heads ablated. **condition**: `high` = the top-N heads by score (induction "
    "heads); `low` = for each layer holding k of them, its k lowest-scoring heads (the "
    "notebook's control); `random` = layer-matched random heads outside the top-N, drawn "
    "with **control seed**; `none` = unablated (one row: every N evaluates the same model).",
    "**accuracy %** with its **95% CI**: Wilson score interval.",
    "**Δ vs none**: accuracy minus the unablated accuracy on the same items, in percentage "
    "points; **95% CI of Δ**: paired percentile bootstrap over items (2,000 resamples).",
    "**p vs none**: exact McNemar test of the paired per-item outcomes.",
    "**Δ vs low**, **p vs low** (rows `high`): against the `low` control at the same N "
    "(exact McNemar).",
    "**random 2.5-97.5% (draws)**: the null, the accuracies of the `random` draws at the "
    "same N (in %): their 2.5th and 97.5th percentiles (linear interpolation) and how many "
    "draws K; **p vs random** (every row but `random` and `none`): empirical p of the row's "
    "accuracy within those draws, (1 + #draws at or below it) / (1 + K), one-sided (a "
    "draw at least as extreme is one whose accuracy is at or below the row's; small p: "
    "these heads hurt more than random heads; the smallest p K draws can give is "
    "1 / (K + 1)). Where another row at an N carries a null of 3 or more draws this way, "
    "the draws' own rows are left out of the tables (each is a row of summary.csv).",
]  # then :func:`ih_sweep.report.families.holm_legend`: the Holm families and their sizes


def shown_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of one group's summary a table shows: every row, but the ``random`` draws
    at an N where there are at least 3 and another row carries them as its null
    (``n_random``: the band and p vs random); K = 20 draws at three N would otherwise bury
    the conditions among 60 rows."""
    if not {"n_random", "condition", "n_heads"} <= set(df.columns):
        return df  # not rows of a sweep's summary (e.g. the cross-model table)
    carried = set(df.loc[(df.condition != "random") & (df.n_random >= 3), "n_heads"])
    return df[~((df.condition == "random") & df.n_heads.isin(carried))]


def display(df: pd.DataFrame, spec: Spec, latex: bool = False,
            keep: int | None = None) -> pd.DataFrame:
    """``df``'s shown rows (:func:`shown_rows`) through ``spec``: a table of strings with
    the markdown headers (``latex``: the LaTeX ones); ``keep``: columns after the first
    ``keep`` that are empty in every row are dropped."""
    headers = [(tex if latex else md) for md, tex, _ in spec]
    table = pd.DataFrame([[cell(r) for _, _, cell in spec]
                          for r in shown_rows(df).itertuples()], columns=headers)
    if keep is not None:
        table = table[[c for i, c in enumerate(table.columns)
                       if i < keep or table[c].astype(bool).any()]]
    return table


def display_table(df: pd.DataFrame, latex: bool = False) -> pd.DataFrame:
    """The main table a reader sees (:data:`DISPLAY`), as strings: the unablated job once
    (every N of ``none`` evaluates the same model), empty cells where a number would mean
    nothing."""
    return display(df, DISPLAY, latex)


ROW_KEYS = DISPLAY[:3]  # N, condition, control seed: how every table names its rows

def _floor(flag: Any, low: float, high: float) -> str:
    """The near-tie floor's verdict on a difference: ``no near-ties`` where the range if
    near-ties flip is one point (neither job has a near-tie that could move it, so the
    question does not arise), else inside / outside (:func:`inside`)."""
    if not missing(flag) and not missing(low) and low == high:
        return "no near-ties"
    return inside(flag)


_NEAR_TIES: Spec = [
    *ROW_KEYS,
    ("items", "items", lambda r: str(r.n_items)),
    ("near-ties", "near-ties", lambda r: "" if missing(r.n_near_tie) else str(int(r.n_near_tie))),
    ("accuracy % if near-ties flip", r"accuracy (\%) if near-ties flip",
     lambda r: interval(r.near_tie_acc_low, r.near_tie_acc_high)),
    ("Δ vs none if near-ties flip", r"$\Delta$ vs none if near-ties flip",
     lambda r: _vs_none(r, interval(r.delta_vs_none_nt_low, r.delta_vs_none_nt_high))),
    ("Δ vs none within near-ties", r"$\Delta$ vs none within near-ties",
     lambda r: _vs_none(r, _floor(r.within_near_ties_vs_none, r.delta_vs_none_nt_low,
                                  r.delta_vs_none_nt_high))),
    ("Δ vs low if near-ties flip", r"$\Delta$ vs low if near-ties flip",
     lambda r: interval(r.delta_vs_low_nt_low, r.delta_vs_low_nt_high)),
    ("Δ vs low within near-ties", r"$\Delta$ vs low within near-ties",
     lambda r: _floor(r.within_near_ties_vs_low, r.delta_vs_low_nt_low,
                      r.delta_vs_low_nt_high)),
    ("random draws inside", "random draws inside",
     lambda r: "" if missing(r.random_within_near_ties) or missing(r.n_random) else
     f"{int(r.random_within_near_ties)} of {int(r.n_random)}"),
]

_CONTINUOUS: Spec = [*ROW_KEYS]
for _m, _name, _tex in (("gold_logprob", "gold log-prob", "gold log-prob"),
                        ("logit_diff", "logit diff", "logit diff")):
    _CONTINUOUS.append((f"mean {_name}", f"mean {_tex}",
                        lambda r, m=_m: number(getattr(r, m))))
    for _c in ("none", "low", "random"):
        _CONTINUOUS.append((f"{_name} Δ vs {_c} [95% CI]", rf"{_tex} $\Delta$ vs {_c} [95\% CI]",
                            lambda r, m=_m, c=_c: value_ci(getattr(r, f"{m}_vs_{c}"),
                                                           getattr(r, f"{m}_vs_{c}_ci_low"),
                                                           getattr(r, f"{m}_vs_{c}_ci_high"))))

_MECHANISM: Spec = [
    *ROW_KEYS,
    ("repeat loss (nats)", "repeat loss (nats)", lambda r: fixed(r.repeat_loss)),
    ("repeat loss unablated", "repeat loss unablated",
     lambda r: fixed(r.repeat_loss_unablated)),
    ("ICL score (nats)", "ICL score (nats)", lambda r: fixed(r.icl_score)),
    ("ICL score unablated", "ICL score unablated", lambda r: fixed(r.icl_score_unablated)),
]


def _ratio(value: float) -> str:
    return "" if missing(value) else f"{value:.2f}x"


def _scores(r: Any) -> str:
    if missing(r.score_mean):
        return ""
    return f"{r.score_min:.3g} / {r.score_mean:.3g} / {r.score_max:.3g}"


_HEAD_SETS: Spec = [
    *ROW_KEYS,
    ("output norm", "output norm", lambda r: fixed(r.output_norm_mean)),
    ("score min / mean / max", "score min / mean / max", _scores),
    ("low's norm vs high", "low's norm vs high", lambda r: _ratio(r.low_norm_ratio)),
    ("random draws' norm vs high", "random draws' norm vs high",
     lambda r: _ratio(r.random_norm_ratio)),
    ("distinct random sets", "distinct random sets",
     lambda r: "" if missing(r.n_random_sets) or missing(r.n_random) else
     f"{int(r.n_random_sets)} of {int(r.n_random)}"),
]


def _unstable(r) -> str:
    flag = getattr(r, "rank_unstable", None)
    return "UNSTABLE" if flag is True or flag == "True" else ""


_STABILITY: Spec = [
    *ROW_KEYS,
    ("top-N kept (bootstrap)", "top-$N$ kept (bootstrap)",
     lambda r: "" if missing(r.rank_stability) else
     f"{percent(r.rank_stability)}% over {r.rank_stability_over}"),
    ("top-N kept across fv_seed", "top-$N$ kept across fv\\_seed",
     lambda r: "" if missing(r.rank_stability_seeds) else
     f"{percent(r.rank_stability_seeds)}% ({int(r.n_rank_seeds)} seeds)"),
    ("ranking", "ranking", _unstable),
]


@dataclass
class Section:
    """A table beside the main one, shown for a group only where its jobs recorded what it
    needs (``present``); otherwise one line saying why it is left out."""

    title: str
    spec: Spec
    present: Callable[[pd.DataFrame], bool]
    absent: str  # why the section is left out
    legend: list[str]


SECTIONS = [
    Section("Head sets", _HEAD_SETS, lambda g: g.output_norm_mean.notna().any(),
            "no job.json has `output_norm_mean` (evaluated before output norms were "
            "recorded)",
            ["**output norm**: the ablated heads' mean output norm ||z_h W_O^h|| over the "
             "reference prompts (residual-stream units; heads.csv `output_norm`): how much "
             "the heads write; **score min / mean / max**: their scores under rank_by; "
             "**low's norm vs high** (rows `high`): the `low` control's output norm over the "
             "high heads' at that N, **random draws' norm vs high**: the random draws' mean "
             "over the high heads' (1.00x: a control that writes as much; a control far "
             "below 1 is partly a test of heads that barely write; `control.match=layer_norm` "
             "draws each random head within `control.norm_factor` of the top head it stands "
             "for); **distinct random sets**: how many different head sets the draws are "
             "(a null of few sets is few controls, not a distribution)."]),
    Section("Near-tie floor", _NEAR_TIES, lambda g: g.n_near_tie.notna().any(),
            "no job's results.csv has a `near_tie` column (evaluated before near-ties were "
            "recorded)",
            ["**near-ties**: items decided by a top-1 minus top-2 logit gap small enough "
             "that another numeric precision could flip them (results.csv `near_tie`); "
             "**accuracy % if near-ties flip**: [acc - near-ties correct / n, acc + "
             "near-ties wrong / n].",
             "**Δ vs none / vs low if near-ties flip**: the range of Δ if every near-tie of "
             "either job fell the other way; **within near-ties**: `inside` when that range "
             "reaches 0, so near-ties alone could produce the difference, `outside` when "
             "they could not, `no near-ties` when neither job has a near-tie that could move "
             "it (the range is one point); **random draws inside** (rows "
             "`high`): of the random draws at the same N, those whose difference from "
             "`high` is inside."]),
    Section("Continuous metrics", _CONTINUOUS,
            lambda g: g[CONTINUOUS].notna().any().any(),
            "no job's results.csv has `gold_logprob` or `logit_diff` (evaluated before they "
            "were recorded)",
            ["**gold log-prob**: summed log-probability (nats) of the gold answer's tokens "
             "given the prompt; **logit diff**: the gold answer's first-token logit minus "
             "the best other candidate answer's; **mean** over the job's items.",
             "**Δ vs none / low / random [95% CI]**: mean paired difference (this job minus "
             "the other, items matched by story and question) with its paired percentile "
             "bootstrap interval (2,000 resamples); `low` at the same N; `random`: the "
             "per-item mean of the random draws at the same N."]),
    Section("Mechanism check", _MECHANISM,
            lambda g: g[MECHANISM_COLUMNS].notna().any().any(),
            "no job.json has a `mechanism` record (evaluated before the mechanism check "
            "was run)",
            ["**repeat loss**: mean loss (nats) on the repeated half of seeded repeated "
             "random-token sequences with the job's heads ablated (**repeat loss unablated**: "
             "the same model without ablation); **ICL score**: loss at a late token minus "
             "loss at an early token (Olsson et al. 2022), ablated and **unablated**: on the "
             "stories' own text, or for the bundled tiny model on the tokens it is trained "
             "to predict, the last in-context example's answer minus the first's (job.json's "
             "`mechanism.icl_tokens`). "
             "Induction heads ablated should raise the repeat loss and the ICL score more "
             "than the control."]),
    Section("Ranking stability", _STABILITY,
            lambda g: g[["rank_stability", "rank_stability_seeds"]].notna().any().any(),
            "no job.json has a `rank_stability` record (random or unablated jobs, copying or "
            "combined rankings, a user's score file, or evaluated before it was recorded)",
            ["**top-N kept (bootstrap)** (rows `high` and `low` ranked by prefix or fv): the "
             "mean share of the ablated heads chosen again when the samples the score "
             "averages over (the FV prompts, or the prefix score's random sequences) are "
             "resampled with replacement, 200 seeded resamples (ih_sweep/heads/stability.py); "
             "**top-N kept across fv_seed**: the mean pairwise share of heads in common "
             "between the jobs run with different `scoring.fv_seed` and otherwise alike.",
             "**ranking** `UNSTABLE`: either share below 80% (fewer than 4 in 5 heads come "
             "back): the arm's heads rest on its prompts more than on the heads; its points "
             "are ringed in the accuracy-vs-N figure."]),
]


def section_tables(g: pd.DataFrame, latex: bool = False
                   ) -> list[tuple[Section, pd.DataFrame | None]]:
    """Each section of :data:`SECTIONS` for one group's rows ``g``: its display table, or
    None where it is left out."""
    return [(sec, display(g, sec.spec, latex, keep=len(ROW_KEYS)) if sec.present(g)
             else None) for sec in SECTIONS]


# --------------------------------------------------------------------------- robustness.csv
ROBUSTNESS: Spec = [
    ("N", "$N$", lambda r: n_text(r.n_heads, r.n_heads_share)),
    ("ablation", "ablation", lambda r: r.ablation),
    ("items", "items", lambda r: str(r.n_items)),
    ("high %", r"high (\%)", lambda r: percent(r.accuracy_high)),
    ("low %", r"low (\%)", lambda r: percent(r.accuracy_low)),
    ("none %", r"none (\%)", lambda r: percent(r.accuracy_none)),
    ("Δ high vs none (pts)", r"$\Delta$ high vs none (pts)",
     lambda r: percent(r.delta_high_vs_none)),
    ("95% CI of Δ vs none", r"95\% CI of $\Delta$ vs none",
     lambda r: interval(r.delta_high_vs_none_ci_low, r.delta_high_vs_none_ci_high)),
    ("p vs none", "$p$ vs none", lambda r: p_value(r.p_high_vs_none)),
    ("Δ high vs low (pts)", r"$\Delta$ high vs low (pts)",
     lambda r: percent(r.delta_high_vs_low)),
    ("95% CI of Δ vs low", r"95\% CI of $\Delta$ vs low",
     lambda r: interval(r.delta_high_vs_low_ci_low, r.delta_high_vs_low_ci_high)),
    ("p vs low", "$p$ vs low", lambda r: p_value(r.p_high_vs_low)),
]

ROBUSTNESS_LEGEND = [
    "**Robustness across ablation methods** (robustness.csv): for groups that differ only in "
    "how heads are ablated, per N and **ablation** method (`zero`: the head's output set to "
    "0; `mean`: its mean over the reference prompts; `position_mean`: its mean at the same "
    "absolute position; `resample`: its output on a donor story at the same position; see "
    "ih_sweep/ablation/hooks.py): the accuracy of `high`, `low` (at that N) and `none` in %, "
    "**Δ high vs none** and **Δ high vs low** in points with paired percentile bootstrap "
    "95% CIs (2,000 resamples) and exact McNemar p (not Holm-adjusted). An effect that keeps "
    "its sign and size across methods does not hinge on the ablation choice.",
]


# --------------------------------------------------------------------------- the null
def arm_of_row(row: Any) -> str:
    """The part of a group's title that tells it apart in a table across groups: how its
    heads are chosen (:func:`ih_sweep.report.cells.heads_phrase`) and the settings the base
    title (:func:`ih_sweep.report.groups.group_title`) does not name."""
    extra = str(row.group)[len(group_title({k: getattr(row, k) for k in GROUP_KEYS})):]
    extra = EXCLUSION.sub("", extra).strip(", ")
    return heads_phrase(row) + (f" ({extra})" if extra else "")


NULL: Spec = [
    ("arm", "arm", lambda r: r.arm),
    ("condition", "condition", lambda r: r.condition),
    ("N", "$N$", lambda r: n_text(r.n_heads, r.n_heads_share)),
    ("accuracy % [95% CI]", r"accuracy \% [95\% CI]",
     lambda r: f"{percent(r.accuracy)} {interval(r.ci_low, r.ci_high)}"),
    ("random 2.5-97.5% (draws)", r"random 2.5--97.5\% (draws)",
     lambda r: f"{interval(r.random_acc_p2_5, r.random_acc_p97_5)} ({int(r.n_random)})"),
    ("p vs random", "$p$ vs random", lambda r: p_value(r.p_vs_random)),
    ("p vs random (Holm)", "$p$ vs random (Holm)", lambda r: p_value(r.p_vs_random_holm)),
    ("Δ vs none (pts)", r"$\Delta$ vs none (pts)", lambda r: percent(r.delta_vs_none)),
]

NULL_LEGEND = [
    "**Against the random null**: every row compared with layer-matched random draws at its "
    "N, across the sweep's arms (**arm**: how its `high` heads are chosen, `top-N by "
    "<score>`, with Yin & Steinhardt's exclusion where the arm has one; its `low` rows are "
    "its layer-matched lowest-N control, its random draws layer-matched to its top-N, so "
    "each arm has a null of its own); **random 2.5-97.5% (draws)**, **p vs random** and "
    "**p vs random (Holm)** as in the main table; **Δ vs none**: accuracy minus the "
    "unablated accuracy."]

STRATA_LEGEND = [
    "**Difficulty strata** (strata.csv, strata.png): accuracy % per stratum of the items, "
    "(n) items; `support_distance`: statements back from the question to the most recent "
    "supporting fact (1 = the statement just before; 5+ pooled); `recency_correct`: whether "
    "\"the most recent location of anyone\" answers correctly; `mentions`: times the asked "
    "person is mentioned before the question; `question_position`: the question's index in "
    "its story. Random draws of an N are pooled. strata.csv also has the means of "
    "`gold_logprob` and `logit_diff` per stratum.",
]
