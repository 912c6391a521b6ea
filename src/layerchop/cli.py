"""``layerchop <stage>``: one console entry point for every DVC stage.

Example::

    layerchop chop --model data/models/dense --out data/models/chopped
"""

from __future__ import annotations

import argparse
import ast
import gc
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import textwrap
import time

# every subcommand, grouped as ``layerchop --help`` lists them
GROUPS = {
    "pipeline stages (dvc.yaml runs them)": ("download", "prepare", "chop", "scratch", "prune", "train", "shrink",
                                            "benchmarks", "evaluate", "curve", "bench"),
    "reports (tables and figures from metrics files)": ("report", "figure1", "figure2", "figure3", "figure4",
                                                        "figure6", "table2", "table3", "table6", "tables45", "sweep", "long",
                                                        "paper"),
    "tools": ("plan", "push"),
}
STAGES = tuple(name for names in GROUPS.values() for name in names)


def stage_doc(name: str) -> str:
    """A stage module's docstring, read from its source without importing it."""
    source = importlib.util.find_spec(f"layerchop.stages.{name}").origin
    with open(source, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read())) or ""


def plain(doc: str) -> str:
    """A docstring as a terminal shows it: reStructuredText's literals, roles and ``::`` become plain text."""
    doc = re.sub(r":(?:func|mod|class|meth|attr|data):`~?([^`]+)`", r"`\1`", doc)
    doc = re.sub(r"``([^`]+)``", r"`\1`", doc)
    return re.sub(r"(\S)::$", r"\1:", doc, flags=re.M)


def summary(name: str) -> str:
    """The first sentence of a stage's docstring, without its ``Stage ``x``:`` prefix."""
    first = plain(stage_doc(name)).split("\n\n")[0].replace("\n", " ")
    return re.sub(r"^(Stage )?`[^`]+`: ", "", first)


def overview() -> str:
    """The commands by group, one wrapped summary each (the terminal's width)."""
    width = max(map(len, STAGES)) + 4
    columns = max(shutil.get_terminal_size().columns, 60)
    lines = []
    for group, names in GROUPS.items():
        lines.append(f"{group}:")
        for name in names:
            lines += textwrap.wrap(summary(name), columns, initial_indent=f"  {name:<{width - 2}}",
                                   subsequent_indent=" " * width, break_on_hyphens=False)
        lines.append("")
    return "\n".join(lines) + "\n`layerchop <command> --help` shows a command's arguments and an example."


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("layerchop")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "unknown (not installed)"


def build_parser(stages: tuple[str, ...] = STAGES) -> argparse.ArgumentParser:
    """Every stage's subcommand; the arguments of those in ``stages`` (their modules are imported).

    A command imports only its own stage's module: building all of them imports most of the library (torch,
    transformers, matplotlib, torchmetrics), seconds that every stage process, torchrun worker and
    ``layerchop --help`` would pay for nothing."""
    parser = argparse.ArgumentParser(prog="layerchop", description=plain(__doc__.splitlines()[0]),
                                     epilog=overview(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"layerchop {version()}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<command>",
                                help="one of the commands below")
    for name in STAGES:
        p = sub.add_parser(name, description=plain(stage_doc(name)),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--params", default=None,
                       help="params file (default: params.yaml here; where there is none, every key's default)")
        if name in stages:
            importlib.import_module(f"layerchop.stages.{name}").add_args(p)
    return parser


# the arguments through which stages write: each is refused up front when it cannot be written
OUTPUT_ARGS = ("out", "tables", "figures", "run_dir", "log", "metrics", "snapshot_dir", "cache", "summary")


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
    """Run the stage ``argv`` names (default: this process's command line) and return its exit status.

    As a process's entry point (no ``argv``), the process then exits fast: :func:`gc.freeze` keeps the
    interpreter's final collections from walking the heap of objects torch and transformers leave (~1.3 s
    of every stage process's, torchrun worker's and SLURM task's exit on a 2-core machine, 0.2 s frozen;
    everything a stage writes is closed and renamed into place before it returns)."""
    rc = run(argv)
    if argv is None:
        gc.freeze()
    return rc


def run(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv is None:
        from layerchop.launch import ARGV_ENV

        # a worker started by torchrun gets the stage's arguments from the launching process
        argv = json.loads(os.environ[ARGV_ENV]) if ARGV_ENV in os.environ else sys.argv[1:]
    argv = list(argv)
    args = build_parser(stages=tuple(argv[:1])).parse_args(argv)
    args.argv = argv  # a stage that relaunches itself (torchrun) repeats its own arguments
    mod = importlib.import_module(f"layerchop.stages.{args.stage}")
    from layerchop.io import OutputError

    t0 = time.perf_counter()
    try:
        check_outputs(args)
        rc = submit_one_task(args)
        if rc is None:
            rc = mod.main(args) or 0
    except (ValueError, FileNotFoundError, OutputError) as e:
        print(f"layerchop {args.stage}: error: {e}", file=sys.stderr)
        return 2
    if rc:
        print(f"layerchop {args.stage}: failed with status {rc}", file=sys.stderr)
        return rc
    if args.stage not in ("plan", "push"):  # plan's output is the table or JSON alone, push --dry-run's the card
        print(f"[{args.stage}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
