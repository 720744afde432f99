import copy
import math

import pytest
import torch
from torch import nn

from aqn.errors import NoTargetsError
from aqn.firing import NotFiredError
from aqn.quant import (
    FORMATS,
    LoadTimeWeightQuantizer,
    WeightQuantizer,
    fake_quantize,
    quantize_model,
    round_e2m1,
    round_e4m3,
    select_linears,
)

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def gaussian(rows=512, cols=1024, seed=0, scale=0.02) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale


def awkward(seed=0) -> torch.Tensor:
    """Gaussian weights with an all-zero row, a zero block and a block of tiny values."""
    w = gaussian(96, 512, seed)
    w[3] = 0.0
    w[5, :64] = 0.0
    w[7, 128:160] *= 1e-6
    w[9, 7] = 0.3  # an outlier
    return w


def rel_l2(q, w) -> float:
    return ((q.float() - w.float()).norm() / w.float().norm()).item()


# ---------------------------------------------------------------- element formats

def test_round_e2m1_grid_ties_and_saturation():
    x = torch.tensor([0.0, 0.2, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 6.0, 7.0, 1e9])
    want = [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0]
    assert round_e2m1(x).tolist() == want
    assert round_e2m1(-x).tolist() == [-v for v in want]
    grid = torch.tensor(E2M1)
    assert torch.equal(round_e2m1(grid), grid)  # representable values are kept


def test_round_e4m3_equals_torchs_float8_cast():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20_000, generator=g) * s for s in (1e-4, 1e-2, 1, 30, 300)]
                  + [torch.linspace(-470, 470, 20_001),
                     torch.tensor([0.0, -0.0, 2**-9, 2**-10, 3 * 2**-10, 2**-6, 448, 464, 1e6])])
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    got = round_e4m3(x)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    assert round_e4m3(torch.tensor([3 * 2**-10, 5 * 2**-10, 464.0])).tolist() == [
        2 * 2**-9, 2 * 2**-9, 448.0]  # subnormal ties to even, saturation


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_outputs_are_grid_values_times_a_block_scale(fmt):
    block = 16 if fmt == "nvfp4" else 32
    w = gaussian(8, 256)
    q = fake_quantize(w, fmt).reshape(8, -1, block)
    scale = q.abs().amax(-1, keepdim=True) / 6  # the largest element sits on 6 * scale
    ratio = (q / scale).abs()
    on_grid = torch.isclose(ratio.unsqueeze(-1), torch.tensor(E2M1), rtol=1e-5, atol=1e-5)
    if fmt == "mxfp4":  # a block's max may round to 4 * scale: check against both
        ratio6 = (q / (q.abs().amax(-1, keepdim=True) / 4)).abs()
        on_grid |= torch.isclose(ratio6.unsqueeze(-1), torch.tensor(E2M1), atol=1e-5)
    assert on_grid.any(-1).all()


