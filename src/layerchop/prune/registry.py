"""The one-shot methods as a whole: every method of ``layerchop.prune.oneshot`` (importing all of them), for the
reports that list them (Figure 1, Table 2). A stage that runs one method uses :func:`layerchop.prune.solvers.solver`,
which imports that method's file alone; this module is apart so that such a stage runs (and depends on) no other's."""

from __future__ import annotations

from layerchop.plugins import ONESHOT as PLUGINS
from layerchop.prune.solvers import OneShot, check_method
from layerchop.prune.sparsity import Pattern

BUILT_IN = ("magnitude", "wanda", "sparsegpt")
"""The methods that come with the repository (each a file of ``layerchop.prune.oneshot``, like any other)."""


def registry() -> dict[str, type[OneShot]]:
    """Every one-shot method by name: each :class:`OneShot` subclass defined in a module of the package
    ``layerchop.prune.oneshot``, one file a method, the file named as the method (``act-l1.py`` for ``act-l1``: the
    ``prune@<method>-<pattern>`` stage depends on that file and no other method's)."""
    from layerchop.plugins import with_package

    found = with_package({}, PLUGINS, OneShot, "one-shot method")
    for name, cls in found.items():
        check_method(name, cls)
    return found


ONESHOT_EVAL = "oneshot"
"""The folder of the evaluations' root that holds one evaluation per one-shot run (dvc.yaml's ``oneshot_evaluate``)."""


def oneshot_rows(prune_cfg, listed: dict[str, str]) -> dict[str, str]:
    """The rows of a table with one row per run of ``prune.methods`` × ``prune.patterns``: ``listed`` (evaluation
    directory -> label, in order), then each run not among them as ``oneshot/<method>-<pattern>`` -> ``<label> N:M``."""
    methods = registry()
    rows = dict(listed)
    for name in prune_cfg.methods:
        for spec in prune_cfg.patterns:
            rows.setdefault(f"{ONESHOT_EVAL}/{name}-{spec}", f"{methods[name].label} {Pattern.parse(spec)}")
    return rows
