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

An optional ``doses`` map turns the sweep into robustness curves: each family is one
perturbation whose size grows, given as the config key(s) it sets and the values; every
variant then runs at its clean point (the variant alone, shared by all families) and at every
dose of every family::

    doses:
      matmul:                                   # a family: its name, key(s) and values
        key: [actor_rollout_ref.rollout.op_noise.scale]  # several keys get the same value
        values: [0.03, 0.06, 0.1, 0.15]         # the perturbed doses (the clean point is 0)
        overrides: []                           # optional: what every run of it adds
        variants: [baseline]                    # optional: only these variants run its doses

(``doses: {key: ..., values: [...]}`` is one family named ``dose``.)

Runs go to ``<out_dir>/<variant>__seed<seed>/`` (at a dose:
``<variant>__<family>@<value>__seed<seed>/``) with a ``run.json`` (variant, seed, status,
error; family and dose at a dose). Re-running skips finished runs and resumes interrupted
ones from their checkpoint, refuses stored runs whose config the sweep no longer gives, and
starts afresh a run that failed before its first checkpoint. A run that fails (or whose
worker is killed) is recorded with its error and the others go on. The runs go to a local
process pool (``jobs``) or, with the same rules, to a Ray cluster (``aqn.experiments.ray_sweep``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from aqn.config import AQNConfig, load_config
from aqn.config.loader import build, read_yaml
from aqn.errors import ConfigError, Interrupted
from aqn.experiments.runs import dose_label
from aqn.experiments.stats import seeds_needed
from aqn.files import write_atomic
from aqn.perturb import check_engine_support
from aqn.rl.checkpoint import checkpoint_steps
from aqn.rl.run_dir import LOCK_FILE, LockHeld, RunLock, config_changes

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


@dataclass(frozen=True)
class DoseFamily:
    """One perturbation whose size a sweep grows: ``keys`` all set to each of ``values``."""

    keys: tuple[str, ...]
    values: tuple[float | str, ...]
    overrides: tuple[str, ...] = ()
    # The variants that run its doses; empty: every variant. A family that only places a
    # perturbation on the mismatch axis needs the baseline alone.
    variants: tuple[str, ...] = ()

    def run_overrides(self, dose: float | str) -> list[str]:
        return [*self.overrides, *(f"{k}={dose}" for k in self.keys)]


@dataclass(frozen=True)
class RunKey:
    """One run of a sweep: a variant and a seed, at the clean point (family None) or at one
    dose of one family."""

    variant: str
    seed: int
    family: str | None = None
    dose: float | str | None = None

    @property
    def name(self) -> str:  # its folder in the sweep directory
        at = "" if self.family is None else f"__{self.family}@{dose_label(self.dose)}"
        return f"{self.variant}{at}__seed{self.seed}"


def _check_name(name: str, what: str, forbidden: tuple[str, ...] = ("/",)) -> None:
    if not name or name.startswith(".") or any(c in name for c in forbidden):
        raise ConfigError(f"{what} name {name!r} must be a plain folder name (no "
                          f"{', '.join(map(repr, forbidden))}, not starting with '.')",
                          what + "s")


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
    # family name -> its doses: robustness curves (see the module docstring)
    doses: dict[str, DoseFamily] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("must list at least one seed", "seeds")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"lists a seed twice: {list(self.seeds)}", "seeds")
        if not self.variants:
            raise ConfigError("must list at least one variant", "variants")
        for name in self.variants:
            _check_name(name, "variant")
        for name, family in self.doses.items():
            _check_name(name, "dose", ("/", "__", "@"))  # it sits in run folder names
            labels = [dose_label(d) for d in family.values]
            if not family.keys or not labels or len(set(labels)) != len(labels):
                raise ConfigError(f"family {name!r} needs key(s) and distinct values, got "
                                  f"keys {list(family.keys)}, values {labels}", "doses")
            unknown = [v for v in family.variants if v not in self.variants]
            if unknown:
                raise ConfigError(f"names {unknown}, not among the sweep's variants "
                                  f"{list(self.variants)}", f"doses.{name}.variants")

    def runs(self) -> list[RunKey]:
        """Every run, variant by variant: its clean point, then each family's doses."""
        return [RunKey(v, s, f, d) for v in self.variants
                for f, d in [(None, None)] + [(f, d) for f, fam in self.doses.items()
                                              if not fam.variants or v in fam.variants
                                              for d in fam.values]
                for s in self.seeds]


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
    if "base" not in data:  # a silent default would run another model than the user meant
        raise ConfigError(f"{path}: a sweep file must name its base config (a preset such as "
                          "tiny, or a YAML path)", "base")
    variants = data.pop("variants", None)
    scales = data.pop("scales", None) or {}
    doses = _dose_families(data.pop("doses", None) or {})
    spec = build(SweepSpec, data)
    if variants is not None:
        if not isinstance(variants, dict):
            raise ConfigError("must map variant names to lists of overrides", "variants")
        spec = SweepSpec(**{**spec.__dict__, "variants": {
            str(k): tuple(v or ()) for k, v in variants.items()}})
    if not isinstance(scales, dict) or not all(isinstance(v, dict) for v in scales.values()):
        raise ConfigError("must map scale names to {base, overrides}", "scales")
    return dataclasses.replace(spec, scales={str(k): v for k, v in scales.items()},
                               doses=doses)


