"""Structured width pruning that makes a decoder physically smaller: MLP intermediate channels and whole attention
head groups removed from every decoder layer, exported as a plain, smaller model of the same family
(``AutoModelForCausalLM`` of the same config class).

A *channel* ``c`` of a layer's MLP is row ``c`` of ``gate_proj`` and ``up_proj`` and column ``c`` of
``down_proj``; a *head group* ``g`` is key/value head ``g`` with the ``num_attention_heads / num_key_value_heads``
query heads that read it (rows of ``q_proj``, ``k_proj``, ``v_proj``; columns of ``o_proj``). Zeroing a channel's
``down_proj`` column, or a group's ``o_proj`` columns, removes its contribution exactly, so the masked model and
the smaller one compute the same function. The config has one ``intermediate_size`` and one head count for
all layers: every layer keeps the same number of channels and groups.

Families: those whose layers have separate ``q/k/v/o_proj`` and ``gate/up/down_proj`` and normalise queries and keys
per head, if at all (Llama, Mistral, Qwen2/3, Gemma-2/3, SmolLM3, Granite). :func:`refusal` says why the others
cannot be shrunk this way (Phi-3 fuses its projections; OLMo-2 normalises queries across all heads, so removing a
head changes the others).
"""

from __future__ import annotations

import copy

import torch


PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def refusal(config, model=None) -> str | None:
    """Why the structured channels-and-heads width pruning cannot run on ``config``'s family (None: it can), read off
    the family's decoder layer (of ``model`` when given, else built on the meta device)."""
    from layerchop.prune.chop import decoder_layers
    from layerchop.train.flops import meta_model

    kind = type(config).__name__
    if getattr(config, "mlp_bias", False):
        return f"{kind} has mlp_bias: the structured export slices no MLP bias"
    layer = decoder_layers(model if model is not None else meta_model(config))[0]
    for block, names in PROJECTIONS.items():
        module = getattr(layer, block, None)
        missing = [n for n in names if not hasattr(module, n)]
        if missing:
            fused = [n for n, _ in (module.named_children() if module is not None else []) if n.endswith("_proj")]
            return (f"{kind}'s {block} has {fused} where channels-heads needs separate {list(names)} (fused "
                    "projections are not sliced)")
    _, _, head_dim = head_groups(config)
    for norm in ("q_norm", "k_norm"):
        weight = getattr(getattr(layer.self_attn, norm, None), "weight", None)
        if weight is not None and weight.numel() != head_dim:
            return (f"{kind} normalises {norm[0]} across all heads ({weight.numel()} wide, not per head of "
                    f"{head_dim}): removing a head group would change the others")
    return None


def build(config, state: dict[str, torch.Tensor]):
    """The model of ``config``'s family (``AutoModelForCausalLM``) holding ``state`` (tied weights tied)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    with no_init_weights():  # the weights come from state; buffers (rotary tables) are built as the family builds them
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"shrink: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    return model


def head_groups(config) -> tuple[int, int, int]:
    """``(groups, query heads per group, head_dim)`` of a decoder config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads, head_dim


