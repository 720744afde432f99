"""The ``quant_error`` AQN distribution: noise shaped like real quantization error."""

import math

import pytest
import torch

from aqn.config import load_config
from aqn.noise import NoiseInjectionConfig, NoiseInjector
from aqn.noise.injector import grid_error

SIGMA = 0.01


def cfg(**kw) -> NoiseInjectionConfig:
    """sigma 0.05 from step 10 on (stage 1 of qerl over 100 steps), quant_error noise."""
    return NoiseInjectionConfig(
        **({"total_steps": 100, "seed": 7, "distribution": "quant_error"} | kw)).resolved()


def excess_kurtosis(z: torch.Tensor) -> float:
    z = z.double() - z.double().mean()
    return (z.pow(4).mean() / z.pow(2).mean() ** 2).item() - 3.0


def spread(n=200_000, seed=0) -> torch.Tensor:
    """Norm-like weights spread over many grid steps (trained gains around 1)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.5


def spread_norms(model, seed=0):
    norms = [p for name, p in model.named_parameters() if "norm" in name]
    with torch.no_grad():
        for i, p in enumerate(norms):
            p.copy_(spread(p.numel(), seed=1000 * seed + i))


def test_grid_error_definition_and_bound():
    w = spread()
    d = math.sqrt(12) * SIGMA
    offset = torch.full_like(w, 0.3 * d)
    z = grid_error(w, SIGMA, offset)
    # w + z lands on the shifted grid: (w + z + offset) / d is an integer
    k = (w.double() + z.double() + offset.double()) / d
    assert torch.allclose(k, k.round(), atol=1e-6)
    assert z.abs().max().item() <= d / 2 * (1 + 1e-6)  # |z| <= sqrt(3) sigma
    assert z.std().item() == pytest.approx(SIGMA, rel=0.02)
    assert z.mean().item() == pytest.approx(0.0, abs=0.02 * SIGMA)
    assert z.dtype == torch.float32


def test_statistics_against_gaussian(tiny):
    model, _ = tiny
    spread_norms(model)
    z_q = NoiseInjector(model, cfg()).draw(10, 0.05)
    z_g = NoiseInjector(model, cfg(distribution="gaussian")).draw(10, 0.05)
    assert z_q.std().item() == pytest.approx(0.05, rel=0.05)
    assert z_q.abs().max().item() <= 0.05 * math.sqrt(3) * (1 + 1e-6)
    assert z_g.abs().max().item() > 0.05 * math.sqrt(3)  # gaussian tails go beyond it
    # uniform-like: flat, light-tailed (excess kurtosis -1.2), unlike the gaussian's 0
    big_q = torch.cat([NoiseInjector(model, cfg()).draw(s, 0.05) for s in range(10, 30)])
    big_g = torch.cat([NoiseInjector(model, cfg(distribution="gaussian")).draw(s, 0.05)
                       for s in range(10, 30)])
    assert excess_kurtosis(big_q) == pytest.approx(-1.2, abs=0.1)
    assert excess_kurtosis(big_g) == pytest.approx(0.0, abs=0.2)


def test_equal_weights_get_equal_error_one_scalar_per_layer(tiny):
    model, _ = tiny  # untrained: every norm weight is 1.0
    inj = NoiseInjector(model, cfg())
    z = inj.draw(10, 0.05).view(len(inj.targets), -1)
    assert (z == z[:, :1]).all()  # one scalar per layer
    assert len(set(z[:, 0].tolist())) == len(inj.targets)  # each layer its own offset
    # over the random offset (steps) that scalar has zero mean and std sigma
    per_step = torch.stack([inj.draw(s, 0.05).view(len(inj.targets), -1)[:, 0]
                            for s in range(10, 410)])
    assert per_step.std().item() == pytest.approx(0.05, rel=0.05)
    assert per_step.mean().item() == pytest.approx(0.0, abs=0.05 * 0.05)


def test_seeded_and_reproducible(tiny):
    model, _ = tiny
    spread_norms(model)
    a = NoiseInjector(model, cfg())
    assert torch.equal(a.draw(10, 0.05), NoiseInjector(model, cfg()).draw(10, 0.05))
    assert not torch.equal(a.draw(10, 0.05), a.draw(11, 0.05))
    assert not torch.equal(a.draw(10, 0.05), NoiseInjector(model, cfg(seed=8)).draw(10, 0.05))


def test_multiplicative_apply_and_restore(tiny):
    model, _ = tiny
    spread_norms(model)
    add = NoiseInjector(model, cfg())
    mult = NoiseInjector(model, cfg(mode="multiplicative"))
    assert torch.allclose(mult.draw(10, 0.05), add.draw(10, 0.05) * add._clean.abs())
    clean = add._clean.clone()
    report = add.apply(10)
    assert report.sigma == 0.05 and report.effective_std == pytest.approx(0.05, rel=0.1)
    assert torch.allclose(add._read_weights(), clean + add.draw(10, 0.05))
    add.restore()
    assert torch.equal(add._read_weights(), clean)


def test_config_accepts_quant_error():
    run = load_config(overrides=["trainer.noise_injection.distribution=quant_error"])
    assert run.trainer.noise_injection.distribution == "quant_error"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quant_error_on_cuda_equals_cpu(tiny):
    model, _ = tiny
    spread_norms(model)
    z_cpu = NoiseInjector(model, cfg()).draw(10, 0.05)
    z_gpu = NoiseInjector(model.cuda(), cfg()).draw(10, 0.05)
    assert z_gpu.device.type == "cuda" and torch.equal(z_gpu.cpu(), z_cpu)
