"""DimChop in training (issue 14): PLATON scores from the real gradients, the schedule's masks, exact zeros after
every step, export, resume and FSDP2. The tiny 6-layer Llama (width 32, MLP 64), 8 steps, the ramp from step 2
to step 6 at a target of half the columns."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from layerchop.config import DimChopConfig, TrainConfig
from layerchop.prune.platon import column_scores, columns_to_mask, masked_fraction, num_masked
from layerchop.train.run import run

TOKENS_PER_STEP = 4 * 32
DIM = DimChopConfig(target=0.5, start=0.25, end=0.75)  # steps 2 .. 6 of 8


def cfg_(**kw) -> TrainConfig:
    base = dict(token_budget=8 * TOKENS_PER_STEP, batch_size=4, accumulate=1, lr=3e-3, warmup_steps=2,
                precision="32-true", accelerator="cpu", ckpt_every=0, val_batches=1, seed=0)
    return TrainConfig(**{**base, **kw})


def expected_masked(step: int, width: int) -> int:
    return num_masked(masked_fraction(step, 0.5, 2, 6), width)


def spy_on_dimchop(monkeypatch, module_cls, record_after):
    """Per optimizer step of the next run: the ``(weight, grad)`` pairs handed to the PLATON update (``seen``), and
    ``record_after(module)`` right after the step's masks were applied (``after``)."""
    from layerchop.train import dimchop

    seen, after = [], []
    update, apply = dimchop.platon_update, module_cls.apply_masks
    before = dimchop.DimChopModule.on_before_optimizer_step

    def spy_update(ibar, ubar, weight, grad, beta1, beta2):
        seen[-1].append((weight.clone(), grad.clone()))
        return update(ibar, ubar, weight, grad, beta1, beta2)

    def spy_before(self, optimizer):
        seen.append([])
        return before(self, optimizer)

    def spy_apply(self):
        apply(self)
        after.append(record_after(self))

    monkeypatch.setattr(dimchop, "platon_update", spy_update)
    monkeypatch.setattr(dimchop.DimChopModule, "on_before_optimizer_step", spy_before)
    monkeypatch.setattr(module_cls, "apply_masks", spy_apply)
    return seen, after


def direct_averages(ibar: dict, ubar: dict, names: list[str], pairs) -> None:
    """One step of PLATON's recurrence with the default betas, written out, in place."""
    for n, (w, g) in zip(names, pairs):
        sens = (w * g).abs()
        ibar[n] = 0.85 * ibar[n] + 0.15 * sens
        ubar[n] = 0.95 * ubar[n] + 0.05 * (sens - ibar[n]).abs()


