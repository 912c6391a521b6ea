"""Figure 1 and the one-shot table: perplexity against zero-shot accuracy, in-domain and general."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerchop.report.tables import (accuracy_cells, accuracy_header, save_figure, seed_runs, seeds_acc, seeds_label,
                                     seeds_ppl, split_columns, task_columns)


def oneshot_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: parameters and non-zero parameters next to perplexity and accuracy (± stderr)."""
    cols = task_columns(rows)
    header = ["Model", "Params (M)", "Non-zero (M)", "Layers", "Tokens trained", "Val PPL", "Test PPL"]
    header += accuracy_header(rows, cols)
    body = []
    for r in rows:
        m = r["metrics"]
        body.append([
            seeds_label(r["label"], m), f"{m['params'] / 1e6:.1f}", f"{m.get('nonzero_params', m['params']) / 1e6:.1f}",
            str(m["layers"]), f"{m['tokens_trained']:,}", seeds_ppl(m, "val/ppl"), seeds_ppl(m, "test/ppl"),
        ] + accuracy_cells(m, cols))
    return header, body


# how a task and its metric read in a figure (a task not listed keeps its lm-eval name)
TASK_NAMES = {"heldout_continuation": "held-out continuation", "heldout_lastword": "held-out last word",
              "piqa": "PIQA", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "hellaswag": "HellaSwag",
              "winogrande": "WinoGrande", "boolq": "BoolQ", "lambada_openai": "LAMBADA"}
METRIC_NAMES = {"acc": "accuracy", "acc_norm": "length-normalised accuracy"}


def _group_title(group: str, gcols: list[tuple[str, str]]) -> str:
    """A panel's title: what its y axis averages, in words."""
    tasks = ", ".join(f"{TASK_NAMES.get(t, t)} ({METRIC_NAMES.get(m, m)})" for t, m in gcols)
    return f"{group[0].upper()}{group[1:]}: " + (tasks if len(gcols) == 1 else f"mean of {tasks}")


def plain_log_ticks(axis) -> None:
    """Log-scale ticks labelled as plain numbers (20, 30, 50, 100), not 2×10¹."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def figure1(rows: list[dict[str, Any]], out_stem: Path) -> None:
    """Val perplexity (log x) against accuracy, one panel per group of tasks (in-domain: built from held-out
    text of the recovery corpus; general: benchmarks outside it), one point per model with its standard error
    as a bar; one legend for both panels, below them."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    groups = [(g, c) for g, c in zip(("in-domain", "general"), split_columns(task_columns(rows))) if c]
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.6 * max(1, len(groups)), 4.8), squeeze=False)
    handles = {}
    for ax, (group, gcols) in zip(axes[0], groups):
        for i, r in enumerate(rows):
            m, name = r["metrics"], r["name"]
            acc = seeds_acc(m, gcols)  # an arm with seed replicas: the mean and the sd over its seeds
            ppls = [x.get("val/ppl") for x in seed_runs(m)]
            if acc is None or any(v is None for v in ppls):
                continue
            marker = ("*" if name == "dense" else "o" if "layerchop" in name else "s" if name.endswith("_cpt")
                      else "^")
            handles[r["label"]] = ax.errorbar(
                sum(ppls) / len(ppls), 100 * acc[0], yerr=None if acc[1] is None else 100 * acc[1], fmt=marker,
                color=f"C{i}", markersize=11 if marker == "*" else 7, capsize=3, zorder=3)
        ax.set_xscale("log")
        plain_log_ticks(ax.xaxis)
        ax.set_xlabel("validation perplexity (log scale; lower is better)")
        ax.set_ylabel(f"{group} accuracy (%)")
        ax.set_title("\n".join(textwrap.wrap(_group_title(group, gcols), 60, break_on_hyphens=False)), fontsize=9)
        ax.grid(alpha=0.3, which="both")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, max(1, len(handles))),
               fontsize=8, frameon=False)
    fig.suptitle("One-shot pruning vs LayerChop: better models sit up and to the left "
                 "(bars: ± 1 binomial standard error; an arm with seeds: its mean, ± 1 sd over them)", fontsize=10)
    rows_of_legend = -(-len(handles) // 4)
    fig.tight_layout(rect=(0, 0.05 * rows_of_legend + 0.02, 1, 1))
    save_figure(fig, out_stem)
