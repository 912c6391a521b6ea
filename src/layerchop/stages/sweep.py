"""Stage ``sweep``: the peak-LR rule applied to every headline arm, from the LR sweep's runs (``lr_sweep.md``).

Each arm's validation perplexity at the end of training against its peak LR, and whether the LR it is reported at
is its best. Reads only training records (``layerchop train --metrics``): each arm's reported run (``lr_sweep.arms``) and its
runs at the sweep's other LRs (``lr_sweep.runs``, ``data/runs/lr-sweep/<run>.json``). The perplexity is the run's
own validation at its last step (``train.val_batches`` batches of the validation split, the same for every run).

Example::

    layerchop sweep --runs data/runs/lr-sweep --tables paper/tables --figures paper/figures
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from layerchop.config import load_params, section
from layerchop.io import read_json, staged
from layerchop.report.tables import markdown, save_figure


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", required=True, help="directory of the sweep runs' records (<run>.json)")
    p.add_argument("--tables", required=True, help="output directory for lr_sweep.md")
    p.add_argument("--figures", required=True, help="output directory for lr_sweep.{png,pdf}")


def record(path: Path, key: str) -> tuple[float, float]:
    """``(peak LR, validation perplexity at the end)`` of a training record.

    Raises:
        FileNotFoundError / ValueError: naming ``key`` and the file when it is missing or has no validation.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist (run its training stage first)")
    rec = read_json(path)
    if not isinstance(rec, dict) or "lr" not in rec or "val_ppl_last" not in rec:
        raise ValueError(f"{key}: {path} has no lr and val_ppl_last (a record of `layerchop train --metrics` with "
                         "train.val_batches > 0)")
    return float(rec["lr"]), float(rec["val_ppl_last"])


def verdicts(points: dict[str, dict[float, float]], reported: dict[str, float], margin: float) -> dict[str, str]:
    """Per arm: ``best`` when its reported LR has the lowest perplexity of its sweep, ``within <margin>`` when it is
    within ``margin`` of the lowest, else ``not best`` naming the best LR; said when the best is the sweep's lowest or
    highest LR (the optimum may lie beyond it)."""
    out = {}
    for arm, ppls in points.items():
        best_lr = min(ppls, key=ppls.get)
        mine = ppls[reported[arm]]
        if best_lr == reported[arm]:
            out[arm] = "best"
        elif mine <= ppls[best_lr] * (1 + margin):
            out[arm] = f"within {margin:.0%} of the best ({best_lr:g})"
        else:
            out[arm] = f"not best: {best_lr:g} gives {ppls[best_lr]:.2f}"
        if len(ppls) > 1 and best_lr in (min(ppls), max(ppls)):  # the optimum may lie beyond the swept range
            out[arm] += "; the best is at the edge of the sweep"
    return out


def sweep_figure(points: dict[str, dict[float, float]], reported: dict[str, float], out_stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for i, (arm, ppls) in enumerate(points.items()):
        lrs = sorted(ppls)
        ax.plot(lrs, [ppls[lr] for lr in lrs], marker="o", color=f"C{i}", label=arm)
        ax.plot([reported[arm]], [ppls[reported[arm]]], marker="*", markersize=14, color=f"C{i}", linestyle="none")
    if not points:
        ax.text(0.5, 0.5, "no LR sweep in this profile (lr_sweep.runs is empty)", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8, frameon=False)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("validation perplexity at the end (log)")
    ax.set_title("Peak-LR sweep per arm (star: the LR each arm is reported at)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, out_stem)


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    cfg = section("lr_sweep", params)
    points: dict[str, dict[float, float]] = {}
    reported: dict[str, float] = {}
    for arm, path in cfg.arms.items():
        lr, ppl = record(Path(path), f"lr_sweep.arms.{arm}")
        reported[arm] = lr
        points[arm] = {lr: ppl}
    for name, run in cfg.runs.items():
        lr, ppl = record(Path(args.runs) / f"{name}.json", f"lr_sweep.runs.{name}")
        if abs(lr - run.lr) > 1e-12 * run.lr:
            raise ValueError(f"lr_sweep.runs.{name}: its record says lr {lr:g}, the params {run.lr:g} (a stale run)")
        if lr in points[run.arm]:
            raise ValueError(f"lr_sweep.runs.{name}: lr {lr:g} is already {run.arm}'s (its reported run or another)")
        points[run.arm][lr] = ppl
    ruled = verdicts(points, reported, cfg.margin)
    lrs = sorted({lr for ppls in points.values() for lr in ppls})
    header = ["Arm"] + [f"lr {lr:g}" for lr in lrs] + ["Reported at", "Verdict"]
    body: list[list[Any]] = []
    for arm, ppls in points.items():
        body.append([arm] + [(f"**{ppls[lr]:.2f}**" if lr == reported[arm] else f"{ppls[lr]:.2f}") if lr in ppls
                             else "–" for lr in lrs] + [f"{reported[arm]:g}", ruled[arm]])
    if not points:
        caption = "No LR sweep in this profile (`lr_sweep.arms` is empty): every arm trains at its configured LR."
    else:
        caption = (
            "Validation perplexity at the end of training (the run's own validation: train.val_batches batches of the "
            "validation split, the same for every run) against the peak LR, each arm trained again at the sweep's "
            "other LRs with everything else equal (a LayerChop run trains its own warm step). Bold: the LR the arm "
            f"is reported at. The rule: each arm is reported at the LR with the lowest perplexity, a tie within "
            f"{cfg.margin:.0%} counting as best. "
            + ("Every arm's reported LR passes the rule, so the arms are compared at a fair LR."
               if all(v == "best" or v.startswith("within") for v in ruled.values()) else
               "An arm fails the rule (see its verdict): its reported results are at a worse LR than its best, which "
               "handicaps it in every comparison; set its --lr in its flags and re-run its stages."))
    with staged(args.tables, args.figures) as (tables, figures):  # all outputs or none
        (tables / "lr_sweep.md").write_text(markdown(header, body, caption))
        sweep_figure(points, reported, figures / "lr_sweep")
    print(markdown(header, body, caption))
