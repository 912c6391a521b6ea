"""Cost of a pipeline before it runs: steps, tokens, FLOPs, time, per-GPU and host memory, disk.

Pure functions of model configs and params (no weights, no data): ``layerchop plan`` prints them for every
stage ``dvc repro`` would run with a params file, and refuses, naming the key, a stage that cannot run.

Memory model of one training rank (bytes; ``P`` parameters of the model being trained, ``W`` ranks sharing
it under FSDP2, 1 otherwise; ``t = batch_size x seq_len`` tokens per micro-batch; activation bytes ``a`` = 2
under bf16/fp16 precision, 4 in fp32):

- training state ``16 P / W``: fp32 weights, gradients and the two Adam moments, sharded (``8 P / W`` under
  ``bf16-true``, where all four are bf16);
- unsharded gradients ``g P`` under FSDP2 with accumulation and ``train.reduce_grads: step`` (``g`` the bytes
  of ``fsdp_reduce_dtype``): each rank keeps the full gradients between micro-batches;
- gathered weights in the compute dtype: ``2 x`` one decoder layer (the layer running and the prefetched one)
  and the root group (embeddings, final norm, head: FSDP2 keeps the root unsharded from forward through
  backward) with ``train.fsdp_reshard: forward``; the whole model with ``backward`` or ``step`` (every layer
  stays gathered from its forward to its backward, or for the whole step);
- hybrid sharding (``train.fsdp_sharding: hybrid``): everything sharded is sharded over the ``devices`` of one
  node instead of all ``W`` ranks;
- activations: without checkpointing, every layer keeps ``8h + a (6h + 2 kv + 4i)`` bytes per token: each of
  its two RMSNorms keeps its input in fp32 (``4h``: HF's ``LlamaRMSNorm`` upcasts), its normalised input and
  its weighted output (``2 a h``); attention keeps q, k, v for SDPA and SDPA's output (``a (2h + 2 kv)``;
  SDPA's flash kernels keep no T x T scores); the MLP keeps gate, up, silu(gate) and their product
  (``4 a i``). With ``train.activation_checkpointing`` each layer keeps only its input (``a h`` per token),
  plus one layer's full set while it is recomputed;
- logits: ``t x V`` in the compute dtype, their fp32 copy for the loss and its fp32 gradient;
- the distillation teacher's fp32 shards ``4 P_t / W`` and its layer outputs kept for the hidden-state loss;
- the optimizer step, a second peak: on a GPU, ``torch.optim.AdamW``'s default multi-tensor (foreach) step
  allocates a temporary the size of the second moments of a parameter group (``sqrt(v)``; the decay group
  holds all but the norms: ~``4 P / W``, ``2 P / W`` under ``bf16-true``) on top of the sharded training
  state (FSDP2 has freed the unsharded gradients of ``reduce_grads: step`` after their reduce-scatter). A
  rank's peak is the larger of the backward pass's sum (all of the above) and the optimizer step's;
- CUDA context and allocator slack are not modelled: keep a margin (``slurm.gpu_memory_gb`` is compared with
  the peak as is).

Checked against measurement (experiments/LOG.md, 2026-11-26): a 1.75B Llama on one H200 under FSDP2 bf16 at
4 x 2048 tokens, peak allocated 35.43 GB with activation checkpointing (model: 35.0, the optimizer step) and
55.82 GB without (model: 55.5, the backward pass).

Also compared there with the CPU rehearsal and with published 7B-class FSDP2 figures (torchtitan).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


def dtype_bytes(name: str | None, default: int = 4) -> int:
    if name is None:
        return default
    return 2 if name in ("bfloat16", "float16", "bf16", "fp16") else 4


_LAYER: dict[str, tuple[int, int]] = {}


def _layer_counts(config) -> tuple[int, int]:
    """``(parameters, projection entries)`` of one decoder layer of ``config``'s family, counted on the layer built
    on the meta device (exact for every family: biases, q/k norms, Gemma's four norms, fused projections)."""
    key = config.to_json_string(use_diff=False)
    if key not in _LAYER:
        import torch.nn as nn

        from layerchop.prune.chop import decoder_layers
        from layerchop.train.flops import meta_model

        layer = decoder_layers(meta_model(config))[0]
        _LAYER[key] = (sum(p.numel() for p in layer.parameters()),
                       sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear)))
    return _LAYER[key]


def layer_params(config) -> int:
    """Parameters of one decoder layer."""
    return _layer_counts(config)[0]


def count_params(config) -> int:
    """Parameters of the architecture (the project's count: :func:`layerchop.train.plan.count_params`)."""
    from layerchop.train.plan import count_params as count

    return count(config)


