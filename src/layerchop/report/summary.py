"""The headline numbers of an evaluation, small enough for ``dvc metrics show`` and ``dvc exp show``.

``metrics.json`` of ``layerchop evaluate`` holds every number (each task's acc and acc_norm with their standard
errors, timings); ``summary.json`` beside it holds what a reader compares models by, with the same keys for every
model so that ``dvc metrics show`` is one narrow table: perplexity on each split, the in-domain average of the
primary metrics (with its standard error), and each general task's primary metric with its standard error and item
count. Accuracies are in percent.
"""

from __future__ import annotations

import math
from typing import Any

from layerchop.report.tables import mean_accuracy, seed_runs, seeds_acc, split_columns, task_columns


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """``summary.json`` of one evaluation's ``metrics.json``."""
    def pct(x):
        return None if x is None else round(100 * x, 2)

    out: dict[str, Any] = {"val_ppl": metrics.get("val/ppl"), "test_ppl": metrics.get("test/ppl")}
    out = {k: None if v is None else round(float(v), 3) for k, v in out.items()}
    in_domain, general = split_columns(task_columns([{"metrics": metrics}]))
    mean = mean_accuracy(metrics, in_domain)
    if mean is not None:
        out["in_domain"], out["in_domain_se"] = pct(mean[0]), pct(mean[1])
    for task, metric in general:
        if f"eval/{task}/{metric}" in metrics:
            out[task] = pct(metrics[f"eval/{task}/{metric}"])
            out[f"{task}_se"] = pct(metrics.get(f"eval/{task}/{metric}_stderr"))
            out[f"{task}_n"] = metrics.get(f"eval/{task}/n")
    return out


HEADLINE = ("dense", "chopped", "layerchop")
"""The evaluations (under ``data/eval``) the pipeline's headline compares: the dense model, the chopped model and
LayerChop, the chopped model after continued pretraining."""


def recovered_share(dense: dict[str, Any], chopped: dict[str, Any], recovered: dict[str, Any]) -> dict[str, Any]:
    """Per task group (``in_domain``, ``general``): the share (%) of the accuracy points chopping lost that
    continued pretraining brought back, ``100 (recovered - chopped) / (dense - chopped)`` on the mean primary
    metric (``recovered``'s mean over its seeds where it has replicas); None where a group has no task, or where
    chopping lost no more than two standard errors of the difference (a share of noise would be meaningless)."""
    rows = [{"metrics": m} for m in (dense, chopped, recovered)]
    out: dict[str, Any] = {}
    for name, cols in zip(("in_domain", "general"), split_columns(task_columns(rows))):
        means = [mean_accuracy(dense, cols), mean_accuracy(chopped, cols), seeds_acc(recovered, cols)]
        if any(x is None for x in means):
            out[name] = None
            continue
        (d, d_se), (c, c_se), (r, _) = means
        lost_se = math.hypot(d_se or 0.0, c_se or 0.0)
        if d - c <= 2 * lost_se or d == c:
            out[name] = None
            continue
        out[name] = round(100 * (r - c) / (d - c), 1)
    return out


def headline(dense: dict[str, Any], chopped: dict[str, Any], recovered: dict[str, Any]) -> dict[str, Any]:
    """``paper/summary.json``, the pipeline's headline: LayerChop's :func:`summary` (the same keys as every
    model's) and the share of the lost points it recovered (:func:`recovered_share`), so that ``dvc exp show
    --keep paper/summary.json`` compares experiments by one row each."""
    share = recovered_share(dense, chopped, recovered)
    return {**summary(recovered), "in_domain_recovered": share["in_domain"], "general_recovered": share["general"],
            "seeds": len(seed_runs(recovered))}  # the summary is seed 0's; the shares average over the seeds
