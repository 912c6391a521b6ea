"""``paper/README.md``: every artifact of the paper as the pipeline regenerated it, beside what the paper reports.

Each :class:`Artifact` names its generated table (with its caption), its figure, the stage that writes them and
the paper's own result (from the fact sheet), and computes a verdict from the metrics files: **agrees**,
**differs**, **a tie** (the difference is within two standard errors, so this run cannot say) or **partly**.
The standard errors are binomial over the items of each task, and a difference's error is that of two
independent estimates (both models answer the same items, so this overstates it; one seed). Perplexity has no
error here: a perplexity comparison is stated, and it decides a verdict only beside an accuracy comparison.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from layerchop.report.tables import mean_accuracy, split_columns, task_columns

Metrics = dict[str, Any]


@dataclass(frozen=True)
class Inputs:
    """Where the metrics are (``data/eval``, the latency bench's ``metrics.json``) and the params they ran with."""

    eval: Path
    bench: Path
    params: dict[str, Any]

    def metrics(self, name: str) -> Metrics:
        """An evaluation's ``metrics.json`` (``data/eval/<name>``)."""
        return _read(self.eval / name / "metrics.json")

    def final(self, name: str) -> Metrics:
        """The last point of a run's curve (``data/eval/<name>/curve.json``): the model at the end of training."""
        return _read(self.eval / name / "curve.json")["points"][-1]["metrics"]


def _read(path: Path) -> Any:
    from layerchop.io import read_json

    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run `dvc repro paper`, which builds every artifact first)")
    return read_json(path)


