"""Every bad input: exit 2, one line naming the key (or file), nothing written.

Table-driven and in-process (``layerchop.cli.main``), so that many cases stay cheap. Each case is a params
edit or a file, the stage it is given to, and the text the one-line message must contain.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from layerchop.cli import main
from layerchop.config import load_params, section

REPO = Path(__file__).resolve().parents[1]


def edited(params: dict, dotted: str, value) -> dict:
    node = params
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return params


def run_stage(capsys, argv: list[str]) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


# (params key, value, message fragment): every one through the chop stage, which must write nothing
PARAMS_CASES = [
    ("chop.indices", "12", "chop.indices='12' is invalid: must be a list"),
    ("chop.indices", [1.7], "chop.indices[0]=1.7 is invalid: must be an integer"),
    ("chop.indices", [], "chop.indices=[] is invalid: removes no layer"),
    ("chop.indices", [True], "chop.indices[0]=True is invalid: must be an integer"),
    ("chop.num_remove", 0, "chop.num_remove=0 is invalid: must be >= 1"),
    ("chop.num_remove", "three", "chop.num_remove='three' is invalid: must be an integer"),
    ("chop.layout", 5, "chop.layout=5 is invalid: must be a string"),
    ("chop.layout", "top", "chop.layout='top' is invalid: choose one of"),
    ("chop.lyout", "input", "unknown key(s) ['chop.lyout']"),
    ("train.lr", "fast", "train.lr='fast' is invalid: must be a number"),
    ("train.lr", True, "train.lr=True is invalid: must be a number"),
    ("train.batch_size", 2.5, "train.batch_size=2.5 is invalid: must be an integer"),
    ("train.batch_size", "8x", "train.batch_size='8x' is invalid: must be an integer"),
    ("train.token_budget", "1e5.5", "train.token_budget='1e5.5' is invalid: must be an integer"),
    ("train.token_budget", ".nan", "train.token_budget='.nan' is invalid: must be an integer"),
    ("train.precision", 16, "train.precision=16 is invalid: must be a string"),
    ("train.accelerator", "tpu", "train.accelerator='tpu' is invalid: choose one of ['auto', 'cpu', 'gpu', 'cuda'] (the "
     "training path runs on CPUs and CUDA GPUs only; Lightning's mps and tpu are not supported)"),
    ("train.activation_checkpointing", "yes", "train.activation_checkpointing='yes' is invalid: must be true or false"),
    ("train.devices", None, "train.devices=None is invalid: must be an integer"),
    ("train", 5, "train=5 is invalid: must be a mapping of keys"),
    ("prepare.seq_len", 1.5, "prepare.seq_len=1.5 is invalid: must be an integer"),
    ("prepare.tasks", ["a"], "prepare.tasks=['a'] is invalid: must be a mapping of keys"),
    ("evaluate.tasks", "heldout_lastword", "evaluate.tasks='heldout_lastword' is invalid: must be a list"),
    ("evaluate.tasks", [3], "evaluate.tasks[0]=3 is invalid: must be a string"),
    ("evaluate.local_tasks", ["piqa"], "evaluate.local_tasks=['piqa'] is invalid: must be a mapping"),
    ("report.rows", ["dense"], "report.rows=['dense'] is invalid: must be a mapping"),
    ("download.model.source", "llama-9000", "download.model.source='llama-9000' is invalid"),
    ("download.corpus.token_budget", -1, "download.corpus.token_budget=-1 is invalid: must be > 0"),
    ("figure4.flop_budget", "lots", "figure4.flop_budget='lots' is invalid: must be a number"),
    ("figure3.flop_budget", 0, "figure3.flop_budget=0.0 is invalid: must be > 0"),
    ("figure3.token_budget", 1.5, "figure3.token_budget=1.5 is invalid"),
    ("figure6.every_tokens", [4096, -8], "figure6.every_tokens=-8 is invalid: each entry must be a whole number"),
    ("train.accelerator", "quantum", "train.accelerator='quantum' is invalid: choose one of"),
    ("train.lr", float("nan"), "train.lr=nan is invalid: must be a finite number"),
    ("train.weight_decay", float("inf"), "train.weight_decay=inf is invalid: must be a finite number"),
    ("prepare.seq_len", "256", "prepare.seq_len='256' is invalid: must be an integer"),
    ("chop.indices", ["12"], "chop.indices[0]='12' is invalid: must be an integer"),
    ("evaluate.device", "gpu0", "evaluate.device='gpu0' is invalid: not a torch device"),
    ("prune.device", "tpu-v9", "prune.device='tpu-v9' is invalid: not a torch device"),
    ("evalute.tasks", ["piqa"], "unknown section(s) ['evalute']"),
    ("train.launcher", "sbatch", "train.launcher='sbatch' is invalid: choose one of ['local', 'torchrun', 'slurm']"),
    ("slurm.time", "3 days", "slurm.time='3 days' is invalid: a SLURM time limit"),
    ("slurm.cpus_per_task", 0, "slurm.cpus_per_task=0 is invalid: must be >= 1"),
    ("slurm.partition", "gpu; rm -rf /", "slurm.partition='gpu; rm -rf /' is invalid"),
    ("slurm.sbatch_args", ["qos=high"], "slurm.sbatch_args='qos=high' is invalid: each entry one sbatch long option"),
    ("slurm.sbatch_args", ["--nodes=2"], "slurm.sbatch_args='--nodes=2' is invalid: set by the launcher"),
    ("slurm.signal_seconds", -5, "slurm.signal_seconds=-5 is invalid: must be in [0, 65535]"),
    ("slurm.mem", "lots", "slurm.mem='lots' is invalid: a SLURM size"),
    ("slurm.requeue", "yes", "slurm.requeue='yes' is invalid: must be true or false"),
    ("slurm.setup", "module load cuda", "slurm.setup='module load cuda' is invalid: must be a list"),
    ("slurm.stages", ["train"], "slurm.stages='train' is invalid: choose from ['chop', 'prune', 'evaluate', 'curve', 'bench', 'prepare', 'download']"),
]


@pytest.mark.parametrize("key,value,message", PARAMS_CASES, ids=[f"{k}={v!r}" for k, v, _ in PARAMS_CASES])
def test_bad_params_exit_2_naming_the_key_and_write_nothing(tmp_path, tiny_dir, capsys, key, value, message):
    params = edited(yaml.safe_load(open(REPO / "params.yaml")), key, value)
    path = tmp_path / "ablation.yaml"  # the message names the file read, whatever its name
    path.write_text(yaml.safe_dump(params))
    rc, line = run_stage(capsys, ["chop", "--params", str(path), "--model", str(tiny_dir),
                                  "--out", str(tmp_path / "out")])
    assert rc == 2
    assert line.startswith(f"layerchop chop: error: {path}: ") and message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ablation.yaml"]


# whole files that are not a params mapping
FILE_CASES = [
    ("train:\n  lr: [1, 2\n", "line 3: not valid YAML"),
    ("- train\n- chop\n", "must be a mapping of sections"),
    (b"chop:\n  layout: \xe9\n", "not UTF-8 text"),
]


@pytest.mark.parametrize("text,message", FILE_CASES, ids=["invalid-yaml", "top-level-list", "latin-1"])
def test_bad_params_files_exit_2_naming_the_file(tmp_path, tiny_dir, capsys, text, message):
    path = tmp_path / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    rc, line = run_stage(capsys, ["chop", "--params", str(path), "--model", str(tiny_dir), "--out",
                                  str(tmp_path / "out")])
    assert rc == 2 and f"{path}" in line and message in line, line
    assert not (tmp_path / "out").exists()


def test_numbers_in_scientific_notation_are_numbers(tmp_path):
    """YAML 1.1 reads ``1e-3`` as a string; the config reads it as the number a researcher meant."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n  token_budget: 1e6\n  grad_clip: 1\ndownload:\n  corpus:\n"
                    "    token_budget: 2.4e+10\n")
    params = load_params(path)
    assert isinstance(params["train"]["lr"], str)  # what PyYAML gives
    train = section("train", params)
    assert train.lr == 0.001 and isinstance(train.lr, float)
    assert train.token_budget == 1_000_000 and isinstance(train.token_budget, int)
    assert train.grad_clip == 1.0 and isinstance(train.grad_clip, float)
    assert section("download", params).corpus.token_budget == 24_000_000_000


