"""LayerChop: layouts, errors, equivalence with running the kept layers by hand, KV cache, round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama
from layerchop.io import read_metadata, save_model_dir
from layerchop.prune.chop import chop_layers, decoder_layers, removed_indices

DEPTHS = [(4, 1), (6, 2), (8, 3), (12, 6), (24, 12), (30, 15), (32, 16), (32, 30), (7, 5)]


def _contiguous(xs):
    return xs == list(range(xs[0], xs[0] + len(xs)))


@pytest.mark.parametrize("num_layers,k", DEPTHS)
@pytest.mark.parametrize("layout", ["input", "output", "middle", "max-gap", "both"])
def test_layout_properties(layout, num_layers, k):
    r = removed_indices(num_layers, layout=layout, num_remove=k)
    last = num_layers - 1
    assert len(r) == k and r == sorted(set(r))
    assert 0 not in r and last not in r
    if layout == "input":
        assert r == list(range(1, 1 + k))
    elif layout == "output":
        assert r == list(range(last - k, last))
    elif layout == "middle":
        assert _contiguous(r)
        left, right = r[0] - 1, (last - 1) - r[-1]  # interior layers kept on each side
        assert abs(left - right) <= 1
    elif layout == "both":
        k_in = (k + 1) // 2
        assert r[:k_in] == list(range(1, 1 + k_in))
        assert r[k_in:] == list(range(last - (k - k_in), last))
    else:  # max-gap: gaps between removed layers differ by at most one
        gaps = [b - a for a, b in zip(r, r[1:])]
        assert not gaps or max(gaps) - min(gaps) <= 1


def test_paper_24_layer_layouts():
    # the paper's setting: 24 layers, remove 12
    assert removed_indices(24, layout="input", num_remove=12) == list(range(1, 13))
    assert removed_indices(24, layout="output", num_remove=12) == list(range(11, 23))
    assert removed_indices(24, layout="middle", num_remove=12) == list(range(6, 18))
    assert removed_indices(24, layout="both", num_remove=12) == [1, 2, 3, 4, 5, 6, 17, 18, 19, 20, 21, 22]
    assert removed_indices(24, layout="max-gap", num_remove=12) == [1, 3, 5, 7, 9, 11, 12, 14, 16, 18, 20, 22]
    assert removed_indices(30, layout="input", num_remove=15) == list(range(1, 16))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(indices=[0, 3]), r"chop.indices=\[0, 3\].*first \(0\) or last"),
        (dict(indices=[2, 5]), r"chop.indices=\[2, 5\].*first \(0\) or last \(5\)"),
        (dict(indices=[2, 9]), r"chop.indices=\[2, 9\]: \[9\] out of range 0..5"),
        (dict(indices=[-1]), r"out of range"),
        (dict(indices=[2, 2]), r"chop.indices=\[2, 2\]: duplicate indices \[2\]"),
        (dict(indices=[0, 1, 2, 3, 4, 5]), r"removes every one of the 6 layers"),
        (dict(layout="input", num_remove=6), r"chop.num_remove=6 removes every one"),
        (dict(layout="input", num_remove=5), r"chop.num_remove=5 is more than the 4 layers"),
        (dict(layout="sideways", num_remove=2), r"chop.layout='sideways'"),
    ],
)
def test_invalid_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        removed_indices(6, **kwargs)


def _by_hand(model, kept, ids_BT):
    """Embedding -> the kept decoder layers in order -> final norm -> LM head."""
    inner = model.model
    h = inner.embed_tokens(ids_BT)
    pos = torch.arange(ids_BT.shape[1]).unsqueeze(0)
    pe = inner.rotary_emb(h, pos)
    for i in kept:
        out = inner.layers[i](h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    return model.lm_head(inner.norm(h))


@pytest.mark.parametrize("remove", [[1, 2], [2, 4], [1, 3, 4]])
def test_chop_equals_kept_layers_by_hand(remove):
    dense = make_tiny_llama(6, seed=1)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    kept = [i for i in range(6) if i not in remove]
    with torch.no_grad():
        expected = _by_hand(dense, kept, ids)
        chopped = make_tiny_llama(6, seed=1)
        assert chop_layers(chopped, remove) == kept
        got = chopped(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert chopped.config.num_hidden_layers == len(kept) == len(decoder_layers(chopped))
    assert [layer.self_attn.layer_idx for layer in decoder_layers(chopped)] == list(range(len(kept)))


def test_chopped_generation_with_kv_cache_matches_no_cache():
    model = make_tiny_llama(6, seed=2)
    chop_layers(model, [1, 2, 3])
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, 12)
    assert torch.equal(cached, uncached)


def test_chopped_model_round_trips(tmp_path, tiny_dir):
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    chop_layers(model, [2, 3])
    save_model_dir(model, AutoTokenizer.from_pretrained(tiny_dir), tmp_path / "c",
                   metadata={"removed_layers": [2, 3]})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert loaded.config.num_hidden_layers == 4
    assert read_metadata(tmp_path / "c")["removed_layers"] == [2, 3]
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        out = loaded.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape == (1, 14)
