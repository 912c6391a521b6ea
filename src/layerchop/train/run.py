"""Build the Trainer, fit to a token budget (resuming when possible), export a plain HF directory."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from layerchop.data.prepare import check_data_matches_model
from layerchop.io import num_params, read_json, read_metadata, write_json
from layerchop.prune.masks import MaskEnforcer, load_masks, save_pruned_model_dir
from layerchop.train.data import PackedDataModule
from layerchop.train.module import CausalLMModule


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (a collective under FSDP2: call on every rank)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def export_hf(config, state_dict: dict[str, torch.Tensor], tokenizer, out: Path, metadata: dict, card: str,
              masks: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Save weights into a freshly built model of ``config`` (no FSDP wrapper classes leak into it)."""
    from transformers import AutoModelForCausalLM

    from layerchop.io import save_model_dir

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(state_dict, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"export: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    fresh.tie_weights()
    metadata = {**metadata, "num_params": num_params(fresh)}
    if masks is not None:
        save_pruned_model_dir(fresh, tokenizer, out, masks=masks, metadata=metadata, card=card)
    else:
        save_model_dir(fresh, tokenizer, out, metadata=metadata, card=card)


class ExportHF(Callback):
    """At the end of training, write the model as a plain HF directory (rank 0 writes)."""

    def __init__(self, out: Path, tokenizer, metadata: dict, card: str, max_steps: int,
                 masks: Optional[dict[str, torch.Tensor]] = None):
        self.out, self.tokenizer, self.metadata, self.card = out, tokenizer, metadata, card
        self.max_steps = max_steps
        self.masks = masks
        self._t0 = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: CausalLMModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: CausalLMModule) -> None:
        if trainer.global_step < self.max_steps:
            # stopped before the token budget: leave no output that looks finished
            if trainer.is_global_zero:
                print(f"[train] stopped at step {trainer.global_step} < {self.max_steps}: not exported", flush=True)
            return
        sd = full_state_dict(pl_module.model)
        if trainer.is_global_zero:
            meta = dict(self.metadata)
            meta["steps"] = trainer.global_step
            meta["train_wall_s"] = round(time.perf_counter() - self._t0, 2)
            if pl_module.warm_optimizer is not None:
                meta["warm_start_optimizer"] = pl_module.warm_optimizer
            meta["train_loss_last"] = float(trainer.callback_metrics.get("train/loss", float("nan")))
            if "val/ppl" in trainer.callback_metrics:
                meta["val_ppl_last"] = float(trainer.callback_metrics["val/ppl"])
            if self.masks is not None:
                meta["masked_nonzero_after_training"] = sum(int(torch.count_nonzero(sd[k][m]))
                                                            for k, m in self.masks.items())
            export_hf(pl_module.model.config, sd, self.tokenizer, self.out, meta, self.card, masks=self.masks)
        trainer.strategy.barrier()


