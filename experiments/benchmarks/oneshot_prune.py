"""Benchmark: one-shot pruning of the dense model — wall time and val perplexity per method × pattern.

Prints numbers; asserts nothing about time. Run from the repository root after `dvc repro`:

    python experiments/benchmarks/oneshot_prune.py --num-calibration 32 --ppl-sequences 32
"""

from __future__ import annotations

import argparse
import time

import torch

from layerchop.data.prepare import PackedDataset
from layerchop.evaluate.perplexity import perplexity
from layerchop.io import load_model
from layerchop.prune.calibrate import calibration_batch, prune_model
from layerchop.prune.masks import nonzero_params
from layerchop.prune.sparsity import Pattern


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="data/models/dense")
    p.add_argument("--data", default="data/prepared")
    p.add_argument("--num-calibration", type=int, default=32)
    p.add_argument("--ppl-sequences", type=int, default=32)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--patterns", default="unstructured:0.5,4:8,2:4")
    args = p.parse_args()
    torch.manual_seed(0)
    calib = calibration_batch(PackedDataset(args.data, "train"), args.num_calibration, seed=0)
    dense = load_model(args.model)
    base = perplexity(dense, args.data, "val", args.ppl_sequences)["ppl"]
    print(f"threads={torch.get_num_threads()} calibration={tuple(calib.shape)} dense val ppl={base:.2f} "
          f"nonzero={nonzero_params(dense):,}")
    print(f"{'method':<10} {'pattern':<16} {'prune s':>8} {'val ppl':>10} {'nonzero params':>15}")
    for method in args.methods.split(","):
        for spec in args.patterns.split(","):
            model = load_model(args.model)
            t0 = time.perf_counter()
            prune_model(model, calib, method, Pattern.parse(spec))
            wall = time.perf_counter() - t0
            ppl = perplexity(model, args.data, "val", args.ppl_sequences)["ppl"]
            print(f"{method:<10} {spec:<16} {wall:>8.1f} {ppl:>10.2f} {nonzero_params(model):>15,}", flush=True)


if __name__ == "__main__":
    main()
