"""Figures of a :class:`~curvlab.analysis.Report` (matplotlib, PNG files).

Each function takes the report's dict form and a file path, draws one figure and returns the path,
or ``None`` when the report holds nothing to draw for it. Figures are drawn on their own
``matplotlib.figure.Figure`` (never through ``pyplot``): the user's matplotlib backend and pyplot
figures are left as they were. Every panel has labelled axes (the quantities' symbols and titles
from :mod:`curvlab.analysis._glossary`); layers are named by module name and type; checkpoints that
are independent runs (``meta["checkpoints_are"]``) are drawn as separate series, never as one
connected line; a selection of checkpoints is stated in the title. Values are read as numbers
(floats, or the strings ``"inf"``/``"-inf"``/``"nan"`` of a loaded ``report.json``); non-finite
ones are left out of the figures, and a note under the figure says how many and which.

The figures against the training step (training histories, sharpness, critical batch size) are
drawn in :mod:`curvlab.analysis._plot_series` and re-exported here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from curvlab.analysis._glossary import as_number, describe, top_residual

__all__ = [
    "plot_spectrum",
    "plot_layers",
    "plot_trajectory",
    "plot_nqm",
    "plot_histories",
    "plot_sharpness",
    "plot_critical_batch",
    "layer_label",
    "select_checkpoints",
]

_TRAJECTORY = (
    "loss",
    "grad_norm",
    "trace_fisher",
    "trace_empirical_fisher",
    "trace_hessian",
    "top_eigenvalue",
    "noise_scale",
)
MAX_CHECKPOINTS = 8
"""Per-layer bars show at most this many checkpoints (evenly spaced, the last included)."""


def _symbol(name: str) -> str:
    """A quantity's axis label: its symbol and title (``Tr(H), trace of the Hessian``)."""
    if name == "top_eigenvalue":
        return "λ_max(H), largest Hessian eigenvalue"
    q = describe(name)
    return q.symbol if q.symbol == q.title else f"{q.symbol}, {q.title}"


def _short(name: str) -> str:
    return "λ_max(H)" if name == "top_eigenvalue" else describe(name).symbol


def layer_label(name: str, types: dict[str, str] | None) -> str:
    """A readable layer name: the module name with its type (``"0 · Conv2d"``, ``"fc1 · Linear"``)."""
    kind = (types or {}).get(name)
    shown = name or "(model)"
    return f"{shown} · {kind}" if kind else shown


def select_checkpoints(n: int, limit: int = MAX_CHECKPOINTS) -> list[int]:
    """Indices of at most ``limit`` of ``n`` checkpoints, evenly spaced, first and last included."""
    if n <= limit:
        return list(range(n))
    picks = {round(i * (n - 1) / (limit - 1)) for i in range(limit)}
    return sorted(picks)


_num = as_number
"""A report value as a float (possibly inf or NaN), ``None`` if it is no number (missing)."""


def _finite(v: Any) -> float | None:
    """A report value as a finite float, ``None`` otherwise."""
    x = _num(v)
    return x if x is not None and math.isfinite(x) else None


