"""One-shot pruning: N:M and unstructured masks, identity at sparsity 0, reconstruction-error ordering,
Wanda's score on a hand-computed example."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import make_tiny_llama
from layerchop.prune.calibrate import prune_model
from layerchop.prune.oneshot.wanda import wanda_score
from layerchop.prune.registry import registry

SOLVERS = registry()
from layerchop.prune.sparsity import Pattern, select_mask

METHODS = ["magnitude", "wanda", "sparsegpt"]


def _calib(n=8, t=16, seed=0):
    return torch.randint(3, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def test_pattern_parsing_and_errors():
    assert Pattern.parse("2:4") == Pattern("nm", 0.5, 2, 4)
    assert Pattern.parse("unstructured:0.5") == Pattern("unstructured", 0.5)
    for bad in ("4:2", "0:4", "half", "unstructured:1.5", "unstructured"):
        with pytest.raises(ValueError, match="prune pattern"):
            Pattern.parse(bad)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", ["2:4", "4:8"])
def test_nm_masks_have_exactly_n_zeros_per_group(method, spec):
    pattern = Pattern.parse(spec)
    model = make_tiny_llama(3, seed=3)
    masks, stats = prune_model(model, _calib(), method, pattern, batch_size=4)
    params = dict(model.named_parameters())
    assert len(masks) == 3 * 7  # q, k, v, o, gate, up, down in each layer
    assert all("embed" not in k and "lm_head" not in k and "norm" not in k for k in masks)
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, pattern.m)
        assert torch.all(groups.sum(-1) == pattern.n), name
        assert torch.all(params[name][mask] == 0), name
    assert stats["overall_pruned_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_unstructured_masks_follow_each_references_rule(method, ratio):
    """Wanda compares within each output row (``int(in * ratio)`` per row); magnitude and SparseGPT use one
    threshold over the matrix (SparseGPT: over each block of 128 columns; the tiny layers are one block),
    pruning ``int(numel * ratio) + 1``."""
    model = make_tiny_llama(2, seed=4)
    masks, _ = prune_model(model, _calib(), method, Pattern.parse(f"unstructured:{ratio}"), batch_size=4)
    for name, mask in masks.items():
        if method == "wanda":
            assert torch.all(mask.sum(1) == int(ratio * mask.shape[1])), name
        else:
            assert mask.shape[1] <= 128 and int(mask.sum()) == int(ratio * mask.numel()) + 1, name
            assert len(set(mask.sum(1).tolist())) > 1, name  # not a per-row rule


@pytest.mark.parametrize("method", METHODS)
def test_sparsity_zero_leaves_the_model_unchanged(method):
    model = make_tiny_llama(2, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks, stats = prune_model(model, _calib(), method, Pattern.parse("unstructured:0"), batch_size=4)
    assert stats["pruned_params"] == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _reconstruction_error(method: str, W: torch.Tensor, X: torch.Tensor, pattern: Pattern) -> float:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data.copy_(W)
    solver = SOLVERS[method](lin)
    solver.add_batch(X, lin(X))
    solver.prune(pattern)
    return float(torch.linalg.norm(X @ W.t() - X @ lin.weight.data.t()))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("spec", ["unstructured:0.5", "2:4"])
def test_reconstruction_error_sparsegpt_le_wanda_le_magnitude(seed, spec):
    g = torch.Generator().manual_seed(seed)
    num_in, num_out, num_tokens = 64, 48, 1024
    # correlated inputs whose feature scales span ~e^±3 (as in LLM activations). With e^±4.5
    # (exp(1.5 N(0,1))) the float32 Hessian is so ill-conditioned that SparseGPT with 1 % damping lost
    # to Wanda on all three seeds: see experiments/LOG.md.
    mix = torch.randn(num_in, num_in, generator=g) / num_in ** 0.5 + torch.eye(num_in)
    scale = torch.exp(torch.randn(num_in, generator=g))
    X = (torch.randn(num_tokens, num_in, generator=g) @ mix) * scale
    W = torch.randn(num_out, num_in, generator=g)
    pattern = Pattern.parse(spec)
    err = {m: _reconstruction_error(m, W, X, pattern) for m in METHODS}
    assert err["sparsegpt"] <= err["wanda"] <= err["magnitude"], err


def test_wanda_score_hand_computed():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    X = torch.tensor([[6.0, 1.0], [8.0, 0.0]])  # feature norms: ||X_0|| = 10, ||X_1|| = 1
    sq = (X ** 2).sum(0)
    score = wanda_score(W, sq)
    torch.testing.assert_close(score, torch.tensor([[10.0, 2.0], [30.0, 0.5]]))
    # Wanda prunes column 1 of row 0, where magnitude would prune column 0
    assert select_mask(score, Pattern.parse("unstructured:0.5")).tolist() == [[False, True], [False, True]]
    assert select_mask(W.abs(), Pattern.parse("unstructured:0.5")).tolist() == [[True, False], [False, True]]
    lin = nn.Linear(2, 2, bias=False)
    lin.weight.data.copy_(W)
    solver = SOLVERS["wanda"](lin)
    solver.add_batch(X, None)
    solver.prune(Pattern.parse("unstructured:0.5"))
    assert lin.weight.data.tolist() == [[1.0, 0.0], [3.0, 0.0]]


def test_pruned_model_round_trips_with_its_masks(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerchop.io import read_metadata
    from layerchop.prune.masks import MASKS_FILE, load_masks, save_pruned_model_dir

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    masks, stats = prune_model(model, _calib(), "wanda", Pattern.parse("2:4"), batch_size=4)
    save_pruned_model_dir(model, AutoTokenizer.from_pretrained(tiny_dir), tmp_path / "p", masks=masks,
                          metadata={"method": "wanda", "pattern": "2:4", "sparsity": stats})
    assert (tmp_path / "p" / MASKS_FILE).exists() and not (tmp_path / "p" / "hf").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    back = load_masks(tmp_path / "p")
    assert back.keys() == masks.keys()
    params = dict(loaded.named_parameters())
    for k, m in back.items():
        assert torch.equal(m, masks[k])
        assert torch.all(params[k][m] == 0)
    assert read_metadata(tmp_path / "p")["pattern"] == "2:4"


def test_sparse_continued_pretraining_keeps_masks_fixed(tmp_path, tiny_dir, tiny_prepared):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerchop.prune.masks import MASKS_FILE, load_masks, save_pruned_model_dir
    from layerchop.train import run as train_run
    from test_train import tiny_train_cfg

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    masks, _ = prune_model(model, _calib(), "magnitude", Pattern.parse("2:4"), batch_size=4)
    save_pruned_model_dir(model, AutoTokenizer.from_pretrained(tiny_dir), tmp_path / "p", masks=masks,
                          metadata={"method": "magnitude", "pattern": "2:4"})
    # masked non-zeros right after every optimizer step: before the callback (what AdamW did to the pruned
    # weights: their gradients are not zero, so the optimizer moves them) and after it
    before, after = [], []
    original = train_run.KeepMasks.on_train_batch_end

    def spy(self, trainer, pl_module, outputs, batch, batch_idx):
        before.append(self.enforcer.num_masked_nonzero())
        original(self, trainer, pl_module, outputs, batch, batch_idx)
        after.append(self.enforcer.num_masked_nonzero())

    train_run.KeepMasks.on_train_batch_end = spy
    try:
        meta = train_run.run(tmp_path / "p", tiny_prepared, tmp_path / "out",
                               tiny_train_cfg(token_budget=4 * 4 * 32, weight_decay=0.1),
                               run_dir=tmp_path / "run")
    finally:
        train_run.KeepMasks.on_train_batch_end = original
    # the optimizer did move pruned weights at every step (so the check below can fail), the callback undid it
    num_masked = sum(int(m.sum()) for m in masks.values())
    assert all(n > num_masked // 2 for n in before), (before, num_masked)
    assert after == [0, 0, 0, 0]
    assert meta["masked_nonzero_after_training"] == 0 and meta["pattern"] == "2:4"
    assert (tmp_path / "out" / MASKS_FILE).exists()
    out = load_file(tmp_path / "out" / "model.safetensors")
    init = load_file(tmp_path / "p" / "model.safetensors")
    for k, m in load_masks(tmp_path / "out").items():
        assert torch.all(out[k][m] == 0), k
    # unmasked weights did train
    assert any(not torch.equal(out[k][~m], init[k][~m]) for k, m in masks.items())


def reference_fasterprune(W: torch.Tensor, H: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0,
                          blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """An independent port of ``SparseGPT.fasterprune`` (IST-DASLab/sparsegpt, ``sparsegpt.py``) without its
    quantizer and loss bookkeeping; returns the pruned weight."""
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = W1[:, i:(i + prune_m)] ** 2 / (torch.diag(Hinv1)[i:(i + prune_m)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


@pytest.mark.parametrize("spec", ["unstructured:0.5", "unstructured:0.3", "2:4", "4:8"])
def test_sparsegpt_matches_the_reference_on_a_random_layer(spec):
    """Masks and reconstructed weights equal the reference's on a random 96 x 200 layer (two blocks of 128
    columns, the second partial): catches a per-row mask, a wrong threshold, block or error propagation."""
    g = torch.Generator().manual_seed(7)
    num_out, num_in = 96, 200
    X = torch.randn(512, num_in, generator=g) @ (torch.eye(num_in) + 0.1 * torch.randn(num_in, num_in, generator=g))
    W = torch.randn(num_out, num_in, generator=g)
    lin = nn.Linear(num_in, num_out, bias=False)
    lin.weight.data.copy_(W)
    solver = SOLVERS["sparsegpt"](lin)
    for chunk in X.split(128):
        solver.add_batch(chunk, None)
    pattern = Pattern.parse(spec)
    expected = reference_fasterprune(W, solver.H, pattern.ratio, pattern.n or 0, pattern.m or 0)
    mask = solver.prune(pattern)
    assert torch.equal(mask, expected == 0)
    torch.testing.assert_close(lin.weight.data, expected, rtol=1e-4, atol=1e-5)
    if pattern.kind == "unstructured":  # the reference's rule: int(numel * ratio) + 1 per block
        assert int(mask[:, :128].sum()) == int(num_out * 128 * pattern.ratio) + 1
        assert int(mask[:, 128:].sum()) == int(num_out * 72 * pattern.ratio) + 1


def test_magnitude_unstructured_uses_one_threshold_over_the_matrix():
    """locuslab/wanda ``prune_magnitude``: sort |W| over the whole matrix, prune ``<=`` the value at index
    int(numel * ratio). Here row 0 holds all the small weights, so a per-row rule would prune other entries."""
    W = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]])
    lin = nn.Linear(4, 2, bias=False)
    lin.weight.data.copy_(W)
    mask = SOLVERS["magnitude"](lin).prune(Pattern.parse("unstructured:0.25"))
    assert mask.tolist() == [[True, True, True, False], [False, False, False, False]]  # index 2 -> <= 0.3


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_with_eager_attention_and_a_smaller_last_batch(method):
    """The attention mask layer 0 receives is shaped by its batch: with eager attention, reusing the first
    batch's for a last batch of 2 sequences (6 sequences, batch 4) crashed; each batch now keeps its own."""
    from layerchop.prune.calibrate import capture_layer_inputs

    model = make_tiny_llama(2, seed=6)
    model.config._attn_implementation = "eager"
    masks, stats = prune_model(model, _calib(n=6), method, Pattern.parse("2:4"), batch_size=4)
    assert stats["overall_pruned_fraction"] == pytest.approx(0.5)
    h, kwargs_by_size = capture_layer_inputs(model, _calib(n=6), torch.device("cpu"), 4)
    assert h.shape[0] == 6 and sorted(kwargs_by_size) == [2, 4]
    for size, per_layer in kwargs_by_size.items():  # each batch size keeps its own mask
        assert [kw["attention_mask"].shape[0] for kw in per_layer] == [size] * len(per_layer)
