"""Metric sinks (``trainer.logger``): metrics.jsonl always, the run's record; each
validation's headline on the console (``console``); TensorBoard and wandb when asked for and
installed."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from aqn import metric_keys as keys
from aqn.data.jsonl import load_jsonl
from aqn.errors import ConfigError
from aqn.files import about, write_atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path, torn_tail_ok: bool = False) -> list[dict]:
    """The metric rows; ``torn_tail_ok``: a last row cut off mid-write is left out."""
    path = run_dir / METRICS_FILE
    return load_jsonl(path, allow_empty=True, torn_tail_ok=torn_tail_ok) if path.exists() else []


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop rows logged after ``last_step`` (a resumed run re-creates them), and a torn last
    line: a row whose writer was killed mid-append (or hit a full disk) is the newest, so it
    always postdates the checkpoint being resumed."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    tail = path.read_bytes().rsplit(b"\n", 1)[-1]
    if tail.strip():
        try:
            json.loads(tail)
        except ValueError:
            log.warning("%s: dropping its torn last line (%d bytes, written when the run was "
                        "cut off)", path, len(tail))
    rows = [r for r in read_metrics(run_dir, torn_tail_ok=True) if r["step"] <= last_step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _plain(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


class Tracker:
    """Where a run's metrics go: ``<run_dir>/metrics.jsonl`` whatever ``loggers`` lists (the
    run's record, which reports, sweeps and resume read), and what ``loggers`` asks for
    besides: ``console``, each validation's headline figures as one line on stderr (unless
    ``config``'s ``trainer.progress_bar`` is false: a run that prints no progress, such as a
    sweep's); ``tensorboard``; ``wandb``."""

    def __init__(self, run_dir: Path, loggers: Sequence[str], project: str, name: str,
                 config: Mapping) -> None:
        self.path = run_dir / METRICS_FILE
        self._console = "console" in loggers and config.get("trainer", {}).get("progress_bar",
                                                                               True)
        self._tb = None
        self._wandb = None
        if "tensorboard" in loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("has 'tensorboard' but it is not installed: pip install "
                                  "'aqn[tensorboard]'", "trainer.logger") from None
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError:
                raise ConfigError("has 'wandb' but it is not installed: pip install "
                                  "'aqn[wandb]' (WANDB_MODE=offline works without network)",
                                  "trainer.logger") from None
            self._wandb = wandb.init(project=project, name=name, config=dict(config),
                                     dir=str(run_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, **{k: _plain(float(v)) for k, v in metrics.items()}}
        with about(self.path), self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._console:
            self._print_validation(step, metrics)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    @staticmethod
    def _print_validation(step: int, metrics: Mapping[str, float]) -> None:
        """One line of the step's validation figures (none: nothing), above a progress bar."""
        head = sorted((k, float(v)) for k, v in metrics.items()
                      if keys.VAL_CORE.fullmatch(k) or keys.VAL_CLEAN.fullmatch(k))
        if head:
            tqdm.write(f"validation at step {step}: "
                       + ", ".join(f"{k} {v:.4g}" for k, v in head), file=sys.stderr)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
