"""Sweeps: every (variant, seed) pair of a base config, each in its own run directory.

A sweep file::

    name: demo
    base: tiny                    # a preset or a YAML path
    overrides: [trainer.total_training_steps=50]
    seeds: [1, 2]
    variants:
      baseline: []
      AQN-QeRL: [trainer.noise_injection.enabled=true, trainer.noise_injection.preset=qerl]

Runs go to ``<out_dir>/<variant>__seed<seed>/`` with a ``run.json`` (variant, seed, status,
error). Re-running skips finished runs and resumes interrupted ones from their checkpoint;
a run that fails is recorded with its error and the others go on.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from aqn.config import AQNConfig, load_config
from aqn.config.loader import build, read_yaml
from aqn.errors import ConfigError

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
    spec = build(SweepSpec, data)
    if variants is not None:
        if not isinstance(variants, dict):
            raise ConfigError("must map variant names to lists of overrides", "variants")
        spec = SweepSpec(**{**spec.__dict__, "variants": {
            str(k): tuple(v or ()) for k, v in variants.items()}})
    return spec


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
    (run_dir / RUN_FILE).write_text(json.dumps(
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


def run_sweep(spec: SweepSpec, jobs: int = 1) -> dict[str, str]:
    """Every (variant, seed) pair; ``jobs`` > 1 runs pairs in parallel processes."""
    pairs = [(v, s) for v in spec.variants for s in spec.seeds]
    for v, s in pairs:  # every config is checked before the first run starts
        run_config(spec, v, s, resume=False)
    out = out_dir_of(spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(
        {**spec.__dict__, "variants": {k: list(v) for k, v in spec.variants.items()}},
        indent=1))
    results: dict[str, str] = {}
    if jobs <= 1:
        for v, s in pairs:
            results[f"{v}__seed{s}"] = run_one(spec, v, s)
            log.info("%s seed %d: %s", v, s, results[f"{v}__seed{s}"])
        return results
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {f"{v}__seed{s}": pool.submit(run_one, spec, v, s, threads) for v, s in pairs}
        for key, future in futures.items():
            results[key] = future.result()
    return results
