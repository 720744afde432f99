"""AQN as a vLLM worker extension: the part of the verl integration that runs inside vLLM.

vLLM appends a ``worker_extension_cls`` to every worker's bases, in the worker process, so
these methods run where the rollout model lives (``self.model_runner.model``), on every
tensor-parallel rank. It imports neither vLLM nor verl: ``aqn.integrations.verl`` binds it to
verl's weight sync, and plain vLLM can load it as is (``LLM(worker_extension_cls=...)``).

The AQN block arrives resolved and frozen in vLLM's ``additional_config["aqn_noise"]`` (see
``aqn.integrations.verl.overrides``); nothing is read from the environment. Every attribute
starts with ``aqn_`` / ``_aqn_``: vLLM refuses an extension whose names clash with the
worker's.
"""

from __future__ import annotations

from typing import Any

from aqn.errors import ConfigError
from aqn.integrations import resolve_noise
from aqn.noise import NoiseInjectionConfig, NoiseInjector

CONFIG_KEY = "aqn_noise"
CONFIG_PATH = f"actor_rollout_ref.rollout.engine_kwargs.vllm.additional_config.{CONFIG_KEY}"


def worker_noise_config(additional_config: Any) -> NoiseInjectionConfig:
    """The frozen AQN block from vLLM's ``additional_config``; refuses what vLLM cannot run."""
    block = additional_config.get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    if not isinstance(block, dict):
        raise ConfigError("missing: the AQN worker extension is set but vLLM's "
                          "additional_config carries no AQN block", CONFIG_PATH)
    config = resolve_noise(block, total_steps=None, seed=None, key=CONFIG_PATH)
    if config.fp32_targets:
        # it rebinds the norm weights to fp32; vLLM's fused RMSNorm needs the model's dtype
        raise ConfigError("not supported inside vLLM", f"{CONFIG_PATH}.fp32_targets")
    return config


class AQNNoiseMixin:
    """Noise on vLLM's own RMSNorm weights after every weight sync, never accumulated.

    Sync k (k = 0 is the sync before the first step) feeds aqn step k; ``aqn_set_step``
    moves the counter (a resumed run, or a sync that feeds no step).
    """

    def aqn_after_weight_sync(self) -> dict[str, float]:
        """Take the synced weights as clean and write the step's noise over them."""
        injector = getattr(self, "_aqn_injector", None)
        if injector is None:
            config = worker_noise_config(self.vllm_config.additional_config)
            if not config.enabled:
                return {}
            # built at the first sync: before it the engine may hold dummy weights
            injector = self._aqn_injector = NoiseInjector(self.model_runner.model, config)
            self._aqn_step = getattr(self, "_aqn_step", 0)
        else:
            injector.refresh_clean()  # a norm the sync did not send keeps its clean copy
        self._aqn_report = injector.apply(self._aqn_step)
        self._aqn_step += 1
        return self._aqn_report.metrics()

    def aqn_set_step(self, step: int) -> None:
        self._aqn_step = step

    def aqn_report(self) -> dict[str, float]:
        """The ``aqn/*`` metrics of the noise on now (empty before the first sync)."""
        report = getattr(self, "_aqn_report", None)
        return {} if report is None else report.metrics()
