import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from aqn.models import tiny_base
from aqn.models.tiny_base import (
    TinyBaseSettings,
    cache_dir,
    cache_root,
    load_tiny_base,
    pretrain_tiny,
    settings_hash,
)

# A few seconds of training: enough to see the loss fall, not to learn arithmetic.
TINY = TinyBaseSettings(steps=30, batch_size=8, n_train=256, warmup_steps=5, n_eval=8,
                        eval_batch_size=8, max_new_tokens=12)


@pytest.fixture(scope="module")
def two_caches(tmp_path_factory):
    """The same settings trained twice from scratch, in two cache roots, each after a
    different global seed (the training must not depend on the global RNG)."""
    roots = [tmp_path_factory.mktemp("cache_a"), tmp_path_factory.mktemp("cache_b")]
    paths = []
    for global_seed, root in zip((1, 2), roots, strict=True):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AQN_CACHE_DIR", str(root))
            torch.manual_seed(global_seed)
            paths.append(pretrain_tiny(TINY, progress=False))
    return roots, paths


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AQN_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    assert cache_dir(TINY) == tmp_path / "tiny-base" / settings_hash(TINY)
    monkeypatch.delenv("AQN_CACHE_DIR")
    assert cache_root().name == "aqn"


def test_settings_hash_is_stable_and_distinguishes_settings():
    assert settings_hash(TINY) == settings_hash(replace(TINY))
    assert settings_hash(TINY) != settings_hash(replace(TINY, steps=31))
    assert settings_hash(TINY) != settings_hash(replace(TINY, difficulty=(1,)))
    assert settings_hash(TinyBaseSettings()) != settings_hash(TINY)


def test_cache_has_the_expected_files(two_caches):
    roots, paths = two_caches
    path = paths[0]
    assert path == roots[0] / "tiny-base" / settings_hash(TINY)
    assert {"model.safetensors", "config.json", "pretrain.json"} <= {p.name for p in path.iterdir()}
    assert not any(p.suffix in {".bin", ".pt", ".pth"} for p in path.iterdir())  # no pickle
    # the temp dir was renamed into place: nothing else is left beside it
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    report = json.loads((path / "pretrain.json").read_text())
    assert report["hash"] == settings_hash(TINY)
    assert report["settings"]["steps"] == TINY.steps
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert report["wall_seconds"] > 0


def test_loss_decreases(two_caches):
    report = json.loads((two_caches[1][0] / "pretrain.json").read_text())
    assert report["final_loss"] < report["initial_loss"]


def test_training_is_deterministic(two_caches):
    first, second = (load_file(p / "model.safetensors") for p in two_caches[1])
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_cache_is_reused(two_caches, monkeypatch):
    roots, paths = two_caches
    monkeypatch.setenv("AQN_CACHE_DIR", str(roots[0]))
    stamp = (paths[0] / "model.safetensors").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(tiny_base, "_train", no_training)
    assert pretrain_tiny(TINY, progress=False) == paths[0]
    assert (paths[0] / "model.safetensors").stat().st_mtime_ns == stamp


def test_load_tiny_base_generates(two_caches, monkeypatch):
    monkeypatch.setenv("AQN_CACHE_DIR", str(two_caches[0][0]))
    model, tokenizer = load_tiny_base(TINY)
    assert not model.training
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Tom has 2 pens."}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = tokenizer([text], add_special_tokens=False, return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=5,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    # the loaded weights are the trained ones
    saved = load_file(two_caches[1][0] / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())


def test_training_corpus_mixes_two_answer_formats():
    settings = TinyBaseSettings(n_train=400)
    corpus = tiny_base.training_corpus(settings)
    assert corpus == tiny_base.training_corpus(settings)  # seeded by data_seed
    other = [r for r in corpus if r["answer"].endswith(f"The answer is {r['ground_truth']}.")]
    hashed = [r for r in corpus if r["answer"].endswith(f"#### {r['ground_truth']}")]
    assert len(other) + len(hashed) == 400 and 160 <= len(other) <= 240  # about half
    assert all(r["question"][0].isdigit() for r in corpus)  # the symbolic wording
    assert tiny_base.training_corpus(replace(settings, other_format_fraction=0.0)) == [
        {**r, "answer": r["answer"].rsplit("\n", 1)[0] + f"\n#### {r['ground_truth']}"}
        for r in corpus]
    assert settings_hash(settings) != settings_hash(replace(settings, other_format_fraction=0))


def test_transformers_bars_only_on_a_terminal(monkeypatch):
    """A redirected log (`make demo > log`) gets no "Writing model shards" frames."""
    from transformers.utils import logging as hf_logging

    from aqn.models import hf_progress_bars

    hf_logging.enable_progress_bar()
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    with hf_progress_bars(True):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()  # put back as it was
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    with hf_progress_bars(True):
        assert hf_logging.is_progress_bar_enabled()
    with hf_progress_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
