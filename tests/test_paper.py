"""``paper/README.md``: every artifact beside the paper's result, with a verdict computed from the metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from layerchop.report.compare import Comparison
from layerchop.report.paper import ARTIFACTS, verdict_of

REPO = Path(__file__).resolve().parents[1]


def _m(ppl: float, general: float, in_domain: float, params: float = 1e8, n: int = 1000, layers: int = 15) -> dict:
    """Metrics with PIQA (acc_norm) at ``general`` and both in-domain tasks at ``in_domain``."""
    m = {"val/ppl": ppl, "test/ppl": ppl, "params": params, "layers": layers}
    for task, metric, p in (("piqa", "acc_norm", general), ("heldout_continuation", "acc", in_domain),
                            ("heldout_lastword", "acc_norm", in_domain)):
        m[f"eval/{task}/{metric}"] = p
        m[f"eval/{task}/{metric}_stderr"] = math.sqrt(p * (1 - p) / n)
        m[f"eval/{task}/n"] = n
    return m


def _tree(root: Path, fig4_distill: dict) -> Path:
    """Every input of the stage: the tables and figures (placeholders) and the metrics it reads."""
    tables, figures, ev = root / "paper" / "tables", root / "paper" / "figures", root / "data" / "eval"
    for art in ARTIFACTS:
        (tables / art.table).parent.mkdir(parents=True, exist_ok=True)
        (tables / art.table).write_text(f"| {art.id} table |\n|---|\n\n{art.id} caption.\n")
        if art.figure:
            figures.mkdir(parents=True, exist_ok=True)
            (figures / art.figure).write_bytes(b"png")
    evals = {"dense": _m(19.5, 0.66, 0.94, params=1.35e8, layers=30), "chopped": _m(26000, 0.50, 0.32),
             "layerchop": _m(53.5, 0.62, 0.80, params=0.81e8), "sparsegpt-2of4_cpt": _m(32.0, 0.58, 0.82),
             "oneshot/wanda-2of4": _m(172.0, 0.55, 0.67), "oneshot/sparsegpt-2of4": _m(70.0, 0.56, 0.75),
             **{f"layouts/{x}/recovered": _m(p, 0.56, 0.75) for x, p in
                (("output", 100.4), ("middle", 43.3), ("max-gap", 68.1), ("both", 82.6))}}
    curves = {"fig4-layerchop": _m(53.5, 0.62, 0.80), "fig2-scratch": _m(1204, 0.50, 0.26),
              "fig3-dimchop": _m(126.2, 0.61, 0.79), "fig4-distill": fig4_distill,
              **{f"fig6/every{n}": _m(60.0 + n / 1000, 0.60, 0.79) for n in (4096, 8192, 10240)}}
    for name, m in evals.items():
        (ev / name).mkdir(parents=True, exist_ok=True)
        (ev / name / "metrics.json").write_text(json.dumps(m))
    for name, m in curves.items():
        (ev / name).mkdir(parents=True, exist_ok=True)
        (ev / name / "curve.json").write_text(json.dumps({"points": [{"metrics": _m(1e4, 0.5, 0.3)},
                                                                     {"metrics": m}]}))
    q = {"median": 1.84, "q1": 1.82, "q3": 1.88}
    bench = {"query": {"batch": 1, "prompt": 128}, "cells": [{"batch": 1, "prompt": 128, "models": {
        "dense": {"query_speedup": {"median": 1.0, "q1": 1.0, "q3": 1.0}}, "layerchop": {"query_speedup": q},
        "wanda-2of4": {"query_speedup": {"median": 1.0, "q1": 0.98, "q3": 1.04}}}}]}
    (root / "data" / "bench").mkdir(parents=True)
    (root / "data" / "bench" / "metrics.json").write_text(json.dumps(bench))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["arms"].update(seeds={}, replicas=[])  # one seed (params.yaml's replicas are not here)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


ARGS = ["paper", "--tables-dir", "paper/tables", "--figures-dir", "paper/figures", "--eval", "data/eval", "--bench",
        "data/bench/metrics.json", "--out", "paper/README.md"]


def _run(root: Path):
    """The stage as `dvc repro` runs it, in a process of its own, from ``root``."""
    return subprocess.run([sys.executable, "-m", "layerchop.cli", *ARGS], capture_output=True, text=True, cwd=root)


def _run_here(root: Path, monkeypatch, capsys) -> tuple[int, str]:
    """The stage in this process (no interpreter start-up), from ``root``: its status and stderr."""
    from layerchop.cli import main

    monkeypatch.chdir(root)
    rc = main(ARGS)
    return rc, capsys.readouterr().err


def test_verdicts_follow_the_comparisons():
    better, worse, tie = (Comparison("general", (60.0, 1.5), (50.0, 1.5)), Comparison("general", (50.0, 1.5),
                          (60.0, 1.5)), Comparison("general", (52.0, 1.5), (50.0, 1.5)))
    assert (better.sign, worse.sign, tie.sign) == (1, -1, 0)
    assert round(better.z, 3) == round(10 / math.hypot(1.5, 1.5), 3)
    assert tie.text() == "general 52.0 vs 50.0 (+2.0 points, z = 0.9, unpaired: a tie)"
    assert verdict_of([1, 1], +1) == "agrees" and verdict_of([1, 0], +1) == "partly"
    assert verdict_of([0, 0], +1) == "a tie" and verdict_of([1, -1], +1) == "differs"
    assert verdict_of([-1, -1], -1) == "agrees"
    assert verdict_of([], +1) == "not measured"  # no evidence is no verdict
    same = Comparison("general", (100.0, 0.0), (100.0, 0.0))  # no error at all: equal is a tie, not "worse"
    assert (same.z, same.sign) == (0.0, 0)
    assert Comparison("general", (100.0, 0.0), (90.0, 0.0)).sign == 1


def test_perplexity_counts_beyond_its_margin_and_joins_the_verdict():
    from layerchop.report.paper import PPL_MARGIN, ppl_sign, versus

    a, b = _m(50.0, 0.60, 0.80), _m(50.0 * (1 + PPL_MARGIN) + 0.1, 0.60, 0.80)
    assert (ppl_sign(a, b), ppl_sign(b, a), ppl_sign(a, a)) == (1, -1, 0)
    # accuracies equal: the perplexity decides "partly"/"differs" rather than "a tie"
    assert versus(b, a, "B", "A", -1)[0] == "partly"  # the paper: B worse; B's perplexity is, accuracy a tie
    assert versus(a, b, "A", "B", -1)[0] == "differs"  # the paper: A worse; A's perplexity is better
    assert versus(a, a, "A", "A", -1)[0] == "a tie"


def test_the_page_holds_every_artifact_with_its_verdict(tmp_path):
    root = _tree(tmp_path, fig4_distill=_m(187.4, 0.54, 0.70))
    proc = _run(root)
    assert proc.returncode == 0, proc.stderr
    page = (root / "paper" / "README.md").read_text()
    for art in ARTIFACTS:  # every artifact's table (with its caption) and figure, by a relative link
        assert f"## {art.id}: {art.title}" in page and f"{art.id} caption." in page
        if art.figure:
            assert f"](figures/{art.figure})" in page
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[2] for line in page.splitlines()
            if line.startswith("| ") and "`dvc repro" in line}
    # LayerChop 62.0 general vs one-shot 2:4 55-56 (z > 2) but 58.0 vs SparseGPT 2:4 + CPT (z 1.9: a tie); in-domain
    # 80 vs 82 a tie, vs 67 and 75 better: no comparison against the paper, some ties -> partly
    assert rows["Figure 1"] == "**partly**"
    assert rows["Table 3"] == "**agrees**"  # 1.82 (LayerChop's first quartile) above 1.04 (2:4's third)
    assert rows["Figure 4"] == "**agrees**"  # distill worse on both groups beyond noise
    assert rows["Table 6 / Figure 5"] == "**partly**"  # output worst, middle (not input) best
    assert rows["Table 4"] == rows["Table 5"] == "**descriptive**"
    assert "Fixed layouts by validation perplexity after recovery: middle 43.3, input 53.5" in page
    # as Table 2, the mean over the dense model's three tasks: (.80 + .80 + .62) / 3 = .740 against
    # (.94 + .94 + .66) / 3 = .8467: -12.6 % at 50 % of the decoder layers, within two errors of the paper's
    # -12.1 / -12.8 % (error: hypot(sqrt(2 * .16 + .2356) / 3, sqrt(2 * .0564 + .2244) / 3) / 1000**.5 / .8467
    # = 1.18 %)
    assert ("changes by -12.6 % (± 1.2) relative to the dense model with 50 % of the decoder layers removed"
            in page) and rows["Table 2"] == "**agrees**"
    assert rows["Main table"] == "**agrees**"  # (80 - 32) / (94 - 32) = 77 % in-domain, (62 - 50) / (66 - 50) = 75 % general


def test_distillation_within_noise_is_not_called_worse(tmp_path, monkeypatch, capsys):
    root = _tree(tmp_path, fig4_distill=_m(187.4, 0.615, 0.795))  # perplexity worse, accuracy within noise
    assert _run_here(root, monkeypatch, capsys)[0] == 0
    page = (root / "paper" / "README.md").read_text()
    assert "| Figure 4 | LayerChop against CHOP + distill at equal compute | **partly** |" in page


@pytest.mark.parametrize("path,content,message", [
    ("data/eval/fig4-distill/curve.json", {"points": []}, "not a curve with evaluated points"),
    ("data/eval/layerchop/metrics.json", {"params": 1}, "not an evaluation's metrics (no val/ppl)"),
    ("data/bench/metrics.json", {"query": {"batch": 1, "prompt": 128}, "cells": []},
     "not a bench record with the query's cell"),
])
def test_a_malformed_input_names_its_file_and_writes_nothing(tmp_path, monkeypatch, capsys, path, content, message):
    root = _tree(tmp_path, fig4_distill=_m(187.4, 0.54, 0.70))
    (root / path).write_text(json.dumps(content))
    rc, err = _run_here(root, monkeypatch, capsys)
    assert rc == 2 and f"{path}: {message}" in err and len(err.strip().splitlines()) == 1, err
    assert not (root / "paper" / "README.md").exists()


@pytest.mark.parametrize("missing", ["data/eval/fig6/every8192/curve.json", "paper/figures/fig6_gradual.png",
                                     "paper/tables/distill.md"])
def test_a_missing_input_names_its_file_and_writes_nothing(tmp_path, monkeypatch, capsys, missing):
    root = _tree(tmp_path, fig4_distill=_m(187.4, 0.54, 0.70))
    (root / missing).unlink()
    rc, err = _run_here(root, monkeypatch, capsys)
    assert rc == 2 and f"{missing}: not found" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (root / "paper" / "README.md").exists()


def _items(correct: dict[str, list[int]]) -> list[dict]:
    """Per-item rows (``items.csv``) with each task's primary metric set from ``correct``."""
    metric = {"piqa": "acc_norm", "heldout_continuation": "acc", "heldout_lastword": "acc_norm"}
    return [{"task": t, "doc_id": i, "doc_hash": f"h{t}{i}", "target": 0, "pred": 0,
             "acc": c if metric[t] == "acc" else None, "acc_norm": c if metric[t] == "acc_norm" else None}
            for t, cs in correct.items() for i, c in enumerate(cs)]


