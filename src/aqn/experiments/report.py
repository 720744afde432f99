"""The comparison report over run directories: accuracy with significance, entropy,
rollout-training mismatch, the AQN noise actually applied, speed, and failed runs.

Differences between variants are only called effects when a paired test says so
(see ``aqn.experiments.stats``): the report states the standard error of one accuracy
next to every difference so that noise is not read as an effect.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aqn.experiments.runs import RunData, find_runs
from aqn.experiments.stats import (
    ALPHA,
    BootstrapResult,
    SeedTestResult,
    accuracy_se,
    mcnemar,
    paired_bootstrap,
    seed_test,
)

PLOTS = {  # file -> (metric, title, x axis); accuracy comes from the validation curves
    "accuracy.png": ("accuracy", "Validation accuracy (%)", "validation step"),
    "entropy.png": ("actor/entropy", "Entropy (actor/entropy)", "training step"),
    "sigma.png": ("aqn/sigma", "AQN sigma applied (aqn/sigma)", "training step"),
    "mismatch.png": ("rollout_corr/abs_logp_diff_mean",
                     "Rollout-training mismatch (rollout_corr/abs_logp_diff_mean)",
                     "training step"),
    "reward.png": ("critic/score/mean", "Training reward (critic/score/mean)", "training step"),
    "train_accuracy.png": ("critic/acc/mean", "Accuracy of the sampled completions "
                           "(critic/acc/mean)", "training step"),
    "zero_adv.png": ("actor/zero_adv_frac", "Groups with zero advantage (actor/zero_adv_frac)",
                     "training step"),
    "clipfrac.png": ("actor/pg_clipfrac", "PPO clip fraction (actor/pg_clipfrac)",
                     "training step"),
    "response_length.png": ("response_length/mean", "Response length (response_length/mean)",
                            "training step"),
}
# What a user looks at first when RL does not learn: reward, accuracy of the samples, groups
# that teach nothing, clipping, length (section 3's table, at the start and end of training).
SIGNAL_KEYS = ("critic/score/mean", "critic/acc/mean", "actor/zero_adv_frac",
               "actor/pg_clipfrac", "response_length/mean")
MISMATCH_KEYS = (
    "rollout_corr/abs_logp_diff_mean",
    "rollout_corr/k3_kl",
    "training/rollout_probs_diff_mean",
)
SPEED_KEYS = ("timing_s/step", "timing_s/gen", "perf/throughput")
# AQN noise that changes fewer elements than this is mostly swallowed by the weight dtype.
MIN_FRAC_CHANGED = 0.5
_TABLE_ROWS = 10  # about this many rows in per-step tables of training metrics


# --- report blocks, rendered both to markdown and to HTML -------------------------------


@dataclass
class _Heading:
    text: str
    level: int = 2


@dataclass
class _Text:
    text: str


@dataclass
class _Warning:
    text: str


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class _Image:
    file: str
    caption: str


_Block = _Heading | _Text | _Warning | _Table | _Image


def _md_table(table: _Table) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(table.headers), "|" + "|".join("---" for _ in table.headers) + "|"]
    return "\n".join(lines + [line(r) for r in table.rows])


def _to_markdown(blocks: Iterable[_Block]) -> str:
    parts = []
    for b in blocks:
        match b:
            case _Heading():
                parts.append("#" * b.level + " " + b.text)
            case _Text():
                parts.append(b.text)
            case _Warning():
                parts.append("**WARNING** " + b.text)
            case _Table():
                parts.append(_md_table(b))
            case _Image():
                parts.append(f"![{b.caption}]({b.file})")
    return "\n\n".join(parts) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; }
th:first-child, td:first-child { text-align: left; }
.warning { color: #c00000; font-weight: bold; }
img { max-width: 100%; }
"""


