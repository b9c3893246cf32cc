"""Reading a :class:`~curvlab.analysis.Diagnostics` state back (:meth:`Diagnostics.state_dict`).

:func:`checked_state` checks every field of a saved state and converts it before
:meth:`Diagnostics.load_state_dict` changes anything, so a refused state leaves the
``Diagnostics`` as it was; :func:`kept_entries` is which records and events a loaded state keeps.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvlab._generator_state import generator_state as _generator_state
from curvlab._numbers import is_int
from curvlab.analysis._metrics_log import UNNAMED_LOG_DIR

__all__ = ["NO_POSITION", "LoadedState", "checked_state", "is_position", "kept_entries"]


@dataclass
class LoadedState:
    """A checked :meth:`Diagnostics.state_dict`, its values converted (see there)."""

    generator: Tensor  # the state for a generator on the model's device
    calls: int
    last_step: int | None
    seen_step: int | None
    exploded: bool
    window: list[float]
    per_term: bool  # the window holds Tr(F) per loss term (else batch totals under "sum")
    warm: dict[str, Any]  # tensors on the model's device
    log_position: Any  # a MetricsLog.position(), None, or NO_POSITION
    log_dir: Any  # the absolute folder that position is of, None, or UNNAMED_LOG_DIR
    log_tail: str | None  # the fingerprint of the log at that position (MetricsLog.tail)
    num_records: int | None
    num_events: int | None
    records_of: Any


def checked_state(state: Any, seed: int, device: torch.device) -> LoadedState:
    """``state`` checked and converted for a ``Diagnostics`` seeded ``seed`` on ``device``.

    Raises:
        ValueError: if ``state`` is not a Diagnostics state dict, or its generator state is
            one of another device type.
    """
    if not isinstance(state, Mapping):
        raise ValueError(
            f"not a Diagnostics state_dict: a {type(state).__name__} (save diag.state_dict())"
        )
    missing = {"generator", "calls", "last_step", "exploded", "warm"} - set(state)
    if missing:
        raise ValueError(
            f"not a Diagnostics state_dict: it lacks {sorted(missing)} (save diag.state_dict())"
        )
    window = state.get("fisher_window", [])
    if not isinstance(window, (list, tuple)) or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in window
    ):
        raise ValueError(
            f"not a Diagnostics state_dict: its 'fisher_window' is {window!r}, not a list of "
            "Tr(F) values (save diag.state_dict())"
        )
    counts = {k: state[k] for k in ("calls", "last_step")}
    counts["seen_step"] = state.get("seen_step", state["last_step"])  # an earlier curvlab's
    for key, value in counts.items():
        if not (value is None and key != "calls") and not is_int(value):
            raise ValueError(
                f"not a Diagnostics state_dict: its {key!r} is {value!r}, not a step count "
                "(save diag.state_dict())"
            )
    kept = {k: state.get(k) for k in ("num_records", "num_events")}  # None: by step
    for key, value in kept.items():
        if value is not None and not (is_int(value) and int(value) >= 0):
            raise ValueError(
                f"not a Diagnostics state_dict: its {key!r} is {value!r}, not a count "
                "(save diag.state_dict())"
            )
    position = state.get("log_position", NO_POSITION)
    if position is not NO_POSITION and not is_position(position):
        raise ValueError(
            f"not a Diagnostics state_dict: its 'log_position' is {position!r}, not None or "
            "{'jsonl': bytes, 'csv': rows or None} (save diag.state_dict())"
        )
    log_dir = state.get("log_dir", UNNAMED_LOG_DIR)  # absent: a state of curvlab before s22
    if not (log_dir is UNNAMED_LOG_DIR or log_dir is None or isinstance(log_dir, str)):
        raise ValueError(
            f"not a Diagnostics state_dict: its 'log_dir' is {log_dir!r}, not the folder of "
            "its log (a str) or None (save diag.state_dict())"
        )
    tail = state.get("log_tail")
    if not (tail is None or isinstance(tail, str)):
        raise ValueError(
            f"not a Diagnostics state_dict: its 'log_tail' is {tail!r}, not the fingerprint "
            "of its log (a str) or None (save diag.state_dict())"
        )
    if not isinstance(state["warm"], Mapping):
        raise ValueError(
            f"not a Diagnostics state_dict: its 'warm' is a {type(state['warm']).__name__}, "
            "not a dict of warm starts (save diag.state_dict())"
        )
    calls = int(counts["calls"])
    generator = _generator_state(device, state["generator"], seed, calls)
    warm = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in state["warm"].items()}

    def step(value: Any) -> int | None:
        return None if value is None else int(value)

    return LoadedState(
        generator=generator,
        calls=calls,
        last_step=step(counts["last_step"]),
        seen_step=step(counts["seen_step"]),
        exploded=bool(state["exploded"]),
        window=[float(v) for v in window],
        per_term=bool(state.get("fisher_window_per_term", False)),
        warm=warm,
        log_position=position,
        log_dir=log_dir,
        log_tail=tail,
        num_records=None if kept["num_records"] is None else int(kept["num_records"]),
        num_events=None if kept["num_events"] is None else int(kept["num_events"]),
        records_of=state.get("records_of"),
    )


def kept_entries(
    entries: list[dict[str, Any]], count: int | None, seen: int | None
) -> list[dict[str, Any]]:
    """The records (or events) a loaded state keeps: the first ``count`` (those there were when
    it was saved); without a count (a state of another Diagnostics, or an earlier curvlab's) those whose step is not after
    ``seen`` (``None``: those without a step), as its log is cut
    (:meth:`MetricsLog.drop_after`)."""
    if count is not None:
        return entries[: int(count)]
    return [e for e in entries if e.get("step") is None or (seen is not None and e["step"] <= seen)]


NO_POSITION = object()
"""A state without ``"log_position"`` (an earlier curvlab's): its log is cut by step."""


def is_position(position: Any) -> bool:
    """Whether ``position`` is a saved log position (:meth:`MetricsLog.position`) or ``None``."""
    if position is None:
        return True
    if not isinstance(position, Mapping) or set(position) != {"jsonl", "csv"}:
        return False
    jsonl, rows = position["jsonl"], position["csv"]
    if not (is_int(jsonl) and int(jsonl) >= 0):
        return False
    return rows is None or (is_int(rows) and int(rows) >= 0)
