"""Figure 1 and the one-shot table: perplexity against average zero-shot accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerchop.report.tables import average_accuracy, fmt_ppl, save_figure, task_columns


def oneshot_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: parameters and non-zero parameters next to perplexity and accuracy."""
    cols = task_columns(rows)
    header = ["Model", "Params (M)", "Non-zero (M)", "Layers", "Tokens trained", "Val PPL", "Test PPL",
              "Avg acc"]
    body = []
    for r in rows:
        m = r["metrics"]
        avg = average_accuracy(m, cols)
        body.append([
            r["label"], f"{m['params'] / 1e6:.1f}", f"{m.get('nonzero_params', m['params']) / 1e6:.1f}",
            str(m["layers"]), f"{m['tokens_trained']:,}", fmt_ppl(m.get("val/ppl")), fmt_ppl(m.get("test/ppl")),
            "–" if avg is None else f"{100 * avg:.1f}",
        ])
    return header, body


def figure1(rows: list[dict[str, Any]], out_stem: Path) -> None:
    """Scatter of val perplexity (log x) against average accuracy, one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = task_columns(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        m, name = r["metrics"], r["name"]
        avg = average_accuracy(m, cols)
        if avg is None or m.get("val/ppl") is None:
            continue
        marker = "*" if name == "dense" else "o" if "layerchop" in name else "s" if name.endswith("_cpt") else "^"
        ax.scatter(m["val/ppl"], 100 * avg, marker=marker, s=110 if marker == "*" else 60, zorder=3, label=r["label"])
    ax.set_xscale("log")
    ax.set_xlabel("validation perplexity (log scale)")
    ax.set_ylabel("average zero-shot accuracy (%)")
    ax.set_title("One-shot pruning vs LayerChop", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.tight_layout()
    save_figure(fig, out_stem)
