"""LayerChop: remove whole decoder layers from a causal LM.

The paper (Jha et al., "Just CHOP") removes half of the decoder layers at once, always keeping the first
and the last layer because they touch the embedding table and the output head, and compares five
layouts of the removed block (its Figure 5 / Table 6).
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Optional, Sequence

import torch.nn as nn

from layerchop.config import LAYOUTS


def removed_indices(
    num_layers: int,
    *,
    layout: Optional[str] = None,
    num_remove: int = 0,
    indices: Optional[Sequence[int]] = None,
) -> list[int]:
    """Which decoder layers to remove.

    Args:
        num_layers: Depth of the model.
        layout: One of ``input``, ``output``, ``middle``, ``max-gap``, ``both`` (ignored with ``indices``).
        num_remove: Number of layers the layout removes.
        indices: Explicit 0-based indices; validated and returned sorted.

    Returns:
        Sorted, unique 0-based indices, never 0 nor ``num_layers - 1``.

    Raises:
        ValueError: naming ``chop.indices`` / ``chop.num_remove`` / ``chop.layout`` when the request is
            impossible (first or last layer, out of range, duplicates, every layer).
    """
    if num_layers < 1:
        raise ValueError(f"the model has num_hidden_layers={num_layers}; nothing to chop")
    last = num_layers - 1
    if indices is not None:
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i <= last]
        if bad:
            raise ValueError(f"chop.indices={list(indices)}: {bad} out of range 0..{last}")
        dup = sorted({i for i in idx if idx.count(i) > 1})
        if dup:
            raise ValueError(f"chop.indices={list(indices)}: duplicate indices {dup}")
        if len(idx) >= num_layers:
            raise ValueError(f"chop.indices={list(indices)} removes every one of the {num_layers} layers")
        if 0 in idx or last in idx:
            raise ValueError(
                f"chop.indices={list(indices)} removes the first (0) or last ({last}) layer; "
                "LayerChop always keeps both"
            )
        return sorted(idx)

    if layout not in LAYOUTS:
        raise ValueError(f"chop.layout={layout!r}: choose one of {list(LAYOUTS)}")
    interior = num_layers - 2  # layers 1 .. num_layers-2 may go
    k = int(num_remove)
    if k < 0:
        raise ValueError(f"chop.num_remove={num_remove} must be >= 0")
    if k >= num_layers:
        raise ValueError(f"chop.num_remove={num_remove} removes every one of the {num_layers} layers")
    if k > interior:
        raise ValueError(
            f"chop.num_remove={num_remove} is more than the {max(interior, 0)} layers between the first "
            f"and the last of a {num_layers}-layer model"
        )
    if k == 0:
        return []
    if layout == "input":
        out = range(1, 1 + k)
    elif layout == "output":
        out = range(last - k, last)
    elif layout == "middle":
        start = 1 + (interior - k) // 2
        out = range(start, start + k)
    elif layout == "both":
        k_in = math.ceil(k / 2)
        k_out = k - k_in
        out = list(range(1, 1 + k_in)) + list(range(last - k_out, last))
    else:  # max-gap: removed layers spread evenly over the interior, one per equal-width bin
        out = [1 + math.floor((j + 0.5) * interior / k) for j in range(k)]
    result = sorted(out)
    assert len(set(result)) == k and 0 not in result and last not in result, result
    return result


PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
"""Config lists with one entry per decoder layer (attention kind; SmolLM3's RoPE-or-not): chopping keeps the entries of
the kept layers, so a reloaded chopped model gives each layer the mask and positions it had."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers of a HF causal LM (Llama, Mistral, Qwen, ...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: cannot find its decoder layers (expected .model.layers)")
    return layers


def chop_layers(model: nn.Module, remove: Sequence[int]) -> list[int]:
    """Remove decoder layers in place and keep the config true.

    Rebuilds the layer list, sets ``config.num_hidden_layers``, subsets per-layer config lists
    (``layer_types``) and renumbers every attention's ``layer_idx`` so that the KV cache, which is
    indexed by it, still works during generation.

    Args:
        model: A HF causal LM.
        remove: Indices from :func:`removed_indices`.

    Returns:
        The kept original indices, in order (new layer ``k`` is original layer ``kept[k]``).
    """
    layers = decoder_layers(model)
    num_layers = len(layers)
    remove = removed_indices(num_layers, indices=list(remove)) if remove else []
    kept = [i for i in range(num_layers) if i not in set(remove)]
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(new_layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    decoder.layers = new_layers
    model.config.num_hidden_layers = len(kept)
    subset_per_layer(model.config, num_layers, kept)
    return kept


def subset_per_layer(config, num_layers: int, kept: Sequence[int]) -> None:
    """Keep the entries of ``kept`` in every per-layer list of ``config`` (:data:`PER_LAYER_KEYS`), in place."""
    for key in PER_LAYER_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == num_layers:
            setattr(config, key, [values[i] for i in kept])


@contextlib.contextmanager
def skipping(model: nn.Module, skip: Sequence[int]):
    """Within the block, the decoder layers ``skip`` pass their input through unchanged (no weights copied; restored
    on exit, also on error). Every other layer keeps its own attention mask and position inputs, so this computes what
    the model chopped by :func:`chop_layers` computes, whatever the family's mix of attention kinds."""
    with replaced_forwards(model, {i: _identity for i in skip}):
        yield model


@contextlib.contextmanager
def replaced_forwards(model: nn.Module, forwards: dict):
    """Within the block, decoder layer ``i`` runs ``forwards[i]`` (called as the layer would be: hidden states, then
    the keywords the model passes) instead of its own forward; restored on exit, also on error. Hooks still fire."""
    layers = decoder_layers(model)
    for i, forward in forwards.items():
        layers[i].forward = forward
    try:
        yield
    finally:
        for i in forwards:
            layers[i].__dict__.pop("forward", None)


def _identity(hidden_states, *args, **kwargs):
    return hidden_states


_LAYER_KEY = re.compile(r"(^|\.)layers\.(\d+)\.")


def chop_state_keys(state: dict, kept: Sequence[int]) -> dict:
    """Re-key a ``{parameter name: value}`` state (weights, or per-parameter optimizer state) after
    :func:`chop_layers`: entries of removed layers are dropped; ``layers.<old>.`` becomes ``layers.<new>.``.
    """
    new_index = {old: new for new, old in enumerate(kept)}

    def rename(name: str) -> Optional[str]:
        m = _LAYER_KEY.search(name)
        if m is None:
            return name
        old = int(m.group(2))
        if old not in new_index:
            return None
        return name[: m.start(2)] + str(new_index[old]) + name[m.end(2):]

    return {n2: v for n, v in state.items() if (n2 := rename(n)) is not None}
