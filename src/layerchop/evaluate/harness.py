"""Zero-shot accuracy through lm-evaluation-harness's Python API.

Three kinds of task names are accepted:

* standard lm-eval tasks (``piqa``, ``hellaswag``, ...), fetched from the Hub by lm-eval itself;
* the offline tasks that ``prepare`` writes as lm-eval YAML (``heldout_continuation``, ...), found
  through ``include_path``;
* local mirrors: a standard task whose data are read from local files (``evaluate.local_tasks``),
  for machines without Hub access. The task keeps its standard prompt and metrics; only its dataset
  is swapped for a JSON file.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

# Metric used for each task in averages (the paper's Table 5: acc_norm for PIQA, HellaSwag and
# OpenBookQA; acc for WinoGrande, SciQ and ARC-Easy).
PRIMARY_METRIC = {
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "openbookqa": "acc_norm",
    "winogrande": "acc",
    "sciq": "acc",
    "arc_easy": "acc",
    "heldout_continuation": "acc",
    "heldout_lastword": "acc_norm",
}


def piqa_rows_from_release(data_dir: Path, split: str) -> list[dict]:
    """PIQA's original release (``valid.jsonl`` + ``valid-labels.lst``) as rows with a ``label``."""
    stem = {"validation": "valid", "train": "train", "test": "tests"}[split]
    items = [json.loads(line) for line in open(data_dir / f"{stem}.jsonl") if line.strip()]
    labels_path = data_dir / f"{stem}-labels.lst"
    if not labels_path.exists():
        raise FileNotFoundError(f"{labels_path}: PIQA labels are needed for a local mirror")
    labels = [int(x) for x in labels_path.read_text().split()]
    if len(labels) != len(items):
        raise ValueError(f"{data_dir}: {len(items)} items but {len(labels)} labels")
    return [{"goal": it["goal"], "sol1": it["sol1"], "sol2": it["sol2"], "label": lab}
            for it, lab in zip(items, labels)]


# task -> converter(data_dir, split) -> rows in the task's Hub format; other tasks read {split}.jsonl
RELEASE_FORMATS: dict[str, Callable[[Path, str], list[dict]]] = {"piqa": piqa_rows_from_release}


