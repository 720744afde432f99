"""What the report checks before it compares: every file a run wrote against what the run says
it wrote, the seeds pooled into one point against each other, and each comparison's two
configs against what its sweep set apart.

A run that fails a check is left out of every table, test and plot (it is still listed in
the runs table), and a warning names it and what failed; a comparison whose configs differ in
more than its sweep set is kept, with a warning naming the keys. Only aqn runs are checked: a
verl or TRL log has no config or per-item files to check it against.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from aqn import metric_keys as keys
from aqn.config import AQNConfig, config_to_dict, expand_shorthand, load_config
from aqn.experiments.runs import RunData
from aqn.rl.inputs import FINGERPRINTS
from aqn.rl.run_dir import RESUMABLE_KEYS

SWEEP_FILE = "sweep.json"
_SHOWN_KEYS = 6  # keys named in one warning, then "and N more"


# --- configs as flat dotted keys -----------------------------------------------------------


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


@cache
def _defaults() -> dict[str, Any]:
    return flatten(config_to_dict(AQNConfig()))


@cache
def seed_keys() -> frozenset[str]:
    """trainer.seed and the keys the config derives from it (the noise seed when unset)."""
    try:
        one, two = (flatten(config_to_dict(load_config(None, [f"trainer.seed={s}"])))
                    for s in (1, 2))
    except Exception:  # noqa: BLE001 (a default config that fails to build: the seed alone)
        return frozenset({"trainer.seed"})
    return frozenset({"trainer.seed"} | {k for k in one if one[k] != two.get(k)})


def ignored_keys() -> frozenset[str]:
    """Keys in which runs pooled as seeds of one point may differ: the seed (and what it
    derives) and where the run lives (``aqn.rl.run_dir.RESUMABLE_KEYS``)."""
    return seed_keys() | frozenset(RESUMABLE_KEYS)


_UNSET = object()


def config_diff(a: RunData, b: RunData) -> dict[str, tuple[Any, Any]]:
    """key -> (a's value, b's value) for the config keys in which two runs differ, apart from
    ``ignored_keys``. A key one config lacks (an older aqn) counts as its default."""
    fa, fb, defaults, ignored = flatten(a.config), flatten(b.config), _defaults(), ignored_keys()
    out = {}
    for k in sorted(fa.keys() | fb.keys()):
        va, vb = fa.get(k, defaults.get(k, _UNSET)), fb.get(k, defaults.get(k, _UNSET))
        if k not in ignored and va != vb:
            out[k] = (va, vb)
    return out


def inputs_diff(a: RunData, b: RunData, differing: Iterable[str]) -> list[str]:
    """The inputs.json fingerprints in which two runs differ where their configs say they
    should not: the data when no data.* key differs; the initial weights when the runs share
    a seed (random init and LoRA adapters are drawn from it) and no actor_rollout_ref.model.*
    or actor_rollout_ref.actor.* key differs. Unknown (no inputs.json) counts as agreeing."""
    if a.inputs is None or b.inputs is None:
        return []
    if a.inputs.get("hash_version") != b.inputs.get("hash_version"):
        return []
    differing = list(differing)
    same_data = not any(k.startswith("data.") for k in differing)
    same_model = a.seed == b.seed and not any(
        k.startswith(("actor_rollout_ref.model.", "actor_rollout_ref.actor.")) for k in differing)
    checked = [k for k in FINGERPRINTS if (k == "model" and same_model)
               or (k != "model" and same_data)]
    return [k for k in checked if k in a.inputs and k in b.inputs
            and a.inputs[k] != b.inputs[k]]


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def describe(diff: dict[str, tuple[Any, Any]], inputs: Sequence[str] = (),
             a: RunData | None = None, b: RunData | None = None) -> str:
    """``data.max_val_samples (400 vs 200), inputs.val_data (sha256 1a2b.. vs 9f8e..)``."""
    parts = [f"{k} ({_show(va)} vs {_show(vb)})" for k, (va, vb) in diff.items()]
    for k in inputs:
        sha = ("", "") if a is None or b is None else (
            str(a.inputs[k])[:12], str(b.inputs[k])[:12])  # type: ignore[index]
        parts.append(f"inputs.{k} (sha256 {sha[0]} vs {sha[1]})")
    more = len(parts) - _SHOWN_KEYS
    return ", ".join(parts[:_SHOWN_KEYS]) + (f" and {more} more" if more > 0 else "")


# --- each run's own files ------------------------------------------------------------------


def _metrics_problem(run: RunData) -> str | None:
    """The first metrics row whose step does not follow the one before it."""
    prev = None
    lines = run.metric_lines or list(range(1, len(run.metrics) + 1))
    for lineno, row in zip(lines, run.metrics, strict=True):
        step = row["step"]
        if not isinstance(step, int) or isinstance(step, bool):
            return f"{run.path / 'metrics.jsonl'} line {lineno}: step {step!r} is not an integer"
        if prev is not None and step <= prev:
            what = "repeats" if step == prev else "comes after"
            return (f"{run.path / 'metrics.jsonl'} line {lineno}: step {step} {what} step {prev}"
                    " (steps must increase strictly: two processes wrote this run at once, or "
                    "its rows were appended twice)")
        prev = step
    return None


def _val_problems(run: RunData) -> list[str]:
    """Per-item validation files against the size of the validation set and the metrics."""
    problems = []
    n = int(run.setting("actor_rollout_ref.rollout.val_kwargs.n", 1))
    counts = {step: len(items) for step, items in run.val.items()}
    n_val = (run.inputs or {}).get("n_val")
    if n_val is not None:
        expected = int(n_val) * n
        problems += [f"val/step_{s}.jsonl has {c} items, its inputs.json says {n_val} "
                     f"validation records x val_kwargs.n {n} = {expected}"
                     for s, c in counts.items() if c != expected]
    else:  # a run from before inputs.json: its files must agree, and within the config's cap
        cap = run.setting("data.max_val_samples")
        if cap is not None:
            problems += [f"val/step_{s}.jsonl has {c} items, more than data.max_val_samples "
                         f"{cap} x val_kwargs.n {n}" for s, c in counts.items() if c > cap * n]
        if len(set(counts.values())) > 1:
            problems.append("its validation files hold different numbers of items ("
                            + ", ".join(f"step_{s}: {c}" for s, c in counts.items()) + ")")
    if run.data_source is None:
        return problems
    for what, field in (("acc", "correct"), ("reward", "score")):
        metric = keys.val_core(run.data_source, what, n)
        logged = run.series(metric)
        for step, items in run.val.items():
            if step not in logged or not items or any(field not in it for it in items):
                continue
            mean = sum(float(it[field]) for it in items) / len(items)
            if not math.isclose(mean, logged[step], rel_tol=1e-9, abs_tol=1e-12):
                problems.append(f"val/step_{step}.jsonl gives {what} {mean:.6g} over its "
                                f"{len(items)} items, metrics.jsonl says {logged[step]:.6g} "
                                f"({metric})")
    return problems


def file_problems(run: RunData) -> list[str]:
    """What in the run's files disagrees with what the run says it wrote; [] for none."""
    if run.logged_by != "aqn":
        return []
    problem = _metrics_problem(run)
    if problem is not None:  # rows of two writers: the rest would be read from a mix
        return [problem]
    return _val_problems(run)


