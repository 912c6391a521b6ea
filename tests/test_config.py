"""Configs never drift from code: params files build, dvc.yaml stages parse and point at real files."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from layerchop.cli import build_parser
from layerchop.config import SECTIONS, load_params, section

REPO = Path(__file__).resolve().parents[1]
PARAM_FILES = [REPO / "params.yaml", *sorted((REPO / "experiments").glob("*/params.yaml"))]


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_params_file_builds_every_section(path):
    params = load_params(path)
    assert set(params) == set(SECTIONS)
    for name in SECTIONS:
        section(name, params)


def test_unknown_and_bad_keys_name_the_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['chop.layuot'\]"):
        section("chop", {"chop": {"layuot": "input"}})
    with pytest.raises(ValueError, match=r"chop.layout='diagonal'"):
        section("chop", {"chop": {"layout": "diagonal"}})
    with pytest.raises(ValueError, match=r"prepare.seq_len=1"):
        section("prepare", {"prepare": {"seq_len": 1}})
    with pytest.raises(ValueError, match=r"prepare.tasks.num_choices=1"):
        section("prepare", {"prepare": {"tasks": {"num_choices": 1}}})
    with pytest.raises(ValueError, match=r"evaluate.limit=0"):
        section("evaluate", {"evaluate": {"limit": 0}})
    with pytest.raises(ValueError, match=r"evaluate.optional_tasks=\['piqa'\] is invalid: 'piqa' is not in evaluate.tasks"):
        section("evaluate", {"evaluate": {"tasks": ["heldout_lastword"]}})
    with pytest.raises(ValueError, match=r"evaluate.optional_tasks=\['arc_easy'\] is invalid: 'arc_easy' is not a key "
                                         r"of evaluate.local_tasks"):
        section("evaluate", {"evaluate": {"tasks": ["arc_easy"], "optional_tasks": ["arc_easy"]}})
    with pytest.raises(ValueError, match=r"download.corpus.source='wikipedia'"):
        section("download", {"download": {"corpus": {"source": "wikipedia"}}})
    with pytest.raises(ValueError, match=r"evaluate.autocast='float16'"):
        section("evaluate", {"evaluate": {"autocast": "float16"}})
    with pytest.raises(ValueError, match=r"evaluate.autocast='bfloat16' is invalid: autocast needs evaluate.dtype"):
        section("evaluate", {"evaluate": {"autocast": "bfloat16", "dtype": "bfloat16"}})
    with pytest.raises(ValueError, match=r"table6.layouts='diagonal'"):
        section("table6", {"table6": {"layouts": ["input", "diagonal"]}})
    with pytest.raises(ValueError, match=r"table6.layouts=\['ppl', 'ppl'\] is invalid: lists a layout twice"):
        section("table6", {"table6": {"layouts": ["ppl", "ppl"]}})
    with pytest.raises(ValueError, match=r"figure2.lr=0"):
        section("figure2", {"figure2": {"lr": 0}})
    with pytest.raises(ValueError, match=r"figure6.every_tokens\[0\]=1.5 is invalid: must be an integer"):
        section("figure6", {"figure6": {"every_tokens": [1.5]}})
    with pytest.raises(ValueError, match=r"figure6.every_tokens=0 is invalid: each entry must be a whole number"):
        section("figure6", {"figure6": {"every_tokens": [4096, 0]}})
    with pytest.raises(ValueError, match=r"figure6.every_tokens=\[4096, 4096\] is invalid: lists a schedule twice"):
        section("figure6", {"figure6": {"every_tokens": [4096, 4096]}})
    with pytest.raises(ValueError, match=r"figure6.token_budget=0 is invalid"):
        section("figure6", {"figure6": {"token_budget": 0}})
    with pytest.raises(ValueError, match=r"chop.num_calibration=0"):
        section("chop", {"chop": {"num_calibration": 0}})
    assert section("chop", {"chop": {"layout": "block-influence"}}).layout == "block-influence"


from layerchop.pipeline import expand as _expand, interpolate as _interpolate_params  # noqa: E402


def test_dvc_stages_parse_and_reference_existing_code():
    dvc = yaml.safe_load(open(REPO / "dvc.yaml"))
    parser = build_parser()
    params = load_params(REPO / "params.yaml")
    for name, stage in dvc["stages"].items():
        for key, st in _expand(stage, params):
            argv = shlex.split(_interpolate_params(st["cmd"], params))
            assert argv[0] == "layerchop", name
            parser.parse_args(argv[1:])  # exits on unknown arguments
            for dep in st.get("deps", []):
                if dep.startswith("src/"):
                    assert (REPO / dep).exists(), f"{name}@{key}: {dep}"
            for p in st.get("params", []):
                node = params
                for part in p.split("."):
                    assert part in node, f"{name}@{key}: param {p} is not in params.yaml"
                    node = node[part]


def test_every_evaluated_model_is_produced_by_a_stage():
    """evaluate@X reads data/models/X (and the bench its --model directories): some stage must write it."""
    dvc = yaml.safe_load(open(REPO / "dvc.yaml"))
    params = load_params(REPO / "params.yaml")
    outs, needed = set(), set()
    for name, stage in dvc["stages"].items():
        for key, st in _expand(stage, params):
            for o in st.get("outs", []):
                outs.add(o if isinstance(o, str) else next(iter(o)))
            if name in ("evaluate", "oneshot_evaluate", "layout_evaluate", "curve"):
                argv = shlex.split(_interpolate_params(st["cmd"], params))
                for flag in ("--model", "--final", "--snapshots", "--init", "--like"):
                    if flag in argv:
                        needed.add(argv[argv.index(flag) + 1])
            if name == "bench":  # --model NAME=DIR, repeated
                argv = shlex.split(_interpolate_params(st["cmd"], params))
                models = [argv[i + 1].partition("=")[2] for i, a in enumerate(argv) if a == "--model"]
                assert len(models) >= 4, models
                needed.update(models)
    assert len(needed) > 20 and needed <= outs, sorted(needed - outs)


def _keys(node, prefix=""):
    if isinstance(node, dict) and not (prefix.endswith("rows") or prefix.endswith("local_tasks")
                                       or prefix.endswith("labels") or prefix.endswith("jobs")
                                       or prefix in ("arms.trained", "arms.seeds", "figure4.arms", "lr_sweep.arms",
                                                     "lr_sweep.runs", "long.arms")):  # names: a profile's content
        return {k for key, v in node.items() for k in _keys(v, f"{prefix}.{key}" if prefix else key)} | {prefix}
    return {prefix}


def test_rehearsal_is_the_paper_scale_file_key_for_key():
    paper = load_params(REPO / "experiments" / "paper-scale" / "params.yaml")
    rehearsal = load_params(REPO / "experiments" / "rehearsal" / "params.yaml")
    assert _keys(rehearsal) == _keys(paper)
    # and both name every key the code knows (no key silently falls back to a default)
    assert _keys(paper) == _keys(load_params(REPO / "params.yaml"))
    t = section("train", rehearsal)
    assert (t.strategy, t.launcher, t.simulate_nodes, t.num_nodes, t.devices) == ("fsdp", "torchrun", True, 2, 2)
    assert (t.fsdp_param_dtype, t.fsdp_reduce_dtype, t.activation_checkpointing) == ("bfloat16", "float32", True)
    assert t.warm_start_steps > 0 and t.accumulate > 1 and t.max_restarts >= 1


def _flat(node, prefix=""):
    if isinstance(node, dict):
        return {k: v for key, val in node.items() for k, v in _flat(val, f"{prefix}.{key}" if prefix else key).items()}
    return {prefix: node}


def test_the_quick_profile_is_the_default_cut_down_and_nothing_else():
    """experiments/quick (README command 1's quick check) is params.yaml with the main table's chain made small:
    every other value is the default's, so a change to params.yaml that the quick profile misses fails here."""
    default = load_params(REPO / "params.yaml")
    quick = load_params(REPO / "experiments" / "quick" / "params.yaml")
    a, b = _flat(default), _flat(quick)
    replicas = set(default["arms"]["replicas"])
    seeds_of = {k for k in a if k.startswith(("arms.seeds.", "figure4.arms.distill-seed"))}
    seeds_of |= {k for k in a if k.split(".")[:2] == ["arms", "trained"] and k.split(".")[2] in replicas}
    cut = {"prepare.tasks.num_items", "train.token_budget", "train.warmup_steps", "train.ckpt_every",
           "evaluate.limit", "arms.replicas"}
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == cut | seeds_of
    assert quick["arms"]["replicas"] == [] and quick["arms"]["seeds"] == {}
    assert b["train.token_budget"] < a["train.token_budget"] and b["evaluate.limit"] == 200
    t = section("train", quick)
    assert t.warm_start_steps <= t.warmup_steps  # the shared warm start stays valid


def _train_arms(params: dict):
    """Every training stage of dvc.yaml with this params file: (name, parsed arguments)."""
    dvc = yaml.safe_load(open(REPO / "dvc.yaml"))
    parser = build_parser()
    for name in ("train", "fig4_train", "fig2_train", "layout_train", "fig6_train", "fig3_train", "lr_sweep",
                 "long_train"):
        for key, st in _expand(dvc["stages"][name], params):
            yield f"{name}@{key}" if key else name, parser.parse_args(
                shlex.split(_interpolate_params(st["cmd"], params))[1:])


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_training_stage_of_every_params_file_fits_its_budget(path):
    """The plan checks that need no data, for every train stage dvc.yaml runs with this file: the warm start
    and the LR warmup fit every arm's budget, only the LayerChop arms warm-start, and (for a streamed corpus)
    the download budget covers the training tokens."""
    import dataclasses

    from layerchop.data.sources import known_config
    from layerchop.prune.chop import removed_indices
    from layerchop.train.plan import depth_config, plan_steps

    params = load_params(path)
    dense = known_config(section("download", params).model)
    assert dense is not None, f"{path}: no known architecture for download.model"
    chop = section("chop", params)
    removed = removed_indices(dense.num_hidden_layers, layout=chop.layout, num_remove=chop.num_remove,
                              indices=chop.indices)
    chopped = depth_config(dense, [i for i in range(dense.num_hidden_layers) if i not in removed])
    kept = [i for i in range(dense.num_hidden_layers) if i not in removed]
    seq_len = section("prepare", params).seq_len
    corpus = section("download", params).corpus
    warm_arms = []
    for arm, args in _train_arms(params):
        cfg = section("train", params)
        if args.flop_budget is not None:
            cfg = dataclasses.replace(cfg, token_budget=None, flop_budget=args.flop_budget)
        if args.token_budget is not None:
            cfg = dataclasses.replace(cfg, token_budget=args.token_budget, flop_budget=None)
        init = chopped if args.init.endswith(("chopped", "scratch-init")) else dense
        every = (round(args.chop_every_tokens / (cfg.batch_size * seq_len * cfg.accumulate * cfg.devices
                                                 * cfg.num_nodes)) if args.chop_every_tokens else 0)
        steps = plan_steps(cfg, seq_len, init, objective=args.objective, warm_steps=cfg.warm_start_steps
                           if args.warm_start else 0, dense_config=dense, teacher_config=dense,
                           distill_cfg=section("distill", params), mapping=kept, removed=removed, chop_every=every)
        if every:  # plan_steps refuses a schedule whose last removal leaves the chopped model no step
            assert steps.removal_steps[-1] < steps.total_steps, arm
        assert steps.total_steps > cfg.warmup_steps, arm
        if args.warm_start:
            warm_arms.append(arm)
        if corpus.token_budget is not None:  # a streamed corpus: the train split must cover the budget
            prep = section("prepare", params)
            train_tokens = corpus.token_budget * (1 - prep.val_fraction - prep.test_fraction)
            assert steps.total_steps * steps.tokens_per_step <= train_tokens * cfg.max_data_passes, arm
    layouts = section("table6", params).layouts
    chop = section("chop", params)  # chop.layout's row of Table 6 is the main arm's: the table6 stage refuses it twice
    assert chop.indices is not None or chop.layout not in layouts
    replicas = {r for rs in section("arms", params).seeds.values() for r in rs}  # LayerChop's train their own warm step
    sweep = [f"lr_sweep@{k}" for k, r in section("lr_sweep", params).runs.items() if r.arm == "layerchop"]
    assert sorted(warm_arms) == sorted(["fig4_train@layerchop", "train@layerchop"]
                                       + [f"layout_train@{x}" for x in layouts]
                                       + [f"train@{r}" for r in replicas if r.startswith("layerchop-")]
                                       + sweep + [f"long_train@{k}" for k in section("long", params).arms
                                                  if k == "layerchop"])
    # the one-shot N:M patterns of the prune matrix divide every projection's input width
    assert yaml.safe_load(open(REPO / "dvc.yaml"))["stages"]["prune"]["matrix"]["pattern"] == "${prune.patterns}"
    patterns = section("prune", params).patterns
    head_dim = getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads
    for m in (int(p.split("of")[1]) for p in patterns):
        for width in (dense.hidden_size, dense.intermediate_size, dense.num_attention_heads * head_dim):
            assert width % m == 0, (m, width)


def test_budgets_that_do_not_fit_are_refused_naming_the_keys():
    from transformers import LlamaConfig

    from layerchop.config import TrainConfig
    from layerchop.data.sources import LLAMA2_7B
    from layerchop.train.plan import plan_steps

    dense = LlamaConfig(**LLAMA2_7B)
    base = dict(batch_size=4, accumulate=16, devices=8, num_nodes=4, warmup_steps=2000, launcher="slurm")
    # the old paper-scale Figure 4 budget: ~1,200 steps of LayerChop, all of them in warmup
    with pytest.raises(ValueError, match=r"train.warmup_steps=2000 does not fit .*train.flop_budget=1.1e\+20"):
        plan_steps(TrainConfig(token_budget=None, flop_budget=1.1e20, **base), 2048, dense)
    with pytest.raises(ValueError, match=r"train.warm_start_steps=500 uses the whole budget \(train.token_budget="):
        plan_steps(TrainConfig(token_budget=500 * 4 * 16 * 32 * 2048, warm_start_steps=500, **base), 2048, dense,
                   warm_steps=500, dense_config=dense)


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_figure2_scratch_arm_trains_as_many_tokens_as_the_layerchop_arm(path):
    """Figure 2 compares equal token budgets: the scratch arm (no warm start, ``figure2.flop_budget``) and Figure 4's
    LayerChop arm (whose warm-start steps cost the dense model's FLOPs) plan the same steps and tokens."""
    import dataclasses

    from layerchop.data.sources import known_config
    from layerchop.prune.chop import removed_indices
    from layerchop.train.plan import depth_config, plan_steps

    params = load_params(path)
    dense = known_config(section("download", params).model)
    chop = section("chop", params)
    removed = removed_indices(dense.num_hidden_layers, layout=chop.layout, num_remove=chop.num_remove,
                              indices=chop.indices)
    chopped = depth_config(dense, [i for i in range(dense.num_hidden_layers) if i not in removed])
    arms = dict(_train_arms(params))
    seq_len, cfg = section("prepare", params).seq_len, section("train", params)
    planned = {}
    for arm in ("fig4_train@layerchop", "fig2_train"):
        args = arms[arm]
        c = dataclasses.replace(cfg, token_budget=None, flop_budget=args.flop_budget)
        s = plan_steps(c, seq_len, chopped, warm_steps=cfg.warm_start_steps if args.warm_start else 0,
                       dense_config=dense)
        planned[arm] = (s.total_steps, s.total_steps * s.tokens_per_step)
    assert planned["fig2_train"] == planned["fig4_train@layerchop"], planned
    assert arms["fig2_train"].snapshots == arms["fig4_train@layerchop"].snapshots
    # Figure 6: each gradual schedule trains as many tokens as Figure 4's LayerChop arm (its all-at-once curve)
    fig6 = section("figure6", params)
    for every in fig6.every_tokens:
        args = arms[f"fig6_train@{every}"]
        c = dataclasses.replace(cfg, token_budget=args.token_budget, flop_budget=None)
        assert args.token_budget == fig6.token_budget and args.chop_every_tokens == every
        s = plan_steps(c, seq_len, chopped)
        assert (s.total_steps, s.total_steps * s.tokens_per_step) == planned["fig4_train@layerchop"], every
        assert args.snapshots == arms["fig4_train@layerchop"].snapshots
    # Figure 3: DimChop (from the dense model) at Figure 4's FLOP budget, and at the LayerChop arm's tokens; the
    # ramp of every arm has steps, and each arm's masks are of the structure its name says
    fig3, dimchop = section("figure3", params), section("dimchop", params)
    assert fig3.flop_budget == section("figure4", params).flop_budget
    for arm, structure, budget in (("dimchop", "columns", "flop"), ("structured", "channels-heads", "flop"),
                                   ("dimchop-tokens", "columns", "token")):
        args = arms[f"fig3_train@{arm}"]
        assert args.objective == "dimchop" and args.structure == structure and not args.warm_start, arm
        assert args.init.endswith("dense") and args.snapshots == arms["fig4_train@layerchop"].snapshots, arm
        if budget == "flop":
            assert args.flop_budget == fig3.flop_budget and args.token_budget is None, arm
            c = dataclasses.replace(cfg, token_budget=None, flop_budget=args.flop_budget)
        else:
            assert args.token_budget == fig3.token_budget and args.flop_budget is None, arm
            c = dataclasses.replace(cfg, token_budget=args.token_budget, flop_budget=None)
        s = plan_steps(c, seq_len, dense, objective="dimchop")
        if budget == "token":
            assert (s.total_steps, s.total_steps * s.tokens_per_step) == planned["fig4_train@layerchop"], arm
        start, end = dimchop.ramp_steps(s.total_steps)
        assert 0 <= start < end <= s.total_steps, arm


def test_training_stages_depend_on_every_train_key_but_how_the_job_starts():
    """Each stage that trains lists every train key (a new one is a dependency the day it is added) but the
    launch-only ones: switching train.launcher, its rendezvous, restarts or loader workers re-runs nothing."""
    from layerchop.train.plan import LAUNCH_KEYS, train_keys

    stages = {name: s.get("do", s) for name, s in yaml.safe_load(open(REPO / "dvc.yaml"))["stages"].items()}
    trains = {name: s for name, s in stages.items() if " ".join(s["cmd"].split()).startswith("layerchop train ")
              and "--warm-only" not in s["cmd"]}
    assert set(trains) == {"train", "fig4_train", "fig3_train", "layout_train", "fig2_train", "fig6_train",
                           "lr_sweep", "long_train"}
    for name, stage in trains.items():
        listed = [p for p in stage["params"] if isinstance(p, str) and p.split(".")[0] == "train"]
        assert listed == [f"train.{k}" for k in train_keys()], name
    assert train_keys() and not set(train_keys()) & set(LAUNCH_KEYS) and "launcher" in LAUNCH_KEYS
    for name, stage in stages.items():
        assert not {p for p in stage.get("params", []) if isinstance(p, str)} & (
            {"train"} | {f"train.{k}" for k in LAUNCH_KEYS}), name


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_the_equal_flops_sparsegpt_arm_stops_at_figure4s_budget(path):
    """SparseGPT 2:4 + continued pretraining at LayerChop's FLOPs: its arm's --flop-budget is Figure 4's budget, the
    LayerChop arm's (written in the flags, which DVC cannot interpolate from another key)."""
    params = load_params(path)
    args = dict(_train_arms(params))["train@sparsegpt-2of4_cpt_flops"]
    assert args.flop_budget == section("figure4", params).flop_budget and args.init.endswith("sparsegpt-2of4")


TRAINING_OF = {"train": "", "fig4_train": "fig4-", "fig2_train": "fig2-scratch"}  # stage -> its model's name (prefix)


@pytest.mark.parametrize("path", [p for p in PARAM_FILES if section("arms", load_params(p)).seeds],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_seed_replicas_train_as_their_arm_with_only_the_seed_changed(path):
    """``arms.seeds``: each replica's training is its arm's (method, start, teacher, warm start, budget in steps and
    tokens) with ``--seed k`` for a k of its own, other than ``train.seed``; a LayerChop replica trains its own warm step
    (the shared ``data/warm`` is seed 0's and refuses another seed)."""
    import dataclasses

    from layerchop.data.sources import known_config
    from layerchop.prune.chop import removed_indices
    from layerchop.train.plan import depth_config, plan_steps

    params = load_params(path)
    seeds = section("arms", params).seeds
    arms = {}
    for stage, args in _train_arms(params):
        name, _, key = stage.partition("@")
        if name in TRAINING_OF:
            arms[TRAINING_OF[name] + key] = args
    dense = known_config(section("download", params).model)
    chop = section("chop", params)
    removed = removed_indices(dense.num_hidden_layers, layout=chop.layout, num_remove=chop.num_remove,
                              indices=chop.indices)
    chopped = depth_config(dense, [i for i in range(dense.num_hidden_layers) if i not in removed])
    cfg, seq_len = section("train", params), section("prepare", params).seq_len

    def planned(args):
        c = dataclasses.replace(cfg, **({"token_budget": None, "flop_budget": args.flop_budget} if args.flop_budget
                                        else {"token_budget": args.token_budget or cfg.token_budget}))
        init = chopped if args.init.endswith("chopped") else dense
        s = plan_steps(c, seq_len, init, objective=args.objective, warm_steps=cfg.warm_start_steps
                       if args.warm_start else 0, dense_config=dense, teacher_config=dense,
                       distill_cfg=section("distill", params), mapping=[i for i in range(dense.num_hidden_layers)
                                                                        if i not in removed])
        return s.total_steps, s.total_steps * s.tokens_per_step

    same = ("objective", "init", "teacher", "warm_start", "balance", "structure", "lr", "chop_every_tokens")
    used = {}
    for base, replicas in seeds.items():
        assert base in arms, f"arms.seeds.{base}: no training stage writes data/models/{base}"
        for r in replicas:
            a, b = arms[base], arms[r]
            assert {k: getattr(b, k) for k in same} == {k: getattr(a, k) for k in same}, (base, r)
            assert a.seed is None and b.seed is not None and b.seed != cfg.seed, (base, r)
            assert planned(b) == planned(a), (base, r)
            assert used.setdefault((base, b.seed), r) == r, f"arms.seeds.{base}: seed {b.seed} twice"
            assert b.warm_from is None or b.seed == cfg.seed, r


@pytest.mark.parametrize("path", [p for p in PARAM_FILES if section("lr_sweep", load_params(p)).runs],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_lr_sweep_runs_train_as_their_arm_with_only_the_lr_changed(path):
    """``lr_sweep.runs``: each run is its arm's training (method, start, teacher, budget, warm start) at another peak
    LR, and the arm's record is the one its training stage writes."""
    params = load_params(path)
    sweep = section("lr_sweep", params)
    arms, records = {}, {}
    for stage, args in _train_arms(params):
        name, _, key = stage.partition("@")
        if name in TRAINING_OF:
            arms[TRAINING_OF[name] + key] = args
            records[TRAINING_OF[name] + key] = args.metrics
    cfg = section("train", params)
    # with the same method and start, the same budget and warm start plan the same steps and tokens
    same = ("objective", "init", "teacher", "balance", "structure", "seed", "chop_every_tokens", "flop_budget",
            "token_budget", "warm_start")
    sweeps = {k: a for k, a in _train_arms(params) if k.startswith("lr_sweep@")}
    for name, run in sweep.runs.items():
        a, b = arms[run.arm], sweeps[f"lr_sweep@{name}"]
        assert sweep.arms[run.arm] == records[run.arm], run.arm  # the record its training stage writes
        assert {k: getattr(b, k) for k in same} == {k: getattr(a, k) for k in same}, name
        assert b.lr == run.lr != (a.lr or cfg.lr), name  # the arm itself runs at its own --lr, or train.lr


def test_the_shared_warm_start_stage_depends_on_the_train_keys_its_steps_use():
    """dvc.yaml's warm_start stage re-runs for a train key its dense steps depend on, and for no other (a
    budget change must not recompute 500 dense steps): its params are exactly train.warm_train_keys()."""
    from layerchop.train.plan import warm_train_keys

    stage = yaml.safe_load(open(REPO / "dvc.yaml"))["stages"]["warm_start"]
    assert stage["params"] == [f"train.{k}" for k in warm_train_keys()]
    assert "token_budget" not in warm_train_keys() and "warm_start_steps" in warm_train_keys()


def test_the_long_runs_are_the_main_arms_with_a_longer_budget():
    """``long.arms``: each long run trains as the arm of the same name in ``arms.trained`` (start, flags, warm start),
    only longer, and its first snapshot falls near the other figures' 80 steps."""
    params = load_params(REPO / "params.yaml")
    long, trained = section("long", params), section("arms", params).trained
    assert set(long.arms) == {"layerchop", "sparsegpt-2of4_cpt", "dense_cpt"}
    for name, arm in long.arms.items():
        assert (arm.init, arm.flags, arm.warm) == (trained[name].init, trained[name].flags, trained[name].warm), name
    train = section("train", params)
    tokens_per_step = train.batch_size * train.accumulate * section("prepare", params).seq_len
    steps = long.token_budget // tokens_per_step
    assert long.token_budget % tokens_per_step == 0 and steps > 5 * train.token_budget // tokens_per_step
    assert 70 <= steps // (long.snapshots + 1) <= 90  # the first snapshot (evenly spaced) near step 80
