"""Where curvlab's warnings point: the user's line.

A warning meant for the caller names the line that called curvlab, whichever entry point led to
it and however many frames lie between: curvlab's own (decorators such as ``collective``, the
FSDP2 wrapper) and torch's (``torch.compiler.disable`` around ``Diagnostics.step``/``measure``
and every collective entry point, ``torch.no_grad`` used as a decorator). A fixed ``stacklevel``
counted those frames by hand, and pointed into ``curvlab/_fsdp.py`` or torch's
``_dynamo/eval_frame.py`` once ``torch.compiler.disable`` added two (found in review s17).

Example:
    >>> import warnings
    >>> def entry_point():  # in curvlab: warns at its caller's line
    ...     warnings.warn("...", RuntimeWarning, stacklevel=user_stacklevel())
"""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["user_stacklevel"]

_SKIPPED = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,  # curvlab
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,  # torch (its _dynamo included)
)
"""The package roots whose frames lie between the user's line and a warning."""


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes ``warnings.warn``, called by the function that calls this,
    name the first frame outside curvlab and torch: the user's line.

    1 (the warning's own line) in the unlikely case that every frame is curvlab's or torch's.
    Only called where a warning is issued, so walking the stack costs nothing in training.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith("<") and not os.path.abspath(name).startswith(_SKIPPED):
            return level
        frame, level = frame.f_back, level + 1
    return 1
