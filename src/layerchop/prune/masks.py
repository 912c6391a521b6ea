"""Sparsity masks saved beside a pruned model (``sparsity_masks.safetensors``).

Later stages read the saved masks; nothing infers a mask from ``W == 0`` (a trained weight can be
exactly zero without being pruned, and a pruned one must stay zero).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

MASKS_FILE = "sparsity_masks.safetensors"


def save_masks(model_dir: str | Path, masks: dict[str, torch.Tensor]) -> Path:
    """Write ``{parameter name: bool mask (True = pruned)}`` into ``model_dir``."""
    path = Path(model_dir) / MASKS_FILE
    save_file({k: v.to(torch.bool).contiguous() for k, v in masks.items()}, str(path))
    return path


def load_masks(model_dir: str | Path) -> Optional[dict[str, torch.Tensor]]:
    """The masks of a pruned model directory, or None for a dense one."""
    path = Path(model_dir) / MASKS_FILE
    return load_file(str(path)) if path.exists() else None


def nonzero_params(model: torch.nn.Module) -> int:
    """Non-zero entries over unique parameters (tied embeddings counted once)."""
    return sum(int(torch.count_nonzero(p)) for p in {id(p): p for p in model.parameters()}.values())


def save_pruned_model_dir(model, tokenizer, out: str | Path, *, masks: dict[str, torch.Tensor], metadata: dict,
                          card: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
    """A plain HF directory plus its masks, written atomically (both appear together or not at all)."""
    from layerchop.io import atomic_dir, save_model_dir

    with atomic_dir(out) as tmp:
        inner = tmp / "hf"
        save_model_dir(model, tokenizer, inner, metadata=metadata, card=card, state_dict=state_dict,
                       name=Path(out).name)
        save_masks(inner, masks)
        for f in inner.iterdir():
            f.rename(tmp / f.name)
        inner.rmdir()


def mask_names(model_dir: str | Path) -> list[str]:
    """Parameter names the masks file of ``model_dir`` covers, without reading the masks."""
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / MASKS_FILE), "pt") as f:
        return list(f.keys())


class MaskEnforcer:
    """Keeps pruned weights at exactly zero: ``W *= keep`` for every masked parameter.

    Works on plain and FSDP2-sharded (DTensor) parameters. Each rank reads only the rows of each mask that
    its shard holds (from the masks file, memory-mapped), so no rank holds every mask of a large model.

    Args:
        model: The HF model whose parameter names the masks use.
        masks: ``{parameter name: bool mask, True = pruned}``, or the path of a ``sparsity_masks.safetensors``.
    """

    def __init__(self, model: torch.nn.Module, masks: "dict[str, torch.Tensor] | str | Path"):
        self.model, self.masks = model, masks
        names = mask_names(Path(masks).parent) if isinstance(masks, (str, Path)) else list(masks)
        params = dict(model.named_parameters())
        missing = sorted(set(names) - set(params))
        if missing:
            raise ValueError(f"sparsity masks name parameters the model lacks: {missing[:3]}...")
        self.names = names
        self._keep: dict[str, torch.Tensor] = {}

    def _rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if isinstance(self.masks, dict):
            return self.masks[name][start:stop]
        from safetensors import safe_open

        with safe_open(str(self.masks), "pt") as f:
            return f.get_slice(name)[start:stop]

    def _keep_for(self, name: str, p: torch.Tensor) -> torch.Tensor:
        if name not in self._keep:
            from layerchop.train.sharding import local, local_rows

            start, stop = local_rows(p)
            self._keep[name] = (~self._rows(name, start, stop)).to(device=local(p).device, dtype=p.dtype)
        return self._keep[name]

    @torch.no_grad()
    def apply(self) -> None:
        from layerchop.train.sharding import local

        params = dict(self.model.named_parameters())
        for name in self.names:
            local(params[name]).mul_(self._keep_for(name, params[name]))

    @torch.no_grad()
    def num_masked_nonzero(self) -> int:
        """Masked entries that are not zero on any rank (0 whenever :meth:`apply` ran after the last update).
        A collective under FSDP2 (an all-reduce of the count)."""
        from layerchop.train.sharding import is_dtensor, local

        params = dict(self.model.named_parameters())
        device = local(params[self.names[0]]).device if self.names else torch.device("cpu")
        total = torch.zeros((), dtype=torch.long, device=device)  # on the device: NCCL reduces GPU tensors only
        for name in self.names:
            p = params[name]
            total += torch.count_nonzero(local(p) * (1 - self._keep_for(name, p)))
        if any(is_dtensor(params[n]) for n in self.names):
            import torch.distributed as dist

            dist.all_reduce(total)
        return int(total)
