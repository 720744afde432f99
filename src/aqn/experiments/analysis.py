"""What the report concludes from the runs: each variant's accuracy, the significance test
that decides a comparison, whether the baseline learned, and runs whose AQN noise was not
applied. Statistics only; ``aqn.experiments.report`` renders them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from aqn import metric_keys as keys
from aqn.errors import InputError
from aqn.experiments.render import fmt_p, fmt_pct, fmt_pts, fmt_steps
from aqn.experiments.runs import RunData
from aqn.experiments.stats import (
    ALPHA,
    MAX_SEEDS,
    POWER,
    BootstrapResult,
    SeedTestResult,
    accuracy_se,
    avg,
    mcnemar,
    mcnemar_mde,
    mean_curve,
    paired_bootstrap,
    seed_test,
    seeds_needed,
)

# The effect a comparison should be able to detect (points) before "no effect" is a verdict:
# the seed's follow-up states its own CI as +-2.5 points; `aqn report --mde` changes it.
TARGET_MDE_POINTS = 2.5


def machine_label(machine: dict) -> str:
    if not machine:
        return "unknown (no machine.json)"
    return (
        f"{machine.get('device', '?')} / {machine.get('cpu', '?')} / "
        f"{machine.get('threads', '?')} threads"
    )


# --- the final/peak table -----------------------------------------------------------------


@dataclass
class HeadlineRow:
    """One variant in the final/peak table. Accuracies and deltas are fractions (0-1)."""

    variant: str
    n_seeds: int
    final_steps: list[int]  # the distinct final validation steps of its runs
    final_mean: float | None
    peak_mean: float | None  # the highest point of the seed-mean accuracy curve
    peak_step: int | None
    # Mean over paired seeds of (variant - baseline) at the last validation step both
    # runs reached (final_mean - baseline final_mean without paired seeds); None for
    # the baseline.
    delta: float | None
    compared_steps: list[int]  # the steps `delta` and the tests compare at
    n_items: int | None  # validation items per run
    se: float | None  # SE of one accuracy at final_mean on n_items
    p_mcnemar: float | None  # McNemar on the paired items of all paired seeds
    p_mcnemar_by_seed: dict[int, float] = field(default_factory=dict)
    bootstrap: BootstrapResult | None = None
    seeds: SeedTestResult | None = None
    p_seeds: float | None = None
    p_value: float | None = None  # the p that decides `significant`
    test: str = ""  # which test decided
    significant: bool | None = None  # None for the baseline or when nothing is testable
    against: str = ""  # the group it is compared with
    # Minimal detectable effect of the deciding test (80 % power, alpha 0.05), a fraction,
    # and the spread it comes from (sd of the per-seed differences; None for McNemar).
    mde: float | None = None
    seed_sd: float | None = None

    def ci(self) -> tuple[float, float] | None:
        """95 % interval of ``delta`` from the deciding test: the seeds' t interval, or the
        items' bootstrap with one seed."""
        if self.seeds is not None and self.seeds.ci_low is not None:
            return self.seeds.ci_low, self.seeds.ci_high
        if self.bootstrap is not None and self.p_value is not None:
            return self.bootstrap.ci_low, self.bootstrap.ci_high
        return None


def first_run(runs: dict[int, RunData]) -> RunData:
    """A group's first run: what its seeds share (variant, family, dose, config)."""
    return next(iter(runs.values()))


def clean_points(groups: dict[str, dict[int, RunData]]) -> dict[str, dict[int, RunData]]:
    """The groups at a variant's clean point (no dose of a dose sweep)."""
    return {p: g for p, g in groups.items() if first_run(g).family is None}


def training_mean(runs: dict[int, RunData], key: str) -> float | None:
    """Mean of ``key`` over each run's steps, then over the runs that logged it."""
    return avg(m for r in runs.values() if (m := avg(r.series(key).values())) is not None)


def by_seed(runs: Iterable[RunData]) -> dict[int, RunData]:
    """seed -> run; with duplicates (same variant and seed) the first in sort order wins."""
    out: dict[int, RunData] = {}
    for r in runs:
        out.setdefault(r.seed, r)
    return out


