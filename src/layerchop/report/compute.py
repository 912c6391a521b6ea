"""Figure 4 and ``distill.md``: LayerChop vs LayerChop + distill against training compute."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from layerchop.report.tables import (accuracy_cells, accuracy_header, fmt_acc, fmt_ppl, mean_accuracy, save_figure,
                                     split_columns, task_columns)
from layerchop.train.flops import to_gpu_hours

LABELS = {"lm": "LayerChop (continued pretraining)", "distill": "LayerChop + distill"}


def arm_label(curve: dict[str, Any]) -> str:
    """An arm's label from its ``curve.json``: the objective's, and for a run with distillation settings how its
    terms were weighted."""
    label = LABELS.get(curve["objective"], curve["objective"])
    settings = curve.get("distill")
    if not settings:
        return label
    return label + (" (terms balanced at step 0)" if settings.get("balance") == "initial"
                    else " (the paper's unweighted sum)")


def balance_sentence(arms: list[dict[str, Any]]) -> str:
    """The caption's sentence on the balanced distillation arms: their measured scales (empty without one)."""
    parts = []
    for arm in arms:
        scales = arm.get("term_scales")
        if scales:
            parts.append(f"{arm['label']}: each weight also multiplied by the LM term over its own term on the first "
                         "batch (" + ", ".join(f"{k} x{v:.3g}" for k, v in scales.items() if v != 1.0) + ")")
    return ("" if not parts else
            "The paper's protocol is the unweighted sum; " + "; ".join(parts) + ", so that every term starts at the "
            "LM loss's magnitude (not the paper's protocol). ")


def arm_series(curve: dict[str, Any], start: dict[str, Any] | None, cols) -> list[dict[str, Any]]:
    """Points of one arm, starting at the shared chopped model (zero compute) when ``start`` is given."""
    pts = ([{"step": 0, "tokens": 0, "flops": 0, "device_s": 0.0, "metrics": start}] if start is not None else [])
    pts += curve["points"]
    in_domain, general = split_columns(cols)
    return [{**p, "val_ppl": p["metrics"].get("val/ppl"), "in_domain": mean_accuracy(p["metrics"], in_domain),
             "general": mean_accuracy(p["metrics"], general)} for p in pts]


