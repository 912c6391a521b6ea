"""LightningDataModule over packed sequences, with the data position in the resumable state."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from layerchop.data.prepare import IGNORE_INDEX, PackedDataset


class ResumableSampler(Sampler[int]):
    """Endless, seeded, rank-sharded index stream that can start mid-stream.

    The global stream is ``perm_0 ++ perm_1 ++ ...`` where ``perm_e`` is a permutation of the dataset
    drawn from ``seed + e``; rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...``. Skipping the
    first ``start`` samples of this rank is exact, so a resumed run sees the same data as an
    uninterrupted one. It has no length: training stops on ``max_steps`` (the token budget).
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if num_samples <= 0:
            raise ValueError("the training split holds no sequence")
        self.n, self.seed, self.rank, self.world, self.start = num_samples, seed, rank, world_size, start

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        j = self.start * self.world + self.rank
        epoch, perm = -1, None
        while True:
            e, pos = divmod(j, self.n)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            yield int(perm[pos])
            j += self.world


class RankShard(Dataset):
    """Rank ``rank`` of ``world``'s share of an evaluation set: items ``rank, rank + world, ...``.

    Every rank gets ``ceil(n / world)`` items, the missing ones replaced by a row whose labels are all
    ignored, so every rank runs the same number of batches (under FSDP2 each forward is a collective) and a
    metric summed over ranks (torchmetrics' perplexity) equals the one of the whole set.
    """

    def __init__(self, dataset: Dataset, rank: int, world: int):
        self.dataset, self.rank, self.world = dataset, rank, world
        self.n = len(dataset)

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = i * self.world + self.rank
        if j < self.n:
            return self.dataset[j]
        row = self.dataset[0]
        return {"input_ids": row["input_ids"], "labels": torch.full_like(row["labels"], IGNORE_INDEX)}


class PackedDataModule(L.LightningDataModule):
    """Train/val dataloaders over a prepared directory.

    Args:
        prepared_dir: Output of the prepare stage.
        batch_size: Sequences per micro-batch per device.
        seed: Data-order seed.
        val_batches: Validation batches: the first ``val_batches * batch_size`` val sequences, shared out
            over the ranks.
        num_workers: DataLoader workers.
    """

    def __init__(self, prepared_dir: str | Path, batch_size: int, seed: int, val_batches: int, num_workers: int = 0,
                 start_samples: int = 0):
        super().__init__()
        self.start_samples = start_samples  # per rank, consumed before this fit (warm start)
        self.prepared_dir = Path(prepared_dir)
        self.batch_size, self.seed, self.val_batches, self.num_workers = batch_size, seed, val_batches, num_workers
        self.consumed_samples = start_samples  # per rank, restored from checkpoints
        self.train_set: Optional[PackedDataset] = None
        self.val_set: Optional[PackedDataset] = None

    def setup(self, stage: str) -> None:
        self.train_set = PackedDataset(self.prepared_dir, "train")
        self.val_set = PackedDataset(self.prepared_dir, "val", max_sequences=self.val_batches * self.batch_size)

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        sampler = ResumableSampler(len(self.train_set), self.seed, rank, world, start=self.consumed_samples)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        return DataLoader(RankShard(self.val_set, rank, world), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers)

    def state_dict(self) -> dict:
        # Called when a checkpoint is saved, right after an optimizer step.
        accumulate = self.trainer.accumulate_grad_batches if self.trainer else 1
        step = self.trainer.global_step if self.trainer else 0
        return {"consumed_samples": self.start_samples + step * accumulate * self.batch_size, "seed": self.seed,
                "start_samples": self.start_samples}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"train.seed={self.seed} differs from the checkpoint's data seed {state['seed']}")
        self.consumed_samples = int(state["consumed_samples"])
        self.start_samples = 0 if not state.get("start_samples") else int(state["start_samples"])
