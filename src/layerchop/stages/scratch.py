"""Stage ``scratch``: a randomly initialised model with another model's architecture (Figure 2's from-scratch arm).

The architecture (``config.json``) and tokenizer come from ``--like`` (the chopped model: same width, depth and
vocabulary as LayerChop's start); the weights are transformers' standard initialisation for that architecture
(``AutoModelForCausalLM.from_config``: normal(0, ``initializer_range``) matrices and embeddings, unit norms),
seeded with ``figure2.seed``. Nothing of ``--like``'s weights is read.

Example::

    layerchop scratch --like data/models/chopped --out data/models/scratch-init
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerchop.config import section
from layerchop.io import dtypes, check_model_dir, load_tokenizer, read_metadata, save_model_dir


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--like", required=True, help="model directory whose architecture and tokenizer are used")
    p.add_argument("--out", required=True, help="output model directory")


def random_init(config, seed: int):
    """transformers' standard initialisation of ``config``'s architecture, seeded (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def main(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    cfg = section("figure2", path=args.params)
    check_model_dir(args.like, "--like")
    config = AutoConfig.from_pretrained(args.like)
    src = read_metadata(args.like)
    dtype = src.get("dtype", "float32")
    model = random_init(config, cfg.seed).to(dtypes()[dtype])
    meta = {"stage": "scratch", "init_kind": "scratch", "seed": cfg.seed, "architecture_of": str(Path(args.like)),
            "dtype": dtype, "source": src.get("source"), "tokens_trained": 0}
    card = (f"# Random initialisation with the architecture of `{args.like}`\n\n"
            f"`AutoModelForCausalLM.from_config` (transformers' standard init), seed {cfg.seed}: "
            f"{config.num_hidden_layers} layers, width {config.hidden_size}. No pretrained weight is used.\n")
    save_model_dir(model, load_tokenizer(args.like), args.out, metadata=meta, card=card)
    print(f"[scratch] random {config.num_hidden_layers}-layer model (seed {cfg.seed}) -> {args.out}")
