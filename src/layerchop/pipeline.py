"""``dvc.yaml`` read the way DVC expands it (``foreach`` / ``matrix``, ``${key}``, ``${item.x}``, ``${section.key}``
from params), so that a dry run (``layerchop plan``) and the tests see the commands ``dvc repro`` will run."""

from __future__ import annotations

import itertools
import re

import yaml


def _resolve(value, params: dict | None):
    """A ``foreach`` / ``matrix`` value: a literal list or dict, or ``${section.key}`` naming one in params."""
    if isinstance(value, str):
        m = re.fullmatch(r"\$\{([A-Za-z0-9_.]+)\}", value.strip())
        if m is None or params is None:
            raise ValueError(f"dvc.yaml: cannot expand {value!r} without params")
        node = params
        for part in m.group(1).split("."):
            node = node[part]
        return node
    return value


def expand(stage: dict, params: dict | None = None) -> list[tuple[str, dict]]:
    """``(key, stage body)`` for every instance of a ``foreach`` or ``matrix`` stage (one ``("", stage)`` else);
    ``params`` resolves a list given as ``${section.key}``."""
    if "matrix" in stage:
        matrix = {n: _resolve(v, params) for n, v in stage["matrix"].items()}
        names = list(matrix)
        body = {k: v for k, v in stage.items() if k != "matrix"}
        out = []
        for combo in itertools.product(*(matrix[n] for n in names)):
            text = yaml.safe_dump(body)
            for n, v in zip(names, combo):
                text = text.replace("${item.%s}" % n, str(v))
            out.append(("-".join(map(str, combo)), yaml.safe_load(text)))
        return out
    if "foreach" not in stage:
        return [("", stage)]
    items = _resolve(stage["foreach"], params)
    pairs = items.items() if isinstance(items, dict) else [(i, i) for i in items]
    out = []
    for key, item in pairs:
        text = yaml.safe_dump(stage["do"]).replace("${key}", str(key))
        if isinstance(item, dict):
            for k, v in item.items():
                text = text.replace("${item.%s}" % k, str(v))
        else:
            text = text.replace("${item}", str(item))
        out.append((str(key), yaml.safe_load(text)))
    return out


def interpolate(cmd: str, params: dict) -> str:
    """``${section.key}`` in a command, from params (DVC templating)."""

    def value(m):
        node = params
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([A-Za-z0-9_.]+)\}", value, cmd)


def stage_commands(dvc: dict, params: dict, names: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """``(stage@key, argv after "layerchop")`` for every instance of the named stages, in dvc.yaml order."""
    import shlex

    out = []
    for name in names:
        if name not in dvc.get("stages", {}):
            continue
        for key, body in expand(dvc["stages"][name], params):
            argv = shlex.split(interpolate(" ".join(body["cmd"].split()), params))
            out.append((f"{name}@{key}" if key else name, argv[1:]))
    return out
