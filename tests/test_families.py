"""Every stage's model code on every supported decoder family (tiny random models of each family's own config class,
``tests/families.py``): chop, calibration, the layer-selection scores, the structured shrink, the FSDP2 wrap, the
phase hand-over and the plan's architecture figures."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from families import FAMILIES, MIXED, WINDOW, family_config, family_ids, family_model

REPO_ROOT = Path(__file__).resolve().parents[1]


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


REFUSED_STRUCTURED = {"phi3": "fused", "olmo2": "across all heads"}


@pytest.mark.parametrize("family", FAMILIES)
def test_structured_shrink_computes_the_masked_model_or_is_refused(tmp_path, family):
    """``layerchop shrink``'s export (channels and head groups removed) gives the masked model's logits, saved and
    reloaded as the family's own class; Phi-3 (fused projections) and OLMo-2 (queries normalised across heads) are
    refused with the reason."""
    from transformers import AutoModelForCausalLM

    from layerchop.prune.structured import build, refusal, shrink, structured_masks

    model, ids = family_model(family), family_ids(seq_len=3 * WINDOW)
    config, why = model.config, refusal(model.config)
    if family in REFUSED_STRUCTURED:
        assert why is not None and REFUSED_STRUCTURED[family] in why, why
    else:
        assert why is None, why
    if family in REFUSED_STRUCTURED:
        return
    g = torch.Generator().manual_seed(1)
    keep_ch = {i: torch.randperm(64, generator=g)[:40].sort().values for i in range(6)}
    keep_g = {i: torch.tensor([i % 2]) for i in range(6)}
    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters())
    with torch.no_grad():
        for name, m in structured_masks(config, keep_ch, keep_g).items():
            params[name][m] = 0
    new_config, state = shrink(masked.state_dict(), config, keep_ch, keep_g)
    small = build(new_config, state).eval()
    assert type(small) is type(model) and new_config.intermediate_size == 40 and new_config.num_key_value_heads == 1
    want = _logits(masked, ids)
    scale = float(want.abs().max())
    torch.testing.assert_close(_logits(small, ids), want, rtol=0, atol=1e-5 * scale)
    small.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), ids), want, rtol=0,
                               atol=1e-5 * scale)


def test_dimchop_columns_prune_fused_projections_as_one_matrix():
    """Phi-3 holds q/k/v in ``qkv_proj`` and gate/up in ``gate_up_proj``: DimChop's seven projections are its four
    matrices; naming only part of a fused matrix is refused, naming the key."""
    from layerchop.config import DIMCHOP_MATRICES
    from layerchop.train.dimchop import target_names

    model = family_model("phi3")
    names = target_names(model, list(DIMCHOP_MATRICES))
    assert sorted({n.rsplit(".", 2)[-2] for n in names}) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert len(names) == 4 * 6
    with pytest.raises(ValueError, match=r"dimchop.matrices=\['q_proj', 'o_proj'\]: Phi3ForCausalLM holds"):
        target_names(model, ["q_proj", "o_proj"])
    assert len(target_names(model, ["o_proj"])) == 6


def test_fsdp2_wraps_each_familys_decoder_layer_and_trains_the_same():
    """The FSDP2 wrap (one process, gloo) shards each family's own decoder-layer class, the one transformers lists as
    not to be split; a training step's loss and gradients equal the unwrapped model's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from layerchop.prune.chop import decoder_layers
    from layerchop.train.sharding import apply_fsdp2, local

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for family in FAMILIES:
            model, ids = family_model(family).train(), family_ids(n=2, seq_len=2 * WINDOW)
            layer_class = type(decoder_layers(model)[0]).__name__
            assert layer_class in model._no_split_modules, (family, layer_class)
            plain = copy.deepcopy(model)
            apply_fsdp2(model, mesh, None, None)
            assert all(isinstance(layer, FSDPModule) for layer in decoder_layers(model)), family
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            want = plain(input_ids=ids, labels=ids, use_cache=False).loss
            want.backward()
            assert loss.item() == pytest.approx(want.item(), rel=1e-6), family
            grads = dict(plain.named_parameters())
            for name, p in model.named_parameters():
                torch.testing.assert_close(local(p.grad), grads[name].grad, rtol=1e-5, atol=1e-7, msg=f"{family} {name}")
    finally:
        dist.destroy_process_group()


