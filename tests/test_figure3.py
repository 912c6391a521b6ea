"""Figure 3's stage on hand-made curves (issue 14): the arms' rows, the compression-cost ratios to LayerChop, the
DimChop points evaluated before their ramp reached the target, the shrunk model's size, and its refusals. The runs
themselves (DimChop's compute record) are tested in ``test_dimchop.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerchop.cli import main


def metrics(ppl: float, acc: float, nonzero: int, params: int) -> dict:
    m = {"val/ppl": ppl, "test/ppl": ppl * 1.05, "nonzero_params": nonzero, "params": params}
    for task, n in (("heldout_lastword", 200), ("piqa", 1000)):
        m.update({f"eval/{task}/acc_norm": acc, f"eval/{task}/acc_norm_stderr": 0.02, f"eval/{task}/n": n,
                  f"eval/{task}/acc": acc, f"eval/{task}/acc_stderr": 0.02})
    return m


def curve(objective: str, points: list[tuple], compute: dict) -> dict:
    return {"objective": objective, "distill": None, "compute": compute,
            "points": [{"model": f"m{s}", "step": s, "tokens": t, "flops": f, "device_s": d, "metrics": m}
                       for s, t, f, d, m in points]}


DENSE, CHOPPED = 134_515_008, 81_413_568


def write_inputs(root: Path, small: int) -> dict[str, Path]:
    """The arms' curves, the chopped start and the dense model; ``small``: the shrunk model's size, which the
    structured arm's final nonzero count must equal."""
    lc = {"steps": 80, "tokens": 163840, "flops": 8.4e13, "flops_per_step": 1.05e12, "device_s": 360.0,
          "s_per_step": 4.5}
    dc = {"steps": 47, "tokens": 96256, "flops": 8.4e13, "flops_per_step": 1.79e12, "device_s": 540.0,
          "s_per_step": 11.49,
          "scoring_device_s": 54.0, "scoring_flops": 5.0e10, "scoring_mask_updates": 24}
    st = {**dc, "device_s": 720.0, "scoring_device_s": 180.0}
    tk = {**dc, "steps": 80, "tokens": 163840, "flops": 1.43e14, "device_s": 900.0, "scoring_mask_updates": 40}
    files = {
        "layerchop": curve("lm", [(40, 81920, 4.2e13, 180.0, metrics(70.0, 0.6, CHOPPED, CHOPPED)),
                                  (80, 163840, 8.4e13, 360.0, metrics(55.0, 0.65, CHOPPED, CHOPPED))], lc),
        "dimchop": curve("dimchop", [(16, 32768, 2.9e13, 180.0, metrics(40.0, 0.7, 110_000_000, DENSE)),
                                     (47, 96256, 8.4e13, 540.0, metrics(60.0, 0.63, CHOPPED, DENSE))], dc),
        "structured": curve("dimchop", [(47, 96256, 8.4e13, 720.0, metrics(80.0, 0.6, small, DENSE))], st),
        "dimchop_tokens": curve("dimchop", [(80, 163840, 1.43e14, 900.0, metrics(50.0, 0.66, CHOPPED, DENSE))], tk),
        "start": metrics(900.0, 0.3, CHOPPED, CHOPPED),
        "dense": metrics(20.0, 0.8, DENSE, DENSE),
    }
    paths = {}
    for key, obj in files.items():
        paths[key] = root / f"{key}.json"
        paths[key].write_text(json.dumps(obj))
    return paths


def shrunk_dir(root: Path, tiny_dir: Path, before: int = DENSE) -> Path:
    """The tiny model standing in for the structured arm's shrunk export, with the record ``layerchop shrink`` writes
    (the size before, the masked entries)."""
    import shutil

    out = root / "shrunk"
    shutil.copytree(tiny_dir, out)
    small = tiny_size(tiny_dir)
    meta = json.loads((out / "layerchop.json").read_text())
    meta.update(stage="shrink", num_params_before_shrink=before, masked_entries=before - small, num_params=small)
    (out / "layerchop.json").write_text(json.dumps(meta))
    return out


def args_(paths: dict[str, Path], shrunk: Path, out: Path) -> list[str]:
    return ["figure3", "--layerchop", str(paths["layerchop"]), "--start", str(paths["start"]),
            "--dimchop", str(paths["dimchop"]), "--structured", str(paths["structured"]),
            "--dimchop-tokens", str(paths["dimchop_tokens"]), "--dense", str(paths["dense"]), "--shrunk", str(shrunk),
            "--tables", str(out / "tables"), "--figures", str(out / "figs")]


