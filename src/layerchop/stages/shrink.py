"""Stage ``shrink``: a structured DimChop model (``dimchop.structure: channels-heads``) as a physically smaller model.

Reads the masks file beside the model: a channel whose ``gate_proj`` row is masked in a layer, and a head group whose
``k_proj`` rows are masked, are removed from that layer (:func:`layerchop.prune.structured.shrink`); the result is a
plain model of the input's family (``AutoModelForCausalLM``) with a smaller ``intermediate_size`` and fewer heads, which computes what the masked
model computes and loads without this package.

Example::

    layerchop shrink --model data/models/dimchop-structured --out data/models/dimchop-structured-small
"""

from __future__ import annotations

import argparse

import torch


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory trained with dimchop.structure channels-heads")
    p.add_argument("--out", required=True, help="output directory of the smaller model")


def kept_units(masks: dict[str, torch.Tensor], config) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per layer, the kept channels and head groups that the masks file of a structured model encodes.

    Raises:
        ValueError: when a mask is not whole channels or head groups (e.g. the paper's column masks).
    """
    from layerchop.prune.structured import head_groups, structured_masks

    groups, rep, hd = head_groups(config)
    keep_ch, keep_g = {}, {}
    for layer in range(config.num_hidden_layers):
        gate = masks.get(f"model.layers.{layer}.mlp.gate_proj.weight")
        k = masks.get(f"model.layers.{layer}.self_attn.k_proj.weight")
        if gate is None or k is None:
            raise ValueError(f"--model: its masks file has no gate_proj / k_proj mask for layer {layer}: not a "
                             "structured (dimchop.structure: channels-heads) model")
        keep_ch[layer] = (~gate.all(dim=1)).nonzero().flatten()
        keep_g[layer] = (~k.view(groups, hd, -1).all(dim=2).all(dim=1)).nonzero().flatten()
    expected = structured_masks(config, keep_ch, keep_g)  # the down/o columns these units imply
    for name, m in expected.items():
        if name not in masks or not torch.equal(masks[name], m):
            raise ValueError(f"--model: the mask of {name} is not whole channels and head groups: not a structured "
                             "(dimchop.structure: channels-heads) model")
    return keep_ch, keep_g


def main(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from layerchop.io import check_model_dir, load_model, load_tokenizer, num_params, read_metadata, save_model_dir
    from layerchop.prune.masks import load_masks
    from layerchop.prune.structured import build, refusal, shrink

    check_model_dir(args.model, "--model")
    masks = load_masks(args.model)
    if masks is None:
        raise ValueError(f"--model {args.model}: no masks file (sparsity_masks.safetensors): nothing to shrink")
    config = AutoConfig.from_pretrained(args.model)
    why = refusal(config)
    if why:
        raise ValueError(f"--model {args.model}: {why}")
    keep_ch, keep_g = kept_units(masks, config)
    meta = read_metadata(args.model)
    model = load_model(args.model, dtype=meta.get("dtype", "float32"))
    new_config, state = shrink(model.state_dict(), config, keep_ch, keep_g)
    small = build(new_config, state)
    before, after = num_params(model), num_params(small)
    meta = {**meta, "stage": "shrink", "shrunk_from": str(args.model), "num_params": after,
            "num_params_before_shrink": before, "intermediate_size": new_config.intermediate_size,
            # the entries the masks removed: before - masked = after, exactly (a test of the export)
            "masked_entries": sum(int(m.sum()) for m in masks.values()),
            "num_attention_heads": new_config.num_attention_heads,
            "num_key_value_heads": new_config.num_key_value_heads}
    meta.pop("masked_nonzero_after_training", None)
    card = (f"# `{args.model}`, physically smaller\n\nThe structured DimChop model with its masked MLP channels and "
            f"head groups removed: intermediate size {config.intermediate_size} -> {new_config.intermediate_size}, "
            f"heads {config.num_attention_heads} -> {new_config.num_attention_heads} (key/value "
            f"{config.num_key_value_heads} -> {new_config.num_key_value_heads}), {before:,} -> {after:,} parameters. "
            f"Same function as the masked model; a plain `{type(small).__name__}`.\n")
    save_model_dir(small, load_tokenizer(args.model), args.out, metadata=meta, card=card)
    print(f"[shrink] {before:,} -> {after:,} parameters -> {args.out}")
