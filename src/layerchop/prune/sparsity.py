"""Sparsity patterns and mask selection shared by the one-shot pruning solvers.

A mask is a bool tensor shaped like the weight, ``True`` where the weight is pruned (set to zero).
Scores are "importance": the lowest scores are pruned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: unstructured at ``ratio`` per output row, or N:M along the input dimension.

    ``N:M`` here means N zeros in every group of M consecutive input weights of a row (2:4 and 4:8 are
    both 50 % sparse, as in the Wanda and SparseGPT papers).
    """

    kind: str  # "unstructured" | "nm"
    ratio: float = 0.0
    n: int = 0
    m: int = 0

    @staticmethod
    def parse(spec: str) -> "Pattern":
        """``"unstructured:0.5"``, ``"2:4"``, ``"4:8"``; file-name forms ``unstructured-0.5``, ``2of4``."""
        spec = str(spec)
        if spec.startswith("unstructured"):
            try:
                ratio = float(spec.replace("-", ":", 1).split(":", 1)[1])
            except (IndexError, ValueError):
                raise ValueError(f"prune pattern {spec!r}: write unstructured:<ratio>, e.g. unstructured:0.5") from None
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"prune pattern {spec!r}: the ratio must be in [0, 1)")
            return Pattern("unstructured", ratio=ratio)
        m = re.fullmatch(r"(\d+)(?::|of)(\d+)", spec)
        if not m:
            raise ValueError(f"prune pattern {spec!r}: expected unstructured:<ratio> or N:M (e.g. 2:4)")
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ValueError(f"prune pattern {spec!r}: need 0 < N < M")
        return Pattern("nm", ratio=n / mm, n=n, m=mm)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else f"unstructured:{self.ratio:g}"


def select_mask(score_OI: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Prune the lowest scores: per output row (unstructured) or per group of M inputs (N:M).

    Args:
        score_OI: Importance, ``[out_features, in_features]``.
        pattern: The sparsity pattern.

    Returns:
        Bool mask ``[out, in]``, True = pruned. Unstructured: exactly ``int(ratio * in)`` per row (Wanda's
        reference: the first ``int(in * ratio)`` of each row's sorted scores).
    """
    out_f, in_f = score_OI.shape
    if pattern.kind == "unstructured":
        k = int(pattern.ratio * in_f)
        mask = torch.zeros_like(score_OI, dtype=torch.bool)
        if k > 0:
            idx = torch.topk(score_OI, k, dim=1, largest=False).indices
            mask.scatter_(1, idx, True)
        return mask
    if in_f % pattern.m:
        raise ValueError(f"{pattern}: in_features={in_f} is not a multiple of M={pattern.m}")
    groups = score_OI.reshape(out_f, in_f // pattern.m, pattern.m)
    idx = torch.topk(groups, pattern.n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(out_f, in_f)
