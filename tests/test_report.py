"""The report over a fixture of run directories whose accuracies are known exactly."""

import json
import re
from pathlib import Path

import pytest
import yaml

from aqn.experiments.report import build_report
from aqn.experiments.runs import RunLoadError, find_runs
from aqn.experiments.stats import paired_t_mde, seeds_needed
from conftest import peer

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
                "aqn/num_modules": 9.0,
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
    # Seed differences +1 and -1 points: sd 1.41 points over 2 seeds (one degree of freedom)
    sd = 2 ** 0.5
    assert tiny.seed_sd == pytest.approx(sd / 100) and aqn.mde is not None
    assert tiny.mde == pytest.approx(paired_t_mde(sd, 2) / 100)
    assert 100 * tiny.mde > 10  # one degree of freedom: t_{0.975, 1} = 12.7
    assert (f"tiny: +0.00 points vs baseline on 100 items is not significant (paired t-test "
            f"over 2 seeds, p=1): undetermined: it could miss effects up to "
            f"{100 * tiny.mde:.1f} points (MDE); about {seeds_needed(sd, 2.5)} seeds would "
            "detect 2.5 points at the spread seen here (sd 1.4 points over 2 seeds); SE 4.92 "
            "points") in report.headline
    assert "MDE (points, 80 % power)" in report.headline


def test_baseline_choice(fixture_runs, tmp_path):
    r = build_report(fixture_runs, tmp_path / "a", baseline="aqn")
    assert r.rows[0].variant == "aqn" and r.rows[1].delta == pytest.approx(-0.395)
    with pytest.raises(ValueError, match="nope"):
        build_report(fixture_runs, tmp_path / "b", baseline="nope")


def test_files_and_embedded_plots(report):
    names = {p.name for p in report.paths}
    assert names == {"report.md", "report.html", "summary.json", "accuracy.png", "entropy.png",
                     "sigma.png",
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
    assert "| 0 | 0 | 0 | 0 | 0 | 9 |" in section
    assert "| 1 | 5 | 0.01 | 0.01 | 1 | 9 |" in section


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


# --- runs logged by verl and TRL, beside aqn's own ------------------------------------------


def verl_steps(accuracy: dict[int, float], steps: int = STEPS):
    """(step, metrics) as verl's trainer logs them: validation at step 0 and at the steps of
    ``accuracy`` (verl's gsm8k data source), training metrics (numpy, as verl's are) at
    steps 1..steps, and a non-numeric value that the report leaves out."""
    np = pytest.importorskip("numpy")
    for step in range(steps + 1):
        data = {}
        if step:
            data = {"critic/score/mean": np.float32(0.25 * step), "actor/entropy": 1.0 / step,
                    "timing_s/step": 3.0, "actor/pg_clipfrac": np.float64(0.01),
                    "training/rollout_probs_diff_mean": 0.004}
        if step in accuracy:
            data["val-core/openai/gsm8k/acc/mean@1"] = np.float64(accuracy[step])
            data["val-aux/openai/gsm8k/acc/mean@4"] = 0.99  # not the headline n
        data["note"] = "text"
        yield step, data


def verl_log(path: Path, accuracy: dict[int, float], monkeypatch, steps: int = STEPS) -> Path:
    """A log written by verl 0.9.1's own FileLogger."""
    tracking = peer("verl.utils.tracking")
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    logger = tracking.FileLogger("aqn", path.stem)
    for step, data in verl_steps(accuracy, steps):
        logger.log(data=data, step=step)
    logger.finish()
    return path


def test_verl_file_logs_are_runs_named_by_their_file(tmp_path, monkeypatch):
    logs = tmp_path / "verl"
    logs.mkdir()
    verl_log(logs / "baseline-seed1.jsonl", {0: 0.30, 10: 0.40}, monkeypatch)
    verl_log(logs / "baseline-seed2.jsonl", {0: 0.30, 10: 0.44}, monkeypatch)
    verl_log(logs / "aqn-qerl-seed1.jsonl", {0: 0.30, 5: 0.5, 10: 0.60}, monkeypatch)
    verl_log(logs / "aqn-qerl-seed2.jsonl", {0: 0.30, 10: 0.62}, monkeypatch)
    runs = find_runs(sorted(logs.iterdir()))
    assert [(r.name, r.engine) for r in runs] == [
        ("aqn-qerl/seed1", "verl (jsonl)"), ("aqn-qerl/seed2", "verl (jsonl)"),
        ("baseline/seed1", "verl (jsonl)"), ("baseline/seed2", "verl (jsonl)")]
    aqn1 = runs[0]
    assert aqn1.data_source == "openai/gsm8k"
    assert aqn1.accuracy == {0: 0.30, 5: 0.5, 10: 0.60}
    assert aqn1.series("critic/score/mean")[4] == 1.0 and "note" not in aqn1.metrics[1]
    assert not aqn1.aqn_enabled  # verl's log carries no aqn/* metrics: not known
    r = build_report(sorted(logs.iterdir()), tmp_path / "out")
    assert r.baseline == "baseline" and r.learning.final_mean == pytest.approx(0.42)
    [aqn_row] = r.rows[1:]
    assert aqn_row.delta == pytest.approx(0.19) and aqn_row.n_seeds == 2
    assert aqn_row.seeds.p_value is not None  # decided by the seed test (no per-item files)
    assert "| aqn-qerl/seed1 | verl (jsonl) | unknown | openai/gsm8k | 10 | 60.00 |" in r.markdown
    unknown = next(line for line in r.markdown.splitlines() if "is not known here" in line)
    assert all(run.name in unknown for run in runs)


def test_a_verl_log_beside_an_aqn_sweep_with_a_label(fixture_runs, tmp_path, monkeypatch):
    log = verl_log(tmp_path / "cluster.jsonl", {0: 0.30, 10: 0.90}, monkeypatch)
    runs = find_runs([fixture_runs[0], f"aqn/seed3={log}"])
    [cluster] = [r for r in runs if r.logged_by == "verl"]
    assert cluster.name == "aqn/seed3" and cluster.path == log
    assert {r.engine for r in runs} == {"verl (jsonl)", "aqn (hf)"}
    r = build_report([fixture_runs[0], f"aqn/seed3={log}"], tmp_path / "out")
    aqn_row = next(row for row in r.rows if row.variant == "aqn")
    assert aqn_row.n_seeds == 2 and aqn_row.final_mean == pytest.approx((0.80 + 0.90) / 2)
    with pytest.raises(RunLoadError, match="a label names one verl or TRL log"):
        find_runs([f"x={fixture_runs[1]}"])


def test_a_torn_last_verl_line_is_left_out_and_a_bad_line_is_named(tmp_path, monkeypatch):
    log = verl_log(tmp_path / "b-seed1.jsonl", {0: 0.3, 10: 0.4}, monkeypatch)
    with open(log, "ab") as f:
        f.write(b'{"step": 11, "data": {"critic/sc')  # killed mid-write
    assert max(r["step"] for r in find_runs([log])[0].metrics) == 10
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:3] + [b'{"step": 3, "values": {}}\n'] + lines[3:-1]))
    with pytest.raises(ValueError, match=rf"{re.escape(str(log))}:4: not a verl file-logger"):
        find_runs([log])
    log.write_bytes(b"".join(lines[:2] + [b"{oops\n"]))
    with pytest.raises(ValueError, match=rf"{re.escape(str(log))}:3: malformed JSON"):
        find_runs([log])


