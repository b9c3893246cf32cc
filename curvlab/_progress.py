"""Progress bars for long curvature computations, drawn by `tqdm <https://tqdm.github.io>`_.

``enable=None`` (the default of curvlab's long-running entry points) shows a bar only when stderr
is a terminal, so scripts, logs, CI and notebooks' captured output stay clean; ``True`` and
``False`` force it on or off. The environment variable ``CURVLAB_PROGRESS`` set to ``0``,
``false``, ``no`` or ``off`` (in any case: ``False`` and ``OFF`` too) turns every automatic bar off.

Example:
    >>> total = 0
    >>> for i in progress(range(3), desc="probes", enable=False):
    ...     total += i
    >>> total
    3
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

__all__ = ["progress", "progress_enabled", "ProgressBar"]

T = TypeVar("T")


def progress_enabled(enable: bool | None, stream: TextIO | None = None) -> bool:
    """Whether to draw a bar: ``enable`` if given, else whether ``stream`` (stderr) is a terminal."""
    if enable is not None:
        return bool(enable)
    if os.environ.get("CURVLAB_PROGRESS", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressBar:
    """A progress bar on stderr (a thin wrapper of ``tqdm.tqdm``), or nothing when disabled.

    Args:
        total: the number of steps, or ``None`` if unknown (then a counter is shown).
        desc: a label printed before the bar.
        enable: ``True``/``False``, or ``None``: only when ``stream`` is a terminal.
        stream: where to write (default ``sys.stderr``).
        min_interval: seconds between refreshes.
        unit: what one step is called.

    Attributes:
        count: the steps counted so far (also when disabled).
        enable: whether a bar is drawn.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        enable: bool | None = None,
        stream: TextIO | None = None,
        min_interval: float = 0.2,
        unit: str = "it",
    ) -> None:
        self.total = total
        self.count = 0
        self.enable = progress_enabled(enable, stream)
        self._bar: Any = None
        if self.enable:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=desc,
                file=stream if stream is not None else sys.stderr,
                mininterval=min_interval,
                unit=unit,
                dynamic_ncols=True,
                leave=True,
            )

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        """Advance by ``n`` steps (and replace the text shown after the bar)."""
        self.count += n
        if self._bar is None:
            return
        if postfix is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        """Finish the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    enable: bool | None = False,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """Iterate over ``iterable``, showing a progress bar on stderr when enabled.

    Args:
        iterable: what to iterate over.
        total: its length (taken from ``len(iterable)`` when available).
        desc: a label.
        enable: ``True``/``False``, or ``None``: only when stderr is a terminal.
        stream: where to write (default ``sys.stderr``).
    """
    if not progress_enabled(enable, stream):
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with ProgressBar(total=total, desc=desc, enable=True, stream=stream) as bar:
        for item in iterable:
            yield item
            bar.update()
