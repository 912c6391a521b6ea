"""Stage ``chop``: LayerChop, remove whole decoder layers and save a smaller HF checkpoint.

Example::

    layerchop chop --model data/models/dense --out data/models/chopped
    layerchop chop --layout block-influence --model data/models/dense --data data/prepared \\
        --out data/models/layouts/block-influence/chopped

A fixed layout (``input``, ``output``, ``middle``, ``max-gap``, ``both``) needs only the model; a data-driven
one (``angular``, ``block-influence``, ``ppl``) scores the dense model's layers on ``chop.num_calibration``
sequences of ``--data``'s train split and records the scores in ``layerchop.json`` (``selection``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from layerchop.config import check_device, data_driven_layouts, section
from layerchop.io import check_model_dir, load_model, load_tokenizer, read_metadata, save_model_dir
from layerchop.prune.chop import chop_layers, removed_indices


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="dense model directory")
    p.add_argument("--out", required=True, help="chopped model directory")
    p.add_argument("--layout", default=None, help="overrides chop.layout (one stage of a family per layout)")
    p.add_argument("--data", default=None, help="prepared data (data-driven layouts: calibration from its train split)")


def score_layers(model, cfg, data: Path, tokenizer, model_dir: Path) -> tuple[list[int], dict]:
    """A data-driven layout: scores on calibration sequences, then the layers they select."""
    from layerchop.data.prepare import PackedDataset, check_data_matches_model
    from layerchop.data.prepare import calibration_batch
    from layerchop.prune.select import layer_scores, select_layers

    check_data_matches_model(data, model_dir, tokenizer)
    calib = calibration_batch(PackedDataset(data, "train"), cfg.num_calibration, cfg.calibration_seed,
                              key="chop.num_calibration")
    t0 = time.perf_counter()
    scores = layer_scores(cfg.layout, model, calib, cfg.num_remove, batch_size=cfg.batch_size, device=cfg.device)
    scores["criterion"] = cfg.layout  # Figure 5 finds the criterion by it
    model.to("cpu")
    remove = select_layers(cfg.layout, scores, model.config.num_hidden_layers, cfg.num_remove)
    scores.update(calibration={"split": "train", "num_sequences": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                               "seed": cfg.calibration_seed})
    # the time goes to the log, not into the model directory (a re-run writes the same bytes)
    print(f"[chop] scored {cfg.layout} in {time.perf_counter() - t0:.1f} s", flush=True)
    return remove, scores


def main(args: argparse.Namespace) -> None:
    cfg = section("chop", path=args.params)
    if args.layout is not None:
        cfg = dataclasses.replace(cfg, layout=args.layout, indices=None)  # re-validated (names chop.layout)
    check_model_dir(args.model, "--model")
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(args.model).num_hidden_layers
    data_driven = cfg.indices is None and cfg.layout in data_driven_layouts()
    # validate before loading weights or writing anything
    if data_driven:
        if args.data is None:
            raise ValueError(f"chop.layout={cfg.layout!r} chooses layers from calibration data: give --data")
        check_device("chop.device", cfg.device, available=True)
        removed_indices(num_layers, layout="input", num_remove=cfg.num_remove)  # the count is possible
    else:
        remove = removed_indices(num_layers, layout=cfg.layout, num_remove=cfg.num_remove, indices=cfg.indices)
    src_meta = read_metadata(args.model)
    model = load_model(args.model, dtype=src_meta.get("dtype", "float32"))
    tokenizer = load_tokenizer(args.model)
    selection = None
    if data_driven:
        remove, selection = score_layers(model, cfg, Path(args.data), tokenizer, Path(args.model))
    kept = chop_layers(model, remove)
    print(f"[chop] removed layers {remove} of {num_layers} (layout {cfg.layout if cfg.indices is None else 'indices'}); "
          f"kept {kept}")
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
        **({"selection": selection} if selection else {}),
    }
    how = f"layout `{meta['layout']}`" + (", chosen from calibration data: scores in `layerchop.json`, `selection`"
                                          if selection else "")
    card = (f"# LayerChop of `{args.model}`\n\nRemoved decoder layers {remove} of {num_layers} "
            f"({how}); new layer k is original layer kept[k] = {kept}.\n")
    save_model_dir(model, tokenizer, args.out, metadata=meta, card=card)
