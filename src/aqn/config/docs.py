"""Every config key's documentation, read from where the key is defined.

Each field of the config tree (``schema.AQNConfig`` and the sections it holds, some of them
defined beside their kernels: ``aqn.noise.config``, ``aqn.numerics.op_noise``,
``aqn.quant.weight_noise``, ``config.rollout_correction``) carries its doc in a string literal
right under it, as cleanrl's ``Args`` do. ``field_docs`` reads those strings from the source
(``ast``); ``key_docs`` gives, for every dotted key, its type, default, choices, doc and the
name verl and TRL give the same setting. ``aqn config show`` prints ``render``'s commented
YAML, ``aqn config explain KEY`` prints ``explain``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
from collections.abc import Callable, Iterator
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from aqn.config.rollout_correction import RS_OPTIONS, RolloutCorrectionConfig
from aqn.config.schema import ActorConfig, AQNConfig, DataConfig, RolloutConfig
from aqn.config.upgrade import renamed_key_error
from aqn.data.arith import LEVELS
from aqn.errors import ConfigError
from aqn.hashing import to_plain
from aqn.noise.config import NoiseInjectionConfig
from aqn.noise.schedule import PRESETS
from aqn.numerics import PROFILES
from aqn.quant import FORMATS

WIDTH = 92  # the width docs are wrapped to


# --------------------------------------------------------------- docs from the source


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right under the field in ``cls``'s source (cleaned
    as a docstring); fields without one are absent."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _fields(cls: type, prefix: str = "") -> Iterator[tuple[str, type, dataclasses.Field, Any]]:
    """(dotted key, owning class, field, its type) of every field under ``cls``, sections
    before their keys, in definition order."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        yield key, cls, f, hints[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], key + ".")


def undocumented(root: type = AQNConfig) -> list[str]:
    """Dotted keys of the fields under ``root`` that have no doc string."""
    return [key for key, cls, f, _ in _fields(root) if not field_docs(cls).get(f.name)]


# ------------------------------------------------------------------------- choices


def _registry(names: Callable[[], dict[str, str]], nullable: bool = False
              ) -> Callable[[], dict[str, str]]:
    return lambda: names() | ({"null": ""} if nullable else {})


def _formats() -> dict[str, str]:
    return dict.fromkeys(FORMATS, "")


def _profiles() -> dict[str, str]:
    return {name: p.description for name, p in PROFILES.items()}


def _presets() -> dict[str, str]:
    return {name: f"sigma {p.sigma_start:g} -> {p.sigma_end:g} in {p.num_stages} stages "
                  f"({p.source})" for name, p in PRESETS.items()}


# String (and int) keys whose values are names in one of aqn's registries: the same tables
# the config validates them against.
REGISTRY_CHOICES: dict[tuple[type, str], Callable[[], dict[str, str]]] = {
    (DataConfig, "difficulty"): lambda: {str(level): "" for level in LEVELS},
    (ActorConfig, "quantization"): _registry(_formats, nullable=True),
    (ActorConfig, "activation_quantization"): _registry(_formats, nullable=True),
    (ActorConfig, "numerics"): _profiles,
    (RolloutConfig, "quantization"): _registry(_formats, nullable=True),
    (RolloutConfig, "activation_quantization"): _registry(_formats, nullable=True),
    (RolloutConfig, "numerics"): _profiles,
    (NoiseInjectionConfig, "preset"): _registry(_presets, nullable=True),
    (RolloutCorrectionConfig, "rollout_rs"): _registry(lambda: dict.fromkeys(RS_OPTIONS, ""),
                                                       nullable=True),
}


def _yaml_value(value: Any) -> str:
    """``value`` as one line of YAML (what a YAML file or a dotted override takes)."""
    text = yaml.safe_dump([to_plain(value)], default_flow_style=True, width=1 << 20).strip()
    return text[1:-1]


