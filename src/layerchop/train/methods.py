"""Training methods as pieces: what ``layerchop train --objective <name>`` selects.

A :class:`Method` owns everything that differs between ways of training a compressed model: its params section,
its checks (before any work), its contribution to the run's fingerprint, the FLOPs of one micro-batch, its memory
terms, its LightningModule, and its model card. ``resolve`` (:mod:`layerchop.train.plan`), ``train``
(:mod:`layerchop.train.run`), ``layerchop plan`` and the train stage call through :data:`METHODS` instead of
branching on the name.

Adding a method: subclass :class:`Method` in the file of its LightningModule (under ``src/layerchop/train/``, so the
run's code fingerprint covers it) and add it to :data:`METHODS` at the end of this file (an import there, after
:class:`Method` exists); before this registry a method also touched ``train/plan.py``, ``train/run.py``,
``stages/plan.py`` and ``stages/train.py``. ``tests/toy_method.py`` is a worked example (docs/bring-your-own.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional


class Method:
    """Continued causal-LM pretraining (``--objective lm``): the paper's recovery, and the base of the others."""

    name = "lm"
    section: Optional[str] = None
    """The params section of its settings (None: it has none)."""
    needs_teacher = False
    """Whether it trains against the uncompressed model (``--teacher``)."""
    phases = True
    """Whether a warm start or gradual chopping may precede it (both train the LM objective on the dense model)."""
    masked_init = True
    """Whether it may train a one-shot pruned (masked) model."""

    # ------------------------------------------------------------------------------------------ settings
    def settings(self, params: dict, overrides: dict) -> Any:
        """Its settings from ``params`` (None when it has no section); ``overrides``: stage flags it owns."""
        from layerchop.config import section

        unknown = {k: v for k, v in overrides.items() if v is not None}
        if unknown:
            flag = next(iter(unknown))
            raise ValueError(f"--{flag.replace('_', '-')} {unknown[flag]} is not an option of --objective {self.name}")
        return section(self.section, params) if self.section else None

    # ---------------------------------------------------------------------------------------------- checks
    def check_args(self, cfg, settings, teacher_dir) -> None:
        """Checks of the arguments and the train section (no file read)."""
        if self.section and settings is None:
            raise ValueError(f"--objective {self.name} needs a {self.section} section")

    def check_config(self, config, teacher_config, settings) -> None:
        """Checks of the architectures alone (no file read): ``layerchop plan`` runs them for every arm, and
        :meth:`check_init` before a run."""

    def check_init(self, init_dir: Path, settings, masked: bool) -> None:
        """Checks of the model it starts from (before any weight is loaded)."""
        if masked and not self.masked_init:
            raise ValueError(f"--objective {self.name}: --init {init_dir} is a masked (one-shot pruned) model; "
                             f"{self.name} does not train pruned models")

    # --------------------------------------------------------------------------------------------- the run
    def teacher(self, init_dir: Path, teacher_dir, prepared_dir: Path):
        """``(layer map, teacher metadata)`` (None, None without a teacher)."""
        return None, None

    def identity(self, settings, teacher_dir, teacher_meta, total_steps: int) -> dict:
        """What the run's result depends on beyond the train section and the data (its fingerprint's share)."""
        return {}

    def micro_flops(self, model_config, teacher_config, mapping, settings, batch_size: int, seq_len: int) -> int:
        """FLOPs of one micro-batch (forward and backward) on one rank."""
        from layerchop.train.flops import lm_step_flops

        return lm_step_flops(model_config, batch_size, seq_len)

    def memory(self, config, cfg, seq_len: int, teacher_config=None, on_gpu: Optional[bool] = None):
        """Per-rank memory (:class:`layerchop.estimate.TrainMemory`) of training ``config``."""
        from layerchop.estimate import train_memory

        return train_memory(config, cfg, seq_len, teacher_config=teacher_config, on_gpu=on_gpu)

    def extra_disk_gb(self, config) -> float:
        """Disk an export holds beyond the weights (per model directory)."""
        return 0.0

    def checkpoint_gb(self, config) -> float:
        from layerchop.estimate import checkpoint_gb

        return checkpoint_gb(config)

    def module(self, plan, start):
        """The LightningModule that trains ``plan`` (``start``: a previous phase's state)."""
        from layerchop.train.module import CausalLMModule

        steps = plan.steps
        return CausalLMModule(plan.init_dir, plan.cfg, max_steps=steps.main_steps, schedule_offset=steps.warm_steps,
                              schedule_steps=steps.total_steps, start=start)

    def card(self, plan, metadata: dict) -> str:
        """The model card's first words; adds what the export's ``layerchop.json`` records about the method."""
        return "Continued causal-LM pretraining"


