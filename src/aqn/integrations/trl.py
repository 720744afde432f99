"""AQN inside TRL's ``GRPOTrainer`` (TRL 1.16), without a fork.

    from trl import GRPOConfig, GRPOTrainer
    from aqn.integrations.trl import add_aqn

    trainer = GRPOTrainer(model=..., args=GRPOConfig(..., max_steps=200), ...)
    aqn = add_aqn(trainer, {"enabled": True, "preset": "qerl"})
    trainer.train()

TRL has no callback event between generation and the loss, so ``add_aqn`` wraps the
trainer's ``_generate`` (every training generation, single- and multi-turn): the noise is
written into the norms of the model that generates right before, and the clean weights are
written back right after, bit for bit, so the loss, the optimizer and the saved checkpoints
only ever see clean weights. Evaluation generates clean (AQN is off in validation).

- ``use_vllm=False``: the generating model is the training model itself (unwrapped).
- ``use_vllm=True, vllm_mode="colocate"``: the injector targets vLLM's own model (its
  ``RMSNorm`` modules, by aqn's class-name rule); TRL's ``sync_weights`` overwrites them with
  the trainer's weights, so the adapter takes those as the new clean copy and applies the
  step's noise again right after each sync, and resets vLLM's prefix cache after every edit
  (it would otherwise serve KV computed under other weights). ``vllm_mode="server"`` runs
  vLLM in another process and is refused.

The schedule's step is ``trainer.state.global_step``; its length is ``args.max_steps`` (or
the block's ``total_steps``); its seed ``args.seed`` (or the block's ``seed``). Each
generation logs the injector's ``aqn/*`` metrics through TRL's own metric buffer, so they
appear in ``trainer.state.log_history`` and every ``report_to`` backend.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from aqn.config import resolve_noise
from aqn.errors import ConfigError
from aqn.noise import NoiseInjectionConfig, NoiseInjector, NoiseReport


class TRLNoise:
    """The AQN attached to one ``GRPOTrainer``; ``remove()`` detaches it."""

    def __init__(self, trainer: Any, noise: NoiseInjectionConfig | Mapping[str, Any]) -> None:
        args = trainer.args
        self.trainer = trainer
        self.config = resolve_noise(noise, args.max_steps if args.max_steps > 0 else None,
                                    args.seed)
        self.use_vllm = bool(getattr(trainer, "use_vllm", False))
        self.model = self._generating_model()
        self.injector = NoiseInjector(self.model, self.config)  # nothing matched: fails here
        self.reports: list[NoiseReport] = []  # one per training generation, in order
        self._step: int | None = None  # the step whose noise is on now
        self._report: NoiseReport | None = None  # what the last apply wrote
        self._originals: list[tuple[Any, str]] = []
        self._wrap(trainer, "_generate", self._generate)
        if self.use_vllm:
            self._wrap(trainer.vllm_generation, "sync_weights", self._sync_weights)
            if self.config.enabled and trainer.vllm_importance_sampling_correction:
                warnings.warn(
                    "TRL's vllm_importance_sampling_correction reweights each token by "
                    "p_train / p_rollout, and the rollout is the noisy policy: it partly undoes "
                    "AQN. QeRL ran without it; set vllm_importance_sampling_correction=False "
                    "to reproduce that setup.", stacklevel=3)

    def _generating_model(self) -> nn.Module:
        trainer = self.trainer
        if not self.use_vllm:
            return trainer.accelerator.unwrap_model(trainer.model)
        if trainer.vllm_mode != "colocate":
            raise ConfigError("AQN needs the vLLM model in this process: use "
                              "vllm_mode='colocate' (server mode keeps it in the vLLM server)",
                              "vllm_mode")
        executor = trainer.vllm_generation.llm.llm_engine.model_executor
        return executor.driver_worker.worker.model_runner.get_model()

    def _wrap(self, owner: Any, name: str, replacement: Any) -> None:
        self._originals.append((owner, name))
        setattr(owner, name, replacement)

    def remove(self) -> None:
        """Restore the clean weights and TRL's own methods."""
        self._restore()
        for owner, name in self._originals:
            delattr(owner, name)  # the class's method shows through again
        self._originals.clear()

    def _apply(self, step: int) -> None:
        self._step = step
        self._report = self.injector.apply(step)
        self._weights_changed()

    def _restore(self) -> None:
        self.injector.restore()
        self._step = None
        self._weights_changed()

    def _weights_changed(self) -> None:
        if self.use_vllm:  # cached KV was computed under the previous weights
            self.trainer.vllm_generation.llm.reset_prefix_cache()

    def _generate(self, prompts: list) -> Any:
        original = type(self.trainer)._generate.__get__(self.trainer)
        if not (self.config.enabled and self.trainer.model.training):
            return original(prompts)
        step = self.trainer.state.global_step
        self.injector.refresh_clean()  # the optimizer moved the weights since the last step
        self._apply(step)
        try:
            result = original(prompts)
        finally:
            self._restore()
        self.reports.append(self._report)  # with vLLM: the apply after the sync, if any
        buffer = self.trainer._metrics["train"]  # averaged and logged by TRL's log()
        for key, value in self._report.metrics().items():
            buffer[key].append(value)
        return result

    def _sync_weights(self) -> None:
        type(self.trainer.vllm_generation).sync_weights(self.trainer.vllm_generation)
        # vLLM now holds the trainer's clean weights: take them as clean, then the noise of
        # the step being generated goes back on
        self.injector.refresh_clean()
        if self._step is not None:
            self._apply(self._step)


def add_aqn(trainer: Any, noise: NoiseInjectionConfig | Mapping[str, Any]) -> TRLNoise:
    """Attach AQN (``trainer.noise_injection``'s keys) to a TRL ``GRPOTrainer``."""
    return TRLNoise(trainer, noise)
