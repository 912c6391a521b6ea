"""Issue 15: the latency benchmark (``layerchop.evaluate.latency``, ``layerchop bench``), Table 3 with its bounds and
break-even, Table 2, and the 2:4 kernel path (CUDA only: skipped with the reason on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from layerchop.cli import main as cli
from layerchop.evaluate.efficiency import decode_bytes, kv_cache_bytes, prefill_flops, query_flops, weight_bytes
from layerchop.evaluate.latency import (Grid, Query, cache_bytes, kernel_ops, measure, nm_pattern, rotation,
                                        run_query, to_semi_structured, weights_bytes)
from layerchop.prune.sparsity import Pattern, select_mask

from conftest import make_tiny_llama


def nm_sparse(model, spec: str):
    """Zero each projection's smallest weights in every group (the 2:4 / 4:8 layout of the prune stage)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p[select_mask(p.abs(), Pattern.parse(spec))] = 0
    return model


def test_nm_pattern_tells_dense_2of4_and_4of8_apart():
    assert nm_pattern(make_tiny_llama()) is None
    assert nm_pattern(nm_sparse(make_tiny_llama(), "2:4")) == (2, 4)
    assert nm_pattern(nm_sparse(make_tiny_llama(), "4:8")) == (4, 8)  # a 4:8 layout is not 2:4
    model = nm_sparse(make_tiny_llama(), "2:4")
    with torch.no_grad():  # one group with three nonzeros breaks the pattern
        model.model.layers[3].mlp.up_proj.weight[5, :4] = 1.0
    assert nm_pattern(model) is None


def test_a_query_holds_the_kv_cache_the_accounting_counts():
    model = make_tiny_llama()
    assert weights_bytes(model) == 4 * (sum(p.numel() for p in model.parameters())
                                        + sum(b.numel() for b in model.buffers()))
    q = run_query(model, torch.randint(0, 300, (3, 10)), new_tokens=4)
    # the cache ends holding the prompt and the four new tokens of each of the 3 sequences
    assert q.kv_bytes == kv_cache_bytes(model.config, 3, 14, 4) == 2 * 6 * 3 * 14 * 2 * 8 * 4
    assert q.prefill_s > 0 and q.decode_step_s > 0 and q.peak_extra_bytes is None
    with torch.no_grad():
        cache = model(torch.randint(0, 300, (2, 7)), use_cache=True).past_key_values
    assert cache_bytes(cache) == kv_cache_bytes(model.config, 2, 7, 4)


def test_query_flops_and_bounds_by_hand():
    cfg = make_tiny_llama().config
    # decode step at context c: 2 x 55,296 projections + 4 x 6 layers x c x 4 heads x 8 + head 2 x 32 x 300
    one = 2 * 55_296 + 4 * 6 * 11 * 4 * 8 + 2 * 32 * 300
    assert query_flops(cfg, 1, 10, 1) == prefill_flops(cfg, 1, 10) + one
    # 2:4 kernels halve the projections' multiply-adds, not attention or the head
    assert query_flops(cfg, 1, 10, 1, (2, 4)) == query_flops(cfg, 1, 10, 1) - 55_296 * 11
    from layerchop.evaluate.efficiency import bounds

    chopped = make_tiny_llama(num_layers=3).config
    b = bounds(cfg, chopped, 2, 10, 4, 4)
    assert b["decode"] == decode_bytes(cfg, 2, 12.5, 4) / decode_bytes(chopped, 2, 12.5, 4)
    assert b["prefill"] == prefill_flops(cfg, 2, 10) / prefill_flops(chopped, 2, 10)
    assert bounds(cfg, cfg, 2, 10, 4, 4) == {"decode": 1.0, "prefill": 1.0, "query_flops": 1.0}
    # 2:4 kernels from compressed storage, bf16, batch 1, context 10 + 2.5: by hand
    held = 55_296 * 2 + 13 * 32 * 2 + 300 * 32 * 2  # projections, norms, head (tied: the embedding)
    kv = 2 * 6 * 1 * 12.5 * 2 * 8 * 2
    sparse_read = 55_296 / 2 * 2 + 55_296 / 2 * 2 / 8 + 13 * 32 * 2 + 300 * 32 * 2
    b24 = bounds(cfg, cfg, 1, 10, 4, 2, (2, 4))
    assert b24["decode"] == pytest.approx((held + kv) / (sparse_read + kv))
    pre = prefill_flops(cfg, 1, 10)
    assert b24["prefill"] == pytest.approx(pre / (pre - 2 * 55_296 * 10 / 2))
    # compressed 2:4 storage: values halved plus 2 index bits per kept value
    assert weight_bytes(cfg, 2, (2, 4)) == weight_bytes(cfg, 2) - 55_296 * 2 / 2 + 55_296 / 2 * 2 / 8


