"""Model cards the Hub understands: ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard` with
:class:`~huggingface_hub.ModelCardData` (YAML metadata) above the card's text.

Every model directory a stage writes gets one (:func:`layerchop.io.save_model_dir`): the base model it descends
from, its licence, the compression method and its parameters, from the directory's own ``layerchop.json``. What
depends on later stages or on where it is published (evaluation results, the pipeline's commit) is added by
``layerchop push`` (:func:`layerchop.hub.push_card`), so that a stage's output stays a function of its inputs (and
this module, which every stage that writes a model runs, imports nothing of the reports).
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
