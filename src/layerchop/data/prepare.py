"""Tokenize, split by document, and pack into fixed-length sequences stored memory-mapped on disk.

Layout of a prepared directory::

    counts.json           # sizes, seq_len, dtype, tokenizer fingerprint, document ids per split
    train.bin val.bin test.bin   # uint16/uint32 [num_sequences, seq_len], row-major
    tasks/                # offline zero-shot tasks (see layerchop.data.tasks)

Documents are concatenated with the EOS token after each one and cut into rows of ``seq_len``; the last
row of a split is padded and its padding is masked out of the loss, so no token is lost.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from layerchop.io import read_json, tokenizer_fingerprint

SPLITS = ("train", "val", "test")
IGNORE_INDEX = -100


def split_documents(doc_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Assign each document to train/val/test, deterministically from ``seed``.

    Documents are ordered by ``sha256(seed:id)``, so the assignment of a document does not depend on
    the order of the corpus file. At least one document goes to each held-out split.

    Raises:
        ValueError: if there are fewer than 3 documents or ids repeat.
    """
    n = len(doc_ids)
    if n < 3:
        raise ValueError(f"download.corpus: {n} document(s); a split by document needs at least 3")
    if len(set(doc_ids)) != n:
        raise ValueError("download.corpus: document ids are not unique")
    order = sorted(doc_ids, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    n_test = max(1, round(test_fraction * n))
    n_val = max(1, round(val_fraction * n))
    if n_test + n_val >= n:
        raise ValueError(
            f"prepare.val_fraction/test_fraction leave no training document out of {n}"
        )
    assign = {}
    for i, d in enumerate(order):
        assign[d] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return assign


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def pack_documents(
    docs: Iterable[list[int]], out_path: Path, num_tokens: int, seq_len: int, pad_id: int, dtype: np.dtype
) -> dict:
    """Write token lists (already EOS-terminated) into a ``[num_sequences, seq_len]`` memmap.

    Args:
        docs: Token id lists, streamed.
        out_path: ``.bin`` file to create.
        num_tokens: Total number of tokens in ``docs`` (counted beforehand to size the file).
        seq_len: Row length.
        pad_id: Fills the tail of the last row.
        dtype: Storage dtype.
    """
    num_sequences = -(-num_tokens // seq_len)
    mm = np.memmap(out_path, dtype=dtype, mode="w+", shape=(max(num_sequences, 1) * seq_len,))
    pos = 0
    for ids in docs:
        mm[pos : pos + len(ids)] = ids
        pos += len(ids)
    assert pos == num_tokens, (pos, num_tokens)
    mm[pos:] = pad_id
    mm.flush()
    del mm
    return {"tokens": int(num_tokens), "sequences": int(num_sequences)}


class PackedDataset(Dataset):
    """Rows of a packed split: ``{"input_ids": LongTensor[T], "labels": LongTensor[T]}``.

    Padding at the tail of the last row carries label ``-100`` so it is ignored by the loss and by
    perplexity.
    """

    def __init__(self, prepared_dir: str | Path, split: str, max_sequences: int = 0):
        prepared_dir = Path(prepared_dir)
        counts = read_json(prepared_dir / "counts.json")
        self.seq_len = int(counts["seq_len"])
        info = counts["splits"][split]
        self.num_tokens = int(info["tokens"])
        n = int(info["sequences"])
        self.num_sequences = min(n, max_sequences) if max_sequences else n
        self.data = np.memmap(
            prepared_dir / f"{split}.bin", dtype=np.dtype(counts["dtype"]), mode="r", shape=(n, self.seq_len)
        ) if n else None

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.data[i].astype(np.int64))
        labels = ids.clone()
        valid = self.num_tokens - i * self.seq_len
        if valid < self.seq_len:
            labels[max(valid, 0):] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}


def check_data_matches_model(prepared_dir: Path, model_dir: Path, tokenizer) -> dict:
    """Refuse data tokenized with another tokenizer, or sequences longer than the model's context."""
    counts = read_json(prepared_dir / "counts.json")
    fp_data = counts["tokenizer_fingerprint"]
    fp_model = tokenizer_fingerprint(tokenizer)
    if fp_data != fp_model:
        raise ValueError(
            f"{prepared_dir} was tokenized with tokenizer {fp_data}, but {model_dir} uses {fp_model}: "
            "re-run prepare with this model (download.model) or pick the matching model"
        )
    from transformers import AutoConfig

    max_pos = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    if max_pos is not None and counts["seq_len"] > max_pos:
        raise ValueError(
            f"prepare.seq_len={counts['seq_len']} is above {model_dir}'s context (max_position_embeddings={max_pos})"
        )
    return counts


def prepare(corpus_dir: str | Path, model_dir: str | Path, out: str | Path, cfg) -> dict:
    """Tokenize ``corpus_dir/documents.jsonl`` with the tokenizer of ``model_dir`` into ``out``.

    Args:
        corpus_dir: Output of the download stage.
        model_dir: Model directory whose tokenizer (and context length) is used.
        out: Prepared directory to create (atomically).
        cfg: :class:`layerchop.config.PrepareConfig`.
    """
    from datasets import load_dataset
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from layerchop.data.tasks import build_tasks
    from layerchop.io import atomic_dir, write_json

    corpus_dir, out = Path(corpus_dir), Path(out)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{model_dir}: prepare needs a fast tokenizer")
    config = AutoConfig.from_pretrained(model_dir)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise ValueError(
            f"prepare.seq_len={cfg.seq_len} is above the model's context (max_position_embeddings={max_pos})"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{model_dir}: the tokenizer has no EOS token to separate documents")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    dtype = token_dtype(len(tokenizer))

    docs_file = corpus_dir / "documents.jsonl"
    if not docs_file.exists():
        raise FileNotFoundError(f"{docs_file} not found: run the download stage first")
    with open(docs_file, encoding="utf-8") as f:
        if not any(line.strip() for line in f):
            raise ValueError(f"{docs_file}: the corpus is empty (0 documents); check download.corpus")
    ds = load_dataset("json", data_files=str(docs_file), split="train")
    assign = split_documents(list(ds["id"]), cfg.val_fraction, cfg.test_fraction, cfg.seed)

    hf_logging.set_verbosity_error()  # documents are longer than the model context on purpose

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids], "length": [len(x) + 1 for x in ids]}

    tok = ds.map(
        tokenize, batched=True, batch_size=cfg.batch_size, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        remove_columns=[c for c in ds.column_names if c != "id"], desc="tokenize",
    )
    counts: dict = {
        "seq_len": cfg.seq_len,
        "dtype": dtype.name,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "eos_id": eos,
        "pad_id": pad,
        "splits": {},
    }
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            rows = [i for i, d in enumerate(tok["id"]) if assign[d] == split]
            part = tok.select(rows)
            n_tokens = int(sum(part["length"]))
            info = pack_documents(
                (r["input_ids"] for r in part), tmp / f"{split}.bin", n_tokens, cfg.seq_len, pad, dtype
            )
            info["documents"] = len(rows)
            info["document_ids"] = sorted(part["id"])
            counts["splits"][split] = info
        test_texts = [r["text"] for r in ds if assign[r["id"]] == "test"]
        counts["tasks"] = build_tasks(test_texts, tmp / "tasks", cfg.tasks, seed=cfg.seed, final_dir=out / "tasks")
        write_json(tmp / "counts.json", counts)
    return counts
