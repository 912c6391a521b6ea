"""Registries that grow by a file: the classes of a kind defined in the modules of a package, by their ``name``.

One-shot pruning methods (:func:`layerchop.prune.registry.registry`, package ``layerchop.prune.oneshot``) and
data-driven layer-selection criteria (:func:`layerchop.prune.select.criteria`, package ``layerchop.prune.criteria``)
are found this way: adding one is a file in the package, no import or list to edit."""

from __future__ import annotations

import importlib
import pkgutil

ONESHOT = "layerchop.prune.oneshot"
"""The package of the one-shot pruning methods, one file each, named as the method."""
CRITERIA = "layerchop.prune.criteria"
"""The package of the layer-selection criteria added to the built-in ones, one file each, named as the criterion."""
BUILT_IN_CRITERIA = ("angular", "block-influence", "ppl")
"""The criteria defined in :mod:`layerchop.prune.select` itself (``CRITERIA`` there; a test keeps them equal), so that
a params check can know every criterion's name without importing torch or any criterion's code."""


def names(package: str) -> list[str]:
    """The plugins of ``package`` by name, found by their file names: none of their code runs (a params check that
    a name exists then depends on no plugin's code)."""
    pkg = importlib.import_module(package)
    return sorted(info.name for info in pkgutil.iter_modules(pkg.__path__))


def _defined(module, base: type) -> list[type]:
    """The subclasses of ``base`` that ``module`` defines (not those it imports)."""
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, base) and obj.__module__ == module.__name__]


def load(package: str, name: str, base: type, what: str) -> type:
    """The plugin ``name`` of ``package``: the subclass of ``base`` called ``name`` in the module of that name, the
    only plugin module imported (a stage that runs one method runs no other method's code).

    Raises:
        ValueError: naming the file, when it defines no such class.
    """
    module = importlib.import_module(f"{package}.{name}")
    for obj in _defined(module, base):
        if obj.name == name:
            return obj
    raise ValueError(f"{module.__file__}: defines no {what} named {name!r} (a {what}'s file is named as it)")


def with_package(built_in: dict[str, type], package: str, base: type, what: str) -> dict[str, type]:
    """``built_in`` and every subclass of ``base`` defined in a module of ``package`` (imported here), by ``name``.

    Raises:
        ValueError: naming the file, when a class has no ``name`` or takes a name already taken.
    """
    found = dict(built_in)
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for obj in _defined(module, base):
            if not obj.name:
                raise ValueError(f"{module.__file__}: {what} {obj.__qualname__} has no name")
            if obj.name in found and found[obj.name] is not obj:
                raise ValueError(f"{module.__file__}: {what} name {obj.name!r} is already taken by "
                                 f"{found[obj.name].__module__}.{found[obj.name].__qualname__}")
            found[obj.name] = obj
    return found
