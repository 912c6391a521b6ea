"""Data-driven layer-selection criteria added in a file each: every :class:`layerchop.prune.select.Criterion` subclass
defined in a module of this package is a ``chop.layout`` (and a ``table6.layouts`` name), found by
:func:`layerchop.prune.select.criteria`; the built-ins (angular, block-influence, ppl) live in
:mod:`layerchop.prune.select`."""
