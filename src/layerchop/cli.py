"""``layerchop <stage>``: one console entry point for every DVC stage.

Example::

    layerchop chop --model data/models/dense --out data/models/chopped
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

STAGES = ("download", "prepare", "chop", "scratch", "prune", "train", "benchmarks", "evaluate", "curve", "report", "figure1", "figure3", "figure4",
          "figure2", "figure6", "table6", "tables45", "plan", "shrink",
          "bench", "table3", "table2")


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


# the arguments through which stages write: each is refused up front when it cannot be written
OUTPUT_ARGS = ("out", "tables", "figures", "run_dir", "log", "metrics", "snapshot_dir", "cache")


def check_outputs(args: argparse.Namespace) -> None:
    """Every stage: an output that cannot be written (read-only, a file in the way) is refused before any work,
    with one line naming the argument (:func:`layerchop.io.check_writable`)."""
    from layerchop.io import check_writable

    for name in OUTPUT_ARGS:
        value = getattr(args, name, None)
        if value is not None:
            check_writable(value, f"--{name.replace('_', '-')}")


def submit_one_task(args: argparse.Namespace) -> int | None:
    """A stage named in ``slurm.stages``: submit it as a one-task batch job (resources from
    :func:`layerchop.launch.job_resources`: one GPU when its section's ``device`` is CUDA), wait for it and
    return its status; None to run it here."""
    from pathlib import Path

    from layerchop.config import ONE_TASK_STAGES, load_params, section
    from layerchop.launch import batch_script, job_environment, job_resources, run_slurm, under_launcher

    if args.stage not in ONE_TASK_STAGES or under_launcher():
        return None
    params = load_params(args.params)
    slurm = section("slurm", params)
    if args.stage not in slurm.stages:
        return None
    if args.stage in ("evaluate", "curve"):  # here, with the internet: the job runs with the Hub offline
        from layerchop.evaluate.harness import prefetch_hub_datasets

        prefetch_hub_datasets(section("evaluate", params))
    job = f"{args.stage}-{Path(args.out).name}"
    jobs = Path(slurm.job_dir)
    script = batch_script(job_name=f"layerchop-{job}", nodes=1, tasks_per_node=1,
                          resources=job_resources(args.stage, params), slurm=slurm, argv=args.argv,
                          log=(jobs / f"{job}.log").resolve(), workdir=Path.cwd(), time_limit_signal=False,
                          env=job_environment(args.stage))
    return run_slurm(script, jobs / f"{job}.sbatch", jobs / f"{job}.log", poll_seconds=slurm.poll_seconds)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv is None:
        from layerchop.launch import ARGV_ENV

        # a worker started by torchrun gets the stage's arguments from the launching process
        argv = json.loads(os.environ[ARGV_ENV]) if ARGV_ENV in os.environ else sys.argv[1:]
    argv = list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # a stage that relaunches itself (torchrun) repeats its own arguments
    mod = importlib.import_module(f"layerchop.stages.{args.stage}")
    t0 = time.perf_counter()
    try:
        check_outputs(args)
        rc = submit_one_task(args)
        if rc is None:
            rc = mod.main(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"layerchop {args.stage}: error: {e}", file=sys.stderr)
        return 2
    if rc:
        print(f"layerchop {args.stage}: failed with status {rc}", file=sys.stderr)
        return rc
    if args.stage != "plan":  # plan's output is the table or JSON alone
        print(f"[{args.stage}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
