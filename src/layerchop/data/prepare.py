"""Tokenize, split by document, and pack into fixed-length sequences stored memory-mapped on disk.

Layout of a prepared directory::

    counts.json           # sizes, seq_len, dtype, tokenizer fingerprint (small: read by every rank)
    splits.tsv            # document id -> split, in corpus order (provenance)
    train.bin val.bin test.bin   # uint16/uint32 [num_sequences, seq_len], row-major
    tasks/                # offline zero-shot tasks (see layerchop.data.tasks)

Documents are concatenated, each after the tokenizer's default prefix (BOS for Llama-2's tokenizer, nothing for
SmolLM2's: :func:`document_prefix`) and with the EOS token after it, and cut into rows of ``seq_len``; the last
row of a split is padded and its padding is masked out of the loss, so no token is lost.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from layerchop.io import read_json, tokenizer_fingerprint

SPLITS = ("train", "val", "test")
SPLITS_FILE = "splits.tsv"
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


def _document(line: bytes, docs_file: Path, number: int) -> dict:
    """One line of ``documents.jsonl`` as a document; a ``ValueError`` naming the file and line otherwise."""
    where = f"{docs_file}:{number}"
    try:
        doc = json.loads(line.rstrip(b"\r\n").decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: a document is a JSON object, not a {type(doc).__name__}")
    for key in ("id", "text"):
        if not isinstance(doc.get(key), str):
            raise ValueError(f"{where}: a document needs a string {key!r}"
                             + (f", not {doc[key]!r}" if key in doc else f" (its keys: {sorted(doc)})"))
    return doc


def _scan_corpus(docs_file: Path) -> tuple[np.ndarray, list[str]]:
    """Byte offset of every line of ``documents.jsonl`` (plus the end) and the document ids, in file order; every
    line is checked (:func:`_document`) before any tokenizing."""
    offsets, ids = [0], []
    with open(docs_file, "rb") as f:
        for number, line in enumerate(f, start=1):
            offsets.append(offsets[-1] + len(line))
            if line.strip():
                ids.append(_document(line, docs_file, number)["id"])
            else:
                offsets.pop()
                offsets[-1] += len(line)  # a blank line belongs to no document
    return np.asarray(offsets, dtype=np.int64), ids


def _read_docs(docs_file: Path, start: int, stop: int) -> Iterator[dict]:
    """Documents of the byte range ``[start, stop)`` (whole lines), one line in memory at a time."""
    with open(docs_file, "rb") as f:
        f.seek(start)
        pos = start
        while pos < stop:
            line = f.readline()
            pos += len(line)
            if line.strip():
                yield json.loads(line)


_TOKENIZER = None


def _pack_shard(job: dict) -> dict:
    """Tokenize documents ``[first, last)`` of the corpus (a byte range) and append their tokens, after the
    tokenizer's own prefix (BOS where it adds one) and EOS-terminated, to one file per split. Runs in a worker
    process; nothing corpus-sized is held in memory."""
    global _TOKENIZER
    if _TOKENIZER is None or _TOKENIZER[0] != job["model_dir"]:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # documents are longer than the model context on purpose
        _TOKENIZER = (job["model_dir"], AutoTokenizer.from_pretrained(job["model_dir"]))
    tokenizer = _TOKENIZER[1]
    dtype, eos, labels, bos = np.dtype(job["dtype"]), job["eos"], job["labels"], job["bos"]
    out = {s: {"tokens": 0, "documents": 0} for s in SPLITS}
    files = {s: open(Path(job["dir"]) / f"{s}.{job['shard']:06d}.bin", "wb") for s in SPLITS}
    try:
        docs = _read_docs(Path(job["docs_file"]), job["start"], job["stop"])
        i = 0
        while True:
            batch = [d["text"] for _, d in zip(range(job["batch_size"]), docs)]
            if not batch:
                break
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                split = SPLITS[labels[i]]
                files[split].write(np.asarray(bos + ids + [eos], dtype=dtype).tobytes())
                out[split]["tokens"] += len(bos) + len(ids) + 1
                out[split]["documents"] += 1
                i += 1
        assert i == len(labels), (i, len(labels))
    finally:
        for f in files.values():
            f.close()
    return out


def document_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by default (``add_special_tokens=True``): ``[BOS]`` for Llama-2's,
    ``[]`` for SmolLM2's. Every packed document starts with them, so training, perplexity and lm-eval's requests
    (which encode a context with the tokenizer's default) see one token format."""
    probe = "The quick brown fox jumps over the lazy dog."
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')}: its special tokens change the text's own "
                     "tokens; cannot tell which it adds around a document")


