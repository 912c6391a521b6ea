"""Registries that grow by a file: the classes of a kind defined in the modules of a package, by their ``name``.

One-shot pruning methods (:func:`layerchop.prune.solvers.registry`, package ``layerchop.prune.oneshot``) and
data-driven layer-selection criteria (:func:`layerchop.prune.select.criteria`, package ``layerchop.prune.criteria``)
are found this way: adding one is a file in the package, no import or list to edit."""

from __future__ import annotations

import importlib
import pkgutil


def with_package(built_in: dict[str, type], package: str, base: type, what: str) -> dict[str, type]:
    """``built_in`` and every subclass of ``base`` defined in a module of ``package`` (imported here), by ``name``.

    Raises:
        ValueError: naming the file, when a class has no ``name`` or takes a name already taken.
    """
    found = dict(built_in)
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for obj in vars(module).values():
            if not (isinstance(obj, type) and issubclass(obj, base) and obj.__module__ == module.__name__):
                continue
            if not obj.name:
                raise ValueError(f"{module.__file__}: {what} {obj.__qualname__} has no name")
            if obj.name in found and found[obj.name] is not obj:
                raise ValueError(f"{module.__file__}: {what} name {obj.name!r} is already taken by "
                                 f"{found[obj.name].__module__}.{found[obj.name].__qualname__}")
            found[obj.name] = obj
    return found