def _family_dirs(root, family, tokenizer_dir, remove):
    """The family's tiny model and its chopped copy (``remove`` gone), saved as the download and chop stages do."""
    from transformers import AutoTokenizer

    from layerchop.io import save_model_dir
    from layerchop.prune.chop import chop_layers

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dense, chopped = root / f"{family}-dense", root / f"{family}-chopped"
    model = family_model(family)
    save_model_dir(model, tok, dense, metadata={"stage": "test", "source": family})
    chop_layers(model, remove)
    save_model_dir(model, tok, chopped, metadata={"removed_layers": list(remove), "chopped_from": str(dense)})
    return dense, chopped


@pytest.mark.parametrize("family, mode", [(f, "gradual") for f in FAMILIES] + [(f, "warm") for f in MIXED])
def test_phase_hand_over_carries_the_kept_layers_weights_and_adam_moments(tmp_path, tiny_dir, tiny_prepared,
                                                                         monkeypatch, family, mode):
    """The train stage's phases on each family: at every hand-over the smaller model receives exactly the kept layers'
    weights and Adam moments of the model before it (renumbered), and computes that model's function with the
    removed layers skipped, each kept layer with its own attention kind (gradual: layers 2 then 3 go, one step
    apart; warm start: one step on the dense model, then both go)."""
    from transformers import AutoModelForCausalLM

    from layerchop.config import TrainConfig
    from layerchop.prune.chop import chop_state_keys, skipping
    from layerchop.train import sharding
    from layerchop.train.run import run

    dense_dir, chopped_dir = _family_dirs(tmp_path, family, tiny_dir, [2, 3])
    ids = family_ids(n=2, seq_len=3 * WINDOW)
    sources, checks = [], []
    take_w, take_o = sharding.local_model_state, sharding.local_optimizer_state
    load_w, load_o = sharding.load_local_model_state, sharding.load_local_optimizer_state

    def spy_take_w(model):
        state = take_w(model)
        sources.append({"config": copy.deepcopy(model.config), "weights": {k: v.clone() for k, v in state.items()}})
        return state

    def spy_take_o(model, opt):
        state = take_o(model, opt)
        sources[-1]["optimizer"] = {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()}
                                    for k, v in state.items()}
        return state

    def spy_load_w(model, state):
        load_w(model, state)
        checks.append({"config": copy.deepcopy(model.config), "weights": {k: v.clone() for k, v in state.items()},
                       "logits": _logits(model.eval(), ids)})

    def spy_load_o(model, opt, state):
        checks[-1]["optimizer"] = {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()}
                                   for k, v in state.items()}  # the optimizer updates its moments in place
        return load_o(model, opt, state)

    monkeypatch.setattr(sharding, "local_model_state", spy_take_w)
    monkeypatch.setattr(sharding, "local_optimizer_state", spy_take_o)
    monkeypatch.setattr(sharding, "load_local_model_state", spy_load_w)
    monkeypatch.setattr(sharding, "load_local_optimizer_state", spy_load_o)
    cfg = TrainConfig(token_budget=3 * 4 * 32, batch_size=4, accumulate=1, lr=3e-3, warmup_steps=2,
                      precision="32-true", accelerator="cpu", ckpt_every=0, val_batches=1, seed=0,
                      warm_start_steps=1 if mode == "warm" else 0)
    kwargs = {"chop_every_tokens": 4 * 32} if mode == "gradual" else {"warm_start": True}
    run(chopped_dir, tiny_prepared, tmp_path / "out", cfg, run_dir=tmp_path / "run", **kwargs)
    monkeypatch.undo()

    removals = [[2], [2]] if mode == "gradual" else [[2, 3]]  # in the numbering of the model handing over
    assert len(checks) == len(removals) and len(sources) >= len(removals)
    for source, check, remove in zip(sources, checks, removals):
        before = AutoModelForCausalLM.from_config(source["config"])
        before.load_state_dict(source["weights"], strict=False)
        before.tie_weights()
        n = source["config"].num_hidden_layers
        kept = [i for i in range(n) if i not in remove]
        for key in ("layer_types", "no_rope_layers"):
            if getattr(source["config"], key, None) is not None:
                assert getattr(check["config"], key) == [getattr(source["config"], key)[i] for i in kept], key
        want_w = chop_state_keys(source["weights"], kept)
        assert set(check["weights"]) <= set(want_w) and set(want_w) - set(check["weights"]) <= {"lm_head.weight"}
        for k, v in check["weights"].items():
            assert torch.equal(v, want_w[k]), k
        want_o = chop_state_keys(source["optimizer"], kept)
        assert set(check["optimizer"]) == set(want_o) and want_o
        for k, st in want_o.items():
            for moment in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(check["optimizer"][k][moment], st[moment]), (k, moment)
        with skipping(before.eval(), remove):
            want = _logits(before, ids)
        torch.testing.assert_close(check["logits"], want, rtol=0, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_reads_any_familys_config_json_and_counts_its_parameters(tmp_path, family):
    """``layerchop plan`` takes the architecture from a ``config.json`` (source ``local``: the model directory, no
    weights needed); its parameter counts (the model's, one layer's, the projections') equal the instantiated
    model's, and its memory model gives a positive estimate for each family."""
    import torch.nn as nn

    from layerchop.config import ModelSourceConfig, TrainConfig
    from layerchop.data.sources import known_config
    from layerchop.estimate import count_params, layer_params, projection_entries, train_memory
    from layerchop.io import num_params
    from layerchop.prune.chop import decoder_layers

    model = family_model(family)
    model.config.save_pretrained(tmp_path)
    config = known_config(ModelSourceConfig(source="local", path=str(tmp_path)))
    assert type(config) is type(model.config)
    assert count_params(config) == num_params(model)
    layer = decoder_layers(model)[0]
    assert layer_params(config) == sum(p.numel() for p in layer.parameters())
    assert projection_entries(config) == 6 * sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
    memory = train_memory(config, TrainConfig(batch_size=2, accelerator="cpu"), 64)
    assert memory.total > memory.state > 0


def test_plan_of_a_users_qwen25_7b_profile_from_its_config_json(tmp_path, capsys):
    """A user's Qwen2.5-7B (grouped-query attention, 152k vocabulary, biased q/k/v) as a ``local`` model directory
    holding only its ``config.json``: ``layerchop plan`` exits 0 and counts 7,615,616,512 parameters, the count of the
    model instantiated from that config (the published figure is 7.61B)."""
    import json
    import shutil

    import yaml

    from layerchop.cli import main
    from layerchop.data.sources import model_config
    from layerchop.io import num_params
    from layerchop.train.flops import meta_model

    repo = REPO_ROOT
    shutil.copy(repo / "experiments" / "qwen2.5-7b" / "config.json", tmp_path / "config.json")
    params = yaml.safe_load((repo / "experiments" / "qwen2.5-7b" / "params.yaml").read_text())
    params["download"]["model"].update(source="local", path=str(tmp_path), config=None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rc = main(["plan", "--params", str(tmp_path / "params.yaml"), "--dvc", str(repo / "dvc.yaml"), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    result = json.loads(out.out)
    instantiated = num_params(meta_model(model_config(tmp_path, "path")))
    assert result["model"]["dense_params"] == instantiated == 7_615_616_512
    arm = next(s for s in result["stages"] if s["stage"] == "train@layerchop")
    assert arm["processes"] == 32 and arm["warm_steps"] == 500


@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_of_a_model_by_itself_gives_its_own_loss_and_zero_gaps(family):
    """The distillation losses compute the logits chunk by chunk from the final norm and the head: with the student a
    copy of the teacher, the LM term equals the family's own loss (Granite's logit scaling included) and the KL,
    hidden-state and attention terms are zero; a soft-capped head (Gemma-2) is refused in one line."""
    from layerchop.config import DistillConfig
    from layerchop.train.distill import DistillStudent, check_distill_family, distill_step, freeze, teacher_capture

    teacher = family_model(family)
    if getattr(teacher.config, "final_logit_softcapping", None):
        with pytest.raises(ValueError, match="final_logit_softcapping=.* not supported"):
            check_distill_family(teacher.config, teacher.config)
        return
    check_distill_family(teacher.config, teacher.config)
    ids = family_ids(n=2, seq_len=2 * WINDOW)
    cfg = DistillConfig(chunk_tokens=5)
    mapping = list(range(teacher.config.num_hidden_layers))
    student = DistillStudent(copy.deepcopy(teacher), teacher.config.hidden_size, mapping, cfg)
    freeze(teacher)
    total, terms = distill_step(student, teacher, teacher_capture(teacher, mapping, cfg), ids, ids.clone())
    with torch.no_grad():
        want = teacher(input_ids=ids, labels=ids, use_cache=False).loss
    assert float(terms["lm"]) == pytest.approx(float(want), rel=1e-5)
    for name in ("kl", "hid", "att", "emb"):
        assert abs(float(terms[name])) < 1e-6, (name, float(terms[name]))


def _stage(tmp_path, overrides: dict, *argv):
    from test_cli import _run

    return _run(tmp_path, {"evaluate.optional_tasks": [], "evaluate.local_tasks": {}, **overrides}, *argv)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_other_stage_runs_on_the_family(tmp_path, tiny_dir, tiny_prepared, family):
    """The stage entry points the property tests above do not already run, on each family (tiny budgets): download of
    a ``local`` model directory, a data-driven chop (angular), DimChop training (Phi-3: its fused projections),
    evaluation (perplexity and the in-domain tasks) and the latency benchmark. Each exits 0 and writes its output."""
    import json

    from transformers import AutoTokenizer

    from layerchop.io import read_metadata, save_model_dir

    src = tmp_path / "mine"
    save_model_dir(family_model(family), AutoTokenizer.from_pretrained(tiny_dir), src, metadata={"stage": "test"})
    d = lambda name: str(tmp_path / name)  # noqa: E731
    steps = [
        ({"download.model.source": "local", "download.model.path": str(src)}, "download", "model", "--out", d("dense")),
        ({"chop.layout": "angular", "chop.num_remove": 2, "chop.num_calibration": 4, "chop.batch_size": 2},
         "chop", "--model", d("dense"), "--data", str(tiny_prepared), "--out", d("chopped")),
        ({"train.precision": "32-true", "train.batch_size": 4, "train.token_budget": 2 * 4 * 32, "train.warmup_steps": 1,
          "train.val_batches": 1, "train.ckpt_every": 0, "train.val_every": 0},
         "train", "--objective", "dimchop", "--init", d("dense"), "--data", str(tiny_prepared), "--out", d("dimchop"),
         "--run-dir", d("run")),
        ({"evaluate.tasks": ["heldout_continuation"], "evaluate.ppl_max_sequences": 4, "evaluate.batch_size": 2,
          "evaluate.limit": 4, "evaluate.autocast": None},
         "evaluate", "--model", d("chopped"), "--data", str(tiny_prepared), "--out", d("eval")),
        ({"bench.batch_sizes": [1], "bench.prompt_lengths": [8], "bench.new_tokens": 2, "bench.repeats": 1,
          "bench.warmup": 0, "bench.query_prompt": 8, "bench.threads": 1},
         "bench", "--model", f"dense={d('dense')}", "--model", f"layerchop={d('chopped')}", "--out", d("bench.json")),
    ]
    for overrides, *argv in steps:
        proc = _stage(tmp_path, overrides, *argv)
        assert proc.returncode == 0, (argv[0], proc.stderr[-2000:])
    assert read_metadata(tmp_path / "dense")["model_type"] == family_model(family).config.model_type
    assert read_metadata(tmp_path / "chopped")["removed_layers"] and len(read_metadata(tmp_path / "chopped")["removed_layers"]) == 2
    assert read_metadata(tmp_path / "dimchop")["stage"].startswith("train")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["layers"] == 4 and 1 < metrics["val/ppl"] < 1e4 and 1 < metrics["test/ppl"] < 1e4
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert sorted(bench["models"]) == ["dense", "layerchop"] and bench["cells"]


def test_the_tested_families_are_the_ones_the_docs_table_lists():
    """``layerchop.families.TESTED`` (what the code calls tested), the tiny models here and the family x stage table
    in docs/bring-your-own.md name the same ``model_type``s."""
    import re

    from layerchop.families import TESTED

    assert {family_config(f).model_type for f in FAMILIES} == set(TESTED)
    table = (REPO_ROOT / "docs" / "bring-your-own.md").read_text()
    listed = set(re.findall(r"^\| (?!family)[^|]*\(`([a-z0-9_]+)`\) \|", table, flags=re.M))
    assert listed == set(TESTED)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsegpt_and_magnitude_prune_every_linear_of_every_layer(family):
    """SparseGPT at 4:8 and magnitude at 50 % unstructured through the one calibration driver: every linear of every
    decoder layer (Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` included) gets its pattern, the weights under the
    mask are zero, and nothing outside the layers (embeddings, head, norms) is touched."""
    from layerchop.prune.calibrate import prune_model
    from layerchop.prune.chop import decoder_layers
    from layerchop.prune.sparsity import Pattern

    for method, pattern in (("sparsegpt", "4:8"), ("magnitude", "unstructured:0.5")):
        model, ids = family_model(family), family_ids(n=4, seq_len=2 * WINDOW)
        before = {n: p.clone() for n, p in model.named_parameters()}
        masks, stats = prune_model(model, ids, method, Pattern.parse(pattern), batch_size=2)
        linears = {f"model.layers.{i}.{n}.weight" for i, layer in enumerate(decoder_layers(model))
                   for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        assert set(masks) == linears, family
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            assert not params[name][mask].any(), name
            if pattern == "4:8":
                assert (mask.view(mask.shape[0], -1, 8).sum(-1) == 4).all(), name
        assert stats["overall_pruned_fraction"] == pytest.approx(0.5, abs=1e-3)
        for name, p in params.items():
            if name not in masks:
                assert torch.equal(p, before[name]), name


def test_plan_refuses_what_a_familys_stage_would_refuse(tmp_path, capsys):
    """``layerchop plan`` runs each arm's method checks on the architecture: a Gemma-2 model (soft-capped head) is
    refused at the distillation arm, naming the stage, before any stage would have run."""
    import yaml

    from layerchop.cli import main

    family_model("gemma2").config.save_pretrained(tmp_path / "gemma2")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["download"]["model"].update(source="local", path=str(tmp_path / "gemma2"))
    params["chop"]["num_remove"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rc = main(["plan", "--params", str(tmp_path / "params.yaml"), "--dvc", str(REPO_ROOT / "dvc.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "dvc.yaml fig4_train@distill: --objective distill" in err and "final_logit_softcapping" in err


def test_the_one_node_profile_asks_the_main_question_within_200_gpu_hours(capsys):
    """experiments/one-node: the whole graph (every arm, not only the main ones) within ~200 GPU-hours on one node
    of 8 GPUs, every GPU stage within 80 GB; Qwen2.5-7B's profile plans its 7.62B-parameter model."""
    import json

    from layerchop.cli import main

    assert main(["plan", "--params", str(REPO_ROOT / "experiments" / "one-node" / "params.yaml"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["totals"]["gpu_hours"] <= 200
    trained = [s for s in plan["stages"] if s["stage"].startswith(("train@", "fig4_train@"))]
    assert {s["processes"] for s in trained} == {8} and all(s["rank_gb"] <= 80 for s in trained)
    assert {"train@layerchop", "train@dense_cpt", "train@sparsegpt-2of4_cpt", "fig4_train@distill"} <= {
        s["stage"] for s in trained}
    assert plan["model"]["dense_params"] == 1_235_814_400
