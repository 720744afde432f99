"""Loading run directories written by ``aqn train`` (and the sweep runner) for the report."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aqn import metric_keys as keys
from aqn.config.upgrade import upgrade_stored_config
from aqn.data.jsonl import load_jsonl, load_jsonl_lines
from aqn.errors import ConfigError, InputError
from aqn.experiments import foreign
from aqn.files import load_yaml_strict
from aqn.rl.inputs import INPUTS_FILE

_VAL_FILE = re.compile(r"step_(\d+)\.jsonl")


def dose_label(dose: float | str | None) -> str:
    """How a dose appears in run folder names and reports: 0.05, 4, npu-naive; "clean" for
    a variant's clean point."""
    if dose is None:
        return "clean"
    return f"{dose:g}" if isinstance(dose, float) else str(dose)


class RunLoadError(InputError):
    """A path holds no run directory, or a run file cannot be read."""


@dataclass
class RunData:
    """Everything the report needs from one run directory."""

    path: Path
    variant: str
    seed: int
    status: str  # "done" | "failed" | "running" from run.json; "unknown" without it
    error: str | None
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    val: dict[int, list[dict[str, Any]]]  # validation step -> per-item results
    machine: dict[str, Any]  # machine.json, {} when missing
    data_source: str | None
    accuracy: dict[int, float] = field(default_factory=dict)  # validation step -> accuracy
    logged_by: str = "aqn"  # or "verl" / "trl": a run read from that framework's log
    log_format: str = "aqn"  # a foreign run's: "jsonl", "tensorboard", "wandb", ...
    # A dose sweep's run (run.json): the perturbation family and its dose; None at the
    # variant's clean point.
    family: str | None = None
    dose: float | str | None = None
    # The final policy validated with no perturbation (val-clean/*), step -> accuracy.
    clean_accuracy: dict[int, float] = field(default_factory=dict)
    # The line of metrics.jsonl each row of ``metrics`` was read from (aqn runs; [] else).
    metric_lines: list[int] = field(default_factory=list)
    # inputs.json: the fingerprints of its data and initial weights; None without one.
    inputs: dict[str, Any] | None = None

    @property
    def point(self) -> str:
        """What the report groups seeds by: the variant, and its dose in a dose sweep
        ("baseline @ matmul=0.05")."""
        if self.family is None:
            return self.variant
        return f"{self.variant} @ {self.family}={dose_label(self.dose)}"

    @property
    def name(self) -> str:
        return f"{self.point}/seed{self.seed}"

    @property
    def aqn_enabled(self) -> bool:
        if self.logged_by != "aqn":  # no aqn config: the log shows whether noise was applied
            return any(k.startswith("aqn/") for row in self.metrics for k in row)
        return bool(self.setting("trainer.noise_injection.enabled", False))

    @property
    def engine(self) -> str:
        """Who logged the run and, for aqn's, its rollout engine: "aqn (hf)", or for a
        foreign run its log: "verl (jsonl)", "trl (wandb)"."""
        if self.logged_by != "aqn":
            return f"{self.logged_by} ({self.log_format})"
        return f"aqn ({self.setting('actor_rollout_ref.rollout.name', 'hf')})"

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key, e.g. "trainer.noise_injection.preset"."""
        return _get(self.config, dotted, default)

    @property
    def final_step(self) -> int | None:
        return max(self.accuracy) if self.accuracy else None

    def series(self, key: str) -> dict[int, float]:
        """step -> value of ``key`` over the metric rows that have a non-null value."""
        return {
            int(row["step"]): float(row[key])
            for row in self.metrics
            if row.get(key) is not None
        }

    def training_rows(self) -> list[dict[str, Any]]:
        """Metric rows of optimizer steps (step 0 holds only the pre-training validation)."""
        return [row for row in self.metrics if row["step"] >= 1]


def _get(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; [] when it is missing (a run that failed early). A torn last
    line (the run was killed mid-write, or is still writing) is left out."""
    return load_jsonl(path, allow_empty=True, torn_tail_ok=True) if path.exists() else []


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunLoadError(f"{path}: malformed JSON: {e.msg}") from e


def _data_source(metrics: list[dict[str, Any]], n: int | None) -> tuple[str | None, int]:
    """The validation data source (the first by name) of the val-core/* metrics over ``n``
    completions per item; ``n=None`` takes the smallest n logged (a foreign run)."""
    found = sorted((int(m["n"]), m["source"]) for row in metrics for key in row
                   if (m := keys.VAL_CORE.fullmatch(key)) and n in (None, int(m["n"])))
    return (found[0][1], found[0][0]) if found else (None, n or 1)


def _score(run: RunData, val_n: int | None) -> RunData:
    """Fill ``data_source`` and ``accuracy`` from the metrics and the per-item files."""
    run.data_source, val_n = _data_source(run.metrics, val_n)
    if run.data_source is not None:
        # accuracy (fraction correct) equals the mean reward for 0/1 rewards, not for qerl's
        run.accuracy = (run.series(keys.val_core(run.data_source, "acc", val_n))
                        or run.series(keys.val_core(run.data_source, "reward", val_n)))
        run.clean_accuracy = run.series(keys.val_clean(run.data_source, "acc", val_n))
    # Steps whose per-item file exists but whose metric row is missing (a run cut off
    # between writing the two) still count, scored the same way as the metric.
    for step, items in run.val.items():
        if step not in run.accuracy and items:
            run.accuracy[step] = sum(bool(it["correct"]) for it in items) / len(items)
    run.accuracy = dict(sorted(run.accuracy.items()))
    return run


