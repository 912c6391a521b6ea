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
        save_model_dir(model, tokenizer, inner, metadata=metadata, card=card, state_dict=state_dict)
        save_masks(inner, masks)
        for f in inner.iterdir():
            f.rename(tmp / f.name)
        inner.rmdir()


class MaskEnforcer:
    """Keeps pruned weights at exactly zero: ``W *= keep`` for every masked parameter.

    Works on plain and FSDP2-sharded (DTensor) parameters; the keep-masks are sharded like their
    parameters once and cached.

    Args:
        model: The HF model whose parameter names the masks use.
        masks: ``{parameter name: bool mask, True = pruned}``.
    """

    def __init__(self, model: torch.nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        missing = sorted(set(masks) - set(params))
        if missing:
            raise ValueError(f"sparsity masks name parameters the model lacks: {missing[:3]}...")
        self.model, self.masks = model, masks
        self._keep: dict[str, torch.Tensor] = {}

    def _keep_for(self, name: str, p: torch.Tensor) -> torch.Tensor:
        if name not in self._keep:
            keep = (~self.masks[name]).to(device=p.device, dtype=p.dtype)
            from torch.distributed.tensor import DTensor, distribute_tensor

            if isinstance(p, DTensor):
                keep = distribute_tensor(keep.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            self._keep[name] = keep
        return self._keep[name]

    @torch.no_grad()
    def apply(self) -> None:
        for name, p in self.model.named_parameters():
            if name in self.masks:
                p.mul_(self._keep_for(name, p))

    @torch.no_grad()
    def num_masked_nonzero(self) -> int:
        """Masked entries that are not zero (0 whenever :meth:`apply` ran after the last update)."""
        from torch.distributed.tensor import DTensor

        total = 0
        for name, p in self.model.named_parameters():
            if name in self.masks:
                bad = p * (1 - self._keep_for(name, p))
                total += int(torch.count_nonzero(bad.full_tensor() if isinstance(bad, DTensor) else bad))
        return total
