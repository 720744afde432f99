"""Short, stable hashes of configs, so every component can log the config it runs with."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and mappings as plain JSON-able values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def config_hash(obj: Any, length: int = 10) -> str:
    text = json.dumps(to_plain(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from sha256 of the parts: stable across processes, unlike hash()."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
