"""Plain text for messages: no terminal escape sequences.

Some libraries colour their error messages with ANSI escape sequences (torch's ``weights_only``
unpickler makes words bold). curvlab quotes such messages; in a log file or a report the escapes
are noise, so they are removed.

Example:
    >>> strip_ansi("\\x1b[1mWeightsUnpickler error\\x1b[0m: Unsupported global")
    'WeightsUnpickler error: Unsupported global'
"""

from __future__ import annotations

import re

__all__ = ["few", "strip_ansi"]

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def few(items: list[str], limit: int = 8) -> str:
    """The first ``limit`` of ``items``, quoted and comma-separated, and how many more there are:
    ``'a', 'b' and 3 more``."""
    shown = ", ".join(repr(s) for s in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (colours, bold, cursor movement)."""
    return _ANSI.sub("", text)
