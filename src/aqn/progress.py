"""Progress for long work: a tqdm bar on a terminal, plain lines in a redirected log (a log
must not fill with carriage-return frames: `make demo > log` once held hundreds of KB)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


class Progress:
    """Iterate ``items`` showing progress. ``lines``: how many plain lines a redirected log
    gets over the whole run (0: none); ``postfix`` as tqdm's ``set_postfix``."""

    def __init__(self, items: Iterable[T], desc: str, total: int | None = None,
                 enabled: bool = True, lines: int = 10, **tqdm_kwargs) -> None:
        self.total = total if total is not None else len(items)  # type: ignore[arg-type]
        self.tty = enabled and sys.stderr.isatty()
        self.lines = lines if enabled and not self.tty else 0
        self.desc = desc
        self.postfix: dict[str, str] = {}
        self.bar = tqdm(items, desc=desc, total=self.total, disable=not self.tty,
                        dynamic_ncols=True, **tqdm_kwargs)
        self.start = time.perf_counter()

    def __iter__(self) -> Iterator[T]:
        every = max(1, self.total // self.lines) if self.lines else 0
        for i, item in enumerate(self.bar, start=1):
            yield item
            if every and (i % every == 0 or i == self.total):
                extra = " ".join(f"{k} {v}" for k, v in self.postfix.items())
                print(f"{self.desc}: {i}/{self.total} {extra} "
                      f"({time.perf_counter() - self.start:.0f} s)".replace("  ", " "),
                      file=sys.stderr, flush=True)

    def set_postfix(self, **values: str) -> None:
        self.postfix = values
        self.bar.set_postfix(values)
