"""Build the Trainer, fit to a token budget (resuming when possible), export a plain HF directory."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from layerchop.data.prepare import check_data_matches_model
from layerchop.io import read_json, read_metadata, write_json
from layerchop.prune.masks import load_masks
from layerchop.train.callbacks import ComputeMeter, ExportHF, KeepMasks, Snapshots, snapshot_steps
from layerchop.train.data import PackedDataModule
from layerchop.train.module import CausalLMModule, full_state_dict


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


def run_fingerprint(cfg, init_dir: Path, counts: dict, extra: Optional[dict] = None) -> str:
    """Identity of a training run: a checkpoint is resumed only by the same run (config, init, data, code,
    and ``extra``: objective, teacher, distillation weights, snapshots)."""
    blob = json.dumps(
        {"train": dataclasses.asdict(cfg), "init": read_metadata(init_dir), "data": counts["tokenizer_fingerprint"],
         "splits": {k: v["tokens"] for k, v in counts["splits"].items()}, "code": code_fingerprint(),
         "extra": extra or {}},
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
    dense_dir: Path, removed: list[int], prepared_dir: Path, cfg, trainer_kwargs: dict, tokens_per_step: int,
    seq_len: int,
) -> tuple[torch.nn.Module, dict, dict]:
    """The paper's warm optimizer: ``cfg.warm_start_steps`` steps on the uncompressed model, then chop.

    Returns:
        The chopped model (with the warm-trained weights of its kept layers), the FQN-keyed optimizer
        state of the kept parameters, to continue from, and the compute spent (tokens, FLOPs, seconds).
    """
    from transformers import AutoConfig

    from layerchop.train.flops import lm_step_flops
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from transformers import AutoModelForCausalLM

    from layerchop.prune.chop import chop_layers, chop_state_keys

    module = CausalLMModule(dense_dir, cfg, max_steps=cfg.warm_start_steps, tokens_per_step=tokens_per_step,
                            constant_after_warmup=True)
    dm = PackedDataModule(prepared_dir, cfg.batch_size, cfg.seed, cfg.val_batches, cfg.num_workers)
    trainer = L.Trainer(**{**trainer_kwargs, "max_steps": cfg.warm_start_steps, "logger": False,
                           "callbacks": [TQDMProgressBar(refresh_rate=1)], "limit_val_batches": 0,
                           "enable_checkpointing": False})
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - t0
    world = cfg.devices * cfg.num_nodes
    flops = cfg.warm_start_steps * cfg.accumulate * world * lm_step_flops(
        AutoConfig.from_pretrained(dense_dir), cfg.batch_size, seq_len)
    spent = {"tokens": cfg.warm_start_steps * tokens_per_step, "flops": flops, "train_s": seconds}
    opt_state = get_optimizer_state_dict(module, trainer.optimizers[0],
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    weights = full_state_dict(module.model)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    model.load_state_dict(weights)
    kept = chop_layers(model, removed)
    return model, chop_state_keys(opt_state, kept), spent


OBJECTIVES = ("lm", "distill")


def step_flops(objective: str, init_dir: Path, teacher_dir: Optional[Path], distill_cfg, mapping,
               batch_size: int, seq_len: int) -> int:
    """Measured training FLOPs of one micro-batch of ``batch_size`` x ``seq_len`` tokens on one device."""
    from transformers import AutoConfig

    from layerchop.train.flops import lm_step_flops

    config = AutoConfig.from_pretrained(init_dir)
    if objective == "lm":
        return lm_step_flops(config, batch_size, seq_len)
    from layerchop.train.distill import distill_step_flops

    return distill_step_flops(config, AutoConfig.from_pretrained(teacher_dir), mapping, distill_cfg, batch_size,
                              seq_len)


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
    objective: str = "lm",
    teacher_dir: Optional[str | Path] = None,
    distill_cfg=None,
    snapshots: int = 0,
    snapshot_dir: Optional[str | Path] = None,
    metrics: Optional[str | Path] = None,
) -> dict:
    """Continued pretraining of ``init_dir`` on ``prepared_dir`` until the budget; export to ``out``.

    Args:
        init_dir: Initial weights (HF directory).
        prepared_dir: Prepared data.
        out: Output HF directory.
        cfg: :class:`layerchop.config.TrainConfig` (its ``token_budget`` or ``flop_budget`` sets the steps).
        run_dir: Lightning checkpoints, logs and snapshots of this run (kept between invocations for resume).
        resume: ``auto`` | ``never`` | path to a Lightning checkpoint.
        log_csv: Copy the metrics CSV here.
        max_steps_override: Stop after this many steps (used to make mid-run checkpoints in tests).
        objective: ``lm`` (continued pretraining) or ``distill`` (CHOP + distill, needs ``teacher_dir``).
        teacher_dir: The uncompressed teacher (``distill``).
        distill_cfg: :class:`layerchop.config.DistillConfig` (``distill``).
        snapshots: Export this many intermediate models, evenly spaced in steps, for evaluation along the run.
        snapshot_dir: Where the snapshots go at the end (hard links to ``run_dir/snapshots``).
        metrics: Write the run's compute (tokens, FLOPs, device-seconds, s/step) and last losses here (JSON).

    Returns:
        The metadata written into ``out``.
    """
    from transformers import AutoTokenizer

    init_dir, prepared_dir, out, run_dir = Path(init_dir), Path(prepared_dir), Path(out), Path(run_dir)
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective {objective!r}: choose one of {list(OBJECTIVES)}")
    if objective == "distill":
        if teacher_dir is None or distill_cfg is None:
            raise ValueError("--objective distill needs --teacher (the uncompressed model) and a distill section")
        teacher_dir = Path(teacher_dir)
        if not (teacher_dir / "config.json").exists():
            raise FileNotFoundError(f"--teacher {teacher_dir}: not a model directory (no config.json)")
    if snapshots < 0:
        raise ValueError(f"--snapshots {snapshots} must be >= 0")
    if snapshots and snapshot_dir is None:
        raise ValueError(f"--snapshots {snapshots} needs --snapshot-dir")
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    counts = check_data_matches_model(prepared_dir, init_dir, tokenizer)
    world = cfg.devices * cfg.num_nodes
    seq_len = int(counts["seq_len"])
    tokens_per_step = cfg.batch_size * seq_len * cfg.accumulate * world
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
    mapping = None
    if objective == "distill":
        if masks is not None:
            raise ValueError(f"--objective distill: --init {init_dir} is a masked (one-shot pruned) model; "
                             "distillation here trains chopped or dense students")
        if cfg.warm_start_steps:
            raise ValueError(f"train.warm_start_steps={cfg.warm_start_steps} is not supported with --objective distill")
        from layerchop.train.distill import load_layer_map

        mapping = load_layer_map(init_dir, teacher_dir)
        # the teacher must read the same token ids as the data (and so as the student)
        check_data_matches_model(prepared_dir, teacher_dir, AutoTokenizer.from_pretrained(teacher_dir))

    # the budget: tokens, or FLOPs measured for this objective (never exceeded)
    micro_flops = step_flops(objective, init_dir, teacher_dir, distill_cfg, mapping, cfg.batch_size, seq_len)
    flops_per_step = micro_flops * cfg.accumulate * world
    if cfg.flop_budget is not None:
        max_steps = int(cfg.flop_budget // flops_per_step)
        if max_steps < 1:
            raise ValueError(f"train.flop_budget={cfg.flop_budget:.4g} is less than one optimizer step "
                             f"({flops_per_step:.4g} FLOPs)")
    else:
        max_steps = max(1, math.ceil(cfg.token_budget / tokens_per_step))

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_dir = run_dir / "checkpoints"
    extra = {"objective": objective, "snapshots": snapshots}
    if objective == "distill":
        extra.update(teacher=read_metadata(teacher_dir), teacher_dir=str(teacher_dir),
                     distill=dataclasses.asdict(distill_cfg))
    fingerprint = run_fingerprint(cfg, init_dir, counts, extra)
    ckpt_path = resolve_resume(resume, ckpt_dir, fingerprint)
    if ckpt_path is None:
        shutil.rmtree(run_dir / "snapshots", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "run.json", {"fingerprint": fingerprint, "init": str(init_dir)})

    if cfg.strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    else:
        strategy = "auto"

    metadata = {
        **{k: v for k, v in init_meta.items()
           if k not in ("stage", "steps", "train_loss_last", "val_ppl_last", "compute", "snapshot")},
        "stage": "train",
        "init": str(init_dir),
        "objective": objective,
        "tokens_before": int(init_meta.get("tokens_trained", 0)),
        "train": dataclasses.asdict(cfg),
    }
    budget = (f"{cfg.flop_budget:.4g} FLOPs" if cfg.flop_budget is not None else f"{cfg.token_budget:,} tokens")
    what = "Continued causal-LM pretraining"
    if objective == "distill":
        metadata.update(teacher=str(teacher_dir), distill=dataclasses.asdict(distill_cfg), layer_map=mapping)
        what = f"CHOP + distill (teacher `{teacher_dir}`, frozen)"
    card = (
        f"# {out.name}\n\n{what} of `{init_dir}` by `layerchop train` for {max_steps} steps x {tokens_per_step} "
        f"tokens ({max_steps * tokens_per_step} tokens; budget {budget}), AdamW lr {cfg.lr}, warmup "
        f"{cfg.warmup_steps} then cosine to {cfg.min_lr_ratio}x. Training compute in `layerchop.json` (`compute`).\n"
    )
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
    model, opt_state, start_samples, spent = None, None, 0, None
    if cfg.warm_start_steps and ckpt_path is None:
        model, opt_state, spent = warm_start(Path(init_meta["chopped_from"]), init_meta["removed_layers"],
                                             prepared_dir, cfg, common, tokens_per_step, seq_len)
        start_samples = cfg.warm_start_steps * cfg.accumulate * cfg.batch_size
        if cfg.strategy == "fsdp":  # a fresh strategy object for the second fit
            from lightning.pytorch.strategies import ModelParallelStrategy

            common["strategy"] = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)

    meter = ComputeMeter(tokens_per_step, flops_per_step, world, offset=spent)
    callbacks = [meter]
    if masks is not None:
        callbacks.append(KeepMasks(masks))
    if snapshots:
        steps = snapshot_steps(max_steps, snapshots)
        callbacks.append(Snapshots(run_dir / "snapshots", steps, tokenizer, metadata, card, meter, masks=masks))
    callbacks += [ExportHF(out, tokenizer, metadata, card, max_steps, meter, masks=masks),
                  TQDMProgressBar(refresh_rate=1)]
    if cfg.ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=cfg.ckpt_every,
                                         save_last=True, save_top_k=1, auto_insert_metric_name=False))
    logger = CSVLogger(run_dir, name="logs")  # version_N per invocation, merged at the end
    val_every = cfg.val_every or max_steps
    stop_at = min(max_steps, max_steps_override) if max_steps_override else max_steps
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
    if objective == "distill":
        from layerchop.train.distill import DistillModule

        module = DistillModule(init_dir, teacher_dir, cfg, distill_cfg, mapping, max_steps=max_steps,
                               tokens_per_step=tokens_per_step)
    else:
        module = CausalLMModule(init_dir, cfg, max_steps=max_steps, tokens_per_step=tokens_per_step, model=model,
                                optimizer_state=opt_state)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    wall = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return {}
    if log_csv is not None:
        merge_csv_logs(run_dir / "logs", Path(log_csv))
    if trainer.global_step < max_steps:
        print(f"[train] stopped at step {trainer.global_step} of {max_steps}", flush=True)
        return {}
    if snapshot_dir is not None and snapshots:
        dest = Path(snapshot_dir)
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # hard links: no second copy on disk; the run dir keeps its own for a later resume
        shutil.copytree(run_dir / "snapshots", dest, copy_function=os.link)
    meta = read_metadata(out)
    if metrics is not None:
        write_json(Path(metrics), {"objective": objective, **meta["compute"], "tokens_trained": meta["tokens_trained"],
                                   "train_loss_last": meta["train_loss_last"], "wall_s_this_invocation": round(wall, 1)})
    print(f"[train] {trainer.global_step} steps, {wall:.1f} s, {meta['compute']['flops']:.4g} FLOPs, "
          f"exported {out}", flush=True)
    return meta
