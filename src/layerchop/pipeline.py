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


@lru_cache(maxsize=None)
def _parsed(path: Path, mtime_ns: int) -> tuple[ast.Module, tuple]:
    tree = ast.parse(path.read_text())
    return tree, tuple(ast.walk(tree))


def _nodes(path: Path) -> tuple:
    """Every AST node of a source file (parsed once per version of the file)."""
    return _parsed(path, path.stat().st_mtime_ns)[1]


def _body(path: Path) -> list:
    """A source file's module-level statements (from the same parse as :func:`_nodes`)."""
    return _parsed(path, path.stat().st_mtime_ns)[0].body


def code_closure(module: str, src: str | Path = "src") -> set[Path]:
    """The source files that running ``module`` can execute from its own package: every ``layerchop`` module it
    imports, at any depth, at module level or inside a function, every module of a package that a registry
    imports (a call of :func:`layerchop.plugins.with_package`; a plugin loaded alone by a name known at run time,
    :func:`layerchop.plugins.load`, is not here: :func:`plugin_loads`), and each
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
            elif (pkg_name := _plugin_package(node, path, src, "with_package", 1)) is not None:
                pkg = src.joinpath(*pkg_name.split("."))  # a registry: it imports every module of the package
                todo += [pkg_name] + [f"{pkg_name}.{m.name}" for m in pkgutil.iter_modules([str(pkg)])]
                if (pkg / "__init__.py").is_file():  # (inert or not: the folder, where a new plugin appears)
                    seen.add(pkg / "__init__.py")
    return seen


def _constant(path: Path, name: str, src: Path) -> Optional[str]:
    """The string a module-level name of ``path`` is bound to: ``NAME = "..."``, or ``from m import X as NAME``
    with ``X`` such a constant of ``m``."""
    for node in _body(path):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            value = node.value
            return value.value if isinstance(value, ast.Constant) and isinstance(value.value, str) else None
    for node in _nodes(path):  # imported (at module level or in a function)
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if (alias.asname or alias.name) == name and (origin := _module_file(node.module, src)) is not None:
                    return _constant(origin, alias.name, src)
    return None


def _plugin_package(node, path: Path, src: Path, function: str, index: int) -> Optional[str]:
    """The package named by argument ``index`` of a call to ``function`` (:mod:`layerchop.plugins`' ``with_package``
    or ``load``) at ``node``, resolved to its string; None for any other node."""
    if not isinstance(node, ast.Call) or len(node.args) <= index or not _is_plugins(node.func, path, function):
        return None
    arg = node.args[index]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.Name) and (found := _constant(path, arg.id, src)) is not None:
        return found
    if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name):  # plugins.ONESHOT
        for imp in _nodes(path):
            if isinstance(imp, ast.Import):
                for alias in imp.names:
                    if (alias.asname or alias.name.split(".")[-1]) == arg.value.id \
                            and (origin := _module_file(alias.name, src)) is not None:
                        if (found := _constant(origin, arg.attr, src)) is not None:
                            return found
            elif isinstance(imp, ast.ImportFrom) and imp.module and not imp.level:
                for alias in imp.names:
                    if (alias.asname or alias.name) == arg.value.id \
                            and (origin := _module_file(f"{imp.module}.{alias.name}", src)) is not None:
                        if (found := _constant(origin, arg.attr, src)) is not None:
                            return found
    # a package the analysis cannot name would drop out of every closure without a word
    raise ValueError(f"{path}:{node.lineno}: the package of {function}(...) is not a string constant this analysis "
                     "can resolve (write it as a literal or a module-level constant)")


def _is_plugins(func, path: Path, function: str) -> bool:
    """Whether ``func`` (a call's callee in ``path``) is ``layerchop.plugins.<function>``: a name imported from it, or
    an attribute of the module imported (``json.load`` is not)."""
    if isinstance(func, ast.Name) and func.id == function:
        return any(isinstance(n, ast.ImportFrom) and n.module == "layerchop.plugins"
                   and any((a.asname or a.name) == function and a.name == function for a in n.names)
                   for n in _nodes(path))
    if isinstance(func, ast.Attribute) and func.attr == function and isinstance(func.value, ast.Name):
        return any((isinstance(n, ast.Import) and any(a.name == "layerchop.plugins" and
                                                      (a.asname or "layerchop") == func.value.id for a in n.names))
                   or (isinstance(n, ast.ImportFrom) and n.module == "layerchop"
                       and any(a.name == "plugins" and (a.asname or a.name) == func.value.id for a in n.names))
                   for n in _nodes(path))
    return False


def plugin_loads(module: str, src: str | Path = "src") -> set[str]:
    """The plugin packages that running ``module`` loads one plugin of, by a name known only at run time
    (:func:`layerchop.plugins.load`): a stage's ``deps`` must hold that package's folder, or the file of the plugin
    its command names."""
    src = Path(src)
    found = set()
    for path in code_closure(module, src):
        for node in _nodes(path):
            if (pkg := _plugin_package(node, path, src, "load", 0)) is not None:
                found.add(pkg)
    return found


def covering_deps(files: set[Path], src: str | Path = "src") -> list[str]:
    """The shortest list of ``deps`` (relative to ``src``'s parent) that covers ``files`` (a :func:`code_closure`)
    and nothing else: a folder where every source file in it (an inert package ``__init__.py`` aside) is needed,
    so that a module added to it later (a registry's new method) is a dependency too; the files elsewhere."""
    src = Path(src)
    root = src.parent
    files = {Path(f).resolve() for f in files}

    def needed(path: Path) -> bool:
        return path.name != "__init__.py" or _runs_code(path)

    def full(folder: Path) -> bool:
        sources = [p.resolve() for p in folder.rglob("*.py") if needed(p) or p.resolve() in files]
        return bool(sources) and all(p in files for p in sources)

    out: list[str] = []
    for f in sorted(files):
        folder = max((d for d in f.parents if src.resolve() in d.parents and full(d)),
                     key=lambda d: -len(d.parts), default=None)  # the topmost full folder below src/<package>
        dep = (folder or f).relative_to(root.resolve())
        if str(dep) not in out:
            out.append(str(dep))
    return out


def stage_code_deps(command: str, src: str | Path = "src") -> list[str]:
    """The code ``deps`` of a stage that runs ``layerchop <command>``: :func:`covering_deps` of its entry point's
    import closure and the CLI that runs it (what ``tests/test_deps.py`` checks ``dvc.yaml`` against)."""
    src = Path(src)
    return sorted(covering_deps(code_closure(f"layerchop.stages.{command}", src) | {src / "layerchop" / "cli.py"},
                                src))


def rewrite_code_deps(text: str, src: str | Path = "src") -> str:
    """``dvc.yaml``'s text with every stage's code deps (its ``- src/...`` lines without ``${``: a plugin file named
    by an item stays) replaced by :func:`stage_code_deps` of the command it runs, in place of the first of them (a
    comment on a replaced line goes with it); other lines are kept as they are. A stage whose command is not
    ``layerchop <command>`` is left."""
    src = Path(src)
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    cache: dict[str, list[str]] = {}
    while i < len(lines):
        line = lines[i]
        if re.match(r"^  [A-Za-z0-9_]+:", line):  # a stage: its block runs to the next one
            j = i + 1
            while j < len(lines) and not re.match(r"^  [A-Za-z0-9_]+:|^[A-Za-z]", lines[j]):
                j += 1
            block = lines[i:j]
            command = re.search(r"\blayerchop ([a-z0-9_]+)", "\n".join(block))
            code = [k for k, b in enumerate(block) if re.match(rf"^\s+- {re.escape(src.name)}/", b) and "${" not in b]
            if command and code:
                name = command.group(1)
                if name not in cache:
                    cache[name] = stage_code_deps(name, src)
                indent = block[code[0]][:len(block[code[0]]) - len(block[code[0]].lstrip())]
                block = (block[:code[0]] + [f"{indent}- {d}" for d in cache[name]]
                         + [b for k, b in enumerate(block) if k > code[0] and k not in code])
            out += block
            i = j
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


if __name__ == "__main__":  # `python -m layerchop.pipeline [--write dvc.yaml] [<command>...]`
    import sys

    args = sys.argv[1:]
    if args[:1] == ["--write"]:  # every stage's code deps, recomputed in place (tests/test_deps.py checks them)
        path = Path(args[1] if len(args) > 1 else "dvc.yaml")
        path.write_text(rewrite_code_deps(path.read_text()))
    else:  # the deps lines of each command, to paste
        for command in args:
            print(f"# layerchop {command}")
            print("\n".join(f"- {d}" for d in stage_code_deps(command)))
