"""Table 3 (latency, speed-up against its physical bound, break-even) and Table 2 (relative accuracy drop against
the share of parameters pruned), from the bench's metrics and the evaluations: pure functions of those dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerchop.evaluate.efficiency import break_even_queries
from layerchop.report.tables import average_accuracy, task_columns

# The paper's Table 2 rows: each method's own reported relative drop, as Just CHOP quotes them (7B scale).
QUOTED_TABLE2 = [  # (method, % pruned, relative drop %, source)
    ("Shortened LLaMA", 35.0, -16.0, "Kim et al. 2024, arXiv 2402.02834; as quoted in Just CHOP, Table 2"),
    ("SliceGPT", 30.0, -24.2, "Ashkboos et al. 2024, arXiv 2401.15024; as quoted in Just CHOP, Table 2"),
    ("LLM Surgeon", 50.0, -32.1, "van der Ouderaa et al. 2024, arXiv 2312.17244; as quoted in Just CHOP, Table 2"),
    ("LayerChop (Just CHOP)", 50.0, "-12.1 / -12.8", "Just CHOP, Table 2 (LayerChop against each comparison's "
                                                      "tasks)"),
]


def cell_at(metrics: dict[str, Any], batch: int, prompt: int) -> dict[str, Any]:
    """The grid cell of one query shape.

    Raises:
        ValueError: when the bench did not time that shape.
    """
    for cell in metrics["cells"]:
        if cell["batch"] == batch and cell["prompt"] == prompt:
            return cell
    raise ValueError(f"the bench has no cell batch={batch}, prompt={prompt}")


def _ms(summary: dict[str, float]) -> str:
    return f"{summary['median'] * 1e3:.1f} [{summary['q1'] * 1e3:.1f}–{summary['q3'] * 1e3:.1f}]"


def _x(summary: dict[str, float]) -> str:
    return f"{summary['median']:.2f}× [{summary['q1']:.2f}–{summary['q3']:.2f}]"


def order(metrics: dict[str, Any]) -> list[str]:
    """The models in the order the bench was given them (the baseline first)."""
    return metrics.get("model_order") or list(metrics["models"])


def label(name: str, labels: dict[str, str]) -> str:
    return labels.get(name, name)


def latency_table(metrics: dict[str, Any], labels: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """Table 3 at the bench's query shape: latency per phase, speed-ups (median [quartiles] of the per-repeat ratios
    to the baseline) beside their bound and the fraction of it reached, memory."""
    q = metrics["query"]
    cell = cell_at(metrics, q["batch"], q["prompt"])
    header = ["Model", "Layers", "Nonzero params", "Kernel", "Prefill ms", "Decode ms/step", "Query ms",
              "Throughput tok/s (prefill, decode)", "Prefill speed-up (FLOP bound, % of it)",
              "Decode speed-up (bytes bound, % of it; layer ratio)", "Query speed-up", "Memory MB"]
    body = []
    for name in order(metrics):
        rec = metrics["models"][name]
        m = cell["models"][name]
        kernel = rec["kernel"] + (" (no sparse kernel here)" if rec["pattern"] and rec["kernel"] == "dense" else "")
        body.append([
            label(name, labels), str(rec["layers"]), f"{rec['nonzero_params'] / 1e6:.1f}M", kernel,
            _ms(m["prefill_s"]), _ms(m["decode_step_s"]), _ms(m["query_s"]),
            f"{m['throughput_tok_s']['prefill']:,.0f}, {m['throughput_tok_s']['decode']:,.1f}",
            f"{_x(m['prefill_speedup'])} ({m['bound']['prefill']:.2f}×, {100 * m['fraction_of_bound']['prefill']:.0f} %)",
            f"{_x(m['decode_speedup'])} ({m['bound']['decode']:.2f}×, {100 * m['fraction_of_bound']['decode']:.0f} %; "
            f"{m['bound']['layers']:.2f}×)",
            _x(m["query_speedup"]), f"{m['memory_bytes'] / 2**20:.0f}",
        ])
    return header, body


def grid_table(metrics: dict[str, Any], labels: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """Every cell of the grid: median speed-ups per phase and of the query, decode beside its bytes bound and the
    layer ratio, and the decode throughput."""
    names = [n for n in order(metrics) if n != metrics["baseline"]]
    header = ["Batch", "Prompt"] + [f"{label(n, labels)}: prefill / decode (% of bytes bound; layer ratio) / query"
                                    for n in names] + ["Dense decode tok/s"]
    body = []
    for cell in metrics["cells"]:
        row = [str(cell["batch"]), str(cell["prompt"])]
        for n in names:
            m = cell["models"][n]
            row.append(f"{m['prefill_speedup']['median']:.2f} / {m['decode_speedup']['median']:.2f} "
                       f"({100 * m['fraction_of_bound']['decode']:.0f} % of {m['bound']['decode']:.2f}; "
                       f"{m['bound']['layers']:.2f}) / {m['query_speedup']['median']:.2f}")
        row.append(f"{cell['models'][metrics['baseline']]['throughput_tok_s']['decode']:,.1f}")
        body.append(row)
    return header, body


def _fmt_count(x: float) -> str:
    x = float(f"{x:.3g}")  # 999.9999 -> 1000 -> "1k"
    if x == 0:
        return "0"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def paired_saving(cell: dict[str, Any], base: str, model: str, new_tokens: int) -> dict[str, float]:
    """The baseline's query time minus the model's, paired within each repeat (one rotation of the interleaved
    models), summarised (:func:`layerchop.evaluate.latency.summary`)."""
    from layerchop.evaluate.latency import summary

    def queries(name):
        m = cell["models"][name]
        return [p + new_tokens * d for p, d in zip(m["prefill_samples"], m["decode_samples"])]

    return summary([b - q for b, q in zip(queries(base), queries(model))])


def break_even_rows(metrics: dict[str, Any], trainings: dict[str, tuple[str, dict[str, Any]]],
                    labels: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """Break-even of each compression's extra training at the bench's query shape.

    ``trainings``: row name -> (the bench model whose latency it has, the training run's metrics: ``device_s``,
    ``flops``). Models of the bench not named as a row there are one-shot (nothing to repay). The saving per query is
    the median of the paired per-repeat differences to the baseline; a saving whose quartiles straddle zero is
    noise, and nothing is said to break even on it: a saving counts only when every paired difference has its sign,
    and never for a model that runs the baseline's kernels on as many bytes and FLOPs (its bounds are 1). The FLOP
    break-even divides the run's FLOPs by the saving in query FLOPs; the time one divides its device-seconds by the
    measured saving (the run's device and this bench's: compare them only on one machine kind).
    """
    from layerchop.evaluate.efficiency import query_flops

    q = metrics["query"]
    cell = cell_at(metrics, q["batch"], q["prompt"])
    base = metrics["baseline"]
    base_s = cell["models"][base]["query_s"]["median"]
    base_cfg = _config(metrics["models"][base])
    base_flops = query_flops(base_cfg, q["batch"], q["prompt"], q["new_tokens"])
    header = ["Model", "Extra training", "Saving per query (paired)", "Break-even (queries, by FLOPs)",
              "Break-even (queries, by time)", "Serving at break-even (baseline device-h)"]
    rows = [(n, n, None) for n in order(metrics) if n != base and n not in trainings]  # one-shot
    rows += [(row, model, run) for row, (model, run) in trainings.items()]
    body = []
    for row, model, run in rows:
        if model not in metrics["models"]:
            raise ValueError(f"--training {row}: the bench timed no model {model!r}")
        rec = metrics["models"][model]
        nm = (2, 4) if rec["kernel"] != "dense" else None
        flops = query_flops(_config(rec), q["batch"], q["prompt"], q["new_tokens"], nm)
        saving = paired_saving(cell, base, model, q["new_tokens"])
        bound = cell["models"][model].get("bound", {})
        same_work = bound.get("decode") == 1.0 and bound.get("query_flops") == 1.0
        clear = (saving["min"] > 0 or saving["max"] < 0) and not same_work
        why = ", the baseline's kernels and bytes: noise" if same_work else ", within the noise"
        saving_s = (f"{saving['median'] * 1e3:.1f} ms [{saving['q1'] * 1e3:.1f}–{saving['q3'] * 1e3:.1f}] "
                    f"({100 * saving['median'] / base_s:.0f} %)" + ("" if clear else why))
        if run is None:
            cost = "none (one-shot)"
            by_time = serving = "nothing to repay" if clear and saving["median"] > 0 else "–"
        else:
            cost = f"{run['device_s'] / 3600:.3g} device-h, {run['flops']:.3g} FLOPs"
            by_time, serving = "never (no clear saving)", "–"
            if clear and saving["median"] > 0:
                n_time = break_even_queries(run["device_s"], base_s - saving["median"], base_s)
                by_time, serving = _fmt_count(n_time), f"{n_time * base_s / 3600:.3g}"
        if run is None:
            by_flops = "nothing to repay" if flops < base_flops else "no FLOP saving"
        else:
            try:
                by_flops = _fmt_count(break_even_queries(run["flops"], flops, base_flops))
            except ValueError:
                by_flops = "never (no FLOP saving)"
        body.append([label(row, labels), cost, saving_s, by_flops, by_time, serving])
    return header, body


def _config(record: dict[str, Any]):
    """The benchmarked model's config, of its own family (``model_type`` in the record; Llama for older records)."""
    from transformers import AutoConfig

    config = dict(record["config"])
    return AutoConfig.for_model(config.pop("model_type", "llama"), **config)


