"""Stage ``curve``: evaluate a training run along the way (its snapshots, then its final model).

Each point carries the compute spent to reach it, so curves can be drawn against compute: tokens and FLOPs from
the model's ``layerchop.json``, device-seconds from the run's metrics (``--record``, what ``layerchop train
--metrics`` wrote: wall times stay out of model directories, so that a re-run writes the same bytes).

Example::

    layerchop curve --snapshots data/snapshots/fig4-distill --final data/models/fig4-distill \\
        --record data/runs/fig4-distill.json --data data/prepared --out data/eval/fig4-distill
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from layerchop.config import section
from layerchop.evaluate.harness import write_items
from layerchop.evaluate.suite import evaluate_model
from layerchop.io import atomic_dir, check_model_dir, read_json, read_metadata, write_json
from layerchop.machine import warn_slow_evaluation
from layerchop.report.summary import summary


# the wall-time keys of a training run's metrics that a curve carries (beside the model's steps, tokens and FLOPs)
TIMING = ("train_s", "device_s", "s_per_step", "warm_start_train_s", "scoring_device_s")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshots", required=True, help="directory of step_XXXXXX model directories")
    p.add_argument("--final", required=True, help="the run's final model directory")
    p.add_argument("--record", required=True,
                   help="the run's metrics (`layerchop train --metrics`): the wall times of the final model and of "
                        "each snapshot")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--out", required=True,
                   help="output directory (curve.json; metrics.json and items.csv, per-item results, of the final model)")


def run_points(snapshots: Path, final: Path) -> list[Path]:
    """Snapshots in step order, then the final model."""
    snaps = sorted(snapshots.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if snapshots.exists() else []
    for d in snaps:
        check_model_dir(d, "--snapshots")
    check_model_dir(final, "--final")
    return snaps + [final]


def run_timing(record: Path, dirs: list[Path]) -> dict[Path, dict]:
    """Each point's wall times from the run's metrics ``record``: a snapshot's under ``snapshots`` by its
    directory name, the final model's at the top level.

    Raises:
        ValueError: naming ``--record`` when it lacks a point's times (not this run's metrics).
    """
    if not record.is_file():
        raise FileNotFoundError(f"--record {record}: no such file (the metrics `layerchop train --metrics` wrote)")
    rec = read_json(record)
    snaps = rec.get("snapshots") if isinstance(rec, dict) else None
    out = {}
    for d in dirs:
        t = rec if d == dirs[-1] else (snaps or {}).get(d.name)
        if not isinstance(t, dict) or "device_s" not in t:
            raise ValueError(f"--record {record} has no wall times for {d} (not the metrics `layerchop train "
                             "--metrics` wrote for this run)")
        out[d] = {k: t[k] for k in TIMING if k in t}
    return out


def main(args: argparse.Namespace) -> None:
    cfg = section("evaluate", path=args.params)
    dirs = run_points(Path(args.snapshots), Path(args.final))
    timing = run_timing(Path(args.record), dirs)
    warn_slow_evaluation(cfg, "curve")
    points = []
    for d in tqdm(dirs, desc="curve", unit="model"):
        metrics, results = evaluate_model(d, args.data, cfg)
        machine = metrics.pop("machine")
        meta = read_metadata(d)
        compute = meta.get("compute")
        if compute is None:
            raise ValueError(f"{d}/layerchop.json has no 'compute' record (not written by `layerchop train`)")
        points.append({"model": str(d), "step": compute["steps"], "tokens": compute["tokens"],
                       "flops": compute["flops"], "device_s": timing[d]["device_s"], "metrics": metrics})
        print(f"[curve] step {compute['steps']}: val/ppl {metrics['val/ppl']:.2f}", flush=True)
    final_meta = read_metadata(dirs[-1])
    compute = {**final_meta["compute"], **timing[dirs[-1]]}
    final = {**points[-1]["metrics"], **{f"compute/{k}": v for k, v in compute.items()
                                         if isinstance(v, (int, float))}, "machine": machine}
    with atomic_dir(args.out) as tmp:
        write_json(tmp / "curve.json", {"objective": final_meta.get("objective", "lm"), "points": points,
                                        "compute": compute, "distill": final_meta.get("distill"),
                                        "distill_term_scales": final_meta.get("distill_term_scales")})
        write_json(tmp / "metrics.json", final)
        write_json(tmp / "summary.json", summary(final))  # the final model's headline numbers
        # the final model's per-item results, for paired comparisons (as `layerchop evaluate` writes them)
        write_items(tmp / "items.csv", results.pop("items", []))
