"""AQN as a vLLM worker extension: the part of the verl integration that runs inside vLLM.

vLLM appends a ``worker_extension_cls`` to every worker's bases, in the worker process, so
these methods run where the rollout model lives (``self.model_runner.model``), on every
tensor-parallel rank. It imports neither vLLM nor verl: ``aqn.integrations.verl`` binds it to
verl's weight sync, and plain vLLM can load it as is (``LLM(worker_extension_cls=...)``).

The AQN block arrives resolved and frozen in vLLM's ``additional_config["aqn_noise"]`` (see
``aqn.integrations.verl.overrides``), with the file its metrics go to
(``additional_config["aqn_metrics_file"]``): verl's own logger never sees the workers'
metrics, so one worker writes them beside verl's log for ``aqn report``. Every attribute
starts with ``aqn_`` / ``_aqn_``: vLLM refuses an extension whose names clash with the
worker's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aqn.errors import ConfigError
from aqn.integrations import resolve_noise
from aqn.noise import NoiseInjectionConfig, NoiseInjector

CONFIG_KEY = "aqn_noise"
METRICS_KEY = "aqn_metrics_file"
START_KEY = "aqn_start_step"  # the step a resumed run's first sync feeds
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

    Sync k (k = 0 is the sync before the first step) feeds aqn step start + k, where start is
    the step a resumed run resumes at (``additional_config["aqn_start_step"]``, found by the
    launcher); ``aqn_set_step`` moves the counter (a sync that feeds no step).
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
            self._aqn_step = getattr(self, "_aqn_step", (
                self.vllm_config.additional_config or {}).get(START_KEY, 0))
        else:
            injector.refresh_clean()  # a norm the sync did not send keeps its clean copy
        self._aqn_report = injector.apply(self._aqn_step)
        self._aqn_step += 1
        metrics = self._aqn_report.metrics()
        self._aqn_log(metrics)
        return metrics

    def _aqn_log(self, metrics: dict[str, float]) -> None:
        """Append the metrics to the metrics file, as verl's file logger writes a row, at the
        step whose rollout this noise is for: sync k follows k optimizer steps and feeds
        training step k + 1 (verl logs steps from 1). One writer per file: the first rank of
        the first replica (every rank and replica draws the same noise)."""
        path = (self.vllm_config.additional_config or {}).get(METRICS_KEY)
        # verl sets VERL_REPLICA_RANK in each rollout server's process (plain vLLM: unset)
        if not path or getattr(self, "rank", 0) != 0 or os.environ.get(
                "VERL_REPLICA_RANK", "0") != "0":
            return
        first = not getattr(self, "_aqn_logged", False)  # a new run starts the file anew,
        self._aqn_logged = True  # as verl's file logger does
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w" if first else "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self._aqn_step, "data": metrics}) + "\n")

    def aqn_set_step(self, step: int) -> None:
        self._aqn_step = step

    def aqn_report(self) -> dict[str, float]:
        """The ``aqn/*`` metrics of the noise on now (empty before the first sync)."""
        report = getattr(self, "_aqn_report", None)
        return {} if report is None else report.metrics()
