"""Sweeps: every (variant, seed) pair of a base config, each in its own run directory.

A sweep file::

    name: demo
    base: tiny                    # a preset or a YAML path
    overrides: [trainer.total_training_steps=50]
    seeds: [1, 2]
    variants:
      baseline: []
      AQN-QeRL: [trainer.noise_injection.enabled=true, trainer.noise_injection.preset=qerl]

An optional ``scales`` map names larger set-ups of the same comparison (``aqn sweep --preset
hw-hetero --scale smollm2``): each replaces ``base`` and ``overrides`` and keeps the variants
and seeds::

    scales:
      smollm2: {base: smollm2-arith, overrides: [actor_rollout_ref.rollout.numerics=npu-naive]}

Runs go to ``<out_dir>/<variant>__seed<seed>/`` with a ``run.json`` (variant, seed, status,
error). Re-running skips finished runs and resumes interrupted ones from their checkpoint,
refuses stored runs whose config the sweep no longer gives, and starts afresh a run that
failed before its first checkpoint. A run that fails (or whose worker is killed) is recorded
with its error and the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from aqn.config import AQNConfig, load_config
from aqn.config.loader import build, read_yaml
from aqn.errors import ConfigError
from aqn.files import write_atomic
from aqn.rl.checkpoint import checkpoint_steps
from aqn.rl.run_dir import config_changes

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


@dataclass(frozen=True)
class SweepSpec:
    name: str = "sweep"
    base: str = "tiny"  # a config preset or YAML path
    overrides: tuple[str, ...] = ()  # applied to every run
    seeds: tuple[int, ...] = (1,)
    variants: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"baseline": ()})
    out_dir: str | None = None  # default: runs/sweeps/<name>
    # scale name -> {"base": ..., "overrides": [...]}: larger set-ups of the same comparison
    scales: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("must list at least one seed", "seeds")
        if not self.variants:
            raise ConfigError("must list at least one variant", "variants")
        for name in self.variants:
            if not name or "/" in name or name.startswith("."):
                raise ConfigError(f"variant name {name!r} must be a plain folder name",
                                  "variants")


def sweep_presets() -> list[str]:
    root = resources.files("aqn.configs") / "sweeps"
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir()
                  if p.name.endswith(".yaml"))


def load_sweep(source: str | Path) -> SweepSpec:
    path = Path(source)
    if not path.exists():
        path = Path(str(resources.files("aqn.configs") / "sweeps" / f"{source}.yaml"))
        if not path.exists():
            raise ConfigError(f"no sweep file {source!r} and no sweep preset of that name; "
                              f"presets: {', '.join(sweep_presets())}")
    data = read_yaml(path)
    variants = data.pop("variants", None)
    scales = data.pop("scales", None) or {}
    spec = build(SweepSpec, data)
    if variants is not None:
        if not isinstance(variants, dict):
            raise ConfigError("must map variant names to lists of overrides", "variants")
        spec = SweepSpec(**{**spec.__dict__, "variants": {
            str(k): tuple(v or ()) for k, v in variants.items()}})
    if not isinstance(scales, dict) or not all(isinstance(v, dict) for v in scales.values()):
        raise ConfigError("must map scale names to {base, overrides}", "scales")
    return dataclasses.replace(spec, scales={str(k): v for k, v in scales.items()})


def at_scale(spec: SweepSpec, scale: str) -> SweepSpec:
    """The sweep with ``base`` and ``overrides`` of one of its ``scales``, named
    ``<name>-<scale>`` so its runs never mix with the default scale's."""
    if scale not in spec.scales:
        known = ", ".join(spec.scales) or "none"
        raise ConfigError(f"sweep {spec.name!r} has no scale {scale!r}; its scales: {known}",
                          "scales")
    entry = spec.scales[scale]
    unknown = set(entry) - {"base", "overrides"}
    if unknown or "base" not in entry:
        raise ConfigError(f"scale {scale!r} must give base (and optionally overrides), got "
                          f"{sorted(entry)}", f"scales.{scale}")
    return dataclasses.replace(spec, name=f"{spec.name}-{scale}", base=entry["base"],
                               overrides=tuple(entry.get("overrides") or ()), scales={},
                               out_dir=None)


def out_dir_of(spec: SweepSpec) -> Path:
    return Path(spec.out_dir or Path("runs") / "sweeps" / spec.name)


def run_config(spec: SweepSpec, variant: str, seed: int, resume: bool) -> AQNConfig:
    return load_config(spec.base, [
        *spec.overrides, *spec.variants[variant],
        f"trainer.seed={seed}",
        f"trainer.default_local_dir={out_dir_of(spec)}",
        f"trainer.experiment_name={variant}__seed{seed}",
        f"trainer.resume={str(resume).lower()}",
        "trainer.progress_bar=false",
    ])


