"""Evaluation: perplexity against a hand computation, lm-eval on offline tasks, the local PIQA mirror."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from layerchop.data.prepare import IGNORE_INDEX, PackedDataset
from layerchop.evaluate.harness import flat_task_metrics, piqa_rows_from_release, zero_shot
from layerchop.evaluate.perplexity import perplexity
from conftest import SHARED, short_piqa_mirror
from families import FAMILIES

REPO = Path(__file__).resolve().parents[1]


def test_perplexity_matches_hand_computed_nll(tiny_dir, tiny_prepared):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    got = perplexity(model, tiny_prepared, "val", batch_size=3)
    ds = PackedDataset(tiny_prepared, "val")
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            row = ds[i]
            logits = model(input_ids=row["input_ids"][None]).logits[0]
            target = row["labels"][1:]
            nll += F.cross_entropy(logits[:-1], target, ignore_index=IGNORE_INDEX, reduction="sum").item()
            n += int((target != IGNORE_INDEX).sum())
    assert got["tokens"] == n
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_zero_shot_offline_tasks_through_lm_eval(tiny_dir, tiny_prepared):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    out = zero_shot(model, tok, ["heldout_continuation", "heldout_lastword"], include_path=tiny_prepared / "tasks",
                    batch_size=4)
    assert out["n-samples"]["heldout_lastword"]["effective"] == 12
    flat = flat_task_metrics(out)
    assert set(flat) == {f"eval/{t}/{m}" for t in ("heldout_continuation", "heldout_lastword")
                         for m in ("n", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}
    for t in ("heldout_continuation", "heldout_lastword"):
        n = out["n-samples"][t]["effective"]
        assert flat[f"eval/{t}/n"] == n
        for m in ("acc", "acc_norm"):  # binomial: sqrt(p (1 - p) / n)
            p = flat[f"eval/{t}/{m}"]
            assert flat[f"eval/{t}/{m}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / n), rel=1e-12)
    # the same accuracies computed by hand from the task files (lm-eval's rule: the context's trailing spaces
    # move into the continuation, " " + choice scored as a sum of token log-probabilities; acc_norm divides by
    # the choice's length in characters): catches a wrong label, a task wired to other items or another model
    for task in ("heldout_continuation", "heldout_lastword"):
        acc, acc_norm = hand_accuracy(model, tok, tiny_prepared / "tasks" / f"{task}.jsonl")
        assert flat[f"eval/{task}/acc"] == pytest.approx(acc, abs=1e-9), task
        assert flat[f"eval/{task}/acc_norm"] == pytest.approx(acc_norm, abs=1e-9), task
    json.dumps(out)  # results.json must be serialisable


@torch.no_grad()
def hand_accuracy(model, tok, items_file) -> tuple[float, float]:
    hits, hits_norm, n = 0, 0, 0
    for line in open(items_file):
        doc = json.loads(line)
        lls = []
        for choice in doc["choices"]:
            context, continuation = doc["context"], " " + choice
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            ids = torch.tensor([ctx + cont])
            logp = F.log_softmax(model(input_ids=ids[:, :-1]).logits[0].float(), dim=-1)
            lls.append(float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))))
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i]))
        hits += best == doc["label"]
        hits_norm += best_norm == doc["label"]
        n += 1
    return hits / n, hits_norm / n


def test_unknown_task_names_the_key(tiny_dir, tiny_prepared):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with pytest.raises(ValueError, match=r"evaluate.tasks: 'no_such_task'"):
        zero_shot(model, AutoTokenizer.from_pretrained(tiny_dir), ["no_such_task"],
                  include_path=tiny_prepared / "tasks")


def test_piqa_release_format_conversion(piqa_dir):
    rows = piqa_rows_from_release(piqa_dir, "validation")
    assert len(rows) == 1838
    assert set(r["label"] for r in rows) == {0, 1}
    first = json.loads(open(piqa_dir / "valid.jsonl").readline())
    assert rows[0]["goal"] == first["goal"] and rows[0]["sol2"] == first["sol2"]


def test_lm_eval_cli_runs_on_a_saved_model_directory(tmp_path, tiny_dir, tiny_prepared):
    """``lm_eval --model hf`` loads the directory without this package."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_dir}",
           "--include_path", str(tiny_prepared / "tasks"), "--tasks", "heldout_lastword", "--device", "cpu",
           "--batch_size", "4", "--output_path", str(tmp_path / "res")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "heldout_lastword" in proc.stdout
    assert list(tmp_path.glob("res/**/results_*.json"))