def test_every_shipped_params_file_passes_the_type_checks():
    for path in [REPO / "params.yaml", *sorted((REPO / "experiments").glob("*/params.yaml"))]:
        params = load_params(path)
        assert set(params) == {"download", "prepare", "chop", "prune", "train", "distill", "dimchop", "figure3", "figure4",
                               "figure2", "figure6", "table6", "evaluate", "report", "arms", "bench", "table2", "slurm",
                               "lr_sweep", "long"}, path


# ------------------------------------------------------------------ model directories, one check for every stage
def model_dir_cases(tmp_path: Path, tiny_dir: Path) -> dict[str, tuple[Path, str]]:
    import shutil

    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_dir, no_config)
    (no_config / "config.json").unlink()
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 64)
    return {
        "missing": (tmp_path / "no" / "such" / "model", "no such model directory"),
        "hub-id-looking": (Path("meta-llama/Llama-2-7b-hf"), "no such model directory"),
        "no-config": (no_config, "not a model directory (no config.json)"),
        "pickle-only": (pickled, "only pickle weights ['pytorch_model.bin']; safetensors only"),
        "corrupt": (corrupt, "not a readable safetensors file"),
    }


STAGES_WITH_A_MODEL = [
    ("chop", "--model", ["--out", "{tmp}/out"]),
    ("prune", "--model", ["--method", "wanda", "--pattern", "2of4", "--data", "{data}", "--out", "{tmp}/out"]),
    ("evaluate", "--model", ["--data", "{data}", "--out", "{tmp}/out"]),
    ("prepare", "--model", ["--corpus", "{tmp}/corpus", "--out", "{tmp}/out"]),
    ("train", "--init", ["--data", "{data}", "--out", "{tmp}/out", "--run-dir", "{tmp}/run"]),
    ("curve", "--final", ["--snapshots", "{tmp}/snaps", "--record", "{tmp}/rec.json", "--data", "{data}", "--out",
                          "{tmp}/out"]),
    ("scratch", "--like", ["--out", "{tmp}/out"]),
    ("tables45", "--models", ["--results", "{tmp}/results.json", "--tables", "{tmp}/out"]),
    ("shrink", "--model", ["--out", "{tmp}/out"]),
    ("figure3", "--shrunk", ["--layerchop", "{tmp}/a.json", "--start", "{tmp}/b.json", "--dimchop", "{tmp}/c.json",
                             "--structured", "{tmp}/d.json", "--dimchop-tokens", "{tmp}/e.json", "--dense",
                             "{tmp}/f.json", "--tables", "{tmp}/out", "--figures", "{tmp}/out"]),
]


