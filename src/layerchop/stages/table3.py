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


def read_bench(path: str) -> dict:
    """The bench's metrics, checked to be one.

    Raises:
        FileNotFoundError / ValueError: one line naming ``--bench``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"--bench {path}: no such file (run `layerchop bench` first)")
    try:
        metrics = read_json(path)
    except ValueError as e:
        raise ValueError(f"--bench {path}: not JSON ({e})") from None
    missing = [k for k in ("environment", "bench", "baseline", "models", "cells", "query")
               if not isinstance(metrics, dict) or k not in metrics]
    if missing:
        raise ValueError(f"--bench {path}: not the metrics of `layerchop bench` (no {missing})")
    return metrics


def main(args: argparse.Namespace) -> None:
    from layerchop.report.efficiency import break_even_rows, grid_table, latency_table, speedup_figure

    cfg = section("bench", load_params(args.params))
    metrics = read_bench(args.bench)
    trainings = parse_trainings(args.training)
    env, q = metrics["environment"], metrics["query"]
    header, body = latency_table(metrics, cfg.labels)
    caption = (f"Table 3: one query of {q['batch']} prompt(s) of {q['prompt']} tokens, then {q['new_tokens']} decode "
               f"steps, on {env['device_name']} ({env['device']}, {env['dtype']}, {env['threads']} threads; torch "
               f"{env['torch']}, transformers {env['transformers']}; {env['date']}). Times: median [quartiles] of "
               f"{metrics['bench']['repeats']} queries after {metrics['bench']['warmup']} warm-up, the models "
               "interleaved in one run; speed-ups: median [quartiles] of the per-repeat ratios to the baseline. "
               "Throughput: prompt tokens per second of prefill, new tokens per second of decode (from the medians). "
               "Bounds: prefill, the ratio of FLOPs; decode, the ratio of bytes read per step (weights + KV cache), the limit "
               "of a memory-bound step; the layer ratio is the limit of a step bound by a fixed cost per layer "
               "(kernel launches, Python), which a small model's decode can exceed the bytes bound towards. "
               "Memory: weights held + " + ("the allocator's peak during the query." if env["device"].startswith("cuda")
                                             else "the KV cache (activations not counted)."))
    text = markdown(header, body, caption)
    bh, bb = break_even_rows(metrics, trainings, cfg.labels)
    text += "\n" + markdown(bh, bb, (
        "Break-even: the extra training's FLOPs over the saving in query FLOPs, and its device time over the "
        "measured saving per query (median of the paired per-repeat differences [quartiles]; a saving counts only "
        "when every pair agrees on its sign). The training was timed by its own run, the saving by this bench: "
        "the time break-even holds only where both ran on one machine kind, and shared machines of one kind have "
        "differed ~2x. Serving at break-even: those queries' time on the baseline."))
    gh, gb = grid_table(metrics, cfg.labels)
    text += "\n" + markdown(gh, gb, "Every cell of the grid: median speed-ups (decode: % of its bytes bound, that "
                                     "bound; the layer ratio).")
    with staged(args.tables, args.figures) as (tables, figures):
        (tables / "table3_latency.md").write_text(text)
        speedup_figure(metrics, cfg.labels, figures / "fig_speedup_vs_batch")
    print(text)
