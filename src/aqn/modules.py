"""Naming modules inside a model: the one rule that every module selector uses."""

from __future__ import annotations

import fnmatch


def path_matches(path: str, pattern: str) -> bool:
    """A pattern names a module by its full path, a '.'-suffix of it, or a glob."""
    return path == pattern or path.endswith("." + pattern) or fnmatch.fnmatchcase(path, pattern)


def layer_index(path: str) -> int | None:
    """The decoder layer a module sits in: the first numeric part of its path
    (``model.layers.3.input_layernorm`` -> 3); None outside the numbered layers."""
    return next((int(part) for part in path.split(".") if part.isdigit()), None)
