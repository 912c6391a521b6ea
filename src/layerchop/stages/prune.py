"""Stage ``prune``: one-shot pruning (magnitude, Wanda, SparseGPT, or a method added in
``src/layerchop/prune/oneshot/``) with a shared calibration driver.

Example::

    layerchop prune --method wanda --pattern 2of4 --model data/models/dense --data data/prepared \\
        --out data/models/wanda-2of4

The output is a plain HF directory whose weights contain the zeros, plus ``sparsity_masks.safetensors``
and the method, pattern, calibration and achieved sparsity in ``layerchop.json``.
"""

from __future__ import annotations

import argparse
import time

from layerchop.config import check_device, section
from layerchop.data.prepare import PackedDataset, check_data_matches_model
from layerchop.io import check_model_dir, load_model, load_tokenizer, num_params, read_metadata
from layerchop.data.prepare import calibration_batch
from layerchop.prune.calibrate import prune_model
from layerchop.prune.masks import nonzero_params, save_pruned_model_dir
from layerchop.prune.solvers import solver
from layerchop.prune.sparsity import Pattern


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True,
                   help="a one-shot method: magnitude | wanda | sparsegpt | one in src/layerchop/prune/oneshot/")
    p.add_argument("--pattern", required=True, help="unstructured-0.5 | 2of4 | 4of8 (or N:M)")
    p.add_argument("--model", required=True, help="dense model directory")
    p.add_argument("--data", required=True, help="prepared data (calibration from its train split)")
    p.add_argument("--out", required=True, help="pruned model directory")


def main(args: argparse.Namespace) -> None:
    from pathlib import Path

    cfg = section("prune", path=args.params)
    check_device("prune.device", cfg.device, available=True)
    check_model_dir(args.model, "--model")
    method = solver(args.method)  # validate before any work
    pattern = Pattern.parse(args.pattern)
    tokenizer = load_tokenizer(args.model)
    check_data_matches_model(Path(args.data), Path(args.model), tokenizer)
    calib = calibration_batch(PackedDataset(args.data, "train"), cfg.num_calibration, cfg.calibration_seed)
    model = load_model(args.model, dtype=read_metadata(args.model).get("dtype", "float32"))
    t0 = time.perf_counter()
    masks, stats = prune_model(model, calib, args.method, pattern, device=cfg.device,
                               batch_size=cfg.batch_size,
                               solver_kwargs={k: getattr(cfg, k) for k in method.settings})
    wall = time.perf_counter() - t0
    meta = {
        **{k: v for k, v in read_metadata(args.model).items() if k in ("source", "dtype", "tokens_trained")},
        "stage": "prune",
        "method": args.method,
        "pattern": str(pattern),
        "pruned_from": args.model,
        "calibration": {"split": "train", "num_sequences": cfg.num_calibration, "seq_len": int(calib.shape[1]),
                        "seed": cfg.calibration_seed},
        "solver": {k: getattr(cfg, k) for k in method.settings},
        "pruned_modules": sorted(masks),
        "sparsity": stats,
        "num_params": num_params(model),
        "nonzero_params": nonzero_params(model),
    }  # no wall time: it goes to the log (below), so that a re-run writes the same bytes
    card = (f"# {method.label} {pattern} of `{args.model}`\n\nOne-shot pruning of every attention and MLP "
            f"projection; {stats['overall_pruned_fraction']:.3f} of their weights are zero. Masks: "
            "`sparsity_masks.safetensors`.\n")
    save_pruned_model_dir(model, tokenizer, args.out, masks=masks, metadata=meta, card=card)
    print(f"[prune] {args.method} {pattern}: {stats['overall_pruned_fraction']:.4f} of "
          f"{stats['prunable_params']:,} prunable weights zeroed in {wall:.1f} s")
