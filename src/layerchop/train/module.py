"""Continued self-supervised pretraining as a thin LightningModule: model + loss + optimizer/schedule.

Distribution lives in :meth:`CausalLMModule.configure_model`: under ``ModelParallelStrategy`` each
decoder layer and then the root are wrapped with FSDP2 ``fully_shard``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torchmetrics.text import Perplexity

from layerchop.data.prepare import IGNORE_INDEX
from layerchop.io import DTYPES


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


def apply_fsdp2(model: torch.nn.Module, mesh, param_dtype: Optional[str], reduce_dtype: Optional[str],
                layers=None) -> None:
    """``fully_shard`` every decoder layer (``layers``, default: the model's own), then the root (FSDP2)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from layerchop.prune.chop import decoder_layers

    mp = MixedPrecisionPolicy(
        param_dtype=DTYPES[param_dtype] if param_dtype else None,
        reduce_dtype=DTYPES[reduce_dtype] if reduce_dtype else None,
    )
    for layer in decoder_layers(model) if layers is None else layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (a collective under FSDP2: call on every rank)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


class CausalLMModule(L.LightningModule):
    """Causal-LM loss on packed sequences.

    Tokens, FLOPs and device-seconds are counted by :class:`layerchop.train.callbacks.ComputeMeter`.

    Args:
        model_dir: HF directory with the initial weights (the previous stage's output).
        cfg: :class:`layerchop.config.TrainConfig`.
        max_steps: Optimizer steps (token budget / tokens per step).
        tokens_per_step: Tokens per optimizer step over all devices.
        model: An already-built model to train instead of loading ``model_dir``.
    """

    no_decay_prefixes: tuple[str, ...] = ()

    def __init__(self, model_dir: str | Path | None, cfg, max_steps: int, tokens_per_step: int,
                 model: Optional[torch.nn.Module] = None, constant_after_warmup: bool = False,
                 optimizer_state: Optional[dict] = None):
        super().__init__()
        self.model_dir = model_dir
        self.cfg = cfg
        self.max_steps = max_steps
        self.tokens_per_step = tokens_per_step
        self.model = model
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.constant_after_warmup = constant_after_warmup
        # FQN-keyed full optimizer state to start from (warm start); ignored when resuming
        self.optimizer_state = optimizer_state
        self.warm_optimizer: Optional[dict] = None  # what was loaded from the warm start, for the record

    def configure_model(self) -> None:
        if self.model is None:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.model.config.use_cache = False
        self.model.train()
        dp_mesh = self.data_parallel_mesh()
        if dp_mesh is not None:
            apply_fsdp2(self.model, dp_mesh, self.cfg.fsdp_param_dtype, self.cfg.fsdp_reduce_dtype)

    def data_parallel_mesh(self):
        """The data-parallel device mesh under ``ModelParallelStrategy``; None otherwise."""
        mesh = getattr(self, "device_mesh", None) if self._trainer is not None else None
        if mesh is None:
            return None
        return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
        return self.model(input_ids=input_ids, labels=labels, use_cache=False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch["input_ids"], batch["labels"])  # input_ids_BT, labels_BT
        loss = out.loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:  # after an optimizer step
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def export_state(self):
        """``(config, full state dict)`` of the model to export; a collective under FSDP2."""
        return self.model.config, full_state_dict(self.model)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits_BTV = self(batch["input_ids"]).logits.float()
        # position t predicts token t+1
        self.val_ppl.update(logits_BTV[:, :-1], batch["labels"][:, 1:])
        self.log("val/ppl", self.val_ppl, prog_bar=True, on_step=False, on_epoch=True)

    def on_train_start(self) -> None:
        if self.optimizer_state is not None and self.trainer.global_step == 0:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            opt = self.trainer.optimizers[0]
            set_optimizer_state_dict(self, opt, self.optimizer_state,
                                     options=StateDictOptions(full_state_dict=True, strict=True))
            # keep moments and step counts, but restart the learning rate on this run's schedule
            for group, lr in zip(opt.param_groups, self.lr_schedulers().get_last_lr()):
                group["lr"] = lr
            steps = sorted({float(st["step"]) for st in opt.state.values() if "step" in st})
            self.warm_optimizer = {"params_with_state": len(opt.state), "steps": steps}
        self.optimizer_state = None

    def configure_optimizers(self):
        groups = param_groups(self.trainer.model.named_parameters(), self.cfg.weight_decay, self.no_decay_prefixes)
        opt = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=tuple(self.cfg.betas), eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, self.cfg.warmup_steps, self.max_steps, self.cfg.min_lr_ratio)
            if not self.constant_after_warmup else min(1.0, (s + 1) / max(1, self.cfg.warmup_steps))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