def accuracy(m: Metrics, group: str) -> Optional[tuple[float, float]]:
    """``(mean, se)`` in percent of the ``in-domain`` or ``general`` tasks' primary metrics; None without them."""
    in_domain, general = split_columns(task_columns([{"metrics": m}]))
    got = mean_accuracy(m, in_domain if group == "in-domain" else general)
    if got is None or got[1] is None:
        return None
    return 100 * got[0], 100 * got[1]


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b`` on one task group: the difference in points and its z (a tie when ``|z| < 2``)."""

    group: str
    a: tuple[float, float]
    b: tuple[float, float]

    @property
    def diff(self) -> float:
        return self.a[0] - self.b[0]

    @property
    def z(self) -> float:
        se = math.hypot(self.a[1], self.b[1])
        return self.diff / se if se else math.inf

    @property
    def sign(self) -> int:
        """+1 when ``a`` is better beyond two standard errors, -1 when worse, 0 for a tie."""
        return 0 if abs(self.z) < 2 else (1 if self.diff > 0 else -1)

    def text(self) -> str:
        word = {1: "better", -1: "worse", 0: "a tie"}[self.sign]
        return (f"{self.group} {self.a[0]:.1f} vs {self.b[0]:.1f} ({self.diff:+.1f} points, z = {self.z:.1f}: "
                f"{word})")


def compare(a: Metrics, b: Metrics, group: str) -> Optional[Comparison]:
    ga, gb = accuracy(a, group), accuracy(b, group)
    return None if ga is None or gb is None else Comparison(group, ga, gb)


def ppl_text(a: Metrics, b: Metrics) -> str:
    return f"validation perplexity {a['val/ppl']:.1f} vs {b['val/ppl']:.1f}"


def comparisons(a: Metrics, b: Metrics) -> list[Comparison]:
    return [c for c in (compare(a, b, g) for g in ("general", "in-domain")) if c is not None]


def verdict_of(signs: list[int], want: int) -> str:
    """``agrees`` when every comparison goes the paper's way (``want``) beyond noise, ``differs`` when one goes
    against it, ``a tie`` when none is beyond noise, ``partly`` otherwise."""
    if signs and all(s == want for s in signs):
        return "agrees"
    if any(s == -want for s in signs):
        return "differs"
    if all(s == 0 for s in signs):
        return "a tie"
    return "partly"


def versus(a: Metrics, b: Metrics, a_name: str, b_name: str, want: int) -> tuple[str, str]:
    """The verdict and sentence of "``a`` is better (``want`` +1) / worse (-1) than ``b``" on accuracy."""
    cs = comparisons(a, b)
    text = f"{a_name} against {b_name}: {ppl_text(a, b)}; " + "; ".join(c.text() for c in cs) + "."
    return verdict_of([c.sign for c in cs], want), text


# --- the artifacts ---------------------------------------------------------------------------------------------


def _figure1(inp: Inputs) -> tuple[str, str]:
    prune = inp.params.get("prune", {})
    runs = [f"oneshot/{m}-2of4" for m in prune.get("methods", [])
            if "2of4" in prune.get("patterns", [])] + ["sparsegpt-2of4_cpt"]
    lc = inp.metrics("layerchop")
    parts, signs = [], []
    for run in runs:
        other = inp.metrics(run)
        cs = comparisons(lc, other)
        signs += [c.sign for c in cs]
        parts.append(f"against {run.split('/')[-1]}: {ppl_text(lc, other)}; " + "; ".join(c.text() for c in cs))
    return verdict_of(signs, +1), "LayerChop " + ". LayerChop ".join(parts) + "."


def _table2(inp: Inputs) -> tuple[str, str]:
    dense, lc = inp.metrics("dense"), inp.metrics("layerchop")
    d, c = accuracy(dense, "general"), accuracy(lc, "general")
    if d is None or c is None:
        return "not measured", "No general task was evaluated."
    drop = 100 * (c[0] - d[0]) / d[0]
    se = 100 * math.hypot(c[1], d[1]) / d[0]
    pruned = 100 * (1 - lc["params"] / dense["params"])
    paper = (-12.8, -12.1)
    within = paper[0] - 2 * se <= drop <= paper[1] + 2 * se
    verdict = "agrees" if within else ("differs" if drop < paper[0] else "differs (a smaller drop)")
    return verdict, (f"LayerChop's general accuracy changes by {drop:+.1f} % (± {se:.1f}) relative to the dense model "
                     f"with {pruned:.0f} % of the parameters removed; the paper: -12.1 % / -12.8 % at 50 % "
                     f"({'within' if within else 'beyond'} two standard errors of it).")


def _table3(inp: Inputs) -> tuple[str, str]:
    from layerchop.report.efficiency import cell_at

    bench = _read(inp.bench)
    query = bench["query"]
    cell = cell_at(bench, query["batch"], query["prompt"])["models"]
    lc = cell.get("layerchop", {}).get("query_speedup")
    sparse = {n: m["query_speedup"] for n, m in cell.items() if "2of4" in n}
    if lc is None:
        return "not measured", "No LayerChop latency was measured."
    text = f"LayerChop's query speed-up {lc['median']:.2f}x [{lc['q1']:.2f}-{lc['q3']:.2f}]"
    if sparse:
        text += "; " + ", ".join(f"{n} {s['median']:.2f}x [{s['q1']:.2f}-{s['q3']:.2f}]" for n, s in sparse.items())
    faster = lc["q1"] > 1 and all(lc["q1"] > s["q3"] for s in sparse.values())
    return ("agrees" if faster else "differs"), text + " (median [quartiles] over interleaved repeats; the paper: " \
        "1.84x against 1.24x for 2:4)."


def _figure2(inp: Inputs) -> tuple[str, str]:
    return versus(inp.final("fig4-layerchop"), inp.final("fig2-scratch"), "LayerChop", "from scratch", +1)


def _figure3(inp: Inputs) -> tuple[str, str]:
    verdict, text = versus(inp.final("fig3-dimchop"), inp.final("fig4-layerchop"), "DimChop (equal FLOPs)",
                           "LayerChop", 0)
    # the paper: similar accuracy, at about twice the compression cost: a tie is what it reports
    cs = comparisons(inp.final("fig3-dimchop"), inp.final("fig4-layerchop"))
    verdict = "agrees" if cs and all(c.sign == 0 for c in cs) else "differs"
    return verdict, text


def _figure4(inp: Inputs) -> tuple[str, str]:
    lc, kd = inp.final("fig4-layerchop"), inp.final("fig4-distill")
    verdict, text = versus(kd, lc, "CHOP + distill", "LayerChop (equal FLOPs)", -1)
    if verdict in ("a tie", "partly") and kd["val/ppl"] > lc["val/ppl"]:
        verdict = "partly"  # worse perplexity, accuracy within noise
    return verdict, text


def _table6(inp: Inputs) -> tuple[str, str]:
    layouts = [x for x in inp.params.get("table6", {}).get("layouts", []) if x in ("output", "middle", "max-gap",
                                                                                  "both")]
    main = inp.params.get("chop", {}).get("layout")
    names = sorted(set(layouts + ([main] if main in ("input", "output", "middle", "max-gap", "both") else [])))
    ppl = {}
    for name in names:
        path = "layerchop" if name == main else f"layouts/{name}/recovered"
        ppl[name] = inp.metrics(path)["val/ppl"]
    ranked = sorted(ppl, key=ppl.get)
    text = ("Fixed layouts by validation perplexity after recovery: " +
            ", ".join(f"{n} {ppl[n]:.1f}" for n in ranked) + " (the paper at 1.1B: input best, output worst).")
    if len(ranked) < 2:
        return "not measured", text
    good = ranked[0] == "input", ranked[-1] == "output"
    return ("agrees" if all(good) else "partly" if any(good) else "differs"), text


def _figure6(inp: Inputs) -> tuple[str, str]:
    every = inp.params.get("figure6", {}).get("every_tokens", [])
    at_once = inp.final("fig4-layerchop")
    parts, signs, ppl_better = [], [], True
    for n in every:
        g = inp.final(f"fig6/every{n}")
        cs = comparisons(at_once, g)
        signs += [c.sign for c in cs]
        ppl_better &= at_once["val/ppl"] <= g["val/ppl"]
        parts.append(f"against one layer every {n:,} tokens: {ppl_text(at_once, g)}; " +
                     "; ".join(c.text() for c in cs))
    verdict = verdict_of(signs, +1)
    if verdict == "a tie" and ppl_better:
        verdict = "agrees"  # the paper: all at once is marginally best; here best in perplexity, accuracy a tie
    return verdict, "All at once " + ". All at once ".join(parts) + "."


@dataclass(frozen=True)
class Artifact:
    """One table or figure of the paper: its generated files, the stage that writes them, what the paper
    reports, and the verdict of this run (None: the artifact describes, it claims nothing)."""

    id: str
    title: str
    stage: str
    table: str
    figure: Optional[str]
    paper: str
    check: Optional[Callable[[Inputs], tuple[str, str]]] = None


ARTIFACTS = [
    Artifact("Main table", "LayerChop against the dense model, the chopped model and the dense control", "report",
             "main.md", "training_curves.png",
             "Removing half the layers and recovering with continued pretraining on ~160B tokens keeps most of a 7B "
             "model's zero-shot accuracy."),
    Artifact("Figure 1", "LayerChop against one-shot pruning (Wanda, SparseGPT at 2:4 and 4:8)", "figure1",
             "oneshot.md", "fig1_oneshot_vs_layerchop.png",
             "At 7B, LayerChop after continued pretraining beats 2:4 semi-structured pruning on zero-shot accuracy.",
             _figure1),
    Artifact("Table 2", "Relative accuracy drop against the share of parameters pruned", "table2",
             "table2_relative_drop.md", None,
             "LayerChop loses 12.1 % / 12.8 % of its average accuracy at 50 % pruned (their shared tasks), less than "
             "Shortened LLaMA (-16 % at 35 %), SliceGPT (-24.2 % at 30 %) and LLM Surgeon (-32.1 % at 50 %).",
             _table2),
    Artifact("Table 3", "Latency, and the queries that repay the training", "table3", "table3_latency.md",
             "fig_speedup_vs_batch.png",
             "Dense 351 ms to LayerChop 191 ms (1.84x); 2:4 312 to 251 ms (1.24x).", _table3),
    Artifact("Figure 2", "LayerChop against the same architecture trained from scratch", "figure2", "scratch.md",
             "fig2_scratch_vs_layerchop.png",
             "At every budget and scale LayerChop is far ahead of pretraining the half-depth model from scratch.",
             _figure2),
    Artifact("Figure 3", "LayerChop against DimChop (width pruning while training)", "figure3", "dimchop.md",
             "fig3_dimchop_vs_layerchop.png",
             "DimChop reaches accuracy similar to LayerChop's at about twice the compression cost.", _figure3),
    Artifact("Figure 4", "LayerChop against CHOP + distill at equal compute", "figure4", "distill.md",
             "fig4_distill_vs_layerchop.png",
             "At equal A100-hours, adding distillation losses makes both accuracy and perplexity worse.", _figure4),
    Artifact("Table 4", "Model configurations", "tables45", "models.md", None,
             "Configurations of the paper's models (descriptive)."),
    Artifact("Table 5", "The evaluation suite", "tables45", "tasks.md", None,
             "Tasks and metrics of the paper's evaluation (descriptive)."),
    Artifact("Table 6 / Figure 5", "Which layers to remove", "table6", "layouts.md", "fig5_layouts.png",
             "Input is best at 1.1B and for Llama-2-7B, max-gap at 300M; output is worst at both scales.", _table6),
    Artifact("Figure 6", "All layers at once against gradual chopping", "figure6", "gradual.md", "fig6_gradual.png",
             "Removing all layers at once is marginally best.", _figure6),
]


def paper_readme(tables: Path, figures: Path, inputs: Inputs, relative_to: Path) -> str:
    """The text of ``paper/README.md``: an overview of the verdicts, then every artifact's table (with its
    caption), figure, the paper's result and this run's verdict."""
    rows, sections = [], []
    for art in ARTIFACTS:
        table = _text(tables / art.table)
        verdict, text = art.check(inputs) if art.check else ("descriptive", "")
        rows.append(f"| {art.id} | {art.title} | **{verdict}** | `dvc repro {art.stage}` |")
        lines = [f"## {art.id}: {art.title}", "",
                 f"*The paper:* {art.paper}", ""]
        if text:
            lines += [f"*This run:* **{verdict}**. {text}", ""]
        if art.figure:
            fig = figures / art.figure
            if not fig.exists():
                raise FileNotFoundError(f"{fig}: not found (run `dvc repro {art.stage}`)")
            lines += [f"![{art.id}]({Path(os.path.relpath(fig, relative_to)).as_posix()})", ""]
        lines += [table.strip(), ""]
        sections.append("\n".join(lines))
    head = ["# The paper's artifacts, regenerated", "",
            "Written by `layerchop paper` (`dvc repro paper`) from the tables, figures and metrics the pipeline "
            "produced; do not edit by hand. Each verdict compares this run with the paper's own result: **agrees**, "
            "**differs**, **a tie** (the difference is within two standard errors of independent binomial "
            "estimates: this run cannot say), or **partly**. One seed, at the profile's scale.", "",
            "| Artifact | What | Verdict | Rebuild |", "|---|---|---|---|", *rows, ""]
    return "\n".join(head + sections)


def _text(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run `dvc repro paper`, which builds every artifact first)")
    return path.read_text()
