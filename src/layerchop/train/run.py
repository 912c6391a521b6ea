"""Training composed from a :class:`~layerchop.train.plan.RunPlan`: setup steps, one module, callbacks, fit.

Each method is a piece: the objective picks the LightningModule (:class:`CausalLMModule` or
:class:`~layerchop.train.distill.DistillModule`), the warm start and gradual chopping are phases before ``fit``
(:mod:`layerchop.train.phases`), fixed sparsity masks, snapshots, compute accounting, host-memory accounting,
checkpoints and the HF export are callbacks.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from layerchop.io import read_metadata, write_json
from layerchop.launch import under_slurm
from layerchop.train.callbacks import (ComputeMeter, ExportHF, HostMemory, JobRequeued, KeepMasks, Snapshots,
                                       requeue_callbacks)
from layerchop.train.checkpoint import AtomicCheckpoint, RunLayout, RunLock, init_process_group
from layerchop.train.data import PackedDataModule
from layerchop.train.module import CausalLMModule, ShardState
from layerchop.train.plan import LAUNCH_KEYS, RunPlan


def merge_csv_logs(sources: Sequence[tuple[Path, int]], dest: Path) -> None:
    """Concatenate CSV logs: each source is a logger directory (``version_N`` per invocation; a later invocation
    wins for a step) and the run's steps before it (phases), added to its steps so they count the whole run."""
    rows: dict[tuple[str, str], dict] = {}
    fields: list[str] = []
    for root, offset in sources:
        for f in sorted(root.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
            with open(f) as fh:
                reader = csv.DictReader(fh)
                fields += [c for c in reader.fieldnames or [] if c not in fields]
                for row in reader:
                    if offset and row.get("step"):
                        row["step"] = str(int(row["step"]) + offset)
                    key = (row.get("step", ""), ",".join(k for k, v in row.items() if v and k != "step"))
                    rows[key] = row
    ordered = sorted(rows.values(), key=lambda r: int(r.get("step") or 0))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(ordered)


def trainer_kwargs(cfg) -> dict:
    """Trainer arguments shared by the warm start and the main fit (a fresh strategy object each call)."""
    if cfg.strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=cfg.devices * cfg.num_nodes, tensor_parallel_size=1)
    else:
        strategy = "auto"
    extra = {}
    if under_slurm():  # ranks from SLURM's variables; the time-limit signal is RequeueOnSignal's, not Lightning's
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        extra["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    return dict(**extra,
        accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy,
        precision=cfg.precision, accumulate_grad_batches=cfg.accumulate, gradient_clip_val=cfg.grad_clip or None,
        enable_model_summary=False, log_every_n_steps=1, use_distributed_sampler=False, num_sanity_val_steps=0,
        enable_checkpointing=False,  # checkpoints are written by AtomicCheckpoint
    )


def build_module(plan: RunPlan, start: Optional[ShardState]) -> CausalLMModule:
    """The LightningModule of the plan's training method."""
    from layerchop.train.methods import method

    return method(plan.objective).module(plan, start)


def chop_schedule(plan: RunPlan) -> dict:
    """Gradual chopping's record: the interval, the order, and the step, tokens and FLOPs at each removal."""
    steps = plan.steps
    flops = [sum(ph.steps * ph.flops_per_step for ph in steps.phases[:k + 1]) for k in range(len(steps.phases))]
    return {"every_steps": plan.chop_every, "every_tokens": plan.chop_every * steps.tokens_per_step,
            "order": list(plan.removed_layers), "removal_steps": steps.removal_steps,
            "removal_tokens": [s * steps.tokens_per_step for s in steps.removal_steps], "removal_flops": flops}


RUN_ONLY = ("run_dir", "fingerprint", "memory_per_rank_gb")
"""Keys of the run's plan that go to its record (``--metrics``), not into the model's ``layerchop.json``: where its
checkpoints are (the fingerprint hashes the training code too) and the memory estimate (``layerchop.estimate``'s
code). In the model directory they would change its bytes, and so its DVC hash and every evaluation of it, on a code
change that leaves the weights alone."""


