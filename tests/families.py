"""Tiny random models of every decoder family the pipeline supports, each built from the family's own config class.

Six layers, width 32, 4 query heads over 2 key/value groups, vocabulary 300 (the tiny test tokenizer's, so a family
model can train on the tiny prepared corpus). Families with sliding-window attention get a window of 4 tokens, far
below the tests' sequence lengths, so a layer given the wrong mask computes something else; mixed families keep
their own alternation (Gemma-2/3: every other layer; Qwen2: layers from ``max_window_layers`` on). Llama-3 keeps its
``llama3`` RoPE scaling; SmolLM3 its RoPE-less layers; Granite its multipliers.
"""

from __future__ import annotations

import functools

import torch

WINDOW = 4
COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _configs() -> dict:
    import transformers as tf

    llama3_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return {
        "llama2": lambda: tf.LlamaConfig(**{**COMMON, "num_key_value_heads": 4}),
        "llama3": lambda: tf.LlamaConfig(**COMMON, rope_parameters=llama3_rope, tie_word_embeddings=True),
        "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=WINDOW, head_dim=8),
        "qwen2": lambda: tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3),
        "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**COMMON, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8),
        "gemma3": lambda: tf.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                              sliding_window_pattern=2),
        "phi3": lambda: tf.Phi3Config(**COMMON),
        "olmo2": lambda: tf.Olmo2Config(**COMMON),
        "smollm3": lambda: tf.SmolLM3Config(**COMMON, no_rope_layer_interval=3),
        "granite": lambda: tf.GraniteConfig(**COMMON, embedding_multiplier=12.0, residual_multiplier=0.22,
                                            logits_scaling=8.0, attention_multiplier=0.125),
    }


FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "smollm3", "granite")
MIXED = ("qwen2", "gemma2", "gemma3")  # sliding-window and full attention in one model


def family_config(name: str):
    return _configs()[name]()


@functools.lru_cache(maxsize=None)
def _state(name: str) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(sum(map(ord, name)))
    model = AutoModelForCausalLM.from_config(family_config(name))
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): perturb them so a skipped norm shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}


def family_model(name: str):
    """A fresh copy of the family's tiny model (the same weights every call)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(family_config(name))
    model.load_state_dict(_state(name))
    return model.eval()


def family_ids(n: int = 3, seq_len: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n, seq_len), generator=g)
