"""A "tiny-base" model: the built-in tiny Llama after a short supervised pretraining on the
arithmetic problems, so that it solves some but not all of them and GRPO has signal.

The corpus is the symbolic arith problems with worked answers, half of which end in verl's
``#### N`` and half in ``The answer is N.`` (a corpus of mixed sources, as an instruct model's).
The strict GSM8K reward counts only ``#### N``, so the base has headroom that RL can reach on
a CPU: the format the reward asks for (the seed's Qwen2.5-1.5B-Instruct starts at 24 % strict
on GSM8K for this reason) and then the arithmetic itself (the multiplications of level 3).

The training is a pure function of ``TinyBaseSettings`` (same settings, same machine, same
thread count -> bitwise-identical weights), so the result is cached on disk under a hash of
the settings and trained only once per machine:
``cache_root()/tiny-base/<hash>/{model.safetensors, config.json, pretrain.json}``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from aqn.data.arith import LEVELS, make_split, other_format
from aqn.hashing import config_hash, to_plain
from aqn.models import build_tiny, hf_progress_bars, parse_dtype
from aqn.models.cache import cache_root, publish_dir
from aqn.models.tokenizer import build_char_tokenizer
from aqn.progress import Progress
from aqn.rewards.gsm8k import compute_score

# Bump when the training or evaluation code changes, so stale caches are not reused.
FORMAT_VERSION = 2
IGNORE_INDEX = -100  # label of the tokens that carry no loss (prompt, padding)


@dataclass(frozen=True)
class TinyBaseSettings:
    model_seed: int = 0  # initialisation of the random tiny model (build_tiny's seed)
    seed: int = 0  # order in which the training examples are visited
    data_seed: int = 0  # make_split seed of the training problems (and of their formats)
    wording: str = "symbols"  # arith wording of the training and test problems
    n_train: int = 2000  # distinct training problems (the symbolic train split has ~2,200)
    difficulty: tuple[int, ...] = LEVELS  # levels of the training problems
    # Fraction of the training answers ending "The answer is N." instead of "#### N".
    other_format_fraction: float = 0.5
    steps: int = 1200  # optimizer steps
    batch_size: int = 16  # examples per optimizer step
    lr: float = 3e-3  # peak learning rate of AdamW
    warmup_steps: int = 30  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    adam_betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    grad_clip: float = 1.0  # max global gradient norm
    n_eval: int = 200  # test problems for the greedy accuracy in pretrain.json
    eval_seed: int = 0  # make_split seed of the test problems
    eval_difficulty: tuple[int, ...] = LEVELS  # levels of the test problems
    eval_batch_size: int = 100  # prompts per generate() call
    max_new_tokens: int = 40  # longest answer generated at evaluation (answers are < 30)


def settings_hash(settings: TinyBaseSettings) -> str:
    """Short hash of the settings and the training code version: the cache key."""
    return config_hash({"format_version": FORMAT_VERSION, "settings": settings}, length=12)


def cache_dir(settings: TinyBaseSettings) -> Path:
    return cache_root() / "tiny-base" / settings_hash(settings)


def _prompt_texts(tokenizer: PreTrainedTokenizerBase, records: list[dict]) -> list[str]:
    """The chat-templated prompt of each record, up to and including ``<|assistant|>``."""
    return [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True,
                                          tokenize=False) for r in records]


def _encode_examples(tokenizer: PreTrainedTokenizerBase, records: list[dict]
                     ) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per record: prompt + answer + eos, loss on answer + eos only."""
    # One batched call each: the fast tokenizer is quicker on lists than one by one.
    prompts = tokenizer(_prompt_texts(tokenizer, records), add_special_tokens=False)["input_ids"]
    answers = tokenizer([r["answer"] for r in records], add_special_tokens=False)["input_ids"]
    examples = []
    for prompt, answer in zip(prompts, answers, strict=True):
        answer = [*answer, tokenizer.eos_token_id]
        examples.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return examples


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    # Right padding: every sequence starts at position 0, exactly as generate() and the
    # rollout see a left-padded prompt (their positions skip the padding).
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return input_ids, mask, labels


