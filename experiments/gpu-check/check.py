"""GPU check of the paper-scale code paths, through the real stages: FSDP2 + bf16 training of a >= 1B Llama on
CUDA for a few steps (tokens/s and MFU against the GPU's bf16 peak), one-shot SparseGPT 2:4 of two decoder layers
on CUDA, and evaluation in bf16 on CUDA. Prints numbers; asserts only that each stage ran and its output is sane.

    python experiments/gpu-check/check.py                     # on a CUDA machine (skips, exit 0, without one)
    python experiments/gpu-check/check.py --device cpu --width 64 --seq-len 64 --steps 2   # the plumbing on CPU

Everything is made locally (no network): a byte-level BPE tokenizer and a synthetic corpus, a randomly
initialised Llama of Llama-2-7B's depth (32 layers) at ``--width`` (2048: 1.7B parameters with a 32,000-token
vocabulary), prepared with the project's own ``prepare``. ``tests/test_gpu_check.py`` runs the CPU form in CI
and the CUDA form where a GPU is present.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

WORDS = ("the king and queen of the castle walk in the garden where roses bloom and a fool sings of love and war "
         "while soldiers march to the gate with swords and the night falls on the sea").split()
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense bf16 FLOP/s


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in BF16_PEAK.items() if k in device_name), None)


def make_inputs(root: Path, width: int, seq_len: int, docs: int) -> tuple[Path, Path]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

    from layerchop.config import PrepareConfig, TasksConfig
    from layerchop.data.prepare import prepare
    from layerchop.data.sources import llama2_7b_shape_config
    from layerchop.io import save_model_dir

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(root / "tok")
    tokenizer = AutoTokenizer.from_pretrained(root / "tok")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    with open(root / "corpus" / "documents.jsonl", "w") as f:
        for i in range(docs):
            text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(250))
            f.write(json.dumps({"id": f"d{i}", "title": f"d{i}", "text": text}) + "\n")
    config = llama2_7b_shape_config(width, 32000 if width >= 1024 else 512, bos_token_id=1, eos_token_id=2,
                                    pad_token_id=2)
    config.max_position_embeddings = max(config.max_position_embeddings, seq_len)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(config)
    save_model_dir(model, tokenizer, root / "dense", metadata={"stage": "gpu-check", "source": "random"})
    params = sum(p.numel() for p in model.parameters())
    del model
    print(f"[gpu-check] model: 32 layers, width {width}, {params / 1e9:.2f}B parameters, built and saved in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    prepare(root / "corpus", root / "dense", root / "prepared", PrepareConfig(
        seq_len=seq_len, val_fraction=0.1, test_fraction=0.1, seed=0, num_proc=2,
        tasks=TasksConfig(num_items=40, num_choices=4, context_words=32, continuation_words=6)))
    return root / "dense", root / "prepared"


def stage(root: Path, *argv: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "layerchop.cli", *argv, "--params", str(root / "params.yaml")],
                          cwd=root, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"[gpu-check] layerchop {argv[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-5000:]}")
    return proc.stdout, time.perf_counter() - t0


def estimate(root: Path, dense: Path, seq_len: int):
    """``layerchop plan``'s per-rank memory model for the train stage as ``root/params.yaml`` configures it."""
    from transformers import AutoConfig

    from layerchop.config import section
    from layerchop.estimate import train_memory

    return train_memory(AutoConfig.from_pretrained(dense), section("train", path=root / "params.yaml"), seq_len)


