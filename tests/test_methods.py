"""Training methods as pieces (``layerchop.train.methods``): the stages call through the registry, and a new method
is one file (``tests/toy_method.py``) registered once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def test_no_stage_branches_on_a_methods_name():
    """``resolve``, ``train``, ``layerchop plan`` and the train stage ask the method object; no code compares an
    objective with a name (what made a new method touch five files)."""
    names = r"(lm|distill|dimchop)"
    pattern = re.compile(rf"objective\s*(==|!=|in\s*\()|(==|!=)\s*[\"']{names}[\"']|[\"']{names}[\"']\s*(==|!=)")
    hits = [f"{p.relative_to(REPO)}:{i}" for p in (REPO / "src" / "layerchop").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_the_built_in_methods_and_an_unknown_name(tmp_path, tiny_dir, tiny_prepared):
    from test_cli import _run

    from layerchop.train.methods import METHODS

    assert list(METHODS) == ["lm", "distill", "dimchop"]
    proc = _run(tmp_path, {}, "train", "--objective", "prune-harder", "--init", str(tiny_dir), "--data",
                str(tiny_prepared), "--out", str(tmp_path / "o"), "--run-dir", str(tmp_path / "r"))
    assert proc.returncode == 2 and "--objective 'prune-harder': choose one of ['lm', 'distill', 'dimchop']" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_new_method_in_one_file_trains_through_the_stage(tmp_path, tiny_dir, tiny_prepared, chopped_dir,
                                                           monkeypatch):
    """The worked example: ``tests/toy_method.py`` (continued pretraining with frozen embeddings), registered,
    runs through ``layerchop train --objective frozen-embeddings``: its module trains (the layers move, the
    embedding does not), its card and metadata are in the export, its identity in the fingerprint, and what it
    does not support (a warm start) is refused before any work."""
    import json

    from test_cli import _run
    from toy_method import FrozenEmbeddings

    from layerchop.train import methods

    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))  # registered for this test only
    methods.register(FrozenEmbeddings())
    with pytest.raises(ValueError, match="'frozen-embeddings' is already a training method"):
        methods.register(FrozenEmbeddings())
    train = {"train.precision": "32-true", "train.batch_size": 4, "train.token_budget": 2 * 4 * 32,
             "train.warmup_steps": 1, "train.val_batches": 1, "train.ckpt_every": 0}
    argv = ["train", "--objective", "frozen-embeddings", "--data", str(tiny_prepared), "--run-dir", str(tmp_path / "r")]
    plan = _run(tmp_path, train, *argv, "--init", str(tiny_dir), "--out", str(tmp_path / "o"), "--plan")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout[plan.stdout.index("{"):plan.stdout.rindex("}") + 1])["objective"] == "frozen-embeddings"
    proc = _run(tmp_path, train, *argv, "--init", str(tiny_dir), "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    before, after = load_file(tiny_dir / "model.safetensors"), load_file(tmp_path / "o" / "model.safetensors")
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    meta = json.loads((tmp_path / "o" / "layerchop.json").read_text())
    assert meta["objective"] == "frozen-embeddings" and meta["frozen"] == ["embeddings"]
    assert "token embeddings frozen" in (tmp_path / "o" / "README.md").read_text()
    warm = _run(tmp_path, {**train, "train.warm_start_steps": 1}, *argv, "--warm-start", "--init", str(chopped_dir),
                "--out", str(tmp_path / "w"))
    assert warm.returncode == 2 and "is not supported with --objective frozen-embeddings" in warm.stderr
    assert not (tmp_path / "w").exists()
