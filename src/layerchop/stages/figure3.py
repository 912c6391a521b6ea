"""Stage ``figure3``: LayerChop vs DimChop at equal training FLOPs, and their compression cost (Figure 3, ``dimchop.md``).

Reads the metrics files of the arms (each ``curve.json``: evaluations along the run, with the compute spent to reach
each point), the chopped start and the dense model's ``metrics.json``, and the structured arm's smaller export (only
its size). The LayerChop arm starts from the chopped model; the DimChop arms start from the dense model and are drawn
from their first evaluation, an open marker where the ramp had not yet masked the target.

Example::

    layerchop figure3 --layerchop data/eval/fig4-layerchop/curve.json --start data/eval/chopped/metrics.json \\
        --dimchop data/eval/fig3-dimchop/curve.json --structured data/eval/fig3-structured/curve.json \\
        --dimchop-tokens data/eval/fig3-dimchop-tokens/curve.json --dense data/eval/dense/metrics.json \\
        --shrunk data/models/fig3-structured-small --tables paper/tables --figures paper/figures
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import load_params, section
from layerchop.io import check_model_dir, read_json, staged
from layerchop.report.compare import curve_comparisons
from layerchop.report.tables import accuracy_caption, markdown

ARMS = (  # (argument, label, expected objective)
    ("layerchop", "LayerChop (chop, then continued pretraining)", "lm"),
    ("dimchop", "DimChop, columns (equal FLOPs)", "dimchop"),
    ("structured", "DimChop, channels + heads (equal FLOPs)", "dimchop"),
    ("dimchop_tokens", "DimChop, columns (LayerChop's tokens)", "dimchop"),
)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layerchop", required=True, help="curve.json of the LayerChop arm (Figure 4's)")
    p.add_argument("--start", required=True, help="metrics.json of the chopped model the LayerChop arm starts from")
    p.add_argument("--dimchop", required=True, help="curve.json of DimChop (columns) at the same FLOP budget")
    p.add_argument("--structured", required=True, help="curve.json of DimChop (channels-heads) at that budget")
    p.add_argument("--dimchop-tokens", required=True, help="curve.json of DimChop (columns) at LayerChop's tokens")
    p.add_argument("--dense", required=True, help="metrics.json of the uncompressed model (the DimChop start)")
    p.add_argument("--shrunk", required=True, help="the structured arm after `layerchop shrink` (its size is read)")
    p.add_argument("--tables", required=True, help="output directory for dimchop.md")
    p.add_argument("--figures", required=True, help="output directory for fig3_dimchop_vs_layerchop.{png,pdf}")


def check_shrunk(shrunk: Path, small: int, final: dict) -> None:
    """``--shrunk`` is the export of the structured run's final model: its ``layerchop shrink`` record says it had the
    final model's parameters and removed exactly the masked entries (``before - masked == small``), and it keeps at
    least the final model's nonzero entries (a kept weight may be exactly zero, e.g. the embedding row of the padding
    token, so the nonzero count alone is not the size).

    Raises:
        ValueError: naming ``--shrunk`` when it is not that export.
    """
    meta = read_json(shrunk / "layerchop.json") if (shrunk / "layerchop.json").exists() else {}
    before, masked = meta.get("num_params_before_shrink"), meta.get("masked_entries")
    if small < final["nonzero_params"]:
        raise ValueError(f"--shrunk {shrunk}: {small:,} parameters, but the --structured run's final model has "
                         f"{final['nonzero_params']:,} nonzero: not its shrunk export (or --structured is not the "
                         "channels-heads run)")
    if meta.get("stage") != "shrink" or before != final["params"] or masked is None or before - masked != small:
        raise ValueError(f"--shrunk {shrunk}: not the `layerchop shrink` export of the --structured run's final model "
                         f"({final['params']:,} parameters; its record: stage {meta.get('stage')!r}, "
                         f"{before} before, {masked} masked, {small:,} after)")


def shrunk_params(model_dir: Path) -> int:
    """Parameters of the smaller model (tied embeddings once), read from its config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from layerchop.io import num_params

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return num_params(model)


def check_arms(curves: dict[str, dict]) -> None:
    """Refuse arms given in the wrong place: the equal-FLOP arms must have spent LayerChop's FLOPs (each stops at the
    last whole step within the budget) and the equal-token arm LayerChop's tokens.

    Raises:
        ValueError: naming the argument whose run does not match.
    """
    lc = curves["layerchop"]["compute"]
    for key in ("dimchop", "structured"):
        c = curves[key]["compute"]
        if abs(c["flops"] - lc["flops"]) >= max(c["flops_per_step"], lc["flops_per_step"]):
            raise ValueError(f"--{key}: its run spent {c['flops']:.4g} FLOPs, not the LayerChop arm's "
                             f"{lc['flops']:.4g} (within a step): not an equal-FLOP arm")
    c = curves["dimchop_tokens"]["compute"]
    if c["tokens"] != lc["tokens"]:
        raise ValueError(f"--dimchop-tokens: its run trained {c['tokens']:,} tokens, not the LayerChop arm's "
                         f"{lc['tokens']:,}")


