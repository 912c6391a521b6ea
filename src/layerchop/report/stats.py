"""Paired tests between two arms evaluated on the same items (``items.csv`` of ``layerchop evaluate``).

Two models answer the same questions, so their difference in accuracy is judged on the items where they disagree,
not on two independent binomial errors (which overstate the error of a difference between correlated answers).
:func:`paired_test` takes each arm's 0/1 correctness per item, for one run or several seeds (rows: seeds, columns:
items, the same items in the same order for every row of both arms):

- one run each: McNemar's exact test (``scipy.stats.binomtest`` on the items where exactly one arm is right), with
  a 95 % bootstrap interval over items (``scipy.stats.bootstrap``, paired);
- several seeds on either side: a two-level paired bootstrap. Each resample draws each arm's seeds with replacement
  (the arms' own seeds, independently: a seed of one arm is not a seed of the other) and the items with replacement
  (the same items for both arms: the pairing), and takes the difference of the two mean accuracies. The interval is
  its 2.5-97.5 percentiles; the two-sided p is twice the share of resamples on the far side of 0. Seed-to-seed
  variance enters through the seed draw, item variance through the item draw. An arm with one run contributes no
  seed variance: exact for a deterministic model (the dense, chopped or one-shot pruned one), an understatement for a
  trained arm run once (:attr:`PairedResult.seeds` says how many runs each side had).

A difference whose p-value is not below ``alpha`` is called a tie.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

ALPHA = 0.05
"""The level below which a paired test's p-value makes a difference a finding; above it, a tie."""


@dataclasses.dataclass(frozen=True)
class PairedResult:
    """``a`` minus ``b`` in accuracy points over ``items`` items, ``seeds`` = (runs of a, runs of b), with its test."""

    diff: float
    ci: tuple[float, float]
    p: float
    test: str
    items: int
    seeds: tuple[int, int]
    a_only: float  # items that only a got right (averaged over every pair of runs)
    b_only: float

    def verdict(self, alpha: float = ALPHA) -> str:
        """``better`` / ``worse`` (a against b) when ``p < alpha``, else ``a tie``."""
        if self.p >= alpha:
            return "a tie"
        return "better" if self.diff > 0 else "worse"

    def design(self) -> str:
        """``"1838 items"``, or ``"1838 items, 3 vs 1 seeds"``."""
        return f"{self.items} items" + ("" if self.seeds == (1, 1) else f", {self.seeds[0]} vs {self.seeds[1]} seeds")

    def text(self) -> str:
        return (f"{self.diff:+.1f} points [{self.ci[0]:+.1f}, {self.ci[1]:+.1f}], {self.test} p = {self.p:.3g} "
                f"({self.design()}): {self.verdict()}")


def _matrix(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(f"{name}: 0/1 correctness per item (one row per seed) expected")
    return arr


def paired_test(a: Sequence, b: Sequence, *, resamples: int = 9999, seed: int = 0) -> PairedResult:
    """Paired test of ``a`` against ``b``: 0/1 correctness per item (a 1-D sequence: one run) or per seed and item
    (rows: seeds; the two arms may have different numbers of seeds), on the same items in the same order.

    Raises:
        ValueError: when the item counts differ or anything but 0/1 is given.
    """
    from scipy import stats

    A, B = _matrix(a, "a"), _matrix(b, "b")
    if A.shape[1] != B.shape[1] or A.shape[1] == 0:
        raise ValueError(f"a {A.shape} and b {B.shape}: the same items (seeds x items), at least one item")
    (sa, items), sb = A.shape, B.shape[0]
    a_only = float(((A[:, None, :] == 1) & (B[None, :, :] == 0)).sum(axis=2).mean())
    b_only = float(((A[:, None, :] == 0) & (B[None, :, :] == 1)).sum(axis=2).mean())
    diff = 100.0 * float(A.mean() - B.mean())
    rng = np.random.default_rng(seed)
    if sa == sb == 1:
        d = A[0] - B[0]
        if np.all(d == d[0]):
            ci = (diff, diff)
        else:
            boot = stats.bootstrap((d,), np.mean, n_resamples=resamples, paired=True, method="percentile",
                                   random_state=rng)
            ci = (100.0 * float(boot.confidence_interval.low), 100.0 * float(boot.confidence_interval.high))
        n = int(a_only + b_only)
        p = 1.0 if n == 0 else float(stats.binomtest(int(a_only), n, 0.5).pvalue)
        return PairedResult(diff, ci, p, "McNemar exact", items, (1, 1), a_only, b_only)
    draws = np.empty(resamples)
    for r in range(resamples):
        idx = rng.integers(items, size=items)
        pa = A[rng.integers(sa, size=sa)][:, idx].mean()
        pb = B[rng.integers(sb, size=sb)][:, idx].mean()
        draws[r] = pa - pb
    if not draws.any() and diff == 0:
        ci, p = (0.0, 0.0), 1.0
    else:
        lo, hi = np.percentile(draws, [2.5, 97.5])
        ci = (100.0 * float(lo), 100.0 * float(hi))
        tail = min(int((draws <= 0).sum()), int((draws >= 0).sum()))
        p = min(1.0, 2.0 * (tail + 1) / (resamples + 1))
    return PairedResult(diff, ci, p, "paired bootstrap over items and seeds", items, (sa, sb), a_only, b_only)


def aligned(a_rows: list[dict], b_rows: list[dict], task: str, metric: str) -> tuple[list[int], list[int]]:
    """Two evaluations' correctness on ``task``'s ``metric`` over the items both scored (``items.csv`` rows of
    :func:`layerchop.evaluate.harness.read_items`), matched by item id and text hash.

    Raises:
        ValueError: when an item id carries different text in the two (not the same items), or none is shared.
    """
    def by_id(rows):
        return {r["doc_id"]: r for r in rows if r["task"] == task and r.get(metric) is not None}

    ra, rb = by_id(a_rows), by_id(b_rows)
    shared = sorted(ra.keys() & rb.keys())
    if not shared:
        raise ValueError(f"no {task} item with {metric} in both evaluations")
    for i in shared:
        if ra[i]["doc_hash"] != rb[i]["doc_hash"]:
            raise ValueError(f"{task} item {i}: different text in the two evaluations (not the same items)")
    return [ra[i][metric] for i in shared], [rb[i][metric] for i in shared]


def aligned_runs(a_runs: list[list[dict]], b_runs: list[list[dict]], task: str,
                 metric: str) -> tuple[list[list[int]], list[list[int]]]:
    """:func:`aligned` for two arms of one run or several (each run's ``items.csv`` rows): every run's correctness
    on ``task``'s ``metric`` over the items all of them scored, in one order (rows: runs), for :func:`paired_test`.

    Raises:
        ValueError: when an item id carries different text in two runs, or no item is shared by all of them.
    """
    runs = [{r["doc_id"]: r for r in rows if r["task"] == task and r.get(metric) is not None}
            for rows in (*a_runs, *b_runs)]
    shared = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    if not shared:
        raise ValueError(f"no {task} item with {metric} in every evaluation")
    for i in shared:
        if len({r[i]["doc_hash"] for r in runs}) > 1:
            raise ValueError(f"{task} item {i}: different text in two evaluations (not the same items)")
    rows = [[r[i][metric] for i in shared] for r in runs]
    return rows[:len(a_runs)], rows[len(a_runs):]