def _to_html(blocks: Iterable[_Block], out_dir: Path, title: str) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        f'<html><head><meta charset="utf-8"><title>{esc(title)}</title>',
        f"<style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        match b:
            case _Heading():
                parts.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
            case _Text():
                parts.append(f"<p>{esc(b.text)}</p>")
            case _Warning():
                parts.append(
                    f'<p class="warning" style="color:#c00000">WARNING {esc(b.text)}</p>'
                )
            case _Table():
                head = "".join(f"<th>{esc(h)}</th>" for h in b.headers)
                body = "".join(
                    "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in b.rows
                )
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            case _Image():
                data = base64.b64encode((out_dir / b.file).read_bytes()).decode("ascii")
                parts.append(
                    f'<figure><img alt="{esc(b.caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{esc(b.caption)}</figcaption></figure>"
                )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- formatting ---------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _pts(d: float | None) -> str:
    # Adding 0.0 turns a rounded -0.0 into 0.0, so a float-noise difference reads +0.00.
    return "n/a" if d is None else f"{round(100 * d, 2) + 0.0:+.2f}"


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _steps_text(steps: Sequence[int]) -> str:
    """1, 2, 3, 7 -> '1-3, 7'."""
    ranges: list[list[int]] = []
    for s in sorted(steps):
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1][1] = s
        else:
            ranges.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _mean_curve(curves: Iterable[dict[int, float]]) -> dict[int, float]:
    """Per step, the mean over the curves that have that step."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve.items():
            by_step.setdefault(step, []).append(value)
    return {s: sum(v) / len(v) for s, v in sorted(by_step.items())}


def _machine_label(machine: dict) -> str:
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


def _by_seed(runs: Iterable[RunData]) -> dict[int, RunData]:
    """seed -> run; with duplicates (same variant and seed) the first in sort order wins."""
    out: dict[int, RunData] = {}
    for r in runs:
        out.setdefault(r.seed, r)
    return out


def _variant_row(variant: str, runs: dict[int, RunData]) -> HeadlineRow:
    scored = [r for r in runs.values() if r.accuracy]
    final_mean = _mean(r.accuracy[r.final_step] for r in scored)
    # Peak of the seed-mean curve, over steps every seed reached (max of means, not mean
    # of maxima: picking each seed's best step would inflate the peak).
    complete = _mean_curve(
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


def _deciding_test(seeds: SeedTestResult, p_mcnemar: float | None) -> tuple[float | None, str]:
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


def _compare(row: HeadlineRow, base: HeadlineRow, a_runs: dict[int, RunData],
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
    row.p_value, row.test = _deciding_test(row.seeds, row.p_mcnemar)
    if row.p_value is not None:
        row.significant = row.p_value < ALPHA


def _comparison_cells(r: HeadlineRow, base: HeadlineRow) -> list[str]:
    """Δ, McNemar, bootstrap, seed-test and verdict cells of a non-baseline variant."""
    delta = _pts(r.delta)
    if r.compared_steps and not r.compared_steps == r.final_steps == base.final_steps:
        delta += f" (at step {', '.join(map(str, r.compared_steps))})"
    mcn = _p(r.p_mcnemar)
    if len(r.p_mcnemar_by_seed) > 1:
        mcn += " (" + ", ".join(f"s{s}: {_p(p)}" for s, p in r.p_mcnemar_by_seed.items()) + ")"
    boot = "n/a"
    if r.bootstrap is not None:
        bs = r.bootstrap
        boot = f"{_pts(bs.diff)} [{_pts(bs.ci_low)}, {_pts(bs.ci_high)}], p={_p(bs.p_value)}"
    st = r.seeds
    if st is None or st.p_value is None:
        seeds = f"n/a ({st.n_seeds if st else 0} paired seeds)"
    else:
        seeds = f"{_pts(st.mean_diff)} [{_pts(st.ci_low)}, {_pts(st.ci_high)}], p={_p(st.p_value)}"
    verdict = "n/a"
    if r.significant is not None:
        verdict = f"{'yes' if r.significant else 'no'} (p={_p(r.p_value)})"
    return [delta, mcn, boot, seeds, verdict]


def _headline_table(rows: list[HeadlineRow]) -> _Table:
    """The final/peak table; rows[0] is the baseline."""
    out = []
    for i, r in enumerate(rows):
        peak = "n/a" if r.peak_step is None else f"{_pct(r.peak_mean)} (step {r.peak_step})"
        cells = [r.variant, str(r.n_seeds), ", ".join(map(str, r.final_steps)) or "n/a",
                 _pct(r.final_mean), peak, "n/a" if r.se is None else f"{100 * r.se:.2f}"]
        comparison = ["", "", "", "", "(baseline)"] if i == 0 else _comparison_cells(r, rows[0])
        out.append(cells + comparison)
    return _Table(
        ["variant", "seeds", "final step", "final acc %", "peak acc % (step)",
         "SE one acc (points)", "Δ final (points)", "McNemar p (pooled; per seed)",
         "bootstrap Δ [95% CI]", "seed t-test Δ [95% CI]", "significant?"],
        out,
    )


def _headline_notes(rows: list[HeadlineRow], baseline: str) -> list[str]:
    notes = []
    for r in rows:
        if r.variant == baseline or r.delta is None:
            continue
        items = f"{r.n_items} items" if r.n_items else "the validation items"
        se = f"SE {100 * r.se:.2f} points" if r.se is not None else "SE unknown"
        if r.significant:
            notes.append(
                f"{r.variant}: {_pts(r.delta)} points vs {baseline} on {items} is significant "
                f"({r.test}, p={_p(r.p_value)} < {ALPHA}); {se} for one accuracy."
            )
        elif r.significant is None:
            notes.append(
                f"{r.variant}: {_pts(r.delta)} points on {items} cannot be judged ({r.test}); "
                f"{se} for one accuracy."
            )
        else:
            notes.append(
                f"{r.variant}: {_pts(r.delta)} points on {items} is within noise: "
                f"{se} for one accuracy ({r.test}, p={_p(r.p_value)})."
            )
    notes.append(
        f"Significance at alpha {ALPHA}: the paired t-test over seeds decides when there are "
        "2 or more paired seeds (it covers training noise); with one seed only McNemar over "
        "the same items is available, which shows that two checkpoints differ, not that a "
        "method is better."
    )
    return notes


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
        return (f"Baseline ({self.variant}) {verdict}: {_pts(self.delta)} points over the base "
                f"model ({_pct(self.base_mean)} % at step {self.base_step} -> "
                f"{_pct(self.final_mean)} % final), {self.test}, p = {_p(self.p_value)}"
                f"; McNemar over items p = {_p(self.p_mcnemar)}.")


def _learning(variant: str, runs: dict[int, RunData]) -> LearningResult:
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
    p_value, test = _deciding_test(seeds, p_mcnemar)
    delta = _mean(final_acc[s] - base_acc[s] for s in base_acc)
    return LearningResult(
        variant, base_step, _mean(base_acc.values()), _mean(final_acc.values()), delta, seeds,
        p_mcnemar, p_value, test, None if p_value is None else p_value < ALPHA and delta > 0)


# --- the report ---------------------------------------------------------------------------


@dataclass
class Report:
    markdown: str
    html: str
    headline: str  # the final/peak table and its notes, as markdown
    rows: list[HeadlineRow]
    baseline: str | None
    learning: LearningResult | None  # did the baseline learn over the base model?
    warnings: list[str]  # AQN enabled but noise zero, swallowed or unmeasured
    paths: list[Path]  # files written


def _pick_baseline(groups: dict[str, dict[int, RunData]], requested: str | None) -> str:
    if requested is not None:
        if requested not in groups:
            raise ValueError(
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


def _noise_warnings(runs: Iterable[RunData]) -> list[str]:
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
        swallowed = [
            row["step"] for row in rows
            if (row.get("aqn/sigma") or 0) > 0
            and (row.get("aqn/effective_std") == 0
                 or (row.get("aqn/frac_changed") is not None
                     and row["aqn/frac_changed"] < MIN_FRAC_CHANGED))
        ]
        if swallowed:
            warnings.append(
                f"run {r.name} ({r.path}): AQN noise was zero or swallowed "
                f"(aqn/sigma > 0 but aqn/effective_std == 0 or aqn/frac_changed < "
                f"{MIN_FRAC_CHANGED}) at steps {_steps_text(swallowed)} "
                f"({len(swallowed)} of {len(rows)} steps)."
            )
    return warnings


def _plot(path: Path, title: str, xlabel: str,
          curves: dict[str, list[dict[int, float]]], colors: dict[str, str]) -> None:
    """One figure: each seed a thin line, the seed mean a thick line per variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    ax = fig.add_subplot()
    plotted = False
    for variant, seeds in curves.items():
        seeds = [c for c in seeds if c]
        if not seeds:
            continue
        for c in seeds:
            ax.plot(list(c), list(c.values()), color=colors[variant], lw=0.8, alpha=0.35)
        mean = _mean_curve(seeds)
        ax.plot(list(mean), list(mean.values()), color=colors[variant], lw=2.2, label=variant)
        plotted = True
    if plotted:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _write_plots(groups: dict[str, dict[int, RunData]], out_dir: Path) -> None:
    colors = {v: f"C{i % 10}" for i, v in enumerate(groups)}
    for file, (key, title, xlabel) in PLOTS.items():
        curves = {
            v: [{s: 100 * a for s, a in r.accuracy.items()} if key == "accuracy"
                else r.series(key) for r in runs.values()]
            for v, runs in groups.items()
        }
        _plot(out_dir / file, title, xlabel, curves, colors)