def trl_history(rewards: list[float], eval_rewards: dict[int, float],
                aqn_sigma: float | None = None, last: int | None = None) -> list[dict]:
    """What GRPOTrainer logs (its metric names) at steps 1..last, and its eval rows."""
    history = []
    for step in range(1, (last or len(rewards)) + 1):
        row = {"loss": 0.1, "grad_norm": 1.5, "learning_rate": 1e-6, "epoch": 0.1 * step,
               "reward": rewards[step - 1], "reward_std": 0.2,
               "frac_reward_zero_std": 0.5, "entropy": 0.7, "clip_ratio/region_mean": 0.0,
               "completions/mean_length": 12.0, "step": step}
        if aqn_sigma is not None:
            row |= {"aqn/sigma": aqn_sigma, "aqn/effective_std": aqn_sigma,
                    "aqn/frac_changed": 1.0, "aqn/swallowed": 0.0, "aqn/stage": 1.0}
        history.append(row)
        if step in eval_rewards:
            history.append({"eval_reward": eval_rewards[step], "eval_loss": 0.0,
                            "epoch": 0.1 * step, "step": step})
    if 0 in eval_rewards:
        history.insert(0, {"eval_reward": eval_rewards[0], "step": 0})
    return history


def trl_output(root: Path, rewards: list[float], eval_rewards: dict[int, float],
               aqn_sigma: float | None = None) -> Path:
    """An output_dir as transformers' Trainer leaves it: checkpoint-<step>/trainer_state.json
    written by its own TrainerState, with GRPOTrainer's metric names."""
    transformers = peer("transformers")
    for last in (2, len(rewards)):  # an older checkpoint too: the newest one is read
        state = transformers.TrainerState(
            global_step=last, max_steps=len(rewards),
            log_history=trl_history(rewards, eval_rewards, aqn_sigma, last))
        (root / f"checkpoint-{last}").mkdir(parents=True, exist_ok=True)
        state.save_to_json(str(root / f"checkpoint-{last}" / "trainer_state.json"))
    return root


