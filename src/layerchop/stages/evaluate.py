"""Stage ``evaluate``: perplexity on val/test and zero-shot accuracy with lm-evaluation-harness.

Example::

    layerchop evaluate --model data/models/layerchop --data data/prepared --out data/eval/layerchop
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from layerchop.config import section
from layerchop.evaluate.harness import flat_task_metrics, zero_shot
from layerchop.evaluate.perplexity import perplexity
from layerchop.io import atomic_dir, load_model, load_tokenizer, num_params, read_metadata, write_json
from layerchop.prune.masks import nonzero_params
from layerchop.data.prepare import check_data_matches_model


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--out", required=True, help="output directory (metrics.json, results.json)")


def main(args: argparse.Namespace) -> None:
    cfg = section("evaluate", path=args.params)
    data = Path(args.data)
    tokenizer = load_tokenizer(args.model)
    check_data_matches_model(data, Path(args.model), tokenizer)
    model = load_model(args.model, dtype=cfg.dtype).to(cfg.device)
    meta = read_metadata(args.model)
    t0 = time.perf_counter()
    metrics: dict = {
        "params": num_params(model),
        "nonzero_params": nonzero_params(model),
        "layers": int(model.config.num_hidden_layers),
        "tokens_trained": int(meta.get("tokens_trained", 0)),
    }
    for split in ("val", "test"):
        ppl = perplexity(model, data, split, cfg.ppl_max_sequences, cfg.batch_size, cfg.device)
        metrics[f"{split}/ppl"] = ppl["ppl"]
        metrics[f"{split}/ppl_tokens"] = ppl["tokens"]
    results = zero_shot(model, tokenizer, cfg.tasks, include_path=data / "tasks", local_tasks=cfg.local_tasks,
                        batch_size=cfg.batch_size, limit=cfg.limit, seed=cfg.seed, device=cfg.device)
    metrics.update(flat_task_metrics(results))
    metrics["eval_wall_s"] = round(time.perf_counter() - t0, 1)
    with atomic_dir(args.out) as tmp:
        write_json(tmp / "results.json", results)
        write_json(tmp / "metrics.json", metrics)
    print(f"[evaluate] {args.model}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                     if isinstance(v, float)))
