"""Is the 2:4 kernel faster than the dense one? One projection of Llama-2-7B's shapes at a range of token counts: dense
bf16 ``F.linear`` against the same 2:4 weight as a semi-structured sparse tensor (cuSPARSELt, and CUTLASS), timed
with CUDA events (median of 20 after 5 warm-ups), plus the whole ``F.linear`` call's host time, which is what an
eager decode step pays. Prints a table; writes ``--out`` JSON. Skips (exit 0) without CUDA.

    python experiments/gpu-check/sparse_mm.py --out sparse_mm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SHAPES = {"q_proj": (4096, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}  # (out, in)
TOKENS = [1, 16, 512, 4096, 16384]


def timed(fn, reps: int = 20, warmup: int = 5) -> tuple[float, float]:
    """(median GPU ms by CUDA events, median host ms of the call) over ``reps`` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        fn()
        b.record()
        host.append((time.perf_counter() - t0) * 1e3)
        b.synchronize()
        gpu.append(a.elapsed_time(b))
    return statistics.median(gpu), statistics.median(host)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if not torch.cuda.is_available():
        print("[sparse-mm] skipped: no CUDA device")
        return 0
    torch.manual_seed(0)
    rows = []
    for name, (o, i) in SHAPES.items():
        w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16)
        w = w * (torch.tensor([0, 0, 1, 1], device="cuda", dtype=torch.bfloat16).tile(o, i // 4))  # 2:4
        backends = {}
        for backend, force in (("cusparselt", False), ("cutlass", True)):
            SparseSemiStructuredTensor._FORCE_CUTLASS = force
            try:
                backends[backend] = to_sparse_semi_structured(w)
            except Exception as e:  # a backend this build lacks
                print(f"[sparse-mm] {backend}: {type(e).__name__}: {e}")
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
        for t in TOKENS:
            x = torch.randn(t, i, device="cuda", dtype=torch.bfloat16)
            row = {"proj": name, "out": o, "in": i, "tokens": t}
            row["dense_gpu_ms"], row["dense_host_ms"] = timed(lambda: F.linear(x, w))
            for backend, ws in backends.items():
                try:
                    row[f"{backend}_gpu_ms"], row[f"{backend}_host_ms"] = timed(lambda: F.linear(x, ws))
                    row[f"{backend}_speedup"] = row["dense_gpu_ms"] / row[f"{backend}_gpu_ms"]
                except Exception as e:
                    row[f"{backend}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(row)
            print("[sparse-mm] " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in row.items()), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
