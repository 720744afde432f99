"""AQN inside a vLLM worker: the one place that noises vLLM's own RMSNorm weights after a
weight sync, counts what it wrote and reports it.

vLLM appends a ``worker_extension_cls`` to every worker's bases, in the worker process, so
these methods run where the rollout model lives (``self.model_runner.model``), on every
tensor-parallel rank, called from the driver with ``collective_rpc``. Two callers:

- aqn's own vLLM engine (``aqn.rollout.vllm``, vLLM's engine core in a process of its own):
  ``AQNWorkerExtension`` takes each sync's weights (``aqn_load_weights``) and the trainer
  says which step's noise to apply and when to restore (``aqn_apply`` / ``aqn_restore``);
- verl (``aqn.integrations.verl``): verl's own weight sync, then ``aqn_after_weight_sync``,
  which counts the steps itself and writes the metrics beside verl's log.

The AQN block arrives resolved and frozen in vLLM's ``additional_config["aqn_noise"]``
(``frozen_block``). It imports neither vLLM nor verl. Every attribute starts with ``aqn_`` /
``_aqn_``: vLLM refuses an extension whose names clash with the worker's. An aqn error in
the worker (nothing matched, a bad block) comes back as a value and is raised again, as
itself, in the driver (``raise_worker_error``): vLLM would pass on only its text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from aqn import errors
from aqn.config import resolve_noise
from aqn.errors import ConfigError
from aqn.noise import NoiseInjectionConfig, NoiseInjector

CONFIG_KEY = "aqn_noise"
METRICS_KEY = "aqn_metrics_file"
START_KEY = "aqn_start_step"  # the step a resumed run's first sync feeds
CONFIG_PATH = f"actor_rollout_ref.rollout.engine_kwargs.vllm.additional_config.{CONFIG_KEY}"
ERROR_MARK = "aqn_error"  # a worker's aqn error, returned as {ERROR_MARK: [class, args]}

F = TypeVar("F", bound=Callable[..., Any])


def frozen_block(config: NoiseInjectionConfig) -> dict[str, Any]:
    """Every key of the resolved block, as plain values (tuples as lists, as Hydra and
    vLLM's serializer read them)."""
    return dataclasses.asdict(config, dict_factory=lambda items: {
        k: list(v) if isinstance(v, tuple) else v for k, v in items})


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


def view_of(buffer: torch.Tensor, dtype: str, shape: Sequence[int], start: int, size: int
            ) -> torch.Tensor:
    """One tensor of the driver's ``SharedWeights`` layout: a view of the mapped bytes."""
    return buffer[start:start + size].view(getattr(torch, dtype)).view(tuple(shape))


def _errors_as_values(method: F) -> F:
    """aqn's own errors leave the worker as a value the driver raises again."""
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (errors.InputError, errors.NoTargetsError, errors.NotFiredError) as e:
            # the nearest class the driver knows by name (a subclass may live elsewhere)
            known = next(c for c in type(e).__mro__ if getattr(errors, c.__name__, None) is c)
            args = (e.message, e.key) if isinstance(e, ConfigError) else tuple(map(str, e.args))
            return {ERROR_MARK: [known.__name__, list(args)]}
    return call  # type: ignore[return-value]


def raise_worker_error(result: Any) -> Any:
    """``result`` of an ``aqn_*`` call, or the aqn error the worker returned, raised."""
    if isinstance(result, dict) and ERROR_MARK in result:
        name, args = result[ERROR_MARK]
        raise getattr(errors, name)(*args)
    return result


class AQNNoiseMixin:
    """Noise on vLLM's own RMSNorm weights, from a clean copy taken at each sync: never
    accumulated, and restored exactly."""

    def _aqn_injector(self) -> NoiseInjector | None:
        """Built at the first use on the loaded model (verl may sync dummy weights before);
        None when the block has AQN off."""
        if not hasattr(self, "_aqn_noise"):
            config = worker_noise_config(self.vllm_config.additional_config)
            self._aqn_noise = (NoiseInjector(self.model_runner.model, config)
                               if config.enabled else None)
            self._aqn_report = None
        return self._aqn_noise

    # -- driven by the trainer (aqn's engine): which step, and when to restore ----------------

    @_errors_as_values
    def aqn_targets(self) -> list[dict[str, Any]]:
        """Every norm it writes (``NormTarget`` as a dict: path, class, shape, ...); building
        the injector here fails now when nothing matches."""
        injector = self._aqn_injector()
        return [] if injector is None else [dataclasses.asdict(t) for t in injector.targets]

    @_errors_as_values
    def aqn_refresh(self) -> None:
        """The weights just loaded are the new clean copy."""
        injector = self._aqn_injector()
        if injector is not None:
            injector.refresh_clean()
            self._aqn_report = None

    @_errors_as_values
    def aqn_apply(self, step: int) -> dict[str, Any] | None:
        """Write step ``step``'s noise over the clean weights; its ``NoiseReport`` as a dict."""
        injector = self._aqn_injector()
        if injector is None:
            return None
        self._aqn_report = injector.apply(step)
        return dataclasses.asdict(self._aqn_report)

    @_errors_as_values
    def aqn_restore(self) -> None:
        injector = self._aqn_injector()
        if injector is not None:
            injector.restore()
            self._aqn_report = None

    def aqn_norm_weights(self) -> list[tuple[str, list]]:
        """The targeted norms' weights as the model holds them now, as (dtype, values):
        exact in Python floats, which vLLM's RPC passes (a tensor it does not)."""
        injector = self._aqn_injector()
        return [] if injector is None else [
            (str(w.dtype).removeprefix("torch."), w.detach().cpu().tolist())
            for w in injector.target_weights()]

    # -- after each of verl's syncs, counting the steps itself --------------------------------

    def aqn_after_weight_sync(self) -> dict[str, float]:
        """Take the synced weights as clean and write the next step's noise over them.

        Sync k (k = 0 is the sync before the first step) feeds aqn step start + k, where
        start is the step a resumed run resumes at (``additional_config["aqn_start_step"]``,
        found by the launcher); ``aqn_set_step`` moves the counter (a sync that feeds no
        step)."""
        injector = self._aqn_injector()
        if injector is None:
            return {}
        if not hasattr(self, "_aqn_step"):
            self._aqn_step = (self.vllm_config.additional_config or {}).get(START_KEY, 0)
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


class AQNWorkerExtension(AQNNoiseMixin):
    """aqn's own vLLM engine: the trainer's weights arrive over ``collective_rpc``."""

    def aqn_map_weights(self, path: str, layout: list[list]) -> None:
        """Map the driver's ``SharedWeights`` file: each sync's weights, in place."""
        buffer = torch.from_file(path, shared=True, size=os.path.getsize(path),
                                 dtype=torch.uint8)
        self._aqn_weights = [(name, view_of(buffer, dtype, shape, start, size))
                             for name, dtype, shape, start, size in layout]

    def aqn_load_weights(self) -> None:
        """Reload every mapped weight through vLLM's layerwise loader (the path that reaches
        its packed CPU Linear kernels); ``aqn_refresh`` then takes them as AQN's clean copy."""
        self.reload_weights(weights_iterator=iter(self._aqn_weights), is_checkpoint_format=True)
        model = self.model_runner.model
        lm_head = getattr(model, "lm_head", None)
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False) \
                and lm_head is not None and hasattr(lm_head, "quant_method"):
            # a tied lm_head keeps its stale packed copy after a reload: re-pack it
            lm_head.quant_method.process_weights_after_loading(lm_head)
