"""Tables 4 and 5, generated: the models' configurations and training settings (from each model directory's
``config.json`` and ``layerchop.json``), and the evaluation protocol (from lm-eval's own record in an evaluation's
``results.json``). Nothing here is typed by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerchop.evaluate.harness import PRIMARY_METRIC, is_in_domain


def model_row(model_dir: str | Path, label: str) -> dict[str, Any]:
    """One row of Table 4: architecture from ``config.json``, parameters, and what trained the model."""
    from transformers import AutoConfig

    from layerchop.io import read_metadata
    from layerchop.train.plan import count_params

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    meta = read_metadata(model_dir)
    row = {"label": label, "name": model_dir.name, "params": count_params(config),
           "width": int(config.hidden_size), "ffn": int(config.intermediate_size),
           "heads": int(config.num_attention_heads),
           "kv_heads": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
           "layers": int(config.num_hidden_layers), "vocab": int(config.vocab_size)}
    if meta.get("stage") == "train":
        plan, train = meta["plan"], meta["train"]
        row.update(trained="from scratch" if meta.get("init_kind") == "scratch" else f"from {Path(meta['init']).name}",
                   objective=meta.get("objective", "lm"), batch_tokens=int(plan["tokens_per_step"]),
                   lr=float(train["lr"]), warmup=int(plan["warmup_steps"]), steps=int(plan["total_steps"]),
                   tokens=int(plan["tokens"]), flops=float(meta["compute"]["flops"]))
    else:
        trained = (f"no training: layers {meta['removed_layers']} of {meta['num_layers_before']} removed from "
                   f"{Path(meta['chopped_from']).name}" if meta.get("stage") == "chop"
                   else downloaded(meta))
        row.update(trained=trained, objective=None,
                   batch_tokens=None, lr=None, warmup=None, steps=None, tokens=None, flops=None)
    return row


def downloaded(meta: dict) -> str:
    """What a downloaded model is, for Table 4: the released checkpoint (its Hub id where known: the embedded default
    is SmolLM2-135M-Instruct, an instruction-tuned release, not a base model) and how it was converted."""
    from layerchop.cards import origin

    who = origin(meta)[0] or meta.get("hub_id") or meta.get("source", "?")
    how = f", dequantised from {meta['dequantized_from']}" if meta.get("dequantized_from") else ""
    return f"as released: {who}{how}"


def _fmt(x, f: str = "{}") -> str:
    return "–" if x is None else f.format(x)


def models_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["Model", "Params", "Width", "FFN", "Heads (KV)", "Layers", "Trained", "Objective",
              "Batch (tokens)", "Peak LR", "Warmup steps", "Steps", "Tokens", "Training FLOPs"]
    body = [[r["label"], f"{r['params']:,}", str(r["width"]), str(r["ffn"]), f"{r['heads']} ({r['kv_heads']})",
             str(r["layers"]), r["trained"], _fmt(r["objective"]), _fmt(r["batch_tokens"], "{:,}"),
             _fmt(r["lr"], "{:g}"), _fmt(r["warmup"]), _fmt(r["steps"]), _fmt(r["tokens"], "{:,}"),
             _fmt(r["flops"], "{:.3g}")] for r in rows]
    return header, body


NORMALISATION = {
    "acc": "none (sum of the choice's token log-likelihoods)",
    "acc_norm": "by the choice's length in characters (lm-eval acc_norm)",
}


def task_rows(results: dict[str, Any], local_tasks: dict[str, str]) -> list[dict[str, Any]]:
    """One row of Table 5 per task of an lm-eval ``results.json``: where its items come from, how many were
    scored, shots, the metric averaged (and its normalisation), the prompt, and the task and harness versions."""
    rows = []
    for task, cfg in sorted(results["configs"].items()):
        metric = PRIMARY_METRIC.get(task, "acc")
        n = results["n-samples"][task]
        if is_in_domain(task):
            source = "built by `prepare` from held-out documents of the recovery corpus"
        elif task in local_tasks:
            source = f"lm-eval `{task}`, data read from the local mirror {local_tasks[task]}"
        else:
            source = f"lm-eval `{task}`"
        split = cfg.get("test_split") or cfg.get("validation_split")
        rows.append({"task": task, "group": "in-domain" if is_in_domain(task) else "general", "source": source,
                     "split": split, "items": int(n["effective"]), "available": int(n["original"]),
                     "shots": int(results["n-shot"][task]), "metric": metric,
                     "normalisation": NORMALISATION.get(metric, "–"), "output_type": cfg.get("output_type"),
                     "prompt": str(cfg.get("doc_to_text")).replace("\n", "\\n").replace("|", "\\|"),
                     "version": results.get("versions", {}).get(task),
                     "harness": f"lm-eval {results.get('lm_eval_version', '?')}"})
    return rows


def tasks_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["Task", "Group", "Source", "Split", "Items scored (of)", "Shots", "Metric", "Normalisation",
              "Prompt", "Task version", "Harness"]
    body = [[r["task"], r["group"], r["source"], str(r["split"]), f"{r['items']:,} ({r['available']:,})",
             str(r["shots"]), r["metric"], r["normalisation"], f"`{r['prompt']}`", str(r["version"]), r["harness"]]
            for r in rows]
    return header, body