def test_comparisons_with_per_item_results_are_paired():
    """Where both evaluations wrote ``items.csv``, a comparison is McNemar's test over the items they both answered:
    two models 4 points apart on 1000 PIQA items are a tie unpaired (z = 1.8) but, when they disagree on 40 items
    only, all in a's favour, a finding; when they disagree on 400 items, 220 against 180, a tie again."""
    from layerchop.report.compare import compare
    from layerchop.report.tables import ITEMS

    def pair(a_only: int, b_only: int) -> tuple[dict, dict]:
        both = 560 - b_only  # a right on 600 items, b on 560
        a = [1] * (both + a_only) + [0] * b_only + [0] * (1000 - both - a_only - b_only)
        b = [1] * both + [0] * a_only + [1] * b_only + [0] * (1000 - both - a_only - b_only)
        ma, mb = _m(50.0, sum(a) / 1000, 0.8), _m(50.0, sum(b) / 1000, 0.8)
        return {**ma, ITEMS: _items({"piqa": a})}, {**mb, ITEMS: _items({"piqa": b})}

    a, b = pair(40, 0)
    unpaired = compare({k: v for k, v in a.items() if k != ITEMS}, b, "general")
    assert unpaired.paired is None and unpaired.sign == 0 and round(unpaired.z, 1) == 1.8
    c = compare(a, b, "general")
    assert c.paired.test == "McNemar exact" and c.paired.items == 1000 and c.sign == 1
    assert "paired over 1000 items, 40 vs 0 answered by one only: McNemar exact" in c.text()
    a, b = pair(220, 180)
    assert compare(a, b, "general").sign == 0  # p = 0.05: a tie
    # a group whose task has no items in one of them falls back to the unpaired errors
    assert compare(a, b, "in-domain").paired is None


