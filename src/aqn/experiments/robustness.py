"""Robustness curves of a dose sweep: final accuracy against the measured rollout-vs-training
mismatch as a perturbation grows, one line per variant, and what each comparison can detect.

The x-axis is the baseline's mean |Δlogp| per token at each dose, averaged over the training
steps (then seeds): the mismatch the policy trained under, which a user can measure on real
hardware too (``aqn mismatch``, verl's ``rollout_corr/*``). The baseline's, because a
variant such as AQN adds its own noise to the rollout and so its own mismatch (its figure is
in the table and in summary.json). The training mean rather than the first step's: the
mismatch moves as the policy sharpens, and the first step's is shown beside it.

Each final policy is validated twice: where it runs (the perturbed engine) and clean
(``val-clean/*``). The gap between them is what the perturbation costs at evaluation; the
clean accuracy against the clean point is what training under the mismatch did to the
policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sps

from aqn import metric_keys as keys
from aqn.experiments.analysis import (
    TARGET_MDE_POINTS,
    HeadlineRow,
    first_run,
    power_verdict,
    training_mean,
)
from aqn.experiments.render import Block, Heading, Image, Table, Text, fmt_p, fmt_pct, fmt_pts
from aqn.experiments.runs import RunData, dose_label
from aqn.experiments.stats import ALPHA, SeedTestResult, avg, holm, seed_test
from aqn.numerics.published import PUBLISHED_MISMATCH

Groups = dict[str, dict[int, RunData]]
BAND_STYLE = {"gpu": "C2", "npu-fixed": "C4", "npu-naive": "C3"}
BAND_LABEL = {"gpu": "GPU vLLM vs FSDP", "npu-fixed": "Ascend, fixed port",
              "npu-naive": "Ascend, naive port"}


def first_step(runs: dict[int, RunData], key: str) -> float | None:
    """``key`` at each run's first training step, mean over seeds."""
    return avg(s[min(s)] for r in runs.values() if (s := r.series(key)))


