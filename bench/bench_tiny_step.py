"""Where the tiny GRPO step's time goes, and what matmul-output noise adds to it.

The robustness sweeps run hundreds of tiny-preset runs on 2 cores, so the step's cost decides
how many seeds fit in 30 minutes. Measured in this run, on this machine, one thread:

1. the tiny preset's step, clean and with matmul-output noise 0.1 (robustness-hw's top
   dose), median per phase after the first step: the noise's cost as a ratio of the clean step;
2. the floor under a decode step: the model's forward for one new token of a 64-row batch
   against its matmuls alone, the same shapes as bare ``F.linear`` calls (the peer). A ratio
   near 1 means the step is compute, not Hugging Face overhead: a leaner forward cannot make it
   much faster, only fewer tokens can;
3. one op-noise hook call on a decode-shaped output: aqn's fused formula against the unfused
   one it replaced (``y + s * |y| * eps`` as four tensor ops).

    python bench/bench_tiny_step.py [--steps 6] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def median_us(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def step_phases(steps: int, overrides: list[str]) -> dict[str, float]:
    """Median seconds per timing_s/* phase of the tiny preset, validation off."""
    from aqn.config import load_config
    from aqn.rl.trainer import GRPOTrainer

    with tempfile.TemporaryDirectory() as root:
        cfg = load_config("tiny", [
            f"trainer.default_local_dir={root}", f"trainer.total_training_steps={steps}",
            "trainer.val_before_train=false", f"trainer.test_freq={steps + 1}",
            f"trainer.save_freq={steps + 1}", *overrides])
        trainer = GRPOTrainer(cfg)
        trainer.fit()
        lines = (Path(trainer.run_dir) / "metrics.jsonl").read_text().splitlines()
    timed = [row for row in map(json.loads, lines) if "timing_s/step" in row][1:]
    return {k.removeprefix("timing_s/"): statistics.median(r[k] for r in timed)
            for k in timed[0] if k.startswith("timing_s/") and k != "timing_s/testing"}


def decode_floor(repeats: int) -> tuple[float, float]:
    """(forward of one decode step, its Linear matmuls alone) in microseconds."""
    from aqn.models.tiny_base import load_tiny_base

    model, _ = load_tiny_base()
    rows, prompt = 64, 24
    ids = torch.randint(0, model.config.vocab_size, (rows, prompt))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        token = ids[:, -1:]
        shapes = []
        hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((m, i[0])))
                 for m in model.modules() if isinstance(m, nn.Linear)]
        model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-1)
        for h in hooks:
            h.remove()
        linears = [(m.weight, m.bias, x.clone()) for m, x in shapes]

        def forward():
            model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.crop(-1)  # the same cache length every call

        def matmuls():
            for w, b, x in linears:
                F.linear(x, w, b)

        return median_us(forward, repeats), median_us(matmuls, repeats)


def hook_call(repeats: int) -> tuple[float, float, float]:
    """(fused, unfused, the matmul itself) for an up-projection output of a decode step."""
    from aqn.hashing import derive_seed

    x, w = torch.randn(64, 1, 128), torch.randn(352, 128)
    y = F.linear(x, w)
    scale = 0.1

    def eps():
        gen = torch.Generator().manual_seed(derive_seed(1, 2, "model.layers.0.mlp.up_proj", 3))
        return torch.randn(y.shape, generator=gen)

    def fused():
        e = eps()
        noisy = torch.addcmul(y, y.abs(), e, value=scale)
        (noisy != y).sum()

    def unfused():
        e = eps()
        yf = y.float()
        noisy = (yf + scale * yf.abs() * e).to(y.dtype)
        (noisy != y).sum()

    return (median_us(fused, repeats), median_us(unfused, repeats),
            median_us(lambda: F.linear(x, w), repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)

    clean = step_phases(args.steps, [])
    noisy = step_phases(args.steps, ["actor_rollout_ref.rollout.op_noise.scale=0.1"])
    print(f"## tiny preset step, median of {args.steps - 1} steps after the first, seconds "
          "(1 thread)\n\n| phase | clean | matmul noise 0.1 | ratio |\n|---|---:|---:|---:|")
    for k in sorted(clean, key=lambda k: (k != "step", k)):
        if clean[k] >= 0.005 or noisy.get(k, 0) >= 0.005:
            print(f"| {k} | {clean[k]:.3f} | {noisy[k]:.3f} | {noisy[k] / clean[k]:.2f} |")

    forward, matmuls = decode_floor(args.repeats)
    print(f"\ndecode step, 64 rows: forward {forward:.0f} us, its Linear matmuls alone "
          f"{matmuls:.0f} us: forward / matmuls = {forward / matmuls:.2f}")
    fused, unfused, linear = hook_call(args.repeats)
    print(f"op-noise hook, one up_proj output of a decode step: fused {fused:.1f} us, unfused "
          f"{unfused:.1f} us (fused / unfused = {fused / unfused:.2f}); the matmul itself "
          f"{linear:.1f} us")


if __name__ == "__main__":
    main()
