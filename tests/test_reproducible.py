"""A stage's outputs are a function of its inputs: run twice, a stage writes the same bytes.

DVC hashes a directory output by the names and MD5s of its files, so byte-identical files give the same hash in
``dvc.lock``: "``dvc.lock`` unchanged after ``dvc repro``" then means "reproduced". Wall times, hosts, dates and
library versions go to the stages' metrics (records), never into a model directory or a cached result.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from layerchop.cli import main
from layerchop.evaluate.harness import read_items

REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, str]:
    """``relative path -> MD5`` of every file under ``root`` (what DVC's directory hash is built from)."""
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def differing(a: Path, b: Path) -> list[str]:
    ta, tb = tree(a), tree(b)
    return sorted(k for k in ta.keys() | tb.keys() if ta.get(k) != tb.get(k))


@pytest.fixture()
def params(tmp_path) -> Path:
    p = yaml.safe_load(open(REPO / "params.yaml"))
    p["chop"].update(layout="angular", num_remove=2, indices=None, num_calibration=4, batch_size=2)
    p["prune"].update(num_calibration=4, batch_size=2)
    p["train"].update(batch_size=4, lr=3e-3, warmup_steps=1, precision="32-true", accelerator="cpu", ckpt_every=2,
                      val_batches=1, token_budget=4 * 4 * 32, seed=0)
    from conftest import short_piqa_mirror  # a local mirror: converted into a temporary folder on every run

    p["evaluate"].update(ppl_max_sequences=2, limit=4, batch_size=2, tasks=["heldout_lastword", "piqa"],
                         optional_tasks=[], local_tasks={"piqa": str(short_piqa_mirror(tmp_path / "piqa"))},
                         autocast=None)
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(p))
    return f


def test_chop_prune_train_and_evaluate_write_the_same_bytes_twice(tmp_path, tiny_dir, tiny_prepared, params):
    P, data = ["--params", str(params)], ["--data", str(tiny_prepared)]
    out = tmp_path / "w"  # the same paths both times, as a re-run of a stage has them (they are in the records)
    for run in ("a", "b"):
        assert main(["chop", *P, "--model", str(tiny_dir), *data, "--out", str(out / "chopped")]) == 0
        assert main(["prune", *P, "--method", "wanda", "--pattern", "2of4", "--model", str(tiny_dir), *data,
                     "--out", str(out / "pruned")]) == 0
        assert main(["train", *P, "--init", str(out / "chopped"), *data, "--out", str(out / "trained"),
                     "--run-dir", str(out / "run"), "--metrics", str(out / "run.json"), "--snapshots", "1",
                     "--snapshot-dir", str(out / "snaps")]) == 0
        assert main(["evaluate", *P, "--model", str(out / "trained"), *data, "--out", str(out / "eval")]) == 0
        out.rename(tmp_path / run)  # the run directory goes too: the second run starts afresh
    a, b = tmp_path / "a", tmp_path / "b"
    for name in ("chopped", "pruned", "trained", "snaps"):
        assert tree(a / name), name
        assert differing(a / name, b / name) == [], name
    # an evaluation's cached result and its headline metrics too; its metrics.json is the record of the run
    assert differing(a / "eval", b / "eval") == ["metrics.json"]
    assert {r["task"] for r in read_items(a / "eval" / "items.csv")} == {"heldout_lastword", "piqa"}
    from layerchop.io import read_json

    ma, mb = read_json(a / "eval" / "metrics.json"), read_json(b / "eval" / "metrics.json")
    timed = {k for k in ma if k.endswith("_s")} | {"machine"}
    assert {k: v for k, v in ma.items() if k not in timed} == {k: v for k, v in mb.items() if k not in timed}
    assert ma["machine"]["cpu"] and "torch" in ma["machine"]["versions"]
    assert "date" not in read_json(a / "eval" / "results.json") and "date" in ma["machine"]["lm_eval"]
    # the training run's record holds what the model directory does not
    rec = read_json(a / "run.json")
    assert rec["device_s"] > 0 and rec["snapshots"]["step_000002"]["device_s"] > 0 and rec["machine"]["cpu"]


