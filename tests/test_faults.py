"""What a run and a sweep survive (issue 28): a second process never writes a run it does not
own, resume never throws history away, signals end everything cleanly, a failed start leaves
nothing that blocks the retry."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aqn.config import ConfigError, load_config
from aqn.experiments.sweep import (
    SWEEP_LOCK,
    RunKey,
    load_sweep,
    out_dir_of,
    run_config,
    run_status,
    run_sweep,
)
from aqn.rl.checkpoint import checkpoint_steps
from aqn.rl.run_dir import RunLock
from aqn.rl.tracking import read_metrics
from aqn.rl.trainer import GRPOTrainer, train
from conftest import smoke, values


def aqn(*argv, **kw) -> subprocess.Popen:
    """``aqn argv`` as a terminal would start it: with Ctrl-C's default action (a job that a
    script starts in the background inherits SIGINT ignored, and Python keeps it so)."""
    return subprocess.Popen([sys.executable, "-m", "aqn.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def metric_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def alive(pid: int) -> bool:
    """A process that runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def hold(path: Path, name: str = ".lock") -> subprocess.Popen:
    """Another process holding a run's (or a sweep's) lock until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from aqn.rl.run_dir import RunLock; lock = RunLock(Path(sys.argv[1]), sys.argv[2]); "
         "print('locked', flush=True); time.sleep(600)", str(path), name],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def sweep_file(tmp_path, steps: int, variants=("baseline",), save_freq: int = 1) -> Path:
    f = tmp_path / "race.yaml"
    f.write_text(json.dumps({  # JSON is YAML
        "name": "race", "base": "smoke", "out_dir": str(tmp_path / "sweep"), "seeds": [1],
        "overrides": [f"trainer.total_training_steps={steps}", "trainer.test_freq=0",
                      f"trainer.save_freq={save_freq}"],
        "variants": {v: [] for v in variants}}))
    return f


# ------------------------------------------------------------------ one owner per run folder


def test_a_sweep_leaves_a_run_that_another_process_holds_alone(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, steps=2))
    run_dir = out_dir_of(spec) / "baseline__seed1"
    run_dir.mkdir(parents=True)
    # a live run without a checkpoint yet: the case the old sweep marked failed, then deleted
    (run_dir / "run.json").write_text('{"variant": "baseline", "seed": 1, "status": "running"}')
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    holder = hold(run_dir)
    try:
        assert run_sweep(spec) == {"baseline__seed1": "held"}
        assert run_status(run_dir) == "running"  # not marked failed, not deleted
        assert read_metrics(run_dir) == [{"step": 0}]
    finally:
        holder.kill()
        holder.wait()
    # its writer gone and no checkpoint to resume: the sweep starts it afresh, one writer
    assert run_sweep(spec) == {"baseline__seed1": "done"}
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2]


def test_a_second_sweep_on_the_same_directory_is_refused_up_front(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, steps=2))
    out_dir_of(spec).mkdir(parents=True)
    first = RunLock(out_dir_of(spec), SWEEP_LOCK)
    with pytest.raises(ConfigError, match=f"in use by another aqn sweep \\(pid {os.getpid()}\\)"):
        run_sweep(spec)
    assert not (out_dir_of(spec) / "baseline__seed1").exists()  # nothing was touched
    first.release()


@pytest.mark.slow  # several aqn processes: the slow tier, which CI runs too
def test_three_sweeps_on_one_file_one_runs_the_others_are_refused(tmp_path):
    f = sweep_file(tmp_path, steps=20, save_freq=5)
    run_dir = tmp_path / "sweep" / "baseline__seed1"
    first = aqn("sweep", str(f))
    # the others start as soon as the first holds the sweep (its lock file exists)
    wait_for(lambda: (tmp_path / "sweep" / SWEEP_LOCK).exists(), what="the first sweep")
    others = [aqn("sweep", str(f)) for _ in range(2)]
    for other in others:
        _, err = other.communicate(timeout=120)
        assert other.returncode == 2
        assert f"in use by another aqn sweep (pid {first.pid})" in err
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(21))  # one writer: every step once, in order
    assert run_status(run_dir) == "done"


# ------------------------------------------------------------------ history is append-only


def test_resume_without_a_checkpoint_stops_and_keeps_the_history(tmp_path):
    train(smoke(tmp_path))
    run = tmp_path / "run"
    rows, val = read_metrics(run), sorted(p.name for p in (run / "val").iterdir())
    (run / "checkpoints").rename(tmp_path / "moved")
    for reason in ("does not exist", "is not a folder"):
        if reason == "is not a folder":
            (run / "checkpoints").write_text("")
        with pytest.raises(ConfigError, match=f"it has no checkpoint \\(.*{reason}\\), so it "
                           "would start over and throw away 5 metric row"):
            GRPOTrainer(smoke(tmp_path, "trainer.resume=true"))
        assert read_metrics(run) == rows
        assert sorted(p.name for p in (run / "val").iterdir()) == val


def test_a_new_run_is_refused_where_a_run_has_logged(tmp_path):
    train(smoke(tmp_path))
    (tmp_path / "run" / "config.yaml").unlink()  # what made it a run, gone; its history not
    with pytest.raises(ConfigError, match="already holds a run"):
        GRPOTrainer(smoke(tmp_path))
    assert len(read_metrics(tmp_path / "run")) == 5


def test_a_torn_last_metrics_line_is_dropped_when_a_checkpoint_resumes(tmp_path, caplog):
    train(smoke(tmp_path, name="straight"))
    train(smoke(tmp_path, name="torn"))
    run = tmp_path / "torn"
    # killed while appending step 4's row, before its checkpoint: step 2 is the newest
    (run / "checkpoints" / "step_4").rename(tmp_path / "step_4")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "critic/sco')
    with caplog.at_level(logging.WARNING, logger="aqn.rl.tracking"):
        trainer = GRPOTrainer(smoke(tmp_path, "trainer.resume=true", name="torn"))
    assert trainer.start_step == 2
    assert "dropping its torn last line (23 bytes" in caplog.text
    trainer.fit()
    assert values(run) == values(tmp_path / "straight")  # the same run, to the bit


# ------------------------------------------------------------------ a failed start


@pytest.mark.slow  # several aqn processes: the slow tier, which CI runs too
def test_a_failed_start_leaves_no_folder_and_the_retry_runs(tmp_path):
    empty_model = tmp_path / "model"
    empty_model.mkdir()  # exists, so the config loads; holds no model, so the start fails
    args = ["train", "smoke", f"trainer.default_local_dir={tmp_path}",
            "trainer.experiment_name=run", "trainer.total_training_steps=1"]
    failed = aqn(*args, f"actor_rollout_ref.model.path={empty_model}")
    _, err = failed.communicate(timeout=120)
    assert failed.returncode == 2 and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    retry = aqn(*args)
    _, err = retry.communicate(timeout=120)
    assert retry.returncode == 0, err


# ------------------------------------------------------------------ signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_training_with_one_line_and_a_resumable_run(tmp_path, sig):
    args = ["smoke", f"trainer.default_local_dir={tmp_path}", "trainer.experiment_name=run",
            "trainer.total_training_steps=500", "trainer.test_freq=0", "trainer.save_freq=2"]
    proc = aqn("train", *args)
    wait_for(lambda: checkpoint_steps(tmp_path / "run"), what="the first checkpoint")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    name = signal.Signals(sig).name
    assert line.startswith(f"aqn train: interrupted by {name} at step ")
    assert "last checkpoint step " in line
    assert line.endswith("; resume with: aqn train " + " ".join(args) + " trainer.resume=true")
    steps = int(line.split(" at step ")[1].split("/")[0])
    assert steps == len(read_metrics(tmp_path / "run")) - 1  # step 0 is the validation
    saved = int(line.split("last checkpoint step ")[1].split(")")[0])
    assert saved in (steps - steps % 2, steps - steps % 2 - 2)  # cut before or after saving
    trainer = GRPOTrainer(load_config("smoke", [*args[1:], "trainer.resume=true"]))
    assert trainer.start_step == saved


def parallel_sweep(tmp_path) -> tuple[Path, subprocess.Popen, list[Path], list[int]]:
    """A long two-run sweep on two workers, once both train: its file, process, run folders
    and worker pids."""
    f = sweep_file(tmp_path, steps=500, variants=("a", "b"))
    proc = aqn("sweep", str(f), "--jobs", "2")
    runs = [tmp_path / "sweep" / f"{v}__seed1" for v in ("a", "b")]
    # any checkpoint: a fast step saves and prunes step_1 before a poll may see it
    wait_for(lambda: all(checkpoint_steps(r) for r in runs), what="both runs to save a checkpoint")
    workers = children(proc.pid)
    assert len(workers) >= 2
    return f, proc, runs, workers


def test_sigterm_to_a_parallel_sweep_leaves_no_worker_running(tmp_path):
    f, proc, runs, workers = parallel_sweep(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    line = err.strip().splitlines()[-1]
    assert line == ("aqn sweep: interrupted by SIGTERM with 0 of 2 runs finished; resume with the "
                    f"same command: aqn sweep {f} --jobs 2")
    wait_for(lambda: not any(alive(w) for w in workers), timeout=10, what="the workers to end")
    spec = load_sweep(f)
    for v, run_dir in zip(("a", "b"), runs, strict=True):
        assert run_status(run_dir) == "running"  # cut off, resumable from its checkpoint
        trainer = GRPOTrainer(run_config(spec, RunKey(v, 1), resume=True))
        assert trainer.start_step >= 1
        trainer.lock.release()


@pytest.mark.slow  # several aqn processes: the slow tier, which CI runs too
def test_a_killed_sweep_takes_its_workers_with_it(tmp_path):
    _, proc, _, workers = parallel_sweep(tmp_path)
    proc.kill()  # kill -9: no handler runs, the kernel tells the workers
    proc.wait()
    wait_for(lambda: not any(alive(w) for w in workers), timeout=10, what="the workers to end")
