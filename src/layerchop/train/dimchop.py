"""DimChop: width pruning during continued pretraining, as a LightningModule piece.

:class:`DimChopModule` is :class:`~layerchop.train.module.CausalLMModule` plus PLATON's moving averages of every
pruned projection (``Ibar``, ``Ubar``: two float32 copies of the trained matrices) and a column mask per matrix.
Every optimizer step updates the averages from that step's gradients (accumulated over micro-batches, before
clipping) at the weights they were taken at (:meth:`on_before_optimizer_step`); right after the step, during the
ramp, the masks are re-chosen from the current scores at the schedule's fraction, and the masked columns are set to
exactly zero after every step (:meth:`optimizer_step`, before any callback sees the step).

The averages and masks are buffers of the LightningModule, so they are in every checkpoint: under FSDP2 the
averages are DTensors sharded like their weights (each rank keeps and saves the rows it holds); a column's score
is the all-reduced sum of the ranks' partial column sums, so no rank gathers a matrix.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn as nn

from layerchop.prune.platon import (column_scores, columns_to_mask, masked_fraction, num_masked, platon_flops,
                                    platon_update)
from layerchop.train.module import CausalLMModule
from layerchop.train.sharding import is_dtensor, local


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""Fused projections (Phi-3) and the projections each holds: their columns are the same input dimensions, so the
fused matrix is pruned as one matrix when ``dimchop.matrices`` lists all of its parts."""


def target_names(model: nn.Module, matrices: list[str]) -> list[str]:
    """The pruned weights: ``model.layers.<i>.<self_attn|mlp>.<proj>.weight`` for each projection in ``matrices``
    (a fused ``qkv_proj`` / ``gate_up_proj`` stands for the projections it holds).

    Raises:
        ValueError: naming ``dimchop.matrices`` when the model has none of them, or when it lists only some of the
            projections one fused matrix holds.
    """
    present = {n.rsplit(".", 2)[-2] for n, _ in model.named_parameters() if ".layers." in n and n.endswith(".weight")}
    wanted = set(matrices)
    for fused, parts in FUSED.items():
        if fused in present and wanted & set(parts):
            if not set(parts) <= wanted:
                raise ValueError(f"dimchop.matrices={matrices}: {type(model).__name__} holds {list(parts)} in one "
                                 f"fused {fused}; list all of them or none")
            wanted = (wanted - set(parts)) | {fused}
    names = [n for n, p in model.named_parameters()
             if n.endswith(".weight") and ".layers." in n and n.rsplit(".", 2)[-2] in wanted]
    if not names:
        raise ValueError(f"dimchop.matrices={matrices}: {type(model).__name__} has no such projection")
    return names


def _key(name: str) -> str:
    return name.replace(".", "__")  # buffer names cannot hold dots


