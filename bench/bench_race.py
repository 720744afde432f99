"""One GRPO step of aqn vs TRL's GRPOTrainer, on identical settings, on this machine.

SmolLM2-135M-Instruct, fp32, CPU, full fine-tuning, no gradient checkpointing, no KL;
4 prompts x 8 completions of at most 64 tokens, temperature 1.0, lr 1e-6, one optimizer
step per generation batch (micro-batches of --micro completions), token-mean loss (TRL:
"dapo"), clip 0.2, rewards by aqn's numeric "####" rule on the arith task (verl prompts).

Each side runs in its own subprocess (own caches, own peak RSS); the parent prints the
table. Each side does --warmup steps, then times --steps steps; the table shows medians.

--threads defaults to 1: on a shared 2-core machine, torch's 2 OpenMP threads spin on
barriers whenever another process holds a core, and the same matmul then runs ~10x slower
(measured here: 15.7 ms vs 1.4 ms for a 32 x 576 x 1536 linear). Both sides get the same count.

    python bench/bench_race.py [--steps 3] [--warmup 1] [--micro 8] [--threads 1]
                               [--aqn-override actor_rollout_ref.rollout.log_prob_source=decode]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "RACE-RESULT "
MODEL = "smollm2-135m-instruct"
PROMPTS, N, MAX_NEW = 4, 8, 64
LR = 1e-6
SEED = 1
TRAIN_SAMPLES, VAL_SAMPLES = 64, 8


# ----------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_mb() -> float:
    """RSS high-water mark (VmHWM) since the process started or since reset_peak()."""
    return _status_kb("VmHWM") / 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak of the timed steps alone
    is measured; False if the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Peaks:
    """Peak RSS of the timed steps, overall and per phase: VmHWM is reset at each phase
    boundary and read at its end (phases must not nest)."""

    def __init__(self) -> None:
        self.on = False
        self.overall = 0.0
        self.phase: dict[str, float] = {}

    def start(self) -> None:
        """Called after the warm-up: from now on, peaks count."""
        self.on = reset_peak()

    def mark(self, name: str | None = None) -> None:
        """End of phase ``name`` (None: of untracked work); a new phase starts."""
        if not self.on:
            return
        p = peak_mb()
        self.overall = max(self.overall, p)
        if name:
            self.phase[name] = max(self.phase.get(name, 0.0), p)
        reset_peak()

    def wrap(self, fn, name: str):
        def wrapped(*a, **kw):
            self.mark()
            out = fn(*a, **kw)
            self.mark(name)
            return out
        return wrapped

    def result(self) -> dict:
        self.mark()
        return {"peak_steps_mb": self.overall if self.on else None,
                "peak_phase_mb": self.phase}


def records():
    from aqn.data import load_task

    train, _ = load_task("arith", TRAIN_SAMPLES, VAL_SAMPLES, seed=0, prompt_style="verl")
    return train


# ----------------------------------------------------------------------------- aqn side


def run_aqn(args, workdir: str) -> dict:
    import torch

    from aqn.config import load_config
    from aqn.rl.trainer import GRPOTrainer

    micro = args.micro
    overrides = [
        f"actor_rollout_ref.model.path={MODEL}",
        "actor_rollout_ref.model.dtype=float32",
        "actor_rollout_ref.model.enable_gradient_checkpointing=false",
        "actor_rollout_ref.actor.lora.rank=0",
        "actor_rollout_ref.actor.use_kl_loss=false",
        f"actor_rollout_ref.actor.optim.lr={LR}",
        "actor_rollout_ref.actor.optim.warmup_steps=0",
        "actor_rollout_ref.actor.ppo_mini_batch_size=null",  # one optimizer step per batch
        f"actor_rollout_ref.actor.ppo_micro_batch_size={micro}",
        "actor_rollout_ref.actor.ppo_epochs=1",
        "actor_rollout_ref.actor.loss_agg_mode=token-mean",
        f"actor_rollout_ref.rollout.n={N}",
        "actor_rollout_ref.rollout.temperature=1.0",
        f"actor_rollout_ref.rollout.micro_batch_size={PROMPTS * N}",  # all 32 at once, as TRL
        f"data.train_batch_size={PROMPTS}",
        f"data.max_response_length={MAX_NEW}",
        f"data.max_train_samples={TRAIN_SAMPLES}",
        f"data.max_val_samples={VAL_SAMPLES}",
        "reward.method=numeric",
        "trainer.device=cpu",
        f"trainer.seed={SEED}",
        "trainer.val_before_train=false",
        "trainer.logger=[jsonl]",
        "trainer.progress_bar=false",
        f"trainer.default_local_dir={workdir}",
        "trainer.experiment_name=race",
        f"trainer.total_training_steps={args.warmup + args.steps}",
        *args.aqn_override,
    ]
    cfg = load_config("smollm2-arith", overrides)
    t = time.perf_counter()
    trainer = GRPOTrainer(cfg)
    setup_s = time.perf_counter() - t
    rss_setup = rss_mb()

    # time the engine's log-prob recompute pass (log_prob_source=recompute) inside timing_s/gen
    recompute: list[float] = []
    engine_logprobs = trainer.engine.logprobs

    def timed_logprobs(*a, **kw):
        t0 = time.perf_counter()
        out = engine_logprobs(*a, **kw)
        recompute.append(time.perf_counter() - t0)
        return out

    trainer.engine.logprobs = timed_logprobs
    peaks = Peaks()
    trainer.engine.generate = peaks.wrap(trainer.engine.generate, "generate (+ recompute)")
    trainer.logprobs = peaks.wrap(trainer.logprobs, "old_log_prob")
    trainer.update = peaks.wrap(trainer.update, "update_actor")

    rows = []
    rows_per_step = PROMPTS * N
    for k in range(args.warmup + args.steps):
        if k == args.warmup:
            peaks.start()
        recompute.clear()
        t = time.perf_counter()
        m = trainer.step(k)
        wall = time.perf_counter() - t
        tokens = m["response_length/mean"] * rows_per_step
        print(f"  aqn step {k}{' (warm-up)' if k < args.warmup else ''}: {wall:6.2f} s, "
              f"gen {m['timing_s/gen']:6.2f} s, {tokens:5.0f} completion tokens, "
              f"reward {m['critic/score/mean']:.3f}", flush=True)
        if k >= args.warmup:
            rows.append({
                "step_s": wall,
                "sync_s": m["timing_s/update_weights"],
                "gen_s": m["timing_s/gen"],
                "recompute_s": sum(recompute),
                "reward_s": m["timing_s/reward"],
                "old_log_prob_s": m["timing_s/old_log_prob"],
                "update_s": m["timing_s/update_actor"],
                "tokens": tokens,
                "reward": m["critic/score/mean"],
            })
    return {"side": "aqn", "rows": rows, "setup_s": setup_s, "rss_setup_mb": rss_setup,
            **peaks.result(),
            "log_prob_source": cfg.actor_rollout_ref.rollout.log_prob_source,
            "noise": cfg.trainer.noise_injection.enabled,
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- TRL side


def run_trl(args, workdir: str) -> dict:
    """TRL has no public per-step call: train() runs warm-up + N optimizer steps and a
    callback times each one from on_step_begin to on_step_end (all gradient-accumulation
    micro-steps, the generation inside the first, clipping and the optimizer step; not the
    logging after it). Generation and generate-and-score are timed by wrapping the trainer's
    own methods on the instance, one call per optimizer step here."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from aqn.models import load_model
    from aqn.rewards import get_reward_fn

    micro = args.micro
    rows_per_step = PROMPTS * N
    if rows_per_step % micro:
        raise SystemExit(f"--micro must divide {rows_per_step}")
    t = time.perf_counter()
    dataset = Dataset.from_list([{"prompt": r["prompt"], "ground_truth": r["ground_truth"]}
                                 for r in records()])
    score = get_reward_fn("arith", "numeric", "verl")

    def numeric_reward(prompts, completions, ground_truth, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [score(text, gt) for text, gt in zip(texts, ground_truth, strict=True)]

    model, tokenizer = load_model(MODEL, dtype="float32", seed=SEED)
    config = GRPOConfig(
        output_dir=str(Path(workdir) / "trl"),
        # 32 completions per optimizer step: micro-batches of `micro`, accumulated. TRL's
        # steps_per_generation counts micro-steps, so it is 32 / micro here (derived from
        # generation_batch_size): one generation of all 32, one optimizer step, as aqn.
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=rows_per_step // micro,
        generation_batch_size=rows_per_step,
        num_generations=N,
        num_iterations=1,
        max_completion_length=MAX_NEW,
        temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0,
        loss_type="dapo",  # token-mean over the whole accumulated batch = aqn's token-mean
        scale_rewards="group",
        epsilon=0.2,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch",  # = aqn's torch AdamW
        max_steps=args.warmup + args.steps,
        use_vllm=False, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False,
        report_to="none", logging_steps=1, save_strategy="no", eval_strategy="no",
        disable_tqdm=True, log_completions=False, dataloader_num_workers=0,
        seed=SEED,
    )

    steps: list[float] = []
    peaks = Peaks()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            steps.append(time.perf_counter() - self.t)
            print(f"  TRL step {len(steps) - 1}"
                  f"{' (warm-up)' if len(steps) <= args.warmup else ''}: {steps[-1]:6.2f} s, "
                  f"gen {gen_s[-1] if gen_s else 0:6.2f} s, "
                  f"{gen_tokens[-1] if gen_tokens else 0:5d} completion tokens", flush=True)
            if len(steps) == args.warmup:
                peaks.start()
            else:
                peaks.mark("tokenize + reward + update")

    trainer = GRPOTrainer(model=model, reward_funcs=numeric_reward, args=config,
                          train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[StepTimer()])
    setup_s = time.perf_counter() - t
    rss_setup = rss_mb()

    gen_s: list[float] = []
    gen_tokens: list[int] = []
    score_s: list[float] = []
    generate_single_turn = trainer._generate_single_turn
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        completion_ids, logprobs = generate_single_turn(*a, **kw)
        gen_s.append(time.perf_counter() - t0)
        gen_tokens.append(sum(len(c) for c in completion_ids))
        return completion_ids, logprobs

    def timed_generate_and_score(*a, **kw):
        t0 = time.perf_counter()
        out = generate_and_score(*a, **kw)
        score_s.append(time.perf_counter() - t0)
        return out

    trainer._generate_single_turn = peaks.wrap(timed_generate, "generate")
    trainer._generate_and_score_completions = timed_generate_and_score
    trainer.train()
    if not (len(steps) == len(gen_s) == len(score_s) == args.warmup + args.steps):
        raise SystemExit(f"expected {args.warmup + args.steps} steps with one generation each, "
                         f"timed {len(steps)} steps, {len(gen_s)} generations")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    rows = []
    for k in range(args.warmup, args.warmup + args.steps):
        rows.append({"step_s": steps[k], "gen_s": gen_s[k],
                     "score_s": score_s[k] - gen_s[k],  # tokenize, reward, advantages, masks
                     "update_s": steps[k] - score_s[k],  # fwd/bwd of 4 micro-batches + optim
                     "tokens": gen_tokens[k],
                     "reward": rewards[k] if k < len(rewards) else float("nan")})
    return {"side": "trl", "rows": rows, "setup_s": setup_s, "rss_setup_mb": rss_setup,
            **peaks.result(),
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- parent


def child(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--micro", str(args.micro),
           "--threads", str(args.threads)]
    threads = str(args.threads)
    env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                        "TOKENIZERS_PARALLELISM": "false"}
    for o in args.aqn_override:
        cmd += ["--aqn-override", o]
    print(f"[{side}] {' '.join(cmd[1:])}", flush=True)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        result = None
        for line in proc.stdout:
            if line.startswith(MARK):
                result = json.loads(line[len(MARK):])
            elif not line.startswith("{'"):  # TRL's per-step log dicts: progress lines say enough
                print(line, end="", flush=True)
        proc.wait()
        if proc.returncode or result is None:
            err.seek(0)
            tail = err.read()[-4000:]
            raise SystemExit(f"[{side}] failed (exit {proc.returncode}):\n{tail}")
    return result


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def fmt_mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 1024:.2f} GB"