def test_measure_interleaves_the_models_and_takes_ratios_per_repeat():
    """A fake clock: every query costs the model's base time times a drift that grows with each call, as a machine
    slowing down would. Rotating the order and pairing within a repeat keeps the ratios near the true 2x."""
    calls: list[str] = []
    base = {"dense": (2.0, 0.5), "half": (1.0, 0.25)}

    def fake(model, ids, new_tokens):
        calls.append(model)
        drift = 1 + 0.01 * len(calls)
        pre, dec = base[model]
        return Query(prefill_s=pre * drift, decode_step_s=dec * drift, kv_bytes=7)

    grid = Grid(batch_sizes=[1, 2], prompt_lengths=[5], new_tokens=4, repeats=4, warmup=1)
    cells = measure({"dense": "dense", "half": "half"}, grid, 300, torch.device("cpu"), run=fake)
    assert [(c["batch"], c["prompt"]) for c in cells] == [(1, 5), (2, 5)]
    # per cell: one warm-up each, then repeats in rotated order
    assert calls[:10] == ["dense", "half", "dense", "half", "half", "dense", "dense", "half", "half", "dense"]
    assert cells[0]["order"] == [rotation(["dense", "half"], r) for r in range(4)]
    assert rotation(["a", "b", "c"], 4) == ["b", "c", "a"]
    half = cells[0]["models"]["half"]
    assert half["prefill_speedup"]["n"] == 4 and len(half["prefill_samples"]) == 4
    assert 1.95 < half["prefill_speedup"]["median"] < 2.05 and 1.95 < half["query_speedup"]["median"] < 2.05
    assert cells[0]["models"]["dense"]["decode_speedup"]["median"] == 1.0
    # the summaries are of the samples
    assert half["prefill_s"]["median"] == sorted(half["prefill_samples"])[1:3][0] / 2 + sorted(
        half["prefill_samples"])[1:3][1] / 2


