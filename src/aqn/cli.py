"""The ``aqn`` command: parses arguments, builds a config, calls one function."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aqn.errors import (
    ConfigError,
    InputError,
    Interrupted,
    ModelUnavailableError,
    NoTargetsError,
    NotFiredError,
    TrainingError,
)

DESCRIPTION = """\
GRPO post-training with Adaptive Quantization Noise, and the experiments that test it.

  aqn train tiny trainer.noise_injection.enabled=true    a run (dotted overrides)
  aqn sweep --preset demo --jobs 2 --report               variants x seeds, with a report
  aqn report runs/sweeps/demo                             tables, significance, plots
  aqn config show tiny                                    the resolved config, each key's doc
  aqn config explain trainer.noise_injection.sigma_start  one key: type, default, choices

Flags and dotted overrides may come in any order; 'aqn COMMAND --help' lists a command's."""


@functools.cache
def _choices() -> dict[str, tuple[str, ...]]:
    """Argument choices, read from the tables the code itself uses (never listed twice)."""
    from typing import get_args, get_type_hints

    from aqn.models import DTYPES
    from aqn.noise import NoiseInjectionConfig
    from aqn.noise.schedule import EXPONENTS, PRESETS
    from aqn.numerics import PROFILE_PRECISIONS, PROFILES
    from aqn.quant import FORMATS

    hints = get_type_hints(NoiseInjectionConfig)
    return {"dtype": tuple(DTYPES), "preset": tuple(PRESETS), "exponent": EXPONENTS,
            "profile": tuple(PROFILES), "precision": PROFILE_PRECISIONS, "format": tuple(FORMATS),
            "distribution": get_args(hints["distribution"]), "mode": get_args(hints["mode"])}


