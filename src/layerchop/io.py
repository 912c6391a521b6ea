"""Stage-boundary I/O: plain Hugging Face model directories and small JSON files, written atomically.

An output either appears complete or not at all: everything is written into a temporary sibling and
renamed into place at the end, so a failed or interrupted stage never leaves a directory that looks
finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

METADATA_FILE = "layerchop.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tmp_suffix() -> str:
    """A temporary-name suffix unique across hosts and processes (a PID alone repeats on other nodes)."""
    return f"tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{tmp_suffix()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (tmp file + rename), sorted keys, trailing newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{tmp_suffix()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.rename(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary (token -> id), so data and model tokenizers can be compared."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    """This package's metadata of a model directory (``{}`` for a foreign directory)."""
    p = Path(model_dir) / METADATA_FILE
    return read_json(p) if p.exists() else {}


def load_model(model_dir: str | Path, dtype: str = "float32"):
    """Load a model directory with plain ``AutoModelForCausalLM.from_pretrained``."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def num_params(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_model_dir(
    model,
    tokenizer,
    out: str | Path,
    *,
    metadata: dict[str, Any],
    card: Optional[str] = None,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Save a plain HF model directory (safetensors + tokenizer + metadata + model card), atomically.

    Args:
        model: The model (its config and class are used; its weights unless ``state_dict``).
        tokenizer: Tokenizer saved beside it.
        out: Destination directory.
        metadata: Written as ``layerchop.json`` (parameters and layer counts are added).
        card: Markdown model card (``README.md``).
        state_dict: Full (unsharded) weights to save instead of the model's own.
    """
    metadata = dict(metadata)
    metadata.setdefault("num_hidden_layers", int(model.config.num_hidden_layers))
    if state_dict is None:
        metadata.setdefault("num_params", num_params(model))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        metadata["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
        write_json(tmp / METADATA_FILE, metadata)
        if card:
            (tmp / "README.md").write_text(card)
