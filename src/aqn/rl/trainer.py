"""The GRPO recipe: reads top to bottom, one training step after another.

    sync -> perturb the engine copy (AQN) -> generate (+ rollout log-probs) -> rewards
    -> old log-probs and entropy on the clean trainer copy -> group advantages
    -> mismatch metrics (+ optional rollout correction: IS weights, rejection) -> PPO-clip update

The trainer's copy is never perturbed; the engine holds its own copy and the registry's
perturbations (docs/architecture.md). What it trains with is built in ``aqn.rl.builder``;
the run directory (config, resume, machine.json) is ``aqn.rl.run_dir``.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from aqn import metric_keys as keys
from aqn.config import AQNConfig, config_hash, config_to_dict
from aqn.config.schema import ValKwargs
from aqn.data import DEFAULT_STYLE, encode_prompts, load_task
from aqn.errors import ConfigError, Interrupted, TrainingError
from aqn.files import FileError, write_atomic
from aqn.hashing import derive_seed
from aqn.perturb import check_aqn_plan, check_engine_support, describe_plan
from aqn.rewards import CORRECT_AT, extract_answer, get_reward_fn
from aqn.rl import core_algos as algos
from aqn.rl.builder import build_engine, build_optimizer, build_policy, resolve_device
from aqn.rl.checkpoint import checkpoint_steps, save_checkpoint
from aqn.rl.inputs import fingerprint_inputs, write_or_check_inputs
from aqn.rl.run_dir import (
    RunLock,
    discard_new_run,
    prepare_run_dir,
    resume,
    run_dir_of,
    write_machine_info,
)
from aqn.rl.tracking import Tracker, read_metrics
from aqn.rollout.base import RolloutBatch, SamplingParams
from aqn.rollout.forward import TokenLogProbs, logprob_batch, response_logprobs
from aqn.token_math import masked_mean, rollout_mismatch_metrics

log = logging.getLogger(__name__)

__all__ = ["GRPOTrainer", "run_dir_of", "train"]


@dataclass
class Timer:
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.timings[keys.timing(name)] = time.perf_counter() - t


# ----------------------------------------------------------------------------- step records


@dataclass
class Trajectory:
    """One step's batch, each field filled once (torchtune's ``GRPOTrajectory``): B rows
    (prompts x rollout.n), T response tokens."""

    batch: RolloutBatch  # token ids and masks; rollout_log_probs [B, T] from the engine
    rewards: Tensor  # [B]
    # the engine skipped its recompute, which would have equalled ``old`` to the bit
    rollout_is_old: bool
    advantages: Tensor | None = None  # [B], group-normalized rewards
    ref_log_probs: Tensor | None = None  # [B, T] under the reference model (use_kl_loss)
    # [B, T] the trainer's log-probs and entropy before the update; left None for the update's
    # own forward to fill (one optimizer step per batch: ``old_log_prob_from_update``)
    old: TokenLogProbs | None = None
    # the batch's IS weights and loss mask (algorithm.rollout_correction), when ``old`` is
    # known before the update
    correction: algos.RolloutCorrection | None = None

    def rollout_log_probs(self) -> Tensor:
        """[B, T] the engine's log-probs of the sampled tokens (``old``'s when it skipped)."""
        return self.old.log_probs if self.rollout_is_old else self.batch.rollout_log_probs

    @property
    def loss_mask(self) -> Tensor:
        """[B, T] the response mask less the tokens rejection sampling rejected."""
        return self.batch.response_mask if self.correction is None else self.correction.mask


@dataclass
class UpdateStats:
    """What an update measured (torchtune's ``GRPOStats``): 0-d tensors per micro-batch
    (losses, clip fractions) and per optimizer step (gradient norm), kept on the device until
    ``metrics`` reads each key once."""

    lr: float
    values: dict[str, list[Tensor]] = field(default_factory=dict)

    def add(self, key: str, value: Tensor) -> None:
        self.values.setdefault(key, []).append(value.detach())

    def metrics(self) -> dict[str, float]:
        """The mean of each key over its micro-batches or optimizer steps, and the lr."""
        means = {}
        for key, values in self.values.items():
            read = torch.stack(values).tolist()
            means[key] = sum(read) / len(read)
        return means | {keys.LR: self.lr}


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
    def __init__(self, cfg: AQNConfig, lock: RunLock | None = None) -> None:
        """``lock``: the run directory's, when the caller holds it already (a sweep); it stays
        the caller's to release."""
        self.cfg = cfg
        self.hash = config_hash(cfg)
        self.owns_lock = lock is None
        self.run_dir, self.lock = prepare_run_dir(cfg, lock)  # held until fit() ends
        log.info("config %s -> %s", self.hash, self.run_dir)
        try:
            self._build(cfg)
        except BaseException:
            if self.owns_lock and not cfg.trainer.resume:
                discard_new_run(self.run_dir, self.lock)  # a retry must not find it
            elif self.owns_lock:
                self.lock.release()  # the corrected retry finds the directory free
            raise

    def _build(self, cfg: AQNConfig) -> None:
        t, d = cfg.trainer, cfg.data
        check_engine_support(cfg)  # before any data or model is loaded
        torch.manual_seed(t.seed)

        # Data first: a bad dataset fails before any model is loaded.
        self.train_records, self.val_records = load_task(
            d.source, d.max_train_samples, d.max_val_samples, d.seed, d.difficulty, d.path,
            d.prompt_style, d.wording)
        if len(self.train_records) < d.train_batch_size:
            raise ConfigError(f"the train split has {len(self.train_records)} prompts, fewer "
                              f"than one batch ({d.train_batch_size})", "data.train_batch_size")

        # Two copies of the weights: the trainer's (clean) and the rollout engine's.
        self.device = resolve_device(t.device)
        policy = build_policy(cfg, self.device)
        self.policy, self.tokenizer, self.ref = policy.model, policy.tokenizer, policy.ref
        self.train_prompts = encode_prompts(self.tokenizer, self.train_records,
                                            d.max_prompt_length)
        self.val_prompts = encode_prompts(self.tokenizer, self.val_records, d.max_prompt_length)
        self.engine = build_engine(cfg, policy)
        self.actor_perturbations = policy.perturbations
        plan = describe_plan(cfg, {"rollout": self.engine.perturbations,
                                   "trainer": self.actor_perturbations})
        if t.progress_bar and (self.engine.perturbations.all or self.actor_perturbations.all):
            print(plan, file=sys.stderr)  # before step 0: what will be perturbed, how much
        write_atomic(self.run_dir / "plan.txt", plan + "\n")

        self.data_source = self.val_records[0]["data_source"]  # verl's metric names use it
        self.prompt_style = d.prompt_style or DEFAULT_STYLE[d.source]
        self.reward_fn = get_reward_fn(self.data_source, cfg.reward.method, self.prompt_style)
        self.optimizer = build_optimizer(cfg, self.policy)
        self.trainable = self.optimizer.param_groups[0]["params"]
        self.sampler = PromptSampler(len(self.train_records), d.train_batch_size, t.seed,
                                     d.shuffle)
        # the data and initial weights (before a checkpoint loads): a resume must find them
        write_or_check_inputs(self.run_dir, fingerprint_inputs(
            self.train_records, self.val_records, self.policy), t.resume)
        self.start_step = resume(self.run_dir, cfg, self.policy, self.optimizer)
        write_machine_info(self.run_dir, cfg, self.device)
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
            with timer("perturb"):
                metrics.update(self.engine.perturbations.apply(step))
                check_aqn_plan(cfg, self.engine.perturbations, step)
                metrics.update(self.actor_perturbations.apply(step))
            ids = self.sampler.indices(step)
            params = SamplingParams(max_new_tokens=cfg.data.max_response_length, n=rollout.n,
                                    temperature=rollout.temperature, top_p=rollout.top_p,
                                    top_k=rollout.top_k)
            # An engine whose recompute would equal the trainer's old log-probs to the bit
            # skips it, and the old ones stand for it (one full forward pass less per step).
            rollout_is_old = (self.engine.recompute_is_exact(self.policy)
                              and not self.actor_perturbations.all)
            with timer("gen"):
                batch = self.engine.generate([self.train_prompts[i] for i in ids], params,
                                             seed=derive_seed(cfg.trainer.seed, "rollout", step),
                                             recompute_logprobs=not rollout_is_old)
            # proof that each one fired (raises naming one that did nothing)
            metrics.update(self.engine.perturbations.check_firing("rollout"))
            with timer("reward"):
                rewards = self.score(batch, ids, step)
            traj = Trajectory(batch, rewards, rollout_is_old=rollout_is_old)
            with timer("old_log_prob"):  # 0 s when the update's forward gives them
                if not self.old_log_prob_from_update():
                    traj.old = self.logprobs(self.policy, batch, with_entropy=True)
            if self.ref is not None:
                with timer("ref"):
                    traj.ref_log_probs = self.logprobs(self.ref, batch).log_probs
            with timer("adv"):
                traj.advantages = algos.grpo_advantages(
                    rewards, batch.group_index, cfg.algorithm.norm_adv_by_std_in_grpo)
            corr = cfg.algorithm.rollout_correction
            if corr.enabled and traj.old is not None:  # once per batch (verl's decoupled mode)
                traj.correction = algos.rollout_correction(
                    traj.old.log_probs, traj.rollout_log_probs(), batch.response_mask, corr)
            with timer("update_actor"):
                stats = self.update(step, traj)
            metrics.update(stats.metrics())
            metrics.update(self.actor_perturbations.check_firing("training"))
            metrics.update(rollout_mismatch_metrics(traj.old.log_probs, traj.rollout_log_probs(),
                                                    batch.response_mask))
            if corr.enabled:
                if traj.correction is None:  # the weights the update applied, row by row
                    traj.correction = algos.rollout_correction(
                        traj.old.log_probs, traj.rollout_log_probs(), batch.response_mask, corr)
                metrics.update(traj.correction.metrics)
        metrics.update(self.batch_metrics(step, traj, timer.timings))
        return metrics

    def score(self, batch: RolloutBatch, ids: list[int], step: int) -> Tensor:
        """[B] the reward of each completion against its prompt's ground truth."""
        texts = self.tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
        truths = [self.train_records[ids[g]]["ground_truth"] for g in batch.group_index]
        rewards = torch.tensor([self.reward_fn(txt, gt) for txt, gt
                                in zip(texts, truths, strict=True)], device=self.device)
        if not torch.isfinite(rewards).all():
            raise TrainingError(f"non-finite reward at step {step}")
        return rewards

    def batch_metrics(self, step: int, traj: Trajectory, timings: dict[str, float]
                      ) -> dict[str, float]:
        """The step's batch statistics under verl's names, read off the tensors in one pass."""
        batch, rewards, advantages = traj.batch, traj.rewards, traj.advantages
        mask = batch.response_mask
        lengths = mask.sum(-1)
        tensors = {
            keys.ENTROPY: masked_mean(traj.old.entropy, mask),
            keys.SCORE_MEAN: rewards.mean(),  # verl calls the reward "score"
            keys.SCORE_MAX: rewards.max(),
            keys.SCORE_MIN: rewards.min(),
            # accuracy of the sampled completions (the reward may add format credit)
            keys.SAMPLED_ACC: (rewards >= CORRECT_AT).float().mean(),
            keys.ADVANTAGES_MEAN: advantages.mean(),
            keys.ADVANTAGES_MAX: advantages.max(),
            keys.ADVANTAGES_MIN: advantages.min(),
            keys.RESPONSE_LENGTH: lengths.mean(),
            keys.RESPONSE_LENGTH_MAX: lengths.max(),
            keys.RESPONSE_LENGTH_MIN: lengths.min(),
            keys.RESPONSE_CLIP_RATIO:
                (lengths >= self.cfg.data.max_response_length).float().mean(),
            keys.PROMPT_LENGTH: batch.prompt_mask.sum(-1).float().mean(),
            keys.TOTAL_TOKENS: batch.attention_mask.sum(),
        }
        read = dict(zip(tensors, torch.stack([t.double() for t in tensors.values()]).tolist(),
                        strict=True))
        read[keys.TOTAL_TOKENS] = tokens = int(read[keys.TOTAL_TOKENS])
        return {keys.GLOBAL_STEP: step + 1, keys.EPOCH: self.sampler.epoch(step), **read,
                keys.ZERO_ADV_FRAC: algos.zero_advantage_fraction(rewards, batch.group_index),
                **timings, keys.THROUGHPUT: tokens / timings[keys.timing("step")]}

    def logprobs(self, model, batch: RolloutBatch, with_entropy: bool = False) -> TokenLogProbs:
        """Log-probs of a rollout batch under a trainer-side model, exactly as the engine's."""
        return logprob_batch(model, batch, self.cfg.actor_rollout_ref.rollout.temperature,
                             self.engine.micro_batch_size, with_entropy)

    def old_log_prob_from_update(self) -> bool:
        """Whether each batch gets exactly one optimizer step, so that the training forward
        runs on the weights the old log-probs are defined on (``actor.old_log_prob: auto``)."""
        actor = self.cfg.actor_rollout_ref.actor  # ppo_mini_batch_size is resolved: prompts
        return (actor.old_log_prob == "auto" and actor.ppo_epochs == 1
                and actor.ppo_mini_batch_size >= self.cfg.data.train_batch_size
                and not self.cfg.algorithm.rollout_correction.needs_whole_batch)

    def update(self, step: int, traj: Trajectory) -> UpdateStats:
        """PPO epochs over mini- and micro-batches of ``traj``.

        ``traj.old`` None: one optimizer step per batch, so each micro-batch's training
        forward gives its old log-probs (detached) and entropy in the same pass, and the update
        fills ``traj.old`` with them. IS weights then come per micro-batch (they are per row:
        the same bits as over the whole batch); else from ``traj.correction``.
        """
        actor = self.cfg.actor_rollout_ref.actor
        corr = self.cfg.algorithm.rollout_correction
        batch, loss_mask = traj.batch, traj.loss_mask
        mini = actor.ppo_mini_batch_size * self.cfg.actor_rollout_ref.rollout.n  # sequences
        micro = actor.ppo_micro_batch_size
        from_update = traj.old is None
        stats = UpdateStats(lr=actor.optim.lr * min(1.0, (step + 1)
                                                    / max(1, actor.optim.warmup_steps)))
        for group in self.optimizer.param_groups:
            group["lr"] = stats.lr
        self.policy.train()
        total = batch.input_ids.shape[0]
        olds: list[TokenLogProbs] = []
        for _ in range(actor.ppo_epochs):
            for start in range(0, total, mini):
                self.optimizer.zero_grad(set_to_none=True)
                for m in range(start, min(start + mini, total), micro):
                    sl = slice(m, m + micro)
                    mask = loss_mask[sl]  # without the tokens rejection sampling rejected
                    out = response_logprobs(
                        self.policy, batch.input_ids[sl], batch.attention_mask[sl],
                        batch.response_length, self.cfg.actor_rollout_ref.rollout.temperature,
                        with_entropy=actor.entropy_coeff != 0 or from_update,
                        entropy_grad=actor.entropy_coeff != 0, fused_head=actor.fused_lm_head)
                    if from_update:
                        olds.append(TokenLogProbs(out.log_probs.detach(), out.entropy.detach()))
                    old_lp = olds[-1].log_probs if from_update else traj.old.log_probs[sl]
                    is_weights = None
                    if traj.correction is not None:
                        is_weights = traj.correction.weights_of(sl)
                    elif corr.rollout_is:  # from_update: per row, so the batch's bits
                        rollout_lp = old_lp if traj.rollout_is_old else batch.rollout_log_probs[sl]
                        is_weights, _ = algos.rollout_is_weights(
                            old_lp, rollout_lp, mask, corr.rollout_is, corr.rollout_is_threshold)
                    pl = algos.policy_loss(
                        old_lp, out.log_probs, traj.advantages[sl], mask,
                        actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c,
                        actor.loss_agg_mode, is_weights=is_weights)
                    loss = pl["pg_loss"]
                    if actor.entropy_coeff != 0:
                        loss = loss - actor.entropy_coeff * algos.agg_loss(
                            out.entropy, mask, actor.loss_agg_mode)
                    if traj.ref_log_probs is not None:
                        kl = algos.agg_loss(algos.kl_penalty(
                            out.log_probs, traj.ref_log_probs[sl], actor.kl_loss_type),
                            mask, actor.loss_agg_mode)
                        loss = loss + actor.kl_loss_coef * kl
                        stats.add(keys.KL_LOSS, kl)
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"non-finite loss at step {step}; the last checkpoint in "
                            f"{self.run_dir / 'checkpoints'} is intact")
                    # weight each micro-batch so the sum over them equals the mini-batch's
                    # aggregate, whatever the micro-batch size
                    (loss * _micro_weight(actor.loss_agg_mode, mask,
                                          loss_mask[start:start + mini]).to(loss.dtype)
                     ).backward()
                    for key in algos.POLICY_LOSS_METRICS:
                        stats.add(f"actor/{key}", pl[key])
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, actor.grad_clip)
                if not torch.isfinite(grad_norm):
                    raise TrainingError(f"non-finite gradient norm at step {step}")
                stats.add(keys.GRAD_NORM, grad_norm)
                self.optimizer.step()
        self.policy.eval()
        if from_update:  # masked as logprob_batch masks them
            traj.old = TokenLogProbs(torch.cat([o.log_probs for o in olds]) * batch.response_mask,
                                     torch.cat([o.entropy for o in olds]))
        return stats

    # -- validation -----------------------------------------------------------------------

    def validate(self, step: int, val: ValKwargs | None = None,
                 clean: bool = False) -> dict[str, float]:
        """Greedy on the validation split, without AQN noise unless asked otherwise.

        ``val`` replaces the config's ``val_kwargs`` (``aqn evaluate --pass-k``); its
        per-item results go to ``val/sampled@<n>_step_<step>.jsonl``, beside (not over) the
        greedy ``val/step_<step>.jsonl`` that reports read. ``clean``: with no perturbation
        at all (what the policy learned, apart from where it runs), to
        ``val/clean_step_<step>.jsonl`` and ``val-clean/*`` metrics.
        """
        t = self.cfg.trainer
        file = f"step_{step}.jsonl" if val is None else f"sampled@{val.n}_step_{step}.jsonl"
        file = f"clean_{file}" if clean else file
        val = val or self.cfg.actor_rollout_ref.rollout.val_kwargs
        self.engine.sync_weights(self.policy)
        self.engine.perturbations.restore()  # clean even if a sync left a norm noisy
        # Simulated hardware (quantization, numerics) is where the model runs, so it stays;
        # noise is a training device, left out unless asked (each registry entry declares it).
        applied = {} if clean else self.engine.perturbations.apply(
            step, validation=not t.validate_with_perturbation)
        extra = {f"{keys.VAL_AUX}{k}": v for k, v in applied.items()}
        params = SamplingParams(max_new_tokens=self.cfg.data.max_response_length, n=val.n,
                                temperature=val.temperature, do_sample=val.do_sample)
        batch = self.engine.generate(self.val_prompts, params,
                                     seed=derive_seed(t.seed, "validation", step),
                                     progress="validation" if self.show_bar else None,
                                     recompute_logprobs=False)  # greedy text is all it needs
        extra.update({f"{keys.VAL_AUX}{k}": v for k, v
                      in self.engine.perturbations.check_firing("validation").items()})
        texts = self.tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
        rows = []
        for text, g in zip(texts, batch.group_index, strict=True):
            rec = self.val_records[g]
            reward = self.reward_fn(text, rec["ground_truth"])
            rows.append({"id": rec["id"], "prompt": rec["prompt"][-1]["content"],
                         "response": text,
                         "extracted": extract_answer(text, self.cfg.reward.method,
                                                     self.prompt_style),
                         "ground_truth": rec["ground_truth"], "score": reward,  # verl's name
                         "correct": reward >= CORRECT_AT})
        path = self.run_dir / "val" / file
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
        source, key = self.data_source, keys.val_clean if clean else keys.val_core
        out = {key(source, "reward", val.n): sum(r["score"] for r in rows) / len(rows),
               key(source, "acc", val.n): sum(r["correct"] for r in rows) / len(rows),
               **extra}
        if val.n > 1:  # sampled validation: how much a group of n could teach GRPO
            solved: dict[int, bool] = {}
            for row, g in zip(rows, batch.group_index, strict=True):
                solved[g] = solved.get(g, False) or row["correct"]
            out[keys.val_pass_at(source, val.n)] = sum(solved.values()) / len(solved)
            out[keys.val_zero_adv(source)] = algos.zero_advantage_fraction(
                torch.tensor([r["score"] for r in rows]), batch.group_index)
        return out

    # -- the loop -------------------------------------------------------------------------

    @property
    def validation_is_perturbed(self) -> bool:
        """Whether validation runs on a perturbed engine (simulated hardware, or any
        perturbation with validate_with_perturbation)."""
        return any(spec.in_validation or self.cfg.trainer.validate_with_perturbation
                   for spec in self.engine.perturbations.specs)

    @property
    def show_bar(self) -> bool:
        """A progress bar only on a terminal; elsewhere ``trainer.progress_bar`` prints lines."""
        return self.cfg.trainer.progress_bar and sys.stderr.isatty()

    def fit(self) -> dict[str, float]:
        """Train to ``trainer.total_training_steps``; returns the last metrics. Ctrl-C or
        SIGTERM ends it as ``Interrupted``, saying the step reached and the last checkpoint."""
        try:
            return self._loop()
        except KeyboardInterrupt as e:
            # read from the run directory: the signal may land between a write and any
            # variable that would record it
            logged = max((r["step"] for r in read_metrics(self.run_dir, torn_tail_ok=True)),
                         default=0)
            saved = checkpoint_steps(self.run_dir)
            saved = f"last checkpoint step {saved[0][0]}" if saved else "no checkpoint yet"
            where = f"at step {logged}/{self.cfg.trainer.total_training_steps} ({saved})"
            raise Interrupted(getattr(e, "signum", signal.SIGINT), where) from None
        finally:
            self.tracker.close()
            if self.owns_lock:
                self.lock.release()

    def _loop(self) -> dict[str, float]:
        t = self.cfg.trainer
        last: dict[str, float] = {}
        if self.start_step == 0 and t.val_before_train:
            last = self.validate(0)
            self.tracker.log(0, last)
        bar = tqdm(range(self.start_step, t.total_training_steps), initial=self.start_step,
                   total=t.total_training_steps, disable=not self.show_bar, desc="GRPO",
                   dynamic_ncols=True)
        val_n = self.cfg.actor_rollout_ref.rollout.val_kwargs.n
        val_key = keys.val_core(self.data_source, "acc", val_n)
        for step in bar:
            metrics = self.step(step)
            done = step + 1
            final = done == t.total_training_steps
            if final or (t.test_freq > 0 and done % t.test_freq == 0):
                timer = Timer()
                with timer("testing"):
                    # clean first, so that the engine ends as it runs (perturbed)
                    if final and self.validation_is_perturbed and t.validate_clean_at_end:
                        metrics.update(self.validate(done, clean=True))
                    metrics.update(self.validate(done))
                metrics.update(timer.timings)
            self.tracker.log(done, metrics)
            if final or (t.save_freq > 0 and done % t.save_freq == 0):
                try:
                    save_checkpoint(self.run_dir, done, self.policy, self.optimizer,
                                    {"config_hash": self.hash}, keep=t.max_actor_ckpt_to_keep)
                except FileError as e:
                    then = ("the earlier ones are intact: make room, then trainer.resume=true"
                            if checkpoint_steps(self.run_dir) else "there is no earlier one "
                            f"to resume from: make room, then delete {self.run_dir} and start "
                            "again")
                    raise FileError(f"{e}; checkpoint {done} was not written, {then}") from e
            last = metrics | {k: v for k, v in last.items() if k not in metrics}
            progress = {"reward": f"{metrics[keys.SCORE_MEAN]:.3f}",
                        "acc": f"{metrics[keys.SAMPLED_ACC]:.3f}",
                        "val": f"{last.get(val_key, math.nan):.3f}",
                        "sigma": f"{metrics.get(keys.AQN_SIGMA, 0):.2g}"}
            if self.show_bar:
                bar.set_postfix(progress)
            elif t.progress_bar:  # a redirected log gets plain lines, not carriage returns
                print(f"step {done}/{t.total_training_steps} "
                      + " ".join(f"{k} {v}" for k, v in progress.items())
                      + f" time {metrics[keys.timing('step')]:.1f}s", file=sys.stderr,
                      flush=True)
        return last


def _micro_weight(mode: str, micro_mask: Tensor, mini_mask: Tensor) -> Tensor:
    """The micro-batch's share of its mini-batch's aggregate, a 0-d float64 tensor (counts
    divided in float64, so the loss sees the same number as a Python division)."""
    if mode == "token-mean":
        part, whole = micro_mask.sum(), mini_mask.sum()
    elif mode == "token-sum":
        return torch.ones((), dtype=torch.float64, device=micro_mask.device)  # sums just add up
    else:  # the seq-mean modes average over the sequences with a valid token (agg_loss)
        part, whole = micro_mask.bool().any(-1).sum(), mini_mask.bool().any(-1).sum()
    return part.double() / whole.double().clamp(min=1.0)


def train(cfg: AQNConfig, lock: RunLock | None = None) -> dict[str, float]:
    """Run (or resume) the GRPO training described by ``cfg``; returns the last metrics.
    ``lock``: the run directory's, when the caller holds it (see ``GRPOTrainer``)."""
    return GRPOTrainer(cfg, lock).fit()