# --- the seeds pooled into one point ------------------------------------------------------


def _pool(runs: list[RunData]) -> tuple[list[RunData], list[str]]:
    """The runs of one point that agree with each other, and a warning per other run.

    Runs are split into classes that agree on config and inputs; the largest is kept (on a
    tie, the one holding the first run by seed), the others are left out.
    """
    classes: list[list[RunData]] = []
    for r in runs:
        for c in classes:
            diff = config_diff(c[0], r)
            if not diff and not inputs_diff(c[0], r, diff):
                c.append(r)
                break
        else:
            classes.append([r])
    kept = max(classes, key=len)  # the first of the largest: max keeps the first on ties
    warnings = []
    for c in classes:
        if c is kept:
            continue
        diff = config_diff(kept[0], c[0])
        inputs = inputs_diff(kept[0], c[0], diff)
        tie = " (as many runs as those kept: the kept ones hold the lowest seed)" \
            if len(c) == len(kept) else ""
        warnings.append(
            f"{', '.join(f'{r.name} ({r.path})' for r in c)} left out of point {c[0].point}: "
            f"it differs from the run(s) pooled there ({', '.join(r.name for r in kept)})"
            f"{tie} in {describe(diff, inputs, kept[0], c[0])} (kept vs left out); seeds of "
            "one point must differ in nothing but the seed.")
    return kept, warnings


