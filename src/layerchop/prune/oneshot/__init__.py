"""One-shot pruning methods added in a file each: every :class:`layerchop.prune.solvers.OneShot` subclass defined in
a module of this package is a method of ``layerchop prune --method`` and of ``prune.methods`` (found by
:func:`layerchop.prune.solvers.registry`; the built-ins live in :mod:`layerchop.prune.solvers`). A worked example:
``tests/toy_oneshot.py`` (docs/bring-your-own.md)."""
