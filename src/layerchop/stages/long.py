"""Stage ``long``: the long-budget curve, LayerChop against the other arms along one pass of the data (``long.md``).

The other arms of ``long.arms``: SparseGPT 2:4 + continued pretraining and the dense control. Does LayerChop's gap to
the 2:4 arm narrow as recovery grows, as the paper's long-budget result implies?

Reads only metrics files: each arm's ``curve.json`` under ``--curves`` (``long_curve@<arm>``), its final model's
``items.csv`` for the paired test at the end, the chopped start's and the dense model's ``metrics.json``.

Example::

    layerchop long --curves data/eval/long --start data/eval/chopped/metrics.json \\
        --dense data/eval/dense/metrics.json --tables paper/tables --figures paper/figures
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from layerchop.config import load_params, section
from layerchop.io import read_json, staged
from layerchop.report.compute import arm_series, figure2, points_table
from layerchop.report.tables import accuracy_caption, markdown, task_columns

LABELS = {"layerchop": "LayerChop", "sparsegpt-2of4_cpt": "SparseGPT 2:4 + continued pretraining",
          "dense_cpt": "dense + continued pretraining"}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curves", required=True, help="directory of <arm>/curve.json, one per long.arms")
    p.add_argument("--start", required=True, help="metrics.json of the chopped model (LayerChop's start)")
    p.add_argument("--dense", required=True, help="metrics.json of the uncompressed model (a dotted reference line)")
    p.add_argument("--tables", required=True, help="output directory for long.md")
    p.add_argument("--figures", required=True, help="output directory for long_budget.{png,pdf}")


MATCH = 0.02
"""Two arms' evaluations are set side by side when their token counts differ by at most this fraction (LayerChop's
warm step shifts its snapshots by one step: 77 against 76)."""


def gaps(lc: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LayerChop's gap to another arm at each evaluation of LayerChop's with one of the other's at about the same
    tokens (:data:`MATCH`): perplexity ratio and accuracy differences (points), with the unpaired error of each
    difference (snapshots have no per-item results)."""
    import math

    out = []
    for p in lc:
        if not p["tokens"] or p["val_ppl"] is None:
            continue
        q = min(other, key=lambda x: abs(x["tokens"] - p["tokens"]), default=None)
        if q is None or q["val_ppl"] is None or abs(q["tokens"] - p["tokens"]) > MATCH * p["tokens"]:
            continue
        row: dict[str, Any] = {"step": p["step"], "other_step": q["step"], "tokens": p["tokens"],
                               "ppl_ratio": p["val_ppl"] / q["val_ppl"]}
        for g in ("in_domain", "general"):
            if p[g] is not None and q[g] is not None:
                se = (math.hypot(p[g][1], q[g][1]) if p[g][1] is not None and q[g][1] is not None else None)
                row[g] = (100 * (p[g][0] - q[g][0]), None if se is None else 100 * se)
        out.append(row)
    return out


def _diff(x: Optional[tuple[float, Optional[float]]]) -> str:
    if x is None:
        return "–"
    return f"{x[0]:+.1f}" + ("" if x[1] is None else f" ± {x[1]:.1f}")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    cfg = section("long", params)
    for key in ("start", "dense"):
        if not Path(getattr(args, key)).exists():
            raise FileNotFoundError(f"--{key}: {getattr(args, key)} does not exist")
    curves = {}
    for arm in cfg.arms:
        path = Path(args.curves) / arm / "curve.json"
        if not path.exists():
            raise FileNotFoundError(f"long.arms lists {arm} but {path} does not exist (run long_curve@{arm})")
        curves[arm] = read_json(path)
    start, dense = read_json(args.start), read_json(args.dense)
    if not curves:
        text = markdown(["Arm"], [], "No long-budget runs in this profile (`long.arms` is empty): its own budget is "
                                     "the long one.")
        with staged(args.tables, args.figures) as (tables, figures):
            (tables / "long.md").write_text(text)
            figure2([], figures / "long_budget", title="No long-budget runs in this profile (long.arms is empty)")
        print(text)
        return
    cols = task_columns([{"metrics": m} for m in (dense, start)]
                        + [{"metrics": p["metrics"]} for c in curves.values() for p in c["points"]])
    arms = [{"name": arm, "label": LABELS.get(arm, arm), "compute": c["compute"],
             "series": arm_series(c, start if arm == "layerchop" else None, cols)} for arm, c in curves.items()]
    reference = {**arm_series({"points": []}, dense, cols)[0], "label": "dense (uncompressed)"}
    pheader, points = points_table(arms, cols)
    caption = (
        f"Each arm trains {cfg.token_budget:,} tokens (one pass over the train split, train.lr, warmup and cosine over "
        f"the whole run, so its snapshots are not the shorter runs' end points), evaluated at {cfg.snapshots} "
        "snapshots and at the end. LayerChop starts at the chopped model (step 0) with the shared one-step warm "
        "start, not scaled to the longer run. "
    ) + accuracy_caption(section("download", params).corpus, [{"metrics": a["series"][-1]["metrics"]} for a in arms],
                         section("evaluate", params))
    text = markdown(pheader, points, caption)
    by_name = {a["name"]: a for a in arms}
    if "layerchop" in by_name:
        from layerchop.report.compare import comparison_sentences
        from layerchop.report.tables import load_evaluation

        for other in (a for a in arms if a["name"] != "layerchop"):
            rows = gaps(by_name["layerchop"]["series"], other["series"])
            header = ["Step (LayerChop / other)", "Tokens (LayerChop)", "Val PPL ratio (LayerChop / other)",
                      "In-domain gap (points)", "General gap (points)"]
            body = [[f"{r['step']} / {r['other_step']}", f"{r['tokens']:,}", f"{r['ppl_ratio']:.3f}",
                     _diff(r.get("in_domain")), _diff(r.get("general"))] for r in rows]
            finals = [{"name": a["name"], "metrics": load_evaluation(Path(args.curves), a["name"], "--curves")}
                      for a in (by_name["layerchop"], other)]
            end = comparison_sentences(finals, [("layerchop", other["name"], f"At the end, LayerChop against "
                                                                             f"{other['label']}")])
            trend = ""
            if len(rows) >= 2:
                first, last = rows[0], rows[-1]
                trend = (f"The perplexity ratio goes from {first['ppl_ratio']:.3f} at step {first['step']} to "
                         f"{last['ppl_ratio']:.3f} at step {last['step']} "
                         f"({'narrowing' if abs(last['ppl_ratio'] - 1) < abs(first['ppl_ratio'] - 1) else 'not narrowing'}"
                         " in perplexity; accuracy gaps at the snapshots carry unpaired errors: a gap within two of "
                         "them is a tie). ")
            text += (f"\n### LayerChop against {other['label']} along the runs\n\n"
                     + markdown(header, body, trend + end))
    with staged(args.tables, args.figures) as (tables, figures):  # all outputs or none
        (tables / "long.md").write_text(text)
        figure2(arms, figures / "long_budget", reference,
                title="The long budget: LayerChop against " + " and ".join(a["label"] for a in arms
                                                                            if a["name"] != "layerchop"))
    print(text)
