"""Gradual chopping (Figure 6): layers go one at a time during continued pretraining.

A 6-layer tiny Llama, chopped to 4 layers (layers 2 and 3 removed); ``--chop-every-tokens`` of 2 steps: 2 steps
on 6 layers, layer 2 goes; 2 steps on 5 layers, layer 3 goes; 2 steps on the 4-layer model."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from layerchop.config import TrainConfig
from layerchop.train.run import run

TOKENS_PER_STEP = 4 * 32
EVERY = 2 * TOKENS_PER_STEP


def cfg_(**kw) -> TrainConfig:
    base = dict(token_budget=6 * TOKENS_PER_STEP, batch_size=4, accumulate=1, lr=3e-3, warmup_steps=2,
                precision="32-true", accelerator="cpu", ckpt_every=0, val_batches=1, seed=0)
    return TrainConfig(**{**base, **kw})


def column(csv_path: Path, key: str) -> list[tuple[int, float]]:
    with open(csv_path) as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def test_plan_schedules_one_removal_every_n_steps(tmp_path, tiny_dir, tiny_prepared, chopped_dir):
    from transformers import AutoConfig

    from layerchop.train.flops import lm_step_flops
    from layerchop.train.plan import depth_config, resolve

    plan = resolve(chopped_dir, tiny_prepared, tmp_path / "o", tmp_path / "r", cfg_(), chop_every_tokens=EVERY,
                   snapshots=2)
    s = plan.steps
    assert [(ph.steps, ph.num_layers, ph.remove) for ph in s.phases] == [(2, 6, (2,)), (2, 5, (3,))]
    assert s.removal_steps == [2, 4] and s.main_steps == 2 and s.total_steps == 6
    dense = AutoConfig.from_pretrained(tiny_dir)
    five = depth_config(dense, [0, 1, 3, 4, 5])
    assert five.num_hidden_layers == 5
    assert [ph.flops_per_step for ph in s.phases] == [lm_step_flops(dense, 4, 32), lm_step_flops(five, 4, 32)]
    assert plan.snapshot_steps == [2, 4]  # over the whole run, phases included
    assert plan.describe()["removal_steps"] == [2, 4]


@pytest.mark.parametrize("kw, match", [
    (dict(chop_every_tokens=3 * TOKENS_PER_STEP), r"--chop-every-tokens 384: the last of 2 removals, one every 3 "
                                                  r"steps, comes at step 6"),
    (dict(chop_every_tokens=10), r"--chop-every-tokens 10: must be a finite number of tokens, at least one "
                                 r"optimizer step \(128 tokens\)"),
    (dict(chop_every_tokens=float("inf")), r"--chop-every-tokens inf: must be a finite number of tokens"),
    (dict(chop_every_tokens=EVERY, warm_start=True), r"--chop-every-tokens .* and --warm-start .* exclude each other"),
])
def test_plan_refuses_schedules_that_cannot_run(tmp_path, tiny_prepared, chopped_dir, kw, match):
    from layerchop.train.plan import resolve

    with pytest.raises(ValueError, match=match):
        resolve(chopped_dir, tiny_prepared, tmp_path / "o", tmp_path / "r", cfg_(warm_start_steps=1), **kw)


def test_plan_needs_a_chopped_init(tmp_path, tiny_dir, tiny_prepared):
    from layerchop.train.plan import resolve

    with pytest.raises(ValueError, match=r"--chop-every-tokens 256 needs --init to be a chopped model"):
        resolve(tiny_dir, tiny_prepared, tmp_path / "o", tmp_path / "r", cfg_(), chop_every_tokens=EVERY)


def opt_order_names(model) -> list[str]:
    """Parameter names in the order of the optimizer's state indices (the decay group, then the rest)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.ndim >= 2] + [n for n, p in named if p.ndim < 2]