def variant_row(variant: str, runs: dict[int, RunData]) -> HeadlineRow:
    scored = [r for r in runs.values() if r.accuracy]
    final_mean = avg(r.accuracy[r.final_step] for r in scored)
    # Peak of the seed-mean curve, over steps every seed reached (max of means, not mean
    # of maxima: picking each seed's best step would inflate the peak).
    complete = mean_curve(
        {s: a for s, a in r.accuracy.items() if all(s in o.accuracy for o in scored)}
        for r in scored
    )
    peak_step = max(complete, key=lambda s: complete[s]) if complete else None
    n_items = next((len(r.val[r.final_step]) for r in scored if r.final_step in r.val), None)
    se = accuracy_se(final_mean, n_items) if final_mean is not None and n_items else None
    return HeadlineRow(
        variant=variant,
        n_seeds=len(runs),
        final_steps=sorted({r.final_step for r in scored}),
        final_mean=final_mean,
        peak_mean=complete[peak_step] if peak_step is not None else None,
        peak_step=peak_step,
        delta=None,
        compared_steps=[],
        n_items=n_items,
        se=se,
        p_mcnemar=None,
    )


def deciding_test(seeds: SeedTestResult, p_mcnemar: float | None) -> tuple[float | None, str]:
    """(p, test name) of the test that decides significance.

    Seeds carry training noise as well as item noise, so they decide when there are two or
    more; one seed can only show that two checkpoints differ on these items.
    """
    if seeds.p_value is not None:
        return seeds.p_value, f"paired t-test over {seeds.n_seeds} seeds"
    if seeds.n_seeds >= 2:
        # items alone would ignore training noise: say that nothing can be concluded
        return None, f"{seeds.method}; add seeds"
    if p_mcnemar is not None:
        return p_mcnemar, "McNemar over items of one seed"
    return None, "no test possible (one seed and no per-item results)"


def compare(row: HeadlineRow, base: HeadlineRow, a_runs: dict[int, RunData],
             b_runs: dict[int, RunData]) -> None:
    """Fill ``row`` (variant b) with its comparison against the baseline (a).

    Seed s of the variant is paired with seed s of the baseline, at the last validation
    step both runs reached; items are paired by id.
    """
    a_final: dict[int, float] = {}
    b_final: dict[int, float] = {}
    a_correct: list[bool] = []
    b_correct: list[bool] = []
    item_scores: dict[str, list[tuple[float, float]]] = {}
    for seed in sorted(set(a_runs) & set(b_runs)):
        a, b = a_runs[seed], b_runs[seed]
        common = set(a.accuracy) & set(b.accuracy)
        if not common:
            continue
        step = max(common)
        row.compared_steps = sorted({*row.compared_steps, step})
        a_final[seed], b_final[seed] = a.accuracy[step], b.accuracy[step]
        if step not in a.val or step not in b.val:
            continue
        b_items = {it["id"]: it for it in b.val[step]}
        pairs = [(it, b_items[it["id"]]) for it in a.val[step] if it["id"] in b_items]
        if not pairs:
            continue
        ac = [bool(x["correct"]) for x, _ in pairs]
        bc = [bool(y["correct"]) for _, y in pairs]
        row.p_mcnemar_by_seed[seed] = mcnemar(ac, bc).p_value
        a_correct += ac
        b_correct += bc
        for x, y in pairs:
            item_scores.setdefault(x["id"], []).append((float(x["score"]), float(y["score"])))
    row.against = base.variant
    if a_correct:
        row.p_mcnemar = mcnemar(a_correct, b_correct).p_value
        # Bootstrap over items with each item's scores averaged over seeds: the same item
        # in two seeds is not an independent draw, so items (not item-seed pairs) resample.
        a_mean = [np.mean([s[0] for s in v]) for v in item_scores.values()]
        b_mean = [np.mean([s[1] for s in v]) for v in item_scores.values()]
        row.bootstrap = paired_bootstrap(a_mean, b_mean)
    row.seeds = seed_test(a_final, b_final)
    row.p_seeds = row.seeds.p_value
    if row.seeds.mean_diff is not None:
        row.delta = row.seeds.mean_diff
    elif row.final_mean is not None and base.final_mean is not None:
        row.delta = row.final_mean - base.final_mean
    row.p_value, row.test = deciding_test(row.seeds, row.p_mcnemar)
    if row.p_value is not None:
        row.significant = row.p_value < ALPHA
    if row.seeds.p_value is not None:
        row.mde, row.seed_sd = row.seeds.mde, row.seeds.sd
    elif row.p_value is not None:  # McNemar over one seed's items
        discordant = sum(x != y for x, y in zip(a_correct, b_correct, strict=True))
        if discordant:
            row.mde = mcnemar_mde(discordant / len(a_correct), len(a_correct))