def output_metadata(plan: RunPlan) -> tuple[dict, str]:
    """``layerchop.json`` and model card of the exported model (compute is added at export)."""
    import dataclasses

    cfg, steps = plan.cfg, plan.steps
    metadata = {
        **{k: v for k, v in plan.init_meta.items()
           if k not in ("stage", "steps", "train_loss_last", "val_ppl_last", "compute", "snapshot", "plan")},
        "stage": "train",
        # the exported weights' dtype: the input model's unless train.export_dtype says otherwise
        "dtype": cfg.export_dtype or plan.init_meta.get("dtype", "float32"),
        "init": str(plan.init_dir),
        "objective": plan.objective,
        "tokens_before": int(plan.init_meta.get("tokens_trained", 0)),
        # what the weights depend on: not how the job was started (a model's bytes do not change with it)
        "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LAUNCH_KEYS},
        "plan": {k: v for k, v in plan.describe().items() if k not in RUN_ONLY},
    }
    from layerchop.train.methods import method

    what = method(plan.objective).card(plan, metadata)
    warm = (f", the first {steps.warm_steps} of them on the uncompressed model `{plan.dense_dir}` (warm start)"
            if steps.warm_steps else "")
    if plan.chop_every:
        metadata["chop_schedule"] = chop_schedule(plan)
        warm = (f", starting from the uncompressed model `{plan.dense_dir}` and removing one of layers "
                f"{list(plan.removed_layers)} (in that order) every {plan.chop_every} steps (gradual chopping; the "
                f"last at step {steps.removal_steps[-1]})")
    card = (
        f"# {plan.out.name}\n\n{what} of `{plan.init_dir}` by `layerchop train` for {steps.total_steps} steps x "
        f"{steps.tokens_per_step} tokens{warm} ({steps.total_steps * steps.tokens_per_step} tokens; budget "
        f"{plan.budget_text()}), AdamW lr {cfg.lr}, warmup {cfg.warmup_steps} then cosine to {cfg.min_lr_ratio}x. "
        "Training compute in `layerchop.json` (`compute`).\n"
    )
    return metadata, card


def snapshot_timing(layout: RunLayout, steps: list[int]) -> dict[str, dict]:
    """The wall times of the run's snapshots (``step_XXXXXX`` -> ``train_s``, ``device_s``, ...), from the files
    the snapshots callback wrote beside them; a snapshot without one (a run dir of older code) is left out."""
    from layerchop.io import read_json

    files = (layout.snapshot_timing / f"step_{s:06d}.json" for s in sorted(steps))
    return {f.stem: read_json(f) for f in files if f.exists()}


def train(plan: RunPlan, *, resume: str = "auto", log_csv: Optional[str | Path] = None,
          metrics: Optional[str | Path] = None, stop_after: Optional[int] = None,
          snapshot_dir: Optional[str | Path] = None) -> dict:
    """Run ``plan`` to its budget (resuming when possible) and export a plain HF directory to ``plan.out``.

    Runs on every rank (under torchrun or Lightning's own launcher); only global rank 0 writes shared files.

    Args:
        plan: From :func:`layerchop.train.plan.resolve`.
        resume: ``auto`` (the newest complete checkpoint of this run) | ``never`` | a checkpoint path.
        log_csv: Copy the merged metrics CSV here.
        metrics: Write the run's compute, last losses and per-rank host memory here (JSON).
        stop_after: Stop after this many steps of the main fit, without exporting (tests make mid-run
            checkpoints with it).
        snapshot_dir: Where the snapshots go at the end (hard links to the run directory's copies).

    Returns:
        The metadata written into ``plan.out`` (``{}`` on other ranks, or when stopped early).
    """
    with RunLock(plan.run_dir):  # one run per run directory
        try:
            return _train(plan, resume, log_csv, metrics, stop_after, snapshot_dir)
        except JobRequeued:
            print("[train] stopped for the requeued SLURM job: it resumes from the checkpoint just written", flush=True)
            return {}