def _runs_section(runs: list[RunData], groups: dict[str, dict[int, RunData]]) -> list[_Block]:
    used = {id(r) for g in groups.values() for r in g.values()}
    rows = [
        [r.name, r.status, r.data_source or "n/a",
         "n/a" if r.final_step is None else str(r.final_step),
         _pct(r.accuracy.get(r.final_step)), _machine_label(r.machine), str(r.path)]
        for r in runs
    ]
    blocks: list[_Block] = [
        _Heading("Runs"),
        _Table(["run", "status", "data source", "final step", "final acc %", "machine",
                "path"], rows),
    ]
    dups = [r for r in runs if r.status != "failed" and id(r) not in used]
    if dups:
        blocks.append(_Text(
            "Runs with a variant and seed already seen are left out of the accuracy tables "
            "(they still count for speed): " + ", ".join(f"{r.name} ({r.path})" for r in dups)
        ))
    return blocks


def _accuracy_section(groups: dict[str, dict[int, RunData]], baseline: str) -> list[_Block]:
    steps = sorted({s for g in groups.values() for r in g.values() for s in r.accuracy})
    others = [v for v in groups if v != baseline]
    rows = []
    for step in steps:
        cells, means = [str(step)], {}
        for variant, runs in groups.items():
            vals = [r.accuracy[step] for r in runs.values() if step in r.accuracy]
            if not vals:
                cells.append("n/a")
                continue
            means[variant] = sum(vals) / len(vals)
            cell = _pct(means[variant])
            if len(vals) > 1:
                cell += f" [{_pct(min(vals))}-{_pct(max(vals))}]"
            if len(vals) < len(runs):
                cell += f" (n={len(vals)})"
            cells.append(cell)
        for v in others:
            both = v in means and baseline in means
            cells.append(_pts(means[v] - means[baseline]) if both else "n/a")
        rows.append(cells)
    headers = ["step"] + [f"{v} acc %" for v in groups] + [f"Δ {v} (points)" for v in others]
    return [
        _Heading("1. Validation accuracy per step"),
        _Text("Mean over seeds, with the seed range [min-max] when there are several seeds; "
              f"Δ is against the baseline ({baseline})."),
        _Table(headers, rows),
        _Image("accuracy.png", "Validation accuracy (thin: seeds, thick: seed mean)"),
    ]


