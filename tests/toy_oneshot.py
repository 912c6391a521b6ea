"""A worked example of a new one-shot pruning method in one file: Wanda's score with the mean absolute activation in
place of the L2 norm, ``|W_ij| * mean_t |X_tj|``. Copied to ``src/layerchop/prune/oneshot/act-l1.py`` (a method's
file is named as the method) and named in
``prune.methods`` (``methods: [wanda, sparsegpt, act-l1]``), it is a method of ``layerchop prune --method``, and
``dvc repro`` runs ``prune@act-l1-2of4``, ``oneshot_evaluate@act-l1-2of4`` and gives it rows in Figure 1 and Table 2
(``tests/test_oneshot_methods.py`` runs exactly that; docs/bring-your-own.md)."""

from __future__ import annotations

import torch
import torch.nn as nn

from layerchop.prune.solvers import OneShot
from layerchop.prune.sparsity import Pattern, select_mask


class ActivationL1(OneShot):
    """Importance ``|W_ij| * mean |X_j|`` over the calibration tokens, compared within each output row (N:M: within
    each group of M inputs)."""

    name, label = "act-l1", "Activation-L1"

    def __init__(self, layer: nn.Linear):
        super().__init__(layer)
        self.abs_sum_I = torch.zeros(layer.in_features, dtype=torch.float64, device=layer.weight.device)
        self.num_tokens = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x_NI = inp.reshape(-1, inp.shape[-1]).double()
        self.abs_sum_I += x_NI.abs().sum(0)
        self.num_tokens += x_NI.shape[0]

    @torch.no_grad()
    def prune(self, pattern: Pattern) -> torch.Tensor:
        W = self.layer.weight
        score = W.abs().float() * (self.abs_sum_I / max(self.num_tokens, 1)).float().unsqueeze(0)
        mask = select_mask(score, pattern)
        W[mask] = 0
        return mask

    def free(self) -> None:
        self.abs_sum_I = None
