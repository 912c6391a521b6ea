"""Stage ``paper``: ``paper/README.md``, every artifact's table, figure and caption beside the paper's result.

Example::

    layerchop paper --tables-dir paper/tables --figures-dir paper/figures --eval data/eval \\
        --bench data/bench/metrics.json --out paper/README.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import load_params


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tables-dir", required=True, help="the generated tables (Markdown, with their captions)")
    p.add_argument("--figures-dir", required=True, help="the generated figures (PNG)")
    p.add_argument("--eval", required=True, help="the evaluations (<name>/metrics.json, <run>/curve.json)")
    p.add_argument("--bench", required=True, help="the latency bench's metrics.json (Table 3)")
    p.add_argument("--out", required=True, help="the page to write (paper/README.md)")


def main(args: argparse.Namespace) -> None:
    from layerchop.io import write_text
    from layerchop.report.paper import Inputs, paper_readme

    out = Path(args.out)
    inputs = Inputs(eval=Path(args.eval), bench=Path(args.bench), params=load_params(args.params))
    text = paper_readme(Path(args.tables_dir), Path(args.figures_dir), inputs, relative_to=out.parent)
    write_text(out, text)
    print(text.split("\n## ")[0])
