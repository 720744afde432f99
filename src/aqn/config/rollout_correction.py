"""verl 0.9's ``algorithm.rollout_correction``: importance weights and rejection sampling
against rollout-vs-training mismatch, under verl's names, and the parsers of its threshold
strings (``aqn.rl.core_algos`` computes with what they return;
docs/reference.md#rollout-correction).

The parsers accept and refuse what verl 0.9.1's ``rollout_corr_helper`` does, with the same
results; their errors are ``ValueError`` as verl's, which the config turns into a
``ConfigError`` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from aqn.errors import ConfigError

IS_LEVELS: tuple[str, ...] = ("token", "sequence")
# verl's SUPPORTED_ROLLOUT_RS_OPTIONS: the statistic each option bounds is the per-token
# k1 = -log r, k2 = (log r)^2 / 2 or k3 = r - 1 - log r (r = pi_train / pi_rollout), taken per
# token, or summed, averaged or maxed over each sequence.
RS_OPTIONS: tuple[str, ...] = (
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
    "seq_max_k2", "seq_max_k3",
)


class RsBounds(NamedTuple):
    """One rejection option's bounds: k1 options have ratio bounds (``lower`` <= 1/r <= ``upper``
    in verl's orientation), k2 / k3 options an upper bound only (``lower`` None)."""

    lower: float | None
    upper: float


def parse_is_threshold(spec: str | float) -> tuple[float, float | None]:
    """``rollout_is_threshold`` -> (upper, lower): a number (or numeric string) is TIS's
    truncation bound (lower None); ``"lower_upper"`` (e.g. ``"0.5_5.0"``) IcePop's bounds.
    verl's ``_parse_rollout_is_threshold``."""
    if isinstance(spec, bool):
        raise TypeError("rollout_is_threshold must be a number or a string, not a boolean")
    lower: float | None = None
    if isinstance(spec, int | float):
        upper = float(spec)
    elif isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("rollout_is_threshold must not be an empty string")
        try:
            if "_" in text:
                low, high = text.split("_", 1)
                lower, upper = float(low), float(high)
            else:
                upper = float(text)
        except ValueError:
            raise ValueError(f"invalid rollout_is_threshold {spec!r}: a number, or "
                             "'lower_upper' such as '0.5_5.0'") from None
    else:
        raise TypeError("rollout_is_threshold must be a number or a string")
    if not upper > 0:
        raise ValueError(f"rollout_is_threshold upper bound must be positive, got {upper}")
    if lower is not None:
        if not lower > 0:
            raise ValueError(f"rollout_is_threshold lower bound must be positive, got {lower}")
        if lower > upper:
            raise ValueError("rollout_is_threshold lower bound must be <= upper bound")
    return upper, lower


def parse_rs_options(rollout_rs: str) -> list[str]:
    """``"token_k1, seq_mean_k3"`` -> the options in order, duplicates dropped (verl)."""
    if not isinstance(rollout_rs, str):
        raise ValueError("rollout_rs must be a non-empty string (comma separated for several "
                         "options)")
    options: list[str] = []
    for option in (o.strip() for o in rollout_rs.split(",")):
        if not option:
            continue
        if option not in RS_OPTIONS:
            raise ValueError(f"invalid rollout_rs option {option!r}; valid options: "
                             f"{', '.join(RS_OPTIONS)}")
        if option not in options:
            options.append(option)
    if not options:
        raise ValueError("rollout_rs must contain at least one option")
    return options


def parse_rs_thresholds(options: list[str], spec: str | float | None) -> dict[str, RsBounds]:
    """``rollout_rs_threshold`` -> each option's bounds. One value is shared by every option,
    or one per option (comma separated). k1 options take ``"lower_upper"``, or a number ``U``
    meaning ``1/U`` to ``U``; the others a positive upper bound. verl's
    ``_parse_rollout_rs_thresholds``: a number goes through ``str`` as there."""
    if spec is None:
        raise ValueError("rollout_rs_threshold must be given for rejection sampling")
    if isinstance(spec, bool):
        raise TypeError("rollout_rs_threshold must be a number or a string, not a boolean")
    if isinstance(spec, int | float):
        specs = [str(spec)]
    elif isinstance(spec, str):
        specs = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        raise TypeError("rollout_rs_threshold must be a number or a string")
    if not specs:
        raise ValueError("rollout_rs_threshold must contain at least one threshold")
    if len(specs) not in (1, len(options)):
        raise ValueError(f"rollout_rs_threshold needs one threshold for all options or one "
                         f"per option ({len(options)}), got {len(specs)}")
    specs = specs * len(options) if len(specs) == 1 else specs
    bounds: dict[str, RsBounds] = {}
    for option, text in zip(options, specs, strict=True):
        k1 = option.endswith("k1")
        if not k1 and "_" in text:
            raise ValueError(f"rollout_rs_threshold for {option!r} must be one upper bound "
                             f"without '_', got {text!r}")
        try:
            if "_" in text:
                low, high = text.split("_", 1)
                lower, upper = float(low), float(high)
            else:
                lower, upper = None, float(text)
        except ValueError:
            raise ValueError(f"invalid threshold {text!r} for {option!r}") from None
        if not upper > 0 or (lower is not None and not lower > 0):
            raise ValueError(f"threshold {text!r} of {option!r} must be positive")
        if k1 and lower is None:
            lower = 1.0 / upper  # verl: float(str(1.0 / upper)), the same number
        if lower is not None and lower > upper:
            raise ValueError(f"threshold {text!r} of {option!r} must have lower <= upper")
        bounds[option] = RsBounds(lower, upper)
    return bounds


