"""Comparisons between two evaluated arms, each on one seed or several: the numbers the tables and verdicts state.

An arm's metrics (``metrics.json``) may carry its per-item results under :data:`ITEMS` (``items.csv``) and the
metrics of its seed replicas under :data:`SEEDS` (``arms.seeds``: the same training with ``train --seed k``). An
accuracy or a perplexity of an arm is then the mean over its seeds, and a comparison between two arms is paired over
the items both answered, with every seed of each (:func:`layerchop.report.stats.paired_test`: McNemar's exact test
for one run each, a two-level paired bootstrap over seeds and items otherwise). Without per-item results a comparison
falls back on two independent binomial errors (``|z| >= 2``), which overstates the error of a difference between
correlated answers. A difference that its test does not carry is **a tie**.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Optional

from layerchop.report.tables import ITEMS, mean_accuracy, seed_runs, split_columns, task_columns, with_items

Metrics = dict[str, Any]

PPL_MARGIN = 0.05
"""A perplexity difference counts when one model's is more than this fraction above the other's."""


def accuracy(m: Metrics, group: str, cols: Optional[list[tuple[str, str]]] = None) -> Optional[tuple[float, float]]:
    """``(mean, se)`` in percent of the ``in-domain`` or ``general`` tasks' primary metrics (of ``cols``, default
    ``m``'s own tasks), averaged over the arm's seeds; the error is one run's binomial error (``sqrt(mean se^2)``: the
    seeds answer the same items, so averaging them does not shrink the item error; the seed spread is not in it, which
    is what the paired bootstrap adds); None without them."""
    in_domain, general = split_columns(cols if cols is not None else task_columns([{"metrics": m}]))
    got = [mean_accuracy(r, in_domain if group == "in-domain" else general) for r in seed_runs(m)]
    if any(g is None or g[1] is None for g in got):
        return None
    mean = statistics.fmean(g[0] for g in got)
    se = math.sqrt(statistics.fmean(g[1] ** 2 for g in got))
    return 100 * mean, 100 * se


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b`` on one task group: the difference in points and, where both evaluations have per-item
    results, a paired test over the items (and seeds) (:func:`layerchop.report.stats.paired_test`: a tie unless
    p < 0.05); otherwise its z from two independent binomial errors (a tie when ``|z| < 2``)."""

    group: str
    a: tuple[float, float]
    b: tuple[float, float]
    paired: Optional[Any] = None  # layerchop.report.stats.PairedResult over the group's items

    @property
    def diff(self) -> float:
        return self.a[0] - self.b[0]

    @property
    def z(self) -> float:
        se = math.hypot(self.a[1], self.b[1])
        if se:
            return self.diff / se
        return 0.0 if self.diff == 0 else math.copysign(math.inf, self.diff)

    @property
    def sign(self) -> int:
        """+1 when ``a`` is better beyond noise (the paired test's p < 0.05, or two standard errors unpaired), -1
        when worse, 0 for a tie."""
        if self.paired is not None:
            return {"better": 1, "worse": -1, "a tie": 0}[self.paired.verdict()]
        return 0 if abs(self.z) < 2 else (1 if self.diff > 0 else -1)

    def text(self) -> str:
        word = {1: "better", -1: "worse", 0: "a tie"}[self.sign]
        if self.paired is not None:
            r = self.paired
            return (f"{self.group} {self.a[0]:.1f} vs {self.b[0]:.1f} ({self.diff:+.1f} points, 95 % CI "
                    f"[{r.ci[0]:+.1f}, {r.ci[1]:+.1f}]; paired over {r.design()}, {r.a_only:.0f} vs {r.b_only:.0f} "
                    f"answered by one only{' on average' if r.seeds != (1, 1) else ''}: {r.test} p = {r.p:.2g}: "
                    f"{word})")
        return (f"{self.group} {self.a[0]:.1f} vs {self.b[0]:.1f} ({self.diff:+.1f} points, z = {self.z:.1f}, "
                f"unpaired: {word})")


def compare(a: Metrics, b: Metrics, group: str) -> Optional[Comparison]:
    """``a`` against ``b`` on the tasks of ``group`` that both were evaluated on."""
    cols = [c for c in task_columns([{"metrics": a}, {"metrics": b}])
            if f"eval/{c[0]}/{c[1]}" in a and f"eval/{c[0]}/{c[1]}" in b]
    ga, gb = accuracy(a, group, cols), accuracy(b, group, cols)
    if ga is None or gb is None:
        return None
    return Comparison(group, ga, gb, paired_over(a, b, group, cols))


