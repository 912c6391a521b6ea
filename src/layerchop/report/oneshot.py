"""Figure 1 and the one-shot table: perplexity against zero-shot accuracy, in-domain and general."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerchop.report.tables import (accuracy_cells, accuracy_header, fmt_ppl, mean_accuracy, save_figure,
                                     split_columns, task_columns)


def oneshot_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: parameters and non-zero parameters next to perplexity and accuracy (± stderr)."""
    cols = task_columns(rows)
    header = ["Model", "Params (M)", "Non-zero (M)", "Layers", "Tokens trained", "Val PPL", "Test PPL"]
    header += accuracy_header(rows, cols)
    body = []
    for r in rows:
        m = r["metrics"]
        body.append([
            r["label"], f"{m['params'] / 1e6:.1f}", f"{m.get('nonzero_params', m['params']) / 1e6:.1f}",
            str(m["layers"]), f"{m['tokens_trained']:,}", fmt_ppl(m.get("val/ppl")), fmt_ppl(m.get("test/ppl")),
        ] + accuracy_cells(m, cols))
    return header, body


def _group_title(group: str, gcols: list[tuple[str, str]]) -> str:
    tasks = ", ".join(f"{t} {m}" for t, m in gcols)
    return f"{group} accuracy (%): " + (tasks if len(gcols) == 1 else f"mean of {tasks}")


def figure1(rows: list[dict[str, Any]], out_stem: Path) -> None:
    """Val perplexity (log x) against accuracy, one panel per group of tasks (in-domain: built from held-out
    text of the recovery corpus; general: benchmarks outside it), one labelled point per model with its
    standard error as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(g, c) for g, c in zip(("in-domain", "general"), split_columns(task_columns(rows))) if c]
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(6.0 * max(1, len(groups)), 4.6), squeeze=False)
    for ax, (group, gcols) in zip(axes[0], groups):
        for i, r in enumerate(rows):
            m, name = r["metrics"], r["name"]
            acc = mean_accuracy(m, gcols)
            if acc is None or m.get("val/ppl") is None:
                continue
            marker = ("*" if name == "dense" else "o" if "layerchop" in name else "s" if name.endswith("_cpt")
                      else "^")
            ax.errorbar(m["val/ppl"], 100 * acc[0], yerr=None if acc[1] is None else 100 * acc[1], fmt=marker,
                        color=f"C{i}", markersize=11 if marker == "*" else 7, capsize=3, zorder=3, label=r["label"])
        ax.set_xscale("log")
        ax.set_xlabel("validation perplexity (log scale)")
        ax.set_ylabel(_group_title(group, gcols), fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7, loc="best", framealpha=0.9)
    fig.suptitle("One-shot pruning vs LayerChop (bars: ± 1 binomial standard error)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_stem)