def test_trl_outputs_are_runs_with_verls_names(tmp_path):
    out = trl_output(tmp_path / "trl-aqn-seed4", [0.1, 0.2, 0.3, 0.4], {0: 0.25, 4: 0.5},
                     aqn_sigma=0.01)
    [run] = find_runs([out])
    assert (run.name, run.engine, run.data_source) == (
        "trl-aqn/seed4", "trl (trainer_state)", "trl-eval")
    assert run.accuracy == {0: 0.25, 4: 0.5}  # eval_reward: 0/1 rewards make it accuracy
    assert run.series("critic/score/mean") == {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}
    assert run.series("actor/zero_adv_frac")[3] == 0.5 and run.series("reward_std")[1] == 0.2
    assert run.aqn_enabled and run.series("aqn/sigma")[4] == 0.01
    plain = trl_output(tmp_path / "plain", [0.1] * 4, {0: 0.25, 4: 0.3})
    r = build_report([out, f"baseline={plain}"], tmp_path / "report")
    assert r.baseline == "baseline" and not r.warnings
    sigma = r.markdown[r.markdown.index("## 4."):]
    assert "### trl-aqn (preset n/a)" in sigma and "| 1 | 0 | 0.01 | 0.01 | 1 |" in sigma
    bad = tmp_path / "bad" / "trainer_state.json"
    bad.parent.mkdir()
    bad.write_text('{"log_history": [{"step": 1}, {"reward": 1.0}]}')
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}: log_history\[1\] has no"):
        find_runs([bad.parent])


