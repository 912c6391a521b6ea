"""Report: the main table is computed from metrics files only."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
import subprocess
import sys
from pathlib import Path

import yaml

from layerchop.report.compare import control_sentence
from layerchop.report.tables import accuracy_caption, latex, markdown, missing_tasks, table_rows

REPO = Path(__file__).resolve().parents[1]


def _metrics(params, layers, tokens, val, test, accs, n=None):
    """A metrics dict; ``n``: items per task, which adds the item counts and binomial standard errors the
    evaluation stage writes."""
    m = {"params": params, "layers": layers, "tokens_trained": tokens, "val/ppl": val, "test/ppl": test}
    for task, (acc, acc_norm) in accs.items():
        m[f"eval/{task}/acc"] = acc
        m[f"eval/{task}/acc_norm"] = acc_norm
        if n is not None:
            m[f"eval/{task}/n"] = n
            m[f"eval/{task}/acc_stderr"] = math.sqrt(acc * (1 - acc) / n)
            m[f"eval/{task}/acc_norm_stderr"] = math.sqrt(acc_norm * (1 - acc_norm) / n)
    return m


def test_table_rows_average_uses_each_tasks_primary_metric():
    rows = [
        {"label": "Dense", "metrics": _metrics(134_515_008, 30, 0, 43.2, 41.0,
                                               {"piqa": (0.60, 0.66), "winogrande": (0.52, 0.50)})},
        {"label": "Chopped", "metrics": _metrics(81_413_568, 15, 0, 5.1e8, 4.0e8,
                                                 {"piqa": (0.50, 0.52), "winogrande": (0.49, 0.51)})},
    ]
    header, body = table_rows(rows)
    assert header[-3:] == ["general: piqa (acc_norm)", "general: winogrande (acc)", "general avg"]
    assert body[0] == ["Dense", "134.5", "30", "0", "43.20", "41.00", "66.0", "52.0", "59.0"]
    assert body[1][4:6] == ["5.1e+08", "4e+08"]
    assert body[1][-1] == "50.5"
    md = markdown(header, body, "caption")
    assert md.count("\n|") == 3 and md.endswith("caption\n")
    tex = latex(header, body, "budget 100%")
    assert r"\begin{tabular}{lrrrrrrrr}" in tex and r"budget 100\%" in tex


def test_in_domain_and_general_columns_carry_item_counts_and_standard_errors():
    accs = {"heldout_continuation": (0.40, 0.30), "heldout_lastword": (0.20, 0.50), "piqa": (0.60, 0.62)}
    dense = {"name": "dense", "label": "Dense", "metrics": _metrics(1e8, 30, 0, 90.0, 80.0, accs, n=200)}
    cpt = {"name": "dense_cpt", "label": "Dense + CPT", "metrics": _metrics(
        1e8, 30, 10, 60.0, 55.0, {**accs, "piqa": (0.55, 0.58)}, n=200)}
    cpt["metrics"]["eval/piqa/n"] = 1000  # a task with more items than the others
    cpt["metrics"]["eval/piqa/acc_norm_stderr"] = math.sqrt(0.58 * 0.42 / 1000)
    header, body = table_rows([dense, cpt])
    assert header[6:] == ["in-domain: heldout_continuation (acc, n=200)", "in-domain: heldout_lastword (acc_norm, n=200)",
                          "in-domain avg", "general: piqa (acc_norm, n=200–1000)"]
    # per cell: 100 p ± 100 sqrt(p (1 - p) / n); the average's error: sqrt(se1^2 + se2^2) / 2
    se_c, se_l = math.sqrt(0.4 * 0.6 / 200), math.sqrt(0.5 * 0.5 / 200)
    assert body[0][6:] == ["40.0 ± 3.5", "50.0 ± 3.5", f"45.0 ± {100 * math.hypot(se_c, se_l) / 2:.1f}",
                           "62.0 ± 3.4"]
    assert body[1][-1] == "58.0 ± 1.6"
    # the control's change on each group; without per-item results, z from two independent errors (said so)
    se_piqa = math.hypot(math.sqrt(0.62 * 0.38 / 200), math.sqrt(0.58 * 0.42 / 1000))
    assert control_sentence([dense, cpt]) == (
        "Continued pretraining alone (the control against the dense model): general 58.0 vs 62.0 (-4.0 points, "
        f"z = {-4.0 / (100 * se_piqa):.1f}, unpaired: a tie); in-domain 45.0 vs 45.0 (+0.0 points, z = 0.0, unpaired: "
        "a tie).")
    assert control_sentence([dense]) == ""
    assert missing_tasks([dense, cpt], ["heldout_lastword", "piqa", "arc_easy"]) == {"arc_easy": None}
    del dense["metrics"]["eval/piqa/acc"], dense["metrics"]["eval/piqa/acc_norm"]
    for k in ("n", "acc_stderr", "acc_norm_stderr"):
        del dense["metrics"][f"eval/piqa/{k}"]
    assert missing_tasks([dense, cpt], ["piqa"]) == {"piqa": ["Dense"]}  # a row scored without the task
    caption = accuracy_caption(SimpleNamespace(source="wikipedia-vital"), [dense, cpt],
                               SimpleNamespace(tasks=["heldout_lastword", "piqa"]))
    assert "piqa has no result for: Dense (–)." in caption and "Not evaluated" not in caption


def test_report_stage_from_metrics_files(tmp_path):
    rows = {"dense": "Dense", "layerchop": "LayerChop"}
    params = yaml.safe_load(open(REPO / "params.yaml"))
    params["arms"].update(seeds={}, replicas=[])  # one seed (params.yaml's replicas are not here)
    params["report"]["rows"] = rows
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for name, layers in (("dense", 30), ("layerchop", 15)):
        d = tmp_path / "eval" / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_metrics(1e8, layers, 10, 50.0, 40.0, {"heldout_lastword": (0.5, 0.6)})))
    cmd = [sys.executable, "-m", "layerchop.cli", "report", "--params", str(tmp_path / "params.yaml"),
           "--eval", str(tmp_path / "eval"), "--tables", str(tmp_path / "tables")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "tables" / "main.md").read_text()
    assert "| LayerChop | 100.0 | 15 |" in md
    assert "removes 15 of 30 decoder layers (layout `input`: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])" in md
    # the caption names the recovery corpus and what the accuracy columns measure, and the tasks not evaluated
    assert "Recovery corpus: the lead sections of English Wikipedia's Vital Articles" in md
    assert "| in-domain: heldout_lastword (acc_norm) |" in md
    assert "Not evaluated: heldout_continuation, piqa (no model has a result;" in md
    assert (tmp_path / "tables" / "main.tex").exists()


def test_figure1_stage_from_metrics_files(tmp_path):
    params = yaml.safe_load(open(REPO / "params.yaml"))
    params["arms"].update(seeds={}, replicas=[])  # one seed (params.yaml's replicas are not here)
    params["report"]["oneshot_rows"] = {"dense": "Dense", "layerchop": "LayerChop"}
    params["prune"].update(methods=["wanda"], patterns=["2of4"])  # its row follows, labelled by the method
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for name, layers, nonzero, ppl in (("dense", 30, 134e6, 90.0), ("layerchop", 15, 81e6, 180.0),
                                       ("oneshot/wanda-2of4", 30, 81.1e6, 340.0)):
        d = tmp_path / "eval" / name
        d.mkdir(parents=True)
        m = _metrics(134.5e6 if layers == 30 else 81.4e6, layers, 0, ppl, ppl / 2, {"heldout_lastword": (0.5, 0.6)})
        m["nonzero_params"] = nonzero
        (d / "metrics.json").write_text(json.dumps(m))
    cmd = [sys.executable, "-m", "layerchop.cli", "figure1", "--params", str(tmp_path / "params.yaml"),
           "--eval", str(tmp_path / "eval"), "--tables", str(tmp_path / "t"), "--figures", str(tmp_path / "f")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "t" / "oneshot.md").read_text()
    assert "| Wanda 2:4 | 134.5 | 81.1 | 30 | 0 | 340.00 | 170.00 | 60.0 |" in md
    assert "Not evaluated: heldout_continuation, piqa (no model has a result;" in md
    for ext in ("png", "pdf"):
        assert (tmp_path / "f" / f"fig1_oneshot_vs_layerchop.{ext}").stat().st_size > 1000


def test_figure1_reads_without_a_legend_to_decode(monkeypatch):
    """What Figure 1 shows, read from the drawn figure: axis labels in words (the tasks in each panel's title, not
    in the y label), perplexity ticks as plain numbers (not 2×10¹), one legend for both panels naming every row."""
    from layerchop.report import oneshot

    drawn = []
    monkeypatch.setattr(oneshot, "save_figure", lambda fig, stem: drawn.append(fig))
    accs = {"heldout_continuation": (0.6, 0.5), "heldout_lastword": (0.5, 0.7), "piqa": (0.6, 0.62)}
    rows = [{"name": name, "label": label, "metrics": _metrics(1e8, 30, 0, ppl, ppl, accs, n=200)}
            for name, label, ppl in (("dense", "Dense", 19.5), ("layerchop", "LayerChop", 53.5),
                                     ("oneshot/wanda-2of4", "Wanda 2:4", 172.0))]
    oneshot.figure1(rows, Path("unused"))
    [fig] = drawn
    fig.canvas.draw()
    left, right = fig.axes
    assert (left.get_ylabel(), right.get_ylabel()) == ("in-domain accuracy (%)", "general accuracy (%)")
    assert left.get_title().replace("\n", " ") == ("In-domain: mean of held-out continuation (accuracy), held-out last "
                                                   "word (length-normalised accuracy)")
    assert right.get_title() == "General: PIQA (length-normalised accuracy)"
    ticks = [t.get_text() for t in left.get_xticklabels() if t.get_text()]
    assert "20" in ticks and "50" in ticks and "100" in ticks and not any("10^" in t or "×" in t for t in ticks), ticks
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["Dense", "LayerChop", "Wanda 2:4"]
    assert not left.get_legend() and not right.get_legend()


def test_figure4_draws_the_dense_reference(monkeypatch):
    from layerchop.report import compute

    drawn = []
    monkeypatch.setattr(compute, "save_figure", lambda fig, stem: drawn.append(fig))
    cols = [("heldout_lastword", "acc_norm")]
    point = {"step": 1, "tokens": 10, "flops": 1e12, "device_s": 3.0,
             "metrics": _metrics(1e8, 15, 10, 60.0, 60.0, {"heldout_lastword": (0.5, 0.6)}, n=200)}
    arms = [{"label": "LayerChop", "series": compute.arm_series({"points": [point]}, None, cols)}]
    dense = {**compute.arm_series({"points": []}, _metrics(1e8, 30, 0, 19.5, 19.5, {"heldout_lastword": (0.9, 0.95)},
                                                            n=200), cols)[0], "label": "dense (uncompressed)"}
    compute.figure4(arms, Path("unused"), "A100", reference=dense)
    [fig] = drawn
    lines = [(ax, line) for ax in fig.axes for line in ax.get_lines() if line.get_label() == "dense (uncompressed)"]
    assert len(lines) == 4  # perplexity and in-domain accuracy, against FLOPs and against device-hours
    assert {round(line.get_ydata()[0], 3) for _, line in lines} == {19.5, 95.0}
    assert all(line.get_linestyle() == ":" for _, line in lines)


def test_figure2_draws_the_dense_reference_and_says_so(monkeypatch):
    from layerchop.report import compute

    drawn = []
    monkeypatch.setattr(compute, "save_figure", lambda fig, stem: drawn.append(fig))
    cols = [("heldout_lastword", "acc_norm"), ("piqa", "acc_norm")]
    point = {"step": 1, "tokens": 10, "flops": 1e12, "device_s": 3.0,
             "metrics": _metrics(1e8, 15, 10, 60.0, 60.0, {"heldout_lastword": (0.5, 0.6), "piqa": (0.5, 0.55)},
                                 n=200)}
    arms = [{"label": "LayerChop", "series": compute.arm_series({"points": [point]}, None, cols)}]
    dense = {**compute.arm_series({"points": []}, _metrics(1e8, 30, 0, 19.5, 19.5, {"heldout_lastword": (0.9, 0.95),
                                                                                     "piqa": (0.6, 0.66)}, n=200),
                                  cols)[0], "label": "dense (uncompressed)"}
    compute.figure2(arms, Path("unused"), dense)
    compute.figure2(arms, Path("unused"))
    with_ref, without = drawn
    lines = [line for ax in with_ref.axes for line in ax.get_lines() if line.get_label() == "dense (uncompressed)"]
    assert [round(line.get_ydata()[0], 3) for line in lines] == [19.5, 95.0, 66.0]  # perplexity, in-domain, general
    assert all(line.get_linestyle() == ":" for line in lines)
    assert with_ref._suptitle.get_text().endswith("; dotted: dense")
    assert not any(line.get_label() == "dense (uncompressed)" for ax in without.axes for line in ax.get_lines())


def test_summary_holds_the_headline_numbers_with_the_same_keys_for_every_model():
    """summary.json (``dvc metrics show``): perplexities, the in-domain average of the primary metrics with its
    error, and each general task with its error and item count, in percent; a model without a task lacks its keys."""
    from layerchop.report.summary import summary

    accs = {"heldout_continuation": (0.6, 0.5), "heldout_lastword": (0.5, 0.7), "piqa": (0.6, 0.62)}
    full = summary(_metrics(1e8, 30, 0, 19.4771, 18.9893, accs, n=200))
    se_in = 100 * math.hypot(math.sqrt(0.6 * 0.4 / 200), math.sqrt(0.7 * 0.3 / 200)) / 2
    assert full == {"val_ppl": 19.477, "test_ppl": 18.989, "in_domain": 65.0, "in_domain_se": round(se_in, 2),
                    "piqa": 62.0, "piqa_se": round(100 * math.sqrt(0.62 * 0.38 / 200), 2), "piqa_n": 200}
    other = summary(_metrics(1e8, 15, 0, 53.5, 55.5, {**accs, "piqa": (0.5, 0.54)}, n=1000))
    assert sorted(other) == sorted(full)
    assert summary({"val/ppl": 20.0}) == {"val_ppl": 20.0, "test_ppl": None}


def test_the_headline_is_layerchops_summary_and_the_share_of_lost_points_it_recovered(tmp_path):
    """``paper/summary.json`` (``report --summary``): LayerChop's summary keys plus the share of the accuracy points
    chopping lost that recovery brought back, per task group; the caption says the same. Without the three rows
    the stage refuses before writing anything."""
    from layerchop.report.summary import headline, recovered_share, summary

    accs = {"dense": {"heldout_continuation": (0.9, 0.8), "heldout_lastword": (0.9, 1.0), "piqa": (0.6, 0.66)},
            "chopped": {"heldout_continuation": (0.3, 0.2), "heldout_lastword": (0.3, 0.4), "piqa": (0.5, 0.50)},
            "layerchop": {"heldout_continuation": (0.6, 0.5), "heldout_lastword": (0.6, 0.85), "piqa": (0.5, 0.54)}}
    layers = {"dense": 30, "chopped": 15, "layerchop": 15}
    metrics = {k: _metrics(1e8, layers[k], 0, 50.0, 40.0, a, n=200) for k, a in accs.items()}
    # in-domain primary metrics (acc, acc_norm): dense 0.95, chopped 0.35, LayerChop 0.725 -> 62.5 %;
    # PIQA (acc_norm): 0.66, 0.50, 0.54 -> 25 %
    assert recovered_share(metrics["dense"], metrics["chopped"], metrics["layerchop"]) == {
        "in_domain": 62.5, "general": 25.0}
    head = headline(metrics["dense"], metrics["chopped"], metrics["layerchop"])
    assert head == {**summary(metrics["layerchop"]), "in_domain_recovered": 62.5, "general_recovered": 25.0,
                    "seeds": 1}
    assert recovered_share(metrics["dense"], metrics["dense"], metrics["layerchop"]) == {
        "in_domain": None, "general": None}  # nothing lost: no share
    # a loss within noise has no share either: PIQA 0.66 -> 0.62 on 200 items (4 points, 2 SE = 9.6)
    near = _metrics(1e8, 15, 0, 50.0, 40.0, {**accs["chopped"], "piqa": (0.5, 0.62)}, n=200)
    assert recovered_share(metrics["dense"], near, metrics["layerchop"]) == {"in_domain": 62.5, "general": None}

    params = yaml.safe_load(open(REPO / "params.yaml"))
    params["arms"].update(seeds={}, replicas=[])  # one seed (params.yaml's replicas are not here)
    params["report"]["rows"] = {k: k for k in accs}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for name, m in metrics.items():
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "metrics.json").write_text(json.dumps(m))
    cmd = [sys.executable, "-m", "layerchop.cli", "report", "--params", str(tmp_path / "params.yaml"),
           "--eval", str(tmp_path / "eval"), "--tables", str(tmp_path / "tables"), "--summary",
           str(tmp_path / "summary.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "summary.json").read_text()) == head
    assert ("Continued pretraining brings back 62 % of the in-domain accuracy points and 25 % of the general accuracy "
            "points that chopping lost.") in (tmp_path / "tables" / "main.md").read_text()
    params["report"]["rows"] = {"dense": "dense", "layerchop": "layerchop"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(cmd[:-1] + [str(tmp_path / "other.json")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "report.rows: --summary needs the rows ['dense', 'chopped', 'layerchop']" in \
        proc.stderr, proc.stderr
    assert not (tmp_path / "other.json").exists()


def _items(correct: dict[str, list[int]]) -> list[dict]:
    """Per-item rows (``items.csv``) with each task's primary metric (acc_norm for both tasks here) from ``correct``."""
    return [{"task": t, "doc_id": i, "doc_hash": f"h{t}{i}", "target": 0, "pred": 0, "acc": c, "acc_norm": c}
            for t, cs in correct.items() for i, c in enumerate(cs)]


