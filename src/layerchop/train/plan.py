"""A training run resolved once, before anything is built: budget -> steps, FLOPs, warm start, checks.

:func:`resolve` reads the stage's arguments, the ``train`` params and the *metadata* of its inputs (configs,
``layerchop.json``, ``counts.json``; never weights) into a :class:`RunPlan`. Training is built from that
object alone, and ``layerchop train --plan`` prints it, so a run that cannot work (a warmup longer than
the run, a budget the data cannot cover, a warm start on the wrong model) is refused in seconds with the
key to change, not after hours on a cluster.

Budget semantics: the steps trained on a deeper model before layers are removed are *phases* of the run,
inside its budget and inside one learning-rate schedule:

- the warm start (``--warm-start``: ``train.warm_start_steps`` optimizer steps on the uncompressed model, then
  every removed layer at once);
- gradual chopping (``--chop-every-tokens T``: one removed layer goes every ``T`` tokens, in the order of the
  chopped model's ``removed_layers``, until the chopped depth; Figure 6).

With a token budget, ``ceil(budget / tokens per step)`` optimizer steps in all; with a FLOP budget, each
phase costs its own model's FLOPs and the rest is spent on whole steps of the trained model, never exceeding
the budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from layerchop.train.methods import METHODS, method as get_method  # noqa: E402

OBJECTIVES = tuple(METHODS)
# launch-only settings: a run may be resumed with a different launcher or restart count
LAUNCH_KEYS = ("launcher", "rdzv_endpoint", "simulate_nodes", "max_restarts", "num_workers")
# train keys that do not change the warm phase's arithmetic: a shared warm start (--warm-from) ignores them
NOT_IN_WARM_PHASE = ("token_budget", "flop_budget", "val_every", "val_batches", "ckpt_every", "max_data_passes",
                     "export_dtype", "warm_start_steps")
WARM_FILE = "warm.json"


@dataclass(frozen=True)
class Phase:
    """Steps on a deeper model, after which the layers ``remove`` (numbered as in the uncompressed model) go."""

    steps: int
    flops_per_step: int
    num_layers: int
    remove: tuple[int, ...]


@dataclass(frozen=True)
class Steps:
    """Optimizer steps and their cost over all devices: the phases, then ``main_steps`` of the trained model."""

    tokens_per_step: int
    flops_per_step: int
    main_steps: int
    phases: tuple[Phase, ...] = ()

    @property
    def warm_steps(self) -> int:
        """Steps before the trained model's own fit (all phases)."""
        return sum(ph.steps for ph in self.phases)

    @property
    def phase_flops(self) -> int:
        return sum(ph.steps * ph.flops_per_step for ph in self.phases)

    @property
    def total_steps(self) -> int:
        return self.warm_steps + self.main_steps

    @property
    def removal_steps(self) -> list[int]:
        """The run's step after which each phase's layers are removed."""
        return [sum(ph.steps for ph in self.phases[:k + 1]) for k in range(len(self.phases))]


def depth_config(dense_config, alive: Sequence[int]):
    """The config of ``dense_config``'s model keeping the layers ``alive`` (what :func:`chop_layers` makes)."""
    import copy

    from layerchop.prune.chop import subset_per_layer

    config = copy.deepcopy(dense_config)
    num = dense_config.num_hidden_layers
    config.num_hidden_layers = len(alive)
    subset_per_layer(config, num, alive)
    return config


def chop_phases(cfg, seq_len: int, dense_config, removed: Sequence[int], *, warm_steps: int = 0,
                chop_every: int = 0) -> tuple[Phase, ...]:
    """The phases of a warm start (``warm_steps`` on the dense model, then all of ``removed``) or of gradual
    chopping (``chop_every`` steps at each depth, then the next of ``removed``)."""
    world = cfg.devices * cfg.num_nodes
    num = dense_config.num_hidden_layers

    def flops(alive):  # counted by layer kind (layerchop.train.flops.by_layer_kind): cheap at every depth
        return lm_flops(depth_config(dense_config, alive), cfg.batch_size, seq_len) * cfg.accumulate * world

    if chop_every:
        phases, alive = [], list(range(num))
        for layer in removed:
            phases.append(Phase(chop_every, flops(alive), len(alive), (int(layer),)))
            alive.remove(layer)
        return tuple(phases)
    if warm_steps:
        return (Phase(warm_steps, flops(list(range(num))), num, tuple(int(i) for i in removed)),)
    return ()


