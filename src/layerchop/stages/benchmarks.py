"""Stage ``benchmarks``: which local benchmark data (``evaluate.local_tasks``) is there now, and its sha256.

DVC re-runs this stage every time (``always_changed``); the evaluation stages depend on its output, so they re-run
when a benchmark appears, disappears or changes (e.g. ``../shared`` put beside a checkout that ran without it) and
only then.

Example::

    layerchop benchmarks --out data/benchmarks.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import section
from layerchop.io import sha256_file, write_json


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output JSON file")


def local_data_status(cfg) -> dict:
    """``{task: {"path", "present", "sha256": {file: digest}}}`` for each local mirror of ``evaluate.tasks``."""
    status = {}
    for name in cfg.tasks:
        if name not in cfg.local_tasks:
            continue
        path = Path(cfg.local_tasks[name])
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else []
        status[name] = {"path": str(path), "present": path.exists(),
                        "sha256": {str(f.relative_to(path)): sha256_file(f) for f in files}}
    return status


def main(args: argparse.Namespace) -> None:
    status = local_data_status(section("evaluate", path=args.params))
    write_json(args.out, status)  # atomic
    for name, s in status.items():
        print(f"[benchmarks] {name}: {s['path']} " + (f"({len(s['sha256'])} files)" if s["present"] else "is absent"))
