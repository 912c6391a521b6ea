"""Data-driven choice of the decoder layers to remove (beyond the paper's fixed layouts).

Three criteria from the depth-pruning literature, each computed on calibration sequences from the train
split with the *uncompressed* model, and each turned into ``num_remove`` indices that keep the first and the
last layer (as every LayerChop layout does):

* ``angular`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): for every
  contiguous block of ``n = num_remove`` layers starting at ``l``, the angular distance
  ``arccos(cos(h_l, h_{l+n})) / pi`` between the hidden state entering the block and the one leaving it;
  the block with the smallest distance goes. Averaged over every token position (the paper uses the last
  token of each prompt; packed sequences have no natural last token).
* ``block-influence`` (ShortGPT, Men et al. 2024): per layer ``BI_i = 1 - mean_t cos(h_i, h_{i+1})``; the
  ``num_remove`` layers of lowest influence go.
* ``ppl`` (Shortened LLaMA, Kim et al. 2024, its PPL criterion): per layer, the calibration perplexity of
  the model with that one layer removed; the ``num_remove`` layers whose removal raises it least go
  (scored one at a time, removed together, as in that paper's one-shot variant).

``h_i`` is the residual stream entering decoder layer ``i`` (``h_L`` leaves the last layer, before the
final norm). All functions are pure: they read the model and return numbers. Each criterion is a
:class:`Criterion`; :func:`criteria` finds the built-in ones and those added in a file of
``src/layerchop/prune/criteria/``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from layerchop.prune.chop import decoder_layers, skipping


@torch.no_grad()
def residual_streams(model: nn.Module, ids_BT: torch.Tensor) -> list[torch.Tensor]:
    """``[h_0, ..., h_L]`` for one batch: the input of every decoder layer, then the last layer's output."""
    layers = decoder_layers(model)
    streams: list[torch.Tensor] = []

    def pre(module, args, kwargs):
        streams.append((args[0] if args else kwargs["hidden_states"]).detach().float())

    def post(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        streams.append(out.detach().float())

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(post, with_kwargs=True))
    try:
        model(input_ids=ids_BT, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return streams


def _batches(calib_NT: torch.Tensor, batch_size: int, desc: str):
    starts = range(0, calib_NT.shape[0], batch_size)
    return tqdm(starts, desc=desc, unit="batch", total=len(starts))


@torch.no_grad()
def stream_similarity_scores(model: nn.Module, calib_NT: torch.Tensor, block: int, *, batch_size: int = 8,
                             device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Block Influence per layer and angular distance per contiguous block of ``block`` layers.

    Returns:
        ``{"block-influence": [BI_0 .. BI_{L-1}], "angular": [d_0 .. d_{L-block}]}`` where ``d_l`` is the mean
        angular distance (in units of pi) between ``h_l`` and ``h_{l+block}``, over all calibration tokens.
    """
    model.eval().to(device)
    num_layers = len(decoder_layers(model))
    if not 1 <= block <= num_layers:
        raise ValueError(f"block={block}: must be 1..{num_layers}")
    cos_sum = torch.zeros(num_layers, dtype=torch.float64)
    ang_sum = torch.zeros(num_layers - block + 1, dtype=torch.float64)
    count = 0
    for i in _batches(calib_NT, batch_size, "scores"):
        h = residual_streams(model, calib_NT[i : i + batch_size].to(device))
        for layer in range(num_layers):
            cos_sum[layer] += F.cosine_similarity(h[layer], h[layer + 1], dim=-1).double().sum().cpu()
        for start in range(num_layers - block + 1):
            cos = F.cosine_similarity(h[start], h[start + block], dim=-1).double().clamp(-1.0, 1.0)
            ang_sum[start] += (torch.arccos(cos) / math.pi).sum().cpu()
        count += h[0].shape[0] * h[0].shape[1]
    return {"block-influence": (1.0 - cos_sum / count).tolist(), "angular": (ang_sum / count).tolist()}


@torch.no_grad()
def mean_nll(model: nn.Module, calib_NT: torch.Tensor, batch_size: int, device) -> float:
    """Mean next-token negative log-likelihood of the calibration sequences (float64 accumulation)."""
    total, count = 0.0, 0
    for i in range(0, calib_NT.shape[0], batch_size):
        ids = calib_NT[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll.double())
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def ppl_without_each_layer(model: nn.Module, calib_NT: torch.Tensor, *, batch_size: int = 8,
                           device: str | torch.device = "cpu", layers: Sequence[int] | None = None) -> dict:
    """Calibration perplexity of the full model and of the model with each one layer left out.

    Layer ``i`` passes its input through for the duration of a pass (:func:`~layerchop.prune.chop.skipping`: no copy
    of weights, every other layer keeps its own attention mask and positions; restored afterwards, also on error).

    Returns:
        ``{"full": ppl, "without": [ppl without layer 0, ...]}`` (``None`` for layers not in ``layers``).
    """
    model.eval().to(device)
    num_layers = len(decoder_layers(model))
    which = list(range(num_layers)) if layers is None else list(layers)
    full = math.exp(mean_nll(model, calib_NT, batch_size, device))
    without: list = [None] * num_layers
    for i in tqdm(which, desc="ppl without layer", unit="layer"):
        with skipping(model, [i]):
            without[i] = math.exp(mean_nll(model, calib_NT, batch_size, device))
    return {"full": full, "without": without}


def lowest(scores: Sequence[float | None], k: int, candidates: Sequence[int]) -> list[int]:
    """The ``k`` candidates of lowest score (ties: the lower index), sorted."""
    if k > len(candidates):
        raise ValueError(f"num_remove={k} is more than the {len(candidates)} removable layers")
    ranked = sorted(candidates, key=lambda i: (scores[i], i))
    return sorted(ranked[:k])


class Criterion:
    """A data-driven layout (``chop.layout: <name>``): scores of the dense model's layers on calibration sequences,
    and the ``num_remove`` layers they select (never the first or the last).

    Adding one: a subclass with a ``name`` in a file of ``src/layerchop/prune/criteria/`` (found by :func:`criteria`),
    then ``chop.layout: <name>`` or its name in ``table6.layouts``."""

    name: ClassVar[str] = ""
    block: ClassVar[bool] = False
    """Whether it removes one contiguous block (its scores are indexed by the block's first layer)."""

    def scores(self, model: nn.Module, calib_NT: torch.Tensor, num_remove: int, *, batch_size: int,
               device: str | torch.device) -> dict:
        """JSON-able scores (lists indexed by layer or block start), recorded in the chopped model's metadata."""
        raise NotImplementedError

    def select(self, scores: dict, num_layers: int, num_remove: int) -> list[int]:
        """The layers to remove, sorted, from :meth:`scores`."""
        raise NotImplementedError

    def plotted(self, scores: dict) -> tuple[str, list]:
        """Figure 5's curve: its axis label and one value per layer (or block start)."""
        raise NotImplementedError


class Angular(Criterion):
    """The contiguous block whose input and output hidden states are closest in angle (Gromov et al. 2024)."""

    name, block = "angular", True

    def scores(self, model, calib_NT, num_remove, *, batch_size, device):
        s = stream_similarity_scores(model, calib_NT, num_remove, batch_size=batch_size, device=device)
        return {"criterion": self.name, "block": num_remove, **s}

    def select(self, scores, num_layers, num_remove):
        starts = [s for s in range(1, num_layers - num_remove) if s + num_remove <= num_layers - 1]
        if not starts:
            raise ValueError(f"num_remove={num_remove}: no block of that many layers between the first and last "
                             f"of {num_layers}")
        best = min(starts, key=lambda s: (scores["angular"][s], s))
        return list(range(best, best + num_remove))

    def plotted(self, scores):
        return f"angular distance h_l -> h_l+{scores['block']} (block start l)", scores["angular"]


class BlockInfluence(Criterion):
    """The layers that change the residual stream least (ShortGPT's Block Influence, Men et al. 2024)."""

    name = "block-influence"

    def scores(self, model, calib_NT, num_remove, *, batch_size, device):
        s = stream_similarity_scores(model, calib_NT, num_remove, batch_size=batch_size, device=device)
        return {"criterion": self.name, "block": num_remove, **s}

    def select(self, scores, num_layers, num_remove):
        return lowest(scores["block-influence"], num_remove, list(range(1, num_layers - 1)))

    def plotted(self, scores):
        return "block influence 1 - cos(h_i, h_i+1)", scores["block-influence"]


class Perplexity(Criterion):
    """The layers whose removal alone raises the calibration perplexity least (Shortened LLaMA's PPL criterion)."""

    name = "ppl"

    def scores(self, model, calib_NT, num_remove, *, batch_size, device):
        r = ppl_without_each_layer(model, calib_NT, batch_size=batch_size, device=device)
        return {"criterion": self.name, "ppl_full": r["full"], "ppl_without": r["without"]}

    def select(self, scores, num_layers, num_remove):
        return lowest(scores["ppl_without"], num_remove, list(range(1, num_layers - 1)))

    def plotted(self, scores):
        return "calibration ppl without layer i", scores["ppl_without"]


CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (Angular, BlockInfluence, Perplexity)}
"""The built-in criteria; :func:`criteria` adds those of ``layerchop.prune.criteria``."""


def criteria() -> dict[str, type[Criterion]]:
    """Every data-driven layout by name: :data:`CRITERIA` and each :class:`Criterion` subclass defined in a module of
    the package ``layerchop.prune.criteria``."""
    from layerchop.config import LAYOUTS
    from layerchop.plugins import CRITERIA as PACKAGE, with_package

    found = with_package(CRITERIA, PACKAGE, Criterion, "layer-selection criterion")
    for name, cls in found.items():  # one file a criterion, named as it: params checks read the names from the files
        if name not in CRITERIA and cls.__module__ != f"{PACKAGE}.{name}":
            raise ValueError(f"{cls.__module__.rsplit('.', 1)[-1]}.py: layer-selection criterion {name!r} must be in "
                             f"a file of its own name, {name}.py")
    taken = sorted(set(found) & set(LAYOUTS))
    if taken:
        raise ValueError(f"layer-selection criteria {taken}: the name of a fixed layout ({list(LAYOUTS)})")
    return found


def criterion(name: str) -> Criterion:
    """The criterion called ``name``: a built-in one, or the one of that file in ``layerchop.prune.criteria`` (only
    that file is imported: a stage that scores with one criterion runs no other's code)."""
    from layerchop.config import data_driven_layouts
    from layerchop.plugins import CRITERIA as PACKAGE, load

    if name in CRITERIA:
        return CRITERIA[name]()
    if name not in data_driven_layouts():
        raise ValueError(f"criterion {name!r}: choose one of {list(data_driven_layouts())}")
    return load(PACKAGE, name, Criterion, "layer-selection criterion")()


def select_layers(name: str, scores: dict, num_layers: int, num_remove: int) -> list[int]:
    """Indices to remove from ``scores`` (of :func:`layer_scores`), never the first or last layer."""
    return criterion(name).select(scores, num_layers, num_remove)


def layer_scores(name: str, model: nn.Module, calib_NT: torch.Tensor, num_remove: int, *,
                 batch_size: int = 8, device: str | torch.device = "cpu") -> dict:
    """The scores criterion ``name`` ranks layers (or blocks) by, as JSON-able lists indexed by layer (block start)."""
    return criterion(name).scores(model, calib_NT, num_remove, batch_size=batch_size, device=device)
