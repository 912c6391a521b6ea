"""Every DVC stage depends on the code it runs: its ``deps`` cover the import closure of its entry point."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from layerchop.pipeline import code_closure, covering_deps, expand, interpolate, plugin_loads

REPO = Path(__file__).resolve().parents[1]


def missing_code_deps(dvc: dict, params: dict, src: Path) -> dict[str, list[str]]:
    """Per stage instance whose command is ``layerchop <stage> ...``: the project files its entry point
    (``layerchop.stages.<stage>``, and the CLI that runs it) can execute that its ``deps`` do not cover
    (a dep covers itself and everything under a dep folder)."""
    out, closures = {}, {}
    root = src.parent
    for name, stage in dvc["stages"].items():
        for key, body in expand(stage, params):
            argv = shlex.split(interpolate(" ".join(body["cmd"].split()), params))
            if argv[0] != "layerchop":
                continue
            module = f"layerchop.stages.{argv[1]}"
            if argv[1] not in closures:
                closures[argv[1]] = code_closure(module, src) | {src / "layerchop" / "cli.py"}
            needed = closures[argv[1]]
            deps = [Path(interpolate(str(d), params)) for d in body.get("deps", [])]

            def covered(rel: Path) -> bool:
                return any(rel == d or d in rel.parents for d in deps)

            missing = sorted(str(p.relative_to(root)) for p in needed if not covered(p.relative_to(root)))
            # a plugin loaded alone by a name the command gives (`--method wanda`): its file, or the whole folder
            for package in sorted(plugin_loads(module, src)):
                folder = src.joinpath(*package.split(".")).relative_to(root)
                named = [folder / f"{token}.py" for token in argv[2:] if (root / folder / f"{token}.py").is_file()]
                if not covered(folder) and not any(covered(f) for f in named):
                    missing.append(str(named[0] if named else folder))
                # and what the plugin itself imports (its helpers)
                for f in named:
                    missing += [str(p.relative_to(root)) for p in code_closure(f"{package}.{f.stem}", src)
                                if not covered(p.relative_to(root)) and str(p.relative_to(root)) not in missing]
            if missing:
                out[f"{name}@{key}" if key else name] = missing
    return out


def test_every_stage_depends_on_the_code_it_imports():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    missing = missing_code_deps(dvc, params, REPO / "src")
    assert not missing, "dvc.yaml: stages miss code they import (add to their deps):\n" + "\n".join(
        f"  {stage}: {', '.join(files)}" for stage, files in missing.items())


def test_the_closure_follows_lazy_imports_registries_and_package_inits(tmp_path):
    """A function-level import, a relative import, a registry's package named by a string, and an ``__init__`` that
    runs code are in the closure; an ``__init__`` of a docstring and constants, a module never imported, a string
    that is a sentence rather than a module name, and other packages are not."""
    pkg = tmp_path / "src" / "layerchop"
    files = {
        "__init__.py": '"""doc and constants only."""\n__version__ = "1.0"\n__all__ = ["a"]\n',
        "stages/__init__.py": '"""doc."""\n',
        "stages/s.py": "import os\nfrom layerchop.a import f\n\ndef main():\n    from layerchop.b import g\n",
        "a.py": "from layerchop.plugins import with_package\nREGISTRY = 'layerchop.plug'\n"
                "def f(): return with_package({}, REGISTRY, object, 'x')\n",
        "b.py": "import layerchop.c.d\nMESSAGE = 'layerchop.unused is not imported; nor is layerchop.stages.'\n"
                "NAMES = 'layerchop.other'  # named, not a registry's package: none of its modules is in the closure\n",
        "c/__init__.py": "from layerchop.c.e import X\n",
        "c/d.py": "",
        "c/e.py": "from . import f\nfrom ..g import h\n",
        "c/f.py": "",
        "g.py": "def h(): pass\n",
        "plugins.py": "def with_package(b, package, base, what): pass\n",
        "plug/__init__.py": "",
        "plug/one.py": "",
        "plug/two.py": "",
        "other/__init__.py": "",
        "other/x.py": "",
        "unused.py": "import layerchop.a\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    got = {str(p.relative_to(pkg)) for p in code_closure("layerchop.stages.s", tmp_path / "src")}
    assert got == {"stages/s.py", "a.py", "b.py", "c/__init__.py", "c/d.py", "c/e.py", "c/f.py", "g.py",
                   "plugins.py", "plug/__init__.py", "plug/one.py", "plug/two.py"}
    # as deps: the registry's folder (a plugin added later is one too), the other files one by one
    assert covering_deps(code_closure("layerchop.stages.s", tmp_path / "src"), tmp_path / "src") == [
        "src/layerchop/a.py", "src/layerchop/b.py", "src/layerchop/c", "src/layerchop/g.py", "src/layerchop/plug",
        "src/layerchop/plugins.py", "src/layerchop/stages"]  # (stages/ holds s.py alone here)


def test_a_stage_missing_an_import_is_found(tmp_path):
    """The check itself: a stage whose deps drop a module its entry point imports is reported, by name."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    before = missing_code_deps(dvc, params, REPO / "src")
    assert "src/layerchop/io.py" not in before.get("chop", [])
    dvc["stages"]["chop"]["deps"] = [d for d in dvc["stages"]["chop"]["deps"] if d != "src/layerchop/io.py"]
    after = missing_code_deps(dvc, params, REPO / "src")
    assert after["chop"] == sorted(before.get("chop", []) + ["src/layerchop/io.py"])



