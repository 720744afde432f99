"""Metric sinks: metrics.jsonl always; TensorBoard and wandb when asked for and installed."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from aqn.data.jsonl import load_jsonl
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
    def __init__(self, run_dir: Path, loggers: Sequence[str], project: str, name: str,
                 config: Mapping) -> None:
        self.path = run_dir / METRICS_FILE
        self._tb = None
        self._wandb = None
        if "tensorboard" in loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("trainer.logger has 'tensorboard' but it is not installed: "
                                   "pip install 'aqn[tensorboard]'") from e
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("trainer.logger has 'wandb' but it is not installed: "
                                   "pip install 'aqn[wandb]' (WANDB_MODE=offline works "
                                   "without network)") from e
            self._wandb = wandb.init(project=project, name=name, config=dict(config),
                                     dir=str(run_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, **{k: _plain(float(v)) for k, v in metrics.items()}}
        with about(self.path), self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
