"""Magnitude pruning: the baseline without calibration data."""

from __future__ import annotations

import torch

from layerchop.prune.solvers import OneShot, smallest_over_matrix
from layerchop.prune.sparsity import Pattern, select_mask


class Magnitude(OneShot):
    """Prune the smallest |W|: over the whole matrix for unstructured sparsity (one threshold, as in the Wanda
    repository's magnitude baseline), per group of M for N:M. No calibration statistics."""

    name, label = "magnitude", "Magnitude"

    @torch.no_grad()
    def prune(self, pattern: Pattern) -> torch.Tensor:
        W = self.layer.weight
        score = W.abs().float()
        mask = smallest_over_matrix(score, pattern.ratio) if pattern.kind == "unstructured" else \
            select_mask(score, pattern)
        W[mask] = 0
        return mask
