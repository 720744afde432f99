"""The run config: one frozen dataclass tree with verl's key paths.

Every hyperparameter is a field with a comment; ``resolve`` fills the values that depend
on other sections (AQN's schedule length and seed) once, before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from aqn.errors import ConfigError
from aqn.noise.config import NoiseInjectionConfig


@dataclass(frozen=True)
class ModelConfig:
    # "tiny" (built in code) or a local path / hub id of a Hugging Face causal LM.
    path: str = "tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass(frozen=True)
class ActorRolloutRefConfig:
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass(frozen=True)
class TrainerConfig:
    project_name: str = "aqn"
    experiment_name: str = "default"
    # Seeds model init, data order, sampling and (unless set there) the AQN noise.
    seed: int = 1
    # Optimizer steps; also the length of the AQN schedule unless it sets its own.
    total_training_steps: int = 100
    noise_injection: NoiseInjectionConfig = field(default_factory=NoiseInjectionConfig)

    def __post_init__(self) -> None:
        if self.total_training_steps <= 0:
            raise ConfigError(f"must be > 0, got {self.total_training_steps}",
                              "total_training_steps")


@dataclass(frozen=True)
class AQNConfig:
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def resolve(cfg: AQNConfig) -> AQNConfig:
    """Fill cross-section defaults and check what needs several sections at once."""
    t = cfg.trainer
    noise = t.noise_injection.resolved(total_steps=t.total_training_steps, seed=t.seed)
    if noise.enabled:
        try:
            noise.schedule()  # fail now, not at step 0 of a long run
        except ConfigError as e:
            raise e.under("trainer.noise_injection") from None
    return replace(cfg, trainer=replace(t, noise_injection=noise))
