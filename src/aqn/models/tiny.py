"""A tiny Llama-architecture model owned in code (nanoGPT spirit): a real
``LlamaForCausalLM`` with RMSNorm layers, small enough for tests in seconds on a CPU."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_ARCH = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def tiny_llama_config(vocab_size: int, pad_token_id: int, bos_token_id: int,
                      eos_token_id: int, **overrides) -> LlamaConfig:
    arch = {**TINY_ARCH, **overrides}
    return LlamaConfig(vocab_size=vocab_size, pad_token_id=pad_token_id,
                       bos_token_id=bos_token_id, eos_token_id=eos_token_id, **arch)


def build_tiny_llama(config: LlamaConfig, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Randomly initialised from ``seed``: the same weights in any process."""
    devices = torch.random.fork_rng(devices=[])  # leave the caller's RNG untouched
    with devices:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()