def lm_flops(config, batch_size: int, seq_len: int) -> int:
    from layerchop.train.flops import lm_step_flops

    return lm_step_flops(config, batch_size, seq_len)


def plan_steps(cfg, seq_len: int, model_config, *, objective: str = "lm", warm_steps: int = 0,
               dense_config=None, teacher_config=None, distill_cfg=None, mapping=None,
               budget_key: Optional[str] = None, removed: Sequence[int] = (), chop_every: int = 0,
               chop_key: str = "--chop-every-tokens", method_cfg=None) -> Steps:
    """Steps of a run from its budget, with the checks that need no data.

    Args:
        cfg: :class:`layerchop.config.TrainConfig`.
        seq_len: Tokens per sequence (``prepare.seq_len``).
        model_config: Config of the trained model (the chopped model for LayerChop).
        objective: The training method's name (:data:`layerchop.train.methods.METHODS`).
        warm_steps: Warm-start steps on the uncompressed model (``dense_config``), inside the budget.
        teacher_config, mapping: The distillation teacher and layer map.
        method_cfg: The method's settings (``distill_cfg``: the same, by its former name).
        budget_key: Where the budget was set, for messages (default ``train.token_budget`` / ``train.flop_budget``).
        removed: The layers of ``dense_config``'s model that the trained model lacks, in removal order.
        chop_every: Gradual chopping: steps between removals (exclusive with ``warm_steps``).
        chop_key: Where ``chop_every`` was set, for messages.

    Raises:
        ValueError: naming the keys when the phases or the LR warmup do not fit the budget.
    """
    if warm_steps and chop_every:
        raise ValueError(f"{chop_key} (gradual chopping) and --warm-start (train.warm_start_steps={warm_steps}) "
                         "exclude each other: both decide when the layers go")
    world = cfg.devices * cfg.num_nodes
    tokens_per_step = cfg.batch_size * seq_len * cfg.accumulate * world
    settings = method_cfg if method_cfg is not None else distill_cfg
    micro = get_method(objective).micro_flops(model_config, teacher_config, mapping, settings, cfg.batch_size, seq_len)
    flops_per_step = micro * cfg.accumulate * world
    phases = chop_phases(cfg, seq_len, dense_config, removed, warm_steps=warm_steps,
                         chop_every=chop_every) if warm_steps or chop_every else ()
    before = sum(ph.steps for ph in phases)
    if cfg.flop_budget is not None:
        left = cfg.flop_budget - sum(ph.steps * ph.flops_per_step for ph in phases)
        main = int(left // flops_per_step) if left > 0 else 0
        budget = f"{budget_key or 'train.flop_budget'}={cfg.flop_budget:.4g}"
        if main < 1 and not phases:
            raise ValueError(f"{budget} is less than one optimizer step ({flops_per_step:.4g} FLOPs)")
    else:
        main = max(1, math.ceil(cfg.token_budget / tokens_per_step)) - before
        budget = f"{budget_key or 'train.token_budget'}={cfg.token_budget}"
    if main < 1 and chop_every:
        raise ValueError(f"{chop_key}: the last of {len(phases)} removals, one every {chop_every} steps, comes at step "
                         f"{before}, but the budget ({budget}) leaves the chopped model no step after it: remove "
                         "layers more often or raise the budget")
    if main < 1:
        raise ValueError(f"train.warm_start_steps={warm_steps} uses the whole budget ({budget}) before the chopped "
                         "model trains a step: lower train.warm_start_steps or raise the budget")
    steps = Steps(tokens_per_step, flops_per_step, main, phases)
    if cfg.warmup_steps >= steps.total_steps:
        raise ValueError(
            f"train.warmup_steps={cfg.warmup_steps} does not fit this run: its budget ({budget}) buys "
            f"{steps.total_steps} optimizer steps, so the learning rate would never leave warmup; lower "
            "train.warmup_steps or raise the budget"
        )
    return steps


def check_data(cfg, steps: Steps, train_sequences: int) -> None:
    """Refuse a budget that needs more passes over the train split than ``train.max_data_passes``."""
    world = cfg.devices * cfg.num_nodes
    needed = steps.total_steps * cfg.accumulate * cfg.batch_size * world
    if needed > cfg.max_data_passes * train_sequences:
        raise ValueError(
            f"the budget needs {needed:,} training sequences ({steps.total_steps} steps x {cfg.batch_size} x "
            f"{cfg.accumulate} x {world} devices) but the train split holds {train_sequences:,} "
            f"(train.max_data_passes={cfg.max_data_passes}): raise download.corpus.token_budget, lower the "
            "train budget, or allow more passes with train.max_data_passes"
        )


def code_fingerprint() -> str:
    """Hash of the code a training run executes, and of the library versions it runs on (read from the installed
    distributions: the same strings as their ``__version__``, without importing Lightning in the launcher)."""
    from importlib.metadata import version

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "train").glob("*.py")) + [root / "data" / "prepare.py", root / "prune" / "masks.py",
                                                      root / "prune" / "chop.py"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    h.update(f"{torch.__version__} {version('lightning')} {version('transformers')}".encode())
    return h.hexdigest()[:16]


@dataclass
class RunPlan:
    """Everything a training run is built from. JSON-able through :meth:`describe`."""

    objective: str
    init_dir: Path
    prepared_dir: Path
    out: Path
    run_dir: Path
    cfg: Any
    steps: Steps
    seq_len: int
    train_sequences: int
    init_meta: dict
    fingerprint: str
    method_cfg: Any = None
    """The training method's settings (its params section: ``distill``, ``dimchop``; None for ``lm``)."""
    teacher_dir: Optional[Path] = None
    dense_dir: Optional[Path] = None
    removed_layers: list[int] = field(default_factory=list)
    masks: Optional[Path] = None
    layer_map: Optional[list[int]] = None
    snapshot_steps: list[int] = field(default_factory=list)
    """Steps of the whole run (phases included) at which the model is exported for a curve."""
    warm_only: bool = False
    """Train the warm start alone and publish its end checkpoint to ``out`` (the shared warm start's stage)."""
    warm_from: Optional[Path] = None
    """A shared warm start (``--warm-from``): the warm phase is restored from its checkpoint, not trained."""
    warm_identity: dict = field(default_factory=dict)
    """What the warm phase's result depends on (:func:`warm_identity`)."""
    chop_every: int = 0
    """Gradual chopping: steps between removals (0: none)."""
    num_params: dict[str, int] = field(default_factory=dict)
    """Parameters of the trained model (``model``), the warm start's dense model and the teacher."""
    configs: dict[str, Any] = field(default_factory=dict, repr=False)
    """Model configs of the same (``model``, ``dense``, ``teacher``; None where absent)."""

    @property
    def world(self) -> int:
        return self.cfg.devices * self.cfg.num_nodes

    @property
    def warm_samples_per_rank(self) -> int:
        """Training sequences each rank consumed in the warm start (the chopped run continues after them)."""
        return self.steps.warm_steps * self.cfg.accumulate * self.cfg.batch_size

    def budget_text(self) -> str:
        c = self.cfg
        return f"{c.flop_budget:.4g} FLOPs" if c.flop_budget is not None else f"{c.token_budget:,} tokens"

    def memory_per_rank_gb(self) -> dict[str, dict[str, float]]:
        """Estimated memory of one rank, per phase (the warm start on the dense model, the main run), in GB: the
        memory model of :func:`layerchop.estimate.train_memory` (the one ``layerchop plan`` prints)."""
        from layerchop.estimate import train_memory

        on_gpu = self.cfg.accelerator in ("gpu", "cuda") or (self.cfg.accelerator == "auto"
                                                              and torch.cuda.is_available())
        phases = {"main": get_method(self.objective).memory(self.configs["model"], self.cfg, self.seq_len,
                                                            teacher_config=self.configs.get("teacher"),
                                                            on_gpu=on_gpu)}
        if self.steps.warm_steps:  # the first phase has the deepest model
            phases["warm"] = train_memory(self.configs["dense"], self.cfg, self.seq_len, on_gpu=on_gpu)
        return {k: v.as_dict() for k, v in phases.items()}

    def describe(self) -> dict[str, Any]:
        s = self.steps
        return {
            "objective": self.objective, "init": str(self.init_dir), "data": str(self.prepared_dir),
            "out": str(self.out), "run_dir": str(self.run_dir / self.fingerprint), "fingerprint": self.fingerprint,
            "budget": self.budget_text(), "world": self.world, "seq_len": self.seq_len,
            "tokens_per_step": s.tokens_per_step, "flops_per_step": s.flops_per_step,
            "warm_steps": s.warm_steps, "main_steps": s.main_steps, "chop_every_steps": self.chop_every,
            "phases": [dataclasses.asdict(ph) for ph in s.phases], "removal_steps": s.removal_steps,
            "total_steps": s.total_steps, "tokens": s.total_steps * s.tokens_per_step,
            "flops": s.phase_flops + s.main_steps * s.flops_per_step,
            "warmup_steps": self.cfg.warmup_steps, "train_sequences": self.train_sequences,
            "dense": str(self.dense_dir) if self.dense_dir else None, "removed_layers": self.removed_layers,
            "teacher": str(self.teacher_dir) if self.teacher_dir else None, "layer_map": self.layer_map,
            "masks": str(self.masks) if self.masks else None, "snapshot_steps": self.snapshot_steps,
            "strategy": self.cfg.strategy,
            "activation_checkpointing": self.cfg.activation_checkpointing, "num_params": self.num_params,
            "memory_per_rank_gb": self.memory_per_rank_gb(),
        }


def resolve(
    init_dir: str | Path, prepared_dir: str | Path, out: str | Path, run_dir: str | Path, cfg, *,
    objective: str = "lm", teacher_dir: Optional[str | Path] = None, distill_cfg=None, warm_start: bool = False,
    snapshots: int = 0, budget_key: Optional[str] = None, chop_every_tokens: Optional[float] = None,
    dimchop_cfg=None, warm_only: bool = False, warm_from: Optional[str | Path] = None, method_cfg=None,
) -> RunPlan:
    """Resolve a training run (see the module docstring). Reads configs and metadata only.

    ``warm_only``: the run is its warm start alone, published to ``out`` as a checkpoint that other runs fork
    from (``warm_from``: a directory so made; the warm phase is restored from it instead of trained again).

    ``chop_every_tokens``: gradual chopping from the uncompressed model the chopped ``init_dir`` came from, one
    of its ``removed_layers`` every that many tokens (rounded to whole optimizer steps).

    ``method_cfg``: the settings of the ``objective``'s method (``distill_cfg`` / ``dimchop_cfg``: the same, by
    their former names).

    Raises:
        ValueError / FileNotFoundError: for every input that cannot make a run, naming the key or argument.
    """
    from transformers import AutoConfig, AutoTokenizer

    from layerchop.data.prepare import check_data_matches_model
    from layerchop.io import check_model_dir, read_metadata
    from layerchop.prune.masks import MASKS_FILE
    init_dir, prepared_dir, out, run_dir = Path(init_dir), Path(prepared_dir), Path(out), Path(run_dir)
    method = get_method(objective)
    settings = next((c for c in (method_cfg, distill_cfg, dimchop_cfg) if c is not None), None)
    check_model_dir(init_dir, "--init")
    method.check_args(cfg, settings, teacher_dir)
    teacher_dir = Path(teacher_dir) if teacher_dir is not None and method.needs_teacher else None
    if snapshots < 0:
        raise ValueError(f"--snapshots {snapshots} must be >= 0")
    counts = check_data_matches_model(prepared_dir, init_dir, AutoTokenizer.from_pretrained(init_dir))
    seq_len = int(counts["seq_len"])
    train_sequences = int(counts["splits"]["train"]["sequences"])
    if train_sequences < cfg.batch_size:
        raise ValueError(f"train.batch_size={cfg.batch_size} is larger than the {train_sequences} training sequences")

    init_meta = read_metadata(init_dir)
    masks = init_dir / MASKS_FILE if (init_dir / MASKS_FILE).exists() else None
    warm_steps = cfg.warm_start_steps if warm_start else 0
    dense_dir, removed = None, list(init_meta.get("removed_layers") or [])
    world = cfg.devices * cfg.num_nodes
    chop_every, what = 0, f"--warm-start (train.warm_start_steps={warm_steps})"
    if chop_every_tokens is not None:
        what = f"--chop-every-tokens {chop_every_tokens:g}"
        chop_every = chop_every_steps(chop_every_tokens, cfg.batch_size * seq_len * cfg.accumulate * world, what)
    method.check_init(init_dir, settings, masks is not None)
    if warm_steps or chop_every:
        if masks is not None:
            raise ValueError(f"{what} does not apply to a pruned (masked) --init {init_dir}")
        if not method.phases:
            raise ValueError(f"{what} is not supported with --objective {objective}")
        if not (removed and init_meta.get("chopped_from")):
            raise ValueError(f"{what} needs --init to be a chopped model "
                             f"whose {init_dir}/layerchop.json names chopped_from and removed_layers")
        dense_dir = Path(init_meta["chopped_from"])
        check_model_dir(dense_dir, f"{what}: {init_dir}/layerchop.json chopped_from")
        check_data_matches_model(prepared_dir, dense_dir, AutoTokenizer.from_pretrained(dense_dir))
    mapping, teacher_meta = method.teacher(init_dir, teacher_dir, prepared_dir)

    configs = {"model": AutoConfig.from_pretrained(init_dir),
               "dense": AutoConfig.from_pretrained(dense_dir) if dense_dir else None,
               "teacher": AutoConfig.from_pretrained(teacher_dir) if teacher_dir else None}
    steps = plan_steps(
        cfg, seq_len, configs["model"], objective=objective, warm_steps=warm_steps,
        dense_config=configs["dense"], teacher_config=configs["teacher"],
        method_cfg=settings, mapping=mapping, budget_key=budget_key, removed=removed, chop_every=chop_every,
        chop_key=what,
    )
    check_data(cfg, steps, train_sequences)
    dense_cfg, model_cfg = configs["dense"], configs["model"]
    if steps.phases and (dense_cfg.num_hidden_layers - len(set(removed)) != model_cfg.num_hidden_layers
                         or dense_cfg.hidden_size != model_cfg.hidden_size):
        raise ValueError(f"{what}: {init_dir}/config.json is not its chopped_from model {dense_dir} without "
                         f"layers {removed}")

    identity = {
        "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LAUNCH_KEYS},
        "warm_steps": warm_steps, "init": init_meta, "data": counts["tokenizer_fingerprint"],
        "splits": {k: v["tokens"] for k, v in counts["splits"].items()}, "code": code_fingerprint(),
        "objective": objective, "snapshots": snapshots,
    }
    if chop_every:  # absent otherwise: the fingerprints of other runs stay what they were
        identity["chop_every"] = chop_every
    identity.update(method.identity(settings, teacher_dir, teacher_meta, steps.total_steps))
    warm_id: dict = {}
    if (warm_only or warm_from is not None) and not warm_start:
        raise ValueError(f"{'--warm-only' if warm_only else '--warm-from'} needs --warm-start")
    if warm_from is not None and not warm_steps:
        warm_from = None  # train.warm_start_steps: 0, nothing to share (the --warm-only stage published no state)
    if warm_steps and (warm_only or warm_from is not None):
        what = "--warm-only" if warm_only else f"--warm-from {warm_from}"
        if warm_steps > cfg.warmup_steps:
            raise ValueError(f"train.warm_start_steps={warm_steps} > train.warmup_steps={cfg.warmup_steps}: the warm "
                             "phase's learning rate would then depend on each run's length, so no run can share it "
                             f"({what}); keep warm_start_steps <= warmup_steps or train each warm start itself")
        warm_id = warm_identity(cfg, warm_steps, read_metadata(dense_dir), counts, str(dense_dir))
        warm_hash = hashlib.sha256(json.dumps(warm_id, sort_keys=True, default=str).encode()).hexdigest()[:16]
        if warm_only:  # its run directory depends on what its steps depend on alone (not the budget, not the init)
            identity = {"warm_only": warm_hash}
        else:
            identity["warm_from"] = warm_hash
    if warm_from is not None:
        warm_from = Path(warm_from)
        check_warm_start(warm_from, warm_id)
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return RunPlan(
        objective=objective, init_dir=init_dir, prepared_dir=prepared_dir, out=out, run_dir=run_dir, cfg=cfg,
        steps=steps, seq_len=seq_len, train_sequences=train_sequences, init_meta=init_meta, fingerprint=fingerprint,
        method_cfg=settings, teacher_dir=teacher_dir, dense_dir=dense_dir,
        removed_layers=removed if steps.phases else [], masks=masks, layer_map=mapping, chop_every=chop_every,
        snapshot_steps=run_snapshot_steps(steps, snapshots, chop_every),
        num_params={k: count_params(c) for k, c in configs.items() if c is not None}, configs=configs,
        warm_only=warm_only, warm_from=warm_from, warm_identity=warm_id,
    )


def train_keys() -> list[str]:
    """The ``train`` keys a training stage depends on (its ``params`` in ``dvc.yaml``): all but :data:`LAUNCH_KEYS`,
    so that changing how a job starts (launcher, rendezvous, restarts, loader workers) re-runs nothing."""
    from layerchop.config import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in LAUNCH_KEYS]


