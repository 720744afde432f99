"""AQN apply + restore vs one forward pass, on a SmolLM2-135M-shaped model.

Goal (issue: core noise injection): apply + restore under 2 % of one forward pass on
1 x 128 tokens. Both are timed in this run, on this machine, and printed as a ratio.

    python bench/bench_noise.py [--dtype bfloat16] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aqn.noise import NoiseInjectionConfig, NoiseInjector, NoiseSwallowedWarning

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    tie_word_embeddings=True)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    warnings.simplefilter("ignore", NoiseSwallowedWarning)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(getattr(torch, args.dtype)).eval()
    injector = NoiseInjector(model, NoiseInjectionConfig(total_steps=100, seed=0).resolved())
    tokens = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, 128))
    step = iter(range(10, 10**9))

    def apply_restore():
        injector.apply(next(step))
        injector.restore()

    def forward():
        with torch.no_grad():
            model(tokens)

    noise_ms = median_ms(apply_restore, args.repeats)
    forward_ms = median_ms(forward, max(5, args.repeats // 3))
    print(f"model: 30 layers, hidden 576 ({args.dtype}), {len(injector.targets)} AQN targets, "
          f"{injector.num_params} parameters; torch threads {torch.get_num_threads()}")
    print(f"apply + restore      {noise_ms:8.2f} ms (median of {args.repeats})")
    print(f"forward 1 x 128      {forward_ms:8.2f} ms")
    ratio = noise_ms / forward_ms
    print(f"ratio                {ratio:8.2%}  (goal < 2 %: {'met' if ratio < 0.02 else 'MISSED'})")


if __name__ == "__main__":
    main()