@pytest.mark.parametrize("case", ["missing", "hub-id-looking", "no-config", "pickle-only", "corrupt"])
def test_bad_model_directories_are_refused_by_every_stage(tmp_path, tiny_dir, tiny_prepared, capsys, case):
    bad, message = model_dir_cases(tmp_path, tiny_dir)[case]
    for stage, key, rest in STAGES_WITH_A_MODEL:
        argv = [stage, "--params", str(REPO / "params.yaml"), key, str(bad)]
        argv += [a.format(tmp=tmp_path, data=tiny_prepared) for a in rest]
        rc, line = run_stage(capsys, argv)
        assert rc == 2, (stage, line)
        assert line.startswith(f"layerchop {stage}: error: {key} {bad}") and message in line, (stage, line)
        assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists(), stage


def test_unknown_task_is_refused_before_the_model_is_loaded(tiny_dir, tiny_prepared, monkeypatch):
    import dataclasses

    import layerchop.evaluate.suite as suite

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the tasks were checked")

    monkeypatch.setattr(suite, "load_model", never)
    cfg = dataclasses.replace(section("evaluate", load_params(REPO / "params.yaml")), optional_tasks=[],
                              tasks=["heldout_lastword", "no_such_task"])
    with pytest.raises(ValueError, match=r"evaluate.tasks: 'no_such_task' is neither"):
        suite.evaluate_model(tiny_dir, tiny_prepared, cfg)
    cfg = dataclasses.replace(cfg, tasks=["piqa"], local_tasks={"piqa": "/no/such/piqa"})
    with pytest.raises(FileNotFoundError, match=r"evaluate.local_tasks.piqa: /no/such/piqa does not exist"):
        suite.evaluate_model(tiny_dir, tiny_prepared, cfg)