def warm_train_keys() -> list[str]:
    """The ``train`` keys the shared warm start depends on (its ``params`` in ``dvc.yaml``)."""
    from layerchop.config import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)
            if f.name not in LAUNCH_KEYS + NOT_IN_WARM_PHASE or f.name == "warm_start_steps"]


def warm_identity(cfg, warm_steps: int, dense_meta: dict, counts: dict, dense_dir: str) -> dict:
    """Everything the warm phase's end state depends on: the dense model, the data (its packing, sizes and
    document split), the train section but the
    keys that do not enter its arithmetic (:data:`NOT_IN_WARM_PHASE`: budgets, validation, checkpoint interval;
    the learning rate of its steps does not depend on the run's length while they are inside the warmup),
    the number of ranks (the data each reads) and the code."""
    return {"dense": dense_meta, "dense_dir": dense_dir, "warm_steps": warm_steps,
            "train": {k: v for k, v in dataclasses.asdict(cfg).items()
                      if k not in LAUNCH_KEYS + NOT_IN_WARM_PHASE},
            "world": cfg.devices * cfg.num_nodes, "data": counts["tokenizer_fingerprint"],
            "seq_len": counts["seq_len"], "splits": counts["splits"], "code": code_fingerprint()}


def check_warm_start(warm_dir: Path, expected: dict) -> Path:
    """The checkpoint of the shared warm start in ``warm_dir`` (written by ``train --warm-only``), refused with a
    ``ValueError`` naming what differs when it was made for another dense model, data, train section or code."""
    meta_file = warm_dir / WARM_FILE
    if not meta_file.exists():
        raise FileNotFoundError(f"--warm-from {warm_dir}: no {WARM_FILE} (made by layerchop train --warm-only)")
    made = json.loads(meta_file.read_text())
    have = json.loads(json.dumps(expected, sort_keys=True, default=str))
    if made["identity"] != have:
        diff = sorted(k for k in set(have) | set(made["identity"]) if have.get(k) != made["identity"].get(k))
        train = sorted(k for k in have.get("train", {}) if have["train"][k] != made["identity"].get("train", {}).get(k))
        raise ValueError(f"--warm-from {warm_dir}: made for another run ({', '.join(diff)} differ"
                         + (f": train.{', train.'.join(train)}" if train else "") + "); re-run its stage")
    ckpt = warm_dir / made["checkpoint"]
    if not ckpt.exists():
        raise FileNotFoundError(f"--warm-from {warm_dir}: {made['checkpoint']} is missing")
    return ckpt


