"""What DVC shows: ``dvc metrics show`` lists one narrow summary per model of the main table and Figure 1 (the same
keys for every model), ``dvc plots show`` the paper's figures as images and the trained arms' losses overlaid;
compute records, per-step logs and the latency measurements are plain outputs."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def stage_entries(field: str) -> dict[str, list[str]]:
    """``{stage: [path, ...]}`` of ``field`` (outs / metrics / plots) in dvc.yaml, templated paths as written."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        out[name] = [e if isinstance(e, str) else next(iter(e)) for e in body.get(field) or []]
    return out


def test_metrics_are_the_models_summaries_and_the_pipelines_headline_only():
    metrics = {name: paths for name, paths in stage_entries("metrics").items() if paths}
    assert metrics == {"evaluate": ["data/eval/${item}/summary.json"],
                       "oneshot_evaluate": ["data/eval/oneshot/${item.method}-${item.pattern}/summary.json"],
                       "report": ["paper/summary.json"]}
    assert not any(stage_entries("plots").values())  # per-stage plots: none (the top-level plots section)
    outs = [p for paths in stage_entries("outs").values() for p in paths]
    for plain in ("data/bench/metrics.json", "data/runs/${key}.json", "data/runs/${key}.csv",
                  "data/eval/${item}/metrics.json", "data/eval/${item.run}/summary.json"):
        assert plain in outs, plain


def test_plots_are_stage_outputs_and_the_overlay_names_trained_arms():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    outs = {p for paths in stage_entries("outs").values() for p in paths}
    images = [p for p in pipeline["plots"] if isinstance(p, str)]
    assert images and all(p.endswith(".png") and p in outs for p in images), images
    produced = sorted(p for p in outs if p.startswith("paper/figures/") and p.endswith(".png"))
    assert sorted(images) == produced  # every figure the pipeline draws, none that it does not
    [overlay] = [p["training-loss"] for p in pipeline["plots"] if isinstance(p, dict)]
    assert overlay["x"] == "step" and set(overlay["y"].values()) == {"train/loss"}
    # the train stage (foreach over arms.trained) writes data/runs/<arm>.csv
    assert "data/runs/${key}.csv" in stage_entries("outs")["train"]
    assert sorted(overlay["y"]) == sorted(f"data/runs/{arm}.csv" for arm in params["arms"]["trained"]
                                          if arm not in params["arms"]["replicas"])  # not the seed replicas
