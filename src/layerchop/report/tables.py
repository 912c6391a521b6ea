"""The main table: dense vs chopped vs LayerChop vs the dense continued-pretraining control."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Optional

from layerchop.evaluate.harness import PRIMARY_METRIC, is_in_domain


ITEMS = "_items"
"""The key under which an evaluation's per-item results (``items.csv``) travel with its metrics."""
SEEDS = "_seeds"
"""The key under which the metrics of an arm's seed replicas (``arms.seeds``) travel with the arm's own."""


def seed_runs(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """An evaluation, then its seed replicas' (:data:`SEEDS`)."""
    return [metrics, *metrics.get(SEEDS, [])]


def with_seeds(metrics: dict[str, Any], replicas: list[dict[str, Any]]) -> dict[str, Any]:
    """``metrics`` with its seed replicas' attached (nothing attached for none)."""
    return {**metrics, SEEDS: list(replicas)} if replicas else metrics


def with_items(metrics: dict[str, Any], where: str | Path, read: Optional[list[Path]] = None) -> dict[str, Any]:
    """``metrics`` with the per-item results of ``<where>/items.csv`` under :data:`ITEMS` (unchanged without that
    file); ``read``, where given, records the file read."""
    path = Path(where) / "items.csv"
    if not path.is_file():
        return metrics
    from layerchop.evaluate.harness import read_items

    if read is not None:
        read.append(path)
    return {**metrics, ITEMS: read_items(path)}


def spread(values: list[float]) -> tuple[float, Optional[float]]:
    """``(mean, sample standard deviation)`` of one value per seed (None for one seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def load_rows(eval_dir: str | Path, rows: dict[str, str], key: str,
              seeds: Optional[dict[str, list[str]]] = None) -> list[dict[str, Any]]:
    """``[{"name", "label", "metrics"}]`` from ``<eval_dir>/<name>/metrics.json`` for each row of ``key``, each with
    its per-item results (``items.csv``, where written) and its seed replicas' metrics (``seeds``: ``arms.seeds``)."""
    return [{"name": name, "label": label, "metrics": load_evaluation(eval_dir, name, key, seeds)}
            for name, label in rows.items()]


def load_evaluation(eval_dir: str | Path, name: str, key: str,
                    seeds: Optional[dict[str, list[str]]] = None) -> dict[str, Any]:
    """``<eval_dir>/<name>/metrics.json`` with its ``items.csv`` and its replicas' (see :func:`load_rows`)."""
    from layerchop.io import read_json

    path = Path(eval_dir) / name / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{key}: {name!r} has no {path}")
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: an evaluation's metrics are a JSON object, not a {type(metrics).__name__}")
    metrics = with_items(metrics, path.parent)
    replicas = (seeds or {}).get(name, [])
    return with_seeds(metrics, [load_evaluation(eval_dir, f"seeds/{r}", f"arms.seeds.{name}") for r in replicas])


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


def split_columns(cols: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(in-domain, general)``: the tasks built from held-out text of the training corpus, and the rest."""
    return [c for c in cols if is_in_domain(c[0])], [c for c in cols if not is_in_domain(c[0])]


def mean_accuracy(metrics: dict[str, Any], cols: list[tuple[str, str]]) -> Optional[tuple[float, Optional[float]]]:
    """``(mean, stderr)`` of the primary metric over ``cols`` (stderr of a mean of independent tasks:
    ``sqrt(sum se^2) / k``; None when a task has none); None if ``cols`` is empty or a task is missing."""
    mean = average_accuracy(metrics, cols)
    if mean is None:
        return None
    ses = [metrics.get(f"eval/{t}/{m}_stderr") for t, m in cols]
    se = None if any(x is None for x in ses) else math.sqrt(sum(x * x for x in ses)) / len(ses)
    return mean, se


def fmt_acc(value: Optional[tuple[float, Optional[float]]]) -> str:
    """``"43.8 ± 1.2"`` (percent) from ``(accuracy, stderr)``; ``"–"`` when missing."""
    if value is None:
        return "–"
    mean, se = value
    return f"{100 * mean:.1f}" if se is None else f"{100 * mean:.1f} ± {100 * se:.1f}"


def seeds_acc(metrics: dict[str, Any], cols: list[tuple[str, str]]) -> Optional[tuple[float, Optional[float]]]:
    """:func:`mean_accuracy` of one evaluation, or, for an arm with seed replicas, ``(mean, standard deviation)``
    over its seeds (:func:`fmt_acc` formats either)."""
    runs = seed_runs(metrics)
    if len(runs) == 1:
        return mean_accuracy(metrics, cols)
    values = [average_accuracy(r, cols) for r in runs]
    if any(v is None for v in values):
        return None
    return spread(values)


def seeds_ppl(metrics: dict[str, Any], key: str) -> str:
    """A perplexity cell: the value, or ``mean ± sd`` over an arm's seeds."""
    runs = seed_runs(metrics)
    if len(runs) == 1:
        return fmt_ppl(metrics.get(key))
    values = [r.get(key) for r in runs]
    if any(v is None or not math.isfinite(v) for v in values):
        return "–"
    mean, sd = spread(values)
    return f"{fmt_ppl(mean)} ± {fmt_ppl(sd)}"


def seeds_label(label: str, metrics: dict[str, Any]) -> str:
    """A row's label, marked with its number of seeds when it has replicas."""
    n = len(seed_runs(metrics))
    return label if n == 1 else f"{label} [{n} seeds]"


SEEDS_NOTE = ("A row marked [n seeds] is the arm trained with n seeds (`train --seed`, `arms.seeds`): each cell is the "
              "mean ± standard deviation over the seeds; other cells show ± the binomial standard error. ")


def _items(rows: list[dict[str, Any]], task: str) -> str:
    ns = sorted({int(r["metrics"][f"eval/{task}/n"]) for r in rows if f"eval/{task}/n" in r["metrics"]})
    return "" if not ns else f", n={ns[0]}" if len(ns) == 1 else f", n={ns[0]}–{ns[-1]}"


def accuracy_header(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> list[str]:
    """Headers of :func:`accuracy_cells`: each task (metric, items) marked in-domain or general, then the
    average of each group that has more than one task."""
    in_domain, general = split_columns(cols)
    header = []
    for group, gcols in (("in-domain", in_domain), ("general", general)):
        header += [f"{group}: {t} ({m}{_items(rows, t)})" for t, m in gcols]
        if len(gcols) > 1:
            header.append(f"{group} avg")
    return header


def accuracy_cells(metrics: dict[str, Any], cols: list[tuple[str, str]]) -> list[str]:
    """Accuracy ± binomial standard error (%) per task, then each group's average (see :func:`accuracy_header`);
    for an arm with seed replicas, the mean ± standard deviation over its seeds."""
    in_domain, general = split_columns(cols)
    cells = []
    for gcols in (in_domain, general):
        cells += [fmt_acc(seeds_acc(metrics, [c])) for c in gcols]
        if len(gcols) > 1:
            cells.append(fmt_acc(seeds_acc(metrics, gcols)))
    return cells


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells. ``rows``: ``[{"label": str, "metrics": dict}]``."""
    cols = task_columns(rows)
    header = ["Model", "Params (M)", "Layers", "Tokens trained", "Val PPL", "Test PPL"]
    header += accuracy_header(rows, cols)
    body = []
    for r in rows:
        m = r["metrics"]
        cells = [
            seeds_label(r["label"], m),
            f"{m['params'] / 1e6:.1f}",
            str(m["layers"]),
            f"{m['tokens_trained']:,}",
            seeds_ppl(m, "val/ppl"),
            seeds_ppl(m, "test/ppl"),
        ]
        body.append(cells + accuracy_cells(m, cols))
    return header, body


CORPUS_PHRASES = {
    "wikipedia-vital": "the lead sections of English Wikipedia's Vital Articles (general-domain encyclopedic prose, "
                       "CC BY-SA 4.0)",
    "shakespeare": "Shakespeare and Milton (one narrow domain, Early Modern verse and drama: the in-domain tasks "
                   "measure recovery on that domain only)",
}


def accuracy_caption(corpus, rows: list[dict[str, Any]], evaluate) -> str:
    """The caption sentences on what the accuracy columns measure: the recovery corpus (``download.corpus``
    section), in-domain vs general tasks, the standard error and any task not evaluated (the comparisons, with their
    tests: :func:`layerchop.report.compare.comparison_sentences`)."""
    if corpus.source in CORPUS_PHRASES:
        what = CORPUS_PHRASES[corpus.source]
    elif corpus.source == "hub":
        what = f"{corpus.hub_path} ({corpus.hub_name or 'default'}, {corpus.hub_split}) from the Hub"
    else:
        what = "local files (" + ", ".join(corpus.local_paths) + ")"
    text = (f"Recovery corpus: {what}; perplexity on its held-out documents. Accuracy (%) ± binomial standard error "
            "sqrt(p(1 - p) / n) over the n items of each task (an average's error: sqrt(sum se^2) / k, as if its tasks "
            "were independent), 0-shot, lm-evaluation-harness, metric in brackets. "
            "In-domain tasks are built from held-out documents of the recovery corpus (recovery on the training "
            "domain); general tasks are standard benchmarks from outside it (general ability, the paper's question). ")
    missing = missing_tasks(rows, evaluate.tasks)
    nowhere = [t for t, labels in missing.items() if labels is None]
    if nowhere:
        text += (f" Not evaluated: {', '.join(nowhere)} (no model has a result; an optional task is skipped when "
                 "its local data is absent, see evaluate.optional_tasks and skipped_tasks in each results.json).")
    for task, labels in missing.items():
        if labels is not None:
            text += f" {task} has no result for: {', '.join(labels)} (–)."
    return text.strip()


def missing_tasks(rows: list[dict[str, Any]], tasks: list[str]) -> dict[str, Optional[list[str]]]:
    """The configured ``tasks`` without a result in some rows: ``{task: None}`` when no row has it (e.g. an optional
    local mirror that was absent), ``{task: [labels of the rows without it]}`` when only some rows lack it."""
    out: dict[str, Optional[list[str]]] = {}
    for t in tasks:
        lacking = [r.get("label", r.get("name", "?")) for r in rows
                   if not any(k.startswith(f"eval/{t}/") for k in r["metrics"])]
        if lacking:
            out[t] = None if len(lacking) == len(rows) else lacking
    return out


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

    from layerchop.report.oneshot import plain_log_ticks

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, path in logs.items():
        s = read_log(path).get("train/loss", [])
        if s:
            ax.plot([t / 1000 for t, _ in s], [v for _, v in s], label=label)
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("training loss (nats per token, log scale)")
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Training loss of the main table's trained arms (same data order and budget)", fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=150)
    plt.close(fig)
