import json

import pytest
import yaml

from aqn.config import ConfigError
from aqn.experiments.sweep import SweepSpec, load_sweep, out_dir_of, run_status, run_sweep
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
    f.write_text("name: x\nseeds: []\n")
    with pytest.raises(ConfigError, match="'seeds': must list at least one seed"):
        load_sweep(f)
    f.write_text("name: x\nvariants:\n  a: [trainer.sed=1]\n")
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
    from aqn.experiments.sweep import at_scale, run_config, sweep_presets

    for name in sweep_presets():
        spec = load_sweep(name)
        for scaled in [spec] + [at_scale(spec, s) for s in spec.scales]:
            for variant in scaled.variants:
                run_config(scaled, variant, 1, resume=False)  # raises on a bad override
    hw = at_scale(load_sweep("hw-hetero"), "smollm2")
    assert (hw.name, hw.base, list(hw.variants)) == (
        "hw-hetero-smollm2", "smollm2-arith", ["clean", "baseline", "AQN", "AQN-TIS"])
    clean = run_config(hw, "clean", 1, resume=False).actor_rollout_ref
    base = run_config(hw, "baseline", 1, resume=False).actor_rollout_ref
    assert (clean.rollout.numerics, base.rollout.numerics) == ("reference", "npu-naive")
    assert base.model.path == "smollm2-135m-instruct"
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

    def oom_killed(cfg):  # the kernel's OOM killer takes the worker mid-run
        if cfg.trainer.noise_injection.enabled:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(cfg)

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
