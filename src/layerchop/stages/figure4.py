"""Stage ``figure4``: LayerChop vs LayerChop + distill (the paper's unweighted sum, and balanced terms) at equal
training FLOPs (Figure 4, ``distill.md``).

Reads only metrics files: each arm's ``curve.json`` (evaluations along the run, with the compute spent
to reach each point), the chopped start's ``metrics.json`` and, for the dotted reference line, the dense model's.

Example::

    layerchop figure4 --curves data/eval/fig4-layerchop/curve.json data/eval/fig4-distill/curve.json \\
        data/eval/fig4-distill-balanced/curve.json --start data/eval/chopped/metrics.json \\
        --dense data/eval/dense/metrics.json --tables paper/tables --figures paper/figures
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import load_params, section
from layerchop.io import read_json, staged
from layerchop.report.compute import arm_series, balance_sentence, distill_tables, figure4, load_arms
from layerchop.report.compare import comparison_sentences
from layerchop.report.tables import SEEDS_NOTE, accuracy_caption, load_evaluation, markdown, seed_runs, table_rows


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curves", nargs="+", required=True, help="curve.json of each arm")
    p.add_argument("--start", required=True, help="metrics.json of the shared chopped start")
    p.add_argument("--dense", default=None, help="metrics.json of the uncompressed model (a dotted reference line)")
    p.add_argument("--tables", required=True, help="output directory for distill.md")
    p.add_argument("--figures", required=True, help="output directory for fig4_distill_vs_layerchop.{png,pdf}")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    cfg, distill, train = section("figure4", params), section("distill", params), section("train", params)
    for c in args.curves:
        if not Path(c).exists():
            raise FileNotFoundError(f"--curves: {c} does not exist (run `layerchop curve` first)")
    if args.dense is not None and not Path(args.dense).exists():
        raise FileNotFoundError(f"--dense: {args.dense} does not exist (run `layerchop evaluate` on the dense model)")
    arms, cols = load_arms([read_json(c) for c in args.curves], read_json(args.start))
    reference = None if args.dense is None else {**arm_series({"points": []}, read_json(args.dense), cols)[0],
                                                 "label": "dense (uncompressed)"}
    header, body, pheader, points = distill_tables(arms, cfg, cols)
    weights = ", ".join(f"{k} {getattr(distill, k)}" for k in ("w_lm", "w_kl", "w_hid", "w_att", "w_emb"))
    caption = (
        f"Every arm starts from the same chopped model and trains to the same budget of {cfg.flop_budget:.3g} FLOPs "
        f"(each stops at the last whole step within it), AdamW peak lr {train.lr}, warmup {train.warmup_steps}, "
        f"cosine to {train.min_lr_ratio}x over each arm's own steps, batch {train.batch_size} x "
        f"{train.accumulate}. Distillation loss weights: {weights}; KL temperature {distill.temperature}; the "
        f"teacher is the uncompressed model. {balance_sentence(arms)}FLOPs: matmul FLOPs of one step measured with torch's FLOP counter "
        f"(student forward + backward, plus the teacher's forward for distillation). {cfg.gpu}-hours assume "
        f"{cfg.gpu_peak_flops / 1e12:.0f} TFLOP/s peak at {cfg.mfu:.0%} MFU (an assumption, not a measurement); "
        f"device-hours and s/step are measured wall time of the optimizer steps on the machine that ran the "
        f"pipeline. "
    ) + accuracy_caption(section("download", params).corpus, [{"metrics": arm["series"][-1]["metrics"]}
                                                             for arm in arms], section("evaluate", params))
    # the claims, with their tests: each arm's final model (the curve's metrics.json, items.csv, seed replicas)
    rows = [{"name": Path(c).parent.name, "metrics": load_evaluation(Path(c).parent.parent, Path(c).parent.name,
                                                                     "--curves", section("arms", params).seeds)}
            for c in args.curves]
    names = {r["name"] for r in rows}
    if any(len(seed_runs(r["metrics"])) > 1 for r in rows):
        caption += " Comparisons at the end of training pool the seeds where an arm has replicas (`arms.seeds`)."
    caption += " " + comparison_sentences(rows, [
        (d, "fig4-layerchop", f"{label} against LayerChop") for d, label in
        (("fig4-distill", "CHOP + distill (the paper's unweighted sum)"),
         ("fig4-distill-balanced", "CHOP + distill (terms balanced at step 0)")) if d in names])
    text = markdown(header, body, caption)
    if any(len(seed_runs(r["metrics"])) > 1 for r in rows):  # the claims' numbers: each arm over its seeds
        labels = {Path(c).parent.name: arm["label"] for c, arm in zip(args.curves, arms)}
        eh, eb = table_rows([{**r, "label": labels[r["name"]]} for r in rows])
        text += "\n### At the end of training, over seeds\n\n" + markdown(eh, eb, SEEDS_NOTE.strip() + (
            " The rows above and the curves are seed 0's (the runs with snapshots)."))
    text += "\n### Evaluations along the runs\n\n" + markdown(pheader, points, "Step 0 is the shared chopped model.")
    with staged(args.tables, args.figures) as (tables, figures):  # all outputs or none
        (tables / "distill.md").write_text(text)
        figure4(arms, figures / "fig4_distill_vs_layerchop", cfg.gpu, reference=reference,
                title=f"LayerChop vs LayerChop + distill at equal training FLOPs ({cfg.gpu}-hours: "
                      "paper/tables/distill.md)" + ("; dotted: dense" if reference else ""))
    print(text)