def table(a: dict, t: dict, args) -> None:
    ar, tr = a["rows"], t["rows"]
    a_step, t_step = med(ar, "step_s"), med(tr, "step_s")
    a_tok, t_tok = med(ar, "tokens"), med(tr, "tokens")
    # per-step seconds per 1000 completion tokens: normalises for different sampled lengths
    a_k = statistics.median(r["step_s"] / r["tokens"] * 1000 for r in ar)
    t_k = statistics.median(r["step_s"] / r["tokens"] * 1000 for r in tr)
    a_gtps = statistics.median(r["tokens"] / r["gen_s"] for r in ar)
    t_gtps = statistics.median(r["tokens"] / r["gen_s"] for r in tr)

    def row(name, av, tv, fmt="{:.2f}", ratio=True):
        r = f"{av / tv:.2f}" if ratio and tv else ""
        print(f"| {name} | {fmt.format(av)} | {fmt.format(tv)} | {r} |")

    print(f"\n## GRPO step race: {MODEL}, {PROMPTS} prompts x {N}, <= {MAX_NEW} new tokens, "
          f"fp32 CPU, full FT; median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| | aqn | TRL | aqn/TRL |\n|---|---:|---:|---:|")
    row("s / step", a_step, t_step)
    row("generation s / step", med(ar, "gen_s"), med(tr, "gen_s"))
    row("  sampling only (aqn: gen - recompute)",
        statistics.median(r["gen_s"] - r["recompute_s"] for r in ar), med(tr, "gen_s"))
    row("non-generation s / step", a_step - med(ar, "gen_s"), t_step - med(tr, "gen_s"))
    row("completion tokens / step", a_tok, t_tok, "{:.0f}")
    row("s / 1000 completion tokens", a_k, t_k)
    row("generation tokens / s", a_gtps, t_gtps, "{:.1f}")
    row("mean reward", statistics.mean(r["reward"] for r in ar),
        statistics.mean(r["reward"] for r in tr), "{:.3f}", ratio=False)
    print(f"| peak RSS, timed steps | {fmt_mb(a['peak_steps_mb'])} | "
          f"{fmt_mb(t['peak_steps_mb'])} | "
          + (f"{a['peak_steps_mb'] / t['peak_steps_mb']:.2f}"
             if a["peak_steps_mb"] and t["peak_steps_mb"] else "") + " |")
    print(f"| RSS after setup | {fmt_mb(a['rss_setup_mb'])} | {fmt_mb(t['rss_setup_mb'])} | "
          f"{a['rss_setup_mb'] / t['rss_setup_mb']:.2f} |")
    row("setup s (model + trainer)", a["setup_s"], t["setup_s"], "{:.1f}", ratio=False)
    for side, res in (("aqn", a), ("TRL", t)):
        if res["peak_phase_mb"]:
            print(f"\npeak RSS by phase, {side}: " + ", ".join(
                f"{k} {fmt_mb(v)}" for k, v in res["peak_phase_mb"].items()))

    print("\n### aqn step split (median s)\n")
    print("| sync weights | gen (of which recompute) | reward | old_log_prob | update_actor "
          "| other |\n|---:|---:|---:|---:|---:|---:|")
    parts = ["sync_s", "gen_s", "reward_s", "old_log_prob_s", "update_s"]
    other = statistics.median(r["step_s"] - sum(r[p] for p in parts) for r in ar)
    print(f"| {med(ar, 'sync_s'):.2f} | {med(ar, 'gen_s'):.2f} ({med(ar, 'recompute_s'):.2f}) "
          f"| {med(ar, 'reward_s'):.2f} | {med(ar, 'old_log_prob_s'):.2f} "
          f"| {med(ar, 'update_s'):.2f} | {other:.2f} |")
    print("\n### TRL step split (median s; TRL logs only a total `step_time`, this split comes "
          "from wrapping its methods)\n")
    print("| generate | tokenize + reward + advantages | update (fwd/bwd + optimizer) |\n"
          "|---:|---:|---:|")
    print(f"| {med(tr, 'gen_s'):.2f} | {med(tr, 'score_s'):.2f} | {med(tr, 'update_s'):.2f} |")
    print("\nper-step rows (s, completion tokens):")
    for side, rows in (("aqn", ar), ("TRL", tr)):
        print(f"  {side}: " + ", ".join(f"{r['step_s']:.1f} s/{r['tokens']:.0f} tok"
                                        for r in rows))
    print(f"""
Notes:
- aqn: log_prob_source={a['log_prob_source']}, AQN noise {'on' if a['noise'] else 'off'}; \
torch threads aqn {a['threads']}, TRL {t['threads']}.
- Both sample their own completions (different RNGs), so lengths differ: compare
  s / 1000 completion tokens as well as s / step.
- aqn's rollout engine shares the trainer's tensors except those a perturbation writes
  (rollout.share_weights; none here, noise off): one copy of the weights, sync copies only
  the owned ones. With one optimizer step per batch the old log-probs and entropy come from
  the training forward (actor.old_log_prob=auto; 0 s under old_log_prob, the time is in
  update_actor), and an unperturbed engine skips its recompute; the mismatch metrics are
  still computed every step.
- TRL with num_iterations=1 and one generation per optimizer step also skips the
  old-log-prob forward, and scores with a fused, chunked LM head (no [batch, length,
  vocab] logits).
- Peak RSS, timed steps: VmHWM reset after the warm-up (/proc/self/clear_refs), so it is the
  high-water mark of the timed steps alone, model and optimizer state included.""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--micro", type=int, default=8,
                        help="completions per forward/backward (both sides)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    parser.add_argument("--aqn-override", action="append", default=[],
                        help="extra dotted override for aqn's config (repeatable)")
    parser.add_argument("--order", default="aqn,trl", help="which side runs first")
    parser.add_argument("--side", choices=["aqn", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.side:
        import warnings

        import torch

        warnings.filterwarnings("ignore")
        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix=f"race-{args.side}-") as workdir:
            result = (run_aqn if args.side == "aqn" else run_trl)(args, workdir)
        print(MARK + json.dumps(result), flush=True)
        return
    results = {side: child(side, args) for side in args.order.split(",")}
    table(results["aqn"], results["trl"], args)


if __name__ == "__main__":
    main()
