"""LoRA through PEFT: adapters train, the base stays, and AQN never accumulates noise."""

import copy

import pytest
import torch

from aqn.config import load_config
from aqn.config.schema import LORA_TARGETS
from aqn.errors import ConfigError
from aqn.models.lora import apply_lora, trainable_summary
from aqn.noise import NoiseInjectionConfig, NoiseInjector
from aqn.perturb import AQNNoise, registered
from aqn.rl.tracking import read_metrics
from aqn.rl.trainer import GRPOTrainer
from aqn.rollout.hf import HFEngine

pytest.importorskip("peft")


def norms(model):
    return [m for m in model.modules() if "rmsnorm" in type(m).__name__.lower()]


def norm_vector(model):
    return torch.cat([m.weight.detach().reshape(-1) for m in norms(model)]).float()


def test_only_adapters_and_asked_norms_train(tiny):
    model, _ = tiny
    policy = apply_lora(copy.deepcopy(model), 4, None, LORA_TARGETS)
    trainable, total = trainable_summary(policy)
    # per layer: rank 4 x (in + out) for each of the 7 projections of the tiny model
    assert 0 < trainable < total / 10
    assert all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    with_norms = apply_lora(copy.deepcopy(model), 4, None, LORA_TARGETS, trainable_norms=True)
    n_norm = sum(m.weight.numel() for m in norms(with_norms))
    assert trainable_summary(with_norms)[0] == trainable + n_norm
    # B starts at zero: the adapted model computes exactly what the base does
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(policy(input_ids=ids).logits, model(input_ids=ids).logits)


def test_unknown_target_module_names_the_real_ones(tiny):
    with pytest.raises(ConfigError, match="no Linear module named qkv_proj.*q_proj"):
        apply_lora(tiny[0], 4, None, ["qkv_proj"])


@pytest.mark.parametrize("sync", ["full", "adapters_only"])
def test_lora_aqn_never_accumulates_over_20_syncs(tiny, sync):
    """QeRL's defect 2: with LoRA only adapters are re-sent, so norms that are not re-sent
    would take fresh noise on top of old noise. The engine must hold cast(w_clean + z(k))."""
    model, tok = tiny
    policy = apply_lora(model, 4, None, LORA_TARGETS, trainable_norms=(sync == "full"))
    engine_model = copy.deepcopy(policy)
    noise = NoiseInjectionConfig(enabled=True, preset="small").resolved(total_steps=20, seed=3)
    injector = NoiseInjector(engine_model, noise)
    engine = HFEngine(engine_model, tok.pad_token_id, [tok.eos_token_id],
                           registered(AQNNoise(injector)))
    gen = torch.Generator().manual_seed(0)
    adapters = [n for n, p in policy.named_parameters() if "lora_" in n]
    noisy_steps = 0
    for step in range(20):
        with torch.no_grad():  # stand-in for an optimizer step on every trainable tensor
            for p in policy.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 1e-2)
        if sync == "full":
            engine.sync_weights(policy)
        else:  # what a LoRA-only sync sends: the adapters, never the norms
            state = policy.state_dict()
            engine.model.load_state_dict({n: state[n] for n in adapters}, strict=False)
            engine.perturbations.refresh()
        metrics = engine.perturbations.apply(step)
        sigma = metrics["aqn/sigma"]
        z = injector.draw(step, sigma) if sigma else torch.zeros(injector.num_params)
        assert torch.equal(norm_vector(engine.model), norm_vector(policy) + z), step
        noisy_steps += sigma > 0
    assert noisy_steps >= 15  # the check ran with noise on, not only in the warm-up stage
    for n, p in policy.state_dict().items():
        if "lora_" in n:
            assert torch.equal(engine.model.state_dict()[n], p)


def lora_smoke(tmp_path, *overrides):
    return load_config("smoke", [f"trainer.default_local_dir={tmp_path}",
                                 "trainer.experiment_name=lora",
                                 "actor_rollout_ref.actor.lora.rank=4",
                                 "actor_rollout_ref.actor.optim.lr=1e-2", *overrides])


def test_lora_training_moves_adapters_not_the_base(tmp_path):
    trainer = GRPOTrainer(lora_smoke(tmp_path, "actor_rollout_ref.actor.lora.trainable_norms=true",
                                     "trainer.total_training_steps=2",
                                     "actor_rollout_ref.actor.optim.weight_decay=0"))
    # the random model never answers right: a length-parity reward gives advantages
    trainer.reward_fn = lambda response, truth: float(len(response) % 2)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.fit()
    after = dict(trainer.policy.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all("lora_" in n or "norm" in n for n in moved)
    assert any("lora_B" in n for n in moved) and any("norm" in n for n in moved)
    rows = [r for r in read_metrics(tmp_path / "lora") if "rollout_corr/kl" in r]
    # the engine holds base + adapters: the same forward as the trainer, bit for bit
    assert all(r["rollout_corr/abs_logp_diff_max"] == 0.0 for r in rows)


def test_activation_checkpointing_gives_the_same_update(tmp_path):
    runs = []
    for flag in ("false", "true"):
        cfg = lora_smoke(tmp_path / flag, "trainer.total_training_steps=1",
                         f"actor_rollout_ref.model.enable_gradient_checkpointing={flag}")
        trainer = GRPOTrainer(cfg)
        trainer.reward_fn = lambda response, truth: float(len(response) % 2)
        trainer.fit()
        runs.append(read_metrics(tmp_path / flag / "lora")[-1])
    assert runs[0]["actor/grad_norm"] > 0
    assert runs[0]["actor/grad_norm"] == pytest.approx(runs[1]["actor/grad_norm"], rel=1e-5)
    assert runs[0]["actor/pg_loss"] == pytest.approx(runs[1]["actor/pg_loss"], rel=1e-5)
