"""Simulated quantization and numerics in the trainer: only where the config puts them."""

import pytest
import torch

from aqn.config import load_config
from aqn.models import build_tiny
from aqn.quant import fake_quantize
from aqn.rl.tracking import read_metrics
from aqn.rl.trainer import GRPOTrainer


def run(tmp_path, name, *overrides):
    cfg = load_config("smoke", [f"trainer.default_local_dir={tmp_path}",
                                f"trainer.experiment_name={name}",
                                "trainer.total_training_steps=2", *overrides])
    trainer = GRPOTrainer(cfg)
    trainer.fit()
    rows = [r for r in read_metrics(tmp_path / name) if "rollout_corr/kl" in r]
    assert len(rows) == 2
    return trainer, rows


def test_quantized_rollout_leaves_the_trainer_clean(tmp_path):
    trainer, rows = run(tmp_path, "q", "actor_rollout_ref.rollout.quantization=nvfp4")
    for r in rows:
        assert r["quant/rel_l2"] == pytest.approx(0.095, abs=0.01)  # docs/reference.md
        assert r["quant/num_layers"] == 28  # every Linear of the 4 layers, not lm_head
        assert r["rollout_corr/abs_logp_diff_mean"] > 1e-3
    clean, _ = build_tiny(seed=trainer.cfg.trainer.seed)
    q = trainer.policy.model.layers[0].self_attn.q_proj.weight
    # the trainer's weights are full precision (the smoke lr is small: close to the init)
    assert not torch.equal(q, trainer.engine.model.model.layers[0].self_attn.q_proj.weight)
    assert len(torch.unique(q.detach())) > 1000
    assert torch.allclose(q, clean.model.layers[0].self_attn.q_proj.weight, atol=1e-2)


def test_same_numerics_on_both_sides_is_no_mismatch(tmp_path):
    _, rows = run(tmp_path, "n", "actor_rollout_ref.rollout.numerics=npu-like")
    assert all(r["rollout_corr/abs_logp_diff_mean"] > 0 for r in rows)
    assert all(r["numerics/patched_linear"] == 29 for r in rows)  # lm_head included
    _, rows = run(tmp_path, "nn", "actor_rollout_ref.rollout.numerics=npu-like",
                  "actor_rollout_ref.actor.numerics=npu-like")
    assert all(r["rollout_corr/abs_logp_diff_max"] == 0.0 for r in rows)


def test_qerl_quantized_policy_with_lora(tmp_path):
    pytest.importorskip("peft")
    trainer, rows = run(tmp_path, "a", "actor_rollout_ref.actor.quantization=nvfp4",
                        "actor_rollout_ref.actor.lora.rank=4", "aqn=small")
    base = trainer.policy.model.layers[0].mlp.down_proj.base_layer.weight
    engine = trainer.engine.model.model.layers[0].mlp.down_proj.base_layer.weight
    assert torch.equal(base, engine)  # the engine rolls out the same quantized base
    assert not base.requires_grad
    # the frozen base is the NVFP4 image of the initial weights, untouched by training
    init, _ = build_tiny(seed=trainer.cfg.trainer.seed)
    original = init.model.layers[0].mlp.down_proj.weight
    assert torch.equal(base, fake_quantize(original, "nvfp4"))
    assert not torch.equal(base, original)
    # the quantized base is shared, so only AQN (from step 1 on) moves the engine
    assert rows[0]["rollout_corr/abs_logp_diff_max"] == 0.0
    assert rows[1]["rollout_corr/abs_logp_diff_mean"] > 0