def _train(plan: RunPlan, resume: str, log_csv, metrics, stop_after, snapshot_dir) -> dict:
    from transformers import AutoTokenizer

    cfg, steps = plan.cfg, plan.steps
    init_process_group(cfg.accelerator)  # before the first decision: rank 0 reads the disk, the others follow
    layout = RunLayout(plan.run_dir, plan.fingerprint)
    ckpt_path = layout.start(resume)
    tokenizer = AutoTokenizer.from_pretrained(plan.init_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    if plan.warm_only:  # the shared warm start's stage
        from layerchop.train.phases import run_warm_only

        return run_warm_only(plan, layout, lambda: trainer_kwargs(cfg), metrics)
    metadata, card = output_metadata(plan)
    start, spent = None, None
    if steps.phases and ckpt_path is None:
        from layerchop.train.phases import run_phases

        start, spent = run_phases(plan, layout, lambda: trainer_kwargs(cfg), tokenizer, metadata, card)
    meter = ComputeMeter(steps.tokens_per_step, steps.flops_per_step, plan.world, offset=spent,
                         schedule=metadata.get("chop_schedule"))
    memory = HostMemory()
    callbacks = [meter, memory]
    if plan.masks is not None:
        callbacks.append(KeepMasks(plan.masks))
    if plan.snapshot_steps:
        callbacks.append(Snapshots(layout.snapshots, plan.snapshot_steps, tokenizer, metadata, card, meter,
                                   masks_dir=plan.init_dir if plan.masks else None, offset=steps.warm_steps,
                                   timing_dir=layout.snapshot_timing))
    exporter = ExportHF(plan.out, tokenizer, metadata, card, steps.main_steps, meter,
                        masks_dir=plan.init_dir if plan.masks else None)
    callbacks += [exporter, TQDMProgressBar(refresh_rate=1)]
    if cfg.ckpt_every:
        on_saved = None
        if steps.phases:  # the phases' last checkpoints are no longer the resume point
            import functools

            from layerchop.train.phases import remove_phase_dirs

            on_saved = functools.partial(remove_phase_dirs, layout, len(steps.phases))
        callbacks.append(AtomicCheckpoint(layout.checkpoints, cfg.ckpt_every, on_saved=on_saved))
    requeue = requeue_callbacks(layout.checkpoints)
    callbacks += requeue
    trainer = L.Trainer(
        **trainer_kwargs(cfg),
        max_steps=min(steps.main_steps, stop_after) if stop_after else steps.main_steps,
        val_check_interval=(cfg.val_every or steps.main_steps) * cfg.accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0,  # val_batches x batch_size sequences, shared out over the ranks
        logger=CSVLogger(layout.root, name="logs"),  # version_N per invocation, merged at the end
        callbacks=callbacks,
    )
    dm = PackedDataModule(plan.prepared_dir, cfg.batch_size, cfg.seed, cfg.val_batches, cfg.num_workers,
                          start_samples=plan.warm_samples_per_rank)
    module = build_module(plan, start)
    start = None  # the module alone holds the hand-over, and drops it once loaded
    t0 = time.perf_counter()
    # weights_only: a checkpoint holds tensors and plain containers; a planted pickle is refused, whatever
    # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    wall = time.perf_counter() - t0
    if requeue and requeue[0].requeued:
        raise JobRequeued()
    if not trainer.is_global_zero:
        return {}
    if log_csv is not None:
        starts = [0] + steps.removal_steps
        merge_csv_logs([(layout.phase_logs(k), starts[k]) for k in range(len(steps.phases))]
                       + [(layout.logs, steps.warm_steps)], Path(log_csv))
    if trainer.global_step < steps.main_steps:
        print(f"[train] stopped at step {trainer.global_step} of {steps.main_steps}", flush=True)
        return {}
    if snapshot_dir is not None and plan.snapshot_steps:
        dest = Path(snapshot_dir)
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # hard links: no second copy on disk; the run dir keeps its own for a later resume
        shutil.copytree(layout.snapshots, dest, copy_function=os.link)
    meta = read_metadata(plan.out)
    if metrics is not None:
        from layerchop.machine import machine_record

        host_memory = {f"rank{r['rank']}": {k: v for k, v in r.items() if k != "rank" and not k.startswith("gpu_")}
                       for r in memory.report}
        gpu_memory = {f"rank{r['rank']}": {k: v for k, v in r.items() if k.startswith("gpu_")}
                      for r in memory.report if "gpu_peak_allocated_mb" in r}
        timing = exporter.timing.get(plan.out.name, {})
        write_json(Path(metrics), {"objective": plan.objective, **meta["compute"], **timing,
                                   "snapshots": snapshot_timing(layout, plan.snapshot_steps),
                                   "tokens_trained": meta["tokens_trained"], "train_loss_last": meta["train_loss_last"],
                                   "lr": plan.cfg.lr,  # the peak LR (the LR sweep reads it beside val_ppl_last)
                                   **({"val_ppl_last": meta["val_ppl_last"]} if "val_ppl_last" in meta else {}),
                                   "wall_s_this_invocation": round(wall, 1), "host_memory": host_memory,
                                   **{k: v for k, v in plan.describe().items() if k in RUN_ONLY},
                                   **({"gpu_memory": gpu_memory} if gpu_memory else {}), "machine": machine_record()})
    before = "while chopping gradually" if plan.chop_every else "warm"
    print(f"[train] {steps.warm_steps + trainer.global_step} steps ({steps.warm_steps} {before}), "
          f"{wall:.1f} s, {meta['compute']['flops']:.4g} FLOPs, exported {plan.out}", flush=True)
    return meta


def run(init_dir: str | Path, prepared_dir: str | Path, out: str | Path, cfg, *, run_dir: str | Path,
        objective: str = "lm", teacher_dir: Optional[str | Path] = None, distill_cfg=None, warm_start: bool = False,
        snapshots: int = 0, chop_every_tokens: Optional[float] = None, dimchop_cfg=None, warm_only: bool = False,
        warm_from: Optional[str | Path] = None, method_cfg=None, **kwargs) -> dict:
    """:func:`layerchop.train.plan.resolve` then :func:`train` (``kwargs``: resume, log_csv, metrics,
    stop_after, snapshot_dir)."""
    from layerchop.train.plan import resolve

    plan = resolve(init_dir, prepared_dir, out, run_dir, cfg, objective=objective, teacher_dir=teacher_dir,
                   distill_cfg=distill_cfg, warm_start=warm_start, snapshots=snapshots,
                   chop_every_tokens=chop_every_tokens, dimchop_cfg=dimchop_cfg, warm_only=warm_only,
                   warm_from=warm_from, method_cfg=method_cfg)
    return train(plan, **kwargs)
