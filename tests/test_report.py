"""The report over a fixture of run directories whose accuracies are known exactly."""

import json
import re
from pathlib import Path

import pytest
import yaml

from aqn.experiments.report import build_report
from aqn.experiments.runs import RunLoadError, find_runs

N_ITEMS = 100
STEPS = 10
CPU = {"device": "cpu", "hostname": "a", "cpu": "Intel Xeon", "threads": 2}
GPU = {"device": "NVIDIA H100", "hostname": "b", "cpu": "AMD EPYC", "threads": 16}


def write_run(
    root: Path,
    variant: str,
    seed: int,
    correct_at: dict[int, int],  # validation step -> number of items correct (the first k)
    aqn: bool = False,
    machine: dict | None = None,
    status: str = "done",
    error: str | None = None,
    swallowed_steps: range = range(0),
    aqn_metrics: bool = True,
) -> Path:
    run = root / f"{variant}-s{seed}"
    (run / "val").mkdir(parents=True)
    config = {
        "actor_rollout_ref": {"model": {"path": "tiny-base", "dtype": "float32"}},
        "trainer": {
            "experiment_name": variant,
            "seed": seed,
            "total_training_steps": STEPS,
            "noise_injection": {"enabled": aqn, "preset": "small"},
        },
    }
    (run / "config.yaml").write_text("# aqn config, hash 0\n" + yaml.safe_dump(config))
    slow = machine is CPU
    rows = []
    for step in range(STEPS + 1):
        row: dict = {"step": step}
        if step:
            row |= {
                "actor/entropy": 0.5 - 0.01 * step,
                "critic/score/mean": 0.5,
                "rollout_corr/abs_logp_diff_mean": 0.01 if aqn else 0.0,
                "rollout_corr/k3_kl": 0.001 if aqn else 0.0,
                "rollout_corr/kl": 0.0,
                "training/rollout_probs_diff_mean": 0.002 if aqn else 0.0,
                "timing_s/step": 2.0 if slow else 0.5,
                "timing_s/gen": 1.0 if slow else 0.2,
                "perf/throughput": 1000.0 if slow else 4000.0,
            }
        if step and aqn and aqn_metrics:
            stage = 0 if step <= 5 else 1
            sigma = 0.0 if stage == 0 else 0.01
            fine = step not in swallowed_steps
            row |= {
                "aqn/stage": float(stage),
                "aqn/sigma": sigma,
                "aqn/effective_std": sigma if fine else 0.0,
                "aqn/drawn_std": sigma,
                "aqn/frac_changed": (1.0 if fine else 0.0) if sigma else 0.0,
                "aqn/swallowed": float(bool(sigma) and not fine),
            }
        if step in correct_at:
            row["val-core/arith/reward/mean@1"] = correct_at[step] / N_ITEMS
            items = [
                {"id": f"q{i}", "prompt": "p", "response": "r", "extracted": "1",
                 "ground_truth": "1", "score": float(i < correct_at[step]),
                 "correct": i < correct_at[step]}
                for i in range(N_ITEMS)
            ]
            (run / "val" / f"step_{step}.jsonl").write_text(
                "".join(json.dumps(it) + "\n" for it in items)
            )
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if machine is not None:
        (run / "machine.json").write_text(json.dumps(machine))
    (run / "run.json").write_text(
        json.dumps({"variant": variant, "seed": seed, "status": status, "error": error})
    )
    return run


@pytest.fixture(scope="module")
def fixture_runs(tmp_path_factory) -> list[Path]:
    """A sweep of baseline, aqn and tiny (2 seeds each; seed 1 on a CPU, seed 2 on a GPU),
    plus a failed run, and one aqn run given on its own as if copied from elsewhere."""
    root = tmp_path_factory.mktemp("runs")
    sweep, extra = root / "sweep", root / "copied"
    write_run(sweep, "baseline", 1, {0: 30, 10: 40}, machine=CPU)
    write_run(sweep, "baseline", 2, {0: 30, 10: 42}, machine=GPU)
    write_run(sweep, "aqn", 1, {0: 30, 10: 80}, aqn=True, machine=CPU)
    aqn2 = write_run(extra, "aqn", 2, {0: 30, 10: 81}, aqn=True, machine=GPU)
    write_run(sweep, "tiny", 1, {0: 30, 10: 41}, aqn=True, machine=CPU)
    write_run(sweep, "tiny", 2, {0: 30, 10: 41}, aqn=True, machine=GPU,
              swallowed_steps=range(6, 11))
    write_run(sweep, "strong", 1, {0: 30}, aqn=True, machine=CPU, status="failed",
              error="TrainingError: non-finite loss at step 3")
    return [sweep, aqn2]


