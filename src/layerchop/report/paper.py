"""``paper/README.md``: every artifact of the paper as the pipeline regenerated it, beside what the paper reports.

Each :class:`Artifact` names its generated table (with its caption), its figure, the stage that writes them and
the paper's own result (from the fact sheet), and computes a verdict from the metrics files (:data:`VERDICTS`).
Comparisons are those of :mod:`layerchop.report.compare`: paired over items (and seeds, for arms with replicas in
``arms.seeds``) where the evaluations wrote ``items.csv``, two independent binomial errors otherwise; a difference
its test does not carry is **a tie**. Perplexity has no error here: a difference counts when it is larger than
:data:`PPL_MARGIN` (relative). A verdict weighs every comparison the paper's claim makes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from layerchop.report.compare import PPL_MARGIN, Metrics, comparisons, ppl, ppl_sign, ppl_text
from layerchop.report.tables import mean_accuracy, task_columns, with_items, with_seeds

VERDICTS = {
    "agrees": "every comparison goes the paper's way beyond noise",
    "differs": "a comparison goes against the paper beyond noise",
    "a tie": "no comparison is beyond noise: this run cannot say",
    "partly": "some comparisons go the paper's way beyond noise, the others are ties",
    "not measured": "the run has nothing to compare",
    "descriptive": "the artifact describes; it claims nothing",
}

@dataclass(frozen=True)
class Inputs:
    """Where the metrics are (``data/eval``, the latency bench's ``metrics.json``) and the params they ran with."""

    eval: Path
    bench: Path
    params: dict[str, Any]
    read: list[Path] = field(default_factory=list)
    """Every file read so far, in order (a test checks that dvc.yaml's paper stage depends on each)."""

    def _read(self, path: Path) -> Any:
        self.read.append(path)
        return _read(path)

    def metrics(self, name: str, seeds: bool = True) -> Metrics:
        """An evaluation's ``metrics.json`` (``data/eval/<name>``), with its per-item results under :data:`ITEMS`
        where the evaluation wrote ``items.csv`` (so that comparisons with it are paired)."""
        path = self.eval / name / "metrics.json"
        m = self._read(path)
        if not isinstance(m, dict) or "val/ppl" not in m:
            raise ValueError(f"{path}: not an evaluation's metrics (no val/ppl)")
        m = with_items(m, self.eval / name, self.read)
        return self._with_seeds(name, m) if seeds else m

    def _with_seeds(self, name: str, m: Metrics) -> Metrics:
        """``m`` with its seed replicas' metrics (``arms.seeds``) under :data:`SEEDS`."""
        return with_seeds(m, [self.metrics(f"seeds/{r}") for r in self.section("arms").seeds.get(name, [])])

    def final(self, name: str, required: bool = True, seeds: bool = True) -> Optional[Metrics]:
        """The last point of a run's curve (``data/eval/<name>/curve.json``): the model at the end of training, with
        its per-item results where ``layerchop curve`` wrote them and (``seeds``) its seed replicas; None when not
        ``required`` and there is no curve."""
        path = self.eval / name / "curve.json"
        if not required and not path.exists():
            return None
        curve = self._read(path)
        try:
            m = curve["points"][-1]["metrics"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{path}: not a curve with evaluated points (`layerchop curve` writes one)") from None
        m = with_items(m, self.eval / name, self.read)
        return self._with_seeds(name, m) if seeds else m

    def section(self, name: str):
        """A params section, typed and with its defaults (:func:`layerchop.config.section`)."""
        from layerchop.config import section

        return section(name, self.params)


def _read(path: Path) -> Any:
    from layerchop.io import read_json

    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run `dvc repro paper`, which builds every artifact first)")
    return read_json(path)


def verdict_of(signs: list[int], want: int) -> str:
    """``agrees`` when every comparison goes the paper's way (``want``: +1 better, -1 worse) beyond noise,
    ``differs`` when one goes against it, ``a tie`` when none is beyond noise, ``partly`` otherwise;
    ``not measured`` without comparisons."""
    if not signs:
        return "not measured"
    if all(s == want for s in signs):
        return "agrees"
    if any(s == -want for s in signs):
        return "differs"
    if all(s == 0 for s in signs):
        return "a tie"
    return "partly"


def versus(a: Metrics, b: Metrics, a_name: str, b_name: str, want: int) -> tuple[str, str]:
    """The verdict and sentence of "``a`` is better (``want`` +1) / worse (-1) than ``b``", on perplexity and on
    each task group's accuracy."""
    cs = comparisons(a, b)
    text = f"{a_name} against {b_name}: {ppl_text(a, b)}; " + "; ".join(c.text() for c in cs) + "."
    return verdict_of([ppl_sign(a, b)] + [c.sign for c in cs], want), text


# --- the artifacts ---------------------------------------------------------------------------------------------


def _main(inp: Inputs) -> tuple[str, str]:
    from layerchop.report.summary import recovered_share

    share = recovered_share(inp.metrics("dense"), inp.metrics("chopped"), inp.metrics("layerchop"))
    got = [(g, v) for g, v in (("in-domain", share["in_domain"]), ("general", share["general"])) if v is not None]
    if not got:
        return "not measured", "Chopping lost no accuracy beyond noise, so no share of it can be recovered."
    kept = [v >= 50 for _, v in got]
    verdict = "agrees" if all(kept) else "partly" if any(kept) else "differs"
    return verdict, ("Continued pretraining brings back " + " and ".join(f"{v:.0f} % of the {g} accuracy points"
                                                                          for g, v in got)
                     + " that chopping lost (agrees: at least half of each).")


def _figure1(inp: Inputs) -> tuple[str, str]:
    prune = inp.section("prune")
    runs = [f"oneshot/{m}-2of4" for m in prune.methods if "2of4" in prune.patterns] + ["sparsegpt-2of4_cpt"]
    if (inp.eval / "sparsegpt-2of4_cpt_flops" / "metrics.json").exists():  # the same at LayerChop's FLOPs
        runs.append("sparsegpt-2of4_cpt_flops")
    lc = inp.metrics("layerchop")
    parts, signs = [], []
    for run in runs:
        other = inp.metrics(run)
        cs = comparisons(lc, other)
        signs += [c.sign for c in cs]
        parts.append(f"against {run.split('/')[-1]}: {ppl_text(lc, other)}; " + "; ".join(c.text() for c in cs))
    return verdict_of(signs, +1), ("LayerChop " + ". LayerChop ".join(parts) +
                                   ". (The paper's claim is about accuracy; perplexity is shown, not weighed.)")


def _table2(inp: Inputs) -> tuple[str, str]:
    dense, lc = inp.metrics("dense"), inp.metrics("layerchop")
    cols = task_columns([{"metrics": dense}])  # as Table 2: the average over the dense model's tasks
    d, c = mean_accuracy(dense, cols), mean_accuracy(lc, cols)
    if d is None or c is None or d[1] is None or c[1] is None:
        return "not measured", "LayerChop lacks a task the dense model was evaluated on, or its error."
    drop = 100 * (c[0] - d[0]) / d[0]
    se = 100 * math.hypot(c[1], d[1]) / d[0]
    pruned = 100 * (1 - lc["layers"] / dense["layers"])
    paper = (-12.8, -12.1)
    verdict = ("agrees" if paper[0] - 2 * se <= drop <= paper[1] + 2 * se else
               "differs" if drop < paper[0] else "partly")
    return verdict, (f"LayerChop's average accuracy over the dense model's tasks changes by {drop:+.1f} % "
                     f"(± {se:.1f}) relative to the dense model with {pruned:.0f} % of the decoder layers removed; "
                     f"the paper: -12.1 % / -12.8 % at 50 % (agrees: within two standard errors of it; partly: a "
                     "smaller drop).")


def _table3(inp: Inputs) -> tuple[str, str]:
    from layerchop.report.efficiency import cell_at

    bench = inp._read(inp.bench)
    try:
        query = bench["query"]
        cell = cell_at(bench, query["batch"], query["prompt"])["models"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{inp.bench}: not a bench record with the query's cell ({e})") from None
    lc = cell.get("layerchop", {}).get("query_speedup")
    sparse = {n: m["query_speedup"] for n, m in cell.items() if "2of4" in n}
    if lc is None:
        return "not measured", "No LayerChop latency was measured."
    text = f"LayerChop's query speed-up {lc['median']:.2f}x [{lc['q1']:.2f}-{lc['q3']:.2f}]"
    text += "; " + (", ".join(f"{n} {s['median']:.2f}x [{s['q1']:.2f}-{s['q3']:.2f}]" for n, s in sparse.items())
                     if sparse else "no 2:4 model timed")
    text += " (median [quartiles] over interleaved repeats; the paper: 1.84x against 1.24x for 2:4)."
    if lc["q1"] <= 1:
        return "differs", text
    if not sparse:
        return "partly", text
    return ("agrees" if all(lc["q1"] > s["q3"] for s in sparse.values()) else "differs"), text


def _figure2(inp: Inputs) -> tuple[str, str]:
    # one seed each, as the figure's table (the LayerChop replicas are the main arm's, not this figure's runs)
    return versus(inp.final("fig4-layerchop", seeds=False), inp.final("fig2-scratch"), "LayerChop", "from scratch", +1)


def _figure3(inp: Inputs) -> tuple[str, str]:
    dim, lc = inp.final("fig3-dimchop"), inp.final("fig4-layerchop", seeds=False)  # one seed each, as its table
    cs = comparisons(dim, lc)
    text = (f"DimChop (columns, equal FLOPs) against LayerChop: {ppl_text(dim, lc)}; "
            + "; ".join(c.text() for c in cs) + ". The paper reports similar accuracy: a tie here is consistent "
            "with it but does not show it; the compression cost is in the table.")
    if not cs:
        return "not measured", text
    return ("a tie" if all(c.sign == 0 for c in cs) else "differs"), text


def _figure4(inp: Inputs) -> tuple[str, str]:
    verdict, text = versus(inp.final("fig4-distill"), inp.final("fig4-layerchop"), "CHOP + distill (the paper's "
                           "unweighted sum)", "LayerChop (equal FLOPs)", -1)
    balanced = inp.final("fig4-distill-balanced", required=False)
    if balanced is not None:  # not the paper's protocol: it informs the reading, not the verdict
        _, more = versus(balanced, inp.final("fig4-layerchop"), "CHOP + distill (terms balanced at step 0)",
                         "LayerChop (equal FLOPs)", -1)
        text += " " + more
    return verdict, text


def _long(inp: Inputs) -> tuple[str, str]:
    lc = inp.final("long/layerchop", required=False)
    if lc is None:
        return "not measured", "No long-budget runs in this profile (long.arms is empty)."
    return versus(lc, inp.final("long/sparsegpt-2of4_cpt"), "LayerChop after one pass of the train split",
                  "SparseGPT 2:4 + continued pretraining after the same", +1)


FIXED_LAYOUTS = ("input", "output", "middle", "max-gap", "both")


def _table6(inp: Inputs) -> tuple[str, str]:
    main = inp.section("chop").layout
    names = sorted({x for x in inp.section("table6").layouts if x in FIXED_LAYOUTS} |
                   ({main} if main in FIXED_LAYOUTS else set()))
    ppls = {n: ppl(inp.metrics("layerchop" if n == main else f"layouts/{n}/recovered", seeds=False), n)  # seed 0, as
            for n in names}  # its table
    ranked = sorted(ppls, key=ppls.get)
    text = ("Fixed layouts by validation perplexity after recovery: " + ", ".join(f"{n} {ppls[n]:.1f}" for n in ranked)
            + " (the paper: input best at 1.1B and 7B, max-gap at 300M; output worst at both scales; perplexity "
            "alone ranks them here, accuracies are in the table).")
    if len(ranked) < 2:
        return "not measured", text
    good = ranked[0] in ("input", "max-gap"), ranked[-1] == "output"
    return ("agrees" if all(good) else "partly" if any(good) else "differs"), text


def _figure6(inp: Inputs) -> tuple[str, str]:
    at_once = inp.final("fig4-layerchop", seeds=False)  # one seed each, as the figure's table
    parts, signs = [], []
    for n in inp.section("figure6").every_tokens:
        g = inp.final(f"fig6/every{n}")
        cs = comparisons(at_once, g)
        signs += [ppl_sign(at_once, g)] + [c.sign for c in cs]
        parts.append(f"against one layer every {n:,} tokens: {ppl_text(at_once, g)}; " +
                     "; ".join(c.text() for c in cs))
    verdict = verdict_of(signs, +1)
    return verdict, "All at once " + ". All at once ".join(parts) + ". (The paper: all at once is marginally best.)"


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
             "model's zero-shot accuracy.", _main),
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
             "LayerChop is ahead of pretraining the same half-depth model from scratch on the same tokens.",
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
    Artifact("Long budget", "LayerChop against SparseGPT 2:4 + continued pretraining as recovery grows", "long",
             "long.md", "long_budget.png",
             "After one epoch of C4 (160B tokens) LayerChop beats 2:4 semi-structured pruning on zero-shot accuracy at "
             "7B (the claim; the paper shows no curve of the gap).", _long),
    Artifact("LR rule", "Each arm's peak learning rate, by one rule (protocol, not a paper artifact)",
             "lr_sweep_table", "lr_sweep.md", "lr_sweep.png",
             "One peak LR per model size (3e-4 at 7B) for every recovery; no sweep per arm is reported."),
]


