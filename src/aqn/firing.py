"""Proof that a perturbation fired: what it touched in one step, counted where it acted.

Every perturbation kernel keeps one ``Firing`` per applied step (reset by ``apply``) and
counts into it as it writes weights or as its hooks and patched forwards run. A perturbation
that was configured, whose schedule says it acts in this step, and that touched nothing is
the failure class aqn exists to catch (a class check matching no layer, a schedule that is
zero, hooks that never fire in a compiled or CUDA-graph model): ``check`` raises then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from aqn import metric_keys as keys
from aqn.errors import NotFiredError

__all__ = ["Firing", "NotFiredError"]


@dataclass
class Firing:
    """What one perturbation touched since its last ``apply``."""

    modules: set[str]  # paths of the modules it wrote or whose calls it changed
    calls: int = 0  # hook / patched-forward calls it ran in (0 for weight writers)
    elements: int = 0  # elements it wrote or computed
    changed: int | Tensor | None = 0  # of those, how many differ from the unperturbed value
    expected: bool = True  # its schedule says it acts in this step (AQN's warm-up: not)
    by_calls: bool = False  # it acts through hooks or patched forwards (counts calls)

    @classmethod
    def empty(cls, expected: bool = True, by_calls: bool = False,
              changed: int | None = 0) -> Firing:
        """Nothing touched yet; ``changed=None``: this kernel does not measure changes."""
        return cls(set(), changed=changed, expected=expected, by_calls=by_calls)

    def count_call(self, path: str, elements: int, changed: Tensor | int | None = None) -> None:
        """One call of a hook or patched forward; ``changed`` may stay a tensor (no sync)."""
        self.modules.add(path)
        self.calls += 1
        self.elements += elements
        if changed is not None and self.changed is not None:
            if isinstance(self.changed, Tensor) and isinstance(changed, Tensor):
                changed = changed.to(self.changed.device)
            self.changed = (self.changed or 0) + changed

    @property
    def num_changed(self) -> int | None:
        return None if self.changed is None else int(self.changed)

    @property
    def fired(self) -> bool:
        if self.by_calls and self.calls == 0:
            return False
        return bool(self.modules) and self.num_changed != 0

    def metrics(self, name: str) -> dict[str, float]:
        out = {keys.firing(name, "modules"): float(len(self.modules)),
               keys.firing(name, "calls"): float(self.calls),
               keys.firing(name, "elements"): float(self.elements)}
        if self.changed is not None:
            out[keys.firing(name, "elements_changed")] = float(self.num_changed)
        return out

    def check(self, name: str, step: int | None, where: str) -> None:
        """Raise ``NotFiredError`` naming ``name`` when it should have acted and did not."""
        if not self.expected or self.fired:
            return
        if self.by_calls and self.calls == 0:
            why = ("none of its hooks or patched forwards ran: the model ran without calling "
                   "them (torch.compile'd or CUDA-graph models skip Python hooks added after "
                   "capture)")
        elif not self.modules:
            why = "it reached no module"
        else:
            why = (f"it ran on {len(self.modules)} modules but changed none of their "
                   f"{self.elements} elements")
        raise NotFiredError(
            f"perturbation {name!r} was configured to act at step {step} ({where}), but "
            f"{why}, so it did nothing. The run stops here rather than report a perturbed "
            "run that was not perturbed.")


class HookedPerturbation:
    """The life of a perturbation carried by hooks (activation noise, matmul noise, activation
    quantization): ``start`` installs the hooks once and opens a new count of their calls,
    ``restore`` removes them, so the model computes exactly as before. It writes no weight."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.last = Firing.empty(by_calls=True)
        self._calls: dict[str, int] = {}  # per path: the call number each hook call gets
        self._handles: list = []

    def start(self, step: int, install: Callable[[], list]) -> None:
        """Count the calls of ``step`` from zero; ``install()`` returns the hook handles."""
        self.step = step
        self._calls.clear()
        self.last = Firing.empty(by_calls=True)
        if not self._handles:
            self._handles = install()

    def next_call(self, path: str) -> int:
        """The number of this call of ``path``'s hook in the step (0, 1, ...): seeds noise."""
        call = self._calls.get(path, 0)
        self._calls[path] = call + 1
        return call

    def firing(self) -> Firing:
        return self.last

    def writes(self) -> list[Tensor]:
        return []  # hooks on inputs or outputs, never weights

    def refresh(self) -> None:
        """New weights were loaded: nothing to do, the hooks read only activations."""

    def restore(self) -> None:
        """Remove the hooks: the model computes exactly as before ``apply``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
