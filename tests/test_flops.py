"""FLOP accounting: measured (meta device) vs analytic, vs a real step, and the budget in FLOPs.

Tolerance: the measured count must equal the analytic formula to 1e-9 relative (both count the same
matmuls); we state a tolerance instead of equality only to survive float formatting of large counts.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig

from conftest import make_tiny_llama
from families import FAMILIES, MIXED, family_config
from layerchop.config import DistillConfig, TrainConfig
from layerchop.train.flops import llama_forward_flops, llama_train_flops, lm_step_flops, measure, to_gpu_hours

REL = 1e-9

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


@pytest.mark.parametrize("arch", ["tiny", "smollm2-135m", "smollm2-135m-chopped"])
def test_measured_lm_flops_equal_the_analytic_count(arch):
    if arch == "tiny":
        config = make_tiny_llama().config
    else:
        config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": 15 if "chopped" in arch else 30})
    for batch, seq in ((1, 16), (8, 256)):
        measured = lm_step_flops(config, batch, seq)
        assert measured == pytest.approx(llama_train_flops(config, batch, seq), rel=REL)
    if arch == "smollm2-135m":
        # the familiar ~6N per token (N without embeddings + head) plus attention: 0.52 GFLOP/token at T=256
        per_token = lm_step_flops(config, 1, 256) / 256
        assert 6 * 134.5e6 < per_token < 6 * 134.5e6 * 1.1


def test_distill_flops_are_student_training_plus_teacher_forward_plus_projections():
    from layerchop.train.distill import distill_step_flops

    teacher = make_tiny_llama().config
    student = copy.deepcopy(teacher)
    student.num_hidden_layers = 4
    mapping = [0, 1, 4, 5]
    B, T = 4, 32
    cfg = DistillConfig()
    measured = distill_step_flops(student, teacher, mapping, cfg, B, T)
    d, V = 32, 300
    projections = 3 * (4 * 2 * B * T * d * d) + 3 * (2 * V * d * d)  # forward + both backward products
    analytic = llama_train_flops(student, B, T) + llama_forward_flops(teacher, B, T) + projections
    assert measured == pytest.approx(analytic, rel=REL)
    # without the projection terms it is exactly student training + teacher forward
    plain = distill_step_flops(student, teacher, mapping, DistillConfig(w_hid=0, w_emb=0), B, T)
    assert plain == pytest.approx(llama_train_flops(student, B, T) + llama_forward_flops(teacher, B, T), rel=REL)


def test_meta_count_equals_the_count_of_a_real_step():
    """The meta-device measurement counts what a real CPU training step executes.

    The real step runs eager attention: torch's FLOP counter has no formula for the CPU flash-SDPA
    kernel (it would count 0 for attention), one reason the accounting measures on the meta device."""
    from layerchop.train.distill import (DistillStudent, distill_step, distill_step_flops, freeze,
                                         teacher_capture)

    def eager(model):
        model.set_attn_implementation("eager")
        return model

    teacher = freeze(eager(make_tiny_llama()))
    student_model = eager(make_tiny_llama(seed=1))
    cfg = DistillConfig(chunk_tokens=20)
    student = DistillStudent(student_model, 32, list(range(6)), cfg)
    x = torch.randint(0, 300, (2, 16))
    cap = teacher_capture(teacher, list(range(6)), cfg)
    real = measure(lambda: distill_step(student, teacher, cap, x, x)[0])
    assert real == distill_step_flops(student_model.config, teacher.config, list(range(6)), cfg, 2, 16)
    lm = eager(make_tiny_llama())
    assert measure(lambda: lm(input_ids=x, labels=x, use_cache=False).loss) == lm_step_flops(lm.config, 2, 16)


def test_flop_budget_config_and_gpu_hours():
    with pytest.raises(ValueError, match="exactly one of train.token_budget and train.flop_budget"):
        TrainConfig(token_budget=1000, flop_budget=1e12)
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(token_budget=None, flop_budget=None)
    with pytest.raises(ValueError, match="train.flop_budget"):
        TrainConfig(token_budget=None, flop_budget=-1.0)
    # YAML 1.1 reads 8e13 as text; the params loader (one rule for all keys) reads it as the number
    from layerchop.config import section

    assert section("train", {"train": {"token_budget": None, "flop_budget": "8e13"}}).flop_budget == 8e13
    # 312 TFLOP/s at 40 % MFU: 1e18 FLOPs take 1e18 / 124.8e12 s
    assert to_gpu_hours(1e18, 312e12, 0.4) == pytest.approx(1e18 / 124.8e12 / 3600)
    assert llama_forward_flops(make_tiny_llama().config, 1, 1, head=False) == 2 * 6 * 9216 + 6 * 4 * 32


def test_a_started_process_reuses_its_launchers_counts(monkeypatch):
    """The launcher's FLOP counts reach the workers it starts (``LAYERCHOP_MEASURED_FLOPS``): a worker resolving the
    same plan counts nothing again; another architecture or shape is counted."""
    from layerchop.train import flops

    monkeypatch.setattr(flops, "_MEASURED", {})
    monkeypatch.delenv(flops.MEASURED_ENV, raising=False)
    calls = []

    def count() -> int:
        calls.append(1)
        return 1234

    assert flops.measured("lm", ("config", 2, 8), count) == 1234
    assert flops.measured("lm", ("config", 2, 8), count) == 1234 and len(calls) == 1  # once per process
    env = flops.measured_env()
    monkeypatch.setattr(flops, "_MEASURED", {})  # a new process, started with the launcher's environment
    monkeypatch.setenv(flops.MEASURED_ENV, env[flops.MEASURED_ENV])
    assert flops.measured("lm", ("config", 2, 8), lambda: pytest.fail("counted again")) == 1234
    assert flops.measured("lm", ("config", 2, 16), count) == 1234 and len(calls) == 2
    assert flops.measured("distill", ("config", 2, 8), count) == 1234 and len(calls) == 3


def test_the_counts_a_worker_inherits_are_the_counts_it_would_make(tmp_path):
    """A real architecture: the count a new process inherits through the environment, without counting, is the count
    made here."""
    import json
    import subprocess
    import sys

    from transformers import AutoConfig, LlamaConfig

    from layerchop.train import flops

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    config.save_pretrained(tmp_path)  # launcher and workers read the same directory
    here = flops.lm_step_flops(AutoConfig.from_pretrained(tmp_path), 2, 16)
    probe = ("import sys\nfrom transformers import AutoConfig\nfrom layerchop.train import flops\n"
             "flops.measure = lambda *a, **k: sys.exit('counted again')\n"
             f"print(flops.lm_step_flops(AutoConfig.from_pretrained({str(tmp_path)!r}), 2, 16))")
    env = {**__import__("os").environ, **flops.measured_env()}
    inherited = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert inherited.returncode == 0, inherited.stderr[-2000:]
    assert int(inherited.stdout.split()[-1]) == here
    assert json.loads(env[flops.MEASURED_ENV])


@pytest.mark.parametrize("family", FAMILIES)
def test_counting_by_layer_kind_equals_counting_the_whole_model(family):
    """``lm_step_flops`` counts a model of one layer and one of two per layer kind and adds up; on every family
    (sliding-window and full attention mixed, RoPE-less layers) that sum is the whole model's count."""
    from layerchop.train import flops

    config = family_config(family)
    config.num_hidden_layers = 7  # odd, so that Gemma's alternation and SmolLM3's every-third pattern are cut
    for key in ("layer_types", "no_rope_layers"):
        if isinstance(getattr(config, key, None), list):
            setattr(config, key, (getattr(config, key) * 2)[:7])
    assert len(set(flops.layer_kinds(config))) == (2 if family in MIXED + ("smollm3",) else 1), family
    model = flops.meta_model(config)
    x_BT = torch.zeros(2, 24, dtype=torch.long, device="meta")  # longer than the sliding window (4)
    whole = measure(lambda: model(input_ids=x_BT, labels=x_BT, use_cache=False).loss)
    assert flops.by_layer_kind(config, lambda alive: measure_depth(config, alive)) == whole


def measure_depth(config, alive):
    from layerchop.train.flops import meta_model
    from layerchop.train.plan import depth_config

    model = meta_model(depth_config(config, alive))
    x_BT = torch.zeros(2, 24, dtype=torch.long, device="meta")
    return measure(lambda: model(input_ids=x_BT, labels=x_BT, use_cache=False).loss)
