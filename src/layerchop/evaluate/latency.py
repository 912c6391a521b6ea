"""Inference latency of several models, measured side by side (Table 3; issue 15).

Every query is one prefill of ``batch`` prompts of ``prompt`` tokens (timed: time to first token) followed by
``new_tokens`` greedy decode steps through the KV cache (timed together, reported per step). The models of one run
are loaded together and interleaved: for every cell of the grid each model gets its warm-up queries, then the
timed repeats rotate the order of the models, so that a slow spell of a shared machine falls on all of them. The
speed-ups are ratios to the first model (the dense one) taken per repeat, within one rotation, and summarised by
their median and spread.

A model whose projections are 2:4 sparse can run through PyTorch's semi-structured sparse tensors on CUDA
(:func:`to_semi_structured`); :func:`kernel_ops` reads the profiler's op names to check that the sparse kernel ran.
There is no 2:4 kernel on the CPU: such a model runs dense kernels there, and the record says so.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

SPARSE_OP_MARKERS = ("_cslt_sparse_mm", "_sparse_semi_structured")  # cuSPARSELt; CUTLASS (linear, mm, addmm)


def projection_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The attention and MLP projections of every decoder layer (every linear inside a layer: Phi-3's fused
    ``qkv_proj`` / ``gate_up_proj`` too), by name."""
    from layerchop.prune.chop import decoder_layers

    inside = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and id(mod) in inside]


def nm_pattern(model: torch.nn.Module, patterns: tuple[tuple[int, int], ...] = ((2, 4), (4, 8))
               ) -> Optional[tuple[int, int]]:
    """The first ``(n, m)`` of ``patterns`` that every projection weight obeys (at most ``n`` nonzeros in each group of
    ``m`` consecutive inputs of a row), or None (a dense model, or no projections)."""
    linears = projection_linears(model)
    if not linears:
        return None
    for n, m in patterns:
        ok = True
        for _, mod in linears:
            w = mod.weight.detach()
            if w.shape[1] % m or ((w.reshape(w.shape[0], -1, m) != 0).sum(-1) > n).any():
                ok = False
                break
        if ok:
            return n, m
    return None


def to_semi_structured(model: torch.nn.Module) -> str:
    """Replace every 2:4 projection weight by a semi-structured sparse tensor (CUDA, fp16/bf16), so that its
    matmuls run the 2:4 kernels. Returns the sparse tensor class's name (which backend: cuSPARSELt or CUTLASS).

    Raises:
        ValueError: when the model is not on CUDA or a projection is not 2:4.
    """
    from torch.sparse import to_sparse_semi_structured

    backend = ""
    for name, mod in projection_linears(model):
        if mod.weight.device.type != "cuda":
            raise ValueError(f"{name}: 2:4 semi-structured kernels need CUDA, the weight is on {mod.weight.device}")
        sparse = to_sparse_semi_structured(mod.weight.detach())
        mod.weight = torch.nn.Parameter(sparse, requires_grad=False)
        backend = type(sparse).__name__
    return backend


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: for a semi-structured sparse tensor, its packed values and metadata (both layouts
    where the backend keeps a transposed copy)."""
    parts = [getattr(t, a, None) for a in ("packed", "meta", "packed_t", "meta_t")]
    if any(p is not None for p in parts) and not type(t) is torch.Tensor:
        return sum(p.numel() * p.element_size() for p in parts if p is not None)
    return t.numel() * t.element_size()


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (tied ones once)."""
    return sum(tensor_bytes(p) for p in model.parameters()) + sum(tensor_bytes(b) for b in model.buffers())


