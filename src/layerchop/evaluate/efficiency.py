"""Inference-cost accounting for Table 3 (issue 15, first part): the physical limits beside the measurements.

Pure functions of a model's config. Decode is memory-bound: each step reads every weight once and the whole KV
cache, so the bound on a compressed model's decode speed-up is the ratio of bytes read per step. Prefill is
compute-bound: the bound is the ratio of matmul FLOPs. The break-even is the extra training cost divided by the
saving per query.

Conventions: a decoder with ``LlamaConfig``'s fields (every supported family has them; the projections are counted
exactly per family by :func:`layerchop.estimate.projection_entries`, sliding windows are not modelled); weights read once per forward pass; the input embedding
reads one row per token (not counted), the output head reads its whole matrix (tied or not); RMSNorm weights
counted; FLOPs are 2 per multiply-add, with full ``T x T`` attention in prefill (as the training FLOP count).
"""

from __future__ import annotations

from typing import Optional

from layerchop.estimate import projection_entries


def _dims(config) -> tuple[int, int, int, int, int, int]:
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    return h, i, heads, kv, head_dim, config.num_hidden_layers


def projection_params(config) -> int:
    """Entries of the attention and MLP projections of all layers (the plan's count)."""
    return projection_entries(config)


def weight_bytes(config, bytes_per_value: float, sparse_nm: Optional[tuple[int, int]] = None,
                 metadata_bits: float = 2.0) -> float:
    """Bytes of weights one forward pass reads: the projections, the norms, the output head.

    ``sparse_nm=(n, m)``: the projections stored compressed, N of every M values kept, plus ``metadata_bits`` of
    position index per kept value (2 bits for 2:4 in PyTorch's semi-structured format).
    """
    h, *_ = _dims(config)
    proj = projection_params(config) * bytes_per_value
    if sparse_nm is not None:
        n, m = sparse_nm
        if not 0 < n < m:
            raise ValueError(f"sparse_nm={sparse_nm}: need 0 < N < M")
        proj = proj * n / m + projection_params(config) * n / m * metadata_bits / 8
    norms = (2 * config.num_hidden_layers + 1) * h
    head = config.vocab_size * h
    return proj + (norms + head) * bytes_per_value


def kv_cache_bytes(config, batch: int, context: int, bytes_per_value: float) -> float:
    """The KV cache of ``batch`` sequences of ``context`` tokens: keys and values of every layer."""
    _, _, _, kv, hd, layers = _dims(config)
    return 2 * layers * batch * context * kv * hd * bytes_per_value


def decode_bytes(config, batch: int, context: int, bytes_per_value: float,
                 sparse_nm: Optional[tuple[int, int]] = None) -> float:
    """Bytes one decode step reads (one new token for each of ``batch`` sequences at ``context`` cached tokens)."""
    return weight_bytes(config, bytes_per_value, sparse_nm) + kv_cache_bytes(config, batch, context, bytes_per_value)


def _projection_flops(config, tokens: int, sparse_nm: Optional[tuple[int, int]]) -> float:
    dense = 2 * projection_params(config) * tokens
    if sparse_nm is None:
        return dense
    n, m = sparse_nm
    return dense * n / m


def prefill_flops(config, batch: int, prompt: int, all_logits: bool = False,
                  sparse_nm: Optional[tuple[int, int]] = None) -> float:
    """Matmul FLOPs of a prefill of ``batch`` prompts of ``prompt`` tokens: the projections for every token, full
    ``T x T`` attention scores and values, and the output head for the last position (``all_logits``: every one).
    ``sparse_nm``: the projections run an N:M sparse kernel (N of every M multiply-adds done)."""
    h, _, heads, _, hd, layers = _dims(config)
    tokens = batch * prompt
    attention = 2 * 2 * layers * batch * prompt * prompt * heads * hd
    head = 2 * h * config.vocab_size * (tokens if all_logits else batch)
    return _projection_flops(config, tokens, sparse_nm) + attention + head


def decode_flops(config, batch: int, context: int, sparse_nm: Optional[tuple[int, int]] = None) -> float:
    """Matmul FLOPs of one decode step: one new token for each of ``batch`` sequences attending to ``context``
    tokens (the cached ones and itself), the output head for each."""
    h, _, heads, _, hd, layers = _dims(config)
    attention = 2 * 2 * layers * batch * context * heads * hd
    return _projection_flops(config, batch, sparse_nm) + attention + 2 * h * config.vocab_size * batch


def query_flops(config, batch: int, prompt: int, new_tokens: int,
                sparse_nm: Optional[tuple[int, int]] = None) -> float:
    """A query as the benchmark runs it: the prefill, then ``new_tokens`` decode steps (the i-th attends to
    ``prompt + i + 1`` tokens)."""
    return prefill_flops(config, batch, prompt, sparse_nm=sparse_nm) + sum(
        decode_flops(config, batch, prompt + i + 1, sparse_nm) for i in range(new_tokens))


def break_even_queries(extra_cost: float, cost_per_query: float, baseline_cost_per_query: float) -> float:
    """Queries after which a compressed model has repaid ``extra_cost`` (the compression's training, in the same unit
    as the per-query costs: device-seconds or FLOPs) by being cheaper than the baseline per query.

    Raises:
        ValueError: when the compressed model is not cheaper per query (it never breaks even).
    """
    saving = baseline_cost_per_query - cost_per_query
    if not saving > 0:
        raise ValueError(f"cost_per_query={cost_per_query} is not below baseline_cost_per_query="
                         f"{baseline_cost_per_query}: the compressed model never repays its extra cost")
    return extra_cost / saving


def bounds(base_config, config, batch: int, prompt: int, new_tokens: int, bytes_per_value: float,
           sparse_nm: Optional[tuple[int, int]] = None) -> dict[str, float]:
    """The physical limits of a model's speed-up over ``base_config`` for one query shape.

    ``decode``: the ratio of bytes read per decode step (weights + KV cache at the mean context of the decode steps,
    ``prompt + (new_tokens + 1) / 2``); ``prefill``: the ratio of prefill FLOPs; ``query_flops``: the ratio of a
    whole query's FLOPs. ``sparse_nm``: the model runs N:M kernels from compressed storage (the baseline is dense).
    """
    context = prompt + (new_tokens + 1) / 2
    return {
        "decode": decode_bytes(base_config, batch, context, bytes_per_value)
        / decode_bytes(config, batch, context, bytes_per_value, sparse_nm),
        "prefill": prefill_flops(base_config, batch, prompt) / prefill_flops(config, batch, prompt, sparse_nm=sparse_nm),
        "query_flops": query_flops(base_config, batch, prompt, new_tokens)
        / query_flops(config, batch, prompt, new_tokens, sparse_nm),
    }
