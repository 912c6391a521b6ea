"""``experiments/gpu-check/check.py``: its CPU form runs here (the same stages, a tiny width), its CUDA form where a
GPU is present (skipped, with the reason, elsewhere; CI has none)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gpu-check" / "check.py"


def run(tmp_path: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "work"), *args], capture_output=True,
                          text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_gpu_check_plumbing_on_cpu(tmp_path):
    out = run(tmp_path, "--device", "cpu", "--width", "64", "--seq-len", "64", "--batch-size", "2", "--steps", "2")
    assert "[gpu-check] train: 1 x cpu, FSDP2 bf16" in out and "2 steps" in out
    assert "every group of 4 has <= 2 non-zeros" in out and "[gpu-check] evaluate: bf16 on cpu" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU check runs on a GPU machine")
def test_gpu_check_on_cuda(tmp_path):
    out = run(tmp_path)
    print(out)
    assert "MFU" in out and "[gpu-check] done" in out
    assert "[gpu-check] memory, activation checkpointing: peak allocated" in out  # recorded by the train stage


def test_table3_gpu_script_plumbing_on_cpu(tmp_path):
    """experiments/gpu-check/table3.py on a CPU: dense, chopped and 2:4 copies of a tiny Llama through the bench's
    functions, the 2:4 copy on dense kernels (there is no CPU 2:4 kernel), Table 3 rendered."""
    script = Path(__file__).resolve().parents[1] / "experiments" / "gpu-check" / "table3.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--device", "cpu", "--scales", "tiny",
                           "--quick"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "tiny.json").read_text())
    assert metrics["model_order"] == ["dense", "layerchop", "two4"]
    assert metrics["models"]["layerchop"]["layers"] == 2 and metrics["models"]["two4"]["pattern"] == "2:4"
    assert metrics["models"]["two4"]["kernel"] == "dense" and metrics["models"]["two4"]["profiler_ops"]["sparse"] == 0
    assert "| LayerChop (half the layers) | 2 |" in (tmp_path / "tables.md").read_text()