def paired_over(a: Metrics, b: Metrics, group: str, cols: list[tuple[str, str]]):
    """The paired test of ``a`` against ``b`` over the items of ``group``'s tasks (each on its primary metric),
    pooled, with every seed of each (:func:`layerchop.report.stats.paired_test`); None unless every run has per-item
    results for every one of those tasks."""
    from layerchop.report.stats import aligned_runs, paired_test

    ra, rb = seed_runs(a), seed_runs(b)
    if any(ITEMS not in r for r in (*ra, *rb)):
        return None
    in_domain, general = split_columns(cols)
    A: list[list[int]] = [[] for _ in ra]
    B: list[list[int]] = [[] for _ in rb]
    for task, metric in (in_domain if group == "in-domain" else general):
        try:
            ta, tb = aligned_runs([r[ITEMS] for r in ra], [r[ITEMS] for r in rb], task, metric)
        except ValueError:  # a task without items in one of them: no paired test for the group
            return None
        for row, more in zip(A + B, ta + tb):
            row += more
    return paired_test(A, B) if A[0] else None


def ppl(m: Metrics, where: str) -> float:
    """Validation perplexity, the mean over the arm's seeds."""
    values = []
    for r in seed_runs(m):
        if "val/ppl" not in r:
            raise ValueError(f"{where}: no val/ppl")
        values.append(float(r["val/ppl"]))
    return statistics.fmean(values)


def ppl_sign(a: Metrics, b: Metrics) -> int:
    """+1 when ``b``'s validation perplexity is more than :data:`PPL_MARGIN` above ``a``'s, -1 when ``a``'s is that
    far above ``b``'s, 0 otherwise."""
    pa, pb = ppl(a, "a"), ppl(b, "b")
    if pb > pa * (1 + PPL_MARGIN):
        return 1
    if pa > pb * (1 + PPL_MARGIN):
        return -1
    return 0


def ppl_text(a: Metrics, b: Metrics) -> str:
    word = {1: "lower", -1: "higher", 0: f"within {PPL_MARGIN:.0%}"}[ppl_sign(a, b)]
    seeds = max(len(seed_runs(a)), len(seed_runs(b)))
    return (f"validation perplexity {ppl(a, 'a'):.1f} vs {ppl(b, 'b'):.1f}"
            + (" (means over seeds, " if seeds > 1 else " (") + f"{word})")


def comparisons(a: Metrics, b: Metrics) -> list[Comparison]:
    return [c for c in (compare(a, b, g) for g in ("general", "in-domain")) if c is not None]


def comparison_sentences(rows: list[dict[str, Any]], pairs: list[tuple[str, str, str]]) -> str:
    """The caption's comparisons: for each ``(a, b, what)`` whose rows exist, ``what`` and the difference of each task
    group with its test (:mod:`layerchop.report.compare`: paired over items and seeds where the evaluations wrote
    per-item results; a difference its test does not carry is called a tie)."""
    by_name = {r["name"]: r["metrics"] for r in rows if "name" in r}
    out = []
    for a, b, what in pairs:
        if a in by_name and b in by_name:
            cs = comparisons(by_name[a], by_name[b])
            if cs:
                out.append(f"{what}: " + "; ".join(c.text() for c in cs) + ".")
    return " ".join(out)


def control_sentence(rows: list[dict[str, Any]], base: str = "dense", control: str = "dense_cpt") -> str:
    """What continued pretraining alone does to the dense model, per group of tasks, with its test (empty when the
    table has no such pair of rows)."""
    return comparison_sentences(rows, [(control, base, "Continued pretraining alone (the control against the dense "
                                                       "model)")])


def curve_comparisons(pairs: list[tuple[str, str, str]]) -> str:
    """:func:`comparison_sentences` between runs' final models, each named by its ``curve.json``: the curve's last
    point, with the final model's ``items.csv`` where ``layerchop curve`` wrote one beside it (paired tests; without
    it, the unpaired errors): ``(curve a, curve b, what)``."""
    from pathlib import Path

    from layerchop.io import read_json

    rows = [{"name": path, "metrics": with_items(read_json(path)["points"][-1]["metrics"], Path(path).parent)}
            for path in dict.fromkeys(p for a, b, _ in pairs for p in (a, b))]
    return comparison_sentences(rows, pairs)
