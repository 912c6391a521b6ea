"""Stage ``report``: the main table (Markdown + LaTeX) and training curves, from metrics files only.

Example::

    layerchop report --eval data/eval --runs data/runs --tables paper/tables --figures paper/figures
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import load_params, section
from layerchop.io import staged, write_json
from layerchop.prune.chop import removed_indices
from layerchop.report.summary import HEADLINE, headline, recovered_share
from layerchop.report.compare import comparison_sentences, control_sentence
from layerchop.report.tables import (SEEDS_NOTE, accuracy_caption, latex, load_rows, markdown, seed_runs, table_rows,
                                     training_curves)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", required=True, help="directory of <row>/metrics.json")
    p.add_argument("--runs", default=None, help="directory of <run>.csv training logs")
    p.add_argument("--tables", required=True, help="output directory for main.md / main.tex")
    p.add_argument("--figures", default=None, help="output directory for training_curves.png")
    p.add_argument("--summary", default=None,
                   help="write the pipeline's headline here (JSON: LayerChop's summary and the share of the lost "
                        "accuracy it recovered; needs report.rows dense, chopped and layerchop)")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    cfg = section("report", params)
    chop, train = section("chop", params), section("train", params)
    rows = load_rows(args.eval, cfg.rows, "report.rows", seeds=section("arms", params).seeds)
    dense_layers = max(r["metrics"]["layers"] for r in rows)
    removed = removed_indices(dense_layers, layout=chop.layout, num_remove=chop.num_remove, indices=chop.indices)
    how = f"layout `{chop.layout}`" if chop.indices is None else "explicit indices"
    caption = (
        f"LayerChop removes {len(removed)} of {dense_layers} decoder layers ({how}: {removed}). "
        f"Continued pretraining budget: {train.token_budget:,} tokens (AdamW, peak lr {train.lr}, "
        f"cosine to {train.min_lr_ratio}x). "
    ) + accuracy_caption(section("download", params).corpus, rows, section("evaluate", params))
    if any(len(seed_runs(r["metrics"])) > 1 for r in rows):
        caption += " " + SEEDS_NOTE.strip()
    more = " ".join(x for x in (control_sentence(rows), comparison_sentences(rows, [
        ("layerchop", "chopped", "LayerChop against the chopped model it starts from"),
        ("layerchop", "dense_cpt", "LayerChop against the control")])) if x)
    if more:
        caption += " " + more
    by_name = {r["name"]: r["metrics"] for r in rows}
    share = recovered_share(*(by_name[n] for n in HEADLINE)) if set(HEADLINE) <= set(by_name) else None
    got = [] if share is None else [(g, share[k]) for g, k in (("in-domain", "in_domain"), ("general", "general"))
                                    if share[k] is not None]
    if got:
        caption += (" Continued pretraining brings back " + " and ".join(f"{v:.0f} % of the {g} accuracy points"
                                                                           for g, v in got) + " that chopping lost.")
    if args.summary and share is None:
        raise ValueError(f"report.rows: --summary needs the rows {list(HEADLINE)}, not {list(by_name)}")
    header, body = table_rows(rows)
    logs = {}
    if args.runs and args.figures:
        logs = {label: Path(args.runs) / f"{name}.csv" for name, label in cfg.rows.items()
                if (Path(args.runs) / f"{name}.csv").exists()}
    # the tables and the figure appear together or not at all
    with staged(args.tables, *([args.figures] if logs else [])) as (tables, *figures):
        (tables / "main.md").write_text(markdown(header, body, caption))
        (tables / "main.tex").write_text(latex(header, body, caption))
        if logs:
            training_curves(logs, figures[0] / "training_curves.png")
    if args.summary:  # after the tables: a failed report leaves no new headline behind
        write_json(args.summary, headline(*(by_name[n] for n in HEADLINE)))
    print((Path(args.tables) / "main.md").read_text())
