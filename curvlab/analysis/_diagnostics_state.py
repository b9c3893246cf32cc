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

from curvlab._compiled import eager_name
from curvlab._generator_state import generator_state as _generator_state
from curvlab._numbers import is_int
from curvlab.analysis._metrics_log import UNNAMED_LOG_DIR

__all__ = [
    "NO_POSITION",
    "LoadedState",
    "checked_state",
    "is_position",
    "kept_entries",
    "settings_differences",
]


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


def checked_state(
    state: Any, seed: int, device: torch.device, settings: Mapping[str, Any] | None = None
) -> LoadedState:
    """``state`` checked and converted for a ``Diagnostics`` seeded ``seed`` on ``device``.

    Args:
        state: what ``Diagnostics.state_dict()`` returned.
        seed: the ``Diagnostics``' seed (a generator state of ``None`` is seeded from it).
        device: the model's device (where the warm starts go).
        settings: the loading ``Diagnostics``' own ``state_dict()["settings"]``; a state whose
            ``"settings"`` differ is refused (``None``, or a state without them: not compared).

    Raises:
        ValueError: if ``state`` is not a Diagnostics state dict, is one of another model, loss,
            seed or set of quantities (naming each field that differs), or its generator state
            is one of another device type.
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
    if settings is not None and state.get("settings") is not None:
        differences = settings_differences(state["settings"], settings)
        if differences:
            raise ValueError(
                "the Diagnostics state is of other measurements than this Diagnostics': "
                + "; ".join(differences)
                + ". Load a state saved by a Diagnostics of this model with the same loss, "
                "seed and quantities (or start this one afresh, without the state)"
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


def _few(items: list[str], shown: int = 5) -> str:
    """``items`` as a list, the first ``shown`` only, with how many more there are."""
    more = len(items) - shown
    return str(items[:shown])[:-1] + (f", ... {more} more]" if more > 0 else "]")


def settings_differences(saved: Any, own: Mapping[str, Any]) -> list[str]:
    """How a state's ``"settings"`` (``saved``) differ from a ``Diagnostics``' ``own``, one
    sentence per differing field (empty: none). A field the state lacks is not compared; the
    quantities are compared as a set, a lazy parameter's shape (``None``) matches any.

    Raises:
        ValueError: if ``saved`` is not settings as ``Diagnostics.state_dict()`` writes them.
    """
    if not isinstance(saved, Mapping):
        raise ValueError(
            f"not a Diagnostics state_dict: its 'settings' is {saved!r}, not a dict "
            "(save diag.state_dict())"
        )
    out: list[str] = []
    params = saved.get("parameters")
    if params is not None:
        if not isinstance(params, Mapping) or not all(
            isinstance(k, str)
            and (v is None or (isinstance(v, (list, tuple)) and all(is_int(n) for n in v)))
            for k, v in params.items()
        ):
            raise ValueError(
                "not a Diagnostics state_dict: its settings' 'parameters' are not parameter "
                "names and shapes (save diag.state_dict())"
            )
        # a torch.compile wrapper (``_orig_mod``) changes no parameter: names compared without it
        params = {eager_name(k): v for k, v in params.items()}
        mine = {eager_name(k): v for k, v in own["parameters"].items()}
        absent = [k for k in mine if k not in params]
        extra = [k for k in params if k not in mine]
        shapes = [
            f"{k!r} {tuple(params[k])} there, {tuple(mine[k])} here"
            for k in mine
            if k in params
            and params[k] is not None
            and mine[k] is not None
            and [int(n) for n in params[k]] != list(mine[k])
        ]
        if absent or extra or shapes:
            parts = []
            if absent:
                parts.append(f"this model's parameters {_few(absent)} are not in it")
            if extra:
                parts.append(f"its parameters {_few(extra)} are not this model's")
            if shapes:
                parts.append("shapes differ: " + ", ".join(shapes[:5]))
            out.append("it is of another model (" + "; ".join(parts) + ")")
    loss = saved.get("loss")
    if loss is not None:
        if not isinstance(loss, Mapping):
            raise ValueError(
                f"not a Diagnostics state_dict: its settings' 'loss' is {loss!r}, not a dict "
                "(save diag.state_dict())"
            )
        mine = own["loss"]
        wrong = [k for k in ("kind", "reduction") if k in loss and loss[k] != mine[k]]
        if wrong:
            there = ", ".join(f"{k} {loss[k]!r}" for k in ("kind", "reduction") if k in loss)
            here = ", ".join(f"{k} {mine[k]!r}" for k in ("kind", "reduction") if k in loss)
            out.append(f"its loss is of {there}, this one's of {here}")
    seed = saved.get("seed")
    if seed is not None and (not is_int(seed) or int(seed) != own["seed"]):
        out.append(
            f"its seed is {seed!r}, this one's {own['seed']} (make the Diagnostics with "
            f"seed={seed!r} to continue its label and probe draws)"
        )
    names = saved.get("quantities")
    if names is not None:
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"not a Diagnostics state_dict: its settings' 'quantities' are {names!r}, not "
                "quantity names (save diag.state_dict())"
            )
        if set(names) != set(own["quantities"]):
            out.append(
                f"its quantities are {sorted(names)}, this one's {sorted(own['quantities'])}"
            )
    return out
