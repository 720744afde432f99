"""The seed's next experiments (issue 13), each provably applied: matmul-output noise, W4A4
activation quantization, AQN layer multipliers, the epoch schedule, `aqn scan`, and proof of
firing for every perturbation. Each of the verl fork's three silent defects is re-introduced
here and must stop the run with a message naming it."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

import aqn.perturb
from aqn.cli import main
from aqn.config import ConfigError, load_config
from aqn.errors import NoTargetsError
from aqn.experiments.report import build_report
from aqn.experiments.scan import decoder_layers, multipliers, scan_model
from aqn.firing import NotFiredError
from aqn.hashing import derive_seed
from aqn.noise import NoiseInjectionConfig, NoiseInjector
from aqn.noise.activation import NormOutputNoise
from aqn.noise.schedule import EpochSchedule
from aqn.numerics.op_noise import OpNoise, OpNoiseConfig
from aqn.perturb import Perturbations, registered
from aqn.quant import fake_quantize
from aqn.quant.activation import ActivationQuantizer
from aqn.quant.formats import clip_stats
from aqn.rl.tracking import read_metrics
from aqn.rl.trainer import GRPOTrainer, train
from conftest import X, linear_inputs, logits, smoke

# ------------------------------------------------------------------- matmul-output noise

def test_op_noise_is_the_seeded_relative_formula_on_each_call():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(8, 5))
    x = torch.randn(3, 8)
    clean = lin(x).detach()
    noise = OpNoise(lin, OpNoiseConfig(scale=0.05, ops=("linear",)), seed=7)
    noise.apply(step=4)
    outs = [lin(x).detach() for _ in range(2)]
    for call, out in enumerate(outs):  # eps ~ N(0, 1) seeded by (seed, step, path, call)
        gen = torch.Generator().manual_seed(derive_seed(7, 4, "0", call))
        eps = torch.randn(clean.shape, generator=gen)
        assert torch.equal(out, torch.addcmul(clean, clean.abs(), eps, value=0.05))
        assert torch.allclose(out, clean + 0.05 * clean.abs() * eps, rtol=0, atol=1e-6)
    assert not torch.equal(outs[0], outs[1])  # fresh per call
    firing = noise.firing()
    assert (firing.calls, firing.elements, firing.num_changed) == (2, 30, 30)
    noise.apply(step=4)
    assert torch.equal(lin(x).detach(), outs[0])  # a step repeats to the bit
    noise.restore()
    assert torch.equal(lin(x).detach(), clean)


def test_op_noise_absolute_mode_and_the_attention_product(tiny):
    model, _ = tiny
    clean = logits(model)
    noise = OpNoise(model, OpNoiseConfig(scale=0.01, mode="absolute", ops=("attention",)),
                    seed=1)
    assert [path for _, path, _ in noise.targets] == [
        f"model.layers.{i}.self_attn" for i in range(4)]
    noise.apply(0)
    assert not torch.allclose(logits(model), clean, atol=1e-4)
    assert noise.firing().modules == {f"model.layers.{i}.self_attn.pv" for i in range(4)}
    noise.restore()
    assert torch.equal(logits(model), clean)


def test_op_noise_gradient_is_straight_through_unless_backward_noise_is_asked():
    torch.manual_seed(0)
    lin = nn.Linear(8, 5)
    x = torch.randn(3, 8)

    def weight_grad(config: OpNoiseConfig | None) -> torch.Tensor:
        model = nn.Sequential(copy.deepcopy(lin))
        noise = OpNoise(model, config, seed=3) if config else None
        if noise:
            noise.apply(0)
        model(x).sum().backward()
        return model[0].weight.grad

    clean = weight_grad(None)
    assert torch.equal(weight_grad(OpNoiseConfig(scale=0.05, ops=("linear",))), clean)
    noisy = weight_grad(OpNoiseConfig(scale=0.05, ops=("linear",), backward=True))
    assert not torch.equal(noisy, clean)
    assert torch.allclose(noisy, clean, rtol=0.3)  # 5 % noise on the output gradient
    assert torch.equal(weight_grad(OpNoiseConfig(scale=0.05, ops=("linear",), backward=True)),
                       noisy)  # seeded


def test_op_noise_that_matches_nothing_is_an_error(tiny):
    model, _ = tiny
    with pytest.raises(NoTargetsError, match="matmul-output noise matched 0 ops"):
        OpNoise(model, OpNoiseConfig(scale=0.05, include=("nothing*",)), seed=1)
    with pytest.raises(ConfigError, match="op_noise.scale"):
        load_config("smoke", ["actor_rollout_ref.rollout.op_noise.scale=-1"])


# ------------------------------------------------------- W4A4: activation quantization

@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int8", "fp8_e4m3"])
def test_activation_quantization_feeds_each_linear_q_of_its_input(tiny, fmt):
    model, _ = tiny
    quant = ActivationQuantizer(model, fmt)
    seen = linear_inputs(model, quant, lambda: logits(model))
    assert len(seen) == 28 and quant.firing().calls == 28
    for path, (x, q) in seen.items():
        assert torch.equal(q, fake_quantize(x, fmt)), path


def test_activation_quantization_is_straight_through_in_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 4))
    x = torch.randn(2, 32, requires_grad=True)
    quant = ActivationQuantizer(model, "mxfp4", exclude=())
    quant.apply(0)
    out = model(x)
    q = fake_quantize(x.detach(), "mxfp4")
    assert torch.equal(out, model[0](q) if False else torch.nn.functional.linear(
        q, model[0].weight, model[0].bias))
    out.sum().backward()
    # d/dx of W Q(x) under the straight-through estimator: W^T 1, as if Q were the identity
    assert torch.allclose(x.grad, model[0].weight.sum(0).expand(2, 32))
    assert torch.equal(model[0].weight.grad, q.sum(0).expand(4, 32))  # the forward saw Q(x)


def test_w4a4_with_lora_trains_with_both_sides_quantized(tmp_path):
    cfg = smoke(tmp_path, "actor_rollout_ref.actor.quantization=mxfp4",
                "actor_rollout_ref.actor.lora.rank=4",
                "actor_rollout_ref.actor.activation_quantization=mxfp4",
                "actor_rollout_ref.rollout.activation_quantization=mxfp4")
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if r["step"] >= 1]
    for r in rows:
        assert r["perturb/act_quant/calls"] > 0 and r["perturb/actor_act_quant/calls"] > 0
        assert r["perturb/actor_act_quant/elements_changed"] > 0
    plan = (tmp_path / "run" / "plan.txt").read_text()
    assert "rollout act_quant" in plan and "trainer actor_act_quant" in plan


def test_a_rollout_quantization_that_changes_nothing_stops_the_run(tmp_path):
    # the policy already is the mxfp4 base (+ LoRA): quantizing the rollout to mxfp4 again
    # moves no weight, a configured perturbation that does nothing
    cfg = smoke(tmp_path, "actor_rollout_ref.actor.quantization=mxfp4",
                "actor_rollout_ref.actor.lora.rank=4",
                "actor_rollout_ref.rollout.quantization=mxfp4")
    with pytest.raises(NotFiredError, match="'quant'.*changed none"):
        train(cfg)


# ----------------------------------------------------------- defect 3: hooks that never fire

@pytest.mark.parametrize("build", [
    lambda m: OpNoise(m, OpNoiseConfig(scale=0.05), seed=1),
    lambda m: ActivationQuantizer(m, "mxfp4"),
    lambda m: NormOutputNoise(m, sigma=0.05, seed=1),
], ids=["op_noise", "act_quant", "activation_noise"])
def test_hooks_added_to_a_compiled_model_never_fire_and_the_check_says_so(tiny, build):
    model, _ = tiny
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        clean = compiled(X).logits  # captured before the hooks exist
        perturbations = Perturbations(registered(build(model)))
        perturbations.apply(0)
        assert torch.equal(compiled(X).logits, clean)  # the perturbation did nothing...
    name = perturbations.specs[0].name
    with pytest.raises(NotFiredError, match=f"'{name}'.*none of its hooks.*compile"):
        perturbations.check_firing("rollout")  # ...and the run stops saying so
    logits(model)  # the same perturbation on the eager model fires
    assert perturbations.check_firing("rollout")[f"perturb/{name}/calls"] > 0


# ----------------------------------------------------------------- AQN layer multipliers

def noise_cfg(**kw) -> NoiseInjectionConfig:
    return NoiseInjectionConfig(enabled=True, sigma_start=0.05, sigma_end=0.05, num_stages=3,
                                total_steps=10, seed=1, **kw)


def test_layer_multipliers_scale_each_layers_sigma_and_zero_skips_it(tiny):
    model, _ = tiny
    plain = NoiseInjector(copy.deepcopy(model), noise_cfg())
    scaled = NoiseInjector(model, noise_cfg(layer_multipliers=(1.0, 0.0, 0.5),
                                            default_multiplier=2.0))
    z, z_plain = scaled.draw(5, 0.05), plain.draw(5, 0.05)
    for (path, layer), sl in zip(scaled.targets_by_layer(), scaled._slices, strict=True):
        m = {0: 1.0, 1: 0.0, 2: 0.5}.get(layer, 2.0)  # layer 3 and the final norm: default
        assert torch.allclose(z[sl], m * z_plain[sl], rtol=1e-6, atol=0), path
    report = scaled.apply(5)
    by_layer = {la.layer: la for la in report.layers}
    assert by_layer[1].changed == 0 and by_layer[1].sigma == 0
    assert by_layer[2].sigma == 0.025 and by_layer[None].sigma == 0.1
    assert report.metrics()["aqn/layer_2/sigma"] == 0.025


def test_multipliers_from_a_file_map_and_the_ones_that_reach_nothing(tmp_path, tiny):
    model, _ = tiny
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"layer_multipliers": {"2": 0.5, "0": 0.25}}))
    cfg = load_config("smoke", [f"trainer.noise_injection.layer_multipliers={path}", "aqn=small"])
    assert cfg.trainer.noise_injection.layer_multipliers == (0.25, 1.0, 0.5)
    inline = load_config("smoke", ["aqn=small", "trainer.noise_injection.default_multiplier=2",
                                   "trainer.noise_injection.layer_multipliers={1: 0, 3: 0.5}"])
    assert inline.trainer.noise_injection.layer_multipliers == (2.0, 0.0, 2.0, 0.5)
    with pytest.raises(ConfigError, match="layer_multipliers': expected .*got {'x': 1}"):
        load_config("smoke", ["trainer.noise_injection.layer_multipliers={x: 1}"])
    with pytest.raises(NoTargetsError, match="lists 6 layers.*layers 0-3"):
        NoiseInjector(model, noise_cfg(layer_multipliers=(1,) * 6))
    with pytest.raises(NoTargetsError, match="0 for every one"):
        NoiseInjector(model, noise_cfg(layer_multipliers=(0, 0, 0, 0), default_multiplier=0))
    with pytest.raises(ConfigError, match="every layer multiplier and default_multiplier"):
        load_config("smoke", ["aqn=small", "trainer.noise_injection.layer_multipliers=[0, 0]",
                              "trainer.noise_injection.default_multiplier=0"])
    path.write_text("[1, oops")
    with pytest.raises(ConfigError, match="m.json: not valid JSON"):
        load_config("smoke", [f"trainer.noise_injection.layer_multipliers={path}"])


def test_defect_multipliers_that_never_reach_the_engine_stop_the_run(tmp_path, monkeypatch):
    # the verl fork set them on the trainer's config and never forwarded them to the workers
    real = aqn.perturb.NoiseInjector
    monkeypatch.setattr(aqn.perturb, "NoiseInjector", lambda model, config: real(
        model, dataclasses.replace(config, layer_multipliers=None)))
    cfg = smoke(tmp_path, "aqn=small", "trainer.noise_injection.layer_multipliers=[1, 0, 0.5]")
    with pytest.raises(NotFiredError, match="applied sigma .* to layer 1 .* plan of "
                                            "trainer.noise_injection says 0"):
        train(cfg)


def test_the_report_shows_the_noise_per_layer(tmp_path):
    train(smoke(tmp_path, "aqn=small", "trainer.noise_injection.layer_multipliers=[1, 0, 0.5]",
                name="layers"))
    md = build_report([tmp_path / "layers"], tmp_path / "report").markdown
    section = md.split("4. AQN noise actually applied", 1)[1].split("\n## ", 1)[0]
    table = section.split("| layer | sigma applied | mean effective std |", 1)[1]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in lines] == ["| 0", "| 1", "| 2", "| 3", "| final"]
    assert lines[1].split(" | ")[1:] == ["0", "0 |"]  # layer 1: multiplier 0, no noise
    assert "perturb/aqn/elements_changed" in md


# ------------------------------------------------------------------------ epoch schedule

def test_the_epoch_schedule_decays_over_epochs_each_with_its_own_warm_up():
    schedule = EpochSchedule(0.05, 0.0005, 3, 4, num_epochs=2)
    # epoch 0 runs 0.05 -> 0.005, epoch 1 0.005 -> 0.0005, each over 4 steps in 3 stages
    # (boundaries at step // (4 / 3)); steps past the run stay in the last epoch's range
    assert [schedule.sigma(s) for s in range(10)] == pytest.approx(
        [0, 0, 0.05, 0.005, 0, 0, 0.005, 0.0005, 0, 0], rel=1e-12)
    assert [schedule.stage(s) for s in range(8)] == [0, 0, 1, 2, 3, 3, 4, 5]
    assert [(r.stage, r.first_step, r.last_step) for r in schedule.table()] == [
        (0, 0, 1), (1, 2, 2), (2, 3, 3), (3, 4, 5), (4, 6, 6), (5, 7, 7)]


def test_steps_per_epoch_come_from_the_data(tmp_path):
    cfg = load_config("smoke", ["aqn=small", "trainer.noise_injection.schedule=epoch",
                                "data.max_train_samples=40", "data.train_batch_size=4",
                                "trainer.total_training_steps=30"])
    assert cfg.trainer.noise_injection.steps_per_epoch == 10
    for split, n in (("train", 130), ("test", 5)):  # GSM8K-format files
        (tmp_path / f"{split}.jsonl").write_text("".join(
            json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### "
                        f"{i + 1}"}) + "\n" for i in range(n)))
    gsm = [load_config("smoke", ["aqn=small", "trainer.noise_injection.schedule=epoch",
                                 "data.source=gsm8k", f"data.path={tmp_path}",
                                 f"data.max_train_samples={cap}", "data.train_batch_size=32",
                                 "trainer.total_training_steps=30"])
           for cap in ("null", 70)]
    assert [c.trainer.noise_injection.steps_per_epoch for c in gsm] == [130 // 32, 70 // 32]


def test_defect_an_epoch_schedule_that_is_zero_everywhere_is_refused():
    # the verl fork called the schedule with step 0 of 1 per epoch: always the warm-up stage
    with pytest.raises(ConfigError, match="steps_per_epoch.*sigma is 0 at every one of the "
                                          "run's 8 steps"):
        load_config("smoke", ["aqn=small", "trainer.noise_injection.schedule=epoch",
                              "trainer.noise_injection.steps_per_epoch=1",
                              "trainer.total_training_steps=8"])


def test_defect_an_engine_schedule_stuck_in_warm_up_stops_the_run(tmp_path, monkeypatch):
    real = aqn.perturb.NoiseInjector
    monkeypatch.setattr(aqn.perturb, "NoiseInjector", lambda model, config: real(
        model, dataclasses.replace(config, schedule="epoch", steps_per_epoch=1)))
    with pytest.raises(NotFiredError, match="applied sigma 0 to layer 0 at step 1"):
        train(smoke(tmp_path, "aqn=small"))


def test_an_epoch_schedule_run_applies_its_plan(tmp_path):
    train(smoke(tmp_path, "aqn=small", "trainer.noise_injection.schedule=epoch",
                "trainer.noise_injection.num_stages=3", "data.max_train_samples=8",
                "data.train_batch_size=4", "trainer.total_training_steps=4"))
    rows = [r for r in read_metrics(tmp_path / "run") if r["step"] >= 1]
    plan = EpochSchedule(0.01, 0.001, 3, 2, num_epochs=2)
    assert [r["aqn/sigma"] for r in rows] == [plan.sigma(s) for s in range(4)]
    assert [r["aqn/sigma"] for r in rows] == pytest.approx([0, 0.01, 0, 0.01 * 0.1 ** 0.5])
    assert "2 epochs of 2 steps" in (tmp_path / "run" / "plan.txt").read_text()


# -------------------------------------------------------------------------------- scan

def test_clip_stats_count_the_deadzone_and_the_saturated():
    block = torch.zeros(32)
    block[0], block[1], block[2], block[3] = 7.0, 0.1, 1.0, -0.2
    # mxfp4: amax 7 -> scale 2^(2-2) = 1, so 7 clips to 6; 0.1 and -0.2 round to 0
    assert clip_stats(block.reshape(1, 32), "mxfp4") == (2 / 4, 1 / 32)


def test_scan_isolates_each_layer_and_accumulates_over_the_model(tiny):
    model, tok = tiny
    ids = torch.randint(3, 30, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    rows = scan_model(model, ids, mask, fmt="nvfp4")
    assert [r.layer for r in rows] == [0, 1, 2, 3]
    # layer 0's input is clean either way: its isolated and cumulative errors are equal
    assert rows[0].sqnr_db == rows[0].cumulative_sqnr_db
    assert all(0 < r.rel_err < 1 and r.sqnr_db > 0 for r in rows)
    assert rows[3].cumulative_rel_err > rows[3].rel_err  # errors add up over the layers
    assert all(0 < r.deadzone < 0.2 and r.saturation >= 0 for r in rows)
    for r, hidden in zip(rows, _clean_outputs(model, ids, mask), strict=True):
        q = fake_quantize(hidden, "nvfp4")  # the fork's measure: the format on the output
        sqnr = 10 * torch.log10(hidden.pow(2).sum() / (q - hidden).pow(2).sum()).item()
        assert r.output_sqnr_db == pytest.approx(sqnr, rel=1e-4) and 15 < sqnr < 25
    assert sum(multipliers(rows)) == pytest.approx(4, abs=1e-3)
    w4a4 = scan_model(model, ids, mask, fmt="nvfp4", activations=True)
    assert all(a.rel_err > w.rel_err for a, w in zip(w4a4, rows, strict=True))
    profile = scan_model(model, ids, mask, profile="npu-naive")
    assert profile[0].sqnr_db is None and profile[0].cumulative_sqnr_db > 20
    assert len(decoder_layers(model)) == 4


def _clean_outputs(model, ids, mask):
    outs = []
    hooks = [m.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple)
                                                                 else o))
             for _, m in decoder_layers(model)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return [o[mask.bool()].float() for o in outs]


def test_aqn_scan_writes_the_table_plot_and_a_multipliers_file_training_reads(tmp_path, capsys):
    out = tmp_path / "scan"
    assert main(["scan", "--model", "tiny", "--format", "mxfp4", "--prompts", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SQNR dB" in printed and "multipliers.json" in printed
    assert (out / "sqnr.png").stat().st_size > 5000
    written = json.loads((out / "multipliers.json").read_text())["layer_multipliers"]
    cfg = load_config("smoke", ["aqn=small",
                                f"trainer.noise_injection.layer_multipliers={out}/multipliers.json"])
    assert list(cfg.trainer.noise_injection.layer_multipliers) == written and len(written) == 4
    assert main(["scan", "--model", "tiny"]) == 2  # neither a format nor a profile


# ------------------------------------------------------------------- the plan and firing

def test_every_perturbation_logs_what_it_touched_each_step(tmp_path):
    train(smoke(tmp_path, "aqn=small", "actor_rollout_ref.rollout.quantization=int4",
                "actor_rollout_ref.rollout.numerics=npu-like",
                "actor_rollout_ref.rollout.op_noise.scale=0.05",
                "actor_rollout_ref.actor.op_noise.scale=0.05",
                "actor_rollout_ref.actor.numerics=gpu-like"))
    rows = [r for r in read_metrics(tmp_path / "run") if r["step"] >= 1]
    names = ["quant", "numerics", "op_noise", "actor_numerics", "actor_op_noise"]
    for r in rows:
        for name in names:
            assert r[f"perturb/{name}/modules"] > 0, name
        assert r["perturb/op_noise/calls"] > 0 and r["perturb/numerics/calls"] > 0
        assert r["perturb/quant/elements_changed"] > 0
    assert rows[0]["perturb/aqn/modules"] == 0  # stage 0: warm-up, nothing expected
    assert rows[1]["perturb/aqn/elements_changed"] > 0
    val = read_metrics(tmp_path / "run")[-1]
    assert val["val-aux/perturb/op_noise/calls"] > 0 and "val-aux/perturb/aqn/calls" not in val


def test_the_plan_is_printed_before_step_0(tmp_path, capsys):
    cfg = smoke(tmp_path, "aqn=small", "trainer.progress_bar=true",
                "actor_rollout_ref.rollout.op_noise.scale=0.05")
    GRPOTrainer(cfg).lock.release()
    err = capsys.readouterr().err
    assert "perturbation plan:" in err and "rollout op_noise" in err
    assert "stage 1: steps 1-1 sigma 0.01" in err