# ------------------------------------------------------------------------------ local corpus files
CORPUS_CASES = [
    ("docs.jsonl", b'{"text": "fine"}\n{"text": "broken\n', "docs.jsonl:2: not valid JSON"),
    ("docs.jsonl", b'{"text": "fine"}\n{"text": 42}\n', "docs.jsonl:2 holds 42, not a string"),
    ("docs.jsonl", b'{"body": "no text"}\n', "download.corpus.text_field='text': "),
    ("docs.jsonl", b'["a", "list"]\n', "has no such field (fields: list)"),
    ("docs.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"), "download.corpus.encoding='utf-8': "),
    ("plays.txt", "Ros\u00e9 and caf\u00e9\n".encode("latin-1"), "plays.txt does not decode at byte 3"),
    ("docs.csv", b"text\nhello\n", "is neither .txt nor .jsonl"),
]


@pytest.mark.parametrize("name,content,message", CORPUS_CASES,
                         ids=["bad-json", "text-42", "no-field", "not-object", "latin1-jsonl", "latin1-txt", "csv"])
def test_bad_local_corpus_files_name_the_file_and_line(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    params = edited(edited(edited(yaml.safe_load(open(REPO / "params.yaml")), "download.corpus.source", "local"),
                           "download.corpus.local_paths", [str(tmp_path / name)]),
                    "download.corpus.local_dir", str(tmp_path))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rc, line = run_stage(capsys, ["download", "--params", str(tmp_path / "params.yaml"), "corpus", "--out",
                                  str(tmp_path / "corpus")])
    assert rc == 2 and message in line, line
    assert not (tmp_path / "corpus").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".corpus")]  # no temporary left


# a prepared corpus (the download stage's documents.jsonl, or one written by hand) that prepare cannot read
DOCUMENTS_CASES = [
    (b'{"id": "a", "text": "x"}\n{"text": "no id"}\n', "documents.jsonl:2: a document needs a string 'id' (its keys: "
     "['text'])"),
    (b'{"id": "a", "text": "x"}\n\n{"id": "b", "text": 7}\n', "documents.jsonl:3: a document needs a string 'text', "
     "not 7"),
    (b'{"id": "a", "text": "x"\n', "documents.jsonl:1: not valid JSON (Expecting ',' delimiter at column 24)"),
    (b'["a"]\n', "documents.jsonl:1: a document is a JSON object, not a list"),
    ('{"id": "a", "text": "caf\u00e9"}\n'.encode("latin-1"), "documents.jsonl:1: not UTF-8 text (invalid continuation "
     "byte at byte 24)"),
]


@pytest.mark.parametrize("content,message", DOCUMENTS_CASES, ids=["no-id", "text-7", "bad-json", "list", "latin-1"])
def test_a_prepared_corpus_that_cannot_be_read_names_its_file_and_line(tmp_path, tiny_dir, capsys, content, message):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "documents.jsonl").write_bytes(content)
    params = tmp_path / "params.yaml"  # the tiny model's context is 128
    params.write_text(yaml.safe_dump(edited(yaml.safe_load(open(REPO / "params.yaml")), "prepare.seq_len", 32)))
    rc, line = run_stage(capsys, ["prepare", "--params", str(params), "--corpus", str(corpus),
                                  "--model", str(tiny_dir), "--out", str(tmp_path / "prepared")])
    assert rc == 2 and line == f"layerchop prepare: error: {corpus / message}", line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "params.yaml"]