class Distill(Method):
    """CHOP + distill (``--objective distill``): the chopped student against the frozen uncompressed teacher."""

    name = "distill"
    section = "distill"
    needs_teacher = True
    phases = False
    masked_init = False

    def settings(self, params, overrides):
        from layerchop.config import section

        balance = overrides.pop("balance", None) if overrides else None
        settings = section("distill", params)
        super().settings(params, overrides)  # any other flag is not ours
        if balance is None or settings is None:
            return settings
        return dataclasses.replace(settings, balance=balance)  # checked again by DistillConfig

    def check_args(self, cfg, settings, teacher_dir) -> None:
        if teacher_dir is None or settings is None:
            raise ValueError("--objective distill needs --teacher (the uncompressed model) and a distill section")

    def check_config(self, config, teacher_config, settings):
        from layerchop.train.distill import check_distill_family

        check_distill_family(config, teacher_config if teacher_config is not None else config)

    def teacher(self, init_dir, teacher_dir, prepared_dir):
        from transformers import AutoConfig, AutoTokenizer

        from layerchop.data.prepare import check_data_matches_model
        from layerchop.io import check_model_dir, read_metadata
        from layerchop.train.distill import load_layer_map

        check_model_dir(teacher_dir, "--teacher")
        self.check_config(AutoConfig.from_pretrained(init_dir), AutoConfig.from_pretrained(teacher_dir), None)
        mapping = load_layer_map(init_dir, teacher_dir)
        # the teacher must read the same token ids as the data (and so as the student)
        check_data_matches_model(prepared_dir, teacher_dir, AutoTokenizer.from_pretrained(teacher_dir))
        return mapping, read_metadata(teacher_dir)

    def identity(self, settings, teacher_dir, teacher_meta, total_steps):
        return {"teacher": teacher_meta, "teacher_dir": str(teacher_dir), "distill": dataclasses.asdict(settings)}

    def micro_flops(self, model_config, teacher_config, mapping, settings, batch_size, seq_len):
        from layerchop.train.distill import distill_step_flops

        return distill_step_flops(model_config, teacher_config, mapping, settings, batch_size, seq_len)

    def module(self, plan, start):
        from layerchop.train.distill import DistillModule

        return DistillModule(plan.init_dir, plan.teacher_dir, plan.cfg, plan.method_cfg, plan.layer_map,
                             max_steps=plan.steps.main_steps)

    def card(self, plan, metadata):
        metadata.update(teacher=str(plan.teacher_dir), distill=dataclasses.asdict(plan.method_cfg),
                        layer_map=plan.layer_map)
        return f"CHOP + distill (teacher `{plan.teacher_dir}`, frozen)"


