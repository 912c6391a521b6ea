"""Every stage's model code on every supported decoder family (tiny random models of each family's own config class,
``tests/families.py``): chop, calibration, the layer-selection scores, the structured shrink, the FSDP2 wrap, the
phase hand-over and the plan's architecture figures."""

from __future__ import annotations

import copy

import pytest
import torch

from families import FAMILIES, MIXED, WINDOW, family_config, family_ids, family_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_chopped_model_saved_and_reloaded_equals_skipping_its_layers(tmp_path, family):
    """The chop stage's output, reloaded from disk as any HF user would, computes the dense model with the removed
    layers passing their input through; every kept layer keeps its own attention kind (sliding or full), RoPE or not."""
    from transformers import AutoModelForCausalLM

    from layerchop.prune.chop import chop_layers, skipping

    model, ids = family_model(family), family_ids(seq_len=3 * WINDOW)
    remove = [2, 3]
    with skipping(model, remove):
        want = _logits(model, ids)
    dense = _logits(model, ids)
    scale = float(dense.abs().max())
    assert (want - dense).abs().max() > 1e-2 * scale  # the skipped layers do something
    chopped = copy.deepcopy(model)
    kept = chop_layers(chopped, remove)
    assert kept == [0, 1, 4, 5]
    torch.testing.assert_close(_logits(chopped, ids), want, rtol=0, atol=1e-5 * scale)
    chopped.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 4
    for key in ("layer_types", "no_rope_layers"):
        if getattr(model.config, key, None) is not None:
            assert getattr(reloaded.config, key) == [getattr(model.config, key)[i] for i in kept], key
    torch.testing.assert_close(_logits(reloaded, ids), want, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_inputs_of_every_layer_equal_a_forward_of_the_pruned_model(family):
    """One-shot pruning calibrates layer ``i`` on what the already-pruned layers ``0..i-1`` give it, with layer i's own
    mask and position tables: exactly what a plain forward of the pruned model feeds layer ``i``. Batches of 2 and a
    last batch of 1, sequences three windows long (a full-attention layer given a sliding mask would differ)."""
    from layerchop.prune.calibrate import prune_model
    from layerchop.prune.chop import decoder_layers
    from layerchop.prune.sparsity import Pattern

    model, ids = family_model(family), family_ids(n=5, seq_len=3 * WINDOW)
    layers = decoder_layers(model)
    seen: dict[int, list] = {i: [] for i in range(len(layers))}

    def recorder(i):
        def hook(module, args, kwargs):
            if "forward" in module.__dict__:  # the pass that collects each layer's mask and positions runs no layer
                return
            seen[i].append(((args[0] if args else kwargs["hidden_states"]).clone(), kwargs))
        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    prune_model(model, ids, "wanda", Pattern.parse("2:4"), batch_size=2)
    calib = {i: seen[i][:3] for i in seen}  # the statistics pass: batches 2, 2, 1 (then the pruned layer's pass)
    assert all(len(seen[i]) == 6 for i in seen)
    for i in seen:
        seen[i] = []
    with torch.no_grad():
        for b in range(0, 5, 2):
            model(input_ids=ids[b:b + 2], use_cache=False)
    for h in handles:
        h.remove()
    for i in range(len(layers)):
        assert len(seen[i]) == 3
        for (h_cal, kw_cal), (h_fwd, kw_fwd) in zip(calib[i], seen[i]):
            torch.testing.assert_close(h_cal, h_fwd, rtol=0, atol=1e-5, msg=f"layer {i}")
            for key in ("attention_mask", "position_embeddings"):
                a, b = kw_cal.get(key), kw_fwd.get(key)
                if isinstance(a, tuple):
                    for x, y in zip(a, b):
                        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"layer {i} {key}")
                elif a is None or b is None:
                    assert a is None and b is None, (i, key)
                else:
                    assert torch.equal(a, b), f"layer {i} {key}"


@pytest.mark.parametrize("family", MIXED)
def test_ppl_criterion_scores_the_model_the_chop_stage_would_write(family):
    """The ``ppl`` layout on a model mixing sliding and full attention: the score of layer ``i`` is the calibration
    perplexity of the model chopped without layer ``i`` (which once raised NotImplementedError)."""
    import math

    from layerchop.prune.chop import chop_layers
    from layerchop.prune.select import mean_nll, ppl_without_each_layer

    model, ids = family_model(family), family_ids(n=4, seq_len=3 * WINDOW)
    scores = ppl_without_each_layer(model, ids, batch_size=2, layers=[1, 2])
    for i in (1, 2):
        chopped = copy.deepcopy(model)
        chop_layers(chopped, [i])
        assert scores["without"][i] == pytest.approx(math.exp(mean_nll(chopped, ids, 2, "cpu")), rel=1e-6)
    assert scores["without"][1] != pytest.approx(scores["without"][2], rel=1e-4)
    assert scores["full"] == pytest.approx(math.exp(mean_nll(model, ids, 2, "cpu")), rel=1e-9)
