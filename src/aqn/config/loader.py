"""YAML + dotted overrides -> a validated, frozen dataclass tree.

Strict by design (defect 6 in docs/reference.md came from config that was not what it seemed):
unknown keys and wrong types are errors naming the full dotted key and the closest valid
one; values are coerced only where the meaning is unambiguous (an int for a float field,
a numeric string such as ``1e-3`` for a number, a list for a tuple).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from aqn.config.upgrade import renamed_key_error
from aqn.errors import ConfigError
from aqn.files import load_yaml_strict

T = TypeVar("T")


def _closest(name: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(options)}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` as type ``tp``, or a ConfigError naming ``key``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping of {tp.__name__} fields, got {value!r}", key)
        return build(tp, value, key)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"must not be null (expected {_type_name(tp)})", key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(
                f"must be one of {list(get_args(tp))}, got {value!r}"
                + (_closest(str(value), [str(a) for a in get_args(tp)])
                   if isinstance(value, str) else ""),
                key,
            )
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            # a single string where a list is expected: a one-element list
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, Sequence):
                raise ConfigError(f"expected a list, got {value!r}", key)
        (item_type, *_rest) = get_args(tp)
        return tuple(coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {value!r}", key)
        key_type, value_type = get_args(tp)
        return {coerce(key_type, k, f"{key}.{k}"): coerce(value_type, v, f"{key}.{k}")
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true or false, got {value!r}", key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"expected an integer, got {value!r}", key)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads '1e-3' as a string
            except ValueError:
                pass
        raise ConfigError(f"expected a number, got {value!r}", key)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"expected a string, got {value!r}", key)
    raise ConfigError(f"unsupported config type {_type_name(tp)}", key)


def build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """An instance of dataclass ``cls`` from a mapping; defaults fill missing keys."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise renamed_key_error(key) or ConfigError(
                f"unknown key{_closest(str(name), names)}", key)
        kwargs[name] = coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise (e.under(prefix) if prefix else e) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a', 'b', 'c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = load_yaml_strict(raw) if raw.strip() else ""
    except ConfigError as e:
        raise ConfigError(f"cannot parse the value of {text!r}: {e.message}", key) from None
    return key.split("."), value


def set_dotted(data: dict, path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError("is a value, not a section", ".".join(path[: i + 1]))
        node = child
    node[path[-1]] = value


def deep_merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    data = load_yaml_strict(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def to_yaml(data: Mapping) -> str:
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False)

