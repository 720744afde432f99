import pytest

from aqn.models import build_tiny


@pytest.fixture
def tiny():
    """A fresh built-in tiny Llama (fp32) and its tokenizer."""
    return build_tiny(seed=0)


@pytest.fixture
def tiny_bf16():
    return build_tiny(seed=0, dtype="bfloat16")