def check_runs(runs: Sequence[RunData]) -> tuple[list[RunData], list[str]]:
    """The runs the report may compare, and a warning for each one left out.

    A run is left out when a file of it disagrees with what it says it wrote
    (``file_problems``), or when it differs from the other seeds of its point in config or
    inputs (``_pool``). The order of ``runs`` is kept.
    """
    warnings, sound = [], []
    for r in runs:
        problems = file_problems(r)
        if problems:
            warnings.append(f"run {r.name} ({r.path}) left out of the comparisons: "
                            + "; ".join(problems) + ".")
        else:
            sound.append(r)
    keep = {id(r) for r in sound if r.logged_by != "aqn"}
    points: dict[str, list[RunData]] = {}
    for r in sound:
        if r.logged_by == "aqn":
            points.setdefault(r.point, []).append(r)
    for point_runs in points.values():
        kept, pool_warnings = _pool(point_runs)
        keep.update(id(r) for r in kept)
        warnings += pool_warnings
    return [r for r in sound if id(r) in keep], warnings


# --- comparisons across points -------------------------------------------------------------


def _sweep_of(run: RunData) -> Path | None:
    path = run.path.parent / SWEEP_FILE
    return path if path.is_file() else None


def _overrides(sweep: dict[str, Any], run: RunData) -> list[str]:
    """The overrides a sweep gave ``run`` beyond its global ones: its variant's and its
    dose's."""
    out = list((sweep.get("variants") or {}).get(run.variant) or [])
    family = (sweep.get("doses") or {}).get(run.family) if run.family is not None else None
    if family:
        out += list(family.get("overrides") or [])
        out += [f"{k}={run.dose}" for k in family.get("keys") or []]
    return out


@cache
def _built(base: str | None, overrides: tuple[str, ...]) -> dict[str, Any]:
    return flatten(config_to_dict(load_config(base, overrides)))


def sweep_set_apart(sweep: dict[str, Any], a: RunData, b: RunData) -> set[str]:
    """The config keys a sweep sets differently for the points of ``a`` and ``b``: those of
    the two configs built from its base, each with its own overrides (with what the config
    derives from them: a noise preset's sigmas), and the keys the overrides name. When the
    base cannot be built here, a key in the section of an override's key counts as set."""
    own = [_overrides(sweep, a), _overrides(sweep, b)]
    named = set()
    for text in own[0] + own[1]:
        try:
            named.update(t.split("=", 1)[0].strip() for t in expand_shorthand(text))
        except Exception:  # noqa: BLE001 (an override this aqn no longer parses)
            named.add(text.split("=", 1)[0].strip())
    try:
        built = [_built(sweep.get("base"), (*(sweep.get("overrides") or []), *overrides))
                 for overrides in own]
    except Exception:  # noqa: BLE001 (a base file that moved, an override no longer valid)
        sections = {k.rsplit(".", 1)[0] + "." for k in named if "." in k}
        return named | {k for k in flatten(a.config) | flatten(b.config)
                        if k.startswith(tuple(sections))}
    return named | {k for k in built[0].keys() | built[1].keys()
                    if built[0].get(k) != built[1].get(k)}


def check_comparisons(pairs: Iterable[tuple[dict[int, RunData], dict[int, RunData]]]
                      ) -> tuple[list[list[str]], list[str]]:
    """For each compared pair of groups (the point, then its reference): a row (point,
    reference, the config keys their first runs differ in) and warnings.

    Warned: inputs that differ where the configs agree (``inputs_diff``, at any seed the two
    share), and, when both points come from one sweep (its sweep.json beside them), config
    keys the sweep did not set apart for them: a copied run dir, a changed default.
    """
    rows, warnings = [], []
    sweeps: dict[Path, dict[str, Any]] = {}
    for runs, ref_runs in pairs:
        b, a = next(iter(runs.values())), next(iter(ref_runs.values()))
        if a.logged_by != "aqn" or b.logged_by != "aqn":
            continue
        diff = config_diff(a, b)
        rows.append([b.point, a.point, ", ".join(diff) or "none"])
        problems = []
        for seed in sorted(set(runs) & set(ref_runs)) or [None]:
            x, y = (a, b) if seed is None else (ref_runs[seed], runs[seed])
            inputs = inputs_diff(x, y, config_diff(x, y))
            if inputs:
                problems.append(f"their inputs.json differ in {describe({}, inputs, x, y)} "
                                f"({x.name} vs {y.name}) though their configs say the "
                                "inputs are the same")
                break
        where = _sweep_of(a)
        if where is not None and where == _sweep_of(b):
            if where not in sweeps:
                try:
                    sweeps[where] = json.loads(where.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    sweeps[where] = {}
            extra = {k: v for k, v in diff.items()
                     if k not in sweep_set_apart(sweeps[where], a, b)}
            if extra:
                problems.append(f"their configs differ in {describe(extra)} ({a.name} vs "
                                f"{b.name}), which {where} does not set apart for them")
        if problems:
            warnings.append(f"comparison {b.point} vs {a.point}: " + "; ".join(problems)
                            + ": the difference is not only the variant's.")
    return rows, warnings
