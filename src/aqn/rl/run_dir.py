"""The run directory: created (or checked on resume) before anything is built, then resumed.

``<trainer.default_local_dir>/<trainer.experiment_name>/`` holds ``config.yaml`` (resolved),
``inputs.json`` (fingerprints of its data and initial weights), ``machine.json``,
``metrics.jsonl``, ``val/*.jsonl`` and ``checkpoints/step_N``. What it survives:
docs/runs.md.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from aqn.config import AQNConfig, config_to_dict, dump_config
from aqn.config.upgrade import upgrade_stored_config
from aqn.errors import ConfigError
from aqn.files import load_yaml_strict, write_atomic
from aqn.machine import machine_info
from aqn.rl.checkpoint import checkpoint_steps, load_checkpoint
from aqn.rl.tracking import METRICS_FILE, truncate_metrics

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption (a moved or renamed run directory
# resumes: where it lives is not what it computes).
RESUMABLE_KEYS = ("trainer.resume", "trainer.progress_bar", "trainer.logger",
                  "trainer.default_local_dir", "trainer.experiment_name",
                  "trainer.resources.num_cpus", "trainer.resources.num_gpus")
LOCK_FILE = ".lock"


class LockHeld(ConfigError):
    """The directory's lock is held by another live process (``holder``: its pid)."""

    def __init__(self, message: str, key: str | None, holder: str) -> None:
        super().__init__(message, key)
        self.holder = holder


class RunLock:
    """An exclusive lock on a run directory for the life of the run: one writer at a time.

    ``flock`` on ``<run_dir>/.lock`` (or ``name``), which holds the writer's pid; the kernel
    drops the lock when the process ends, however it ends, so a killed run never leaves it
    stale. A forked child shares the lock with its parent and never releases it (only the
    process that took it does).
    """

    def __init__(self, run_dir: Path, name: str = LOCK_FILE) -> None:
        self._fd: int | None = None  # first: __del__ runs even when mkdir below fails
        self._pid = os.getpid()
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(
                f"run directory {run_dir} is in use by a running aqn process (pid {holder}); "
                "wait for it to finish or choose another trainer.experiment_name",
                "trainer.experiment_name", holder) from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def __del__(self) -> None:  # a trainer dropped without fit() frees its directory
        self.release()

    def release(self) -> None:
        if self._fd is not None and os.getpid() == self._pid:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def run_dir_of(cfg: AQNConfig) -> Path:
    return Path(cfg.trainer.default_local_dir) / cfg.trainer.experiment_name


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def config_changes(config_file: Path, cfg: AQNConfig) -> list[str]:
    """The keys in which ``cfg`` differs from the run config stored in ``config_file``,
    leaving out those a resume may change."""
    try:
        old = _flat(upgrade_stored_config(
            load_yaml_strict(config_file.read_text(), config_file) or {}))
    except (OSError, ConfigError) as e:
        raise ConfigError(f"cannot read {config_file}: {e}", "trainer.resume") from None
    new = _flat(config_to_dict(cfg))
    # A key that a newer aqn added is no change when the run keeps its default (the old run
    # computed what the default computes).
    defaults = _flat(config_to_dict(AQNConfig()))
    return sorted(k for k in old.keys() | new.keys()
                  if k not in RESUMABLE_KEYS and old.get(k, defaults.get(k)) != new.get(k))


def prepare_run_dir(cfg: AQNConfig, lock: RunLock | None = None) -> tuple[Path, RunLock]:
    """Lock the run directory, then create it (or, on resume, check it against the config).

    The lock comes first, so two runs started at once cannot both pass the "already holds a
    run" check; a caller that holds it already (the sweep, which decides about the run under
    it) passes it in, and keeps it. The resolved config is written once, when the run starts;
    a resume leaves the file as it was (a full disk then cannot truncate it).
    """
    run_dir = run_dir_of(cfg)
    if cfg.trainer.resume and not (run_dir / "config.yaml").exists():
        # a mistyped name must not start a new run while the user thinks one continues
        raise ConfigError(f"trainer.resume=true, but {run_dir} holds no run (no config.yaml): "
                          "check trainer.experiment_name and trainer.default_local_dir, or "
                          "drop trainer.resume to start a new run", "trainer.resume")
    own = lock is None
    try:
        lock = lock or RunLock(run_dir)
    except OSError as e:
        raise ConfigError(f"cannot write the run directory {run_dir}: {e.strerror}",
                          "trainer.default_local_dir") from None
    try:
        _check_and_create(run_dir, cfg)
    except BaseException:
        if own:
            lock.release()
        raise
    return run_dir, lock


