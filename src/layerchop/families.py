"""The decoder families the pipeline runs on, and the one-line refusal for the models it cannot.

Every stage reaches a model through ``AutoModelForCausalLM`` and its decoder layers (``model.model.layers``), so a
dense decoder-only ``*ForCausalLM`` of the pinned transformers works when its layers take the hidden states and
keywords (mask, positions) and return the hidden states. :data:`TESTED` lists the families the test suite runs every
stage on (``tests/test_families.py``); :func:`check_family` refuses, before any work, what cannot work: a
multimodal config whose text model sits inside it, a mixture of experts, a model that is not a causal LM. A causal
LM of another family is let through with a warning that it is untested.
"""

from __future__ import annotations

import warnings

TESTED = {
    "llama": "Llama-2, Llama-3.x (and SmolLM2)",
    "mistral": "Mistral (sliding-window attention)",
    "qwen2": "Qwen2 / Qwen2.5 (sliding window on the top layers when enabled)",
    "qwen3": "Qwen3 (per-head q/k norms)",
    "gemma2": "Gemma-2 (alternating sliding / full attention, soft-capping)",
    "gemma3_text": "Gemma-3 text models (alternating attention, local RoPE)",
    "phi3": "Phi-3 / Phi-4 (fused qkv and gate-up projections)",
    "olmo2": "OLMo-2 (q/k norms across heads, norms after the sublayers)",
    "smollm3": "SmolLM3 (layers without RoPE)",
    "granite": "Granite (embedding, residual, attention and logit multipliers)",
}
"""``config.model_type`` -> what was tested: every stage on a tiny model of the family's own config class."""

EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def refusal(config) -> str | None:
    """Why no stage can run on ``config`` (None: it can)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "num_hidden_layers", None) is None:
        inner = getattr(config, "text_config", None)
        if inner is not None:
            return (f"model_type {kind!r} is a multimodal config whose text model ({inner.model_type}) sits in "
                    "text_config; save the text model alone (e.g. its *ForCausalLM) and give that")
        return f"model_type {kind!r} has no num_hidden_layers: not a decoder-only language model"
    experts = {k: getattr(config, k) for k in EXPERT_KEYS if (getattr(config, k, None) or 0) > 1}
    if experts:
        return f"model_type {kind!r} is a mixture of experts ({experts}): the pruning and layer code handle dense MLPs"
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"model_type {kind!r} has no AutoModelForCausalLM class in transformers"
    return None


def check_family(config, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` (a params key or path) when :func:`refusal` refuses ``config``; warn
    once when its family is not in :data:`TESTED`."""
    why = refusal(config)
    if why:
        raise ValueError(f"{where}: {why}")
    if config.model_type not in TESTED:
        warnings.warn(f"{where}: model_type {config.model_type!r} is not among the tested families "
                      f"({', '.join(TESTED)}); every stage may still work, none was tested on it", stacklevel=2)