def main(args: argparse.Namespace) -> None:
    from layerchop.report.compute import arm_series, dimchop_tables, figure4, load_arms

    params = load_params(args.params)
    fig4 = section("figure4", params)
    check_model_dir(args.shrunk, "--shrunk")
    curves = []
    for key, _, objective in ARMS:
        path = Path(getattr(args, key))
        flag = "--" + key.replace("_", "-")
        if not path.exists():
            raise FileNotFoundError(f"{flag}: {path} does not exist (run `layerchop curve` first)")
        curve = read_json(path)
        if curve.get("objective") != objective:
            raise ValueError(f"{flag}: {path} is a run of objective {curve.get('objective')!r}, not {objective!r}")
        curves.append(curve)
    for flag, path in (("--start", args.start), ("--dense", args.dense)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{flag}: {path} does not exist (run `layerchop evaluate` first)")
    check_arms(dict(zip([k for k, _, _ in ARMS], curves)))
    start, dense = read_json(args.start), read_json(args.dense)
    arms, cols = load_arms(curves, start)
    reference = {**arm_series({"points": []}, dense, cols)[0], "label": "dense (uncompressed)"}
    for arm, (_, label, _) in zip(arms, ARMS):
        arm["label"] = label
    for arm in arms[1:]:  # DimChop starts from the dense model: drawn from its first evaluation
        arm["series"] = arm["series"][1:]
        final = arm["series"][-1]["metrics"]["nonzero_params"]
        for p in arm["series"]:
            p["hollow"] = p["metrics"]["nonzero_params"] > final  # the ramp had not masked the target yet
    small = shrunk_params(Path(args.shrunk))
    structured = [k for k, _, _ in ARMS].index("structured")
    check_shrunk(Path(args.shrunk), small, arms[structured]["series"][-1]["metrics"])
    dimchop, fig3 = section("dimchop", params), section("figure3", params)
    header, body, cost_header, cost, pheader, points = dimchop_tables(arms, fig4, cols, shrunk={structured: small})
    caption = (
        f"LayerChop is Figure 4's arm: the chopped model trained to {fig3.flop_budget:.3g} FLOPs. The two "
        f"equal-FLOP DimChop arms start from the dense model and train to the same FLOPs (section figure3); the "
        f"third trains LayerChop's tokens. DimChop masks {dimchop.target:.0%} of {', '.join(dimchop.matrices)} "
        f"in every layer, growing along a cubic ramp from {dimchop.start:.0%} to {dimchop.end:.0%} of each run's "
        f"steps, chosen by PLATON scores (beta1 {dimchop.beta1}, beta2 {dimchop.beta2}): input columns (the "
        f"paper), or whole MLP channels and key/value head groups (channels + heads; with "
        f"{small:,} parameters after `layerchop shrink`, a physically smaller model that computes the same "
        f"logits). Nonzero params count the weights that are not masked; stored params, what the exported model "
        f"holds. FLOPs: matmul FLOPs (the masked matmuls are still computed in full while training); device-hours "
        f"and s/step: measured wall time of the optimizer steps on the machine that ran the pipeline (under several "
        f"processes: rank 0's time x the processes). "
    ) + accuracy_caption(section("download", params).corpus, [{"metrics": arm["series"][-1]["metrics"]}
                                                              for arm in arms], section("evaluate", params))
    caption += " " + curve_comparisons([(args.dimchop, args.layerchop, "DimChop (columns, equal FLOPs) against "
                                                                       "LayerChop, at the end (one seed each)"),
                                        (args.structured, args.layerchop, "DimChop (channels + heads, equal FLOPs) "
                                                                          "against LayerChop"),
                                        (args.dimchop_tokens, args.layerchop, "DimChop (columns, LayerChop's tokens) "
                                                                              "against LayerChop")])
    text = markdown(header, body, caption)
    text += "\n### Compression cost\n\n" + markdown(cost_header, cost, (
        "The cost of compressing: every training step of each arm. DimChop's scoring (PLATON's moving averages every "
        "step, the mask choices along the ramp, the zeroing after every step) is part of its training time; its "
        "FLOPs are elementwise (10 per pruned weight a step, 3 per mask choice) and not in the matmul count. "
        "LayerChop's chop (removing the layers of a fixed layout) costs no training. Ratios are to the LayerChop "
        "arm."))
    text += "\n### Evaluations along the runs\n\n" + markdown(pheader, points, (
        "Step 0 of LayerChop is the chopped model. A DimChop point whose nonzero params exceed its final count "
        "was evaluated before its ramp reached the target (open markers in the figure)."))
    with staged(args.tables, args.figures) as (tables, figures):  # all outputs or none
        (tables / "dimchop.md").write_text(text)
        figure4(arms, figures / "fig3_dimchop_vs_layerchop", fig4.gpu, reference=reference,
                title="LayerChop vs DimChop (width pruning while training) at equal FLOPs, and DimChop at LayerChop's "
                      "tokens\nopen markers: DimChop evaluated before its ramp reached the target; dotted: dense")
    print(text)

