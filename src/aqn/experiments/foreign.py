"""Runs logged by verl or TRL, loaded as ``RunData`` so that one report compares them with
aqn's own runs (a cluster run beside a laptop run).

- verl: the file logger's JSONL (``trainer.logger=[console,file]``), one
  ``{"step": int, "data": {metric: value}}`` per line, at ``$VERL_FILE_LOGGER_PATH`` or
  ``$VERL_FILE_LOGGER_ROOT/<project>/<experiment>.jsonl``. Its names are verl's, which are the
  report's: nothing is renamed (its rollout correction's ``rollout_corr/rollout_is_*`` and
  ``rollout_corr/rollout_rs_*`` sit beside aqn's under the same keys).
- TRL: ``trainer_state.json`` (``Trainer`` writes it into every checkpoint-<step>/), whose
  ``log_history`` holds one row per logging step. GRPOTrainer's names are mapped to verl's
  where the two measure the same thing (``TRL_NAMES``); the others keep their TRL names.

aqn's verl launcher (``aqn.integrations.verl``) has one vLLM worker write the ``aqn/*``
metrics of the noise it applied beside verl's JSONL (``<experiment>.aqn.jsonl``, rows of the
same shape): verl's logger never sees them. The report merges the two files by step.

Neither log holds aqn's config, so the variant and seed come from a label
(``aqn report baseline/seed1=runs/verl/b1.jsonl``) or from the file name
(``aqn-qerl-seed2.jsonl``: variant ``aqn-qerl``, seed 2); AQN counts as enabled when the log
holds ``aqn/*`` metrics (TRL runs with ``aqn.integrations.trl`` do; verl runs launched by
``aqn.integrations.verl`` have them in their ``.aqn.jsonl``).

TensorBoard event files and wandb offline runs hold the same metrics under the same names
when verl writes them (``trainer.logger=[tensorboard]`` / ``[wandb]``); when transformers'
callbacks write them (a TRL run with ``report_to``) every name carries a ``train/``,
``eval/`` or ``test/`` prefix, which is how the two are told apart: the prefix comes off
(``eval/reward`` is ``eval_reward`` again) and ``TRL_NAMES`` applies.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aqn import metric_keys as keys
from aqn.data.jsonl import load_jsonl_lines
from aqn.errors import InputError

VERL = "verl"
TRL = "trl"
TRL_STATE = "trainer_state.json"
AQN_METRICS = ".aqn.jsonl"  # beside verl's <experiment>.jsonl
TB_EVENTS = "events.out.tfevents.*"
WANDB_RUN = "run-*.wandb"  # in wandb/offline-run-<time>-<id>/ (or run-<time>-<id>/)
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
    # not mapped: sampling/importance_sampling_ratio/{min,mean,max} is TRL's ratio after its
    # own truncation or masking (vllm_importance_sampling_mode), per token or per sequence,
    # averaged over processes: no verl rollout_corr/rollout_is_* figure; it keeps TRL's name
    "grad_norm": "actor/grad_norm",
    "learning_rate": "actor/lr",
    "eval_reward": keys.val_core(TRL_EVAL_SOURCE, "reward", 1),
}

_SEEDED_NAME = re.compile(r"(?P<variant>.+?)[-_]+seed(?P<seed>\d+)")
_LABEL = re.compile(r"(?P<variant>[^=/]+)(?:/seed(?P<seed>\d+))?=(?P<path>.+)")


class ForeignRunError(InputError):
    """A verl or TRL log that cannot be read; the message names the file (and line)."""


@dataclass
class ForeignLog:
    """One run's metrics as logged by another framework."""

    logged_by: str  # VERL | TRL
    log_format: str  # "jsonl" | "trainer_state" | "tensorboard" | "wandb"
    path: Path  # the log (a file or a run's folder)
    name: str  # the run's name in the log (file, directory or wandb run name)
    rows: list[dict[str, Any]]  # aqn metric rows, verl's names


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


