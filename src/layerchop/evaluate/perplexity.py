"""Perplexity of a causal LM on a packed split: exp of the mean token negative log-likelihood.

``torchmetrics.text.Perplexity`` takes ``softmax(logits).log()``: a token whose log-probability is below about
-103 underflows to ``log 0 = -inf`` in float32 and the whole perplexity becomes ``inf`` (heavily damaged
models, e.g. a chop without recovery, have such tokens). :class:`TokenPerplexity` sums float32
cross-entropies (``log_softmax``, never ``log(softmax)``) into float64 accumulators instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.aggregation import MeanMetric
from tqdm.auto import tqdm

from layerchop.data.prepare import IGNORE_INDEX, PackedDataset


class TokenPerplexity(MeanMetric):
    """``exp`` of the mean negative log-likelihood of the tokens whose label is not ``ignore_index``.

    A torchmetrics ``MeanMetric`` over token NLLs: it sums over batches and, under DDP/FSDP, over ranks (each
    rank scores its share of the sequences); accumulators and the final ``exp`` are float64, so a perplexity
    above float32's range stays a number.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs):
        super().__init__(nan_strategy="disable", **kwargs)  # a NaN loss gives a NaN perplexity, not a dropped token
        self.ignore_index = ignore_index
        self.set_dtype(torch.float64)

    def update(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> None:  # type: ignore[override]
        labels = labels_BT.reshape(-1)
        nll = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), labels,
                              ignore_index=self.ignore_index, reduction="none")
        super().update(nll[labels != self.ignore_index].double())

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute())


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
    metric = TokenPerplexity().to(device)
    model.eval()
    tokens = 0
    for batch in tqdm(DataLoader(ds, batch_size=batch_size), desc=f"ppl/{split}", unit="batch"):
        ids_BT = batch["input_ids"].to(device)
        labels_BT = batch["labels"].to(device)
        logits_BTV = model(input_ids=ids_BT, use_cache=False).logits.float()
        metric.update(logits_BTV[:, :-1], labels_BT[:, 1:])
        tokens += int((labels_BT[:, 1:] != IGNORE_INDEX).sum())
    return {"ppl": float(metric.compute()), "tokens": tokens, "sequences": len(ds)}