def local_mirror_config(task_manager, name: str, data_dir: str | Path, workdir: Path) -> dict[str, Any]:
    """The standard config of task ``name`` with its dataset replaced by local files in ``data_dir``."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader lm-eval's TaskFactory uses (0.4.13)

    entry = task_manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise ValueError(f"evaluate.local_tasks: {name!r} is not a YAML task lm-eval knows")
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"evaluate.local_tasks.{name}: {data_dir} does not exist")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    data_files = {}
    for split_key in ("test_split", "validation_split"):
        split = cfg.get(split_key)
        if not split:
            continue
        if name in RELEASE_FORMATS:
            rows = RELEASE_FORMATS[name](data_dir, split)
            path = workdir / f"{name}-{split}.jsonl"
            with open(path, "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        else:
            path = data_dir / f"{split}.jsonl"
            if not path.exists():
                raise FileNotFoundError(f"evaluate.local_tasks.{name}: expected {path}")
        data_files[split] = str(path)
    cfg = {k: v for k, v in cfg.items() if k not in ("group", "tag", "include")}
    cfg.update({"task": name, "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": data_files}})
    cfg.pop("training_split", None)
    cfg.pop("fewshot_split", None)
    return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def task_manager_for(tasks: list[str], include_path: Optional[str | Path] = None):
    """An ``lm_eval.tasks.TaskManager`` that knows ``tasks``: indexing all of lm-eval's ~15k task YAMLs takes
    ~6 s, so first index only lm-eval's own folders named after the tasks (``piqa/``) and then ``include_path``
    (last, so that it wins a name clash, as in lm-eval's own order). That narrow index is used only when it
    holds every name as a plain task (a group's members may live in other folders); otherwise everything is
    indexed, which then decides whether a name exists."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    root = Path(lm_eval.tasks.__file__).parent
    paths = [str(root / n) for n in tasks if (root / n).is_dir()] + ([str(include_path)] if include_path else [])
    if paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if all(name in tm.task_index and tm.task_index[name].kind in (Kind.TASK, Kind.PY_TASK) for name in tasks):
            return tm
    return TaskManager(include_path=str(include_path) if include_path else None)


def check_tasks(tasks: list[str], include_path: Optional[str | Path] = None,
                local_tasks: Optional[dict[str, str]] = None):
    """Index lm-eval's tasks (plus ``include_path``) and refuse an unknown name, or a local mirror whose data
    is missing, before any model is loaded.

    Returns:
        The ``lm_eval.tasks.TaskManager`` (give it to :func:`zero_shot` so that it is built once).
    """
    tm = task_manager_for(tasks, include_path)
    local_tasks = dict(local_tasks or {})
    for name in tasks:
        if name in local_tasks:
            entry = tm.task_index.get(name)
            if entry is None or entry.yaml_path is None:
                raise ValueError(f"evaluate.local_tasks: {name!r} is not a YAML task lm-eval knows")
            if not Path(local_tasks[name]).exists():
                raise FileNotFoundError(f"evaluate.local_tasks.{name}: {local_tasks[name]} does not exist")
        elif name not in tm.all_tasks:
            raise ValueError(f"evaluate.tasks: {name!r} is neither an lm-eval task, an offline task in "
                             f"{include_path}, nor a key of evaluate.local_tasks")
    return tm


def zero_shot(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: Optional[str | Path] = None,
    local_tasks: Optional[dict[str, str]] = None,
    batch_size: int = 8,
    limit: Optional[int] = None,
    seed: int = 1234,
    device: str = "cpu",
    task_manager=None,
    autocast: Optional[str] = None,
    shared_context: bool = False,
) -> dict[str, Any]:
    """Run ``lm_eval.simple_evaluate`` zero-shot on an in-memory HF model.

    ``task_manager``: from :func:`check_tasks` (checked and indexed already); built here when None.
    ``autocast``: dtype of lm-eval's mixed-precision forward (``mixed_precision_dtype``), or None.
    ``shared_context``: score the choices of an item on one pass over its context
    (:func:`layerchop.evaluate.shared_context.shared_context_lm`) instead of lm-eval's ``HFLM``.

    Returns:
        lm-eval's output (``results``, ``versions``, ``configs``, ...), made JSON-serialisable.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    seed_everything(seed)
    tm = task_manager or check_tasks(tasks, include_path, local_tasks)
    local_tasks = dict(local_tasks or {})
    with tempfile.TemporaryDirectory() as work:
        specs: list[Any] = [local_mirror_config(tm, name, local_tasks[name], Path(work)) if name in local_tasks
                            else name for name in tasks]
        if shared_context:
            from layerchop.evaluate.shared_context import shared_context_lm as make_lm
        else:
            make_lm = HFLM
        lm = make_lm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                     mixed_precision_dtype=autocast)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=specs, num_fewshot=0, limit=limit, task_manager=tm, bootstrap_iters=0,
            log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        # a mirror converted into the temporary folder names a file that is gone, and a new one every run: record
        # the local release it came from instead (results.json stays the same bytes on a re-run)
        for cfg in out.get("configs", {}).values():
            files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
            for split, path in list(files.items()):
                if isinstance(path, str) and path.startswith(work):
                    name = cfg.get("task")
                    files[split] = f"{local_tasks.get(name, '?')} ({split}, converted)"
    out["items"] = item_rows(out.pop("samples", {}))
    return json.loads(json.dumps(out, default=handle_non_serializable))


ITEM_FIELDS = ("task", "doc_id", "doc_hash", "target", "pred", "acc", "acc_norm")
"""The columns of an evaluation's per-item results (``items.csv``): the item (its task, its index in the task's
split and a hash of its text, so two evaluations are paired only on the same items), the gold choice, the choice of
highest log-likelihood, and whether each metric scored it correct (1/0; empty where the task has no such metric)."""


def item_rows(samples: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """lm-eval's logged samples as compact per-item rows (:data:`ITEM_FIELDS`), by task and item."""
    rows = []
    for task in sorted(samples):
        for s in sorted(samples[task], key=lambda x: x["doc_id"]):
            lls = [float(r[0]) for r in s["filtered_resps"]]
            rows.append({"task": task, "doc_id": int(s["doc_id"]), "doc_hash": str(s.get("doc_hash", ""))[:12],
                         "target": s["target"], "pred": int(np.argmax(lls)) if lls else "",
                         **{m: int(s[m]) if m in s else "" for m in ("acc", "acc_norm")}})
    return rows


def write_items(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Per-item results as CSV (:data:`ITEM_FIELDS`), written atomically."""
    import csv
    import io

    from layerchop.io import write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ITEM_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def read_items(path: str | Path) -> list[dict[str, Any]]:
    """The rows :func:`write_items` wrote (integers as ints, a target that is text as text; an empty metric as
    None).

    Raises:
        ValueError: naming the file, when it is not an ``items.csv`` of ``layerchop evaluate``.
    """
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != ITEM_FIELDS:
            raise ValueError(f"{path}: not the per-item results of `layerchop evaluate` (columns {list(ITEM_FIELDS)})")
        return [{k: (int(v) if v.lstrip("-").isdigit() and k != "doc_hash" else None if v == "" else v)
                 for k, v in row.items()} for row in reader]


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent items: ``sqrt(p (1 - p) / n)``."""
    if n <= 0:
        raise ValueError(f"binomial_stderr: n={n} items")
    return math.sqrt(p * (1.0 - p) / n)


def flat_task_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat DVC metrics of every task in lm-eval's output: ``eval/<task>/n`` (items scored) and, for acc and
    acc_norm, ``eval/<task>/<metric>`` with its binomial standard error ``eval/<task>/<metric>_stderr``."""
    flat: dict[str, float] = {}
    samples = results.get("n-samples", {})
    for task, res in results["results"].items():
        n = samples.get(task, {}).get("effective")
        if not isinstance(n, int):
            raise ValueError(f"lm-eval's output has no item count for task {task!r} (n-samples)")
        flat[f"eval/{task}/n"] = n
        for metric in ("acc", "acc_norm"):
            value = res.get(f"{metric},none")
            if isinstance(value, (int, float)):
                flat[f"eval/{task}/{metric}"] = float(value)
                flat[f"eval/{task}/{metric}_stderr"] = binomial_stderr(float(value), n)
    return flat


def is_in_domain(task: str) -> bool:
    """Whether ``task`` is one of the tasks ``prepare`` builds from held-out documents of the training corpus
    (in-domain recovery) rather than a benchmark from outside it (general ability)."""
    from layerchop.data.tasks import TASK_NAMES

    return task in TASK_NAMES


def hub_tasks(cfg) -> list[str]:
    """The tasks of ``cfg`` (:class:`layerchop.config.EvaluateConfig`) whose data lm-eval reads from the Hugging Face
    Hub: neither a local mirror (``evaluate.local_tasks``) nor an offline task that ``prepare`` writes."""
    from layerchop.data.tasks import TASK_NAMES

    names, _ = available_tasks(cfg, quiet=True)
    return [n for n in names if n not in cfg.local_tasks and n not in TASK_NAMES]


def prefetch_hub_datasets(cfg) -> list[str]:
    """Load the datasets of :func:`hub_tasks` once, here, into the ``datasets`` cache (``HF_DATASETS_CACHE``, on
    a file system the compute nodes share), so that evaluation jobs run with the Hub offline
    (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``: :func:`layerchop.launch.job_environment`) and compute nodes need
    no internet. Run by the host that submits the jobs; returns the tasks it loaded."""
    hub = hub_tasks(cfg)
    if hub:
        from lm_eval.tasks import get_task_dict

        print(f"[evaluate] fetching the datasets of {hub} into the datasets cache for the offline jobs", flush=True)
        get_task_dict(hub, task_manager_for(hub))  # each task's download(): datasets.load_dataset, cached
    return hub


def available_tasks(cfg, quiet: bool = False) -> tuple[list[str], dict[str, str]]:
    """The tasks of :class:`layerchop.config.EvaluateConfig` ``cfg`` to run now, and the skipped ones with why.

    A task in ``evaluate.optional_tasks`` whose local mirror directory is absent (e.g. ``../shared`` is not beside
    the checkout) is skipped with a message; any other missing data stays an error (:func:`check_tasks`).
    """
    run, skipped = [], {}
    for name in cfg.tasks:
        path = cfg.local_tasks.get(name)
        if name in cfg.optional_tasks and path is not None and not Path(path).exists():
            skipped[name] = f"{path} does not exist"
            if not quiet:
                    print(f"[evaluate] skipping {name}: its local data {path} does not exist (evaluate.optional_tasks); "
                      f"the results have no {name} column", flush=True)
        else:
            run.append(name)
    return run, skipped
