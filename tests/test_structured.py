"""The structured width-pruning export: a physically smaller Llama that computes what the masked model computes."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from layerchop.prune.structured import (channel_scores, group_scores, head_groups, keep_lowest_pruned, shrink,
                                        structured_masks)


def test_the_smaller_model_computes_the_masked_models_logits_and_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    full = make_tiny_llama()  # 6 layers, width 32, MLP 64, 4 query heads over 2 key/value heads
    cfg = full.config
    torch.manual_seed(1)
    score = {n: torch.rand_like(p) for n, p in full.named_parameters()}
    keep_ch = {i: keep_lowest_pruned(channel_scores(score, i), 32) for i in range(6)}
    keep_g = {i: keep_lowest_pruned(group_scores(score, i, cfg), 1) for i in range(6)}
    assert all(len(keep_ch[i]) == 32 and len(keep_g[i]) == 1 for i in range(6))
    assert len({tuple(keep_ch[i].tolist()) for i in range(6)}) > 1  # layers choose their own channels

    masked = make_tiny_llama()
    with torch.no_grad():
        for name, m in structured_masks(cfg, keep_ch, keep_g).items():
            dict(masked.named_parameters())[name][m] = 0
    new_cfg, state = shrink(full.state_dict(), cfg, keep_ch, keep_g)
    assert (new_cfg.intermediate_size, new_cfg.num_attention_heads, new_cfg.num_key_value_heads,
            new_cfg.head_dim) == (32, 2, 1, 8)
    small = LlamaForCausalLM(new_cfg).eval()
    small.load_state_dict(state)
    small.save_pretrained(tmp_path / "small")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()

    ids = torch.randint(3, 300, (2, 24))
    with torch.no_grad():
        want = masked(ids).logits
        torch.testing.assert_close(small(ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(full(ids).logits, want, atol=1e-3)  # something was removed
    per_layer_before = sum(p.numel() for p in full.model.layers[0].parameters())
    per_layer_after = sum(p.numel() for p in loaded.model.layers[0].parameters())
    # MLP 3 x 32 x 64 -> 3 x 32 x 32; attention q/o 2 x 32 x 32 -> 2 x 32 x 16, k/v 2 x 16 x 32 -> 2 x 8 x 32; norms
    assert (per_layer_before, per_layer_after) == (3 * 2048 + 2048 + 1024 + 64, 3 * 1024 + 1024 + 512 + 64)


def test_group_and_channel_scores_sum_the_right_rows_and_columns():
    full = make_tiny_llama(num_layers=1)
    groups, rep, hd = head_groups(full.config)
    assert (groups, rep, hd) == (2, 2, 8)
    score = {n: torch.zeros_like(p) for n, p in full.named_parameters()}
    att = "model.layers.0.self_attn."
    score[att + "q_proj.weight"][16:32] = 1.0  # group 1's query heads (rows 16..31): 16 rows x 32
    score[att + "k_proj.weight"][0:8] = 2.0  # group 0's key head: 8 rows x 32
    score[att + "o_proj.weight"][:, 0:16] = 1.0  # group 0's query-head outputs: 32 rows x 16 columns
    assert group_scores(score, 0, full.config).tolist() == [8 * 32 * 2 + 32 * 16, 16 * 32]
    score["model.layers.0.mlp.down_proj.weight"][:, 5] = 3.0
    score["model.layers.0.mlp.up_proj.weight"][7] = 1.0
    ch = channel_scores(score, 0)
    assert ch[5] == 3.0 * 32 and ch[7] == 32.0 and ch.sum() == 3.0 * 32 + 32.0
    assert keep_lowest_pruned(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2).tolist() == [0, 2]


def test_shrink_refuses_uneven_layers():
    full = make_tiny_llama(num_layers=2)
    keep_ch = {0: torch.arange(32), 1: torch.arange(30)}
    keep_g = {0: torch.tensor([0]), 1: torch.tensor([1])}
    with pytest.raises(ValueError, match=r"channels \[30, 32\]"):
        shrink(full.state_dict(), full.config, keep_ch, keep_g)