@pytest.mark.slow
def test_standard_piqa_on_local_mirror_scores_above_chance(smollm2_dir, piqa_dir):
    """The standard ``piqa`` task (prompt, metrics) on the real validation items, offline."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    out = zero_shot(model, tok, ["piqa"], local_tasks={"piqa": str(piqa_dir)}, batch_size=16, limit=100)
    res = out["results"]["piqa"]
    assert out["n-samples"]["piqa"]["effective"] == 100
    assert out["configs"]["piqa"]["doc_to_text"] == "Question: {{goal}}\nAnswer:"  # the standard prompt
    # the mirror's converted file is named by the release it came from, not a temporary path (results.json reproduces)
    assert out["configs"]["piqa"]["dataset_kwargs"]["data_files"] == {"validation": f"{piqa_dir} (validation, converted)"}
    assert len(out["items"]) == 100 and {r["task"] for r in out["items"]} == {"piqa"}
    print(f"PIQA (100 items) acc={res['acc,none']:.3f} acc_norm={res['acc_norm,none']:.3f}")
    # chance is 0.5; SmolLM2-135M-Instruct scores ~0.67 acc_norm on the full split and 0.69 on these 100 items
    # (the same items and weights every run: deterministic, not a sample)
    assert res["acc_norm,none"] > 0.58


def test_perplexity_survives_a_token_with_a_logit_gap_of_120():
    """A damaged model gives some tokens a log-probability near -120: ``softmax(...).log()`` (torchmetrics'
    Perplexity) underflows to -inf there and the whole perplexity becomes inf; the NLL sums do not."""
    from torchmetrics.text import Perplexity

    from layerchop.evaluate.perplexity import TokenPerplexity

    V, T = 8, 100
    logits = torch.zeros(2, T, V)
    labels = torch.zeros(2, T, dtype=torch.long)
    logits[0, 0, 1] = 120.0  # token 0 wants class 0, the model puts 120 nats on class 1
    labels[1, T // 2:] = IGNORE_INDEX  # padding is not scored
    expected_nll = F.cross_entropy(logits.double().reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                   reduction="sum") / (T + T // 2)
    metric = TokenPerplexity()
    metric.update(logits[:1], labels[:1])
    metric.update(logits[1:], labels[1:])  # accumulates over batches
    got = float(metric.compute())
    assert math.isfinite(got) and got == pytest.approx(math.exp(float(expected_nll)), rel=1e-6)
    old = Perplexity(ignore_index=IGNORE_INDEX)
    old.update(logits, labels)
    assert math.isinf(float(old.compute()))  # the failure this replaces
    every_token_120 = TokenPerplexity()
    every_token_120.update(torch.tensor([[[0.0, 120.0]]]), torch.tensor([[0]]))
    assert float(every_token_120.compute()) == pytest.approx(math.exp(120.0), rel=1e-6)  # beyond float32


def test_task_index_is_narrow_only_when_it_holds_every_name_as_a_task(tmp_path, tiny_prepared, monkeypatch):
    """``task_manager_for``: lm-eval's ``piqa/`` folder plus the offline tasks are enough for ``piqa`` and the
    offline tasks (the same YAML as the full index); a group (its members may live in other folders), a task
    whose folder has another name (``arc_easy`` in ``arc/``) or an unknown name falls back to the full index;
    a task in ``include_path`` wins a name clash with lm-eval's, as in lm-eval's own order. The full index is
    stubbed (it takes ~6 s): the test checks which index is chosen and what the narrow one holds."""
    import lm_eval.tasks

    from layerchop.evaluate.harness import task_manager_for

    real, calls = lm_eval.tasks.TaskManager, []

    def recording(include_path=None, include_defaults=True, **kw):
        calls.append(include_defaults)
        return real(include_path=include_path, include_defaults=False, **kw)  # stub: no 6 s full index

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", recording)
    tm = task_manager_for(["piqa", "heldout_lastword"], tiny_prepared / "tasks")
    assert calls == [False]  # the narrow index sufficed
    assert str(tm.task_index["piqa"].yaml_path).endswith("lm_eval/tasks/piqa/piqa.yaml")
    assert tm.task_index["piqa"].cfg["doc_to_text"] == "Question: {{goal}}\nAnswer:"
    for names in (["portuguese_bench"], ["arc_easy"], ["no_such_task"], ["piqa", "no_such_task"]):
        calls.clear()
        task_manager_for(names, tiny_prepared / "tasks")
        assert calls[-1] is True, names  # fell back to the full index
    own = tmp_path / "tasks"
    own.mkdir()
    (own / "piqa.yaml").write_text("task: piqa\ndataset_path: json\noutput_type: multiple_choice\n"
                                   "test_split: test\ndoc_to_text: 'Mine: {{goal}}'\ndoc_to_target: label\n"
                                   "doc_to_choice: '{{[sol1, sol2]}}'\n")
    calls.clear()
    tm = task_manager_for(["piqa"], own)
    assert calls == [False] and tm.task_index["piqa"].yaml_path == own / "piqa.yaml"


def _embedded_params(tmp_path, **evaluate):
    """The repository's params.yaml (the embedded pipeline's), with ``evaluate`` keys overridden."""
    import yaml

    params = yaml.safe_load(open(REPO / "params.yaml"))
    params["evaluate"].update(evaluate)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_evaluate_stage_runs_the_local_piqa_mirror_with_item_counts(tmp_path, tiny_dir, tiny_prepared, piqa_dir,
                                                                     monkeypatch):
    """The embedded pipeline's evaluation stage, as ``dvc repro`` runs it (``layerchop evaluate`` from the
    repository root with its params.yaml: PIQA read in place from ../shared), reports every task with its item
    count and binomial standard error."""
    from layerchop.cli import main
    from layerchop.io import read_json

    monkeypatch.chdir(REPO)
    default = yaml_load(REPO / "params.yaml")["evaluate"]
    model = tmp_path / "tiny-long"  # the tiny model with a context that holds PIQA's longest item
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    tiny_dir = model
    assert "piqa" in default["tasks"] and (REPO / default["local_tasks"]["piqa"]).resolve() == piqa_dir.resolve()
    # float32 throughout, so that the hand rescoring below can be exact (the repo's bf16 autocast is tested on its
    # own: test_bf16_autocast_keeps_the_output_head_in_fp32_and_stays_near_fp32)
    pfile = _embedded_params(tmp_path, limit=24, ppl_max_sequences=2, autocast=None)
    out = tmp_path / "eval"
    assert main(["evaluate", "--params", str(pfile), "--model", str(tiny_dir), "--data", str(tiny_prepared),
                 "--out", str(out)]) == 0
    metrics, results = read_json(out / "metrics.json"), read_json(out / "results.json")
    assert {t: metrics[f"eval/{t}/n"] for t in default["tasks"]} == {
        "heldout_continuation": 12, "heldout_lastword": 12, "piqa": 24}  # the tiny tasks hold 12 items
    assert results["configs"]["piqa"]["doc_to_text"] == "Question: {{goal}}\nAnswer:"  # the standard task
    assert results["configs"]["piqa"]["dataset_path"] == "json" and results["skipped_tasks"] == {}
    for t in default["tasks"]:
        p, n = metrics[f"eval/{t}/acc_norm"], metrics[f"eval/{t}/n"]
        assert metrics[f"eval/{t}/acc_norm_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / n))
    # summary.json (dvc metrics show): the headline numbers, in percent, from the same metrics
    summary = read_json(out / "summary.json")
    assert sorted(summary) == ["in_domain", "in_domain_se", "piqa", "piqa_n", "piqa_se", "test_ppl", "val_ppl"]
    assert summary["piqa"] == round(100 * metrics["eval/piqa/acc_norm"], 2) and summary["piqa_n"] == 24
    assert summary["piqa_se"] == round(100 * metrics["eval/piqa/acc_norm_stderr"], 2)
    assert summary["val_ppl"] == round(metrics["val/ppl"], 3)
    assert summary["in_domain"] == round(100 * (metrics["eval/heldout_continuation/acc"]  # each task's primary metric
                                                + metrics["eval/heldout_lastword/acc_norm"]) / 2, 2)
    # the stage scored PIQA's first 24 validation items with their labels from valid-labels.lst, in the standard
    # prompt: the same accuracies by hand from the release files
    labels = (piqa_dir / "valid-labels.lst").read_text().split()[:24]
    items = tmp_path / "piqa24.jsonl"
    with open(items, "w") as f:
        for line, label in zip(open(piqa_dir / "valid.jsonl"), labels):
            it = json.loads(line)
            f.write(json.dumps({"context": f"Question: {it['goal']}\nAnswer:", "choices": [it["sol1"], it["sol2"]],
                                "label": int(label)}) + "\n")
    acc, acc_norm = hand_accuracy(AutoModelForCausalLM.from_pretrained(tiny_dir).eval(),
                                  AutoTokenizer.from_pretrained(tiny_dir), items)
    assert (metrics["eval/piqa/acc"], metrics["eval/piqa/acc_norm"]) == pytest.approx((acc, acc_norm), abs=1e-9)


def test_evaluate_stage_without_shared_skips_piqa_and_says_so(tmp_path, tiny_dir, tiny_prepared, capsys):
    """Where ../shared is absent, the embedded pipeline's evaluation stage runs, says so, and its results have
    no PIQA (rather than failing); a mirror that is not optional is still an error before any work."""
    from layerchop.cli import main
    from layerchop.io import read_json

    missing = tmp_path / "no-shared" / "benchmarks" / "piqa"
    pfile = _embedded_params(tmp_path, limit=24, ppl_max_sequences=2, local_tasks={"piqa": str(missing)})
    assert main(["evaluate", "--params", str(pfile), "--model", str(tiny_dir), "--data", str(tiny_prepared),
                 "--out", str(tmp_path / "eval2")]) == 0
    said = capsys.readouterr().out
    assert f"skipping piqa: its local data {missing} does not exist" in said
    metrics2, results2 = read_json(tmp_path / "eval2" / "metrics.json"), read_json(tmp_path / "eval2" / "results.json")
    assert not any(k.startswith("eval/piqa/") for k in metrics2) and set(results2["skipped_tasks"]) == {"piqa"}
    assert metrics2["eval/heldout_lastword/n"] == 12 and "eval/heldout_continuation/acc_stderr" in metrics2
    # not optional: the missing mirror is an error before any work (tested in test_bad_input too)
    pfile = _embedded_params(tmp_path, optional_tasks=[], local_tasks={"piqa": str(missing)})
    assert main(["evaluate", "--params", str(pfile), "--model", str(tiny_dir), "--data", str(tiny_prepared),
                 "--out", str(tmp_path / "eval3")]) == 2
    assert "evaluate.local_tasks.piqa: " in capsys.readouterr().err and not (tmp_path / "eval3").exists()


def test_benchmarks_stage_records_which_local_data_is_there(tmp_path, capsys):
    """``layerchop benchmarks`` (always re-run by DVC; the evaluations depend on its output): a local mirror's
    presence and the sha256 of its files, so that a benchmark appearing or changing re-runs the evaluations."""
    import hashlib

    from layerchop.cli import main
    from layerchop.io import read_json

    mirror = short_piqa_mirror(tmp_path / "piqa")
    pfile = _embedded_params(tmp_path, local_tasks={"piqa": str(mirror)})
    assert main(["benchmarks", "--params", str(pfile), "--out", str(tmp_path / "b.json")]) == 0
    first = read_json(tmp_path / "b.json")
    assert first == {"piqa": {"path": str(mirror), "present": True, "sha256": {
        f: hashlib.sha256((mirror / f).read_bytes()).hexdigest() for f in ("valid-labels.lst", "valid.jsonl")}}}
    (mirror / "valid-labels.lst").write_text("1\n" * 8)  # the data changes: so does the record
    assert main(["benchmarks", "--params", str(pfile), "--out", str(tmp_path / "b.json")]) == 0
    assert read_json(tmp_path / "b.json")["piqa"]["sha256"]["valid-labels.lst"] != first["piqa"]["sha256"][
        "valid-labels.lst"]
    pfile = _embedded_params(tmp_path, local_tasks={"piqa": str(tmp_path / "absent")})
    assert main(["benchmarks", "--params", str(pfile), "--out", str(tmp_path / "b.json")]) == 0
    assert read_json(tmp_path / "b.json") == {"piqa": {"path": str(tmp_path / "absent"), "present": False,
                                                       "sha256": {}}}
    assert "[benchmarks] piqa: " + str(tmp_path / "absent") + " is absent" in capsys.readouterr().out


def yaml_load(path):
    import yaml

    return yaml.safe_load(open(path))


def test_bf16_autocast_keeps_the_output_head_in_fp32_and_stays_near_fp32(tiny_dir, tiny_prepared, monkeypatch):
    """``evaluate.autocast: bfloat16``: the decoder's matmuls run in bf16 (lm-eval's own mixed precision for the tasks,
    torch autocast for perplexity) while the output head gets float32 input and runs in float32; the numbers stay
    close to the float32 evaluation's, and the model is unchanged afterwards."""
    import dataclasses

    from layerchop.config import EvaluateConfig
    from layerchop.evaluate.suite import evaluate_model, fp32_output_head

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    seen = []
    head = model.get_output_embeddings()
    q = model.model.layers[0].self_attn.q_proj
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: seen.append((name, i[0].dtype, o.dtype)))
             for name, m in (("head", head), ("q_proj", q))]
    ids = torch.randint(3, 300, (2, 16))
    with torch.no_grad(), fp32_output_head(model, "cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert ("q_proj", torch.float32, torch.bfloat16) in seen  # autocast is on for the decoder
    assert ("head", torch.float32, torch.float32) in seen  # ... and off for the head
    assert "forward" not in vars(head)  # restored
    marker = lambda x: "instance forward"  # noqa: E731  (an instance-level forward, as accelerate's hooks set)
    head.forward = marker
    with fp32_output_head(model, "cpu"):
        assert head.forward is not marker
    assert head.forward is marker
    base = EvaluateConfig(tasks=["heldout_continuation", "heldout_lastword"], local_tasks={}, optional_tasks=[],
                          ppl_max_sequences=8, limit=12)
    m32, _ = evaluate_model(tiny_dir, tiny_prepared, base)
    # the same dtypes inside the stage's own path: perplexity, then lm-eval's requests (its mixed precision)
    import layerchop.evaluate.suite as suite

    phase, dtypes = ["ppl"], set()
    real_load, real_zero_shot = suite.load_model, suite.zero_shot

    def load_with_hooks(*args, **kwargs):
        m = real_load(*args, **kwargs)
        for name, mod in (("head", m.get_output_embeddings()), ("q_proj", m.model.layers[0].self_attn.q_proj)):
            mod.register_forward_hook(lambda mod, i, o, name=name: dtypes.add((phase[0], name, i[0].dtype, o.dtype)))
        return m

    def zero_shot_tasks(*args, **kwargs):
        phase[0] = "tasks"
        return real_zero_shot(*args, **kwargs)

    monkeypatch.setattr(suite, "load_model", load_with_hooks)
    monkeypatch.setattr(suite, "zero_shot", zero_shot_tasks)
    m16, _ = evaluate_model(tiny_dir, tiny_prepared, dataclasses.replace(base, autocast="bfloat16"))
    for ph in ("ppl", "tasks"):
        assert {d[1:] for d in dtypes if d[0] == ph} == {("q_proj", torch.float32, torch.bfloat16),
                                                        ("head", torch.float32, torch.float32)}, (ph, dtypes)
    assert m16["val/ppl"] == pytest.approx(m32["val/ppl"], rel=0.02) and m16["val/ppl"] != m32["val/ppl"]
    for t in ("heldout_continuation", "heldout_lastword"):
        assert abs(m16[f"eval/{t}/acc"] - m32[f"eval/{t}/acc"]) <= 2 / 12  # at most two of the 12 items flip


def _samples(make, model, tok, tasks, include, local, limit, batch_size=8):
    """lm-eval's ``simple_evaluate`` on ``tasks`` with the LM ``make`` builds: (results, samples)."""
    import tempfile

    import lm_eval

    from layerchop.evaluate.harness import check_tasks, local_mirror_config, seed_everything

    tm = check_tasks(tasks, include, local)
    with tempfile.TemporaryDirectory() as work:
        specs = [local_mirror_config(tm, n, local[n], Path(work)) if n in local else n for n in tasks]
        seed_everything(1234)
        out = lm_eval.simple_evaluate(model=make(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu"),
                                      tasks=specs, num_fewshot=0, limit=limit, task_manager=tm, bootstrap_iters=0,
                                      log_samples=True, random_seed=1234, numpy_random_seed=1234,
                                      torch_random_seed=1234, fewshot_random_seed=1234)
    return out["results"], out["samples"]


@pytest.mark.parametrize("dtype", ["float32"])  # float64 exactness: every family's tiny model, the test below
def test_shared_context_scoring_equals_lm_evals_own_on_the_pipelines_tasks(smollm2_dir, tiny_prepared, dtype,
                                                                          monkeypatch):
    """Scoring an item's context once (:mod:`layerchop.evaluate.shared_context`) gives lm-eval's ``HFLM``
    log-likelihood for every request of the pipeline's tasks, on the real SmolLM2: the in-domain tasks as ``prepare``
    builds them and, where ``../shared`` holds them, real PIQA items. In float32 they differ by rounding of the order
    of lm-eval's own change when only its batch size changes, with the same greedy flags and accuracies (in float64
    they agree to 1e-9: the family test below, on every supported architecture)."""
    from lm_eval.models.huggingface import HFLM

    from layerchop.evaluate import shared_context
    from layerchop.evaluate.shared_context import loglik_differences, shared_context_lm

    shared = []  # the requests scored on a shared context (PIQA's two choices after a short question are not)
    score = shared_context.score_groups
    monkeypatch.setattr(shared_context, "score_groups",
                        lambda lm, groups: shared.extend(c for _, cs in groups for c in cs) or score(lm, groups))
    tasks, local = ["heldout_continuation", "heldout_lastword"], {}
    if (SHARED / "benchmarks" / "piqa" / "valid.jsonl").exists():
        tasks, local = tasks + ["piqa"], {"piqa": str(SHARED / "benchmarks" / "piqa")}
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=getattr(torch, dtype)).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    args = (model, tok, tasks, tiny_prepared / "tasks", local, 8)
    res_a, a = _samples(HFLM, *args)
    res_b, b = _samples(shared_context_lm, *args)
    n, worst, rel, greedy = loglik_differences(a, b)
    assert n == sum(len(s["resps"]) for t in a for s in a[t]) >= 8 * 4 * 2  # every request compared
    assert len(shared) == 8 * 4 * 2  # the in-domain tasks' 4 choices on one context each
    assert greedy == 0
    assert {t: r.get("acc,none") for t, r in res_a.items()} == {t: r.get("acc,none") for t, r in res_b.items()}
    if dtype == "float64":
        assert worst < 1e-9, (worst, rel)
    else:
        _, own, own_rel, _ = loglik_differences(a, _samples(HFLM, *args[:-1], 8, batch_size=1)[1])
        # rounding of the same order as lm-eval's own when only its batch size changes (over 1000 requests of the
        # real tasks: 6.1e-5 absolute, 1.3e-5 relative here against lm-eval's own 3.1e-5, 5.0e-6; LOG 2026-12-07)
        assert worst <= max(4 * own, 1e-5) and rel <= max(4 * own_rel, 1e-5), (worst, rel, own, own_rel)


@pytest.mark.parametrize("family", ["mistral-wide", *FAMILIES])
def test_shared_context_scoring_equals_lm_evals_own_in_every_family(tiny_dir, tiny_prepared, family, monkeypatch):
    """Every supported decoder family (tests/families.py, in float64): the shared-context scores equal lm-eval's
    ``HFLM`` to 1e-9 on the in-domain tasks. The families with a 4-token sliding window go through lm-eval's own path
    (a padded batch is longer than the window: no shared request); a Mistral with a window wider than the tasks
    (``mistral-wide``) shares, so the sliding-window masks of a shared batch are exercised too."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from families import family_config, family_model
    from layerchop.evaluate import shared_context
    from layerchop.evaluate.shared_context import loglik_differences, shared_context_lm, sliding_window

    if family == "mistral-wide":
        config = family_config("mistral")
        config.sliding_window = 120  # wider than most shared batches of these tasks, narrower than the model's 128
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = family_model(family)
    model = model.double().eval()
    shared = []
    score = shared_context.score_groups
    monkeypatch.setattr(shared_context, "score_groups",
                        lambda lm, groups: shared.extend(c for _, cs in groups for c in cs) or score(lm, groups))
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    args = (model, tok, ["heldout_continuation", "heldout_lastword"], tiny_prepared / "tasks", {}, 6)
    _, a = _samples(HFLM, *args)
    _, b = _samples(shared_context_lm, *args)
    n, worst, _, greedy = loglik_differences(a, b)
    assert n == 6 * 4 * 2 and greedy == 0 and worst < 1e-9, (family, worst)
    window = sliding_window(model.config)
    if window is not None and window < 16:
        assert shared == []  # every padded batch reaches a 4-token window: lm-eval's path
    else:
        assert len(shared) > 0, family  # the shared path ran (requests too long for the model excepted)
