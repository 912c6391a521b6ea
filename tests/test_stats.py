"""Paired tests between arms (``layerchop.report.stats``) against hand computations, and per-item results."""

from __future__ import annotations

import numpy as np
import pytest

from layerchop.report.stats import aligned, aligned_runs, paired_test


def test_one_seed_is_mcnemars_exact_test_on_the_discordant_items():
    # 10 items only a gets right, 2 only b, 88 both or neither: p = 2 * P(X <= 2), X ~ Bin(12, 1/2) = 79/2048
    a = [1] * 10 + [0] * 2 + [1] * 50 + [0] * 38
    b = [0] * 10 + [1] * 2 + [1] * 50 + [0] * 38
    r = paired_test(a, b)
    assert (r.test, r.items, r.seeds, r.a_only, r.b_only) == ("McNemar exact", 100, (1, 1), 10, 2)
    assert r.diff == pytest.approx(8.0) and r.p == pytest.approx(79 / 2048)
    assert r.verdict() == "better" and paired_test(b, a).verdict() == "worse"
    assert r.ci[0] < 8.0 < r.ci[1] and r.ci[0] > 0  # the items, resampled: the difference stays positive
    # the same accuracies with an unpaired view would be 60 vs 52: here only the 12 disagreements count
    assert paired_test([1] * 6 + [0] * 6, [0] * 6 + [1] * 6).verdict() == "a tie"  # 6 vs 6: p = 1


def test_identical_answers_are_a_tie_with_no_difference():
    a = [1, 0, 1, 1, 0]
    r = paired_test(a, a)
    assert r.diff == 0 and r.p == 1.0 and r.ci == (0.0, 0.0) and r.verdict() == "a tie"
    r3 = paired_test([a, a, a], [a, a, a])
    assert r3.test == "paired bootstrap over items and seeds" and r3.p == 1.0 and r3.seeds == (3, 3)


def test_several_seeds_see_a_real_difference_but_not_noise():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, size=(3, 400))
    better = base.copy()
    better[:, :60] = 1  # a is right on 60 more items, in every seed
    worse = base.copy()
    worse[:, :60] = 0
    r = paired_test(better, worse)
    assert r.test == "paired bootstrap over items and seeds" and r.seeds == (3, 3) and r.items == 400
    assert r.diff > 10 and r.p < 0.001 and r.verdict() == "better" and r.ci[0] > 0
    noise = rng.integers(0, 2, size=(3, 400))
    assert paired_test(base, noise).verdict() == "a tie"  # independent coin flips: no finding (p > 0.05)
    # three seeds against one run (a deterministic model): the one run is not repeated as if it were three
    r31 = paired_test(better, worse[:1])
    assert r31.seeds == (3, 1) and r31.verdict() == "better"


def test_seed_to_seed_variance_widens_the_test():
    """Two arms with no true difference whose models vary from seed to seed (each seed right on its own 5 % of extra
    items): averaging seeds and resampling items alone would call the larger mean better; the seed draw keeps it a
    tie. Real seed spread shows in the interval."""
    rng = np.random.default_rng(3)
    n = 1000
    truth = rng.integers(0, 2, size=n)

    def arm(shifts):
        rows = []
        for k in shifts:  # a seed: the shared answers, plus k items flipped to right (its own luck)
            row = truth.copy()
            wrong = np.flatnonzero(row == 0)
            row[rng.choice(wrong, size=k, replace=False)] = 1
            rows.append(row)
        return np.array(rows)

    a, b = arm([10, 60, 20]), arm([40, 5, 30])  # seed means 3.0 and 2.5 points above truth: a tie
    r = paired_test(a, b)
    assert r.verdict() == "a tie" and r.ci[0] < 0 < r.ci[1], r
    # the same two means with no seed spread (every seed alike) is a finding: the spread is what made it a tie
    flat = paired_test(arm([60, 60, 60]), arm([5, 5, 5]))
    assert flat.verdict() == "better"


def test_bad_shapes_and_values_are_refused():
    with pytest.raises(ValueError, match="the same items"):
        paired_test([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="0/1 correctness"):
        paired_test([1, 2], [1, 0])


def test_items_are_paired_by_id_and_text_across_runs():
    row = lambda i, h, acc: {"task": "piqa", "doc_id": i, "doc_hash": h, "target": 0, "pred": 0, "acc": acc,
                             "acc_norm": acc}
    a = [row(0, "x", 1), row(1, "y", 0), row(2, "z", 1)]
    b = [row(2, "z", 0), row(0, "x", 1)]  # another order, one item fewer
    assert aligned(a, b, "piqa", "acc") == ([1, 1], [1, 0])
    with pytest.raises(ValueError, match="item 0: different text"):
        aligned(a, [row(0, "other", 1)], "piqa", "acc")
    with pytest.raises(ValueError, match="no hellaswag item"):
        aligned(a, b, "hellaswag", "acc")
    # several runs a side: the items every run scored, one order for all
    A, B = aligned_runs([a, a], [b], "piqa", "acc")
    assert A == [[1, 1], [1, 1]] and B == [[1, 0]]
    with pytest.raises(ValueError, match="item 0: different text"):
        aligned_runs([a], [b, [row(0, "other", 1)]], "piqa", "acc")


def test_the_evaluate_stage_writes_per_item_results_that_read_back(tmp_path):
    from layerchop.evaluate.harness import item_rows, read_items, write_items

    samples = {"piqa": [{"doc_id": 1, "doc_hash": "abcdef0123456789", "target": 1,
                         "filtered_resps": [[-3.0, False], [-1.5, True]], "acc": 1.0, "acc_norm": 0.0},
                        {"doc_id": 0, "doc_hash": "ffff", "target": 0, "filtered_resps": [[-1.0, True], [-2.0, False]],
                         "acc": 1.0}]}
    rows = item_rows(samples)
    assert [r["doc_id"] for r in rows] == [0, 1] and rows[1]["pred"] == 1 and rows[1]["doc_hash"] == "abcdef012345"
    write_items(tmp_path / "items.csv", rows)
    back = read_items(tmp_path / "items.csv")
    assert back[0] == {"task": "piqa", "doc_id": 0, "doc_hash": "ffff", "target": 0, "pred": 0, "acc": 1,
                       "acc_norm": None}
    assert back[1]["acc_norm"] == 0 and back[1]["acc"] == 1
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv: not the per-item results"):
        read_items(tmp_path / "bad.csv")
