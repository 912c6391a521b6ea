"""Where an evaluation's time goes, and what bf16 autocast and batch size change (numbers and time).

Runs :func:`layerchop.evaluate.suite.evaluate_model` on one model with the ``evaluate`` section of
``params.yaml`` and small overrides, side by side in one process, and prints for each variant the seconds
spent on perplexity and on lm-eval's requests, and every metric with its difference from the first variant
(in points for accuracies, in % for perplexities). Prints numbers; asserts nothing. From the repository root,
after ``dvc repro prepare download_model``:

    python experiments/benchmarks/eval_cost.py --model data/models/dense --limit 300 \
        --variants fp32-b8,bf16-b8,fp32-b32,bf16-b32
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json

import torch

from layerchop.config import section
from layerchop.evaluate import suite
from layerchop.evaluate.suite import evaluate_model


def parse(name: str) -> tuple[dict, bool]:
    """``fp32-bN`` / ``bf16-bN`` (autocast, output head in float32, as the pipeline runs) / ``bf16head-bN`` (the head
    under autocast too: bf16 logits, cast up to float32 before lm-eval's log-softmax). Returns the ``evaluate``
    overrides and whether the head runs in bf16."""
    prec, batch = name.split("-b")
    if prec not in ("fp32", "bf16", "bf16head"):
        raise ValueError(f"--variants: {name!r} (expected fp32-bN, bf16-bN or bf16head-bN)")
    return {"autocast": None if prec == "fp32" else "bfloat16", "batch_size": int(batch)}, prec == "bf16head"


@contextlib.contextmanager
def bf16_output_head(model, device: str, enabled: bool = True):
    """In place of :func:`layerchop.evaluate.suite.fp32_output_head`: the head's matmul under autocast (bf16), its
    logits cast up to float32 so that the log-softmax downstream runs in float32 on bf16-rounded logits."""
    if not enabled:
        yield
        return
    head = model.get_output_embeddings()
    own = vars(head).get("forward")  # an instance-level forward already there (e.g. accelerate's hooks), or None
    forward = head.forward
    head.forward = lambda x: forward(x).float()
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="data/models/dense")
    p.add_argument("--data", default="data/prepared")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: evaluate.limit)")
    p.add_argument("--variants", default="fp32-b8,bf16-b8")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = section("evaluate")
    if args.limit:
        base = dataclasses.replace(base, limit=args.limit)
    print(f"# {args.model}, limit {base.limit}, tasks {base.tasks}, torch threads {torch.get_num_threads()}",
          flush=True)
    rows = []
    for name in args.variants.split(","):
        overrides, bf16_head = parse(name)
        cfg = dataclasses.replace(base, **overrides)
        fp32_head = suite.fp32_output_head
        suite.fp32_output_head = bf16_output_head if bf16_head else fp32_head
        try:
            metrics, _ = evaluate_model(args.model, args.data, cfg)
        finally:
            suite.fp32_output_head = fp32_head
        rows.append((name, metrics))
        print(json.dumps({"variant": name, **{k: v for k, v in metrics.items() if k.endswith("_s")}}), flush=True)
    ref = rows[0][1]
    keys = [k for k in ref if k.endswith("/ppl") or (k.startswith("eval/") and k.rsplit("/", 1)[1] in ("acc", "acc_norm"))]
    print("\n| variant | ppl s | tasks s | total s | speed-up | " + " | ".join(keys) + " |")
    print("|---" * (5 + len(keys)) + "|")
    for name, m in rows:
        cells = []
        for k in keys:
            if k.endswith("/ppl"):
                cells.append(f"{m[k]:.3f} ({100 * (m[k] / ref[k] - 1):+.2f} %)")
            else:
                cells.append(f"{100 * m[k]:.1f} ({100 * (m[k] - ref[k]):+.1f})")
        print(f"| {name} | {m['eval_ppl_s']} | {m.get('eval_tasks_s', 0)} | {m['eval_wall_s']} | "
              f"{ref['eval_wall_s'] / m['eval_wall_s']:.2f}x | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