def test_a_plugin_loaded_alone_needs_its_file_or_its_folder():
    """``prune@<method>-<pattern>`` runs one method's file (``plugins.load``): its deps name that file, not the other
    methods'; dropping it is reported, naming the file of the method the command gives."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert plugin_loads("layerchop.stages.prune", REPO / "src") == {"layerchop.prune.oneshot"}
    closure = {str(p.relative_to(REPO)) for p in code_closure("layerchop.stages.prune", REPO / "src")}
    assert not any(p.startswith("src/layerchop/prune/oneshot/") for p in closure)  # no method runs but its own
    prune = dvc["stages"]["prune"]
    assert "src/layerchop/prune/oneshot/${item.method}.py" in prune["deps"]
    prune["deps"] = [d for d in prune["deps"] if d != "src/layerchop/prune/oneshot/${item.method}.py"]
    missing = missing_code_deps(dvc, params, REPO / "src")
    assert missing["prune@wanda-2of4"] == ["src/layerchop/prune/oneshot/wanda.py"]


def test_a_registry_whose_package_cannot_be_named_is_an_error(tmp_path):
    """A ``with_package`` or ``load`` call whose package the analysis cannot resolve would drop the package out of
    every closure without a word: it is an error naming the file and line."""
    pkg = tmp_path / "src" / "layerchop"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "stages" / "s.py").write_text("from layerchop.plugins import load\n\ndef main(p):\n    load(p, 'x', object, 'x')\n")
    (pkg / "plugins.py").write_text("def load(package, name, base, what): pass\n")
    with pytest.raises(ValueError, match=r"stages/s.py:4: the package of load\(...\) is not a string constant"):
        plugin_loads("layerchop.stages.s", tmp_path / "src")


def test_dvc_yaml_lists_exactly_the_code_deps_the_tool_computes():
    """``python -m layerchop.pipeline --write dvc.yaml`` rewrites every stage's code deps from its import closure;
    the committed ``dvc.yaml`` is its fixed point (no missing dep, and none left over from code that moved)."""
    from layerchop.pipeline import rewrite_code_deps

    text = (REPO / "dvc.yaml").read_text()
    assert rewrite_code_deps(text, REPO / "src") == text, "run `python -m layerchop.pipeline --write dvc.yaml`"
    # a dropped dep comes back, an extra one goes
    broken = text.replace("      - src/layerchop/evaluate/perplexity.py\n", "", 1).replace(
        "      - src/layerchop/stages/report.py\n", "      - src/layerchop/stages/report.py\n      - src/layerchop/hub.py\n",
        1)
    assert broken != text and rewrite_code_deps(broken, REPO / "src") == text