def channel_scores(score: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """A layer's MLP channel scores ``[intermediate]``: the L1 norms of its ``gate_proj`` and ``up_proj`` rows and
    its ``down_proj`` column in the per-entry scores ``score`` (``{weight name: [out, in]}``)."""
    p = f"model.layers.{layer}.mlp."
    return (score[p + "gate_proj.weight"].abs().sum(1) + score[p + "up_proj.weight"].abs().sum(1)
            + score[p + "down_proj.weight"].abs().sum(0))


def group_scores(score: dict[str, torch.Tensor], layer: int, config) -> torch.Tensor:
    """A layer's head-group scores ``[groups]``: the L1 norm of the group's ``q/k/v_proj`` rows and ``o_proj``
    columns in ``score``."""
    groups, rep, hd = head_groups(config)
    p = f"model.layers.{layer}.self_attn."
    q = score[p + "q_proj.weight"].abs().sum(1).view(groups, rep * hd).sum(1)
    o = score[p + "o_proj.weight"].abs().sum(0).view(groups, rep * hd).sum(1)
    kv = sum(score[p + f"{m}_proj.weight"].abs().sum(1).view(groups, hd).sum(1) for m in ("k", "v"))
    return q + o + kv


def _group_rows(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of the kept groups, each ``width`` rows wide."""
    return (groups.view(-1, 1) * width + torch.arange(width)).reshape(-1)


def structured_masks(config, keep_channels: dict[int, torch.Tensor],
                     keep_groups: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Column masks ``{weight name: bool [out, in]}`` (True = pruned) on ``down_proj`` and ``o_proj`` that remove
    the channels and groups not kept: applied to the full model, it computes what :func:`shrink` exports."""
    groups, rep, hd = head_groups(config)
    masks = {}
    for layer in range(config.num_hidden_layers):
        down = torch.ones(config.intermediate_size, dtype=torch.bool)
        down[keep_channels[layer]] = False
        masks[f"model.layers.{layer}.mlp.down_proj.weight"] = down.expand(config.hidden_size, -1).clone()
        o = torch.ones(config.num_attention_heads * hd, dtype=torch.bool)
        o[_group_rows(keep_groups[layer], rep * hd)] = False
        masks[f"model.layers.{layer}.self_attn.o_proj.weight"] = o.expand(config.hidden_size, -1).clone()
    return masks


def shrink(state: dict[str, torch.Tensor], config, keep_channels: dict[int, torch.Tensor],
           keep_groups: dict[int, torch.Tensor]):
    """The smaller model's ``(config, state dict)``: each layer keeps ``keep_channels[layer]`` (sorted indices, the
    same count in every layer) and ``keep_groups[layer]``.

    Raises:
        ValueError: when layers keep different counts, or a layer keeps no channel or no group.
    """
    n_layers = config.num_hidden_layers
    counts = {len(keep_channels[i]) for i in range(n_layers)}, {len(keep_groups[i]) for i in range(n_layers)}
    if len(counts[0]) != 1 or len(counts[1]) != 1:
        raise ValueError(f"structured export: every layer must keep as many channels and head groups "
                         f"(channels {sorted(counts[0])}, groups {sorted(counts[1])})")
    channels, kept_groups = counts[0].pop(), counts[1].pop()
    if channels < 1 or kept_groups < 1:
        raise ValueError(f"structured export: a layer would keep {channels} channels and {kept_groups} head groups")
    groups, rep, hd = head_groups(config)
    new = copy.deepcopy(config)
    new.intermediate_size = channels
    new.num_key_value_heads = kept_groups
    new.num_attention_heads = kept_groups * rep
    new.head_dim = hd  # no longer hidden_size / heads
    out = dict(state)
    for layer in range(n_layers):
        ch = torch.as_tensor(keep_channels[layer]).sort().values
        g = torch.as_tensor(keep_groups[layer]).sort().values
        q_rows, kv_rows = _group_rows(g, rep * hd), _group_rows(g, hd)
        mlp, att = f"model.layers.{layer}.mlp.", f"model.layers.{layer}.self_attn."
        for m in ("gate_proj", "up_proj"):
            out[mlp + m + ".weight"] = state[mlp + m + ".weight"][ch].clone()
        out[mlp + "down_proj.weight"] = state[mlp + "down_proj.weight"][:, ch].clone()
        out[att + "q_proj.weight"] = state[att + "q_proj.weight"][q_rows].clone()
        for m in ("k_proj", "v_proj"):
            out[att + m + ".weight"] = state[att + m + ".weight"][kv_rows].clone()
        out[att + "o_proj.weight"] = state[att + "o_proj.weight"][:, q_rows].clone()
        for m, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            if att + m + ".bias" in state:
                out[att + m + ".bias"] = state[att + m + ".bias"][rows].clone()
    return new, out


def keep_lowest_pruned(scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Sorted indices kept when the ``num_pruned`` lowest ``scores`` go (ties: the lower index goes first)."""
    order = torch.sort(scores.float(), stable=True).indices
    return order[num_pruned:].sort().values
