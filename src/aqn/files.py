"""Files that survive a kill at any instant (written to a temporary name, then renamed), and
errors that name the file they are about."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError


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
