"""Robustness curves and summary.json, from run directories written as a dose sweep writes
them (run.json with family and dose, val-clean metrics at the final step)."""

import json
from pathlib import Path

import numpy as np
import pytest

from aqn.experiments.report import build_report
from aqn.experiments.robustness import families
from aqn.experiments.runs import find_runs
from aqn.experiments.stats import paired_t_mde

N_ITEMS, STEPS = 100, 8
# point -> (mismatch per token, final correct per seed, final correct when validated clean)
POINTS = {
    ("baseline", None): (0.0, [60, 62, 61], None),
    ("baseline", 0.05): (0.02, [58, 59, 57], [60, 61, 60]),
    ("baseline", 0.1): (0.08, [40, 45, 42], [55, 57, 56]),
    ("AQN", None): (0.004, [61, 62, 60], None),
    ("AQN", 0.05): (0.025, [58, 60, 58], [61, 60, 62]),
    ("AQN", 0.1): (0.085, [50, 54, 52], [58, 58, 57]),
}


def items(correct: int) -> str:
    return "".join(json.dumps({"id": f"q{i}", "prompt": "p", "response": "r", "extracted": "1",
                               "ground_truth": "1", "score": float(i < correct),
                               "correct": i < correct}) + "\n" for i in range(N_ITEMS))


def write_point(root: Path, variant: str, dose: float | None, seed: int, mismatch: float,
                final: int, clean: int | None) -> None:
    at = "" if dose is None else f"__matmul@{dose:g}"
    run = root / f"{variant}{at}__seed{seed}"
    (run / "val").mkdir(parents=True)
    (run / "config.yaml").write_text(
        "trainer:\n  noise_injection:\n    enabled: " + str(variant == "AQN").lower() + "\n")
    rows = [{"step": 0, "val-core/arith/acc/mean@1": 0.3}]
    (run / "val" / "step_0.jsonl").write_text(items(30))
    for step in range(1, STEPS + 1):
        rows.append({"step": step,
                     "rollout_corr/abs_logp_diff_mean": mismatch * (0.5 + step / STEPS),
                     "rollout_corr/kl": mismatch / 10,
                     "critic/acc/mean": 0.3 + 0.05 * step if variant == "AQN" else 0.5})
    # a validation half-way: AQN's runs still rising to the end (by 4-6 items), the
    # baseline's settled (within an item)
    mid = final - {1: 5, 2: 6, 3: 4}[seed] if variant == "AQN" else final + seed - 2
    rows[STEPS // 2] |= {"val-core/arith/acc/mean@1": mid / N_ITEMS}
    (run / "val" / f"step_{STEPS // 2}.jsonl").write_text(items(mid))
    rows[-1] |= {"val-core/arith/acc/mean@1": final / N_ITEMS}
    (run / "val" / f"step_{STEPS}.jsonl").write_text(items(final))
    if clean is not None:
        rows[-1] |= {"val-clean/arith/acc/mean@1": clean / N_ITEMS}
        (run / "val" / f"clean_step_{STEPS}.jsonl").write_text(items(clean))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"variant": variant, "seed": seed, "status": "done", "error": None}
    if dose is not None:
        info |= {"family": "matmul", "dose": dose}
    (run / "run.json").write_text(json.dumps(info))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dose-sweep")
    for (variant, dose), (mismatch, finals, cleans) in POINTS.items():
        for i, seed in enumerate((1, 2, 3)):
            write_point(root, variant, dose, seed, mismatch, finals[i],
                        None if cleans is None else cleans[i])
    return root


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    return build_report([sweep], tmp_path_factory.mktemp("report"))