# Relative L2 error and SQNR on Gaussian weights (docs/reference.md#quantization-formats for
# the first three; int4 g128 asymmetric and int8 per-channel measured here and by torchao).
EXPECTED = {
    "nvfp4": (0.0952, 20.43),
    "mxfp4": (0.1145, 18.83),
    "fp8_e4m3": (0.0264, 31.57),
    "int4": (0.1006, 19.95),
    "int8": (0.0079, 42.0),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_error_on_gaussian_weights(fmt):
    w = gaussian()
    q = fake_quantize(w, fmt)
    err, sqnr = rel_l2(q, w), -20 * math.log10(rel_l2(q, w))
    want_err, want_sqnr = EXPECTED[fmt]
    assert err == pytest.approx(want_err, rel=0.03), fmt
    assert sqnr == pytest.approx(want_sqnr, abs=0.3), fmt


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_shape_zeros_and_input_untouched(fmt, dtype):
    w = awkward().to(dtype)
    before = w.clone()
    q = fake_quantize(w, fmt)
    assert q.dtype == dtype and q.shape == w.shape
    assert torch.equal(w, before)
    assert torch.isfinite(q).all()
    assert (q[3] == 0).all() and (q[5, :64] == 0).all()  # zeros stay zeros
    assert rel_l2(q, w) < 0.2
    zeros = fake_quantize(torch.zeros(4, 64, dtype=dtype), fmt)
    assert zeros.dtype == dtype and (zeros == 0).all()  # torchao gives NaN for per-tensor 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_widths_not_divisible_by_the_block_are_zero_padded(fmt):
    w = gaussian(16, 256)
    w[:, 200:] = 0.0
    # zero padding leaves every scale as it is, so quantizing the first 200 columns
    # equals quantizing the zero-padded tensor and cropping
    assert torch.equal(fake_quantize(w[:, :200].contiguous(), fmt), fake_quantize(w, fmt)[:, :200])
    assert fake_quantize(torch.randn(3, 5, 40), fmt).shape == (3, 5, 40)
    assert fake_quantize(torch.randn(40), fmt).shape == (40,)


def test_bad_format_and_dtype():
    with pytest.raises(ValueError, match="unknown quantization format 'nvfp8'; known: nvfp4"):
        fake_quantize(torch.ones(2, 16), "nvfp8")
    with pytest.raises(TypeError, match="floating-point"):
        fake_quantize(torch.ones(2, 16, dtype=torch.int32), "int8")


def test_per_channel_and_per_tensor_scales():
    w = gaussian(4, 256)
    w[1] *= 100  # a loud row: per-channel int8 keeps the other rows fine, per-tensor fp8 too
    assert rel_l2(fake_quantize(w, "int8")[0], w[0]) < 0.01
    q8 = fake_quantize(w, "fp8_e4m3")
    assert (q8.abs().max() - w.abs().max()).abs() < 1e-6  # amax maps onto 448 exactly


# (bit-equality with torchao: tests/test_peers.py)


# ---------------------------------------------------------------- model level

class Toy(nn.Module):
    """Tied embedding/head, a Linear subclass, a peft-like LoRA adapter."""

    class MyLinear(nn.Linear):
        pass

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(50, 64)
        self.block = nn.ModuleDict({
            "q_proj": nn.Linear(64, 64),
            "up_proj": Toy.MyLinear(64, 96, bias=False),
            "down_proj": nn.Linear(96, 64),
        })
        self.block["q_proj"].lora_A = nn.ModuleDict({"default": nn.Linear(64, 8, bias=False)})
        self.lm_head = nn.Linear(64, 50, bias=False)
        self.lm_head.weight = self.embed_tokens.weight


def test_selection_defaults_patterns_and_errors():
    model = Toy()
    paths = [p for p, _ in select_linears(model)]
    assert paths == ["block.q_proj", "block.up_proj", "block.down_proj"]  # no head, no LoRA
    assert [p for p, _ in select_linears(model, include=["up_proj"])] == ["block.up_proj"]
    some = select_linears(model, include=["block.*"], exclude=["q_proj", "*lora_*"])
    assert [p for p, _ in some] == ["block.up_proj", "block.down_proj"]
    with_head = [p for p, _ in select_linears(model, exclude=())]
    assert "lm_head" in with_head and "block.q_proj.lora_A.default" in with_head
    with pytest.raises(NoTargetsError, match=r"matched 0 modules in Toy.*5 Linear modules"):
        select_linears(model, include=["nothing_here"])
    with pytest.raises(NoTargetsError, match="no nn.Linear modules at all"):
        select_linears(nn.Sequential(nn.ReLU()))


def test_tied_weights_are_quantized_once():
    model = Toy()
    model.head2 = nn.Linear(64, 50, bias=False)
    model.head2.weight = model.lm_head.weight
    targets = select_linears(model, include=["lm_head", "head2"], exclude=())
    assert [p for p, _ in targets] == ["lm_head"]


def test_quantize_model_in_place_and_report():
    model = Toy()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = quantize_model(model, "nvfp4")
    after = dict(model.named_parameters())
    for name in ("block.q_proj.weight", "block.up_proj.weight", "block.down_proj.weight"):
        assert torch.equal(after[name], fake_quantize(before[name], "nvfp4")), name
    for name in ("embed_tokens.weight", "block.q_proj.bias", "block.q_proj.lora_A.default.weight"):
        assert torch.equal(after[name], before[name]), name
    assert [x.path for x in report.layers] == ["block.q_proj", "block.up_proj", "block.down_proj"]
    num = sum((fake_quantize(before[n], "nvfp4") - before[n]).pow(2).sum().item()
              for n in ("block.q_proj.weight", "block.up_proj.weight", "block.down_proj.weight"))
    den = sum(before[n].pow(2).sum().item()
              for n in ("block.q_proj.weight", "block.up_proj.weight", "block.down_proj.weight"))
    assert report.rel_l2 == pytest.approx(math.sqrt(num / den), rel=1e-6)
    assert report.sqnr_db == pytest.approx(-20 * math.log10(report.rel_l2), rel=1e-9)
    assert report.layers[1].rel_l2 == pytest.approx(
        rel_l2(after["block.up_proj.weight"], before["block.up_proj.weight"]), rel=1e-5)
    m = report.metrics()
    assert set(m) == {"quant/rel_l2", "quant/sqnr_db", "quant/max_layer_rel_l2",
                      "quant/num_layers", "quant/num_params"}
    assert m["quant/num_layers"] == 3 and m["quant/num_params"] == 64 * 64 + 2 * 64 * 96
    assert 0.08 < m["quant/rel_l2"] < 0.11 and m["quant/max_layer_rel_l2"] >= m["quant/rel_l2"]
    table = report.table()
    assert "block.up_proj" in table and "96x64" in table and "overall (pooled)" in table
    assert f"{100 * report.rel_l2:8.3f}" in table.splitlines()[-1]


def test_quantize_model_on_bf16_llama(tiny_bf16):
    model, _ = tiny_bf16
    report = quantize_model(model, "mxfp4")
    assert len(report.layers) == 4 * 7  # q k v o gate up down per layer, no lm_head
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert 0.10 < report.rel_l2 < 0.13


# ---------------------------------------------------------------- engine perturbation

def test_weight_quantizer_apply_restore_refresh(tiny):
    model, _ = tiny
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    wq = WeightQuantizer(model, "int4", include=["model.layers.0.*", "down_proj"])
    assert wq.name == "quant"
    assert len(wq.targets) == 7 + 3 and wq.targets[0] == "model.layers.0.self_attn.q_proj"
    down = "model.layers.2.mlp.down_proj.weight"
    m1 = wq.apply(5)
    params = dict(model.named_parameters())
    assert torch.equal(params[down], fake_quantize(clean[down], "int4"))
    assert torch.equal(params["model.layers.1.mlp.up_proj.weight"],
                       clean["model.layers.1.mlp.up_proj.weight"])  # not targeted
    assert m1["quant/num_layers"] == 10 and 0.08 < m1["quant/rel_l2"] < 0.12
    assert wq.apply(6) == m1  # always from the clean copy: nothing compounds
    assert torch.equal(params[down], fake_quantize(clean[down], "int4"))

    # a sync that re-sends nothing leaves the quantized values: they are not taken as clean
    wq.refresh()
    assert wq.last_refreshed == 0
    wq.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, clean[n]), n

    # a real sync: new weights become the clean copy
    new = copy.deepcopy(model)
    with torch.no_grad():
        for p in new.parameters():
            p.mul_(1.5)
    wq.apply(7)
    model.load_state_dict(new.state_dict())
    wq.refresh()
    assert wq.last_refreshed == 10
    wq.apply(8)
    assert torch.equal(params[down], fake_quantize(clean[down] * 1.5, "int4"))
    wq.restore()
    assert torch.equal(params[down], clean[down] * 1.5)