class KeepMasks(Callback):
    """Sparse continued pretraining: masked weights stay exactly zero after every optimizer step."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks
        self.enforcer: Optional[MaskEnforcer] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: CausalLMModule) -> None:
        self.enforcer = MaskEnforcer(pl_module.model, self.masks)
        self.enforcer.apply()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: CausalLMModule, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:  # right after an optimizer step
            self.enforcer.apply()


def code_fingerprint() -> str:
    """Hash of the code a training run executes, and of the library versions it runs on."""
    import lightning
    import transformers

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "train").glob("*.py")) + [root / "data" / "prepare.py", root / "prune" / "masks.py",
                                                      root / "prune" / "chop.py"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    h.update(f"{torch.__version__} {lightning.__version__} {transformers.__version__}".encode())
    return h.hexdigest()[:16]


def run_fingerprint(cfg, init_dir: Path, counts: dict) -> str:
    """Identity of a training run: a checkpoint is resumed only by the same run (config, init, data, code)."""
    blob = json.dumps(
        {"train": dataclasses.asdict(cfg), "init": read_metadata(init_dir), "data": counts["tokenizer_fingerprint"],
         "splits": {k: v["tokens"] for k, v in counts["splits"].items()}, "code": code_fingerprint()},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_resume(resume: str, ckpt_dir: Path, fingerprint: str) -> Optional[str]:
    """``auto``: resume from ``last.ckpt`` of the same run configuration; ``never``; or a path."""
    stamp = ckpt_dir.parent / "run.json"
    logs = ckpt_dir.parent / "logs"
    if resume == "never":
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
        return None
    if resume != "auto":
        if not Path(resume).exists():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        return resume
    last = ckpt_dir / "last.ckpt"
    if last.exists() and stamp.exists() and read_json(stamp).get("fingerprint") == fingerprint:
        print(f"[train] resuming from {last}", flush=True)
        return str(last)
    if ckpt_dir.exists():
        print(f"[train] {ckpt_dir} holds checkpoints of another configuration; starting fresh", flush=True)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    return None


def merge_csv_logs(log_root: Path, dest: Path) -> None:
    """Concatenate the CSV logs of every (resumed) invocation; a later invocation wins for a step."""
    rows: dict[tuple[str, str], dict] = {}
    fields: list[str] = []
    for f in sorted(log_root.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with open(f) as fh:
            reader = csv.DictReader(fh)
            fields += [c for c in reader.fieldnames or [] if c not in fields]
            for row in reader:
                key = (row.get("step", ""), ",".join(k for k, v in row.items() if v and k != "step"))
                rows[key] = row
    ordered = sorted(rows.values(), key=lambda r: int(r.get("step") or 0))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(ordered)


def warm_start(
    dense_dir: Path, removed: list[int], prepared_dir: Path, cfg, trainer_kwargs: dict, tokens_per_step: int
) -> tuple[torch.nn.Module, dict]:
    """The paper's warm optimizer: ``cfg.warm_start_steps`` steps on the uncompressed model, then chop.

    Returns:
        The chopped model (with the warm-trained weights of its kept layers) and the FQN-keyed optimizer
        state of the kept parameters, to continue from.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from transformers import AutoModelForCausalLM

    from layerchop.prune.chop import chop_layers, chop_state_keys

    module = CausalLMModule(dense_dir, cfg, max_steps=cfg.warm_start_steps, tokens_per_step=tokens_per_step,
                            constant_after_warmup=True)
    dm = PackedDataModule(prepared_dir, cfg.batch_size, cfg.seed, cfg.val_batches, cfg.num_workers)
    trainer = L.Trainer(**{**trainer_kwargs, "max_steps": cfg.warm_start_steps, "logger": False,
                           "callbacks": [TQDMProgressBar(refresh_rate=1)], "limit_val_batches": 0,
                           "enable_checkpointing": False})
    trainer.fit(module, datamodule=dm)
    opt_state = get_optimizer_state_dict(module, trainer.optimizers[0],
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    weights = full_state_dict(module.model)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    model.load_state_dict(weights)
    kept = chop_layers(model, removed)
    return model, chop_state_keys(opt_state, kept)


def train(
    init_dir: str | Path,
    prepared_dir: str | Path,
    out: str | Path,
    cfg,
    *,
    run_dir: str | Path,
    resume: str = "auto",
    log_csv: Optional[str | Path] = None,
    max_steps_override: Optional[int] = None,
) -> dict:
    """Continued pretraining of ``init_dir`` on ``prepared_dir`` until the token budget; export to ``out``.

    Args:
        init_dir: Initial weights (HF directory).
        prepared_dir: Prepared data.
        out: Output HF directory.
        cfg: :class:`layerchop.config.TrainConfig`.
        run_dir: Lightning checkpoints and logs of this run (kept between invocations for resume).
        resume: ``auto`` | ``never`` | path to a Lightning checkpoint.
        log_csv: Copy the metrics CSV here.
        max_steps_override: Stop after this many steps (used to make mid-run checkpoints in tests).

    Returns:
        The metadata written into ``out``.
    """
    from transformers import AutoTokenizer

    init_dir, prepared_dir, out, run_dir = Path(init_dir), Path(prepared_dir), Path(out), Path(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    counts = check_data_matches_model(prepared_dir, init_dir, tokenizer)
    world = cfg.devices * cfg.num_nodes
    seq_len = int(counts["seq_len"])
    tokens_per_step = cfg.batch_size * seq_len * cfg.accumulate * world
    max_steps = max(1, math.ceil(cfg.token_budget / tokens_per_step))
    if counts["splits"]["train"]["sequences"] < cfg.batch_size:
        raise ValueError(
            f"train.batch_size={cfg.batch_size} is larger than the {counts['splits']['train']['sequences']} "
            "training sequences"
        )

    init_meta = read_metadata(init_dir)
    masks = load_masks(init_dir)  # a one-shot pruned model: sparse continued pretraining, masks fixed
    if masks is not None and cfg.warm_start_steps:
        raise ValueError(f"train.warm_start_steps={cfg.warm_start_steps} does not apply to a pruned (masked) --init")
    if cfg.warm_start_steps and not (init_meta.get("removed_layers") and init_meta.get("chopped_from")):
        raise ValueError(
            f"train.warm_start_steps={cfg.warm_start_steps} needs --init to be a chopped model whose "
            f"{init_dir}/layerchop.json names chopped_from and removed_layers"
        )

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_dir = run_dir / "checkpoints"
    fingerprint = run_fingerprint(cfg, init_dir, counts)
    ckpt_path = resolve_resume(resume, ckpt_dir, fingerprint)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "run.json", {"fingerprint": fingerprint, "init": str(init_dir)})

    if cfg.strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    else:
        strategy = "auto"

    warm_tokens = cfg.warm_start_steps * tokens_per_step
    metadata = {
        **{k: v for k, v in init_meta.items() if k not in ("stage", "steps", "train_loss_last", "val_ppl_last")},
        "stage": "train",
        "init": str(init_dir),
        "tokens_trained": int(init_meta.get("tokens_trained", 0)) + warm_tokens + max_steps * tokens_per_step,
        "tokens_this_stage": max_steps * tokens_per_step,
        "train": dataclasses.asdict(cfg),
    }
    card = (
        f"# {out.name}\n\nContinued causal-LM pretraining of `{init_dir}` by `layerchop train` for {max_steps} "
        f"steps x {tokens_per_step} tokens ({max_steps * tokens_per_step} tokens), AdamW lr {cfg.lr}, "
        f"warmup {cfg.warmup_steps} then cosine to {cfg.min_lr_ratio}x.\n"
    )
    callbacks = [
        ExportHF(out, tokenizer, metadata, card, max_steps, masks=masks),
        TQDMProgressBar(refresh_rate=1),
    ]
    if masks is not None:
        callbacks.insert(0, KeepMasks(masks))
    if cfg.ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=cfg.ckpt_every,
                                         save_last=True, save_top_k=1, auto_insert_metric_name=False))
    logger = CSVLogger(run_dir, name="logs")  # version_N per invocation, merged at the end
    val_every = cfg.val_every or max_steps
    stop_at = min(max_steps, max_steps_override) if max_steps_override else max_steps
    common = dict(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy,
        precision=cfg.precision,
        accumulate_grad_batches=cfg.accumulate,
        gradient_clip_val=cfg.grad_clip or None,
        enable_model_summary=False,
        log_every_n_steps=1,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    model, opt_state, start_samples = None, None, 0
    if cfg.warm_start_steps and ckpt_path is None:
        model, opt_state = warm_start(Path(init_meta["chopped_from"]), init_meta["removed_layers"], prepared_dir,
                                      cfg, common, tokens_per_step)
        start_samples = cfg.warm_start_steps * cfg.accumulate * cfg.batch_size
        if cfg.strategy == "fsdp":  # a fresh strategy object for the second fit
            from lightning.pytorch.strategies import ModelParallelStrategy

            common["strategy"] = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    trainer = L.Trainer(
        **common,
        max_steps=stop_at,
        val_check_interval=val_every * cfg.accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.val_batches,
        logger=logger,
        callbacks=callbacks,
    )
    dm = PackedDataModule(prepared_dir, cfg.batch_size, cfg.seed, cfg.val_batches, cfg.num_workers,
                          start_samples=start_samples)
    module = CausalLMModule(init_dir, cfg, max_steps=max_steps, tokens_per_step=tokens_per_step, model=model,
                            optimizer_state=opt_state)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    wall = time.perf_counter() - t0
    if trainer.is_global_zero:
        if log_csv is not None:
            merge_csv_logs(run_dir / "logs", Path(log_csv))
        print(f"[train] {trainer.global_step} steps, {wall:.1f} s, exported {out}", flush=True)
    return read_metadata(out) if trainer.is_global_zero and out.exists() else {}
