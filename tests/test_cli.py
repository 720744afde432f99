import json

import pytest

from aqn.cli import main


def test_schedule_table(capsys):
    assert main(["schedule", "--sigma-start", "0.01", "--sigma-end", "0.001",
                 "--num-stages", "5", "--total-steps", "233", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["first_step"] for r in rows] == [0, 47, 94, 140, 187]
    assert [round(r["sigma"], 6) for r in rows] == [0, 0.01, 0.004642, 0.002154, 0.001]


def test_inspect_lists_targets(capsys):
    assert main(["inspect", "--model", "tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_modules"] == 9 and out["num_params"] == 9 * 128
    assert out["targets"][-1]["path"] == "model.norm" and out["targets"][-1]["is_final"]
    assert main(["inspect", "--model", "tiny", "--no-final-norm"]) == 0
    assert "8 AQN target modules, 1024 parameters" in capsys.readouterr().out


def test_noise_check_shows_the_bf16_problem(capsys):
    assert main(["noise-check", "--model", "tiny", "--dtype", "bfloat16",
                 "--total-steps", "100", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["stage"] for r in rows] == list(range(10))
    assert rows[1]["sigma"] == 0.05 and not rows[1]["swallowed"]
    assert rows[9]["sigma"] == 0.0005 and rows[9]["swallowed"] and rows[9]["frac_changed"] == 0
    assert main(["noise-check", "--model", "tiny", "--dtype", "bfloat16",
                 "--total-steps", "100", "--fp32-targets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert not any(r["swallowed"] for r in rows) and rows[9]["frac_changed"] == 1.0


def test_errors_exit_2_with_a_message(capsys):
    assert main(["schedule", "--total-steps", "0"]) == 2
    assert "total_steps" in capsys.readouterr().err
    assert main(["inspect", "--model", "tiny", "--class-pattern", "layernorm"]) == 2
    err = capsys.readouterr().err
    assert "matched 0 modules" in err and "LlamaRMSNorm x9" in err


def test_evaluate_pass_k(tmp_path, capsys):
    args = ["evaluate", "smoke", f"trainer.default_local_dir={tmp_path}", "--pass-k", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[:out.rindex("}") + 1])
    assert 0 <= metrics["val-core/arith/acc/mean@3"] <= metrics["val-aux/arith/acc/pass@3"] <= 1
    assert "val-core/arith/acc/mean@1" in metrics and "sampled@3_step_0.jsonl" in out
    rows = (tmp_path / "smoke" / "val" / "sampled@3_step_0.jsonl").read_text().splitlines()
    assert len(rows) == 3 * 8  # the smoke preset validates on 8 problems
    assert main([*args[:-1], "0"]) == 2 and "--pass-k must be >= 1" in capsys.readouterr().err


def test_top_level_help_imports_no_torch_and_is_plain_text():
    # `aqn --help` must not pay torch's import (seconds) to list other commands' choices
    import subprocess
    import sys

    code = ("import sys; from aqn.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().endswith("False")
    assert "``" not in out and "aqn sweep --preset demo" in out


def test_overrides_may_follow_a_commands_flags():
    from aqn.cli import parse_args

    args = parse_args(["evaluate", "tiny", "--pass-k", "8", "trainer.seed=2"])
    assert (args.config, args.pass_k, args.overrides) == ("tiny", 8, ["trainer.seed=2"])
    args = parse_args(["evaluate", "tiny", "a.b=1", "--pass-k", "4", "c.d=2"])
    assert (args.pass_k, args.overrides) == (4, ["a.b=1", "c.d=2"])
    with pytest.raises(SystemExit):  # anything else left over is still an error
        parse_args(["evaluate", "tiny", "--pass-k", "8", "--bogus"])
    with pytest.raises(SystemExit):  # a command without overrides takes none
        parse_args(["report", "runs", "--mde", "2", "a.b=1"])


def test_progress_in_a_redirected_log_is_plain_lines(capsys):
    from aqn.progress import Progress

    bar = Progress(range(20), "work", lines=4)  # stderr is captured: not a terminal
    for i in bar:
        bar.set_postfix(loss=f"{i:.1f}")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(" (")[0] for line in err.splitlines()] == [
        "work: 5/20 loss 4.0", "work: 10/20 loss 9.0", "work: 15/20 loss 14.0",
        "work: 20/20 loss 19.0"]


def test_a_bug_keeps_its_traceback_a_users_mistake_is_one_line(monkeypatch, capsys):
    import aqn.cli as cli

    def bug(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setitem(cli.COMMANDS, "report", (cli.COMMANDS["report"][0],
                                                 lambda p: p.set_defaults(func=bug)))
    with pytest.raises(ValueError, match="internal invariant"):  # not swallowed into rc 2
        main(["report"])
    assert main(["inspect", "--model", "nosuch"]) == 2  # aqn's own InputError: one line
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["aqn inspect: error: model 'nosuch' is neither a built-in (tiny, tiny-base, "
                   "smollm2-135m-instruct), a local directory, nor a hub id of the form "
                   "owner/name"]


# ----------------------------------------------------------------------- aqn config


def test_config_explain_prints_one_key(capsys):
    from aqn.quant import FORMATS

    assert main(["config", "explain", "actor_rollout_ref.rollout.quantization"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("actor_rollout_ref.rollout.quantization\n  type:    str | null\n")
    assert f"choices: {', '.join(FORMATS)}, null" in out and "verl:" in out
    assert "fake weight quantization" in out  # the doc under the field
    assert main(["config", "explain", "trainer.noise_injection.sigma_strat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean trainer.noise_injection.sigma_start" in err[0]


def test_config_show_prints_the_resolved_config_with_its_docs(tmp_path, capsys):
    from aqn.config import config_hash, load_config

    assert main(["config", "show", "smoke", "aqn=mild", "trainer.seed=3"]) == 0
    out = capsys.readouterr().out
    cfg = load_config("smoke", ["aqn=mild", "trainer.seed=3"])
    assert out.startswith("# aqn config show smoke aqn=mild trainer.seed=3: the config "
                          f"'aqn train smoke aqn=mild trainer.seed=3' runs, resolved (hash "
                          f"{config_hash(cfg)})\n")
    assert "  # Seeds model init, data order, sampling" in out and "  seed: 3  # default: 1" in out
    assert "    sigma_start: 0.025  # default: null" in out  # filled by the preset
    (tmp_path / "shown.yaml").write_text(out)
    assert config_hash(load_config(tmp_path / "shown.yaml")) == config_hash(cfg)
    # no config named: what `aqn train` runs by default; an override first is an override
    assert main(["config", "show", "trainer.seed=4"]) == 0
    assert "the config 'aqn train tiny trainer.seed=4' runs" in capsys.readouterr().out
    assert main(["config", "show", "smoke", "trainer.sed=4"]) == 2
    assert "did you mean 'seed'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "evaluate", "sweep"])
def test_the_commands_that_take_config_keys_point_to_aqn_config(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "aqn config show" in text and "aqn config explain KEY" in text


# ------------------------------------------------------------------ thin commands


def test_quant_prints_the_error_table(capsys):
    assert main(["quant", "--model", "tiny", "--format", "int4", "--layers", "--mismatch",
                 "--prompts", "2", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.lstrip().startswith("format"))
    assert out[header - 1] == ("tiny (float32): fake weight quantization of every Linear but "
                               "lm_head and embeddings")
    assert out[header].split() == ["format", "layers", "rel", "L2", "%", "SQNR", "dB", "mean",
                                   "|dlogp|", "max", "|dlogp|", "k3", "KL"]
    row = out[header + 2].split()
    assert row[0] == "int4" and int(row[1]) > 0 and 0 < float(row[2]) < 100
    assert header > 2  # the per-layer table came first


def test_scan_without_a_format_or_profile_is_one_line(capsys):
    assert main(["scan", "--model", "tiny"]) == 2
    assert capsys.readouterr().err.strip() == ("aqn scan: error: give one of --format or "
                                               "--profile")


# ------------------------------------------------------------------ trainer.logger


def _tracker(tmp_path, loggers, progress_bar=True):
    from aqn.rl.tracking import Tracker

    return Tracker(tmp_path, loggers, "aqn", "run", {"trainer": {"progress_bar": progress_bar}})


def test_console_logger_prints_each_validation_and_jsonl_is_always_written(tmp_path, capsys):
    from aqn.rl.tracking import read_metrics

    validation = {"val-core/arith/acc/mean@1": 0.25, "val-core/arith/reward/mean@1": 0.25,
                  "val-aux/arith/acc/pass@4": 0.5, "critic/score/mean": 0.1}
    console = _tracker(tmp_path / "a", ["console"])
    (tmp_path / "a").mkdir()
    console.log(1, {"critic/score/mean": 0.1})  # a step without validation: no line
    console.log(2, validation | {"val-clean/arith/acc/mean@1": 0.5})
    assert capsys.readouterr().err.splitlines() == [
        "validation at step 2: val-clean/arith/acc/mean@1 0.5, val-core/arith/acc/mean@1 0.25, "
        "val-core/arith/reward/mean@1 0.25"]
    assert [r["step"] for r in read_metrics(tmp_path / "a")] == [1, 2]  # jsonl not listed
    for loggers, progress_bar in ((["jsonl"], True), (["console", "jsonl"], False)):
        (tmp_path / "b").mkdir(exist_ok=True)
        _tracker(tmp_path / "b", loggers, progress_bar).log(2, validation)
        assert capsys.readouterr().err == ""


def test_console_logger_in_a_training_run(tmp_path, capsys):
    assert main(["train", "smoke", f"trainer.default_local_dir={tmp_path}",
                 "trainer.total_training_steps=2", "trainer.progress_bar=true"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("validation at")]
    assert [x.split(":")[0] for x in lines] == ["validation at step 0", "validation at step 2"]
    assert "val-core/arith/acc/mean@1" in lines[0]
