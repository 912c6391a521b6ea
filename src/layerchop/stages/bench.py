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
from pathlib import Path

from layerchop.config import check_device, load_params, section
from layerchop.io import dtypes, check_model_dir, write_json


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


def prepare_model(name: str, path: Path, cfg, device) -> tuple[object, dict]:
    """Load one model directory and prepare it for timing (:func:`layerchop.evaluate.latency.prepare`)."""
    from transformers import AutoModelForCausalLM

    from layerchop.evaluate.latency import prepare

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtypes()[cfg.dtype])
    model, record = prepare(name, model, device, dtypes()[cfg.dtype], cfg.sparse_kernel)
    return model, {"path": str(path), **record}


def main(args: argparse.Namespace) -> None:
    import torch

    from layerchop.evaluate.latency import bench_run

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
    metrics = bench_run(models, records, cfg, device)
    write_json(args.out, metrics)
    print(f"[bench] {len(metrics['cells'])} cells x {len(models)} models -> {args.out}")
