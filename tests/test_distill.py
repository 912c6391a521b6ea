"""CHOP + distill: loss terms, chunked KL, frozen teacher, layer map, FSDP2 on 2 CPU processes."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tiny_llama
from layerchop.config import DistillConfig, TrainConfig
from layerchop.train.distill import DistillStudent, distill_step, freeze, layer_map, load_layer_map, teacher_capture
from layerchop.train.losses import chunked_lm_kl, lm_kl_reference

REPO = Path(__file__).resolve().parents[1]
TERMS = ("lm", "kl", "hid", "att", "emb")


def chopped_setup(tmp_path, tiny_dir, train: dict, distill: dict | None = None, **sections):
    """A params file for the tiny model (2 of 6 layers removed, ``input`` layout) and the chopped model."""
    from layerchop.cli import main

    params = yaml.safe_load(open(REPO / "params.yaml"))
    params["chop"] = {"layout": "input", "num_remove": 2, "indices": None}
    params["train"].update({**dict(batch_size=4, lr=3e-3, warmup_steps=1, precision="32-true", accelerator="cpu",
                                   ckpt_every=0, val_batches=1), **train})
    params["distill"].update(distill or {})
    params["arms"].update(seeds={}, replicas=[])  # one seed (params.yaml's replicas are not here)
    for name, values in sections.items():
        params[name].update(values)
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    chopped = tmp_path / "chopped"
    assert main(["chop", "--params", str(pfile), "--model", str(tiny_dir), "--out", str(chopped)]) == 0
    return pfile, chopped


def test_chunked_lm_kl_equals_unchunked_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    N, D, V = 37, 16, 50
    h_s = torch.randn(N, D, generator=g, requires_grad=True)
    w_s = torch.randn(V, D, generator=g, requires_grad=True)
    h_t, w_t = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[3, 10, 36]] = -100
    mask = torch.rand(N, generator=g) > 0.2
    ref_lm, ref_kl = lm_kl_reference(h_s, w_s, targets, h_t, w_t, mask, temperature=2.0)
    (0.7 * ref_lm + 1.3 * ref_kl).backward()
    ref_grads = h_s.grad.clone(), w_s.grad.clone()
    for chunk in (1, 5, 16, 37, 1000):
        h_s.grad, w_s.grad = None, None
        total, lm, kl = chunked_lm_kl(h_s, w_s, targets, h_t_ND=h_t, w_t_VD=w_t, kl_mask_N=mask, temperature=2.0,
                                      w_lm=0.7, w_kl=1.3, chunk=chunk)
        total.backward()
        torch.testing.assert_close(lm, ref_lm.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kl, ref_kl.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(total.detach(), (0.7 * ref_lm + 1.3 * ref_kl).detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h_s.grad, ref_grads[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w_s.grad, ref_grads[1], rtol=1e-5, atol=1e-6)
    assert kl > 0 and ref_kl > 0
    # KL of a distribution with itself is exactly zero
    _, _, kl_same = chunked_lm_kl(h_t, w_t, targets, h_t_ND=h_t, w_t_VD=w_t, kl_mask_N=mask, chunk=8)
    assert kl_same.item() == 0.0


def _terms(student_model, teacher_model, mapping, batch_BT, labels_BT=None, cfg=None):
    cfg = cfg or DistillConfig()
    teacher = freeze(teacher_model)
    student = DistillStudent(student_model, teacher.config.hidden_size, mapping, cfg)
    cap = teacher_capture(teacher, mapping, cfg)
    total, terms = distill_step(student, teacher, cap, batch_BT, batch_BT if labels_BT is None else labels_BT)
    return student, total, terms


def test_every_distillation_term_is_zero_for_student_equal_to_teacher_and_positive_otherwise():
    teacher = make_tiny_llama(seed=0)
    batch = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    _, total, same = _terms(copy.deepcopy(teacher), teacher, list(range(6)), batch)
    assert set(same) == set(TERMS)
    for name in ("kl", "hid", "att", "emb"):
        assert same[name].item() == 0.0, (name, same[name])
    # the LM term is the student's own causal-LM loss
    with torch.no_grad():
        expected_lm = teacher(input_ids=batch, labels=batch).loss
    torch.testing.assert_close(same["lm"], expected_lm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.detach(), same["lm"], rtol=1e-6, atol=1e-6)

    perturbed = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, _, diff = _terms(perturbed, teacher, list(range(6)), batch)
    assert all(diff[name].item() > 0 for name in ("kl", "hid", "att", "emb")), diff

    # a chopped student: layers 1..4 carry the same weights but see other inputs
    from layerchop.prune.chop import chop_layers

    chopped = copy.deepcopy(teacher)
    kept = chop_layers(chopped, [2, 3])
    _, _, chop = _terms(chopped, teacher, kept, batch)
    assert chop["emb"].item() == 0.0  # same embedding table, identity projection
    assert all(chop[name].item() > 0 for name in ("kl", "hid", "att")), chop


def test_padding_positions_do_not_count():
    teacher = make_tiny_llama(seed=0)
    student = make_tiny_llama(seed=3)
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(0, 300, (2, 24), generator=g)
    labels = batch.clone()
    labels[1, 16:] = -100
    _, _, a = _terms(copy.deepcopy(student), teacher, list(range(6)), batch, labels)
    changed = batch.clone()
    changed[1, 16:] = torch.randint(0, 300, (8,), generator=g)  # only the padded tail differs
    _, _, b = _terms(copy.deepcopy(student), teacher, list(range(6)), changed, labels)
    for name in ("lm", "kl", "hid", "att"):
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


def test_projections_start_at_identity_and_zero_weights_skip_terms():
    teacher = make_tiny_llama(seed=0)
    cfg = DistillConfig(w_kl=0.0, w_att=0.0, w_emb=0.0)
    student, _, terms = _terms(copy.deepcopy(teacher), teacher, list(range(6)), torch.zeros(1, 8, dtype=torch.long),
                               cfg=cfg)
    assert set(terms) == {"lm", "hid"}
    assert all(torch.equal(p.weight, torch.eye(32)) for p in student.hid_proj)
    assert torch.equal(student.emb_proj.weight, torch.eye(32))
    with pytest.raises(ValueError, match="distill.w_lm"):
        DistillConfig(w_lm=0, w_kl=0, w_hid=0, w_att=0, w_emb=0)
    with pytest.raises(ValueError, match="distill.temperature"):
        DistillConfig(temperature=0)


def test_layer_map_of_a_chopped_student_matches_its_removed_indices(tmp_path, tiny_dir):
    from layerchop.cli import main

    params = yaml.safe_load(open(REPO / "params.yaml"))
    params["chop"] = {"layout": "middle", "num_remove": 3, "indices": None}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "chopped"
    assert main(["chop", "--params", str(tmp_path / "params.yaml"), "--model", str(tiny_dir), "--out", str(out)]) == 0
    import json

    removed = json.loads((out / "layerchop.json").read_text())["removed_layers"]
    mapping = load_layer_map(out, tiny_dir)
    assert len(removed) == 3 and len(mapping) == 3
    assert sorted(set(range(6)) - set(removed)) == mapping and mapping[0] == 0 and mapping[-1] == 5
    # the student's layer k holds the teacher's layer mapping[k]
    from safetensors.torch import load_file

    s, t = load_file(out / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    for k, m in enumerate(mapping):
        key = "model.layers.{}.self_attn.q_proj.weight"
        assert torch.equal(s[key.format(k)], t[key.format(m)])
    assert load_layer_map(tiny_dir, tiny_dir) == list(range(6))
    with pytest.raises(ValueError, match="removed_layers"):
        layer_map({"removed_layers": [1]}, 3, 6)
    with pytest.raises(ValueError, match="names no removed_layers"):
        layer_map({}, 3, 6)


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(token_budget=3 * 4 * 32, batch_size=4, lr=3e-3, warmup_steps=1, precision="32-true",
                accelerator="cpu", ckpt_every=0, val_batches=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_training_step_leaves_teacher_bit_identical_and_frozen(tiny_dir, tiny_prepared):
    import lightning as L
    from transformers import AutoModelForCausalLM

    from layerchop.train.data import PackedDataModule
    from layerchop.train.distill import DistillModule

    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = copy.deepcopy(teacher)
    from layerchop.prune.chop import chop_layers

    mapping = chop_layers(student, [2, 3])
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = tiny_cfg()
    module = DistillModule(None, None, cfg, DistillConfig(chunk_tokens=16), mapping, max_steps=2,
                           student=student, teacher=teacher)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
                        use_distributed_sampler=False, enable_model_summary=False)
    trainer.fit(module, datamodule=PackedDataModule(tiny_prepared, 4, 0, 1, 0))
    assert trainer.global_step == 2
    assert module.teacher is teacher and not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # the teacher is not part of the module tree: not optimized, not checkpointed
    assert not any(k.startswith(("teacher", "_student_init")) for k in module.state_dict())
    assert all(k.startswith(("model.", "val_ppl")) for k in module.state_dict())
    assert sum(len(g["params"]) for g in trainer.optimizers[0].param_groups) == len(list(module.model.parameters()))
    # the student and the projections did train; the exported state is the student alone
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    assert not all(torch.equal(p.weight, torch.eye(32)) for p in module.model.hid_proj)
    config, sd = module.export_state()
    assert set(sd) == set(student.state_dict()) and config.num_hidden_layers == 4
    # projections are not decayed (they start at identity)
    no_decay = {id(p) for p in trainer.optimizers[0].param_groups[1]["params"]}
    assert all(id(p.weight) in no_decay for p in module.model.hid_proj)


def test_distill_run_exports_student_snapshots_and_compute(tmp_path, tiny_dir, tiny_prepared):
    """Through the CLI: a FLOP budget sets the steps; snapshots and the final model are plain HF dirs."""
    from layerchop.cli import main
    from layerchop.io import read_json, read_metadata
    from layerchop.train.distill import distill_step_flops

    # unequal loss weights, so that the logged total can only equal the weighted sum
    pfile, chopped = chopped_setup(tmp_path, tiny_dir, {}, {"chunk_tokens": 40, "w_kl": 0.5, "w_hid": 2.0,
                                                             "w_att": 0.25})
    from transformers import AutoConfig

    mapping = load_layer_map(chopped, tiny_dir)
    per_step = distill_step_flops(AutoConfig.from_pretrained(chopped), AutoConfig.from_pretrained(tiny_dir), mapping,
                                  DistillConfig(chunk_tokens=40), 4, 32)
    budget = 6.5 * per_step  # -> 6 steps, never more than the budget
    out = tmp_path / "student"
    rc = main(["train", "--params", str(pfile), "--objective", "distill", "--teacher", str(tiny_dir), "--init",
               str(chopped), "--data", str(tiny_prepared), "--out", str(out), "--run-dir", str(tmp_path / "run"),
               "--log", str(tmp_path / "log.csv"), "--metrics", str(tmp_path / "m.json"), "--flop-budget", str(budget),
               "--snapshots", "2", "--snapshot-dir", str(tmp_path / "snaps")])
    assert rc == 0
    meta = read_metadata(out)
    assert meta["steps"] == 6 and meta["objective"] == "distill" and meta["layer_map"] == mapping
    assert meta["compute"]["flops"] == 6 * per_step <= budget
    assert meta["compute"]["tokens"] == 6 * 4 * 32 and "device_s" not in meta["compute"]  # no wall time in it
    m = read_json(tmp_path / "m.json")
    assert m["flops"] == 6 * per_step and m["tokens"] == 768 and m["s_per_step"] > 0 and m["device_s"] > 0
    # the peak LR and the validation at the end (what the LR sweep's table reads)
    assert m["lr"] == 3e-3 and m["val_ppl_last"] == pytest.approx(meta["val_ppl_last"]) and m["val_ppl_last"] > 1
    # each snapshot's wall times, and the machine, in the run's metrics
    assert sorted(m["snapshots"]) == ["step_000002", "step_000004"]
    assert 0 < m["snapshots"]["step_000002"]["device_s"] < m["snapshots"]["step_000004"]["device_s"] < m["device_s"]
    assert m["machine"]["threads"] >= 1 and m["machine"]["cpu"]
    assert m["machine"]["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    snaps = sorted(p.name for p in (tmp_path / "snaps").iterdir())
    assert snaps == ["step_000002", "step_000004"]
    assert read_metadata(tmp_path / "snaps" / "step_000002")["compute"]["flops"] == 2 * per_step
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    assert not any("proj" in k and ("hid_" in k or "emb_" in k) for k in model.state_dict())
    with open(tmp_path / "log.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 6
    # the logged total is the weighted sum of the logged terms (a dropped, doubled or unweighted term fails)
    weights = yaml.safe_load(open(pfile))["distill"]
    for r in rows:
        total = sum(weights[f"w_{name}"] * float(r[f"train/loss_{name}"]) for name in TERMS)
        assert float(r["train/loss"]) == pytest.approx(total, rel=1e-5), r
    assert all(float(r["train/loss_hid"]) > 0 for r in rows)  # the student's hidden states differ from the teacher's
    flops_logged = [float(r["train/flops"]) for r in csv.DictReader(open(tmp_path / "log.csv")) if r.get("train/flops")]
    assert flops_logged == [k * per_step for k in range(1, 7)]


def test_fsdp2_distill_two_cpu_processes(tmp_path, tiny_dir, tiny_prepared):
    """Teacher and student both sharded with FSDP2 (ModelParallelStrategy, 2 gloo ranks), via the CLI; balanced terms
    (``--balance initial``: the scales measured on both ranks' first batches, averaged, the same on every rank)."""
    pfile, chopped = chopped_setup(tmp_path, tiny_dir, dict(token_budget=4 * 2 * 2 * 32, batch_size=2,
                                                             strategy="fsdp", devices=2, ckpt_every=2),
                                   {"chunk_tokens": 24})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "layerchop.cli", "train", "--params", str(pfile), "--objective", "distill",
           "--teacher", str(tiny_dir), "--init", str(chopped), "--data", str(tiny_prepared), "--out",
           str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"), "--log", str(tmp_path / "log.csv"),
           "--snapshots", "1", "--snapshot-dir", str(tmp_path / "snaps"), "--balance", "initial"]
    # interrupted after step 2's checkpoint, then resumed: FSDP2 restores the checkpoint after on_fit_start, and the
    # resumed run must take the scales from it on both ranks rather than measure new ones on a trained model
    first = subprocess.run(cmd + ["--stop-after", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    assert not (tmp_path / "out").exists()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr
    measured = [line for out in (first.stdout, proc.stdout) for line in out.splitlines() if "term scales" in line]
    assert len(measured) == 1, measured  # measured once, by the first invocation
    with open(tmp_path / "log.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 4 and all(float(r["train/loss_kl"]) >= 0 for r in rows)
    assert float(rows[0]["train/loss_emb"]) == 0.0  # identity projection of an identical table at step 1
    assert float(rows[-1]["train/loss"]) < float(rows[0]["train/loss"])
    from layerchop.io import read_metadata

    scales = read_metadata(tmp_path / "out")["distill_term_scales"]
    assert scales["lm"] == 1.0 and scales["emb"] == 1.0 and 0 < scales["hid"] != 1.0
    weights = yaml.safe_load(open(pfile))["distill"]
    for r in rows:  # rank 0 logs its own terms; the total is their weighted, scaled sum
        total = sum(weights[f"w_{name}"] * scales[name] * float(r[f"train/loss_{name}"]) for name in TERMS)
        assert float(r["train/loss"]) == pytest.approx(total, rel=1e-5), r
    from transformers import AutoModelForCausalLM

    for d in (tmp_path / "out", tmp_path / "snaps" / "step_000002"):
        model = AutoModelForCausalLM.from_pretrained(d)
        assert model.config.num_hidden_layers == 4
    # the teacher on disk is untouched
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ref = make_tiny_llama()
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), ref.state_dict().values()))


