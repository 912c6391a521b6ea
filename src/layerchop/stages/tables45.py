"""Stage ``tables45``: Table 4 (model configurations and training settings) and Table 5 (the evaluation suite
and protocol), generated from the model directories and an evaluation's ``results.json``.

Example::

    layerchop tables45 --models data/models/dense data/models/chopped data/models/layerchop \\
        --results data/eval/dense/results.json --tables paper/tables
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import load_params, section
from layerchop.io import check_model_dir, read_json, staged
from layerchop.report.configs import model_row, models_table, task_rows, tasks_table
from layerchop.report.tables import latex, markdown


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", required=True, help="model directories, one row each, in order")
    p.add_argument("--results", required=True, help="an evaluation's results.json (lm-eval's record of the tasks)")
    p.add_argument("--tables", required=True, help="output directory for models.md/.tex and tasks.md/.tex")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    report, evaluate = section("report", params), section("evaluate", params)
    labels = {**report.oneshot_rows, **report.rows, **report.extra_labels}
    for d in args.models:
        check_model_dir(d, "--models")
    rows = [model_row(d, labels.get(Path(d).name, Path(d).name)) for d in args.models]
    results = read_json(args.results)
    if not results.get("configs"):
        raise ValueError(f"--results {args.results}: holds no lm-eval task record (configs)")
    trows = task_rows(results, evaluate.local_tasks)
    h4, b4 = models_table(rows)
    c4 = ("Model configurations and training settings, read from each model directory (config.json, layerchop.json). "
          "Params count tied embeddings once. Batch: tokens per optimizer step over all devices; Tokens and FLOPs: the "
          "whole training run (warm start included); FLOPs count matmuls of forward and backward (and a frozen "
          "teacher's forward when distilling).")
    h5, b5 = tasks_table(trows)
    c5 = (f"Evaluation suite and protocol, read from lm-eval's record of the evaluation of {args.results}: zero-shot "
          "likelihood ranking of the choices; each task's metric is the one averaged in the tables (the paper's "
          f"Table 5 choice for standard tasks). Perplexity: the first {evaluate.ppl_max_sequences or 'all'} packed "
          "sequences of the val and test splits. Precision: "
          + (f"{evaluate.dtype} weights, decoder matmuls under {evaluate.autocast} autocast, output head in float32"
             if evaluate.autocast else f"{evaluate.dtype} throughout")
          + f"; batch {evaluate.batch_size}; at most {evaluate.limit or 'all'} items a task; seed {evaluate.seed}.")
    with staged(args.tables) as (tables,):  # all outputs or none
        (tables / "models.md").write_text(markdown(h4, b4, c4))
        (tables / "models.tex").write_text(latex(h4, b4, c4, label="tab:models"))
        (tables / "tasks.md").write_text(markdown(h5, b5, c5))
        (tables / "tasks.tex").write_text(latex(h5, b5, c5, label="tab:tasks"))
    print((Path(args.tables) / "models.md").read_text())
    print((Path(args.tables) / "tasks.md").read_text())
