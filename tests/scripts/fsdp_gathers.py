"""All-gathers per optimizer step of the real training module (CausalLMModule under Lightning's
ModelParallelStrategy) for each ``train.fsdp_reshard`` / ``train.fsdp_sharding`` setting, on the ranks torchrun
started (tests/test_rehearsal.py: 2 simulated nodes x 2 processes).

Usage (every rank): ``fsdp_gathers.py PARAMS MODEL_DIR PREPARED_DIR OUT_JSON``. FSDP2's all-gathers go through
``torch.distributed.all_gather_single``; it is wrapped to count the calls, the bytes gathered and the size of
the group each went over. Global rank 0 writes, per setting: the all-gathers of each optimizer step, their
group sizes, the bytes, and the losses.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from layerchop.config import section, load_params
from layerchop.train.data import PackedDataModule
from layerchop.train.module import CausalLMModule
from layerchop.train.run import trainer_kwargs

COUNT = {"calls": 0, "bytes": 0, "groups": set()}
_gather = dist.all_gather_single


def counting_gather(output_tensor, input_tensor, group=None, async_op=False):
    COUNT["calls"] += 1
    COUNT["bytes"] += output_tensor.numel() * output_tensor.element_size()
    COUNT["groups"].add(dist.get_world_size(group))
    return _gather(output_tensor, input_tensor, group=group, async_op=async_op)


dist.all_gather_single = counting_gather


class PerStep(Callback):
    """All-gathers between the start of an optimizer step's first micro-batch and the end of its last."""

    def __init__(self):
        self.steps: list[dict] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:
            COUNT.update(calls=0, bytes=0, groups=set())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.steps.append({"all_gathers": COUNT["calls"], "bytes": COUNT["bytes"],
                               "group_sizes": sorted(COUNT["groups"])})
        self.losses.append(float(outputs["loss"]))


def main(params_path: str, model_dir: str, prepared: str, out: str) -> None:
    base = section("train", load_params(params_path))
    results = {}
    for reshard, sharding in [("forward", "full"), ("backward", "full"), ("step", "full"), ("step", "hybrid")]:
        cfg = dataclasses.replace(base, fsdp_reshard=reshard, fsdp_sharding=sharding)
        meter = PerStep()
        trainer = L.Trainer(**{**trainer_kwargs(cfg), "max_steps": 2, "logger": False, "limit_val_batches": 0,
                               "callbacks": [meter], "enable_progress_bar": False})
        module = CausalLMModule(model_dir, cfg, max_steps=2)
        trainer.fit(module, datamodule=PackedDataModule(prepared, cfg.batch_size, cfg.seed, 1, 0))
        results[f"{reshard}/{sharding}"] = {"steps": meter.steps, "losses": meter.losses,
                                            "decoder_layers": module.model.config.num_hidden_layers}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:5])