@dataclass
class TrainMemory:
    """Per-rank GPU memory of one training phase, in GB (see the module docstring)."""

    state: float
    unsharded_grads: float
    gathered_layers: float
    activations: float
    activations_without_checkpointing: float
    logits: float
    teacher: float = 0.0
    optimizer_temp: float = 0.0
    pruning_scores: float = 0.0
    """DimChop: PLATON's two fp32 moving averages of every pruned projection (sharded like the weights)."""
    parts: dict = field(default_factory=dict)

    @property
    def backward(self) -> float:
        """Everything held at once in the backward pass."""
        return (self.state + self.unsharded_grads + self.gathered_layers + self.activations + self.logits
                + self.teacher + self.pruning_scores)

    @property
    def optimizer_step(self) -> float:
        """The sharded training state (and teacher shards, pruning scores) plus the optimizer's temporary."""
        return self.state + self.teacher + self.pruning_scores + self.optimizer_temp

    @property
    def total(self) -> float:
        """The rank's peak: the larger of the two."""
        return max(self.backward, self.optimizer_step)

    def as_dict(self) -> dict:
        return {"state": round(self.state, 2), "unsharded_grads": round(self.unsharded_grads, 2),
                "gathered_layers": round(self.gathered_layers, 2), "activations": round(self.activations, 2),
                "activations_without_checkpointing": round(self.activations_without_checkpointing, 2),
                "logits": round(self.logits, 2), "teacher": round(self.teacher, 2),
                "optimizer_temp": round(self.optimizer_temp, 2),
                **({"pruning_scores": round(self.pruning_scores, 2)} if self.pruning_scores else {}),
                "backward": round(self.backward, 2),
                "optimizer_step": round(self.optimizer_step, 2), "total": round(self.total, 2)}


