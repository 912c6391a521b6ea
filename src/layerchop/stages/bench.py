"""Stage ``bench``: inference latency, throughput and memory of compressed models against the dense one (Table 3).

Loads every model given (the first is the baseline, the dense model) on ``bench.device`` in ``bench.dtype`` and
times them interleaved over the grid ``bench.batch_sizes`` x ``bench.prompt_lengths``: prefill (time to first
token), decode per step, the whole query, each as median and spread over ``bench.repeats`` timed queries after
``bench.warmup`` untimed ones, with the per-repeat speed-ups over the baseline (``layerchop.evaluate.latency``).
Beside each measurement: the physical bound of its speed-up (decode: bytes read per step; prefill: FLOPs;
``layerchop.evaluate.efficiency.bounds``) and the memory held (weights, KV cache; on CUDA the allocator's peak).

A 2:4 model runs PyTorch's semi-structured sparse kernels on CUDA (``bench.sparse_kernel: auto``), checked by the
profiler's op names; on the CPU there is no such kernel and it runs dense kernels, which the record says.

Example::

    layerchop bench --model dense=data/models/dense --model layerchop=data/models/layerchop \\
        --model wanda-2of4=data/models/wanda-2of4 --out data/bench/metrics.json
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from layerchop.config import check_device, load_params, section
from layerchop.io import DTYPES, check_model_dir, write_json


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                   help="a model to time, repeatable; the first is the baseline (the dense model)")
    p.add_argument("--out", required=True, help="metrics JSON to write")


def parse_models(specs: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` pairs, checked: distinct names, existing model directories.

    Raises:
        ValueError / FileNotFoundError: one line naming the bad ``--model``.
    """
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model {spec!r}: expected NAME=DIR")
        if name in models:
            raise ValueError(f"--model {spec!r}: the name {name!r} is given twice")
        try:
            models[name] = check_model_dir(path, "--model")
        except (FileNotFoundError, ValueError) as e:  # name the pair as given: --model NAME=DIR: why
            raise type(e)(str(e).replace("--model ", f"--model {name}=", 1)) from None
    if len(models) < 2:
        raise ValueError(f"--model: give the baseline and at least one model to compare, not {len(models)}")
    return models


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(cfg, device) -> dict:
    import torch
    import transformers

    env = {"device": str(device), "device_name": device_name(device), "dtype": cfg.dtype,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": sys.version.split()[0], "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "host": platform.node()}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cusparselt"] = bool(torch.backends.cusparselt.is_available())
    return env


