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