@pytest.mark.parametrize("content,message", [
    (b'{"layers": 30,\n "val/ppl": }\n', "dense/metrics.json:2: not valid JSON (Expecting value at column 13)"),
    (b'[1, 2]\n', "dense/metrics.json: an evaluation's metrics are a JSON object, not a list"),
    (b'{"note": "\xe9"}', "dense/metrics.json: not UTF-8 text (invalid continuation byte at byte 10)"),
], ids=["bad-json", "list", "latin-1"])
def test_a_corrupt_metrics_file_given_to_report_names_the_file(tmp_path, capsys, content, message):
    (tmp_path / "eval" / "dense").mkdir(parents=True)
    (tmp_path / "eval" / "dense" / "metrics.json").write_bytes(content)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(edited(yaml.safe_load(open(REPO / "params.yaml")), "report.rows",
                                            {"dense": "Dense"})))
    rc, line = run_stage(capsys, ["report", "--params", str(params), "--eval", str(tmp_path / "eval"),
                                  "--tables", str(tmp_path / "tables")])
    assert rc == 2 and line == f"layerchop report: error: {tmp_path / 'eval' / message}", line
    assert not (tmp_path / "tables").exists()


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 KiB file system (tmpfs; needs root) that a model directory overflows."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill up: {mount.stderr.strip() or mount.returncode}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("stage", ["chop", "prune"])  # prune: the masked model's directory is written inside another
def test_a_disk_that_fills_up_while_a_model_is_written_names_the_output(tmp_path, tiny_dir, tiny_prepared, small_disk,
                                                                        capsys, stage):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(edited(yaml.safe_load(open(REPO / "params.yaml")), "chop.num_remove", 2)))
    argv = {"chop": ["--model", str(tiny_dir)],
            "prune": ["--method", "magnitude", "--pattern", "2of4", "--model", str(tiny_dir), "--data",
                      str(tiny_prepared)]}[stage]
    rc, line = run_stage(capsys, [stage, "--params", str(params), *argv, "--out", str(small_disk / "model")])
    assert rc == 2, line
    assert re.fullmatch(rf"layerchop {stage}: error: {small_disk}/model: the disk filled up while it was written "
                        rf"\([0-9.]+ MiB free on {small_disk}\); nothing was left behind", line), line
    assert list(small_disk.iterdir()) == []


def test_what_counts_as_a_full_disk():
    """Without a small file system to fill (no mount rights): the errors a full disk raises, and those it does not."""
    import errno

    from safetensors import SafetensorError

    from layerchop.io import disk_full

    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(SafetensorError("Error while deserializing header: HeaderTooLarge"))
    assert not disk_full(ValueError("No space left on device"))


def test_an_explicit_encoding_reads_latin1(tmp_path):
    from layerchop.data.sources import local_documents

    (tmp_path / "plays.txt").write_bytes("Ros\u00e9\n".encode("latin-1"))
    [doc] = local_documents([tmp_path / "plays.txt"], encoding="latin-1")
    assert doc["text"] == "Ros\u00e9\n"
    params = {"download": {"corpus": {"source": "local", "local_paths": ["local/corpus/x.txt"], "encoding": "utf-9"}}}
    with pytest.raises(ValueError, match=r"download.corpus.encoding='utf-9' is invalid"):
        section("download", params)


