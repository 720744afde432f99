import json

import pytest
import yaml

from aqn.config import ConfigError
from aqn.experiments.sweep import (
    RunKey,
    SweepSpec,
    load_sweep,
    out_dir_of,
    run_config,
    run_status,
    run_sweep,
)
from aqn.rl.tracking import read_metrics
from aqn.rl.trainer import GRPOTrainer


def quick(tmp_path, **kw) -> SweepSpec:
    spec = load_sweep("quick")
    return SweepSpec(**{**spec.__dict__, "out_dir": str(tmp_path / "sweep"), **kw})


def test_sweep_runs_every_pair_and_records_the_machine(tmp_path):
    spec = quick(tmp_path, seeds=(1, 2))
    results = run_sweep(spec)
    assert results == {"baseline__seed1": "done", "baseline__seed2": "done",
                       "AQN-QeRL__seed1": "done", "AQN-QeRL__seed2": "done"}
    run = out_dir_of(spec) / "AQN-QeRL__seed2"
    assert json.loads((run / "run.json").read_text()) == {
        "variant": "AQN-QeRL", "seed": 2, "status": "done", "error": None}
    machine = json.loads((run / "machine.json").read_text())
    # the device the run's config resolved to (trainer.device), not merely this machine's
    device = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["device"]
    assert machine["device"] == device == "cpu"
    assert machine["threads"] >= 1 and machine["torch"]
    assert "aqn/sigma" in read_metrics(run)[-1]
    assert run_sweep(spec) == {k: "skipped" for k in results}


def test_sweep_resumes_a_killed_run_and_survives_a_failed_one(tmp_path, monkeypatch):
    spec = quick(tmp_path, variants={
        "baseline": (), "broken": ("trainer.noise_injection.enabled=true",
                                   "trainer.noise_injection.class_patterns=[layernorm]"),
        "AQN-QeRL": ("trainer.noise_injection.enabled=true",)})
    original = GRPOTrainer.step

    def killed_in_aqn(self, step):
        if self.cfg.trainer.noise_injection.enabled and step == 1:
            raise KeyboardInterrupt  # the machine went away mid-run
        return original(self, step)

    monkeypatch.setattr(GRPOTrainer, "step", killed_in_aqn)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec)
    out = out_dir_of(spec)
    assert run_status(out / "baseline__seed1") == "done"
    assert run_status(out / "broken__seed1") == "failed"
    assert "LlamaRMSNorm x9" in json.loads((out / "broken__seed1/run.json").read_text())["error"]
    assert run_status(out / "AQN-QeRL__seed1") == "running"

    monkeypatch.setattr(GRPOTrainer, "step", original)
    assert run_sweep(spec) == {"baseline__seed1": "skipped", "broken__seed1": "failed",
                               "AQN-QeRL__seed1": "done"}
    steps = [r["step"] for r in read_metrics(out / "AQN-QeRL__seed1")]
    assert steps == [0, 1, 2]  # resumed from the step-1 checkpoint, nothing logged twice