def speedup_figure(metrics: dict[str, Any], labels: dict[str, str], out_stem: Path) -> None:
    """Speed-up over the baseline against batch size, one panel per phase, at the query's prompt length: the
    median and quartiles of the per-repeat ratios, the bound dotted in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerchop.report.tables import save_figure

    prompt = metrics["query"]["prompt"]
    cells = sorted((c for c in metrics["cells"] if c["prompt"] == prompt), key=lambda c: c["batch"])
    batches = [c["batch"] for c in cells]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, phase in zip(axes, ("prefill", "decode")):
        for i, name in enumerate(n for n in order(metrics) if n != metrics["baseline"]):
            colour = f"C{i}"
            med = [c["models"][name][f"{phase}_speedup"]["median"] for c in cells]
            lo = [m - c["models"][name][f"{phase}_speedup"]["q1"] for m, c in zip(med, cells)]
            hi = [c["models"][name][f"{phase}_speedup"]["q3"] - m for m, c in zip(med, cells)]
            ax.errorbar(batches, med, yerr=[lo, hi], marker="o", color=colour, capsize=3,
                        label=label(name, labels) + ("" if metrics["models"][name]["kernel"] == "dense"
                                                     else f" ({metrics['models'][name]['kernel']})"))
            ax.plot(batches, [c["models"][name]["bound"][phase] for c in cells], ":", color=colour)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_title(f"{phase} (prompt {prompt} tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up over the dense model (dotted: bound)")
    env = metrics["environment"]
    axes[1].legend(fontsize=7)
    fig.suptitle("Speed-up of each compressed model over the dense model against batch size\n(median and quartiles "
                 "of interleaved repeats; dotted: the FLOP or byte bound)\n"
                 f"{env['device_name']}, {env['dtype']}, {env['threads']} threads", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_stem)
    plt.close(fig)


def pruned_fractions(metrics: dict[str, Any], dense: dict[str, Any], dense_config) -> tuple[float, float]:
    """``(% of decoder-layer weights pruned, % of all weights pruned)``: the weights that were nonzero in the dense
    model and are gone or zero in this one, over the dense model's nonzero weights in its decoder layers, and in all
    (embeddings, head and final norm are never pruned; the dense model's own exact zeros are not counted as
    prunable, so training that fills them in can move a share by a few tenths of a point)."""
    from layerchop.estimate import layer_params

    outside = dense["params"] - dense_config.num_hidden_layers * layer_params(dense_config)
    base = dense.get("nonzero_params", dense["params"])
    removed = base - metrics.get("nonzero_params", metrics["params"])
    return 100 * removed / (base - outside), 100 * removed / base


def layer_share(dense: dict[str, Any], dense_config) -> float:
    """% of the dense model's parameters that sit in its decoder layers."""
    from layerchop.estimate import layer_params

    return 100 * dense_config.num_hidden_layers * layer_params(dense_config) / dense["params"]


