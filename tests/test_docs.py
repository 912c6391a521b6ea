"""README.md and docs/*.md stay true to the code.

The README's main table is the one the pipeline generates (``paper/tables/main.md``), and every table copied into
the docs is a verbatim excerpt of its generated file. Every ``layerchop`` subcommand and option, every DVC stage a
command or a span names, every repository path, every params key and every relative link in the docs exists.

Each check is a function of ``root`` (the folder holding README.md and docs/) and ``repo`` (the code it must agree
with), returning the problems it found, so a copy of the docs can be checked against the real repository.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import itertools
import re
import shlex
import types
import typing
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

MAIN_BEGIN, MAIN_END = "<!-- main-table:begin -->", "<!-- main-table:end -->"
GENERATED = re.compile(r"<!-- generated: (\S+) -->\n(.*?)\n<!-- /generated -->", re.S)
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
COMMENT = re.compile(r"<!--.*?-->", re.S)
SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)

# suffixes that make a token a file path even without a folder in front of it
FILE_SUFFIXES = (".py", ".yaml", ".yml", ".md", ".sh", ".toml", ".txt", ".cfg")
# paths the docs tell a reader to create: they do not exist until then
PLANNED_PATHS = {
    "src/layerchop/prune/oneshot/act-l1.py",  # bring-your-own.md: where to copy the example one-shot method
}
# stages that appear once a reader has made that change (bring-your-own.md: the example method in prune.methods)
PLANNED_STAGES = {"prune@act-l1-2of4", "prune@act-l1-4of8"}
# package registries and model hubs: the docs name packages and `hf` commands, never these hosts
# an address outside the repository (the docs link only to files in it; no site is named, none needs to be reached)
URL = re.compile(r"\bhttps?://", re.I)
# options of `dvc repro` / `dvc exp run` that take a value (the value is not a target)
DVC_VALUED_OPTIONS = {"-S", "--set-param", "-n", "--name", "-m", "--message", "-j", "--jobs", "-C",
                      "--copy-paths"}


# ---------------------------------------------------------------------------------------------------- reading docs

@dataclasses.dataclass
class Doc:
    path: Path
    text: str
    prose: str  # the text without fenced blocks and HTML comments (headings, paragraphs, tables)
    fences: list[tuple[str, str]]  # (language, body) of every fenced block
    spans: list[str]  # every inline code span of the prose, whitespace collapsed


def read_doc(path: Path) -> Doc:
    text = path.read_text(encoding="utf-8")
    fences = [(m.group(1).lower(), m.group(2)) for m in FENCE.finditer(text)]
    prose = COMMENT.sub("", FENCE.sub("", text))
    spans = [" ".join(s.split()) for s in SPAN.findall(prose)]
    return Doc(path, text, prose, fences, spans)


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def docs(root: Path) -> list[Doc]:
    return [read_doc(p) for p in doc_files(root)]


def where(doc: Doc, root: Path) -> str:
    return str(doc.path.relative_to(root))


def commands(doc: Doc) -> list[list[str]]:
    """Every shell command the doc shows, as tokens: each line of a shell block (continuations joined; a leading
    ``$ `` dropped) and each inline span that starts with a command this repository documents, split at
    ``&&``, ``||``, ``;`` and ``|``."""
    lines = []
    for lang, body in doc.fences:
        if lang in ("bash", "sh", "shell", "console", "text", ""):
            for line in body.replace("\\\n", " ").splitlines():
                line = line.strip()
                if line.startswith("$ "):
                    line = line[2:]
                if lang in ("bash", "sh", "shell") or line.startswith(("layerchop ", "dvc ")):
                    lines.append(line)
    lines += [s for s in doc.spans if s.startswith(("layerchop ", "dvc ", "python "))]
    out = []
    for line in lines:
        try:
            lex = shlex.shlex(line, posix=True, punctuation_chars="&;|")
            lex.whitespace_split, lex.commenters = True, "#"
            tokens = list(lex)
        except ValueError:  # an unbalanced quote in a span written as prose
            tokens = line.split()
        cmd: list[str] = []
        for tok in tokens:
            if tok in ("&&", "||", ";", "|", "&"):
                out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
        out.append(cmd)
    return [c for c in out if c]


def placeholder(token: str) -> bool:
    return any(c in token for c in "<>{}*$") or token in ("...", "…")


# ------------------------------------------------------------------------------------------------ the code's names

@lru_cache(maxsize=None)
def cli_stages() -> tuple[str, ...]:
    from layerchop.cli import STAGES

    return tuple(STAGES)


@lru_cache(maxsize=None)
def stage_options(repo: Path, stage: str) -> frozenset[str]:
    """The ``--options`` a stage module defines (string constants of its source, and of the stage modules it
    imports its arguments from), read without importing it."""
    names, todo, seen = set(), [stage], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((repo / "src" / "layerchop" / "stages" / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--"):
                names.add(node.value)
            if isinstance(node, ast.ImportFrom) and node.module == "layerchop.stages":
                todo += [a.name for a in node.names]
    return frozenset(names | {"--params", "--help"})


def _lookup(params, dotted: str):
    for part in dotted.split("."):
        params = params[part]
    return params


def stage_names_for(repo: Path, params: dict) -> set[str]:
    """The stages ``dvc.yaml`` defines under ``params``: ``name``, ``name@<item>`` for a ``foreach`` and
    ``name@<a>-<b>`` for a ``matrix`` (DVC's own naming, as :func:`layerchop.pipeline.expand` gives it)."""
    from layerchop.pipeline import expand

    stages = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {f"{name}@{key}" if key else name for name, stage in stages.items() for key, _ in expand(stage, params)}


def profiles(repo: Path) -> list[Path]:
    return [repo / "params.yaml", *sorted(repo.glob("experiments/*/params.yaml"))]


@lru_cache(maxsize=None)
def all_stage_names(repo: Path) -> frozenset[str]:
    """Stage names of every profile: docs name stages of the paper-scale profile too (``fig6_train@100000000``)."""
    names = set()
    for path in profiles(repo):
        names |= stage_names_for(repo, yaml.safe_load(path.read_text(encoding="utf-8")))
    return frozenset(names)


def with_overrides(params: dict, overrides: list[str]) -> dict:
    """``params`` with ``-S key=value`` overrides applied as DVC applies them (values parsed as YAML; ``+key``
    adds a key)."""
    import copy

    params = copy.deepcopy(params)
    for override in overrides:
        key, _, value = override.partition("=")
        *parents, last = key.lstrip("+").split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return params


@lru_cache(maxsize=None)
def sections() -> dict:
    from layerchop.config import SECTIONS

    return dict(SECTIONS)


def _unwrap(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def key_in_config(parts: list[str]) -> bool:
    """``parts`` (``["train", "token_budget"]``) names a field of the params dataclasses: nested dataclasses are
    walked by field name, a ``dict`` field takes any key (a placeholder included), ``x_*`` matches a field by
    its prefix."""
    tp = sections().get(parts[0])
    if tp is None:
        return False
    for part in parts[1:]:
        tp = _unwrap(tp)
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part.endswith("*"):
                return any(h.startswith(part[:-1]) for h in hints)
            if part not in hints:
                return False
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return False  # a leaf has no keys below it
    return True


def key_in_params(repo: Path, parts: list[str]) -> bool:
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    try:
        _lookup(params, ".".join(parts))
        return True
    except (KeyError, TypeError):
        return False


def key_exists(repo: Path, key: str) -> bool:
    parts = key.lstrip("+").split(".")
    return key_in_config(parts) or key_in_params(repo, parts)


@lru_cache(maxsize=None)
def repo_paths(repo: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(top-level entries, every file and folder below them as a relative posix path), outputs and caches left
    out."""
    skip = {".git", ".venv", "data", "__pycache__", ".pytest_cache", ".dvc"}
    top = {p.name for p in repo.iterdir() if p.name not in skip and not p.name.endswith(".egg-info")}
    everything = set()
    for p in repo.rglob("*"):
        rel = p.relative_to(repo)
        if not any(part in skip or part.endswith(".egg-info") for part in rel.parts):
            everything.add(rel.as_posix())
    return frozenset(top), frozenset(everything)


@functools.lru_cache(maxsize=None)
def stage_outputs(repo: Path) -> frozenset[str]:
    """The literal paths ``dvc.yaml``'s stages write (``outs`` and ``metrics``): a page may name one before the
    pipeline has run (like the paths under ``data/``)."""
    out = set()
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        body = stage.get("do", stage)
        for entry in body.get("outs", []) + body.get("metrics", []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            if "${" not in path:
                out.add(path)
    return frozenset(out)


def path_problem(repo: Path, token: str) -> str | None:
    """None when ``token`` is not a repository path or names one that exists; else why not."""
    token = token.rstrip("/")
    if (not token or placeholder(token) or "://" in token or any(c in token for c in " []()=,'\"")
            or token.startswith(("/", "~", "-", "..", ".venv", ".["))):  # absolute, outside, an option, not ours
        return None
    top, everything = repo_paths(repo)
    first = token.split("/")[0]
    if first == "data":  # DVC outputs: not in a checkout until the pipeline runs
        return None
    if first in top:
        if token in PLANNED_PATHS or (repo / token).exists() or token in stage_outputs(repo):
            return None
        return f"`{token}` does not exist in the repository"
    if token.endswith(FILE_SUFFIXES):
        if token in everything or any(p.endswith("/" + token) for p in everything):
            return None
        return f"`{token}` is no file of the repository"
    return None


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("", text)):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


# ------------------------------------------------------------------------------------------------------- the checks

def check_main_table(root: Path, repo: Path) -> list[str]:
    text = (root / "README.md").read_text(encoding="utf-8")
    if text.count(MAIN_BEGIN) != 1 or text.count(MAIN_END) != 1:
        return [f"README.md needs exactly one {MAIN_BEGIN} and one {MAIN_END}"]
    shown = text.split(MAIN_BEGIN, 1)[1].split(MAIN_END, 1)[0].strip("\n")
    generated = (repo / "paper" / "tables" / "main.md").read_text(encoding="utf-8").strip("\n")
    if shown != generated:
        diff = [f"  README:    {a}\n  generated: {b}" for a, b in
                itertools.zip_longest(shown.splitlines(), generated.splitlines(), fillvalue="") if a != b]
        return ["README.md's main table is not paper/tables/main.md: copy the generated table (what "
                "`dvc repro report` wrote) between the markers, never edit it by hand. First difference:\n"
                + diff[0]]
    return []


def check_generated_excerpts(root: Path, repo: Path) -> list[str]:
    problems = []
    for doc in docs(root):
        opened = doc.text.count("<!-- generated:")
        blocks = GENERATED.findall(doc.text)
        if opened != len(blocks):
            problems.append(f"{where(doc, root)}: a `<!-- generated: ... -->` block without its `<!-- /generated -->`")
        for path, body in blocks:
            source = repo / path
            if not source.is_file():
                problems.append(f"{where(doc, root)}: generated block from {path}, which does not exist")
                continue
            lines, excerpt = source.read_text(encoding="utf-8").splitlines(), body.strip("\n").splitlines()
            if not any(lines[i:i + len(excerpt)] == excerpt for i in range(len(lines) - len(excerpt) + 1)):
                problems.append(f"{where(doc, root)}: the block generated from {path} is not a verbatim excerpt of "
                                f"it: copy the lines from the generated file, never edit them by hand")
    return problems


def check_layerchop_commands(root: Path, repo: Path) -> list[str]:
    problems = []
    for doc in docs(root):
        for cmd in commands(doc):
            if cmd[0] != "layerchop" or len(cmd) < 2 or placeholder(cmd[1]) or cmd[1].startswith("-"):
                continue
            stage = cmd[1]
            if stage not in cli_stages():
                problems.append(f"{where(doc, root)}: `layerchop {stage}` is no subcommand (layerchop.cli.STAGES)")
                continue
            for tok in cmd[2:]:
                option = tok.split("=", 1)[0]
                if option.startswith("--") and option not in stage_options(repo, stage):
                    problems.append(f"{where(doc, root)}: `layerchop {stage}` has no option {option}")
    return problems


def dvc_targets(cmd: list[str]) -> tuple[list[str], list[str]] | None:
    """(targets, ``-S`` overrides) of a ``dvc repro`` or ``dvc exp run`` command; None for another command."""
    if cmd[:2] == ["dvc", "repro"]:
        rest = cmd[2:]
    elif cmd[:3] in (["dvc", "exp", "run"], ["dvc", "experiments", "run"]):
        rest = cmd[3:]
    else:
        return None
    targets, overrides, it = [], [], iter(rest)
    for tok in it:
        if tok in DVC_VALUED_OPTIONS:
            value = next(it, None)
            if tok in ("-S", "--set-param") and value is not None:  # no value: a span naming the option
                overrides.append(value)
        elif not tok.startswith("-"):
            targets.append(tok)
    return targets, overrides


def check_dvc_targets(root: Path, repo: Path) -> list[str]:
    problems = []
    for doc in docs(root):
        for cmd in commands(doc):
            found = dvc_targets(cmd)
            if found is None:
                continue
            targets, overrides = found
            for override in overrides:
                if placeholder(override):
                    continue
                if "=" not in override or not key_exists(repo, override.split("=", 1)[0]):
                    problems.append(f"{where(doc, root)}: `-S {override}` sets no params key")
            names = set(all_stage_names(repo))
            if overrides:  # stages a list param adds exist for that experiment
                for path in profiles(repo):
                    params = yaml.safe_load(path.read_text(encoding="utf-8"))
                    try:
                        names |= stage_names_for(repo, with_overrides(params, overrides))
                    except (KeyError, TypeError, AttributeError):
                        pass
            for target in targets:
                if placeholder(target) or target.endswith((".yaml", ".dvc")):
                    continue
                if target.split(":")[-1] not in names:
                    problems.append(f"{where(doc, root)}: `{' '.join(cmd)}`: no stage {target} in dvc.yaml")
    return problems


def check_stage_spans(root: Path, repo: Path) -> list[str]:
    """A span ``name@key`` names a stage; ``name@<placeholder>``, ``name@*`` and ``name@{a,b}`` name stages of
    ``name``."""
    names = all_stage_names(repo) | PLANNED_STAGES
    bases = {n.split("@")[0] for n in names}
    problems = []
    for doc in docs(root):
        for span in doc.spans:
            for word in span.split():
                m = re.fullmatch(r"([a-z][a-z0-9_]*)@(\S+?)[,;:)]?", word)
                if not m or "/" in word or "=" in word:
                    continue
                base, key = m.groups()
                if base not in bases:
                    problems.append(f"{where(doc, root)}: `{span}`: no stage {base}@... in dvc.yaml")
                elif (b := re.fullmatch(r"\{([^{}<>*]+)\}", key)):
                    problems += [f"{where(doc, root)}: `{span}`: no stage {base}@{k} in dvc.yaml"
                                 for k in b.group(1).split(",") if f"{base}@{k}" not in names]
                elif not placeholder(key) and f"{base}@{key}" not in names:
                    problems.append(f"{where(doc, root)}: `{span}`: no stage {base}@{key} in dvc.yaml")
    return problems


def check_paths(root: Path, repo: Path) -> list[str]:
    top, _ = repo_paths(repo)
    problems = []
    for doc in docs(root):
        tokens = [s for s in doc.spans if " " not in s]
        for cmd in commands(doc):
            tokens += [t.split("=", 1)[-1] for t in cmd[1:]]
        for lang, body in doc.fences:  # a layout listing: the first word of each line
            if lang in ("", "text"):
                tokens += [line.split()[0] for line in body.splitlines()
                           if line.strip() and line.split()[0].split("/")[0] in top]
        problems += [f"{where(doc, root)}: {p}" for t in tokens if (p := path_problem(repo, t))]
    return problems


KEY_SPAN = re.compile(r"\+?([a-z][a-z0-9]*(?:\.[\w<>*-]+)+)(?:$|[\s:=,)])")


def check_params_keys(root: Path, repo: Path) -> list[str]:
    problems = []
    for doc in docs(root):
        keys = []
        for span in doc.spans:
            m = KEY_SPAN.match(span)
            if m and m.group(1).split(".")[0] in sections() and not m.group(1).endswith(FILE_SUFFIXES):
                keys.append(m.group(1))
        for lang, body in doc.fences:
            if lang in ("yaml", "yml"):
                data = yaml.safe_load(body)
                if isinstance(data, dict) and set(map(str, data)) & set(sections()):
                    keys += _flatten(data)
        problems += [f"{where(doc, root)}: `{k}` is no params key (params.yaml, layerchop.config)"
                     for k in keys if not key_exists(repo, k)]
    return problems


def _flatten(data: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        out += _flatten(v, key + ".") if isinstance(v, dict) and v else [key]
    return out


def check_links(root: Path, repo: Path) -> list[str]:
    problems = []
    for doc in docs(root):
        for target in LINK.findall(doc.prose):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            if not path:
                found = doc.path
            else:
                here = doc.path.parent / path
                mirrored = repo / doc.path.parent.relative_to(root) / path
                found = here if here.exists() else mirrored if mirrored.exists() else None
            if found is None:
                problems.append(f"{where(doc, root)}: link to {target}, which does not exist")
            elif anchor and found.suffix == ".md" and anchor not in anchors(found.read_text(encoding="utf-8")):
                problems.append(f"{where(doc, root)}: link to {target}: {found.name} has no heading #{anchor}")
    return problems


def check_readme_commands(root: Path, repo: Path) -> list[str]:
    """The README's shell blocks are its two commands, each alone in its block: reproduce, and test."""
    blocks = [body for lang, body in read_doc(root / "README.md").fences if lang in ("bash", "sh", "shell")]
    lines = [[ln for ln in b.splitlines() if ln.strip() and not ln.lstrip().startswith("#")] for b in blocks]
    problems = [f"README.md: a shell block holds {len(ls)} commands, not one: {ls}" for ls in lines if len(ls) != 1]
    commands_ = [ls[0] for ls in lines if ls]
    if not any(c.rstrip().endswith("dvc repro") for c in commands_):
        problems.append("README.md: no shell block that reproduces everything (`... && dvc repro`)")
    if not any("pytest" in c for c in commands_):
        problems.append("README.md: no shell block that runs the tests")
    return problems


def check_no_external_addresses(root: Path, repo: Path) -> list[str]:
    return [f"{where(doc, root)}: links outside the repository ({m.group(0)}...)" for doc in docs(root)
            for m in URL.finditer(doc.text)]


CHECKS = (check_main_table, check_generated_excerpts, check_layerchop_commands, check_dvc_targets,
          check_stage_spans, check_paths, check_params_keys, check_links, check_readme_commands,
          check_no_external_addresses)


# ------------------------------------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
def test_the_docs_match_the_repository(check):
    """Each check over README.md and docs/ (what each one checks: its docstring or name): no problem found."""
    assert not (problems := check(REPO, REPO)), "\n".join(problems)


def test_the_checks_see_what_they_check():
    """The parsing finds the things the checks are about (a parser that finds nothing passes every check)."""
    found = docs(REPO)
    cmds = [c for d in found for c in commands(d)]
    assert any(c[:2] == ["layerchop", "plan"] for c in cmds)
    assert any(dvc_targets(c) and dvc_targets(c)[0] for c in cmds)
    assert sum(len(GENERATED.findall(d.text)) for d in found) >= 10
    assert sum(len(LINK.findall(d.prose)) for d in found) >= 20
    assert "train@layerchop" in all_stage_names(REPO) and "prune@wanda-2of4" in all_stage_names(REPO)
    assert key_exists(REPO, "train.token_budget") and not key_exists(REPO, "train.token_budgets")
