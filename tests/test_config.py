"""Configs never drift from code: params files build, dvc.yaml stages parse and point at real files."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from layerchop.cli import build_parser
from layerchop.config import SECTIONS, load_params, section

REPO = Path(__file__).resolve().parents[1]
PARAM_FILES = [REPO / "params.yaml", *sorted((REPO / "experiments").glob("*/params.yaml"))]


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_params_file_builds_every_section(path):
    params = load_params(path)
    assert set(params) == set(SECTIONS)
    for name in SECTIONS:
        section(name, params)


def test_unknown_and_bad_keys_name_the_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['chop.layuot'\]"):
        section("chop", {"chop": {"layuot": "input"}})
    with pytest.raises(ValueError, match=r"chop.layout='diagonal'"):
        section("chop", {"chop": {"layout": "diagonal"}})
    with pytest.raises(ValueError, match=r"prepare.seq_len=1"):
        section("prepare", {"prepare": {"seq_len": 1}})
    with pytest.raises(ValueError, match=r"prepare.tasks.num_choices=1"):
        section("prepare", {"prepare": {"tasks": {"num_choices": 1}}})
    with pytest.raises(ValueError, match=r"evaluate.limit=0"):
        section("evaluate", {"evaluate": {"limit": 0}})


def _expand(stage: dict) -> list[tuple[str, dict]]:
    """Expand foreach and matrix stages the way DVC does (for ${key} / ${item} / ${item.x})."""
    if "matrix" in stage:
        import itertools

        names = list(stage["matrix"])
        body = {k: v for k, v in stage.items() if k != "matrix"}
        out = []
        for combo in itertools.product(*(stage["matrix"][n] for n in names)):
            text = yaml.safe_dump(body)
            for n, v in zip(names, combo):
                text = text.replace("${item.%s}" % n, str(v))
            out.append(("-".join(map(str, combo)), yaml.safe_load(text)))
        return out
    if "foreach" not in stage:
        return [("", stage)]
    items = stage["foreach"]
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


def _interpolate_params(cmd: str, params: dict) -> str:
    """``${section.key}`` in a command, from params.yaml (DVC templating)."""
    import re

    def value(m):
        node = params
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([A-Za-z0-9_.]+)\}", value, cmd)


def test_dvc_stages_parse_and_reference_existing_code():
    dvc = yaml.safe_load(open(REPO / "dvc.yaml"))
    parser = build_parser()
    params = load_params(REPO / "params.yaml")
    for name, stage in dvc["stages"].items():
        for key, st in _expand(stage):
            argv = shlex.split(_interpolate_params(st["cmd"], params))
            assert argv[0] == "layerchop", name
            parser.parse_args(argv[1:])  # exits on unknown arguments
            for dep in st.get("deps", []):
                if dep.startswith("src/"):
                    assert (REPO / dep).exists(), f"{name}@{key}: {dep}"
            for p in st.get("params", []):
                node = params
                for part in p.split("."):
                    assert part in node, f"{name}@{key}: param {p} is not in params.yaml"
                    node = node[part]


def test_every_evaluated_model_is_produced_by_a_stage():
    """evaluate@X reads data/models/X: some stage must write it."""
    dvc = yaml.safe_load(open(REPO / "dvc.yaml"))
    outs, needed = set(), set()
    for name, stage in dvc["stages"].items():
        for key, st in _expand(stage):
            for o in st.get("outs", []):
                outs.add(o if isinstance(o, str) else next(iter(o)))
            if name == "evaluate":
                needed.add(f"data/models/{key}")
            if name == "curve":
                needed |= {f"data/models/fig4-{key}", f"data/snapshots/fig4-{key}"}
    assert needed <= outs, sorted(needed - outs)