def _dose_families(doses: dict) -> dict[str, DoseFamily]:
    if not isinstance(doses, dict):
        raise ConfigError("must map family names to {key, values, overrides, variants}",
                          "doses")
    if "key" in doses:  # the one-family shorthand
        doses = {"dose": doses}
    families = {}
    for name, entry in doses.items():
        where = f"doses.{name}"
        if not isinstance(entry, dict) or set(entry) - {"key", "values", "overrides", "variants"}:
            raise ConfigError("must be {key, values, overrides, variants}", where)
        keys = entry.get("key")
        keys = [keys] if isinstance(keys, str) else keys
        values = entry.get("values")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ConfigError("must be a config key or a list of them", f"{where}.key")
        if not isinstance(values, list) or not all(
                isinstance(v, int | float | str) and not isinstance(v, bool) for v in values):
            raise ConfigError("must be a list of numbers or names", f"{where}.values")
        variants = entry.get("variants") or []
        if not isinstance(variants, list) or not all(isinstance(v, str) for v in variants):
            raise ConfigError("must be a list of the sweep's variant names", f"{where}.variants")
        families[str(name)] = DoseFamily(
            tuple(keys), tuple(float(v) if isinstance(v, int) else v for v in values),
            tuple(entry.get("overrides") or ()), tuple(variants))
    return families


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


def run_config(spec: SweepSpec, run: RunKey, resume: bool) -> AQNConfig:
    dose = [] if run.family is None else spec.doses[run.family].run_overrides(run.dose)
    try:
        cfg = load_config(spec.base, [
            *spec.overrides, *spec.variants[run.variant], *dose,
            f"trainer.seed={run.seed}",
            f"trainer.default_local_dir={out_dir_of(spec)}",
            f"trainer.experiment_name={run.name}",
            f"trainer.resume={str(resume).lower()}",
            "trainer.progress_bar=false",
        ])
        check_engine_support(cfg)  # a sweep refuses it before any run starts
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{e.message} (run {run.name})", e.key) from None


def _write_status(run_dir: Path, run: RunKey, status: str, error: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"variant": run.variant, "seed": run.seed, "status": status, "error": error}
    if run.family is not None:
        info |= {"family": run.family, "dose": run.dose}
    write_atomic(run_dir / RUN_FILE, json.dumps(info, indent=1))


def run_status(run_dir: Path) -> str | None:
    path = run_dir / RUN_FILE
    return json.loads(path.read_text())["status"] if path.exists() else None


def run_one(spec: SweepSpec, run: RunKey, threads: int | None = None) -> str:
    """Run (or resume, or skip) one run; returns its final status ("held" when another
    process holds the run: it is left alone).

    Every decision about the run (skip, start afresh, resume) and every write to its
    ``run.json`` is made under the run's lock, which the training then keeps: nothing here
    touches a run that another process is writing.
    """
    from aqn.rl.trainer import train

    if threads:
        torch.set_num_threads(threads)
    run_dir = out_dir_of(spec) / run.name
    try:
        lock = RunLock(run_dir)
    except LockHeld as e:
        log.warning("%s is held by another aqn process (pid %s): left alone", run.name,
                    e.holder)
        return "held"
    try:
        if run_status(run_dir) == "done":
            return "skipped"
        if not checkpoint_steps(run_dir):
            # nothing to resume (failed or killed before its first checkpoint): start afresh,
            # with the config the sweep gives now; the lock file stays, held
            _clear_run(run_dir)
        resume = (run_dir / "config.yaml").exists()
        try:
            cfg = run_config(spec, run, resume)
            _write_status(run_dir, run, "running")
            train(cfg, lock)
        except KeyboardInterrupt:
            raise  # the run stays "running", resumable from its last checkpoint
        except Exception as e:  # one failed run must not stop the sweep
            write_atomic(run_dir / "error.log", traceback.format_exc())
            _write_status(run_dir, run, "failed", f"{type(e).__name__}: {e}")
            log.error("%s failed: %s", run.name, e)
            return "failed"
        _write_status(run_dir, run, "done")
        return "done"
    finally:
        lock.release()


