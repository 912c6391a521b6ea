"""`layerchop push`: publish a model directory on the Hub, its card completed with the evaluation results and the
pipeline's commit.

Example::

    hf auth login
    layerchop push --model data/models/layerchop --metrics data/eval/layerchop/metrics.json \\
        --repo-id you/smollm2-layerchop
    layerchop push --model data/models/layerchop --metrics data/eval/layerchop/metrics.json \\
        --repo-id you/smollm2-layerchop --dry-run      # print the card; upload nothing

The directory is uploaded as it is (safetensors, tokenizer, ``layerchop.json``) in one commit, with its
``README.md`` replaced by the completed card: the metadata every stage writes (base model, licence, the
compression method and its parameters: :mod:`layerchop.cards`), plus ``model-index`` results from ``--metrics``
(perplexity on each split, each task's primary accuracy with its item count and standard error) and
``layerchop.pipeline_commit`` (``git rev-parse HEAD`` here; ``-dirty`` with uncommitted changes). Not a stage of
``dvc.yaml``: publishing is a choice, and the Hub is reached only here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (a stage's output)")
    p.add_argument("--repo-id", required=True, help="the Hub repository, <user or organisation>/<name>")
    p.add_argument("--metrics", dest="metrics_file", default=None,  # an input: not checked as a writable output
                   help="the model's metrics.json from `layerchop evaluate`")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dry-run", action="store_true", help="print the card that would be published; upload nothing")


def pipeline_commit(where: Path) -> str | None:
    """The git commit of the checkout ``where`` is in (``-dirty`` when it has uncommitted changes); None outside git."""
    def git(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *argv], cwd=where, capture_output=True, text=True)

    try:
        head = git("rev-parse", "HEAD")
    except FileNotFoundError:  # no git
        return None
    if head.returncode:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def main(args: argparse.Namespace) -> int:
    from layerchop.cards import render
    from layerchop.hub import push_card
    from layerchop.io import METADATA_FILE, check_model_dir, read_json

    model = check_model_dir(args.model, "--model")
    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        raise ValueError(f"--repo-id {args.repo_id!r}: must be <user or organisation>/<name>")
    if args.metrics_file and not Path(args.metrics_file).is_file():
        raise FileNotFoundError(f"--metrics {args.metrics_file}: no such file")
    metrics = read_json(args.metrics_file) if args.metrics_file else None
    if metrics is not None and not isinstance(metrics, dict):
        raise ValueError(f"--metrics {args.metrics_file}: not the JSON object of `layerchop evaluate`")
    meta = read_json(model / METADATA_FILE) if (model / METADATA_FILE).exists() else {}
    text = (model / "README.md").read_text() if (model / "README.md").exists() else render("", meta, model.name)
    card = push_card(text, metrics, pipeline_commit(Path.cwd()), args.repo_id.split("/")[1])
    if args.dry_run:
        sys.stdout.write(card)
        return 0

    from huggingface_hub import CommitOperationAdd, HfApi

    files = sorted(f for f in model.rglob("*") if f.is_file() and f.relative_to(model).as_posix() != "README.md")
    operations = [CommitOperationAdd(path_in_repo=f.relative_to(model).as_posix(), path_or_fileobj=str(f))
                  for f in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    try:
        url = api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
        api.create_commit(args.repo_id, operations, commit_message=f"layerchop push of {model.name}",
                          repo_type="model")
    except LocalTokenNotFoundError:
        raise ValueError(f"--repo-id {args.repo_id}: not logged in to the Hub (run `hf auth login`)") from None
    except HfHubHTTPError as e:
        raise ValueError(f"--repo-id {args.repo_id}: the Hub refused the push ({str(e).splitlines()[0]})") from None
    print(f"[push] {len(files)} files and the card to {url}")
    return 0
