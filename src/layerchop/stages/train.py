"""Stage ``train``: continued pretraining (or CHOP + distill) to a token or FLOP budget (Lightning).

Example::

    layerchop train --init data/models/chopped --data data/prepared --out data/models/layerchop \
        --run-dir data/checkpoints/layerchop --log data/runs/layerchop.csv --metrics data/runs/layerchop.json

    layerchop train --objective distill --teacher data/models/dense --init data/models/chopped \
        --data data/prepared --out data/models/fig4-distill --run-dir data/checkpoints/fig4-distill \
        --flop-budget 8.0e13 --snapshots 3 --snapshot-dir data/snapshots/fig4-distill

Re-running after an interruption resumes from the last checkpoint of the same configuration
(``--resume auto``). Multi-device: set ``train.devices``/``train.num_nodes``/``train.strategy: fsdp`` and
launch with ``torchrun``, ``fabric run`` or ``srun``.
"""

from __future__ import annotations

import argparse
import dataclasses

from layerchop.config import load_params, section
from layerchop.train.run import OBJECTIVES, train


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", required=True, help="initial weights (HF directory)")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--run-dir", required=True, help="Lightning checkpoints and logs (kept for resume)")
    p.add_argument("--log", default=None, help="copy the metrics CSV here")
    p.add_argument("--metrics", default=None, help="write the run's compute and last loss here (JSON)")
    p.add_argument("--resume", default="auto", help="auto | never | path to a Lightning checkpoint")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps (no export)")
    p.add_argument("--objective", default="lm", choices=OBJECTIVES,
                   help="lm: continued pretraining; distill: CHOP + distill (params section 'distill')")
    p.add_argument("--teacher", default=None, help="uncompressed teacher (HF directory) for --objective distill")
    p.add_argument("--flop-budget", type=float, default=None,
                   help="train to this many FLOPs instead of train.token_budget")
    p.add_argument("--snapshots", type=int, default=0, help="export N intermediate models, evenly spaced")
    p.add_argument("--snapshot-dir", default=None, help="where the intermediate models go")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    cfg = section("train", params)
    if args.flop_budget is not None:
        if not args.flop_budget > 0:
            raise ValueError(f"--flop-budget {args.flop_budget} must be > 0")
        cfg = dataclasses.replace(cfg, token_budget=None, flop_budget=args.flop_budget)
    distill = section("distill", params) if args.objective == "distill" else None
    train(args.init, args.data, args.out, cfg, run_dir=args.run_dir, resume=args.resume, log_csv=args.log,
          max_steps_override=args.stop_after, objective=args.objective, teacher_dir=args.teacher,
          distill_cfg=distill, snapshots=args.snapshots, snapshot_dir=args.snapshot_dir, metrics=args.metrics)
