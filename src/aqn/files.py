"""Files that survive a kill at any instant: written to a temporary name, then renamed."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a reader (or a crash) sees the old file or the new
    one, never a part: write ``<name>.tmp`` beside it, flush it to disk, ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