def test_equal_flop_arms_curves_and_figure4(tmp_path, tiny_dir, tiny_prepared):
    """The Figure 4 recipe end to end on the tiny model: three arms (LayerChop, distillation with the paper's
    unweighted sum and with balanced terms), one FLOP budget, curves, figure, table, and the caption's paired tests."""
    from layerchop.cli import main
    from layerchop.io import read_json, read_metadata

    from conftest import short_piqa_mirror

    piqa = short_piqa_mirror(tmp_path / "piqa")  # the general task, through the local-mirror path
    pfile, chopped = chopped_setup(tmp_path, tiny_dir, {}, evaluate=dict(ppl_max_sequences=4, limit=8, batch_size=4,
                                                                         local_tasks={"piqa": str(piqa)}),
                                   figure4={"flop_budget": 2.0e9})
    P = ["--params", str(pfile)]
    assert main(["evaluate", *P, "--model", str(chopped), "--data", str(tiny_prepared), "--out",
                 str(tmp_path / "eval" / "chopped")]) == 0
    kd_flags = ["--objective", "distill", "--teacher", str(tiny_dir)]
    for arm, extra in (("layerchop", ["--objective", "lm"]), ("distill", kd_flags),
                       ("distill-balanced", [*kd_flags, "--balance", "initial"])):
        assert main(["train", *P, *extra, "--init", str(chopped), "--data", str(tiny_prepared), "--out",
                     str(tmp_path / arm), "--run-dir", str(tmp_path / "runs" / arm), "--flop-budget", "2.0e9",
                     "--snapshots", "2", "--snapshot-dir", str(tmp_path / "snaps" / arm),
                     "--metrics", str(tmp_path / f"{arm}.json")]) == 0
        assert main(["curve", *P, "--snapshots", str(tmp_path / "snaps" / arm), "--final", str(tmp_path / arm),
                     "--record", str(tmp_path / f"{arm}.json"), "--data", str(tiny_prepared), "--out",
                     str(tmp_path / "eval" / f"fig4-{arm}")]) == 0
    lm, kd = (read_metadata(tmp_path / a)["compute"] for a in ("layerchop", "distill"))
    # same budget, never exceeded; distillation steps cost more, so it takes fewer of them
    assert lm["flops"] <= 2.0e9 and kd["flops"] <= 2.0e9
    assert 2.0e9 - lm["flops"] < lm["flops_per_step"] and 2.0e9 - kd["flops"] < kd["flops_per_step"]
    assert kd["flops_per_step"] > lm["flops_per_step"] and kd["steps"] < lm["steps"]
    curve = read_json(tmp_path / "eval" / "fig4-distill" / "curve.json")
    assert [p["step"] for p in curve["points"]][-1] == kd["steps"] and len(curve["points"]) == 3
    assert all(a["flops"] < b["flops"] for a, b in zip(curve["points"], curve["points"][1:]))
    figure4 = ["figure4", *P, "--curves", *(str(tmp_path / "eval" / f"fig4-{a}" / "curve.json")
                                            for a in ("layerchop", "distill", "distill-balanced")), "--start",
               str(tmp_path / "eval" / "chopped" / "metrics.json"), "--tables", str(tmp_path / "tables"),
               "--figures", str(tmp_path / "figs")]
    # the dense reference line: any evaluation's metrics.json (the chopped one stands in); a missing one is refused
    assert main([*figure4, "--dense", str(tmp_path / "eval" / "dense" / "metrics.json")]) == 2
    assert not (tmp_path / "tables").exists()
    assert main([*figure4, "--dense", str(tmp_path / "eval" / "chopped" / "metrics.json")]) == 0
    table = (tmp_path / "tables" / "distill.md").read_text()
    assert "LayerChop + distill" in table and "A100-hours @ 40% MFU" in table
    assert f"{kd['tokens']:,}" in table and f"{lm['tokens']:,}" in table
    # in-domain and general accuracy, each with its item count, per arm and along the runs
    assert "in-domain: heldout_lastword (acc_norm, n=8)" in table and "general: piqa (acc_norm, n=8)" in table
    assert "| In-domain acc | General acc |" in table
    # which arm follows the paper's protocol, the balanced arm's measured scales, and each claim's paired test
    scales = read_json(tmp_path / "eval" / "fig4-distill-balanced" / "curve.json")["distill_term_scales"]
    assert scales == read_metadata(tmp_path / "distill-balanced")["distill_term_scales"] and scales["lm"] == 1.0
    assert "LayerChop + distill (the paper's unweighted sum)" in table
    assert "LayerChop + distill (terms balanced at step 0)" in table and f"hid x{scales['hid']:.3g}" in table
    for arm in ("the paper's unweighted sum", "terms balanced at step 0"):
        assert f"CHOP + distill ({arm}) against LayerChop: general" in table
    assert "McNemar exact" in table  # the curves wrote the final models' per-item results
    for ext in ("png", "pdf"):
        assert (tmp_path / "figs" / f"fig4_distill_vs_layerchop.{ext}").stat().st_size > 10_000