def figure4(arms: list[dict[str, Any]], out_stem: Path, gpu: str, *, title: Optional[str] = None,
            reference: Optional[dict[str, Any]] = None) -> None:
    """Panels in two columns (against FLOPs, against measured device-hours): val perplexity (log), in-domain
    accuracy and general accuracy (rows present when measured), one line per arm with a marker and a ± 1
    standard-error bar at each evaluation. A point with ``"hollow": True`` gets an open marker; ``reference`` (a
    point of :func:`arm_series` with a ``label``) is drawn as a dotted horizontal line in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_rows = [(k, t) for k, t in (("in_domain", "in-domain accuracy (%)"), ("general", "general accuracy (%)"))
                if any(p[k] is not None for arm in arms for p in arm["series"])]
    fig, axes = plt.subplots(1 + len(acc_rows), 2, figsize=(9.6, 3.3 * (1 + len(acc_rows))), sharey="row",
                             squeeze=False)
    for i, arm in enumerate(arms):
        pts = arm["series"]
        for col, (xkey, scale) in enumerate((("flops", 1e15), ("device_s", 3600.0))):
            x = [p[xkey] / scale for p in pts]
            axes[0, col].plot(x, [p["val_ppl"] for p in pts], marker="o", color=f"C{i}", label=arm["label"])
            for row, (key, _) in enumerate(acc_rows, start=1):
                y = [100 * p[key][0] if p[key] is not None else float("nan") for p in pts]
                err = [100 * p[key][1] if p[key] is not None and p[key][1] is not None else 0.0 for p in pts]
                axes[row, col].errorbar(x, y, yerr=err, marker="o", capsize=3, color=f"C{i}", label=arm["label"])
            hollow = [j for j, p in enumerate(pts) if p.get("hollow")]
            for row, key in enumerate(["val_ppl"] + [k for k, _ in acc_rows]):
                ys = [pts[j][key] if key == "val_ppl" else (100 * pts[j][key][0] if pts[j][key] else None)
                      for j in hollow]
                axes[row, col].plot([x[j] for j in hollow], ys, linestyle="none", marker="o", markersize=5,
                                    markerfacecolor="white", markeredgecolor=f"C{i}", zorder=5)
    if reference is not None:
        for ax_row, key in zip(axes, ["val_ppl"] + [k for k, _ in acc_rows]):
            value = reference[key] if key == "val_ppl" else (100 * reference[key][0] if reference[key] else None)
            if value is not None:
                for ax in ax_row:
                    ax.axhline(value, color="0.4", linestyle=":", linewidth=1, label=reference["label"])
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_ylabel("validation perplexity (log scale)")
    for row, (_, ytitle) in enumerate(acc_rows, start=1):
        axes[row, 0].set_ylabel(ytitle)
    axes[-1, 0].set_xlabel("training compute (PFLOPs)")
    axes[-1, 1].set_xlabel("device-hours measured on this machine")
    for ax in axes.flat:
        ax.grid(alpha=0.3, which="both")
    axes[0, 1].legend(fontsize=8, loc="best")
    fig.suptitle(title or f"LayerChop vs LayerChop + distill at equal FLOPs ({gpu}-hours: see paper/tables/distill.md)",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_stem)


def _gpu_hours(flops: float, cfg) -> str:
    return f"{to_gpu_hours(flops, cfg.gpu_peak_flops, cfg.mfu):.3g}"


def distill_tables(arms: list[dict[str, Any]], cfg, cols) -> tuple[list[str], list[list[str]], list[str],
                                                                     list[list[str]]]:
    """The final comparison (one row per arm) and the intermediate evaluations (one row per point)."""
    gpu_col = f"{cfg.gpu}-hours @ {cfg.mfu:.0%} MFU"
    rows = [{"metrics": p["metrics"]} for arm in arms for p in arm["series"]]
    header = ["Arm", "Steps", "Tokens seen", "Train FLOPs", gpu_col, "Device-hours (measured)", "s/step",
              "Val PPL", "Test PPL"] + accuracy_header(rows, cols)
    body = []
    for arm in arms:
        c, m = arm["compute"], arm["series"][-1]["metrics"]
        body.append([
            arm["label"], str(c["steps"]), f"{c['tokens']:,}", f"{c['flops']:.3e}", _gpu_hours(c["flops"], cfg),
            f"{c['device_s'] / 3600:.3f}", f"{c['s_per_step']:.2f}", fmt_ppl(m.get("val/ppl")),
            fmt_ppl(m.get("test/ppl")),
        ] + accuracy_cells(m, cols))
    in_domain, general = split_columns(cols)
    points_header = ["Arm", "Step", "Tokens", "FLOPs", gpu_col, "Device-hours", "Val PPL"]
    points_header += (["In-domain acc"] if in_domain else []) + (["General acc"] if general else [])
    points = []
    for arm in arms:
        for p in arm["series"]:
            points.append([arm["label"], str(p["step"]), f"{p['tokens']:,}", f"{p['flops']:.3e}",
                           _gpu_hours(p["flops"], cfg), f"{p['device_s'] / 3600:.3f}", fmt_ppl(p["val_ppl"])]
                          + ([fmt_acc(p["in_domain"])] if in_domain else [])
                          + ([fmt_acc(p["general"])] if general else []))
    return header, body, points_header, points


def dimchop_tables(arms: list[dict[str, Any]], cfg, cols, shrunk: Optional[dict[int, int]] = None):
    """Figure 3's tables: the final comparison (one row per arm), the compression cost (ratios to the first arm,
    LayerChop; DimChop's scoring from ``compute``'s ``scoring_*``), and the evaluations along the runs.

    ``shrunk``: ``{arm index: parameters}`` of an arm's physically smaller export (``layerchop shrink``).
    Returns ``(header, body, cost_header, cost, points_header, points)``."""
    shrunk = shrunk or {}
    gpu_col = f"{cfg.gpu}-hours @ {cfg.mfu:.0%} MFU"
    rows = [{"metrics": p["metrics"]} for arm in arms for p in arm["series"]]
    header = ["Arm", "Steps", "Tokens seen", "Train FLOPs", gpu_col, "Device-hours (measured)", "s/step",
              "Nonzero params", "Stored params", "Val PPL", "Test PPL"] + accuracy_header(rows, cols)
    body = []
    for i, arm in enumerate(arms):
        c, m = arm["compute"], arm["series"][-1]["metrics"]
        stored = f"{m['params'] / 1e6:.1f}M" + (f" ({shrunk[i] / 1e6:.1f}M shrunk)" if i in shrunk else "")
        body.append([
            arm["label"], str(c["steps"]), f"{c['tokens']:,}", f"{c['flops']:.3e}", _gpu_hours(c["flops"], cfg),
            f"{c['device_s'] / 3600:.3f}", f"{c['s_per_step']:.2f}", f"{m['nonzero_params'] / 1e6:.1f}M", stored,
            fmt_ppl(m.get("val/ppl")), fmt_ppl(m.get("test/ppl")),
        ] + accuracy_cells(m, cols))
    base = arms[0]["compute"]
    cost_header = ["Arm", "Train FLOPs", "FLOPs vs LayerChop", "FLOPs per token", "Per token vs LayerChop",
                   "Device-hours", "Time vs LayerChop", "Scoring device-hours", "Scoring share of time",
                   "Scoring FLOPs", "Mask choices"]
    cost = []
    for arm in arms:
        c = arm["compute"]
        scoring = "scoring_device_s" in c
        per_token, base_per_token = c["flops"] / c["tokens"], base["flops"] / base["tokens"]
        cost.append([
            arm["label"], f"{c['flops']:.3e}", f"{c['flops'] / base['flops']:.2f}", f"{per_token:.3e}",
            f"{per_token / base_per_token:.2f}", f"{c['device_s'] / 3600:.3f}",
            f"{c['device_s'] / base['device_s']:.2f}",
            f"{c['scoring_device_s'] / 3600:.4f}" if scoring else "0",
            f"{c['scoring_device_s'] / c['device_s']:.1%}" if scoring else "0",
            f"{c['scoring_flops']:.2e}" if scoring else "0", str(c["scoring_mask_updates"]) if scoring else "–",
        ])
    in_domain, general = split_columns(cols)
    points_header = ["Arm", "Step", "Tokens", "FLOPs", "Device-hours", "Nonzero params", "Val PPL"]
    points_header += (["In-domain acc"] if in_domain else []) + (["General acc"] if general else [])
    points = []
    for arm in arms:
        for p in arm["series"]:
            points.append([arm["label"], str(p["step"]), f"{p['tokens']:,}", f"{p['flops']:.3e}",
                           f"{p['device_s'] / 3600:.3f}", f"{p['metrics']['nonzero_params'] / 1e6:.1f}M"
                           + (" (ramp)" if p.get("hollow") else ""), fmt_ppl(p["val_ppl"])]
                          + ([fmt_acc(p["in_domain"])] if in_domain else [])
                          + ([fmt_acc(p["general"])] if general else []))
    return header, body, cost_header, cost, points_header, points


def load_arms(curves: list[dict[str, Any]], start: dict[str, Any]) -> tuple[list[dict[str, Any]], list]:
    cols = task_columns([{"metrics": start}] + [{"metrics": p["metrics"]} for c in curves for p in c["points"]])
    arms = []
    for c in curves:
        arms.append({"label": arm_label(c), "objective": c["objective"], "compute": c["compute"],
                     "distill": c.get("distill"), "term_scales": c.get("distill_term_scales"),
                     "series": arm_series(c, start, cols)})
    return arms, cols


def figure2(arms: list[dict[str, Any]], out_stem: Path, reference: Optional[dict[str, Any]] = None,
            title: str = "LayerChop vs the same half-depth architecture pretrained from scratch (same data, tokens, "
                         "batch)") -> None:
    """Val perplexity (log) and each group's accuracy against training tokens, one line per arm (LayerChop starts at
    the chopped model, the scratch arm at its first snapshot), ± 1 standard error at each evaluation; ``reference``
    (a point of :func:`arm_series` with a ``label``, the dense model) as a dotted horizontal line in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [(k, t) for k, t in (("in_domain", "in-domain accuracy (%)"), ("general", "general accuracy (%)"))
           if any(p[k] is not None for arm in arms for p in arm["series"])]
    fig, axes = plt.subplots(1, 1 + len(acc), figsize=(4.6 * (1 + len(acc)), 3.8), squeeze=False)
    for i, arm in enumerate(arms):
        pts = arm["series"]
        x = [p["tokens"] / 1e3 for p in pts]
        axes[0, 0].plot(x, [p["val_ppl"] for p in pts], marker="o", color=f"C{i}", label=arm["label"])
        for col, (key, _) in enumerate(acc, start=1):
            y = [100 * p[key][0] if p[key] is not None else float("nan") for p in pts]
            err = [100 * p[key][1] if p[key] is not None and p[key][1] is not None else 0.0 for p in pts]
            axes[0, col].errorbar(x, y, yerr=err, marker="o", capsize=3, color=f"C{i}", label=arm["label"])
    if reference is not None:
        for ax, key in zip(axes[0], ["val_ppl"] + [k for k, _ in acc]):
            value = reference[key] if key == "val_ppl" else (100 * reference[key][0] if reference[key] else None)
            if value is not None:
                ax.axhline(value, color="0.4", linestyle=":", linewidth=1, label=reference["label"])
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_ylabel("validation perplexity (log scale)")
    for col, (_, title) in enumerate(acc, start=1):
        axes[0, col].set_ylabel(title)
    for ax in axes.flat:
        ax.set_xlabel("training tokens (thousands)")
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.suptitle(title + ("; dotted: dense" if reference is not None else ""), fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_stem)