@pytest.fixture(scope="module")
def report(fixture_runs, tmp_path_factory):
    return build_report(fixture_runs, tmp_path_factory.mktemp("report"))


def test_find_runs_mixes_sweeps_and_runs(fixture_runs, tmp_path):
    runs = find_runs(fixture_runs + fixture_runs[:1])  # a path given twice loads once
    assert [r.name for r in runs] == [
        "aqn/seed1", "aqn/seed2", "baseline/seed1", "baseline/seed2", "strong/seed1",
        "tiny/seed1", "tiny/seed2",
    ]
    aqn1 = runs[0]
    assert aqn1.data_source == "arith" and aqn1.accuracy == {0: 0.3, 10: 0.8}
    assert aqn1.aqn_enabled and len(aqn1.val[10]) == N_ITEMS and aqn1.machine == CPU
    with pytest.raises(RunLoadError, match=str(tmp_path)):
        find_runs([tmp_path])


def test_accuracy_table(report):
    md = report.markdown
    table = md[md.index("## 1."):md.index("## 2.")]
    step10 = next(line for line in table.splitlines() if line.startswith("| 10 |"))
    cells = [c.strip() for c in step10.strip("|").split("|")]
    # Columns: step, baseline, aqn, tiny, then Δ aqn, Δ tiny.
    assert cells == ["10", "41.00 [40.00-42.00]", "80.50 [80.00-81.00]",
                     "41.00 [41.00-41.00]", "+39.50", "+0.00"]


def test_headline_rows_and_significance(report):
    assert report.baseline == "baseline"
    rows = {r.variant: r for r in report.rows}
    assert list(rows) == ["baseline", "aqn", "tiny"]  # the failed variant is left out
    base, aqn, tiny = rows["baseline"], rows["aqn"], rows["tiny"]
    assert base.n_seeds == 2 and base.final_mean == pytest.approx(0.41)
    assert base.peak_mean == pytest.approx(0.41) and base.peak_step == 10
    assert base.se == pytest.approx((0.41 * 0.59 / N_ITEMS) ** 0.5)
    assert aqn.final_mean == pytest.approx(0.805) and aqn.delta == pytest.approx(0.395)
    # Seed differences 0.40 and 0.39: t = 79 with 1 degree of freedom.
    assert aqn.p_seeds == pytest.approx(0.00806, abs=1e-4) and aqn.significant
    assert aqn.p_mcnemar < 1e-20 and set(aqn.p_mcnemar_by_seed) == {1, 2}
    assert aqn.bootstrap.ci_low <= 0.395 <= aqn.bootstrap.ci_high
    assert tiny.delta == pytest.approx(0.0) and tiny.p_seeds == pytest.approx(1.0)
    assert tiny.significant is False
    assert "yes (p=0.0081)" in report.headline and "no (p=1)" in report.headline
    assert "tiny: +0.00 points on 100 items is within noise: SE 4.92 points" in report.headline


def test_baseline_choice(fixture_runs, tmp_path):
    r = build_report(fixture_runs, tmp_path / "a", baseline="aqn")
    assert r.rows[0].variant == "aqn" and r.rows[1].delta == pytest.approx(-0.395)
    with pytest.raises(ValueError, match="nope"):
        build_report(fixture_runs, tmp_path / "b", baseline="nope")


