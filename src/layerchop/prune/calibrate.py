"""One calibration driver for every one-shot solver (magnitude, Wanda, SparseGPT).

The model is run decoder layer by decoder layer on the calibration sequences, as in the Wanda and
SparseGPT reference implementations:

1. the inputs of layer 0 are captured (embeddings), and the keyword arguments the model passes each layer
   (rotary position embeddings, the mask of the layer's attention kind: sliding-window or full);
2. for each layer: move it to ``device``; forward hooks on its linears feed ``add_batch``; every linear
   of the layer is pruned from the statistics of this one pass; the *pruned* layer is run again to
   produce the inputs of the next layer; the layer goes back to its original device.

Memory stays bounded by one decoder layer plus the calibration activations ``[num, T, D]``, so a 7B
model can be pruned with only one layer on the GPU. Embeddings, norms and the LM head are never pruned.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from layerchop.prune.chop import decoder_layers, replaced_forwards
from layerchop.prune.solvers import solver as oneshot_method
from layerchop.prune.sparsity import Pattern


class _Stop(Exception):
    pass


def prunable_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Attention and MLP projections of one decoder layer, by name relative to the layer."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, calib_NT: torch.Tensor, device: torch.device, batch_size: int):
    """Hidden states entering decoder layer 0 ``[N, T, D]`` and, per batch size, the keyword arguments every layer
    receives from the model (``{batch size: [kwargs of layer 0, kwargs of layer 1, ...]}``).

    Each layer gets its own: families that mix sliding-window and full attention (Gemma-2/3, Qwen2 with
    ``use_sliding_window``) give each layer the mask of its kind, Gemma-3 also its own rotary tables. They are taken
    from one pass of the model in which every layer passes its input through (nothing is computed but the embeddings,
    the masks and the position tables). The mask and positions are shaped by the batch: a last, smaller batch gets its
    own; batches of one size share one set, since packed sequences have no padding.
    """
    layers = decoder_layers(model)
    last = len(layers) - 1
    hidden: list[torch.Tensor] = []
    kwargs_by_size: dict[int, list] = {}

    def recorder(index: int):
        def forward(hidden_states, *args, **kwargs):
            if args:
                raise TypeError(f"{type(model).__name__}: decoder layer {index} got positional inputs besides the "
                                "hidden states; calibration supports the families whose layers take keywords")
            if index == 0:
                hidden.append(hidden_states.detach())
            per_layer = kwargs_by_size.setdefault(hidden_states.shape[0], [None] * len(layers))
            if per_layer[index] is None:
                per_layer[index] = dict(kwargs)
            if index == last:
                raise _Stop  # the final norm and the head are not needed
            return hidden_states

        return forward

    # everything before the layers (embeddings, rotary tables) must sit on the device for this pass
    model.get_input_embeddings().to(device)
    inner = model.get_decoder()
    if hasattr(inner, "rotary_emb"):
        inner.rotary_emb.to(device)
    with replaced_forwards(model, {i: recorder(i) for i in range(len(layers))}):
        for i in range(0, calib_NT.shape[0], batch_size):
            try:
                model(input_ids=calib_NT[i : i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    return torch.cat(hidden), kwargs_by_size


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calib_NT: torch.Tensor,
    method: str,
    pattern: Pattern,
    *,
    device: Optional[str | torch.device] = None,
    batch_size: int = 8,
    solver_kwargs: Optional[dict] = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Prune every linear of every decoder layer in place.

    Args:
        model: A HF causal LM (its layers may live on the CPU).
        calib_NT: Calibration token ids ``[num_sequences, seq_len]`` (from the train split).
        method: A one-shot method's name (:func:`layerchop.prune.registry.registry`: ``magnitude``, ``wanda``,
            ``sparsegpt``, and those added in ``layerchop.prune.oneshot``).
        pattern: Sparsity pattern.
        device: Where each layer is processed (default: where the embeddings are).
        batch_size: Calibration sequences per forward.
        solver_kwargs: ``prune`` settings; each method takes those it names (``settings``: SparseGPT's
            ``blocksize``, ``percdamp``).

    Returns:
        ``({parameter name: bool mask}, stats)`` where stats has per-module and overall sparsity.
    """
    cls = oneshot_method(method)
    extra = {k: v for k, v in (solver_kwargs or {}).items() if k in cls.settings}
    device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
    model.eval()
    layers = decoder_layers(model)
    prefix = _layers_prefix(model, layers)
    inps, kwargs_by_size = capture_layer_inputs(model, calib_NT, device, batch_size)
    kwargs_by_size = {n: [{k: _to(v, device) for k, v in kw.items()} for kw in per_layer]
                      for n, per_layer in kwargs_by_size.items()}
    masks: dict[str, torch.Tensor] = {}
    per_module: dict[str, float] = {}
    for li, layer in enumerate(tqdm(layers, desc=f"{method} {pattern}", unit="layer")):
        home = next(layer.parameters()).device
        layer.to(device)
        linears = prunable_linears(layer)
        solvers = {n: cls(lin, **extra) for n, lin in linears.items()}
        handles = [lin.register_forward_hook(lambda m, i, o, s=solvers[n]: s.add_batch(i[0].detach(), o))
                   for n, lin in linears.items()]
        for i in range(0, inps.shape[0], batch_size):
            x = inps[i : i + batch_size]
            layer(x, **kwargs_by_size[x.shape[0]][li])
        for h in handles:
            h.remove()
        for name, solver in solvers.items():
            mask = solver.prune(pattern)
            solver.free()
            full = f"{prefix}.{li}.{name}.weight"
            masks[full] = mask.cpu()
            per_module[full] = float(mask.float().mean())
        outs = []
        for i in range(0, inps.shape[0], batch_size):
            x = inps[i : i + batch_size]
            out = layer(x, **kwargs_by_size[x.shape[0]][li])
            outs.append(out[0] if isinstance(out, tuple) else out)
        inps = torch.cat(outs)
        layer.to(home)
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int(m.sum()) for m in masks.values())
    stats = {"per_module": per_module, "overall_pruned_fraction": zeros / max(total, 1),
             "pruned_params": zeros, "prunable_params": total}
    return masks, stats


def _to(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_to(x, device) for x in v)
    return v


def _layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise RuntimeError("decoder layers not found among the model's modules")
