"""The run directory: created (or checked on resume) before anything is built, then resumed.

``<trainer.default_local_dir>/<trainer.experiment_name>/`` holds ``config.yaml`` (resolved),
``machine.json``, ``metrics.jsonl``, ``val/*.jsonl`` and ``checkpoints/step_N``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml
from torch import nn

from aqn.config import AQNConfig, config_to_dict, dump_config
from aqn.errors import ConfigError
from aqn.machine import machine_info
from aqn.rl.checkpoint import latest_checkpoint, load_checkpoint
from aqn.rl.tracking import truncate_metrics

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption.
RESUMABLE_KEYS = ("trainer.resume", "trainer.progress_bar", "trainer.logger")


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
        old = _flat(yaml.safe_load(config_file.read_text()))
        new = _flat(config_to_dict(cfg))
        # A key that a newer aqn added is no change when the run keeps its default (the old
        # run computed what the default computes).
        defaults = _flat(config_to_dict(AQNConfig()))
        changed = sorted(k for k in old.keys() | new.keys()
                         if k not in RESUMABLE_KEYS
                         and old.get(k, defaults.get(k)) != new.get(k))
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


def resume(run_dir: Path, cfg: AQNConfig, model: nn.Module,
           optimizer: torch.optim.Optimizer) -> int:
    """Load the last checkpoint (when ``trainer.resume``) and drop what came after it.

    Returns the step to start from. Metric rows and validation files after the checkpoint are
    removed, to be re-created by the resumed run; from scratch, step 0 is validated again.
    """
    start = 0
    if cfg.trainer.resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            start = load_checkpoint(ckpt, model, optimizer)["step"]
            log.info("resumed from %s", ckpt)
    truncate_metrics(run_dir, start if start else -1)
    for stale in (run_dir / "val").glob("step_*.jsonl"):
        if int(stale.stem.removeprefix("step_")) > start:
            stale.unlink()
    return start


def write_machine_info(run_dir: Path, cfg: AQNConfig, device: torch.device) -> None:
    info = machine_info(cfg.actor_rollout_ref.model.dtype, device)
    (run_dir / "machine.json").write_text(json.dumps(info, indent=1) + "\n")