def test_a_wall_time_in_a_model_directory_would_be_caught(tmp_path, tiny_dir):
    """The comparison above sees a one-byte difference in any file (it is not vacuous)."""
    import shutil

    for run in ("a", "b"):
        shutil.copytree(tiny_dir, tmp_path / run)
    assert differing(tmp_path / "a", tmp_path / "b") == []
    meta = tmp_path / "b" / "config.json"
    meta.write_bytes(meta.read_bytes() + b" ")
    assert differing(tmp_path / "a", tmp_path / "b") == ["config.json"]


def test_a_code_change_that_leaves_the_weights_alone_leaves_the_model_bytes_alone(tmp_path, tiny_dir, tiny_prepared,
                                                                                  params, monkeypatch):
    """The run's fingerprint hashes the training code (a resumed run must not mix code versions), so it names the run
    directory; it stays out of the model directory, whose DVC hash is then the same after such a change, and its
    evaluations stay current. The run's record (``--metrics``) keeps it."""
    import layerchop.train.plan as plan_module

    P, data = ["--params", str(params)], ["--data", str(tiny_prepared)]
    out = tmp_path / "w"
    for run, code in (("a", "code-a"), ("b", "code-b")):
        monkeypatch.setattr(plan_module, "code_fingerprint", lambda code=code: code)
        assert main(["train", *P, "--init", str(tiny_dir), *data, "--out", str(out / "trained"),
                     "--run-dir", str(out / "run"), "--metrics", str(out / "run.json")]) == 0
        out.rename(tmp_path / run)
    from layerchop.io import read_json

    a, b = tmp_path / "a", tmp_path / "b"
    assert differing(a / "trained", b / "trained") == []
    fa, fb = read_json(a / "run.json")["fingerprint"], read_json(b / "run.json")["fingerprint"]
    assert fa != fb and (a / "run" / fa).is_dir() and (b / "run" / fb).is_dir()
    assert "fingerprint" not in read_json(a / "trained" / "layerchop.json")["plan"]


def test_the_shared_warm_start_writes_the_same_bytes_twice(tmp_path, tiny_dir, tiny_prepared, params):
    """``warm_start`` (``train --warm-only``) publishes a Lightning checkpoint that every warm-started arm forks
    from: its wall time goes to the stage's metrics, not into the checkpoint, so a re-run hashes the same and
    leaves the forked arms current; the arm forked from it then trains the same bytes."""
    p = yaml.safe_load(params.read_text())
    p["train"].update(warm_start_steps=1)
    params.write_text(yaml.safe_dump(p))
    P, data = ["--params", str(params)], ["--data", str(tiny_prepared)]
    out = tmp_path / "w"
    assert main(["chop", *P, "--model", str(tiny_dir), *data, "--out", str(tmp_path / "chopped")]) == 0
    for run in ("a", "b"):
        assert main(["train", *P, "--warm-start", "--warm-only", "--init", str(tmp_path / "chopped"), *data,
                     "--out", str(out / "warm"), "--run-dir", str(out / "warm-run"),
                     "--metrics", str(out / "warm.json")]) == 0
        assert main(["train", *P, "--warm-start", "--warm-from", str(out / "warm"), "--init",
                     str(tmp_path / "chopped"), *data, "--out", str(out / "trained"), "--run-dir", str(out / "run"),
                     "--metrics", str(out / "run.json")]) == 0
        out.rename(tmp_path / run)
    a, b = tmp_path / "a", tmp_path / "b"
    for name in ("warm", "trained"):
        assert tree(a / name), name
        assert differing(a / name, b / name) == [], name
    from layerchop.io import read_json

    warm, rec = read_json(a / "warm.json"), read_json(a / "run.json")
    assert warm["train_s"] > 0 and warm["machine"]["cpu"]  # the warm steps' time is in the stage's record
    # the forked arm did not time the warm steps: its record says so rather than count them as free
    assert rec["warm_start_train_s"] is None and rec["train_s"] > 0
