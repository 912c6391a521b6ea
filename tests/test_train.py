"""Continued pretraining: schedule, golden losses, resume equivalence, FSDP2 on 2 CPU processes."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from layerchop.config import TrainConfig
from layerchop.train.module import lr_lambda, param_groups
from layerchop.train.run import run

GOLDEN = Path(__file__).parent / "golden" / "train_losses.json"


def tiny_train_cfg(**kw) -> TrainConfig:
    base = dict(token_budget=5 * 4 * 32, batch_size=4, accumulate=1, lr=3e-3, warmup_steps=2, precision="32-true",
                accelerator="cpu", ckpt_every=0, val_batches=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def losses(csv_path: Path) -> list[float]:
    with open(csv_path) as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_lr_schedule_warmup_then_cosine_to_floor():
    lrs = [lr_lambda(s, warmup_steps=10, max_steps=110, min_ratio=0.1) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)
    assert lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_no_weight_decay_on_norms_and_biases():
    """On a Llama with attention and MLP biases (a bias-free model could not catch decayed biases), and with
    a named exclusion (the distillation projections)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, attention_bias=True,
                                         mlp_bias=True, tie_word_embeddings=False))
    named = list(model.named_parameters())
    decay, no_decay = param_groups(named, 0.1, no_decay_prefixes=("lm_head.",))
    names = {id(p): n for n, p in named}
    got_no_decay = {names[id(p)] for p in no_decay["params"]}
    biases = {n for n, _ in named if n.endswith(".bias")}
    norms = {n for n, _ in named if "norm" in n}
    assert len(biases) == 2 * 7 and norms  # q, k, v, o, gate, up, down of both layers
    assert got_no_decay == biases | norms | {"lm_head.weight"}
    assert {names[id(p)] for p in decay["params"]} == {n for n, _ in named} - got_no_decay
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_seeded_run_reproduces_golden_losses(tmp_path, tiny_dir, tiny_prepared):
    meta = run(tiny_dir, tiny_prepared, tmp_path / "out", tiny_train_cfg(), run_dir=tmp_path / "run",
                 log_csv=tmp_path / "log.csv")
    got = losses(tmp_path / "log.csv")
    assert len(got) == 5 and meta["steps"] == 5 and meta["tokens_this_stage"] == 640
    if os.environ.get("LAYERCHOP_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"losses": got}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert got == pytest.approx(golden, rel=1e-4, abs=1e-4)
    assert got[-1] < got[0]


def test_resume_from_mid_run_checkpoint_matches_uninterrupted(tmp_path, tiny_dir, tiny_prepared):
    cfg = tiny_train_cfg(token_budget=6 * 4 * 32, ckpt_every=3)
    run(tiny_dir, tiny_prepared, tmp_path / "a", cfg, run_dir=tmp_path / "run_a", resume="never")
    # interrupted run: stops at step 3 (checkpoint written, nothing exported), then resumes
    run(tiny_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run_b", stop_after=3)
    [ckpt_path] = (tmp_path / "run_b").glob("*/checkpoints/step*.ckpt")  # <run>/<fingerprint>/checkpoints
    assert ckpt_path.name == "step00000003.ckpt"
    assert not (tmp_path / "b").exists()
    ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 3
    meta = run(tiny_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run_b", resume="auto",
                 log_csv=tmp_path / "b.csv")
    assert meta["steps"] == 6
    assert len(losses(tmp_path / "b.csv")) == 6  # the logs of both invocations are merged
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # and training actually changed the weights
    init = load_file(tiny_dir / "model.safetensors")
    assert any(not torch.equal(init[k], a[k]) for k in a)


def stage_params(tmp_path: Path) -> Path:
    """The repository's params.yaml with the train section of :func:`tiny_train_cfg` (for stage subprocesses)."""
    import dataclasses

    params = yaml.safe_load(open(Path(__file__).resolve().parents[1] / "params.yaml"))
    params["train"].update({k: v for k, v in dataclasses.asdict(tiny_train_cfg()).items() if k in params["train"]})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_run_killed_during_its_export_exports_on_rerun(tmp_path, tiny_dir, tiny_prepared, monkeypatch):
    """A run that finished its last step but not its export (a kill during the final validation or the export,
    a full disk) used to restore ``step == max_steps``, skip training, export nothing and die on every re-run.
    The last step is checkpointed (6 is not a multiple of ckpt_every 4) and the re-run exports it."""
    import layerchop.train.callbacks as callbacks

    cfg = tiny_train_cfg(token_budget=6 * 4 * 32, ckpt_every=4)
    ref = run(tiny_dir, tiny_prepared, tmp_path / "a", cfg, run_dir=tmp_path / "run_a")
    export_hf = callbacks.export_hf

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(callbacks, "export_hf", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(tiny_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run_b")
    assert not (tmp_path / "b").exists()
    [ckpt] = (tmp_path / "run_b").glob("*/checkpoints/step*.ckpt")
    assert ckpt.name == "step00000006.ckpt"
    monkeypatch.setattr(callbacks, "export_hf", export_hf)
    meta = run(tiny_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run_b", log_csv=tmp_path / "b.csv")
    assert meta["steps"] == 6 and meta["tokens_this_stage"] == ref["tokens_this_stage"]
    assert len(losses(tmp_path / "b.csv")) == 6  # nothing trained twice
    assert meta["train_loss_last"] == pytest.approx(ref["train_loss_last"], abs=1e-6)  # from the checkpoint
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


class Planted:
    """A pickle that touches a file when loaded: what a planted ``step*.ckpt`` would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_planted_pickle(tmp_path, tiny_dir, tiny_prepared, monkeypatch):
    cfg = tiny_train_cfg(token_budget=6 * 4 * 32, ckpt_every=3)
    run(tiny_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run", stop_after=3)
    [ckpt] = (tmp_path / "run").glob("*/checkpoints/step*.ckpt")
    state = torch.load(ckpt, weights_only=True)
    state["payload"] = Planted(tmp_path / "pwned")
    torch.save(state, ckpt)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's escape hatch must not reopen it
    with pytest.raises(Exception, match="Weights only load failed"):
        run(tiny_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "b").exists()


def test_resume_auto_refuses_a_checkpoint_linked_from_outside(tmp_path, tiny_dir, tiny_prepared):
    """``--resume auto`` reads only the run's own state: a ``step*.ckpt`` link to a file elsewhere is refused
    before anything is loaded (catches an implicit resume of a checkpoint nobody named)."""
    cfg = tiny_train_cfg(token_budget=6 * 4 * 32, ckpt_every=3)
    run(tiny_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run", stop_after=3)
    [ckpt] = (tmp_path / "run").glob("*/checkpoints/step*.ckpt")
    elsewhere = tmp_path / "elsewhere.ckpt"
    ckpt.rename(elsewhere)
    (ckpt.parent / "step00000099.ckpt").symlink_to(elsewhere)
    with pytest.raises(ValueError, match=r"step00000099\.ckpt: links outside the run directory"):
        run(tiny_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "b").exists()
    # named on the command line, the same file is resumed
    meta = run(tiny_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run2", resume=str(elsewhere))
    assert meta["steps"] == 6


def test_one_run_per_run_directory(tmp_path, tiny_dir, tiny_prepared):
    from layerchop.train.checkpoint import RunLock

    with RunLock(tmp_path / "run"):
        with pytest.raises(ValueError, match=rf"--run-dir {tmp_path / 'run'}: in use by another run \(pid {os.getpid()}"):
            run(tiny_dir, tiny_prepared, tmp_path / "out", tiny_train_cfg(), run_dir=tmp_path / "run")
        # another process: the stage refuses before any work (exit 2, one line naming --run-dir)
        params = stage_params(tmp_path)
        proc = subprocess.run([sys.executable, "-m", "layerchop.cli", "train", "--params", str(params), "--init",
                               str(tiny_dir), "--data", str(tiny_prepared), "--out", str(tmp_path / "out"),
                               "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"layerchop train: error: --run-dir {tmp_path / 'run'}: "
                                                                f"in use by another run (pid {os.getpid()}")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing started
    assert not (tmp_path / "out").exists()
    meta = run(tiny_dir, tiny_prepared, tmp_path / "out", tiny_train_cfg(), run_dir=tmp_path / "run")
    assert meta["steps"] == 5  # released: the run goes ahead


def test_tokenizer_mismatch_is_refused(tmp_path, tiny_prepared, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerchop.io import save_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.add_tokens(["<extra_token>"])
    save_model_dir(AutoModelForCausalLM.from_pretrained(tiny_dir), tok, tmp_path / "other", metadata={})
    with pytest.raises(ValueError, match=r"was tokenized with tokenizer [0-9a-f]+, but .*other uses [0-9a-f]+"):
        run(tmp_path / "other", tiny_prepared, tmp_path / "out", tiny_train_cfg(), run_dir=tmp_path / "run")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"token_budget": 0}, r"train.token_budget=0"),
        ({"precision": "fp8"}, r"train.precision='fp8'"),
        ({"strategy": "deepspeed"}, r"train.strategy='deepspeed'"),
        ({"betas": [0.9]}, r"train.betas=\[0.9\]"),
    ],
)
def test_train_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.fixture(scope="module")
def pruned_2of4_dir(tmp_path_factory, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerchop.prune.calibrate import prune_model
    from layerchop.prune.masks import save_pruned_model_dir
    from layerchop.prune.sparsity import Pattern

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    calib = torch.randint(3, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    masks, _ = prune_model(model, calib, "wanda", Pattern.parse("2:4"), batch_size=4)
    out = tmp_path_factory.mktemp("pruned") / "wanda-2of4"
    save_pruned_model_dir(model, AutoTokenizer.from_pretrained(tiny_dir), out, masks=masks,
                          metadata={"method": "wanda", "pattern": "2:4"})
    return out


@pytest.mark.parametrize("init", ["dense", "wanda-2of4"])
def test_fsdp2_two_cpu_processes(tmp_path, tiny_dir, tiny_prepared, pruned_2of4_dir, init):
    """ModelParallelStrategy(data_parallel_size=2) with fully_shard per layer, gloo on CPU, via the CLI.

    With a pruned init, the sharded (DTensor) parameters keep their masks through training."""
    init_dir = tiny_dir if init == "dense" else pruned_2of4_dir
    params = yaml.safe_load(open(Path(__file__).resolve().parents[1] / "params.yaml"))
    params["train"].update(dict(token_budget=6 * 2 * 2 * 32, batch_size=2, lr=3e-3, warmup_steps=1,
                                precision="32-true", strategy="fsdp", devices=2, accelerator="cpu",
                                ckpt_every=3, val_batches=1))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "layerchop.cli", "train", "--params", str(tmp_path / "params.yaml"),
           "--init", str(init_dir), "--data", str(tiny_prepared), "--out", str(tmp_path / "out"),
           "--run-dir", str(tmp_path / "run"), "--log", str(tmp_path / "log.csv")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr  # two ranks joined the gloo process group
    got = losses(tmp_path / "log.csv")
    assert len(got) == 6 and got[-1] < got[0]
    # the sharded checkpoint is a directory of per-rank shards (distributed checkpoint)
    [ckpt] = (tmp_path / "run").glob("*/checkpoints/step*.ckpt")
    assert ckpt.name == "step00000006.ckpt" and (ckpt / "meta.pt").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.architectures == ["LlamaForCausalLM"]
    with torch.no_grad():
        out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape == (1, 7)
    if init != "dense":
        from layerchop.prune.masks import load_masks

        params = dict(model.named_parameters())
        masks = load_masks(tmp_path / "out")
        assert masks and all(torch.all(params[k][m] == 0) for k, m in masks.items())
        init_w = load_file(init_dir / "model.safetensors")
        assert any(not torch.equal(params[k].detach()[~m], init_w[k][~m]) for k, m in masks.items())
    else:
        # as if the export had been killed: the re-run finds the checkpoint of the last step, Lightning skips
        # the loop, and the sharded model is exported in on_fit_end (a collective on both ranks)
        (tmp_path / "out").rename(tmp_path / "first")
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert "the checkpoint is of the last step (6): exporting it" in proc.stdout
        assert len(losses(tmp_path / "log.csv")) == 6  # nothing trained again
        a, b = load_file(tmp_path / "first" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chop_state_keys_renumbers_and_drops():
    from layerchop.prune.chop import chop_state_keys

    flat = {"model.embed_tokens.weight": 0, "model.layers.0.mlp.w": 1, "model.layers.2.mlp.w": 2,
            "model.layers.3.mlp.w": 3, "model.layers.12.attn.w": 12, "lm_head.weight": 9}
    assert chop_state_keys(flat, kept=[0, 3, 12]) == {
        "model.embed_tokens.weight": 0, "model.layers.0.mlp.w": 1, "model.layers.1.mlp.w": 3,
        "model.layers.2.attn.w": 12, "lm_head.weight": 9}
    opt = {"model.layers.2.mlp.w": {"step": 1}, "model.layers.3.mlp.w": {"step": 2}}  # per-parameter state
    assert chop_state_keys(opt, kept=[0, 3]) == {"model.layers.1.mlp.w": {"step": 2}}


def lrs(csv_path: Path) -> list[float]:
    with open(csv_path) as f:
        return [float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")]


def test_warm_start_is_inside_the_budget_and_the_schedule(tmp_path, tiny_dir, tiny_prepared, chopped_dir):
    """2 warm steps on the dense model + 3 on the chopped one = the 5 steps of the budget, one LR schedule."""
    from transformers import AutoConfig

    from layerchop.io import read_metadata
    from layerchop.train.flops import lm_step_flops

    cfg = tiny_train_cfg(token_budget=5 * 4 * 32, warmup_steps=3, warm_start_steps=2, ckpt_every=1)
    cold = run(chopped_dir, tiny_prepared, tmp_path / "cold", cfg, run_dir=tmp_path / "run_cold",
               log_csv=tmp_path / "cold.csv")  # no --warm-start: train.warm_start_steps is not inherited
    warm = run(chopped_dir, tiny_prepared, tmp_path / "warm", cfg, run_dir=tmp_path / "run_warm", warm_start=True,
               log_csv=tmp_path / "warm.csv")
    assert cold["steps"] == 5 and cold["compute"]["warm_start"] is None
    assert warm["steps"] == 3 and warm["tokens_trained"] == cold["tokens_trained"] == 5 * 4 * 32
    dense_step = lm_step_flops(AutoConfig.from_pretrained(tiny_dir), 4, 32)
    chopped_step = lm_step_flops(AutoConfig.from_pretrained(chopped_dir), 4, 32)
    assert warm["compute"]["flops"] == 2 * dense_step + 3 * chopped_step
    assert warm["compute"]["warm_start"]["tokens"] == 2 * 4 * 32
    # the chopped run continues the schedule where the warm steps left it (warmup 3 of 5 steps)
    # (the merged log holds the warm steps too, numbered from the run's start)
    assert lrs(tmp_path / "warm.csv") == pytest.approx(lrs(tmp_path / "cold.csv"), rel=1e-6)
    # every parameter of the chopped model starts with the Adam state of the 2 warm steps
    from transformers import AutoModelForCausalLM

    n_params = len(list(AutoModelForCausalLM.from_pretrained(chopped_dir).parameters()))
    assert warm["warm_start_optimizer"] == {"params_with_state": n_params, "steps": [2.0]}
    assert read_metadata(tmp_path / "warm")["num_hidden_layers"] == 4
    a = load_file(tmp_path / "cold" / "model.safetensors")
    b = load_file(tmp_path / "warm" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the data stream continues after the warm samples: the chopped run's checkpoint at its step 3 records
    # (2 warm + 3) x 4 sequences consumed, as the cold run's at step 5
    [ckpt] = (tmp_path / "run_warm").glob("*/checkpoints/step00000003.ckpt")
    [cold_ckpt] = (tmp_path / "run_cold").glob("*/checkpoints/step00000005.ckpt")
    state = torch.load(ckpt, weights_only=False)["PackedDataModule"]
    assert state["consumed_samples"] == 5 * 4 == torch.load(cold_ckpt, weights_only=False)[
        "PackedDataModule"]["consumed_samples"]
    # and the warm steps' own losses are logged beside the run
    [warm_log] = (tmp_path / "run_warm").glob("*/phase-logs/000/version_0/metrics.csv")
    assert len(losses(warm_log)) == 2


def test_warm_start_is_resumed_not_repeated(tmp_path, tiny_dir, tiny_prepared, chopped_dir):
    """A run killed after its warm start resumes the warm start's final checkpoint (same result)."""
    cfg = tiny_train_cfg(token_budget=5 * 4 * 32, warm_start_steps=2, ckpt_every=0)
    ref = run(chopped_dir, tiny_prepared, tmp_path / "a", cfg, run_dir=tmp_path / "run_a", warm_start=True)
    run(chopped_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run_b", warm_start=True, stop_after=1)
    [warm_ckpt] = (tmp_path / "run_b").glob("*/phases/000/step*.ckpt")
    assert warm_ckpt.name == "step00000002.ckpt"
    again = run(chopped_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run_b", warm_start=True)
    assert again["warm_start_optimizer"] == ref["warm_start_optimizer"]
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_warm_start_needs_a_chopped_init(tmp_path, tiny_dir, tiny_prepared):
    with pytest.raises(ValueError, match=r"--warm-start \(train.warm_start_steps=2\) needs --init to be a chopped"):
        run(tiny_dir, tiny_prepared, tmp_path / "o", tiny_train_cfg(warm_start_steps=2), run_dir=tmp_path / "r",
            warm_start=True)
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_activation_checkpointing_recomputes_every_layer_with_the_same_gradients():
    from conftest import make_tiny_llama

    from layerchop.prune.chop import decoder_layers
    from layerchop.train.sharding import enable_activation_checkpointing

    plain, checkpointed = make_tiny_llama(4).train(), make_tiny_llama(4).train()  # same seed: same weights
    enable_activation_checkpointing(checkpointed)
    # transformers checkpoints each layer's forward (its own hooks, e.g. FSDP2's, run once), so count the MLPs
    # inside; pre-hooks, because the recomputation stops as soon as backward has what it needs
    calls = []
    for layer in decoder_layers(checkpointed):
        layer.mlp.register_forward_pre_hook(lambda module, args: calls.append(module))
    x = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    for m in (plain, checkpointed):
        m(input_ids=x, labels=x, use_cache=False).loss.backward()
    assert len(calls) == 2 * 4  # every layer once forward, once again in the backward pass
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_budget_beyond_the_data_is_refused_unless_more_passes_are_allowed(tmp_path, tiny_dir, tiny_prepared):
    from layerchop.io import read_json
    from layerchop.train.plan import resolve

    sequences = read_json(tiny_prepared / "counts.json")["splits"]["train"]["sequences"]
    cfg = tiny_train_cfg(token_budget=(sequences // 4 + 1) * 4 * 32)  # one step more than one pass
    with pytest.raises(ValueError, match=r"train split holds .*train.max_data_passes=1"):
        resolve(tiny_dir, tiny_prepared, tmp_path / "o", tmp_path / "r", cfg)
    plan = resolve(tiny_dir, tiny_prepared, tmp_path / "o", tmp_path / "r",
                   tiny_train_cfg(token_budget=cfg.token_budget, max_data_passes=2))
    assert plan.steps.total_steps == sequences // 4 + 1


@pytest.mark.parametrize("variable", ["TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"])
def test_resume_never_applies_to_the_first_attempt_only(tmp_path, monkeypatch, variable):
    """A job restarted by torchrun or requeued by SLURM repeats the stage's own arguments, ``--resume never``
    included: it must resume the state its first attempt wrote, not move it aside and start over."""
    from layerchop.train.checkpoint import RunLayout

    layout = RunLayout(tmp_path, "abc")
    layout.checkpoints.mkdir(parents=True)
    (layout.checkpoints / "step00000004.ckpt").write_bytes(b"x")
    monkeypatch.setenv(variable, "1")
    assert layout.start("never") == str(layout.checkpoints / "step00000004.ckpt")
    monkeypatch.setenv(variable, "0")
    assert layout.start("never") is None
    assert not layout.root.exists() and len(list(tmp_path.glob("abc.replaced-*"))) == 1


def test_export_keeps_the_input_dtype_and_the_plans_size(tmp_path, tiny_dir, tiny_prepared):
    """A bf16 input model (its layerchop.json dtype, as download.model.dtype writes it) trains in fp32 and is
    exported in bf16: every tensor of the safetensors header is BF16 and the weights take exactly the bytes
    ``layerchop plan`` counts for it (model_dir_gb: 2 bytes a parameter, tied embeddings once); with
    ``train.export_dtype: float32`` the export is F32 at twice that."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from layerchop.estimate import model_dir_gb
    from layerchop.io import save_model_dir

    init = tmp_path / "bf16"
    save_model_dir(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16),
                   AutoTokenizer.from_pretrained(tiny_dir), init, metadata={"stage": "test", "dtype": "bfloat16"})
    config = AutoConfig.from_pretrained(init)
    for export_dtype, header, nbytes in ((None, "BF16", 2), ("float32", "F32", 4)):
        out = tmp_path / f"out-{export_dtype}"
        meta = run(init, tiny_prepared, out, tiny_train_cfg(token_budget=3 * 4 * 32, export_dtype=export_dtype),
                   run_dir=tmp_path / f"run-{export_dtype}")
        assert meta["dtype"] == (export_dtype or "bfloat16")
        with safe_open(out / "model.safetensors", "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
            data = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) * nbytes
        assert dtypes == {header}
        assert data == round(model_dir_gb(config, export_dtype or "bfloat16") * 1e9)
        loaded = AutoModelForCausalLM.from_pretrained(out)
        assert loaded.dtype == (torch.float32 if export_dtype else torch.bfloat16)


def test_forked_warm_start_equals_the_arm_trained_whole(tmp_path, tiny_dir, tiny_prepared, chopped_dir):
    """The shared warm start (``train --warm-only``) trains the 2 dense steps once; two arms of different
    budgets fork from it (``--warm-from``) and each ends bit for bit where the same arm trained whole ends: same
    weights, same losses after the fork, same compute record. An arm whose train section differs in a key the
    warm phase uses is refused, naming it; a warm start longer than the LR warmup cannot be shared."""
    import dataclasses

    cfg = tiny_train_cfg(token_budget=5 * 4 * 32, warmup_steps=3, warm_start_steps=2, ckpt_every=0)
    warm = run(chopped_dir, tiny_prepared, tmp_path / "warm", cfg, run_dir=tmp_path / "run_warm", warm_start=True,
               warm_only=True)
    assert warm["steps"] == 2 and (tmp_path / "warm" / "warm.json").exists()
    assert not (tmp_path / "warm" / "model.safetensors").exists()  # a checkpoint to fork from, not a model
    for budget in (5, 6):
        arm_cfg = dataclasses.replace(cfg, token_budget=budget * 4 * 32)
        whole = run(chopped_dir, tiny_prepared, tmp_path / f"whole{budget}", arm_cfg,
                    run_dir=tmp_path / f"run_whole{budget}", warm_start=True, log_csv=tmp_path / f"whole{budget}.csv")
        fork = run(chopped_dir, tiny_prepared, tmp_path / f"fork{budget}", arm_cfg,
                   run_dir=tmp_path / f"run_fork{budget}", warm_start=True, warm_from=tmp_path / "warm",
                   log_csv=tmp_path / f"fork{budget}.csv")
        a = load_file(tmp_path / f"whole{budget}" / "model.safetensors")
        b = load_file(tmp_path / f"fork{budget}" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), budget
        assert losses(tmp_path / f"fork{budget}.csv")[-(budget - 2):] == losses(tmp_path / f"whole{budget}.csv")[-(budget - 2):]
        assert fork["warm_start_optimizer"] == whole["warm_start_optimizer"]
        assert fork["compute"]["flops"] == whole["compute"]["flops"] and fork["steps"] == whole["steps"]
        # the fork's end state stays the shared resume point: the arm writes no copy of it
        assert not list((tmp_path / f"run_fork{budget}").glob("*/phases/000/step*.ckpt"))
    # train.warm_start_steps: 0 (the embedded profile): the stage publishes a record alone and arms ignore it
    none = dataclasses.replace(cfg, warm_start_steps=0)
    assert run(chopped_dir, tiny_prepared, tmp_path / "nowarm", none, run_dir=tmp_path / "run_nowarm",
               warm_start=True, warm_only=True)["checkpoint"] is None
    cold = run(chopped_dir, tiny_prepared, tmp_path / "cold", none, run_dir=tmp_path / "run_cold", warm_start=True,
               warm_from=tmp_path / "nowarm")
    assert cold["steps"] == 5 and cold["compute"]["warm_start"] is None
    with pytest.raises(ValueError, match=r"--warm-from .*made for another run \(train differ: train.lr\)"):
        run(chopped_dir, tiny_prepared, tmp_path / "x", dataclasses.replace(cfg, lr=1e-3), run_dir=tmp_path / "rx",
            warm_start=True, warm_from=tmp_path / "warm")
    with pytest.raises(ValueError, match=r"train.warm_start_steps=3 > train.warmup_steps=2"):
        run(chopped_dir, tiny_prepared, tmp_path / "y", dataclasses.replace(cfg, warmup_steps=2, warm_start_steps=3),
            run_dir=tmp_path / "ry", warm_start=True, warm_only=True)
