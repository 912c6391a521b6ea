"""What ``layerchop push`` adds to a model directory's card (:mod:`layerchop.cards`) when it publishes it: the
evaluation results (``model-index``) and the pipeline's commit. Kept apart from :mod:`layerchop.cards` because it
reads the reports' choice of each task's primary metric, which no stage that writes a model should depend on."""

from __future__ import annotations

from typing import Any, Optional

# evaluation metrics (metrics.json of `layerchop evaluate`) -> (metric type, dataset name) on the Hub
PERPLEXITY = {"val/ppl": ("validation", "the recovery corpus"), "test/ppl": ("test", "the recovery corpus")}


def eval_results(metrics: dict[str, Any], model_name: str) -> list:
    """``metrics.json`` of ``layerchop evaluate`` as the Hub's evaluation results: perplexity on each split, the
    primary accuracy of each task (with its standard error and item count in the source name)."""
    from huggingface_hub import EvalResult

    from layerchop.report.tables import task_columns

    results = []
    for key, (split, dataset) in PERPLEXITY.items():
        if key in metrics:
            results.append(EvalResult(task_type="text-generation", dataset_type="layerchop-corpus",
                                      dataset_name=dataset, dataset_split=split, metric_type="perplexity",
                                      metric_value=round(float(metrics[key]), 4),
                                      metric_name=f"perplexity ({metrics.get(key + '_tokens', '?')} tokens)"))
    for task, metric in task_columns([{"metrics": metrics}]):  # each task's primary metric, as the tables pick it
        value = metrics.get(f"eval/{task}/{metric}")
        if value is None:
            continue
        n, se = metrics.get(f"eval/{task}/n"), metrics.get(f"eval/{task}/{metric}_stderr")
        detail = ", ".join([*([f"n={n}"] if n else []), *([f"stderr {se:.4f}"] if se else [])])
        results.append(EvalResult(task_type="multiple-choice", dataset_type=task, dataset_name=task,
                                  metric_type=metric, metric_value=round(float(value), 4),
                                  metric_name=f"{metric}, 0-shot" + (f" ({detail})" if detail else "")))
    return results


def push_card(card_text: str, metrics: Optional[dict[str, Any]], commit: Optional[str], name: str) -> str:
    """A model directory's card as ``layerchop push`` publishes it: its evaluation results (``model-index``) and the
    pipeline commit added to its metadata."""
    from huggingface_hub import ModelCard

    card = ModelCard(card_text)
    if metrics:
        card.data.eval_results = eval_results(metrics, name)
        card.data.model_name = name
    if commit:  # (a card written before cards carried metadata has no layerchop key)
        card.data.layerchop = {**(getattr(card.data, "layerchop", None) or {}), "pipeline_commit": commit}
    return str(card)
