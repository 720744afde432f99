"""Runs logged by verl or TRL, loaded as ``RunData`` so that one report compares them with
aqn's own runs (a cluster run beside a laptop run).

- verl: the file logger's JSONL (``trainer.logger=[console,file]``), one
  ``{"step": int, "data": {metric: value}}`` per line, at ``$VERL_FILE_LOGGER_PATH`` or
  ``$VERL_FILE_LOGGER_ROOT/<project>/<experiment>.jsonl``. Its names are verl's, which are the
  report's: nothing is renamed.
- TRL: ``trainer_state.json`` (``Trainer`` writes it into every checkpoint-<step>/), whose
  ``log_history`` holds one row per logging step. GRPOTrainer's names are mapped to verl's
  where the two measure the same thing (``TRL_NAMES``); the others keep their TRL names.

Neither log holds aqn's config, so the variant and seed come from a label
(``aqn report baseline/seed1=runs/verl/b1.jsonl``) or from the file name
(``aqn-qerl-seed2.jsonl``: variant ``aqn-qerl``, seed 2); AQN counts as enabled when the log
holds ``aqn/*`` metrics (TRL runs with ``aqn.integrations.trl`` do; verl's logger does not
carry the worker's, see examples/verl/README.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from aqn import metric_keys as keys
from aqn.data.jsonl import load_jsonl_lines

VERL = "verl"
TRL = "trl"
TRL_STATE = "trainer_state.json"
TRL_EVAL_SOURCE = "trl-eval"  # the data source of TRL's eval rows (TRL logs none)

# GRPOTrainer (TRL 1.16) metric -> verl's name for the same quantity. TRL prefixes its eval
# rows with "eval_"; their mean reward is verl's validation reward (mean@1: over all eval
# completions, which estimates the score of one sample).
TRL_NAMES = {
    "reward": keys.SCORE_MEAN,
    "frac_reward_zero_std": keys.ZERO_ADV_FRAC,  # groups whose rewards are all equal
    "entropy": keys.ENTROPY,
    "completions/mean_length": keys.RESPONSE_LENGTH,
    "clip_ratio/region_mean": keys.CLIPFRAC,  # ratio clipped on the side its advantage pushes
    # mean |training - vLLM sampling| token log-prob (use_vllm with importance sampling)
    "sampling/sampling_logp_difference/mean": keys.ABS_LOGP_DIFF,
    "grad_norm": "actor/grad_norm",
    "learning_rate": "actor/lr",
    "eval_reward": keys.val_core(TRL_EVAL_SOURCE, "reward", 1),
}

_SEEDED_NAME = re.compile(r"(?P<variant>.+?)[-_]+seed(?P<seed>\d+)")
_LABEL = re.compile(r"(?P<variant>[^=/]+)(?:/seed(?P<seed>\d+))?=(?P<path>.+)")


class ForeignRunError(ValueError):
    """A verl or TRL log that cannot be read; the message names the file (and line)."""


def split_label(arg: str) -> tuple[str | None, int | None, str]:
    """``"variant[/seedN]=path"`` -> (variant, seed, path); a plain path -> (None, None, path).

    An argument that names an existing path is a path even if it holds "=".
    """
    m = _LABEL.fullmatch(arg)
    if m is None or Path(arg).exists():
        return None, None, arg
    return m["variant"], None if m["seed"] is None else int(m["seed"]), m["path"]


def trl_state_file(path: Path) -> Path | None:
    """The trainer_state.json a TRL path stands for: the file itself, the one in the
    directory, or the one in its newest checkpoint-<step>/ (None when there is none)."""
    if path.is_file():
        return path if path.name == TRL_STATE else None
    if (path / TRL_STATE).is_file():
        return path / TRL_STATE
    checkpoints = [(int(d.name.split("-")[1]), d) for d in path.glob("checkpoint-*")
                   if d.name.split("-")[1].isdigit() and (d / TRL_STATE).is_file()]
    return max(checkpoints)[1] / TRL_STATE if checkpoints else None


def is_verl_log(path: Path) -> bool:
    return path.is_file() and path.suffix == ".jsonl"


def name_and_seed(stem: str, variant: str | None, seed: int | None) -> tuple[str, int]:
    """A label's variant and seed, else the ones a name like ``aqn-qerl-seed2`` carries."""
    m = _SEEDED_NAME.fullmatch(stem)
    if variant is None:
        variant = m["variant"] if m else stem
    if seed is None:
        seed = int(m["seed"]) if m else 0
    return variant, seed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _by_step(logged: Iterable[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """aqn metric rows (``{"step": s, metric: value, ...}``) from (step, metrics) pairs:
    the numeric values only, rows of one step (validation and training) merged, in order."""
    merged: dict[int, dict[str, Any]] = {}
    for step, values in logged:
        merged.setdefault(step, {"step": step}).update(
            {k: v for k, v in values.items()
             if k != "step" and (_is_int(v) or isinstance(v, float))})
    return [merged[s] for s in sorted(merged)]


def read_verl_log(path: Path) -> list[dict[str, Any]]:
    """verl's file-logger rows as aqn metric rows. A torn last line (a run killed or still
    writing) is left out."""
    def logged() -> Iterator[tuple[int, dict[str, Any]]]:
        for lineno, row in load_jsonl_lines(path, allow_empty=True, torn_tail_ok=True):
            step, values = row.get("step"), row.get("data")
            if not _is_int(step) or not isinstance(values, dict):
                raise ForeignRunError(f"{path}:{lineno}: not a verl file-logger row (expected "
                                      '{"step": <int>, "data": {...}})')
            yield step, values

    return _by_step(logged())


def read_trl_state(path: Path) -> list[dict[str, Any]]:
    """TRL's ``log_history`` as aqn metric rows, GRPOTrainer's names mapped to verl's."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ForeignRunError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from e
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ForeignRunError(f"{path}: no log_history list (not a TRL/transformers "
                              "trainer_state.json)")
    def logged() -> Iterator[tuple[int, dict[str, Any]]]:
        for i, entry in enumerate(history):
            step = entry.get("step") if isinstance(entry, dict) else None
            if not _is_int(step):
                raise ForeignRunError(f"{path}: log_history[{i}] has no integer 'step'")
            yield step, {TRL_NAMES.get(name, name): value for name, value in entry.items()}

    return _by_step(logged())