# --- the same logs as TensorBoard event files and wandb offline runs -----------------------


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb in offline mode, writing under tmp_path/wandb (nothing leaves the machine)."""
    wandb = peer("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                        "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(name, value)
    yield wandb
    wandb.finish()
    wandb.teardown()  # its settings (WANDB_DIR) are read once per process otherwise


def test_verl_tensorboard_and_wandb_logs_read_as_its_jsonl(tmp_path, monkeypatch,
                                                           offline_wandb):
    """verl's own TensorBoard adapter and wandb logger (Tracking) write the same run as its
    file logger; the report reads the same values from all three."""
    tracking = peer("verl.utils.tracking")
    peer("tensorboard")
    accuracy = {0: 0.30, 5: 0.5, 10: 0.60}
    jsonl = find_runs([verl_log(tmp_path / "aqn-qerl-seed1.jsonl", accuracy, monkeypatch)])[0]
    monkeypatch.setenv("TENSORBOARD_DIR", str(tmp_path / "tensorboard_log/aqn/aqn-qerl-seed1"))
    logger = tracking.Tracking("aqn", "aqn-qerl-seed1", default_backend=["tensorboard",
                                                                          "wandb"])
    for step, data in verl_steps(accuracy):
        logger.log(data={k: v for k, v in data.items() if k != "note"}, step=step,
                   backend=["tensorboard"])  # add_scalar takes numbers only
        logger.log(data=data, step=step, backend=["wandb"])
    logger.finish()
    tb_runs = find_runs([tmp_path / "tensorboard_log/aqn"])  # a project: its experiments
    wandb_runs = find_runs([tmp_path / "wandb"])  # wandb/: its offline runs
    assert [(r.name, r.engine) for r in tb_runs + wandb_runs] == [
        ("aqn-qerl/seed1", "verl (tensorboard)"), ("aqn-qerl/seed1", "verl (wandb)")]
    for run in tb_runs + wandb_runs:
        assert run.data_source == "openai/gsm8k"
        assert run.accuracy == pytest.approx(jsonl.accuracy)  # TensorBoard keeps float32
        assert [sorted(row) for row in run.metrics] == [sorted(row) for row in jsonl.metrics]
        assert run.series("critic/score/mean") == pytest.approx(
            jsonl.series("critic/score/mean"))


def test_trl_tensorboard_and_wandb_logs_get_verls_names(tmp_path, offline_wandb):
    """transformers' own TensorBoardCallback and WandbCallback (what TRL's report_to uses)
    prefix train/ and eval/; the report takes them off and maps TRL's names to verl's."""
    transformers = peer("transformers")
    peer("tensorboard")
    from transformers.integrations import TensorBoardCallback, WandbCallback

    out = tmp_path / "trl-aqn-seed4"
    args = transformers.TrainingArguments(output_dir=str(out), run_name=out.name, report_to=[])
    state = transformers.TrainerState(max_steps=4)
    control = transformers.TrainerControl()
    callbacks = [TensorBoardCallback(), WandbCallback()]
    for callback in callbacks:
        callback.on_train_begin(args, state, control)
    for row in trl_history([0.1, 0.2, 0.3, 0.4], {0: 0.25, 4: 0.5}, aqn_sigma=0.01):
        state.global_step = row.pop("step")
        for callback in callbacks:
            callback.on_log(args, state, control, logs=row)
    for callback in callbacks:
        callback.on_train_end(args, state, control)
    offline_wandb.finish()  # as Trainer's run ends (WandbCallback leaves the run open)
    [tb_dir] = (out / "runs").iterdir()  # runs/<time>_<host>/: named by the output_dir
    runs = find_runs([tb_dir, next((tmp_path / "wandb").glob("offline-run-*"))])
    assert [(r.name, r.engine) for r in runs] == [
        ("trl-aqn/seed4", "trl (tensorboard)"), ("trl-aqn/seed4", "trl (wandb)")]
    state_run = find_runs([trl_output(tmp_path / "state", [0.1, 0.2, 0.3, 0.4],
                                      {0: 0.25, 4: 0.5}, aqn_sigma=0.01)])[0]
    for run in runs:
        assert run.data_source == "trl-eval" and run.accuracy == {0: 0.25, 4: 0.5}
        assert run.series("critic/score/mean") == pytest.approx(
            state_run.series("critic/score/mean"))
        assert run.series("aqn/sigma") == pytest.approx({s: 0.01 for s in range(1, 5)})
        assert run.aqn_enabled and run.series("actor/zero_adv_frac")[3] == 0.5
        assert set(run.metrics[1]) >= set(state_run.metrics[1]) - {"epoch"}


def test_torn_and_corrupt_tensorboard_and_wandb_files(tmp_path, monkeypatch, offline_wandb):
    """A file cut off mid-record (a run killed, or still writing) reads up to the cut; a
    wandb record whose checksum fails is an error naming the file and byte."""
    tracking = peer("verl.utils.tracking")
    peer("tensorboard")
    monkeypatch.setenv("TENSORBOARD_DIR", str(tmp_path / "tb" / "b-seed1"))
    logger = tracking.Tracking("aqn", "b-seed1", default_backend=["tensorboard", "wandb"])
    for step, data in verl_steps({0: 0.3, 10: 0.4}):
        logger.log(data={k: v for k, v in data.items() if k != "note"}, step=step)
    logger.finish()
    [events] = (tmp_path / "tb" / "b-seed1").iterdir()
    [wandb_log] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    for path in (events, wandb_log):
        whole = path.read_bytes()
        full = find_runs([path])[0]
        assert full.accuracy == pytest.approx({0: 0.3, 10: 0.4})
        path.write_bytes(whole[:len(whole) * 2 // 3])
        cut = find_runs([path])[0]
        assert 1 <= max(r["step"] for r in cut.metrics) < 10 and cut.accuracy == {
            0: pytest.approx(0.3)}
        path.write_bytes(whole)
    whole = bytearray(wandb_log.read_bytes())
    whole[7 + 7 + 1] ^= 0xFF  # in the first record's data (after the file and chunk headers)
    wandb_log.write_bytes(bytes(whole))
    with pytest.raises(ValueError, match=rf"{re.escape(str(wandb_log))}: byte 7: a corrupt"):
        find_runs([wandb_log])


def test_tensor_scalars_read_as_simple_values(tmp_path):
    """Scalars written as tensors (torch's new_style, tf.summary v2) are read too; a
    histogram (not a scalar) is not a metric."""
    peer("tensorboard")
    import torch
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb" / "x-seed3"))
    for step in range(1, 4):
        writer.add_scalar("critic/score/mean", 0.5 * step, step, new_style=True)
        writer.add_scalar("val-core/gsm8k/acc/mean@1", 0.25 * step, step)
        writer.add_histogram("weights", torch.tensor([0.1 * step, 0.2]), step)
    writer.close()
    [run] = find_runs([tmp_path / "tb" / "x-seed3"])
    assert (run.name, run.accuracy) == ("x/seed3", {1: 0.25, 2: 0.5, 3: 0.75})
    assert run.series("critic/score/mean") == {1: 0.5, 2: 1.0, 3: 1.5}
    assert {k for row in run.metrics for k in row} == {
        "step", "critic/score/mean", "val-core/gsm8k/acc/mean@1"}


def test_an_unknown_baseline_is_the_users_error_not_a_bug():
    from aqn.errors import InputError
    from aqn.experiments.analysis import pick_baseline

    with pytest.raises(InputError, match="'nosuch' is not among the variants.*: a, b"):
        pick_baseline({"a": {}, "b": {}}, "nosuch")
    assert pick_baseline({"a": {}, "baseline": {}}, None) == "baseline"