def points_table(arms: list[dict[str, Any]], cols) -> tuple[list[str], list[list[str]]]:
    """One row per evaluation along each arm: compute so far, perplexity and each group's accuracy."""
    in_domain, general = split_columns(cols)
    header = ["Arm", "Step", "Tokens", "FLOPs", "Val PPL"] + (["In-domain acc"] if in_domain else []) + (
        ["General acc"] if general else [])
    body = []
    for arm in arms:
        for p in arm["series"]:
            body.append([arm["label"], str(p["step"]), f"{p['tokens']:,}", f"{p['flops']:.3e}", fmt_ppl(p["val_ppl"])]
                        + ([fmt_acc(p["in_domain"])] if in_domain else [])
                        + ([fmt_acc(p["general"])] if general else []))
    return header, body


def figure6(arms: list[dict[str, Any]], out_stem: Path) -> None:
    """Gradual chopping against all at once: val perplexity (log) and each group's accuracy (columns) against
    training tokens and against training FLOPs (rows), one line per schedule, ± 1 standard error; a dotted line
    marks where each gradual schedule removed its last layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [(k, t) for k, t in (("in_domain", "in-domain accuracy (%)"), ("general", "general accuracy (%)"))
           if any(p[k] is not None for arm in arms for p in arm["series"])]
    fig, axes = plt.subplots(2, 1 + len(acc), figsize=(4.4 * (1 + len(acc)), 7.2), squeeze=False)
    for i, arm in enumerate(arms):
        pts = arm["series"]
        for row, (xkey, scale, xlabel) in enumerate((("tokens", 1e3, "training tokens (thousands)"),
                                                      ("flops", 1e15, "training compute (PFLOPs)"))):
            x = [p[xkey] / scale for p in pts]
            axes[row, 0].plot(x, [p["val_ppl"] for p in pts], marker="o", color=f"C{i}", label=arm["label"])
            for col, (key, _) in enumerate(acc, start=1):
                y = [100 * p[key][0] if p[key] is not None else float("nan") for p in pts]
                err = [100 * p[key][1] if p[key] is not None and p[key][1] is not None else 0.0 for p in pts]
                axes[row, col].errorbar(x, y, yerr=err, marker="o", capsize=3, color=f"C{i}", label=arm["label"])
            last = arm.get("last_removal")
            if last is not None:
                for ax in axes[row]:
                    ax.axvline(last[xkey] / scale, color=f"C{i}", linestyle=":", linewidth=1)
            for ax in axes[row]:
                ax.set_xlabel(xlabel)
    for row in range(2):
        axes[row, 0].set_yscale("log")
        axes[row, 0].set_ylabel("validation perplexity (log scale)")
        for col, (_, title) in enumerate(acc, start=1):
            axes[row, col].set_ylabel(title)
    for ax in axes.flat:
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle("When to chop: one layer every N tokens (gradual) vs all at once, equal tokens "
                 "(dotted: a schedule's last removal)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_stem)