class DimChopModule(CausalLMModule):
    """Continued pretraining with DimChop's growing column masks.

    Args:
        dimchop: :class:`layerchop.config.DimChopConfig` (its ramp is placed as fractions of the whole run's
            optimizer steps, ``schedule_steps``).
        Others: as :class:`CausalLMModule`.
    """

    def __init__(self, model_dir, cfg, dimchop, max_steps: int, **kwargs):
        super().__init__(model_dir, cfg, max_steps, **kwargs)
        self.dimchop = dimchop
        self.ramp = dimchop.ramp_steps(self.schedule_steps)
        self.platon: Optional[nn.Module] = None
        self.names: list[str] = []
        self.scoring_s = 0.0  # this rank's wall time in PLATON updates, mask choices and zeroing (all invocations)
        self.mask_updates = 0  # times the masks were re-chosen

    # ------------------------------------------------------------------------------------------ state
    def configure_model(self) -> None:
        super().configure_model()
        if self.platon is not None:
            return
        self.names = target_names(self.model, self.dimchop.matrices)
        params = dict(self.model.named_parameters())
        state = nn.Module()
        for name in self.names:
            p = params[name]
            # zeros_like of a DTensor is a DTensor with the weight's sharding: each rank holds its rows
            state.register_buffer(f"ibar__{_key(name)}", torch.zeros_like(p, dtype=torch.float32))
            state.register_buffer(f"ubar__{_key(name)}", torch.zeros_like(p, dtype=torch.float32))
            state.register_buffer(f"mask__{_key(name)}",
                                  torch.zeros(p.shape[1], dtype=torch.bool, device=local(p).device))
        self.platon = state

    def averages(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of ``(Ibar, Ubar)`` of weight ``name``."""
        return (local(getattr(self.platon, f"ibar__{_key(name)}")),
                local(getattr(self.platon, f"ubar__{_key(name)}")))

    def column_mask(self, name: str) -> torch.Tensor:
        """Bool ``[in]``: the masked columns of weight ``name`` (the same on every rank)."""
        return getattr(self.platon, f"mask__{_key(name)}")

    # ---------------------------------------------------------------------------------------- training
    def run_step(self) -> int:
        """Optimizer steps of the whole run so far (phases before this fit included)."""
        return self.schedule_offset + self.trainer.global_step

    def _clock(self) -> float:
        if self.device.type == "cuda":  # the scoring kernels are asynchronous: time them, not their launch
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @torch.no_grad()
    def on_before_optimizer_step(self, optimizer) -> None:
        t0 = self._clock()
        params = dict(self.model.named_parameters())
        for name in self.names:
            p = params[name]
            if p.grad is None:
                continue
            platon_update(*self.averages(name), local(p), local(p.grad), self.dimchop.beta1, self.dimchop.beta2)
        self.scoring_s += self._clock() - t0

    def optimizer_step(self, *args, **kwargs) -> None:
        """The step, then this step's masks: inside the step, so every callback (checkpoint, snapshot, export)
        sees the masked weights and a checkpoint of step ``t`` holds step ``t``'s masks."""
        super().optimizer_step(*args, **kwargs)
        t0 = self._clock()
        step = self.run_step() + 1  # Lightning counts the step as done after this hook
        start, end = self.ramp
        if start < step <= end and ((step - start) % self.dimchop.update_every == 0 or step == end):
            self.update_masks(masked_fraction(step, self.dimchop.target, start, end))
            self.mask_updates += 1
        self.apply_masks()
        self.scoring_s += self._clock() - t0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dimchop_scoring"] = {"scoring_s": self.scoring_s, "mask_updates": self.mask_updates}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("dimchop_scoring", {})
        self.scoring_s, self.mask_updates = float(state.get("scoring_s", 0.0)), int(state.get("mask_updates", 0))

    def scoring_compute(self, steps: int, world: int) -> dict:
        """The compression cost of the scoring after ``steps`` optimizer steps of this fit, for ``compute`` of
        ``layerchop.json``: its measured device-seconds (PLATON updates, mask choices and zeroing, part of
        ``device_s``; this rank's time x ``world``), the mask choices made, and its elementwise FLOPs
        (:func:`layerchop.prune.platon.platon_flops`; not in ``flops``, which counts matmuls)."""
        params = dict(self.model.named_parameters())
        entries = sum(params[n].numel() for n in self.names)
        return {"scoring_device_s": round(self.scoring_s * world, 3), "scoring_mask_updates": self.mask_updates,
                "scoring_flops": platon_flops(entries, steps, self.mask_updates)}

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0 and self.run_step() >= self.ramp[0]:
            self.log("dimchop/masked_fraction", self.masked_fraction(), on_step=True, on_epoch=False)

    @torch.no_grad()
    def update_masks(self, fraction: float) -> None:
        """Re-choose every matrix's masked columns: the ``num_masked(fraction, in)`` lowest column scores."""
        params = dict(self.model.named_parameters())
        for name in self.names:
            scores = column_scores(*self.averages(name))
            if is_dtensor(params[name]):  # each rank summed its rows: the column's score is the sum over ranks
                import torch.distributed as dist

                dist.all_reduce(scores, group=params[name].device_mesh.get_group())
            self.column_mask(name).copy_(columns_to_mask(scores, num_masked(fraction, scores.numel())))

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Masked columns are exactly zero (this rank's rows of each weight)."""
        params = dict(self.model.named_parameters())
        for name in self.names:
            mask = self.column_mask(name)
            if mask.any():
                local(params[name])[:, mask] = 0

    def masked_fraction(self) -> float:
        """Masked entries over all entries of the pruned matrices."""
        params = dict(self.model.named_parameters())
        masked = sum(int(self.column_mask(n).sum()) * params[n].shape[0] for n in self.names)
        return masked / sum(params[n].numel() for n in self.names)

    # ------------------------------------------------------------------------------------------ export
    def export_masks(self) -> dict[str, torch.Tensor]:
        """``{weight name: bool [out, in] mask}`` of the masks file beside the exported model (True = pruned)."""
        params = dict(self.model.named_parameters())
        return {n: self.column_mask(n).cpu().unsqueeze(0).expand(params[n].shape[0], -1).contiguous()
                for n in self.names}


class StructuredDimChopModule(DimChopModule):
    """DimChop over whole MLP channels and attention head groups (``dimchop.structure: channels-heads``): the same
    PLATON averages and ramp, but each layer masks the ``num_masked(fraction, n)`` lowest-scoring of its
    ``intermediate_size`` channels (rows of ``gate_proj``/``up_proj``, columns of ``down_proj``) and of its key/value
    head groups (rows of ``q/k/v_proj``, columns of ``o_proj``), a unit's score being the sum of its entries' scores
    (:func:`layerchop.prune.structured.channel_scores` / ``group_scores``). ``layerchop shrink`` turns the export into
    a physically smaller model of the same family."""

    def configure_model(self) -> None:
        from layerchop.prune.structured import head_groups

        if self.platon is not None:
            return
        CausalLMModule.configure_model(self)
        self.names = target_names(self.model, self.dimchop.matrices)
        cfg = self.model.config
        self.groups, self.rep, self.head_dim = head_groups(cfg)
        params = dict(self.model.named_parameters())
        device = local(params[self.names[0]]).device
        state = nn.Module()
        for name in self.names:
            p = params[name]
            state.register_buffer(f"ibar__{_key(name)}", torch.zeros_like(p, dtype=torch.float32))
            state.register_buffer(f"ubar__{_key(name)}", torch.zeros_like(p, dtype=torch.float32))
        for layer in range(cfg.num_hidden_layers):
            state.register_buffer(f"channels__{layer}", torch.zeros(cfg.intermediate_size, dtype=torch.bool,
                                                                    device=device))
            state.register_buffer(f"groups__{layer}", torch.zeros(self.groups, dtype=torch.bool, device=device))
        self.platon = state

    def unit_masks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool ``([intermediate], [groups])``: the layer's masked channels and head groups (the same on every rank)."""
        return getattr(self.platon, f"channels__{layer}"), getattr(self.platon, f"groups__{layer}")

    def entry_masks(self, layer: int) -> dict[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """``{weight name: (masked rows, masked columns)}`` (full-length bool vectors, None: none) of a layer."""
        chan, grp = self.unit_masks(layer)
        q = grp.repeat_interleave(self.rep * self.head_dim)
        kv = grp.repeat_interleave(self.head_dim)
        att, mlp = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
        return {att + "q_proj.weight": (q, None), att + "k_proj.weight": (kv, None),
                att + "v_proj.weight": (kv, None), att + "o_proj.weight": (None, q),
                mlp + "gate_proj.weight": (chan, None), mlp + "up_proj.weight": (chan, None),
                mlp + "down_proj.weight": (None, chan)}

    @torch.no_grad()
    def layer_scores(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(channel scores, group scores)`` of a layer from this rank's rows, summed over ranks under FSDP2."""
        from layerchop.train.sharding import local_rows

        params = dict(self.model.named_parameters())
        rows: dict[str, torch.Tensor] = {}
        cols: dict[str, torch.Tensor] = {}
        for name in self.entry_masks(layer):
            p = params[name]
            s = torch.mul(*self.averages(name))
            full = torch.zeros(p.shape[0], dtype=torch.float32, device=s.device)
            start, stop = local_rows(p)
            full[start:stop] = s.sum(1)  # this rank's rows; the others' come in the all-reduce
            rows[name], cols[name] = full, s.sum(0)  # column sums are partial over ranks
        att, mlp = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
        chan = rows[mlp + "gate_proj.weight"] + rows[mlp + "up_proj.weight"] + cols[mlp + "down_proj.weight"]
        g, width = self.groups, self.rep * self.head_dim
        grp = ((rows[att + "q_proj.weight"] + cols[att + "o_proj.weight"]).view(g, width).sum(1)
               + (rows[att + "k_proj.weight"] + rows[att + "v_proj.weight"]).view(g, self.head_dim).sum(1))
        both = torch.cat([chan, grp])
        if is_dtensor(params[mlp + "gate_proj.weight"]):
            import torch.distributed as dist

            dist.all_reduce(both, group=params[mlp + "gate_proj.weight"].device_mesh.get_group())
        return both[:chan.numel()], both[chan.numel():]

    @torch.no_grad()
    def update_masks(self, fraction: float) -> None:
        for layer in range(self.model.config.num_hidden_layers):
            chan_scores, grp_scores = self.layer_scores(layer)
            chan, grp = self.unit_masks(layer)
            chan.copy_(columns_to_mask(chan_scores, num_masked(fraction, chan.numel())))
            grp.copy_(columns_to_mask(grp_scores, num_masked(fraction, grp.numel())))

    @torch.no_grad()
    def apply_masks(self) -> None:
        from layerchop.train.sharding import local_rows

        params = dict(self.model.named_parameters())
        for layer in range(self.model.config.num_hidden_layers):
            for name, (r, c) in self.entry_masks(layer).items():
                w = local(params[name])
                if r is not None:
                    start, stop = local_rows(params[name])
                    w[r[start:stop]] = 0
                if c is not None:
                    w[:, c] = 0

    def masked_fraction(self) -> float:
        """Masked entries over all entries of the seven projections, from the unit counts (no full masks)."""
        params = dict(self.model.named_parameters())
        masked = total = 0
        for layer in range(self.model.config.num_hidden_layers):
            for name, (r, c) in self.entry_masks(layer).items():
                out, inp = params[name].shape
                masked += (int(r.sum()) * inp if r is not None else 0) + (int(c.sum()) * out if c is not None else 0)
                total += out * inp
        return masked / total

    def export_masks(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        out = {}
        for layer in range(self.model.config.num_hidden_layers):
            for name, (r, c) in self.entry_masks(layer).items():
                m = torch.zeros(tuple(params[name].shape), dtype=torch.bool)
                if r is not None:
                    m[r.cpu()] = True
                if c is not None:
                    m[:, c.cpu()] = True
                out[name] = m
        return out
