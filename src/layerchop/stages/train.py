"""Stage ``train``: continued self-supervised pretraining to a token budget (Lightning).

Example::

    layerchop train --init data/models/chopped --data data/prepared --out data/models/layerchop \
        --run-dir data/checkpoints/layerchop --log data/runs/layerchop.csv

Re-running after an interruption resumes from the last checkpoint of the same configuration
(``--resume auto``). Multi-device: set ``train.devices``/``train.num_nodes``/``train.strategy: fsdp`` and
launch with ``torchrun``, ``fabric run`` or ``srun``.
"""

from __future__ import annotations

import argparse

from layerchop.config import section
from layerchop.train.run import train


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", required=True, help="initial weights (HF directory)")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--run-dir", required=True, help="Lightning checkpoints and logs (kept for resume)")
    p.add_argument("--log", default=None, help="copy the metrics CSV here")
    p.add_argument("--resume", default="auto", help="auto | never | path to a Lightning checkpoint")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps (no export)")


def main(args: argparse.Namespace) -> None:
    train(args.init, args.data, args.out, section("train", path=args.params), run_dir=args.run_dir,
          resume=args.resume, log_csv=args.log, max_steps_override=args.stop_after)