def test_load_time_quantizer_streams_what_the_hf_engines_quantizer_writes(tiny):
    """vLLM's quantized rollout: the weights its sync streams (LoRA merged) are those of an hf
    engine copy after WeightQuantizer, bit for bit: Q(base) + the full-precision delta."""
    from aqn.models.lora import apply_lora
    from aqn.rollout.vllm import hf_state_dict

    model, _ = tiny
    apply_lora(model, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # nonzero adapters (B starts at 0), so the merge order matters
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    trainer = {n: t.clone() for n, t in hf_state_dict(model)}
    engine_copy = copy.deepcopy(model)
    hf_quant = WeightQuantizer(engine_copy, "nvfp4")
    hf_metrics = hf_quant.apply(0)
    quant = LoadTimeWeightQuantizer(model, "nvfp4")
    assert quant.targets == hf_quant.targets and any("base_layer" in t for t in quant.targets)
    loaded = dict(hf_state_dict(model, quant.quantize))
    quant.refresh()
    expected = dict(hf_state_dict(engine_copy))
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert quant.apply(0) == hf_metrics and quant.apply(1) == hf_metrics
    firing = quant.firing()
    assert firing.modules == set(quant.targets) and 0 < firing.num_changed <= firing.elements
    for name, tensor in hf_state_dict(model):  # the trainer's weights are not touched
        assert torch.equal(tensor, trainer[name]), name
    assert any(not torch.equal(loaded[n], trainer[n]) for n in trainer)
    quant.restore()  # a no-op: the loaded values stay until the next sync
    assert quant.apply(2) == hf_metrics and quant.writes() == []

    partial = LoadTimeWeightQuantizer(model, "nvfp4")  # a sync that skipped a target
    for path, module in select_linears(model)[:2]:
        partial.quantize(path, module.weight.detach())
    with pytest.raises(NotFiredError, match="did not load 26 targeted weights"):
        partial.refresh()
    with pytest.raises(RuntimeError, match="before the engine's first sync"):
        LoadTimeWeightQuantizer(model, "nvfp4").apply(0)


def test_weight_quantizer_in_the_rollout_engine(tiny):
    from aqn.perturb import registered
    from aqn.rollout.hf import HFEngine

    model, tok = tiny
    trainer_copy = copy.deepcopy(model)
    engine = HFEngine(model, tok.pad_token_id, [tok.eos_token_id],
                      perturbations=registered(WeightQuantizer(model, "nvfp4")))
    x = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        clean_logits = model(x).logits
        metrics = engine.perturbations.apply(3)
        quant_logits = model(x).logits
        engine.perturbations.restore()
        restored_logits = model(x).logits
    assert metrics["quant/num_layers"] == 28 and 0.08 < metrics["quant/rel_l2"] < 0.11
    assert not torch.allclose(clean_logits, quant_logits, atol=1e-3)
    assert torch.equal(clean_logits, restored_logits)
    engine.sync_weights(trainer_copy)  # refresh is called and accepts the fresh weights
    assert engine.perturbations.all[0].last_refreshed == 28


# ---------------------------------------------------------------- CUDA (where there is one)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_cpu(fmt, dtype):
    w = awkward().to(dtype)
    got = fake_quantize(w.cuda(), fmt)
    assert got.device.type == "cuda" and got.dtype == dtype
    assert torch.equal(got.cpu(), fake_quantize(w, fmt))


@cuda
def test_round_e4m3_equals_the_cuda_float8_cast():
    x = torch.cat([torch.randn(100_000, device="cuda") * s for s in (1e-3, 1, 100)]
                  + [torch.linspace(-470, 470, 20_001, device="cuda")])
    assert torch.equal(round_e4m3(x), x.clamp(-448, 448).to(torch.float8_e4m3fn).float())


@cuda
def test_weight_quantizer_on_cuda():
    cpu_model, gpu_model = Toy(), Toy().cuda()
    clean = {n: p.detach().clone() for n, p in gpu_model.named_parameters()}
    wq = WeightQuantizer(gpu_model, "nvfp4")
    assert wq.apply(1) == pytest.approx(quantize_model(cpu_model, "nvfp4").metrics())
    for (name, p), q in zip(gpu_model.named_parameters(), cpu_model.parameters(), strict=True):
        assert torch.equal(p.cpu(), q), name
    wq.restore()
    for name, p in gpu_model.named_parameters():
        assert torch.equal(p, clean[name]), name
