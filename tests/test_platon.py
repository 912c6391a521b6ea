"""DimChop's pure pieces: PLATON scores against a hand computation, the cubic schedule, the columns it masks."""

from __future__ import annotations

import pytest
import torch

from layerchop.prune.platon import column_scores, columns_to_mask, masked_fraction, num_masked, platon_update


def test_platon_scores_equal_a_hand_computation_over_two_steps():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    g1 = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
    g2 = torch.tensor([[1.0, 0.0], [0.5, -2.0]])
    ibar, ubar = torch.zeros(2, 2), torch.zeros(2, 2)
    platon_update(ibar, ubar, w, g1, beta1=0.5, beta2=0.5)
    # I1 = |w g1| = [[.5, 2], [3, 1]]; Ibar1 = I1 / 2; U1 = |I1 - Ibar1|; Ubar1 = U1 / 2
    torch.testing.assert_close(ibar, torch.tensor([[0.25, 1.0], [1.5, 0.5]]))
    torch.testing.assert_close(ubar, torch.tensor([[0.125, 0.5], [0.75, 0.25]]))
    w2 = w * 2  # the weights moved: the sensitivity is taken at the weights of the second gradient
    platon_update(ibar, ubar, w2, g2, beta1=0.5, beta2=0.5)
    # I2 = |w2 g2| = [[2, 0], [3, 2]]; Ibar2 = (Ibar1 + I2) / 2; U2 = |I2 - Ibar2|; Ubar2 = (Ubar1 + U2) / 2
    torch.testing.assert_close(ibar, torch.tensor([[1.125, 0.5], [2.25, 1.25]]))
    torch.testing.assert_close(ubar, torch.tensor([[0.5, 0.5], [0.75, 0.5]]))
    # S = Ibar2 * Ubar2 = [[.5625, .25], [1.6875, .625]]; a column's score is its L1 norm
    torch.testing.assert_close(column_scores(ibar, ubar), torch.tensor([2.25, 0.875]))
    assert columns_to_mask(column_scores(ibar, ubar), 1).tolist() == [False, True]


def test_platon_defaults_match_the_recurrence_and_row_shards_add_up():
    torch.manual_seed(0)
    w = [torch.randn(6, 4) for _ in range(3)]
    g = [torch.randn(6, 4) for _ in range(3)]
    ibar, ubar = torch.zeros(6, 4), torch.zeros(6, 4)
    top, bottom = (torch.zeros(3, 4), torch.zeros(3, 4)), (torch.zeros(3, 4), torch.zeros(3, 4))
    i_ref, u_ref = torch.zeros(6, 4), torch.zeros(6, 4)
    for wt, gt in zip(w, g):
        platon_update(ibar, ubar, wt, gt, 0.85, 0.95)
        platon_update(*top, wt[:3], gt[:3], 0.85, 0.95)  # two row shards, as two FSDP2 ranks hold them
        platon_update(*bottom, wt[3:], gt[3:], 0.85, 0.95)
        sens = (wt * gt).abs()
        i_ref = 0.85 * i_ref + 0.15 * sens
        u_ref = 0.95 * u_ref + 0.05 * (sens - i_ref).abs()
    torch.testing.assert_close(ibar, i_ref)
    torch.testing.assert_close(ubar, u_ref)
    torch.testing.assert_close(column_scores(*top) + column_scores(*bottom), column_scores(ibar, ubar))


@pytest.mark.parametrize("step, expected", [(0, 0.0), (10, 0.0), (12, 0.5 * (1 - 0.8 ** 3)), (15, 0.4375),
                                            (19, 0.5 * (1 - 0.1 ** 3)), (20, 0.5), (30, 0.5)])
def test_masked_fraction_follows_the_cubic_schedule(step, expected):
    assert masked_fraction(step, 0.5, 10, 20) == pytest.approx(expected)


def test_masked_fraction_grows_monotonically_and_refuses_bad_ranges():
    fr = [masked_fraction(s, 0.4, 5, 45) for s in range(60)]
    assert all(b >= a for a, b in zip(fr, fr[1:])) and fr[0] == 0.0 and fr[-1] == 0.4
    # front-loaded: most of the target is reached in the first half of the ramp
    assert masked_fraction(25, 0.4, 5, 45) == pytest.approx(0.4 * 0.875)
    with pytest.raises(ValueError, match="target=1.0"):
        masked_fraction(3, 1.0, 0, 10)
    with pytest.raises(ValueError, match="start=10, end=10"):
        masked_fraction(3, 0.5, 10, 10)


def test_columns_to_mask_takes_the_lowest_scores_and_breaks_ties_by_index():
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0])
    assert columns_to_mask(scores, 0).tolist() == [False] * 5
    assert columns_to_mask(scores, 1).tolist() == [False, True, False, False, False]
    assert columns_to_mask(scores, 3).tolist() == [False, True, True, True, False]
    assert num_masked(0.5, 576) == 288 and num_masked(0.5, 1536) == 768 and num_masked(0.4375, 16) == 7
    assert num_masked(0.0, 576) == 0
