"""One-shot methods as pieces (``layerchop.prune.solvers``): the built-ins and a new method added in one file
(``tests/toy_oneshot.py``) plus one params line, run through prune -> evaluate -> Figure 1's table and Table 2, and
the pipeline's lists come from params."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TOY = "layerchop.prune.oneshot.act-l1"


@pytest.fixture
def toy_in_the_package(tmp_path, monkeypatch):
    """``tests/toy_oneshot.py`` as if copied into ``src/layerchop/prune/oneshot/`` (a folder added to the package's
    path, so the source tree is not touched)."""
    import layerchop.prune.oneshot as package

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    shutil.copy(REPO / "tests" / "toy_oneshot.py", plugins / "act-l1.py")  # named as the method
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(plugins)])
    yield
    sys.modules.pop(TOY, None)


def test_the_built_in_methods_and_the_registry():
    from layerchop.prune.registry import BUILT_IN, registry
    from layerchop.prune.solvers import solver

    found = registry()
    assert {n: (found[n].label, found[n].settings) for n in BUILT_IN} == {
        "magnitude": ("Magnitude", ()), "wanda": ("Wanda", ()), "sparsegpt": ("SparseGPT", ("blocksize", "percdamp"))}
    assert all(c.__module__ == f"layerchop.prune.oneshot.{n}" for n, c in found.items())  # a file each, its name
    with pytest.raises(ValueError, match=r"--method 'no-such' is not a one-shot method: choose one of "
                                         r"\[.*'magnitude', 'sparsegpt', 'wanda'.*\]"):
        solver("no-such")


def test_a_stage_that_runs_one_method_imports_no_other_and_params_checks_import_none():
    """``solver(name)`` imports that method's file alone, and the params check of ``prune.methods`` reads the file
    names: so ``prune@wanda-*`` runs (and in dvc.yaml depends on) no other method's code, and no stage's params check
    runs any (in a fresh interpreter: this one has imported them all)."""
    import subprocess

    code = ("import sys\nfrom layerchop.config import load_params, section\n"
            "section('prune', load_params('params.yaml'))\n"
            "print(sorted(m for m in sys.modules if m.startswith('layerchop.prune.oneshot.')))\n"
            "from layerchop.prune.solvers import solver\nsolver('wanda')\n"
            "print(sorted(m for m in sys.modules if m.startswith('layerchop.prune.oneshot.')))\n"
            "from layerchop.config import data_driven_layouts\nprint(data_driven_layouts())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "['layerchop.prune.oneshot.wanda']", "('angular', 'block-influence', 'ppl')"]


def test_the_built_in_criteria_are_the_ones_params_checks_know():
    from layerchop.plugins import BUILT_IN_CRITERIA
    from layerchop.prune.select import CRITERIA, criteria

    assert tuple(CRITERIA) == BUILT_IN_CRITERIA and tuple(criteria()) == BUILT_IN_CRITERIA


def test_a_method_file_without_its_method_is_refused_naming_the_file(tmp_path, monkeypatch):
    import layerchop.prune.oneshot as package
    from layerchop.prune.solvers import solver

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "empty.py").write_text("X = 1\n")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(plugins)])
    try:
        with pytest.raises(ValueError, match=r"empty.py: defines no one-shot method named 'empty'"):
            solver("empty")
    finally:
        sys.modules.pop("layerchop.prune.oneshot.empty", None)


def test_a_bad_method_file_or_a_name_taken_twice_is_refused(tmp_path, monkeypatch):
    import layerchop.prune.oneshot as package
    from layerchop.prune.registry import registry

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(plugins)])
    cases = {  # file -> (its text, the error)
        "twice": ("from layerchop.prune.oneshot.wanda import Wanda\n\nclass Mine(Wanda):\n    label = 'Mine'\n",
                  r"twice.py: one-shot method name 'wanda' is already taken by layerchop.prune.oneshot.wanda.Wanda"),
        "mine": ("from layerchop.prune.oneshot.wanda import Wanda\n\nclass Mine(Wanda):\n    name = 'other'\n",
                 r"layerchop.prune.oneshot.mine: one-shot method 'other' must be in a file of its own name, other.py"),
        "unknown_key": ("from layerchop.prune.oneshot.wanda import Wanda\n\nclass K(Wanda):\n"
                        "    name, settings = 'unknown_key', ('alpha',)\n",
                        r"one-shot method 'unknown_key' reads \['alpha'\], not keys of the prune section"),
    }
    for stem, (text, error) in cases.items():
        (plugins / f"{stem}.py").write_text(text)
        try:
            with pytest.raises(ValueError, match=error):
                registry()
        finally:
            (plugins / f"{stem}.py").unlink()
            sys.modules.pop(f"layerchop.prune.oneshot.{stem}", None)


def test_unknown_methods_and_patterns_are_refused_naming_the_key(tmp_path, tiny_dir, tiny_prepared):
    from test_cli import _run

    proc = _run(tmp_path, {}, "prune", "--method", "act-l1", "--pattern", "2of4", "--model", str(tiny_dir),
                "--data", str(tiny_prepared), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--method 'act-l1' is not a one-shot method" in proc.stderr
    assert not (tmp_path / "o").exists()
    proc = _run(tmp_path, {"prune.methods": ["wanda", "act-l1"]}, "figure1", "--eval", str(tmp_path / "e"),
                "--tables", str(tmp_path / "t"), "--figures", str(tmp_path / "f"))
    assert proc.returncode == 2 and "prune.methods=['wanda', 'act-l1'] is invalid: 'act-l1' is not a one-shot " \
                                    "method" in proc.stderr
    proc = _run(tmp_path, {"prune.patterns": ["2:4"]}, "figure1", "--eval", str(tmp_path / "e"),
                "--tables", str(tmp_path / "t"), "--figures", str(tmp_path / "f"))
    assert proc.returncode == 2 and "prune.patterns=['2:4'] is invalid: '2:4': write NofM" in proc.stderr
    assert not (tmp_path / "t").exists()


def test_the_pipeline_runs_over_the_params_lists(tmp_path):
    """dvc.yaml's one-shot stages come from ``prune.methods`` × ``prune.patterns``: one more name gives its prune
    and evaluation stages, which Figure 1 and Table 2 depend on (through ``data/eval/oneshot``); no stage depends on
    the lists as a whole, so the existing runs stay as they are."""
    import networkx
    from dvc.repo import Repo

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load(open(REPO / "params.yaml"))
    params["prune"]["methods"].append("act-l1")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)) as repo:
        stages = {s.name: s for s in repo.index.stages}
        graph = repo.index.graph
        for name in ("prune@act-l1-2of4", "prune@act-l1-4of8", "oneshot_evaluate@act-l1-2of4",
                     "oneshot_evaluate@act-l1-4of8", "prune@wanda-2of4", "oneshot_evaluate@sparsegpt-4of8"):
            assert name in stages, sorted(stages)
        # figure1 and table2 come after the new evaluation (a dependency edge in DVC's graph)
        ev = stages["oneshot_evaluate@act-l1-2of4"]
        for report in ("figure1", "table2"):
            assert ev in networkx.descendants(graph, stages[report]), report
        for name, method in (("prune@wanda-2of4", "wanda"), ("prune@act-l1-4of8", "act-l1")):
            deps = {str(d.def_path) for d in stages[name].deps}  # its own method's file, no other
            assert f"src/layerchop/prune/oneshot/{method}.py" in deps, deps
            assert not any(d.startswith("src/layerchop/prune/oneshot") and not d.endswith(f"/{method}.py")
                           for d in deps), deps
        for name, stage in stages.items():
            if name.startswith(("prune@", "oneshot_evaluate@")):
                keys = {k for p in stage.params for k in p.params}
                assert not {"prune", "prune.methods", "prune.patterns"} & keys, (name, keys)


def test_a_new_method_in_one_file_runs_through_prune_evaluate_and_figure1(tmp_path, tiny_dir, tiny_prepared,
                                                                          toy_in_the_package, capsys):
    """The worked example: ``tests/toy_oneshot.py`` in the methods' folder and ``act-l1`` in ``prune.methods``;
    the stages as dvc.yaml runs them (in this process): its pruned model is exactly 2:4, its evaluation lands in
    Figure 1's table and Table 2 beside Wanda's, with the numbers of its own metrics."""
    from layerchop.cli import main
    from layerchop.io import load_model, read_json, read_metadata
    from layerchop.prune.masks import load_masks
    from layerchop.prune.registry import registry
    from toy_oneshot import ActivationL1

    assert registry()["act-l1"].label == ActivationL1.label
    params = yaml.safe_load(open(REPO / "params.yaml"))
    params["prune"].update(methods=["wanda", "act-l1"], patterns=["2of4"], num_calibration=8, batch_size=4)
    params["evaluate"].update(limit=24, ppl_max_sequences=2, optional_tasks=["piqa"],
                              local_tasks={"piqa": str(tmp_path / "absent")})
    params["report"]["oneshot_rows"] = {"dense": "Dense"}
    params["table2"]["rows"] = {"oneshot/wanda-2of4": "Wanda 2:4 (own label)"}
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    models, ev = tmp_path / "models", tmp_path / "eval"
    common = ["--params", str(pfile)]
    for method in ("wanda", "act-l1"):
        assert main(["prune", *common, "--method", method, "--pattern", "2of4", "--model", str(tiny_dir),
                     "--data", str(tiny_prepared), "--out", str(models / f"{method}-2of4")]) == 0
    meta = read_metadata(models / "act-l1-2of4")
    assert meta["method"] == "act-l1" and meta["pattern"] == "2:4" and meta["solver"] == {}
    assert meta["sparsity"]["overall_pruned_fraction"] == 0.5
    masks = load_masks(models / "act-l1-2of4")
    model = load_model(models / "act-l1-2of4")
    weights = dict(model.named_parameters())
    for name, mask in masks.items():  # 2 of every 4 consecutive inputs of each row, and the weights zero there
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all(), name
        assert (weights[name][mask] == 0).all() and (weights[name][~mask] != 0).all(), name
    wanda = load_masks(models / "wanda-2of4")
    assert any(not torch.equal(m, wanda[n]) for n, m in masks.items())  # its own score, not Wanda's
    for out, model_dir in (("dense", tiny_dir), ("oneshot/wanda-2of4", models / "wanda-2of4"),
                           ("oneshot/act-l1-2of4", models / "act-l1-2of4")):
        assert main(["evaluate", *common, "--model", str(model_dir), "--data", str(tiny_prepared),
                     "--out", str(ev / out)]) == 0
    assert main(["figure1", *common, "--eval", str(ev), "--tables", str(tmp_path / "t"),
                 "--figures", str(tmp_path / "f")]) == 0
    md = (tmp_path / "t" / "oneshot.md").read_text()
    labels = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")][1:]
    assert labels == ["Dense", "Wanda 2:4", "Activation-L1 2:4"]
    m = read_json(ev / "oneshot" / "act-l1-2of4" / "metrics.json")
    row = next(line for line in md.splitlines() if line.startswith("| Activation-L1 2:4 |"))
    assert f"| {m['val/ppl']:.2f} | {m['test/ppl']:.2f} |" in row
    assert f"| {m['nonzero_params'] / 1e6:.1f} |" in row
    assert (tmp_path / "f" / "fig1_oneshot_vs_layerchop.png").stat().st_size > 1000
    assert main(["table2", *common, "--eval", str(ev), "--dense-config", str(tiny_dir / "config.json"),
                 "--tables", str(tmp_path / "t")]) == 0
    t2 = (tmp_path / "t" / "table2_relative_drop.md").read_text()
    assert "| Wanda 2:4 (own label) |" in t2 and "| Activation-L1 2:4 |" in t2 and "| Wanda 2:4 |" not in t2


def test_a_trained_arm_added_with_dvc_exp_run_set_param_gets_its_own_stages(tmp_path):
    """The trained arms and the evaluated models are params lists too (``arms``): the overrides ``dvc exp run -S``
    applies (DVC's own Hydra parser) add ``train@<arm>`` and ``evaluate@<arm>``, the params still pass their checks,
    and the existing train stages do not depend on the ``arms`` section."""
    from dvc.repo import Repo
    from dvc.utils.hydra import apply_overrides

    from layerchop.config import load_params, section

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    evaluated = section("arms", load_params(REPO / "params.yaml")).evaluated
    apply_overrides(tmp_path / "params.yaml", [
        "+arms.trained.chopped_cpt={init: data/models/chopped, flags: --objective lm, warm: data/models/dense}",
        f"arms.evaluated=[{','.join(evaluated + ['chopped_cpt'])}]"])
    assert "time: 72:00:00\n" in (tmp_path / "params.yaml").read_text()  # DVC drops the quotes: YAML 1.1 would
    assert section("slurm", load_params(tmp_path / "params.yaml")).time == "72:00:00"  # read 259200 seconds
    arms = section("arms", load_params(tmp_path / "params.yaml"))
    assert arms.trained["chopped_cpt"].init == "data/models/chopped" and arms.evaluated[-1] == "chopped_cpt"
    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)) as repo:
        stages = {s.name: s for s in repo.index.stages}
        assert "--objective lm --init data/models/chopped" in stages["train@chopped_cpt"].cmd
        assert "data/models/chopped_cpt" in {str(o.def_path) for o in stages["train@chopped_cpt"].outs}
        assert "--model data/models/chopped_cpt" in stages["evaluate@chopped_cpt"].cmd
        assert "--warm-start --warm-from data/warm --init data/models/chopped" in stages["train@layerchop"].cmd
        for name, stage in stages.items():
            keys = {k for p in stage.params for k in p.params}
            # (arms.seeds, which the reports read, names replicas: adding an arm does not change it)
            assert not any(k == "arms" or k.startswith("arms.") and k != "arms.seeds" for k in keys), (name, keys)
    bad = yaml.safe_load(open(tmp_path / "params.yaml"))
    bad["arms"]["trained"]["chopped_cpt"]["flags"] = "--warm-start --warm-from data/warm"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"arms.trained.<arm>.warm='data/models/dense' is invalid"):
        load_params(tmp_path / "bad.yaml")


def test_a_table_row_without_its_evaluation_stage_is_refused(tmp_path):
    """A row of the main table or Figure 1 must be a model the pipeline evaluates: one added to ``report.rows``
    without ``arms.evaluated`` (or to ``report.oneshot_rows`` outside the one-shot runs) is refused when the params
    are read, not hours later when the table is built."""
    from layerchop.config import load_params

    def load(edit):
        params = yaml.safe_load(open(REPO / "params.yaml"))
        edit(params)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        return load_params(tmp_path / "params.yaml")

    with pytest.raises(ValueError, match=r"report.rows=.* is invalid: \['chopped_cpt'\] is not evaluated by the "
                                         r"pipeline: add it to arms.evaluated \(evaluate@<name>\)$"):
        load(lambda p: p["report"]["rows"].update(chopped_cpt="New row"))
    load(lambda p: (p["report"]["rows"].update(chopped_cpt="New row"), p["arms"]["evaluated"].append("chopped_cpt")))
    with pytest.raises(ValueError, match=r"\['oneshot/act-l1-2of4'\] is not evaluated by the pipeline: .* or "
                                         r"prune.methods x prune.patterns"):
        load(lambda p: p["report"]["oneshot_rows"].update({"oneshot/act-l1-2of4": "New row"}))
    load(lambda p: p["report"]["oneshot_rows"].update({"oneshot/wanda-2of4": "Wanda 2:4 (own label)"}))
