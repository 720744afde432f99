"""The comparison report over run directories: accuracy with significance, entropy,
rollout-training mismatch, the AQN noise actually applied, speed, and failed runs.

Differences between variants are only called effects when a paired test says so
(see ``aqn.experiments.stats``): the report states the standard error of one accuracy
next to every difference so that noise is not read as an effect.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aqn import metric_keys as keys
from aqn.experiments.analysis import (
    TARGET_MDE_POINTS,
    HeadlineRow,
    LearningResult,
    clean_points,
    compare_points,
    first_run,
    learning_result,
    machine_label,
    noise_warnings,
    power_verdict,
    training_mean,
)
from aqn.experiments.render import (
    Alert,
    Block,
    Heading,
    Image,
    Table,
    Text,
    fmt_num,
    fmt_p,
    fmt_pct,
    fmt_pts,
    plot_curves,
    to_html,
    to_markdown,
)
from aqn.experiments.robustness import last_validation_change, robustness_section
from aqn.experiments.runs import RunData, find_runs
from aqn.experiments.stats import ALPHA, avg, mean_curve
from aqn.experiments.trust import check_comparisons, check_runs
from aqn.files import write_atomic
from aqn.perturb import REGISTRY

ACCURACY = "accuracy"  # the validation curves' own series, not a logged metric
PLOTS = {  # file -> (metric, title, x axis); accuracy comes from the validation curves
    "accuracy.png": (ACCURACY, "Validation accuracy (%)", "validation step"),
    **{file: (key, f"{title} ({key})", "training step") for file, (key, title) in {
        "entropy.png": (keys.ENTROPY, "Entropy"),
        "sigma.png": (keys.AQN_SIGMA, "AQN sigma applied"),
        "mismatch.png": (keys.ABS_LOGP_DIFF, "Rollout-training mismatch"),
        "reward.png": (keys.SCORE_MEAN, "Training reward"),
        "train_accuracy.png": (keys.SAMPLED_ACC, "Accuracy of the sampled completions"),
        "zero_adv.png": (keys.ZERO_ADV_FRAC, "Groups with zero advantage"),
        "clipfrac.png": (keys.CLIPFRAC, "PPO clip fraction"),
        "response_length.png": (keys.RESPONSE_LENGTH, "Response length"),
    }.items()},
}
# What a user looks at first when RL does not learn: reward, accuracy of the samples, groups
# that teach nothing, clipping, length (section 3's table, at the start and end of training).
SIGNAL_KEYS = (keys.SCORE_MEAN, keys.SAMPLED_ACC, keys.ZERO_ADV_FRAC, keys.CLIPFRAC,
               keys.RESPONSE_LENGTH)
# the mismatch, and what a rollout correction did about it (a run without one shows n/a)
MISMATCH_KEYS = (keys.ABS_LOGP_DIFF, keys.K3_KL, keys.PROBS_DIFF, keys.IS_MEAN,
                 keys.RS_MASKED_FRACTION)
SPEED_KEYS = (keys.STEP_TIME, keys.GEN_TIME, keys.THROUGHPUT)
_TABLE_ROWS = 10  # about this many rows in per-step tables of training metrics


def _comparison_cells(r: HeadlineRow, base: HeadlineRow) -> list[str]:
    """Δ, McNemar, bootstrap, seed-test and verdict cells of a non-baseline variant."""
    delta = fmt_pts(r.delta)
    if r.compared_steps and not r.compared_steps == r.final_steps == base.final_steps:
        delta += f" (at step {', '.join(map(str, r.compared_steps))})"
    mcn = fmt_p(r.p_mcnemar)
    if len(r.p_mcnemar_by_seed) > 1:
        mcn += " (" + ", ".join(f"s{s}: {fmt_p(p)}" for s, p in r.p_mcnemar_by_seed.items()) + ")"
    boot = "n/a"
    if r.bootstrap is not None:
        bs = r.bootstrap
        boot = (f"{fmt_pts(bs.diff)} [{fmt_pts(bs.ci_low)}, {fmt_pts(bs.ci_high)}], "
                f"p={fmt_p(bs.p_value)}")
    st = r.seeds
    if st is None or st.p_value is None:
        seeds = f"n/a ({st.n_seeds if st else 0} paired seeds)"
    else:
        seeds = (f"{fmt_pts(st.mean_diff)} [{fmt_pts(st.ci_low)}, {fmt_pts(st.ci_high)}], "
                 f"p={fmt_p(st.p_value)}")
    verdict = "n/a"
    if r.significant is not None:
        verdict = f"{'yes' if r.significant else 'no'} (p={fmt_p(r.p_value)})"
    mde = "n/a" if r.mde is None else f"{100 * r.mde:.2f}"
    return [delta, mcn, boot, seeds, verdict, mde]


def _headline_table(rows: list[HeadlineRow]) -> Table:
    """The final/peak table; rows[0] is the baseline."""
    out = []
    by_point = {r.variant: r for r in rows}
    for i, r in enumerate(rows):
        peak = "n/a" if r.peak_step is None else f"{fmt_pct(r.peak_mean)} (step {r.peak_step})"
        cells = [r.variant, str(r.n_seeds), ", ".join(map(str, r.final_steps)) or "n/a",
                 fmt_pct(r.final_mean), peak, "n/a" if r.se is None else f"{100 * r.se:.2f}"]
        comparison = (["", "", "", "", "", "(baseline)", ""] if i == 0
                      else [r.against] + _comparison_cells(r, by_point[r.against]))
        out.append(cells + comparison)
    return Table(
        ["variant", "seeds", "final step", "final acc %", "peak acc % (step)",
         "SE one acc (points)", "against", "Δ final (points)", "McNemar p (pooled; per seed)",
         "bootstrap Δ [95% CI]", "seed t-test Δ [95% CI]", "significant?",
         "MDE (points, 80 % power)"],
        out,
    )


def _headline_notes(rows: list[HeadlineRow],
                    target_points: float = TARGET_MDE_POINTS) -> list[str]:
    notes = []
    for r in rows:
        baseline = r.against
        if not baseline or r.delta is None:
            continue
        items = f"{r.n_items} items" if r.n_items else "the validation items"
        se = f"SE {100 * r.se:.2f} points" if r.se is not None else "SE unknown"
        if r.significant:
            notes.append(
                f"{r.variant}: {fmt_pts(r.delta)} points vs {baseline} on {items} is significant "
                f"({r.test}, p={fmt_p(r.p_value)} < {ALPHA}); {se} for one accuracy."
            )
        elif r.significant is None:
            notes.append(
                f"{r.variant}: {fmt_pts(r.delta)} points on {items} cannot be judged ({r.test}); "
                f"{se} for one accuracy."
            )
        else:
            notes.append(
                f"{r.variant}: {fmt_pts(r.delta)} points vs {baseline} on {items} is not "
                f"significant ({r.test}, p={fmt_p(r.p_value)}): "
                f"{power_verdict(r, target_points)}; {se} for one accuracy."
            )
    notes.append(
        f"Significance at alpha {ALPHA}: the paired t-test over seeds decides when there are "
        "2 or more paired seeds (it covers training noise); with one seed only McNemar over "
        "the same items is available, which shows that two checkpoints differ, not that a "
        "method is better. The MDE is the smallest true difference that test detects with "
        "80 % power, from the spread it observed (the per-seed differences; for McNemar the "
        "discordant items); with 2 seeds the t-test has one degree of freedom and its MDE is "
        f"large. A result counts as 'no effect' only when its MDE is at most {target_points:g} "
        "points (`aqn report --mde`)."
    )
    return notes


# --- the machine-readable result ------------------------------------------------------------


def _points(x: float | None) -> float | None:
    return None if x is None else 100 * x


def summary(rows: list[HeadlineRow], groups: dict[str, dict[int, RunData]],
            learning: LearningResult | None, target: float) -> dict:
    """summary.json: every comparison of the report and whether the baseline learned, in
    points, for other tools (and CI) to read."""
    comparisons = []
    for r in rows:
        if not r.against:
            continue
        run = first_run(groups[r.variant])
        ci = r.ci()
        change, span = last_validation_change(groups[r.variant])
        comparisons.append({
            "variant": run.variant, "point": r.variant, "against": r.against,
            "family": run.family, "dose": run.dose,
            "mismatch": training_mean(groups[r.variant], keys.ABS_LOGP_DIFF),
            "delta_points": _points(r.delta),
            "ci_points": None if ci is None else [100 * ci[0], 100 * ci[1]],
            "p": r.p_value, "mde_points": _points(r.mde), "seeds": r.n_seeds,
            "test": r.test, "significant": r.significant,
            "verdict": ("significant" if r.significant else
                        "not testable" if r.significant is None else power_verdict(r, target)),
            # the point's validation accuracy from its last but one validation to the final
            "final_change": None if change is None else {
                "delta_points": _points(change.mean_diff), "over_steps": span,
                "p": change.p_value},
        })
    learned = None
    if learning is not None:
        mde = learning.seeds.mde if learning.seeds is not None else None
        learned = {"variant": learning.variant, "learned": learning.learned,
                   "delta_points": _points(learning.delta), "p": learning.p_value,
                   "mde_points": _points(mde), "test": learning.test,
                   "base_step": learning.base_step}
    return {"baseline_learned": learned, "target_mde_points": target,
            "comparisons": comparisons}


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
    # what the checks found (aqn.experiments.trust): runs left out, comparisons flagged
    checks: list[str] = field(default_factory=list)


def _write_plots(groups: dict[str, dict[int, RunData]], out_dir: Path) -> None:
    colors = {v: f"C{i % 10}" for i, v in enumerate(groups)}
    for file, (key, title, xlabel) in PLOTS.items():
        curves = {
            v: [{s: 100 * a for s, a in r.accuracy.items()} if key == ACCURACY
                else r.series(key) for r in runs.values()]
            for v, runs in groups.items()
        }
        plot_curves(out_dir / file, title, xlabel, curves, colors)


def _runs_section(runs: list[RunData], groups: dict[str, dict[int, RunData]],
                  left_out: set[int]) -> list[Block]:
    used = {id(r) for g in groups.values() for r in g.values()}
    rows = [
        [r.name, r.engine, r.status + (" (left out: see Checks)" if id(r) in left_out else ""),
         r.data_source or "n/a",
         "n/a" if r.final_step is None else str(r.final_step),
         fmt_pct(r.accuracy.get(r.final_step)), machine_label(r.machine), str(r.path)]
        for r in runs
    ]
    blocks: list[Block] = [
        Heading("Runs"),
        Table(["run", "logged by", "status", "data source", "final step", "final acc %",
                "machine", "path"], rows),
    ]
    dups = [r for r in runs if r.status != "failed" and id(r) not in used | left_out]
    if dups:
        blocks.append(Text(
            "Runs with a variant and seed already seen are left out of the accuracy tables "
            "(they still count for speed): " + ", ".join(f"{r.name} ({r.path})" for r in dups)
        ))
    return blocks


def _checks_section(checks: list[str], compared: list[list[str]]) -> list[Block]:
    blocks: list[Block] = [
        Heading("Checks"),
        Text("Before comparing, the report checks each run's files against what the run says "
             "it wrote (metrics.jsonl steps strictly increasing; each val/step_N.jsonl with as "
             "many items as the validation set, and the accuracy and reward its items give "
             "equal to the metrics' for that step), that the seeds pooled into one point "
             "differ in nothing but the seed (config, and the data in inputs.json), and that "
             "two compared points of one sweep differ only in the keys the sweep sets apart "
             "for them (their variant's and dose's overrides). A run that fails is left out of "
             "every table and test below; a flagged comparison is kept, with its warning."),
    ]
    blocks += [Alert(c) for c in checks] or [Text("All checks passed.")]
    if compared:
        blocks += [Text("Config keys in which each compared point differs from the point it "
                        "is compared with (first seed of each; the seed and the run's "
                        "location left out):"),
                   Table(["point", "compared with", "config keys that differ"], compared)]
    return blocks


def _accuracy_section(groups: dict[str, dict[int, RunData]], baseline: str) -> list[Block]:
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
            cell = fmt_pct(means[variant])
            if len(vals) > 1:
                cell += f" [{fmt_pct(min(vals))}-{fmt_pct(max(vals))}]"
            if len(vals) < len(runs):
                cell += f" (n={len(vals)})"
            cells.append(cell)
        for v in others:
            both = v in means and baseline in means
            cells.append(fmt_pts(means[v] - means[baseline]) if both else "n/a")
        rows.append(cells)
    headers = ["step"] + [f"{v} acc %" for v in groups] + [f"Δ {v} (points)" for v in others]
    return [
        Heading("1. Validation accuracy per step"),
        Text("Mean over seeds, with the seed range [min-max] when there are several seeds; "
              f"Δ is against the baseline ({baseline})."),
        Table(headers, rows),
        Image("accuracy.png", "Validation accuracy (thin: seeds, thick: seed mean)"),
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
    return f"{fmt_num(avg(firsts))} -> {fmt_num(avg(lasts))}"


def _training_section(groups: dict[str, dict[int, RunData]]) -> list[Block]:
    entropy = {v: mean_curve(r.series(keys.ENTROPY) for r in runs.values())
               for v, runs in groups.items()}
    steps = sorted({s for c in entropy.values() for s in c})
    stride = max(1, math.ceil(len(steps) / _TABLE_ROWS))
    shown = steps[::stride]
    if steps and shown[-1] != steps[-1]:
        shown.append(steps[-1])
    entropy_rows = [[str(s)] + [fmt_num(entropy[v].get(s)) for v in groups] for s in shown]
    mismatch_rows = [[v] + [fmt_num(training_mean(runs, k)) for k in MISMATCH_KEYS]
                     for v, runs in groups.items()]
    return [
        Heading("3. Training signal, entropy and rollout-training mismatch"),
        Text("What to look at first when RL does not learn: per variant, the mean over the "
              "first and the last tenth of the training steps (then over seeds). Groups with "
              "zero advantage (all completions scored alike) give no gradient."),
        Table(["variant"] + [f"{k} first -> last" for k in SIGNAL_KEYS],
               [[v] + [_first_last(runs, k) for k in SIGNAL_KEYS] for v, runs in groups.items()]),
        *(_seed_curves(f) for f in ("reward.png", "train_accuracy.png", "zero_adv.png",
                                    "clipfrac.png", "response_length.png")),
        Text(f"{keys.ENTROPY} per training step, mean over seeds (one row every {stride} "
              "step(s), and the last)."),
        Table(["step"] + list(groups), entropy_rows),
        _seed_curves("entropy.png"),
        Text("Mismatch between the rollout and training policies: mean over training steps, "
              "then over seeds."),
        Table(["variant"] + list(MISMATCH_KEYS), mismatch_rows),
        _seed_curves("mismatch.png"),
    ]


def _seed_curves(file: str) -> Image:
    """A per-step plot of PLOTS: one thin line per run, a thick one per variant."""
    return Image(file, f"{PLOTS[file][0]} (thin: seeds, thick: seed mean)")


def _sigma_section(groups: dict[str, dict[int, RunData]], warnings: list[str]) -> list[Block]:
    blocks: list[Block] = [
        Heading("4. AQN noise actually applied"),
        Text("Read from the aqn/* metrics of each step (not recomputed from the config): "
              "per stage, the first step, sigma, and the mean over steps and seeds of the "
              "measured std of the applied noise, of the fraction of weights it changed and "
              "of the number of modules it targets (counted on the engine's model: vLLM's "
              "own with name=vllm)."),
    ]
    blocks += [Alert(w) for w in warnings]
    unseen = [r.name for runs in groups.values() for r in runs.values()
              if r.logged_by != "aqn" and not r.aqn_enabled]
    if unseen:
        blocks.append(Text(
            "Read from a verl or TRL log without aqn/* metrics, so whether noise was applied "
            f"is not known here: {', '.join(unseen)} (aqn.integrations.verl writes them "
            "beside verl's JSONL as <experiment>.aqn.jsonl; aqn.integrations.trl logs them "
            "through TRL)."))
    for variant, runs in groups.items():
        if not any(r.aqn_enabled for r in runs.values()):
            continue
        preset = first_run(runs).setting("trainer.noise_injection.preset", "n/a")
        stages: dict[int, dict[str, list[float]]] = {}
        for r in runs.values():
            for row in r.training_rows():
                if row.get(keys.AQN_STAGE) is None:
                    continue
                st = stages.setdefault(int(row[keys.AQN_STAGE]), {"step": [], "sigma": [],
                                                                "eff": [], "frac": [],
                                                                "modules": []})
                # the schedule's step (0-based); a metrics row is logged as that step + 1
                st["step"].append(int(row.get(keys.AQN_STEP, row["step"] - 1)))
                for name, key in (("sigma", keys.AQN_SIGMA), ("eff", keys.AQN_EFFECTIVE_STD),
                                  ("frac", keys.AQN_FRAC_CHANGED),
                                  ("modules", keys.AQN_NUM_MODULES)):
                    if row.get(key) is not None:
                        st[name].append(row[key])
        blocks.append(Heading(f"{variant} (preset {preset})", 3))
        if not stages:
            blocks.append(Text("No aqn/* metrics recorded."))
            continue
        blocks.append(Table(
            ["stage", "from schedule step", "sigma", "mean effective std",
             "mean frac changed", "modules"],
            [[str(k), str(min(st["step"])), fmt_num(avg(st["sigma"])), fmt_num(avg(st["eff"])),
              fmt_num(avg(st["frac"])), fmt_num(avg(st["modules"]))]
             for k, st in sorted(stages.items())],
        ))
        blocks += _aqn_layer_table(runs)
    blocks.append(Image("sigma.png", f"{keys.AQN_SIGMA} per step (thin: seeds, thick: seed mean)"))
    return blocks


def _aqn_layer_table(runs: dict[int, RunData]) -> list[Block]:
    """Per layer (runs with layer_multipliers): the sigma the engine applied and the std it
    measured after the cast, mean over the steps with noise and then seeds."""
    layers: dict[str, dict[str, list[float]]] = {}
    for r in runs.values():
        per_run: dict[str, dict[str, list[float]]] = {}
        for row in r.training_rows():
            if not row.get(keys.AQN_SIGMA):
                continue
            for k, v in row.items():
                m = keys.AQN_LAYER.fullmatch(k)
                if m and v is not None:
                    name = m["layer"] if m["layer"] is not None else "final"
                    per_run.setdefault(name, {}).setdefault(m["what"], []).append(v)
        for name, values in per_run.items():
            for what, vs in values.items():
                layers.setdefault(name, {}).setdefault(what, []).append(avg(vs))
    if not layers:
        return []
    order = sorted(layers, key=lambda n: (n == "final", int(n) if n.isdigit() else 0))
    return [Text("Per layer (layer_multipliers): sigma applied by the engine and the measured "
                 "std of the noise, mean over the steps with noise, then seeds."),
            Table(["layer", "sigma applied", "mean effective std"],
                  [[n, fmt_num(avg(layers[n].get("sigma", []))),
                    fmt_num(avg(layers[n].get("effective_std", [])))] for n in order])]


def _perturbation_sections(groups: dict[str, dict[int, RunData]]) -> list[Block]:
    """One section per registered perturbation that a run logged: its metrics (unless they
    have a section of their own: AQN's is section 4) and its proof of firing, mean over
    training steps and then seeds, per variant."""
    blocks: list[Block] = []
    for spec in REGISTRY:
        prefixes = ((keys.firing(spec.name),) if spec.own_report_section
                    else (spec.metric_prefix, keys.firing(spec.name)))
        found = sorted({k for runs in groups.values() for r in runs.values()
                        for row in r.training_rows() for k in row if k.startswith(prefixes)})
        if not found:
            continue
        rows = [[v] + [fmt_num(training_mean(runs, k)) for k in found]
                for v, runs in groups.items()]
        blocks += [Heading(f"4{chr(ord('a') + len(blocks) // 3)}. {spec.report_section}"),
                   Text(("" if spec.own_report_section else
                         f"The {spec.metric_prefix}* metrics the {spec.side} logged, and ")
                        + f"perturb/{spec.name}/*, what it touched in each step: modules, hook "
                        f"calls, elements, elements changed ({spec.kind}, {spec.config_key}; "
                        f"{'kept' if spec.in_validation else 'off'} in validation): mean over "
                        "training steps, then seeds."),
                   Table(["variant"] + found, rows)]
    return blocks


def _speed_section(runs: list[RunData]) -> list[Block]:
    per_run = {id(r): {k: avg(r.series(k).values()) for k in SPEED_KEYS} for r in runs}
    cells: dict[tuple[str, str], list[RunData]] = {}
    for r in runs:
        cells.setdefault((r.point, machine_label(r.machine)), []).append(r)

    def mean_of(group: list[RunData], key: str) -> float | None:
        return avg(v for r in group if (v := per_run[id(r)][key]) is not None)

    blocks: list[Block] = [
        Heading("5. Speed"),
        Text("Mean over training steps, then over runs."),
        Table(
            ["variant", "machine", "runs", "step time (s)", "gen time (s)", "throughput (tok/s)"],
            [[v, m, str(len(g))] + [fmt_num(mean_of(g, k)) for k in SPEED_KEYS]
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
    blocks.append(Text(f"Ratios between machines, same variant: B / A with A = {ref}."))
    if ratio_rows:
        blocks.append(Table(["variant", "machine B", "step time B/A", "gen time B/A",
                              "throughput B/A"], ratio_rows))
    else:
        blocks.append(Text("No variant ran on two machines: no like-for-like ratio."))
    return blocks


def _failed_section(runs: list[RunData]) -> list[Block]:
    failed = [r for r in runs if r.status == "failed"]
    blocks: list[Block] = [Heading("6. Failed runs")]
    if not failed:
        return blocks + [Text("None.")]
    return blocks + [Table(["run", "path", "error"],
                            [[r.name, str(r.path), r.error or "(no error recorded)"]
                             for r in failed])]


def build_report(
    paths: Sequence[str | Path], out_dir: str | Path, baseline: str | None = None,
    target_mde: float = TARGET_MDE_POINTS,
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
    trusted, checks = check_runs(ok)
    found = compare_points(trusted, baseline)
    groups, base, rows = found.groups, found.baseline, found.rows
    compared, comparison_checks = check_comparisons(
        (groups[r.variant], groups[r.against]) for r in rows if r.against)
    checks += comparison_checks
    left_out = {id(r) for r in ok} - {id(r) for r in trusted}
    warnings = noise_warnings(runs)

    blocks: list[Block] = [Heading("AQN run report", 1)]
    if checks:
        blocks.append(Alert(f"{len(left_out)} run(s) left out of the comparisons and "
                            f"{len(comparison_checks)} comparison(s) flagged by the checks: "
                            "see Checks."))
    if warnings:
        blocks.append(Alert(f"{len(warnings)} run(s) had AQN enabled but zero, swallowed or "
                               "unmeasured noise: see section 4."))
    headline = "No completed runs to compare."
    learning = None
    if groups:
        clean = clean_points(groups)
        learning = learning_result(base, groups[base])
        learned = Text(learning.sentence())
        blocks.append(learned)
        # Whether the baseline learned comes first: variants compared on a baseline that
        # did not learn say little.
        headline = to_markdown([learned, _headline_table(rows)]
                                + [Text(n) for n in _headline_notes(rows, target_mde)])
    blocks.append(Text(
        f"{len(runs)} runs ({len(runs) - len(ok)} failed, {len(left_out)} left out by the "
        f"checks), {len(groups)} variants; "
        f"baseline: {base or 'n/a'}. Accuracies in percent; Δ in points."
    ))
    blocks += _runs_section(runs, groups, left_out)
    blocks += _checks_section(checks, compared)
    if groups:
        # per-step curves of the clean points only when a dose sweep has dozens of groups
        _write_plots(clean if len(clean) < len(groups) else groups, out_dir)
        blocks += _accuracy_section(groups, base)
        blocks += [Heading("2. Final and peak accuracy, and significance vs the baseline"),
                   _headline_table(rows)]
        blocks += [Text(n) for n in _headline_notes(rows, target_mde)]
        blocks += robustness_section(groups, base, {r.variant: r for r in rows}, out_dir,
                                     target_mde)
        blocks += _training_section(groups)
        blocks += _sigma_section(groups, warnings)
        blocks += _perturbation_sections(groups)
    else:
        blocks += [Alert(w) for w in warnings]
    blocks += _speed_section(trusted)
    blocks += _failed_section(runs)

    markdown = to_markdown(blocks)
    page = to_html(blocks, out_dir, "AQN run report")
    write_atomic(out_dir / "report.md", markdown)
    write_atomic(out_dir / "report.html", page)
    write_atomic(out_dir / "summary.json", json.dumps(
        summary(rows, groups, learning, target_mde) | {"checks": checks}, indent=1) + "\n")
    written = [out_dir / "report.md", out_dir / "report.html", out_dir / "summary.json"]
    if groups:
        written += [out_dir / file for file in PLOTS]
        written += sorted(out_dir.glob("robustness_*.png"))
    return Report(markdown, page, headline, rows, base, learning, warnings, written, checks)