def _write_status(run_dir: Path, variant: str, seed: int, status: str,
                  error: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / RUN_FILE, json.dumps(
        {"variant": variant, "seed": seed, "status": status, "error": error}, indent=1))


def run_status(run_dir: Path) -> str | None:
    path = run_dir / RUN_FILE
    return json.loads(path.read_text())["status"] if path.exists() else None


def run_one(spec: SweepSpec, variant: str, seed: int, threads: int | None = None) -> str:
    """Run (or resume, or skip) one pair; returns its final status."""
    from aqn.rl.trainer import train

    if threads:
        torch.set_num_threads(threads)
    run_dir = out_dir_of(spec) / f"{variant}__seed{seed}"
    if run_status(run_dir) == "done":
        return "skipped"
    if _failed_without_progress(run_dir):
        shutil.rmtree(run_dir)  # nothing to resume: start fresh (its config may be fixed)
    resume = (run_dir / "config.yaml").exists()
    try:
        cfg = run_config(spec, variant, seed, resume)
        _write_status(run_dir, variant, seed, "running")
        train(cfg)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # one failed run must not stop the sweep
        (run_dir / "error.log").write_text(traceback.format_exc())
        _write_status(run_dir, variant, seed, "failed", f"{type(e).__name__}: {e}")
        log.error("%s seed %d failed: %s", variant, seed, e)
        return "failed"
    _write_status(run_dir, variant, seed, "done")
    return "done"


def _failed_without_progress(run_dir: Path) -> bool:
    return run_status(run_dir) == "failed" and not checkpoint_steps(run_dir)


def _check_stored_runs(spec: SweepSpec, pairs: list[tuple[str, int]]) -> None:
    """A run already in the sweep directory must be the run the sweep now asks for: a stale
    one is never skipped or resumed as if it were (the keys that differ are named)."""
    stale = []
    for v, s in pairs:
        run_dir = out_dir_of(spec) / f"{v}__seed{s}"
        if (run_dir / "config.yaml").exists() and not _failed_without_progress(run_dir):
            changed = config_changes(run_dir / "config.yaml", run_config(spec, v, s, True))
            if changed:
                stale.append(f"{run_dir.name} ({', '.join(changed)})")
    if stale:
        raise ConfigError(
            f"sweep {spec.name}: {len(stale)} run(s) in {out_dir_of(spec)} were made with "
            f"another config than the sweep now gives: {'; '.join(stale)}. Delete them, or "
            "write this sweep elsewhere (out_dir)", "overrides")


def run_sweep(spec: SweepSpec, jobs: int = 1) -> dict[str, str]:
    """Every (variant, seed) pair; ``jobs`` > 1 runs pairs in parallel processes."""
    pairs = [(v, s) for v in spec.variants for s in spec.seeds]
    for v, s in pairs:  # every config is checked before the first run starts
        run_config(spec, v, s, resume=False)
    _check_stored_runs(spec, pairs)
    out = out_dir_of(spec)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "sweep.json", json.dumps(
        {**spec.__dict__, "variants": {k: list(v) for k, v in spec.variants.items()}},
        indent=1))
    results: dict[str, str] = {}
    start = time.perf_counter()

    def done(key: str, status: str) -> None:  # one line per finished run: the sweep's progress
        results[key] = status
        print(f"[{len(results)}/{len(pairs)}] {key}: {status} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    print(f"sweep {spec.name}: {len(pairs)} runs into {out}", file=sys.stderr, flush=True)
    if jobs <= 1:
        for v, s in pairs:
            done(f"{v}__seed{s}", run_one(spec, v, s))
        return {f"{v}__seed{s}": results[f"{v}__seed{s}"] for v, s in pairs}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo = list(pairs)
    while todo:  # a worker killed from outside breaks the pool: mark its runs, go on
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_one, spec, v, s, threads): (v, s) for v, s in todo}
            todo, before = [], len(results)
            for future in as_completed(futures):
                v, s = futures[future]
                try:
                    done(f"{v}__seed{s}", future.result())
                except BrokenProcessPool:
                    if run_status(out_dir_of(spec) / f"{v}__seed{s}") == "running":
                        _write_status(out_dir_of(spec) / f"{v}__seed{s}", v, s, "failed",
                                      "its worker process died (killed, out of memory, or "
                                      "stopped with a sibling worker that died)")
                        done(f"{v}__seed{s}", "failed")
                    else:
                        todo.append((v, s))  # not started, or finished unseen: run again
        if todo and len(results) == before:
            raise RuntimeError(f"sweep {spec.name}: the worker processes keep dying before a "
                               "run starts (see the log above)")
    return {f"{v}__seed{s}": results[f"{v}__seed{s}"] for v, s in pairs}