def _check_and_create(run_dir: Path, cfg: AQNConfig) -> None:
    config_file = run_dir / "config.yaml"
    if not cfg.trainer.resume and (config_file.exists() or _history(run_dir)):
        raise ConfigError(
            f"run directory {run_dir} already holds a run; set trainer.resume=true to "
            "continue it or choose another trainer.experiment_name", "trainer.resume")
    if config_file.exists():
        changed = config_changes(config_file, cfg)
        if changed:
            raise ConfigError(f"cannot resume {run_dir}: the config differs in "
                              f"{', '.join(changed)}", changed[0])
    try:
        (run_dir / "val").mkdir(parents=True, exist_ok=True)
        if not config_file.exists():
            write_atomic(config_file, dump_config(cfg))
    except OSError as e:
        raise ConfigError(f"cannot write the run directory {run_dir}: {e.strerror}",
                          "trainer.default_local_dir") from None


def discard_new_run(run_dir: Path, lock: RunLock) -> None:
    """Remove what a new run made of its directory when it fails before its first step (a
    bad model path, empty data), so that the corrected retry is not refused as "already
    holds a run"; the lock is held until the folder is gone."""
    shutil.rmtree(run_dir, ignore_errors=True)
    lock.release()


def resume(run_dir: Path, cfg: AQNConfig, model: nn.Module,
           optimizer: torch.optim.Optimizer) -> int:
    """Load the last checkpoint (when ``trainer.resume``) and drop what came after it.

    Returns the step to start from. Metric rows and validation files after the checkpoint are
    removed, to be re-created by the resumed run; nothing else is ever removed: a resume with
    no checkpoint to start from, in a run that has logged anything, is an error.
    """
    if not cfg.trainer.resume:
        return 0  # a new run: prepare_run_dir saw no history in its directory
    start = _load_newest_usable(run_dir, model, optimizer)
    if start == 0:
        history = _history(run_dir)
        if history:
            raise ConfigError(
                f"cannot resume {run_dir}: {_no_checkpoint(run_dir)}, so it would start over "
                f"and throw away {', '.join(history)}. To start it over on purpose, delete "
                "or move the run directory and run without trainer.resume", "trainer.resume")
    truncate_metrics(run_dir, start if start else -1)
    for stale in (run_dir / "val").glob("step_*.jsonl"):
        if int(stale.stem.removeprefix("step_")) > start:
            stale.unlink()
    return start


def _history(run_dir: Path) -> list[str]:
    """What a run directory has logged, in words ("5 metric rows", "2 validation files");
    [] for none."""
    found = []
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and (rows := metrics.read_bytes().count(b"\n")):
        found.append(f"{rows} metric row(s) of {metrics}")
    val = list((run_dir / "val").glob("*.jsonl")) if (run_dir / "val").is_dir() else []
    if val:
        found.append(f"{len(val)} validation file(s) in {run_dir / 'val'}")
    if checkpoint_steps(run_dir):
        found.append("its checkpoints")
    return found


def _no_checkpoint(run_dir: Path) -> str:
    root = run_dir / "checkpoints"
    if not root.exists():
        return f"it has no checkpoint ({root} does not exist)"
    if not root.is_dir():
        return f"it has no checkpoint ({root} is not a folder)"
    return f"it has no checkpoint ({root} holds no step_N folder)"


def _load_newest_usable(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer
                        ) -> int:
    """The step of the newest checkpoint that loads, falling back (announced) past torn ones.

    A run with checkpoints of which none loads is an error naming each one and why: starting
    again from step 0 would silently throw the run's progress away.
    """
    problems = []
    for step, path in checkpoint_steps(run_dir):
        try:
            state = load_checkpoint(path, model, optimizer)
        except Exception as e:  # a torn or edited checkpoint: missing file, bad bytes, bad JSON
            problems.append(f"{path}: {type(e).__name__}: {e}")
            continue
        if problems:
            log.warning("resuming from %s; newer checkpoints are unusable: %s", path,
                        "; ".join(problems))
        else:
            log.info("resumed from %s", path)
        if state.get("step") != step:
            raise ConfigError(f"{path / 'state.json'} says step {state.get('step')!r}, its "
                              f"folder says {step}", "trainer.resume")
        return step
    if problems:
        raise ConfigError(f"cannot resume {run_dir}: no checkpoint loads ("
                          + "; ".join(problems) + "); move them away to start from scratch",
                          "trainer.resume")
    return 0


def write_machine_info(run_dir: Path, cfg: AQNConfig, device: torch.device) -> None:
    info = machine_info(cfg.actor_rollout_ref.model.dtype, device)
    write_atomic(run_dir / "machine.json", json.dumps(info, indent=1) + "\n")