def test_bad_sweep_files(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: x\nseeds: [1]\n")  # a silent default base would run another model
    with pytest.raises(ConfigError, match=f"'base': {f}: a sweep file must name its base"):
        load_sweep(f)
    f.write_text("name: x\nbase: smoke\nseeds: []\n")
    with pytest.raises(ConfigError, match="'seeds': must list at least one seed"):
        load_sweep(f)
    f.write_text("name: x\nbase: smoke\nvariants:\n  a: [trainer.sed=1]\n")
    with pytest.raises(ConfigError, match="did you mean 'seed'"):
        run_sweep(load_sweep(f))
    with pytest.raises(ConfigError, match="presets: "):
        load_sweep("no-such-sweep")


def test_cli_sweep_with_report(tmp_path, monkeypatch, capsys):
    from aqn.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--preset", "quick", "--report"]) == 0
    out = capsys.readouterr().out
    assert "| variant |" in out and "AQN-QeRL" in out
    report = tmp_path / "runs/sweeps/quick/report"
    assert (report / "report.md").exists() and (report / "accuracy.png").exists()
    assert main(["report", "runs/sweeps/quick", "--out", "again"]) == 0
    assert (tmp_path / "again" / "report.html").exists()
    assert main(["sweep"]) == 2


def test_shipped_sweeps_validate_at_every_scale():
    from aqn.experiments.sweep import at_scale, sweep_presets

    for name in sweep_presets():
        spec = load_sweep(name)
        for scaled in [spec] + [at_scale(spec, s) for s in spec.scales]:
            for run in scaled.runs():
                run_config(scaled, run, resume=False)  # raises on a bad override
    hw = at_scale(load_sweep("hw-hetero"), "smollm2")
    assert (hw.name, hw.base, list(hw.variants)) == (
        "hw-hetero-smollm2", "smollm2-arith",
        ["clean", "baseline", "AQN", "AQN-TIS", "TIS", "MIS", "FP16"])
    clean = run_config(hw, RunKey("clean", 1), resume=False).actor_rollout_ref
    base = run_config(hw, RunKey("baseline", 1), resume=False).actor_rollout_ref
    assert (clean.rollout.numerics, base.rollout.numerics) == ("reference", "npu-naive")
    assert base.model.path == "smollm2-135m-instruct"
    fp16 = run_config(hw, RunKey("FP16", 1), resume=False)
    mis = run_config(hw, RunKey("MIS", 1), resume=False).algorithm.rollout_correction
    assert (fp16.actor_rollout_ref.rollout_dtype, fp16.actor_rollout_ref.rollout.numerics) == (
        "float16", "npu-naive")
    assert (mis.rollout_rs, mis.rollout_rs_threshold) == ("seq_mean_k1", "0.999_1.001")
    with pytest.raises(ConfigError, match="has no scale 'huge'; its scales: smollm2"):
        at_scale(load_sweep("nvfp4"), "huge")


def test_sweep_prints_a_line_per_finished_run(tmp_path, capsys):
    run_sweep(quick(tmp_path))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("sweep quick: 2 runs into ")
    assert [line.split(" (")[0] for line in lines[1:]] == [
        "[1/2] baseline__seed1: done", "[2/2] AQN-QeRL__seed1: done"]


def test_a_stale_run_is_refused_with_the_keys_that_differ(tmp_path):
    spec = quick(tmp_path)
    run_sweep(spec)
    sweep_json = (out_dir_of(spec) / "sweep.json").read_text()
    longer = SweepSpec(**{**spec.__dict__, "overrides": (*spec.overrides,
                                                          "trainer.total_training_steps=3")})
    with pytest.raises(ConfigError, match="2 run\\(s\\).*another config.*"
                                          "baseline__seed1 \\(.*trainer.total_training_steps\\)"):
        run_sweep(longer)
    assert (out_dir_of(spec) / "sweep.json").read_text() == sweep_json  # not rewritten


def test_a_run_that_failed_before_any_checkpoint_starts_fresh(tmp_path, monkeypatch):
    spec = quick(tmp_path, variants={"baseline": ()})
    original = GRPOTrainer.step

    def fails_at_once(self, step):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(GRPOTrainer, "step", fails_at_once)
    assert run_sweep(spec) == {"baseline__seed1": "failed"}
    # the user fixes the sweep (here: the failure goes away, and an override changes)
    monkeypatch.setattr(GRPOTrainer, "step", original)
    fixed = SweepSpec(**{**spec.__dict__, "overrides": (*spec.overrides, "trainer.seed=1")})
    assert run_sweep(fixed) == {"baseline__seed1": "done"}
    assert [r["step"] for r in read_metrics(out_dir_of(spec) / "baseline__seed1")] == [0, 1, 2]


def test_the_sweep_command_exits_non_zero_when_a_run_failed(tmp_path, capsys):
    from aqn.cli import main

    f = tmp_path / "s.yaml"
    f.write_text(f"name: s\nbase: smoke\nout_dir: {tmp_path / 'out'}\n"
                 "overrides: [trainer.total_training_steps=2]\nvariants:\n  ok: []\n"
                 "  broken: [trainer.noise_injection.enabled=true, "
                 "'trainer.noise_injection.class_patterns=[layernorm]']\n")
    assert main(["sweep", str(f)]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 runs failed: broken__seed1" in err


def test_a_killed_worker_fails_its_run_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import os
    import signal

    import aqn.rl.trainer as trainer_module

    original = trainer_module.train

    def oom_killed(cfg, lock=None):  # the kernel's OOM killer takes the worker mid-run
        if cfg.trainer.noise_injection.enabled:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(cfg, lock)

    monkeypatch.setattr(trainer_module, "train", oom_killed)  # inherited by forked workers
    spec = quick(tmp_path, seeds=(1, 2))
    results = run_sweep(spec, jobs=2)
    assert results["AQN-QeRL__seed1"] == "failed" == results["AQN-QeRL__seed2"]
    assert results["baseline__seed1"] in ("done", "failed")  # may die with its sibling
    error = json.loads((out_dir_of(spec) / "AQN-QeRL__seed1" / "run.json").read_text())["error"]
    assert "worker process died" in error
    # what the kill took with it is run again by the next sweep, which finishes
    monkeypatch.setattr(trainer_module, "train", original)
    assert set(run_sweep(spec, jobs=2).values()) <= {"done", "skipped"}


def test_the_sweep_help_names_every_shipped_preset():
    from aqn.cli import build_parser
    from aqn.experiments.sweep import sweep_presets

    sweep = build_parser()._subparsers._group_actions[0].choices["sweep"]
    text = next(a.help for a in sweep._actions if a.dest == "preset")
    assert all(name in text for name in sweep_presets()), text


def test_doses_expand_to_one_run_per_variant_dose_and_seed(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text(
        "name: d\nbase: smoke\nseeds: [1, 2]\n"
        "variants:\n  baseline: []\n  AQN: [aqn=qerl]\n"
        "doses:\n"
        "  matmul:\n    key: actor_rollout_ref.rollout.op_noise.scale\n"
        "    values: [0.05, 0.1]\n"
        "  profile:\n    key: [actor_rollout_ref.rollout.numerics]\n    values: [npu-naive]\n"
        "    overrides: [actor_rollout_ref.rollout.temperature=0.9]\n")
    spec = load_sweep(f)
    names = [r.name for r in spec.runs()]
    assert names == [
        "baseline__seed1", "baseline__seed2",
        "baseline__matmul@0.05__seed1", "baseline__matmul@0.05__seed2",
        "baseline__matmul@0.1__seed1", "baseline__matmul@0.1__seed2",
        "baseline__profile@npu-naive__seed1", "baseline__profile@npu-naive__seed2",
        "AQN__seed1", "AQN__seed2",
        "AQN__matmul@0.05__seed1", "AQN__matmul@0.05__seed2",
        "AQN__matmul@0.1__seed1", "AQN__matmul@0.1__seed2",
        "AQN__profile@npu-naive__seed1", "AQN__profile@npu-naive__seed2"]
    run = RunKey("AQN", 2, "matmul", 0.1)
    cfg = run_config(spec, run, resume=False)
    rollout = cfg.actor_rollout_ref.rollout
    assert (rollout.op_noise.scale, rollout.numerics, cfg.trainer.seed) == (0.1, "reference", 2)
    assert cfg.trainer.noise_injection.enabled and cfg.trainer.experiment_name == run.name
    cfg = run_config(spec, RunKey("baseline", 1, "profile", "npu-naive"), resume=False)
    rollout = cfg.actor_rollout_ref.rollout
    assert (rollout.numerics, rollout.temperature, rollout.op_noise.scale) == (
        "npu-naive", 0.9, 0.0)
    assert not cfg.trainer.noise_injection.enabled
    clean = run_config(spec, RunKey("baseline", 1), resume=False).actor_rollout_ref.rollout
    assert (clean.op_noise.scale, clean.numerics) == (0.0, "reference")
    # the one-family shorthand, and what is refused
    f.write_text("name: d\nbase: smoke\ndoses: {key: actor_rollout_ref.rollout.op_noise.scale,"
                 " values: [0.1]}\n")
    assert [r.name for r in load_sweep(f).runs()] == ["baseline__seed1",
                                                      "baseline__dose@0.1__seed1"]
    for bad, match in (
            ("doses: {m: {key: a.b, values: [0.1, 0.10]}}", "distinct values"),
            ("doses: {m: {key: a.b, values: [true]}}", "doses.m.values"),
            ("doses: {m: {key: a.b, values: [1], extra: 2}}", "doses.m"),
            ("doses: {m__x: {key: a.b, values: [1]}}", "plain folder name"),
            ("doses: {m: {key: a.b, values: [1], variants: [AQN]}}", "doses.m.variants"),
            ("doses: {m: {key: a.b, values: [1], variants: base}}", "doses.m.variants"),
            ("seeds: [1, 1]", "lists a seed twice")):
        f.write_text(f"name: d\nbase: smoke\n{bad}\n")
        with pytest.raises(ConfigError, match=match):
            load_sweep(f)
    # a family run by some variants only: the others keep their clean point alone
    f.write_text("name: d\nbase: smoke\nvariants: {baseline: [], AQN: [aqn=qerl]}\n"
                 "doses:\n  m: {key: a.b, values: [1, 2]}\n"
                 "  p: {key: c.d, values: [x], variants: [baseline]}\n")
    assert [r.name for r in load_sweep(f).runs()] == [
        "baseline__seed1", "baseline__m@1__seed1", "baseline__m@2__seed1",
        "baseline__p@x__seed1", "AQN__seed1", "AQN__m@1__seed1", "AQN__m@2__seed1"]
    f.write_text("name: d\nbase: smoke\ndoses: {m: {key: actor_rollout_ref.rollout.op_noise"
                 ".scale, values: [-1]}}\n")
    with pytest.raises(ConfigError, match="must be a finite number >= 0.*run baseline__m@-1"):
        run_sweep(load_sweep(f))


def test_a_dose_sweep_runs_and_records_its_dose(tmp_path):
    spec = SweepSpec(name="d", base="smoke", out_dir=str(tmp_path / "d"),
                     overrides=("trainer.total_training_steps=2",),
                     doses=load_sweep_doses({"m": {"key": "actor_rollout_ref.rollout.op_noise"
                                                          ".scale", "values": [0.1]}}))
    assert run_sweep(spec) == {"baseline__seed1": "done", "baseline__m@0.1__seed1": "done"}
    run = out_dir_of(spec) / "baseline__m@0.1__seed1"
    assert json.loads((run / "run.json").read_text()) == {
        "variant": "baseline", "seed": 1, "status": "done", "error": None, "family": "m",
        "dose": 0.1}
    last = read_metrics(run)[-1]
    assert last["op_noise/scale"] == 0.1 and last["perturb/op_noise/calls"] > 0
    assert last["rollout_corr/abs_logp_diff_mean"] > 0  # the dose made a mismatch
    clean = read_metrics(out_dir_of(spec) / "baseline__seed1")[-1]
    assert clean["rollout_corr/abs_logp_diff_mean"] == 0
    # the final policy validated where it runs (perturbed) and clean
    assert (run / "val" / "clean_step_2.jsonl").exists()
    assert "val-clean/arith/acc/mean@1" in last and "val-clean/arith/acc/mean@1" not in clean


def load_sweep_doses(doses):
    from aqn.experiments.sweep import _dose_families

    return _dose_families(doses)


def test_seeds_for_power_asks_for_what_the_spread_needs():
    from aqn.experiments.stats import seeds_needed
    from aqn.experiments.sweep import seeds_for_power

    assert seeds_for_power([1.0, 3.0], 2.5, 20) == seeds_needed(3.0, 2.5)
    assert seeds_for_power([0.5], 2.5, 20) == seeds_needed(0.5, 2.5) == 3
    assert seeds_for_power([None, 0.0], 2.5, 20) == 2  # no spread plans nothing
    assert seeds_for_power([30.0], 2.5, 12) == 12  # the budget caps it


def test_a_pilot_planned_confirmation_keeps_alpha_and_a_reused_pilot_does_not():
    """Under no effect: a pilot of 3 seeds plans the seeds for 2.5 points (at most 12). The
    t-test over new seeds rejects at its nominal 5 %; over pilot + new seeds it does not
    (a pilot whose spread came out small by chance stops early with its own data)."""
    import numpy as np
    from scipy import stats as sps

    from aqn.experiments.sweep import seeds_for_power

    rng = np.random.default_rng(0)
    fresh, reused, planned = [], [], []
    for _ in range(3_000):
        pilot = rng.normal(0.0, 2.0, 3)  # sd 2 points between seeds, no true effect
        n = seeds_for_power([float(np.std(pilot, ddof=1))], 2.5, 12)
        new = rng.normal(0.0, 2.0, n)
        planned.append(n)
        fresh.append(sps.ttest_1samp(new, 0.0).pvalue < 0.05)
        both = np.concatenate([pilot, new[:max(0, n - 3)]])  # "add seeds up to n"
        reused.append(sps.ttest_1samp(both, 0.0).pvalue < 0.05)
    assert np.mean(fresh) == pytest.approx(0.05, abs=0.012)
    assert np.mean(reused) > 0.07
    assert 4 <= np.median(planned) <= 12


def test_mde_sweep_runs_a_confirmation_of_the_planned_seeds(tmp_path, monkeypatch):
    import aqn.experiments.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "seeds_for_power", lambda sds, target, cap: 2)
    spec = quick(tmp_path, seeds=(1, 2), variants={"baseline": ()})
    confirm, results = sweep_module.run_sweep_to_power(spec, 2.5, 10)
    assert confirm.seeds == (3, 4) and confirm.name == "quick-confirm"
    assert results == {"baseline__seed3": "done", "baseline__seed4": "done"}
    assert out_dir_of(confirm) == tmp_path / "sweep-confirm"
    with pytest.raises(ConfigError, match="at least 2 seeds"):
        sweep_module.run_sweep_to_power(quick(tmp_path, seeds=(1,)), 2.5, 10)


def test_cli_sweep_mde_runs_the_pilot_then_the_confirmation(tmp_path, capsys):
    from aqn.cli import main

    f = tmp_path / "s.yaml"
    f.write_text(f"name: s\nbase: smoke\nout_dir: {tmp_path / 'out'}\nseeds: [1, 2]\n"
                 "overrides: [trainer.total_training_steps=2]\nvariants:\n  baseline: []\n"
                 "  AQN: [aqn=small]\n")
    assert main(["sweep", str(f), "--mde", "2.5", "--max-seeds", "3", "--report"]) == 0
    out, err = capsys.readouterr()
    assert "sweep s: pilot of 2 seeds, largest MDE" in err
    confirm = tmp_path / "out-confirm"
    assert sorted(p.name for p in confirm.iterdir() if p.name.endswith(("3", "4", "5"))) \
        in (["AQN__seed3", "AQN__seed4", "baseline__seed3", "baseline__seed4"],
            ["AQN__seed3", "AQN__seed4", "AQN__seed5", "baseline__seed3", "baseline__seed4",
             "baseline__seed5"])
    summary = json.loads((confirm / "report" / "summary.json").read_text())
    assert summary["target_mde_points"] == 2.5
    assert summary["comparisons"][0]["seeds"] >= 2