def report_memory(root: Path, dense: Path, seq_len: int, metrics: dict, what: str) -> None:
    """Rank 0's measured peak GPU memory beside ``layerchop plan``'s estimate for the same run (CUDA only)."""
    measured = metrics.get("gpu_memory", {}).get("rank0")
    if not measured:
        sys.exit(f"[gpu-check] the train stage's metrics hold no gpu_memory ({what}): was it on the GPU?")
    est = estimate(root, dense, seq_len)
    alloc, reserved = (measured[k] * 2**20 / 1e9 for k in ("gpu_peak_allocated_mb", "gpu_peak_reserved_mb"))
    print(f"[gpu-check] memory, {what}: peak allocated {alloc:.2f} GB, reserved {reserved:.2f} GB; plan estimate "
          f"{est.total:.2f} GB ({est.total / alloc:.2f}x allocated) = {est.as_dict()}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None, help="keep the work directory here (default: a temporary one)")
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("[gpu-check] SKIP: no CUDA device on this machine (torch.cuda.is_available() is False)")
        return 0
    devices = torch.cuda.device_count() if args.device == "cuda" else 1
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    root = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    docs = max(40, args.steps * args.batch_size * devices * args.seq_len // 3000 * 2)
    dense, prepared = make_inputs(root, args.width, args.seq_len, docs)
    gpu = args.device == "cuda"
    params = yaml.safe_load(open(Path(__file__).resolve().parents[2] / "params.yaml"))
    params["train"].update(
        token_budget=args.steps * args.batch_size * args.seq_len * devices, batch_size=args.batch_size, accumulate=1,
        warmup_steps=1, warm_start_steps=0, val_every=0, val_batches=1, ckpt_every=0, strategy="fsdp",
        devices=devices, num_nodes=1, accelerator="gpu" if gpu else "cpu", precision="bf16-mixed",
        fsdp_param_dtype="bfloat16", fsdp_reduce_dtype="float32", activation_checkpointing=True, launcher="local")
    params["prune"].update(device=args.device, num_calibration=8, batch_size=4)
    params["evaluate"].update(device=args.device, dtype="bfloat16", autocast=None, limit=20, ppl_max_sequences=8,
                              batch_size=4)
    params["chop"].update(indices=list(range(1, 31)), num_remove=30)  # chop keeps the first and last layer: 2 left
    (root / "params.yaml").write_text(yaml.safe_dump(params))

    out, wall = stage(root, "train", "--init", str(dense), "--data", str(prepared), "--out", "trained",
                      "--run-dir", "run", "--metrics", "train.json")
    m = json.loads((root / "train.json").read_text())
    tokens_s = m["tokens"] / m["train_s"]
    peak = peak_flops(name) if gpu else None
    mfu = f"{m['flops'] / m['train_s'] / (devices * peak):.1%}" if peak else "n/a (unknown peak)"
    print(f"[gpu-check] train: {devices} x {name}, FSDP2 bf16, activation checkpointing, {m['steps']} steps of "
          f"{args.batch_size} x {args.seq_len} tokens per device: {tokens_s:,.0f} tokens/s, {m['flops']:.3g} FLOPs "
          f"in {m['train_s']:.1f} s of steps, MFU {mfu} (stage wall {wall:.0f} s)", flush=True)
    assert m["train_loss_last"] == m["train_loss_last"] and m["train_loss_last"] < 20
    if gpu:
        report_memory(root, dense, args.seq_len, m, "activation checkpointing")
        # the plan's other activation term: the same run for a few steps without activation checkpointing,
        # where the plan says it fits the card
        params["train"].update(activation_checkpointing=False,
                               token_budget=3 * args.batch_size * args.seq_len * devices)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        need, card = estimate(root, dense, args.seq_len).total, torch.cuda.get_device_properties(0).total_memory / 1e9
        if need > 0.9 * card:
            print(f"[gpu-check] memory, no activation checkpointing: skipped (the plan says {need:.1f} GB, the "
                  f"card has {card:.1f})", flush=True)
        else:
            stage(root, "train", "--init", str(dense), "--data", str(prepared), "--out", "trained_no_ac",
                  "--run-dir", "run_no_ac", "--metrics", "train_no_ac.json")
            report_memory(root, dense, args.seq_len, json.loads((root / "train_no_ac.json").read_text()),
                          "no activation checkpointing")

    stage(root, "chop", "--model", str(dense), "--out", "one_layer")
    out, wall = stage(root, "prune", "--method", "sparsegpt", "--pattern", "2of4", "--model", "one_layer",
                      "--data", str(prepared), "--out", "pruned")
    from safetensors.torch import load_file

    w = load_file(root / "pruned" / "model.safetensors")["model.layers.0.mlp.down_proj.weight"].float()
    groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
    assert int(groups.max()) <= 2, "not 2:4"
    print(f"[gpu-check] prune: SparseGPT 2:4 of two decoder layers on {args.device}, {wall:.1f} s (stage wall, "
          f"model load included); every group of 4 has <= 2 non-zeros", flush=True)

    out, wall = stage(root, "evaluate", "--model", "trained", "--data", str(prepared), "--out", "eval")
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["val/ppl"] == metrics["val/ppl"]
    print(f"[gpu-check] evaluate: bf16 on {args.device}, val ppl {metrics['val/ppl']:.4g}, {wall:.1f} s", flush=True)
    print(f"[gpu-check] done; work directory {root}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
