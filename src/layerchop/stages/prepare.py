"""Stage ``prepare``: tokenize, split by document, pack; build the offline zero-shot tasks.

Example::

    layerchop prepare --corpus data/corpus --model data/models/dense --out data/prepared
"""

from __future__ import annotations

import argparse

from layerchop.config import section
from layerchop.data.prepare import prepare
from layerchop.io import check_model_dir


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", required=True, help="download stage's corpus directory")
    p.add_argument("--model", required=True, help="model directory whose tokenizer is used")
    p.add_argument("--out", required=True, help="prepared data directory")


def main(args: argparse.Namespace) -> None:
    cfg = section("prepare", path=args.params)
    check_model_dir(args.model, "--model")
    counts = prepare(args.corpus, args.model, args.out, cfg)
    for split, info in counts["splits"].items():
        print(f"[prepare] {split}: {info['documents']} documents, {info['tokens']} tokens, "
              f"{info['sequences']} sequences")
    print(f"[prepare] tasks: {counts['tasks']}")
