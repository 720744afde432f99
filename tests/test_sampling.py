"""Top-k / top-p filtering of the sampler, and what machine.json records."""

from __future__ import annotations

import math
import platform

import pytest
import torch

from aqn.machine import machine_info
from aqn.rollout.hf import filter_logits

INF = float("-inf")


def test_no_filter_is_the_identity():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(filter_logits(logits, top_k=-1, top_p=1.0), logits)
    assert torch.equal(filter_logits(logits, top_k=10, top_p=1.0), logits)  # k = vocab


def test_top_k_keeps_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 9.0, 8.0, 7.0]])
    out = filter_logits(logits, top_k=2, top_p=1.0)
    assert out.tolist() == [[INF, 5.0, INF, 4.0, INF], [INF, INF, 9.0, 8.0, INF]]


def test_top_k_keeps_ties_at_the_kth_value():
    out = filter_logits(torch.tensor([[3.0, 1.0, 3.0, 3.0]]), top_k=2, top_p=1.0)
    assert out.tolist() == [[3.0, INF, 3.0, 3.0]]


def test_top_p_keeps_the_token_that_crosses_p():
    # probabilities 0.5, 0.3, 0.15, 0.05 (sorted); cumulative 0.5, 0.8, 0.95, 1.0
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    kept = filter_logits(logits, top_k=-1, top_p=0.7) > INF
    assert kept.tolist() == [[False, True, False, True]]  # 0.5 < 0.7, then 0.3 crosses it
    kept = filter_logits(logits, top_k=-1, top_p=0.45) > INF
    assert kept.tolist() == [[False, True, False, False]]  # the first token is enough
    kept = filter_logits(logits, top_k=-1, top_p=0.9) > INF
    assert kept.tolist() == [[True, True, False, True]]
    kept = filter_logits(logits, top_k=-1, top_p=0.96) > INF  # 0.95 is short of it
    assert kept.tolist() == [[True, True, True, True]]
    # the top token always survives, however small p
    assert (filter_logits(logits, top_k=-1, top_p=1e-6) > INF).sum() == 1


def test_top_k_then_top_p_renormalises_over_the_kept_tokens():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    out = filter_logits(probs.log(), top_k=3, top_p=0.6)
    # after top-3 the kept mass is 0.9: 0.444, 0.333, 0.222 -> cumulative crosses 0.6 at two
    assert (out > INF).tolist() == [[True, True, False, False]]
    assert out.softmax(-1)[0, :2].sum().item() == pytest.approx(1.0)
    assert math.isinf(out[0, 3].item())


def test_machine_json_names_the_device_the_run_uses(monkeypatch):
    assert machine_info("float32", "cpu")["device"] == "cpu"
    # the CPU's model name (speed figures depend on it), not merely its architecture
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), None)
    if model:
        assert machine_info("float32", "cpu")["cpu"] == model != platform.machine()
    assert machine_info("float32", torch.device("meta"))["device"] == "meta"  # not ignored
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    info = machine_info("bfloat16", "cuda")
    assert info["device"] == "Some GPU" and info["dtype"] == "bfloat16"


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_lm_head_gives_the_full_logits_bits(tiny, lora, temperature):
    """Without gradients the LM head runs LOGIT_CHUNK positions at a time; the log-probs and
    entropy must be the bits of the one-pass [batch, length, vocab] logits."""
    import aqn.rollout.forward as forward
    from aqn.models.lora import apply_lora

    model, _ = tiny
    if lora:
        model = apply_lora(model, 4, 8, ["q_proj", "v_proj", "lm_head"])
    model.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (6, 60), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :10] = 0  # left padding
    mask[1, -5:] = 0  # right padding
    length = 41  # not a multiple of LOGIT_CHUNK
    assert length % forward.LOGIT_CHUNK
    with torch.no_grad():
        chunked = forward.response_logprobs(model, ids, mask, length, temperature, True)
    with torch.enable_grad():  # the full-logits path
        full = forward.response_logprobs(model, ids, mask, length, temperature, True)
    for a, b in ((chunked.log_probs, full.log_probs), (chunked.entropy, full.entropy)):
        assert a.shape == (6, length)
        assert torch.equal(a.view(torch.int32), b.detach().view(torch.int32))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_in_training_matches_the_full_logits(tiny, temperature):
    """With gradients the LM head runs in chunks in a custom autograd function (the logits
    are recomputed in the backward): the log-probs keep their bits, the gradient agrees with
    autograd through the full logits up to the order of the sums."""
    from aqn.rollout.forward import _ChunkedHeadLogProbs, response_logprobs

    model, _ = tiny
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (5, 57), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, :7] = 0
    weights = torch.randn(5, 37, generator=gen)
    results = []
    for fused in (True, False):
        model.zero_grad()
        out = response_logprobs(model, ids, mask, 37, temperature, with_entropy=True,
                                entropy_grad=False, fused_head=fused)
        assert (out.log_probs.grad_fn.name() == "_ChunkedHeadLogProbsBackward") == fused
        (out.log_probs * weights).sum().backward()
        results.append((out.log_probs.detach(), out.entropy.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp_f, ent_f, grads_f), (lp, ent, grads) = results
    assert torch.equal(lp_f.view(torch.int32), lp.view(torch.int32))
    assert torch.equal(ent_f, ent)
    for name, g in grads.items():  # fp32 sums in another order: a few ulps apart
        assert (grads_f[name] - g).norm() <= 1e-6 * g.norm() + 1e-12, name
    assert grads["lm_head.weight" if "lm_head.weight" in grads else
                 "model.embed_tokens.weight"].abs().max() > 0
    assert _ChunkedHeadLogProbs is not None