def _clear_run(run_dir: Path) -> None:
    for path in run_dir.iterdir():
        if path.name != LOCK_FILE:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def mark_worker_died(run_dir: Path, run: RunKey, error: str = "its worker process died "
                     "(killed, out of memory, or stopped with a sibling worker that died)"
                     ) -> bool:
    """Record a run whose worker process died as failed, if it was running and no one holds
    it now (the dead worker's lock went with it); True when recorded."""
    try:
        lock = RunLock(run_dir)
    except LockHeld:
        return False
    try:
        if run_status(run_dir) != "running":
            return False
        _write_status(run_dir, run, "failed", error)
        return True
    finally:
        lock.release()


def _nothing_to_resume(run_dir: Path) -> bool:
    """A stored run the sweep will start afresh (not done, no checkpoint)."""
    return run_status(run_dir) != "done" and not checkpoint_steps(run_dir)


def _check_stored_runs(spec: SweepSpec, runs: list[RunKey]) -> None:
    """A run already in the sweep directory must be the run the sweep now asks for: a stale
    one is never skipped or resumed as if it were (the keys that differ are named)."""
    stale = []
    for run in runs:
        run_dir = out_dir_of(spec) / run.name
        if (run_dir / "config.yaml").exists() and not _nothing_to_resume(run_dir):
            changed = config_changes(run_dir / "config.yaml", run_config(spec, run, True))
            if changed:
                stale.append(f"{run_dir.name} ({', '.join(changed)})")
    if stale:
        raise ConfigError(
            f"sweep {spec.name}: {len(stale)} run(s) in {out_dir_of(spec)} were made with "
            f"another config than the sweep now gives: {'; '.join(stale)}. Delete them, or "
            "write this sweep elsewhere (out_dir)", "overrides")


def _sweep_json(spec: SweepSpec) -> str:
    return json.dumps({**spec.__dict__,
                       "variants": {k: list(v) for k, v in spec.variants.items()},
                       "doses": {k: dataclasses.asdict(f) for k, f in spec.doses.items()}},
                      indent=1)


SWEEP_LOCK = ".sweep.lock"
RAY_LOCAL = "local"  # ``ray=``: a Ray instance of this machine's own


def run_sweep(spec: SweepSpec, jobs: int = 1, ray: str | None = None,
              retries: int = 0) -> dict[str, str]:
    """Every run of the sweep (``spec.runs()``); ``jobs`` > 1 runs them in parallel
    processes; ``ray`` (a cluster address, "auto", or ``RAY_LOCAL``) runs each as a Ray task
    there instead, a task lost with its worker retried ``retries`` times
    (``aqn.experiments.ray_sweep``). Returns run folder name -> status.

    One sweep at a time per sweep directory (a second is refused up front, naming the
    first's pid). Ctrl-C or SIGTERM stops it and its workers within seconds, as
    ``Interrupted``; every run stays resumable by running the sweep again.
    """
    runs = spec.runs()
    for run in runs:  # every config is checked before the first run starts
        run_config(spec, run, resume=False)
    out = out_dir_of(spec)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out, SWEEP_LOCK)
    except LockHeld as e:
        raise ConfigError(f"sweep directory {out} is in use by another aqn sweep (pid "
                          f"{e.holder}); wait for it to finish, or give this sweep another "
                          "out_dir", "out_dir") from None
    try:
        _check_stored_runs(spec, runs)
        write_atomic(out / "sweep.json", _sweep_json(spec))
        return _run_all(spec, runs, jobs, ray, retries)
    finally:
        lock.release()


