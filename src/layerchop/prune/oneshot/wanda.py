"""Wanda (Sun et al. 2023): pruning by weights and activations."""

from __future__ import annotations

import torch
import torch.nn as nn

from layerchop.prune.solvers import OneShot
from layerchop.prune.sparsity import Pattern, select_mask


def wanda_score(W_OI: torch.Tensor, sq_norm_I: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``|W_ij| * ||X_j||_2`` (Sun et al. 2023), compared within each output row."""
    return W_OI.abs().float() * torch.sqrt(sq_norm_I.float()).unsqueeze(0)


class Wanda(OneShot):
    """Weights and activations: accumulates the squared L2 norm of every input feature."""

    name, label = "wanda", "Wanda"

    def __init__(self, layer: nn.Linear):
        super().__init__(layer)
        self.sq_norm_I = torch.zeros(layer.in_features, dtype=torch.float64, device=layer.weight.device)
        self.num_tokens = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x_NI = inp.reshape(-1, inp.shape[-1]).double()
        self.sq_norm_I += (x_NI * x_NI).sum(0)
        self.num_tokens += x_NI.shape[0]

    @torch.no_grad()
    def prune(self, pattern: Pattern) -> torch.Tensor:
        W = self.layer.weight
        mask = select_mask(wanda_score(W, self.sq_norm_I), pattern)
        W[mask] = 0
        return mask

    def free(self) -> None:
        self.sq_norm_I = None
