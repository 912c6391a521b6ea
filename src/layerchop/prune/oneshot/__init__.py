"""The one-shot pruning methods, one file each, named as the method (``wanda.py`` holds ``wanda``): every
:class:`layerchop.prune.solvers.OneShot` subclass defined in a module of this package is a method of
``layerchop prune --method`` and of ``prune.methods`` (found by :func:`layerchop.prune.registry.registry`; no import
to add). ``prune@<method>-<pattern>`` depends on ``<method>.py`` alone, so adding a method re-runs no other method's
stages. A worked example: ``tests/toy_oneshot.py`` (docs/bring-your-own.md)."""