def paper_readme(tables: Path, figures: Path, inputs: Inputs, relative_to: Path) -> str:
    """The text of ``paper/README.md``: an overview of the verdicts, then every artifact's table (with its
    caption), figure, the paper's result and this run's verdict."""
    rows, sections = [], []
    for art in ARTIFACTS:
        table = _text(tables / art.table)
        try:
            verdict, text = art.check(inputs) if art.check else ("descriptive", "")
        except (KeyError, IndexError, TypeError) as e:  # a metrics file without a field the verdict reads
            raise ValueError(f"{art.id}: a metrics file of `dvc repro {art.stage}` lacks {e!s} (re-run the stage)") \
                from None
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
            "produced; do not edit by hand. Each verdict compares this run with the paper's own result. An accuracy "
            "difference counts when its paired test says so (p < 0.05: McNemar's exact test over the items both "
            "models answered, or, where an arm has seed replicas (`arms.seeds`), a two-level paired bootstrap that draws "
            "each arm's seeds, then the items both answered); an evaluation without per-item results falls back on two "
            "standard errors of independent binomial estimates (which overstates the error). A perplexity difference "
            f"counts beyond {PPL_MARGIN:.0%}. An arm with replicas is the mean over its seeds; the others are one "
            "seed. At the profile's scale.", "",
            *[f"- **{name}**: {meaning}" for name, meaning in VERDICTS.items()], "",
            "| Artifact | What | Verdict | Rebuild |", "|---|---|---|---|", *rows, ""]
    return "\n".join(head + sections)


def _text(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run `dvc repro paper`, which builds every artifact first)")
    return path.read_text()