def _lr_factor(step: int, settings: TinyBaseSettings) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine


def training_corpus(settings: TinyBaseSettings) -> list[dict]:
    """The pretraining problems, a seeded ``other_format_fraction`` of them answered in the
    other format."""
    records = make_split("train", settings.n_train, seed=settings.data_seed,
                         difficulty=settings.difficulty, wording=settings.wording)
    rng = random.Random(settings.data_seed)
    for record in records:
        if rng.random() < settings.other_format_fraction:
            record["answer"] = other_format(record["answer"])
    return records


def _train(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase,
           settings: TinyBaseSettings, progress: bool) -> list[float]:
    """Supervised fine-tuning in place; returns the loss of every step."""
    records = training_corpus(settings)
    # A local generator: the data order depends on the settings only, not on global RNG.
    order_rng = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                                  betas=settings.adam_betas, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, settings))
    model.train()
    losses: list[float] = []
    order: list[int] = []
    bar = Progress(range(settings.steps), "tiny-base pretrain", enabled=progress)
    for _ in bar:
        if len(order) < settings.batch_size:  # a fresh shuffle for every epoch
            order += torch.randperm(len(records), generator=order_rng).tolist()
        batch, order = order[: settings.batch_size], order[settings.batch_size:]
        # Encoded batch by batch: only the examples actually visited cost tokenizer time.
        examples = _encode_examples(tokenizer, [records[i] for i in batch])
        input_ids, mask, labels = _collate(examples, tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def greedy_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase,
                    records: list[dict], batch_size: int = 100, max_new_tokens: int = 40
                    ) -> float:
    """Fraction of ``records`` whose greedy answer scores 1 with the strict GSM8K reward."""
    correct = 0.0
    for start in range(0, len(records), batch_size):
        chunk = records[start: start + batch_size]
        inputs = tokenizer(_prompt_texts(tokenizer, chunk), add_special_tokens=False,
                           padding=True, return_tensors="pt")  # left padding
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        responses = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                           skip_special_tokens=True)
        correct += sum(compute_score(resp, r["ground_truth"], method="strict")
                       for resp, r in zip(responses, chunk, strict=True))
    return correct / max(1, len(records))


def pretrain_tiny(settings: TinyBaseSettings = TinyBaseSettings(), force: bool = False,
                  progress: bool = True) -> Path:
    """The cache directory of the tiny-base model, training it first if it is not there."""
    final = cache_dir(settings)
    if final.is_dir() and not force:
        return final
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(settings.seed)
        model, tokenizer = build_tiny(seed=settings.model_seed)
        losses = _train(model, tokenizer, settings, progress)
        train_seconds = time.perf_counter() - start
        test = make_split("test", settings.n_eval, seed=settings.eval_seed,
                          difficulty=settings.eval_difficulty, wording=settings.wording)
        accuracy = greedy_accuracy(model, tokenizer, test, settings.eval_batch_size,
                                   settings.max_new_tokens)
    tail = losses[-min(10, len(losses)):]
    report = {
        "settings": to_plain(settings),
        "hash": settings_hash(settings),
        "format_version": FORMAT_VERSION,
        "initial_loss": losses[0],
        "final_loss": sum(tail) / len(tail),  # mean of the last 10 steps: less noisy
        "test_accuracy": accuracy,
        "n_eval": settings.n_eval,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - start, 2),
    }
    def write(tmp: Path) -> None:
        with hf_progress_bars(progress):
            model.save_pretrained(tmp)  # transformers 5 writes safetensors only
        (tmp / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")

    return publish_dir(final, write, replace=force)


def load_tiny_base(settings: TinyBaseSettings = TinyBaseSettings(),
                   dtype: str | torch.dtype = "float32"
                   ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The pretrained tiny-base model (eval mode) and its char tokenizer."""
    path = pretrain_tiny(settings)
    with hf_progress_bars(False):
        model = LlamaForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype))
    return model.eval(), build_char_tokenizer()
