"""Stage-boundary I/O: plain Hugging Face model directories and small JSON files, written atomically.

An output either appears complete or not at all: everything is written into a temporary sibling and
renamed into place at the end, so a failed or interrupted stage never leaves a directory that looks
finished.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:
    import torch

METADATA_FILE = "layerchop.json"
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def dtypes() -> dict[str, "torch.dtype"]:
    """Dtype name -> ``torch.dtype``, built on use: importing this module (and so every stage's command line,
    ``layerchop --help`` included) must not import torch."""
    import torch

    return {n: getattr(torch, n) for n in DTYPE_NAMES}


def tmp_suffix() -> str:
    """A temporary-name suffix unique across hosts and processes (a PID alone repeats on other nodes)."""
    return f"tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` (``.<name>.tmp-<host>-<pid>-<id>``) that a killed process of
    this host left; those of live processes, or of other hosts (whose processes this host cannot see), stay.

    Returns:
        The paths removed.
    """
    out = Path(out)
    host = socket.gethostname()
    removed = []
    if not out.parent.is_dir():
        return removed
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        rest = tmp.name[len(f".{out.name}.tmp-"):]
        if not rest.startswith(f"{host}-"):
            continue
        pid = rest[len(host) + 1:].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class OutputError(OSError):
    """An output that could not be written (one line for the user: the path and why)."""


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the disk or quota is full: ``OSError`` ENOSPC/EDQUOT, or safetensors' own error
    (its Rust writer reports ``StorageFull``/``QuotaExceeded`` inside a ``SafetensorError``)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return type(error).__name__ == "SafetensorError" and ("StorageFull" in str(error) or "QuotaExceeded" in str(error)
                                                          or "No space left" in str(error))


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    Raises:
        OutputError: the disk (or quota) filled up while the block wrote (naming ``out``; the partial
            directory is removed).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.{tmp_suffix()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e) or isinstance(e, OutputError):  # (an inner atomic_dir's: named by the outer output)
            free = shutil.disk_usage(out.parent).free
            raise OutputError(f"{out}: the disk filled up while it was written ({free / 2**20:.1f} MiB free on "
                              f"{out.parent}); nothing was left behind") from None
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)


@contextlib.contextmanager
def staged(*dests: str | Path) -> Iterator[tuple[Path, ...]]:
    """Yield one temporary directory per destination directory; the files written into them are moved into
    their destinations only once the whole block succeeded, so a stage that fails while writing its outputs
    (tables and figures) publishes none of them and never leaves new files beside stale ones. (The moves
    themselves are one ``os.replace`` per file: a kill in those few renames can still leave a mixed set.)

    Example::

        with staged("paper/tables", "paper/figures") as (tables, figures):
            (tables / "main.md").write_text(...)
            plot(figures / "curves.png")
    """
    dests = tuple(Path(d) for d in dests)
    tmps = []
    try:
        for d in dests:
            d.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(d)
            tmp = d.with_name(f".{d.name}.{tmp_suffix()}")
            tmp.mkdir()
            tmps.append(tmp)
        yield tuple(tmps)
        for d, tmp in zip(dests, tmps):
            for f in sorted(tmp.iterdir()):
                os.replace(f, d / f.name)
    finally:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: str | Path, key: str) -> None:
    """Refuse, before any work, an output that cannot be written: ``path``'s nearest existing ancestor must be a
    directory in which this process can create a file (tried, so read-only mounts and permissions both count).

    Raises:
        ValueError: naming ``key`` and the path.
    """
    path = Path(path).absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{key} {path}: cannot be created, {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.{tmp_suffix()}")
    except OSError as e:
        raise ValueError(f"{key} {path}: cannot write in {parent} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (tmp file + rename), sorted keys, trailing newline; a full disk leaves nothing."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (tmp file + rename); a full disk leaves nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{tmp_suffix()}")
    try:
        tmp.write_text(text)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise OutputError(f"{path}: the disk filled up while it was written; nothing was left behind") from None
        raise
    tmp.rename(path)


def read_json(path: str | Path) -> Any:
    """A JSON file's content; a ``ValueError`` naming the file (and line) where it is not UTF-8 JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


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


def check_model_dir(model_dir: str | Path, key: str) -> Path:
    """Refuse, before any work, what is not a plain HF model directory this package can read: a missing path
    (``from_pretrained`` would take it for a Hub id), no ``config.json``, pickle-only weights, or safetensors
    files whose header cannot be read.

    Raises:
        FileNotFoundError / ValueError: one line naming ``key`` and the path.
    """
    from safetensors import safe_open

    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{key} {d}: no such model directory")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{key} {d}: not a model directory (no config.json)")
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        why = f"only pickle weights {pickles}" if pickles else "no *.safetensors weights"
        raise ValueError(f"{key} {d}: {why}; safetensors only (save_pretrained writes them)")
    for w in weights:
        try:
            with safe_open(str(w), "pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise ValueError(f"{key} {w}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    from transformers import AutoConfig

    from layerchop.families import check_family

    try:
        config = AutoConfig.from_pretrained(d)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{key} {d}: config.json is not a transformers config ({str(e).splitlines()[0][:160]})") from None
    check_family(config, f"{key} {d}")  # a multimodal, MoE or non-causal model: refused
    return d


def load_model(model_dir: str | Path, dtype: str = "float32"):
    """Load a model directory with plain ``AutoModelForCausalLM.from_pretrained``."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtypes()[dtype])


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
    name: Optional[str] = None,
) -> None:
    """Save a plain HF model directory (safetensors + tokenizer + metadata + model card), atomically.

    Args:
        model: The model (its config and class are used; its weights unless ``state_dict``).
        tokenizer: Tokenizer saved beside it.
        out: Destination directory.
        metadata: Written as ``layerchop.json`` (parameters and layer counts are added).
        card: The model card's Markdown text (``README.md``, below the metadata of :func:`layerchop.cards.render`).
        state_dict: Full (unsharded) weights to save instead of the model's own.
        name: The model's name in its card (default: ``out``'s).
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
            from layerchop.cards import render

            (tmp / "README.md").write_text(render(card, metadata, name or Path(out).name))
