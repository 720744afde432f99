"""The GRPO recipe: reads top to bottom, one training step after another.

    sync -> perturb the engine copy (AQN) -> generate (+ rollout log-probs) -> rewards
    -> old log-probs and entropy on the clean trainer copy -> group advantages
    -> mismatch metrics (+ optional truncated importance sampling) -> PPO-clip update

The trainer's copy is never perturbed; the engine holds its own copy (DESIGN.md).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from aqn.config import AQNConfig, config_hash, config_to_dict, dump_config
from aqn.config.schema import ValKwargs
from aqn.data import DEFAULT_STYLE, encode_prompts, load_task
from aqn.errors import ConfigError, TrainingError
from aqn.hashing import derive_seed
from aqn.machine import machine_info
from aqn.models import enable_activation_checkpointing, load_model, stop_token_ids
from aqn.models.lora import apply_lora, trainable_summary
from aqn.noise import NoiseInjector
from aqn.numerics import NumericsEmulator
from aqn.quant import WeightQuantizer, quantize_model
from aqn.rewards import CORRECT_AT, extract_answer, get_reward_fn
from aqn.rl import core_algos as algos
from aqn.rl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from aqn.rl.tracking import Tracker, truncate_metrics
from aqn.rollout.engine import (
    NoisePerturbation,
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    score_batch,
)
from aqn.rollout.forward import ResponseScores, response_scores

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption.
RESUMABLE_KEYS = ("trainer.resume", "trainer.progress_bar", "trainer.logger")


@dataclass
class Timer:
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.timings[f"timing_s/{name}"] = time.perf_counter() - t


# ----------------------------------------------------------------------------- run directory


def run_dir_of(cfg: AQNConfig) -> Path:
    return Path(cfg.trainer.default_local_dir) / cfg.trainer.experiment_name


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def prepare_run_dir(cfg: AQNConfig) -> Path:
    """Create (or, on resume, check) the run directory; write the resolved config."""
    run_dir = run_dir_of(cfg)
    config_file = run_dir / "config.yaml"
    if config_file.exists():
        if not cfg.trainer.resume:
            raise ConfigError(
                f"run directory {run_dir} already holds a run; set trainer.resume=true to "
                "continue it or choose another trainer.experiment_name", "trainer.resume")
        import yaml

        old = _flat(yaml.safe_load(config_file.read_text()))
        new = _flat(config_to_dict(cfg))
        changed = sorted(k for k in old.keys() | new.keys()
                         if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
        if changed:
            raise ConfigError(f"cannot resume {run_dir}: the config differs in "
                              f"{', '.join(changed)}", changed[0])
    try:
        (run_dir / "val").mkdir(parents=True, exist_ok=True)
        config_file.write_text(dump_config(cfg))
    except OSError as e:
        raise ConfigError(f"cannot write the run directory {run_dir}: {e.strerror}",
                          "trainer.default_local_dir") from None
    return run_dir


# ----------------------------------------------------------------------------- data order


class PromptSampler:
    """Prompts of step k: a seeded permutation per epoch, so step k is the same on resume."""

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool) -> None:
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if self.shuffle:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
                self._perms[epoch] = torch.randperm(self.size, generator=gen).tolist()
            else:
                self._perms[epoch] = list(range(self.size))
        return self._perms[epoch]

    def epoch(self, step: int) -> int:
        return step * self.batch_size // self.size

    def indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [self._perm(p // self.size)[p % self.size]
                for p in range(start, start + self.batch_size)]


# ----------------------------------------------------------------------------- the recipe


class GRPOTrainer:
    def __init__(self, cfg: AQNConfig) -> None:
        self.cfg = cfg
        self.hash = config_hash(cfg)
        t, arr = cfg.trainer, cfg.actor_rollout_ref
        self.run_dir = prepare_run_dir(cfg)
        log.info("config %s -> %s", self.hash, self.run_dir)
        torch.manual_seed(t.seed)

        # Data first: a bad dataset fails before any model is loaded.
        d = cfg.data
        self.train_records, self.val_records = load_task(
            d.source, d.max_train_samples, d.max_val_samples, d.seed, d.difficulty, d.path,
            d.prompt_style, d.wording)
        if len(self.train_records) < cfg.data.train_batch_size:
            raise ConfigError(f"the train split has {len(self.train_records)} prompts, fewer "
                              f"than one batch ({cfg.data.train_batch_size})",
                              "data.train_batch_size")

        # Two copies of the weights: the trainer's (clean) and the rollout engine's.
        self.device = resolve_device(t.device)
        self.policy, self.tokenizer = load_model(arr.model.path, dtype=arr.model.dtype,
                                                 seed=t.seed)
        self.policy.to(self.device)
        if arr.actor.quantization:  # QeRL: the base itself is quantized, adapters train
            report = quantize_model(self.policy, arr.actor.quantization)
            log.info("policy quantized to %s:\n%s", arr.actor.quantization, report.table())
        lora = arr.actor.lora
        if lora.rank:
            self.policy = apply_lora(self.policy, lora.rank, lora.alpha, lora.target_modules,
                                     lora.trainable_norms, lora.dropout)
        if arr.model.enable_gradient_checkpointing:
            enable_activation_checkpointing(self.policy)
        trainable, total = trainable_summary(self.policy)
        log.info("policy: %d of %d parameters trainable", trainable, total)
        self.train_prompts = encode_prompts(self.tokenizer, self.train_records,
                                            cfg.data.max_prompt_length)
        self.val_prompts = encode_prompts(self.tokenizer, self.val_records,
                                          cfg.data.max_prompt_length)
        engine_model = copy.deepcopy(self.policy)
        self.ref = None
        if arr.actor.use_kl_loss:
            self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False)
        # The engine's perturbations, in order: simulated hardware first, then AQN noise.
        perturbations = []
        if arr.rollout.quantization:
            perturbations.append(WeightQuantizer(engine_model, arr.rollout.quantization))
        if arr.rollout.numerics != "reference":
            perturbations.append(NumericsEmulator(engine_model, arr.rollout.numerics, t.seed))
        self.actor_numerics = None
        if arr.actor.numerics != "reference":  # installed after the copies were taken
            self.actor_numerics = NumericsEmulator(self.policy, arr.actor.numerics, t.seed)
        if t.noise_injection.enabled:
            # Built from the frozen config before any rollout: fails now if nothing matches.
            injector = NoiseInjector(engine_model, t.noise_injection)
            perturbations.append(NoisePerturbation(injector))
            log.info("AQN on %d modules, noise config %s", len(injector.targets),
                     injector.config_hash)
        self.engine = RolloutEngine(
            engine_model,
            pad_token_id=self.tokenizer.pad_token_id,
            stop_token_ids=stop_token_ids(self.tokenizer, self.policy),
            perturbations=perturbations,
            log_prob_source=arr.rollout.log_prob_source,
            micro_batch_size=arr.rollout.micro_batch_size,
        )
        self.data_source = self.val_records[0]["data_source"]  # verl's metric names use it
        self.prompt_style = d.prompt_style or DEFAULT_STYLE[d.source]
        self.reward_fn = get_reward_fn(self.data_source, cfg.reward.method, self.prompt_style)
        optim = arr.actor.optim
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=optim.lr,
                                           betas=tuple(optim.betas), eps=optim.eps,
                                           weight_decay=optim.weight_decay)
        self.sampler = PromptSampler(len(self.train_records), cfg.data.train_batch_size,
                                     t.seed, cfg.data.shuffle)
        self.start_step = 0
        if t.resume:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is not None:
                self.start_step = load_checkpoint(ckpt, self.policy, self.optimizer)["step"]
                log.info("resumed from %s", ckpt)
        # rows after the checkpoint are re-created; from scratch, step 0 is validated again
        truncate_metrics(self.run_dir, self.start_step if self.start_step else -1)
        for stale in (self.run_dir / "val").glob("step_*.jsonl"):
            if int(stale.stem.removeprefix("step_")) > self.start_step:
                stale.unlink()  # re-created by the resumed run
        (self.run_dir / "machine.json").write_text(
            json.dumps(machine_info(arr.model.dtype), indent=1) + "\n")
        self.tracker = Tracker(self.run_dir, t.logger, t.project_name, t.experiment_name,
                               config_to_dict(cfg))

    # -- one step -----------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        """Training step ``step`` (0-based: the number of optimizer steps done before it)."""
        cfg, rollout = self.cfg, self.cfg.actor_rollout_ref.rollout
        timer = Timer()
        metrics: dict[str, float] = {}
        with timer("step"):
            with timer("update_weights"):
                self.engine.sync_weights(self.policy)
                metrics.update(self.engine.perturb(step))
            if self.actor_numerics is not None:
                metrics.update({f"actor/{k}": v
                                for k, v in self.actor_numerics.apply(step).items()})
            ids = self.sampler.indices(step)
            params = SamplingParams(max_new_tokens=cfg.data.max_response_length, n=rollout.n,
                                    temperature=rollout.temperature, top_p=rollout.top_p,
                                    top_k=rollout.top_k)
            # An unperturbed engine holds the trainer's weights and scores with the same
            # function and batching: its recompute would equal old_log_prob bit for bit, so
            # it is skipped and old_log_prob reused (one full forward pass less per step).
            reuse_old = (rollout.log_prob_source == "recompute" and not self.engine.perturbed
                         and self.actor_numerics is None)
            with timer("gen"):
                batch = self.engine.generate([self.train_prompts[i] for i in ids], params,
                                             seed=derive_seed(cfg.trainer.seed, "rollout", step),
                                             score=not reuse_old)
            with timer("reward"):
                texts = self.tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
                truths = [self.train_records[ids[g]]["ground_truth"] for g in batch.group_index]
                scores = torch.tensor([self.reward_fn(txt, gt) for txt, gt
                                       in zip(texts, truths, strict=True)], device=self.device)
            if not torch.isfinite(scores).all():
                raise TrainingError(f"non-finite reward at step {step}")
            mask = batch.response_mask
            with timer("old_log_prob"):
                old = self.score(self.policy, batch, with_entropy=True)
            if reuse_old:
                batch.rollout_log_probs = old.log_probs
            ref_log_probs = None
            if self.ref is not None:
                with timer("ref"):
                    ref_log_probs = self.score(self.ref, batch).log_probs
            with timer("adv"):
                advantages = algos.grpo_advantages(
                    scores, batch.group_index, cfg.algorithm.norm_adv_by_std_in_grpo)
            metrics.update(algos.rollout_mismatch_metrics(old.log_probs, batch.rollout_log_probs,
                                                          mask))
            is_weights = None
            if cfg.algorithm.rollout_is:
                is_weights, is_metrics = algos.rollout_is_weights(
                    old.log_probs, batch.rollout_log_probs, mask, cfg.algorithm.rollout_is,
                    cfg.algorithm.rollout_is_threshold)
                metrics.update({f"rollout_corr/{k}": v for k, v in is_metrics.items()})
            with timer("update_actor"):
                metrics.update(self.update(step, batch, old.log_probs, ref_log_probs,
                                           advantages, is_weights))
        lengths = mask.sum(-1)
        tokens = batch.attention_mask.sum().item()
        metrics.update({
            "training/global_step": step + 1,
            "training/epoch": self.sampler.epoch(step),
            "actor/entropy": algos.masked_mean(old.entropy, mask).item(),
            "critic/score/mean": scores.mean().item(),
            "critic/score/max": scores.max().item(),
            "critic/score/min": scores.min().item(),
            # accuracy of the sampled completions (the reward may add format credit)
            "critic/acc/mean": (scores >= CORRECT_AT).float().mean().item(),
            "actor/zero_adv_frac": algos.zero_advantage_fraction(scores, batch.group_index),
            "critic/advantages/mean": advantages.mean().item(),
            "critic/advantages/max": advantages.max().item(),
            "critic/advantages/min": advantages.min().item(),
            "response_length/mean": lengths.mean().item(),
            "response_length/max": lengths.max().item(),
            "response_length/min": lengths.min().item(),
            "response_length/clip_ratio":
                (lengths >= cfg.data.max_response_length).float().mean().item(),
            "prompt_length/mean": batch.prompt_mask.sum(-1).float().mean().item(),
            **timer.timings,
            "perf/total_num_tokens": tokens,
            "perf/throughput": tokens / timer.timings["timing_s/step"],
        })
        return metrics

    def score(self, model, batch: RolloutBatch, with_entropy: bool = False) -> ResponseScores:
        """Scores a rollout batch under a trainer-side model exactly as the engine does."""
        return score_batch(model, batch, self.cfg.actor_rollout_ref.rollout.temperature,
                           self.engine.micro_batch_size, with_entropy)

    def update(self, step: int, batch: RolloutBatch, old_log_probs: Tensor,
               ref_log_probs: Tensor | None, advantages: Tensor,
               is_weights: Tensor | None) -> dict[str, float]:
        actor = self.cfg.actor_rollout_ref.actor
        n = self.cfg.actor_rollout_ref.rollout.n
        temperature = self.cfg.actor_rollout_ref.rollout.temperature
        mini = actor.ppo_mini_batch_size * n  # sequences per optimizer step
        micro = actor.ppo_micro_batch_size
        lr = actor.optim.lr * min(1.0, (step + 1) / max(1, actor.optim.warmup_steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.policy.train()
        sums: dict[str, list[float]] = {}
        total = batch.input_ids.shape[0]
        for _ in range(actor.ppo_epochs):
            for start in range(0, total, mini):
                self.optimizer.zero_grad(set_to_none=True)
                for m in range(start, min(start + mini, total), micro):
                    sl = slice(m, m + micro)
                    mask = batch.response_mask[sl]
                    out = response_scores(self.policy, batch.input_ids[sl],
                                          batch.attention_mask[sl], batch.response_length,
                                          temperature, with_entropy=actor.entropy_coeff != 0)
                    pl = algos.policy_loss(
                        old_log_probs[sl], out.log_probs, advantages[sl], mask,
                        actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c,
                        actor.loss_agg_mode,
                        is_weights=None if is_weights is None else is_weights[sl])
                    loss = pl["pg_loss"]
                    if actor.entropy_coeff != 0:
                        loss = loss - actor.entropy_coeff * algos.agg_loss(
                            out.entropy, mask, actor.loss_agg_mode)
                    if ref_log_probs is not None:
                        kl = algos.agg_loss(algos.kl_penalty(out.log_probs, ref_log_probs[sl],
                                                             actor.kl_loss_type),
                                            mask, actor.loss_agg_mode)
                        loss = loss + actor.kl_loss_coef * kl
                        sums.setdefault("actor/kl_loss", []).append(kl.item())
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"non-finite loss at step {step}; the last checkpoint in "
                            f"{self.run_dir / 'checkpoints'} is intact")
                    # weight each micro-batch so the sum over them equals the mini-batch's
                    # aggregate, whatever the micro-batch size
                    (loss * _micro_weight(actor.loss_agg_mode, mask,
                                          batch.response_mask[start:start + mini])).backward()
                    for key in ("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"):
                        sums.setdefault(f"actor/{key}", []).append(pl[key].detach().item())
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, actor.grad_clip)
                if not torch.isfinite(grad_norm):
                    raise TrainingError(f"non-finite gradient norm at step {step}")
                sums.setdefault("actor/grad_norm", []).append(grad_norm.item())
                self.optimizer.step()
        self.policy.eval()
        out = {k: sum(v) / len(v) for k, v in sums.items()}
        out["actor/lr"] = lr
        return out

    # -- validation -----------------------------------------------------------------------

    def validate(self, step: int, val: ValKwargs | None = None) -> dict[str, float]:
        """Greedy on the validation split, without AQN noise unless asked otherwise.

        ``val`` replaces the config's ``val_kwargs`` (``aqn evaluate --pass-k``); its
        per-item results go to ``val/sampled@<n>_step_<step>.jsonl``, beside (not over) the
        greedy ``val/step_<step>.jsonl`` that reports read.
        """
        t = self.cfg.trainer
        file = f"step_{step}.jsonl" if val is None else f"sampled@{val.n}_step_{step}.jsonl"
        val = val or self.cfg.actor_rollout_ref.rollout.val_kwargs
        self.engine.sync_weights(self.policy)
        self.engine.clear_perturbations()  # clean even if a sync left a norm noisy
        # Simulated hardware (quantization, numerics) is where the model runs, so it stays;
        # AQN noise is a training device and is left out unless asked.
        skip = () if t.validate_with_perturbation else ("aqn",)
        extra = {f"val-aux/{k}": v for k, v in self.engine.perturb(step, skip).items()}
        params = SamplingParams(max_new_tokens=self.cfg.data.max_response_length, n=val.n,
                                temperature=val.temperature, do_sample=val.do_sample)
        batch = self.engine.generate(self.val_prompts, params,
                                     seed=derive_seed(t.seed, "validation", step),
                                     progress="validation" if t.progress_bar else None,
                                     score=False)  # greedy text is all validation needs
        texts = self.tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
        rows = []
        for text, g in zip(texts, batch.group_index, strict=True):
            rec = self.val_records[g]
            score = self.reward_fn(text, rec["ground_truth"])
            rows.append({"id": rec["id"], "prompt": rec["prompt"][-1]["content"],
                         "response": text,
                         "extracted": extract_answer(text, self.cfg.reward.method,
                                                     self.prompt_style),
                         "ground_truth": rec["ground_truth"], "score": score,
                         "correct": score >= CORRECT_AT})
        path = self.run_dir / "val" / file
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        source = self.data_source
        reward = sum(r["score"] for r in rows) / len(rows)
        acc = sum(r["correct"] for r in rows) / len(rows)
        out = {f"val-core/{source}/reward/mean@{val.n}": reward,
               f"val-core/{source}/acc/mean@{val.n}": acc, **extra}
        if val.n > 1:  # sampled validation: how much a group of n could teach GRPO
            solved: dict[int, bool] = {}
            for row, g in zip(rows, batch.group_index, strict=True):
                solved[g] = solved.get(g, False) or row["correct"]
            out[f"val-aux/{source}/acc/pass@{val.n}"] = sum(solved.values()) / len(solved)
            out[f"val-aux/{source}/zero_adv_frac"] = algos.zero_advantage_fraction(
                torch.tensor([r["score"] for r in rows]), batch.group_index)
        return out

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        t = self.cfg.trainer
        last: dict[str, float] = {}
        if self.start_step == 0 and t.val_before_train:
            last = self.validate(0)
            self.tracker.log(0, last)
        bar = tqdm(range(self.start_step, t.total_training_steps), initial=self.start_step,
                   total=t.total_training_steps, disable=not t.progress_bar, desc="GRPO",
                   dynamic_ncols=True)
        val_n = self.cfg.actor_rollout_ref.rollout.val_kwargs.n
        val_key = f"val-core/{self.data_source}/acc/mean@{val_n}"
        for step in bar:
            metrics = self.step(step)
            done = step + 1
            final = done == t.total_training_steps
            if final or (t.test_freq > 0 and done % t.test_freq == 0):
                timer = Timer()
                with timer("testing"):
                    metrics.update(self.validate(done))
                metrics.update(timer.timings)
            self.tracker.log(done, metrics)
            if final or (t.save_freq > 0 and done % t.save_freq == 0):
                save_checkpoint(self.run_dir, done, self.policy, self.optimizer,
                                {"config_hash": self.hash})
            last = metrics | {k: v for k, v in last.items() if k not in metrics}
            bar.set_postfix(reward=f"{metrics['critic/score/mean']:.3f}",
                            val=f"{last.get(val_key, math.nan):.3f}",
                            sigma=f"{metrics.get('aqn/sigma', 0):.2g}")
        self.tracker.close()
        return last


def _micro_weight(mode: str, micro_mask: Tensor, mini_mask: Tensor) -> float:
    if mode == "token-mean":
        return micro_mask.sum().item() / max(1.0, mini_mask.sum().item())
    if mode == "seq-mean-token-sum-norm":
        return 1.0  # a sum over sequences divided by a constant: micro losses just add up
    return micro_mask.shape[0] / mini_mask.shape[0]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("cuda was asked for but torch sees no GPU (is this the CPU build of "
                          "torch?)", "trainer.device")
    return torch.device(name)


def train(cfg: AQNConfig) -> dict[str, float]:
    """Run (or resume) the GRPO training described by ``cfg``; returns the last metrics."""
    return GRPOTrainer(cfg).fit()