# --------------------------------------------------------------------- outputs that cannot be written
OUTPUT_CASES = [
    ("chop", ["--model", "{model}", "--out", "{bad}"], "--out"),
    ("prune", ["--method", "wanda", "--pattern", "2of4", "--model", "{model}", "--data", "{data}", "--out", "{bad}"],
     "--out"),
    ("evaluate", ["--model", "{model}", "--data", "{data}", "--out", "{bad}"], "--out"),
    ("report", ["--eval", "{tmp}/eval", "--tables", "{bad}"], "--tables"),
    ("figure1", ["--eval", "{tmp}/eval", "--tables", "{tmp}/t", "--figures", "{bad}"], "--figures"),
    ("train", ["--init", "{model}", "--data", "{data}", "--out", "{bad}", "--run-dir", "{tmp}/r"], "--out"),
    ("train", ["--init", "{model}", "--data", "{data}", "--out", "{tmp}/o", "--run-dir", "{bad}"], "--run-dir"),
    ("train", ["--init", "{model}", "--data", "{data}", "--out", "{tmp}/o", "--run-dir", "{tmp}/r", "--metrics",
               "{bad}"], "--metrics"),
    ("download", ["corpus", "--out", "{bad}"], "--out"),
    ("benchmarks", ["--out", "{bad}"], "--out"),
    ("scratch", ["--like", "{model}", "--out", "{bad}"], "--out"),
    ("figure2", ["--layerchop", "{tmp}/a.json", "--scratch", "{tmp}/b.json", "--start", "{tmp}/c.json", "--tables",
                 "{tmp}/t", "--figures", "{bad}"], "--figures"),
    ("table6", ["--eval", "{tmp}/eval", "--main-chopped", "{tmp}/c", "--main-recovered", "{tmp}/r", "--dense", "{tmp}/d.json", "--tables", "{bad}", "--figures", "{tmp}/f"],
     "--tables"),
    ("tables45", ["--models", "{model}", "--results", "{tmp}/r.json", "--tables", "{bad}"], "--tables"),
    ("shrink", ["--model", "{model}", "--out", "{bad}"], "--out"),
    ("figure3", ["--layerchop", "{tmp}/a.json", "--start", "{tmp}/b.json", "--dimchop", "{tmp}/c.json",
                 "--structured", "{tmp}/d.json", "--dimchop-tokens", "{tmp}/e.json", "--dense", "{tmp}/f.json",
                 "--shrunk", "{model}", "--tables", "{tmp}/t", "--figures", "{bad}"], "--figures"),
    ("figure6", ["--gradual", "{tmp}/g", "--at-once", "{tmp}/a.json", "--dense", "{tmp}/d.json", "--start",
                 "{tmp}/c.json", "--tables", "{tmp}/t", "--figures", "{bad}"], "--figures"),
]


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_outputs_are_refused_by_every_stage_before_any_work(tmp_path, tiny_dir, tiny_prepared, capsys,
                                                                     where):
    (tmp_path / "a_file").write_text("in the way")
    bad = tmp_path / "a_file" / "out" if where == "under-a-file" else Path("/proc/layerchop-out")
    for stage, rest, key in OUTPUT_CASES:
        argv = [stage, "--params", str(REPO / "params.yaml")]
        argv += [a.format(model=tiny_dir, data=tiny_prepared, tmp=tmp_path, bad=bad) for a in rest]
        rc, line = run_stage(capsys, argv)
        assert rc == 2 and line.startswith(f"layerchop {stage}: error: {key} {bad}: cannot"), (stage, line)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"], stage  # nothing written


def test_a_gpu_run_on_a_machine_without_one_is_refused(tmp_path, tiny_dir, tiny_prepared, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    params = yaml.safe_load(open(REPO / "params.yaml"))
    params["train"].update(accelerator="gpu", token_budget=5 * 4 * 32, batch_size=4, accumulate=1, val_batches=1,
                           warm_start_steps=0, warmup_steps=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rc, line = run_stage(capsys, ["train", "--params", str(tmp_path / "params.yaml"), "--init", str(tiny_dir),
                                  "--data", str(tiny_prepared), "--out", str(tmp_path / "o"), "--run-dir",
                                  str(tmp_path / "r")])
    assert rc == 2 and "train.accelerator='gpu': this machine has no CUDA device" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_json_output_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from layerchop.io import OutputError, write_json

    def full(self, *a, **k):
        with open(self, "w") as f:
            f.write("{")  # a partial file, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError, match=r"out.json: the disk filled up while it was written; nothing was left"):
        write_json(tmp_path / "out.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []
