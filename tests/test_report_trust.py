"""The report trusts only what it can check: a run whose files disagree with what it says it
wrote, or that differs from the other seeds of its point, is left out with a warning naming
it; a comparison whose configs differ in more than its sweep set apart is flagged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aqn.experiments.report import build_report
from aqn.experiments.sweep import SweepSpec, load_sweep, out_dir_of, run_sweep
from test_report import N_ITEMS, write_run

# --- run directories written by hand (tests/test_report.py's writer) -----------------------

BASE = {0: 30, 10: 40}
AQN = {0: 30, 10: 80}


def set_key(run: Path, dotted: str, value) -> None:
    """Set a key of a run's config.yaml, as a run made elsewhere (or edited) has it."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    node = config
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def write_inputs(run: Path, **changes) -> None:
    """An inputs.json as the trainer writes it (the same data and model for every run)."""
    inputs = {"hash_version": 1, "train_data": "a" * 64, "val_data": "b" * 64,
              "model": "c" * 64, "n_train": 1000, "n_val": N_ITEMS, "n_params": 1234}
    (run / "inputs.json").write_text(json.dumps(inputs | changes))


def sweep_dir(root: Path, aqn_seeds=(1, 2), sweep_json: bool = True) -> Path:
    """baseline and aqn, 2 seeds each, with inputs.json, as a sweep writes them."""
    sweep = root / "sweep"
    for seed in (1, 2):
        write_inputs(write_run(sweep, "baseline", seed, BASE))
    for seed in aqn_seeds:
        write_inputs(write_run(sweep, "aqn", seed, {0: 30, 10: 80 + seed}, aqn=True))
    if sweep_json:
        (sweep / "sweep.json").write_text(json.dumps({
            "name": "s", "base": "smoke", "overrides": ["trainer.total_training_steps=10"],
            "seeds": [1, 2], "variants": {"baseline": [], "aqn": [
                "trainer.noise_injection.enabled=true", "trainer.noise_injection.preset=small"]},
            "doses": {}}))
    return sweep


def report_of(tmp_path: Path, *paths: Path):
    return build_report(list(paths), tmp_path / "report")


def section(md: str, start: str, end: str) -> str:
    return md[md.index(start):md.index(end)]


def test_a_clean_hand_written_sweep_gives_no_warnings(tmp_path):
    r = report_of(tmp_path, sweep_dir(tmp_path))
    assert r.checks == [] and not r.warnings
    checks = section(r.markdown, "## Checks", "## 1.")
    assert "All checks passed." in checks and "WARNING" not in checks
    assert "| aqn | baseline | trainer.noise_injection.enabled |" in checks
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["checks"] == []


# --- metrics.jsonl written by two processes ---------------------------------------------


def interleave(run: Path) -> None:
    """Two writers appending to one metrics.jsonl: steps 0, 5, 1, 6, 2, 7, ..."""
    rows = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    mixed = [line for pair in zip(rows, rows[5:], strict=False) for line in pair]
    (run / "metrics.jsonl").write_text("".join(mixed))


def appended_twice(run: Path) -> None:
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + text)


def one_row_repeated(run: Path) -> None:
    rows = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(rows[:4] + rows[3:]))


@pytest.mark.parametrize("corrupt, where", [
    (interleave, "line 3: step 1 comes after step 5"),
    (appended_twice, "line 12: step 0 comes after step 10"),
    (one_row_repeated, "line 5: step 3 repeats step 3"),
])
def test_metrics_of_two_writers_are_flagged_and_the_run_not_pooled(tmp_path, corrupt, where):
    sweep = sweep_dir(tmp_path)
    corrupt(sweep / "aqn-s2")
    r = report_of(tmp_path, sweep)
    [warning] = r.checks
    assert warning.startswith(f"run aqn/seed2 ({sweep / 'aqn-s2'}) left out of the comparisons: "
                              f"{sweep / 'aqn-s2' / 'metrics.jsonl'} {where} (steps must "
                              "increase strictly")
    row = next(row for row in r.rows if row.variant == "aqn")
    assert row.n_seeds == 1 and row.final_mean == pytest.approx(0.81)  # seed 1 alone
    md = r.markdown
    assert "1 run(s) left out of the comparisons and 0 comparison(s) flagged" in md
    runs = section(md, "## Runs", "## Checks")
    assert "| aqn/seed2 | aqn (hf) | done (left out: see Checks) |" in runs
    assert "already seen" not in runs  # not mistaken for a duplicate
    assert "**WARNING** " + warning in section(md, "## Checks", "## 1.")


# --- per-item validation files ----------------------------------------------------------


def truncate(run: Path) -> None:  # the last item lost: 99 items, the same 81 correct
    f = run / "val" / "step_10.jsonl"
    f.write_text("".join(f.read_text().splitlines(keepends=True)[:-1]))


def flip(run: Path) -> None:  # one item's verdict edited: 82 correct, the metric says 81
    f = run / "val" / "step_10.jsonl"
    items = [json.loads(line) for line in f.read_text().splitlines()]
    items[90] |= {"correct": True, "score": 1.0}
    f.write_text("".join(json.dumps(it) + "\n" for it in items))


@pytest.mark.parametrize("corrupt, inputs, found", [
    (truncate, True, "val/step_10.jsonl has 99 items, its inputs.json says 100 validation "
                     "records x val_kwargs.n 1 = 100"),
    (truncate, False, "its validation files hold different numbers of items (step_0: 100, "
                      "step_10: 99)"),
    (flip, True, "val/step_10.jsonl gives reward 0.82 over its 100 items, metrics.jsonl says "
                 "0.81 (val-core/arith/reward/mean@1)"),
])
def test_a_validation_file_that_disagrees_is_flagged(tmp_path, corrupt, inputs, found):
    sweep = sweep_dir(tmp_path)
    corrupt(sweep / "aqn-s1")
    if not inputs:  # a run from an aqn before inputs.json
        (sweep / "aqn-s1" / "inputs.json").unlink()
    r = report_of(tmp_path, sweep)
    [warning] = r.checks
    assert warning.startswith(f"run aqn/seed1 ({sweep / 'aqn-s1'}) left out of the "
                              "comparisons: ")
    assert found in warning
    assert next(row for row in r.rows if row.variant == "aqn").n_seeds == 1


def test_more_items_than_the_config_allows_without_inputs_json(tmp_path):
    sweep = sweep_dir(tmp_path, sweep_json=False)
    for run in sweep.iterdir():
        (run / "inputs.json").unlink()
        set_key(run, "data.max_val_samples", N_ITEMS)
    assert report_of(tmp_path, sweep).checks == []
    set_key(sweep / "baseline-s1", "data.max_val_samples", 50)
    [warning] = report_of(tmp_path / "again", sweep).checks
    assert warning.startswith(f"run baseline/seed1 ({sweep / 'baseline-s1'}) left out")
    assert "val/step_0.jsonl has 100 items, more than data.max_val_samples 50" in warning


# --- seeds pooled into one point --------------------------------------------------------


def test_pooled_seeds_that_differ_in_a_config_key_are_flagged_naming_it(tmp_path):
    sweep = sweep_dir(tmp_path)
    odd = write_run(sweep, "baseline", 3, {0: 30, 10: 90})
    write_inputs(odd)
    set_key(odd, "data.max_val_samples", 50)
    r = report_of(tmp_path, sweep)
    [warning] = r.checks
    assert warning == (
        f"baseline/seed3 ({odd}) left out of point baseline: it differs from the run(s) pooled "
        "there (baseline/seed1, baseline/seed2) in data.max_val_samples (200 vs 50) (kept vs "
        "left out); seeds of one point must differ in nothing but the seed.")
    base = next(row for row in r.rows if row.variant == "baseline")
    assert base.n_seeds == 2 and base.final_mean == pytest.approx(0.40)


def test_pooled_seeds_trained_on_other_data_are_flagged(tmp_path):
    sweep = sweep_dir(tmp_path)
    write_inputs(sweep / "aqn-s2", val_data="d" * 64)
    [warning] = report_of(tmp_path, sweep).checks
    assert warning.startswith(f"aqn/seed2 ({sweep / 'aqn-s2'}) left out of point aqn: it "
                              "differs from the run(s) pooled there (aqn/seed1) (as many runs "
                              "as those kept: the kept ones hold the lowest seed) in "
                              "inputs.val_data (sha256 bbbbbbbbbbbb vs dddddddddddd)")


# --- comparisons across variants --------------------------------------------------------


def test_a_comparison_with_a_difference_its_sweep_did_not_set_is_flagged(tmp_path):
    sweep = sweep_dir(tmp_path)
    for seed in (1, 2):  # both aqn runs copied in from a run with another validation size
        set_key(sweep / f"aqn-s{seed}", "data.max_val_samples", 100)
    r = report_of(tmp_path, sweep)
    [warning] = r.checks
    assert warning == (
        "comparison aqn vs baseline: their configs differ in data.max_val_samples (200 vs 100) "
        f"(baseline/seed1 vs aqn/seed1), which {sweep / 'sweep.json'} does not set apart for "
        "them: the difference is not only the variant's.")
    assert "0 run(s) left out of the comparisons and 1 comparison(s) flagged" in r.markdown
    assert next(row for row in r.rows if row.variant == "aqn").n_seeds == 2  # still compared
    # without sweep.json the difference is information, not a warning
    (sweep / "sweep.json").unlink()
    r = report_of(tmp_path / "again", sweep)
    assert r.checks == []
    assert ("| aqn | baseline | data.max_val_samples, trainer.noise_injection.enabled |"
            in r.markdown)


def test_compared_variants_trained_on_other_data_are_flagged(tmp_path):
    sweep = sweep_dir(tmp_path, sweep_json=False)
    for seed in (1, 2):
        write_inputs(sweep / f"aqn-s{seed}", val_data="d" * 64)
    [warning] = report_of(tmp_path, sweep).checks
    assert warning == (
        "comparison aqn vs baseline: their inputs.json differ in inputs.val_data (sha256 "
        "bbbbbbbbbbbb vs dddddddddddd) (baseline/seed1 vs aqn/seed1) though their configs say "
        "the inputs are the same: the difference is not only the variant's.")


# --- a real sweep -------------------------------------------------------------------------


def test_a_real_sweep_passes_every_check(tmp_path):
    """Runs trained here (2 seeds; the AQN variant by shorthand, whose preset derives more
    keys): inputs.json, validation files, metrics and configs agree, so no warning."""
    spec = load_sweep("quick")
    spec = SweepSpec(**{**spec.__dict__, "out_dir": str(tmp_path / "sweep"), "seeds": (1, 2),
                        "variants": {"baseline": (), "AQN": ("aqn=small",)}})
    assert set(run_sweep(spec).values()) == {"done"}
    out = out_dir_of(spec)
    inputs = json.loads((out / "AQN__seed2" / "inputs.json").read_text())
    assert inputs["n_val"] == 8 and len(inputs["model"]) == 64
    r = report_of(tmp_path, out)
    assert r.checks == []
    compared = section(r.markdown, "## Checks", "## 1.")
    assert ("| AQN | baseline | trainer.noise_injection.enabled, trainer.noise_injection."
            "num_stages, trainer.noise_injection.preset, trainer.noise_injection.sigma_end, "
            "trainer.noise_injection.sigma_start |") in compared
