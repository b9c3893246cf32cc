"""A tiny optional progress bar on stderr for long curvature computations (off by default).

Example:
    >>> total = 0
    >>> for i in progress(range(3), desc="probes", enable=False):
    ...     total += i
    >>> total
    3
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

__all__ = ["progress", "ProgressBar"]

T = TypeVar("T")


class ProgressBar:
    """A one-line progress display refreshed at most every ``min_interval`` seconds.

    Args:
        total: the number of steps, or ``None`` if unknown (then a counter is shown).
        desc: a label printed before the bar.
        enable: ``False`` makes every method a no-op.
        stream: where to write (default ``sys.stderr``).
        min_interval: seconds between refreshes.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        enable: bool = True,
        stream: TextIO | None = None,
        min_interval: float = 0.2,
    ) -> None:
        self.total = total
        self.desc = desc
        self.enable = enable
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self.count = 0
        self.postfix = ""
        self._start = time.perf_counter()
        self._last = -float("inf")

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        """Advance by ``n`` steps (and replace the text shown after the bar)."""
        if not self.enable:
            return
        self.count += n
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if now - self._last >= self.min_interval or self.count == self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self._start
        if self.total:
            frac = min(self.count / self.total, 1.0)
            filled = int(20 * frac)
            bar = f"[{'#' * filled}{'.' * (20 - filled)}] {self.count}/{self.total}"
        else:
            bar = f"{self.count} it"
        text = f"\r{self.desc}: {bar} {elapsed:.1f}s {self.postfix}"
        self.stream.write(text[:120])
        self.stream.flush()

    def close(self) -> None:
        """End the line."""
        if self.enable:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    enable: bool = False,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """Iterate over ``iterable``, showing a progress bar on stderr when ``enable`` is true.

    Args:
        iterable: what to iterate over.
        total: its length (taken from ``len(iterable)`` when available).
        desc: a label.
        enable: show the bar (off by default, so library calls stay silent).
        stream: where to write (default ``sys.stderr``).
    """
    if not enable:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = ProgressBar(total=total, desc=desc, stream=stream)
    try:
        for item in iterable:
            yield item
            bar.update()
    finally:
        bar.close()
