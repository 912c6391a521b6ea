"""Stage ``table3``: Table 3 (latency and speed-ups against their bounds, break-even) and the speed-up figure.

Reads the bench's metrics (``layerchop bench``) and, for each compression that trained, its run's metrics (device
seconds and FLOPs of the extra training). Writes ``table3_latency.md`` (the query shape of ``bench.query_batch``,
``bench.query_prompt``, ``bench.new_tokens``; every cell of the grid below it) and
``fig_speedup_vs_batch.{png,pdf}``.

Example::

    layerchop table3 --bench data/bench/metrics.json --training layerchop=layerchop:data/runs/layerchop.json \\
        --tables paper/tables --figures paper/figures
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import load_params, section
from layerchop.io import read_json, staged
from layerchop.report.tables import markdown


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bench", required=True, help="metrics JSON of `layerchop bench`")
    p.add_argument("--training", action="append", default=[], metavar="ROW=MODEL:RUN_JSON",
                   help="a compression's extra training: its row name, the bench model with its latency, the "
                        "training run's metrics (device_s, flops); repeatable")
    p.add_argument("--tables", required=True, help="output directory for table3_latency.md")
    p.add_argument("--figures", required=True, help="output directory for fig_speedup_vs_batch.{png,pdf}")


def parse_trainings(specs: list[str]) -> dict[str, tuple[str, dict]]:
    """``ROW=MODEL:RUN_JSON`` specs, the run's metrics read.

    Raises:
        ValueError / FileNotFoundError: one line naming the bad ``--training``.
    """
    out = {}
    for spec in specs:
        row, sep, rest = spec.partition("=")
        model, sep2, path = rest.partition(":")
        if not (sep and sep2 and row and model and path):
            raise ValueError(f"--training {spec!r}: expected ROW=MODEL:RUN_JSON")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--training {spec!r}: no such file {path}")
        run = read_json(path)
        missing = [k for k in ("device_s", "flops") if k not in run]
        if missing:
            raise ValueError(f"--training {spec!r}: {path} has no {missing} (not a training run's metrics)")
        out[row] = (model, run)
    return out


def grid_table(metrics: dict, labels: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """Every cell: median speed-ups per phase (and the query's), as the fraction of the bound for decode."""
    from layerchop.report.efficiency import label, order

    names = [n for n in order(metrics) if n != metrics["baseline"]]
    header = ["Batch", "Prompt"] + [f"{label(n, labels)}: prefill / decode / query" for n in names]
    body = []
    for cell in metrics["cells"]:
        row = [str(cell["batch"]), str(cell["prompt"])]
        for n in names:
            m = cell["models"][n]
            row.append(f"{m['prefill_speedup']['median']:.2f} / {m['decode_speedup']['median']:.2f} "
                       f"({100 * m['fraction_of_bound']['decode']:.0f} % of {m['bound']['decode']:.2f}) / "
                       f"{m['query_speedup']['median']:.2f}")
        body.append(row)
    return header, body


def main(args: argparse.Namespace) -> None:
    from layerchop.report.efficiency import break_even_rows, latency_table, speedup_figure

    cfg = section("bench", load_params(args.params))
    metrics = read_json(args.bench)
    trainings = parse_trainings(args.training)
    env, q = metrics["environment"], metrics["query"]
    header, body = latency_table(metrics, cfg.labels)
    caption = (f"Table 3: one query of {q['batch']} prompt(s) of {q['prompt']} tokens, then {q['new_tokens']} decode "
               f"steps, on {env['device_name']} ({env['device']}, {env['dtype']}, {env['threads']} threads; torch "
               f"{env['torch']}, transformers {env['transformers']}; {env['date']}). Times: median [quartiles] of "
               f"{metrics['bench']['repeats']} queries after {metrics['bench']['warmup']} warm-up, the models "
               "interleaved in one run; speed-ups: median [quartiles] of the per-repeat ratios to the baseline. "
               "Bounds: prefill, the ratio of FLOPs; decode, the ratio of bytes read per step (weights + KV cache). "
               "Memory: weights held + " + ("the allocator's peak during the query." if env["device"].startswith("cuda")
                                             else "the KV cache (activations not counted)."))
    text = markdown(header, body, caption)
    bh, bb = break_even_rows(metrics, trainings, cfg.labels)
    text += "\n" + markdown(bh, bb, (
        "Break-even: the extra training's device time over the measured saving per query (training timed by "
        "its run, the saving by this bench, each on its own device), and its FLOPs over the saving in query FLOPs. "
        "Serving at break-even: those queries' time on the baseline."))
    gh, gb = grid_table(metrics, cfg.labels)
    text += "\n" + markdown(gh, gb, "Every cell of the grid: median speed-ups (decode: % of its bound, the bound).")
    with staged(args.tables, args.figures) as (tables, figures):
        (tables / "table3_latency.md").write_text(text)
        speedup_figure(metrics, cfg.labels, figures / "fig_speedup_vs_batch")
    print(text)