def _literal_choices(tp: Any) -> list[Any] | None:
    """The values a Literal type (or a list / optional of one) allows; None when free."""
    origin = get_origin(tp)
    if origin is Literal:
        return list(get_args(tp))
    if origin is tuple:
        return _literal_choices(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        inner = [_literal_choices(a) for a in args if a is not type(None)]
        if inner and all(c is not None for c in inner):
            return [c for choices in inner for c in choices] + [None] * (type(None) in args)
    return None


def _choices(cls: type, name: str, tp: Any) -> dict[str, str]:
    if (cls, name) in REGISTRY_CHOICES:
        return REGISTRY_CHOICES[cls, name]()
    return {_yaml_value(c): "" for c in _literal_choices(tp) or ()}


def type_name(tp: Any) -> str:
    """A type as a config file spells it: null, str, list[str], float | null, map[int, float]."""
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(dict.fromkeys("null" if a is None else type(a).__name__
                                        for a in get_args(tp)))
    if origin in (Union, types.UnionType):
        return " | ".join(dict.fromkeys(type_name(a) for a in get_args(tp)))
    if origin is tuple:
        return f"list[{type_name(get_args(tp)[0])}]"
    if origin is dict:
        return "map[{}, {}]".format(*(type_name(a) for a in get_args(tp)))
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


# ------------------------------------------------------------------ verl and TRL names

_NOISE = "trainer.noise_injection."
# aqn keys that are verl's own keys, same path and meaning (defaults may differ), with a note
# where the meaning differs in part.
VERL_SAME: dict[str, str] = {
    "data.train_batch_size": "",
    "data.max_prompt_length": "",
    "data.max_response_length": "",
    "data.shuffle": "",
    "data.seed": "there the seed of the shuffle; aqn's trainer.seed seeds the data order and "
                 "data.seed picks the problems",
    "actor_rollout_ref.model.path": "",
    "actor_rollout_ref.model.enable_gradient_checkpointing": "",
    "actor_rollout_ref.actor.optim.lr": "",
    "actor_rollout_ref.actor.optim.weight_decay": "",
    "actor_rollout_ref.actor.optim.betas": "",
    "actor_rollout_ref.actor.ppo_mini_batch_size": "",
    "actor_rollout_ref.actor.ppo_micro_batch_size": "deprecated there for "
                                                    "ppo_micro_batch_size_per_gpu",
    "actor_rollout_ref.actor.ppo_epochs": "",
    "actor_rollout_ref.actor.clip_ratio_low": "",
    "actor_rollout_ref.actor.clip_ratio_high": "",
    "actor_rollout_ref.actor.clip_ratio_c": "",
    "actor_rollout_ref.actor.loss_agg_mode": "",
    "actor_rollout_ref.actor.use_kl_loss": "",
    "actor_rollout_ref.actor.kl_loss_coef": "",
    "actor_rollout_ref.actor.kl_loss_type": "",
    "actor_rollout_ref.actor.entropy_coeff": "",
    "actor_rollout_ref.actor.grad_clip": "",
    "actor_rollout_ref.rollout.name": "",
    "actor_rollout_ref.rollout.n": "",
    "actor_rollout_ref.rollout.temperature": "",
    "actor_rollout_ref.rollout.top_p": "",
    "actor_rollout_ref.rollout.top_k": "",
    "actor_rollout_ref.rollout.val_kwargs": "",
    "actor_rollout_ref.rollout.val_kwargs.do_sample": "",
    "actor_rollout_ref.rollout.val_kwargs.temperature": "",
    "actor_rollout_ref.rollout.val_kwargs.n": "",
    "actor_rollout_ref.rollout.dtype": "",
    "actor_rollout_ref.rollout.quantization": "there vLLM's real quantized kernels (fp8, "
                                              "torchao); aqn's is fake quantization",
    "actor_rollout_ref.rollout.enforce_eager": "",
    "actor_rollout_ref.rollout.enable_prefix_caching": "",
    "actor_rollout_ref.rollout.gpu_memory_utilization": "",
    "algorithm.adv_estimator": "",
    "algorithm.norm_adv_by_std_in_grpo": "",
    "algorithm.rollout_correction": "",
    "algorithm.rollout_correction.rollout_is": "",
    "algorithm.rollout_correction.rollout_is_threshold": "",
    "algorithm.rollout_correction.rollout_is_batch_normalize": "",
    "algorithm.rollout_correction.rollout_rs": "",
    "algorithm.rollout_correction.rollout_rs_threshold": "",
    "algorithm.rollout_correction.bypass_mode": "",
    "algorithm.rollout_correction.loss_type": "",
    "trainer.project_name": "",
    "trainer.experiment_name": "",
    "trainer.device": "",
    "trainer.total_training_steps": "",
    "trainer.test_freq": "",
    "trainer.val_before_train": "",
    "trainer.save_freq": "",
    "trainer.default_local_dir": "",
    "trainer.max_actor_ckpt_to_keep": "",
    "trainer.logger": "verl's file logger is aqn's jsonl",
}
# aqn keys whose setting verl has under another name
VERL_OTHER: dict[str, str] = {
    "data.path": "data.train_files / data.val_files (parquet files)",
    "data.max_train_samples": "data.train_max_samples",
    "data.max_val_samples": "data.val_max_samples",
    "actor_rollout_ref.model.dtype": "actor_rollout_ref.actor.fsdp_config.model_dtype",
    "actor_rollout_ref.actor.optim.warmup_steps": "actor_rollout_ref.actor.optim.lr_warmup_steps",
    "actor_rollout_ref.actor.lora.rank": "actor_rollout_ref.model.lora_rank",
    "actor_rollout_ref.actor.lora.alpha": "actor_rollout_ref.model.lora_alpha",
    "actor_rollout_ref.actor.lora.target_modules": "actor_rollout_ref.model.target_modules",
    "trainer.resume": "trainer.resume_mode (auto / disable)",
}
# TRL's GRPOConfig (and the TrainingArguments it extends) where it has the same setting
TRL: dict[str, str] = {
    "data.max_response_length": "max_completion_length",
    "data.shuffle": "shuffle_dataset",
    "actor_rollout_ref.model.enable_gradient_checkpointing": "gradient_checkpointing",
    "actor_rollout_ref.actor.optim.lr": "learning_rate",
    "actor_rollout_ref.actor.optim.weight_decay": "weight_decay",
    "actor_rollout_ref.actor.optim.betas": "adam_beta1, adam_beta2",
    "actor_rollout_ref.actor.optim.eps": "adam_epsilon",
    "actor_rollout_ref.actor.optim.warmup_steps": "warmup_steps",
    "actor_rollout_ref.actor.lora": "peft_config (a PEFT LoraConfig)",
    "actor_rollout_ref.actor.lora.rank": "peft_config=LoraConfig(r=...)",
    "actor_rollout_ref.actor.lora.alpha": "peft_config=LoraConfig(lora_alpha=...)",
    "actor_rollout_ref.actor.lora.target_modules": "peft_config=LoraConfig(target_modules=...)",
    "actor_rollout_ref.actor.lora.dropout": "peft_config=LoraConfig(lora_dropout=...)",
    "actor_rollout_ref.actor.ppo_epochs": "num_iterations",
    "actor_rollout_ref.actor.clip_ratio_low": "epsilon",
    "actor_rollout_ref.actor.clip_ratio_high": "epsilon_high",
    "actor_rollout_ref.actor.loss_agg_mode": "loss_type (dapo ~ token-mean, grpo ~ "
                                             "seq-mean-token-mean, dr_grpo ~ "
                                             "seq-mean-token-sum-norm)",
    "actor_rollout_ref.actor.use_kl_loss": "beta > 0",
    "actor_rollout_ref.actor.kl_loss_coef": "beta",
    "actor_rollout_ref.actor.grad_clip": "max_grad_norm",
    "actor_rollout_ref.rollout.name": "use_vllm",
    "actor_rollout_ref.rollout.n": "num_generations",
    "actor_rollout_ref.rollout.temperature": "temperature",
    "actor_rollout_ref.rollout.top_p": "top_p",
    "actor_rollout_ref.rollout.top_k": "top_k (0: off)",
    "actor_rollout_ref.rollout.gpu_memory_utilization": "vllm_gpu_memory_utilization",
    "actor_rollout_ref.rollout.val_kwargs.n": "num_generations_eval",
    "algorithm.norm_adv_by_std_in_grpo": "scale_rewards (group / none)",
    "algorithm.rollout_correction.rollout_is": "vllm_importance_sampling_correction, "
                                               "vllm_importance_sampling_mode",
    "algorithm.rollout_correction.rollout_is_threshold": "vllm_importance_sampling_cap",
    "trainer.experiment_name": "run_name",
    "trainer.seed": "seed",
    "trainer.total_training_steps": "max_steps",
    "trainer.test_freq": "eval_steps",
    "trainer.val_before_train": "eval_on_start",
    "trainer.save_freq": "save_steps",
    "trainer.default_local_dir": "output_dir",
    "trainer.resume": "trainer.train(resume_from_checkpoint=...)",
    "trainer.max_actor_ckpt_to_keep": "save_total_limit",
    "trainer.logger": "report_to",
    "trainer.progress_bar": "disable_tqdm (inverted)",
}


def verl_name(key: str) -> str | None:
    """The verl setting of ``key``: its own key (it is verl's), another key, or None."""
    if key in VERL_SAME:
        note = VERL_SAME[key]
        return f"{key} (verl's own key{'; ' + note if note else ''})"
    if key in VERL_OTHER:
        return VERL_OTHER[key]
    if key.startswith(_NOISE) or key == _NOISE[:-1]:
        given = f"+{key}=..." if key.startswith(_NOISE) else f"+{key}.<key>=..."
        return (f"{given} on verl's command line, through python -m aqn.integrations.verl "
                "(the seed's verl fork's block)")
    return None


def trl_name(key: str) -> str | None:
    if key in TRL:
        return f"GRPOConfig {TRL[key]}" if not TRL[key].startswith("trainer.") else TRL[key]
    if key.startswith(_NOISE) or key == _NOISE[:-1]:
        name = key.removeprefix(_NOISE)
        return ("aqn.integrations.trl.add_aqn(trainer, {" + f"'{name}': ...}})"
                if name != key else "aqn.integrations.trl.add_aqn(trainer, {...})")
    return None


# ------------------------------------------------------------------------- key docs


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key, as ``aqn config explain`` prints it."""

    key: str
    """The dotted path, e.g. trainer.noise_injection.sigma_start."""
    type: str
    """As a config file spells it ("float | null"); "section" for a group of keys."""
    default: Any
    """The schema's default, as plain data (a section: its keys' defaults)."""
    choices: dict[str, str]
    """The values it takes, each with a description where the registry has one; empty when
    free (a number, a path)."""
    doc: str
    """The doc string under the field."""
    verl: str | None
    """The same setting in verl (its own key, or verl's name for it); None where verl has
    none."""
    trl: str | None
    """The same setting in TRL's GRPOConfig, where there is one."""

    @property
    def is_section(self) -> bool:
        return self.type == "section"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


@functools.cache
def key_docs() -> dict[str, KeyDoc]:
    """Every key of the run config (sections too), in the order of the schema."""
    return {key: KeyDoc(key, type_name(tp), to_plain(_default(f)), _choices(cls, f.name, tp),
                        field_docs(cls).get(f.name, ""), verl_name(key), trl_name(key))
            for key, cls, f, tp in _fields(AQNConfig)}


def lookup(key: str) -> KeyDoc:
    """The doc of ``key``; an unknown key is a ConfigError naming the closest ones."""
    docs = key_docs()
    key = key.strip()
    if key in docs:
        return docs[key]
    renamed = renamed_key_error(key)
    if renamed is not None:
        raise renamed
    tail = key.rsplit(".", 1)[-1]
    close = [k for k in docs if k.rsplit(".", 1)[-1] == tail]
    close += [k for k in docs if key in k and k not in close]  # a shortened path
    close += [k for k in difflib.get_close_matches(key, list(docs), n=3, cutoff=0.6)
              if k not in close]
    if not close:  # a mistyped last part: match it against the last parts
        tails = {k.rsplit(".", 1)[-1]: k for k in docs}
        close = [tails[t] for t in difflib.get_close_matches(tail, list(tails), n=3)]
    hint = f"; did you mean {', '.join(close[:5])}?" if close else (
        f"; the sections are {', '.join(k for k in docs if '.' not in k)}")
    raise ConfigError(f"unknown key{hint} (every key: aqn config show)", key)


def doc(key: str) -> str:
    """The doc string of ``key``."""
    return lookup(key).doc


def _wrap(text: str, indent: str, width: int = WIDTH) -> list[str]:
    """``text`` reflowed paragraph by paragraph (a blank line separates paragraphs)."""
    lines: list[str] = []
    for paragraph in text.split("\n\n"):
        lines += textwrap.wrap(" ".join(paragraph.split()), width=width, initial_indent=indent,
                               subsequent_indent=indent, break_long_words=False,
                               break_on_hyphens=False) or [indent.rstrip()]
    return lines


def explain(key: str) -> str:
    """One key in full: type, default, choices, verl and TRL names, doc (a section: its
    doc and its keys)."""
    d = lookup(key)
    lines = [d.key]

    def row(name: str, value: str) -> None:
        lines.extend(textwrap.wrap(value, WIDTH, initial_indent=f"  {name + ':':<9}",
                                   subsequent_indent=" " * 11, break_long_words=False,
                                   break_on_hyphens=False))

    row("type", d.type)
    if not d.is_section:
        row("default", _yaml_value(d.default))
    if d.choices and not any(d.choices.values()):
        row("choices", ", ".join(d.choices))
    elif d.choices:
        lines.append("  choices:")
        width = max(len(c) for c in d.choices)
        for choice, note in d.choices.items():
            lines.extend(textwrap.wrap(note, WIDTH, initial_indent=f"    {choice:<{width}}  ",
                                       subsequent_indent=" " * (width + 6),
                                       break_on_hyphens=False) or [f"    {choice}"])
    row("verl", d.verl or "none (aqn's own)")
    row("TRL", d.trl or "none")
    lines += ["", *_wrap(d.doc, "  ")]
    if d.is_section:
        children = [k for k in key_docs().values()
                    if k.key.startswith(d.key + ".") and "." not in k.key[len(d.key) + 1:]]
        lines += ["", "  keys:"]
        width = max(len(c.key) for c in children) - len(d.key) - 1
        for c in children:
            value = "section" if c.is_section else f"{c.type} = {_yaml_value(c.default)}"
            lines.append(f"    {c.key[len(d.key) + 1:]:<{width}}  {value}")
        lines += ["", f"  each in full: aqn config explain {d.key}.<key>"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- show


def render(cfg: AQNConfig, title: str, changed_only: bool = False) -> str:
    """``cfg`` as commented YAML: each key's doc above it, grouped by section, and
    ``# default: ...`` beside a value that is not the schema's; ``changed_only``: only those
    keys (and their sections). The text loads back as a config file (``aqn train that.yaml``)
    with the same hash."""
    docs = key_docs()
    out = [f"# {title}", "# Each key's doc is above it; one key in full: aqn config explain KEY",
           "# (type, default, choices, verl's and TRL's name for it)."]

    def walk(obj: Any, prefix: str, indent: str) -> list[str]:
        lines: list[str] = []
        for f in dataclasses.fields(obj):
            d = docs[prefix + f.name]
            value = getattr(obj, f.name)
            if d.is_section:
                inner = walk(value, d.key + ".", indent + "  ")
                body = [f"{indent}{f.name}:", *inner]
            else:
                changed = to_plain(value) != d.default
                if changed_only and not changed:
                    continue
                line = f"{indent}{f.name}: {_yaml_value(value)}"
                body = [line + f"  # default: {_yaml_value(d.default)}" if changed else line]
                inner = body
            if not inner and changed_only:
                continue  # a section where nothing changed
            lines += ([""] if not prefix else []) + _wrap(d.doc, indent + "# ", WIDTH) + body
        return lines

    out += walk(cfg, "", "")
    return "\n".join(out) + "\n"
