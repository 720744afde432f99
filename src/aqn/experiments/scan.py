"""``aqn scan``: how sensitive each decoder layer is to a quantization format or a profile.

On probe prompts, each decoder layer's output under the perturbation is compared with the
clean model's, over the non-padding positions:

- SQNR = 10 log10(E[x^2] / E[e^2]) and the relative error ||e|| / ||x||, where x is the clean
  output and e the difference;
- **isolated**: only that layer's Linear weights (and inputs, with ``activations``) are
  quantized, so its input is clean and the figure is the layer's own sensitivity; for a
  numerics profile (which patches the whole model) this column is left out;
- **cumulative**: the whole model perturbed, the error every layer's output carries;
- deadzone (the fraction of non-zero weights the format rounds to zero) and saturation (the
  fraction clipped at the largest value of their block / row / tensor) of the layer's Linear
  weights;
- **output**: the format applied to the clean layer output itself (the verl fork's scan: the
  SQNR of quantizing that hidden state), with its deadzone and saturation.

The multipliers file it writes (``layer_multipliers``: relative error / its mean over the
layers, isolated where measured) is what ``trainer.noise_injection.layer_multipliers`` reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from aqn.errors import ConfigError, InputError
from aqn.files import write_atomic
from aqn.models import load_model
from aqn.modules import layer_index
from aqn.numerics import NumericsEmulator
from aqn.quant import WeightQuantizer, check_format, fake_quantize
from aqn.quant.activation import ActivationQuantizer
from aqn.quant.formats import clip_stats
from aqn.rollout.hf import left_pad
from aqn.rollout.mismatch import probe_prompts, probe_wording


@dataclass(frozen=True)
class LayerScan:
    layer: int
    path: str
    sqnr_db: float | None  # isolated (None for a profile)
    rel_err: float | None
    cumulative_sqnr_db: float
    cumulative_rel_err: float
    deadzone: float | None  # of the layer's Linear weights (None for a profile)
    saturation: float | None
    output_sqnr_db: float | None  # the format on the clean output hidden state itself
    output_deadzone: float | None
    output_saturation: float | None


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The numbered decoder layers, in order (``model.layers.<i>``)."""
    found = [(p, m) for p, m in model.named_modules()
             if type(m).__name__.lower().endswith(("decoderlayer", "block"))
             and layer_index(p) is not None and p.split(".")[-1].isdigit()]
    if not found:
        raise InputError(f"no decoder layers (a module path ending in a layer number, class "
                         f"'*DecoderLayer') in {type(model).__name__}: aqn scan reads layer "
                         "outputs")
    return found


def _outputs(model: nn.Module, layers, ids: Tensor, mask: Tensor) -> list[Tensor]:
    """Each layer's output hidden states at the non-padding positions, as float64."""
    captured: list[Tensor | None] = [None] * len(layers)

    def hook_for(i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[i] = hidden.detach()
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, (_, m) in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    keep = mask.bool()
    return [h[keep].double() for h in captured]


def _error(clean: Tensor, other: Tensor) -> tuple[float, float]:
    signal, noise = float((clean ** 2).sum()), float(((other - clean) ** 2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    return sqnr, math.sqrt(noise / signal) if signal else math.inf


def _perturbations(model: nn.Module, fmt: str, activations: bool, include=()) -> list:
    built = [WeightQuantizer(model, fmt, include=include)]
    if activations:
        built.append(ActivationQuantizer(model, fmt, include=include))
    return built


def scan_model(model: nn.Module, ids: Tensor, mask: Tensor, fmt: str | None = None,
               profile: str | None = None, activations: bool = False) -> list[LayerScan]:
    """The per-layer table of ``fmt`` (W4A16, or W4A4 with ``activations``) or ``profile``."""
    if (fmt is None) == (profile is None):
        raise ValueError("scan one format or one profile")
    if fmt is not None:
        check_format(fmt, "format")
    model.eval()
    layers = decoder_layers(model)
    clean = _outputs(model, layers, ids, mask)

    def perturbed(perturbations) -> list[Tensor]:
        for p in perturbations:
            p.apply(0)
        try:
            return _outputs(model, layers, ids, mask)
        finally:
            for p in reversed(perturbations):
                p.restore()

    if profile is not None:
        cumulative = perturbed([NumericsEmulator(model, profile)])
    else:
        cumulative = perturbed(_perturbations(model, fmt, activations))
    rows = []
    for i, (path, layer) in enumerate(layers):
        sqnr = rel = dead = sat = out_sqnr = out_dead = out_sat = None
        if fmt is not None:
            hidden = clean[i].float()
            out_sqnr, _ = _error(clean[i], fake_quantize(hidden, fmt).double())
            out_dead, out_sat = clip_stats(hidden, fmt)
            own = perturbed(_perturbations(model, fmt, activations, include=(f"{path}.*",)))
            sqnr, rel = _error(clean[i], own[i])
            weights = [m.weight.detach() for _, m in layer.named_modules()
                       if isinstance(m, nn.Linear)]
            stats = [clip_stats(w, fmt) for w in weights]
            n = sum(w.numel() for w in weights)
            dead = sum(d * w.numel() for (d, _), w in zip(stats, weights, strict=True)) / n
            sat = sum(s * w.numel() for (_, s), w in zip(stats, weights, strict=True)) / n
        c_sqnr, c_rel = _error(clean[i], cumulative[i])
        rows.append(LayerScan(layer_index(path), path, sqnr, rel, c_sqnr, c_rel, dead, sat,
                              out_sqnr, out_dead, out_sat))
    return rows


def multipliers(rows: list[LayerScan]) -> list[float]:
    """Sigma multipliers: each layer's relative error over the mean (isolated if measured)."""
    errs = [r.rel_err if r.rel_err is not None else r.cumulative_rel_err for r in rows]
    mean = sum(errs) / len(errs)
    return [round(e / mean, 4) if mean else 1.0 for e in errs]


def table(rows: list[LayerScan]) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    head = ("layer", "SQNR dB", "rel err", "cum. SQNR dB", "cum. rel err", "deadzone",
            "saturation", "out SQNR dB", "out deadzone", "out sat.", "multiplier")
    body = [(str(r.layer), f(r.sqnr_db, ".2f"), f(r.rel_err, ".4f"),
             f(r.cumulative_sqnr_db, ".2f"), f(r.cumulative_rel_err, ".4f"),
             f(r.deadzone, ".4%"), f(r.saturation, ".4%"), f(r.output_sqnr_db, ".2f"),
             f(r.output_deadzone, ".3%"), f(r.output_saturation, ".3%"), f"{m:.3f}")
            for r, m in zip(rows, multipliers(rows), strict=True)]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True))
                     for line in (head, *body))


