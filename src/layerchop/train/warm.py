"""The paper's warm optimizer, as a setup step before the chopped run's ``fit``.

"Before compressing, train 500 steps on the uncompressed checkpoint to fill the optimizer state, then chop
and continue." The warm steps are the first steps of the run: the same learning-rate schedule (the chopped
run continues it at step ``warm_steps``), the same data stream (it continues after the warm samples), and
the same budget (their tokens and FLOPs count). Under FSDP2 the hand-over is shard-local: each rank keeps
its shards of the kept layers' weights and Adam moments, re-keyed to the chopped model's layer numbers
(:func:`layerchop.prune.chop.chop_state_keys`); no rank gathers the model or the optimizer state.

The warm fit checkpoints into ``<run>/warm`` like any run (and always at its last step), so a kill during or
right after it resumes there instead of starting over.
"""

from __future__ import annotations

import gc
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from layerchop.prune.chop import chop_state_keys
from layerchop.train import sharding
from layerchop.train.callbacks import ComputeMeter, JobRequeued, requeue_callbacks
from layerchop.train.checkpoint import AtomicCheckpoint, RunLayout, newest_complete
from layerchop.train.data import PackedDataModule
from layerchop.train.module import CausalLMModule, ShardState
from layerchop.train.plan import RunPlan


def warm_start(plan: RunPlan, layout: RunLayout, trainer_kwargs: Callable[[], dict]) -> tuple[ShardState, dict]:
    """Train ``plan.steps.warm_steps`` steps on the uncompressed model, then chop its shard-local state.

    Args:
        plan: The run (its ``dense_dir`` and ``removed_layers`` come from the chopped init's metadata).
        layout: The run's directories (the warm start checkpoints into ``layout.warm``).
        trainer_kwargs: Makes the Trainer arguments shared with the main fit (a fresh strategy each call).

    Returns:
        The chopped model's starting state (this rank's shards) and the compute spent
        (``{"tokens", "flops", "train_s"}``).
    """
    from transformers import AutoConfig

    cfg, steps = plan.cfg, plan.steps
    module = CausalLMModule(plan.dense_dir, cfg, max_steps=steps.warm_steps, schedule_steps=steps.total_steps)
    meter = ComputeMeter(steps.tokens_per_step, steps.warm_flops_per_step, plan.world)
    requeue = requeue_callbacks(layout.warm)
    trainer = L.Trainer(**{**trainer_kwargs(), "max_steps": steps.warm_steps,
                           "logger": CSVLogger(layout.warm, name="logs"),  # the chopped run's CSV starts after it
                           "limit_val_batches": 0, "enable_checkpointing": False,
                           "callbacks": [meter, AtomicCheckpoint(layout.warm, cfg.ckpt_every, save_on_train_end=True),
                                         TQDMProgressBar(refresh_rate=1), *requeue]})
    dm = PackedDataModule(plan.prepared_dir, cfg.batch_size, cfg.seed, cfg.val_batches, cfg.num_workers)
    resume = newest_complete(layout.warm) if layout.resume_allowed else None
    if resume is not None and trainer.is_global_zero:
        print(f"[train] warm start: resuming from {resume}", flush=True)
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
    if requeue and requeue[0].requeued:
        raise JobRequeued()
    if trainer.global_step != steps.warm_steps:
        raise RuntimeError(f"the warm start stopped at step {trainer.global_step} of {steps.warm_steps}")
    num_dense = AutoConfig.from_pretrained(plan.dense_dir).num_hidden_layers
    kept = [i for i in range(num_dense) if i not in set(plan.removed_layers)]
    # references to the kept layers' shards only: the removed layers, the dense module and its Trainer go
    weights = chop_state_keys(sharding.local_model_state(module.model), kept)
    optimizer = chop_state_keys(sharding.local_optimizer_state(module.model, trainer.optimizers[0]), kept)
    spent = {"tokens": steps.warm_steps * steps.tokens_per_step,
             "flops": steps.warm_steps * steps.warm_flops_per_step, "train_s": round(meter.train_s, 3)}
    del trainer, module, dm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ShardState(weights, optimizer), spent
