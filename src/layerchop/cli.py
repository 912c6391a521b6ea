"""``layerchop <stage>``: one console entry point for every DVC stage.

Example::

    layerchop chop --model data/models/dense --out data/models/chopped
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

STAGES = ("download", "prepare", "chop", "prune", "train", "evaluate", "curve", "report", "figure1", "figure4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerchop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in STAGES:
        mod = importlib.import_module(f"layerchop.stages.{name}")
        p = sub.add_parser(name, help=(mod.__doc__ or "").splitlines()[0], description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        mod.add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    mod = importlib.import_module(f"layerchop.stages.{args.stage}")
    t0 = time.perf_counter()
    try:
        mod.main(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"layerchop {args.stage}: error: {e}", file=sys.stderr)
        return 2
    print(f"[{args.stage}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
