import hashlib
import warnings

import pytest
import torch
from torch import nn

from aqn.errors import NoTargetsError
from aqn.noise import NoiseInjectionConfig, NoiseInjector, NoiseSwallowedWarning, noise_seed


def cfg(**kw) -> NoiseInjectionConfig:
    """sigma 0.05 from step 10 on (stage 1 of qerl over 100 steps)."""
    return NoiseInjectionConfig(**({"total_steps": 100, "seed": 7} | kw)).resolved()


def norm_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}


def all_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_noise_is_applied_and_changes_the_model(tiny):
    model, _ = tiny
    inj = NoiseInjector(model, cfg())
    x = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        clean_logits = model(x).logits
        report = inj.apply(10)
        noisy_logits = model(x).logits
    assert report.num_modules == 9 and report.num_params == 9 * 128
    assert report.stage == 1 and report.sigma == 0.05
    assert report.effective_std == pytest.approx(0.05, rel=0.1)
    assert report.frac_changed == 1.0
    assert (noisy_logits - clean_logits).abs().max() > 1e-3


def test_warmup_stage_writes_clean_weights(tiny):
    model, _ = tiny
    before = all_weights(model)
    report = NoiseInjector(model, cfg()).apply(0)
    assert report.sigma == 0.0 and report.effective_std == 0.0 and report.frac_changed == 0.0
    assert_bitwise_equal(all_weights(model), before)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_accumulation_and_bitwise_restore(dtype):
    from aqn.models import build_tiny

    model, _ = build_tiny(seed=0, dtype=dtype)
    clean = all_weights(model)
    inj = NoiseInjector(model, cfg())
    inj.apply(15)
    first = norm_weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoiseSwallowedWarning)
        for i in range(100):
            inj.apply(10 + i % 90)
    inj.apply(15)
    assert_bitwise_equal(norm_weights(model), first)  # the 101st apply is the 1st again
    inj.restore()
    assert_bitwise_equal(all_weights(model), clean)


def test_applied_context_restores_even_on_error(tiny):
    model, _ = tiny
    clean = all_weights(model)
    inj = NoiseInjector(model, cfg())
    with pytest.raises(RuntimeError), inj.applied(20):
        assert not torch.equal(model.model.norm.weight, clean["model.norm.weight"])
        raise RuntimeError("boom")
    assert_bitwise_equal(all_weights(model), clean)


def test_noise_seed_is_a_stable_hash():
    digest = hashlib.sha256(b"3/12/model.norm").digest()
    assert noise_seed(3, 12, "model.norm") == int.from_bytes(digest[:8], "little") & (2**63 - 1)


def test_same_noise_whatever_the_module_order(tiny):
    model, _ = tiny
    full = NoiseInjector(model, cfg())
    z_full = dict(zip([t.path for t in full.targets], full.draw(10, 0.05).split(128),
                      strict=True))
    # a selection of one module in another model object gets the same draw
    from aqn.models import build_tiny

    other, _ = build_tiny(seed=0)
    only = NoiseInjector(other, cfg(target_modules=("model.layers.2.input_layernorm",)))
    assert torch.equal(only.draw(10, 0.05), z_full["model.layers.2.input_layernorm"])

    # reversed registration order: the per-module noise does not change
    class Reordered(nn.Module):
        def __init__(self, src):
            super().__init__()
            self.model = nn.Module()
            self.model.norm = src.model.norm
            self.model.layers = nn.ModuleList(src.model.layers)

    rev = NoiseInjector(Reordered(build_tiny(seed=0)[0]), cfg())
    z_rev = dict(zip([t.path for t in rev.targets], rev.draw(10, 0.05).split(128), strict=True))
    assert [t.path for t in rev.targets][0] == "model.norm"
    for path, z in z_rev.items():
        assert torch.equal(z, z_full[path]), path


def test_noise_differs_across_steps_and_seeds(tiny):
    model, _ = tiny
    a = NoiseInjector(model, cfg())
    assert not torch.equal(a.draw(10, 0.05), a.draw(11, 0.05))
    b = NoiseInjector(model, cfg(seed=8))
    assert not torch.equal(a.draw(10, 0.05), b.draw(10, 0.05))
    assert torch.equal(a.draw(10, 0.05), a.draw(10, 0.05))


