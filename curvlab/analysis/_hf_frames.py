"""Where a HuggingFace ``TrainerCallback`` finds what the Trainer does not hand it: its
``CallbackHandler``, the ``Trainer`` and the checkpoint folder a running ``train()`` resumes
from, all read from the call stack (no instance attribute is run through ``__getattr__``)."""

from __future__ import annotations

import inspect
import os
from typing import Any

__all__ = ["find_handler", "find_trainer", "resume_folder"]


def find_handler(callback: Any) -> Any:
    """The ``CallbackHandler`` that is calling ``callback`` (found on the call stack), or None.

    A callback receives no reference to the Trainer or its handler; the handler's
    ``call_event`` is the caller of every event method, so it is on the stack in
    ``on_train_begin``.
    """
    try:
        from transformers.trainer_callback import CallbackHandler
    except ImportError:  # pragma: no cover - checked by diagnostics_callback
        return None
    return _on_stack(
        lambda owner: (
            isinstance(owner, CallbackHandler) and any(cb is callback for cb in owner.callbacks)
        )
    )


def find_trainer(handler: Any) -> Any:
    """The ``Trainer`` whose ``callback_handler`` is ``handler`` (on the call stack), or None."""
    if handler is None:
        return None
    return _on_stack(lambda owner: _instance_attr(owner, "callback_handler") is handler)


def _on_stack(match: Any) -> Any:
    """The first ``self`` of the 16 innermost frames of the call stack that ``match`` accepts."""
    frame = inspect.currentframe()
    try:
        for _ in range(16):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if owner is not None and match(owner):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def _instance_attr(owner: Any, name: str) -> Any:
    """``owner.name`` if it is an instance attribute, else None (no ``__getattr__`` is run)."""
    attrs = getattr(owner, "__dict__", None)
    return attrs.get(name) if isinstance(attrs, dict) else None


def resume_folder(trainer: Any) -> str | None:
    """The checkpoint folder the Trainer's running ``train()`` resumes from, or None.

    A callback is not told it: it is the ``resume_from_checkpoint`` argument of the Trainer's
    training loop, found on the call stack (``train`` has already turned ``True`` into the
    last checkpoint's folder when it calls the loop).
    """
    if trainer is None:
        return None
    frame = inspect.currentframe()
    try:
        for _ in range(32):
            if frame is None:
                return None
            local = frame.f_locals
            if local.get("self") is trainer and "resume_from_checkpoint" in local:
                folder = local["resume_from_checkpoint"]
                return os.fspath(folder) if isinstance(folder, (str, os.PathLike)) else None
            frame = frame.f_back
        return None
    finally:
        del frame
