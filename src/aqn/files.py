"""Files that survive a kill at any instant (written to a temporary name, then renamed),
errors that name the file they are about, YAML read strictly, and local paths told from hub
ids."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError

from aqn.errors import ConfigError


class FileError(OSError):
    """A file could not be written or read (full disk, permissions, torn or garbage bytes);
    the message names the file."""


@contextmanager
def about(path: str | Path) -> Iterator[None]:
    """Make an error while reading or writing ``path`` a ``FileError`` that names it: a full
    disk's OSError carries no file name, and safetensors and JSON errors none either."""
    try:
        yield
    except FileError:
        raise
    except OSError as e:
        raise FileError(e.errno, e.strerror or str(e), str(path)) from e
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileError(f"{path}: {type(e).__name__}: {e}") from e


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a reader (or a crash) sees the old file or the new
    one, never a part: write ``<name>.tmp`` beside it, flush it to disk, ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with about(path), open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _at(source: str | Path | None, line: int) -> str:
    return f"{source}:{line}" if source is not None else f"line {line}"


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last one silently: a sweep's second ``a:`` variant would replace the first)."""

    source: str | Path | None = None

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: the keys written beside it override it, by design
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise ConfigError(f"{_at(self.source, line)}: duplicate key {key!r} "
                                          f"(first at line {seen[key]})")
                    seen[key] = line
                except TypeError:
                    continue  # an unhashable key: SafeLoader's own error names it
        return super().construct_mapping(node, deep=deep)


def load_yaml_strict(text: str, source: str | Path | None = None) -> Any:
    """``text`` parsed as YAML (safe tags only), refusing a key given twice in one mapping.

    Every failure is a ConfigError starting ``<source>:<line>:`` (``line <n>:`` without a
    source): ``duplicate key 'x' (first at line N)`` or ``invalid YAML: <problem>``.
    """
    loader = _StrictLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = _at(source, mark.line + 1) if mark else (str(source) if source else "YAML")
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}"
                          ) from None
    finally:
        loader.dispose()


def is_local_model_path(name: str) -> bool:
    """Whether a model name is read as a local path rather than a hub id (``org/name``): it
    starts with '/', '.' or '~', has more than one '/', or is a Windows path (a drive letter
    or a backslash). A bare name (``tiny``) is neither: a built-in or a folder here."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or re.match(r"[A-Za-z]:", name) is not None)


def missing_model_path(name: str) -> str | None:
    """The error for a model name read as a local path that does not exist (transformers
    would answer "Repo id must be in the form ..."); None when it exists or is no path.
    The one place of the rule: ModelConfig checks it when the config is loaded (before a run
    directory exists), aqn.models.load_model for the commands that take --model."""
    if is_local_model_path(name) and not Path(name).expanduser().exists():
        return f"{name} does not exist (a local path; a hub id looks like org/name)"
    return None
