"""Sensitivity of CHOP + distill to its loss weights, at the Figure 4 FLOP budget.

The paper sums its distillation terms with weight 1. On SmolLM2 the hidden-state term starts ~5,800x
larger than the LM term (massive residual-stream activations), so it dominates the update. This
script re-runs the distill arm with other weights (small overrides of ``params.yaml``'s ``distill``
section), from the same chopped start and to the same ``figure4.flop_budget``, and prints compute and
quality. Prints numbers; asserts nothing. Run from the repository root after ``dvc repro``:

    python experiments/benchmarks/distill_weights.py --variants lm-kl,balanced
"""

from __future__ import annotations

import argparse
import dataclasses

from layerchop.config import load_params, section
from layerchop.evaluate.suite import evaluate_model
from layerchop.report.tables import average_accuracy
from layerchop.train.run import run

VARIANTS = {
    "paper": {},                                                     # every weight 1 (the pipeline's arm)
    "lm-kl": {"w_hid": 0.0, "w_att": 0.0, "w_emb": 0.0},             # logit distillation only
    "balanced": {"w_hid": 1e-4, "w_att": 1e-2},                      # every term ~O(LM loss) at step 0
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="lm-kl,balanced", help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--init", default="data/models/chopped")
    p.add_argument("--teacher", default="data/models/dense")
    p.add_argument("--data", default="data/prepared")
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args()
    params = load_params(args.params)
    base = section("distill", params)
    budget = section("figure4", params).flop_budget
    cfg = dataclasses.replace(section("train", params), token_budget=None, flop_budget=budget)
    eval_cfg = section("evaluate", params)
    rows = []
    for name in args.variants.split(","):
        distill = dataclasses.replace(base, **VARIANTS[name])
        out = f"data/models/kdvar-{name}"
        meta = run(args.init, args.data, out, cfg, run_dir=f"data/checkpoints/kdvar-{name}",
                     log_csv=f"data/runs/kdvar-{name}.csv", objective="distill", teacher_dir=args.teacher,
                     distill_cfg=distill)
        metrics, _ = evaluate_model(out, args.data, eval_cfg)
        cols = [(k.split("/")[1], k.split("/")[2]) for k in metrics if k.startswith("eval/")
                and k.endswith(("/acc", "/acc_norm")) and not k.endswith("_stderr")]
        primary = {"heldout_continuation": "acc", "heldout_lastword": "acc_norm"}
        cols = sorted({(t, primary.get(t, m)) for t, m in cols})
        c = meta["compute"]
        rows.append((name, distill, c, metrics, average_accuracy(metrics, cols)))
    print(f"\nFLOP budget {budget:.3g} per run")
    print("| variant | weights (lm, kl, hid, att, emb) | steps | tokens | FLOPs | s/step | val ppl | test ppl | avg acc |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, d, c, m, avg in rows:
        w = f"{d.w_lm:g}, {d.w_kl:g}, {d.w_hid:g}, {d.w_att:g}, {d.w_emb:g}"
        print(f"| {name} | {w} | {c['steps']} | {c['tokens']:,} | {c['flops']:.3e} | {c['s_per_step']:.2f} | "
              f"{m['val/ppl']:.2f} | {m['test/ppl']:.2f} | {100 * avg:.1f} |")


if __name__ == "__main__":
    main()