def load_run(path: str | Path) -> RunData:
    """Load one run directory (it must hold a config.yaml)."""
    path = Path(path)
    try:
        file = path / "config.yaml"
        # a run stored under older key names reads as today's (verl 0.8's rollout_is, ...)
        config = upgrade_stored_config(load_yaml_strict(file.read_text(encoding="utf-8"), file)
                                       or {})
    except ConfigError as e:
        raise RunLoadError(str(e)) from e
    file = path / "metrics.jsonl"
    lines = load_jsonl_lines(file, allow_empty=True, torn_tail_ok=True) if file.exists() else []
    metrics = [row for _, row in lines]
    for lineno, row in lines:
        if "step" not in row:
            raise RunLoadError(f"{file}:{lineno}: a row has no 'step'")
    val = {}
    if (path / "val").is_dir():
        for f in (path / "val").iterdir():
            m = _VAL_FILE.fullmatch(f.name)
            if m:
                val[int(m.group(1))] = _read_jsonl(f)
    run_info = _read_json(path / "run.json")
    inputs = _read_json(path / INPUTS_FILE)
    run = RunData(
        path=path,
        variant=str(run_info.get("variant") or _get(config, "trainer.experiment_name", path.name)),
        seed=int(run_info.get("seed", _get(config, "trainer.seed", 0))),
        status=run_info.get("status", "unknown"),
        error=run_info.get("error"),
        config=config,
        metrics=metrics,
        val=dict(sorted(val.items())),
        machine=_read_json(path / "machine.json"),
        data_source=None,
        family=run_info.get("family"),
        dose=run_info.get("dose"),
        metric_lines=[lineno for lineno, _ in lines],
        inputs=inputs if isinstance(inputs, dict) and inputs else None,  # {}: none
    )
    return _score(run, int(_get(config, "actor_rollout_ref.rollout.val_kwargs.n", 1)))


def load_foreign_run(path: Path, variant: str | None = None, seed: int | None = None
                     ) -> RunData | None:
    """A run logged by verl or TRL (see ``foreign``: a JSONL, trainer_state.json,
    TensorBoard or wandb log, or a directory holding one); None when ``path`` is none."""
    log = foreign.read_foreign(path)
    if log is None:
        return None
    variant, seed = foreign.name_and_seed(log.name, variant, seed)
    run = RunData(path=log.path, variant=variant, seed=seed, status="unknown", error=None,
                  config={}, metrics=log.rows, val={}, machine={}, data_source=None,
                  logged_by=log.logged_by, log_format=log.log_format)
    return _score(run, None)


def find_runs(paths: Iterable[str | Path]) -> list[RunData]:
    """Load every run under ``paths``, sorted by (variant, seed, path).

    A path holding a config.yaml is a run. A log written by verl or TRL (a file-logger
    JSONL, a trainer_state.json or TRL output_dir, a TensorBoard run directory, a wandb
    run) is a foreign run, named by a label (``variant[/seedN]=path``) or by its own name.
    Any other directory stands for the runs among its immediate subdirectories (a sweep,
    ``wandb/``, ``tensorboard_log/<project>/``). A path given twice is loaded once.
    """
    run_dirs: list[Path] = []
    foreign_runs: dict[Path, RunData] = {}

    def add(p: Path, variant: str | None = None, seed: int | None = None) -> bool:
        if (p / "config.yaml").is_file():
            run_dirs.append(p)
            return True
        run = load_foreign_run(p, variant, seed)
        if run is not None:  # keyed by its log: a run's folder and its file are one run
            foreign_runs.setdefault(run.path.resolve(), run)
        return run is not None

    for arg in paths:
        variant, seed, p = foreign.split_label(str(arg))
        p = Path(p)
        if not p.exists():
            raise RunLoadError(f"{p}: no such file or directory")
        if variant is not None:
            if (p / "config.yaml").is_file() or not add(p, variant, seed):
                raise RunLoadError(f"{arg}: a label names one verl or TRL log; {p} is not one "
                                   "(an aqn run's variant and seed are in its run.json)")
            continue
        if add(p):
            continue
        if not p.is_dir():
            raise RunLoadError(f"{p}: not a run directory nor a verl or TRL log (.jsonl, "
                               f"{foreign.TRL_STATE}, TensorBoard events, .wandb)")
        if not [d for d in sorted(p.iterdir()) if d.is_dir() and add(d)]:
            raise RunLoadError(
                f"{p}: no run found (no config.yaml, verl or TRL log in it or in its "
                "immediate subdirectories)")
    unique = list(dict.fromkeys(d.resolve() for d in run_dirs))
    runs = [load_run(d) for d in unique] + list(foreign_runs.values())
    return sorted(runs, key=lambda r: (r.point, r.seed, str(r.path)))