def test_layers_go_at_the_scheduled_steps_with_their_state(tmp_path, tiny_dir, tiny_prepared, chopped_dir,
                                                           monkeypatch):
    """The removals happen at steps 2 and 4; each smaller model starts with exactly the kept layers' weights and
    Adam moments of the model before it, renumbered; LR schedule, data stream and compute continue over the run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from layerchop.io import read_metadata
    from layerchop.prune.chop import chop_state_keys
    from layerchop.train import sharding
    from layerchop.train.flops import lm_step_flops
    from layerchop.train.plan import depth_config

    installed = []  # (weights, optimizer state) each smaller model started from
    load_w, load_o = sharding.load_local_model_state, sharding.load_local_optimizer_state

    def spy_w(model, state):
        installed.append({"weights": {k: v.clone() for k, v in state.items()}})
        return load_w(model, state)

    def spy_o(model, opt, state):
        installed[-1]["optimizer"] = {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()}
                                      for k, v in state.items()}
        return load_o(model, opt, state)

    monkeypatch.setattr(sharding, "load_local_model_state", spy_w)
    monkeypatch.setattr(sharding, "load_local_optimizer_state", spy_o)
    meta = run(chopped_dir, tiny_prepared, tmp_path / "out", cfg_(), run_dir=tmp_path / "run",
               chop_every_tokens=EVERY, snapshots=2, snapshot_dir=tmp_path / "snaps", log_csv=tmp_path / "log.csv")
    monkeypatch.undo()

    # the same 6 steps on the dense model without chopping, checkpointed after each step
    run(tiny_dir, tiny_prepared, tmp_path / "dense", cfg_(ckpt_every=1), run_dir=tmp_path / "run_dense",
        log_csv=tmp_path / "dense.csv", stop_after=2)
    [ckpt] = (tmp_path / "run_dense").glob("*/checkpoints/step00000002.ckpt")
    ck = torch.load(ckpt, weights_only=False)
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir)
    names = opt_order_names(dense)
    dense_opt = {names[i]: st for i, st in ck["optimizer_states"][0]["state"].items()}
    dense_w = {k[len("model."):]: v for k, v in ck["state_dict"].items()}

    # after step 2, the 5-layer model starts with the dense model's state at step 2 without layer 2
    assert len(installed) == 2  # one hand-over per removal
    kept = [0, 1, 3, 4, 5]
    want_w, want_o = chop_state_keys(dense_w, kept), chop_state_keys(dense_opt, kept)
    got = installed[0]
    assert set(got["weights"]) == set(dict(AutoModelForCausalLM.from_config(
        depth_config(AutoConfig.from_pretrained(tiny_dir), kept)).named_parameters()))
    assert set(got["weights"]) == set(want_w) - {"lm_head.weight"}  # tied to the embedding
    for k, v in got["weights"].items():
        torch.testing.assert_close(v, want_w[k], rtol=0, atol=1e-6, msg=k)
    assert set(got["optimizer"]) == set(want_o)
    for k, st in want_o.items():
        assert float(got["optimizer"][k]["step"]) == 2.0
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["optimizer"][k][moment], st[moment], rtol=0, atol=1e-7, msg=k)
    # the second hand-over (after step 4): the 5-layer model's state at its end (its phase's last checkpoint)
    # without its layer 2 (the dense model's layer 3), renumbered
    [end5] = (tmp_path / "run").glob("*/phases/001/step00000002.ckpt")
    ck5 = torch.load(end5, weights_only=False)
    five = AutoModelForCausalLM.from_config(depth_config(AutoConfig.from_pretrained(tiny_dir), kept))
    names5 = opt_order_names(five)
    w5 = chop_state_keys({k[len("model."):]: v for k, v in ck5["state_dict"].items()}, [0, 1, 3, 4])
    o5 = chop_state_keys({names5[i]: st for i, st in ck5["optimizer_states"][0]["state"].items()}, [0, 1, 3, 4])
    got = installed[1]
    assert set(got["weights"]) == set(w5) - {"lm_head.weight"} and set(got["optimizer"]) == set(o5)
    for k, v in got["weights"].items():
        torch.testing.assert_close(v, w5[k], rtol=0, atol=0, msg=k)
    for k, st in o5.items():
        assert float(got["optimizer"][k]["step"]) == 4.0
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["optimizer"][k][moment], st[moment], rtol=0, atol=0, msg=k)

    # one LR schedule and one data stream over the run: the first 2 steps' losses and all 6 LRs equal the dense run's
    lr, dense_lr = column(tmp_path / "log.csv", "train/lr"), column(tmp_path / "dense.csv", "train/lr")
    assert [s for s, _ in lr] == [0, 1, 2, 3, 4, 5]  # numbered over the whole run (phases included)
    full = run(tiny_dir, tiny_prepared, tmp_path / "dense6", cfg_(), run_dir=tmp_path / "run_dense6",
               log_csv=tmp_path / "dense6.csv")
    assert [v for _, v in lr] == pytest.approx([v for _, v in column(tmp_path / "dense6.csv", "train/lr")], rel=1e-6)
    assert [v for _, v in lr[:2]] == pytest.approx([v for _, v in dense_lr], rel=1e-6)
    loss, dense_loss = column(tmp_path / "log.csv", "train/loss"), column(tmp_path / "dense.csv", "train/loss")
    assert [v for _, v in loss[:2]] == pytest.approx([v for _, v in dense_loss], rel=1e-5)
    [data_ckpt] = (tmp_path / "run").glob("*/phases/001/step00000002.ckpt")  # the last phase's end: 4 steps in
    assert torch.load(data_ckpt, weights_only=False)["PackedDataModule"]["consumed_samples"] == 4 * 4
    assert not list((tmp_path / "run").glob("*/phases/000"))  # the first phase's checkpoints are gone

    # FLOPs: 2 steps of each depth
    dcfg = AutoConfig.from_pretrained(tiny_dir)
    f = {n: lm_step_flops(depth_config(dcfg, list(range(n))), 4, 32) for n in (6, 5, 4)}
    assert meta["compute"]["flops"] == 2 * f[6] + 2 * f[5] + 2 * f[4] > full["compute"]["flops"] - 6 * f[6] + 6 * f[4]
    assert meta["compute"]["tokens"] == meta["tokens_trained"] == 6 * TOKENS_PER_STEP
    assert meta["compute"]["steps"] == 6
    assert meta["chop_schedule"] == {"every_steps": 2, "every_tokens": EVERY, "order": [2, 3], "removal_steps": [2, 4],
                                     "removal_tokens": [2 * TOKENS_PER_STEP, 4 * TOKENS_PER_STEP],
                                     "removal_flops": [2 * f[6], 2 * f[6] + 2 * f[5]]}
    assert meta["compute"]["chop_schedule"] == meta["chop_schedule"]  # what the curve stage copies
    assert read_metadata(tmp_path / "out")["num_hidden_layers"] == 4

    # snapshots along the run: step 2 (the end of the 6-layer phase) and step 4 (the 5-layer phase)
    snaps = sorted((tmp_path / "snaps").iterdir())
    assert [p.name for p in snaps] == ["step_000002", "step_000004"]
    layers = [AutoConfig.from_pretrained(p).num_hidden_layers for p in snaps]
    assert layers == [6, 5]
    m4 = read_metadata(snaps[1])
    assert m4["removed_layers"] == [2] and m4["removed_later"] == [3] and m4["compute"]["steps"] == 4
    assert m4["compute"]["flops"] == 2 * f[6] + 2 * f[5] and m4["compute"]["tokens"] == 4 * TOKENS_PER_STEP
    snap_w = load_file(snaps[0] / "model.safetensors")  # the dense model at step 2, all 6 layers
    assert set(snap_w) <= set(dense_w)
    for k, v in snap_w.items():
        torch.testing.assert_close(v, dense_w[k], rtol=0, atol=1e-6, msg=k)


class Killed(Exception):
    pass


@pytest.mark.parametrize("phase, step", [("000", 2), ("001", 1), ("checkpoints", 1)],
                         ids=["end-of-first-phase", "inside-second-phase", "inside-the-chopped-model-fit"])
def test_a_run_killed_mid_schedule_resumes_to_the_same_model(tmp_path, tiny_prepared, chopped_dir, monkeypatch,
                                                             phase, step):
    """Killed right after the first phase's last checkpoint (before the removal), after the first step of the
    5-layer phase, or after the first step of the chopped model's fit: the re-run resumes that checkpoint and ends
    with the uninterrupted run's model, snapshots and compute record."""
    from layerchop.train import checkpoint

    cfg = cfg_(ckpt_every=1)
    ref = run(chopped_dir, tiny_prepared, tmp_path / "a", cfg, run_dir=tmp_path / "run_a", chop_every_tokens=EVERY,
              snapshots=2, snapshot_dir=tmp_path / "snaps_a")
    save = checkpoint.AtomicCheckpoint.save

    def save_then_die(self, trainer):
        path = save(self, trainer)
        if self.dirpath.name == phase and trainer.global_step == step:
            raise Killed(path)
        return path

    monkeypatch.setattr(checkpoint.AtomicCheckpoint, "save", save_then_die)
    with pytest.raises(Killed):
        run(chopped_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run_b", chop_every_tokens=EVERY,
            snapshots=2, snapshot_dir=tmp_path / "snaps_b")
    monkeypatch.undo()
    assert not (tmp_path / "b").exists()  # nothing exported by the killed run
    again = run(chopped_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run_b",
                chop_every_tokens=EVERY, snapshots=2, snapshot_dir=tmp_path / "snaps_b", metrics=tmp_path / "b.json")
    assert again["compute"]["flops"] == ref["compute"]["flops"] and again["compute"]["steps"] == 6
    assert again["compute"]["chop_schedule"] == ref["compute"]["chop_schedule"]
    assert again["compute"]["tokens"] == ref["compute"]["tokens"]
    # the wall times (the run's metrics): the whole run's, across the kill, and each snapshot's, whichever
    # invocation wrote it
    from layerchop.io import read_json

    rec = read_json(tmp_path / "b.json")
    assert rec["train_s"] > 0 and sorted(rec["snapshots"]) == ["step_000002", "step_000004"]
    assert 0 < rec["snapshots"]["step_000002"]["train_s"] < rec["snapshots"]["step_000004"]["train_s"] <= rec["train_s"]
    # the chopped model's fit checkpointed, so the phases' checkpoints are gone (their logs stay)
    assert not list((tmp_path / "run_b").glob("*/phases/*/step*.ckpt"))
    assert len(list((tmp_path / "run_b").glob("*/phase-logs/*"))) == 2
    assert again["warm_start_optimizer"] == ref["warm_start_optimizer"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    for step in ("step_000002", "step_000004"):
        sa = load_file(tmp_path / "snaps_a" / step / "model.safetensors")
        sb = load_file(tmp_path / "snaps_b" / step / "model.safetensors")
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fsdp2_two_processes_chop_gradually(tmp_path, tiny_prepared, chopped_dir):
    """Under FSDP2 (2 CPU processes, the CLI) the shard-local hand-over gives the single-process result, also when the
    run stops in the chopped model's fit and is resumed: the 5-layer phase is then rebuilt from its config and its
    sharded end checkpoint before the last removal."""
    params = yaml.safe_load(open(Path(__file__).resolve().parents[1] / "params.yaml"))
    base = dict(token_budget=6 * 2 * 2 * 32, batch_size=2, lr=3e-3, warmup_steps=1, precision="32-true",
                accelerator="cpu", ckpt_every=0, val_batches=1)
    outs = {}
    for name, extra in (("single", dict(token_budget=6 * 4 * 32, batch_size=4)),
                        ("fsdp", dict(strategy="fsdp", devices=2))):
        params["train"].update({**base, **extra})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(params))
        cmd = [sys.executable, "-m", "layerchop.cli", "train", "--params", str(tmp_path / f"{name}.yaml"),
               "--init", str(chopped_dir), "--data", str(tiny_prepared), "--out", str(tmp_path / name),
               "--run-dir", str(tmp_path / f"run_{name}"), "--log", str(tmp_path / f"{name}.csv"),
               "--chop-every-tokens", str(2 * 4 * 32)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if name == "fsdp":  # stopped after the chopped model's first step (it writes no checkpoint: ckpt_every 0)
            proc = subprocess.run(cmd + ["--stop-after", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            assert "stopped at step 1 of 2" in proc.stdout and not (tmp_path / name).exists()
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        outs[name] = load_file(tmp_path / name / "model.safetensors")
        assert "phase 2/2: 2 steps on 5 layers, then layers [3] go" in proc.stdout
        if name == "fsdp":
            assert "phase 2: resuming from" in proc.stdout and "phase 1/2" not in proc.stdout
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr
    # 2 ranks x batch 2 see the same 4 sequences per step as 1 rank x batch 4 (the sampler interleaves ranks)
    a, b = outs["single"], outs["fsdp"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert len(column(tmp_path / "fsdp.csv", "train/loss")) == 6


def test_figure6_from_real_runs_and_curves(tmp_path, tiny_dir, tiny_prepared, chopped_dir):
    """The stage path: a gradual and an all-at-once run through `layerchop train`, their curves through `layerchop
    curve`, the dense and chopped starts through `layerchop evaluate`, then `layerchop figure6`."""
    import json
    import shutil

    from layerchop.cli import main
    from layerchop.io import read_json

    params = yaml.safe_load(open(Path(__file__).resolve().parents[1] / "params.yaml"))
    params["train"].update(dict(batch_size=4, lr=3e-3, warmup_steps=2, precision="32-true", ckpt_every=0,
                                val_batches=1, token_budget=6 * TOKENS_PER_STEP))
    params["evaluate"].update(dict(limit=5, ppl_max_sequences=2, tasks=["heldout_lastword"], optional_tasks=[],
                                   local_tasks={}, autocast=None, batch_size=3))
    params["figure6"] = {"every_tokens": [EVERY], "token_budget": 6 * TOKENS_PER_STEP}
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    p = ["--params", str(pfile)]
    data = ["--data", str(tiny_prepared)]
    for name, extra in (("gradual", ["--chop-every-tokens", str(EVERY)]), ("once", [])):
        assert main(["train", *p, "--init", str(chopped_dir), *data, "--out", str(tmp_path / name), "--run-dir",
                     str(tmp_path / f"run_{name}"), "--token-budget", str(6 * TOKENS_PER_STEP), "--snapshots", "2",
                     "--snapshot-dir", str(tmp_path / f"snaps_{name}"), "--metrics", str(tmp_path / f"{name}.json"),
                     *extra]) == 0
    out = {"gradual": tmp_path / "eval" / "fig6" / f"every{EVERY}", "once": tmp_path / "eval" / "once"}
    for name, dest in out.items():
        assert main(["curve", *p, "--snapshots", str(tmp_path / f"snaps_{name}"), "--final", str(tmp_path / name),
                     "--record", str(tmp_path / f"{name}.json"), *data, "--out", str(dest)]) == 0
    for name, model in (("dense", tiny_dir), ("chopped", chopped_dir)):
        assert main(["evaluate", *p, "--model", str(model), *data, "--out", str(tmp_path / "eval" / name)]) == 0
    args = ["figure6", *p, "--gradual", str(tmp_path / "eval" / "fig6"), "--at-once",
            str(out["once"] / "curve.json"), "--dense", str(tmp_path / "eval" / "dense" / "metrics.json"),
            "--start", str(tmp_path / "eval" / "chopped" / "metrics.json"), "--tables", str(tmp_path / "t"),
            "--figures", str(tmp_path / "f")]
    assert main(args) == 0
    md = (tmp_path / "t" / "gradual.md").read_text()
    g, once = read_json(out["gradual"] / "curve.json"), read_json(out["once"] / "curve.json")
    assert [pt["step"] for pt in g["points"]] == [2, 4, 6] and [pt["step"] for pt in once["points"]] == [2, 4, 6]
    assert g["compute"]["flops"] > once["compute"]["flops"]  # 4 of its 6 steps on deeper models
    dense_ppl = read_json(tmp_path / "eval" / "dense" / "metrics.json")["val/ppl"]
    chopped_ppl = read_json(tmp_path / "eval" / "chopped" / "metrics.json")["val/ppl"]
    row = next(line for line in md.splitlines() if line.startswith(f"| every {EVERY} tokens"))
    ratio = g["compute"]["flops"] / once["compute"]["flops"]
    assert row.startswith(f"| every {EVERY} tokens (last removal at 66.7 %) | {EVERY} | 4 | 6 | 768 | "
                          f"{g['compute']['flops']:.3e} | {ratio:.2f}x | {g['points'][-1]['metrics']['val/ppl']:.2f} |")
    assert f"| all at once (LayerChop) | - | 0 | 6 | 768 | {once['compute']['flops']:.3e} | 1.00x |" in md
    assert "all at once is Figure 4's LayerChop arm (every layer removed before the first step)" in md
    # each arm starts at its own start: the dense model (gradual), the chopped one (all at once)
    assert f"| every {EVERY} tokens (last removal at 66.7 %) | 0 | 0 | 0.000e+00 | {dense_ppl:.2f} |" in md
    assert f"| all at once (LayerChop) | 0 | 0 | 0.000e+00 | {chopped_ppl:.2f} |" in md
    assert (tmp_path / "f" / "fig6_gradual.png").stat().st_size > 1000
    # unequal budgets are refused, with nothing written
    bad = json.loads((out["once"] / "curve.json").read_text())
    bad["compute"]["tokens"] += 1
    (out["once"] / "curve.json").write_text(json.dumps(bad))
    shutil.rmtree(tmp_path / "t")
    assert main(args) == 2 and not (tmp_path / "t").exists()


@pytest.mark.parametrize("extra, message", [
    (["--chop-every-tokens", "10"], "--chop-every-tokens 10: must be a finite number of tokens, at least one optimizer"),
    (["--chop-every-tokens", "nan"], "--chop-every-tokens nan: must be a finite number of tokens"),
    # the repo's params: batch 8 x 32 tokens a step, so 768 tokens buy 3 steps
    (["--chop-every-tokens", "512"], "--chop-every-tokens 512: the last of 2 removals, one every 2 steps, comes at "
                                     "step 4, but the budget (--token-budget"),
    (["--token-budget", "768", "--flop-budget", "1e12"], "--flop-budget and --token-budget exclude each other"),
])
def test_the_train_stage_refuses_a_schedule_in_one_line(tmp_path, tiny_prepared, chopped_dir, capsys, extra, message):
    from layerchop.cli import main

    argv = ["train", "--params", str(Path(__file__).resolve().parents[1] / "params.yaml"), "--init", str(chopped_dir),
            "--data", str(tiny_prepared), "--out", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"),
            "--token-budget", "768", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("layerchop train: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()
