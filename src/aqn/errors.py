"""Errors shared by every layer (this module imports nothing from aqn)."""


class InputError(ValueError):
    """Input the user can fix (a config key, a data or run file); the message names the key,
    file or line. The CLI prints it as one line; any other exception is a bug and keeps its
    traceback."""


class ConfigError(InputError):
    """A config value is wrong. ``key`` is its dotted path, filled in as the error rises."""

    def __init__(self, message: str, key: str | None = None) -> None:
        self.message = message
        self.key = key
        super().__init__(f"config key '{key}': {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its key placed under ``prefix``."""
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(self.message, key)


class NoTargetsError(RuntimeError):
    """AQN selection matched no module: the noise would silently do nothing."""


class NotFiredError(RuntimeError):
    """A perturbation that should have acted in a step touched nothing (or not what the plan
    said): the run would report a perturbation that did not happen (see aqn.firing)."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or reward); the last checkpoint is intact."""


class ModelUnavailableError(RuntimeError):
    """A named model cannot be loaded here; the message says how to get it."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached a command: it ends, every run it held stays resumable.

    A KeyboardInterrupt, so that code which lets Ctrl-C through lets SIGTERM through too.
    ``where`` says how far the work got ("at step 12/50 (last checkpoint step 10)") and
    ``hint`` how to go on, filled in as it rises.
    """

    def __init__(self, signum: int, where: str = "", hint: str = "") -> None:
        self.signum = signum
        self.where = where
        self.hint = hint
        super().__init__(signum, where)
