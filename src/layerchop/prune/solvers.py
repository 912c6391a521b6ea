"""One-shot pruning methods as pieces: the :class:`OneShot` protocol and the registry of the methods, one file
each in ``src/layerchop/prune/oneshot/`` (magnitude, Wanda, SparseGPT, and any added there).

Each method is a :class:`OneShot` subclass: one instance per linear of a decoder layer, and the same protocol, so
one calibration driver (:func:`layerchop.prune.calibrate.prune_model`) runs them all:

* ``add_batch(inp, out)`` — called by a forward hook with the linear's input ``[..., in]`` and output;
* ``prune(pattern) -> mask`` — writes the pruned (and, for SparseGPT, reconstructed) weight in place and
  returns the bool mask (True = pruned);
* ``free()`` — drops the statistics.

The class also says what the pipeline asks of a method: its ``name`` (``layerchop prune --method``, the list
``prune.methods`` the pipeline runs over, the directory ``data/models/<name>-<pattern>``), its ``label`` (the rows
of Figure 1 and Table 2) and the ``prune`` keys it reads (``settings``).

Adding a method: one file in ``src/layerchop/prune/oneshot/``, named as the method, defining a :class:`OneShot`
subclass (found there by :func:`registry`, no import to add), and its name in ``prune.methods``. ``tests/toy_oneshot.py`` is a worked example
(docs/bring-your-own.md).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from layerchop.plugins import ONESHOT as PLUGINS  # the package of the methods
from layerchop.prune.sparsity import Pattern


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


def check_method(name: str, cls: type[OneShot]) -> None:
    """A method's class is in the file of its name, has a label, and reads only keys of the prune section.

    Raises:
        ValueError: naming the module.
    """
    import dataclasses

    from layerchop.config import PruneConfig

    where = f"{PLUGINS}.{cls.__module__.rsplit('.', 1)[-1]}"
    if cls.__module__ != f"{PLUGINS}.{name}":
        raise ValueError(f"{where}: one-shot method {name!r} must be in a file of its own name, {name}.py")
    if not cls.label:
        raise ValueError(f"{where}: one-shot method {name!r} needs a label (its rows in Figure 1 and Table 2)")
    unknown = sorted(set(cls.settings) - {f.name for f in dataclasses.fields(PruneConfig)})
    if unknown:
        raise ValueError(f"{where}: one-shot method {name!r} reads {unknown}, not keys of the prune section "
                         "(add them to PruneConfig, and to the prune stage's params in dvc.yaml)")


def solver(name: str, key: str = "--method") -> type[OneShot]:
    """The one-shot method called ``name`` (``key``: where the name was given, for the error). Only its own file is
    imported: the ``prune@<method>-<pattern>`` stage runs, and depends on, no other method's code."""
    from layerchop.plugins import load, names

    known = names(PLUGINS)
    if name not in known:
        raise ValueError(f"{key} {name!r} is not a one-shot method: choose one of {known} (or add one: "
                         "a OneShot subclass in src/layerchop/prune/oneshot/, docs/bring-your-own.md)")
    cls = load(PLUGINS, name, OneShot, "one-shot method")
    check_method(name, cls)
    return cls
