"""SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with weight reconstruction."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from layerchop.prune.solvers import OneShot, smallest_over_matrix
from layerchop.prune.sparsity import Pattern


class SparseGPT(OneShot):
    """OBS-style pruning with weight reconstruction (Frantar & Alistarh 2023).

    Accumulates the Hessian ``H = 2 X Xᵀ / n`` of the layer inputs; columns are processed left to right
    in blocks; masks are chosen per block from ``w² / [H⁻¹]_jj²`` (unstructured: one threshold over the whole
    block, all rows × ``blocksize`` columns, as the reference ``fasterprune`` does; N:M: per group of M), and
    the error of each pruned column is spread over the not-yet-processed columns through the inverse Hessian.

    Args:
        layer: The linear to prune.
        blocksize: Columns per block (a multiple of M for N:M).
        percdamp: Dampening, as a fraction of the mean Hessian diagonal, added to the diagonal.
    """

    name, label = "sparsegpt", "SparseGPT"
    settings = ("blocksize", "percdamp")

    def __init__(self, layer: nn.Linear, blocksize: int = 128, percdamp: float = 0.01):
        super().__init__(layer)
        self.blocksize, self.percdamp = blocksize, percdamp
        cols = layer.in_features
        self.H = torch.zeros(cols, cols, dtype=torch.float32, device=layer.weight.device)
        self.num_tokens = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x_IN = inp.reshape(-1, inp.shape[-1]).t().float()
        n = x_IN.shape[1]
        # running mean of 2 x xᵀ
        self.H *= self.num_tokens / (self.num_tokens + n)
        self.num_tokens += n
        x_IN = math.sqrt(2 / self.num_tokens) * x_IN
        self.H += x_IN @ x_IN.t()

    @torch.no_grad()
    def prune(self, pattern: Pattern) -> torch.Tensor:
        W_OI = self.layer.weight.data.clone().float()
        out_f, in_f = W_OI.shape
        if pattern.kind == "nm" and self.blocksize % pattern.m:
            raise ValueError(f"SparseGPT blocksize {self.blocksize} is not a multiple of M={pattern.m}")
        H = self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W_OI[:, dead] = 0
        damp = self.percdamp * torch.mean(torch.diag(H))
        H += damp * torch.eye(in_f, device=H.device)
        Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
        Hinv = torch.linalg.cholesky(Hinv, upper=True)  # upper Cholesky factor of H⁻¹

        mask_OI = torch.zeros_like(W_OI, dtype=torch.bool)
        for i1 in range(0, in_f, self.blocksize):
            i2 = min(i1 + self.blocksize, in_f)
            count = i2 - i1
            W1 = W_OI[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d1 = torch.diag(Hinv1)
            if pattern.kind == "unstructured":
                mask1 = smallest_over_matrix(W1 ** 2 / d1.unsqueeze(0) ** 2, pattern.ratio)
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(count):
                w = W1[:, i]
                d = d1[i]
                if pattern.kind == "nm" and i % pattern.m == 0:
                    score = W1[:, i : i + pattern.m] ** 2 / d1[i : i + pattern.m].unsqueeze(0) ** 2
                    idx = torch.topk(score, pattern.n, dim=1, largest=False).indices
                    mask1[:, i : i + pattern.m].scatter_(1, idx, True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err = (w - q) / d
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W_OI[:, i1:i2] = Q1
            mask_OI[:, i1:i2] = mask1
            W_OI[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        W_OI[mask_OI] = 0  # exact zeros
        self.layer.weight.data.copy_(W_OI.to(self.layer.weight.dtype))
        return mask_OI

    def free(self) -> None:
        self.H = None
