"""Stage ``figure2``: LayerChop against the same half-depth architecture pretrained from scratch (Figure 2,
``scratch.md``), from metrics files only.

Example::

    layerchop figure2 --layerchop data/eval/fig4-layerchop/curve.json --scratch data/eval/fig2-scratch/curve.json \\
        --start data/eval/chopped/metrics.json --dense data/eval/dense/metrics.json --tables paper/tables \\
        --figures paper/figures
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import load_params, section
from layerchop.io import read_json, staged
from layerchop.report.compute import arm_series, figure2, points_table
from layerchop.report.compare import curve_comparisons
from layerchop.report.tables import accuracy_caption, accuracy_cells, accuracy_header, fmt_ppl, markdown, task_columns


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layerchop", required=True, help="curve.json of the LayerChop run")
    p.add_argument("--scratch", required=True, help="curve.json of the from-scratch run")
    p.add_argument("--start", required=True, help="metrics.json of the chopped start")
    p.add_argument("--dense", default=None, help="metrics.json of the uncompressed model (a dotted reference line)")
    p.add_argument("--tables", required=True, help="output directory for scratch.md")
    p.add_argument("--figures", required=True, help="output directory for fig2_scratch_vs_layerchop.{png,pdf}")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    fig2, train = section("figure2", params), section("train", params)
    for key in ("layerchop", "scratch", "start", "dense"):
        if getattr(args, key) is not None and not Path(getattr(args, key)).exists():
            raise FileNotFoundError(f"--{key}: {getattr(args, key)} does not exist")
    lc, sc, start = read_json(args.layerchop), read_json(args.scratch), read_json(args.start)
    if lc["compute"]["tokens"] != sc["compute"]["tokens"]:
        raise ValueError(f"--scratch {args.scratch} trained {sc['compute']['tokens']:,} tokens but --layerchop "
                         f"{lc['compute']['tokens']:,}: Figure 2 compares equal budgets")
    cols = task_columns([{"metrics": start}] + [{"metrics": p["metrics"]} for c in (lc, sc) for p in c["points"]])
    arms = [{"label": "LayerChop (chopped + continued pretraining)", "series": arm_series(lc, start, cols),
             "compute": lc["compute"]},
            {"label": "same architecture from scratch", "series": arm_series(sc, None, cols), "compute": sc["compute"]}]
    finals = [{"metrics": a["series"][-1]["metrics"]} for a in arms]
    reference = None if args.dense is None else {**arm_series({"points": []}, read_json(args.dense), cols)[0],
                                                 "label": "dense (uncompressed)"}
    header = ["Arm", "Peak LR", "Steps", "Tokens", "Train FLOPs", "Val PPL", "Test PPL"] + accuracy_header(finals, cols)
    body = []
    for arm, lr in zip(arms, (train.lr, fig2.lr)):
        c, m = arm["compute"], arm["series"][-1]["metrics"]
        body.append([arm["label"], f"{lr:g}", str(c["steps"]), f"{c['tokens']:,}", f"{c['flops']:.3e}",
                     fmt_ppl(m.get("val/ppl")), fmt_ppl(m.get("test/ppl"))] + accuracy_cells(m, cols))
    caption = (
        f"Both arms have the chopped model's architecture ({start['layers']} layers) and train on the same data "
        f"order with the same batch, budget and schedule (warmup {train.warmup_steps}, cosine to "
        f"{train.min_lr_ratio}x): LayerChop from the chopped pretrained weights at lr {train.lr}, the other from "
        f"transformers' standard random initialisation (seed {fig2.seed}) at lr {fig2.lr}. "
    ) + accuracy_caption(section("download", params).corpus, finals, section("evaluate", params))
    caption += " " + curve_comparisons([(args.layerchop, args.scratch, "LayerChop against the same architecture from "
                                                                       "scratch, at the end (one seed each)")])
    pheader, points = points_table(arms, cols)
    text = markdown(header, body, caption)
    text += "\n### Evaluations along the runs\n\n" + markdown(
        pheader, points, "Step 0 of LayerChop is the chopped model before training; the scratch arm's first point is "
                         "its first snapshot.")
    with staged(args.tables, args.figures) as (tables, figures):  # all outputs or none
        (tables / "scratch.md").write_text(text)
        figure2(arms, figures / "fig2_scratch_vs_layerchop", reference)
    print(text)