def rows(text: str, label: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {label} |")]


def tiny_size(tiny_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    from layerchop.io import num_params

    return num_params(AutoModelForCausalLM.from_pretrained(tiny_dir))


def test_figure3_tables_ratios_ramp_points_and_shrunk_size(tmp_path, tiny_dir):
    small = tiny_size(tiny_dir)
    paths = write_inputs(tmp_path, small)
    assert main(args_(paths, shrunk_dir(tmp_path, tiny_dir), tmp_path)) == 0
    text = (tmp_path / "tables" / "dimchop.md").read_text()
    main_table, cost, along = text.split("### ")[0], text.split("### Compression cost")[1].split("###")[0], \
        text.split("### Evaluations along the runs")[1]
    # final rows: steps, tokens, nonzero vs stored params (the shrunk size read from the model's config)
    [lc] = rows(main_table, "LayerChop (chop, then continued pretraining)")
    [st] = rows(main_table, "DimChop, channels + heads (equal FLOPs)")
    [dc] = rows(main_table, "DimChop, columns (equal FLOPs)")
    assert lc[1:3] == ["80", "163,840"] and lc[7:9] == ["81.4M", "81.4M"] and lc[9] == "55.00"
    assert dc[1:3] == ["47", "96,256"] and dc[7:9] == ["81.4M", "134.5M"] and dc[9] == "60.00"
    assert st[7] == f"{small / 1e6:.1f}M" and st[8] == f"134.5M ({small / 1e6:.1f}M shrunk)"
    [tk] = rows(main_table, "DimChop, columns (LayerChop's tokens)")
    assert tk[1:4] == ["80", "163,840", "1.430e+14"] and tk[9] == "50.00"
    # cost ratios to LayerChop: equal FLOPs, 1.70x the FLOPs per token, measured time, the scoring's share
    header = rows(cost, "Arm")[0]
    c = {r[0]: dict(zip(header, r)) for r in rows(cost, "LayerChop (chop, then continued pretraining)")
         + rows(cost, "DimChop, columns (equal FLOPs)") + rows(cost, "DimChop, channels + heads (equal FLOPs)")
         + rows(cost, "DimChop, columns (LayerChop's tokens)")}
    d = c["DimChop, columns (equal FLOPs)"]
    assert d["Per token vs LayerChop"] == "1.70" and d["Train FLOPs"] == "8.400e+13"
    assert [r["FLOPs vs LayerChop"] for r in c.values()] == ["1.00", "1.00", "1.00", "1.70"]
    assert [r["Time vs LayerChop"] for r in c.values()] == ["1.00", "1.50", "2.00", "2.50"]  # 540, 720, 900 / 360 s
    assert d["Scoring share of time"] == "10.0%" and c["DimChop, channels + heads (equal FLOPs)"][
        "Scoring share of time"] == "25.0%"
    assert c["LayerChop (chop, then continued pretraining)"]["Scoring share of time"] == "0"
    assert d["Mask choices"] == "24" and d["Scoring FLOPs"] == "5.00e+10"
    t = c["DimChop, columns (LayerChop's tokens)"]
    assert t["Mask choices"] == "40" and t["Scoring share of time"] == "6.0%" and t["Per token vs LayerChop"] == "1.70"
    # along the runs: LayerChop from its chopped start; DimChop from its first evaluation, the pre-target one marked
    assert [r[1] for r in rows(along, "LayerChop (chop, then continued pretraining)")] == ["0", "40", "80"]
    dpoints = rows(along, "DimChop, columns (equal FLOPs)")
    assert [r[1] for r in dpoints] == ["16", "47"]
    assert dpoints[0][5] == "110.0M (ramp)" and dpoints[1][5] == "81.4M"
    for ext in ("png", "pdf"):
        assert (tmp_path / "figs" / f"fig3_dimchop_vs_layerchop.{ext}").stat().st_size > 10_000


@pytest.mark.parametrize("swap,message", [
    (("dimchop", "layerchop"), r"--dimchop: .* is a run of objective 'lm', not 'dimchop'"),
    (("layerchop", "dimchop"), r"--layerchop: .* is a run of objective 'dimchop', not 'lm'"),
    (("dimchop", "dimchop_tokens"), r"--dimchop: its run spent 1.43e\+14 FLOPs, not the LayerChop arm's 8.4e\+13"),
    (("dimchop_tokens", "dimchop"), r"--dimchop-tokens: its run trained 96,256 tokens, not the LayerChop arm's 163,840"),
    (("structured", "dimchop"), r"--shrunk .*: \d[\d,]* parameters, but the --structured run's final model has "
                                r"81,413,568 nonzero"),
])
def test_figure3_refuses_arms_in_the_wrong_place(tmp_path, tiny_dir, capsys, swap, message):
    """An arm given as another (the likely mistake with three DimChop runs) is refused, naming the argument, and
    nothing is written."""
    import re

    paths = write_inputs(tmp_path, tiny_size(tiny_dir))
    arg, other = swap
    paths[arg] = paths[other]
    assert main(args_(paths, shrunk_dir(tmp_path, tiny_dir), tmp_path)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "tables").exists() and not (tmp_path / "figs").exists()


def test_the_shrunk_model_is_checked_by_its_shrink_record_not_by_a_nonzero_count(tmp_path, tiny_dir, capsys):
    """A kept weight can be exactly zero (Llama's embedding row of the padding token stays zero: the rehearsal's
    ``dvc repro`` stopped here when the check compared the shrunk size with the nonzero count). The size is checked
    against the shrink record (before - masked == after); a model without that record is refused."""
    small = tiny_size(tiny_dir)
    paths = write_inputs(tmp_path, small)
    structured = json.loads(paths["structured"].read_text())
    structured["points"][-1]["metrics"]["nonzero_params"] = small - 64  # one zero row of width 64 among the kept
    paths["structured"].write_text(json.dumps(structured))
    assert main(args_(paths, shrunk_dir(tmp_path, tiny_dir), tmp_path)) == 0
    capsys.readouterr()
    import shutil

    shutil.rmtree(tmp_path / "tables")
    shutil.rmtree(tmp_path / "figs")
    assert main(args_(paths, tiny_dir, tmp_path)) == 2  # a plain model directory: no shrink record
    assert "not the `layerchop shrink` export of the --structured run's final model" in capsys.readouterr().err
    assert not (tmp_path / "tables").exists()
