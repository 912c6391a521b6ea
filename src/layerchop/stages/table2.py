"""Stage ``table2``: relative drop of average accuracy against the share of parameters pruned (Table 2).

This repository's rows (``table2.rows``, then one per run of ``prune.methods`` × ``prune.patterns``, each an
evaluation's ``metrics.json``) beside the paper's quoted rows
(Shortened LLaMA, SliceGPT, LLM Surgeon, LayerChop at 7B, with their sources). Every own row is computed the same
way: the mean primary accuracy over the dense model's tasks, its drop relative to the dense model's, and the share
of parameters pruned from the nonzero count (of the decoder layers, and of all parameters).

Example::

    layerchop table2 --eval data/eval --dense-config data/models/dense/config.json --tables paper/tables
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import load_params, section
from layerchop.io import read_json, staged
from layerchop.prune.registry import oneshot_rows
from layerchop.report.tables import markdown


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", required=True, help="root of the evaluations (<eval>/<row>/metrics.json)")
    p.add_argument("--dense-config", required=True, help="config.json of the dense model (its layer sizes)")
    p.add_argument("--tables", required=True, help="output directory for table2_relative_drop.md")


def main(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from layerchop.report.efficiency import layer_share, relative_drop_table

    params = load_params(args.params)
    cfg = section("table2", params)
    labels = oneshot_rows(section("prune", params), cfg.rows)
    if not Path(args.dense_config).is_file():
        raise FileNotFoundError(f"--dense-config {args.dense_config}: no such file")
    dense_config = AutoConfig.from_pretrained(args.dense_config)
    paths = {name: Path(args.eval) / name / "metrics.json" for name in [cfg.dense, *labels]}
    for name, path in paths.items():
        if not path.is_file():
            key = ("table2.dense" if name == cfg.dense else "table2.rows" if name in cfg.rows
                   else "prune.methods x prune.patterns")
            raise FileNotFoundError(f"{key}: {name!r} has no {path}")
    dense = read_json(paths[cfg.dense])
    rows = {name: read_json(paths[name]) for name in labels}
    header, body, cols = relative_drop_table(rows, labels, dense, dense_config)
    share = layer_share(dense, dense_config)
    caption = ("Table 2: relative drop of the average accuracy against the dense model, and the share of parameters "
               f"pruned (weights nonzero in the dense model and zero or removed here). Own rows: the mean of {', '.join(f'{t} ({m})' for t, m in cols)} on "
               f"the dense model of this params file ({dense['params'] / 1e6:.1f}M parameters, {share:.0f} % of them in "
               "its decoder layers, the rest embeddings and norms). "
               "Paper rows: each method's own reported numbers at 7B on the tasks it shares with Just CHOP, not "
               "re-run here, with each paper's own sense of % pruned (of all parameters, or a slicing ratio); their "
               "task sets differ from ours, so compare the pattern, not the digits.")
    text = markdown(header, body, caption)
    with staged(args.tables) as (tables,):
        (tables / "table2_relative_drop.md").write_text(text)
    print(text)
