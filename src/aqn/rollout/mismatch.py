"""How far a perturbed rollout engine's log-probs drift from the clean training model's.

``measure_mismatch`` samples completions from a perturbed copy of the model (any
perturbation: a numerics profile, AQN noise, fake quantization), scores the same tokens
under the perturbed engine and under the clean model through the one shared ``logprob_batch``,
and returns verl's rollout-vs-training mismatch metrics; the engine's copy may run in
another dtype than the model (``rollout_dtype``, as ``actor_rollout_ref.rollout.dtype``).
``numerics_check`` and ``numerics_table`` are the ``aqn numerics`` command: numerics profiles
against the untouched model, on a named model, in a trainer and a rollout dtype.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

from torch import nn

from aqn import metric_keys as keys
from aqn.data import encode_prompts, load_task
from aqn.models import cast_parameters, load_model, parse_dtype, stop_token_ids
from aqn.numerics import NumericsEmulator, NumericsProfile, get_profile, mismatch_report
from aqn.perturb import Perturbation, registered
from aqn.rollout.base import SamplingParams
from aqn.rollout.forward import logprob_batch
from aqn.rollout.hf import HFEngine
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
    rollout_dtype: str | None = None,
) -> dict[str, float]:
    """Mismatch between a perturbed engine (rollout) and the clean ``model`` (training).

    Completions are sampled (``temperature``, seeded by ``seed``) from a deep copy of
    ``model`` (its parameters cast to ``rollout_dtype`` when given) with the perturbation
    applied at ``step``; both sides compute the sampled tokens' log-probs with
    ``logprob_batch`` in the same micro-batches. ``model`` itself is not modified.

    Returns ``rollout_mismatch_metrics`` (``training/rollout_probs_diff_*``,
    ``rollout_corr/{kl,k3_kl,chi2_token,log_ppl_abs_diff,ppl_ratio}``,
    ``rollout_corr/abs_logp_diff_{mean,max}``) plus the perturbation's own metrics and
    ``mismatch/{num_sequences,num_tokens,response_length_mean,gen_s}``.
    """
    if not prompts:
        raise ValueError("measure_mismatch needs at least one prompt")
    engine_model = copy.deepcopy(model).eval()
    if rollout_dtype is not None:
        cast_parameters(engine_model, rollout_dtype)
    perturb = build_perturbation(perturbation, engine_model, seed=seed)
    engine = HFEngine(engine_model, pad_token_id=tokenizer.pad_token_id,
                      stop_token_ids=stop_token_ids(tokenizer, model),
                      perturbations=registered(perturb), micro_batch_size=micro_batch_size)
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
        keys.MISMATCH_NUM_TOKENS: float(mask.sum()),
        "mismatch/response_length_mean": float(mask.sum(-1).mean()),
        keys.MISMATCH_GEN_S: gen_s,
    })
    return metrics


def report_mismatch(metrics: dict[str, float], label: str) -> str:
    """``mismatch_report`` fed from ``measure_mismatch``'s metrics."""
    return mismatch_report(metrics[keys.ABS_LOGP_DIFF], label=label,
                           max_abs_logp_diff=metrics[keys.ABS_LOGP_DIFF_MAX],
                           k3_kl=metrics[keys.K3_KL],
                           num_tokens=int(metrics[keys.MISMATCH_NUM_TOKENS]))


def _profile_as(profile: str | NumericsProfile, precision: str) -> NumericsProfile:
    """``profile`` with its precision set (``auto``: as it is, resolved on the engine)."""
    prof = get_profile(profile)
    return prof if precision == "auto" else prof.replace(name=prof.name, precision=precision)


def numerics_table(
    model_name: str,
    profiles: Sequence[str | NumericsProfile],
    num_prompts: int = 16,
    dtype: str = "float32",
    rollout_dtype: str | None = None,
    precision: str = "auto",
    max_new_tokens: int = 64,
    seed: int = 0,
    micro_batch_size: int = 16,
) -> tuple[list[dict[str, float | str]], str]:
    """Mismatch of each numerics profile against the untouched model, loaded once.

    The trainer side is ``model_name`` in ``dtype``; the engine its copy cast to
    ``rollout_dtype`` (null: ``dtype``) under each profile, whose casts follow the engine
    (fp16 on a float16 engine, bf16 otherwise) unless ``precision`` (bf16, fp16) sets them.
    Prompts: the first ``num_prompts`` problems of the arith task's test split (seeded by
    ``seed``; symbolic for the tiny models), rendered with the model's chat template.
    Returns one row per profile (``profile``, ``precision`` as resolved on the engine, then
    ``measure_mismatch``'s metrics) and a label saying what was measured.
    """
    profs = [_profile_as(p, precision) for p in profiles]  # an unknown name fails now
    model, tokenizer = load_model(model_name, dtype=dtype)
    engine_dtype = parse_dtype(rollout_dtype or dtype)
    prompts = probe_prompts(tokenizer, num_prompts, seed, probe_wording(model_name))
    rows: list[dict[str, float | str]] = []
    for prof in profs:
        metrics = measure_mismatch(model, tokenizer, prompts, prof,
                                   max_new_tokens=max_new_tokens, seed=seed,
                                   micro_batch_size=micro_batch_size,
                                   rollout_dtype=rollout_dtype)
        resolved = "-" if prof.is_reference else prof.on(engine_dtype).precision
        rows.append({"profile": prof.name, "precision": resolved, **metrics})
    label = (f"{model_name}: trainer {dtype}, rollout {rollout_dtype or dtype}; "
             f"{len(prompts)} prompts, up to {max_new_tokens} sampled tokens (T=1, seed {seed})")
    return rows, label


def numerics_check(
    model_name: str,
    profile: str | NumericsProfile,
    num_prompts: int = 16,
    dtype: str = "float32",
    max_new_tokens: int = 64,
    seed: int = 0,
    micro_batch_size: int = 16,
    rollout_dtype: str | None = None,
    precision: str = "auto",
) -> tuple[dict[str, float], str]:
    """Mismatch of numerics ``profile`` against ``reference`` (the untouched model), placed
    among the published figures (``numerics_table``, one profile). Returns (metrics, report)."""
    rows, label = numerics_table(model_name, [profile], num_prompts, dtype, rollout_dtype,
                                 precision, max_new_tokens, seed, micro_batch_size)
    row = rows[0]
    metrics = {k: v for k, v in row.items() if k not in ("profile", "precision")}
    precision_note = "" if row["precision"] == "-" else f" (casts {row['precision']})"
    return metrics, report_mismatch(metrics, f"profile {row['profile']}{precision_note} vs "
                                             f"the untouched model; {label}")