class _LeftOut:
    """The non-finite values a figure leaves out, and remarks on how values are drawn (a
    symmetric-log axis for values <= 0), for the note under it."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.remarks: list[str] = []

    def keep(self, value: Any, what: str) -> float | None:
        """``value`` as a finite float; a non-finite one is recorded (as ``what = value``)."""
        x = _num(value)
        if x is not None and not math.isfinite(x):
            self.items.append(f"{what} = {x}")
            return None
        return x

    def note(self, fig: Any) -> bool:
        """Write the note under ``fig``; whether there was one."""
        lines = []
        if self.items:
            shown = "; ".join(self.items[:3]) + (" …" if len(self.items) > 3 else "")
            n = len(self.items)
            lines.append(
                f"{n} non-finite value{'s' if n != 1 else ''} (inf/NaN) left out of this figure: "
                f"{shown}"
            )
        lines += self.remarks
        if not lines:
            return False
        fig.text(
            0.01,
            0.0,
            "\n".join(lines),
            fontsize=7,
            color="firebrick",
            ha="left",
            va="top",
            wrap=True,
        )
        return True


def _figure(width: float, height: float) -> Any:
    """A figure of its own: no pyplot, so no backend is switched and no pyplot state touched."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig: Any, path: Path, left: _LeftOut, tight_box: bool = False) -> Path:
    fig.tight_layout()
    noted = left.note(fig)
    fig.savefig(path, dpi=110, **({"bbox_inches": "tight"} if tight_box or noted else {}))
    return path


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend only where something carries a label (matplotlib warns otherwise)."""
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(**kwargs)


def _scalar(values: dict[str, Any], name: str) -> float | None:
    """A scalar of an entry (``top_eigenvalue``: the largest one), possibly non-finite; ``None``
    if it was not measured."""
    if name == "top_eigenvalue":
        ev = values.get("top_eigenvalues")
        return _num(ev[0]) if isinstance(ev, list) and ev else None
    return _num(values.get(name))


def plot_spectrum(report: dict[str, Any], path: Path) -> Path | None:
    """Hessian spectral densities (log scale) per checkpoint, largest eigenvalues marked.

    At most :data:`MAX_CHECKPOINTS` checkpoints (evenly spaced, the last included; the title says
    so when it selects).
    """
    measured = [
        e
        for e in report["entries"]
        if e.get("arrays", {}).get("spectral_density") or e["values"].get("top_eigenvalues")
    ]
    if not measured:
        return None
    entries = [measured[i] for i in select_checkpoints(len(measured))]
    left = _LeftOut()
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    floor = None
    for i, entry in enumerate(entries):
        density = entry.get("arrays", {}).get("spectral_density")
        if density:
            pts = []
            for g, d in zip(density["grid"], density["density"]):
                x = left.keep(g, f"spectrum grid of {entry['label']}")
                y = left.keep(d, f"density of {entry['label']} at {g}")
                if x is not None and y is not None:
                    pts.append((x, y))
            top = max((y for _, y in pts), default=0.0)
            if top > 0:
                floor = top * 1e-7 if floor is None else min(floor, top * 1e-7)
                ys = [max(y, top * 1e-7) for _, y in pts]
                ax.semilogy([x for x, _ in pts], ys, color=f"C{i}", lw=1.2, label=entry["label"])
        for j, ev in enumerate(entry["values"].get("top_eigenvalues") or []):
            x = left.keep(ev, f"eigenvalue {j + 1} of {entry['label']}")
            if x is not None:
                ax.axvline(x, color=f"C{i}", ls="--", lw=0.7)
    ax.set_xlabel("Hessian eigenvalue (dashed: top eigenvalues by Lanczos)")
    ax.set_ylabel("density (SLQ)")
    title = "Hessian spectrum"
    if len(entries) < len(measured):
        title += f" ({len(entries)} of {len(measured)} checkpoints, evenly spaced)"
    ax.set_title(title, fontsize=10)
    if floor is not None:
        ax.set_ylim(bottom=floor)
    _legend(ax, fontsize=8)
    return _save(fig, path, left)


def _per_layer_names(entries: list[dict[str, Any]]) -> list[str]:
    """The per-layer quantities to draw (their ``<name>_stderr`` companions are error bars)."""
    names: list[str] = []
    for e in entries:
        names += [
            n
            for n, v in e.get("per_layer", {}).items()
            if v and n not in names and not n.endswith("_stderr")
        ]
    return names


def plot_layers(report: dict[str, Any], path: Path) -> Path | None:
    """Per-layer horizontal bars of each per-layer quantity, one colour per checkpoint, with
    error bars of ± one standard error where the report holds one (``<name>_stderr``: the
    Hutchinson estimate of Tr(H)).

    At most :data:`MAX_CHECKPOINTS` checkpoints are drawn (evenly spaced, the last included); the
    title says so when it selects. A layer without a value at a checkpoint (the quantity failed
    there) has no bar, and a non-finite value is left out (and named under the figure). In a
    panel with error bars, a bar without a finite standard error (NaN, or none) has no error bar,
    and the note under the figure names it ("no standard error").
    """
    from matplotlib.patches import Patch

    all_entries = report["entries"]
    picks = select_checkpoints(len(all_entries))
    entries = [all_entries[i] for i in picks]
    names = _per_layer_names(entries)
    if not names:
        return None
    types = report.get("meta", {}).get("layer_types") or {}
    layers_by_name = {}
    for name in names:
        layers: list[str] = []
        for e in entries:
            layers += [k for k in e.get("per_layer", {}).get(name, {}) if k not in layers]
        layers_by_name[name] = layers
    n_layers = max(len(v) for v in layers_by_name.values())
    height = max(2.8, 0.32 * n_layers * max(1.0, len(entries) / 2) + 1.4)
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    left = _LeftOut()
    fig = _figure(5.2 * cols + 1.6, height * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    bar = 0.8 / len(entries)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        layers = layers_by_name[name]
        drawn: list[tuple[float, float, str]] = []  # (value, error, what) of each bar
        with_errors = any(e.get("per_layer", {}).get(f"{name}_stderr") for e in entries)
        unknown: list[str] = []  # the bars of a panel with error bars that have none
        for j, e in enumerate(entries):
            values = e.get("per_layer", {}).get(name, {})
            errors = e.get("per_layer", {}).get(f"{name}_stderr") or {}
            ys, xs, errs = [], [], []
            for i, layer in enumerate(layers):
                if layer not in values:
                    continue  # not measured there: no bar (never a bar of 0)
                what = f"{name} of {layer_label(layer, types)} at {e['label']}"
                v = left.keep(values[layer], what)
                if v is None:
                    continue
                ys.append(i + (j - (len(entries) - 1) / 2) * bar)
                xs.append(v)
                err = _finite(errors.get(layer))
                if with_errors and err is None:
                    # NaN draws no error bar; 0 drew one of zero width, an exact-looking
                    # value without a word (found in review)
                    unknown.append(f"{what} (standard error {errors.get(layer, 'missing')})")
                errs.append(math.nan if err is None else err)
                drawn.append((v, err or 0.0, what))
            if not xs:
                continue
            if with_errors:
                ax.barh(
                    ys,
                    xs,
                    height=bar,
                    color=f"C{j}",
                    xerr=errs,
                    error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "0.2"},
                )
            else:
                ax.barh(ys, xs, height=bar, color=f"C{j}")
        ax.set_yticks(range(len(layers)), [layer_label(k, types) for k in layers], fontsize=8)
        ax.invert_yaxis()  # the first layer on top
        ax.set_xlabel(
            _symbol(name) + (" (± one standard error)" if with_errors else ""), fontsize=9
        )
        ax.set_ylabel("layer (module name · type)", fontsize=9)
        _layer_axis(ax, drawn, left, _short(name))
        if unknown:
            shown = "; ".join(unknown[:3]) + (" …" if len(unknown) > 3 else "")
            bars = "1 bar has" if len(unknown) == 1 else f"{len(unknown)} bars have"
            left.remarks.append(
                f"{_short(name)} panel: {bars} no standard error (no error bar drawn): {shown}"
            )
    title = "per layer"
    if len(entries) < len(all_entries):
        title += (
            f" ({len(entries)} of {len(all_entries)} checkpoints, evenly spaced, the last included)"
        )
    fig.suptitle(title, fontsize=10)
    if len(entries) > 1:
        handles = [Patch(color=f"C{j}", label=e["label"]) for j, e in enumerate(entries)]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return _save(fig, path, left, tight_box=True)


def _layer_axis(ax: Any, drawn: list[tuple[float, float, str]], left: _LeftOut, panel: str) -> None:
    """A log x axis for positive bars spanning decades, when every error bar stays above 0;
    else, for such bars, a symmetric-log one (linear within the smallest value) and a remark
    naming the error bars that reach 0: a log axis chose from the values alone and cut those
    bars at its edge without a word (found in review). Other bars keep a linear axis."""
    from matplotlib.ticker import NullFormatter

    values = [v for v, _, _ in drawn]
    if not values or not all(v > 0 for v in values) or max(values) <= 50 * min(values):
        return  # a log axis only where positive values span decades
    low = [f"{what} = {v:.4g} ± {err:.2g}" for v, err, what in drawn if v - err <= 0]
    if not low:
        ax.set_xscale("log")
    else:
        ax.set_xscale("symlog", linthresh=min(values))
        shown = "; ".join(low[:3]) + (" …" if len(low) > 3 else "")
        bars = "1 error bar reaches" if len(low) == 1 else f"{len(low)} error bars reach"
        left.remarks.append(
            f"{panel} panel: symmetric-log axis (linear within ±{min(values):.3g}), as {bars} "
            f"0 or below: {shown}"
        )
    ax.xaxis.set_minor_formatter(NullFormatter())  # no crowded minor tick labels


def _raw_error(entry: dict[str, Any], name: str) -> tuple[Any, str | None]:
    """The ± of a value as stored (Tr(H)'s standard error, λ_max's Lanczos residual) and what it
    is; ``(None, None)`` for a quantity without one."""
    if name == "trace_hessian":
        return entry["values"].get("trace_hessian_stderr"), "standard error"
    if name == "top_eigenvalue":
        return top_residual(entry), "residual bound"
    return None, None


def _error(entry: dict[str, Any], name: str) -> tuple[float, str | None]:
    """The ± of a value: Tr(H)'s standard error, λ_max's Lanczos residual; ``(0.0, None)`` for
    a quantity without one. A missing or non-finite one gives ``(nan, what)`` (NaN draws no
    error bar), ``what`` saying what it was for the note under the figure: a zero-width bar
    read as an exact value (found in review)."""
    v, what = _raw_error(entry, name)
    if what is None:
        return 0.0, None
    err = _finite(v)
    if err is not None:
        return err, None
    return math.nan, f"{what} {'missing' if v is None else v}"


def _has_error(entry: dict[str, Any], name: str) -> bool:
    """Whether ``entry`` holds a ± of ``name`` at all (finite or not): a panel draws error bars,
    and names the points without a valid one, when some entry does (as :func:`plot_layers`)."""
    return _raw_error(entry, name)[0] is not None


def plot_trajectory(report: dict[str, Any], path: Path) -> Path | None:
    """Scalar quantities across the checkpoints (needs two or more).

    A trajectory is one connected line, broken where a value is not finite and at a checkpoint
    without a value between measured ones (the quantity failed there, or was not measured: a
    remark under the figure names it); independent runs are separate points. Error bars show
    ± one standard error (Tr(H)) or the Lanczos residual (λ_max); in a panel where some
    checkpoint has one, a point whose ± is missing or not finite has no error bar, and the note
    under the figure names it (as in :func:`plot_layers`).
    """
    entries = report["entries"]
    if len(entries) < 2:
        return None
    names = [n for n in _TRAJECTORY if any(_scalar(e["values"], n) is not None for e in entries)]
    if not names:
        return None
    independent = report.get("meta", {}).get("checkpoints_are") == "independent runs"
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    left = _LeftOut()
    fig = _figure(4.2 * cols, 3.3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    x = list(range(len(entries)))
    labels = [e["label"] for e in entries]
    for ax, name in zip(axes.flat, names):
        pts = []
        unknown: list[str] = []  # the points with a finite value but no valid ±
        for i, e in enumerate(entries):
            y = _scalar(e["values"], name)
            if y is None:
                continue  # not measured there
            kept = left.keep(y, f"{_short(name)} at {e['label']}")
            err, why = _error(e, name)
            if kept is not None and why is not None:
                unknown.append(f"{e['label']} ({why})")
            pts.append((i, math.nan if kept is None else kept, err))
        if unknown and any(_has_error(e, name) for e in entries):
            shown = "; ".join(unknown[:3]) + (" …" if len(unknown) > 3 else "")
            points = "1 point has" if len(unknown) == 1 else f"{len(unknown)} points have"
            left.remarks.append(
                f"{_short(name)} panel: {points} no valid ± (no error bar drawn): {shown}"
            )
        if not independent:
            pts = _break_at_gaps(pts, entries, name, left)
        if independent:
            for i, y, err in pts:
                if math.isfinite(y):
                    ax.errorbar([i], [y], yerr=[err], fmt="o", color=f"C{i}", capsize=3)
        elif any(math.isfinite(y) for _, y, _ in pts):  # NaN breaks the line
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[p[2] for p in pts],
                fmt="o-",
                capsize=3,
            )
        ax.set_title(_short(name), fontsize=10)
        ax.set_ylabel(_symbol(name), fontsize=8)
        ax.set_xlabel("run" if independent else "checkpoint (in order)", fontsize=8)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("independent runs" if independent else "along the trajectory", fontsize=10)
    return _save(fig, path, left)


def _break_at_gaps(
    pts: list[tuple[int, float, float]],
    entries: list[dict[str, Any]],
    name: str,
    left: _LeftOut,
) -> list[tuple[int, float, float]]:
    """``pts`` with a NaN point (which breaks the line) at each checkpoint between measured
    ones that has no value of ``name``, and a remark naming them: the line bridged a failed
    checkpoint without a word (found in review)."""
    have = {i for i, _, _ in pts}
    gaps = [i for i in range(pts[0][0], pts[-1][0]) if i not in have] if pts else []
    if not gaps:
        return pts
    key = "top_eigenvalues" if name == "top_eigenvalue" else name
    missing = [entries[i] for i in gaps]
    left.remarks.append(_no_value(missing, key, _short(name), "the line is broken there"))
    return sorted(pts + [(i, math.nan, 0.0) for i in gaps])


def _no_value(missing: list[dict[str, Any]], key: str, label: str, tail: str) -> str:
    """The remark naming the report entries ``missing`` that have no value of ``key`` (drawn as
    ``label``), each as failed (an error of ``key``, alone or among others) or not measured."""

    def failed(entry: dict[str, Any]) -> bool:
        errors = entry.get("errors") or {}
        return any(key in (part.strip() for part in k.split(",")) for k in errors)

    said = [f"{e['label']} ({'failed' if failed(e) else 'not measured'})" for e in missing]
    return f"{label}: no value at {', '.join(said[:3])}{' …' if len(said) > 3 else ''}; {tail}"


def plot_nqm(report: dict[str, Any], path: Path) -> Path | None:
    """NQM steps to target vs batch size from the measured spectrum, critical sizes marked.

    One colour per checkpoint with a prediction (each run's own, for independent runs), one line
    style per optimiser (SGD solid, preconditioned SGD dashed), the critical batch sizes as
    vertical lines in their curve's style. The batch size ``B`` counts loss terms (tokens for
    sequence models: divide by the tokens per sequence to read sequences), as the NQM's noise
    ``C = H`` is that of one loss term. Batch sizes that never reach the target and non-finite
    critical batch sizes are left out (the note under the figure names them).
    """
    predictions = [(e["label"], e["nqm"]) for e in report["entries"] if e.get("nqm")]
    if not predictions and report.get("nqm"):
        nqm = report["nqm"]
        predictions = [(nqm.get("checkpoint", report["entries"][-1]["label"]), nqm)]
    if not predictions:
        return None
    fig = _figure(7.0, 4.4)
    ax = fig.subplots()
    styles = ("-", "--", ":", "-.")
    drawn = False
    left = _LeftOut()
    unreached = 0
    for i, (ckpt, nqm) in enumerate(predictions):
        for j, (label, curve) in enumerate(nqm.get("curves", {}).items()):
            pts = []
            for b, s in zip(curve["batch_size"], curve["steps"]):
                bx, sy = _finite(b), _finite(s)
                if bx is not None and sy is not None:
                    pts.append((bx, sy))
                else:
                    unreached += 1
            if not pts:
                continue
            name = label if len(predictions) == 1 else f"{ckpt}: {label}"
            ax.loglog(*zip(*pts), marker="o", ms=3, ls=styles[j % 4], color=f"C{i}", label=name)
            drawn = True
            crit = left.keep(curve.get("critical_batch_size"), f"critical batch size of {name}")
            if crit is not None:
                ax.axvline(crit, color=f"C{i}", ls=styles[j % 4], lw=0.8)
    if not drawn:
        return None
    # the NQM's batch counts loss terms (one noise draw of C = H each), not examples
    ax.set_xlabel("batch size B in loss terms (tokens for sequence models)")
    ax.set_ylabel("steps to reach the target risk (NQM)")
    which = (
        f"from the spectrum of {predictions[0][0]}"
        if len(predictions) == 1
        else "one prediction per run"
    )
    ax.set_title(f"NQM with C = H, {which}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if unreached:
        left.items.append(f"{unreached} batch size(s) that never reach the target")
    return _save(fig, path, left, tight_box=True)


# the figures against the training step (histories, sharpness, critical batch size), in a module
# of their own; imported last, as they use the helpers above
from curvlab.analysis._plot_series import (  # noqa: E402  (isort: skip)
    plot_critical_batch,
    plot_histories,
    plot_sharpness,
)