def test_main_table_shows_an_arm_with_seed_replicas_as_mean_and_spread_and_pairs_its_tests(tmp_path):
    """``arms.seeds``: the LayerChop row is the mean ± sd over its three seeds (perplexity and accuracy, the row
    marked [3 seeds]); the recovered share averages the seeds; the caption's comparison with the chopped model is a
    paired permutation test over items x seeds (the one-seed chopped model paired with each seed)."""
    import random

    from layerchop.evaluate.harness import write_items

    n = 200
    rng = random.Random(0)
    chopped_items = [int(rng.random() < 0.5) for _ in range(n)]
    # each LayerChop seed answers the chopped model's items, plus some it got wrong: 10, 20 and 30 more of them
    seeds = {}
    for name, extra, ppl in (("layerchop", 20, 52.0), ("layerchop-seed1", 10, 50.0), ("layerchop-seed2", 30, 54.0)):
        wrong = [i for i, c in enumerate(chopped_items) if not c][:extra]
        seeds[name] = ([1 if i in wrong else c for i, c in enumerate(chopped_items)], ppl)
    params = yaml.safe_load(open(REPO / "params.yaml"))
    params["arms"].update(seeds={}, replicas=[])  # one seed (params.yaml's replicas are not here)
    params["report"]["rows"] = {"dense": "Dense", "chopped": "Chopped", "layerchop": "LayerChop"}
    params["arms"].update(seeds={"layerchop": ["layerchop-seed1", "layerchop-seed2"]},
                          replicas=["layerchop-seed1", "layerchop-seed2"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    evals = {"dense": ([1] * n, 20.0, 30), "chopped": (chopped_items, 9000.0, 15),
             **{k: (items, ppl, 15) for k, (items, ppl) in seeds.items()}}
    for name, (items, ppl, layers) in evals.items():
        d = tmp_path / "eval" / ("seeds/" if "-seed" in name else "") / name
        d.mkdir(parents=True)
        acc = sum(items) / n
        (d / "metrics.json").write_text(json.dumps(_metrics(1e8, layers, 0, ppl, ppl, {"piqa": (acc, acc)}, n=n)))
        write_items(d / "items.csv", _items({"piqa": items}))
    cmd = [sys.executable, "-m", "layerchop.cli", "report", "--params", str(tmp_path / "params.yaml"),
           "--eval", str(tmp_path / "eval"), "--tables", str(tmp_path / "tables"), "--summary",
           str(tmp_path / "summary.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "tables" / "main.md").read_text()
    base = sum(chopped_items) / n
    accs = [100 * (base + e / n) for e in (20, 10, 30)]  # mean base + 10 points, sd 5 points
    mean, sd = sum(accs) / 3, 5.0
    assert f"| LayerChop [3 seeds] | 100.0 | 15 | 0 | 52.00 ± 2.00 | 52.00 ± 2.00 | {mean:.1f} ± {sd:.1f} |" in md, md
    assert "A row marked [n seeds] is the arm trained with n seeds" in md
    # 60 item-seeds only LayerChop got right, none the other way: the permutation test's smallest p
    assert "LayerChop against the chopped model it starts from: general" in md
    assert (f"paired over {n} items, 3 vs 1 seeds, 20 vs 0 answered by one only on average: paired bootstrap over "
            "items and seeds p = 0.0002: better") in md, md
    # the share of the lost points: (mean LayerChop - chopped) / (dense - chopped), the mean over the seeds
    head = json.loads((tmp_path / "summary.json").read_text())
    assert head["seeds"] == 3 and head["general_recovered"] == round(100 * (mean - 100 * base) / (100 - 100 * base), 1)


def test_comparisons_use_every_seed_of_each_arm():
    from layerchop.report.compare import compare
    from layerchop.report.tables import ITEMS, SEEDS

    m = _metrics(1e8, 15, 0, 50.0, 50.0, {"piqa": (0.5, 0.5)}, n=4)

    def run(correct):
        return {**m, ITEMS: _items({"piqa": correct})}

    a = {**run([1, 1, 0, 0]), SEEDS: [run([1, 1, 1, 0]), run([1, 0, 0, 0])]}
    b = {**run([0, 0, 0, 0]), SEEDS: [run([1, 1, 0, 0])]}
    got = compare(a, b, "general")
    assert got.paired.seeds == (3, 2) and got.paired.items == 4  # no seed dropped to make the counts equal
    # without per-item results in every run, no paired test: the unpaired z, with one run's binomial error
    plain = _metrics(1e8, 15, 0, 50.0, 50.0, {"piqa": (0.6, 0.6)}, n=1000)
    got = compare({**plain, SEEDS: [plain]}, plain, "general")
    assert got.paired is None and got.a == got.b and "unpaired: a tie" in got.text()
