"""One-shot pruning methods as pieces: magnitude, Wanda, SparseGPT, and any :class:`OneShot` added in a file.

Each method is a :class:`OneShot` subclass: one instance per linear of a decoder layer, and the same protocol, so
one calibration driver (:func:`layerchop.prune.calibrate.prune_model`) runs them all:

* ``add_batch(inp, out)`` — called by a forward hook with the linear's input ``[..., in]`` and output;
* ``prune(pattern) -> mask`` — writes the pruned (and, for SparseGPT, reconstructed) weight in place and
  returns the bool mask (True = pruned);
* ``free()`` — drops the statistics.

The class also says what the pipeline asks of a method: its ``name`` (``layerchop prune --method``, the list
``prune.methods`` the pipeline runs over, the directory ``data/models/<name>-<pattern>``), its ``label`` (the rows
of Figure 1 and Table 2) and the ``prune`` keys it reads (``settings``).

Adding a method: one file in ``src/layerchop/prune/oneshot/`` defining a :class:`OneShot` subclass (found there by
:func:`registry`, no import to add), and its name in ``prune.methods``. ``tests/toy_oneshot.py`` is a worked example
(docs/bring-your-own.md).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn

from layerchop.prune.sparsity import Pattern, select_mask


class OneShot:
    """A one-shot pruning method: built on one linear, fed its calibration inputs, then asked for a mask."""

    name: ClassVar[str] = ""
    """``--method`` / ``prune.methods`` value, and the first part of the output directory's name."""
    label: ClassVar[str] = ""
    """Its name in tables and figures (``<label> 2:4``)."""
    settings: ClassVar[tuple[str, ...]] = ()
    """The ``prune`` section keys it takes as keyword arguments (recorded in the output's ``layerchop.json``)."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        """Accumulate statistics of one batch of the layer's inputs (default: none)."""

    def prune(self, pattern: Pattern) -> torch.Tensor:
        """Zero the pruned weights in place and return the mask (True = pruned)."""
        raise NotImplementedError

    def free(self) -> None:
        """Drop the statistics (default: none)."""


def smallest_over_matrix(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """The references' unstructured rule: one threshold over the whole ``score`` tensor, the value at sorted
    index ``int(numel * ratio)``, and every score ``<=`` it pruned (so one more than ``int(numel * ratio)``,
    plus ties, exactly as ``prune_magnitude`` in locuslab/wanda and ``fasterprune`` in IST-DASLab/sparsegpt).
    """
    if ratio <= 0:
        return torch.zeros_like(score, dtype=torch.bool)  # (the references would still prune the smallest one)
    flat = score.flatten()
    thresh = torch.sort(flat)[0][min(int(flat.numel() * ratio), flat.numel() - 1)]
    return score <= thresh


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


SOLVERS: dict[str, type[OneShot]] = {c.name: c for c in (Magnitude, Wanda, SparseGPT)}
"""The built-in methods; :func:`registry` adds those of ``layerchop.prune.oneshot``."""

PLUGINS = "layerchop.prune.oneshot"


def registry() -> dict[str, type[OneShot]]:
    """Every one-shot method by name: :data:`SOLVERS` and each :class:`OneShot` subclass defined in a module of
    the package ``layerchop.prune.oneshot`` (one file a method)."""
    from layerchop.plugins import with_package

    found = with_package(SOLVERS, PLUGINS, OneShot, "one-shot method")
    unlabelled = [c.__qualname__ for c in found.values() if not c.label]
    if unlabelled:
        raise ValueError(f"one-shot methods {unlabelled} need a label (their rows in Figure 1 and Table 2)")
    return found


def solver(name: str, key: str = "--method") -> type[OneShot]:
    """The one-shot method called ``name`` (``key``: where the name was given, for the error)."""
    methods = registry()
    if name not in methods:
        raise ValueError(f"{key} {name!r} is not a one-shot method: choose one of {sorted(methods)} (or add one: "
                         "a OneShot subclass in src/layerchop/prune/oneshot/, docs/bring-your-own.md)")
    return methods[name]


ONESHOT_EVAL = "oneshot"
"""The folder of the evaluations' root that holds one evaluation per one-shot run (dvc.yaml's ``oneshot_evaluate``)."""


def oneshot_rows(prune_cfg, listed: dict[str, str]) -> dict[str, str]:
    """The rows of a table with one row per run of ``prune.methods`` × ``prune.patterns``: ``listed`` (evaluation
    directory -> label, in order), then each run not among them as ``oneshot/<method>-<pattern>`` -> ``<label> N:M``."""
    from layerchop.prune.sparsity import Pattern

    methods = registry()
    rows = dict(listed)
    for name in prune_cfg.methods:
        for spec in prune_cfg.patterns:
            rows.setdefault(f"{ONESHOT_EVAL}/{name}-{spec}", f"{methods[name].label} {Pattern.parse(spec)}")
    return rows
