"""``layerchop plan``: a dry run of the whole pipeline for a params file (no weights, no data, no GPU).

Example::

    layerchop plan --params experiments/paper-scale/params.yaml          # a table per stage
    layerchop plan --params experiments/paper-scale/params.yaml --json   # the same as JSON

For every stage ``dvc repro`` would run (read from ``dvc.yaml`` the way DVC expands it): processes, optimizer
steps, tokens, training FLOPs (the FLOP functions the runs use) and the FLOPs the devices execute (plus the
activation-checkpointing recompute), hours at ``slurm.utilization`` of ``figure4.gpu_peak_flops`` (null: the best
measured GPU step, ``layerchop.estimate.MEASURED_STEP``; the step time is the longer of its compute and its
inter-node traffic at ``slurm.node_bandwidth_gb_per_s``, with a warning when the traffic is longer), the bytes each
step moves, per-GPU memory (``layerchop.estimate``; ``bench``'s too), host memory of the loading node, where each
stage runs (here or a SLURM job, with its resources), and disk for each output plus the checkpoints. Exits 2 naming the key when a stage cannot run as configured: a
warmup or warm start that does not fit the budget, a budget below one step, a warm start on a stage that
refuses it, a topology the launcher cannot start (the config's own check), a GPU stage above ``slurm.gpu_memory_gb``, a train budget
the streamed corpus cannot cover.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import yaml

TRAIN_STAGES = ("warm_start", "train", "fig4_train", "fig2_train", "layout_train", "fig6_train", "fig3_train")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dvc", default="dvc.yaml", help="the pipeline (default: dvc.yaml)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _train_args(argv: list[str]) -> argparse.Namespace:
    from layerchop.stages import train

    p = argparse.ArgumentParser(prog="layerchop train", add_help=False)
    p.add_argument("--params", default=None)
    train.add_args(p)
    return p.parse_args(argv[1:])


def _budget_param(dvc: dict, name: str) -> str:
    """The params key a stage's ``--flop-budget`` comes from (``figure4.flop_budget``), read from its dvc.yaml command."""
    import re

    body = dvc["stages"][name.split("@")[0]]
    found = re.search(r"--flop-budget\s+\$\{([\w.]+)\}", (body.get("do") or body)["cmd"])
    return found.group(1) if found else "a literal in dvc.yaml"


def routing(params: dict, dvc: dict) -> dict[str, str]:
    """Where each stage instance of ``dvc`` runs: ``"job: ..."`` (a SLURM job with its resources) or ``"here"``
    (the host that runs ``dvc repro``).

    Raises:
        ValueError naming ``slurm.stages`` (or ``train.launcher``): a profile that submits any stage is run from a
        login node, which has no accelerator, so a stage whose params put it on one must be submitted too.
    """
    from layerchop.config import ONE_TASK_STAGES, section
    from layerchop.launch import job_resources, needs_accelerator
    from layerchop.pipeline import stage_commands

    slurm, cfg = section("slurm", params), section("train", params)
    submits = cfg.launcher == "slurm" or bool(slurm.stages)
    where: dict[str, str] = {}
    for name, argv in stage_commands(dvc, params, tuple(dvc.get("stages", {}))):
        stage = argv[0]
        job = (stage == "train" and cfg.launcher == "slurm") or (stage in ONE_TASK_STAGES and stage in slurm.stages)
        if job:
            r = job_resources(stage, params)
            nodes = f"{cfg.num_nodes} node(s) x {cfg.devices} task(s), " if stage == "train" else ""
            where[name] = (f"job: {nodes}{r.gpus_per_node} GPU(s) per node, {r.cpus_per_task} CPU(s) per task, "
                           f"--time={r.time}" + (f", --mem={r.mem}" if r.mem else ""))
            continue
        where[name] = "here"
        need = needs_accelerator(stage, params, argv[1:])
        if submits and need:
            fix = ("train.launcher: slurm" if stage == "train" else f"add {stage!r} to slurm.stages")
            raise ValueError(f"slurm.stages={slurm.stages}: dvc.yaml {name} runs `layerchop {stage}` with {need} on "
                             f"the submitting host, which runs dvc repro and has no accelerator on a cluster; {fix}")
    return where


