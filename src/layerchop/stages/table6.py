"""Stage ``table6``: Table 6 and Figure 5 (which layers to remove), from metrics and model metadata only.

Example::

    layerchop table6 --eval data/eval/layouts --main-chopped data/eval/chopped --main-recovered data/eval/layerchop \\
        --dense data/eval/dense/metrics.json --tables paper/tables --figures paper/figures

The main arm's layout (``chop.layout``) is a row of the table without a stage of its own: its chop and recovery
are the main table's (``chop``, ``train@layerchop``, the same command), so ``--main-chopped`` /
``--main-recovered`` are their evaluations, and ``table6.layouts`` lists the other layouts only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import data_driven_layouts, load_params, section
from layerchop.io import read_json, staged, write_json
from layerchop.prune.chop import removed_indices
from layerchop.report.layouts import figure5, findings, findings_text, layouts_table, load_layout, load_layouts
from layerchop.report.tables import accuracy_caption, latex, markdown


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", required=True, help="directory of <layout>/{chopped,recovered}/ (metrics.json, results.json)")
    p.add_argument("--main-chopped", required=True,
                   help="evaluation directory of the main arm's chopped model (chop.layout's row; evaluate@chopped)")
    p.add_argument("--main-recovered", required=True,
                   help="evaluation directory of the main arm's recovered model (evaluate@layerchop)")
    p.add_argument("--dense", required=True, help="the dense model's metrics.json (reference row)")
    p.add_argument("--tables", required=True, help="output directory for layouts.md / layouts.tex / layouts.json")
    p.add_argument("--figures", required=True, help="output directory for fig5_layouts.{png,pdf}")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    layouts, chop = section("table6", params).layouts, section("chop", params)
    main_name = chop.layout if chop.indices is None else "indices"
    if main_name in layouts:
        raise ValueError(f"table6.layouts={layouts} lists {main_name!r}, chop.layout: its row is the main arm's "
                         "(--main-chopped / --main-recovered), not chopped and recovered a second time; remove it")
    main_row = load_layout(main_name, args.main_chopped, args.main_recovered, "--main-chopped/--main-recovered")
    if main_name in data_driven_layouts():  # chosen from data: the layers are whatever the scores chose, the criterion is known
        fresh = main_row["layout"] == main_name and len(main_row["removed"]) == chop.num_remove
    else:
        fresh = main_row["removed"] == removed_indices(main_row["num_layers"], layout=chop.layout,
                                                       num_remove=chop.num_remove, indices=chop.indices)
    if not fresh:
        wanted = (f"chop.indices={chop.indices}" if chop.indices is not None
                  else f"chop.layout={chop.layout!r} with chop.num_remove={chop.num_remove}")
        raise ValueError(f"--main-chopped: {args.main_chopped} evaluated a model with removed layers "
                         f"{main_row['removed']} (layout {main_row['layout']!r}), not {wanted}: stale; run the main "
                         "arm's stages again")
    rows = [main_row] + load_layouts(layouts, args.eval)
    if len({(len(r["removed"]), r["num_layers"]) for r in rows}) > 1:
        raise ValueError(f"{args.eval}: the layouts remove different numbers of layers "
                         f"({ {r['name']: len(r['removed']) for r in rows} }); Table 6 compares equal depths")
    tokens = sorted({int(r["recovered"]["tokens_trained"]) for r in rows})
    if len(tokens) > 1:
        raise ValueError(f"{args.eval}: the recovered layouts trained different token counts {tokens}; Table 6 "
                         "compares equal budgets")
    dense = read_json(args.dense)
    header, body = layouts_table(rows, dense)
    f = findings(rows, dense)
    caption = (
        f"Which layers to remove: each layout drops {len(rows[0]['removed'])} of {rows[0]['num_layers']} decoder layers "
        f"(never the first or last), then recovers with the same {tokens[0]:,} tokens of continued "
        "pretraining (warm-start steps, if any, included). Fixed layouts are the paper's; data-driven ones rank the dense model's layers on "
        f"{chop.num_calibration} calibration sequences of the train split (angular: the contiguous block whose input "
        "and output hidden states are closest in angle, Gromov et al.; block-influence: the layers of lowest "
        "1 - cos(input, output), ShortGPT; ppl: the layers whose single removal raises calibration perplexity least, "
        f"Shortened LLaMA). The {main_name} row is the main table's LayerChop arm (the same chop and recovery, run "
        "once). " + findings_text(f) + " "
    ) + accuracy_caption(section("download", params).corpus,
                         [{"name": f"{r['name']}/{s}", "label": f"{r['name']} ({s})", "metrics": r[s]}
                          for r in rows for s in ("chopped", "recovered")] + [{"name": "dense", "label": "Dense",
                                                                               "metrics": dense}],
                         section("evaluate", params))
    with staged(args.tables, args.figures) as (tables, figures):  # all outputs or none
        (tables / "layouts.md").write_text(markdown(header, body, caption))
        (tables / "layouts.tex").write_text(latex(header, body, caption, label="tab:layouts"))
        write_json(tables / "layouts.json", {"findings": f, "layouts": [
            {k: r[k] for k in ("name", "removed", "selection")} for r in rows]})
        figure5(rows, dense, figures / "fig5_layouts")
    print((Path(args.tables) / "layouts.md").read_text())
