"""Table 6 / Figure 5 (which layers to remove), Figure 2 (from scratch) and Tables 4 / 5: the stages behind them,
on a tiny real Llama and on metrics files."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml

from conftest import REPO
from layerchop.cli import main
from layerchop.io import read_json, read_metadata


def _params(tmp_path, **sections):
    params = yaml.safe_load(open(REPO / "params.yaml"))
    for name, values in sections.items():
        params[name].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


# ----------------------------------------------------------------------------------------- data-driven chop
@pytest.mark.parametrize("layout", ["angular", "block-influence", "ppl"])
def test_data_driven_chop_stage_removes_what_its_scores_select(tmp_path, tiny_dir, tiny_prepared, layout):
    from transformers import AutoModelForCausalLM

    from layerchop.data.prepare import PackedDataset
    from layerchop.data.prepare import calibration_batch
    from layerchop.prune.select import layer_scores, select_layers

    pfile = _params(tmp_path, chop={"num_remove": 2, "num_calibration": 6, "calibration_seed": 3, "batch_size": 4})
    out = tmp_path / "chopped"
    assert main(["chop", "--params", str(pfile), "--layout", layout, "--model", str(tiny_dir), "--data",
                 str(tiny_prepared), "--out", str(out)]) == 0
    meta = read_metadata(out)
    sel = meta["selection"]
    assert meta["layout"] == layout and sel["criterion"] == layout
    assert sel["calibration"] == {"split": "train", "num_sequences": 6, "seq_len": 32, "seed": 3}
    # the same scores computed directly from the same calibration sample select the same layers
    calib = calibration_batch(PackedDataset(tiny_prepared, "train"), 6, 3)
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    direct = layer_scores(layout, dense, calib, 2, batch_size=3)
    key = {"angular": "angular", "block-influence": "block-influence", "ppl": "ppl_without"}[layout]
    assert sel[key] == pytest.approx(direct[key], rel=1e-5)
    assert meta["removed_layers"] == select_layers(layout, direct, 6, 2)
    assert 0 not in meta["removed_layers"] and 5 not in meta["removed_layers"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    # the kept layers are the dense model's, unchanged
    for new, old in enumerate(meta["kept_layers"]):
        torch.testing.assert_close(model.model.layers[new].mlp.down_proj.weight, dense.model.layers[old].mlp.down_proj.weight)


def test_data_driven_chop_needs_data_and_fixed_layouts_do_not(tmp_path, tiny_dir, capsys):
    pfile = _params(tmp_path, chop={"num_remove": 2})
    assert main(["chop", "--params", str(pfile), "--layout", "ppl", "--model", str(tiny_dir),
                 "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chop.layout='ppl'" in err[0] and "--data" in err[0]
    assert not (tmp_path / "c").exists()
    assert main(["chop", "--params", str(pfile), "--layout", "nonsense", "--model", str(tiny_dir),
                 "--out", str(tmp_path / "c")]) == 2
    assert "chop.layout='nonsense'" in capsys.readouterr().err
    assert main(["chop", "--params", str(pfile), "--layout", "middle", "--model", str(tiny_dir),
                 "--out", str(tmp_path / "c")]) == 0
    assert read_metadata(tmp_path / "c")["removed_layers"] == [2, 3]


# --------------------------------------------------------------------------------------------- Table 6
def _metrics(layers, ppl, acc, n=200):
    m = {"params": 1e6 * layers, "layers": layers, "tokens_trained": 0, "val/ppl": ppl, "test/ppl": ppl}
    for task in ("heldout_continuation", "heldout_lastword", "piqa"):
        for metric in ("acc", "acc_norm"):
            m[f"eval/{task}/{metric}"] = acc
            m[f"eval/{task}/{metric}_stderr"] = math.sqrt(acc * (1 - acc) / n)
        m[f"eval/{task}/n"] = n
    return m


LAYOUT_DATA = {  # layout: (removed, (ppl, acc) chopped, (ppl, acc) recovered)
    "input": ([1, 2], (900.0, 0.30), (60.0, 0.60)),
    "middle": ([2, 3], (500.0, 0.35), (55.0, 0.62)),
    "output": ([3, 4], (3000.0, 0.26), (80.0, 0.50)),
    "block-influence": ([2, 4], (400.0, 0.40), (58.0, 0.64)),
}


def _layout_evals(root):
    for name, (removed, before, after) in LAYOUT_DATA.items():
        for state, (ppl, acc) in (("chopped", before), ("recovered", after)):
            d = root / name / state
            d.mkdir(parents=True)
            m = _metrics(4, ppl, acc)
            m["tokens_trained"] = 1000 if state == "recovered" else 0
            (d / "metrics.json").write_text(json.dumps(m))
            model = {"removed_layers": removed, "num_layers_before": 6, "layout": name}
            if name == "block-influence":
                model["selection"] = {"criterion": name, "block": 2, "block-influence": [0.9, 0.5, 0.1, 0.4, 0.2, 0.8]}
            (d / "results.json").write_text(json.dumps({"results": {}, "model": model}))


def _table6(tmp_path, layouts, arm="input", **chop):
    pfile = _params(tmp_path, table6={"layouts": layouts}, chop={"num_remove": 2, **chop})
    ev = tmp_path / "eval"
    return main(["table6", "--params", str(pfile), "--eval", str(ev), "--main-chopped", str(ev / arm / "chopped"),
                 "--main-recovered", str(ev / arm / "recovered"), "--dense", str(tmp_path / "dense.json"),
                 "--tables", str(tmp_path / "t"), "--figures", str(tmp_path / "f")])


def test_table6_stage_answers_its_questions_from_the_numbers(tmp_path):
    from scipy.stats import spearmanr

    _layout_evals(tmp_path / "eval")
    (tmp_path / "dense.json").write_text(json.dumps(_metrics(6, 20.0, 0.7)))
    # chop.layout (input) is the main arm's row: read from its own evaluations, not a layout_* stage's
    assert _table6(tmp_path, [k for k in LAYOUT_DATA if k != "input"]) == 0
    md = (tmp_path / "t" / "layouts.md").read_text()
    # in-domain: the mean of two tasks (se / sqrt 2); general: PIQA alone
    assert "| middle | fixed | 2-3 | 500.00 | 55.00 | 35.0 ± 2.4 | 62.0 ± 2.4 | 35.0 ± 3.4 | 62.0 ± 3.4 |" in md
    assert "| input | fixed | 1-2 | 900.00 | 60.00 | 30.0 ± 2.3 | 60.0 ± 2.4 |" in md
    assert "The input row is the main table's LayerChop arm" in md
    assert "each layout drops 2 of 6 decoder layers" in md
    assert "| block-influence | data-driven | 2, 4 | 400.00 | 58.00 |" in md
    f = read_json(tmp_path / "t" / "layouts.json")["findings"]
    before = [v[1][0] for v in LAYOUT_DATA.values()]
    after = [v[2][0] for v in LAYOUT_DATA.values()]
    rho = spearmanr(before, after).statistic
    assert f["rank_correlation"]["val ppl"]["rho"] == pytest.approx(rho)
    assert f["rank_correlation"]["val ppl"]["layouts"] == 4
    assert f"Spearman rho {rho:+.2f}" in md
    # best after recovery: data-driven block-influence (58) vs the best fixed layout, middle (55)
    best = f["best"]["val ppl"]
    assert (best["fixed"]["layout"], best["fixed"]["value"]) == ("middle", 55.0)
    assert (best["data-driven"]["layout"], best["data-driven"]["value"]) == ("block-influence", 58.0)
    g = f["best"]["general acc"]
    assert (g["data-driven"]["layout"], g["data-driven"]["value"], g["fixed"]["layout"]) == ("block-influence", 0.64,
                                                                                                "middle")
    se = math.sqrt(0.64 * 0.36 / 200 + 0.62 * 0.38 / 200)  # PIQA alone: one task of n=200 in each
    assert g["difference"]["value"] == pytest.approx(0.02) and g["difference"]["se"] == pytest.approx(se)
    assert f"general acc: data-driven block-influence 64.0 vs fixed middle 62.0, difference +2.0 ± {100 * se:.1f} " \
           "(within two standard errors)" in md
    assert "recovers with the same 1,000 tokens" in md
    for ext in ("png", "pdf"):
        assert (tmp_path / "f" / f"fig5_layouts.{ext}").stat().st_size > 1000


def test_table6_names_a_layout_without_results(tmp_path):
    _layout_evals(tmp_path / "eval")
    (tmp_path / "dense.json").write_text(json.dumps(_metrics(6, 20.0, 0.7)))
    with pytest.raises(FileNotFoundError, match="table6.layouts: 'max-gap' has no"):
        from layerchop.report.layouts import load_layouts

        load_layouts(["middle", "max-gap"], tmp_path / "eval")
    assert _table6(tmp_path, ["middle", "max-gap"]) == 2
    assert not (tmp_path / "t").exists()


def test_table6_refuses_the_main_layout_twice_and_a_stale_main_arm(tmp_path, capsys):
    _layout_evals(tmp_path / "eval")
    (tmp_path / "dense.json").write_text(json.dumps(_metrics(6, 20.0, 0.7)))
    # listing chop.layout in table6.layouts would chop and recover it a second time
    assert _table6(tmp_path, ["input", "middle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "table6.layouts=['input', 'middle'] lists 'input', chop.layout" in err[0]
    # the main arm's evaluations are of another layout than chop.layout (stale after a params change)
    assert _table6(tmp_path, ["middle"], arm="input", layout="output") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluated a model with removed layers [1, 2]" in err[0] and "chop.layout='output'" in err[0]
    # explicit chop.indices: the row is called "indices" and must be those layers
    assert _table6(tmp_path, ["middle"], arm="input", indices=[1, 3]) == 2
    assert "not chop.indices=[1, 3]" in capsys.readouterr().err
    # a recovery of another chop than the evaluated one (a stale train stage)
    rec = tmp_path / "eval" / "input" / "recovered" / "results.json"
    good = rec.read_text()
    rec.write_text(json.dumps({"results": {}, "model": {"removed_layers": [3, 4]}}))
    assert _table6(tmp_path, ["middle"]) == 2
    assert "not the recovery of that chop" in capsys.readouterr().err
    rec.write_text(good)
    assert not (tmp_path / "t").exists()
    assert _table6(tmp_path, ["middle"], arm="input", indices=[1, 2]) == 0
    assert "| indices | fixed | 1-2 |" in (tmp_path / "t" / "layouts.md").read_text()


# ------------------------------------------------------------------------------------------- Figure 2
def test_scratch_init_is_random_seeded_and_not_the_pretrained_weights(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    outs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6), ("z", 0)):
        (tmp_path / name).mkdir()
        pfile = _params(tmp_path / name, figure2={"seed": seed})
        outs[name] = tmp_path / name / "init"
        assert main(["scratch", "--params", str(pfile), "--like", str(tiny_dir), "--out", str(outs[name])]) == 0
    like = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    a, b, c, z = (AutoModelForCausalLM.from_pretrained(outs[k]).state_dict() for k in "abcz")
    assert a.keys() == like.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[w], c[w])  # another seed, other weights
    assert not any(torch.equal(a[k], like[k]) for k in a if "norm" not in k)  # nothing pretrained
    # transformers' standard init of the architecture: normal(0, initializer_range) matrices, unit norms
    config = AutoModelForCausalLM.from_pretrained(outs["a"]).config
    assert a[w].std().item() == pytest.approx(config.initializer_range, rel=0.1)
    assert torch.equal(a["model.norm.weight"], torch.ones_like(a["model.norm.weight"]))
    # exactly what `LlamaForCausalLM(config)` after torch.manual_seed(0) gives: the tiny fixture was made that way
    from conftest import make_tiny_llama

    ref = make_tiny_llama(seed=0).state_dict()
    assert all(torch.equal(z[k], ref[k]) for k in ref)
    meta = read_metadata(outs["a"])
    assert meta["init_kind"] == "scratch" and meta["seed"] == 5 and "chopped_from" not in meta


def _curve(tokens_per_step, steps, ppls, accs, objective="lm"):
    points = [{"model": f"m{s}", "step": s, "tokens": s * tokens_per_step, "flops": s * 1e9, "device_s": s * 1.0,
               "metrics": _metrics(3, p, a)} for s, p, a in zip(steps, ppls, accs)]
    compute = {"steps": steps[-1], "tokens": steps[-1] * tokens_per_step, "flops": steps[-1] * 1e9,
               "device_s": steps[-1] * 1.0, "s_per_step": 1.0}
    return {"objective": objective, "points": points, "compute": compute}


def test_figure2_stage_compares_equal_budgets(tmp_path):
    (tmp_path / "lc.json").write_text(json.dumps(_curve(64, [4, 8], [80.0, 60.0], [0.5, 0.55])))
    (tmp_path / "sc.json").write_text(json.dumps(_curve(64, [4, 8], [4000.0, 900.0], [0.26, 0.3])))
    (tmp_path / "start.json").write_text(json.dumps(_metrics(3, 900.0, 0.3)))
    pfile = _params(tmp_path, figure2={"lr": 0.002})
    args = ["figure2", "--params", str(pfile), "--layerchop", str(tmp_path / "lc.json"), "--scratch",
            str(tmp_path / "sc.json"), "--start", str(tmp_path / "start.json"), "--tables", str(tmp_path / "t"),
            "--figures", str(tmp_path / "f")]
    assert main(args) == 0
    md = (tmp_path / "t" / "scratch.md").read_text()
    assert "| same architecture from scratch | 0.002 | 8 | 512 | 8.000e+09 | 900.00 | 900.00 |" in md
    assert "| LayerChop (chopped + continued pretraining) | 0 | 0 | 0.000e+00 | 900.00 |" in md  # the chopped start
    assert (tmp_path / "f" / "fig2_scratch_vs_layerchop.png").stat().st_size > 1000
    # unequal budgets are refused
    (tmp_path / "sc.json").write_text(json.dumps(_curve(64, [4, 9], [4000.0, 900.0], [0.26, 0.3])))
    shutil.rmtree(tmp_path / "t")
    assert main(args) == 2 and not (tmp_path / "t").exists()


# ----------------------------------------------------------------------------------------- Tables 4, 5
def test_tables45_are_read_from_the_configs_and_the_evaluation_record(tmp_path, tiny_dir, tiny_prepared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerchop.io import save_model_dir
    from layerchop.prune.chop import chop_layers

    chopped = tmp_path / "chopped"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    chop_layers(model, [2, 3])
    save_model_dir(model, AutoTokenizer.from_pretrained(tiny_dir), chopped,
                   metadata={"stage": "chop", "removed_layers": [2, 3], "num_layers_before": 6,
                             "chopped_from": str(tiny_dir)})
    trained = tmp_path / "layerchop"
    shutil.copytree(chopped, trained)
    plan = {"tokens_per_step": 256, "warmup_steps": 2, "total_steps": 10, "tokens": 2560}
    (trained / "layerchop.json").write_text(json.dumps({
        "stage": "train", "init": str(chopped), "objective": "lm", "plan": plan, "train": {"lr": 0.0007},
        "compute": {"flops": 1.5e12}}))
    # a real evaluation record: the tiny model through the evaluation stage
    pfile = _params(tmp_path, evaluate={"limit": 5, "ppl_max_sequences": 2, "tasks": ["heldout_lastword"],
                                        "optional_tasks": [], "local_tasks": {}, "autocast": None, "batch_size": 3})
    assert main(["evaluate", "--params", str(pfile), "--model", str(tiny_dir), "--data", str(tiny_prepared),
                 "--out", str(tmp_path / "eval")]) == 0
    assert main(["tables45", "--params", str(pfile), "--models", str(tiny_dir), str(chopped), str(trained),
                 "--results", str(tmp_path / "eval" / "results.json"), "--tables", str(tmp_path / "t")]) == 0
    t4 = (tmp_path / "t" / "models.md").read_text().splitlines()
    config = json.loads((tiny_dir / "config.json").read_text())
    w, f, h, kv = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"], \
        config["num_key_value_heads"]
    n6 = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    assert t4[2] == f"| Dense | {n6:,} | {w} | {f} | {h} ({kv}) | 6 | as released: tiny | – | – | – | – | – | – | – |"
    assert t4[3].startswith(f"| Chopped, no recovery | {sum(p.numel() for p in model.parameters()):,} | {w} |")
    assert "| 4 | no training: layers [2, 3] of 6 removed from dense |" in t4[3]
    assert t4[4].endswith("| 4 | from chopped | lm | 256 | 0.0007 | 2 | 10 | 2,560 | 1.5e+12 |")
    t5 = (tmp_path / "t" / "tasks.md").read_text()
    assert ("| heldout_lastword | in-domain | built by `prepare` from held-out documents of the recovery corpus | test | "
            "5 (12) | 0 | acc_norm | by the choice's length in characters (lm-eval acc_norm) | `{{context}}` | 1.0 | "
            "lm-eval 0.4.13 |") in t5
    assert "Precision: float32 throughout; batch 3; at most 5 items a task; seed 1234." in t5


TOY_CRITERION = '''"""A toy layer-selection criterion in one file: the layers of smallest weight norm."""
from layerchop.prune.chop import decoder_layers
from layerchop.prune.select import Criterion, lowest


class SmallestWeights(Criterion):
    name = "weight-norm"

    def scores(self, model, calib_NT, num_remove, *, batch_size, device):
        norms = [sum(float(p.float().pow(2).sum()) for p in layer.parameters()) ** 0.5
                 for layer in decoder_layers(model)]
        return {"criterion": self.name, "norms": norms}

    def select(self, scores, num_layers, num_remove):
        return lowest(scores["norms"], num_remove, list(range(1, num_layers - 1)))

    def plotted(self, scores):
        return "weight norm of layer i", scores["norms"]
'''


def test_a_new_criterion_in_one_file_is_a_layout_of_the_chop_stage(tmp_path, tiny_dir, tiny_prepared, monkeypatch):
    """Layer-selection criteria are a registry like the one-shot methods: a :class:`Criterion` in a file of
    ``src/layerchop/prune/criteria/`` (here a folder added to that package's path) is a ``chop.layout`` and a
    ``table6.layouts`` name; the chop stage removes what it selects and records its scores."""
    import sys

    from transformers import AutoModelForCausalLM

    import layerchop.prune.criteria as package
    from layerchop.config import data_driven_layouts, section
    from layerchop.prune.chop import decoder_layers

    before = data_driven_layouts()
    assert before[:3] == ("angular", "block-influence", "ppl") and "weight-norm" not in before
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "weight-norm.py").write_text(TOY_CRITERION)  # named as the criterion (read without importing it)
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(plugins)])
    try:
        assert data_driven_layouts() == (*before, "weight-norm")
        assert section("table6", {"table6": {"layouts": ["middle", "weight-norm"]}}).layouts == ["middle", "weight-norm"]
        pfile = _params(tmp_path, chop={"num_remove": 2, "num_calibration": 4, "calibration_seed": 0, "batch_size": 4})
        out = tmp_path / "chopped"
        assert main(["chop", "--params", str(pfile), "--layout", "weight-norm", "--model", str(tiny_dir), "--data",
                     str(tiny_prepared), "--out", str(out)]) == 0
        dense = AutoModelForCausalLM.from_pretrained(tiny_dir)
        norms = [sum(float(p.pow(2).sum()) for p in layer.parameters()) ** 0.5 for layer in decoder_layers(dense)]
        expected = sorted(sorted(range(1, 5), key=lambda i: (norms[i], i))[:2])
        meta = read_metadata(out)
        assert meta["removed_layers"] == expected and meta["layout"] == "weight-norm"
        assert meta["selection"]["norms"] == pytest.approx(norms, rel=1e-6)
    finally:
        monkeypatch.undo()
        sys.modules.pop("layerchop.prune.criteria.weight-norm", None)
    with pytest.raises(ValueError, match="chop.layout='weight-norm' is invalid: choose one of"):
        section("chop", {"chop": {"layout": "weight-norm"}})
    # a criterion in a file of another name is refused by the registry, naming the file
    (plugins / "weight-norm.py").rename(plugins / "norms.py")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(plugins)])
    try:
        from layerchop.prune.select import criteria

        with pytest.raises(ValueError, match=r"norms.py: layer-selection criterion 'weight-norm' must be in a file "
                                             r"of its own name, weight-norm.py"):
            criteria()
    finally:
        monkeypatch.undo()
        for m in ("norms", "weight-norm"):
            sys.modules.pop(f"layerchop.prune.criteria.{m}", None)