def test_curve_points_equal_the_run_data(sweep):
    runs = find_runs([sweep])
    groups: dict = {}
    for r in runs:
        groups.setdefault(r.point, {})[r.seed] = r
    [family] = families(groups, "baseline")
    assert family.name == "matmul" and family.doses() == [None, 0.05, 0.1]
    # x: the baseline's mean |dlogp| over its training steps (the ramp 0.5 + step/8 averages
    # to 1.0625 x the dose's figure), the same for every variant at that dose
    assert family.x(None) == 0.0
    assert family.x(0.1) == pytest.approx(0.08 * np.mean([0.5 + s / STEPS for s in
                                                          range(1, STEPS + 1)]))
    aqn = family.point("AQN", 0.1)
    assert aqn.final == pytest.approx([0.50, 0.54, 0.52])
    assert aqn.final_clean == pytest.approx([0.58, 0.58, 0.57])
    assert aqn.mismatch == pytest.approx(0.085 * 1.0625)
    # the clean point has no val-clean: its accuracy is its clean accuracy
    assert family.point("baseline", None).final_clean == pytest.approx([0.60, 0.62, 0.61])


def test_costs_effects_and_the_verdict(report):
    md = report.markdown
    section = md[md.index("## 2b. Robustness curves"):md.index("## 3.")]
    assert "robustness_matmul.png" in section
    # cost of dose 0.1: seed differences -20, -17, -19 points
    cost = next(line for line in section.splitlines()
                if line.startswith("| 0.1 | cost: baseline vs clean |"))
    assert "-18.67" in cost and "significant" in cost
    effect = next(line for line in section.splitlines()
                  if line.startswith("| 0.1 | effect of AQN |"))
    assert "+9.67" in effect
    assert ("AQN flattens the matmul curve (Holm-corrected over 2 doses): matmul=0.1: "
            "+9.67 points, p=" in section)
    assert "the perturbation costs the baseline significantly at 0.05, 0.1" in section
    assert ("Cost of matmul to baseline (Holm-corrected over 2 doses): significant 0.05: "
            "-3.00 points, p=0.035; 0.1: -18.67 points, p=0.0022.") in section
    # the sampled accuracy of AQN still rises at the end (0.05 per step = 5 points/step)
    assert "+50.00/10 steps (still rising)" in section
    # its validation too: +5, +6, +4 points from step 4 to 8; the baseline's -1, 0, +1
    rows = {tuple(cells[:2]): cells for line in section.splitlines()
            if (cells := [c.strip() for c in line.strip("|").split("|")])[0] in ("0.1", "clean")}
    assert rows[("0.1", "AQN")][8].startswith("+5.00 over 4 steps, p=0.0")
    assert rows[("0.1", "AQN")][8].endswith("(still moving)")
    assert rows[("0.1", "baseline")][8].startswith("+0.00 over 4 steps, p=1")
    assert (report.paths[0].parent / "robustness_matmul.png").stat().st_size > 10_000


def test_summary_json(report):
    summary = json.loads((report.paths[0].parent / "summary.json").read_text())
    assert summary["target_mde_points"] == 2.5
    learned = summary["baseline_learned"]
    assert learned["learned"] is True and learned["delta_points"] == pytest.approx(31.0)
    rows = {c["point"]: c for c in summary["comparisons"]}
    assert set(rows) == {"AQN", "AQN @ matmul=0.05", "AQN @ matmul=0.1",
                         "baseline @ matmul=0.05", "baseline @ matmul=0.1"}
    effect = rows["AQN @ matmul=0.1"]
    diffs = [10.0, 9.0, 10.0]
    assert (effect["variant"], effect["against"], effect["family"], effect["dose"]) == (
        "AQN", "baseline @ matmul=0.1", "matmul", 0.1)
    assert effect["delta_points"] == pytest.approx(np.mean(diffs))
    assert effect["mde_points"] == pytest.approx(paired_t_mde(np.std(diffs, ddof=1), 3))
    assert effect["ci_points"][0] < effect["delta_points"] < effect["ci_points"][1]
    assert effect["mismatch"] == pytest.approx(0.085 * 1.0625)
    assert effect["seeds"] == 3 and effect["test"] == "paired t-test over 3 seeds"
    assert effect["significant"] is True and effect["p"] < 0.05
    cost = rows["baseline @ matmul=0.1"]
    assert cost["against"] == "baseline" and cost["delta_points"] == pytest.approx(-56 / 3)
    clean = rows["AQN"]
    assert (clean["against"], clean["dose"], clean["family"]) == ("baseline", None, None)
    # the point's own validation from step 4 to 8: +5, +6, +4 points
    assert effect["final_change"]["delta_points"] == pytest.approx(5.0)
    assert effect["final_change"]["over_steps"] == 4 and effect["final_change"]["p"] < 0.05
    # +1, 0, -1 points: not significant, and what it could have missed is stated
    assert clean["significant"] is False
    assert clean["verdict"].startswith("undetermined: it could miss effects up to")


