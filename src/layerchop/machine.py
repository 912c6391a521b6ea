"""The machine a stage runs on: what it is (recorded beside results), and whether its CPU computes bf16 fast.

Some CPUs (e.g. AMD Zen 3: AVX2, no AVX-512/BF16) run torch's bf16 matmuls on a slow path (a 256^3 matmul 58x
and a training step 34x slower than float32 on one), so a profile that trains in ``bf16-mixed`` or evaluates under bf16 autocast stalls there for hours.
:func:`slow_bf16` measures it in a few milliseconds before a stage starts, and the stage says so in one line that
names the key to change.
"""

from __future__ import annotations

import platform
import time
from functools import lru_cache
from typing import Optional

SLOW_BF16 = 4.0
"""A bf16 matmul this many times slower than float32 on the CPU is the slow path (fast CPUs: 0.3-2x)."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` knows elsewhere."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PACKAGES = ("torch", "lightning", "transformers", "datasets", "lm_eval", "torchmetrics", "huggingface_hub",
            "safetensors", "numpy")
"""The libraries whose versions a stage's metrics record (the ones that compute or read its numbers)."""


def gpu_name() -> Optional[str]:
    """The first visible CUDA device's name, or None (no CUDA, or torch not built with it)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_record() -> dict:
    """What a stage's metrics record of the machine that produced them: CPU model, GPU (or None), torch's
    threads, Python and each of :data:`PACKAGES`' installed version (None where it is not installed)."""
    import sys
    from importlib import metadata

    import torch

    def version(name: str) -> Optional[str]:
        try:
            return metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            return None

    return {"cpu": cpu_model(), "gpu": gpu_name(), "threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "versions": {name: version(name) for name in PACKAGES}}


@lru_cache(maxsize=None)
def bf16_slowdown(size: int = 256, reps: int = 3) -> float:
    """How many times longer a ``size``-cubed bf16 matmul takes than a float32 one on this CPU (best of ``reps``)."""
    import torch

    def best(dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b  # first call: kernel selection
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def slow_bf16(key: str, value: str, avoid: str) -> Optional[str]:
    """The warning for ``key: value`` (a bf16 setting on the CPU) where this CPU's bf16 matmuls are the slow path,
    naming the value that avoids it; None where bf16 is fast enough."""
    ratio = bf16_slowdown()
    if ratio < SLOW_BF16:
        return None
    return (f"warning: {key}={value!r}: a bf16 matmul is {ratio:.0f}x slower than float32 on this CPU "
            f"({cpu_model()}), so this stage may run for hours; {key}: {avoid} avoids it")


def warn_slow_evaluation(cfg, stage: str) -> None:
    """One line on stderr where an evaluation (``cfg``: the ``evaluate`` section) would run bf16 matmuls on a CPU
    whose bf16 is the slow path; nothing (and no measurement) otherwise."""
    import sys

    import torch

    if torch.device(cfg.device).type != "cpu":
        return
    line = (slow_bf16("evaluate.autocast", cfg.autocast, "null") if cfg.autocast == "bfloat16" else
            slow_bf16("evaluate.dtype", cfg.dtype, "float32") if cfg.dtype == "bfloat16" else None)
    if line:
        print(f"layerchop {stage}: {line}", file=sys.stderr, flush=True)