def test_profiler_sees_dense_matmuls_and_no_sparse_kernel_on_cpu():
    ops = kernel_ops(nm_sparse(make_tiny_llama(), "2:4"), torch.zeros(1, 8, dtype=torch.long))
    assert ops["sparse"] == 0 and ops["dense_mm"] >= 6 * 7  # 7 projections per layer, dense kernels
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="need CUDA"):
            to_semi_structured(nm_sparse(make_tiny_llama(), "2:4"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA; this machine has none")
def test_2of4_kernel_runs_on_cuda_and_matches_the_dense_kernel():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                      num_hidden_layers=2, vocab_size=512)
    dense = nm_sparse(LlamaForCausalLM(cfg), "2:4").to("cuda", torch.bfloat16).eval()
    sparse = nm_sparse(LlamaForCausalLM(cfg), "2:4").to("cuda", torch.bfloat16).eval()
    sparse.load_state_dict(dense.state_dict())
    backend = to_semi_structured(sparse)
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    assert kernel_ops(sparse, ids)["sparse"] >= 2 * 7, backend
    assert kernel_ops(dense, ids)["sparse"] == 0
    with torch.inference_mode():
        a, b = dense(ids).logits.float(), sparse(ids).logits.float()
    assert torch.allclose(a, b, atol=0.1, rtol=0.05), (a - b).abs().max()
    assert weights_bytes(sparse) < weights_bytes(dense)
    q = run_query(sparse, ids, new_tokens=2)
    assert q.peak_extra_bytes is not None and q.peak_extra_bytes > 0


def write_params(tmp_path: Path, **bench) -> Path:
    params = {"bench": {"batch_sizes": [1, 2], "prompt_lengths": [8], "new_tokens": 2, "repeats": 2, "warmup": 0,
                        "query_batch": 1, "query_prompt": 8, "labels": {"chop": "Chopped"}, **bench}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_bench_and_table3_stages_end_to_end(tmp_path, tiny_dir, chopped_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerchop.io import save_model_dir

    sparse_dir = tmp_path / "sparse"
    save_model_dir(nm_sparse(AutoModelForCausalLM.from_pretrained(tiny_dir), "2:4"),
                   AutoTokenizer.from_pretrained(tiny_dir), sparse_dir, metadata={})
    params = write_params(tmp_path)
    out = tmp_path / "bench" / "metrics.json"
    assert cli(["bench", "--params", str(params), "--model", f"dense={tiny_dir}", "--model", f"chop={chopped_dir}",
                "--model", f"two4={sparse_dir}", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["baseline"] == "dense" and [(c["batch"], c["prompt"]) for c in m["cells"]] == [(1, 8), (2, 8)]
    assert m["models"]["chop"]["layers"] == 4 and m["models"]["two4"]["pattern"] == "2:4"
    assert m["models"]["two4"]["kernel"] == "dense" and "no 2:4 sparse kernel on cpu" in m["models"]["two4"]["kernel_note"]
    assert m["environment"]["threads"] == torch.get_num_threads() and m["environment"]["torch"] == torch.__version__
    cell = m["cells"][1]
    cfg = AutoModelForCausalLM.from_pretrained(chopped_dir).config
    assert cell["models"]["chop"]["kv_bytes"] == kv_cache_bytes(cfg, 2, 10, 4)
    chop = cell["models"]["chop"]
    assert chop["bound"]["decode"] > 1.0 and cell["models"]["two4"]["bound"]["decode"] == 1.0
    assert chop["bound"]["layers"] == 6 / 4
    assert chop["fraction_of_bound"]["decode"] == chop["decode_speedup"]["median"] / chop["bound"]["decode"]
    assert chop["throughput_tok_s"]["decode"] == 2 / chop["decode_step_s"]["median"]
    assert m["models"]["two4"]["weights_bytes"] == m["models"]["dense"]["weights_bytes"]  # dense storage here
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"device_s": 3600.0, "flops": 1e15}))
    tables, figures = tmp_path / "tables", tmp_path / "figures"
    assert cli(["table3", "--params", str(params), "--bench", str(out), "--training", f"chop=chop:{run}",
                "--tables", str(tables), "--figures", str(figures)]) == 0
    text = (tables / "table3_latency.md").read_text()
    assert "| Chopped | 4 |" in text and "dense (no sparse kernel here)" in text
    q = m["cells"][0]["models"]["chop"]  # the query shape: 1 prompt of 8 tokens
    assert f"| {8 / q['prefill_s']['median']:,.0f}, {1 / q['decode_step_s']['median']:,.1f} |" in text
    # a --bench that is not one: one line naming it, exit 2
    capsys.readouterr()
    for bad, why in ((tmp_path / "none.json", "no such file"), (run, "not the metrics of `layerchop bench`")):
        assert cli(["table3", "--params", str(params), "--bench", str(bad), "--tables", str(tables), "--figures",
                    str(figures)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"layerchop table3: error: --bench {bad}") and why in err
    assert "1 device-h, 1e+15 FLOPs" in text and "none (one-shot)" in text
    assert (figures / "fig_speedup_vs_batch.png").stat().st_size > 0
    # a training whose bench model is absent: one line naming it, exit 2, no table
    (tables / "table3_latency.md").unlink()
    assert cli(["table3", "--params", str(params), "--bench", str(out), "--training", f"x=nope:{run}",
                "--tables", str(tables), "--figures", str(figures)]) == 2
    assert not (tables / "table3_latency.md").exists()


def test_bench_refuses_bad_input(tmp_path, tiny_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerchop.io import save_model_dir

    sparse_dir = tmp_path / "sparse"
    save_model_dir(nm_sparse(AutoModelForCausalLM.from_pretrained(tiny_dir), "2:4"),
                   AutoTokenizer.from_pretrained(tiny_dir), sparse_dir, metadata={})
    req = tmp_path / "req"
    req.mkdir()
    assert cli(["bench", "--params", str(write_params(req, sparse_kernel="require")), "--model", f"dense={tiny_dir}",
                "--model", f"two4={sparse_dir}", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "bench.sparse_kernel='require': --model two4: no 2:4 sparse kernel on cpu" in err
    assert not (tmp_path / "r.json").exists()
    params = write_params(tmp_path)
    out = tmp_path / "m.json"
    assert cli(["bench", "--params", str(params), "--model", f"dense={tiny_dir}", "--out", str(out)]) == 2
    assert "at least one model to compare" in capsys.readouterr().err
    assert cli(["bench", "--params", str(params), "--model", f"dense={tiny_dir}", "--model", "x",
                "--out", str(out)]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
    assert cli(["bench", "--params", str(params), "--model", f"dense={tiny_dir}", "--model",
                f"two4={tmp_path / 'nowhere'}", "--out", str(out)]) == 2
    assert f"--model two4={tmp_path / 'nowhere'}: no such model directory" in capsys.readouterr().err
    assert not out.exists()
    assert cli(["bench", "--params", str(write_params(tmp_path, sparse_kernel="require")), "--model",
                f"dense={tiny_dir}", "--model", f"same={tiny_dir}", "--out", str(out)]) == 0  # nothing 2:4: fine
    assert cli(["bench", "--params", str(write_params(tmp_path, query_batch=3)), "--model", f"dense={tiny_dir}",
                "--model", f"same={tiny_dir}", "--out", str(tmp_path / "n.json")]) == 2
    assert "bench.query_batch=3" in capsys.readouterr().err and not (tmp_path / "n.json").exists()


def test_break_even_rows_by_hand():
    """Baseline queries of 100 ms, the chopped model's 60 ms (paired saving 40 ms): 40 device-s of training repay
    after 1,000 queries, which take 100 s (0.0278 h) on the baseline. A one-shot model with no clear saving (its
    paired differences straddle zero) is said to save nothing; the FLOP break-even is training FLOPs over the
    saving in query FLOPs."""
    from layerchop.report.efficiency import break_even_rows

    cfg = make_tiny_llama().config.to_diff_dict()
    small = make_tiny_llama(num_layers=3).config.to_diff_dict()

    def cell(prefill, step):  # 4 decode steps per query
        q = [p + 4 * d for p, d in zip(prefill, step)]
        return {"query_s": {"median": sorted(q)[1], "q1": min(q), "q3": max(q)}, "prefill_samples": prefill,
                "decode_samples": step}

    same = cell([0.01, 0.01, 0.01], [0.02, 0.02, 0.02])  # 90 ms each: faster every time, on the same work
    same["bound"] = {"decode": 1.0, "prefill": 1.0, "query_flops": 1.0}
    metrics = {"baseline": "dense", "query": {"batch": 1, "prompt": 10, "new_tokens": 4},
               "models": {"dense": {"config": cfg, "kernel": "dense"}, "chop": {"config": small, "kernel": "dense"},
                          "sparse": {"config": cfg, "kernel": "dense"}, "same": {"config": cfg, "kernel": "dense"}},
               "cells": [{"batch": 1, "prompt": 10, "models": {
                   "dense": cell([0.02, 0.02, 0.02], [0.02, 0.02, 0.02]),    # 100 ms each
                   "chop": cell([0.02, 0.02, 0.02], [0.01, 0.01, 0.01]),     # 60 ms each
                   "sparse": cell([0.02, 0.03, 0.01], [0.02, 0.02, 0.02]),   # 100, 110, 90 ms
                   "same": same}}]}
    c, s = make_tiny_llama().config, make_tiny_llama(num_layers=3).config
    flops_saving = query_flops(c, 1, 10, 4) - query_flops(s, 1, 10, 4)
    header, body = break_even_rows(metrics, {"chop": ("chop", {"device_s": 40.0, "flops": flops_saving * 2e6})},
                                   {"chop": "Chopped"})
    assert header[3:6] == ["Break-even (queries, by FLOPs)", "Break-even (queries, by time)",
                           "Serving at break-even (baseline device-h)"]
    rows = {r[0]: r for r in body}
    assert rows["Chopped"][2] == "40.0 ms [40.0–40.0] (40 %)" and rows["Chopped"][3] == "2M"
    assert rows["Chopped"][4] == "1k" and rows["Chopped"][5] == "0.0278"
    assert rows["sparse"][1] == "none (one-shot)" and rows["sparse"][4] == "–"
    assert rows["sparse"][2].endswith("within the noise") and rows["sparse"][3] == "no FLOP saving"
    # faster in every pair, but on the baseline's kernels, bytes and FLOPs: no saving is claimed
    assert rows["same"][2] == "10.0 ms [10.0–10.0] (10 %), the baseline's kernels and bytes: noise"
    assert rows["same"][4] == "–"
    # a trained model without a clear saving never breaks even
    _, body = break_even_rows(metrics, {"t": ("sparse", {"device_s": 40.0, "flops": 1e9})}, {})
    assert {r[0]: r for r in body}["t"][4] == "never (no clear saving)"


def test_table2_relative_drop_and_share_pruned(tmp_path):
    from layerchop.estimate import layer_params
    from layerchop.report.efficiency import QUOTED_TABLE2, relative_drop_table

    cfg = make_tiny_llama().config
    layers = 6 * layer_params(cfg)  # 56,064; outside: embeddings 9,600 + final norm 32
    total = layers + 300 * 32 + 32

    def metrics(acc_a, acc_b, nonzero):
        return {"eval/piqa/acc": 0.0, "eval/piqa/acc_norm": acc_a, "eval/heldout_lastword/acc": acc_b,
                "params": total, "nonzero_params": nonzero}

    dense = metrics(0.80, 0.60, total)
    rows = {"half": metrics(0.60, 0.45, total - layers // 2), "quarter": metrics(0.80, 0.53, total - layers // 4)}
    header, body, cols = relative_drop_table(rows, {"half": "Half", "quarter": "Quarter"}, dense, cfg)
    # each task's primary metric (heldout_lastword's acc_norm is absent here: its acc)
    assert cols == [("heldout_lastword", "acc"), ("piqa", "acc_norm")]
    by = {r[0]: r for r in body}
    # dense average (0.60 + 0.80) / 2 = 0.70 on the tasks present; half: 0.525 -> -25 %; quarter: 0.665 -> -5 %
    assert by["Half"][3] == "50.0" and by["Half"][4] == f"{100 * (layers // 2) / total:.1f}"
    assert by["Half"][6] == "-25.0 %" and by["Quarter"][6] == "-5.0 %" and by["Quarter"][3] == "25.0"
    assert [r[0] for r in body[2:]] == [q[0] for q in QUOTED_TABLE2]
    quoted = {r[0]: (r[2], r[6]) for r in body[2:]}
    assert quoted == {"Shortened LLaMA": ("35", "-16.0 %"), "SliceGPT": ("30", "-24.2 %"),
                      "LLM Surgeon": ("50", "-32.1 %"), "LayerChop (Just CHOP)": ("50", "-12.1 / -12.8 %")}
    # the dense model's own exact zeros are not prunable: 1,000 of them leave a half-chopped model at 50 %
    dense_z = dict(dense, nonzero_params=total - 1000)
    rows_z = {"half": metrics(0.60, 0.45, total - 1000 - (layers - 1000) // 2)}
    _, body_z, _ = relative_drop_table(rows_z, {"half": "Half"}, dense_z, cfg)
    assert body_z[0][3] == "50.0"
    with pytest.raises(ValueError, match="lacks one of the dense model's tasks"):
        relative_drop_table({"x": {"params": total}}, {"x": "X"}, dense, cfg)