def test_uniform_and_multiplicative(tiny):
    model, _ = tiny
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)  # make |w| non-uniform
    z = NoiseInjector(model, cfg(distribution="uniform")).draw(10, 0.05)
    assert z.abs().max() <= 0.05 * 3**0.5
    assert z.std().item() == pytest.approx(0.05, rel=0.1)
    inj = NoiseInjector(model, cfg(mode="multiplicative"))
    gauss = NoiseInjector(model, cfg()).draw(10, 0.05)
    assert torch.allclose(inj.draw(10, 0.05), gauss * inj._clean.abs())
    assert inj.draw(10, 0.05)[-128:].std().item() == pytest.approx(
        3 * gauss[-128:].std().item(), rel=1e-5)


def test_bf16_swallows_small_noise_and_fp32_targets_keep_it(tiny_bf16):
    from aqn.models import build_tiny

    model, _ = tiny_bf16
    small = cfg(sigma_start=3e-4, sigma_end=1e-4)
    with pytest.warns(NoiseSwallowedWarning, match="changed only 0.0% of the elements"):
        report = NoiseInjector(model, small).apply(10)
    assert report.swallowed and report.frac_changed == 0.0 and report.effective_std == 0.0

    reference, _ = build_tiny(seed=0, dtype="bfloat16")
    model32, _ = build_tiny(seed=0, dtype="bfloat16")
    inj = NoiseInjector(model32, NoiseInjectionConfig(**{**small.__dict__, "fp32_targets": True}))
    norm_out = {}
    for name, m in (("clean", reference), ("noisy", model32)):  # after the injector's hooks
        m.model.layers[0].post_attention_layernorm.register_forward_hook(
            lambda mod, a, out, name=name: norm_out.setdefault(name, out))
    x = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        clean = reference(x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoiseSwallowedWarning)
        report = inj.apply(10)
    assert not report.swallowed and report.frac_changed == 1.0
    assert report.effective_std == pytest.approx(3e-4, rel=0.15)
    assert model32.model.norm.weight.dtype == torch.float32
    with torch.no_grad():
        noisy = model32(x).logits  # the norms run in fp32; their output is cast to bf16
    assert noisy.dtype == torch.bfloat16 and norm_out["noisy"].dtype == torch.bfloat16
    changed = (norm_out["noisy"] != norm_out["clean"]).float().mean().item()
    assert 0.01 < changed < 0.5  # small noise now reaches the activations, as dithering
    assert not torch.equal(noisy, clean)


def test_refresh_clean_after_partial_sync_never_accumulates(tiny):
    from aqn.models import build_tiny

    engine, _ = tiny
    trainer, _ = build_tiny(seed=1)  # "new" weights: every norm differs
    with torch.no_grad():
        for p in trainer.parameters():
            if p.ndim == 1:
                p.add_(0.1)
    original_final = engine.model.norm.weight.detach().clone()
    inj = NoiseInjector(engine, cfg())
    for step in range(10, 30):
        inj.apply(step)
        # a sync that does not re-send the final norm (as with adapters-only syncs)
        sd = {k: v for k, v in trainer.state_dict().items() if k != "model.norm.weight"}
        engine.load_state_dict(sd, strict=False)
        assert inj.refresh_clean() == 8
    inj.restore()
    assert torch.equal(engine.model.norm.weight, original_final)
    assert torch.equal(engine.model.layers[0].input_layernorm.weight,
                       trainer.model.layers[0].input_layernorm.weight)


def test_metrics_names(tiny):
    model, _ = tiny
    m = NoiseInjector(model, cfg()).apply(10).metrics()
    assert {"aqn/sigma", "aqn/stage", "aqn/num_modules", "aqn/effective_std",
            "aqn/frac_changed"} <= set(m)
    assert m["aqn/num_modules"] == 9.0 and m["aqn/sigma"] == 0.05


def test_injector_fails_loudly_without_targets():
    with pytest.raises(NoTargetsError):
        NoiseInjector(nn.Sequential(nn.Linear(2, 2)), cfg())


def test_injector_needs_a_seed(tiny):
    with pytest.raises(ValueError, match="needs a seed"):
        NoiseInjector(tiny[0], NoiseInjectionConfig(total_steps=10).resolved())
