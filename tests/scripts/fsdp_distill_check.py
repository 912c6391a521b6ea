"""Run by ``tests/test_distill.py``: DistillModule under ModelParallelStrategy on 2 CPU processes.

Lightning re-launches this script for rank 1. Each rank writes what it observed about the teacher and the
student after two training steps to ``<out>/rank<r>.json``.

Usage: python fsdp_distill_check.py TINY_MODEL_DIR PREPARED_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(model_dir: str, prepared: str, out: str) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from layerchop.config import DistillConfig, TrainConfig
    from layerchop.prune.chop import decoder_layers
    from layerchop.train.data import PackedDataModule
    from layerchop.train.distill import DistillModule
    from layerchop.train.sharding import full_state_dict

    cfg = TrainConfig(token_budget=2 * 2 * 2 * 2 * 32, batch_size=2, accumulate=2, lr=3e-3, warmup_steps=1,
                      precision="32-true", accelerator="cpu", strategy="fsdp", devices=2, ckpt_every=0, val_batches=1)

    class GradsAfterBackward(L.Callback):
        """Whether the sharded gradients exist after each micro-batch's backward: with one reduce-scatter per
        optimizer step they appear only after the last micro-batch of each step."""

        seen: list = []

        def on_after_backward(self, trainer, pl_module) -> None:
            self.seen.append(any(p.grad is not None for p in pl_module.model.parameters()))

    # a 4-layer student chopped from the 6-layer teacher
    student = AutoModelForCausalLM.from_pretrained(model_dir)
    from layerchop.prune.chop import chop_layers

    mapping = chop_layers(student, [2, 3])
    module = DistillModule(None, model_dir, cfg, DistillConfig(chunk_tokens=16), mapping, max_steps=2,
                           student=student)
    grads = GradsAfterBackward()
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=2, logger=False, enable_checkpointing=False,
                        accumulate_grad_batches=2, callbacks=[grads],
                        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=PackedDataModule(prepared, 2, 0, 1, 0))
    teacher = module.teacher
    full = full_state_dict(teacher)  # a collective: every rank
    ref = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()

    def local_fraction(model) -> float:
        params = [p for p in model.parameters() if isinstance(p, DTensor)]
        return sum(p.to_local().numel() for p in params) / max(1, sum(p.numel() for p in params))

    report = {
        "rank": trainer.global_rank,
        "world": trainer.world_size,
        "steps": trainer.global_step,
        "teacher_root_fsdp": isinstance(teacher, FSDPModule),
        "teacher_layers_fsdp": all(isinstance(layer, FSDPModule) for layer in decoder_layers(teacher)),
        "teacher_all_dtensor": all(isinstance(p, DTensor) for p in teacher.parameters()),
        "teacher_local_fraction": local_fraction(teacher),
        "teacher_training": teacher.training,
        "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters()),
        "teacher_unchanged": set(full) <= set(ref) and all(torch.equal(full[k], ref[k]) for k in full),
        "student_root_fsdp": isinstance(module.model, FSDPModule),
        "student_all_dtensor": all(isinstance(p, DTensor) for p in module.model.parameters()),
        "student_local_fraction": local_fraction(module.model),
        "loss_finite": bool(torch.isfinite(trainer.callback_metrics["train/loss"])),
        "grads_after_backward": grads.seen,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])
