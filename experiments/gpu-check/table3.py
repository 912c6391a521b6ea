"""Table 3 on a GPU: the bench on SmolLM2-135M's architecture, a 1.1B Llama's and Llama-2-7B's, each as dense, chopped
(half its layers, the ``input`` layout, first and last kept), 2:4 and 4:8 (each projection's smallest weights in
every group zeroed), timed interleaved as ``layerchop bench`` does, then rendered as ``layerchop table3`` does.

The weights are random: nothing can be downloaded on the GPU machine and the checkpoints are too large to carry.
Latency does not depend on the weights' values (the 2:4 / 4:8 patterns are enforced, so the sparse kernels see
what a pruned checkpoint gives them). The two smaller scales go through the real stages (``layerchop bench`` on
saved model directories, then ``layerchop table3``); Llama-2-7B's four copies would not fit the machine's disk, so
it runs in process through the same functions (``layerchop.evaluate.latency.prepare`` and ``bench_run``).

    python experiments/gpu-check/table3.py --out DIR                      # on a CUDA machine (skips without)
    python experiments/gpu-check/table3.py --out DIR --device cpu --scales tiny   # the plumbing on CPU

Prints what it measures; writes ``<scale>.json`` (the bench's metrics), ``tables.md`` and
``fig_<scale>.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SCALES = {  # LlamaConfig fields
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=2048),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                      max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
}
IN_PROCESS = {"llama2-7b"}  # too large to save four copies: timed in process
LABELS = {"dense": "Dense", "layerchop": "LayerChop (half the layers)", "two4": "2:4", "four8": "4:8"}


def variants(name: str, device, dtype, with_48: bool = True) -> dict:
    """Dense, chopped, 2:4 and 4:8 copies of one architecture (random weights, seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerchop.prune.chop import chop_layers, removed_indices
    from layerchop.prune.sparsity import Pattern, select_mask

    config = LlamaConfig(**SCALES[name])
    torch.manual_seed(0)
    with torch.device(device):
        dense = LlamaForCausalLM(config).to(dtype).eval()
    out = {"dense": dense}

    def copy():
        with torch.device(device):
            m = LlamaForCausalLM(LlamaConfig(**SCALES[name])).to(dtype).eval()  # its own config: chop edits it
        m.load_state_dict(dense.state_dict())
        return m

    chopped = copy()
    chop_layers(chopped, removed_indices(config.num_hidden_layers, layout="input",
                                         num_remove=config.num_hidden_layers // 2))
    out["layerchop"] = chopped
    for key, spec in (("two4", "2:4"), ("four8", "4:8")) if with_48 else (("two4", "2:4"),):
        m = copy()
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if pname.endswith("proj.weight"):
                    p[select_mask(p.abs().float(), Pattern.parse(spec))] = 0
        out[key] = m
    return out


def bench_params(device: str, dtype: str, small: bool, quick: bool = False) -> dict:
    if quick:  # what fits a few minutes of a GPU: prefill-heavy cells, short decodes
        grid = {"batch_sizes": [1, 16], "prompt_lengths": [512], "new_tokens": 4, "repeats": 3, "warmup": 1,
                "query_batch": 1, "query_prompt": 512}
    elif small:  # the CPU plumbing
        grid = {"batch_sizes": [1, 2], "prompt_lengths": [16], "new_tokens": 2, "repeats": 2, "warmup": 1,
                "query_batch": 1, "query_prompt": 16}
    else:
        grid = {"batch_sizes": [1, 8, 32], "prompt_lengths": [128, 512], "new_tokens": 8, "repeats": 5,
                "warmup": 1, "query_batch": 1, "query_prompt": 512}
    return {"bench": {"device": device, "dtype": dtype, **grid, "labels": LABELS}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scales", nargs="+", default=["smollm2-135m", "llama-1.1b", "llama2-7b"])
    ap.add_argument("--quick", action="store_true", help="a small grid, every scale in process (no saved copies)")
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("[table3-gpu] skipped: no CUDA device (the 2:4 kernels and this check need one)")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    dtype = "bfloat16" if cuda else "float32"
    small = not cuda
    root = Path(tempfile.mkdtemp(prefix="table3-gpu-"))
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(bench_params(args.device, dtype, small, args.quick)))
    if cuda:
        print(f"[table3-gpu] {torch.cuda.get_device_name()}, torch {torch.__version__}, cuSPARSELt "
              f"{torch.backends.cusparselt.is_available()}", flush=True)
    tables = []
    for scale in args.scales:
        t0 = time.perf_counter()
        metrics_path = out / f"{scale}.json"
        try:
            models = variants(scale, args.device, getattr(torch, dtype), with_48=not (args.quick or scale in IN_PROCESS))
            if args.quick or scale in IN_PROCESS:
                from layerchop.config import load_params, section
                from layerchop.io import write_json
                from layerchop.evaluate.latency import bench_run, prepare

                cfg = section("bench", load_params(params))
                records = {}
                for name in list(models):
                    models[name], records[name] = prepare(name, models[name], torch.device(args.device),
                                                          getattr(torch, dtype), cfg.sparse_kernel)
                write_json(metrics_path, bench_run(models, records, cfg, torch.device(args.device)))
            else:
                specs = []
                for name, model in models.items():
                    model.save_pretrained(root / scale / name)
                    specs += ["--model", f"{name}={root / scale / name}"]
                models = None  # the bench process loads its own copies
                subprocess.run([sys.executable, "-m", "layerchop.cli", "bench", "--params", str(params), *specs,
                                "--out", str(metrics_path)], check=True)
            models = None
            if cuda:
                torch.cuda.empty_cache()
            subprocess.run([sys.executable, "-m", "layerchop.cli", "table3", "--params", str(params), "--bench",
                            str(metrics_path), "--tables", str(root / scale), "--figures", str(root / scale)],
                           check=True, stdout=subprocess.DEVNULL)
            tables.append(f"## {scale}\n\n" + (root / scale / "table3_latency.md").read_text())
            (out / f"fig_{scale}.png").write_bytes((root / scale / "fig_speedup_vs_batch.png").read_bytes())
            m = json.loads(metrics_path.read_text())
            for name, rec in m["models"].items():
                print(f"[table3-gpu] {scale} {name}: kernel {rec['kernel']}, profiler {rec['profiler_ops']}, "
                      f"weights {rec['weights_bytes'] / 2**20:.0f} MiB", flush=True)
            for cell in m["cells"]:
                line = ", ".join(f"{n} pre {c['prefill_speedup']['median']:.2f}x/{c['bound']['prefill']:.2f} "
                                 f"dec {c['decode_speedup']['median']:.2f}x/{c['bound']['decode']:.2f}"
                                 for n, c in cell["models"].items() if n != m["baseline"])
                base = cell["models"][m["baseline"]]
                print(f"[table3-gpu] {scale} b{cell['batch']} p{cell['prompt']}: dense prefill "
                      f"{base['prefill_s']['median'] * 1e3:.2f} ms, decode {base['decode_step_s']['median'] * 1e3:.2f}"
                      f" ms/step; {line}", flush=True)
        except Exception as e:  # one scale failing (memory, a kernel) must not lose the others' results
            print(f"[table3-gpu] {scale}: FAILED {type(e).__name__}: {e}", flush=True)
            tables.append(f"## {scale}\n\nFAILED: {type(e).__name__}: {e}\n")
            models = None
            if cuda:
                torch.cuda.empty_cache()
        print(f"[table3-gpu] {scale} done in {time.perf_counter() - t0:.0f} s", flush=True)
        (out / "tables.md").write_text("\n".join(tables))
    print("[table3-gpu] done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