def test_dimchop_masks_follow_the_schedule_from_platon_scores_and_stay_zero(tmp_path, tiny_dir, tiny_prepared,
                                                                            monkeypatch):
    """Every optimizer step: the averages take the step's gradient at the weights it was taken at; during the ramp
    the masks are the lowest column scores at the schedule's fraction; masked columns are exactly zero after every
    step; the export carries the zeros and the masks file and loads with plain transformers."""
    from transformers import AutoModelForCausalLM

    from layerchop.io import read_metadata
    from layerchop.prune.masks import load_masks
    from layerchop.train import dimchop

    def masked_columns(module):  # {name: (masked columns, max |masked weight|)}
        params = dict(module.model.named_parameters())
        return {n: (module.column_mask(n).clone(), float(params[n].detach()[:, module.column_mask(n)].abs().max())
                    if module.column_mask(n).any() else 0.0) for n in module.names}

    seen, after = spy_on_dimchop(monkeypatch, dimchop.DimChopModule, masked_columns)
    meta = run(tiny_dir, tiny_prepared, tmp_path / "out", cfg_(), run_dir=tmp_path / "run", objective="dimchop",
               dimchop_cfg=DIM)
    monkeypatch.undo()

    dense = AutoModelForCausalLM.from_pretrained(tiny_dir)
    names = [n for n, _ in dense.named_parameters() if n.rsplit(".", 2)[-2] in DIM.matrices]
    assert len(names) == 6 * 7 and len(seen) == 8 and len(after) == 8
    assert all(len(s) == len(names) for s in seen)
    # the PLATON averages, directly from the recorded weights and gradients, and the masks they select
    widths = {n: dict(dense.named_parameters())[n].shape[1] for n in names}
    ibar = {n: torch.zeros_like(dict(dense.named_parameters())[n]) for n in names}
    ubar = {n: torch.zeros_like(ibar[n]) for n in names}
    for step, pairs in enumerate(seen, start=1):
        direct_averages(ibar, ubar, names, pairs)
        for n in names:
            mask, worst = after[step - 1][n]
            assert int(mask.sum()) == expected_masked(step, widths[n]), (step, n)
            assert worst == 0.0, (step, n)  # masked weights are exactly zero after the step
            if 2 < step <= 6:  # chosen at this step from the current scores
                want = columns_to_mask(column_scores(ibar[n], ubar[n]), expected_masked(step, widths[n]))
                assert torch.equal(mask, want), (step, n)
            elif step > 6:  # fixed after the ramp
                assert torch.equal(mask, after[5][n][0])
    # at the first update, the weights the sensitivity used are the ones the gradient was taken at: the init's
    torch.testing.assert_close(seen[0][0][0], dict(dense.named_parameters())[names[0]].detach())
    assert [int(after[s][names[0]][0].sum()) for s in range(8)] == [0, 0, 9, 14, 15, 16, 16, 16]  # 32 x 0.5 (1 - (1 - p)^3), rounded down

    # the export: plain HF directory with the zeros and the masks file
    out = tmp_path / "out"
    masks = load_masks(out)
    assert set(masks) == set(names)
    w = load_file(out / "model.safetensors")
    for n in names:
        col = after[-1][n][0]
        assert torch.equal(masks[n], col.unsqueeze(0).expand_as(masks[n]))
        assert int(torch.count_nonzero(w[n][masks[n]])) == 0
    m = read_metadata(out)
    assert m["method"] == "dimchop" and m["dimchop"]["ramp_steps"] == [2, 6] and m["masked_nonzero_after_training"] == 0
    assert meta["compute"]["steps"] == 8
    model = AutoModelForCausalLM.from_pretrained(out)
    masked = sum(int(masks[n].sum()) for n in names)
    assert masked == sum(widths[n] // 2 * dict(dense.named_parameters())[n].shape[0] for n in names)
    assert model.config.num_hidden_layers == 6


class Killed(Exception):
    pass


def test_a_dimchop_run_killed_mid_ramp_resumes_to_the_same_model(tmp_path, tiny_dir, tiny_prepared, monkeypatch):
    """Scores, masks and schedule position are in the checkpoint: a run killed at step 4 (mid-ramp) and resumed
    ends with the uninterrupted run's weights and masks."""
    from layerchop.prune.masks import load_masks
    from layerchop.train import checkpoint

    cfg = cfg_(ckpt_every=1)
    run(tiny_dir, tiny_prepared, tmp_path / "a", cfg, run_dir=tmp_path / "run_a", objective="dimchop",
        dimchop_cfg=DIM, metrics=tmp_path / "a.json")
    save = checkpoint.AtomicCheckpoint.save

    def save_then_die(self, trainer):
        path = save(self, trainer)
        if trainer.global_step == 4:
            raise Killed(path)
        return path

    monkeypatch.setattr(checkpoint.AtomicCheckpoint, "save", save_then_die)
    with pytest.raises(Killed):
        run(tiny_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run_b", objective="dimchop",
            dimchop_cfg=DIM)
    monkeypatch.undo()
    assert not (tmp_path / "b").exists()
    [ck] = (tmp_path / "run_b").glob("*/checkpoints/step00000004.ckpt")
    ckpt = torch.load(ck, weights_only=True)
    state = ckpt["state_dict"]
    assert any(k.startswith("platon.ibar__") for k in state) and any(k.startswith("platon.mask__") for k in state)
    assert ckpt["dimchop_scoring"]["mask_updates"] == 2 and ckpt["dimchop_scoring"]["scoring_s"] > 0  # steps 3, 4
    run(tiny_dir, tiny_prepared, tmp_path / "b", cfg, run_dir=tmp_path / "run_b", objective="dimchop",
        dimchop_cfg=DIM, metrics=tmp_path / "b.json")
    # the scoring's cost, across the resume: masks chosen at steps 3..6, PLATON's 10 FLOPs per pruned weight a step
    # and 3 per mask choice, its wall time a part of the run's
    from layerchop.io import read_json, read_metadata

    entries = sum(w.numel() for k, w in load_file(tmp_path / "a" / "model.safetensors").items()
                  if k.rsplit(".", 2)[-2] in DIM.matrices)
    for out in ("a", "b"):
        c, m = read_metadata(tmp_path / out)["compute"], read_json(tmp_path / f"{out}.json")
        assert c["scoring_mask_updates"] == 4 and c["scoring_flops"] == 10 * entries * 8 + 3 * entries * 4
        assert "scoring_device_s" not in c and "device_s" not in c  # wall times: the run's metrics, not the model
        assert 0 < m["scoring_device_s"] < m["device_s"] and m["scoring_mask_updates"] == 4
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # one process on the CPU: bit for bit
    ma, mb = load_masks(tmp_path / "a"), load_masks(tmp_path / "b")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("structure,world", [("columns", 3), ("channels-heads", 2)])
def test_fsdp2_processes_grow_the_same_masks(tmp_path, tiny_dir, tiny_prepared, structure, world):
    """Under FSDP2 (CPU processes through the CLI; each rank scores its own rows and the column sums are
    all-reduced) the masks and weights equal the single process's: with 3 processes every matrix is sharded unevenly
    (32 rows: 11, 11, 10; 64: 22, 22, 20; 16: 6, 6, 4); the structured run with 2, also after a stop and resume
    mid-ramp from its sharded checkpoint."""
    from layerchop.prune.masks import load_masks

    import dataclasses

    from layerchop.config import section

    params = yaml.safe_load(open(Path(__file__).resolve().parents[1] / "params.yaml"))
    params["dimchop"] = {"target": 0.5, "start": 0.25, "end": 0.75, "structure": structure}
    params["train"].update(token_budget=8 * world * 2 * 32, batch_size=2, lr=3e-3, warmup_steps=2,
                           precision="32-true", accelerator="cpu", ckpt_every=1, val_batches=1, strategy="fsdp",
                           devices=world, seed=0)
    # the single-process reference, in this process, with the same params: 1 rank x batch 2 * world sees the
    # sequences of world ranks x batch 2 (the sampler interleaves ranks)
    single = dataclasses.replace(section("train", params), strategy="auto", devices=1, batch_size=2 * world)
    run(tiny_dir, tiny_prepared, tmp_path / "single", single, run_dir=tmp_path / "run_1", objective="dimchop",
        dimchop_cfg=section("dimchop", params))
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "layerchop.cli", "train", "--params", str(tmp_path / "fsdp.yaml"),
           "--objective", "dimchop", "--init", str(tiny_dir), "--data", str(tiny_prepared),
           "--out", str(tmp_path / "fsdp"), "--run-dir", str(tmp_path / "run_fsdp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if structure == "channels-heads":  # stopped mid-ramp, then resumed from its sharded checkpoint (one case: time)
        proc = subprocess.run(cmd + ["--stop-after", "4"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert "stopped at step 4 of 8" in proc.stdout and not (tmp_path / "fsdp").exists()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"MEMBER: {world}/{world}" in proc.stdout + proc.stderr
    outs = {k: load_file(tmp_path / k / "model.safetensors") for k in ("single", "fsdp")}
    masks = {k: load_masks(tmp_path / k) for k in ("single", "fsdp")}
    assert masks["single"].keys() == masks["fsdp"].keys()
    for k in masks["single"]:
        assert torch.equal(masks["single"][k], masks["fsdp"][k]), k
        if structure == "columns":
            assert math.isclose(masks["single"][k].float().mean().item(), 0.5)
    assert any(m.any() for m in masks["fsdp"].values())
    for k in outs["single"]:
        torch.testing.assert_close(outs["single"][k], outs["fsdp"][k], rtol=1e-4, atol=1e-5, msg=k)
    # the scoring's cost record: the same mask choices and FLOPs (the structured run's across its resume)
    from layerchop.io import read_metadata

    c1, cf = (read_metadata(tmp_path / k)["compute"] for k in ("single", "fsdp"))
    assert c1["scoring_mask_updates"] == cf["scoring_mask_updates"] == 4
    assert c1["scoring_flops"] == cf["scoring_flops"] > 0


STRUCT = DimChopConfig(target=0.5, start=0.25, end=0.75, structure="channels-heads")


def test_structured_dimchop_masks_whole_units_and_shrinks_to_a_smaller_model(tmp_path, tiny_dir, tiny_prepared,
                                                                             monkeypatch):
    """channels-heads: each layer masks its lowest-scoring MLP channels and head groups (a unit's score: the sum of
    its entries' PLATON scores over the seven projections), all their entries are zero after every step, and
    ``layerchop shrink`` exports a physically smaller Llama with the masked model's logits."""
    from transformers import AutoModelForCausalLM

    from layerchop.cli import main
    from layerchop.io import read_metadata
    from layerchop.prune.structured import channel_scores, group_scores
    from layerchop.train import dimchop

    def masked_units(module):  # ({layer: (masked channels, masked groups)}, max |masked entry|)
        params = dict(module.model.named_parameters())
        masks = module.export_masks()
        return ({layer: tuple(m.clone() for m in module.unit_masks(layer)) for layer in range(6)},
                max(float(params[n].detach()[m].abs().max()) if m.any() else 0.0 for n, m in masks.items()))

    seen, after = spy_on_dimchop(monkeypatch, dimchop.StructuredDimChopModule, masked_units)
    run(tiny_dir, tiny_prepared, tmp_path / "out", cfg_(), run_dir=tmp_path / "run", objective="dimchop",
        dimchop_cfg=STRUCT)
    monkeypatch.undo()

    dense = AutoModelForCausalLM.from_pretrained(tiny_dir)
    names = [n for n, _ in dense.named_parameters() if n.rsplit(".", 2)[-2] in STRUCT.matrices]
    ibar = {n: torch.zeros_like(p) for n, p in dense.named_parameters() if n in names}
    ubar = {n: torch.zeros_like(ibar[n]) for n in names}
    for step, pairs in enumerate(seen, start=1):
        direct_averages(ibar, ubar, names, pairs)
        units, worst = after[step - 1]
        assert worst == 0.0, step  # every entry of a masked unit is zero after the step
        frac = masked_fraction(step, 0.5, 2, 6)
        score = {n: ibar[n] * ubar[n] for n in names}
        for layer in range(6):
            chan, grp = units[layer]
            assert (int(chan.sum()), int(grp.sum())) == (num_masked(frac, 64), num_masked(frac, 2)), (step, layer)
            if 2 < step <= 6:
                assert torch.equal(chan, columns_to_mask(channel_scores(score, layer), num_masked(frac, 64)))
                assert torch.equal(grp, columns_to_mask(group_scores(score, layer, dense.config),
                                                        num_masked(frac, 2)))
    assert [int(after[s][0][0][1].sum()) for s in range(8)] == [0, 0, 0, 0, 0, 1, 1, 1]  # floor(2 f) groups

    # the shrink stage: a smaller plain Llama computing what the masked export computes
    assert main(["shrink", "--model", str(tmp_path / "out"), "--out", str(tmp_path / "small")]) == 0
    masked = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    c = small.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 2, 1, 8)
    ids = torch.randint(3, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, masked(ids).logits, rtol=1e-4, atol=1e-4)
    meta = read_metadata(tmp_path / "small")
    assert meta["num_params_before_shrink"] - meta["num_params"] == 6 * (9280 - 4672)  # per-layer, test_structured
    # the paper's column masks are not whole units: refused in one line
    run(tiny_dir, tiny_prepared, tmp_path / "cols", cfg_(), run_dir=tmp_path / "run_c", objective="dimchop",
        dimchop_cfg=DIM)
    assert main(["shrink", "--model", str(tmp_path / "cols"), "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


def test_accumulated_gradients_score_like_one_large_batch(tmp_path, tiny_dir, tiny_prepared):
    """2 micro-batches of 2 per optimizer step give the scores, masks and weights of one batch of 4: the averages
    take the step's accumulated gradient once, not each micro-batch's."""
    from layerchop.prune.masks import load_masks

    for name, kw in (("one", dict(batch_size=4)), ("acc", dict(batch_size=2, accumulate=2))):
        run(tiny_dir, tiny_prepared, tmp_path / name, cfg_(**kw), run_dir=tmp_path / f"run_{name}",
            objective="dimchop", dimchop_cfg=DIM)
    ma, mb = load_masks(tmp_path / "one"), load_masks(tmp_path / "acc")
    assert all(torch.equal(ma[k], mb[k]) for k in ma) and any(m.any() for m in ma.values())
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "acc" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_dimchop_refuses_what_it_cannot_run(tmp_path, tiny_dir, tiny_prepared, capsys):
    from layerchop.cli import main
    from layerchop.train.plan import resolve

    # train --structure (one dvc stage per structure) is checked as the section is
    params = yaml.safe_load(open(Path(__file__).resolve().parents[1] / "params.yaml"))
    params["dimchop"]["matrices"] = ["q_proj"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    base = ["train", "--params", str(tmp_path / "p.yaml"), "--init", str(tiny_dir), "--data", str(tiny_prepared),
            "--out", str(tmp_path / "o"), "--run-dir", str(tmp_path / "r")]
    assert main(base + ["--structure", "columns"]) == 2
    assert "--structure columns is not an option of --objective lm" in capsys.readouterr().err
    assert main(base + ["--objective", "dimchop", "--structure", "channels-heads"]) == 2
    assert "dimchop.matrices=['q_proj'] is invalid: dimchop.structure=channels-heads" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()

    with pytest.raises(ValueError, match=r"train.precision='bf16-true': --objective dimchop"):
        resolve(tiny_dir, tiny_prepared, tmp_path / "o", tmp_path / "r", cfg_(precision="bf16-true"),
                objective="dimchop", dimchop_cfg=DIM)
    with pytest.raises(ValueError, match=r"dimchop.end=1.5"):
        DimChopConfig(start=0.1, end=1.5)
    with pytest.raises(ValueError, match=r"dimchop.end=0.1 is invalid: need dimchop.start < dimchop.end"):
        DimChopConfig(start=0.2, end=0.1)
    with pytest.raises(ValueError, match=r"dimchop.matrices=\['q_proj'\] is invalid: dimchop.structure=channels-heads"):
        DimChopConfig(matrices=["q_proj"], structure="channels-heads")
    with pytest.raises(ValueError, match=r"a run of 8 steps leaves the ramp no step"):
        resolve(tiny_dir, tiny_prepared, tmp_path / "o", tmp_path / "r", cfg_(), objective="dimchop",
                dimchop_cfg=DimChopConfig(start=0.5, end=0.52))