def test_one_lucky_dose_does_not_flatten_a_curve_after_holm():
    from aqn.experiments.analysis import HeadlineRow
    from aqn.experiments.robustness import Family, Point, family_verdict

    def row(label, delta, p, mde=0.04):
        return HeadlineRow(label, 2, [40], None, None, None, delta, [40], 400, None, None,
                           p_value=p, significant=p < 0.05, mde=mde)

    doses = (1.0, 2.0, 4.0)
    points = [Point(f"{v} @ q={d}", v, d, {}) for v in ("baseline", "AQN") for d in doses]
    family = Family("q", points, "baseline")
    rows = {f"baseline @ q={d}": row(f"baseline @ q={d}", -0.05, 0.2) for d in doses}
    rows |= {"AQN @ q=1.0": row("AQN @ q=1.0", 0.0, 0.9), "AQN @ q=2.0": row("AQN @ q=2.0", 0.0,
                                                                               0.8),
             "AQN @ q=4.0": row("AQN @ q=4.0", 0.026, 0.03)}
    verdict = family_verdict(family, "AQN", rows)
    # p = 0.03 alone, x3 by Holm = 0.09: no effect, and the uncorrected p is shown
    assert verdict.startswith("AQN does not flatten the q curve (Holm-corrected over 3 doses)")
    assert "q=4: MDE 4.0, p=0.03 before correction" in verdict
    rows["AQN @ q=4.0"] = row("AQN @ q=4.0", 0.026, 0.01)  # x3 = 0.03: it holds
    assert family_verdict(family, "AQN", rows).startswith(
        "AQN flattens the q curve (Holm-corrected over 3 doses): q=4: +2.60 points, p=0.01")


def test_a_variant_without_doses_in_a_family_has_no_curve_there():
    from aqn.experiments.robustness import Family, Point

    points = [Point("baseline", "baseline", None, {}), Point("AQN", "AQN", None, {}),
              Point("baseline @ p=x", "baseline", "x", {})]
    assert Family("p", points, "baseline").variants() == ["baseline"]
    points.append(Point("AQN @ p=x", "AQN", "x", {}))
    assert Family("p", points, "baseline").variants() == ["baseline", "AQN"]


def test_a_perturbed_validation_without_val_clean_has_no_clean_accuracy(sweep, tmp_path):
    import shutil

    from aqn.experiments.robustness import Point

    run_dir = tmp_path / "r"
    shutil.copytree(sweep / "baseline__matmul@0.1__seed1", run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    for row in rows:
        row.pop("val-clean/arith/acc/mean@1", None)
    rows[-1]["val-aux/perturb/op_noise/calls"] = 10.0  # validated on the perturbed engine
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = find_runs([run_dir])[0]
    assert Point("p", "baseline", 0.1, {1: run}).final_clean == []
    rows[-1].pop("val-aux/perturb/op_noise/calls")  # validated clean: that is its accuracy
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert Point("p", "baseline", 0.1, {1: find_runs([run_dir])[0]}).final_clean == [0.40]
