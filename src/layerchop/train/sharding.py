"""Distribution without a full model copy per rank: FSDP2 on meta-built models, and shard-local state.

Under ``ModelParallelStrategy`` every rank builds the architecture with its parameters on the meta device
(accelerate's ``init_empty_weights`` keeps buffers such as the RoPE frequencies real), applies FSDP2
``fully_shard`` to each decoder layer and the root, and allocates only its own shards. Global rank 0 alone
reads the checkpoint and broadcasts it one tensor at a time (``set_model_state_dict(...,
full_state_dict=True, broadcast_from_rank0=True)``); every other rank holds at most one full tensor at a
time. The same pattern as torchtitan (meta init -> parallelize -> ``to_empty`` -> load) and litgpt.

Warm-start state crosses from the dense run to the chopped run as *local shards* keyed by parameter name:
a kept layer has the same shape and the same sharding in both models, so rank r's shard of dense layer
``kept[k]`` is rank r's shard of chopped layer ``k``. No rank ever gathers the model or the optimizer state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
import torch.nn as nn

from layerchop.io import dtypes


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own part of a (possibly FSDP2-sharded) tensor."""
    return t.to_local() if is_dtensor(t) else t


def empty_model(config) -> nn.Module:
    """The architecture of ``config`` in fp32 with parameters on the meta device and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # init_empty_weights re-registers every parameter, which unties shared ones
    model.config.use_cache = False
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder layer in the backward pass (transformers' own gradient checkpointing,
    non-reentrant). transformers checkpoints the layer's ``forward``, so module hooks such as FSDP2's
    all-gather stay outside the recomputed region (torchtitan's order: checkpoint inside, shard outside)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def apply_fsdp2(model: nn.Module, mesh, param_dtype: Optional[str], reduce_dtype: Optional[str],
                layers: Optional[Iterable[nn.Module]] = None, reshard: str = "forward") -> None:
    """``fully_shard`` every decoder layer (``layers``, default: the model's own), then the root (FSDP2).

    ``reshard`` (``train.fsdp_reshard``): ``forward`` frees each layer's gathered parameters after its forward
    (gathered again in backward); ``backward`` and ``step`` keep them to the backward (``step`` also across
    micro-batches: :func:`set_micro_batch`). The root keeps FSDP2's default (not resharded after forward)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from layerchop.prune.chop import decoder_layers

    mp = MixedPrecisionPolicy(
        param_dtype=dtypes()[param_dtype] if param_dtype else None,
        reduce_dtype=dtypes()[reduce_dtype] if reduce_dtype else None,
    )
    for layer in decoder_layers(model) if layers is None else layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard == "forward")
    fully_shard(model, mesh=mesh, mp_policy=mp)