def relative_drop_table(rows: dict[str, dict[str, Any]], labels: dict[str, str], dense: dict[str, Any],
                        dense_config) -> tuple[list[str], list[list[str]], list[tuple[str, str]]]:
    """Table 2: each row's average accuracy (primary metric, the dense model's tasks) and its drop relative to the
    dense model's, beside its share of parameters pruned; then the paper's quoted rows.

    Raises:
        ValueError: when a row lacks a task the dense model was evaluated on.
    """
    cols = task_columns([{"metrics": dense}])
    base = average_accuracy(dense, cols)
    header = ["Method", "Scale", "% pruned (as reported)", "% pruned (decoder layers)", "% pruned (all weights)",
              "Avg. accuracy", "Relative drop", "Source"]
    body = []
    for name, metrics in rows.items():
        acc = average_accuracy(metrics, cols)
        if acc is None:
            raise ValueError(f"table2.rows: {name!r} lacks one of the dense model's tasks {[t for t, _ in cols]}")
        layer_pct, all_pct = pruned_fractions(metrics, dense, dense_config)
        body.append([labels[name], "embedded (this repository)", "–", f"{layer_pct:.1f}", f"{all_pct:.1f}",
                     f"{100 * acc:.1f}", f"{100 * (acc - base) / base:+.1f} %", f"data/eval/{name}"])
    for method, pct, drop, source in QUOTED_TABLE2:
        drop_s = f"{drop:+.1f} %" if isinstance(drop, float) else f"{drop} %"
        body.append([method, "7B (paper)", f"{pct:.0f}", "–", "–", "–", drop_s, source])
    return header, body, cols

