"""Stage ``figure1``: Figure 1 (perplexity vs average accuracy) and ``oneshot.md``, from metrics files only.

Rows: ``report.oneshot_rows`` (the dense model, LayerChop, the trained one-shot arm), then one row per run of
``prune.methods`` × ``prune.patterns`` (``<eval>/oneshot/<method>-<pattern>/metrics.json``).

Example::

    layerchop figure1 --eval data/eval --tables paper/tables --figures paper/figures
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import load_params, section
from layerchop.io import staged
from layerchop.prune.registry import oneshot_rows, registry
from layerchop.prune.sparsity import Pattern
from layerchop.report.oneshot import figure1, oneshot_table
from layerchop.report.compare import comparison_sentences
from layerchop.report.tables import SEEDS_NOTE, accuracy_caption, latex, load_rows, markdown, seed_runs


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", required=True, help="directory of <row>/metrics.json (one-shot runs: oneshot/<run>/)")
    p.add_argument("--tables", required=True, help="output directory for oneshot.md / oneshot.tex")
    p.add_argument("--figures", required=True, help="output directory for fig1_oneshot_vs_layerchop.{png,pdf}")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    cfg, train = section("report", params), section("train", params)
    prune = section("prune", params)
    rows = load_rows(args.eval, oneshot_rows(prune, cfg.oneshot_rows), "report.oneshot_rows / prune.methods x prune.patterns",
                     seeds=section("arms", params).seeds)
    methods = registry()
    patterns = [Pattern.parse(p) for p in prune.patterns]
    trained = [r["label"] for r in rows if r["name"].endswith("_cpt")]
    caption = (
        f"One-shot pruning ({', '.join(methods[m].label for m in prune.methods) or 'none'} at "
        f"{', '.join(f'{p} ({p.ratio:.0%})' for p in patterns) or 'no pattern'} of every attention and MLP "
        "projection; N:M along the input dimension) against LayerChop (the chopped model, then "
        f"{train.token_budget:,} tokens of continued pretraining)"
        + (f"; {', '.join(trained)}: the one-shot model with the same continued pretraining, masks fixed" if trained
           else "")
        + ". Non-zero counts include embeddings and norms. "
    ) + accuracy_caption(section("download", params).corpus, rows, section("evaluate", params))
    if any(len(seed_runs(r["metrics"])) > 1 for r in rows):
        caption += " " + SEEDS_NOTE.strip()
    lc = [r["name"] for r in rows if r["name"] == "layerchop"]
    caption += ("" if not lc else " " + comparison_sentences(
        rows, [("layerchop", r["name"], f"LayerChop against {r['label']}") for r in rows
               if r["name"] not in ("layerchop", "dense")]))
    header, body = oneshot_table(rows)
    with staged(args.tables, args.figures) as (tables, figures):  # all outputs or none
        (tables / "oneshot.md").write_text(markdown(header, body, caption))
        (tables / "oneshot.tex").write_text(latex(header, body, caption, label="tab:oneshot"))
        figure1(rows, figures / "fig1_oneshot_vs_layerchop")
    print((Path(args.tables) / "oneshot.md").read_text())