def test_fsdp2_shards_teacher_and_student(tmp_path, tiny_dir, tiny_prepared):
    """Inside the 2-rank run: the teacher is built on the meta device, fully_shard-ed per layer and at the
    root (DTensor parameters, about half of them local to each rank), receives exactly the checkpoint's
    weights from rank 0, stays in eval mode without gradients, and is unchanged. With 2 micro-batches per
    step, gradients are reduce-scattered once per step (the sharded gradients appear only after the last)."""
    import json

    script = Path(__file__).parent / "scripts" / "fsdp_distill_check.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tiny_dir), str(tiny_prepared), str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    reports = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world"] == 2 and rep["steps"] == 2 and rep["loss_finite"]
        assert rep["teacher_root_fsdp"] and rep["teacher_layers_fsdp"] and rep["teacher_all_dtensor"]
        assert not rep["teacher_training"] and not rep["teacher_requires_grad"] and rep["teacher_unchanged"]
        assert rep["student_root_fsdp"] and rep["student_all_dtensor"]
        assert 0.4 < rep["teacher_local_fraction"] < 0.6 and 0.4 < rep["student_local_fraction"] < 0.6
        assert rep["grads_after_backward"] == [False, True, False, True]


def test_interrupted_distill_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_dir, tiny_prepared):
    """Projections, optimizer, data position and the compute record come back from the checkpoint;
    snapshots written before the interruption are kept."""
    from safetensors.torch import load_file

    from layerchop.io import read_json, read_metadata
    from layerchop.prune.chop import chop_layers
    from layerchop.train.run import run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerchop.io import save_model_dir

    student = AutoModelForCausalLM.from_pretrained(tiny_dir)
    kept = chop_layers(student, [2, 3])
    chopped = tmp_path / "chopped"
    save_model_dir(student, AutoTokenizer.from_pretrained(tiny_dir), chopped,
                   metadata={"removed_layers": [2, 3], "kept_layers": kept, "num_layers_before": 6})
    cfg = tiny_cfg(token_budget=6 * 4 * 32, ckpt_every=3)
    kw = dict(objective="distill", teacher_dir=tiny_dir, distill_cfg=DistillConfig(chunk_tokens=50), snapshots=1)
    run(chopped, tiny_prepared, tmp_path / "a", cfg, run_dir=tmp_path / "run_a", resume="never",
          snapshot_dir=tmp_path / "snap_a", **kw)
    run(chopped, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run_b", stop_after=4,
          snapshot_dir=tmp_path / "snap_b", **kw)
    assert not (tmp_path / "b").exists() and len(list((tmp_path / "run_b").glob("*/snapshots/step_000003"))) == 1
    meta = run(chopped, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run_b", resume="auto",
                 snapshot_dir=tmp_path / "snap_b", log_csv=tmp_path / "b.csv", metrics=tmp_path / "b.json", **kw)
    assert meta["steps"] == 6 and meta["compute"]["flops"] == 6 * meta["compute"]["flops_per_step"]
    # the wall times: the run's (both invocations), and the snapshot's, written before the interruption
    m = read_json(tmp_path / "b.json")
    assert 0 < m["snapshots"]["step_000003"]["train_s"] < m["train_s"] and m["snapshots"]["step_000003"]["steps"] == 3
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert sorted(p.name for p in (tmp_path / "snap_b").iterdir()) == ["step_000003"]
    assert read_metadata(tmp_path / "snap_b" / "step_000003")["compute"]["steps"] == 3