def train_memory(config, cfg, seq_len: int, teacher_config=None, on_gpu: bool | None = None,
                 dimchop: bool = False) -> TrainMemory:
    """Per-rank memory of training ``config`` with :class:`~layerchop.config.TrainConfig` ``cfg``; ``on_gpu``
    (default: ``train.accelerator`` is ``gpu`` or ``cuda``) adds the foreach optimizer step's temporary; ``dimchop``
    adds PLATON's two fp32 copies of the projections of every layer (``--objective dimchop``)."""
    fsdp = cfg.strategy == "fsdp"
    world = shard_world(cfg)
    p = count_params(config)
    mixed = cfg.precision in ("bf16-mixed", "bf16-true", "16-mixed")
    act = 2 if mixed else 4
    compute = dtype_bytes(cfg.fsdp_param_dtype, 4) if fsdp else act
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None) or h // heads)
    t = cfg.batch_size * seq_len
    per_layer_full = t * (8 * h + act * (6 * h + 2 * kv + 4 * i))  # two fp32 RMSNorm inputs + a-byte values
    full = L * per_layer_full
    with_ac = L * t * h * act + per_layer_full
    grads = 0.0
    if fsdp and cfg.accumulate > 1 and cfg.reduce_grads == "step":
        grads = p * dtype_bytes(cfg.fsdp_reduce_dtype or cfg.fsdp_param_dtype, 4)
    teacher = 0.0
    if teacher_config is not None:
        teacher = 4 * count_params(teacher_config) / world + teacher_config.num_hidden_layers * t * h * act
    # fp32 weights, gradients, Adam m and v; bf16-true keeps all four in bf16
    state_bytes = 8 if cfg.precision == "bf16-true" else 16
    # AdamW's foreach step (the default on CUDA; the CPU steps one tensor at a time): a sqrt(v) temporary
    if on_gpu is None:
        on_gpu = cfg.accelerator in ("gpu", "cuda")
    temp = (state_bytes // 4) * p / world if on_gpu else 0.0
    return TrainMemory(
        state=state_bytes * p / world / 1e9, unsharded_grads=grads / 1e9,
        gathered_layers=(((2 * layer_params(config) + p - L * layer_params(config)) if cfg.fsdp_reshard == "forward"
                          else p) * compute / 1e9) if fsdp else 0.0,
        activations=(with_ac if cfg.activation_checkpointing else full) / 1e9,
        activations_without_checkpointing=full / 1e9,
        logits=t * config.vocab_size * (act + 4 + 4) / 1e9, teacher=teacher / 1e9, optimizer_temp=temp / 1e9,
        pruning_scores=(8 * projection_entries(config) / world / 1e9) if dimchop else 0.0)


def shard_world(cfg) -> int:
    """Ranks one parameter is sharded over: all of them (FSDP2), one node's (hybrid), 1 (no FSDP)."""
    if cfg.strategy != "fsdp":
        return 1
    return cfg.devices if cfg.fsdp_sharding == "hybrid" else cfg.devices * cfg.num_nodes


@dataclass
class StepCommunication:
    """Bytes one optimizer step moves (GB) and their time, beside the step's compute time (seconds)."""

    gathered_gb: float
    """Parameters all-gathered per step (whole tensors, in the compute dtype), summed over the gathers."""
    reduced_gb: float
    """Gradients reduced per step (in ``fsdp_reduce_dtype``)."""
    per_rank_gb: float
    """What one rank sends (= receives) per step in its collectives, intra-node links included."""
    internode_gb_per_node: float
    """What leaves one node per step over its inter-node links."""
    internode_s: float
    """``internode_gb_per_node`` at ``slurm.node_bandwidth_gb_per_s``."""
    compute_s: float
    """The step's FLOPs at the plan's MFU."""

    @property
    def bound(self) -> str:
        """``communication`` when the inter-node transfers outlast the compute they overlap with."""
        return "communication" if self.internode_s > self.compute_s else "compute"

    def as_dict(self) -> dict:
        return {"gathered_gb": round(self.gathered_gb, 1), "reduced_gb": round(self.reduced_gb, 1),
                "per_rank_gb": round(self.per_rank_gb, 1), "internode_gb_per_node": round(self.internode_gb_per_node, 1),
                "internode_s": round(self.internode_s, 2), "compute_s": round(self.compute_s, 2), "bound": self.bound}


def step_communication(config, cfg, flops_per_step: float, peak_flops: float, mfu: float,
                       node_bandwidth_gb_per_s: float) -> StepCommunication:
    """FSDP2's traffic in one optimizer step of training ``config`` (bandwidth-only model; latency ignored).

    With ``A = train.accumulate`` micro-batches, ``P`` parameters (``P_L`` of them in decoder layers), compute
    bytes ``b`` and reduce bytes ``g``: the gathers move ``A (P + P_L) b`` (``fsdp_reshard: forward``: all in
    forward, the layers again in backward), ``A P b`` (``backward``) or ``P b`` (``step``); the gradients
    ``P g`` once (``reduce_grads: step``) or ``A P g``. A ring collective over ``n`` ranks of ``S`` bytes makes
    each rank send ``(n - 1) / n x S`` and crosses every node boundary of the ring once, so with full sharding
    ``(W - 1) / W x`` (gathers + reductions) leave each node; with hybrid sharding the gathers and the
    reduce-scatters stay in the node and only the all-reduce of the node's gradient shards crosses:
    ``2 (N - 1) / N x`` the reduced bytes per node."""
    if cfg.strategy != "fsdp" or cfg.devices * cfg.num_nodes == 1:  # not modelled: DDP's all-reduce
        return StepCommunication(0.0, 0.0, 0.0, 0.0, 0.0,
                                 flops_per_step / (cfg.devices * cfg.num_nodes * peak_flops * mfu))
    world, nodes, d = cfg.devices * cfg.num_nodes, cfg.num_nodes, cfg.devices
    p, p_layers = count_params(config), config.num_hidden_layers * layer_params(config)
    b = dtype_bytes(cfg.fsdp_param_dtype, 4)
    g = dtype_bytes(cfg.fsdp_reduce_dtype or cfg.fsdp_param_dtype, 4)
    a = cfg.accumulate
    gathered = {"forward": a * (p + p_layers), "backward": a * p, "step": p}[cfg.fsdp_reshard] * b
    reduced = (1 if cfg.reduce_grads == "step" else a) * p * g
    if cfg.fsdp_sharding == "hybrid" and nodes > 1:
        allreduce_rank = 2 * (nodes - 1) / nodes * reduced / d
        per_rank = (d - 1) / d * (gathered + reduced) + allreduce_rank
        internode = d * allreduce_rank
    else:
        per_rank = (world - 1) / world * (gathered + reduced)
        internode = per_rank if nodes > 1 else 0.0
    compute_s = flops_per_step / (world * peak_flops * mfu)
    return StepCommunication(gathered / 1e9, reduced / 1e9, per_rank / 1e9, internode / 1e9,
                             internode / 1e9 / node_bandwidth_gb_per_s, compute_s)


# The best measured training step on a GPU (experiments/LOG.md, 2026-11-26): what the plan's hours assume by
# default (slurm.utilization: null). Its utilization is derived below with the plan's own FLOP functions.
MEASURED_STEP = {
    "device": "NVIDIA H200 (989 TFLOP/s dense bf16)", "peak_flops": 989e12, "s_per_step": 0.42,
    "model_flops_per_step": 9.60e13,  # the project's counter (matmuls of forward + backward, no recompute)
    "hidden_size": 2048, "layers": 32, "vocab_size": 32000, "batch_size": 4, "seq_len": 2048,
    "activation_checkpointing": True,
    "source": "experiments/LOG.md 2026-11-26: experiments/gpu-check/check.py, a 1.75B Llama (32 layers, width "
              "2048) through the train stage, FSDP2 on 1 rank, bf16-mixed, 4 x 2048 tokens a step, activation "
              "checkpointing; steady state 0.42 s a step (23 % MFU)",
}


def recompute_flops(config, batch_size: int, seq_len: int, checkpointing: bool) -> int:
    """FLOPs activation checkpointing adds per micro-batch and rank: the decoder layers' forward once more (not
    the output head; not a frozen teacher, which keeps no activations for a backward)."""
    if not checkpointing:
        return 0
    from layerchop.train.flops import llama_forward_flops

    return llama_forward_flops(config, batch_size, seq_len, head=False)


def recompute_fraction(config, batch_size: int, seq_len: int, checkpointing: bool) -> float:
    """:func:`recompute_flops` as a fraction of the micro-batch's model FLOPs (forward + backward)."""
    from layerchop.train.flops import llama_train_flops

    return recompute_flops(config, batch_size, seq_len, checkpointing) / llama_train_flops(config, batch_size, seq_len)


def measured_utilization() -> tuple[float, str]:
    """The fraction of its peak the best measured GPU step reached on the FLOPs the device executed
    (the model's plus the recompute), and where that figure comes from."""
    from layerchop.data.sources import llama2_7b_shape_config

    m = MEASURED_STEP
    config = llama2_7b_shape_config(m["hidden_size"], m["vocab_size"], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    device_flops = m["model_flops_per_step"] * (1 + recompute_fraction(config, m["batch_size"], m["seq_len"],
                                                                       m["activation_checkpointing"]))
    return device_flops / (m["s_per_step"] * m["peak_flops"]), f"{m['device']}; {m['source']}"


def bench_memory(models: list[tuple[object, Optional[tuple[int, int]]]], batch: int, context: int, prompt: int,
                 bytes_per_value: float) -> dict:
    """GPU memory of ``layerchop bench``: every model resident at once (``(config, 2:4 pattern or None)``, a 2:4
    model stored compressed on the sparse kernel), the largest model's KV cache at ``batch`` x ``context``
    tokens, and the prefill's largest transient (one MLP's gate, up and product over ``batch x prompt`` tokens),
    in GB. CUDA context and allocator slack are not modelled."""
    from layerchop.evaluate.efficiency import kv_cache_bytes, weight_bytes

    weights = sum(weight_bytes(c, bytes_per_value, nm) + c.vocab_size * c.hidden_size * bytes_per_value
                  * (0 if getattr(c, "tie_word_embeddings", False) else 1) for c, nm in models)
    kv = max(kv_cache_bytes(c, batch, context, bytes_per_value) for c, _ in models)
    transient = max(3 * batch * prompt * c.intermediate_size * bytes_per_value for c, _ in models)
    return {"weights": round(weights / 1e9, 2), "kv_cache": round(kv / 1e9, 2), "prefill": round(transient / 1e9, 2),
            "total": round((weights + kv + transient) / 1e9, 2)}


def hours(flops: float, world: int, peak_flops: float, mfu: float) -> float:
    """Wall-clock hours of ``flops`` on ``world`` devices at ``mfu`` of ``peak_flops`` each."""
    return flops / (world * peak_flops * mfu) / 3600


def model_dir_gb(config, dtype: str) -> float:
    return count_params(config) * dtype_bytes(dtype) / 1e9


def projection_entries(config) -> int:
    """Entries of the attention and MLP projections of all layers (what DimChop scores and masks)."""
    return config.num_hidden_layers * _layer_counts(config)[1]


def checkpoint_gb(config, dimchop: bool = False) -> float:
    """A resumable checkpoint: fp32 weights and two Adam moments (12 bytes a parameter), plus DimChop's two fp32
    PLATON averages of every projection (8 bytes an entry) when ``dimchop``."""
    return (12 * count_params(config) + (8 * projection_entries(config) if dimchop else 0)) / 1e9


def prepared_gb(tokens: float, vocab_size: int) -> float:
    return tokens * (2 if vocab_size <= 65536 else 4) / 1e9