def plot(path: Path, rows: list[LayerScan], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = [r.layer for r in rows]
    if rows[0].sqnr_db is not None:
        ax.plot(x, [r.sqnr_db for r in rows], "o-", label="isolated (this layer only)")
    ax.plot(x, [r.cumulative_sqnr_db for r in rows], "s--", label="cumulative (whole model)")
    if rows[0].output_sqnr_db is not None:
        ax.plot(x, [r.output_sqnr_db for r in rows], "^:", label="the format on the output")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("SQNR of the layer output (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_scan(out_dir: Path, rows: list[LayerScan], label: str, source: dict) -> list[Path]:
    """table.txt, scan.json (rows + source), multipliers.json and sqnr.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "table.txt", f"{label}\n{table(rows)}\n")
    write_atomic(out_dir / "scan.json", json.dumps(
        {"source": source, "layers": [asdict(r) for r in rows]}, indent=1))
    write_atomic(out_dir / "multipliers.json", json.dumps(
        {"layer_multipliers": multipliers(rows), "source": source,
         "rule": "relative error of the layer output / its mean over the layers"}, indent=1))
    plot(out_dir / "sqnr.png", rows, label)
    return [out_dir / n for n in ("table.txt", "scan.json", "multipliers.json", "sqnr.png")]


@dataclass(frozen=True)
class ScanRun:
    """What ``run_scan`` measured and wrote."""

    label: str
    rows: list[LayerScan]
    out_dir: Path
    files: list[Path]

    @property
    def multipliers_file(self) -> Path:
        return self.out_dir / "multipliers.json"


def run_scan(model_name: str, dtype: str = "float32", fmt: str | None = None,
             profile: str | None = None, activations: bool = False, num_prompts: int = 16,
             seed: int = 0, out_dir: str | Path | None = None) -> ScanRun:
    """Scan ``model_name`` under one format (``activations``: W4A4) or one profile on
    ``num_prompts`` arith probe prompts, and write the files (``write_scan``) to ``out_dir``
    (default ``runs/scan/<model>-<format or profile>[-w4a4]``)."""
    if (fmt is None) == (profile is None):
        raise ConfigError("give one of --format or --profile")
    model, tokenizer = load_model(model_name, dtype=dtype)
    prompts = probe_prompts(tokenizer, num_prompts, seed, probe_wording(model_name))
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    rows = scan_model(model, ids, mask, fmt=fmt, profile=profile, activations=activations)
    what = profile or (f"{fmt} W4A4" if activations else f"{fmt} weights")
    label = (f"{model_name} ({dtype}) under {what}: {len(prompts)} probe prompts, "
             f"{int(mask.sum())} tokens")
    name = (profile or fmt) + ("-w4a4" if activations else "")
    out = Path(out_dir or Path("runs") / "scan" / f"{Path(model_name).name}-{name}")
    files = write_scan(out, rows, label, {"model": model_name, "dtype": dtype, "format": fmt,
                                          "profile": profile, "activations": activations,
                                          "prompts": len(prompts), "seed": seed})
    return ScanRun(label, rows, out, files)
