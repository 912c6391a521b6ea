"""Stage entry points: bad input exits non-zero with a message naming the key, and writes nothing."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path, overrides: dict, *argv):
    params = yaml.safe_load(open(REPO / "params.yaml"))
    for dotted, value in overrides.items():
        node = params
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = [*argv[:1], "--params", str(tmp_path / "params.yaml"), *argv[1:]]
    # in this process (a new interpreter costs ~5 s of imports per call); the entry point itself runs as a
    # subprocess in the FSDP2, rehearsal and SLURM tests
    from layerchop.cli import main

    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse's own refusals
                rc = e.code
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(["layerchop", *argv], rc, out.getvalue(), err.getvalue())


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"chop.indices": [0, 2]}, "chop.indices=[0, 2] removes the first (0) or last (5) layer"),
        ({"chop.indices": [2, 2]}, "chop.indices=[2, 2]: duplicate indices [2]"),
        ({"chop.indices": [1, 2, 3, 4, 5, 0]}, "removes every one of the 6 layers"),
        ({"chop.layout": "middle", "chop.num_remove": 7}, "chop.num_remove=7 removes every one of the 6 layers"),
    ],
)
def test_chop_rejects_bad_specs_before_writing(tmp_path, tiny_dir, overrides, message):
    proc = _run(tmp_path, overrides, "chop", "--model", str(tiny_dir), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()


def test_chop_cli_prints_removed_indices(tmp_path, tiny_dir):
    proc = _run(tmp_path, {"chop.layout": "max-gap", "chop.num_remove": 2}, "chop", "--model", str(tiny_dir),
                "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "[chop] removed layers [2, 4] of 6 (layout max-gap); kept [0, 1, 3, 5]" in proc.stdout


def test_unknown_source_and_bad_budget_exit_nonzero(tmp_path):
    proc = _run(tmp_path, {"download.model.source": "llama-9000"}, "download", "model", "--out", str(tmp_path / "m"))
    assert proc.returncode == 2 and "download.model.source='llama-9000'" in proc.stderr
    proc = _run(tmp_path, {"download.corpus.source": "hub", "download.corpus.hub_path": "allenai/c4",
                           "download.corpus.token_budget": 0}, "download", "corpus", "--out", str(tmp_path / "c"))
    assert proc.returncode == 2 and "download.corpus.token_budget=0" in proc.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


def test_prepare_seq_len_above_context_exits_nonzero(tmp_path, tiny_dir, tiny_corpus):
    proc = _run(tmp_path, {"prepare.seq_len": 100000}, "prepare", "--corpus", str(tiny_corpus), "--model",
                str(tiny_dir), "--out", str(tmp_path / "p"))
    assert proc.returncode == 2 and "prepare.seq_len=100000" in proc.stderr
    assert not (tmp_path / "p").exists()


def test_prune_stage_writes_masks_and_metadata(tmp_path, tiny_dir, tiny_prepared):
    from layerchop.io import read_metadata
    from layerchop.prune.masks import load_masks

    proc = _run(tmp_path, {"prune.num_calibration": 4}, "prune", "--method", "sparsegpt", "--pattern", "2of4",
                "--model", str(tiny_dir), "--data", str(tiny_prepared), "--out", str(tmp_path / "p"))
    assert proc.returncode == 0, proc.stderr
    meta = read_metadata(tmp_path / "p")
    assert meta["method"] == "sparsegpt" and meta["pattern"] == "2:4"
    assert meta["calibration"] == {"split": "train", "num_sequences": 4, "seq_len": 32, "seed": 0}
    assert meta["sparsity"]["overall_pruned_fraction"] == 0.5
    assert len(load_masks(tmp_path / "p")) == len(meta["pruned_modules"]) == 6 * 7
    bad = _run(tmp_path, {}, "prune", "--method", "wanda", "--pattern", "3of2", "--model", str(tiny_dir),
               "--data", str(tiny_prepared), "--out", str(tmp_path / "q"))
    assert bad.returncode == 2 and "prune pattern '3of2'" in bad.stderr and not (tmp_path / "q").exists()


def _train(tmp_path, overrides: dict, init: Path, data: Path, *extra: str):
    return _run(tmp_path, {"train.precision": "32-true", "train.batch_size": 4, **overrides}, "train",
                "--init", str(init), "--data", str(data), "--out", str(tmp_path / "out"),
                "--run-dir", str(tmp_path / "run"), *extra)


def test_train_plan_prints_the_resolved_run_and_writes_nothing(tmp_path, tiny_dir, tiny_prepared):
    import json

    proc = _train(tmp_path, {"train.token_budget": 10 * 4 * 32, "train.warmup_steps": 2, "train.warm_start_steps": 0},
                  tiny_dir, tiny_prepared,
                  "--plan")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])
    assert (plan["total_steps"], plan["warm_steps"], plan["tokens_per_step"], plan["world"]) == (10, 0, 128, 1)
    assert plan["flops"] == 10 * plan["flops_per_step"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()
    assert "warning" not in proc.stderr


def test_a_warm_start_setting_the_stage_ignores_is_reported_once(tmp_path, tiny_dir, chopped_dir, tiny_prepared):
    """``train.warm_start_steps`` set for a stage without ``--warm-start``: one warning naming the key and, from
    ``dvc.yaml``, the stages that use it; the run goes on."""
    import shutil

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    proc = _train(tmp_path, {"train.token_budget": 10 * 4 * 32, "train.warmup_steps": 4, "train.warm_start_steps": 2},
                  tiny_dir, tiny_prepared, "--plan")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    # the stages of dvc.yaml passing --warm-start, an arm's flags (arms.trained in params.yaml) resolved
    assert warnings == ["layerchop train: warning: train.warm_start_steps=2 is ignored by this run (no --warm-start); "
                        "only stages that pass --warm-start use it (dvc.yaml: warm_start, train@layerchop, "
                        "train@layerchop-seed1, train@layerchop-seed2, lr_sweep@layerchop-lr3e-3, "
                        "lr_sweep@layerchop-lr3e-4, long_train@layerchop, fig4_train@layerchop, layout_train@*)"]
    # a process that Lightning's launcher started beside the first says nothing
    from layerchop.stages.train import first_process

    os.environ["LOCAL_RANK"] = "1"
    try:
        assert not first_process()
    finally:
        del os.environ["LOCAL_RANK"]
    assert first_process()
    proc = _train(tmp_path, {"train.token_budget": 10 * 4 * 32, "train.warmup_steps": 4, "train.warm_start_steps": 2},
                  chopped_dir, tiny_prepared, "--plan", "--warm-start")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"train.token_budget": 4 * 4 * 32, "train.warmup_steps": 4},
         "train.warmup_steps=4 does not fit this run: its budget (train.token_budget=512) buys 4 optimizer steps"),
        ({"train.token_budget": 10 ** 6},  # far more than the tiny train split: never a silent second epoch
         "but the train split holds"),
    ],
)
def test_train_budgets_that_cannot_work_exit_2_before_writing(tmp_path, tiny_dir, tiny_prepared, overrides, message):
    proc = _train(tmp_path, overrides, tiny_dir, tiny_prepared)
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert message in line and line.startswith("layerchop train: error:")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_a_command_imports_only_its_own_stage():
    """``layerchop --help`` and a stage's parser import no torch (a fresh interpreter): every stage process, torchrun
    worker and SLURM task builds the command line first, and building all 22 stages' once cost seconds of imports
    (torch, transformers, torchmetrics, matplotlib) per process, for nothing."""
    import sys

    probe = ("import sys\nfrom layerchop.cli import build_parser, main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'lightning', 'matplotlib') if m in sys.modules))")
    for argv in (["--help"], ["train", "--help"], ["plan", "--help"]):
        proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == "[]", (argv, proc.stdout[-300:])


def test_help_lists_every_command_in_its_group_as_plain_text():
    """``layerchop --help``: every command under its group (pipeline stages, reports, tools) with its summary,
    though no stage was imported; no reStructuredText markup is shown literally; ``--version`` gives the
    installed version."""
    import sys
    from importlib.metadata import version

    from layerchop.cli import GROUPS, STAGES

    env = {**os.environ, "COLUMNS": "200"}  # one line per command
    proc = subprocess.run([sys.executable, "-m", "layerchop.cli", "--help"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "``" not in text and "::" not in text and ":func:" not in text
    assert sorted(STAGES) == sorted(set(STAGES)) and len(STAGES) == 26
    groups = text.split("pipeline stages (dvc.yaml runs them):")[1]
    for group, names in GROUPS.items():
        block = groups.split(f"{group}:")[1] if group in groups else groups
        listed = [line.split()[0] for line in block.strip().split("\n\n")[0].splitlines()]
        assert listed == list(names), (group, listed)
    assert re.search(r"^  chop +LayerChop, remove whole decoder layers", text, re.M)
    assert re.search(r"^  plan +a dry run of the whole pipeline", text, re.M)  # no "`layerchop plan`:" prefix
    proc = subprocess.run([sys.executable, "-m", "layerchop.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == f"layerchop {version('layerchop')}"


def test_a_stages_help_keeps_its_examples_lines():
    """A stage's ``--help`` shows its example commands line by line (a continued command keeps its ``\\``) and
    its text without markup."""
    from layerchop.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser(stages=("chop",)).parse_args(["chop", "--help"])
    lines = out.getvalue().splitlines()
    assert "Example:" in lines
    assert ("    layerchop chop --layout block-influence --model data/models/dense --data data/prepared \\"
            in lines)
    assert "        --out data/models/layouts/block-influence/chopped" in lines
    assert "``" not in out.getvalue()


def test_outside_the_repository_every_key_has_its_default(tmp_path, monkeypatch, capsys):
    """With no params.yaml in the working directory and no ``--params``, a stage that needs no repository file
    runs on every key's default (chop: the 15 input-side layers of a 20-layer model); a ``--params`` file that
    does not exist is refused naming the option; a bad value names the file it came from."""
    from conftest import make_tiny_llama, make_tokenizer
    from transformers import AutoModelForCausalLM

    from layerchop.cli import main
    from layerchop.io import save_model_dir

    save_model_dir(make_tiny_llama(num_layers=20), make_tokenizer(tmp_path / "tok"), tmp_path / "deep",
                   metadata={"stage": "test"})
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["chop", "--model", str(tmp_path / "deep"), "--out", "out"]) == 0
    assert AutoModelForCausalLM.from_pretrained(work / "out").config.num_hidden_layers == 5
    assert f"layerchop: no params.yaml in {work}: every key at its default" in capsys.readouterr().err
    assert main(["chop", "--params", "mine.yaml", "--model", str(tmp_path / "deep"), "--out", "out2"]) == 2
    assert capsys.readouterr().err.strip() == "layerchop chop: error: --params mine.yaml: not found"
    (work / "mine.yaml").write_text("chop:\n  num_remove: 0\n")
    assert main(["chop", "--params", "mine.yaml", "--model", str(tmp_path / "deep"), "--out", "out2"]) == 2
    assert capsys.readouterr().err.strip() == ("layerchop chop: error: mine.yaml: chop.num_remove=0 is invalid: "
                                               "must be >= 1 (removing nothing is the dense model)")
    assert sorted(p.name for p in work.iterdir()) == ["mine.yaml", "out"]


def test_a_stage_process_exits_without_a_final_collection(monkeypatch, tmp_path):
    """``main()`` as a process's entry point (no ``argv``) freezes the collector after the stage (the final
    collections over torch's and transformers' objects cost ~1.3 s of each process's exit); called with an
    ``argv``, as these tests do in-process, it leaves the collector alone."""
    import gc
    import sys

    from layerchop import cli

    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    argv = ["chop", "--params", str(REPO / "params.yaml"), "--model", str(tmp_path / "missing"), "--out",
            str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", ["layerchop", *argv])
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert cli.main() == 2  # whatever the stage's status
    assert frozen == [True] and "missing" in err.getvalue()
    with contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(argv) == 2
    assert frozen == [True]
