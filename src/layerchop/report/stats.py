"""Paired tests between two arms evaluated on the same items (``items.csv`` of ``layerchop evaluate``).

Two models answer the same questions, so their difference in accuracy is judged on the items where they disagree,
not on two independent binomial errors (which overstate the error of a difference between correlated answers).
:func:`paired_test` takes each arm's 0/1 correctness per item, for one seed or several (rows: seeds, columns:
items, the same items in the same order):

- one seed: McNemar's exact test (``scipy.stats.binomtest`` on the items where exactly one arm is right);
- several seeds: a paired sign-flip permutation test of the per-item difference averaged over seeds
  (``scipy.stats.permutation_test``, ``permutation_type="samples"``), which treats the items as the random draw and
  the seeds as repeated measurements of each.

Either way the difference gets a 95 % bootstrap interval over items (``scipy.stats.bootstrap``, paired), and a
difference whose p-value is not below ``alpha`` is called a tie.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

ALPHA = 0.05
"""The level below which a paired test's p-value makes a difference a finding; above it, a tie."""


@dataclasses.dataclass(frozen=True)
class PairedResult:
    """``a`` minus ``b`` in accuracy points over ``items`` items and ``seeds`` seeds, with its paired test."""

    diff: float
    ci: tuple[float, float]
    p: float
    test: str
    items: int
    seeds: int
    a_only: int  # items (x seeds) that only a got right
    b_only: int

    def verdict(self, alpha: float = ALPHA) -> str:
        """``better`` / ``worse`` (a against b) when ``p < alpha``, else ``a tie``."""
        if self.p >= alpha:
            return "a tie"
        return "better" if self.diff > 0 else "worse"

    def text(self) -> str:
        return (f"{self.diff:+.1f} points [{self.ci[0]:+.1f}, {self.ci[1]:+.1f}], {self.test} p = {self.p:.3g} "
                f"({self.items} items x {self.seeds} seed{'s' if self.seeds > 1 else ''}): {self.verdict()}")


def _matrix(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(f"{name}: 0/1 correctness per item (one row per seed) expected")
    return arr


def paired_test(a: Sequence, b: Sequence, *, resamples: int = 9999, seed: int = 0) -> PairedResult:
    """Paired test of ``a`` against ``b``: 0/1 correctness per item (a 1-D sequence) or per seed and item (rows:
    seeds), on the same items in the same order.

    Raises:
        ValueError: when the shapes differ or hold anything but 0/1.
    """
    from scipy import stats

    A, B = _matrix(a, "a"), _matrix(b, "b")
    if A.shape != B.shape or A.shape[1] == 0:
        raise ValueError(f"a {A.shape} and b {B.shape}: the same seeds x items, at least one item")
    seeds, items = A.shape
    d = (A - B).mean(axis=0)  # per item, averaged over seeds
    a_only, b_only = int(((A == 1) & (B == 0)).sum()), int(((A == 0) & (B == 1)).sum())
    diff = 100.0 * float(d.mean())
    rng = np.random.default_rng(seed)
    if np.all(d == d[0]):
        ci = (diff, diff)
    else:
        boot = stats.bootstrap((d,), np.mean, n_resamples=resamples, paired=True, method="percentile",
                               random_state=rng)
        ci = (100.0 * float(boot.confidence_interval.low), 100.0 * float(boot.confidence_interval.high))
    if seeds == 1:
        n = a_only + b_only
        p = 1.0 if n == 0 else float(stats.binomtest(a_only, n, 0.5).pvalue)
        test = "McNemar exact"
    elif not d.any():
        p, test = 1.0, "paired permutation"
    else:
        res = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=resamples,
                                     alternative="two-sided", random_state=rng)
        p, test = float(res.pvalue), "paired permutation"
    return PairedResult(diff, ci, p, test, items, seeds, a_only, b_only)


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


def stacked(per_seed: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray]:
    """Seeds' aligned pairs (:func:`aligned`, one per seed, the same items) as the ``a`` and ``b`` of
    :func:`paired_test`."""
    lengths = {len(a) for a, _ in per_seed}
    if len(lengths) != 1:
        raise ValueError(f"the seeds scored different numbers of items: {sorted(lengths)}")
    return np.array([a for a, _ in per_seed]), np.array([b for _, b in per_seed])
