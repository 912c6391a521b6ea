"""The headline numbers of an evaluation, small enough for ``dvc metrics show`` and ``dvc exp show``.

``metrics.json`` of ``layerchop evaluate`` holds every number (each task's acc and acc_norm with their standard
errors, timings); ``summary.json`` beside it holds what a reader compares models by, with the same keys for every
model so that ``dvc metrics show`` is one narrow table: perplexity on each split, the in-domain average of the
primary metrics (with its standard error), and each general task's primary metric with its standard error and item
count. Accuracies are in percent.
"""

from __future__ import annotations

from typing import Any

from layerchop.report.tables import mean_accuracy, split_columns, task_columns


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
