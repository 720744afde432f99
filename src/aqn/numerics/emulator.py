"""Install a numerics profile on a model in place, and take it off again without a trace.

``NumericsEmulator`` is a rollout-engine perturbation (``refresh`` / ``apply`` / ``restore``):

- ``nn.Linear``: the instance's ``forward`` is replaced (split-K 16-bit accumulation and/or
  16-bit rounding of the output);
- modules whose class name contains ``rmsnorm``: ``forward`` replaced (cast order);
- the MLP's ``act_fn``: ``forward`` replaced (SiLU op by op in 16 bits, or in fp32 then cast);
- attention: an emulating eager attention and its mask function are registered in
  transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` under a key unique to
  this emulator, and selected through ``config._attn_implementation`` of this model only;
- embedding, decoder-layer (and otherwise unpatched norm / activation) outputs: forward
  hooks that round them to 16 bits.

"16 bits" is the profile's precision, resolved on the model (``NumericsProfile.on``): fp16 on
an fp16 model, bf16 otherwise.

Weights are never touched, so ``restore`` (which deletes the instance ``forward``s, removes
the hooks, puts back ``_attn_implementation`` and unregisters the key) returns the model to
its exact former behaviour. Every rounding is straight-through for gradients.

Limits: on a bf16 or fp16 model, operations left to PyTorch (residual adds, the gate*up
product, RoPE) keep PyTorch's round-to-nearest-even whatever ``rounding`` says.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aqn.errors import ConfigError, NoTargetsError
from aqn.firing import Firing
from aqn.hashing import derive_seed
from aqn.numerics.profiles import NumericsProfile, get_profile
from aqn.numerics.rounding import round_to, split_k_linear

_KEYS = itertools.count()


def _numel(output) -> int:
    if isinstance(output, tuple) and output:
        output = output[0]
    return output.numel() if isinstance(output, Tensor) else 0


def _is_rmsnorm(module: nn.Module) -> bool:
    return "rmsnorm" in type(module).__name__.lower()


def _is_silu(fn: object) -> bool:
    return (isinstance(fn, nn.SiLU) or fn is F.silu
            or "silu" in type(fn).__name__.lower() or "swish" in type(fn).__name__.lower())


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (fp32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _norm_eps(module: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps"):
        value = getattr(module, attr, None)
        if isinstance(value, float | int):
            return float(value)
    return None


class NumericsEmulator:
    """A numerics profile as a rollout-engine perturbation on ``model`` (patched in place)."""

    name = "numerics"

    def __init__(self, model: nn.Module, profile: str | NumericsProfile, seed: int = 0) -> None:
        self.model = model
        # its precision resolved on the model (fp16 on an fp16 model, bf16 otherwise)
        self.profile = get_profile(profile).on(_model_dtype(model))
        self.seed = seed
        self.step: int | None = None
        self._undo: list[Callable[[], None]] = []
        self._generator: torch.Generator | None = None
        self.counts: dict[str, int] = {}
        self.last = Firing.empty(by_calls=True)  # calls of its patches since apply
        self._attention_paths: dict[int, str] = {}
        self.targets = self._find_targets()  # fails now, before any run, if nothing matches

    # ----------------------------------------------------------------- Perturbation API
    @property
    def active(self) -> bool:
        return bool(self._undo)

    def refresh(self) -> None:
        """New weights were loaded: nothing to do, the patches read the weights at call time."""

    def apply(self, step: int) -> dict[str, float]:
        """Install the patches (once) and reseed stochastic rounding from (seed, step)."""
        self.generator.manual_seed(derive_seed(self.seed, step, "numerics"))
        self.step = step
        self.last = Firing.empty(by_calls=True, changed=None,
                                 expected=not self.profile.is_reference)
        if not self.active and not self.profile.is_reference:
            try:
                self._install()
            except BaseException:
                self.restore()
                raise
        return self.metrics()

    def firing(self) -> Firing:
        return self.last  # calls of the patched forwards and hooks (what changed: not measured)

    def writes(self) -> list[Tensor]:
        return []  # it replaces forwards, never weights

    def touches(self) -> list[str]:
        return [path for found in self.targets.values() for path, _ in found]

    def restore(self) -> None:
        """Remove every patch; the model computes exactly as before ``apply``."""
        while self._undo:
            self._undo.pop()()
        self.counts = {}

    def metrics(self) -> dict[str, float]:
        out = {"numerics/patched_modules": float(sum(self.counts.values()))}
        out.update({f"numerics/patched_{kind}": float(n) for kind, n in self.counts.items()})
        return out

    # ------------------------------------------------------------------------- helpers
    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            param = next(self.model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            self._generator = torch.Generator(device=device)
        return self._generator

    def _cast(self, t: Tensor) -> Tensor:
        """A 16-bit cast the profile makes (norm, activation, softmax, split-K): fp32 out."""
        return round_to(t, self.profile.precision, self.profile.cast_rounding, self.generator)

    def _store(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """An activation written to memory: rounded by ``rounding`` (if any), in ``dtype``."""
        if self.profile.rounding == "none" or t.dtype != torch.float32:
            return t.to(dtype)
        return round_to(t, self.profile.precision, self.profile.rounding,
                        self.generator).to(dtype)

    def _find_targets(self) -> dict[str, list[tuple[str, nn.Module]]]:
        p = self.profile
        if p.is_reference:
            return {}
        modules = list(self.model.named_modules())
        targets: dict[str, list[tuple[str, nn.Module]]] = {}
        if p.matmul != "fp32" or p.rounding != "none":
            targets["linear"] = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
        if p.norm_cast != "model":
            targets["norm"] = [(n, m) for n, m in modules if _is_rmsnorm(m)]
        if p.act_dtype != "model":
            targets["act"] = [(n, m) for n, m in modules if getattr(m, "act_fn", None) is not None]
        if p.softmax_dtype != "model":
            targets["attention"] = [
                (n, m) for n, m in modules
                if "attention" in type(m).__name__.lower() and hasattr(m, "scaling")
                and hasattr(getattr(m, "config", None), "_attn_implementation")]
        if p.rounding != "none":
            hidden = [(n, m) for n, m in modules if isinstance(m, nn.Embedding)
                      or type(m).__name__.lower().endswith("decoderlayer")]
            if p.norm_cast == "model":
                hidden += [(n, m) for n, m in modules if _is_rmsnorm(m)]
            if p.act_dtype == "model":
                hidden += [(f"{n}.act_fn", m.act_fn) for n, m in modules
                           if isinstance(getattr(m, "act_fn", None), nn.Module)]
            targets["rounded_outputs"] = hidden
        knob = {"linear": "matmul/rounding (nn.Linear)", "norm": "norm_cast (*RMSNorm*)",
                "act": "act_dtype (modules with an act_fn)",
                "attention": "softmax_dtype (attention modules dispatched through "
                             "transformers' AttentionInterface)"}
        empty = [knob[k] for k, v in targets.items() if not v and k in knob]
        if empty:
            raise NoTargetsError(
                f"numerics profile {p.name!r} matched no module for {', '.join(empty)} in "
                f"{type(self.model).__name__}: it would silently change less than it says")
        return targets

    # -------------------------------------------------------------------------- install
    def _install(self) -> None:
        self.targets = self._find_targets()
        for kind, found in self.targets.items():
            install = {"linear": self._patch_linear, "norm": self._patch_norm,
                       "act": self._patch_act, "rounded_outputs": self._hook_output}.get(kind)
            if install is not None:
                for name, module in found:
                    install(name, module)
                self.counts[kind] = len(found)
        if "attention" in self.targets:
            self._install_attention([m for _, m in self.targets["attention"]])
            self.counts["attention"] = len(self.targets["attention"])

    def _counted(self, name: str, fn: Callable) -> Callable:
        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.last.count_call(name, _numel(out))
            return out
        return counted

    def _replace_forward(self, name: str, module: nn.Module, forward: Callable) -> None:
        had_own = "forward" in module.__dict__
        previous = module.__dict__.get("forward")
        module.forward = self._counted(name, forward)

        def undo() -> None:
            if had_own:
                module.forward = previous
            else:
                del module.forward

        self._undo.append(undo)

    def _patch_linear(self, name: str, module: nn.Module) -> None:
        p = self.profile
        orig = module.forward

        def forward(x: Tensor) -> Tensor:
            if p.matmul == "bf16_splitk":
                y = split_k_linear(x, module.weight, module.bias, p.split_k_chunk,
                                   p.cast_rounding, self.generator, p.precision)
                return y.to(x.dtype)
            if x.dtype == torch.float32 or p.rounding == "rne":
                y = orig(x)  # for bf16 / fp16 already rounded to nearest even by PyTorch
            else:  # truncation or stochastic rounding must see the fp32 accumulator
                bias = None if module.bias is None else module.bias.float()
                y = F.linear(x.float(), module.weight.float(), bias)
            return self._store(y, x.dtype) if y.dtype == torch.float32 else y

        self._replace_forward(name, module, forward)

    def _patch_norm(self, name: str, module: nn.Module) -> None:
        eps = _norm_eps(module)
        weight = getattr(module, "weight", None)
        if eps is None or not isinstance(weight, Tensor):
            raise ConfigError(f"{name} ({type(module).__name__}) has no weight or eps: cannot "
                              "emulate its norm_cast", "numerics.norm_cast")
        before = self.profile.norm_cast == "before_weight"

        def normalise(x: Tensor) -> Tensor:
            xf = x.float()
            return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)

        self._check_norm_formula(name, module, normalise)

        def forward(x: Tensor) -> Tensor:
            xn = normalise(x)
            w = module.weight.float()
            y = self._cast(w * self._cast(xn)) if before else self._cast(w * xn)
            return y.to(torch.promote_types(x.dtype, module.weight.dtype))

        self._replace_forward(name, module, forward)

    @staticmethod
    @torch.no_grad()
    def _check_norm_formula(name: str, module: nn.Module, normalise: Callable) -> None:
        """Refuse norms that are not ``weight * x / rms(x)`` (e.g. Gemma's ``1 + weight``)."""
        w = module.weight
        gen = torch.Generator(device=w.device).manual_seed(0)
        x = torch.randn((2, w.shape[-1]), generator=gen, device=w.device).to(w.dtype)
        got = module(x).float()
        want = w.float() * normalise(x)
        if not torch.allclose(got, want, rtol=2e-2, atol=2e-2):
            raise ConfigError(f"{name} ({type(module).__name__}) does not compute "
                              "weight * x / rms(x): cannot emulate its norm_cast",
                              "numerics.norm_cast")

    def _patch_act(self, name: str, owner: nn.Module) -> None:
        fn = owner.act_fn
        silu = _is_silu(fn)
        in_16bit = self.profile.act_dtype == "bf16"
        orig = fn.forward if isinstance(fn, nn.Module) else fn

        def forward(x: Tensor) -> Tensor:
            if in_16bit and silu:  # x * sigmoid(x) = x / (1 + exp(-x)), every op in 16 bits
                xb = self._cast(x)
                y = self._cast(xb / self._cast(1.0 + self._cast(torch.exp(-xb))))
            elif in_16bit:  # another activation: 16 bits in, 16 bits out
                y = self._cast(orig(self._cast(x)))
            else:  # fp32 compute, one cast
                y = self._cast(orig(x.float()))
            return y.to(x.dtype)

        if isinstance(fn, nn.Module):
            self._replace_forward(f"{name}.act_fn", fn, forward)
        else:
            owner.act_fn = self._counted(f"{name}.act_fn", forward)
            self._undo.append(lambda: setattr(owner, "act_fn", fn))

    def _hook_output(self, name: str, module: nn.Module) -> None:
        def hook(mod: nn.Module, args, output):
            self.last.count_call(name, _numel(output))
            if isinstance(output, Tensor) and output.dtype == torch.float32:
                return self._store(output, output.dtype)
            if (isinstance(output, tuple) and output and isinstance(output[0], Tensor)
                    and output[0].dtype == torch.float32):
                return (self._store(output[0], output[0].dtype), *output[1:])
            return output

        self._undo.append(module.register_forward_hook(hook).remove)

    def _install_attention(self, modules: list[nn.Module]) -> None:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        key = f"aqn_numerics_{next(_KEYS)}"

        def mask_fn(*args, **kwargs):  # always a boolean [B, 1, q, kv] mask, True = attend
            kwargs["allow_is_causal_skip"] = False
            return sdpa_mask(*args, **kwargs)

        ALL_ATTENTION_FUNCTIONS.register(key, self._attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(key, mask_fn)

        def unregister() -> None:
            type(ALL_ATTENTION_FUNCTIONS)._global_mapping.pop(key, None)
            type(ALL_MASK_ATTENTION_FUNCTIONS)._global_mapping.pop(key, None)

        self._undo.append(unregister)
        self._attention_paths = {id(m): n for n, m in self.targets["attention"]}
        configs = {id(m.config): m.config for m in modules}
        model_config = getattr(self.model, "config", None)
        if model_config is not None:
            configs[id(model_config)] = model_config
        for config in configs.values():
            previous = config._attn_implementation
            config._attn_implementation = key
            self._undo.append(lambda c=config, v=previous: setattr(c, "_attn_implementation", v))

    def _attention(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                   attention_mask: Tensor | None, scaling: float, dropout: float = 0.0,
                   **kwargs) -> tuple[Tensor, Tensor]:
        """Eager attention in fp32 with the profile's softmax; [B, q, H, D] like HF's."""
        self.last.count_call(self._attention_paths.get(id(module), "attention"), query.numel())
        out_dtype = query.dtype
        n_rep = query.shape[1] // key.shape[1]
        if n_rep > 1:
            key = key.repeat_interleave(n_rep, dim=1)
            value = value.repeat_interleave(n_rep, dim=1)
        scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
        in_16bit = self.profile.softmax_dtype == "bf16"
        if in_16bit:
            scores = self._cast(scores)  # a 16-bit matmul writes 16-bit scores
        q_len, kv_len = scores.shape[-2:]
        if attention_mask is None and q_len > 1:
            attention_mask = torch.ones((q_len, kv_len), dtype=torch.bool,
                                        device=scores.device).tril(kv_len - q_len)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(torch.float32).min)
            else:
                scores = scores + attention_mask[..., :kv_len].float()
        if in_16bit:  # every step of the softmax stored in 16 bits
            shifted = self._cast(scores - scores.amax(-1, keepdim=True))
            e = self._cast(torch.exp(shifted))
            probs = self._cast(e / self._cast(e.sum(-1, keepdim=True)))
        else:
            probs = self._cast(torch.softmax(scores, dim=-1))
        if dropout and module.training:
            probs = F.dropout(probs, p=dropout, training=True)
        out = torch.matmul(probs, value.float())
        out = self._store(out, out_dtype).transpose(1, 2).contiguous()
        return out, probs.to(out_dtype)


@contextmanager
def emulate(model: nn.Module, profile: str | NumericsProfile, seed: int = 0,
            step: int = 0) -> Iterator[NumericsEmulator]:
    """``with emulate(model, "npu-like"): ...`` runs the model under the profile."""
    emulator = NumericsEmulator(model, profile, seed=seed)
    emulator.apply(step)
    try:
        yield emulator
    finally:
        emulator.restore()