def _first_last(runs: dict[int, RunData], key: str) -> str:
    """'first -> last': means of ``key`` over the first and last tenth of each run's
    steps, then over runs; 'n/a' where no run logged it."""
    firsts, lasts = [], []
    for r in runs.values():
        values = list(r.series(key).values())
        if values:
            tenth = max(1, len(values) // 10)
            firsts.append(sum(values[:tenth]) / tenth)
            lasts.append(sum(values[-tenth:]) / tenth)
    if not firsts:
        return "n/a"
    return f"{_num(_mean(firsts))} -> {_num(_mean(lasts))}"


def _training_section(groups: dict[str, dict[int, RunData]]) -> list[_Block]:
    entropy = {v: _mean_curve(r.series("actor/entropy") for r in runs.values())
               for v, runs in groups.items()}
    steps = sorted({s for c in entropy.values() for s in c})
    stride = max(1, math.ceil(len(steps) / _TABLE_ROWS))
    shown = steps[::stride]
    if steps and shown[-1] != steps[-1]:
        shown.append(steps[-1])
    entropy_rows = [[str(s)] + [_num(entropy[v].get(s)) for v in groups] for s in shown]
    mismatch_rows = [
        [v] + [_num(_mean(m for r in runs.values() if (m := _mean(r.series(k).values()))
                          is not None)) for k in MISMATCH_KEYS]
        for v, runs in groups.items()
    ]
    return [
        _Heading("3. Training signal, entropy and rollout-training mismatch"),
        _Text("What to look at first when RL does not learn: per variant, the mean over the "
              "first and the last tenth of the training steps (then over seeds). Groups with "
              "zero advantage (all completions scored alike) give no gradient."),
        _Table(["variant"] + [f"{k} first -> last" for k in SIGNAL_KEYS],
               [[v] + [_first_last(runs, k) for k in SIGNAL_KEYS] for v, runs in groups.items()]),
        _Image("reward.png", "critic/score/mean (thin: seeds, thick: seed mean)"),
        _Image("train_accuracy.png", "critic/acc/mean (thin: seeds, thick: seed mean)"),
        _Image("zero_adv.png", "actor/zero_adv_frac (thin: seeds, thick: seed mean)"),
        _Image("clipfrac.png", "actor/pg_clipfrac (thin: seeds, thick: seed mean)"),
        _Image("response_length.png", "response_length/mean (thin: seeds, thick: seed mean)"),
        _Text(f"actor/entropy per training step, mean over seeds (one row every {stride} "
              "step(s), and the last)."),
        _Table(["step"] + list(groups), entropy_rows),
        _Image("entropy.png", "actor/entropy (thin: seeds, thick: seed mean)"),
        _Text("Mismatch between the rollout and training policies: mean over training steps, "
              "then over seeds."),
        _Table(["variant"] + list(MISMATCH_KEYS), mismatch_rows),
        _Image("mismatch.png", "rollout_corr/abs_logp_diff_mean (thin: seeds, thick: seed mean)"),
    ]


def _sigma_section(groups: dict[str, dict[int, RunData]], warnings: list[str]) -> list[_Block]:
    blocks: list[_Block] = [
        _Heading("4. AQN noise actually applied"),
        _Text("Read from the aqn/* metrics of each step (not recomputed from the config): "
              "per stage, the first step, sigma, and the mean over steps and seeds of the "
              "measured std of the applied noise and of the fraction of weights it changed."),
    ]
    blocks += [_Warning(w) for w in warnings]
    for variant, runs in groups.items():
        if not any(r.aqn_enabled for r in runs.values()):
            continue
        preset = next(iter(runs.values())).setting("trainer.noise_injection.preset", "n/a")
        stages: dict[int, dict[str, list[float]]] = {}
        for r in runs.values():
            for row in r.training_rows():
                if row.get("aqn/stage") is None:
                    continue
                st = stages.setdefault(int(row["aqn/stage"]), {"step": [], "sigma": [],
                                                                "eff": [], "frac": []})
                # the schedule's step (0-based); a metrics row is logged as that step + 1
                st["step"].append(int(row.get("aqn/step", row["step"] - 1)))
                for name, key in (("sigma", "aqn/sigma"), ("eff", "aqn/effective_std"),
                                  ("frac", "aqn/frac_changed")):
                    if row.get(key) is not None:
                        st[name].append(row[key])
        blocks.append(_Heading(f"{variant} (preset {preset})", 3))
        if not stages:
            blocks.append(_Text("No aqn/* metrics recorded."))
            continue
        blocks.append(_Table(
            ["stage", "from schedule step", "sigma", "mean effective std",
             "mean frac changed"],
            [[str(k), str(min(st["step"])), _num(_mean(st["sigma"])), _num(_mean(st["eff"])),
              _num(_mean(st["frac"]))] for k, st in sorted(stages.items())],
        ))
    blocks.append(_Image("sigma.png", "aqn/sigma per step (thin: seeds, thick: seed mean)"))
    return blocks


def _speed_section(runs: list[RunData]) -> list[_Block]:
    per_run = {id(r): {k: _mean(r.series(k).values()) for k in SPEED_KEYS} for r in runs}
    cells: dict[tuple[str, str], list[RunData]] = {}
    for r in runs:
        cells.setdefault((r.variant, _machine_label(r.machine)), []).append(r)

    def mean_of(group: list[RunData], key: str) -> float | None:
        return _mean(v for r in group if (v := per_run[id(r)][key]) is not None)

    blocks: list[_Block] = [
        _Heading("5. Speed"),
        _Text("Mean over training steps, then over runs."),
        _Table(
            ["variant", "machine", "runs", "step time (s)", "gen time (s)", "throughput (tok/s)"],
            [[v, m, str(len(g))] + [_num(mean_of(g, k)) for k in SPEED_KEYS]
             for (v, m), g in sorted(cells.items())],
        ),
    ]
    machines = sorted({m for _, m in cells})
    if len(machines) < 2:
        return blocks
    ref = machines[0]
    ratio_rows = []
    for other in machines[1:]:
        for v in sorted({v for v, _ in cells}):
            if (v, ref) not in cells or (v, other) not in cells:
                continue
            ratios = []
            for k in SPEED_KEYS:
                a, b = mean_of(cells[(v, ref)], k), mean_of(cells[(v, other)], k)
                ratios.append(f"{b / a:.3g}" if a and b is not None else "n/a")
            ratio_rows.append([v, other] + ratios)
    blocks.append(_Text(f"Ratios between machines, same variant: B / A with A = {ref}."))
    if ratio_rows:
        blocks.append(_Table(["variant", "machine B", "step time B/A", "gen time B/A",
                              "throughput B/A"], ratio_rows))
    else:
        blocks.append(_Text("No variant ran on two machines: no like-for-like ratio."))
    return blocks


def _failed_section(runs: list[RunData]) -> list[_Block]:
    failed = [r for r in runs if r.status == "failed"]
    blocks: list[_Block] = [_Heading("6. Failed runs")]
    if not failed:
        return blocks + [_Text("None.")]
    return blocks + [_Table(["run", "path", "error"],
                            [[r.name, str(r.path), r.error or "(no error recorded)"]
                             for r in failed])]


def build_report(
    paths: Sequence[str | Path], out_dir: str | Path, baseline: str | None = None
) -> Report:
    """Compare the runs under ``paths`` (run or sweep directories, in any mix).

    Writes report.md, report.html (self-contained) and accuracy/entropy/sigma/mismatch
    PNGs into ``out_dir``. ``baseline`` defaults to a variant named "baseline", else the
    first variant without AQN, else the first variant.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = find_runs(paths)
    ok = [r for r in runs if r.status != "failed"]
    variants = sorted({r.variant for r in ok})
    groups = {v: _by_seed(r for r in ok if r.variant == v) for v in variants}
    warnings = _noise_warnings(runs)

    blocks: list[_Block] = [_Heading("AQN run report", 1)]
    if warnings:
        blocks.append(_Warning(f"{len(warnings)} run(s) had AQN enabled but zero, swallowed or "
                               "unmeasured noise: see section 4."))
    rows: list[HeadlineRow] = []
    headline = "No completed runs to compare."
    base = learning = None
    if groups:
        base = _pick_baseline(groups, baseline)
        groups = {base: groups[base], **{v: g for v, g in groups.items() if v != base}}
        learning = _learning(base, groups[base])
        learned = _Text(learning.sentence())
        blocks.append(learned)
        rows = [_variant_row(v, g) for v, g in groups.items()]
        for row in rows[1:]:
            _compare(row, rows[0], groups[base], groups[row.variant])
        # Whether the baseline learned comes first: variants compared on a baseline that
        # did not learn say little.
        headline = _to_markdown([learned, _headline_table(rows)]
                                + [_Text(n) for n in _headline_notes(rows, base)])
    blocks.append(_Text(
        f"{len(runs)} runs ({len(runs) - len(ok)} failed), {len(groups)} variants; "
        f"baseline: {base or 'n/a'}. Accuracies in percent; Δ in points."
    ))
    blocks += _runs_section(runs, groups)
    if groups:
        _write_plots(groups, out_dir)
        blocks += _accuracy_section(groups, base)
        blocks += [_Heading("2. Final and peak accuracy, and significance vs the baseline"),
                   _headline_table(rows)]
        blocks += [_Text(n) for n in _headline_notes(rows, base)]
        blocks += _training_section(groups)
        blocks += _sigma_section(groups, warnings)
    else:
        blocks += [_Warning(w) for w in warnings]
    blocks += _speed_section(ok)
    blocks += _failed_section(runs)

    markdown = _to_markdown(blocks)
    page = _to_html(blocks, out_dir, "AQN run report")
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    written = [out_dir / "report.md", out_dir / "report.html"]
    if groups:
        written += [out_dir / file for file in PLOTS]
    return Report(markdown, page, headline, rows, base, learning, warnings, written)
