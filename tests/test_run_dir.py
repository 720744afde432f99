"""Run directories that cannot be corrupted: one writer, atomic files, a config written once,
torn checkpoints skipped out loud, and a moved directory that still resumes."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from aqn.cli import main as cli_main
from aqn.config import ConfigError
from aqn.files import write_atomic
from aqn.rl.run_dir import RunLock
from aqn.rl.tracking import read_metrics
from aqn.rl.trainer import GRPOTrainer, train
from conftest import smoke, values


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    first = GRPOTrainer(smoke(tmp_path))
    with pytest.raises(ConfigError, match=f"in use by a running aqn process \\(pid {os.getpid()}"):
        GRPOTrainer(smoke(tmp_path, "trainer.resume=true"))
    first.fit()  # releases the directory when done
    assert GRPOTrainer(smoke(tmp_path, "trainer.resume=true")).start_step == 4


def test_the_lock_holds_across_processes_and_names_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from aqn.rl.run_dir import RunLock; lock = RunLock(Path(sys.argv[1])); "
         "print('locked', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}\\)"):
            RunLock(run)
    finally:
        holder.kill()
        holder.wait()
    RunLock(run).release()  # a killed holder leaves no stale lock


def test_config_is_written_once_not_on_resume(tmp_path):
    train(smoke(tmp_path))
    config = tmp_path / "run" / "config.yaml"
    before, stamp = config.read_text(), config.stat().st_mtime_ns
    GRPOTrainer(smoke(tmp_path, "trainer.resume=true", "trainer.logger=[jsonl]"))
    assert config.read_text() == before and config.stat().st_mtime_ns == stamp


def test_a_torn_latest_checkpoint_falls_back_to_the_previous_one_out_loud(tmp_path, caplog):
    train(smoke(tmp_path, name="straight"))
    shutil.copytree(tmp_path / "straight", tmp_path / "torn")
    (tmp_path / "torn" / "checkpoints" / "step_4" / "optimizer.safetensors").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="aqn.rl.run_dir"):
        trainer = GRPOTrainer(smoke(tmp_path, "trainer.resume=true", name="torn"))
    assert trainer.start_step == 2
    assert "newer checkpoints are unusable" in caplog.text and "step_4" in caplog.text
    trainer.fit()
    # steps 3 and 4 redone from the intact step-2 checkpoint: the same run, to the bit
    assert values(tmp_path / "torn") == values(tmp_path / "straight")
    a = load_file(tmp_path / "straight/checkpoints/step_4/model.safetensors")
    b = load_file(tmp_path / "torn/checkpoints/step_4/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    train(smoke(tmp_path))
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_4" / "state.json").unlink()  # killed while saving
    (ckpts / "step_2" / "state.json").write_text("{garbage")
    rows = read_metrics(tmp_path / "run")
    with pytest.raises(ConfigError, match="no checkpoint loads.*step_4.*step_2"):
        GRPOTrainer(smoke(tmp_path, "trainer.resume=true"))
    assert read_metrics(tmp_path / "run") == rows  # nothing truncated


def test_a_moved_run_directory_resumes(tmp_path):
    train(smoke(tmp_path / "old", "trainer.total_training_steps=2", "trainer.save_freq=2"))
    shutil.move(tmp_path / "old" / "run", tmp_path / "new")
    trainer = GRPOTrainer(smoke(tmp_path, "trainer.total_training_steps=2",
                                "trainer.save_freq=2", "trainer.resume=true", name="new"))
    assert trainer.start_step == 2


def test_resume_of_a_run_that_does_not_exist_is_an_error(tmp_path):
    train(smoke(tmp_path, name="real"))
    with pytest.raises(ConfigError, match="holds no run"):
        GRPOTrainer(smoke(tmp_path, "trainer.resume=true", name="mistyped"))
    assert not (tmp_path / "mistyped").exists()  # nothing created either


def test_checkpoints_kept(tmp_path):
    train(smoke(tmp_path, "trainer.save_freq=1", "trainer.max_actor_ckpt_to_keep=null",
                name="all"))
    assert len(list((tmp_path / "all" / "checkpoints").iterdir())) == 4
    with pytest.raises(ConfigError, match="max_actor_ckpt_to_keep"):
        smoke(tmp_path, "trainer.max_actor_ckpt_to_keep=0")


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "machine.json"
    write_atomic(path, "old\n")

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "machine.json"]


def run_cli(*argv, file_size_limit=None):
    def limit():  # in the child only: a disk that takes no file above this size
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "aqn.cli", *argv], capture_output=True,
                          text=True, preexec_fn=limit if file_size_limit else None)


def test_a_full_disk_stops_the_run_with_one_line_naming_the_file(tmp_path):
    args = ["train", "smoke", f"trainer.default_local_dir={tmp_path}",
            "trainer.experiment_name=run", "trainer.progress_bar=false"]
    full = run_cli(*args, file_size_limit=1_000_000)  # the 2.9 MB model cannot be written
    assert full.returncode == 2
    message = full.stderr.strip().splitlines()[-1]
    assert "Traceback" not in full.stderr
    assert message.startswith("aqn train: error: ") and "File too large" in message
    assert "checkpoints/step_2.tmp/model.safetensors" in message
    run = tmp_path / "run"
    # the first checkpoint failed: nothing to resume from, and resuming would say so
    assert message.endswith(f"there is no earlier one to resume from: make room, then delete "
                            f"{run} and start again")
    assert not (run / "checkpoints" / "step_2.tmp").exists()  # the part is gone, not kept
    refused = run_cli(*args, "trainer.resume=true")
    assert refused.returncode == 2 and "it has no checkpoint" in refused.stderr
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2]  # history kept
    shutil.rmtree(run)
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4"]


@pytest.mark.parametrize("torn, why", [
    ("model.safetensors", "SafetensorError"),
    ("optimizer.safetensors", "SafetensorError"),
    ("state.json", "JSONDecodeError"),
])
def test_a_garbage_checkpoint_file_is_one_line_naming_it(tmp_path, capsys, torn, why):
    train(smoke(tmp_path, "trainer.total_training_steps=2", "trainer.save_freq=2"))
    (tmp_path / "run" / "checkpoints" / "step_2" / torn).write_bytes(b"\x00garbage")
    code = cli_main(["train", "smoke", f"trainer.default_local_dir={tmp_path}",
                     "trainer.experiment_name=run", "trainer.total_training_steps=2",
                     "trainer.save_freq=2", "trainer.resume=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"checkpoints/step_2/{torn}: {why}" in err[0]


def test_a_state_without_param_groups_is_named(tmp_path):
    train(smoke(tmp_path, "trainer.total_training_steps=2", "trainer.save_freq=2"))
    (tmp_path / "run" / "checkpoints" / "step_2" / "state.json").write_text('{"step": 2}')
    with pytest.raises(ConfigError, match="state.json: not an aqn checkpoint state"):
        GRPOTrainer(smoke(tmp_path, "trainer.total_training_steps=2", "trainer.save_freq=2",
                          "trainer.resume=true"))
