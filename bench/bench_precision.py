"""A float16 rollout engine, real or emulated: generation time and mismatch on this CPU.

What ``actor_rollout_ref.rollout.dtype=float16`` could mean on the hf engine, measured side by
side against the fp32 engine (the peer, ratio 1), each on the same sampled arith prompts:

- ``fp32``: the engine as the trainer (no perturbation; mismatch 0);
- ``bf16 cast`` / ``fp16 cast``: the engine's parameters cast to the dtype, PyTorch's own
  bf16 / fp16 kernels (what aqn does, as verl casts vLLM's model);
- ``fp16 emulated``: an fp32 engine whose weights are rounded to the fp16 grid and whose
  activations (Linear, embedding, norm, activation, decoder-layer outputs) are rounded to
  fp16 by a numerics profile (``rounding: rne, precision: fp16``): what an emulation on the
  fp32 kernels would give.

Prints median generation seconds (``HFEngine.generate``, sampled, seeded; interleaved over
the repeats, after one warm-up), the ratio to fp32, and mean |dlogp| per token against the
fp32 model (``measure_mismatch``), plus the emulation's mismatch against the real fp16 cast.

    python bench/bench_precision.py [--model tiny-base] [--prompts 16] [--new-tokens 64]
        [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch import nn

from aqn.models import cast_parameters, load_model
from aqn.numerics import NumericsEmulator, get_profile, round_to
from aqn.rollout.mismatch import measure_mismatch, probe_prompts, probe_wording

FP16_ACTIVATIONS = get_profile({"name": "fp16-activations", "rounding": "rne",
                                "precision": "fp16"})


def emulated_fp16(model: nn.Module) -> NumericsEmulator:
    """The fp32 engine copy with its weights on the fp16 grid and fp16-rounded activations."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(round_to(p, "fp16"))
    return NumericsEmulator(model, FP16_ACTIVATIONS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-base")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    prompts = probe_prompts(tokenizer, args.prompts, wording=probe_wording(args.model))
    variants = {"fp32": (None, "reference"), "bf16 cast": ("bfloat16", "reference"),
                "fp16 cast": ("float16", "reference"), "fp16 emulated": (None, emulated_fp16)}

    def run(name: str) -> dict[str, float]:
        dtype, perturbation = variants[name]
        return measure_mismatch(model, tokenizer, prompts, perturbation,
                                max_new_tokens=args.new_tokens, seed=0, rollout_dtype=dtype)

    last = {name: run(name) for name in variants}  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            last[name] = run(name)
            seconds[name].append(last[name]["mismatch/gen_s"])

    # the emulation against the real fp16 engine: the fp16-cast model as the "trainer"
    real16 = cast_parameters(copy.deepcopy(model), "float16")
    vs_real = measure_mismatch(real16, tokenizer, prompts,
                               lambda m: emulated_fp16(cast_parameters(m, "float32")),
                               max_new_tokens=args.new_tokens, seed=0)

    print(f"{args.model}: {len(prompts)} prompts, up to {args.new_tokens} sampled tokens "
          f"(T=1, seed 0); median of {args.repeats}; torch threads {torch.get_num_threads()}")
    print(f"{'engine':<14} {'tokens':>6} {'gen s':>7} {'ratio':>6} {'mean |dlogp|':>13}")
    ref = statistics.median(seconds["fp32"])
    for name in variants:
        med = statistics.median(seconds[name])
        print(f"{name:<14} {int(last[name]['mismatch/num_tokens']):>6} {med:>7.3f} "
              f"{med / ref:>5.2f}x {last[name]['rollout_corr/abs_logp_diff_mean']:>13.3g}")
    print(f"fp16 emulated vs fp16 cast: mean |dlogp| "
          f"{vs_real['rollout_corr/abs_logp_diff_mean']:.3g}, max "
          f"{vs_real['rollout_corr/abs_logp_diff_max']:.3g}")


if __name__ == "__main__":
    main()
