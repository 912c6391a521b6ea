"""What bf16 costs on this CPU: one training step of the embedded profile's chopped model, float32 against bf16.

Builds SmolLM2-135M's architecture with 15 decoder layers (random weights: the time does not depend on them),
and times AdamW steps on a batch of 8 x 256 tokens in float32 and under bf16 autocast (what ``train.precision:
bf16-mixed`` runs), then the bf16/float32 ratio of one matmul that :mod:`layerchop.machine` measures before a stage
starts. Prints numbers; asserts nothing. From the repository root:

    python experiments/benchmarks/bf16_step.py --steps 2
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from layerchop.machine import bf16_slowdown, cpu_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (8, 256))
    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} layers")
    times = {}
    for mode in ("float32", "bf16 autocast"):
        steps = []
        for _ in range(args.steps):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "float32"):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            steps.append(time.perf_counter() - t)
        times[mode] = min(steps)
        print(f"{mode}: step {', '.join(f'{s:.2f}' for s in steps)} s")
    print(f"bf16 / float32 per step: {times['bf16 autocast'] / times['float32']:.1f}x; "
          f"one 256^3 matmul (layerchop.machine.bf16_slowdown): {bf16_slowdown():.1f}x")


if __name__ == "__main__":
    main()
