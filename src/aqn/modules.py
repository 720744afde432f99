"""Naming modules inside a model: the one rule that every module selector uses."""

from __future__ import annotations

import fnmatch


def path_matches(path: str, pattern: str) -> bool:
    """A pattern names a module by its full path, a '.'-suffix of it, or a glob."""
    return path == pattern or path.endswith("." + pattern) or fnmatch.fnmatchcase(path, pattern)