def training_mesh(mesh, cfg):
    """The mesh FSDP2 shards over: the strategy's data-parallel mesh (``train.fsdp_sharding: full``), or a 2-D
    ``(replicate, shard)`` mesh of ``num_nodes`` x ``devices`` for hybrid sharding (HSDP): shards within a node,
    replicas across nodes. Ranks are numbered node by node, so a row of the mesh is one node."""
    if mesh is None or cfg.fsdp_sharding != "hybrid" or cfg.num_nodes == 1:
        return mesh
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(mesh.device_type, (cfg.num_nodes, cfg.devices), mesh_dim_names=("replicate", "shard"))


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate the meta parameters (each rank: its shards) on ``device``; tensors that were already real
    (buffers, small modules built eagerly) keep their values."""
    keep = {name: local(t).detach().clone()
            for name, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta}
    model.to_empty(device=device)
    for name, value in keep.items():
        target = model.get_parameter(name) if name in dict(model.named_parameters()) else model.get_buffer(name)
        local(target).copy_(value)


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors weight files of a saved HF model (sharded or not; never the sparsity masks)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        import json

        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{model_dir}: no model.safetensors (a plain HF directory saved with safetensors)")
    return [single]


def read_full_state(model_dir: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every weight of ``model_dir`` on the CPU, keys prefixed with ``prefix`` (the loader rank only)."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        sd.update({prefix + k: v for k, v in load_file(str(f)).items()})
    return sd


def tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that are another name of an earlier parameter (tied embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied


def load_broadcast(root: nn.Module, model_dir: str | Path, prefix: str = "",
                   not_in_checkpoint: tuple[str, ...] = ()) -> None:
    """Fill the sharded ``root`` with the weights of ``model_dir``: global rank 0 reads them, every rank
    receives its shards (one tensor at a time). A collective: call on every rank.

    Args:
        root: The FSDP2 root module, already materialised.
        model_dir: A plain HF directory.
        prefix: Where the HF model sits inside ``root`` (``"student."`` for the distillation student).
        not_in_checkpoint: Name prefixes of parameters the checkpoint does not hold (initialised otherwise).

    Raises:
        RuntimeError: when the checkpoint lacks a parameter or holds one the model does not have.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    loader = dist.get_rank() == 0
    sd = read_full_state(model_dir, prefix) if loader else {}
    if loader:
        names = {n for n, _ in root.named_parameters(remove_duplicate=False)}
        missing = sorted(n for n in names - set(sd) - tied_names(root) if not n.startswith(not_in_checkpoint))
        unexpected = sorted(set(sd) - names - {n for n, _ in root.named_buffers()})
        if missing or unexpected:
            raise RuntimeError(f"{model_dir}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    set_model_state_dict(root, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                            strict=False))
    del sd


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict for export. A collective under FSDP2 (call on every rank); only global rank 0
    receives the tensors (each is gathered, offloaded to rank 0's CPU, and dropped on the others)."""
    if any(is_dtensor(p) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------- shard-local state


def local_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: this rank's shard}`` (no copy, no communication)."""
    return {name: local(p).detach() for name, p in model.named_parameters()}


def local_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's per-parameter state keyed by parameter name, each tensor this rank's shard (no copy)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: {k: local(v).detach() if torch.is_tensor(v) else v for k, v in st.items()}
            for p, st in optimizer.state.items()}


@torch.no_grad()
def load_local_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy shard-local weights (from :func:`local_model_state` of a model sharded the same way) into ``model``."""
    params = dict(model.named_parameters())
    if set(params) != set(state):
        raise RuntimeError(f"shard state does not match the model: missing {sorted(set(params) - set(state))[:3]}, "
                           f"unexpected {sorted(set(state) - set(params))[:3]}")
    for name, p in params.items():
        dst = local(p)
        if dst.shape != state[name].shape:
            raise RuntimeError(f"{name}: local shard {tuple(state[name].shape)} != {tuple(dst.shape)}")
        dst.copy_(state[name])


def load_local_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                               state: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    """Install shard-local optimizer state (from :func:`local_optimizer_state`) for the parameters of ``model``.

    Returns:
        The number of parameters that received state.
    """
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise RuntimeError(f"optimizer state names parameters the model lacks: {unknown[:3]}")
    for name, st in state.items():
        p = params[name]
        new = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                if v.shape != local(p).shape:
                    raise RuntimeError(f"{name}.{k}: local shard {tuple(v.shape)} != {tuple(local(p).shape)}")
                v = v.to(local(p).device)
                v = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()) \
                    if is_dtensor(p) else v
            elif torch.is_tensor(v):
                v = v.clone()
            new[k] = v
        optimizer.state[p] = new
    return len(state)


def local_rows(p: torch.Tensor) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the full tensor that this rank's FSDP2 shard holds (``Shard(0)``, as
    ``torch.chunk``); the whole range for a plain tensor."""
    if not is_dtensor(p):
        return 0, p.shape[0]
    from torch.distributed.tensor import Shard

    shards = [i for i, pl in enumerate(p.placements) if pl == Shard(0)]
    if len(shards) != 1 or any(not pl.is_replicate() for i, pl in enumerate(p.placements) if i != shards[0]):
        raise NotImplementedError(f"only FSDP2's Shard(0) placement (and HSDP's Replicate, Shard(0)) is supported, "
                                  f"got {p.placements}")
    n, world = p.shape[0], p.device_mesh.size(shards[0])
    chunk = math.ceil(n / world)
    start = min(p.device_mesh.get_local_rank(shards[0]) * chunk, n)
    stop = min(start + chunk, n)
    assert stop - start == p.to_local().shape[0], (tuple(p.shape), start, stop, tuple(p.to_local().shape))
    return start, stop


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2: reduce-scatter gradients only when ``sync`` (the last micro-batch of an optimizer step); the
    earlier micro-batches accumulate unsharded gradients locally. No-op for a plain module."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def reshard(model: nn.Module) -> None:
    """Free every gathered parameter of an FSDP2 model (its modules' shards stay). Needed after a forward without
    backward (validation) when layers keep their parameters gathered after forward (``train.fsdp_reshard``
    ``backward`` / ``step``): otherwise they stay gathered, and an export or a checkpoint would read the
    gathered copies. No-op for a plain module."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def set_micro_batch(model: nn.Module, last: bool, cfg) -> None:
    """Before each micro-batch under FSDP2: gradients reduced on the last one only (``train.reduce_grads: step``)
    or on every one; with ``train.fsdp_reshard: step`` the parameters stay gathered after the backward of every
    micro-batch but the last, so the next forward gathers nothing. No-op for a plain module."""
    from torch.distributed.fsdp import FSDPModule

    set_gradient_sync(model, last or cfg.reduce_grads == "micro_batch")
    if isinstance(model, FSDPModule) and cfg.fsdp_reshard == "step":
        model.set_reshard_after_backward(last)
