"""Model cards the Hub understands: ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard` with
:class:`~huggingface_hub.ModelCardData` (YAML metadata) above the card's text.

Every model directory a stage writes gets one (:func:`layerchop.io.save_model_dir`): the base model it descends
from, its licence, the compression method and its parameters, from the directory's own ``layerchop.json``. What
depends on later stages or on where it is published (evaluation results, the pipeline's commit) is added by
``layerchop push`` (:func:`push_card`), so that a stage's output stays a function of its inputs.
"""

from __future__ import annotations

from typing import Any, Optional

# the model sources (download.model.source) whose origin is known: the Hub id the weights come from, its licence
KNOWN_ORIGINS = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
# the layerchop.json keys that describe how a model was compressed or trained (copied into the card's metadata)
COMPRESSION_KEYS = ("stage", "method", "objective", "layout", "removed_layers", "num_layers_before", "pattern",
                    "sparsity", "structure", "dequantized_from", "tokens_trained", "tokens_before")
# the training settings a card shows (layerchop.json's "train" holds them all)
TRAINING_KEYS = ("lr", "token_budget", "flop_budget", "batch_size", "accumulate", "warmup_steps", "min_lr_ratio",
                 "warm_start_steps", "precision", "seed")
# evaluation metrics (metrics.json of `layerchop evaluate`) -> (metric type, dataset name) on the Hub
PERPLEXITY = {"val/ppl": ("validation", "the recovery corpus"), "test/ppl": ("test", "the recovery corpus")}


def origin(metadata: dict[str, Any]) -> tuple[Optional[str], Optional[str]]:
    """(base model Hub id, licence) of a model directory's ``layerchop.json``; None where it is not known (a local
    model, random weights)."""
    base = metadata.get("base_model") or metadata.get("hub_id")
    licence = metadata.get("license")
    known = KNOWN_ORIGINS.get(metadata.get("source", ""))
    if known:
        base, licence = base or known[0], licence or known[1]
    return base, licence


def card_data(metadata: dict[str, Any], name: str):
    """The YAML metadata of a model directory's card, from its ``layerchop.json``."""
    from huggingface_hub import ModelCardData

    base, licence = origin(metadata)
    method = metadata.get("method") or metadata.get("objective")
    tags = ["layerchop", *([method] if method and method != "layerchop" else []),
            *(["pruned"] if metadata.get("stage") in ("chop", "prune", "shrink") else [])]
    compression = {k: metadata[k] for k in COMPRESSION_KEYS if k in metadata}
    if isinstance(metadata.get("train"), dict):  # a training stage's settings (the rest is in layerchop.json)
        compression["training"] = {k: metadata["train"][k] for k in TRAINING_KEYS
                                   if metadata["train"].get(k) is not None}
    return ModelCardData(
        model_name=name,
        base_model=None if metadata.get("stage") == "scratch" else base,  # scratch: the architecture only
        license=licence,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        layerchop=compression or None,
    )


def render(text: str, metadata: dict[str, Any], name: str) -> str:
    """The card (``README.md``) of a model directory: YAML metadata, then ``text``. A ``text`` that carries its own
    metadata block keeps the keys this one does not set."""
    from huggingface_hub import ModelCard, ModelCardData

    data = card_data(metadata, name).to_dict()
    if text.lstrip().startswith("---"):
        given = ModelCard(text)
        data, text = {**given.data.to_dict(), **data}, given.text
    return str(ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n\n{text.strip()}\n"))


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
