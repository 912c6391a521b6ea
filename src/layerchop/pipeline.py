"""``dvc.yaml`` read the way DVC expands it (``foreach`` / ``matrix``, ``${key}``, ``${item.x}``, ``${section.key}``
from params), so that a dry run (``layerchop plan``) and the tests see the commands ``dvc repro`` will run."""

from __future__ import annotations

import ast
import itertools
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional

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


def _module_file(name: str, src: Path) -> Optional[Path]:
    """The source file of module ``name`` under ``src`` (a package's ``__init__.py``), or None."""
    base = src.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _runs_code(init: Path) -> bool:
    """A package ``__init__.py`` that does more than hold a docstring and constants (``__version__ = "0.1.0"``,
    ``__all__ = [...]``): importing anything below it runs it."""
    def inert(node) -> bool:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            return True
        return isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None and all(
            isinstance(n, (ast.Constant, ast.List, ast.Tuple, ast.Load)) for n in ast.walk(node.value))

    return not all(inert(node) for node in ast.parse(init.read_text()).body)


_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


@lru_cache(maxsize=None)
def _parsed(path: Path, mtime_ns: int) -> tuple:
    return tuple(ast.walk(ast.parse(path.read_text())))


def _nodes(path: Path) -> tuple:
    """Every AST node of a source file (parsed once per version of the file)."""
    return _parsed(path, path.stat().st_mtime_ns)


def code_closure(module: str, src: str | Path = "src") -> set[Path]:
    """The source files that running ``module`` can execute from its own package: every ``layerchop`` module it
    imports, at any depth, at module level or inside a function, every module of a package that a registry
    imports by name (a string constant naming a package, :func:`layerchop.plugins.with_package`), and each
    package ``__init__.py`` on the way that runs code. A superset of what one run imports, which is what a DVC
    stage's ``deps`` must cover so that editing any of them re-runs the stage."""
    import pkgutil

    src = Path(src)
    top = module.split(".")[0]
    seen: set[Path] = set()
    visited: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in visited:
            continue
        visited.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:k]) for k in range(1, len(parts))]  # importing it runs the packages above first
        path = _module_file(name, src)
        if path is None or path in seen or (path.name == "__init__.py" and not _runs_code(path)):
            continue
        seen.add(path)
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in _nodes(path):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] == top]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package of this module, level - 1 packages up
                    anchor = package[:len(package) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] == top:
                    todo += [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and _MODULE_NAME.fullmatch(node.value) and node.value.startswith(f"{top}."):
                pkg = src.joinpath(*node.value.split("."))
                if (pkg / "__init__.py").is_file():  # a registry's package: every module in it
                    todo += [f"{node.value}.{m.name}" for m in pkgutil.iter_modules([str(pkg)])]
    return seen