def cache_bytes(cache: Any) -> int:
    """Bytes of a transformers KV cache (keys and values of every layer)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def kernel_ops(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, int]:
    """Op counts of one forward (a prefill of ``ids``) under the profiler: ``sparse`` (semi-structured 2:4 matmuls)
    and ``dense_mm`` (aten mm / addmm / bmm / linear's matmuls)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.device.type == "cuda" else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        _sync(ids.device)
    sparse = dense = 0
    for e in prof.key_averages():
        if any(m in e.key for m in SPARSE_OP_MARKERS):
            sparse += e.count
        elif e.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            dense += e.count
    return {"sparse": sparse, "dense_mm": dense}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Query:
    """One measured query of one model."""

    prefill_s: float
    decode_step_s: float
    kv_bytes: int
    peak_extra_bytes: Optional[int] = None  # CUDA: the allocator's peak above what was allocated before the query


def run_query(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> Query:
    """Prefill ``ids`` (timed to the first token), then ``new_tokens`` greedy decode steps (timed together)."""
    device = ids.device
    cuda = device.type == "cuda"
    if cuda:
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        cache = out.past_key_values
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    return Query(prefill_s=t1 - t0, decode_step_s=(t2 - t1) / max(new_tokens, 1), kv_bytes=cache_bytes(cache),
                 peak_extra_bytes=peak)


def summary(values: list[float]) -> dict[str, float]:
    """Median, quartiles, min, max and count of a sample."""
    values = sorted(values)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": values[0], "max": values[-1],
            "n": len(values)}


def rotation(names: list[str], r: int) -> list[str]:
    """The order of the models in repeat ``r``: rotated by ``r``, so each leads in turn."""
    k = r % len(names)
    return names[k:] + names[:k]


@dataclass
class Grid:
    batch_sizes: list[int]
    prompt_lengths: list[int]
    new_tokens: int
    repeats: int
    warmup: int
    seed: int = 0
    cells: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.cells = [(b, p) for b in self.batch_sizes for p in self.prompt_lengths]


def measure(models: dict[str, torch.nn.Module], grid: Grid, vocab_size: int, device: torch.device,
            progress: Optional[Callable[[str], None]] = None,
            run: Callable[[torch.nn.Module, torch.Tensor, int], Query] = run_query) -> list[dict[str, Any]]:
    """Time every model on every cell of ``grid``, interleaved (module docstring). The first model is the baseline.

    Returns one record per cell: ``{"batch", "prompt", "new_tokens", "order", "models": {name: {"prefill_s",
    "decode_step_s" (summaries), "prefill_samples", "decode_samples", "kv_bytes", "peak_extra_bytes",
    "prefill_speedup", "decode_speedup", "query_speedup" (summaries of per-repeat ratios to the baseline)}}}``.
    """
    names = list(models)
    gen = torch.Generator().manual_seed(grid.seed)
    records = []
    for batch, prompt in grid.cells:
        ids = torch.randint(0, vocab_size, (batch, prompt), generator=gen).to(device)
        for _ in range(grid.warmup):
            for name in names:
                run(models[name], ids, grid.new_tokens)
        samples: dict[str, list[Query]] = {n: [] for n in names}
        order = []
        for r in range(grid.repeats):
            order.append(rotation(names, r))
            for name in order[-1]:
                samples[name].append(run(models[name], ids, grid.new_tokens))
        base = samples[names[0]]
        cell: dict[str, Any] = {"batch": batch, "prompt": prompt, "new_tokens": grid.new_tokens, "order": order,
                                "models": {}}
        for name in names:
            qs = samples[name]
            pre = [q.prefill_s for q in qs]
            dec = [q.decode_step_s for q in qs]
            full = [q.prefill_s + grid.new_tokens * q.decode_step_s for q in qs]
            full_base = [q.prefill_s + grid.new_tokens * q.decode_step_s for q in base]
            peaks = [q.peak_extra_bytes for q in qs if q.peak_extra_bytes is not None]
            cell["models"][name] = {
                "prefill_s": summary(pre), "decode_step_s": summary(dec), "query_s": summary(full),
                "prefill_samples": pre, "decode_samples": dec,
                "kv_bytes": qs[-1].kv_bytes, "peak_extra_bytes": max(peaks) if peaks else None,
                "prefill_speedup": summary([b.prefill_s / q.prefill_s for b, q in zip(base, qs)]),
                "decode_speedup": summary([b.decode_step_s / q.decode_step_s for b, q in zip(base, qs)]),
                "query_speedup": summary([fb / f for fb, f in zip(full_base, full)]),
            }
        records.append(cell)
        if progress is not None:
            med = {n: round(cell["models"][n]["query_s"]["median"] * 1e3, 1) for n in names}
            progress(f"batch {batch}, prompt {prompt}: query ms {med}")
    return records


def prepare(name: str, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
            sparse_kernel: str = "auto") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Put a model on ``device`` in ``dtype`` for timing. A 2:4 model runs the semi-structured sparse kernels where
    ``sparse_kernel`` (``auto`` / ``off`` / ``require``) asks and the device has them; the profiler then checks
    which kernels one forward runs. Returns the model and its record (config, sizes, pattern, kernel, why).

    Raises:
        ValueError: ``require`` where the 2:4 kernel cannot run; kernels other than the ones asked for.
    """
    model = model.to(device=device, dtype=dtype).eval()
    pattern = nm_pattern(model)
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    kernel, why = "dense", None
    if pattern == (2, 4):
        if sparse_kernel == "off":
            why = "bench.sparse_kernel is off: runs dense kernels"
        elif device.type != "cuda":
            why = f"no 2:4 sparse kernel on {device.type}: runs dense kernels"
        elif dtype == torch.float32:
            why = "the 2:4 kernels take bfloat16 or float16, bench.dtype is float32: runs dense kernels"
        else:
            kernel = "2:4 " + to_semi_structured(model)
        if why and sparse_kernel == "require":
            raise ValueError(f"bench.sparse_kernel='require': --model {name}: {why}")
    elif pattern is not None:
        why = f"{pattern[0]}:{pattern[1]} has no sparse kernel: runs dense kernels"
    ops = kernel_ops(model, torch.zeros(1, 16, dtype=torch.long, device=device))
    converted = len(projection_linears(model)) if kernel != "dense" else 0
    if ops["sparse"] < converted:  # every converted projection must show up in one forward
        raise ValueError(f"--model {name}: {converted} projections converted to {kernel}, but the profiler saw "
                         f"{ops['sparse']} sparse matmuls in a forward")
    if kernel == "dense" and ops["sparse"]:
        raise ValueError(f"--model {name}: dense kernels asked for, but the profiler saw {ops['sparse']} sparse ops")
    record = {"config": model.config.to_diff_dict(), "layers": model.config.num_hidden_layers,
              "params": params, "nonzero_params": nonzero,
              "pattern": None if pattern is None else f"{pattern[0]}:{pattern[1]}", "kernel": kernel,
              "kernel_note": why, "profiler_ops": ops, "weights_bytes": weights_bytes(model)}
    return model, record


def add_bounds(cells: list[dict[str, Any]], records: dict[str, dict[str, Any]], configs: dict[str, Any],
               bytes_per_value: int) -> None:
    """Put each measured speed-up beside its limits (:func:`layerchop.evaluate.efficiency.bounds`: the bytes bound
    of decode, the FLOP bound of prefill; and the ratio of layers, the limit when a fixed cost per layer dominates),
    the fraction of each bound reached, the throughput and the memory held. The first record is the baseline."""
    from layerchop.evaluate.efficiency import bounds

    names = list(records)
    base = names[0]
    for cell in cells:
        for name in names:
            rec = records[name]
            nm = (2, 4) if rec["kernel"] != "dense" else None
            b = bounds(configs[base], configs[name], cell["batch"], cell["prompt"], cell["new_tokens"],
                       bytes_per_value, nm)
            b["layers"] = configs[base].num_hidden_layers / configs[name].num_hidden_layers
            m = cell["models"][name]
            m["bound"] = b
            m["fraction_of_bound"] = {"decode": m["decode_speedup"]["median"] / b["decode"],
                                      "prefill": m["prefill_speedup"]["median"] / b["prefill"]}
            m["throughput_tok_s"] = {"prefill": cell["batch"] * cell["prompt"] / m["prefill_s"]["median"],
                                     "decode": cell["batch"] / m["decode_step_s"]["median"]}
            m["memory_bytes"] = rec["weights_bytes"] + (m["peak_extra_bytes"] if m["peak_extra_bytes"] is not None
                                                        else m["kv_bytes"])


def device_name(device) -> str:
    from layerchop.machine import cpu_model

    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def environment(cfg, device) -> dict:
    import transformers

    from layerchop.machine import machine_record

    env = {"device": str(device), "device_name": device_name(device), "dtype": cfg.dtype,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": sys.version.split()[0], "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "host": platform.node(), "machine": machine_record()}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cusparselt"] = bool(torch.backends.cusparselt.is_available())
    return env


def bench_run(models: dict, records: dict[str, dict], cfg, device) -> dict:
    """Time the prepared models (the first is the baseline) on the grid of ``cfg`` and return the metrics record:
    environment, settings, models, every cell with its bounds, the query shape of Table 3."""
    from layerchop.io import dtypes

    vocab = {m.config.vocab_size for m in models.values()}
    if len(vocab) != 1:
        raise ValueError(f"--model: the models have different vocabularies {sorted(vocab)}")
    grid = Grid(cfg.batch_sizes, cfg.prompt_lengths, cfg.new_tokens, cfg.repeats, cfg.warmup, cfg.seed)
    cells = measure(models, grid, vocab.pop(), device, progress=lambda s: print(f"[bench] {s}", flush=True))
    configs = {name: m.config for name, m in models.items()}
    add_bounds(cells, records, configs, torch.tensor([], dtype=dtypes()[cfg.dtype]).element_size())
    return {"environment": environment(cfg, device), "bench": vars(cfg), "baseline": next(iter(models)),
            "model_order": list(models), "models": records, "cells": cells,
            "query": {"batch": cfg.query_batch, "prompt": cfg.query_prompt, "new_tokens": cfg.new_tokens}}
