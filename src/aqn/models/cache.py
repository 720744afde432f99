"""The on-disk cache of models made once per machine (tiny-base, converted SmolLM2)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """``$AQN_CACHE_DIR`` if set, else ``~/.cache/aqn``."""
    env = os.environ.get("AQN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "aqn"


def publish_dir(final: Path, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Fill a temp dir beside ``final`` with ``write`` and rename it into place, so a killed
    run never leaves a half-written cache behind. Another process finishing first is fine."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        write(tmp)
        if replace and final.is_dir():
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final
