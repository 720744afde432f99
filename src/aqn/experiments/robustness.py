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
from aqn.experiments.analysis import TARGET_MDE_POINTS, HeadlineRow, power_verdict
from aqn.experiments.render import Block, Heading, Image, Table, Text, fmt_p, fmt_pct, fmt_pts
from aqn.experiments.runs import RunData
from aqn.experiments.stats import ALPHA, avg
from aqn.numerics.published import PUBLISHED_MISMATCH

Groups = dict[str, dict[int, RunData]]
BAND_STYLE = {"gpu": "C2", "npu-fixed": "C4", "npu-naive": "C3"}
BAND_LABEL = {"gpu": "GPU vLLM vs FSDP", "npu-fixed": "Ascend, fixed port",
              "npu-naive": "Ascend, naive port"}


def _first(runs: dict[int, RunData]) -> RunData:
    return next(iter(runs.values()))


def training_mean(runs: dict[int, RunData], key: str) -> float | None:
    """Mean of ``key`` over each run's training steps, then over its seeds."""
    return avg(m for r in runs.values() if (m := avg(r.series(key).values())) is not None)


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
        """Accuracy of each final policy with no perturbation (at the clean point or where
        validation was clean anyway, that is its accuracy)."""
        out = []
        for r in self.runs.values():
            if r.final_step in r.clean_accuracy:
                out.append(r.clean_accuracy[r.final_step])
            elif r.accuracy and (self.dose is None or not r.clean_accuracy):
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
        return list(dict.fromkeys(p.variant for p in self.points))

    def point(self, variant: str, dose: float | str | None) -> Point | None:
        return next((p for p in self.points if p.variant == variant and p.dose == dose), None)


def families(groups: Groups, baseline: str) -> list[Family]:
    """The dose families in ``groups``, each with every variant's clean point."""
    meta = {label: _first(runs) for label, runs in groups.items()}
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


def family_verdict(family: Family, variant: str, rows: dict[str, HeadlineRow]) -> str:
    """One line: does ``variant`` flatten the family's curve, and the evidence."""
    costly, helped, hurt, missed = [], [], [], []
    for dose in family.doses()[1:]:
        base, point = family.point(family.baseline, dose), family.point(variant, dose)
        if base is None or point is None:
            continue
        cost, effect = rows.get(base.label), rows.get(point.label)
        if cost is not None and cost.significant and (cost.delta or 0) < 0:
            costly.append(dose)
        if effect is None or effect.delta is None:
            continue
        at = f"{family.name}={_dose(dose)}"
        if effect.significant:
            (helped if effect.delta > 0 else hurt).append(
                f"{at}: {fmt_pts(effect.delta)} points, p={fmt_p(effect.p_value)}")
        elif effect.mde is not None:
            missed.append(f"{at}: MDE {100 * effect.mde:.1f}")
    where = ("the perturbation costs the baseline significantly at "
             + ", ".join(_dose(d) for d in costly) if costly else
             "the perturbation never costs the baseline significantly")
    if hurt:
        return f"{variant} steepens the {family.name} curve ({'; '.join(hurt)}); {where}."
    if helped:
        return f"{variant} flattens the {family.name} curve ({'; '.join(helped)}); {where}."
    detail = (f"no dose shows a significant effect (what each could detect, points: "
              f"{'; '.join(missed)})" if missed else "no dose could be tested (add seeds)")
    return f"{variant} does not flatten the {family.name} curve: {detail}; {where}."


def _dose(dose: float | str | None) -> str:
    if dose is None:
        return "clean"
    return f"{dose:g}" if isinstance(dose, float) else str(dose)


def plot_family(path: Path, family: Family) -> None:
    """Final accuracy (seed mean, 95 % CI) against the baseline's mismatch: solid where the
    policy runs, dashed clean; the published mismatch bands shaded on the x-axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    doses = [d for d in family.doses() if family.x(d) is not None]
    for key, color in BAND_STYLE.items():
        band = PUBLISHED_MISMATCH[key]
        ax.axvspan(band.low, band.high, color=color, alpha=0.08, lw=0)
        ax.text(band.high, 0.01, BAND_LABEL[key], transform=ax.get_xaxis_transform(),
                ha="right", va="bottom", fontsize=7, color=color, rotation=90)
    for i, variant in enumerate(family.variants()):
        for what, style in (("final", "-"), ("final_clean", "--")):
            xs, ys, errs = [], [], []
            for dose in doses:
                point = family.point(variant, dose)
                mean, half = seed_mean_ci(getattr(point, what)) if point else (None, None)
                if mean is not None:
                    xs.append(family.x(dose))
                    ys.append(100 * mean)
                    errs.append(100 * (half or 0.0))
            where = "where it runs" if what == "final" else "clean"
            if xs:
                ax.errorbar(xs, ys, yerr=errs, color=f"C{i}", ls=style, marker="o", ms=4,
                            capsize=3, label=f"{variant} ({where})")
    ax.set_xlabel("mean |Δlogp| per token of the baseline, training mean "
                  "(rollout_corr/abs_logp_diff_mean)")
    ax.set_ylabel("final validation accuracy (%)")
    ax.set_title(f"Robustness: {family.name} (seed mean, 95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


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
             "0.014-0.039, naive port 0.075-0.178). Still rising: the slope of the sampled "
             "accuracy over the last quarter of the steps is significantly above 0 "
             "(then more steps would change the curve)."),
    ]
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
                points_rows.append([
                    _dose(dose), variant, str(len(point.runs)),
                    f"{point.mismatch:.4f}" if point.mismatch is not None else "n/a",
                    f"{first_step(point.runs, keys.ABS_LOGP_DIFF):.4f}"
                    if first_step(point.runs, keys.ABS_LOGP_DIFF) is not None else "n/a",
                    f"{training_mean(point.runs, keys.ROLLOUT_KL):.2e}"
                    if training_mean(point.runs, keys.ROLLOUT_KL) is not None else "n/a",
                    _fmt_ci(*seed_mean_ci(point.final)),
                    _fmt_ci(*seed_mean_ci(point.final_clean)), rising])
                if dose is None:
                    continue
                what = (f"cost: {variant} vs clean" if variant == family.baseline
                        else f"effect of {variant}")
                comparison_rows.append([_dose(dose), what]
                                       + _comparison_cells(rows.get(point.label), target))
        blocks += [
            Heading(f"Robustness: {family.name}", 3),
            Image(file, f"{family.name}: final accuracy against the measured mismatch"),
            Table(["dose", "variant", "seeds", "|Δlogp| train mean", "|Δlogp| step 1",
                   "rollout_corr/kl", "final acc % where it runs (95 % CI)",
                   "final acc % clean (95 % CI)", "sampled acc slope, last quarter"],
                  points_rows),
            Table(["dose", "comparison", "Δ points [95 % CI]", "p", "MDE (points)",
                   "verdict"], comparison_rows),
        ]
        blocks += [Text(family_verdict(family, v, rows))
                   for v in family.variants() if v != family.baseline]
    return blocks