class DimChop(Method):
    """DimChop (``--objective dimchop``): width pruning while training, from the uncompressed model."""

    name = "dimchop"
    section = "dimchop"
    phases = False
    masked_init = False

    def settings(self, params, overrides):
        from layerchop.config import section

        settings = section("dimchop", params)
        structure = overrides.pop("structure", None) if overrides else None
        super().settings(params, overrides)  # any other flag is not ours
        return dataclasses.replace(settings, structure=structure) if structure else settings

    def check_args(self, cfg, settings, teacher_dir):
        super().check_args(cfg, settings, teacher_dir)
        if cfg.fsdp_sharding == "hybrid" and cfg.num_nodes > 1:
            raise ValueError("train.fsdp_sharding='hybrid': --objective dimchop sums its PLATON scores over one "
                             "sharding group; use train.fsdp_sharding: full")
        if cfg.precision in ("bf16-true", "16-mixed"):
            raise ValueError(f"train.precision={cfg.precision!r}: --objective dimchop keeps its PLATON averages in "
                             "float32 and folds in every step's gradients (a bf16 module or a skipped fp16 step would "
                             "spoil them); use 32-true or bf16-mixed")

    def check_config(self, config, teacher_config, settings):
        from layerchop.prune.structured import refusal
        from layerchop.train.dimchop import target_names
        from layerchop.train.flops import meta_model

        model = meta_model(config)  # built once for both checks
        target_names(model, settings.matrices)
        why = refusal(config, model) if settings.structure == "channels-heads" else None
        if why:
            raise ValueError(f"dimchop.structure='channels-heads': {why}")

    def check_init(self, init_dir, settings, masked):
        from transformers import AutoConfig

        self.check_config(AutoConfig.from_pretrained(init_dir), None, settings)
        if masked:
            raise ValueError(f"--objective dimchop: --init {init_dir} is already masked (one-shot pruned); DimChop "
                             "prunes a dense model while it trains")

    def identity(self, settings, teacher_dir, teacher_meta, total_steps):
        settings.ramp_steps(total_steps)  # the ramp must have a step in this run
        return {"dimchop": dataclasses.asdict(settings)}

    def memory(self, config, cfg, seq_len, teacher_config=None, on_gpu=None):
        from layerchop.estimate import train_memory

        return train_memory(config, cfg, seq_len, teacher_config=teacher_config, on_gpu=on_gpu, dimchop=True)

    def extra_disk_gb(self, config):
        from layerchop.estimate import projection_entries

        return projection_entries(config) / 1e9  # the bool [out, in] masks file of its projections

    def checkpoint_gb(self, config):
        from layerchop.estimate import checkpoint_gb

        return checkpoint_gb(config, dimchop=True)

    def module(self, plan, start):
        from layerchop.train.dimchop import DimChopModule, StructuredDimChopModule

        kind = StructuredDimChopModule if plan.method_cfg.structure == "channels-heads" else DimChopModule
        return kind(plan.init_dir, plan.cfg, plan.method_cfg, max_steps=plan.steps.main_steps)

    def card(self, plan, metadata):
        d = plan.method_cfg
        start, end = d.ramp_steps(plan.steps.total_steps)
        metadata.update(method="dimchop", dimchop={**dataclasses.asdict(d), "ramp_steps": [start, end]})
        units = ("the columns of every " + "/".join(d.matrices) if d.structure == "columns" else
                 "the MLP channels and attention head groups of every layer")
        return (f"DimChop (width pruning: {d.target:.0%} of {units} masked by PLATON scores, growing from step "
                f"{start} to step {end}; masks in `sparsity_masks.safetensors`)")


METHODS: dict[str, Method] = {m.name: m for m in (Method(), Distill(), DimChop())}
"""Every ``--objective``, by name."""


def register(new: Method) -> Method:
    """Add a training method (a name already taken is refused); returns it."""
    if new.name in METHODS:
        raise ValueError(f"--objective {new.name!r} is already a training method")
    METHODS[new.name] = new
    return new


def method(name: str) -> Method:
    """The method called ``name``; an unknown name is refused naming ``--objective``."""
    if name not in METHODS:
        raise ValueError(f"--objective {name!r}: choose one of {list(METHODS)}")
    return METHODS[name]
