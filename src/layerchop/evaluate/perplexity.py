"""Perplexity of a causal LM on a packed split, with ``torchmetrics.text.Perplexity``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm

from layerchop.data.prepare import IGNORE_INDEX, PackedDataset


@torch.no_grad()
def perplexity(model, prepared_dir: str | Path, split: str, max_sequences: int = 0, batch_size: int = 8,
               device: str = "cpu") -> dict:
    """Token-level perplexity over the first ``max_sequences`` packed sequences of ``split``.

    Returns:
        ``{"ppl": float, "tokens": int, "sequences": int}``; ``tokens`` counts predicted tokens.
    """
    ds = PackedDataset(prepared_dir, split, max_sequences=max_sequences)
    if len(ds) == 0:
        raise ValueError(f"{prepared_dir}: split {split!r} holds no sequence")
    metric = Perplexity(ignore_index=IGNORE_INDEX).to(device)
    model.eval()
    tokens = 0
    for batch in tqdm(DataLoader(ds, batch_size=batch_size), desc=f"ppl/{split}", unit="batch"):
        ids_BT = batch["input_ids"].to(device)
        labels_BT = batch["labels"].to(device)
        logits_BTV = model(input_ids=ids_BT, use_cache=False).logits.float()
        metric.update(logits_BTV[:, :-1], labels_BT[:, 1:])
        tokens += int((labels_BT[:, 1:] != IGNORE_INDEX).sum())
    return {"ppl": float(metric.compute()), "tokens": tokens, "sequences": len(ds)}