def _run_all(spec: SweepSpec, runs: list[RunKey], jobs: int, ray: str | None = None,
             retries: int = 0) -> dict[str, str]:
    out = out_dir_of(spec)
    results: dict[str, str] = {}
    start = time.perf_counter()

    def done(run: RunKey, status: str) -> None:  # one line per finished run: the progress
        results[run.name] = status
        print(f"[{len(results)}/{len(runs)}] {run.name}: {status} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    print(f"sweep {spec.name}: {len(runs)} runs into {out}", file=sys.stderr, flush=True)
    try:
        if ray is not None:
            from aqn.experiments.ray_sweep import run_on_ray

            run_on_ray(spec, runs, None if ray == RAY_LOCAL else ray, retries, done)
        elif jobs <= 1:
            for run in runs:
                done(run, run_one(spec, run))
        else:
            _run_parallel(spec, runs, jobs, done, results)
    except KeyboardInterrupt as e:
        where = f"with {len(results)} of {len(runs)} runs finished"
        if getattr(e, "where", ""):
            where += f"; the run in progress stopped {e.where}"
        raise Interrupted(getattr(e, "signum", signal.SIGINT), where) from None
    return {run.name: results[run.name] for run in runs}


def _run_parallel(spec: SweepSpec, runs: list[RunKey], jobs: int,
                  done: Callable[[RunKey, str], None], results: dict[str, str]) -> None:
    out = out_dir_of(spec)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo = list(runs)
    while todo:  # a worker killed from outside breaks the pool: mark its runs, go on
        broken: list[RunKey] = []
        with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init,
                                 initargs=(os.getpid(),)) as pool:
            try:
                futures = {pool.submit(run_one, spec, run, threads): run for run in todo}
                todo, before = [], len(results)
                for future in as_completed(futures):
                    run = futures[future]
                    try:
                        done(run, future.result())
                    except BrokenProcessPool:
                        broken.append(run)
            except BaseException:
                _stop_workers(pool)
                raise
        # Only now, the pool shut down and its workers reaped: a dead worker's lock can
        # outlive the moment the pool sees it die, and a run it held would look held
        for run in broken:
            if mark_worker_died(out / run.name, run):
                done(run, "failed")
            else:
                todo.append(run)  # not started, or finished unseen: run again
        if todo and len(results) == before:
            raise RuntimeError(f"sweep {spec.name}: the worker processes keep dying before a "
                               "run starts (see the log above)")


def _worker_init(sweep_pid: int) -> None:
    """A worker lives and dies with its sweep. Ctrl-C reaches the whole process group, but
    only the sweep acts on it (it stops its workers); SIGTERM ends a worker at once (its
    run resumes from its last checkpoint); and the kernel sends it SIGTERM when the sweep's
    process dies, however it dies (``kill -9`` included)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != sweep_pid:  # the sweep died before the line above
        os._exit(1)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _stop_workers(pool: ProcessPoolExecutor, grace_s: float = 10.0) -> None:
    """End every worker of ``pool`` (SIGTERM, then SIGKILL after ``grace_s``) and wait for
    them: an interrupted sweep leaves nothing running."""
    workers = list((pool._processes or {}).values())  # noqa: SLF001 (no public handle)
    for worker in workers:
        worker.terminate()
    deadline = time.monotonic() + grace_s
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()
            worker.join()
    pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- seeds for power


def seeds_for_power(diff_sds: list[float | None], target: float, max_seeds: int) -> int:
    """The seeds at which every comparison's paired t-test detects ``target`` points with
    80 % power, from the spread (sd of the per-seed differences, in points) each showed in a
    pilot; a comparison with no spread (the same difference in every seed) plans nothing.
    At least 2, capped at ``max_seeds``."""
    need = [seeds_needed(sd, target) or max_seeds for sd in diff_sds if sd]
    return min(max([2, *need]), max_seeds)


def run_sweep_to_power(spec: SweepSpec, target: float, max_seeds: int, jobs: int = 1,
                       ray: str | None = None, retries: int = 0
                       ) -> tuple[SweepSpec, dict[str, str]]:
    """The sweep's own seeds are a pilot that plans the confirmation: from the spread each
    comparison showed, the seeds its paired t-test needs to detect ``target`` points (at
    most ``max_seeds``), run as new seeds in ``<out_dir>-confirm``. The confirmation's
    seeds are independent of the pilot that chose their number, so its t-tests keep their
    alpha; the pilot's are not reused (reused, a 3-seed pilot lifts alpha to about 8.5 %:
    tests/test_sweep.py simulates both). Returns the confirmation sweep and its results."""
    from aqn.experiments.analysis import compare_points
    from aqn.experiments.runs import find_runs

    if len(spec.seeds) < 2:
        raise ConfigError("--mde plans from the spread between seeds: the sweep (its pilot) "
                          "needs at least 2 seeds", "seeds")
    run_sweep(spec, jobs, ray, retries)
    runs = [r for r in find_runs([out_dir_of(spec)])
            if r.status == "done" and r.seed in spec.seeds]
    rows = compare_points(runs).rows[1:]
    need = seeds_for_power([None if r.seed_sd is None else 100 * r.seed_sd for r in rows],
                           target, max_seeds)
    worst = max((100 * r.mde for r in rows if r.mde is not None), default=None)
    first = max(spec.seeds) + 1
    confirm = dataclasses.replace(spec, name=f"{spec.name}-confirm",
                                  seeds=tuple(range(first, first + need)),
                                  out_dir=f"{out_dir_of(spec)}-confirm")
    print(f"sweep {spec.name}: pilot of {len(spec.seeds)} seeds, largest MDE "
          f"{'n/a' if worst is None else f'{worst:.1f}'} points; {need} new seeds detect "
          f"{target:g} points: confirmation in {out_dir_of(confirm)}", file=sys.stderr,
          flush=True)
    return confirm, run_sweep(confirm, jobs, ray, retries)