def test_activation_checkpointing_keeps_no_recomputed_activations(tiny_dir):
    """With the student's layers recomputed in backward, the capture hooks record only the real forward."""
    from transformers import AutoModelForCausalLM

    from layerchop.prune.chop import chop_layers
    from layerchop.train.distill import DistillStudent, distill_step, freeze, teacher_capture
    from layerchop.train.sharding import enable_activation_checkpointing

    teacher = freeze(AutoModelForCausalLM.from_pretrained(tiny_dir))
    student = copy.deepcopy(teacher).train()
    student.requires_grad_(True)
    mapping = chop_layers(student, [2, 3])
    enable_activation_checkpointing(student)
    cfg = DistillConfig(chunk_tokens=16)
    module = DistillStudent(student, 32, mapping, cfg).train()
    x = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    total, terms = distill_step(module, teacher, teacher_capture(teacher, mapping, cfg), x, x)
    total.backward()
    assert set(terms) == {"lm", "kl", "hid", "att", "emb"}
    assert module.capture.hidden == {} and module.capture.attn == {} and module.capture.final is None
    assert all(p.grad is not None for p in student.parameters())


def test_balance_scales_bring_every_term_to_the_lm_term():
    from layerchop.train.distill import balance_scales

    scales = balance_scales({"lm": 10.0, "kl": 2.0, "hid": 5.0e4, "emb": 0.0})
    assert scales == {"lm": 1.0, "kl": 5.0, "hid": 2.0e-4, "emb": 1.0}  # a term at 0 keeps its weight
    # ... and one at 0 up to rounding (bf16 autocast: ~1e-9), whose inverse would blow up once it moves
    assert balance_scales({"lm": 10.0, "emb": 1.08e-9, "att": 2e-5})["emb"] == 1.0
    assert balance_scales({"lm": 10.0, "att": 2e-5})["att"] == pytest.approx(5e5)  # 2e-6 of LM: still balanced
    assert balance_scales({"kl": 4.0, "hid": 8.0}) == {"kl": 2.0, "hid": 1.0}  # no LM term: the largest one
    for bad in ({"lm": 1.0, "hid": float("nan")}, {"lm": 0.0, "kl": 0.0}, {"lm": 1.0, "kl": -1.0}):
        with pytest.raises(ValueError, match="distill.balance"):
            balance_scales(bad)
    with pytest.raises(ValueError, match="distill.balance"):
        DistillConfig(balance="magnitude")


