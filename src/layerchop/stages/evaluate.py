"""Stage ``evaluate``: perplexity on val/test and zero-shot accuracy with lm-evaluation-harness.

Example::

    layerchop evaluate --model data/models/layerchop --data data/prepared --out data/eval/layerchop
"""

from __future__ import annotations

import argparse

from layerchop.config import section
from layerchop.evaluate.harness import write_items
from layerchop.evaluate.suite import evaluate_model
from layerchop.config import check_device
from layerchop.io import atomic_dir, check_model_dir, write_json
from layerchop.machine import warn_slow_evaluation
from layerchop.report.summary import summary


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--out", required=True,
                   help="output directory (metrics.json, summary.json, results.json, items.csv: per-item results)")


def main(args: argparse.Namespace) -> None:
    cfg = section("evaluate", path=args.params)
    check_device("evaluate.device", cfg.device, available=True)
    check_model_dir(args.model, "--model")
    warn_slow_evaluation(cfg, "evaluate")
    metrics, results = evaluate_model(args.model, args.data, cfg)
    items = results.pop("items", [])
    with atomic_dir(args.out) as tmp:
        write_items(tmp / "items.csv", items)  # per item: paired comparisons between models (committed)
        write_json(tmp / "results.json", results)
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "summary.json", summary(metrics))  # the headline numbers (dvc metrics show)
    print(f"[evaluate] {args.model}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                     if isinstance(v, float)))