def prepare_model(name: str, path: Path, cfg, device) -> tuple[object, dict]:
    """Load one model directory for timing (:func:`prepare_loaded`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype])
    model, record = prepare_loaded(name, model, cfg, device)
    return model, {"path": str(path), **record}


def prepare_loaded(name: str, model, cfg, device) -> tuple[object, dict]:
    """Put a model on ``device`` for timing; convert a 2:4 model to the sparse kernels where ``bench.sparse_kernel``
    asks and the device has them, and check with the profiler which kernels run. Returns the model and its record
    (config, sizes, pattern, kernel).

    Raises:
        ValueError: ``bench.sparse_kernel: require`` where the 2:4 kernel cannot run, or kernels other than asked.
    """
    import torch

    from layerchop.evaluate.latency import kernel_ops, nm_pattern, to_semi_structured, weights_bytes

    model = model.to(device=device, dtype=DTYPES[cfg.dtype]).eval()
    pattern = nm_pattern(model)
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    kernel, why = "dense", None
    if pattern == (2, 4) and cfg.sparse_kernel != "off":
        if device.type != "cuda":
            why = f"no 2:4 sparse kernel on {device.type}: runs dense kernels"
        elif cfg.dtype == "float32":
            why = "the 2:4 kernels take bfloat16 or float16, bench.dtype is float32: runs dense kernels"
        else:
            kernel = "2:4 " + to_semi_structured(model)
        if why and cfg.sparse_kernel == "require":
            raise ValueError(f"bench.sparse_kernel='require': --model {name}: {why}")
    elif pattern is not None:
        why = f"{pattern[0]}:{pattern[1]} has no sparse kernel: runs dense kernels"
    probe = torch.zeros(1, 16, dtype=torch.long, device=device)
    ops = kernel_ops(model, probe)
    if kernel != "dense" and ops["sparse"] == 0:
        raise ValueError(f"--model {name}: converted to {kernel}, but the profiler saw no sparse matmul")
    if kernel == "dense" and ops["sparse"]:
        raise ValueError(f"--model {name}: dense kernels asked for, but the profiler saw {ops['sparse']} sparse ops")
    record = {"config": model.config.to_diff_dict(), "layers": model.config.num_hidden_layers,
              "params": params, "nonzero_params": nonzero,
              "pattern": None if pattern is None else f"{pattern[0]}:{pattern[1]}", "kernel": kernel,
              "kernel_note": why, "profiler_ops": ops, "weights_bytes": weights_bytes(model)}
    return model, record


def add_bounds(cells: list[dict], records: dict[str, dict], configs: dict, bytes_per_value: int) -> None:
    """Put each measured speed-up beside its physical bound (and the fraction of the bound reached)."""
    from layerchop.evaluate.efficiency import bounds

    names = list(records)
    for cell in cells:
        for name in names:
            rec = records[name]
            nm = (2, 4) if rec["kernel"] != "dense" else None
            b = bounds(configs[names[0]], configs[name], cell["batch"], cell["prompt"], cell["new_tokens"],
                       bytes_per_value, nm)
            m = cell["models"][name]
            m["bound"] = b
            m["fraction_of_bound"] = {
                "decode": m["decode_speedup"]["median"] / b["decode"],
                "prefill": m["prefill_speedup"]["median"] / b["prefill"],
            }
            m["memory_bytes"] = rec["weights_bytes"] + (m["peak_extra_bytes"] if m["peak_extra_bytes"] is not None
                                                        else m["kv_bytes"])


def run_bench(models: dict, records: dict[str, dict], cfg, device) -> dict:
    """Time the prepared models (the first is the baseline) on the grid of ``cfg`` and return the metrics record:
    environment, settings, models, every cell with its bounds, the query shape of Table 3."""
    import torch

    from layerchop.evaluate.latency import Grid, measure

    vocab = {m.config.vocab_size for m in models.values()}
    if len(vocab) != 1:
        raise ValueError(f"--model: the models have different vocabularies {sorted(vocab)}")
    grid = Grid(cfg.batch_sizes, cfg.prompt_lengths, cfg.new_tokens, cfg.repeats, cfg.warmup, cfg.seed)
    cells = measure(models, grid, vocab.pop(), device, progress=lambda s: print(f"[bench] {s}", flush=True))
    configs = {name: m.config for name, m in models.items()}
    add_bounds(cells, records, configs, torch.tensor([], dtype=DTYPES[cfg.dtype]).element_size())
    return {"environment": environment(cfg, device), "bench": vars(cfg), "baseline": next(iter(models)),
            "model_order": list(models), "models": records, "cells": cells,
            "query": {"batch": cfg.query_batch, "prompt": cfg.query_prompt, "new_tokens": cfg.new_tokens}}


def main(args: argparse.Namespace) -> None:
    import torch

    cfg = section("bench", load_params(args.params))
    check_device("bench.device", cfg.device, available=True)
    paths = parse_models(args.model)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    models, records = {}, {}
    for name, path in paths.items():
        models[name], records[name] = prepare_model(name, path, cfg, device)
        print(f"[bench] {name}: {records[name]['layers']} layers, {records[name]['nonzero_params']:,} nonzero "
              f"parameters, kernel {records[name]['kernel']}" +
              (f" ({records[name]['kernel_note']})" if records[name]["kernel_note"] else ""), flush=True)
    metrics = run_bench(models, records, cfg, device)
    write_json(args.out, metrics)
    print(f"[bench] {len(metrics['cells'])} cells x {len(models)} models -> {args.out}")
