"""Training compute: FLOPs per optimizer step, measured and analytic.

Convention: matrix-multiply FLOPs only (2 per multiply-add), counted by ``torch.utils.flop_counter``
(as Lightning's ``measure_flops`` does, without importing Lightning: the launcher and ``layerchop plan`` need
none of it) on a meta-device copy of the model (no memory, no time), for
one micro-batch of the real shape. Backward counts twice the forward (gradients of activations and of
weights). Attention scores count the full ``T x T`` product (as SDPA's math path does; a causal flash
kernel skips about half of it). Elementwise work (norms, softmax, losses) is not counted.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch


def measure(fn: Callable[[], torch.Tensor], backward: bool = True) -> int:
    """FLOPs of ``fn()`` (and of ``fn().backward()`` when ``backward``), counted by torch's ``FlopCounterMode``.

    transformers inspects ``position_ids`` for packed sequences with a data-dependent ``.item()``, which a
    meta tensor cannot answer; our inputs never pack several documents with position resets (positions
    are ``0..T-1``), so the answer on real data is "not packed", which is what the patch returns.
    """
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with mock.patch("transformers.masking_utils.find_packed_sequence_indices", lambda position_ids: None), counter:
        y = fn()
        if backward:
            y.backward()
    return int(counter.get_total_flops())


def meta_model(config) -> torch.nn.Module:
    """The architecture of ``config`` on the meta device (weights never materialised)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model


MEASURED_ENV = "LAYERCHOP_MEASURED_FLOPS"
"""The measurements of the process that started this one (a launcher's, for its torchrun workers and SLURM tasks):
JSON ``{key: flops}``, keys as :func:`measured` makes them."""

_MEASURED: dict[str, int] = {}


def measured(what: str, parts: tuple, count: Callable[[], int]) -> int:
    """``count()``, once per process and per ``(what, parts)``, and never again in the processes this one starts.

    A training run's plan is resolved by its launcher and again by each worker (each must hold the same plan);
    counting a 32-layer model's FLOPs op by op takes seconds, so the launcher's counts reach its workers through
    :data:`MEASURED_ENV` (:func:`measured_env`). The key hashes ``parts`` (the architecture's whole config and the
    shapes) with the torch and transformers versions, so an inherited count is used only for the same count; a
    worker without it (another host's environment) counts again and gets the same number."""
    import hashlib
    import json

    key = hashlib.sha256(json.dumps([what, *parts, torch.__version__, _transformers_version()], sort_keys=True,
                                    default=str).encode()).hexdigest()[:32]
    if key not in _MEASURED:
        inherited = json.loads(os.environ.get(MEASURED_ENV) or "{}")
        _MEASURED[key] = int(inherited[key]) if key in inherited else int(count())
    return _MEASURED[key]


@functools.lru_cache(maxsize=None)
def _transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def measured_env() -> dict[str, str]:
    """The counts this process made, as the environment of the processes it starts (:func:`measured`)."""
    import json

    return {MEASURED_ENV: json.dumps(_MEASURED, sort_keys=True)} if _MEASURED else {}


def layer_kinds(config) -> list[tuple]:
    """Each decoder layer's kind: its entries in the config's per-layer lists (``PER_LAYER_KEYS``: attention kind,
    RoPE or not). Layers of one kind are the same function of their input, at the same cost."""
    from layerchop.prune.chop import PER_LAYER_KEYS

    num = config.num_hidden_layers
    lists = [getattr(config, key, None) for key in PER_LAYER_KEYS]
    lists = [v for v in lists if isinstance(v, (list, tuple)) and len(v) == num]
    return [tuple(v[i] for v in lists) for i in range(num)]


def by_layer_kind(config, count: Callable[[list[int]], int]) -> int:
    """``count(all layers)`` from models of one and two layers: ``count([0])`` plus, for every other layer, what
    one more layer of its kind adds (``count([0, i]) - count([0])`` for the first layer ``i`` of each kind).

    Exact, not an estimate: a decoder layer's matmuls depend on its kind and the shapes, not on its neighbours
    or the depth (tests/test_flops.py checks the sum against counting the whole model, for every family). A
    32-layer model counted op by op takes seconds on the meta device; two tiny ones, a fraction of that."""
    kinds = layer_kinds(config)
    if len(kinds) <= 2:
        return count(list(range(len(kinds))))
    one = count([0])
    added: dict[tuple, int] = {}
    for i, kind in enumerate(kinds[1:], start=1):
        if kind not in added:
            added[kind] = count([0, i]) - one
    return one + sum(added[kind] for kind in kinds[1:])


def lm_step_flops(config, batch_size: int, seq_len: int) -> int:
    """Measured FLOPs of one causal-LM training micro-batch (forward + backward), counted by layer kind
    (:func:`by_layer_kind`); once per architecture and shape in a process and the processes it starts
    (``layerchop plan`` asks for the same few architectures for every training stage; torchrun's workers for
    their launcher's: :func:`measured`)."""
    from layerchop.train.plan import depth_config

    def count_layers(alive: list[int]) -> int:  # the small models recur at every depth of a gradual schedule
        small = depth_config(config, alive)

        def count() -> int:
            model = meta_model(small)
            x_BT = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
            return measure(lambda: model(input_ids=x_BT, labels=x_BT, use_cache=False).loss)

        return measured("lm-model", (small.to_json_string(use_diff=False), batch_size, seq_len), count)

    return measured("lm", (config.to_json_string(use_diff=False), batch_size, seq_len),
                    lambda: by_layer_kind(config, count_layers))


def llama_forward_flops(config, batch_size: int, seq_len: int, head: bool = True) -> int:
    """Analytic forward FLOPs of a Llama-style decoder (gated MLP, grouped-query attention).

    Per token and layer: ``2 x`` the projection weights (q, k, v, o, gate, up, down); per sequence and
    layer: ``4 T^2 H`` for the scores and the weighted sum; plus the output head ``2 V D`` per token.
    """
    d, f, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer_weights = d * q + 2 * d * kv + q * d + 3 * d * f
    tokens = batch_size * seq_len
    flops = 2 * tokens * L * per_layer_weights + batch_size * L * 4 * seq_len * seq_len * q
    return flops + (2 * tokens * V * d if head else 0)


def llama_train_flops(config, batch_size: int, seq_len: int) -> int:
    """Analytic forward + backward FLOPs (backward = 2 x forward)."""
    return 3 * llama_forward_flops(config, batch_size, seq_len)


def to_gpu_hours(flops: float, peak_flops: float, mfu: float) -> float:
    """Hours on one accelerator of ``peak_flops`` FLOP/s running at model-FLOPs utilisation ``mfu``."""
    return flops / (peak_flops * mfu) / 3600.0
