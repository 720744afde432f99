"""What a run trains from, fingerprinted: its train and validation records and the initial
weights of its policy, in ``<run_dir>/inputs.json``.

The config names the data and the model; the fingerprint says which bytes they were. A resume
checks it, so that a run does not go on from other data or another base model (a dataset
file edited, a local checkpoint directory overwritten, a hub model revised) without saying
so; the report checks that the seeds it pools were trained from the same data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aqn.errors import ConfigError
from aqn.files import about, write_atomic

log = logging.getLogger(__name__)

INPUTS_FILE = "inputs.json"
# Bumped when what a fingerprint covers changes: fingerprints of another version are not
# compared (a newer aqn resumes an older run).
HASH_VERSION = 1
FINGERPRINTS = ("train_data", "val_data", "model")  # the sha256 hex digests
COUNTS = {"train_data": "n_train", "val_data": "n_val", "model": "n_params"}  # for humans


def records_sha256(records: Sequence[dict[str, Any]]) -> str:
    """sha256 of the canonical JSON of ``records`` (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(list(records), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_sha256(model: nn.Module) -> str:
    """sha256 over the state dict in name order: each tensor's name, dtype, shape and raw
    bytes. A tensor tied to one already hashed (an lm_head sharing the embedding) adds its
    name and the name it is tied to, not its bytes again."""
    h = hashlib.sha256()
    seen: dict[tuple, str] = {}
    for name, value in sorted(model.state_dict(keep_vars=False).items()):
        h.update(name.encode() + b"\0")
        if not hasattr(value, "detach"):  # a module's extra state
            h.update(repr(value).encode() + b"\0")
            continue
        tensor = value.detach()
        h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode() + b"\0")
        ident = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape),
                 tensor.stride())
        if tensor.numel() and ident in seen:
            h.update(b"tied:" + seen[ident].encode() + b"\0")
            continue
        seen[ident] = name
        h.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def fingerprint_inputs(train_records: Sequence[dict[str, Any]],
                       val_records: Sequence[dict[str, Any]], model: nn.Module
                       ) -> dict[str, Any]:
    """The fingerprint a run stores in inputs.json: sha256 of its train and validation
    records and of its policy's initial weights (as built, before a checkpoint is loaded),
    with their counts."""
    return {
        "hash_version": HASH_VERSION,
        "train_data": records_sha256(train_records),
        "val_data": records_sha256(val_records),
        "model": model_sha256(model),
        "n_train": len(train_records),
        "n_val": len(val_records),
        "n_params": sum(p.numel() for p in model.parameters()),
    }


def read_inputs(run_dir: Path) -> dict[str, Any] | None:
    """The run's inputs.json; None when it has none (a run from an aqn before it)."""
    path = Path(run_dir) / INPUTS_FILE
    if not path.exists():
        return None
    with about(path):
        data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object", "trainer.resume")
    return data


def changed_inputs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The fingerprints in which ``new`` differs from ``old``, each as
    ``train_data (sha256 1a2b3c4d5e6f, 64 records -> 9f8e7d6c5b4a, 60 records)``; none when
    the two come from different hash versions (not comparable)."""
    if old.get("hash_version") != new.get("hash_version"):
        return []
    return [f"{key} (sha256 {_short(old, key)} -> {_short(new, key)})" for key in FINGERPRINTS
            if key in old and key in new and old[key] != new[key]]


def _short(fingerprint: dict[str, Any], key: str) -> str:
    """``1a2b3c4d5e6f, 64 records``: the digest's first 12 hex digits and the count."""
    count = fingerprint.get(COUNTS[key])
    what = "parameters" if key == "model" else "records"
    return str(fingerprint[key])[:12] + ("" if count is None else f", {count} {what}")


def write_or_check_inputs(run_dir: Path, fingerprint: dict[str, Any], resume: bool) -> None:
    """A new run writes ``<run_dir>/inputs.json``; a resume checks the stored one and refuses
    other inputs, naming each that changed. A run stored without one (an older aqn) resumes
    and gets one written."""
    run_dir = Path(run_dir)
    path = run_dir / INPUTS_FILE
    stored = read_inputs(run_dir) if resume else None
    if stored is not None:
        changed = changed_inputs(stored, fingerprint)
        if changed:
            raise ConfigError(
                f"cannot resume {run_dir}: its inputs changed: {', '.join(changed)}; the run "
                f"was made with other data/model (see {path}): start a new run or restore "
                "them", "trainer.resume")
        if stored.get("hash_version") == fingerprint.get("hash_version"):
            return
        log.info("%s was written by another aqn version: its fingerprints are not compared; "
                 "recording this resume's", path)
    elif resume:
        log.info("%s holds no %s (a run from an older aqn): recording the inputs of this "
                 "resume", run_dir, INPUTS_FILE)
    write_atomic(path, json.dumps(fingerprint, indent=1) + "\n")
