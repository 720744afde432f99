"""``aqn quant``: the error fake weight quantization makes in a model, per format, and (with
``mismatch``) the rollout-vs-training mismatch a quantized engine causes.

Every Linear weight but the output head and the embeddings (``aqn.quant.DEFAULT_EXCLUDE``) is
quantized on a copy of the model: rel L2 and SQNR pooled over those weights
(``aqn.quant.report``); the mismatch is ``aqn.rollout.mismatch.measure_mismatch`` of an engine
under ``WeightQuantizer`` against the clean model, on the arith probe prompts.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from aqn import metric_keys as keys
from aqn.models import load_model
from aqn.quant import FORMATS, WeightQuantizer, quantize_model
from aqn.rollout.mismatch import measure_mismatch, probe_prompts, probe_wording


@dataclass(frozen=True)
class FormatError:
    """One format's error on the model (and the mismatch it causes, when measured)."""

    format: str
    num_layers: int
    rel_l2: float
    """||Q(w) - w|| / ||w|| pooled over the quantized weights."""
    sqnr_db: float
    layer_table: str
    """The per-layer table (``QuantReport.table``)."""
    mismatch: dict[str, float] | None = None
    """``measure_mismatch``'s metrics of an engine under this format; None: not measured."""


@dataclass(frozen=True)
class QuantErrors:
    model: str
    dtype: str
    formats: list[FormatError]

    @property
    def label(self) -> str:
        return (f"{self.model} ({self.dtype}): fake weight quantization of every Linear but "
                "lm_head and embeddings")

    @property
    def header(self) -> list[str]:
        mismatch = ["mean |dlogp|", "max |dlogp|", "k3 KL"] if self.formats[0].mismatch else []
        return ["format", "layers", "rel L2 %", "SQNR dB", *mismatch]

    @property
    def rows(self) -> list[list[str]]:
        rows = []
        for f in self.formats:
            row = [f.format, str(f.num_layers), f"{100 * f.rel_l2:.2f}", f"{f.sqnr_db:.2f}"]
            if f.mismatch is not None:
                m = f.mismatch
                row += [f"{m[keys.ABS_LOGP_DIFF]:.4f}", f"{m[keys.ABS_LOGP_DIFF_MAX]:.3f}",
                        f"{m[keys.K3_KL]:.2e}"]
            rows.append(row)
        return rows


def quant_errors(model_name: str, dtype: str = "float32", formats: Sequence[str] = FORMATS,
                 mismatch: bool = False, num_prompts: int = 16, max_new_tokens: int = 64
                 ) -> QuantErrors:
    """Each format's weight error on ``model_name``; with ``mismatch``, the mismatch of a
    quantized engine against the clean model on ``num_prompts`` probe prompts."""
    model, tokenizer = load_model(model_name, dtype=dtype)
    prompts = (probe_prompts(tokenizer, num_prompts, wording=probe_wording(model_name))
               if mismatch else None)
    results = []
    for fmt in formats:
        report = quantize_model(copy.deepcopy(model), fmt)
        measured = None
        if prompts is not None:
            measured = measure_mismatch(
                model, tokenizer, prompts,
                lambda engine_model, fmt=fmt: WeightQuantizer(engine_model, fmt),
                max_new_tokens=max_new_tokens)
        results.append(FormatError(fmt, len(report.layers), report.rel_l2, report.sqnr_db,
                                   report.table(), measured))
    return QuantErrors(model_name, dtype, results)
