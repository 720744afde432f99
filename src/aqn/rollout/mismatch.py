"""How far a perturbed rollout engine's log-probs drift from the clean training model's.

``measure_mismatch`` samples completions from a perturbed copy of the model (any
perturbation: a numerics profile, AQN noise, fake quantization), scores the same tokens
under the perturbed engine and under the clean model through the one shared ``logprob_batch``,
and returns verl's rollout-vs-training mismatch metrics. ``numerics_check`` is the
``aqn numerics`` command: one numerics profile against ``reference`` on a named model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

from torch import nn

from aqn.data import encode_prompts, load_task
from aqn.models import load_model, stop_token_ids
from aqn.numerics import NumericsEmulator, NumericsProfile, get_profile, mismatch_report
from aqn.perturb import Perturbation
from aqn.rollout.base import SamplingParams
from aqn.rollout.hf import HFEngine, logprob_batch
from aqn.token_math import rollout_mismatch_metrics

# A numerics profile (name or object), or a function building a perturbation on the model
# it is given (the engine's copy): ``lambda m: AQNNoise(NoiseInjector(m, cfg))``.
PerturbationFactory = str | NumericsProfile | Callable[[nn.Module], Perturbation]


def probe_wording(model_name: str) -> str:
    """The arith wording a model is probed with: the built-in tiny models know only the
    symbolic problems they were pretrained on; real LMs get the word problems."""
    return "symbols" if model_name in ("tiny", "tiny-base") else "words"


def probe_prompts(tokenizer, num_prompts: int, seed: int = 0, wording: str = "words"
                  ) -> list[list[int]]:
    """The prompts mismatch is measured on: the first ``num_prompts`` problems of the arith
    test split in ``wording`` (seeded by ``seed``), rendered with the model's chat template."""
    _, records = load_task("arith", 0, num_prompts, seed=seed, wording=wording)
    return encode_prompts(tokenizer, records, max_length=1 << 30)


def build_perturbation(spec: PerturbationFactory, model: nn.Module, seed: int = 0) -> Perturbation:
    """The perturbation ``spec`` describes, acting on ``model``."""
    if isinstance(spec, str | NumericsProfile):
        return NumericsEmulator(model, spec, seed=seed)
    if hasattr(spec, "apply") and hasattr(spec, "restore"):
        raise TypeError("pass a function that builds the perturbation on the model it is "
                        "given (the engine's copy), not a perturbation already bound to a model")
    if callable(spec):
        return spec(model)
    raise TypeError(f"cannot build a perturbation from {type(spec).__name__}")


def measure_mismatch(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    perturbation: PerturbationFactory,
    max_new_tokens: int = 64,
    seed: int = 0,
    micro_batch_size: int = 16,
    temperature: float = 1.0,
    step: int = 0,
) -> dict[str, float]:
    """Mismatch between a perturbed engine (rollout) and the clean ``model`` (training).

    Completions are sampled (``temperature``, seeded by ``seed``) from a deep copy of
    ``model`` with the perturbation applied at ``step``; both sides compute the sampled tokens'
    log-probs with ``logprob_batch`` in the same micro-batches. ``model`` itself is not modified.

    Returns ``rollout_mismatch_metrics`` (``training/rollout_probs_diff_*``,
    ``rollout_corr/{kl,k3_kl,chi2_token,log_ppl_abs_diff,ppl_ratio}``,
    ``rollout_corr/abs_logp_diff_{mean,max}``) plus the perturbation's own metrics and
    ``mismatch/{num_sequences,num_tokens,response_length_mean,gen_s}``.
    """
    if not prompts:
        raise ValueError("measure_mismatch needs at least one prompt")
    engine_model = copy.deepcopy(model).eval()
    perturb = build_perturbation(perturbation, engine_model, seed=seed)
    engine = HFEngine(engine_model, pad_token_id=tokenizer.pad_token_id,
                      stop_token_ids=stop_token_ids(tokenizer, model),
                      perturbations=[perturb], micro_batch_size=micro_batch_size)
    metrics = dict(engine.perturbations.apply(step))
    try:
        t = time.perf_counter()
        # "recompute": rollout_log_probs are a full forward of the perturbed engine
        batch = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens,
                                                        temperature=temperature), seed=seed)
        gen_s = time.perf_counter() - t
        metrics.update(engine.perturbations.check_firing("mismatch probe"))
    finally:
        engine.perturbations.restore()
    train = logprob_batch(model, batch, temperature, micro_batch_size).log_probs
    metrics.update(rollout_mismatch_metrics(train, batch.rollout_log_probs, batch.response_mask))
    mask = batch.response_mask
    metrics.update({
        "mismatch/num_sequences": float(mask.shape[0]),
        "mismatch/num_tokens": float(mask.sum()),
        "mismatch/response_length_mean": float(mask.sum(-1).mean()),
        "mismatch/gen_s": gen_s,
    })
    return metrics


def report_mismatch(metrics: dict[str, float], label: str) -> str:
    """``mismatch_report`` fed from ``measure_mismatch``'s metrics."""
    return mismatch_report(metrics["rollout_corr/abs_logp_diff_mean"], label=label,
                           max_abs_logp_diff=metrics["rollout_corr/abs_logp_diff_max"],
                           k3_kl=metrics["rollout_corr/k3_kl"],
                           num_tokens=int(metrics["mismatch/num_tokens"]))


def numerics_check(
    model_name: str,
    profile: str | NumericsProfile,
    num_prompts: int = 16,
    dtype: str = "float32",
    max_new_tokens: int = 64,
    seed: int = 0,
    micro_batch_size: int = 16,
) -> tuple[dict[str, float], str]:
    """Mismatch of numerics ``profile`` against ``reference`` (the untouched model).

    Prompts: the first ``num_prompts`` problems of the arith task's test split (seeded by
    ``seed``; symbolic for the tiny models), rendered with the model's chat template.
    Returns (metrics, report text).
    """
    prof = get_profile(profile)  # an unknown name fails before the model loads
    model, tokenizer = load_model(model_name, dtype=dtype)
    prompts = probe_prompts(tokenizer, num_prompts, seed, probe_wording(model_name))
    metrics = measure_mismatch(model, tokenizer, prompts, prof, max_new_tokens=max_new_tokens,
                               seed=seed, micro_batch_size=micro_batch_size)
    label = (f"profile {prof.name} vs reference on {model_name} ({dtype}), {len(prompts)} "
             f"prompts, up to {max_new_tokens} sampled tokens (T=1, seed {seed})")
    return metrics, report_mismatch(metrics, label)
