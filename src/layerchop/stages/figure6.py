"""Stage ``figure6``: when to chop, gradual chopping (one layer every N tokens) against all at once (Figure 6,
``gradual.md``), from metrics files only.

Example::

    layerchop figure6 --gradual data/eval/fig6 --at-once data/eval/fig4-layerchop/curve.json \\
        --dense data/eval/dense/metrics.json --start data/eval/chopped/metrics.json --tables paper/tables \\
        --figures paper/figures
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import load_params, section
from layerchop.io import read_json, staged
from layerchop.report.compute import arm_series, figure6, points_table
from layerchop.report.compare import curve_comparisons
from layerchop.report.tables import accuracy_caption, accuracy_cells, accuracy_header, fmt_ppl, markdown, task_columns


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gradual", required=True, help="directory of every<N>/curve.json, one per figure6.every_tokens")
    p.add_argument("--at-once", required=True, help="curve.json of the all-at-once LayerChop run (Figure 4's)")
    p.add_argument("--dense", required=True, help="metrics.json of the uncompressed model (the gradual runs' start)")
    p.add_argument("--start", required=True, help="metrics.json of the chopped model (the all-at-once run's start)")
    p.add_argument("--tables", required=True, help="output directory for gradual.md")
    p.add_argument("--figures", required=True, help="output directory for fig6_gradual.{png,pdf}")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    fig6, train = section("figure6", params), section("train", params)
    for key in ("at_once", "dense", "start"):
        if not Path(getattr(args, key)).exists():
            raise FileNotFoundError(f"--{key.replace('_', '-')}: {getattr(args, key)} does not exist")
    curves = {}
    for n in fig6.every_tokens:
        path = Path(args.gradual) / f"every{n}" / "curve.json"
        if not path.exists():
            raise FileNotFoundError(f"figure6.every_tokens lists {n} but {path} does not exist (run fig6_curve@{n})")
        curves[n] = read_json(path)
    once, dense, start = read_json(args.at_once), read_json(args.dense), read_json(args.start)
    tokens = {"all at once": once["compute"]["tokens"], **{n: c["compute"]["tokens"] for n, c in curves.items()}}
    if len(set(tokens.values())) > 1:
        raise ValueError(f"the runs trained different token counts {tokens}: Figure 6 compares equal budgets "
                         "(figure6.token_budget must be what Figure 4's LayerChop arm trains)")
    cols = task_columns([{"metrics": m} for m in (dense, start)]
                        + [{"metrics": p["metrics"]} for c in (once, *curves.values()) for p in c["points"]])
    warm = once["compute"].get("warm_start") or {}  # the all-at-once run's steps on the dense model, if any
    warm_steps = int(warm.get("steps", 0))
    arms = [{"label": "all at once (LayerChop)", "series": arm_series(once, start, cols), "compute": once["compute"],
             "every": None, "removed_at": warm_steps,
             "last_removal": {"tokens": warm["tokens"], "flops": warm["flops"]} if warm_steps else None}]
    for n, c in curves.items():
        sched = c["compute"].get("chop_schedule")
        where = Path(args.gradual) / f"every{n}" / "curve.json"
        if sched is None:
            raise ValueError(f"{where}: its run has no chop_schedule (not trained with --chop-every-tokens)")
        tokens_per_step = sched["every_tokens"] // sched["every_steps"]
        if round(n / tokens_per_step) != sched["every_steps"]:
            raise ValueError(f"{where}: its run removed a layer every {sched['every_tokens']:,} tokens, not the "
                             f"{n:,} of figure6.every_tokens (a stale curve: re-run fig6_train@{n})")
        last, total = sched["removal_steps"][-1], c["compute"]["steps"]
        arms.append({"label": f"every {sched['every_tokens']:,} tokens (last removal at {100 * last / total:.1f} %)",
                     "series": arm_series(c, dense, cols), "compute": c["compute"], "every": sched,
                     "removed_at": last,
                     "last_removal": {"tokens": sched["removal_tokens"][-1], "flops": sched["removal_flops"][-1]}})
    finals = [{"metrics": a["series"][-1]["metrics"]} for a in arms]
    header = (["Schedule", "Every (tokens)", "Last removal (step)", "Steps", "Tokens", "Train FLOPs", "FLOPs vs at once",
               "Val PPL", "Test PPL"] + accuracy_header(finals, cols))
    body = []
    for arm in arms:
        c, m, s = arm["compute"], arm["series"][-1]["metrics"], arm["every"]
        body.append([arm["label"], f"{s['every_tokens']:,}" if s else "-", str(arm["removed_at"]), str(c["steps"]),
                     f"{c['tokens']:,}", f"{c['flops']:.3e}", f"{c['flops'] / once['compute']['flops']:.2f}x",
                     fmt_ppl(m.get("val/ppl")), fmt_ppl(m.get("test/ppl"))] + accuracy_cells(m, cols))
    n_removed = len(arms[1]["every"]["order"])
    at_once = ("every layer removed before the first step" if not warm_steps else
               f"{warm_steps} steps on the uncompressed model (the warm start), then every layer at once")
    caption = (
        f"Gradual chopping: each run starts from the uncompressed model ({dense['layers']} layers) and removes one of "
        f"the {n_removed} layers of the chopped model's layout every N tokens of continued pretraining, in the "
        f"layout's order (ascending layer index), until the chopped depth ({start['layers']} layers); all at once is "
        f"Figure 4's LayerChop arm ({at_once}). All runs: the same {tokens['all at once']:,} tokens, data order, "
        f"batch and schedule (peak lr {train.lr}, warmup {train.warmup_steps}, cosine to {train.min_lr_ratio}x). "
        "FLOPs count every step at the depth the model had then (the ratio column). "
    ) + accuracy_caption(section("download", params).corpus, finals, section("evaluate", params))
    caption += " " + curve_comparisons([(str(Path(args.gradual) / f"every{n}" / "curve.json"), args.at_once,
                                         f"One layer every {n:,} tokens against all at once, at the end (one seed each)")
                                        for n in fig6.every_tokens])
    pheader, points = points_table(arms, cols)
    text = markdown(header, body, caption)
    text += "\n### Evaluations along the runs\n\n" + markdown(
        pheader, points, "Step 0 is the run's start: the chopped model (all at once"
                         + (", before the warm start's steps" if warm_steps else "") + ") or the uncompressed model "
                         "(gradual). A gradual run's intermediate points are of intermediate depth.")
    with staged(args.tables, args.figures) as (tables, figures):  # all outputs or none
        (tables / "gradual.md").write_text(text)
        figure6(arms, figures / "fig6_gradual")
    print(text)