def test_files_and_embedded_plots(report):
    names = {p.name for p in report.paths}
    assert names == {"report.md", "report.html", "accuracy.png", "entropy.png", "sigma.png",
                     "mismatch.png", "reward.png", "train_accuracy.png", "zero_adv.png",
                     "clipfrac.png", "response_length.png"}
    for p in report.paths:
        assert p.stat().st_size > 0
    page = (report.paths[0].parent / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 9
    assert "<style>" in page and 'href="' not in page  # self-contained


def test_swallowed_noise_is_flagged(report):
    warn = [line for line in report.markdown.splitlines() if line.startswith("**WARNING**")]
    flagged = [line for line in warn if "tiny/seed2" in line]
    assert len(flagged) == 1 and "steps 6-10" in flagged[0]
    assert not any("aqn/seed" in line or "tiny/seed1" in line for line in warn)
    page = (report.paths[0].parent / "report.html").read_text()
    assert re.search(r'<p class="warning" style="color:#c00000">[^<]*tiny/seed2', page)


def test_the_report_reads_the_injectors_swallowed_flag(tmp_path):
    """One rule: a step the injector flagged is a warning even where the metrics alone look
    fine to another rule (frac_changed 0.6); an unflagged step is not."""
    run = write_run(tmp_path / "sweep", "flagged", 1, {0: 30, 10: 30}, aqn=True)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if row["step"] == 8:
            row |= {"aqn/frac_changed": 0.6, "aqn/swallowed": 1.0}
        if row["step"] == 9:
            row |= {"aqn/frac_changed": 0.1, "aqn/swallowed": 0.0}
        if row["step"] == 10:
            del row["aqn/swallowed"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = build_report([tmp_path / "sweep"], tmp_path / "out")
    assert len(r.warnings) == 2
    assert "no aqn/swallowed flag" in r.warnings[0] and "steps 10 " in r.warnings[0]
    assert "swallowed by the cast" in r.warnings[1] and "steps 8 (1 of 10" in r.warnings[1]


def test_aqn_that_never_left_its_warm_up_is_flagged(tmp_path):
    run = write_run(tmp_path / "sweep", "warmup", 1, {0: 30, 10: 30}, aqn=True)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # a schedule far longer than the run: stage 0 throughout
        if "aqn/sigma" in row:
            row |= {"aqn/sigma": 0.0, "aqn/stage": 0.0, "aqn/swallowed": 0.0}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = build_report([tmp_path / "sweep"], tmp_path / "out")
    assert len(r.warnings) == 1 and "warmup/seed1" in r.warnings[0]
    assert "aqn/sigma is 0 at every one of its 10 steps" in r.warnings[0]


def test_aqn_without_metrics_is_flagged(tmp_path):
    write_run(tmp_path / "sweep", "silent", 1, {0: 30, 10: 30}, aqn=True, aqn_metrics=False)
    r = build_report([tmp_path / "sweep"], tmp_path / "out")
    assert len(r.warnings) == 1 and "silent/seed1" in r.warnings[0]
    assert "no step has aqn/* metrics" in r.warnings[0]


def test_sigma_schedule_from_metrics(report):
    md = report.markdown
    section = md[md.index("### aqn"):md.index("### tiny")]
    # schedule steps are 0-based: the metrics row of step s is logged as s + 1
    assert "| 0 | 0 | 0 | 0 | 0 |" in section
    assert "| 1 | 5 | 0.01 | 0.01 | 1 |" in section


def test_failed_run_listed(report):
    md = report.markdown
    failed = md[md.index("## 6. Failed runs"):]
    assert "strong/seed1" in failed and "TrainingError: non-finite loss at step 3" in failed


def test_speed_and_machine_ratio(report):
    md = report.markdown
    speed = md[md.index("## 5. Speed"):md.index("## 6.")]
    assert "| baseline | cpu / Intel Xeon / 2 threads | 1 | 2 | 1 | 1000 |" in speed
    # A = the GPU machine (first in sort order), B = the CPU: 4x the step time.
    assert "A = NVIDIA H100 / AMD EPYC / 16 threads" in speed
    assert "| aqn | cpu / Intel Xeon / 2 threads | 4 | 5 | 0.25 |" in speed


def test_headline_says_first_whether_the_baseline_learned(report, fixture_runs, tmp_path):
    # baseline: 30 % at step 0 in both seeds, then 40 % and 42 %: t = 11 with 1 dof
    learning = report.learning
    assert learning.base_mean == pytest.approx(0.30) and learning.final_mean == pytest.approx(0.41)
    assert learning.delta == pytest.approx(0.11)
    assert learning.p_value == pytest.approx(0.0577, abs=1e-4) and learning.learned is False
    assert report.headline.startswith(
        "Baseline (baseline) did NOT learn significantly: +11.00 points over the base model "
        "(30.00 % at step 0 -> 41.00 % final), paired t-test over 2 seeds, p = 0.058")
    assert learning.p_mcnemar < 1e-6  # the items alone cannot see the seed noise
    # aqn as the baseline: 30 -> 80 and 30 -> 81
    r = build_report(fixture_runs, tmp_path / "a", baseline="aqn")
    assert r.learning.learned and r.learning.delta == pytest.approx(0.505)
    assert r.headline.startswith("Baseline (aqn) learned: +50.50 points")
    assert r.headline.index("learned") < r.headline.index("| variant |")


def test_training_signal_table_and_plots(tmp_path):
    run = write_run(tmp_path / "sweep", "baseline", 1, {0: 30, 10: 30})
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:  # zero-advantage groups fall from 0.9 to 0.0 over the 10 steps
        row["actor/zero_adv_frac"] = 1.0 - row["step"] / 10
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = build_report([tmp_path / "sweep"], tmp_path / "out")
    # columns: reward, sampled accuracy, zero-advantage groups, clip fraction, length
    assert "| baseline | 0.5 -> 0.5 | n/a | 0.9 -> 0 | n/a | n/a |" in r.markdown.splitlines()
    assert (tmp_path / "out" / "zero_adv.png").stat().st_size > 0
