"""The evaluation suite of one model directory: perplexity on val/test and zero-shot accuracy."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from layerchop.data.prepare import check_data_matches_model
from layerchop.evaluate.harness import available_tasks, check_tasks, flat_task_metrics, zero_shot
from layerchop.evaluate.perplexity import perplexity
from layerchop.io import load_model, load_tokenizer, num_params, read_metadata
from layerchop.machine import machine_record
from layerchop.prune.masks import nonzero_params


@contextlib.contextmanager
def fp32_output_head(model, device: str, enabled: bool = True):
    """Inside autocast, keep ``model``'s output head in float32 (its input cast up, autocast off for it), so that
    log-probabilities are not computed from logits rounded to bf16's 8 mantissa bits. No-op when not ``enabled``."""
    if not enabled:
        yield
        return
    head = model.get_output_embeddings()
    own = vars(head).get("forward")  # an instance-level forward already there (e.g. accelerate's hooks), or None
    forward = head.forward
    kind = torch.device(device).type

    def fp32_head(x):
        with torch.autocast(device_type=kind, enabled=False):
            return forward(x.float())

    head.forward = fp32_head
    try:
        yield
    finally:
        if own is None:
            del head.forward  # back to the class's method
        else:
            head.forward = own


# lm-eval's record of when, where and by which commit it ran: moved from results.json into the metrics' record, so
# that results.json is a function of the model, the data and the settings (the same bytes on a re-run)
RUN_RECORD = ("date", "start_time", "end_time", "total_evaluation_time_seconds", "git_hash", "upper_git_hash",
              "pretty_env_info", "transformers_version")

# what the evaluated model's layerchop.json says of how it was made (kept in results.json for the reports)
PROVENANCE = ("stage", "method", "layout", "removed_layers", "kept_layers", "num_layers_before", "selection",
              "objective", "tokens_trained", "pattern")


def evaluate_model(model_dir: str | Path, data: str | Path, cfg) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate ``model_dir`` on prepared ``data`` with :class:`layerchop.config.EvaluateConfig` ``cfg``.

    Returns:
        ``(metrics, results)``: flat DVC metrics (``val/ppl``, ``eval/<task>/<metric>`` with its ``_stderr``,
        ``eval/<task>/n``, ...; ``machine``: where and with which libraries it ran, :func:`machine_record`) and
        lm-eval's raw results without its dates, host and commit (:data:`RUN_RECORD`), with ``skipped_tasks``
        (optional tasks whose local data is absent, and why) and ``model`` (the model's provenance from its
        ``layerchop.json``).
    """
    data = Path(data)
    names, skipped = available_tasks(cfg)
    tasks = check_tasks(names, data / "tasks", cfg.local_tasks)  # before the model is loaded
    tokenizer = load_tokenizer(model_dir)
    check_data_matches_model(data, Path(model_dir), tokenizer)
    model = load_model(model_dir, dtype=cfg.dtype).to(cfg.device)
    meta = read_metadata(model_dir)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {
        "params": num_params(model),
        "nonzero_params": nonzero_params(model),
        "layers": int(model.config.num_hidden_layers),
        "tokens_trained": int(meta.get("tokens_trained", 0)),
    }
    for split in ("val", "test"):
        with fp32_output_head(model, cfg.device, cfg.autocast is not None), torch.autocast(
                device_type=torch.device(cfg.device).type, dtype=getattr(torch, cfg.autocast or "bfloat16"),
                enabled=cfg.autocast is not None):
            ppl = perplexity(model, data, split, cfg.ppl_max_sequences, cfg.batch_size, cfg.device)
        metrics[f"{split}/ppl"] = ppl["ppl"]
        metrics[f"{split}/ppl_tokens"] = ppl["tokens"]
    metrics["eval_ppl_s"] = round(time.perf_counter() - t0, 1)
    results: dict[str, Any] = {"results": {}}
    if names:
        t1 = time.perf_counter()
        with fp32_output_head(model, cfg.device, cfg.autocast is not None):  # lm-eval's own autocast runs the rest
            results = zero_shot(model, tokenizer, names, include_path=data / "tasks", local_tasks=cfg.local_tasks,
                                batch_size=cfg.batch_size, limit=cfg.limit, seed=cfg.seed, device=cfg.device,
                                task_manager=tasks, autocast=cfg.autocast, shared_context=cfg.shared_context)
        metrics["eval_tasks_s"] = round(time.perf_counter() - t1, 1)
        metrics.update(flat_task_metrics(results))
    results["skipped_tasks"] = skipped
    results["model"] = {k: meta[k] for k in PROVENANCE if k in meta}
    metrics["eval_wall_s"] = round(time.perf_counter() - t0, 1)
    record = {k: results.pop(k) for k in RUN_RECORD if k in results}
    metrics["machine"] = {**machine_record(), "lm_eval": {k: v for k, v in record.items() if k != "pretty_env_info"}}
    return metrics, results