def aqn_metrics_file(verl_log: Path) -> Path:
    """The file of aqn's worker metrics beside verl's ``<experiment>.jsonl``."""
    return verl_log.with_name(verl_log.name.removesuffix(".jsonl") + AQN_METRICS)


def verl_log_of(path: Path) -> Path:
    """verl's log for ``path``: itself, or the log an ``<experiment>.aqn.jsonl`` belongs to."""
    if not path.name.endswith(AQN_METRICS):
        return path
    log = path.with_name(path.name.removesuffix(AQN_METRICS) + ".jsonl")
    if not log.is_file():
        raise ForeignRunError(f"{path}: aqn's metrics of a verl run, but verl's log {log.name} "
                              "is not beside it")
    return log


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


def _verl_logged(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, row in load_jsonl_lines(path, allow_empty=True, torn_tail_ok=True):
        step, values = row.get("step"), row.get("data")
        if not _is_int(step) or not isinstance(values, dict):
            raise ForeignRunError(f"{path}:{lineno}: not a verl file-logger row (expected "
                                  '{"step": <int>, "data": {...}})')
        yield step, values


def read_verl_log(path: Path) -> list[dict[str, Any]]:
    """verl's file-logger rows as aqn metric rows, with those of its ``.aqn.jsonl`` when
    there is one. A torn last line (a run killed or still writing) is left out."""
    logged = list(_verl_logged(path))
    if (aqn := aqn_metrics_file(path)).is_file():
        logged += _verl_logged(aqn)
    return _by_step(logged)


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


def tensorboard_dir(path: Path) -> Path | None:
    """The directory of a TensorBoard run: ``path`` if it holds event files (all of them
    are one run: a resumed run adds a file), the folder of ``path`` if it is one."""
    if path.is_file():
        return path.parent if path.match(TB_EVENTS) else None
    return path if any(path.glob(TB_EVENTS)) else None


def wandb_file(path: Path) -> Path | None:
    """The transaction log of a wandb run: ``path`` itself, or the one run-*.wandb in it."""
    if path.is_file():
        return path if path.suffix == ".wandb" else None
    found = sorted(path.glob(WANDB_RUN))
    if len(found) > 1:
        raise ForeignRunError(f"{path}: {len(found)} wandb runs in one folder ("
                              f"{', '.join(f.name for f in found)}); name one of the files")
    return found[0] if found else None


def _tensorboard_logged(directory: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(step, {tag: value}) of every scalar, read by TensorBoard's own loader."""
    try:
        from tensorboard.backend.event_processing import event_accumulator
        from tensorboard.util import tensor_util
    except ImportError:
        raise ForeignRunError(f"{directory}: reading TensorBoard event files needs the "
                              "tensorboard package: pip install 'aqn[tensorboard]'") from None
    # size_guidance 0 keeps every event (the default samples 1000 per tag); on a step that
    # goes back (a resumed run) the loader drops the events it replaces, as TensorBoard shows
    acc = event_accumulator.EventAccumulator(
        str(directory), size_guidance={event_accumulator.SCALARS: 0,
                                       event_accumulator.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in tags[event_accumulator.SCALARS]:  # simple_value: torch's add_scalar
        for event in acc.Scalars(tag):
            yield event.step, {tag: float(event.value)}
    for tag in tags[event_accumulator.TENSORS]:  # tf.summary.scalar / new_style=True
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue
        for event in acc.Tensors(tag):
            yield event.step, {tag: float(tensor_util.make_ndarray(event.tensor_proto))}


# wandb's transaction log (run-<id>.wandb) is a LevelDB log of protobuf Records: a 7-byte
# file header, then 32 KiB blocks of chunks (crc32 seeded with the chunk type, length, type).
_WANDB_HEADER = b":W&B\xe1\xbe\x00"
_BLOCK = 32768
_CHUNK = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a wandb transaction log. A chunk cut short at the end of the file (a
    run killed or still writing) ends it; a bad checksum elsewhere is an error naming the
    byte offset."""
    data = path.read_bytes()
    if not data.startswith(_WANDB_HEADER):
        raise ForeignRunError(f"{path}: not a wandb transaction log (no :W&B header)")
    pos, record = len(_WANDB_HEADER), b""
    while pos < len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # a block's tail too short for a chunk is padding
            pos += left
            continue
        if pos + _CHUNK.size > len(data):
            return
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zeros: the rest of a preallocated block
            pos += left
            continue
        chunk = data[pos + _CHUNK.size:pos + _CHUNK.size + length]
        if len(chunk) < length:
            return
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc or kind not in (
                _FULL, _FIRST, _MIDDLE, _LAST):
            raise ForeignRunError(f"{path}: byte {pos}: a corrupt record (checksum or type)")
        record = chunk if kind in (_FULL, _FIRST) else record + chunk
        if kind in (_FULL, _LAST):
            yield record
        pos += _CHUNK.size + length


def _wandb_logged(path: Path) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """The run's name and (step, metrics) of its history rows. The step is the one the
    writer passed (``_step``), or transformers' ``train/global_step`` where it logs one
    (its WandbCallback lets wandb count the rows)."""
    try:
        from wandb.proto import wandb_internal_pb2
    except ImportError:
        raise ForeignRunError(f"{path}: reading wandb runs needs the wandb package: "
                              "pip install 'aqn[wandb]'") from None
    name, logged = path.parent.name, []
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run" and record.run.display_name:
            name = record.run.display_name
        if kind != "history":
            continue
        values = {item.key or ".".join(item.nested_key): json.loads(item.value_json)
                  for item in record.history.item}
        step = values.pop("train/global_step", values.get("_step"))
        if not _is_int(step):
            raise ForeignRunError(f"{path}: a history row without an integer _step")
        logged.append((step, {k: v for k, v in values.items() if not k.startswith("_")}))
    return name, logged


_TRANSFORMERS_PREFIX = re.compile(r"(train/|eval/|test/)(.+)")


def _framework(logged: list[tuple[int, dict[str, Any]]]
               ) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """Who wrote TensorBoard / wandb metrics, and the metrics under the report's names."""
    names = {name for _, values in logged for name in values}
    if not names or not all(_TRANSFORMERS_PREFIX.fullmatch(n) for n in names):
        return VERL, logged
    def trl_name(name: str) -> str:
        prefix, rest = _TRANSFORMERS_PREFIX.fullmatch(name).groups()
        name = rest if prefix == "train/" else f"{prefix[:-1]}_{rest}"
        return TRL_NAMES.get(name, name)
    return TRL, [(step, {trl_name(k): v for k, v in values.items()}) for step, values in logged]


def read_foreign(path: Path) -> ForeignLog | None:
    """The run that ``path`` holds, logged by verl or TRL; None when it holds none."""
    if is_verl_log(path):
        log = verl_log_of(path)
        return ForeignLog(VERL, "jsonl", log, log.stem, read_verl_log(log))
    if (state := trl_state_file(path)) is not None:
        # the run is its output_dir (the folder above checkpoint-<step>/), and named by it
        folder = state.parent
        output_dir = folder.parent if folder.name.startswith("checkpoint-") else folder
        return ForeignLog(TRL, "trainer_state", output_dir, output_dir.name,
                          read_trl_state(state))
    if (events := tensorboard_dir(path)) is not None:
        logged_by, logged = _framework(list(_tensorboard_logged(events)))
        # transformers' TensorBoardCallback writes into <output_dir>/runs/<time>_<host>/
        name = events.parent.parent.name if events.parent.name == "runs" else events.name
        return ForeignLog(logged_by, "tensorboard", events, name, _by_step(logged))
    if (wandb := wandb_file(path)) is not None:
        name, logged = _wandb_logged(wandb)
        logged_by, logged = _framework(logged)
        return ForeignLog(logged_by, "wandb", wandb, name, _by_step(logged))
    return None
