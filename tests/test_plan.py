"""``layerchop plan``: every shipped profile plans; each broken variant exits 2 naming its key; golden numbers of
the memory model at paper scale, checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from layerchop.cli import main
from layerchop.config import load_params, section

REPO = Path(__file__).resolve().parents[1]
PROFILES = [REPO / "params.yaml", *sorted((REPO / "experiments").glob("*/params.yaml"))]
PAPER = REPO / "experiments" / "paper-scale" / "params.yaml"


def plan(capsys, params: Path, *extra: str, dvc: Path = REPO / "dvc.yaml") -> tuple[int, str, str]:
    rc = main(["plan", "--params", str(params), "--dvc", str(dvc), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_profile_plans(capsys, path):
    rc, out, err = plan(capsys, path)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[1].split()[:5] == ["stage", "runs", "proc", "steps", "tokens"]
    arms = section("arms", load_params(path))
    end = next(i for i, line in enumerate(lines) if line.startswith("total: "))
    stages = {line.split()[0] for line in lines[3:end]}
    assert {f"train@{k}" for k in arms.trained} <= stages and len(set(arms.trained) - set(arms.replicas)) == 4
    assert {f"evaluate@{k}" for k in arms.evaluated} <= stages and len(arms.evaluated) == 6
    assert {f"evaluate_seed@{k}" for k in arms.replicas} <= stages


def test_paper_scale_numbers(capsys):
    """Llama-2-7B (6.74B parameters) on 32 GPUs, LayerChop with the dense warm start: its largest phase is the
    warm start; 16 bytes a parameter sharded 32 ways = 3.37 GB; the unsharded fp32 gradients of
    ``reduce_grads: step`` = 4 x 6.74B = 26.95 GB; activations with checkpointing 32 layers x 8192 tokens x 4096
    x 2 bytes + one layer's full set (8192 x (8 x 4096 + 2 x (6 x 4096 + 2 x 4096 + 4 x 11008))) = 2.15 + 1.53
    GB; the optimizer step (state + gradients + a 4 x 6.74B / 32 temporary) stays below the backward pass."""
    rc, out, err = plan(capsys, PAPER, "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["model"]["dense_params"] == 6_738_415_616  # Llama-2-7B's published count
    arm = next(s for s in result["stages"] if s["stage"] == "train@layerchop")
    assert (arm["processes"], arm["nodes"], arm["launcher"], arm["warm_steps"]) == (32, 4, "slurm", 500)
    parts = arm["rank_parts"]
    assert arm["rank_phase"] == "warm start (dense)"
    assert parts["state"] == pytest.approx(16 * 6_738_415_616 / 32 / 1e9, abs=0.01)
    assert parts["unsharded_grads"] == pytest.approx(4 * 6_738_415_616 / 1e9, abs=0.01)
    layer = 8192 * (8 * 4096 + 2 * 76800)  # fp32 RMSNorm inputs + bf16 values, per layer
    assert parts["activations"] == pytest.approx((32 * 8192 * 4096 * 2 + layer) / 1e9, abs=0.01)
    assert parts["activations_without_checkpointing"] == pytest.approx(32 * layer / 1e9, abs=0.01)
    assert parts["optimizer_temp"] == pytest.approx(4 * 6_738_415_616 / 32 / 1e9, abs=0.01)
    assert parts["optimizer_step"] < parts["backward"] == parts["total"] == arm["rank_gb"]
    # fsdp_reshard: step keeps the whole dense model gathered in bf16 through the warm start's backward
    assert parts["gathered_layers"] == pytest.approx(2 * 6_738_415_616 / 1e9, abs=0.01)
    # hours: the FLOPs executed (recompute of the 16 chopped layers' forward: 438,304,768 FLOPs per token and layer
    # against a 262,144,000 head, r = 16 x 438.3M / (3 x (16 x 438.3M + 262.1M)) = 0.3213) at the measured H200
    # utilization (0.42 s for 9.60e13 model FLOPs x (1 + its own r) on 989 TFLOP/s = 30.56 %)
    assert result["assumptions"]["utilization"] == pytest.approx(0.3056, abs=1e-4)
    # the dense warm start is one stage (warm_start) that the arm forks from: its hours leave out those 500 steps
    stages = {s["stage"]: s for s in result["stages"]}
    warm = stages["warm_start"]
    assert (warm["steps"], warm["processes"], arm["forks_warm_start"]) == (500, 32, True)
    assert arm["tokens"] >= 20e9 and arm["hours"] == pytest.approx(
        (arm["flops"] - warm["flops"]) * 1.3213 / (32 * 312e12 * 0.3056) / 3600, rel=1e-2)
    # the dense warm steps recompute 32 layers: r = 32 x 438.3M / (3 x (32 x 438.3M + 262.1M)) = 0.3274
    assert warm["device_flops"] == pytest.approx(warm["flops"] * 1.3274, rel=1e-3)
    assert arm["device_flops"] == pytest.approx(warm["device_flops"] + (arm["flops"] - warm["flops"]) * 1.3213,
                                                rel=1e-3)
    # the teacher's forward of the distillation arm is not recomputed: less than 1.32 x its FLOPs
    distill = stages["fig4_train@distill"]
    assert 1.1 < distill["device_flops"] / distill["flops"] < 1.25
    forks = [s for s in result["stages"] if s.get("forks_warm_start")]
    assert {s["stage"] for s in forks} == {"train@layerchop", "fig4_train@layerchop", *(
        f"layout_train@{k}" for k in ("output", "middle", "max-gap", "both", "angular", "block-influence", "ppl"))}
    saved = (len(forks) - 1) * warm["device_flops"] / (312e12 * 0.3056) / 3600
    totals = result["totals"]
    assert totals["gpu_hours_without_the_shared_warm_start"] - totals["gpu_hours"] == pytest.approx(saved, rel=1e-3)
    # a step's traffic (the chopped model, 3,500,281,856 parameters): gathered once in bf16, reduced once in fp32,
    # 31/32 of both sent by each rank and leaving each node (ring), at 25 GB/s
    comm = arm["communication"]
    assert (comm["gathered_gb"], comm["reduced_gb"]) == (7.0, 14.0)
    assert comm["per_rank_gb"] == comm["internode_gb_per_node"] == round(31 / 32 * 3 * 3_500_281_856 * 2 / 1e9, 1)
    assert comm["internode_s"] == pytest.approx(comm["internode_gb_per_node"] / 25, abs=0.01)
    assert comm["bound"] == "compute" and result["warnings"] == []


def edited(tmp_path: Path, base: Path, **changes) -> Path:
    params = yaml.safe_load(open(base))
    for dotted, value in changes.items():
        node = params
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(params, sort_keys=False))  # the arms in their order
    return out


BROKEN = [
    ({"train__warmup_steps": 6000}, "train.warmup_steps=6000 does not fit"),
    ({"train__warm_start_steps": 5000}, "train.warm_start_steps=5000 uses the whole budget"),
    ({"figure4__flop_budget": 1.0e15}, "(figure4.flop_budget)=1e+15) before the chopped model trains a step"),
    ({"slurm__gpu_memory_gb": 24.0}, "slurm.gpu_memory_gb=24.0: warm_start needs ~50.1 GB"),
    # 74 GB without checkpointing at batch 4 (under 80 before CUDA's own overhead), so at batch 8
    ({"train__activation_checkpointing": False, "train__batch_size": 8},
     "slurm.gpu_memory_gb=80.0: warm_start needs ~"),
    ({"train__launcher": "local"}, "train.num_nodes=4 is invalid: with train.launcher 'local'"),
    ({"download__corpus__token_budget": 10_000_000_000}, "download.corpus.token_budget=10000000000: train@layerchop"),
    ({"evaluate__batch_size": 256}, "evaluate.batch_size=256: evaluation needs"),
    # the profile as it was: the data-driven chops (chop.device: cuda) would run on the login node
    ({"slurm__stages": ["prune", "evaluate", "curve"]},
     "slurm.stages=['prune', 'evaluate', 'curve']: dvc.yaml layout_chop@angular runs `layerchop chop` with "
     "chop.device=cuda on the submitting host"),
    ({"slurm__stages": ["chop", "prune", "evaluate", "curve"]}, "dvc.yaml bench runs `layerchop bench` with "
                                                                "bench.device=cuda"),
    ({"slurm__jobs": {"evaluate": {"time": "1 day"}}}, "slurm.jobs.evaluate.time='1 day' is invalid"),
    ({"bench__batch_sizes": [1, 8, 32]}, "bench.batch_sizes=[1, 8, 32]: dvc.yaml bench needs ~82.6 GB on one GPU"),
    ({"train__fsdp_reshard": "step", "train__reduce_grads": "micro_batch"},
     "train.fsdp_reshard='step' is invalid: keeping the parameters gathered"),
    ({"train__fsdp_reshard": "always"}, "train.fsdp_reshard='always' is invalid: choose one of"),
    ({"train__warmup_steps": 400}, "train.warm_start_steps=500 > train.warmup_steps=400: dvc.yaml warm_start shares"),
    ({"slurm__jobs": {"figure1": {"time": "1:00:00"}}}, "slurm.jobs='figure1' is invalid: a key of slurm.jobs"),
]


@pytest.mark.parametrize("changes,message", BROKEN, ids=[next(iter(c)) for c, _ in BROKEN])
def test_broken_paper_scale_variants_exit_2_naming_the_key(tmp_path, capsys, changes, message):
    rc, out, err = plan(capsys, edited(tmp_path, PAPER, **changes))
    assert rc == 2 and out == ""
    assert err.startswith("layerchop plan: error: ") and message in err, err
    assert len(err.splitlines()) == 1


def test_warm_start_on_a_stage_that_refuses_it(tmp_path, capsys):
    params = yaml.safe_load(open(PAPER))
    params["arms"]["trained"]["dense_cpt"]["flags"] = "--warm-start"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rc, _, err = plan(capsys, tmp_path / "params.yaml")
    assert rc == 2 and "dvc.yaml train@dense_cpt: --warm-start needs the chopped model as --init" in err, err


@pytest.mark.parametrize("checkpointing,measured_gb,phase",
                         [(True, 35.43, "optimizer_step"), (False, 55.82, "backward")])
def test_memory_model_against_a_measured_gpu_run(checkpointing, measured_gb, phase):
    """Peak allocated GPU memory measured by experiments/gpu-check/check.py on one H200 (2026-11-26, LOG): a
    1.75B Llama (32 layers, width 2048) under FSDP2 bf16-mixed, 4 x 2048 tokens, AdamW. The model must land
    within 5 % and name the phase that peaks (the foreach optimizer step with checkpointing, the backward pass
    without)."""
    import dataclasses

    from layerchop.config import TrainConfig
    from layerchop.data.sources import llama2_7b_shape_config
    from layerchop.estimate import train_memory

    config = llama2_7b_shape_config(2048, 32000, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg = dataclasses.replace(TrainConfig(), strategy="fsdp", devices=1, num_nodes=1, batch_size=4, accumulate=1,
                              precision="bf16-mixed", fsdp_param_dtype="bfloat16", fsdp_reduce_dtype="float32",
                              activation_checkpointing=checkpointing, accelerator="gpu")
    mem = train_memory(config, cfg, 2048)
    assert mem.total == pytest.approx(measured_gb, rel=0.05)
    assert getattr(mem, phase) == mem.total


def test_dimchop_memory_adds_two_fp32_copies_of_the_projections():
    """``--objective dimchop`` keeps PLATON's two fp32 averages of every pruned projection, sharded like the
    weights: 8 bytes per projection entry over the ranks (Llama-2-7B: 6.48B projection entries, 51.8 GB / 32)."""
    import dataclasses

    from transformers import LlamaConfig

    from layerchop.config import TrainConfig
    from layerchop.data.sources import LLAMA2_7B
    from layerchop.estimate import train_memory

    config = LlamaConfig(**LLAMA2_7B)
    projections = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert projections == 6_476_005_376
    cfg = dataclasses.replace(TrainConfig(), strategy="fsdp", devices=8, num_nodes=4, accelerator="gpu",
                              launcher="torchrun")
    base, dim = train_memory(config, cfg, 2048), train_memory(config, cfg, 2048, dimchop=True)
    assert dim.pruning_scores == pytest.approx(8 * projections / 32 / 1e9)
    assert dim.total == pytest.approx(base.total + dim.pruning_scores)
    assert "pruning_scores" in dim.as_dict() and "pruning_scores" not in base.as_dict()
    # and in the checkpoint, which keeps them (the Figure 3 arms of the paper-scale plan)
    from layerchop.estimate import checkpoint_gb, count_params, model_dir_gb
    from layerchop.stages.plan import plan as plan_stages

    assert checkpoint_gb(config, dimchop=True) == pytest.approx((12 * count_params(config) + 8 * projections) / 1e9)
    params = yaml.safe_load(open(REPO / "experiments" / "paper-scale" / "params.yaml"))
    stages = {s["stage"]: s for s in plan_stages(params, yaml.safe_load(open(REPO / "dvc.yaml")))["stages"]}
    for arm in ("fig3_train@dimchop", "fig3_train@structured", "fig3_train@dimchop-tokens"):
        assert stages[arm]["checkpoint_gb"] == round(checkpoint_gb(config, dimchop=True), 1) == 132.7
        assert stages[arm]["rank_parts"]["pruning_scores"] == round(8 * projections / 32 / 1e9, 2)
        # the model and its bool masks file (1 byte a projection entry), once and for each of the 4 snapshots
        assert stages[arm]["disk_gb"] == round((model_dir_gb(config, "bfloat16") + projections / 1e9) * 5, 1)
    assert stages["shrink"]["disk_gb"] == round(model_dir_gb(config, "bfloat16"), 1) == 13.5  # at most the dense


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_accelerator_stage_of_a_submitting_profile_is_a_job(capsys, path):
    """Device routing over every shipped profile: where a profile submits anything to SLURM, every stage whose
    params put it on an accelerator is submitted (the host running dvc repro is a login node without one);
    a profile that submits nothing runs everything here."""
    from layerchop.config import load_params, section
    from layerchop.launch import needs_accelerator
    from layerchop.pipeline import stage_commands

    rc, out, err = plan(capsys, path, "--json")
    assert rc == 0, err
    where = json.loads(out)["routing"]
    params = load_params(path)
    dvc = yaml.safe_load(open(REPO / "dvc.yaml"))
    commands = dict(stage_commands(dvc, params, tuple(dvc["stages"])))
    assert set(where) == set(commands)
    submits = section("train", params).launcher == "slurm" or section("slurm", params).stages
    for name, argv in commands.items():
        if submits and needs_accelerator(argv[0], params, argv[1:]):
            assert where[name].startswith("job: "), (name, where[name])
        if not submits:
            assert where[name] == "here"
    if path == PAPER:  # every GPU stage and prepare are jobs; the figures and tables are not
        assert where["layout_chop@angular"].startswith("job: 1 GPU(s)") and where["bench"].startswith("job: 1 GPU")
        assert where["prepare"] == "job: 0 GPU(s) per node, 16 CPU(s) per task, --time=24:00:00, --mem=128G"
        assert where["train@layerchop"].startswith("job: 4 node(s) x 8 task(s), 8 GPU(s) per node, 8 CPU(s)")
        assert where["report"] == where["figure1"] == "here"


def test_job_resources_defaults_and_overrides():
    """One-GPU jobs get 12 h, CPU jobs 24 h, the train jobs ``slurm.time``; all ``slurm.cpus_per_task`` CPUs a task
    (prepare: prepare.num_proc); ``slurm.jobs.<stage>`` replaces what it names and nothing else."""
    from layerchop.launch import JobResources, job_resources

    params = yaml.safe_load(open(PAPER))
    params["slurm"]["jobs"] = {}
    assert job_resources("evaluate", params) == JobResources("12:00:00", 8, None, 1)
    assert job_resources("chop", params) == JobResources("12:00:00", 8, None, 1)  # chop.device: cuda
    assert job_resources("prepare", params) == JobResources("24:00:00", 16, None, 0)  # prepare.num_proc
    assert job_resources("download", params) == JobResources("24:00:00", 8, None, 0)
    assert job_resources("train", params) == JobResources("72:00:00", 8, None, 8)
    params["slurm"]["jobs"] = {"evaluate": {"time": "2:00:00", "mem": "64G"}, "train": {"cpus_per_task": 6},
                               "prune": {"gpus": 0}}
    params["evaluate"]["device"] = "cpu"
    params["slurm"]["cpus_per_task"] = 3
    assert job_resources("evaluate", params) == JobResources("2:00:00", 3, "64G", 0)  # a CPU job now
    assert job_resources("train", params) == JobResources("72:00:00", 6, None, 8)
    assert job_resources("prune", params) == JobResources("12:00:00", 3, None, 0)


def test_plan_warns_when_communication_bounds_the_step(capsys, tmp_path):
    """At 1 GB/s between nodes and parameters gathered twice per micro-batch, a step's 222 GB outlast its compute:
    the hours follow the traffic and the plan says so, naming the key."""
    rc, out, err = plan(capsys, edited(tmp_path, PAPER, train__fsdp_reshard="forward",
                                       slurm__node_bandwidth_gb_per_s=1.0), "--json")
    assert rc == 0, err
    result = json.loads(out)
    arm = next(s for s in result["stages"] if s["stage"] == "train@layerchop")
    comm = arm["communication"]
    assert comm["bound"] == "communication" and comm["internode_s"] == pytest.approx(comm["internode_gb_per_node"], abs=0.1)
    warm = next(s for s in result["stages"] if s["stage"] == "warm_start")  # the arm forks from it
    assert arm["hours"] == pytest.approx((arm["flops"] - warm["flops"]) * arm["device_flops"] / arm["flops"]
                                         / (32 * 312e12 * result["assumptions"]["utilization"])
                                         / 3600 * comm["internode_s"] / comm["compute_s"], rel=1e-2)
    assert any(w.startswith("train@layerchop: communication bounds the step") and
               "slurm.node_bandwidth_gb_per_s=1.0" in w for w in result["warnings"])


def test_bench_memory_by_hand():
    """Llama-2-7B shapes in bf16: dense 6.74B parameters = 13.48 GB; the chopped 3.50B = 7.00 GB; a 2:4 model on
    the sparse kernel keeps half its 6.48B projection entries plus 2 bits of index each (6.48 + 0.81 GB) and its
    norms, head and embeddings dense; KV cache at batch 16 x 2176 tokens: 2 x 32 layers x 4096 x 2 bytes per
    token = 18.25 GB; the prefill's MLP transient 3 x 16 x 2048 x 11008 x 2 bytes = 2.16 GB."""
    from transformers import LlamaConfig

    from layerchop.data.sources import LLAMA2_7B
    from layerchop.estimate import bench_memory

    dense = LlamaConfig(**LLAMA2_7B)
    chopped = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": 16})
    mem = bench_memory([(dense, None), (chopped, None), (dense, (2, 4)), (dense, None)], 16, 2176, 2048, 2)
    projections = 6_476_005_376
    rest = 6_738_415_616 - projections
    sparse = projections + projections / 2 * 2 / 8 + rest * 2
    assert mem["weights"] == pytest.approx((2 * 6_738_415_616 * 2 + 3_500_281_856 * 2 + sparse) / 1e9, abs=0.01)
    assert mem["kv_cache"] == pytest.approx(2 * 32 * 4096 * 16 * 2176 * 2 / 1e9, abs=0.01)
    assert mem["prefill"] == pytest.approx(3 * 16 * 2048 * 11008 * 2 / 1e9, abs=0.01)
    assert mem["total"] == pytest.approx(mem["weights"] + mem["kv_cache"] + mem["prefill"], abs=0.02)