def test_the_stage_reads_items_csv_beside_the_metrics(tmp_path):
    from layerchop.evaluate.harness import write_items
    from layerchop.report.paper import Inputs
    from layerchop.report.tables import ITEMS

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.json").write_text(json.dumps(_m(50.0, 0.6, 0.8)))
    inp = Inputs(tmp_path, tmp_path / "bench.json", {})
    assert ITEMS not in inp.metrics("x")
    write_items(tmp_path / "x" / "items.csv", _items({"piqa": [1, 0, 1]}))
    assert [r["acc_norm"] for r in inp.metrics("x")[ITEMS]] == [1, 0, 1]


def test_the_paper_stage_depends_on_every_file_it_reads(tmp_path):
    """Every metrics, curve, per-item and bench file the page reads is a dependency of dvc.yaml's paper stage (a
    file, or a folder above it): a re-run evaluation must re-run the page."""
    from layerchop.evaluate.harness import write_items
    from layerchop.report.paper import Inputs, paper_readme

    root = _tree(tmp_path, fig4_distill=_m(187.4, 0.54, 0.70))
    ev = root / "data" / "eval"
    for d in [p.parent for p in ev.rglob("metrics.json")] + [p.parent for p in ev.rglob("curve.json")]:
        write_items(d / "items.csv", _items({"piqa": [1, 0, 1]}))
    balanced = ev / "fig4-distill-balanced"
    balanced.mkdir()
    (balanced / "curve.json").write_text((ev / "fig4-distill" / "curve.json").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for replicas in params["arms"]["seeds"].values():  # each replica: a copy of its arm's evaluation
        for r in replicas:
            (ev / "seeds" / r).mkdir(parents=True, exist_ok=True)
            write_items(ev / "seeds" / r / "items.csv", _items({"piqa": [1, 0, 1]}))
            (ev / "seeds" / r / "metrics.json").write_text(json.dumps(_m(50.0, 0.6, 0.8)))
    inputs = Inputs(eval=Path("data/eval"), bench=Path("data/bench/metrics.json"), params=params)
    cwd = Path.cwd()
    try:
        import os

        os.chdir(root)
        paper_readme(Path("paper/tables"), Path("paper/figures"), inputs, relative_to=Path("paper"))
    finally:
        os.chdir(cwd)
    deps = [str(d).split("#")[0].strip() for d in
            yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["paper"]["deps"]]
    read = sorted({p.as_posix() for p in inputs.read})
    assert any(r.endswith("items.csv") for r in read) and "data/eval/fig4-distill-balanced/curve.json" in read
    assert "data/eval/seeds/layerchop-seed1/items.csv" in read  # the replicas, where arms.seeds names them
    missing = [r for r in read if not any(r == d or r.startswith(d.rstrip("/") + "/") for d in deps)]
    assert not missing, f"dvc.yaml paper: deps miss {missing}"
