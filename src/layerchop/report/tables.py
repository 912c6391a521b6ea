"""The main table: dense vs chopped vs LayerChop vs the dense continued-pretraining control."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional

from layerchop.evaluate.harness import PRIMARY_METRIC


def load_rows(eval_dir: str | Path, rows: dict[str, str], key: str) -> list[dict[str, Any]]:
    """``[{"name", "label", "metrics"}]`` from ``<eval_dir>/<name>/metrics.json`` for each row of ``key``."""
    from layerchop.io import read_json

    out = []
    for name, label in rows.items():
        path = Path(eval_dir) / name / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{key}: {name!r} has no {path}")
        out.append({"name": name, "label": label, "metrics": read_json(path)})
    return out


def task_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(task, metric) pairs present in any row, primary metric per task, sorted by task."""
    tasks = sorted({k.split("/")[1] for r in rows for k in r["metrics"] if k.startswith("eval/")})
    cols = []
    for t in tasks:
        metric = PRIMARY_METRIC.get(t, "acc")
        if not any(f"eval/{t}/{metric}" in r["metrics"] for r in rows):
            metric = "acc"
        cols.append((t, metric))
    return cols


def average_accuracy(metrics: dict[str, Any], cols: list[tuple[str, str]]) -> Optional[float]:
    """Mean of the primary metric over ``cols``; None if any task is missing."""
    accs = [metrics.get(f"eval/{t}/{m}") for t, m in cols]
    return None if not accs or any(a is None for a in accs) else sum(accs) / len(accs)


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells. ``rows``: ``[{"label": str, "metrics": dict}]``."""
    cols = task_columns(rows)
    header = ["Model", "Params (M)", "Layers", "Tokens trained", "Val PPL", "Test PPL"]
    header += [f"{t} ({m})" for t, m in cols] + ["Avg acc"]
    body = []
    for r in rows:
        m = r["metrics"]
        accs = [m.get(f"eval/{t}/{metric}") for t, metric in cols]
        avg = average_accuracy(m, cols)
        cells = [
            r["label"],
            f"{m['params'] / 1e6:.1f}",
            str(m["layers"]),
            f"{m['tokens_trained']:,}",
            fmt_ppl(m.get("val/ppl")),
            fmt_ppl(m.get("test/ppl")),
        ]
        cells += ["–" if a is None else f"{100 * a:.1f}" for a in accs]
        cells.append("–" if avg is None else f"{100 * avg:.1f}")
        body.append(cells)
    return header, body


def fmt_ppl(x) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}"


def markdown(header: list[str], body: list[list[str]], caption: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + f"\n\n{caption}\n"


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("–", "--")):
        s = s.replace(a, b)
    return s


def latex(header: list[str], body: list[list[str]], caption: str, label: str = "tab:main") -> str:
    spec = "l" + "r" * (len(header) - 1)
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(_tex_escape(h) for h in header) + r" \\", r"\midrule"]
    out += [" & ".join(_tex_escape(c) for c in row) + r" \\" for row in body]
    out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex_escape(caption)}}}", rf"\label{{{label}}}",
            r"\end{table}"]
    return "\n".join(out) + "\n"


def save_figure(fig, out_stem: Path) -> None:
    """``<stem>.png`` (150 dpi) and a byte-stable ``<stem>.pdf`` (no creation date), then close ``fig``."""
    import matplotlib.pyplot as plt

    out_stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_stem.with_suffix(".png"), dpi=150)
    fig.savefig(out_stem.with_suffix(".pdf"), metadata={"CreationDate": None})
    plt.close(fig)


def read_log(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Series ``{metric: [(tokens, value)]}`` from a Lightning CSV log."""
    series: dict[str, list[tuple[float, float]]] = {}
    tokens = 0.0
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("train/tokens"):
                tokens = float(row["train/tokens"])
            for key in ("train/loss", "val/ppl"):
                if row.get(key):
                    series.setdefault(key, []).append((tokens, float(row[key])))
    return series


def training_curves(logs: dict[str, Path], out_png: Path) -> None:
    """Train loss against tokens for each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, path in logs.items():
        s = read_log(path).get("train/loss", [])
        if s:
            ax.plot([t for t, _ in s], [v for _, v in s], label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=150)
    plt.close(fig)
