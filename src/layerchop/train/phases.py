"""Phases on deeper models before the chopped model's own fit: the paper's warm start and gradual chopping.

- Warm start: "before compressing, train 500 steps on the uncompressed checkpoint to fill the optimizer state,
  then chop and continue": one phase on the dense model, then every removed layer goes.
- Gradual chopping (Figure 6): one phase per removed layer; each trains ``chop_every`` steps, then the next
  layer of the chopped model's ``removed_layers`` goes, until the chopped depth.

A phase is a Lightning fit of its own, and the phases are the first steps of one run: the same learning-rate
schedule (each phase continues it where the previous one stopped), the same data stream (each continues after
the samples before it), and the same budget (tokens and FLOPs, each phase at its own model's FLOPs per step).
Between phases the hand-over is shard-local: each rank keeps its shards of the kept layers' weights and Adam
moments, re-keyed to the smaller model's layer numbers (:func:`layerchop.prune.chop.chop_state_keys`); under
FSDP2 no rank gathers the model or the optimizer state.

Each phase checkpoints into ``<run>/phases/<k>`` (every ``train.ckpt_every`` of its steps and always at its
end). A run killed anywhere resumes in the newest phase that has a checkpoint: a checkpoint of a phase's last
step restores it and goes straight to the next removal. A phase's directory is removed once the next phase has
checkpointed its end, and the last phase's once the chopped model's fit has written its first checkpoint.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from layerchop.prune.chop import chop_state_keys
from layerchop.train import sharding
from layerchop.train.callbacks import ComputeMeter, JobRequeued, Snapshots, requeue_callbacks
from layerchop.train.checkpoint import AtomicCheckpoint, RunLayout, newest_complete, rank0_decides
from layerchop.train.data import PackedDataModule
from layerchop.train.module import CausalLMModule, ShardState
from layerchop.train.plan import RunPlan, depth_config


def resume_phase(plan: RunPlan, layout: RunLayout) -> int:
    """The phase a run starts in: the newest with a checkpoint (0 without one, or with ``--resume never``);
    decided by global rank 0 from its view of the disk (:func:`~layerchop.train.checkpoint.rank0_decides`)."""
    if not layout.resume_allowed:
        return 0

    def newest() -> int:
        found = [k for k in range(len(plan.steps.phases)) if newest_complete(layout.phase(k)) is not None]
        return max(found, default=0)

    return rank0_decides(newest)


def run_phases(plan: RunPlan, layout: RunLayout, trainer_kwargs: Callable[[], dict], tokenizer=None,
               metadata: Optional[dict] = None, card: str = "") -> tuple[ShardState, dict]:
    """Train every phase of ``plan.steps.phases``, removing its layers after it.

    Args:
        plan: The run (its ``dense_dir`` and ``removed_layers`` come from the chopped init's metadata).
        layout: The run's directories.
        trainer_kwargs: Makes the Trainer arguments shared with the main fit (a fresh strategy each call).
        tokenizer, metadata, card: For the snapshots that fall inside a phase (``plan.snapshot_steps``).

    Returns:
        The chopped model's starting state (this rank's shards) and the compute spent before it
        (``{"steps", "tokens", "flops", "train_s"}``).
    """
    from transformers import AutoConfig

    steps = plan.steps
    dense_config = AutoConfig.from_pretrained(plan.dense_dir)
    alive = list(range(dense_config.num_hidden_layers))
    first = resume_phase(plan, layout)
    done, spent = 0, {"steps": 0, "tokens": 0, "flops": 0, "train_s": 0.0}
    for phase in steps.phases[:first]:  # phases finished before the one resumed
        alive = [i for i in alive if i not in phase.remove]
        done += phase.steps
        spent = _add(spent, phase, steps.tokens_per_step, 0.0)
    start: Optional[ShardState] = None
    for k in range(first, len(steps.phases)):
        phase = steps.phases[k]
        if len(alive) != phase.num_layers:
            raise RuntimeError(f"phase {k}: {len(alive)} layers alive, the plan says {phase.num_layers}")
        handed = [start] if start is not None else []
        start = None  # the next module holds the only reference, and drops it once its weights are loaded
        start, spent = _train_phase(plan, layout, k, alive, done, spent, handed, trainer_kwargs,
                                    tokenizer, metadata, card)
        alive = [i for i in alive if i not in phase.remove]
        done += phase.steps
        if k > 0:
            remove_phase_dirs(layout, k)  # phase k's end checkpoint is the resume point now
    kept = [i for i in range(dense_config.num_hidden_layers) if i not in set(plan.removed_layers)]
    if alive != kept:
        raise RuntimeError(f"after the phases layers {alive} are left, but {plan.init_dir} keeps {kept}")
    return start, spent


def run_warm_only(plan: RunPlan, layout: RunLayout, trainer_kwargs: Callable[[], dict],
                  metrics: Optional[str] = None) -> dict:
    """``train --warm-only``: train the warm start (phase 0) and publish its end checkpoint, with the identity of
    what it depends on, to ``plan.out``: the stage every warm-started arm forks from (``--warm-from``), so that
    the same dense steps are computed once. Files are hard-linked from the run directory where the file system
    allows (a copy otherwise). The checkpoint holds no wall time (its bytes are a function of the inputs, so a
    re-run hashes the same): the time goes to ``metrics`` with the machine record (``None`` for steps restored
    from a checkpoint of an interrupted invocation)."""
    import json
    import time

    from layerchop.io import atomic_dir, write_json
    from layerchop.train.checkpoint import global_rank

    if plan.chop_every or len(plan.steps.phases) > 1:
        raise RuntimeError("--warm-only: a warm start has one phase")
    end, spent, t0 = None, {}, time.perf_counter()
    if plan.steps.phases:  # trained, or restored from its own end checkpoint (a re-run after an interruption)
        _, spent = _train_phase(plan, layout, 0, list(range(_dense_config(plan).num_hidden_layers)), 0,
                                {"steps": 0, "tokens": 0, "flops": 0, "train_s": 0.0}, [], trainer_kwargs, None,
                                None, "")
        end = rank0_decides(lambda: newest_complete(layout.phase(0)))
    if global_rank() != 0:
        return {}
    phase = plan.steps.phases[0] if plan.steps.phases else None
    meta = {"stage": "train --warm-only", "steps": plan.steps.warm_steps, "checkpoint": end.name if end else None,
            "tokens": plan.steps.warm_steps * plan.steps.tokens_per_step,
            "flops": phase.steps * phase.flops_per_step if phase else 0,
            "identity": json.loads(json.dumps(plan.warm_identity, sort_keys=True, default=str))}
    with atomic_dir(plan.out) as tmp:  # train.warm_start_steps: 0 publishes the record alone
        if end is not None and end.is_dir():
            shutil.copytree(end, tmp / end.name, copy_function=_link_or_copy)
        elif end is not None:
            _link_or_copy(str(end), str(tmp / end.name))
        (tmp / "warm.json").write_text(json.dumps(meta, indent=2) + "\n")
    if metrics is not None:
        from layerchop.machine import machine_record

        train_s = spent.get("train_s")
        write_json(Path(metrics), {**{k: meta[k] for k in ("stage", "steps", "tokens", "flops")},
                                   "train_s": train_s, "device_s": None if train_s is None else
                                   round(train_s * plan.world, 3),
                                   "wall_s_this_invocation": round(time.perf_counter() - t0, 1),
                                   "machine": machine_record()})
    print(f"[train] shared warm start: {plan.steps.warm_steps} steps on the uncompressed model -> {plan.out}",
          flush=True)
    return meta


def _link_or_copy(src: str, dst: str) -> None:
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def remove_phase_dirs(layout: RunLayout, before: int) -> None:
    """Global rank 0 deletes the checkpoints of the phases before ``before`` (their logs stay); call it only
    once a newer checkpoint of the run (a later phase's, or the main fit's) is published on every rank."""
    from layerchop.train.checkpoint import global_rank

    if global_rank() != 0 or not (layout.root / "phases").is_dir():
        return
    for k in range(before):
        where = layout.phase(k)
        if where.exists():
            try:
                shutil.rmtree(where)
            except OSError as e:
                print(f"[train] warning: could not delete {where} ({e}); it is no longer needed", flush=True)


def _add(spent: dict, phase, tokens_per_step: int, train_s: float) -> dict:
    return {"steps": spent["steps"] + phase.steps, "tokens": spent["tokens"] + phase.steps * tokens_per_step,
            "flops": spent["flops"] + phase.steps * phase.flops_per_step, "train_s": round(train_s, 3)}


def _train_phase(plan: RunPlan, layout: RunLayout, k: int, alive: list[int], done: int, spent: dict,
                 handed: list[ShardState], trainer_kwargs, tokenizer, metadata, card) -> tuple[ShardState, dict]:
    """Fit phase ``k`` (``alive``: the uncompressed model's layers it has), then drop its layers' shard state.
    ``handed``: the previous phase's state, popped (the module alone keeps it, until its weights are loaded)."""
    cfg, steps = plan.cfg, plan.steps
    start = handed.pop() if handed else None
    phase = steps.phases[k]
    where = layout.phase(k)
    if k == 0:  # the uncompressed model, from its directory
        module = CausalLMModule(plan.dense_dir, cfg, max_steps=phase.steps, schedule_offset=done,
                                schedule_steps=steps.total_steps)
    else:  # weights from the previous phase, or from this phase's checkpoint
        module = CausalLMModule(None, cfg, max_steps=phase.steps, schedule_offset=done,
                                schedule_steps=steps.total_steps, start=start,
                                config=depth_config(_dense_config(plan), alive))
    del start
    meter = ComputeMeter(steps.tokens_per_step, phase.flops_per_step, plan.world, offset=spent,
                         schedule=(metadata or {}).get("chop_schedule"), keep_time=not plan.warm_only)
    callbacks = [meter]
    inside = [s - done for s in plan.snapshot_steps if done < s <= done + phase.steps]
    if inside and tokenizer is not None:
        removed_so_far = [i for i in range(_dense_config(plan).num_hidden_layers) if i not in alive]
        snap_meta = {**(metadata or {}), "num_hidden_layers": len(alive), "kept_layers": alive,
                     "removed_layers": removed_so_far, "phase": k,
                     "removed_later": [i for i in plan.removed_layers if i in alive]}
        callbacks.append(Snapshots(layout.snapshots, [done + s for s in inside], tokenizer, snap_meta, card, meter,
                                   offset=done, timing_dir=layout.snapshot_timing))
    # after the snapshots: a checkpoint of a step means its snapshot exists (a resumed phase does not redo it)
    checkpoint = AtomicCheckpoint(where, cfg.ckpt_every, save_on_train_end=True)
    callbacks.append(checkpoint)
    requeue = requeue_callbacks(where)
    trainer = L.Trainer(**{**trainer_kwargs(), "max_steps": phase.steps,
                           "logger": CSVLogger(layout.phase_logs(k).parent, name=layout.phase_logs(k).name),
                           "limit_val_batches": 0, "enable_checkpointing": False,
                           "callbacks": [*callbacks, TQDMProgressBar(refresh_rate=1), *requeue]})
    dm = PackedDataModule(plan.prepared_dir, cfg.batch_size, cfg.seed, cfg.val_batches, cfg.num_workers,
                          start_samples=done * cfg.accumulate * cfg.batch_size)
    resume = rank0_decides(lambda: newest_complete(where)) if layout.resume_allowed else None
    forked = k == 0 and resume is None and plan.warm_from is not None
    if forked:  # the shared warm start's end state: restored, not trained again; it stays the resume point
        from layerchop.train.plan import check_warm_start

        resume = rank0_decides(lambda: check_warm_start(plan.warm_from, plan.warm_identity))
        checkpoint.saved_step = phase.steps
    if trainer.is_global_zero:
        what = "the uncompressed model" if k == 0 else f"{len(alive)} layers"
        print(f"[train] phase {k + 1}/{len(steps.phases)}: {phase.steps} steps on {what}, then layers "
              f"{list(phase.remove)} go", flush=True)
        if resume:
            print(f"[train] phase {k + 1}: {'the shared warm start' if forked else 'resuming from'} {resume}",
                  flush=True)
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
    if requeue and requeue[0].requeued:
        raise JobRequeued()
    if trainer.global_step != phase.steps:
        raise RuntimeError(f"phase {k} stopped at step {trainer.global_step} of {phase.steps}")
    kept = [j for j, i in enumerate(alive) if i not in phase.remove]  # in this phase's layer numbers
    # references to the kept layers' shards only: the removed layers, the module and its Trainer go
    weights = chop_state_keys(sharding.local_model_state(module.model), kept)
    optimizer = chop_state_keys(sharding.local_optimizer_state(module.model, trainer.optimizers[0]), kept)
    spent = {**meter.summary(phase.steps), **meter.timing(phase.steps)}
    spent = {key: spent[key] for key in ("steps", "tokens", "flops", "train_s")}
    del trainer, module, dm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ShardState(weights, optimizer), spent


def _dense_config(plan: RunPlan):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(plan.dense_dir)
