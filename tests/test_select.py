"""Data-driven layer selection: each score equals a direct computation on a tiny Llama; the selections keep the
first and last layer and pick what the scores say."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import make_tiny_llama
from layerchop.prune.chop import chop_layers
from layerchop.prune.select import (layer_scores, ppl_without_each_layer, select_layers,
                                    stream_similarity_scores)

L = 6


@pytest.fixture(scope="module")
def model_and_calib():
    model = make_tiny_llama(num_layers=L, seed=3)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(3, 300, (5, 24), generator=g)
    return model, calib


def direct_streams(model, calib):
    """h_0 .. h_L from HF's own output_hidden_states, with the final norm made the identity so that the last
    entry is the last layer's raw output."""
    m = copy.deepcopy(model)
    m.model.norm = nn.Identity()
    with torch.no_grad():
        out = m(input_ids=calib, output_hidden_states=True, use_cache=False)
    return [h.double() for h in out.hidden_states]


def test_block_influence_and_angular_equal_direct_computation(model_and_calib):
    model, calib = model_and_calib
    block = 3
    # batch_size 2 over 5 sequences: the running sums cross an uneven last batch
    got = stream_similarity_scores(model, calib, block, batch_size=2)
    h = direct_streams(model, calib)
    assert len(h) == L + 1
    bi = [1.0 - F.cosine_similarity(h[i], h[i + 1], dim=-1).mean().item() for i in range(L)]
    ang = [(torch.arccos(F.cosine_similarity(h[s], h[s + block], dim=-1).clamp(-1, 1)) / math.pi).mean().item()
           for s in range(L - block + 1)]
    assert got["block-influence"] == pytest.approx(bi, rel=1e-5, abs=1e-6)
    assert got["angular"] == pytest.approx(ang, rel=1e-5, abs=1e-6)
    assert all(0.0 <= a <= 1.0 for a in got["angular"])
    # not degenerate: the scores differ between layers
    assert max(bi) - min(bi) > 1e-3


def test_ppl_without_each_layer_equals_chopped_models(model_and_calib):
    model, calib = model_and_calib
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = ppl_without_each_layer(model, calib, batch_size=2)
    with torch.no_grad():
        full = math.exp(model(input_ids=calib, labels=calib, use_cache=False).loss.item())
    assert got["full"] == pytest.approx(full, rel=1e-5)
    for i in range(1, L - 1):  # chop_layers keeps the first and last layer by design
        chopped = copy.deepcopy(model)
        chop_layers(chopped, [i])
        with torch.no_grad():
            ref = math.exp(chopped(input_ids=calib, labels=calib, use_cache=False).loss.item())
        assert got["without"][i] == pytest.approx(ref, rel=1e-5), i
    # the model is whole again afterwards
    assert len(model.model.layers) == L
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_selection_follows_scores_and_keeps_first_and_last():
    scores = {"block-influence": [0.0, 0.5, 0.1, 0.3, 0.05, 0.0],
              "ppl_without": [1.0, 9.0, 2.0, 8.0, 3.0, 0.5],
              "angular": [0.01, 0.4, 0.2, 0.05, 0.9, 0.0]}
    # layer 0 and 5 have the lowest scores but are never removed
    assert select_layers("block-influence", scores, L, 2) == [2, 4]
    assert select_layers("ppl", scores, L, 3) == [2, 3, 4]
    # blocks of 2 may start at 1..3 (the block must end before the last layer): start 3 has 0.05
    assert select_layers("angular", scores, L, 2) == [3, 4]
    with pytest.raises(ValueError, match="criterion"):
        select_layers("random", scores, L, 2)
    with pytest.raises(ValueError, match="num_remove=5"):
        select_layers("block-influence", scores, L, 5)


@pytest.mark.parametrize("criterion", ["angular", "block-influence", "ppl"])
def test_layer_scores_give_a_valid_selection(model_and_calib, criterion):
    model, calib = model_and_calib
    s = layer_scores(criterion, model, calib, 2, batch_size=4)
    removed = select_layers(criterion, s, L, 2)
    assert len(removed) == 2 and 0 not in removed and L - 1 not in removed
    if criterion == "angular":
        assert removed[1] == removed[0] + 1
        starts = range(1, L - 2)
        assert s["angular"][removed[0]] == min(s["angular"][i] for i in starts)
