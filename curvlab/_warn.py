"""Where curvlab's warnings point: the user's line.

A warning meant for the caller names the line that called curvlab, whichever entry point led to
it and however many frames lie between: curvlab's own (decorators such as ``collective``, the
FSDP2 wrapper) and torch's (``torch.compiler.disable`` around ``Diagnostics.step``/``measure``
and every collective entry point, ``torch.no_grad`` used as a decorator). A fixed ``stacklevel``
counted those frames by hand, and pointed into ``curvlab/_fsdp.py`` or torch's
``_dynamo/eval_frame.py`` once ``torch.compiler.disable`` added two (found in review s17).

A warning meant to be shown once per call site goes through :func:`warn_once`, which keeps its
own record of the sites it has shown, not Python's once-per-location registry: every
``warnings.catch_warnings()`` entered anywhere (curvlab's BackPACK sessions, a model with a
compiled block, the user's own code, pytest) empties that registry, and the warning came back at
every call (found in review s24: three ``diag_hessian`` calls from one line, three warnings; one
per training step of a ``DiagFisherNoise("exact")`` sampler).

Example:
    >>> import warnings
    >>> def entry_point():  # in curvlab: warns at its caller's line
    ...     warnings.warn("...", RuntimeWarning, stacklevel=user_stacklevel())
    >>> def entry_point_once():  # the same, shown once per line of the caller's
    ...     warn_once("...", RuntimeWarning)
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

import torch

__all__ = ["user_stacklevel", "warn_once", "warn_explicit_once"]

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
    return _user_frame(sys._getframe(1))[1]


def _user_frame(frame: FrameType | None) -> tuple[FrameType | None, int]:
    """The first frame from ``frame`` outward that is neither curvlab's nor torch's, and its
    ``stacklevel`` counted from ``frame`` (1); ``(None, 1)`` when there is none."""
    level = 1
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith("<") and not os.path.abspath(name).startswith(_SKIPPED):
            return frame, level
        frame, level = frame.f_back, level + 1
    return None, 1


_SHOWN: set[tuple[str, int, str, type[Warning]]] = set()
"""``(file, line, text, category)`` of each warning :func:`warn_once` and
:func:`warn_explicit_once` have shown: a record that no ``warnings.catch_warnings()`` empties."""


def _action(text: str, category: type[Warning], lineno: int, module: str) -> str:
    """The action of the first of ``warnings.filters`` that matches, as ``warnings`` finds it
    (``warnings.defaultaction`` where none does)."""
    for action, msg, cat, mod, line in warnings.filters:
        if (
            (msg is None or msg.match(text))
            and issubclass(category, cat)
            and (mod is None or mod.match(module))
            and (line == 0 or line == lineno)
        ):
            return action
    return warnings.defaultaction


def _show(key: tuple[str, int, str, type[Warning]], module: str) -> bool:
    """Whether the warning ``key`` is to be issued now: always under an ``"always"`` (or
    ``"error"``) filter, never under ``"ignore"`` (and then not recorded, so that it shows where
    it is not ignored), else the first time only."""
    action = _action(key[2], key[3], key[1], module)
    if action in ("always", "all", "error"):
        return True
    if action == "ignore" or key in _SHOWN:
        return False
    _SHOWN.add(key)
    return True


def warn_once(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn(message, category)`` at the user's line (:func:`user_stacklevel`), shown
    once per line and text of the warning.

    The record is this module's (:data:`_SHOWN`), not Python's once-per-location registry, which
    every ``warnings.catch_warnings()`` entry empties. The filters still decide: an ``"always"``
    filter (``pytest.warns``) shows the warning at every call, ``"error"`` raises it, ``"ignore"``
    hides it (without recording it), and ``"once"`` or ``"module"`` go on to Python's own rules
    the first time.

    Args:
        message: the warning's text (without a batch number or another value that changes from
            call to call: each text is shown once).
        category: the warning's class.
    """
    frame, level = _user_frame(sys._getframe(1))
    if frame is None:  # every frame is curvlab's or torch's: the caller's line, as user_stacklevel
        frame, level = sys._getframe(1), 1
    module = frame.f_globals.get("__name__", "<string>")
    if _show((frame.f_code.co_filename, frame.f_lineno, message, category), module):
        warnings.warn(message, category, stacklevel=level + 1)


def warn_explicit_once(
    message: Warning | str, category: type[Warning], filename: str, lineno: int
) -> None:
    """``warnings.warn_explicit`` of a warning caught elsewhere (in another library's code, under
    ``catch_warnings(record=True)``), shown once per file, line and text, as Python's default
    shows it, however often it is caught and given again (:func:`warn_once`)."""
    text = str(message)
    module = filename[:-3] if filename.endswith(".py") else filename  # as warn_explicit names it
    if _show((filename, lineno, text, category), module or "<unknown>"):
        warnings.warn_explicit(message, category, filename, lineno)