def chop_every_steps(tokens: float, tokens_per_step: int, what: str = "--chop-every-tokens") -> int:
    """Gradual chopping's interval in whole optimizer steps (the nearest to ``tokens``), at least one.

    Raises:
        ValueError: naming ``what`` for a value that is not a finite number of at least one step's tokens.
    """
    if not (math.isfinite(tokens) and tokens > 0) or round(tokens / tokens_per_step) < 1:
        raise ValueError(f"{what}: must be a finite number of tokens, at least one optimizer step "
                         f"({tokens_per_step} tokens)")
    return round(tokens / tokens_per_step)


def snapshot_steps(max_steps: int, num: int) -> list[int]:
    """``num`` evenly spaced optimizer steps strictly before ``max_steps`` (the final model is the output)."""
    return sorted({round(max_steps * i / (num + 1)) for i in range(1, num + 1)} - {0, max_steps})


def run_snapshot_steps(steps: Steps, num: int, chop_every: int) -> list[int]:
    """Steps of the whole run at which a snapshot is exported: evenly over the run when layers go gradually (a
    snapshot may be of an intermediate depth), evenly over the chopped model's fit after a warm start."""
    if not num:
        return []
    if chop_every:
        return snapshot_steps(steps.total_steps, num)
    return [steps.warm_steps + s for s in snapshot_steps(steps.main_steps, num)]


_PARAMS: dict[str, int] = {}


def count_params(config) -> int:
    """Parameters of the architecture of ``config`` (built on the meta device; tied weights counted once), counted
    once per architecture in a process."""
    from layerchop.io import num_params
    from layerchop.train.flops import meta_model

    key = config.to_json_string(use_diff=False)
    if key not in _PARAMS:
        _PARAMS[key] = num_params(meta_model(config))
    return _PARAMS[key]
