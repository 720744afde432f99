"""Sweeps on Ray (``aqn sweep --ray``), on a local Ray instance of 2 CPUs: the same runs as a
local sweep, bit for bit; a killed worker's run failed and resumable, or retried by Ray."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from aqn.config import ConfigError, load_config
from aqn.experiments import ray_sweep
from aqn.experiments.sweep import SweepSpec, load_sweep, out_dir_of, run_status, run_sweep
from aqn.rl.checkpoint import checkpoint_steps
from aqn.rl.run_dir import LOCK_FILE
from aqn.rl.tracking import read_metrics
from conftest import peer, values


@pytest.fixture(scope="module")
def ray():
    ray = peer("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def spec_at(out: Path, steps: int = 4, **kw) -> SweepSpec:
    spec = load_sweep("quick")
    return SweepSpec(**{**spec.__dict__, "out_dir": str(out),
                        "overrides": (*spec.overrides, f"trainer.total_training_steps={steps}",
                                      "trainer.save_freq=1"), **kw})


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint_steps(run_dir)[0][1] / "model.safetensors")


def assert_same_runs(a: Path, b: Path, names) -> None:
    for name in names:
        assert values(a / name) == values(b / name), name
        assert len(values(a / name)) > 1
        for f in sorted((a / name / "val").iterdir()):
            assert f.read_bytes() == (b / name / "val" / f.name).read_bytes(), f
        wa, wb = final_weights(a / name), final_weights(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_ray_sweep_computes_what_a_local_sweep_computes_bit_for_bit(ray, tmp_path):
    local = spec_at(tmp_path / "local", seeds=(1, 2))
    remote = spec_at(tmp_path / "ray", seeds=(1, 2))
    assert run_sweep(local, jobs=1) == {k: "done" for k in run_sweep(remote, ray="auto")}
    names = [r.name for r in local.runs()]
    assert len(names) == 4
    assert_same_runs(out_dir_of(local), out_dir_of(remote), names)
    for name in names:  # the Ray task trained with the thread count it reserved
        machine = json.loads((out_dir_of(remote) / name / "machine.json").read_text())
        assert machine["threads"] == 1
    # the sweep's rules hold on Ray: finished runs are skipped
    assert run_sweep(remote, ray="auto") == {name: "skipped" for name in names}


def kill_when_checkpointed(run_dir: Path, killed: list) -> threading.Thread:
    """SIGKILL the process training ``run_dir`` (its lock holds the pid) once it has a
    checkpoint on disk: the worker dies mid-run, as under the OOM killer."""
    def kill() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if checkpoint_steps(run_dir) and (run_dir / LOCK_FILE).exists():
                pid = (run_dir / LOCK_FILE).read_text().strip()
                if pid and int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
                    return
            time.sleep(0.02)
    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_killed_ray_worker_fails_its_run_and_the_next_sweep_resumes_it(ray, tmp_path):
    spec = spec_at(tmp_path / "ray", steps=24, variants={"baseline": ()})
    run_dir = out_dir_of(spec) / "baseline__seed1"
    killed: list[int] = []
    thread = kill_when_checkpointed(run_dir, killed)
    assert run_sweep(spec, ray="auto") == {"baseline__seed1": "failed"}
    thread.join()
    assert killed
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and "Ray worker died" in info["error"], info
    kept = [step for step, _ in checkpoint_steps(run_dir)]
    assert kept and max(kept) < 24  # killed mid-run, a checkpoint to resume from
    assert run_sweep(spec, ray="auto") == {"baseline__seed1": "done"}
    # the resumed run is the run that was never killed, to the bit
    whole = spec_at(tmp_path / "local", steps=24, variants={"baseline": ()})
    assert run_sweep(whole) == {"baseline__seed1": "done"}
    assert_same_runs(out_dir_of(whole), out_dir_of(spec), ["baseline__seed1"])


def test_with_retries_ray_runs_a_killed_run_again_and_it_resumes(ray, tmp_path):
    spec = spec_at(tmp_path / "ray", steps=24, variants={"baseline": ()})
    run_dir = out_dir_of(spec) / "baseline__seed1"
    killed: list[int] = []
    thread = kill_when_checkpointed(run_dir, killed)
    assert run_sweep(spec, ray="auto", retries=1) == {"baseline__seed1": "done"}
    thread.join()
    assert killed and run_status(run_dir) == "done"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(25))  # resumed: no step twice, none lost


def test_a_sweep_directory_a_node_cannot_see_stops_the_sweep_before_any_run(
        ray, tmp_path, monkeypatch):
    # the probe file never reaches the workers' view of the directory, as on a node that
    # mounts other storage at that path
    monkeypatch.setattr(ray_sweep, "write_atomic", lambda path, text: None)
    spec = spec_at(tmp_path / "ray")
    with pytest.raises(ConfigError, match="not visible from Ray node") as e:
        run_sweep(spec, ray="auto")
    assert e.value.key == "out_dir"
    assert not any(d.is_dir() for d in out_dir_of(spec).iterdir())  # no run started


@pytest.mark.parametrize(("overrides", "has_gpus", "want"), [
    ([], False, {"num_cpus": 1, "num_gpus": 0}),
    (["trainer.device=cuda"], False, {"num_cpus": 1, "num_gpus": 1}),
    (["trainer.device=auto"], True, {"num_cpus": 1, "num_gpus": 1}),
    (["trainer.device=auto"], False, {"num_cpus": 1, "num_gpus": 0}),
    (["trainer.resources.num_cpus=4", "trainer.resources.num_gpus=0.5"], False,
     {"num_cpus": 4, "num_gpus": 0.5}),
])
def test_a_runs_task_reserves_its_resources(overrides, has_gpus, want):
    assert ray_sweep.task_options(load_config("smoke", overrides), has_gpus) == want


def test_bad_ray_flags_are_refused_by_name(capsys):
    from aqn.cli import main

    assert main(["sweep", "--preset", "quick", "--retries", "1"]) == 2
    assert "--retries" in capsys.readouterr().err
    assert main(["sweep", "--preset", "quick", "--ray", "--jobs", "2"]) == 2
    assert "trainer.resources" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="must be >= 1") as e:
        load_config("smoke", ["trainer.resources.num_cpus=0"])
    assert e.value.key == "trainer.resources.num_cpus"