def seed_mean_ci(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and the half width of its 95 % t interval (None with one value)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    half = float(sps.t.ppf(0.975, len(values) - 1)) * float(np.std(values, ddof=1))
    return mean, half / math.sqrt(len(values))


def last_quarter_slope(runs: dict[int, RunData]) -> tuple[float | None, float | None]:
    """Slope of the seed-mean accuracy of the sampled completions (critic/acc/mean) over
    the last quarter of the training steps, in points per 10 steps, and its p-value: whether
    the runs had stopped improving."""
    curves = [r.series(keys.SAMPLED_ACC) for r in runs.values()]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    tail = steps[len(steps) - max(3, len(steps) // 4):]
    if len(tail) < 3:
        return None, None
    y = [100 * avg(c[s] for c in curves) for s in tail]
    fit = sps.linregress(tail, y)
    return 10 * float(fit.slope), float(fit.pvalue)


def last_validation_change(runs: dict[int, RunData]) -> tuple[SeedTestResult | None, int]:
    """Change of the validation accuracy (where the policy runs) from each run's last but one
    validation to its final one, paired over seeds, and the steps between them: whether the
    final accuracy, the figure the curves plot, had stopped moving."""
    before, after, spans = {}, {}, set()
    for seed, r in runs.items():
        steps = sorted(s for s in r.accuracy if s <= (r.final_step or 0))
        if len(steps) >= 3:  # the step-0 validation of the base is not a training plateau
            before[seed], after[seed] = r.accuracy[steps[-2]], r.accuracy[steps[-1]]
            spans.add(steps[-1] - steps[-2])
    if len(before) < 2 or len(spans) != 1:
        return None, 0
    return seed_test(before, after), spans.pop()


def _validated_perturbed(run: RunData) -> bool:
    final = next((row for row in run.metrics if row["step"] == run.final_step), {})
    return any(k.startswith(f"{keys.VAL_AUX}perturb/") for k in final)


@dataclass
class Point:
    """One (variant, dose) of a family: its seeds' final accuracies and its mismatch."""

    label: str  # the report group, e.g. "AQN @ matmul=0.05"
    variant: str
    dose: float | str | None  # None: the clean point
    runs: dict[int, RunData]

    @property
    def final(self) -> list[float]:
        return [r.accuracy[r.final_step] for r in self.runs.values() if r.accuracy]

    @property
    def final_clean(self) -> list[float]:
        """Accuracy of each final policy with no perturbation: its val-clean figure, or its
        validation when no perturbation acted there (no val-aux/perturb/* metrics)."""
        out = []
        for r in self.runs.values():
            if r.final_step in r.clean_accuracy:
                out.append(r.clean_accuracy[r.final_step])
            elif r.accuracy and not _validated_perturbed(r):
                out.append(r.accuracy[r.final_step])
        return out

    @property
    def mismatch(self) -> float | None:
        return training_mean(self.runs, keys.ABS_LOGP_DIFF)


@dataclass
class Family:
    name: str
    points: list[Point]  # clean points and doses, every variant
    baseline: str  # the baseline variant's name

    def x(self, dose: float | str | None) -> float | None:
        """The axis: the baseline's training-mean mismatch at ``dose`` (0 when clean)."""
        if dose is None:
            return 0.0
        return next((p.mismatch for p in self.points
                     if p.variant == self.baseline and p.dose == dose), None)

    def doses(self) -> list[float | str | None]:
        """The clean point, then the doses in order of the mismatch they made."""
        found = list(dict.fromkeys(p.dose for p in self.points if p.dose is not None))
        return [None] + sorted(found, key=lambda d: (self.x(d) is None, self.x(d) or 0.0))

    def variants(self) -> list[str]:
        """The baseline and every variant run at one of the family's doses (a variant with
        only its clean point has no curve here)."""
        dosed = {p.variant for p in self.points if p.dose is not None}
        return list(dict.fromkeys(p.variant for p in self.points
                                  if p.variant == self.baseline or p.variant in dosed))

    def point(self, variant: str, dose: float | str | None) -> Point | None:
        return next((p for p in self.points if p.variant == variant and p.dose == dose), None)


def families(groups: Groups, baseline: str) -> list[Family]:
    """The dose families in ``groups``, each with every variant's clean point."""
    meta = {label: first_run(runs) for label, runs in groups.items()}
    base_variant = meta[baseline].variant
    clean = [Point(label, r.variant, None, groups[label]) for label, r in meta.items()
             if r.family is None]
    names = list(dict.fromkeys(r.family for r in meta.values() if r.family is not None))
    return [Family(name, clean + [Point(label, r.variant, r.dose, groups[label])
                                  for label, r in meta.items() if r.family == name],
                   base_variant) for name in names]


# --- the report section -------------------------------------------------------------------


def _comparison_cells(row: HeadlineRow | None, target: float) -> list[str]:
    if row is None or row.delta is None:
        return ["n/a", "n/a", "n/a", "n/a"]
    ci = row.ci()
    delta = fmt_pts(row.delta) + ("" if ci is None else f" [{fmt_pts(ci[0])}, {fmt_pts(ci[1])}]")
    mde = "n/a" if row.mde is None else f"{100 * row.mde:.1f}"
    if row.significant:
        verdict = "significant"
    elif row.significant is None:
        verdict = f"cannot be judged ({row.test})"
    else:
        verdict = power_verdict(row, target)
    return [delta, fmt_p(row.p_value), mde, verdict]


def _fmt_ci(mean: float | None, half: float | None) -> str:
    if mean is None:
        return "n/a"
    return fmt_pct(mean) + ("" if half is None else f" ± {100 * half:.1f}")


def _holm_significant(rows: list[HeadlineRow | None]) -> list[bool]:
    """Which of a family's tests stay significant after Holm's correction over them all (a
    family of 2-seed tests at alpha 0.05 finds an "effect" by chance otherwise)."""
    tested = [i for i, r in enumerate(rows) if r is not None and r.p_value is not None]
    adjusted = dict(zip(tested, holm([rows[i].p_value for i in tested]), strict=True))
    return [i in adjusted and adjusted[i] < ALPHA for i in range(len(rows))]


def cost_verdict(family: Family, rows: dict[str, HeadlineRow]) -> str:
    """One line: at which doses the perturbation costs the baseline (Holm-corrected over
    the family's doses), and what the others could have detected."""
    doses = [d for d in family.doses()[1:] if family.point(family.baseline, d)]
    costs = [rows.get(family.point(family.baseline, d).label) for d in doses]
    costly, rest = [], []
    for d, r, sig in zip(doses, costs, _holm_significant(costs), strict=True):
        if r is None or r.delta is None:
            continue
        if sig:
            costly.append(f"{dose_label(d)}: {fmt_pts(r.delta)} points, p={fmt_p(r.p_value)}")
        elif r.mde is not None:
            rest.append(f"{dose_label(d)}: MDE {100 * r.mde:.1f}")
    found = "; ".join(costly) if costly else "at no dose"
    return (f"Cost of {family.name} to {family.baseline} (Holm-corrected over {len(doses)} "
            f"doses): significant {found}" + (f"; not at {'; '.join(rest)}" if rest else "")
            + ".")


def family_verdict(family: Family, variant: str, rows: dict[str, HeadlineRow]) -> str:
    """One line: does ``variant`` flatten the family's curve, and the evidence. Costs and
    effects count as significant after Holm's correction over the family's doses."""
    doses = [d for d in family.doses()[1:]
             if family.point(family.baseline, d) and family.point(variant, d)]
    costs = [rows.get(family.point(family.baseline, d).label) for d in doses]
    effects = [rows.get(family.point(variant, d).label) for d in doses]
    costly = [dose_label(d) for d, r, sig in zip(doses, costs, _holm_significant(costs),
                                                  strict=True) if sig and r.delta < 0]
    helped, hurt, missed = [], [], []
    for d, r, sig in zip(doses, effects, _holm_significant(effects), strict=True):
        if r is None or r.delta is None:
            continue
        at = f"{family.name}={dose_label(d)}"
        if sig:
            (helped if r.delta > 0 else hurt).append(
                f"{at}: {fmt_pts(r.delta)} points, p={fmt_p(r.p_value)}")
        elif r.mde is not None:
            missed.append(f"{at}: MDE {100 * r.mde:.1f}"
                          + (f", p={fmt_p(r.p_value)} before correction"
                             if r.significant else ""))
    where = (f"the perturbation costs the baseline significantly at {', '.join(costly)}"
             if costly else "the perturbation never costs the baseline significantly")
    how = f" (Holm-corrected over {len(doses)} doses)"
    if hurt:
        return f"{variant} steepens the {family.name} curve{how}: {'; '.join(hurt)}; {where}."
    if helped:
        return f"{variant} flattens the {family.name} curve{how}: {'; '.join(helped)}; {where}."
    detail = (f"no dose shows a significant effect (what each could detect, points: "
              f"{'; '.join(missed)})" if missed else "no dose could be tested (add seeds)")
    return f"{variant} does not flatten the {family.name} curve{how}: {detail}; {where}."


def _axes(title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8))
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    ax = fig.add_subplot()
    for key, color in BAND_STYLE.items():
        band = PUBLISHED_MISMATCH[key]
        ax.axvspan(band.low, band.high, color=color, alpha=0.08, lw=0)
        ax.text(band.high, 0.01, BAND_LABEL[key], transform=ax.get_xaxis_transform(),
                ha="right", va="bottom", fontsize=7, color=color, rotation=90)
    ax.set_xlabel("mean |Δlogp| per token of the baseline, training mean "
                  "(rollout_corr/abs_logp_diff_mean)")
    ax.set_ylabel("final validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def _curve(ax, family: Family, variant: str, what: str, **style) -> None:
    xs, ys, errs = [], [], []
    for dose in family.doses():
        point, x = family.point(variant, dose), family.x(dose)
        mean, half = seed_mean_ci(getattr(point, what)) if point else (None, None)
        if mean is not None and x is not None:
            xs.append(x)
            ys.append(100 * mean)
            errs.append(100 * (half or 0.0))
    if xs:
        ax.errorbar(xs, ys, yerr=errs, marker="o", ms=4, capsize=3, **style)


def _save(fig, ax, path: Path) -> None:
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_family(path: Path, family: Family) -> None:
    """Final accuracy (seed mean, 95 % CI) against the baseline's mismatch: solid where the
    policy runs, dashed clean; the published mismatch bands shaded on the x-axis."""
    fig, ax = _axes(f"Robustness: {family.name} (seed mean, 95 % CI)")
    for i, variant in enumerate(family.variants()):
        _curve(ax, family, variant, "final", color=f"C{i}", ls="-",
               label=f"{variant} (where it runs)")
        _curve(ax, family, variant, "final_clean", color=f"C{i}", ls="--",
               label=f"{variant} (clean)")
    _save(fig, ax, path)


def plot_families(path: Path, families: list[Family]) -> None:
    """The baseline of every family on one mismatch axis: at equal measured mismatch, do
    the perturbations cost the same accuracy?"""
    fig, ax = _axes("Baseline, every family (where it runs; seed mean, 95 % CI)")
    for i, family in enumerate(families):
        _curve(ax, family, family.baseline, "final", color=f"C{i}", label=family.name)
    _save(fig, ax, path)


def robustness_section(groups: Groups, baseline: str, rows: dict[str, HeadlineRow],
                       out_dir: Path, target: float = TARGET_MDE_POINTS) -> list[Block]:
    """Section 2b: per family, the curve, a table of its points and one of its comparisons,
    and one verdict line per variant."""
    fams = families(groups, baseline)
    if not fams:
        return []
    blocks: list[Block] = [
        Heading("2b. Robustness curves"),
        Text("Final validation accuracy against the mismatch each dose made: the baseline's "
             "mean |Δlogp| per token over its training steps (the mismatch its policy trained "
             "under; a variant's own, which includes its own noise, is in the table). "
             "Accuracy where the policy runs (the perturbed engine) and clean: the clean "
             "accuracy against the clean point is what training under the mismatch did to the "
             "policy, the gap between the two what the perturbation costs where it runs. "
             "Cost: the baseline at a dose against the baseline clean. Effect: a variant "
             "against the baseline at the same dose (paired over seeds). Shaded: the "
             "published bands (GPU vLLM vs FSDP 0.011-0.025, Ascend after the fix "
             "0.014-0.039, naive port 0.075-0.178). Converged: the validation accuracy "
             "from the last but one validation to the final one, paired over seeds; "
             "still moving when that change is significant (then more steps would move the "
             "curve). The sampled accuracy's slope over the last quarter is shown beside it: "
             "it keeps rising while the policy sharpens on its own samples, even where the "
             "greedy validation has stopped moving."),
    ]
    if len(fams) > 1:
        plot_families(out_dir / "robustness_families.png", fams)
        blocks += [Text("Every family's baseline on one axis (where it runs): at equal "
                        "measured mismatch, do the perturbations cost the same accuracy?"),
                   Image("robustness_families.png", "baseline: final accuracy against the "
                         "measured mismatch, one line per family")]
    for family in fams:
        file = f"robustness_{family.name}.png"
        plot_family(out_dir / file, family)
        points_rows, comparison_rows = [], []
        for dose in family.doses():
            for variant in family.variants():
                point = family.point(variant, dose)
                if point is None:
                    continue
                slope, p_slope = last_quarter_slope(point.runs)
                rising = "n/a" if slope is None else (
                    f"{slope:+.2f}/10 steps" + (" (still rising)" if p_slope < ALPHA and slope > 0
                                                else ""))
                change, span = last_validation_change(point.runs)
                settled = "n/a" if change is None or change.mean_diff is None else (
                    f"{fmt_pts(change.mean_diff)} over {span} steps, p={fmt_p(change.p_value)}"
                    + (" (still moving)" if change.p_value is not None
                       and change.p_value < ALPHA else ""))
                figures = ((point.mismatch, ".4f"),
                           (first_step(point.runs, keys.ABS_LOGP_DIFF), ".4f"),
                           (training_mean(point.runs, keys.ROLLOUT_KL), ".2e"))
                points_rows.append([
                    dose_label(dose), variant, str(len(point.runs)),
                    *("n/a" if x is None else format(x, spec) for x, spec in figures),
                    _fmt_ci(*seed_mean_ci(point.final)),
                    _fmt_ci(*seed_mean_ci(point.final_clean)), settled, rising])
                if dose is None:
                    continue
                what = (f"cost: {variant} vs clean" if variant == family.baseline
                        else f"effect of {variant}")
                comparison_rows.append([dose_label(dose), what]
                                       + _comparison_cells(rows.get(point.label), target))
        blocks += [
            Heading(f"Robustness: {family.name}", 3),
            Image(file, f"{family.name}: final accuracy against the measured mismatch"),
            Table(["dose", "variant", "seeds", "|Δlogp| train mean", "|Δlogp| step 1",
                   "rollout_corr/kl", "final acc % where it runs (95 % CI)",
                   "final acc % clean (95 % CI)", "val acc change to the end (points)",
                   "sampled acc slope, last quarter"],
                  points_rows),
            Table(["dose", "comparison", "Δ points [95 % CI]", "p", "MDE (points)",
                   "verdict"], comparison_rows),
        ]
        blocks += [Text(cost_verdict(family, rows))]
        blocks += [Text(family_verdict(family, v, rows))
                   for v in family.variants() if v != family.baseline]
    return blocks