def prepare(corpus_dir: str | Path, model_dir: str | Path, out: str | Path, cfg) -> dict:
    """Tokenize ``corpus_dir/documents.jsonl`` with the tokenizer of ``model_dir`` into ``out``.

    Scales to corpora far larger than memory: one pass reads the document ids and line offsets, the split is
    assigned per document, ``prepare.num_proc`` worker processes tokenize contiguous shards of the file and
    append each document's tokens (in the storage dtype, never int64) to per-shard files, and each split's
    file is the concatenation of its shards in corpus order, padded to whole rows. (``datasets.map`` would
    cache every token id as int64 in Arrow files: ~160 GB at 20B tokens.)

    Args:
        corpus_dir: Output of the download stage.
        model_dir: Model directory whose tokenizer (and context length) is used.
        out: Prepared directory to create (atomically).
        cfg: :class:`layerchop.config.PrepareConfig`.
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

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
    bos = document_prefix(tokenizer)

    docs_file = corpus_dir / "documents.jsonl"
    if not docs_file.exists():
        raise FileNotFoundError(f"{docs_file} not found: run the download stage first")
    offsets, ids = _scan_corpus(docs_file)
    if not ids:
        raise ValueError(f"{docs_file}: the corpus is empty (0 documents); check download.corpus")
    assign = split_documents(ids, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    labels = np.asarray([SPLITS.index(assign[d]) for d in ids], dtype=np.uint8)

    counts: dict = {
        "seq_len": cfg.seq_len,
        "dtype": dtype.name,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "eos_id": eos,
        "pad_id": pad,
        "document_prefix_ids": bos,
        "splits": {},
    }
    with atomic_dir(out) as tmp:
        shard_dir = tmp / ".shards"
        shard_dir.mkdir()
        # contiguous document ranges, several per worker for a useful progress bar
        num_shards = min(len(ids), max(1, cfg.num_proc) * 8)
        bounds = np.linspace(0, len(ids), num_shards + 1).astype(int)
        jobs = [{"model_dir": str(model_dir), "docs_file": str(docs_file), "dir": str(shard_dir), "shard": k,
                 "start": int(offsets[a]), "stop": int(offsets[b]), "labels": labels[a:b].tolist(),
                 "batch_size": cfg.batch_size, "dtype": dtype.name, "eos": eos, "bos": bos}
                for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
        bar = tqdm(total=len(ids), desc="tokenize", unit="doc")
        if cfg.num_proc > 1:
            import multiprocessing

            with ProcessPoolExecutor(cfg.num_proc, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = []
                for job, res in zip(jobs, pool.map(_pack_shard, jobs)):
                    results.append(res)
                    bar.update(len(job["labels"]))
        else:
            results = []
            for job in jobs:
                results.append(_pack_shard(job))
                bar.update(len(job["labels"]))
        bar.close()
        for split in SPLITS:
            n_tokens = sum(r[split]["tokens"] for r in results)
            num_sequences = max(-(-n_tokens // cfg.seq_len), 1)
            with open(tmp / f"{split}.bin", "wb") as dst:
                for job in jobs:
                    with open(shard_dir / f"{split}.{job['shard']:06d}.bin", "rb") as src:
                        shutil.copyfileobj(src, dst, 16 << 20)
                dst.write(np.full(num_sequences * cfg.seq_len - n_tokens, pad, dtype=dtype).tobytes())
            split_ids = sorted(d for d, lab in zip(ids, labels) if SPLITS[lab] == split)
            counts["splits"][split] = {
                "tokens": int(n_tokens), "sequences": int(-(-n_tokens // cfg.seq_len)),
                "documents": sum(r[split]["documents"] for r in results),
                "document_ids_sha256": hashlib.sha256("\n".join(split_ids).encode()).hexdigest(),
            }
        shutil.rmtree(shard_dir)
        with open(tmp / SPLITS_FILE, "w", encoding="utf-8") as f:  # provenance: which document went where
            for d, lab in zip(ids, labels):
                f.write(f"{d}\t{SPLITS[lab]}\n")
        test_texts = [doc["text"] for k in np.flatnonzero(labels == SPLITS.index("test"))
                      for doc in _read_docs(docs_file, int(offsets[k]), int(offsets[k + 1]))]
        counts["tasks"] = build_tasks(test_texts, tmp / "tasks", cfg.tasks, seed=cfg.seed, final_dir=out / "tasks")
        write_json(tmp / "counts.json", counts)
    return counts


def read_splits(prepared_dir: str | Path) -> dict[str, list[str]]:
    """Document ids of each split, in corpus order (from the prepared directory's ``splits.tsv``)."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    with open(Path(prepared_dir) / SPLITS_FILE, encoding="utf-8") as f:
        for line in f:
            doc, split = line.rstrip("\n").rsplit("\t", 1)
            out[split].append(doc)
    return out


def calibration_batch(dataset, num: int, seed: int, key: str = "prune.num_calibration") -> torch.Tensor:
    """``num`` packed training sequences chosen with ``seed`` → ``[num, T]`` token ids (``key``: the params key of
    ``num``, for the error)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:num].tolist()
    if len(idx) < num:
        raise ValueError(f"{key}={num} exceeds the {len(dataset)} training sequences")
    return torch.stack([dataset[i]["input_ids"] for i in idx])
