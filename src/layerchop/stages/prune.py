"""Stage ``prune``: one-shot pruning (magnitude, Wanda, SparseGPT) with a shared calibration driver.

Example::

    layerchop prune --method wanda --pattern 2of4 --model data/models/dense --data data/prepared \
        --out data/models/wanda-2of4 --num-calibration 32

The output is a plain HF directory whose weights contain the zeros, plus ``sparsity_masks.safetensors``
and the method, pattern, calibration and achieved sparsity in ``layerchop.json``.
"""

from __future__ import annotations

import argparse
import time

from layerchop.data.prepare import PackedDataset, check_data_matches_model
from layerchop.io import load_model, load_tokenizer, num_params, read_metadata
from layerchop.prune.calibrate import calibration_batch, prune_model
from layerchop.prune.masks import nonzero_params, save_pruned_model_dir
from layerchop.prune.sparsity import Pattern


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--pattern", required=True, help="unstructured-0.5 | 2of4 | 4of8 (or N:M)")
    p.add_argument("--model", required=True, help="dense model directory")
    p.add_argument("--data", required=True, help="prepared data (calibration from its train split)")
    p.add_argument("--out", required=True, help="pruned model directory")
    p.add_argument("--num-calibration", type=int, default=32, help="calibration sequences (paper: 128)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--device", default="cpu", help="where each decoder layer is processed")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT block size")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening")


def main(args: argparse.Namespace) -> None:
    from pathlib import Path

    pattern = Pattern.parse(args.pattern)  # validate before any work
    tokenizer = load_tokenizer(args.model)
    check_data_matches_model(Path(args.data), Path(args.model), tokenizer)
    calib = calibration_batch(PackedDataset(args.data, "train"), args.num_calibration, args.seed)
    model = load_model(args.model, dtype=read_metadata(args.model).get("dtype", "float32"))
    t0 = time.perf_counter()
    masks, stats = prune_model(model, calib, args.method, pattern, device=args.device,
                               solver_kwargs={"blocksize": args.blocksize, "percdamp": args.percdamp})
    wall = time.perf_counter() - t0
    meta = {
        **{k: v for k, v in read_metadata(args.model).items() if k in ("source", "dtype", "tokens_trained")},
        "stage": "prune",
        "method": args.method,
        "pattern": str(pattern),
        "pruned_from": args.model,
        "calibration": {"split": "train", "num_sequences": args.num_calibration, "seq_len": int(calib.shape[1]),
                        "seed": args.seed},
        "solver": {"blocksize": args.blocksize, "percdamp": args.percdamp} if args.method == "sparsegpt" else {},
        "pruned_modules": sorted(masks),
        "sparsity": stats,
        "num_params": num_params(model),
        "nonzero_params": nonzero_params(model),
        "prune_wall_s": round(wall, 1),
    }
    card = (f"# {args.method} {pattern} of `{args.model}`\n\nOne-shot pruning of every attention and MLP "
            f"projection; {stats['overall_pruned_fraction']:.3f} of their weights are zero. Masks: "
            "`sparsity_masks.safetensors`.\n")
    save_pruned_model_dir(model, tokenizer, args.out, masks=masks, metadata=meta, card=card)
    print(f"[prune] {args.method} {pattern}: {stats['overall_pruned_fraction']:.4f} of "
          f"{stats['prunable_params']:,} prunable weights zeroed in {wall:.1f} s")


if __name__ == "__main__":
    # Not yet registered in layerchop.cli / dvc.yaml (wiring the one-shot baselines into the pipeline is
    # the open part of issue 4), so this module parses its own arguments.
    import sys

    parser = argparse.ArgumentParser(prog="python -m layerchop.stages.prune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    try:
        main(parser.parse_args())
    except (ValueError, FileNotFoundError) as e:
        print(f"layerchop prune: error: {e}", file=sys.stderr)
        sys.exit(2)
