"""Callbacks shared by every training module: compute accounting, HF export, snapshots, fixed masks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from layerchop.io import num_params
from layerchop.prune.masks import MaskEnforcer, load_masks, save_pruned_model_dir

FLOP_CONVENTION = (
    "matmul FLOPs (2 per multiply-add) counted by torch.utils.flop_counter (lightning measure_flops) on a "
    "meta-device copy of one micro-batch: forward + backward of the trained model, plus the frozen teacher's "
    "forward when distilling; full T x T attention; elementwise ops not counted"
)


def _after_optimizer_step(trainer: L.Trainer, batch_idx: int) -> bool:
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


class ComputeMeter(Callback):
    """Counts tokens, FLOPs and wall-clock device-seconds of training, and logs them every step.

    ``train/tokens`` and ``train/flops`` are cumulative; ``train/device_s`` is the summed wall time of the
    optimizer steps (forward, backward, optimizer; not validation or checkpointing) times the number of
    devices. The time survives resumption through the callback's checkpoint state.

    :meth:`summary` is what the steps computed (a function of the run's inputs: it goes into the exported
    ``layerchop.json``); :meth:`timing` is how long they took on this machine (it goes to the run's metrics, never
    into a model directory, so that a re-run of the same inputs writes the same bytes).

    Args:
        tokens_per_step: Tokens per optimizer step over all devices.
        flops_per_step: Training FLOPs per optimizer step over all devices (:mod:`layerchop.train.flops`).
        world: Number of devices.
        offset: Compute spent before this fit's first step (the phases on deeper models before it):
            ``{"steps", "tokens", "flops", "train_s"}``.
        schedule: Gradual chopping's schedule (``layerchop.json``'s ``chop_schedule``), copied into the summary.
        keep_time: Keep the wall time in the checkpoint state (a resumed run goes on counting). ``False`` for the
            shared warm start (``train --warm-only``), whose checkpoint is a DVC output that every warm-started arm
            forks from: its bytes must not depend on this machine's speed, so the time goes to the stage's metrics
            alone. A fit restored from such a state does not know the restored steps' time: :meth:`timing` says
            ``None`` for it rather than count the steps as free.
    """

    def __init__(self, tokens_per_step: int, flops_per_step: int, world: int, offset: Optional[dict] = None,
                 schedule: Optional[dict] = None, keep_time: bool = True):
        self.schedule = schedule  # gradual chopping: when the layers went (recorded with the compute)
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.world = world
        self.offset = {"steps": 0, "tokens": 0, "flops": 0, "train_s": 0.0, **(offset or {})}
        self.train_s = 0.0  # this run's optimizer-step wall time, all invocations
        self.keep_time = keep_time
        self.untimed = False  # restored from a state without its time (the shared warm start's checkpoint)
        self._t0: Optional[float] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not _after_optimizer_step(trainer, batch_idx) or self._t0 is None:
            return
        dt = time.perf_counter() - self._t0
        self.train_s += dt
        s = self.summary(trainer.global_step)
        pl_module.log("train/tokens", float(s["tokens"]), on_step=True, on_epoch=False)
        pl_module.log("train/flops", float(s["flops"]), on_step=True, on_epoch=False)
        device_s = self.timing(trainer.global_step)["device_s"]
        if device_s is not None:
            pl_module.log("train/device_s", device_s, on_step=True, on_epoch=False)
        pl_module.log("train/s_per_step", dt, on_step=True, on_epoch=False)
        pl_module.log("train/tokens_per_s", self.tokens_per_step / max(dt, 1e-9), prog_bar=True, on_step=True,
                      on_epoch=False)

    def summary(self, step: int) -> dict[str, Any]:
        """Compute after ``step`` optimizer steps of this fit (plus the offset): steps, tokens, FLOPs; no time."""
        return {
            "steps": self.offset["steps"] + step,
            "tokens": self.offset["tokens"] + step * self.tokens_per_step,
            "flops": self.offset["flops"] + step * self.flops_per_step,
            "flops_per_step": self.flops_per_step,
            "tokens_per_step": self.tokens_per_step,
            "devices": self.world,
            "warm_start": ({k: v for k, v in self.offset.items() if k != "train_s"} if self.offset["flops"]
                           else None),
            "flop_convention": FLOP_CONVENTION,
            **({"chop_schedule": self.schedule} if self.schedule else {}),
        }

    def timing(self, step: int) -> dict[str, Any]:
        """Wall time after ``step`` optimizer steps of this fit: ``train_s`` (the optimizer steps, the offset's
        included), ``device_s`` (that x devices), ``s_per_step`` (this fit's steps) and, after a warm start or
        earlier phases, ``warm_start_train_s``.

        A time that is not known is ``None``: this fit's, when it was restored from a state without its time
        (``keep_time=False``); the offset's, when the steps before this fit were (a shared warm start's steps:
        ``warm_start_train_s`` is then ``None`` and ``train_s`` counts this fit's steps alone; the warm steps' time
        is in the ``warm_start`` stage's metrics)."""
        own = None if self.untimed else self.train_s
        before = self.offset["train_s"]
        total = None if own is None else own + (before or 0.0)
        return {
            "train_s": None if total is None else round(total, 3),
            "device_s": None if total is None else round(total * self.world, 3),
            "s_per_step": round(own / step, 4) if own is not None and step else None,
            **({"warm_start_train_s": None if before is None else round(before, 3)} if self.offset["flops"] else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"train_s": self.train_s if self.keep_time and not self.untimed else None, "offset": dict(self.offset)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.untimed = state_dict["train_s"] is None
        self.train_s = 0.0 if self.untimed else float(state_dict["train_s"])
        self.offset = {"steps": 0, **state_dict["offset"]}


def export_hf(config, state_dict: dict[str, torch.Tensor], tokenizer, out: Path, metadata: dict, card: str,
              masks: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Save weights into a freshly built model of ``config`` (no FSDP wrapper classes leak into it), in
    ``metadata["dtype"]`` (the input model's, or ``train.export_dtype``; float32 when absent)."""
    from transformers import AutoModelForCausalLM

    from layerchop.io import dtypes, save_model_dir

    dtype = dtypes()[metadata.get("dtype", "float32")]
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(state_dict, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"export: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    fresh.tie_weights()
    fresh.config.dtype = dtype
    metadata = {**metadata, "num_params": num_params(fresh)}
    if masks is not None:
        save_pruned_model_dir(fresh, tokenizer, out, masks=masks, metadata=metadata, card=card)
    else:
        save_model_dir(fresh, tokenizer, out, metadata=metadata, card=card)


class _Exporter(Callback):
    """Writes the trained model as a plain HF directory; ``masks_dir`` is the pruned init whose masks file
    goes beside it (read on rank 0 only, when exporting)."""

    def __init__(self, tokenizer, metadata: dict, card: str, meter: ComputeMeter, masks_dir: Optional[Path] = None):
        self.tokenizer, self.metadata, self.card, self.meter = tokenizer, metadata, card, meter
        self.masks_dir = masks_dir
        self.timing: dict[str, dict] = {}  # export directory name -> its wall times (rank 0; for the run's metrics)

    def export(self, trainer: L.Trainer, pl_module, out: Path) -> None:
        """Gather the full state (every rank), write ``out`` on rank 0, wait for it."""
        config, sd = pl_module.export_state()
        if trainer.is_global_zero:
            masks = load_masks(self.masks_dir) if self.masks_dir is not None else None
            if masks is None and hasattr(pl_module, "export_masks"):  # masks grown in training (DimChop)
                masks = pl_module.export_masks()
            step = trainer.global_step
            compute, timing = self.meter.summary(step), self.meter.timing(step)
            if hasattr(pl_module, "scoring_compute"):  # DimChop: the cost of its importance scores
                for k, v in pl_module.scoring_compute(compute["steps"], self.meter.world).items():
                    (timing if k.endswith("_s") else compute)[k] = v
            self.timing[out.name] = {"steps": compute["steps"], **timing}
            meta = dict(self.metadata)
            meta["steps"] = step
            meta["compute"] = compute
            meta["tokens_this_stage"] = compute["tokens"] - self.meter.offset["tokens"]
            meta["tokens_trained"] = int(meta.get("tokens_before", 0)) + compute["tokens"]
            if pl_module.warm_optimizer is not None:
                meta["warm_start_optimizer"] = pl_module.warm_optimizer
            if hasattr(pl_module, "export_record"):  # what the method measured in the run (distill's scales)
                meta.update(pl_module.export_record())
            last = getattr(self, "last_loss", None)  # a run resumed at its last step logged no loss
            meta["train_loss_last"] = float(trainer.callback_metrics.get("train/loss",
                                                                         last if last is not None else float("nan")))
            if "val/ppl" in trainer.callback_metrics:
                meta["val_ppl_last"] = float(trainer.callback_metrics["val/ppl"])
            if masks is not None:
                meta["masked_nonzero_after_training"] = sum(int(torch.count_nonzero(sd[k][m]))
                                                            for k, m in masks.items())
            export_hf(config, sd, self.tokenizer, out, meta, self.card, masks=masks)
        trainer.strategy.barrier()


class ExportHF(_Exporter):
    """At the end of training, write the model as a plain HF directory (rank 0 writes).

    Nothing is written when training stopped before ``max_steps``, so no partial output looks finished. A run
    resumed from a checkpoint of its last step (killed during the final validation or the export) has no
    step left, so Lightning skips the training loop and ``on_train_end``: it is exported in ``on_fit_end``
    (the strategy keeps the sharded model there; the single-device one has moved it to the CPU, which the
    export reads anyway). The last training loss travels in the checkpoint for that case.
    """

    def __init__(self, out: Path, tokenizer, metadata: dict, card: str, max_steps: int, meter: ComputeMeter,
                 masks_dir: Optional[Path] = None):
        super().__init__(tokenizer, metadata, card, meter, masks_dir)
        self.out, self.max_steps = out, max_steps
        self.exported = False
        self._last_loss: Optional[torch.Tensor] = None
        self.last_loss: Optional[float] = None  # restored from a checkpoint

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if isinstance(outputs, dict) and "loss" in outputs:  # the micro-batch loss / accumulate (Lightning)
            self._last_loss = outputs["loss"].detach() * trainer.accumulate_grad_batches

    def state_dict(self) -> dict[str, Any]:
        loss = float(self._last_loss) if self._last_loss is not None else self.last_loss
        return {"train_loss_last": loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_loss = state_dict.get("train_loss_last")

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step < self.max_steps:
            if trainer.is_global_zero:
                print(f"[train] stopped at step {trainer.global_step} < {self.max_steps}: not exported", flush=True)
            return
        self.export(trainer, pl_module, self.out)
        self.exported = True

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if not self.exported and trainer.global_step >= self.max_steps:
            if trainer.is_global_zero:
                print(f"[train] the checkpoint is of the last step ({trainer.global_step}): exporting it", flush=True)
            self.export(trainer, pl_module, self.out)
            self.exported = True


class Snapshots(_Exporter):
    """Export the model as a HF directory ``root/step_XXXXXX`` at given optimizer steps of the run, for
    intermediate evaluations. A snapshot that already exists (a resumed run) is kept.

    ``offset``: the run's steps before this fit (its phases on deeper models), so ``steps`` and the directory
    names count the whole run."""

    def __init__(self, root: Path, steps: list[int], tokenizer, metadata: dict, card: str, meter: ComputeMeter,
                 masks_dir: Optional[Path] = None, offset: int = 0, timing_dir: Optional[Path] = None):
        super().__init__(tokenizer, {**metadata, "snapshot": True}, card, meter, masks_dir)
        self.root, self.steps, self.offset = Path(root), set(steps), offset
        self.timing_dir = timing_dir  # each snapshot's wall times, as a file that survives a resumed run

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = self.offset + trainer.global_step
        if _after_optimizer_step(trainer, batch_idx) and step in self.steps:
            out = self.root / f"step_{step:06d}"
            # rank 0 decides (the export is a collective; ranks on other hosts may see the directory later)
            if not trainer.strategy.broadcast(out.exists()):
                self.export(trainer, pl_module, out)
                if trainer.is_global_zero and self.timing_dir is not None:
                    from layerchop.io import write_json

                    write_json(self.timing_dir / f"{out.name}.json", self.timing[out.name])


class KeepMasks(Callback):
    """Sparse continued pretraining: masked weights stay exactly zero after every optimizer step.

    Args:
        masks: The masks file (each rank reads the rows of its shards) or a ``{name: mask}`` dict.
    """

    def __init__(self, masks: "Path | dict[str, torch.Tensor]"):
        self.masks = masks
        self.enforcer: Optional[MaskEnforcer] = None

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.enforcer = MaskEnforcer(pl_module.model, self.masks)
        self.enforcer.apply()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _after_optimizer_step(trainer, batch_idx):  # right after an optimizer step
            self.enforcer.apply()


class HostMemory(Callback):
    """Peak host memory (RSS) of every rank: before the model is built, after it is built and sharded, and at
    the end of training, plus the bytes of the parameters the rank holds; on CUDA also the device's peak
    allocated and reserved memory (what ``layerchop plan``'s per-GPU estimate is compared with). Gathered to
    rank 0 as :attr:`report` (a list, one dict per rank), for the run's metrics."""

    def __init__(self):
        self.report: list[dict[str, Any]] = []
        self._before = 0.0
        self._built = 0.0

    @staticmethod
    def _peak_mb() -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._before = self._peak_mb()  # Lightning calls this before configure_model

    def on_fit_start(self, trainer, pl_module) -> None:
        self._built = self._peak_mb()

    def on_train_end(self, trainer, pl_module) -> None:
        import socket

        from layerchop.train.sharding import local

        mine = {
            "rank": trainer.global_rank, "node": trainer.node_rank, "host": socket.gethostname(),
            "peak_rss_mb_before_model": round(self._before, 1), "peak_rss_mb_after_model": round(self._built, 1),
            "peak_rss_mb_end": round(self._peak_mb(), 1),
            "param_mb_held": round(sum(local(p).numel() * local(p).element_size()
                                       for p in pl_module.parameters()) / 2**20, 2),
        }
        if pl_module.device.type == "cuda":
            mine["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(pl_module.device) / 2**20, 1)
            mine["gpu_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(pl_module.device) / 2**20, 1)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        self.report = sorted(everyone, key=lambda r: r["rank"])


class JobRequeued(Exception):
    """Raised after a run checkpointed and requeued its SLURM job: the process ends, the requeued job resumes."""


class RequeueOnSignal(Callback):
    """SLURM's warning before the time limit (``--signal=USR1@N``) -> a checkpoint and a requeued job.

    The process-wide handler (:func:`layerchop.launch.catch_time_limit_signal`, installed by the train stage in a
    SLURM job) only sets a flag. After each optimizer step the ranks agree (one all-reduce of a bool: the signal
    may reach them at different steps) whether any rank got it; if so, every rank writes the checkpoint of this
    step (:class:`~layerchop.train.checkpoint.AtomicCheckpoint`, collective, published before anything else
    happens) and global rank 0 runs ``scontrol requeue``. SLURM then ends the job's processes (SIGTERM, SIGKILL
    after its KillWait) and runs the job again, which resumes this checkpoint: it is the newest. Should the
    processes outlive that, training stops (``requeued``). If SLURM refuses the requeue, training goes on.
    Replaces Lightning's own SLURM requeue handler (``SLURMEnvironment(auto_requeue=False)``), which writes
    its checkpoint inside the signal handler, possibly in the middle of a collective.
    """

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.requeued = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        from layerchop.launch import clear_time_limit_signal, time_limit_signalled

        if not _after_optimizer_step(trainer, batch_idx):
            return
        if not trainer.strategy.reduce_boolean_decision(time_limit_signalled(), all=False):
            return
        path = self.checkpoint.save(trainer)
        ok = False
        if trainer.is_global_zero:
            from layerchop.launch import requeue_this_job

            print(f"[train] SLURM time-limit signal: checkpoint {path} written; requeueing the job", flush=True)
            ok = requeue_this_job()
        ok = trainer.strategy.broadcast(ok, src=0)
        clear_time_limit_signal()
        if ok:
            self.requeued = True
            trainer.should_stop = True


def requeue_callbacks(checkpoints: Path) -> list:
    """Under a SLURM batch job (:func:`layerchop.launch.under_slurm`): checkpoint into ``checkpoints`` and
    requeue on the time-limit signal (:class:`RequeueOnSignal`); elsewhere nothing."""
    from layerchop.launch import under_slurm
    from layerchop.train.checkpoint import AtomicCheckpoint

    return [RequeueOnSignal(AtomicCheckpoint(checkpoints, 0))] if under_slurm() else []
