import types

import pytest
import torch
from torch import nn

from aqn.errors import NoTargetsError
from aqn.noise import describe_targets, select_norms


def _vllm_like_model() -> nn.Module:
    """A model whose norm class is called plain ``RMSNorm`` and lives in another module,
    as vLLM's does; an isinstance check against Hugging Face classes matches none of it."""
    mod = types.ModuleType("vllm_like.layers.layernorm")

    class RMSNorm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

    RMSNorm.__module__ = mod.__name__

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm(8)
            self.proj = nn.Linear(8, 8)
            self.post_attention_layernorm = RMSNorm(8)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer() for _ in range(3)])
            self.norm = RMSNorm(8)

    return Model()


def _paths(targets):
    return [p for p, _ in targets]


def test_tiny_llama_all_norms(tiny):
    model, _ = tiny
    targets = select_norms(model)
    assert len(targets) == 4 * 2 + 1
    assert {type(m).__name__ for _, m in targets} == {"LlamaRMSNorm"}
    assert _paths(targets)[-1] == "model.norm"
    info = describe_targets(targets)
    assert [t.is_final for t in info].count(True) == 1
    assert all(t.shape == (128,) and t.dtype == "float32" for t in info)


def test_vllm_style_class_name_matches():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = _vllm_like_model()
    # QeRL's check: isinstance against HF classes matches nothing here
    assert not any(isinstance(m, LlamaRMSNorm) for m in model.modules())
    targets = select_norms(model)
    assert _paths(targets) == [
        "layers.0.input_layernorm", "layers.0.post_attention_layernorm",
        "layers.1.input_layernorm", "layers.1.post_attention_layernorm",
        "layers.2.input_layernorm", "layers.2.post_attention_layernorm", "norm"]


def test_no_norms_is_an_error_naming_what_exists():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4))
    with pytest.raises(NoTargetsError, match=r"matched 0 modules.*\['rmsnorm'\].*LayerNorm x1"):
        select_norms(model)
    with pytest.raises(NoTargetsError, match="none \\(no class name contains 'norm'\\)"):
        select_norms(nn.Sequential(nn.Linear(4, 4)))


def test_class_patterns_widen_selection():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4))
    assert _paths(select_norms(model, class_patterns=("rmsnorm", "layernorm"))) == ["1"]


def test_exclude_and_target_patterns(tiny):
    model, _ = tiny
    only_input = select_norms(model, target_modules=("input_layernorm",))
    assert _paths(only_input) == [f"model.layers.{i}.input_layernorm" for i in range(4)]
    glob = select_norms(model, target_modules=("model.layers.0.*",))
    assert _paths(glob) == ["model.layers.0.input_layernorm",
                            "model.layers.0.post_attention_layernorm"]
    excluded = select_norms(model, exclude_patterns=("post_attention_layernorm", "model.norm"))
    assert _paths(excluded) == [f"model.layers.{i}.input_layernorm" for i in range(4)]
    no_final = select_norms(model, include_final_norm=False)
    assert "model.norm" not in _paths(no_final) and len(no_final) == 8
    with pytest.raises(NoTargetsError, match="target_modules=\\['q_proj_norm'\\]"):
        select_norms(model, target_modules=("q_proj_norm",))


def test_qk_norms_are_matched_like_any_norm():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    targets = select_norms(Qwen3ForCausalLM(cfg))
    paths = _paths(targets)
    assert "model.layers.0.self_attn.q_norm" in paths
    assert "model.layers.1.self_attn.k_norm" in paths
    assert len(paths) == 2 * 4 + 1
    shapes = {p: tuple(m.weight.shape) for p, m in targets}
    assert shapes["model.layers.0.self_attn.q_norm"] == (8,)
