"""Figure 4 and ``distill.md``: LayerChop vs LayerChop + distill against training compute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerchop.report.tables import average_accuracy, fmt_ppl, save_figure, task_columns
from layerchop.train.flops import to_gpu_hours

LABELS = {"lm": "LayerChop (continued pretraining)", "distill": "LayerChop + distill"}


def arm_series(curve: dict[str, Any], start: dict[str, Any], cols) -> list[dict[str, Any]]:
    """Points of one arm, starting at the shared chopped model (zero compute)."""
    pts = [{"step": 0, "tokens": 0, "flops": 0, "device_s": 0.0, "metrics": start}] + curve["points"]
    return [{**p, "val_ppl": p["metrics"].get("val/ppl"), "avg_acc": average_accuracy(p["metrics"], cols)}
            for p in pts]


def figure4(arms: list[dict[str, Any]], out_stem: Path, gpu: str) -> None:
    """2 x 2 panels: val perplexity (log) and average accuracy against FLOPs and against measured
    device-hours, one line per arm with a marker at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9.6, 6.6), sharey="row")
    for arm in arms:
        pts = arm["series"]
        for col, (xkey, scale) in enumerate((("flops", 1e15), ("device_s", 3600.0))):
            x = [p[xkey] / scale for p in pts]
            axes[0, col].plot(x, [p["val_ppl"] for p in pts], marker="o", label=arm["label"])
            axes[1, col].plot(x, [100 * p["avg_acc"] if p["avg_acc"] is not None else float("nan") for p in pts],
                              marker="o", label=arm["label"])
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_ylabel("validation perplexity (log scale)")
    axes[1, 0].set_ylabel("average zero-shot accuracy (%)")
    axes[1, 0].set_xlabel("training compute (PFLOPs)")
    axes[1, 1].set_xlabel("device-hours measured on this machine")
    for ax in axes.flat:
        ax.grid(alpha=0.3, which="both")
    axes[0, 1].legend(fontsize=8, loc="best")
    fig.suptitle(f"LayerChop vs LayerChop + distill at equal FLOPs ({gpu}-hours: see paper/tables/distill.md)",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_stem)


def _gpu_hours(flops: float, cfg) -> str:
    return f"{to_gpu_hours(flops, cfg.gpu_peak_flops, cfg.mfu):.3g}"


def distill_tables(arms: list[dict[str, Any]], cfg, cols) -> tuple[list[str], list[list[str]], list[str],
                                                                     list[list[str]]]:
    """The final comparison (one row per arm) and the intermediate evaluations (one row per point)."""
    gpu_col = f"{cfg.gpu}-hours @ {cfg.mfu:.0%} MFU"
    header = ["Arm", "Steps", "Tokens seen", "Train FLOPs", gpu_col, "Device-hours (measured)", "s/step",
              "Val PPL", "Test PPL"] + [f"{t} ({m})" for t, m in cols] + ["Avg acc"]
    body = []
    for arm in arms:
        c, m = arm["compute"], arm["series"][-1]["metrics"]
        avg = average_accuracy(m, cols)
        body.append([
            arm["label"], str(c["steps"]), f"{c['tokens']:,}", f"{c['flops']:.3e}", _gpu_hours(c["flops"], cfg),
            f"{c['device_s'] / 3600:.3f}", f"{c['s_per_step']:.2f}", fmt_ppl(m.get("val/ppl")),
            fmt_ppl(m.get("test/ppl")),
        ] + ["–" if m.get(f"eval/{t}/{k}") is None else f"{100 * m[f'eval/{t}/{k}']:.1f}" for t, k in cols]
          + ["–" if avg is None else f"{100 * avg:.1f}"])
    points_header = ["Arm", "Step", "Tokens", "FLOPs", gpu_col, "Device-hours", "Val PPL", "Avg acc"]
    points = []
    for arm in arms:
        for p in arm["series"]:
            points.append([arm["label"], str(p["step"]), f"{p['tokens']:,}", f"{p['flops']:.3e}",
                           _gpu_hours(p["flops"], cfg), f"{p['device_s'] / 3600:.3f}", fmt_ppl(p["val_ppl"]),
                           "–" if p["avg_acc"] is None else f"{100 * p['avg_acc']:.1f}"])
    return header, body, points_header, points


def load_arms(curves: list[dict[str, Any]], start: dict[str, Any]) -> tuple[list[dict[str, Any]], list]:
    cols = task_columns([{"metrics": start}] + [{"metrics": p["metrics"]} for c in curves for p in c["points"]])
    arms = []
    for c in curves:
        arms.append({"label": LABELS.get(c["objective"], c["objective"]), "objective": c["objective"],
                     "compute": c["compute"], "distill": c.get("distill"), "series": arm_series(c, start, cols)})
    return arms, cols
