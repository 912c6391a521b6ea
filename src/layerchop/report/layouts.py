"""Table 6 and Figure 5: which layers to remove. The paper's five fixed layouts and the data-driven ones
(:mod:`layerchop.prune.select`), each evaluated right after the chop and after the same recovery training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from layerchop.config import data_driven_layouts
from layerchop.report.tables import (fmt_acc, fmt_ppl, mean_accuracy, save_figure, split_columns, task_columns)

STATES = ("chopped", "recovered")


def load_layout(name: str, chopped: str | Path, recovered: str | Path, key: str) -> dict[str, Any]:
    """``{"name", "removed", "selection", "num_layers", "chopped": metrics, "recovered": metrics}`` for one layout,
    from the evaluation directories of its chopped and its recovered model (``metrics.json``, and the chopped
    model's provenance in ``results.json``). ``key`` names where the directories came from in errors."""
    from layerchop.io import read_json

    row: dict[str, Any] = {"name": name}
    for state, where in zip(STATES, (chopped, recovered)):
        path = Path(where) / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{key}: {name!r} has no {path}")
        row[state] = read_json(path)
    prov = read_json(Path(chopped) / "results.json").get("model", {})
    if "removed_layers" not in prov:
        raise ValueError(f"{key}: {chopped} is not the evaluation of a chopped model "
                         "(its results.json names no removed_layers)")
    after = read_json(Path(recovered) / "results.json").get("model", {}).get("removed_layers")
    if after != prov["removed_layers"]:  # the recovery must be of this chop (a stale one names other layers)
        raise ValueError(f"{key}: {recovered} evaluated a model without layers {after}, but {chopped} one without "
                         f"{prov['removed_layers']}: not the recovery of that chop (stale); re-run its stages")
    row.update(removed=prov["removed_layers"], selection=prov.get("selection"), layout=prov.get("layout"),
               num_layers=prov["num_layers_before"])
    return row


def load_layouts(layouts: list[str], eval_root: str | Path) -> list[dict[str, Any]]:
    """:func:`load_layout` for each of ``layouts``, from ``<eval_root>/<layout>/{chopped,recovered}/``."""
    return [load_layout(name, Path(eval_root) / name / "chopped", Path(eval_root) / name / "recovered",
                        "table6.layouts") for name in layouts]


def _groups(rows: list[dict[str, Any]], dense: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    metrics = [{"metrics": r[s]} for r in rows for s in STATES] + [{"metrics": dense}]
    return [(g, c) for g, c in zip(("in-domain", "general"), split_columns(task_columns(metrics))) if c]


def kind(name: str) -> str:
    return "data-driven" if name in data_driven_layouts() else "fixed"


def layouts_table(rows: list[dict[str, Any]], dense: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per layout: the removed layers, then val perplexity and each group's mean accuracy (± se), before and after
    recovery; the dense model first as the reference."""
    groups = _groups(rows, dense)
    header = ["Layout", "Kind", "Removed layers", "Val PPL chopped", "Val PPL recovered"]
    for g, gcols in groups:
        tasks = "+".join(t for t, _ in gcols)
        header += [f"{g} acc chopped ({tasks})", f"{g} acc recovered"]
    body = [["Dense (reference)", "–", "none", fmt_ppl(dense.get("val/ppl")), "–"]
            + sum(([fmt_acc(mean_accuracy(dense, gcols)), "–"] for _, gcols in groups), [])]
    for r in rows:
        cells = [r["name"], kind(r["name"]), _ranges(r["removed"]), fmt_ppl(r["chopped"].get("val/ppl")),
                 fmt_ppl(r["recovered"].get("val/ppl"))]
        for _, gcols in groups:
            cells += [fmt_acc(mean_accuracy(r[s], gcols)) for s in STATES]
        body.append(cells)
    return header, body


def _ranges(idx: list[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` -> ``"1-3, 7, 9-10"``."""
    out, start = [], None
    for i, x in enumerate(idx):
        if start is None:
            start = x
        if i + 1 == len(idx) or idx[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def spearman(a: list[float], b: list[float]) -> tuple[Optional[float], Optional[float]]:
    """Spearman's rank correlation and its two-sided p-value (scipy); None when undefined (fewer than 3 values,
    or a constant series)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None, None
    res = spearmanr(a, b)
    return float(res.statistic), float(res.pvalue)


def findings(rows: list[dict[str, Any]], dense: dict[str, Any]) -> dict[str, Any]:
    """What Table 6 answers, computed: does the ranking before recovery predict the one after (Spearman, per
    measure), and does the best data-driven layout beat the best fixed one after recovery (per measure, with the
    standard error of the difference for accuracies: unpaired, so it overstates the error of two models scored on
    the same items)."""
    measures: dict[str, Any] = {"val ppl": lambda m: (m.get("val/ppl"), None)}
    for g, gcols in _groups(rows, dense):
        measures[f"{g} acc"] = (lambda gc: lambda m: mean_accuracy(m, gc) or (None, None))(gcols)
    out: dict[str, Any] = {"rank_correlation": {}, "best": {}}
    for label, get in measures.items():
        pairs = [(r["name"], get(r["chopped"]), get(r["recovered"])) for r in rows]
        pairs = [p for p in pairs if p[1][0] is not None and p[2][0] is not None and math.isfinite(p[1][0])]
        rho, p = spearman([x[0] for _, x, _ in pairs], [y[0] for _, _, y in pairs])
        out["rank_correlation"][label] = {"rho": rho, "p": p, "layouts": len(pairs)}
        better = min if label == "val ppl" else max
        best: dict[str, Any] = {}
        for k in ("fixed", "data-driven"):
            cands = [(n, y) for n, _, y in pairs if kind(n) == k]
            if cands:
                n, (value, se) = better(cands, key=lambda t: t[1][0])
                best[k] = {"layout": n, "value": value, "se": se}
        if "fixed" in best and "data-driven" in best:
            a, b = best["data-driven"], best["fixed"]
            se = math.sqrt(a["se"] ** 2 + b["se"] ** 2) if a["se"] is not None and b["se"] is not None else None
            best["difference"] = {"value": a["value"] - b["value"], "se": se}
        out["best"][label] = best
    return out


def findings_text(f: dict[str, Any]) -> str:
    parts = []
    for label, c in f["rank_correlation"].items():
        if c["rho"] is None:
            parts.append(f"{label}: rank correlation undefined ({c['layouts']} layouts)")
        else:
            parts.append(f"{label}: Spearman rho {c['rho']:+.2f} (p = {c['p']:.2g}, {c['layouts']} layouts)")
    text = "Does the ranking right after the chop predict the ranking after recovery? " + "; ".join(parts) + ". "
    best = []
    for label, b in f["best"].items():
        if "difference" not in b:
            continue
        d, fx, dd = b["difference"], b["fixed"], b["data-driven"]
        if label == "val ppl":
            best.append(f"{label}: data-driven {dd['layout']} {dd['value']:.2f} vs fixed {fx['layout']} {fx['value']:.2f}")
        else:
            noise = "" if d["se"] is None else (
                f", difference {100 * d['value']:+.1f} ± {100 * d['se']:.1f}"
                + (" (within two standard errors)" if abs(d["value"]) < 2 * d["se"] else ""))
            best.append(f"{label}: data-driven {dd['layout']} {100 * dd['value']:.1f} vs fixed {fx['layout']} "
                        f"{100 * fx['value']:.1f}{noise}")
    if best:
        text += ("Best after recovery, data-driven against fixed (best of each kind, so a best-of-several comparison; "
                 "errors unpaired): " + "; ".join(best) + ".")
    return text


def figure5(rows: list[dict[str, Any]], dense: dict[str, Any], out_stem: Path) -> None:
    """(a) which layers each layout removes; (b) the data-driven scores per layer; (c) val perplexity chopped and
    recovered per layout; (d) each group's accuracy chopped and recovered, with standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = _groups(rows, dense)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    names = [r["name"] for r in rows]
    num_layers = max(r["num_layers"] for r in rows)
    ax = axes[0][0]
    grid = np.zeros((len(rows), num_layers))
    for i, r in enumerate(rows):
        grid[i, r["removed"]] = 1
    ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1.4)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.set_xlabel("decoder layer (black: removed)")
    ax.set_title("(a) removed layers per layout", fontsize=10)

    ax = axes[0][1]
    from layerchop.prune.select import criterion

    for i, r in enumerate(rows):
        sel = r["selection"]
        if not sel:
            continue
        crit = criterion(sel["criterion"])
        label, values = crit.plotted(sel)
        v = np.array([np.nan if x is None else x for x in values], dtype=float)
        # scaled over the positions a selection may take (layer 0 and the last never go: removing layer 0 raises
        # perplexity by orders of magnitude and would flatten the rest), each criterion on [0, 1]
        last = r["num_layers"] - (len(r["removed"]) if crit.block else 1)
        v[0] = np.nan
        v[last:] = np.nan
        v = (v - np.nanmin(v)) / max(np.nanmax(v) - np.nanmin(v), 1e-12)
        ax.plot(range(len(v)), v, marker="o", markersize=3, label=f"{r['name']}: {label}", color=f"C{i}")
        marked = [r["removed"][0]] if crit.block else r["removed"]
        ax.scatter(marked, v[marked], color=f"C{i}", s=40, marker="x", zorder=3)
    ax.set_xlabel("layer (a block's criterion, e.g. angular: the block's first layer)")
    ax.set_ylabel("score, min-max scaled per criterion")
    ax.set_title("(b) data-driven scores on calibration data (x: removed)", fontsize=10)
    if any(r["selection"] for r in rows):
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    x = np.arange(len(rows))
    ax = axes[1][0]
    ax.bar(x - 0.2, [r["chopped"].get("val/ppl", np.nan) for r in rows], 0.4, label="chopped", color="0.7")
    ax.bar(x + 0.2, [r["recovered"].get("val/ppl", np.nan) for r in rows], 0.4, label="recovered", color="C0")
    if dense.get("val/ppl"):
        ax.axhline(dense["val/ppl"], color="k", ls="--", lw=1, label="dense")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("validation perplexity (log)")
    ax.set_title("(c) perplexity", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y", which="both")

    ax = axes[1][1]
    width = 0.8 / max(1, 2 * len(groups))
    k = 0
    for gi, (g, gcols) in enumerate(groups):
        for state, hatch in zip(STATES, ("//", None)):
            vals = [mean_accuracy(r[state], gcols) for r in rows]
            ax.bar(x - 0.4 + width * (k + 0.5), [100 * v[0] if v else np.nan for v in vals], width,
                   yerr=[100 * v[1] if v and v[1] is not None else 0 for v in vals], capsize=2, hatch=hatch,
                   color=f"C{2 * gi}", alpha=0.45 if hatch else 0.9,
                   label=f"{g}, {state}")
            k += 1
        d = mean_accuracy(dense, gcols)
        if d:
            ax.axhline(100 * d[0], color=f"C{2 * gi}", ls="--", lw=1, label=f"{g}: dense")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("(d) accuracy (bars: ± 1 binomial standard error)\n"
                 + "; ".join(f"{g}: {'+'.join(t for t, _ in gcols)}" for g, gcols in groups), fontsize=9)
    ax.legend(fontsize=7, ncol=len(groups), loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: not on the bars
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Which layers to remove: fixed layouts and data-driven selections, before and after recovery",
                 fontsize=11)
    fig.tight_layout()
    save_figure(fig, out_stem)
