"""Stage ``chop``: LayerChop, remove whole decoder layers and save a smaller HF checkpoint.

Example::

    layerchop chop --model data/models/dense --out data/models/chopped
    dvc exp run -S chop.layout=middle
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import section
from layerchop.io import check_model_dir, load_model, load_tokenizer, read_metadata, save_model_dir
from layerchop.prune.chop import chop_layers, removed_indices


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="dense model directory")
    p.add_argument("--out", required=True, help="chopped model directory")


def main(args: argparse.Namespace) -> None:
    cfg = section("chop", path=args.params)
    check_model_dir(args.model, "--model")
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(args.model).num_hidden_layers
    # validate before loading weights or writing anything
    remove = removed_indices(num_layers, layout=cfg.layout, num_remove=cfg.num_remove, indices=cfg.indices)
    src_meta = read_metadata(args.model)
    model = load_model(args.model, dtype=src_meta.get("dtype", "float32"))
    kept = chop_layers(model, remove)
    print(f"[chop] removed layers {remove} of {num_layers}; kept {kept}")
    meta = {
        **{k: v for k, v in src_meta.items() if k in ("source", "hub_id", "revision", "dtype", "package",
                                                       "version", "dequantized_from", "tokens_trained")},
        "stage": "chop",
        "method": "layerchop",
        "chopped_from": str(Path(args.model)),
        "layout": None if cfg.indices is not None else cfg.layout,
        "removed_layers": remove,
        "kept_layers": kept,
        "num_layers_before": num_layers,
    }
    card = (f"# LayerChop of `{args.model}`\n\nRemoved decoder layers {remove} of {num_layers} "
            f"(layout `{meta['layout']}`); new layer k is original layer kept[k] = {kept}.\n")
    save_model_dir(model, load_tokenizer(args.model), args.out, metadata=meta, card=card)
