"""What the embedded pipeline costs, stage family by stage family, from the times its committed runs recorded.

Reads the training time of every run (``data/runs/**/*.json``: ``train_s``, phases included) and the wall time of
every evaluation (``data/eval/**/metrics.json``, or each point of a ``curve.json``: ``eval_wall_s``), and prints
them per family with the total. Prints numbers; asserts nothing. The times are as the runs measured them: some
shared the 2 cores with other work (noted in experiments/LOG.md), so the sums are upper bounds. Stages that record
no time (download, prepare, chop, prune, reports: a few minutes in all) are not counted. From the repository root:

    python experiments/benchmarks/pipeline_cost.py
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

FAMILIES = [  # (family, path prefix under data/)
    ("main table + Figure 1: recoveries", ("runs/layerchop", "runs/dense_cpt", "runs/sparsegpt-2of4_cpt")),
    ("main table + Figure 1: evaluations", ("eval/dense/", "eval/chopped/", "eval/layerchop/", "eval/dense_cpt/",
                                            "eval/wanda-", "eval/sparsegpt-", "eval/oneshot/")),
    ("Figure 4: trainings", ("runs/fig4-",)),
    ("Figure 4: curves", ("eval/fig4-",)),
    ("Figure 2: training", ("runs/fig2-",)),
    ("Figure 2: curve", ("eval/fig2-",)),
    ("Table 6: recoveries", ("runs/layouts/",)),
    ("Table 6: evaluations", ("eval/layouts/",)),
    ("Figure 6: trainings", ("runs/fig6-",)),
    ("Figure 6: curves", ("eval/fig6/",)),
    ("Figure 3: trainings", ("runs/fig3-",)),
    ("Figure 3: curves", ("eval/fig3-",)),
]


def family(rel: str) -> str:
    for name, prefixes in FAMILIES:
        if rel.startswith(prefixes):
            return name
    return "other"


def main() -> None:
    data = Path("data")
    seconds: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for f in sorted(data.glob("runs/**/*.json")):
        rel = str(f.relative_to(data))
        seconds[family(rel)] += float(json.loads(f.read_text()).get("train_s", 0))
        count[family(rel)] += 1
    for f in sorted(data.glob("eval/**/metrics.json")):
        if (f.parent / "curve.json").exists():
            continue  # a curve's metrics.json is its final point, counted below
        rel = str(f.relative_to(data))
        seconds[family(rel)] += float(json.loads(f.read_text()).get("eval_wall_s", 0))
        count[family(rel)] += 1
    for f in sorted(data.glob("eval/**/curve.json")):
        rel = str(f.relative_to(data))
        for point in json.loads(f.read_text())["points"]:
            seconds[family(rel)] += float(point["metrics"].get("eval_wall_s", 0))
            count[family(rel)] += 1
    print("| stage family | runs or evaluations | minutes |\n|---|---:|---:|")
    for name in [n for n, _ in FAMILIES] + ["other"]:
        if count[name]:
            print(f"| {name} | {count[name]} | {seconds[name] / 60:.1f} |")
    print(f"| **total** | {sum(count.values())} | {sum(seconds.values()) / 60:.1f} |")


if __name__ == "__main__":
    main()