def test_balanced_run_starts_with_equal_weighted_terms_and_resumes_to_the_uninterrupted_result(
        tmp_path, tiny_dir, tiny_prepared):
    """``--balance initial``: the scales come from the first batch, so at step 1 every weighted term equals its
    weight times the LM term; they are kept in the checkpoint (an interrupted run ends on the same weights) and in the
    export's ``layerchop.json``; the logged total is the weighted, scaled sum at every step."""
    from safetensors.torch import load_file

    from layerchop.cli import main
    from layerchop.io import read_metadata

    pfile, chopped = chopped_setup(tmp_path, tiny_dir, {"token_budget": 5 * 4 * 32, "ckpt_every": 2},
                                   {"chunk_tokens": 40, "w_kl": 0.5, "w_hid": 2.0, "w_att": 0.25})
    weights = yaml.safe_load(open(pfile))["distill"]

    def train(name, *extra):
        return main(["train", "--params", str(pfile), "--objective", "distill", "--balance", "initial", "--teacher",
                     str(tiny_dir), "--init", str(chopped), "--data", str(tiny_prepared), "--out", str(tmp_path / name),
                     "--run-dir", str(tmp_path / f"run_{name}"), "--log", str(tmp_path / f"{name}.csv"), *extra])

    assert train("a") == 0
    assert train("b", "--stop-after", "3") == 0 and not (tmp_path / "b").exists()
    assert train("b") == 0  # resumes from step 2's checkpoint: the scales come from it, not from a new batch
    meta_a, meta_b = read_metadata(tmp_path / "a"), read_metadata(tmp_path / "b")
    assert meta_a["distill"]["balance"] == "initial"
    scales = meta_a["distill_term_scales"]
    assert scales == meta_b["distill_term_scales"] and set(scales) == set(TERMS)
    assert scales["lm"] == 1.0 and scales["hid"] != 1.0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    with open(tmp_path / "a.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 5
    first = {name: float(rows[0][f"train/loss_{name}"]) for name in TERMS}
    for name in TERMS:
        if first[name] > 0:  # every weighted term starts at its weight times the LM term
            assert weights[f"w_{name}"] * scales[name] * first[name] == pytest.approx(
                weights[f"w_{name}"] * first["lm"], rel=1e-5), name
    for r in rows:
        total = sum(weights[f"w_{name}"] * scales[name] * float(r[f"train/loss_{name}"]) for name in TERMS)
        assert float(r["train/loss"]) == pytest.approx(total, rel=1e-5), r