def power_verdict(row: HeadlineRow, target_points: float = TARGET_MDE_POINTS) -> str:
    """What a comparison that is not significant rules out: "no effect larger than X
    points" when its MDE is within ``target_points``, else "undetermined" with the seeds that
    would detect ``target_points`` (from the observed seed-to-seed spread)."""
    if row.mde is None:
        return "undetermined: no spread to compute a minimal detectable effect from (add seeds)"
    mde = 100 * row.mde
    if mde <= target_points:
        return (f"no effect larger than {mde:.1f} points (MDE at {POWER:.0%} power, "
                f"alpha {ALPHA})")
    if row.seed_sd is None or row.seed_sd == 0:
        more = "add seeds: one seed cannot separate training noise from an effect"
    else:
        n = seeds_needed(100 * row.seed_sd, target_points)
        spread = f"sd {100 * row.seed_sd:.1f} points over {row.n_seeds} seeds"
        more = (f"about {n} seeds would detect {target_points:g} points at the spread seen "
                f"here ({spread})" if n else
                f"more than {MAX_SEEDS} seeds would be needed for {target_points:g} points")
    return f"undetermined: it could miss effects up to {mde:.1f} points (MDE); {more}"


# --- did the baseline learn? -------------------------------------------------------------


@dataclass
class LearningResult:
    """The baseline's final accuracy against the base model's (its step-0 validation)."""

    variant: str
    base_step: int
    base_mean: float | None  # accuracy at base_step, mean over seeds (a fraction)
    final_mean: float | None
    delta: float | None  # mean over seeds of final - base
    seeds: SeedTestResult | None
    p_mcnemar: float | None  # pooled over the items of every seed
    p_value: float | None  # the p that decides `learned`
    test: str
    learned: bool | None  # None: nothing testable (no step-0 validation, one seed, ...)

    def sentence(self) -> str:
        if self.delta is None:
            return (f"Did the baseline ({self.variant}) learn? Cannot tell: its runs have no "
                    "validation of the base model (trainer.val_before_train) and a later one.")
        verdict = {True: "learned", False: "did NOT learn significantly",
                   None: "cannot be judged"}[self.learned]
        mde = self.seeds.mde if self.seeds is not None else None
        power = "" if mde is None else f", MDE {100 * mde:.1f} points"
        return (f"Baseline ({self.variant}) {verdict}: {fmt_pts(self.delta)} points over the base "
                f"model ({fmt_pct(self.base_mean)} % at step {self.base_step} -> "
                f"{fmt_pct(self.final_mean)} % final), {self.test}, p = {fmt_p(self.p_value)}"
                f"{power}; McNemar over items p = {fmt_p(self.p_mcnemar)}.")


def learning_result(variant: str, runs: dict[int, RunData]) -> LearningResult:
    """Paired over seeds (each run's final validation against its own step-0 one), as the
    variant comparisons are: the seeds carry the training noise."""
    base_acc, final_acc, base_ok, final_ok = {}, {}, [], []
    base_step = min((min(r.accuracy) for r in runs.values() if r.accuracy), default=0)
    for seed, r in runs.items():
        if base_step not in r.accuracy or r.final_step in (None, base_step):
            continue
        base_acc[seed], final_acc[seed] = r.accuracy[base_step], r.accuracy[r.final_step]
        before = {it["id"]: bool(it["correct"]) for it in r.val.get(base_step, [])}
        for it in r.val.get(r.final_step, []):
            if it["id"] in before:
                base_ok.append(before[it["id"]])
                final_ok.append(bool(it["correct"]))
    p_mcnemar = mcnemar(base_ok, final_ok).p_value if base_ok else None
    if not base_acc:
        return LearningResult(variant, base_step, None, None, None, None, p_mcnemar, None,
                              "n/a", None)
    seeds = seed_test(base_acc, final_acc)
    p_value, test = deciding_test(seeds, p_mcnemar)
    delta = avg(final_acc[s] - base_acc[s] for s in base_acc)
    return LearningResult(
        variant, base_step, avg(base_acc.values()), avg(final_acc.values()), delta, seeds,
        p_mcnemar, p_value, test, None if p_value is None else p_value < ALPHA and delta > 0)


