"""Fake quantization of every Linear weight of SmolLM2-135M: ours vs torchao, per format.

Both quantize + dequantize the same weights (all Linears except lm_head: 210 matrices,
106 M parameters) in this run, on this machine; the table gives seconds for the whole
model and the ratio ours / torchao (< 1: ours is faster). Timing does not depend on the
values, so by default the weights are random with SmolLM2's shapes; ``--real`` loads the
model (``aqn.models.load_model("smollm2-135m-instruct")``). Needs torchao (extra ``quant``).

    python bench/bench_quant.py [--dtype bfloat16] [--repeats 3] [--real] [--threads 1]
                                [--formats nvfp4 int4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aqn.quant import FORMATS, LayerError, QuantReport, fake_quantize, select_linears
from aqn.quant.torchao_ref import torchao_fake_quantize

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    tie_word_embeddings=True)


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real", action="store_true", help="load SmolLM2-135M-Instruct")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.real:
        from aqn.models import load_model

        model, _ = load_model("smollm2-135m-instruct", dtype=args.dtype)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(dtype)
    weights = [(path, m.weight.detach()) for path, m in select_linears(model)]
    num_params = sum(w.numel() for _, w in weights)
    print(f"SmolLM2-135M ({'real' if args.real else 'random'} weights, {args.dtype}): "
          f"{len(weights)} Linear weights, {num_params:,} parameters; "
          f"torch threads {torch.get_num_threads()}; median of {args.repeats}")
    print(f"{'format':<9} {'ours s':>8} {'torchao s':>9} {'ours/torchao':>12} "
          f"{'rel L2 %':>8} {'SQNR dB':>7}  {'max |ours - torchao|':>20}")
    for fmt in args.formats:
        ours_s = median_s(lambda fmt=fmt: [fake_quantize(w, fmt) for _, w in weights],
                          args.repeats)
        ref_s = median_s(lambda fmt=fmt: [torchao_fake_quantize(w, fmt) for _, w in weights],
                         args.repeats)
        layers, max_diff = [], 0.0
        for path, w in weights:
            q = fake_quantize(w, fmt)
            layers.append(LayerError.measure(path, w, q))
            diff = (q.float() - torchao_fake_quantize(w, fmt).float()).abs().max().item()
            max_diff = max(max_diff, diff)
        report = QuantReport(fmt, tuple(layers))
        print(f"{fmt:<9} {ours_s:8.3f} {ref_s:9.3f} {ours_s / ref_s:12.2f} "
              f"{100 * report.rel_l2:8.3f} {report.sqnr_db:7.2f}  {max_diff:20.3g}")
    if dtype == torch.bfloat16:
        print("bf16: torchao computes the int4/int8/fp8 scales in bf16, ours in fp32, so those "
              "can differ by one step; nvfp4/mxfp4 agree to the bit (tests: equal in fp32).")


if __name__ == "__main__":
    main()