def plan(params: dict, dvc: dict) -> dict:
    """Every stage's cost (see the module docstring). Raises ValueError naming the key that makes a stage fail."""
    from layerchop.config import section
    from layerchop.data.sources import known_config
    from layerchop.estimate import (checkpoint_gb, count_params, hours, measured_utilization, model_dir_gb,
                                    prepared_gb, recompute_flops, step_communication, train_memory)
    from layerchop.pipeline import stage_commands
    from layerchop.prune.chop import removed_indices
    from layerchop.families import check_family
    from layerchop.train.methods import method
    from layerchop.train.plan import chop_every_steps, depth_config, plan_steps

    download, prep, chop = section("download", params), section("prepare", params), section("chop", params)
    cfg0, fig4, slurm = section("train", params), section("figure4", params), section("slurm", params)
    ev, pr = section("evaluate", params), section("prune", params)
    where = routing(params, dvc)
    dense = known_config(download.model)
    if dense is None:
        raise ValueError(f"download.model.hub_id={download.model.hub_id!r}: its config.json is not on this machine "
                         "(layerchop plan never downloads); set download.model.config to the model's config.json")
    check_family(dense, "download.model")
    removed = removed_indices(dense.num_hidden_layers, layout=chop.layout, num_remove=chop.num_remove,
                              indices=chop.indices)
    kept = [i for i in range(dense.num_hidden_layers) if i not in removed]
    chopped = depth_config(dense, kept)
    dtype = download.model.dtype
    gpu = cfg0.accelerator in ("gpu", "cuda")
    stages: list[dict] = []

    corpus_tokens = download.corpus.token_budget
    if corpus_tokens is not None:
        train_tokens = corpus_tokens * (1 - prep.val_fraction - prep.test_fraction)
        stages.append({"stage": "download + prepare", "processes": 1, "disk_gb": round(
            corpus_tokens * 4 / 1e9 + prepared_gb(corpus_tokens, dense.vocab_size), 1),
            "note": "raw text ~4 bytes a token + packed token ids"})
    else:
        train_tokens = None

    chop_gb = model_dir_gb(chopped, dtype)
    for name, _ in [("chop", [])] + stage_commands(dvc, params, ("layout_chop",)):
        stages.append({"stage": name, "processes": 1, "host_gb": round(model_dir_gb(dense, dtype), 1),
                       "disk_gb": round(chop_gb, 1)})
    prune_runs = stage_commands(dvc, params, ("prune",))
    if prune_runs:
        calib = 2 * pr.num_calibration * prep.seq_len * dense.hidden_size * 4 / 1e9  # layer inputs and outputs
        one_layer = count_params(dense) / dense.num_hidden_layers * 4 / 1e9 * 2  # weights + Hessian-scale buffers
        device_gb = calib + one_layer
        if pr.device.startswith("cuda") and device_gb > slurm.gpu_memory_gb:
            raise ValueError(f"prune.num_calibration={pr.num_calibration}: one layer's calibration needs "
                             f"{device_gb:.1f} GB > slurm.gpu_memory_gb={slurm.gpu_memory_gb}")
        for name, _ in prune_runs:
            stages.append({"stage": name, "processes": 1, "rank_gb": round(device_gb, 1), "on": "gpu" if pr.device != "cpu" else "host",
                           "host_gb": round(model_dir_gb(dense, "float32"), 1),
                           "disk_gb": round(model_dir_gb(dense, dtype), 1)})

    total_gpu_hours = total_at_fig4 = total_unforked = 0.0
    util, util_source = (slurm.utilization, "slurm.utilization") if slurm.utilization else measured_utilization()
    warnings: list[str] = []
    warm_arms = []
    for name, argv in stage_commands(dvc, params, TRAIN_STAGES):
        args = _train_args(argv)
        cfg = cfg0
        if args.flop_budget is not None:
            cfg = dataclasses.replace(cfg, token_budget=None, flop_budget=args.flop_budget)
        if args.token_budget is not None:
            cfg = dataclasses.replace(cfg, token_budget=args.token_budget, flop_budget=None)
        init = chopped if Path(args.init).name in ("chopped", "scratch-init") else dense  # same architecture
        trainer = method(args.objective)
        if args.warm_start:
            if init is not chopped or not trainer.phases:
                raise ValueError(f"dvc.yaml {name}: --warm-start needs the chopped model as --init and objective lm "
                                 f"(got --init {args.init}, --objective {args.objective})")
            warm_arms.append(name)
        warm = cfg.warm_start_steps if args.warm_start else 0
        if args.warm_only and not warm:  # train.warm_start_steps: 0: the stage publishes an empty record
            stages.append({"stage": name, "processes": 1, "steps": 0, "disk_gb": 0.0,
                           "note": "train.warm_start_steps is 0: no warm start to share"})
            continue
        teacher = dense if trainer.needs_teacher else None
        budget_key = f"--flop-budget in dvc.yaml {name} ({_budget_param(dvc, name)})" if args.flop_budget else None
        chop_every = 0
        if args.chop_every_tokens is not None:  # gradual chopping, from the dense model
            if init is not chopped or not trainer.phases:
                raise ValueError(f"dvc.yaml {name}: --chop-every-tokens needs the chopped model as --init and "
                                 f"objective lm (got --init {args.init}, --objective {args.objective})")
            chop_every = chop_every_steps(args.chop_every_tokens, cfg.batch_size * prep.seq_len * cfg.accumulate
                                          * cfg.devices * cfg.num_nodes,
                                          f"dvc.yaml {name}: --chop-every-tokens {args.chop_every_tokens}")
        settings = trainer.settings(params, {"structure": args.structure})
        try:  # what the stage would refuse (a family the method cannot train), refused here
            trainer.check_config(init, teacher, settings)
        except ValueError as e:
            raise ValueError(f"dvc.yaml {name}: {e}") from None
        steps = plan_steps(cfg, prep.seq_len, init, objective=args.objective, warm_steps=warm,
                           dense_config=dense, teacher_config=teacher, method_cfg=settings, mapping=kept,
                           budget_key=budget_key, removed=removed, chop_every=chop_every,
                           chop_key=f"dvc.yaml {name}: --chop-every-tokens {args.chop_every_tokens}")
        if warm and (args.warm_only or args.warm_from) and warm > cfg.warmup_steps:
            raise ValueError(f"train.warm_start_steps={warm} > train.warmup_steps={cfg.warmup_steps}: dvc.yaml {name} "
                             "shares the warm start (--warm-only / --warm-from), whose learning rate would then "
                             "depend on each run's length; keep warm_start_steps <= warmup_steps")
        tokens = steps.total_steps * steps.tokens_per_step
        if train_tokens is not None and tokens > train_tokens * cfg.max_data_passes and not args.warm_only:
            raise ValueError(f"download.corpus.token_budget={corpus_tokens}: {name} trains on {tokens:,} tokens but "
                             f"the train split gets ~{train_tokens:,.0f} (train.max_data_passes={cfg.max_data_passes})")
        flops = steps.phase_flops + steps.main_steps * steps.flops_per_step
        world = cfg.devices * cfg.num_nodes
        # the shared warm start (--warm-only) computes the dense steps once; an arm that forks from it
        # (--warm-from) restores them: its compute record keeps them, its hours do not
        warm_flops = steps.phases[0].steps * steps.phases[0].flops_per_step if warm and steps.phases else 0
        run_flops = warm_flops if args.warm_only else flops - warm_flops if args.warm_from else flops
        trained = dense if args.warm_only else init
        phases = {"main": trainer.memory(init, cfg, prep.seq_len, teacher_config=teacher)} if not args.warm_only else {}
        if steps.phases:  # its first phase trains the dense model
            phases["gradual chopping (dense)" if chop_every else "warm start (dense)"] = train_memory(dense, cfg, prep.seq_len)
        worst = max(phases, key=lambda k: phases[k].total)
        mem = phases[worst]
        if gpu and mem.total > slurm.gpu_memory_gb:
            raise ValueError(
                f"slurm.gpu_memory_gb={slurm.gpu_memory_gb}: {name} needs ~{mem.total:.1f} GB per GPU in its {worst} "
                f"phase ({json.dumps(mem.as_dict())}); lower train.batch_size, turn on "
                "train.activation_checkpointing, use train.fsdp_reshard: forward or train.reduce_grads: micro_batch, "
                "or add GPUs")
        # the FLOPs the devices execute: plus, under activation checkpointing, each trained model's decoder layers
        # once more per micro-batch (the phases' deeper models at their own depth)
        per_step = cfg.accumulate * world
        rc_dense = recompute_flops(dense, cfg.batch_size, prep.seq_len, cfg.activation_checkpointing)
        rc_main = per_step * recompute_flops(init, cfg.batch_size, prep.seq_len, cfg.activation_checkpointing)
        rc_phases = [ph.steps * per_step * rc_dense * ph.num_layers // dense.num_hidden_layers for ph in steps.phases]
        device_flops = flops + steps.main_steps * rc_main + sum(rc_phases)
        warm_device = warm_flops + rc_phases[0] if warm_flops else 0
        run_device = warm_device if args.warm_only else device_flops - warm_device if args.warm_from else device_flops
        step_flops = (steps.phases[0].flops_per_step + per_step * rc_dense if args.warm_only
                      else steps.flops_per_step + rc_main)
        comm = step_communication(trained, cfg, step_flops, fig4.gpu_peak_flops, util, slurm.node_bandwidth_gb_per_s)
        h = hours(run_device, world, fig4.gpu_peak_flops, util)
        if not args.warm_only:  # every arm training its own warm start, as before the shared one
            total_unforked += hours(device_flops, world, fig4.gpu_peak_flops, util) * world
        if comm.bound == "communication":
            h *= comm.internode_s / comm.compute_s
            warnings.append(f"{name}: communication bounds the step ({comm.internode_gb_per_node:.0f} GB leave each "
                            f"node a step: {comm.internode_s:.1f} s at slurm.node_bandwidth_gb_per_s="
                            f"{slurm.node_bandwidth_gb_per_s} vs {comm.compute_s:.1f} s of compute); consider "
                            "train.fsdp_reshard: step or train.fsdp_sharding: hybrid")
        total_gpu_hours += h * world
        total_at_fig4 += hours(run_flops, world, fig4.gpu_peak_flops, fig4.mfu) * world
        if args.warm_only:
            tokens, flops, device_flops = steps.warm_steps * steps.tokens_per_step, warm_flops, warm_device
        loader_host = model_dir_gb(dense if steps.phases or teacher else init, dtype) * (2 if teacher else 1)
        stages.append({
            "stage": name, "processes": world, "nodes": cfg.num_nodes, "launcher": cfg.launcher,
            "steps": steps.warm_steps if args.warm_only else steps.total_steps, "warm_steps": steps.warm_steps,
            "forks_warm_start": bool(args.warm_from), "tokens": tokens, "flops": flops,
            "device_flops": device_flops, "hours": float(f"{h:.3g}"), "communication": comm.as_dict(),
            "rank_gb": round(mem.total, 2), "on": "gpu" if gpu else "host",
            "rank_phase": worst, "rank_parts": mem.as_dict(), "host_gb": round(loader_host, 1),
            # DimChop's exports carry a bool [out, in] masks file of its projections (1 byte an entry)
            "disk_gb": round((model_dir_gb(init, cfg.export_dtype or dtype) + trainer.extra_disk_gb(init))
                             * (1 + (args.snapshots or 0)), 1),
            "checkpoint_gb": round(trainer.checkpoint_gb(init) + (checkpoint_gb(dense) if steps.phases else 0), 1),
            "largest_checkpoint_gb": round(checkpoint_gb(dense) if steps.phases else trainer.checkpoint_gb(init), 1),
        })
        if args.warm_only:  # its output is the dense end checkpoint (hard links into its run directory)
            stages[-1].update(disk_gb=round(checkpoint_gb(dense), 1), checkpoint_gb=0.0,
                              largest_checkpoint_gb=round(checkpoint_gb(dense), 1))
        elif args.warm_from:  # restores the shared one and writes no copy of it
            stages[-1].update(checkpoint_gb=round(checkpoint_gb(init), 1),
                              largest_checkpoint_gb=round(checkpoint_gb(init), 1))

    for name, _ in stage_commands(dvc, params, ("shrink",)):  # DimChop's structured model with its units removed
        stages.append({"stage": name, "processes": 1, "host_gb": round(model_dir_gb(dense, "float32"), 1),
                       "disk_gb": round(model_dir_gb(dense, dtype), 1), "note": "at most the dense model's size; "
                       "reads the trained export (fp32 weights at most)"})
    evals = [(name, argv) for name, argv in stage_commands(dvc, params, tuple(dvc.get("stages", {})))
             if argv[0] in ("evaluate", "curve")]  # by command: evaluate, oneshot_evaluate, layout_evaluate, curve...
    if evals:
        e_bytes = 2 if ev.dtype in ("bfloat16", "float16") else 4
        eval_gb = count_params(dense) * e_bytes / 1e9 + ev.batch_size * prep.seq_len * dense.vocab_size * 4 / 1e9
        if ev.device.startswith("cuda") and eval_gb > slurm.gpu_memory_gb:
            raise ValueError(f"evaluate.batch_size={ev.batch_size}: evaluation needs ~{eval_gb:.1f} GB per GPU > "
                             f"slurm.gpu_memory_gb={slurm.gpu_memory_gb}")
        for name, _ in evals:
            stages.append({"stage": name, "processes": 1,
                           "rank_gb": round(eval_gb, 2), "on": "gpu" if ev.device != "cpu" else "host",
                           "disk_gb": 0.0})
    for name, argv in stage_commands(dvc, params, ("bench",)):
        stages.append(_bench_stage(name, argv, params, dense, chopped))
    disk = sum(s.get("disk_gb") or 0 for s in stages)
    return {"model": {"dense_params": count_params(dense), "chopped_params": count_params(chopped),
                      "removed_layers": removed},
            "assumptions": {"utilization": round(util, 4), "utilization_source": util_source,
                            "gpu_peak_flops": fig4.gpu_peak_flops, "gpu_memory_gb": slurm.gpu_memory_gb,
                            "node_bandwidth_gb_per_s": slurm.node_bandwidth_gb_per_s, "figure4_mfu": fig4.mfu},
            "warnings": warnings,
            "stages": stages, "warm_start_stages": warm_arms, "routing": where,
            "totals": {"gpu_hours": round(total_gpu_hours, 1),
                       "gpu_hours_model_flops_at_figure4_mfu": round(total_at_fig4, 1),
                       "gpu_hours_without_the_shared_warm_start": round(total_unforked, 1),
                       "dvc_outputs_gb": round(disk, 1),
                       "checkpoints_gb": round(sum(s.get("checkpoint_gb") or 0 for s in stages), 1),
                       "checkpoints_peak_gb": round(sum(s.get("checkpoint_gb") or 0 for s in stages)
                                                    + max((s.get("largest_checkpoint_gb") or 0 for s in stages),
                                                          default=0), 1)}}


def _bench_stage(name: str, argv: list[str], params: dict, dense, chopped) -> dict:
    """``layerchop bench``'s GPU memory: every ``--model`` resident (the chopped architecture for the model named
    ``chopped``'s directory, a 2:4 model compressed where the sparse kernel runs), the KV cache at the grid's
    largest batch and context. Refused above ``slurm.gpu_memory_gb``."""
    from layerchop.config import section
    from layerchop.estimate import bench_memory, dtype_bytes

    cfg, slurm = section("bench", params), section("slurm", params)
    models = [value.split("=", 1)[1] for flag, value in zip(argv, argv[1:]) if flag == "--model"]
    sparse = cfg.device.startswith("cuda") and cfg.dtype != "float32" and cfg.sparse_kernel != "off"
    configs = [(chopped if Path(m).name == "chopped" else dense, (2, 4) if sparse and "2of4" in Path(m).name else None)
               for m in models]
    batch, prompt = max(cfg.batch_sizes), max(cfg.prompt_lengths)
    mem = bench_memory(configs, batch, prompt + cfg.new_tokens, prompt, dtype_bytes(cfg.dtype))
    if cfg.device.startswith("cuda") and mem["total"] > slurm.gpu_memory_gb:
        raise ValueError(f"bench.batch_sizes={cfg.batch_sizes}: dvc.yaml {name} needs ~{mem['total']:.1f} GB on one GPU "
                         f"> slurm.gpu_memory_gb={slurm.gpu_memory_gb} ({len(models)} models resident: "
                         f"{mem['weights']} GB, KV cache at batch {batch} x {prompt + cfg.new_tokens} tokens: "
                         f"{mem['kv_cache']} GB, prefill {mem['prefill']} GB); lower bench.batch_sizes or "
                         "bench.prompt_lengths")
    return {"stage": name, "processes": 1, "rank_gb": mem["total"], "rank_parts": mem,
            "on": "gpu" if cfg.device != "cpu" else "host", "disk_gb": 0.0}


def table(result: dict) -> str:
    rows = [("stage", "runs", "proc", "steps", "tokens", "FLOPs", "hours", "rank GB", "on", "host GB", "disk GB",
             "ckpt GB")]
    where = result.get("routing", {})
    for s in result["stages"]:
        runs = where.get(s["stage"], "")
        rows.append((s["stage"], runs.split(":")[0], str(s.get("processes", "")), str(s.get("steps", "")),
                     f"{s['tokens']:.3g}" if "tokens" in s else "", f"{s['flops']:.3g}" if "flops" in s else "",
                     str(s.get("hours", "")), str(s.get("rank_gb", "")), s.get("on", ""),
                     str(s.get("host_gb", "")), str(s.get("disk_gb", "")), str(s.get("checkpoint_gb", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    m, a, t = result["model"], result["assumptions"], result["totals"]
    lines.insert(1, "-" * len(lines[0]))
    head = (f"dense {m['dense_params'] / 1e9:.3g}B parameters, chopped {m['chopped_params'] / 1e9:.3g}B "
            f"(layers {m['removed_layers']} removed); hours at {a['utilization']:.1%} of {a['gpu_peak_flops'] / 1e12:.0f} "
            f"TFLOP/s per GPU on the FLOPs executed, recompute included ({a['utilization_source']}); rank GB: memory of one process (largest phase), on the GPU (checked against "
            f"{a['gpu_memory_gb']} GB) or the host; host GB: the copy the loading rank reads")
    foot = (f"total: {t['gpu_hours']} GPU-hours of training, {t['dvc_outputs_gb']} GB of DVC outputs, "
            f"{t['checkpoints_gb']} GB of checkpoints kept (the last of each run, warm starts included; "
            f"{t['checkpoints_peak_gb']} GB while the largest is rewritten)")
    jobs = {}
    for name, runs in where.items():
        if runs.startswith("job:"):
            jobs.setdefault(runs, []).append(name)
    routes = [f"{', '.join(names)}: {runs}" for runs, names in jobs.items()]
    foot += (f"; {t['gpu_hours_without_the_shared_warm_start']} if every warm-started arm trained its own warm "
             f"start; {t['gpu_hours_model_flops_at_figure4_mfu']} GPU-hours as figure4 counts them (model FLOPs at "
             f"{a['figure4_mfu']:.0%} MFU)")
    comm = [f"{s['stage']}: {s['communication']['internode_gb_per_node']} GB leave each node a step "
            f"({s['communication']['internode_s']} s at {a['node_bandwidth_gb_per_s']} GB/s; compute "
            f"{s['communication']['compute_s']} s; {s['communication']['per_rank_gb']} GB sent per rank)"
            for s in result["stages"] if s.get("communication", {}).get("internode_gb_per_node")][:1]
    warn = [f"warning: {w}" for w in result.get("warnings", [])]
    return "\n".join([head, *lines, foot, *comm, *routes, *warn])


def main(args: argparse.Namespace) -> int:
    from layerchop.config import load_params

    params = load_params(args.params)
    path = Path(args.dvc)
    if not path.exists():
        raise FileNotFoundError(f"--dvc {path}: not found (run from the repository root)")
    result = plan(params, yaml.safe_load(path.read_text()))
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0