def reference_of(point: str, groups: dict[str, dict[int, RunData]], baseline: str) -> str:
    """The group ``point`` is compared with: the baseline at the same dose of a dose sweep
    (the effect of a variant there), and the baseline's clean point for the baseline at a dose
    (the cost of the dose) and for every clean point."""
    run, base_variant = first_run(groups[point]), first_run(groups[baseline]).variant
    if run.family is None or run.variant == base_variant:
        return baseline
    return next((p for p, runs in groups.items() if (r := first_run(runs)).variant
                 == base_variant and (r.family, r.dose) == (run.family, run.dose)), baseline)


@dataclass
class Comparisons:
    """The runs grouped by point (a variant, or a variant at one dose), the baseline first,
    and each group's row compared with its reference (``reference_of``)."""

    groups: dict[str, dict[int, RunData]]
    baseline: str | None
    rows: list[HeadlineRow]


def compare_points(runs: Iterable[RunData], baseline: str | None = None) -> Comparisons:
    runs = list(runs)
    points = sorted({r.point for r in runs})
    groups = {p: by_seed(r for r in runs if r.point == p) for p in points}
    if not groups:
        return Comparisons({}, None, [])
    base = pick_baseline(clean_points(groups) or groups, baseline)
    groups = {base: groups[base], **{v: g for v, g in groups.items() if v != base}}
    rows = [variant_row(v, g) for v, g in groups.items()]
    by_point = {r.variant: r for r in rows}
    for row in rows[1:]:
        ref = reference_of(row.variant, groups, base)
        compare(row, by_point[ref], groups[ref], groups[row.variant])
    return Comparisons(groups, base, rows)


def pick_baseline(groups: dict[str, dict[int, RunData]], requested: str | None) -> str:
    if requested is not None:
        if requested not in groups:
            raise InputError(
                f"baseline {requested!r} is not among the variants with usable runs: "
                f"{', '.join(groups) or 'none'}"
            )
        return requested
    if "baseline" in groups:
        return "baseline"
    for variant, runs in groups.items():
        if not any(r.aqn_enabled for r in runs.values()):
            return variant
    return next(iter(groups))


def noise_warnings(runs: Iterable[RunData]) -> list[str]:
    """Runs whose config enables AQN but whose metrics show no effective noise."""
    warnings = []
    for r in runs:
        rows = r.training_rows()
        if not r.aqn_enabled or not rows:
            continue
        if not any(k.startswith("aqn/") for row in rows for k in row):
            warnings.append(
                f"run {r.name} ({r.path}): AQN is enabled in its config but no step has "
                "aqn/* metrics: the noise was never applied or never measured."
            )
            continue
        noisy = [row for row in rows if (row.get(keys.AQN_SIGMA) or 0) > 0]
        if not noisy:
            warnings.append(
                f"run {r.name} ({r.path}): AQN is enabled but aqn/sigma is 0 at every one of "
                f"its {len(rows)} steps (the schedule never left its warm-up): the run had no "
                "noise.")
            continue
        unflagged = [row["step"] for row in noisy if row.get(keys.AQN_SWALLOWED) is None]
        if unflagged:
            warnings.append(
                f"run {r.name} ({r.path}): steps {fmt_steps(unflagged)} have aqn/sigma > 0 "
                f"but no {keys.AQN_SWALLOWED} flag (a run from an aqn before the flag was "
                "logged): whether the cast swallowed the noise is unknown.")
        # The injector decides (and warns at train time); the report reads its flag.
        swallowed = [row["step"] for row in noisy if row.get(keys.AQN_SWALLOWED)]
        if swallowed:
            warnings.append(
                f"run {r.name} ({r.path}): AQN noise was swallowed by the cast to the weight "
                f"dtype ({keys.AQN_SWALLOWED} = 1: most elements unchanged, or less than half "
                f"the drawn std left) at steps {fmt_steps(swallowed)} "
                f"({len(swallowed)} of {len(rows)} steps)."
            )
    return warnings