@dataclass(frozen=True)
class RolloutCorrectionConfig:
    """verl 0.9's ``algorithm.rollout_correction`` (its ``RolloutCorrectionConfig``), computed
    in verl's decoupled mode: old log-probs on the training copy, weights and rejection from
    ``r = pi_old / pi_rollout`` once per batch. Defaults are verl's YAML defaults (its dataclass
    says rollout_is "sequence"; its trainer config null, which aqn keeps: nothing on)."""

    rollout_is: Literal["token", "sequence"] | None = None
    """Importance weights on the policy loss: "token" (each token's r) or "sequence" (the
    product of the sequence's r, for all its tokens); null: none, metrics only."""
    rollout_is_threshold: float | str = 2.0
    """A number C truncates the weights at C (TIS); "lower_upper" (e.g. "0.5_5.0") zeroes
    those outside [lower, upper] instead (IcePop)."""
    rollout_is_batch_normalize: bool = False
    """Divide the weights by their batch mean (over tokens, or over sequences at sequence
    level) so that they average 1; the logged rollout_is_* stay those before it."""
    rollout_rs: str | None = None
    """Rejection sampling (masked IS): comma-separated options token_k1|k2|k3,
    seq_sum_k1|k2|k3, seq_mean_k1|k2|k3, seq_max_k2|k3; a token (token_*) or a whole
    sequence (seq_*) out of an option's bounds leaves the loss. All options must pass.
    null: off."""
    rollout_rs_threshold: float | str | None = None
    """One threshold for every option, or one per option (comma-separated). k1: "lower_upper"
    bounds of pi_rollout / pi_train (a number U: 1/U to U); k2, k3: an upper bound."""
    bypass_mode: bool = False
    """verl's bypass mode (old log-probs = the rollout's): not offered, must stay false."""
    loss_type: Literal["ppo_clip", "reinforce"] = "ppo_clip"
    """verl's bypass-mode loss; read only in bypass mode, so it must stay ppo_clip."""

    def __post_init__(self) -> None:
        try:
            parse_is_threshold(self.rollout_is_threshold)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e), "rollout_is_threshold") from None
        if self.rollout_rs is not None:
            try:
                options = parse_rs_options(self.rollout_rs)
            except ValueError as e:
                raise ConfigError(str(e), "rollout_rs") from None
            if self.rollout_rs_threshold is None:
                raise ConfigError("must be given when rollout_rs is set (verl has no default)",
                                  "rollout_rs_threshold")
            try:
                parse_rs_thresholds(options, self.rollout_rs_threshold)
            except (TypeError, ValueError) as e:
                raise ConfigError(str(e), "rollout_rs_threshold") from None
        if self.rollout_is_batch_normalize and self.rollout_is is None:
            raise ConfigError("normalizes importance weights, but rollout_is is null: there "
                              "are none (set rollout_is=token|sequence)",
                              "rollout_is_batch_normalize")
        if self.bypass_mode:
            raise ConfigError("verl's bypass mode (old log-probs = the rollout's, corrections "
                              "from the current policy per micro-batch) is not offered: aqn "
                              "computes old log-probs on the training copy (verl's decoupled "
                              "mode, its default); set bypass_mode=false", "bypass_mode")
        if self.loss_type != "ppo_clip":
            raise ConfigError(f"{self.loss_type!r} is read only in verl's bypass mode (verl "
                              "ignores it otherwise), which aqn does not offer; aqn's loss is "
                              "PPO-clip", "loss_type")

    @property
    def needs_whole_batch(self) -> bool:
        """Whether the correction needs the whole batch's old log-probs before the update:
        rejection changes the loss mask every mini-batch is weighted by, and batch
        normalization divides by the batch's mean weight."""
        return self.rollout_rs is not None or self.rollout_is_batch_normalize

    @property
    def enabled(self) -> bool:
        """Whether the correction acts on the loss (weights or rejection)."""
        return self.rollout_is is not None or self.rollout_rs is not None
