"""Checkpoints as safetensors + JSON (never pickle): weights, optimizer, RNG state, step.

A checkpoint is written to a temporary folder and renamed into place, so a crash while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from aqn.files import FileError, about, write_atomic

STATE_FILE = "state.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step}"


def checkpoint_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints, newest first (``step_N.tmp`` left by a crash while
    saving is not one)."""
    root = run_dir / "checkpoints"
    found = [(int(p.name.removeprefix("step_")), p) for p in root.glob("step_*")
             if p.is_dir() and p.name.removeprefix("step_").isdigit()] if root.exists() else []
    return sorted(found, reverse=True)


def save_checkpoint(run_dir: Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, extra: dict, keep: int | None = 2
                    ) -> Path:
    """Write checkpoint ``step`` beside the others, then drop all but the newest ``keep``
    (None: keep all)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with about(tmp):
            tmp.mkdir(parents=True)
        with about(tmp / "model.safetensors"):
            save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        opt = optimizer.state_dict()
        tensors = {f"{pid}.{k}": v.contiguous() for pid, st in opt["state"].items()
                   for k, v in st.items() if isinstance(v, torch.Tensor)}
        tensors["rng.torch"] = torch.get_rng_state()
        with about(tmp / "optimizer.safetensors"):
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "param_groups": opt["param_groups"], **extra}
        write_atomic(tmp / STATE_FILE, json.dumps(state, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a part is no checkpoint; free its space
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    older = sorted((p for p in final.parent.glob("step_*") if p != final and p.is_dir()),
                   key=lambda p: int(p.name.removeprefix("step_").removesuffix(".tmp")))
    for p in older[: max(0, len(older) - (keep - 1))] if keep is not None else ():
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and torch RNG in place; return the saved state."""
    with about(path / STATE_FILE):
        state = json.loads((path / STATE_FILE).read_text())
    if not isinstance(state, dict) or "param_groups" not in state:
        raise FileError(f"{path / STATE_FILE}: not an aqn checkpoint state (no param_groups)")
    with about(path / "model.safetensors"):
        load_model(model, str(path / "model.safetensors"))
    with about(path / "optimizer.safetensors"):
        tensors = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state
