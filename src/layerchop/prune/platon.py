"""DimChop's importance and schedule, as pure functions: PLATON scores (Zhang et al. 2022), a dimension's score,
the cubic schedule of the masked fraction, and the columns it masks.

PLATON, per parameter and optimizer step ``t`` (``g_t`` the step's gradient, accumulated over micro-batches,
``theta_t`` the weights it was taken at)::

    I_t    = |theta_t * g_t|                          sensitivity
    Ibar_t = beta1 * Ibar_{t-1} + (1 - beta1) * I_t   its moving average
    U_t    = |I_t - Ibar_t|                           uncertainty
    Ubar_t = beta2 * Ubar_{t-1} + (1 - beta2) * U_t   its moving average
    S_t    = Ibar_t * Ubar_t                          score

with ``Ibar_0 = Ubar_0 = 0``. A *dimension* of a weight ``W [out, in]`` is one of its ``in`` columns; its score is
the L1 norm of that column of ``S``. The lowest-scoring columns are masked (zeroed), the same fraction of columns
in every matrix. (PLATON's reference code lags the moving averages by one step and scores weights after the
optimizer step; here both averages include the current step, at the weights the gradient was taken at.)

Under FSDP2 each rank holds rows of ``W``: :func:`platon_update` runs on the local rows as they are, and a
column's score is the sum of the ranks' partial column sums (one all-reduce of an ``in``-vector per matrix).
"""

from __future__ import annotations

import math

import torch


def platon_update(ibar: torch.Tensor, ubar: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                  beta1: float, beta2: float) -> None:
    """One optimizer step of PLATON's moving averages, in place on ``ibar`` and ``ubar`` (float32, shaped like
    ``weight``; zeros before the first step)."""
    sens = (weight.detach().float() * grad.detach().float()).abs_()
    ibar.mul_(beta1).add_(sens, alpha=1.0 - beta1)
    ubar.mul_(beta2).add_((sens - ibar).abs_(), alpha=1.0 - beta2)


PLATON_UPDATE_FLOPS = 10
"""Elementwise FLOPs of :func:`platon_update` per entry: product, abs; two multiply-adds for ``Ibar`` (scale, scaled
add); difference, abs; two multiply-adds for ``Ubar``."""
PLATON_SCORE_FLOPS = 3
"""Elementwise FLOPs of a mask choice per entry: ``Ibar * Ubar``, abs, the sum into its column (or unit)."""


def platon_flops(entries: int, steps: int, mask_updates: int) -> int:
    """FLOPs of DimChop's scoring over a run: ``PLATON_UPDATE_FLOPS`` per pruned entry every optimizer step, plus
    ``PLATON_SCORE_FLOPS`` per entry at every mask choice (the sort of the column scores is not counted)."""
    return PLATON_UPDATE_FLOPS * entries * steps + PLATON_SCORE_FLOPS * entries * mask_updates


def column_scores(ibar: torch.Tensor, ubar: torch.Tensor) -> torch.Tensor:
    """A dimension's score: the L1 norm of its column of ``S = Ibar * Ubar`` (``[in]``; partial on a row shard)."""
    return (ibar * ubar).abs().sum(dim=0)


def masked_fraction(step: int, target: float, start: int, end: int) -> float:
    """Fraction of every matrix's columns masked after optimizer step ``step``: 0 up to ``start``, then growing
    along PLATON's cubic schedule ``target * (1 - (1 - p)^3)``, ``p = (step - start) / (end - start)``, to
    ``target`` at ``end`` and after."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"masked_fraction: target={target} must be in [0, 1)")
    if not 0 <= start < end:
        raise ValueError(f"masked_fraction: need 0 <= start < end (start={start}, end={end})")
    if step <= start:
        return 0.0
    if step >= end:
        return target
    p = (step - start) / (end - start)
    return target * (1.0 - (1.0 - p) ** 3)


def num_masked(fraction: float, in_features: int) -> int:
    """Columns masked in a matrix of ``in_features`` columns at ``fraction`` (rounded down; exact at the
    embedded target of 0.5, where every width is even)."""
    return int(math.floor(fraction * in_features + 1e-9))


def columns_to_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``[in]``, True for the ``k`` lowest-scoring columns (ties: the lower index goes first)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(scores.float(), stable=True).indices
        mask[order[:k]] = True
    return mask
