"""Stage ``train``: continued pretraining (or CHOP + distill) to a token or FLOP budget (Lightning).

Example::

    layerchop train --init data/models/chopped --data data/prepared --out data/models/layerchop \\
        --run-dir data/checkpoints/layerchop --log data/runs/layerchop.csv --metrics data/runs/layerchop.json \\
        --warm-start

    layerchop train --objective distill --teacher data/models/dense --init data/models/chopped \\
        --data data/prepared --out data/models/fig4-distill --run-dir data/checkpoints/fig4-distill \\
        --flop-budget 8.0e13 --snapshots 3 --snapshot-dir data/snapshots/fig4-distill

    layerchop train --chop-every-tokens 4096 --token-budget 163840 --init data/models/chopped ...  # gradual

    layerchop train ... --plan      # print the resolved run (steps, FLOPs, warm start, checks) and exit

Re-running after an interruption resumes from the newest checkpoint of the same run (``--resume auto``).
Multi-process: ``train.strategy: fsdp`` with ``train.devices`` x ``train.num_nodes``; with
``train.launcher: torchrun`` the stage starts torchrun itself, with ``train.launcher: slurm`` it submits
itself as a batch job and waits for it (``layerchop.launch``; job settings in the ``slurm`` section).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

from layerchop.config import BALANCE, DIMCHOP_STRUCTURES, load_params, section


def first_process() -> bool:
    """Not a process that Lightning's own launcher started beside the first (``devices > 1`` without torchrun
    re-runs this command once per further device, with ``LOCAL_RANK`` set)."""
    import os

    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", required=True, help="initial weights (HF directory)")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--run-dir", required=True, help="checkpoints and logs (kept for resume)")
    p.add_argument("--log", default=None, help="copy the metrics CSV here")
    p.add_argument("--metrics", default=None, help="write the run's compute, last loss and host memory here (JSON)")
    p.add_argument("--resume", default="auto", help="auto | never | path to a Lightning checkpoint")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps (no export)")
    p.add_argument("--objective", default="lm",
                   help="the training method (layerchop.train.methods.METHODS): lm: continued pretraining; distill: "
                        "CHOP + distill (params section 'distill'); dimchop: width pruning while training (params "
                        "section 'dimchop')")
    p.add_argument("--structure", default=None, choices=DIMCHOP_STRUCTURES,
                   help="--objective dimchop: this instead of dimchop.structure (one dvc stage per structure)")
    p.add_argument("--balance", default=None, choices=BALANCE,
                   help="--objective distill: distill.balance for this run (initial: every term scaled to the LM "
                        "term's magnitude on the first batch)")
    p.add_argument("--teacher", default=None, help="uncompressed teacher (HF directory) for --objective distill")
    p.add_argument("--flop-budget", type=float, default=None,
                   help="train to this many FLOPs instead of train.token_budget")
    p.add_argument("--token-budget", type=int, default=None,
                   help="train this many tokens instead of train.token_budget (e.g. figure6.token_budget)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate instead of train.lr (e.g. figure2.lr)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed instead of train.seed (data order, initialisation of anything new): one arm per seed")
    p.add_argument("--warm-start", action="store_true",
                   help="the paper's warm optimizer: the first train.warm_start_steps steps on the uncompressed "
                        "model the chopped --init came from (LayerChop arms only)")
    p.add_argument("--warm-only", action="store_true",
                   help="with --warm-start: train the warm start alone and publish its end checkpoint to --out, for "
                        "every warm-started arm to fork from (--warm-from); the dense steps run once")
    p.add_argument("--warm-from", default=None,
                   help="with --warm-start: restore the warm start from this --warm-only output instead of training "
                        "it (refused when it was made for another dense model, data, train section or code)")
    p.add_argument("--chop-every-tokens", type=float, default=None,
                   help="gradual chopping (Figure 6): start from the uncompressed model the chopped --init came from "
                        "and remove one of its removed_layers every this many tokens (whole optimizer steps)")
    p.add_argument("--snapshots", type=int, default=0, help="export N intermediate models, evenly spaced")
    p.add_argument("--snapshot-dir", default=None, help="where the intermediate models go")
    p.add_argument("--plan", action="store_true", help="print the resolved run as JSON and exit (loads no weights)")


def main(args: argparse.Namespace) -> int:
    from layerchop.launch import catch_time_limit_signal, rendezvous_id, run_torchrun, under_launcher, under_slurm
    from layerchop.train.methods import method
    from layerchop.train.plan import resolve

    if under_slurm():  # first thing: the time-limit warning must never end a task (see RequeueOnSignal)
        catch_time_limit_signal()

    params = load_params(args.params)
    cfg = section("train", params)
    if args.flop_budget is not None and args.token_budget is not None:
        raise ValueError("--flop-budget and --token-budget exclude each other")
    if args.flop_budget is not None:
        if not args.flop_budget > 0:
            raise ValueError(f"--flop-budget {args.flop_budget} must be > 0")
        cfg = dataclasses.replace(cfg, token_budget=None, flop_budget=args.flop_budget)
    if args.token_budget is not None:
        if not args.token_budget > 0:
            raise ValueError(f"--token-budget {args.token_budget} must be > 0")
        cfg = dataclasses.replace(cfg, token_budget=args.token_budget, flop_budget=None)
    if args.lr is not None:
        if not args.lr > 0:
            raise ValueError(f"--lr {args.lr} must be > 0")
        cfg = dataclasses.replace(cfg, lr=args.lr)
    if args.seed is not None:
        if args.seed < 0:
            raise ValueError(f"--seed {args.seed} must be >= 0")
        cfg = dataclasses.replace(cfg, seed=args.seed)
    if args.snapshots and args.snapshot_dir is None:
        raise ValueError(f"--snapshots {args.snapshots} needs --snapshot-dir")
    # the method's settings: its params section, with the stage flags it owns (DimChop's --structure)
    settings = method(args.objective).settings(params, {"structure": args.structure, "balance": args.balance})
    plan = resolve(args.init, args.data, args.out, args.run_dir, cfg, objective=args.objective,
                   teacher_dir=args.teacher, method_cfg=settings, warm_start=args.warm_start,
                   snapshots=args.snapshots, chop_every_tokens=args.chop_every_tokens, warm_only=args.warm_only,
                   warm_from=args.warm_from,
                   budget_key=("--flop-budget (a figure's flop_budget in dvc.yaml)" if args.flop_budget else
                               "--token-budget (a figure's token_budget in dvc.yaml)" if args.token_budget else None))
    if cfg.warm_start_steps and not args.warm_start and not under_launcher() and first_process():
        print(ignored_warm_start(cfg.warm_start_steps, params), file=sys.stderr, flush=True)
    # here, where the steps run (a login node that submits to SLURM measures nothing)
    if not args.plan and cfg.launcher != "slurm" and not under_launcher() and first_process() \
            and (line := slow_precision(cfg)):
        print(line, file=sys.stderr, flush=True)
    if args.plan:  # a plan needs no GPU (a login node plans a cluster run)
        print(json.dumps(plan.describe(), indent=2))
        return 0
    submit = cfg.launcher == "slurm" and not under_launcher()
    if cfg.accelerator in ("gpu", "cuda") and not submit:  # a login node that submits has no GPU to check
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"train.accelerator={cfg.accelerator!r}: this machine has no CUDA device")
    if not under_launcher():  # before any work (and before torchrun starts): no other run uses --run-dir
        from layerchop.train.checkpoint import RunLock

        with RunLock(args.run_dir):
            pass
    if cfg.launcher == "torchrun" and not under_launcher():
        return run_torchrun(cfg, args.argv, run_id=rendezvous_id(plan.fingerprint))
    if submit:
        return submit_slurm(args, cfg, section("slurm", params), plan.fingerprint)

    from layerchop.train.run import train

    train(plan, resume=args.resume, log_csv=args.log, metrics=args.metrics, stop_after=args.stop_after,
          snapshot_dir=args.snapshot_dir)
    return 0


def slow_precision(cfg) -> Optional[str]:
    """The warning for a bf16 ``train.precision`` on a CPU whose bf16 matmuls are the slow path, or None."""
    if not cfg.precision.startswith("bf16") or cfg.accelerator not in ("cpu", "auto"):
        return None
    if cfg.accelerator == "auto":
        import torch

        if torch.cuda.is_available():
            return None
    from layerchop.machine import slow_bf16

    line = slow_bf16("train.precision", cfg.precision, "32-true")
    return f"layerchop train: {line}" if line else None


def warm_start_stages(dvc: str | Path, params: dict) -> list[str]:
    """The stages of ``dvc`` whose command passes ``--warm-start``, expanded as DVC expands them
    (:mod:`layerchop.pipeline`; an arm's flags in ``arms.trained`` included): ``name@key``, or ``name@*`` when every
    instance of it does."""
    import yaml

    from layerchop.pipeline import expand, interpolate

    users = []
    for name, stage in ((yaml.safe_load(Path(dvc).read_text()) or {}).get("stages") or {}).items():
        instances = expand(stage, params)
        using = [key for key, body in instances if "--warm-start" in interpolate(str(body.get("cmd", "")), params)]
        if not using:
            continue
        users += [name] if using == [""] else [f"{name}@*"] if len(using) == len(instances) else \
            [f"{name}@{key}" for key in using]
    return users


def ignored_warm_start(steps: int, params: dict, dvc: str | Path = "dvc.yaml") -> str:
    """The warning for a ``train.warm_start_steps`` that a stage without ``--warm-start`` ignores, naming the stages
    of ``dvc`` (where there is one here) that use it."""
    line = (f"layerchop train: warning: train.warm_start_steps={steps} is ignored by this run (no --warm-start); "
            "only stages that pass --warm-start use it")
    if Path(dvc).exists():
        line += f" ({dvc}: {', '.join(warm_start_stages(dvc, params)) or 'none'})"
    return line


def submit_slurm(args: argparse.Namespace, cfg, slurm, fingerprint: str) -> int:
    """``train.launcher: slurm``: this stage as a batch job of ``num_nodes`` x ``devices`` tasks; waits for it.

    The script and the job's log (appended to by every job of this run, requeued ones included) are
    ``<run-dir>/slurm/<fingerprint>.sbatch`` and ``.log``."""
    from pathlib import Path

    from layerchop.config import load_params
    from layerchop.launch import batch_script, job_environment, job_resources, run_slurm
    from layerchop.train.flops import measured_env

    jobs = Path(args.run_dir) / "slurm"
    log = jobs / f"{fingerprint}.log"
    script = batch_script(job_name=f"layerchop-train-{Path(args.out).name}", nodes=cfg.num_nodes,
                          tasks_per_node=cfg.devices, resources=job_resources("train", load_params(args.params)),
                          slurm=slurm, argv=args.argv, log=log.resolve(), workdir=Path.cwd(),
                          env={**job_environment("train"), **measured_env()})
    return run_slurm(script, jobs / f"{fingerprint}.sbatch", log, poll_seconds=slurm.poll_seconds)