def _positive(kind: type) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` > 0 (a bad one is argparse's one-line error)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _noise_config(args: argparse.Namespace):
    from aqn.noise import NoiseInjectionConfig

    fields = {
        "preset": args.preset,
        "sigma_start": args.sigma_start,
        "sigma_end": args.sigma_end,
        "num_stages": args.num_stages,
        "exponent": args.exponent,
        "total_steps": args.total_steps,
    }
    for name in ("distribution", "mode", "fp32_targets", "seed"):
        if hasattr(args, name):
            fields[name] = getattr(args, name)
    return NoiseInjectionConfig(**{k: v for k, v in fields.items() if v is not None}).resolved()


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="qerl", choices=_choices()["preset"],
                   help="default: qerl")
    p.add_argument("--sigma-start", type=float)
    p.add_argument("--sigma-end", type=float)
    p.add_argument("--num-stages", type=int)
    p.add_argument("--exponent", choices=_choices()["exponent"], default="qerl-code")
    p.add_argument("--total-steps", type=int, required=True)


def cmd_schedule(args: argparse.Namespace) -> None:
    schedule = _noise_config(args).sigma_schedule()
    rows = schedule.table()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return
    print(f"sigma {schedule.sigma_start:g} -> {schedule.sigma_end:g}, "
          f"{schedule.num_stages} stages over {schedule.total_steps} steps "
          f"(exponent {schedule.exponent})")
    print(_table(["stage", "first step", "last step", "sigma"],
                 [(r.stage, r.first_step, r.last_step, f"{r.sigma:.6g}") for r in rows]))


def _selection_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        class_patterns=tuple(args.class_pattern or ("rmsnorm",)),
        target_modules=tuple(args.target or ()),
        exclude_patterns=tuple(args.exclude or ()),
        include_final_norm=not args.no_final_norm,
    )


def _add_probe_args(p: argparse.ArgumentParser, float16: bool = False) -> None:
    """The model and the probe prompts a mismatch measurement runs on (numerics, quant)."""
    p.add_argument("--model", default="tiny-base")
    p.add_argument("--dtype", default="float32", help="the model's (trainer's) dtype",
                   choices=[d for d in _choices()["dtype"] if float16 or d != "float16"])
    p.add_argument("--prompts", type=_positive(int), default=16,
                   help="arith test prompts (default 16)")
    p.add_argument("--new-tokens", type=_positive(int), default=64)


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' or a Hugging Face model path/id")
    p.add_argument("--dtype", default="float32", choices=_choices()["dtype"])
    p.add_argument("--class-pattern", action="append",
                   help="class-name pattern (repeatable; default: rmsnorm)")
    p.add_argument("--target", action="append", help="module path pattern (repeatable)")
    p.add_argument("--exclude", action="append", help="module path pattern (repeatable)")
    p.add_argument("--no-final-norm", action="store_true", help="leave the final norm out")


def cmd_inspect(args: argparse.Namespace) -> None:
    from aqn.models import load_model
    from aqn.noise import describe_targets, select_norms

    model, _ = load_model(args.model, dtype=args.dtype)
    targets = describe_targets(select_norms(model, **_selection_kwargs(args)))
    total = sum(t.numel for t in targets)
    if args.json:
        print(json.dumps({"model": args.model, "num_modules": len(targets),
                          "num_params": total,
                          "targets": [dataclasses.asdict(t) for t in targets]}, indent=2))
        return
    print(_table(["path", "class", "shape", "dtype", "final"],
                 [(t.path, t.class_name, "x".join(map(str, t.shape)), t.dtype,
                   "yes" if t.is_final else "") for t in targets]))
    print(f"{len(targets)} AQN target modules, {total} parameters in {args.model}")


def cmd_noise_check(args: argparse.Namespace) -> None:
    from aqn.models import load_model
    from aqn.noise import NoiseInjector, stage_reports

    noise = dataclasses.replace(_noise_config(args), **_selection_kwargs(args))
    model, _ = load_model(args.model, dtype=args.dtype)
    reports = stage_reports(NoiseInjector(model, noise))
    if args.json:
        print(json.dumps([dataclasses.asdict(r) | {"swallowed": r.swallowed} for r in reports],
                         indent=2))
        return
    print(f"{args.model} ({reports[0].dtype} targets), {reports[0].num_modules} modules, "
          f"{reports[0].num_params} parameters; {noise.distribution} {noise.mode} noise")
    print(_table(
        ["stage", "first step", "sigma", "effective std", "ratio", "changed", ""],
        [(r.stage, r.step, f"{r.sigma:.6g}", f"{r.effective_std:.3e}",
          f"{r.effective_std / r.drawn_std:.2f}" if r.drawn_std else "-",
          f"{r.frac_changed:.1%}", "SWALLOWED by the cast" if r.swallowed else "")
         for r in reports]))
    if any(r.swallowed for r in reports):
        print("Stages marked SWALLOWED lose most of their noise to the cast; "
              "--fp32-targets (trainer.noise_injection.fp32_targets=true) keeps it.")


DEFAULT_CONFIG = "tiny"  # the preset aqn train and aqn config show take when given none
CONFIG_KEYS = ("Config keys: 'aqn config show [CONFIG] [overrides]' prints the resolved config "
               "with each key's doc; 'aqn config explain KEY' prints one key's type, default, "
               "choices, doc and verl name.")


def _config_first_override(args: argparse.Namespace) -> None:
    """``aqn train trainer.seed=2``: an override where the config goes (no such file) joins
    the overrides, and the default preset stays."""
    if "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]
        args.config = DEFAULT_CONFIG


def cmd_train(args: argparse.Namespace) -> None:
    from aqn import metric_keys as keys
    from aqn.config import load_config
    from aqn.rl.checkpoint import checkpoint_steps
    from aqn.rl.run_dir import run_dir_of
    from aqn.rl.trainer import train

    _config_first_override(args)
    cfg = load_config(args.config, args.overrides)
    try:
        final = train(cfg)
    except Interrupted as e:
        if checkpoint_steps(run_dir_of(cfg)):
            again = [a for a in args.overrides if not a.startswith("trainer.resume=")]
            e.hint = "resume with: " + shlex.join(
                ["aqn", "train", args.config, *again, "trainer.resume=true"])
        else:
            e.hint = (f"no checkpoint was written, nothing to resume: delete {run_dir_of(cfg)} "
                      "and start again")
        raise
    print(json.dumps({k: v for k, v in final.items()
                      if keys.VAL_CORE.fullmatch(k) or k in (keys.AQN_SIGMA, keys.SCORE_MEAN)},
                     indent=1))
    print(f"run directory: {run_dir_of(cfg)}")


def cmd_config(args: argparse.Namespace) -> None:
    from aqn.config import config_hash, load_config
    from aqn.config.docs import explain, render

    if args.action == "explain":
        print(explain(args.key))
        return
    _config_first_override(args)
    cfg = load_config(args.config, args.overrides)
    given = shlex.join([args.config, *args.overrides])
    print(render(cfg, f"aqn config show {given}: the config 'aqn train {given}' runs, "
                      f"resolved (hash {config_hash(cfg)})",
                 changed_only=args.changed), end="")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from aqn.config import load_config
    from aqn.config.schema import ValKwargs
    from aqn.rl.trainer import GRPOTrainer

    if args.pass_k is not None and args.pass_k < 1:
        raise ConfigError(f"--pass-k must be >= 1, got {args.pass_k}")

    cfg = load_config(args.config, args.overrides)
    trainer = GRPOTrainer(cfg)
    metrics = trainer.validate(0)
    files = ["step_0.jsonl"]
    if args.pass_k:
        # pass@k: k completions per prompt sampled as in training (rollout temperature)
        rollout = cfg.actor_rollout_ref.rollout
        sampled = ValKwargs(do_sample=True, temperature=rollout.temperature, n=args.pass_k)
        metrics |= trainer.validate(0, sampled)
        files.append(f"sampled@{args.pass_k}_step_0.jsonl")
    print(json.dumps(metrics, indent=1))
    print("per-item results: " + ", ".join(str(trainer.run_dir / "val" / f) for f in files))


def cmd_numerics(args: argparse.Namespace) -> None:
    from aqn import metric_keys as keys
    from aqn.rollout.mismatch import numerics_check, numerics_table

    kwargs = dict(num_prompts=args.prompts, dtype=args.dtype, max_new_tokens=args.new_tokens,
                  seed=args.seed, rollout_dtype=args.rollout_dtype, precision=args.precision)
    if args.profile != "all":
        metrics, report = numerics_check(args.model, args.profile, **kwargs)
        print(json.dumps(metrics, indent=1) if args.json else report)
        return
    rows, label = numerics_table(args.model, _choices()["profile"], **kwargs)
    if args.json:
        print(json.dumps({"label": label, "rows": rows}, indent=1))
        return
    print(label)
    print(_table(["profile", "casts", "mean |dlogp|", "max |dlogp|", keys.ROLLOUT_KL,
                  "k3 KL", "tokens", "gen s"],
                 [(r["profile"], r["precision"], f"{r[keys.ABS_LOGP_DIFF]:.4g}",
                   f"{r[keys.ABS_LOGP_DIFF_MAX]:.3g}", f"{r[keys.ROLLOUT_KL]:.3g}",
                   f"{r[keys.K3_KL]:.3g}", int(r[keys.MISMATCH_NUM_TOKENS]),
                   f"{r[keys.MISMATCH_GEN_S]:.1f}") for r in rows]))


def cmd_scan(args: argparse.Namespace) -> None:
    from aqn.experiments.scan import run_scan, table

    scan = run_scan(args.model, args.dtype, fmt=args.format, profile=args.profile,
                    activations=args.activations, num_prompts=args.prompts, seed=args.seed,
                    out_dir=args.out)
    print(scan.label)
    print(table(scan.rows))
    print("wrote " + ", ".join(str(f) for f in scan.files)
          + f"\nuse: trainer.noise_injection.layer_multipliers={scan.multipliers_file}")


def cmd_quant(args: argparse.Namespace) -> None:
    from aqn.experiments.quant import quant_errors

    formats = _choices()["format"] if args.format == "all" else (args.format,)
    result = quant_errors(args.model, args.dtype, formats, mismatch=args.mismatch,
                          num_prompts=args.prompts, max_new_tokens=args.new_tokens)
    if args.layers:
        for f in result.formats:
            print(f.layer_table + "\n")
    print(result.label)
    print(_table(result.header, result.rows))


def cmd_pretrain_tiny(args: argparse.Namespace) -> None:
    from aqn.models.tiny_base import pretrain_tiny

    path = pretrain_tiny(force=args.force)
    info = json.loads((path / "pretrain.json").read_text())
    print(f"tiny-base: {path}")
    print(f"greedy accuracy on {info['settings']['n_eval']} test problems: "
          f"{info['test_accuracy']:.1%}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from aqn.experiments.analysis import TARGET_MDE_POINTS
    from aqn.experiments.sweep import (
        at_scale,
        load_sweep,
        out_dir_of,
        run_sweep,
        run_sweep_to_power,
    )

    if args.ray is None and args.retries:
        raise ConfigError("--retries is Ray's task retry: give it with --ray", "--retries")
    if args.ray is not None and args.jobs > 1:
        raise ConfigError("--jobs sizes a local process pool; on Ray each run reserves its "
                          "trainer.resources instead", "--jobs")
    if args.retries < 0:
        raise ConfigError(f"must be >= 0, got {args.retries}", "--retries")

    if bool(args.sweep) == bool(args.preset):
        raise ConfigError("give a sweep file or --preset NAME (one of them)")
    spec = load_sweep(args.sweep or args.preset)
    if args.scale:
        spec = at_scale(spec, args.scale)
    if args.seeds:
        spec = dataclasses.replace(spec, seeds=tuple(args.seeds))
    try:
        if args.mde is not None:
            spec, results = run_sweep_to_power(spec, args.mde, args.max_seeds, args.jobs,
                                               args.ray, args.retries)
        else:
            results = run_sweep(spec, args.jobs, args.ray, args.retries)
    except Interrupted as e:
        e.hint = "resume with the same command: " + shlex.join(["aqn", *args.argv])
        raise
    print(_table(["run", "status"], sorted(results.items())))
    out = out_dir_of(spec)
    print(f"sweep directory: {out}")
    if args.report:
        _print_report([out], out / "report", None,
                      TARGET_MDE_POINTS if args.mde is None else args.mde)
    # the report is still written; the exit status says not all is well
    failed = sorted(k for k, v in results.items() if v == "failed")
    held = sorted(k for k, v in results.items() if v == "held")
    if failed or held:
        raise TrainingError("; ".join(
            [f"{len(failed)} of {len(results)} runs failed: {', '.join(failed)} (run.json, "
             "error.log in each run directory)"] * bool(failed)
            + [f"{len(held)} of {len(results)} runs are held by another aqn process and were "
               f"left alone: {', '.join(held)}"] * bool(held)))


def _print_report(paths, out_dir, baseline, target_mde: float) -> None:
    from aqn.experiments.report import build_report

    report = build_report(paths, out_dir, baseline=baseline, target_mde=target_mde)
    print(report.headline)
    print(f"report: {Path(out_dir) / 'report.md'} (and report.html)")


def cmd_report(args: argparse.Namespace) -> None:
    out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
    _print_report([Path(p) for p in args.paths], out, args.baseline, args.mde)


def _args_schedule(p: argparse.ArgumentParser) -> None:
    _add_schedule_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_schedule)


def _args_inspect(p: argparse.ArgumentParser) -> None:
    _add_selection_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)


def _args_noise_check(p: argparse.ArgumentParser) -> None:
    _add_selection_args(p)
    _add_schedule_args(p)
    p.add_argument("--distribution", choices=_choices()["distribution"], default="gaussian")
    p.add_argument("--mode", choices=_choices()["mode"], default="additive")
    p.add_argument("--fp32-targets", action="store_true", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_noise_check)


def _args_numerics(p: argparse.ArgumentParser) -> None:
    _add_probe_args(p, float16=True)
    p.add_argument("--profile", default="npu-like", choices=["all", *_choices()["profile"]],
                   help="a profile, or all: a table of every one")
    p.add_argument("--rollout-dtype", choices=_choices()["dtype"],
                   help="the engine's dtype (actor_rollout_ref.rollout.dtype; default --dtype)")
    p.add_argument("--precision", default="auto", choices=_choices()["precision"],
                   help="the profile's casts: auto (fp16 on a float16 engine, else bf16), or "
                        "bf16 / fp16 emulated on any engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_numerics)


def _args_quant(p: argparse.ArgumentParser) -> None:
    _add_probe_args(p)
    p.add_argument("--format", default="all",
                   choices=["all", *_choices()["format"]])
    p.add_argument("--layers", action="store_true", help="also print the per-layer tables")
    p.add_argument("--mismatch", action="store_true",
                   help="also measure |dlogp| of a quantized engine vs the clean model")
    p.set_defaults(func=cmd_quant)


def _args_scan(p: argparse.ArgumentParser) -> None:
    _add_probe_args(p)
    p.add_argument("--format", choices=_choices()["format"])
    p.add_argument("--profile", choices=_choices()["profile"])
    p.add_argument("--activations", action="store_true",
                   help="W4A4: quantize the Linear inputs too (with --format)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output directory (default runs/scan/<model>-<format>)")
    p.set_defaults(func=cmd_scan)


def _args_pretrain_tiny(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="train again even if cached")
    p.set_defaults(func=cmd_pretrain_tiny)


def _add_config_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_CONFIG) -> None:
    from aqn.configs import preset_names

    p.add_argument("config", nargs="?" if default else None, default=default,
                   help=f"a YAML file or a preset ({', '.join(preset_names())})"
                   + f"; default: {default}" * bool(default))
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.seed=2 (see "
                   "aqn config show / aqn config explain KEY)")
    p.epilog = CONFIG_KEYS


def _args_train(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.set_defaults(func=cmd_train)


def _args_config(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="{show,explain}")
    show = sub.add_parser(
        "show", help="the resolved config, each key's doc above it",
        description="Print the config 'aqn train' runs with the same arguments, resolved "
        "(presets, overrides and the values resolving fills), as YAML with each key's doc "
        "above it and '# default: ...' beside a value that is not the default. The output "
        "loads back as a config file.")
    _add_config_args(show)
    show.add_argument("--changed", action="store_true",
                      help="only the keys whose value is not the default (and their docs)")
    show.epilog = "One key in full: aqn config explain KEY."
    explain = sub.add_parser(
        "explain", help="one key: type, default, choices, doc, verl and TRL names",
        description="Print one config key's type, default, choices, doc and the name verl "
        "and TRL give it; a section prints its doc and its keys.")
    explain.add_argument("key", help="a dotted key, e.g. trainer.noise_injection.sigma_start "
                         "(or a section, e.g. trainer.noise_injection)")
    p.set_defaults(func=cmd_config)


def _args_evaluate(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, default=None)
    p.add_argument("--pass-k", type=int, metavar="K",
                   help="also sample K completions per prompt at the rollout temperature: "
                   "pass@K, mean@K and the fraction of groups with zero advantage")
    p.set_defaults(func=cmd_evaluate)


def _args_sweep(p: argparse.ArgumentParser) -> None:
    from aqn.experiments.sweep import RAY_LOCAL, sweep_presets

    p.add_argument("sweep", nargs="?", help="a sweep YAML file (or a preset name)")
    p.add_argument("--preset", help="a shipped sweep: " + ", ".join(sweep_presets()))
    p.add_argument("--jobs", type=_positive(int), default=1, help="runs in parallel (default 1)")
    p.add_argument("--ray", nargs="?", const=RAY_LOCAL, metavar="ADDRESS",
                   help="run each run as a Ray task: on the cluster at ADDRESS ('auto': the "
                   "one this machine belongs to), or without ADDRESS on a Ray instance of this "
                   "machine; each reserves its trainer.resources (docs/integrations.md)")
    p.add_argument("--retries", type=int, default=0, metavar="N",
                   help="with --ray: run a task whose worker or node died again, up to N "
                   "times, resuming from its checkpoint (default 0: record it as failed)")
    p.add_argument("--seeds", type=int, nargs="+", help="run these seeds instead of the file's")
    p.add_argument("--scale", help="one of the sweep's larger set-ups (e.g. smollm2: hours "
                   "on a CPU); runs go to runs/sweeps/<name>-<scale>")
    p.add_argument("--report", action="store_true", help="write the report when done")
    p.add_argument("--mde", type=_positive(float), metavar="POINTS",
                   help="after the file's seeds (the pilot, >= 2), add seeds until every "
                   "comparison's minimal detectable effect (80 %% power) is at most POINTS, "
                   "or --max-seeds; the report then calls 'no effect' only below POINTS")
    p.add_argument("--max-seeds", type=_positive(int), default=10,
                   help="the seed budget of --mde (default 10)")
    p.epilog = "A sweep file's base, overrides and variants are config keys. " + CONFIG_KEYS
    p.set_defaults(func=cmd_sweep)


def _args_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="run or sweep directories, verl file-logger "
                   ".jsonl files, TRL output dirs (trainer_state.json); a foreign log may be "
                   "labelled variant[/seedN]=path")
    p.add_argument("--out", help="output folder (default: <first path>/report)")
    p.add_argument("--baseline", help="the variant to compare against (default: baseline)")
    p.add_argument("--mde", type=_positive(float), default=2.5, metavar="POINTS",
                   help="the effect a comparison must be able to detect (80 %% power) before "
                   "'not significant' reads 'no effect larger than its MDE' (default 2.5)")
    p.set_defaults(func=cmd_report)


# name -> (help, the function that adds its arguments and sets its ``func``)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "schedule": ("print the AQN sigma schedule, stage by stage", _args_schedule),
    "inspect": ("list the modules AQN would perturb in a model", _args_inspect),
    "noise-check": ("per stage: sigma, effective std after the cast, elements changed",
                    _args_noise_check),
    "numerics": ("mismatch a simulated hardware numerics profile causes against reference, "
                 "compared with published GPU/NPU figures", _args_numerics),
    "quant": ("fake weight quantization error per format (and, with --mismatch, the rollout "
              "mismatch it causes)", _args_quant),
    "scan": ("per-layer sensitivity to a format or profile (SQNR, relative error, deadzone, "
             "saturation), a plot and a multipliers file", _args_scan),
    "pretrain-tiny": ("make (or find in the cache) the tiny-base model for RL",
                      _args_pretrain_tiny),
    "train": ("GRPO training (AQN on with trainer.noise_injection.enabled=true)", _args_train),
    "config": ("the resolved config with every key's doc (show), or one key in full (explain)",
               _args_config),
    "evaluate": ("validation only: greedy accuracy of the config's model on its validation "
                 "split (no training)", _args_evaluate),
    "sweep": ("run every (variant, seed) pair of a sweep file", _args_sweep),
    "report": ("tables, significance and plots from run directories", _args_report),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``aqn`` parser. ``command``: only that sub-command gets its arguments, so that
    ``aqn --help`` and ``aqn report ...`` import no torch to list the others' choices ("": none
    of them); None: every sub-command's."""
    parser = argparse.ArgumentParser(prog="aqn", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            add_arguments(p)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; dotted overrides may follow a command's flags as well as precede them
    (``aqn evaluate tiny --pass-k 8 trainer.seed=2``)."""
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command if command in COMMANDS else "")
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    if rest != overrides or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    args.argv = argv
    return args


def main(argv: Sequence[str] | None = None) -> int:
    # transformers imports torchao when it is installed (the parser's choices import the
    # registries); its import-time chatter about kernels this CPU build lacks says nothing
    # about the run.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args.func(args)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, no traceback
        signum = getattr(e, "signum", signal.SIGINT)
        where, hint = getattr(e, "where", ""), getattr(e, "hint", "")
        print(f"aqn {args.command}: interrupted by {signal.Signals(signum).name}"
              + f" {where}" * bool(where) + f"; {hint}" * bool(hint), file=sys.stderr)
        return 128 + signum
    # one line naming the key or file at fault; OSError covers a full disk, permissions and
    # aqn.files.FileError (torn or garbage files, named). Anything else is a bug: traceback.
    except (InputError, NoTargetsError, NotFiredError, TrainingError, ModelUnavailableError,
            OSError) as e:
        print(f"aqn {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate(signum: int, frame) -> None:
    raise Interrupted(signum)


if __name__ == "__main__":
    sys.exit(main())
