"""Continued self-supervised pretraining as a thin LightningModule: model + loss + optimizer/schedule.

Distribution lives in :meth:`CausalLMModule.configure_model`: under ``ModelParallelStrategy`` the model is
built on the meta device, each decoder layer and then the root are wrapped with FSDP2 ``fully_shard``, each
rank allocates its shards, and the weights arrive from global rank 0 (:mod:`layerchop.train.sharding`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from layerchop.evaluate.perplexity import TokenPerplexity
from layerchop.train import sharding


def lr_lambda(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``max_steps`` (the paper's schedule)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(named_params, weight_decay: float, no_decay_prefixes: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on norms and biases (1-D parameters) nor on parameters with a
    name component in ``no_decay_prefixes`` (e.g. ``"hid_proj."`` matches ``model.hid_proj.0.weight``)."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        excluded = any(f".{pre}" in f".{name}" for pre in no_decay_prefixes)
        (decay if p.ndim >= 2 and not excluded else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass
class ShardState:
    """Weights and optimizer state to start from, as this rank's shards keyed by parameter name (the warm
    start's or a gradual-chopping phase's chopped state; see :mod:`layerchop.train.phases`)."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, torch.Tensor]]


class CausalLMModule(L.LightningModule):
    """Causal-LM loss on packed sequences.

    Tokens, FLOPs and device-seconds are counted by :class:`layerchop.train.callbacks.ComputeMeter`.

    Args:
        model_dir: HF directory with the initial weights (the previous stage's output).
        cfg: :class:`layerchop.config.TrainConfig`.
        max_steps: Optimizer steps of this fit.
        schedule_offset: Steps of the same LR schedule already taken before this fit (the warm start).
        schedule_steps: Length of the whole LR schedule (default: ``schedule_offset + max_steps``).
        start: Shard-local weights and optimizer state to start from instead of ``model_dir``'s weights.
        config: Build this architecture instead of ``model_dir``'s (a gradual-chopping phase; ``model_dir`` None):
            its weights come from ``start`` or from the checkpoint the fit resumes.
    """

    no_decay_prefixes: tuple[str, ...] = ()

    def __init__(self, model_dir: str | Path | None, cfg, max_steps: int, *, schedule_offset: int = 0,
                 schedule_steps: Optional[int] = None, start: Optional[ShardState] = None, config=None):
        super().__init__()
        if model_dir is not None and config is not None:
            raise ValueError("CausalLMModule: give model_dir or config, not both")
        self.model_dir = model_dir
        self.model_config = config
        self.cfg = cfg
        self.max_steps = max_steps
        self.schedule_offset = schedule_offset
        self.schedule_steps = schedule_steps or schedule_offset + max_steps
        self.model: Optional[torch.nn.Module] = None
        self.val_ppl = TokenPerplexity()
        object.__setattr__(self, "start", start)  # not a submodule, not checkpointed
        self.warm_optimizer: Optional[dict] = None  # what the warm start handed over, for the record

    # ------------------------------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.build_hf_model(self.model_dir, self.start.weights if self.start else None,
                                         config=self.model_config)
        self.model.train()

    def build_hf_model(self, model_dir, shard_weights: Optional[dict] = None, config=None) -> torch.nn.Module:
        """The HF model of ``model_dir``: one plain copy on a single device; sharded under FSDP2 (built on
        the meta device, weights from rank 0 or from ``shard_weights``). With ``config`` instead of ``model_dir``
        the weights come from ``shard_weights`` or from a checkpoint that Lightning restores next."""
        from transformers import AutoConfig, AutoModelForCausalLM

        mesh = self.data_parallel_mesh()
        if mesh is None:
            if config is not None:
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            else:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            model.config.use_cache = False
            if self.cfg.activation_checkpointing:
                sharding.enable_activation_checkpointing(model)
            if shard_weights is not None:
                sharding.load_local_model_state(model, shard_weights)
            return model
        model = sharding.empty_model(config if config is not None else AutoConfig.from_pretrained(model_dir))
        if self.cfg.activation_checkpointing:
            sharding.enable_activation_checkpointing(model)
        sharding.apply_fsdp2(model, mesh, self.cfg.fsdp_param_dtype, self.cfg.fsdp_reduce_dtype,
                             reshard=self.cfg.fsdp_reshard)
        sharding.materialize(model, self.device)
        if shard_weights is not None:
            sharding.load_local_model_state(model, shard_weights)
        elif config is None:
            sharding.load_broadcast(model, model_dir)
        return model

    def data_parallel_mesh(self):
        """The mesh FSDP2 shards over under ``ModelParallelStrategy`` (the strategy's data-parallel mesh, or the
        2-D hybrid one: :func:`~layerchop.train.sharding.training_mesh`); None otherwise."""
        mesh = getattr(self, "device_mesh", None) if self._trainer is not None else None
        if mesh is None:
            return None
        if getattr(self, "_training_mesh", None) is None:
            dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
            object.__setattr__(self, "_training_mesh", sharding.training_mesh(dp, self.cfg))
        return self._training_mesh

    def export_state(self):
        """``(config, full state dict)`` of the model to export; a collective under FSDP2."""
        sharding.reshard(self.model)
        return self.model.config, sharding.full_state_dict(self.model)

    # --------------------------------------------------------------------------------------- training
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
        return self.model(input_ids=input_ids, labels=labels, use_cache=False)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # under accumulation, reduce-scatter the gradients once per optimizer step and, with fsdp_reshard: step,
        # keep the parameters gathered between its micro-batches (FSDP2; Lightning's no-sync only covers DDP)
        last = (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0
        sharding.set_micro_batch(self.model, last, self.cfg)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch["input_ids"], batch["labels"])  # input_ids_BT, labels_BT
        loss = out.loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:  # after an optimizer step
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits_BTV = self(batch["input_ids"]).logits.float()
        # position t predicts token t+1; each rank scores its share, torchmetrics sums over ranks
        self.val_ppl.update(logits_BTV[:, :-1], batch["labels"][:, 1:])
        self.log("val/ppl", self.val_ppl, prog_bar=True, on_step=False, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        # a forward without backward leaves the layers gathered under fsdp_reshard backward / step
        sharding.reshard(self.model)

    def on_train_start(self) -> None:
        if self.start is not None and self.trainer.global_step == 0:
            opt = self.trainer.optimizers[0]
            n = sharding.load_local_optimizer_state(self.model, opt, self.start.optimizer)
            steps = sorted({float(st["step"]) for st in opt.state.values() if "step" in st})
            self.warm_optimizer = {"params_with_state": n, "steps": steps}
        object.__setattr__(self, "start", None)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["warm_optimizer"] = self.warm_optimizer  # a resumed run exports the same provenance

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.warm_optimizer = checkpoint.get("warm_optimizer")

    def configure_optimizers(self):
        groups = param_groups(self.trainer.model.named_parameters(), self.cfg.weight_decay, self.no_decay_prefixes)
        opt = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=tuple(self.cfg.betas), eps=1e-8)
        offset, total, cfg = self.schedule_offset, self.schedule_steps, self.cfg
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s + offset, cfg.warmup_steps, total, cfg.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
