"""Shared-context multiple-choice scoring against lm-eval's own ``HFLM``: time and agreement, side by side.

Runs lm-eval's ``simple_evaluate`` on one model and the pipeline's tasks twice in one process, with lm-eval's
``HFLM`` (the context runs once per choice) and with :func:`layerchop.evaluate.shared_context.shared_context_lm`
(once per item), on the same items, and prints each path's seconds, its accuracies, the speed-up, and the largest
absolute and relative difference of any request's log-likelihood (and how many greedy flags differ). ``--reference
-batch`` adds lm-eval's ``HFLM`` at another batch size: how far lm-eval's own log-likelihoods move with the batch
(float32 rounding), the yardstick for the difference above. Prints numbers; asserts nothing. From the repository root,
after ``dvc repro prepare download_model``:

    python experiments/benchmarks/shared_context.py --model data/models/dense --limit 100 --reference-batch 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from layerchop.config import section
from layerchop.evaluate.harness import available_tasks, check_tasks, local_mirror_config, seed_everything
from layerchop.evaluate.shared_context import loglik_differences, shared_context_lm
from layerchop.machine import cpu_model


def run(make, model, tok, cfg, tasks, tm, limit: int, batch: int):
    import lm_eval

    with tempfile.TemporaryDirectory() as work:
        specs = [local_mirror_config(tm, n, cfg.local_tasks[n], Path(work)) if n in cfg.local_tasks else n
                 for n in tasks]
        lm = make(pretrained=model, tokenizer=tok, batch_size=batch, device=cfg.device)
        seed_everything(cfg.seed)
        t = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=specs, num_fewshot=0, limit=limit, task_manager=tm,
                                      bootstrap_iters=0, log_samples=True, random_seed=cfg.seed,
                                      numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                                      fewshot_random_seed=cfg.seed)
        return out, time.perf_counter() - t


def main() -> None:
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="data/models/dense")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--limit", type=int, default=100, help="items per task")
    ap.add_argument("--reference-batch", type=int, default=None, help="also lm-eval's HFLM at this batch size")
    args = ap.parse_args()
    cfg = section("evaluate")
    tasks, skipped = available_tasks(cfg)
    tm = check_tasks(tasks, Path(args.data) / "tasks", cfg.local_tasks)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, cfg.dtype)).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    print(f"# {cpu_model()}, {torch.get_num_threads()} threads; {args.model}; tasks {tasks} (skipped {skipped}), "
          f"{args.limit} items each, batch {cfg.batch_size}")
    runs = {"lm-eval HFLM": run(HFLM, model, tok, cfg, tasks, tm, args.limit, cfg.batch_size),
            "shared context": run(shared_context_lm, model, tok, cfg, tasks, tm, args.limit, cfg.batch_size)}
    if args.reference_batch:
        runs[f"lm-eval HFLM, batch {args.reference_batch}"] = run(HFLM, model, tok, cfg, tasks, tm, args.limit,
                                                                  args.reference_batch)
    base, base_s = runs["lm-eval HFLM"]
    for name, (out, seconds) in runs.items():
        accs = {t: {k.split(",")[0]: round(v, 4) for k, v in r.items() if k in ("acc,none", "acc_norm,none")}
                for t, r in out["results"].items()}
        line = f"{name}: {seconds:.1f} s ({base_s / seconds:.2f}x lm-eval's)  {accs}"
        if out is not base:
            n, worst, rel, greedy = loglik_differences(base["samples"], out["samples"])
            line += f"\n    vs lm-eval HFLM over {n} requests: max |d loglik| {worst:.3g}, max relative {rel:.3g}, " \
                    f"greedy flags differing {greedy}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
