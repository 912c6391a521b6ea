"""The machine a stage runs on: the CPU's name, and the warning where bf16 matmuls are the slow path."""

from __future__ import annotations

import dataclasses
import math

import pytest

from layerchop import machine
from layerchop.config import section


def test_bf16_slowdown_is_a_measured_ratio():
    ratio = machine.bf16_slowdown(size=64, reps=2)
    assert math.isfinite(ratio) and ratio > 0
    assert machine.cpu_model()


@pytest.mark.parametrize("ratio,warned", [(1.0, False), (3.9, False), (4.0, True), (58.0, True)])
def test_slow_bf16_names_the_key_the_ratio_and_the_value_that_avoids_it(monkeypatch, ratio, warned):
    monkeypatch.setattr(machine, "bf16_slowdown", lambda: ratio)
    monkeypatch.setattr(machine, "cpu_model", lambda: "AMD EPYC")
    line = machine.slow_bf16("train.precision", "bf16-mixed", "32-true")
    if not warned:
        assert line is None
    else:
        assert line == (f"warning: train.precision='bf16-mixed': a bf16 matmul is {ratio:.0f}x slower than float32 "
                        "on this CPU (AMD EPYC), so this stage may run for hours; train.precision: 32-true avoids it")


def test_train_and_evaluate_warn_only_for_bf16_on_the_cpu(monkeypatch, capsys):
    from layerchop.machine import warn_slow_evaluation
    from layerchop.stages.train import slow_precision

    monkeypatch.setattr(machine, "bf16_slowdown", lambda: 30.0)
    train = section("train", {})
    assert slow_precision(dataclasses.replace(train, precision="32-true")) is None
    assert slow_precision(dataclasses.replace(train, precision="bf16-mixed", accelerator="gpu")) is None
    train = dataclasses.replace(train, accelerator="cpu")
    assert slow_precision(dataclasses.replace(train, precision="bf16-true")).startswith(
        "layerchop train: warning: train.precision='bf16-true': a bf16 matmul is 30x slower")
    evaluate = section("evaluate", {})
    for cfg in (dataclasses.replace(evaluate, autocast=None), dataclasses.replace(evaluate, device="cuda")):
        warn_slow_evaluation(cfg, "evaluate")
        assert capsys.readouterr().err == ""
    warn_slow_evaluation(dataclasses.replace(evaluate, autocast="bfloat16"), "curve")
    assert capsys.readouterr().err.startswith("layerchop curve: warning: evaluate.autocast='bfloat16'")
    warn_slow_evaluation(dataclasses.replace(evaluate, autocast=None, dtype="bfloat16"), "evaluate")
    assert "evaluate.dtype: float32 avoids it" in capsys.readouterr().err
    monkeypatch.setattr(machine, "bf16_slowdown", lambda: 1.5)  # a CPU with fast bf16: nothing
    assert slow_precision(dataclasses.replace(train, precision="bf16-mixed")) is None
    warn_slow_evaluation(dataclasses.replace(evaluate, autocast="bfloat16"), "evaluate")
    assert capsys.readouterr().err == ""


def test_the_embedded_profile_computes_in_float32():
    """The embedded default runs on any 2-core CPU: no bf16 (the slow path of an AVX2-only CPU)."""
    from layerchop.config import load_params

    params = load_params(str(machine_root() / "params.yaml"))
    assert section("train", params).precision == "32-true"
    assert section("evaluate", params).autocast is None and section("evaluate", params).dtype == "float32"


def machine_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]
