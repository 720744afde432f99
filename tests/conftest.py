import importlib
import os
import warnings

import pytest
import torch

from aqn.models import build_tiny


@pytest.fixture
def tiny():
    """A fresh built-in tiny Llama (fp32) and its tokenizer."""
    return build_tiny(seed=0)


@pytest.fixture
def tiny_bf16():
    return build_tiny(seed=0, dtype="bfloat16")


# Helpers shared by the perturbation tests (imported as `from conftest import ...`).

X = torch.arange(1, 21).unsqueeze(0)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def smoke(tmp_path, *overrides, name="run"):
    """The smoke config, its run directory under ``tmp_path``."""
    from aqn.config import load_config

    return load_config("smoke", [f"trainer.default_local_dir={tmp_path}",
                                 f"trainer.experiment_name={name}", *overrides])


def values(run_dir) -> list[dict]:
    """A run's metric rows without the timings (which differ between two runs of one config)."""
    from aqn.rl.tracking import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith(("timing_s/", "perf/"))}
            for r in read_metrics(run_dir)]


def train_until(monkeypatch, cfg, stop: int) -> None:
    """Train ``cfg`` and stop it with Ctrl-C as it starts step ``stop`` (0-based)."""
    import pytest

    from aqn.rl.trainer import GRPOTrainer, train

    original = GRPOTrainer.step

    def interrupted_at(self, step):
        if step == stop:
            raise KeyboardInterrupt
        return original(self, step)

    with monkeypatch.context() as m:
        m.setattr(GRPOTrainer, "step", interrupted_at)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)


def linear_inputs(model, quant, forward) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per Linear that ``quant`` (an ActivationQuantizer) targets: (its raw input, what the
    Linear received) in one ``forward()``: a hook added after the quantizer's sees Q(x)."""
    seen: dict[str, list[torch.Tensor]] = {}

    def record(path):
        def hook(module, args):
            seen.setdefault(path, []).append(args[0].detach())
        return hook

    targets = [(p, m) for p, m in model.named_modules() if p in quant.targets]
    handles = [m.register_forward_pre_hook(record(p)) for p, m in targets]
    quant.apply(0)
    handles += [m.register_forward_pre_hook(record(p)) for p, m in targets]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
        quant.restore()
    return {path: (x, received) for path, (x, received) in seen.items()}


def peer(module: str, required_by: str = "AQN_REQUIRE_PEERS"):
    """Import a peer's module (verl, hydra, transformers, torchao, vllm, trl); skip where it
    is missing, fail when ``$required_by`` is 1: ``make test`` sets AQN_REQUIRE_PEERS, the
    engines tier (``make test-vllm``) AQN_REQUIRE_VLLM and AQN_REQUIRE_TRL."""
    if os.environ.get(required_by) == "1":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    return pytest.importorskip(module)
