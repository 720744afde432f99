"""AQN in verl 0.9.1's rollout, with the seed's ``trainer.noise_injection`` block, no fork.

    python -m aqn.integrations.verl <verl's overrides> \\
        +trainer.noise_injection.enabled=true +trainer.noise_injection.preset=qerl \\
        +trainer.noise_injection.seed=1 trainer.total_training_steps=200

runs ``python -m verl.trainer.main_ppo`` with the ``trainer.noise_injection.*`` overrides
taken out, resolved here by aqn's rules (preset, schedule length, seed: an unknown key or an
unbuildable schedule stops the launch, naming the key) and frozen into two overrides of
verl's vLLM engine: ``worker_extension_cls`` = ``AQNColocateWorkerExtension`` and
``additional_config={aqn_noise: {...}}``. So the config is final before any worker starts
(REFERENCE defect 6: verl's workers never see ``trainer.*``), and ``--print`` shows the
command instead of running it.

verl's rollout runs in vLLM worker processes, one per tensor-parallel rank. Each weight sync
ends in verl's ``vLLMColocateWorkerExtension.update_weights_from_ipc`` in those processes; the
extension here calls it, then puts the step's noise on vLLM's own ``RMSNorm`` modules
(``aqn.rollout.vllm_worker.AQNNoiseMixin``, which aqn's own vLLM engine uses too). Every
rank draws the same noise (the seed depends on the step and the module path only), and norms
the sync did not send keep their clean copy.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aqn.config import NOISE_KEY as KEY
from aqn.config import resolve_noise
from aqn.errors import ConfigError
from aqn.experiments.foreign import aqn_metrics_file
from aqn.noise import NoiseInjectionConfig
from aqn.rollout.vllm_worker import (
    CONFIG_KEY,
    METRICS_KEY,
    START_KEY,
    AQNNoiseMixin,
    frozen_block,
)

VERL_BASE = "verl.workers.rollout.vllm_rollout.utils.vLLMColocateWorkerExtension"
EXTENSION = "aqn.integrations.verl.AQNColocateWorkerExtension"
ENGINE = "actor_rollout_ref.rollout.engine_kwargs.vllm"


def make_extension(base: type) -> type:
    """``base`` (verl's worker extension) with AQN after every weight sync."""

    class AQNColocateWorkerExtension(AQNNoiseMixin, base):
        def update_weights_from_ipc(self, *args: Any, **kwargs: Any) -> Any:
            result = super().update_weights_from_ipc(*args, **kwargs)
            self.aqn_after_weight_sync()  # after the last bucket and process_weights_after_loading
            return result

    AQNColocateWorkerExtension.__module__ = __name__
    AQNColocateWorkerExtension.__qualname__ = "AQNColocateWorkerExtension"
    return AQNColocateWorkerExtension


def __getattr__(name: str) -> type:
    # bound to verl's class on first use: the rest of this module needs neither verl nor vLLM
    if name == "AQNColocateWorkerExtension":
        module, _, cls = VERL_BASE.rpartition(".")
        extension = make_extension(getattr(__import__(module, fromlist=[cls]), cls))
        globals()[name] = extension
        return extension
    raise AttributeError(name)


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (what verl's command line parses)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not a finite number: {value}")
        return repr(value)
    if isinstance(value, str):
        # Hydra unescapes only backslashes that precede a quote (the closing one included)
        return "'" + re.sub(r"(\\*)('|$)", lambda m: 2 * m[1] + ("\\'" if m[2] else ""),
                            value) + "'"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    raise TypeError(f"no Hydra literal for {type(value).__name__}")


def overrides(noise: NoiseInjectionConfig | Mapping[str, Any],
              total_steps: int | None = None, seed: int | None = None,
              metrics_file: str | os.PathLike | None = None, start_step: int = 0) -> list[str]:
    """The two verl overrides that carry the resolved AQN block into vLLM's workers, with
    the file they write their ``aqn/*`` metrics to and the step a resumed run starts at."""
    config = resolve_noise(noise, total_steps, seed)
    additional: dict[str, Any] = {CONFIG_KEY: frozen_block(config), START_KEY: start_step}
    if metrics_file is not None:
        additional[METRICS_KEY] = os.path.abspath(metrics_file)  # workers' cwd is not ours
    return [f"+{ENGINE}.worker_extension_cls={EXTENSION}",
            f"+{ENGINE}.additional_config={hydra_value(additional)}"]


def verl_trainer_config(argv: Sequence[str]) -> dict[str, Any]:
    """verl's ``trainer`` config for these overrides, resolved: its own ppo_trainer.yaml
    composed by Hydra, as ``verl.trainer.main_ppo`` composes it."""
    try:
        import verl
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf
    except ImportError as e:
        raise ConfigError(f"needs verl and hydra installed ({e})", KEY) from None
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose("ppo_trainer", overrides=list(argv))
    return OmegaConf.to_container(cfg.trainer, resolve=True)


def resumed_step(trainer: Mapping[str, Any]) -> int:
    """The step verl resumes at: its trainer's ``_load_checkpoint`` rule, with verl's own
    ``find_latest_ckpt_path`` (0: a run from scratch)."""
    if trainer["resume_mode"] == "disable":
        return 0
    if trainer["resume_mode"] == "resume_path":
        folder = trainer["resume_from_path"]
    else:
        # verl's package warns about every engine it lacks and the function prints what it
        # finds: neither belongs on stdout, where --print writes the command
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

            folder = find_latest_ckpt_path(os.path.abspath(trainer["default_local_dir"]))
    return 0 if folder is None else int(str(folder).split("global_step_")[-1])


def metrics_file(project: str, experiment: str, environ: Mapping[str, str] = os.environ
                 ) -> Path:
    """Where the workers' ``aqn/*`` metrics go: beside verl's file-logger JSONL (the path
    FileLogger picks), ``<experiment>.jsonl`` -> ``<experiment>.aqn.jsonl``."""
    log = environ.get("VERL_FILE_LOGGER_PATH")
    if log is None:
        root = os.path.expanduser(environ.get("VERL_FILE_LOGGER_ROOT", "."))
        log = os.path.join(root, project, f"{experiment}.jsonl")
    return aqn_metrics_file(Path(log))


def split_overrides(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """(the ``trainer.noise_injection`` block, the other overrides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # verl's own

    parsed = OverridesParser.create().parse_overrides(list(argv))
    block: dict[str, Any] = {}
    rest: list[str] = []
    for text, override in zip(argv, parsed, strict=True):
        key = override.key_or_group
        if key.startswith(f"{KEY}."):
            block[key.removeprefix(f"{KEY}.")] = override.value()
            continue
        if key.startswith(f"{ENGINE}.worker_extension_cls") or key.startswith(
                f"{ENGINE}.additional_config"):
            raise ConfigError("set by aqn.integrations.verl from trainer.noise_injection", key)
        rest.append(text)
    return block, rest


def command(argv: Sequence[str]) -> list[str]:
    """verl's command line for ``argv``, with the AQN block resolved and frozen."""
    block, rest = split_overrides(argv)
    if not block.get("enabled", False):
        return [sys.executable, "-m", "verl.trainer.main_ppo", *rest]
    trainer = verl_trainer_config(rest)
    return [sys.executable, "-m", "verl.trainer.main_ppo", *rest,
            *overrides(block, total_steps=trainer["total_training_steps"],
                       metrics_file=metrics_file(trainer["project_name"],
                                                 trainer["experiment_name"]),
                       start_step=resumed_step(trainer))]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--print" in argv
    argv = [a for a in argv if a != "--print"]
    try:
        cmd = command(argv)
    except ConfigError as e:
        raise SystemExit(f"aqn.integrations.verl: {e}") from None
    if dry_run:
        print(" ".join(cmd))
        return
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
