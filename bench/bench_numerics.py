"""Generation slowdown of each simulated-hardware numerics profile against ``reference``.

Times ``HFEngine.generate`` on one batch of arith prompts (sampled, seeded) with each
profile installed, interleaving the profiles over the repeats, and prints the median
seconds, seconds per generated token and the ratio to ``reference`` measured in the same
run. The profiles run in Python (split-K is a loop over K chunks), so expect slowdowns.

    python bench/bench_numerics.py [--model tiny] [--dtype bfloat16] [--batch 16]
        [--max-new-tokens 64] [--repeats 3] [--profiles reference gpu-like npu-like]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aqn.models import load_model, stop_token_ids
from aqn.numerics import PROFILES, NumericsEmulator
from aqn.rollout.base import SamplingParams
from aqn.rollout.hf import HFEngine
from aqn.rollout.mismatch import probe_prompts, probe_wording


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, tiny-base, or a HF model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES),
                        choices=list(PROFILES))
    args = parser.parse_args()
    profiles = ["reference", *[p for p in args.profiles if p != "reference"]]

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    prompts = probe_prompts(tokenizer, args.batch, wording=probe_wording(args.model))
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id,
                           stop_token_ids=stop_token_ids(tokenizer, model),
                           micro_batch_size=args.batch)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    emulators = {name: NumericsEmulator(model, name, seed=0) for name in profiles}

    def generate(name: str) -> tuple[float, int]:
        emulator = emulators[name]
        emulator.apply(0)
        try:
            t = time.perf_counter()
            batch = engine.generate(prompts, params, seed=0)
            return time.perf_counter() - t, int(batch.response_mask.sum())
        finally:
            emulator.restore()

    for name in profiles:  # warm-up
        generate(name)
    seconds: dict[str, list[float]] = {name: [] for name in profiles}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name in profiles:
            s, n = generate(name)
            seconds[name].append(s)
            tokens[name] = n

    print(f"model {args.model} ({args.dtype}), batch {args.batch}, up to "
          f"{args.max_new_tokens} new tokens, sampled T=1 seed 0; median of {args.repeats}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'profile':<12} {'patched':>7} {'tokens':>7} {'seconds':>9} {'ms/token':>9} "
          f"{'ratio':>7}")
    ref_per_token = statistics.median(seconds["reference"]) / tokens["reference"]
    for name in profiles:
        med = statistics.median(seconds[name])
        emulators[name].apply(0)
        patched = int(emulators[name].metrics()["numerics/patched_modules"])
        emulators[name].restore()
        per_token = med / tokens[name]
        print(f"{name:<12} {patched:>7} {tokens[name]:>7} {med:>9.3f} {per_token * 1e3:>9.3f} "
              f"{per_token / ref_per_token:>6.2f}x")


if __name__ == "__main__":
    main()
