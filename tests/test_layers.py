"""The package layers hold: a package imports only itself and packages of lower layers, and
no two modules import each other at import time (a cycle is an ImportError in waiting).

Imports are read from the source with ``ast`` (every ``import``/``from ... import``, also
those inside functions), so the test sees what the code says, not what one run loaded.
docs/development.md ("Layers") and docs/architecture.md list the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "aqn"

# Lowest first. A package may import packages of lower layers only; packages that share a
# layer stay independent of each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    # import nothing from aqn: every layer may raise the errors and name the metrics
    ("errors", "metric_keys"),
    ("hashing", "modules", "machine", "token_math", "configs", "files", "firing", "progress"),
    ("noise", "quant", "numerics"),  # perturbation kernels: pure PyTorch
    ("data", "rewards"),
    ("models",),  # the tiny base is pretrained on the arith data and scored by the reward
    ("config",),  # validates names against the kernels' registries
    ("perturb",),  # the perturbation registry: builds the kernels from the config
    ("rollout",),  # engines behind one protocol
    ("rl",),  # GRPO maths and the training recipe
    ("experiments",),  # sweeps, run store, statistics, reports
    ("integrations",),
    ("cli",),
)
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _module_name(path: Path) -> str:
    parts = ("aqn", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """aqn modules imported by ``path`` (``from aqn.x import y`` counts as aqn.x.y when that
    is a module, else aqn.x)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "aqn")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "aqn":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "aqn"


FILES = sorted(SRC.rglob("*.py"))
MODULES = {_module_name(p): p for p in FILES}


def test_every_package_has_a_layer():
    packages = {_package(m) for m in MODULES} - {"aqn"}
    assert packages - RANK.keys() == set(), "add new packages to LAYERS (and docs/development.md)"
    assert RANK.keys() - packages <= {"integrations"}, "LAYERS names a package that is gone"


def _upward(path: Path, package: str) -> list[str]:
    """Imports of ``path`` (a module of ``package``) that go to a layer not below its own."""
    upward = []
    for target in sorted(_imports(path, top_level_only=False)):
        other = _package(target)
        if other not in ("aqn", package) and RANK[other] >= RANK[package]:
            upward.append(f"{target} (layer {RANK[other]}) from layer {RANK[package]}")
    return upward


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down(path: Path):
    me = _package(_module_name(path))
    if me == "aqn":
        return  # aqn/__init__.py
    upward = _upward(path, me)
    assert not upward, f"{path.relative_to(SRC)} imports upward or sideways: {upward}"


def test_upward_imports_are_found(tmp_path: Path):
    # the checker itself can fail: an engine importing the trainer, inside a function, and a
    # kernel importing its sibling at the top, are both reported
    engine = tmp_path / "engine.py"
    engine.write_text("import torch\n\ndef f():\n    from aqn.rl import core_algos\n")
    assert _upward(engine, "rollout") == ["aqn.rl.core_algos (layer 8) from layer 7"]
    kernel = tmp_path / "model.py"
    kernel.write_text("from aqn.noise.selection import select_norms\nfrom aqn.errors import X\n")
    assert _upward(kernel, "quant") == ["aqn.noise.selection (layer 2) from layer 2"]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _import_time_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for target in _imports(path, top_level_only=True):
            # importing aqn.a.b runs aqn/a/__init__ first, unless it is our own package
            # (then it is already being initialised, which Python handles)
            parts = target.split(".")
            deps.update(d for d in (".".join(parts[:i]) for i in range(2, len(parts) + 1))
                        if not name.startswith(d + ".") and d != name)
        graph[name] = {d for d in deps if d in MODULES and d != name}
    return graph


def test_no_import_cycle():
    assert _cycle(_import_time_graph()) is None


def test_cycle_finder_finds_a_cycle():
    # the checker itself can fail: a planted cycle is reported with its path
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
