"""The protocol's reports: the peak-LR rule over the sweep (``layerchop sweep``) and the long-budget curve
(``layerchop long``), from fabricated records and curves (the pipeline's own are too slow to train here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, **sections) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["arms"].update(seeds={}, replicas=[])
    for name, value in sections.items():
        params[name] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _run(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerchop.cli", *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)


def test_verdicts_of_the_lr_rule():
    from layerchop.stages.sweep import verdicts

    points = {"a": {1e-3: 50.0, 3e-4: 60.0, 3e-3: 55.0}, "b": {1e-3: 50.5, 3e-3: 50.0}, "c": {1e-3: 40.0, 3e-3: 30.0}}
    got = verdicts(points, {"a": 1e-3, "b": 1e-3, "c": 1e-3}, margin=0.02)
    edge = "; the best is at the edge of the sweep"
    assert got == {"a": "best", "b": "within 2% of the best (0.003)" + edge, "c": "not best: 0.003 gives 30.00" + edge}


def test_the_sweep_table_states_each_arms_rule_and_refuses_stale_or_missing_runs(tmp_path):
    runs = tmp_path / "runs"
    (runs / "lr-sweep").mkdir(parents=True)
    records = {"runs/layerchop.json": (1e-3, 53.5), "runs/dense_cpt.json": (1e-3, 21.0),
               "runs/lr-sweep/layerchop-lo.json": (3e-4, 71.6), "runs/lr-sweep/layerchop-hi.json": (3e-3, 58.0),
               "runs/lr-sweep/dense_cpt-lo.json": (3e-4, 19.0)}
    for path, (lr, ppl) in records.items():
        (tmp_path / path).write_text(json.dumps({"lr": lr, "val_ppl_last": ppl, "steps": 80}))
    sweep = {"arms": {"layerchop": "runs/layerchop.json", "dense_cpt": "runs/dense_cpt.json"}, "margin": 0.02,
             "runs": {"layerchop-lo": {"arm": "layerchop", "init": "x", "flags": "--warm-start", "warm": "y",
                                       "lr": 3e-4},
                      "layerchop-hi": {"arm": "layerchop", "init": "x", "flags": "--warm-start", "warm": "y",
                                       "lr": 3e-3},
                      "dense_cpt-lo": {"arm": "dense_cpt", "init": "x", "flags": "--objective lm", "warm": "y",
                                       "lr": 3e-4}}}
    params = _params(tmp_path, lr_sweep=sweep)
    argv = ["sweep", "--params", str(params), "--runs", "runs/lr-sweep", "--tables", "t", "--figures", "f"]
    proc = _run(tmp_path, *argv)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "t" / "lr_sweep.md").read_text()
    assert "| layerchop | 71.60 | **53.50** | 58.00 | 0.001 | best |" in table
    assert ("| dense_cpt | 19.00 | **21.00** | – | 0.001 | not best: 0.0003 gives 19.00; the best is at the edge of "
            "the sweep |") in table
    assert "An arm fails the rule" in table
    assert (tmp_path / "f" / "lr_sweep.png").stat().st_size > 1000
    # a run whose record has another LR than the params say is stale; a missing record names its key
    (runs / "lr-sweep" / "dense_cpt-lo.json").write_text(json.dumps({"lr": 1e-4, "val_ppl_last": 19.0}))
    proc = _run(tmp_path, *argv)
    assert proc.returncode == 2 and "lr_sweep.runs.dense_cpt-lo: its record says lr 0.0001" in proc.stderr
    (runs / "lr-sweep" / "dense_cpt-lo.json").unlink()
    proc = _run(tmp_path, *argv)
    assert proc.returncode == 2 and "lr_sweep.runs.dense_cpt-lo:" in proc.stderr and "does not exist" in proc.stderr
    # a profile without a sweep says so
    proc = _run(tmp_path, "sweep", "--params", str(_params(tmp_path, lr_sweep={"arms": {}, "runs": {}})),
                "--runs", "runs/lr-sweep", "--tables", "t2", "--figures", "f2")
    assert proc.returncode == 0, proc.stderr
    assert "No LR sweep in this profile" in (tmp_path / "t2" / "lr_sweep.md").read_text()


def _metrics(ppl: float, acc: float, n: int = 200) -> dict:
    m = {"val/ppl": ppl, "test/ppl": ppl, "params": 1e8, "layers": 15}
    for task, metric in (("piqa", "acc_norm"), ("heldout_lastword", "acc_norm")):
        m[f"eval/{task}/{metric}"] = acc
        m[f"eval/{task}/{metric}_stderr"] = math.sqrt(acc * (1 - acc) / n)
        m[f"eval/{task}/n"] = n
    return m


def test_the_long_curve_tabulates_layerchops_gap_along_the_runs(tmp_path):
    """LayerChop's gap to each other arm at every step both evaluated (a perplexity ratio, accuracy differences with
    their errors), the trend in words, and the paired test at the end where the final models have per-item results."""
    from layerchop.evaluate.harness import write_items

    ev = tmp_path / "eval"
    ppl = {"layerchop": (90.0, 60.0, 50.0), "sparsegpt-2of4_cpt": (60.0, 50.0, 45.0), "dense_cpt": (25.0, 24.0, 23.0)}
    for arm, values in ppl.items():
        (ev / "long" / arm).mkdir(parents=True)
        steps = (77, 154, 459) if arm == "layerchop" else (76, 153, 459)  # LayerChop's warm step shifts its snapshots
        points = [{"step": s, "tokens": s * 2048, "flops": s * 1e12, "device_s": s * 10.0,
                   "metrics": _metrics(v, 0.6 if arm != "layerchop" else 0.55)} for s, v in zip(steps, values)]
        (ev / "long" / arm / "curve.json").write_text(json.dumps({"objective": "lm", "points": points,
                                                                   "compute": {"tokens": 459 * 2048, "steps": 459}}))
        (ev / "long" / arm / "metrics.json").write_text(json.dumps(points[-1]["metrics"]))  # as `layerchop curve`
        write_items(ev / "long" / arm / "items.csv",
                    [{"task": "piqa", "doc_id": i, "doc_hash": f"h{i}", "target": 0, "pred": 0, "acc": None,
                      "acc_norm": int(i % 10 < (5 if arm == "layerchop" else 6))} for i in range(200)])
    for name, m in (("chopped", _metrics(9000.0, 0.5)), ("dense", _metrics(20.0, 0.7))):
        (ev / name).mkdir(parents=True)
        (ev / name / "metrics.json").write_text(json.dumps(m))
    params = _params(tmp_path)
    proc = _run(tmp_path, "long", "--params", str(params), "--curves", "eval/long", "--start",
                "eval/chopped/metrics.json", "--dense", "eval/dense/metrics.json", "--tables", "t", "--figures", "f")
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "t" / "long.md").read_text()
    assert "### LayerChop against SparseGPT 2:4 + continued pretraining along the runs" in table
    # 90 / 60 = 1.500 at step 76, 50 / 45 = 1.111 at the end: narrowing; accuracy 55 vs 60 at every step
    assert "| 77 / 76 | 157,696 | 1.500 | -5.0 ± 4.9 | -5.0 ± 4.9 |" in table, table
    assert "| 154 / 153 | 315,392 | 1.200 |" in table
    assert "The perplexity ratio goes from 1.500 at step 77 to 1.111 at step 459 (narrowing in perplexity" in table
    # at the end, paired over the 200 PIQA items: 20 answered by the 2:4 arm only (McNemar)
    assert "At the end, LayerChop against SparseGPT 2:4 + continued pretraining: general 55.0 vs 60.0" in table
    assert "0 vs 20 answered by one only: McNemar exact" in table
    assert (tmp_path / "f" / "long_budget.png").stat().st_size > 1000
    # an arm of long.arms without its curve is named
    (ev / "long" / "dense_cpt" / "curve.json").unlink()
    proc = _run(tmp_path, "long", "--params", str(params), "--curves", "eval/long", "--start",
                "eval/chopped/metrics.json", "--dense", "eval/dense/metrics.json", "--tables", "t3", "--figures", "f3")
    assert proc.returncode == 2 and "long.arms lists dense_cpt but" in proc.stderr and "long_curve@dense_cpt" in \
        proc.stderr
    assert not (tmp_path / "t3").exists()


@pytest.mark.parametrize("section", ["lr_sweep", "long"])
def test_the_protocol_sections_refuse_bad_values_naming_the_key(section):
    from layerchop.config import section as build

    bad = {"lr_sweep": {"arms": {"a": "x.json"}, "runs": {"r": {"arm": "b", "init": "i", "flags": "", "warm": "w",
                                                                 "lr": 1e-3}}},
           "long": {"token_budget": 0}}[section]
    with pytest.raises(ValueError, match={"lr_sweep": r"lr_sweep.runs.r.arm", "long": r"long.token_budget"}[section]):
        build(section, {section: bad})
