"""Offline zero-shot tasks built from held-out test documents, registered as lm-eval YAML tasks.

Two multiple-choice tasks, scored by lm-eval's likelihood ranking with ``acc`` and ``acc_norm``:

* ``heldout_continuation``: a passage; choose its true continuation among ``num_choices`` candidates
  of the same length in words, the others drawn from elsewhere in the held-out text.
* ``heldout_lastword``: a passage that ends one word before a line break; choose the true final word
  of the line among candidates that are final words of other held-out lines. A "line" is what the corpus
  breaks lines at: a verse line in Shakespeare, a whole paragraph in the Wikipedia leads (so there the task
  asks for the last word of an article's lead paragraph).

Each task is one JSONL file (``context``, ``choices``, ``label``) plus a YAML config in the same folder,
so ``lm_eval --include_path <prepared>/tasks --tasks heldout_continuation`` runs them without this
package.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

TASK_NAMES = ("heldout_continuation", "heldout_lastword")
_WORD = re.compile(r"^[A-Za-z][a-z]{2,}$")


def _task_yaml(name: str, data_file: Path) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def continuation_items(texts: list[str], n: int, k: int, ctx: int, cont: int, rng: random.Random) -> list[dict]:
    """Passage + true continuation vs ``k - 1`` same-length continuations from elsewhere."""
    words = [t.split() for t in texts]
    span = ctx + cont
    docs = [i for i, w in enumerate(words) if len(w) >= 2 * span]
    if not docs:
        raise ValueError(f"prepare.tasks: no held-out document has {2 * span} words")
    weights = [len(words[i]) for i in docs]
    items = []
    for _ in range(n):
        d = rng.choices(docs, weights)[0]
        s = rng.randrange(0, len(words[d]) - span)
        context = " ".join(words[d][s : s + ctx])
        true = " ".join(words[d][s + ctx : s + span])
        distractors: list[str] = []
        while len(distractors) < k - 1:
            d2 = rng.choices(docs, weights)[0]
            s2 = rng.randrange(0, len(words[d2]) - cont)
            if d2 == d and abs(s2 - (s + ctx)) < span:
                continue  # too close to the true continuation
            cand = " ".join(words[d2][s2 : s2 + cont])
            if cand != true and cand not in distractors:
                distractors.append(cand)
        choices = distractors + [true]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(true)})
    return items


def lastword_items(texts: list[str], n: int, k: int, ctx: int, rng: random.Random) -> list[dict]:
    """Passage ending before the final word of a line vs ``k - 1`` final words of other lines."""
    candidates = []  # (doc, line index, final word)
    lines_per_doc = [t.splitlines() for t in texts]
    for d, lines in enumerate(lines_per_doc):
        for j, line in enumerate(lines):
            ws = line.split()
            if len(ws) >= 4:
                last = ws[-1].rstrip(".,;:!?'\"-)")
                if _WORD.match(last):
                    candidates.append((d, j, last))
    pool = sorted({c[2] for c in candidates})
    if len(candidates) < n or len(pool) < k:
        raise ValueError(f"prepare.tasks: held-out text has too few usable lines ({len(candidates)})")
    items = []
    for d, j, last in rng.sample(candidates, n):
        lines = lines_per_doc[d]
        before = " ".join(" ".join(lines[max(0, j - 40) : j]).split()[-ctx:])
        line_words = lines[j].split()
        prefix = " ".join(line_words[:-1])
        context = f"{before} {prefix}".strip()
        distractors: list[str] = []
        while len(distractors) < k - 1:
            w = rng.choice(pool)
            if w.lower() != last.lower() and w not in distractors:
                distractors.append(w)
        choices = distractors + [last]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(last)})
    return items


def build_tasks(texts: list[str], out_dir: Path, cfg, seed: int, final_dir: Path | None = None) -> dict:
    """Write both tasks' JSONL + YAML into ``out_dir``.

    Args:
        texts: Held-out test documents.
        out_dir: Where to write now.
        cfg: :class:`layerchop.config.TasksConfig`.
        seed: Seed of item sampling.
        final_dir: Where the files will live when read (the YAML points there); ``out_dir`` if None.

    Returns:
        ``{task name: number of items}``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    final_dir = final_dir or out_dir
    rng = random.Random(seed)
    built = {
        "heldout_continuation": continuation_items(
            texts, cfg.num_items, cfg.num_choices, cfg.context_words, cfg.continuation_words, rng
        ),
        "heldout_lastword": lastword_items(texts, cfg.num_items, cfg.num_choices, cfg.context_words, rng),
    }
    for name, items in built.items():
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        with open(out_dir / f"{name}.yaml", "w") as f:
            yaml.safe_dump(_task_yaml(name, final_dir / f"{name}.jsonl"), f, sort_keys=False)
    return {name: len(items) for name, items in built.items()}
