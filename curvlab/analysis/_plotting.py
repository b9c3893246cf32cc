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
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from curvlab.analysis._glossary import describe

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
_NON_FINITE_TEXT = ("inf", "-inf", "nan")  # how report.json writes non-finite floats


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


def _num(v: Any) -> float | None:
    """A report value as a float (possibly inf or NaN), ``None`` if it is no number (missing)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in _NON_FINITE_TEXT:
        return float(v)
    return None


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
    there) has no bar, and a non-finite value is left out (and named under the figure).
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
        with_errors = False
        for j, e in enumerate(entries):
            values = e.get("per_layer", {}).get(name, {})
            errors = e.get("per_layer", {}).get(f"{name}_stderr", {})
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
                errs.append(_finite(errors.get(layer)) or 0.0)
                drawn.append((v, errs[-1], what))
            if not xs:
                continue
            if errors:
                with_errors = True
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


def _error(entry: dict[str, Any], name: str) -> float:
    """The ± of a value: Tr(H)'s standard error, λ_max's Lanczos residual (0 if none)."""
    if name == "trace_hessian":
        v = entry["values"].get("trace_hessian_stderr")
    elif name == "top_eigenvalue":
        res = (entry.get("arrays", {}).get("top_eigenvalues") or {}).get("residuals") or [None]
        v = res[0]
    else:
        v = None
    return _finite(v) or 0.0


def plot_trajectory(report: dict[str, Any], path: Path) -> Path | None:
    """Scalar quantities across the checkpoints (needs two or more).

    A trajectory is one connected line, broken where a value is not finite and at a checkpoint
    without a value between measured ones (the quantity failed there, or was not measured: a
    remark under the figure names it); independent runs are separate points. Error bars show
    ± one standard error (Tr(H)) or the Lanczos residual (λ_max).
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
        for i, e in enumerate(entries):
            y = _scalar(e["values"], name)
            if y is None:
                continue  # not measured there
            kept = left.keep(y, f"{_short(name)} at {e['label']}")
            pts.append((i, math.nan if kept is None else kept, _error(e, name)))
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

    def failed(entry: dict[str, Any]) -> bool:
        errors = entry.get("errors") or {}
        return any(key in (part.strip() for part in k.split(",")) for k in errors)

    said = [
        f"{entries[i]['label']} ({'failed' if failed(entries[i]) else 'not measured'})"
        for i in gaps
    ]
    left.remarks.append(
        f"{_short(name)}: no value at {', '.join(said[:3])}{' …' if len(said) > 3 else ''}; "
        "the line is broken there"
    )
    return sorted(pts + [(i, math.nan, 0.0) for i in gaps])


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


def _series_points(
    steps: list[Any],
    values: list[Any],
    left: _LeftOut,
    what: str,
    labels: list[str] | None = None,
) -> tuple[list[float], list[float]]:
    """The finite ``(step, value)`` points of a series; non-finite values are recorded (``at
    step {t}``, or ``at {label}`` with ``labels``, one per step: checkpoints drawn at their
    index are named by their label)."""
    xs, ys = [], []
    for k, (t, v) in enumerate(zip(steps, values)):
        x = _finite(t)
        y = left.keep(v, f"{what} at {labels[k]}" if labels else f"{what} at step {t}")
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def _epochs_per_update(history: dict[str, Any]) -> float | None:
    """A history's ``epochs / updates`` (both finite and > 0), ``None`` where it lacks one."""
    epochs, updates = _finite(history.get("epochs")), _finite(history.get("updates"))
    if epochs is None or updates is None or epochs <= 0 or updates <= 0:
        return None
    return epochs / updates


def plot_histories(report: dict[str, Any], path: Path) -> Path | None:
    """Training histories (e.g. the demo's runs): one panel per series, one line per run.

    The x axis is in epochs when every run gives its ``epochs`` and ``updates`` (runs of
    different batch sizes then share it), else in updates for every run, and a remark under the
    figure names the runs without them: one unit for all the lines of a figure.
    """
    histories = report.get("histories") or {}
    if not histories:
        return None
    scale = {run: _epochs_per_update(h) for run, h in histories.items()}
    in_epochs = all(f is not None for f in scale.values())
    left = _LeftOut()
    if not in_epochs and any(f is not None for f in scale.values()):
        # one unit for every run: a run drawn in epochs beside one in updates, on an axis
        # labelled with one of them, put points 50x apart side by side (found in review)
        lacking = [run for run, f in scale.items() if f is None]
        left.remarks.append(
            "x axis in updates for every run, as "
            + ", ".join(lacking[:3])
            + (" …" if len(lacking) > 3 else "")
            + " give"
            + ("s" if len(lacking) == 1 else "")
            + " no epochs and updates (both > 0) to convert to epochs"
        )
    series: list[str] = []
    for h in histories.values():
        for name in h["series"]:
            if name not in series:
                series.append(name)
    fig = _figure(4.2 * len(series), 3.6)
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, name in zip(axes[0], series):
        drawn: list[float] = []
        for i, (run, h) in enumerate(histories.items()):
            s = h["series"].get(name)
            if not s:
                continue
            steps, values = _series_points(s["step"], s["value"], left, f"{name} of {run}")
            f = scale[run]
            x = [t * f for t in steps] if in_epochs and f is not None else steps
            if values:
                ax.plot(x, values, color=f"C{i}", label=run, lw=0.8, alpha=0.85)
                drawn += values
        ax.set_title(_short(name), fontsize=10)
        ax.set_ylabel(_symbol(name) + " (training batch)" if name == "loss" else _symbol(name))
        ax.set_xlabel("epoch (one point per update)" if in_epochs else "update")
        if drawn and all(v > 0 for v in drawn):
            ax.set_yscale("log")
        _legend(ax, fontsize=7)
    return _save(fig, path, left)


_SHARPNESS = (
    ("sharpness", "λ_max(H)", "2/η (SGD), (2+2β)/η (momentum)"),
    ("preconditioned_sharpness", "λ_max(P⁻¹H)", "(2+2β₁)/((1−β₁)η)"),
    ("critical_sharpness", "λ_c = 2/η_c", "2/η"),
)


def _sharpness_series(report: dict[str, Any], name: str) -> list[tuple[str, Any, Any]]:
    """``(run, (steps, values), (steps, thresholds) or None)`` of ``name`` as stored (possibly
    non-finite): each history's series, else the checkpoints when two or more measured it: one
    series of them in order for a trajectory, one single-point series per run for independent
    runs (x: the checkpoint's index)."""
    out = []
    for run, h in (report.get("histories") or {}).items():
        s = h.get("series", {}).get(name)
        if s and s.get("value"):
            t = h["series"].get(f"{name}_threshold")
            out.append((run, (s["step"], s["value"]), (t["step"], t["value"]) if t else None))
    if out:
        return out
    pts = [
        (i, e["label"], e["values"][name], e["values"].get(f"{name}_threshold"))
        for i, e in enumerate(report["entries"])
        if _num(e["values"].get(name)) is not None
    ]
    if len(pts) < 2:
        return []
    if report.get("meta", {}).get("checkpoints_are") == "independent runs":
        return [
            (label, ([i], [v]), ([i], [t]) if _num(t) is not None else None)
            for i, label, v, t in pts
        ]
    thr = [(i, t) for i, _, _, t in pts if _num(t) is not None]
    return [
        (
            "checkpoints",
            ([i for i, _, _, _ in pts], [v for _, _, v, _ in pts]),
            ([i for i, _ in thr], [t for _, t in thr]) if thr else None,
        )
    ]


def plot_sharpness(report: dict[str, Any], path: Path) -> Path | None:
    """Sharpness, preconditioned sharpness and critical sharpness against the step, each with
    its stability threshold (dashed): under gradient descent ``λ_max(H)`` rises to ``2/η`` and
    hovers there (Cohen et al., 2021), under Adam ``λ_max(P⁻¹H)`` to ``38/η`` (Cohen et al.,
    2022). One line per run (histories), the checkpoints in order (a trajectory), or one
    labelled point per run (independent runs). Non-finite values (``critical_sharpness = inf``
    where the update is no descent direction) are left out and named under the figure."""
    panels = [(n, sym, thr, _sharpness_series(report, n)) for n, sym, thr in _SHARPNESS]
    panels = [p for p in panels if p[3]]
    if not panels:
        return None
    independent = report.get("meta", {}).get("checkpoints_are") == "independent runs"
    histories = report.get("histories") or {}
    left = _LeftOut()
    fig = _figure(4.8 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (name, symbol, rule, series) in zip(axes[0], panels):
        from_entries = not any(
            (h.get("series", {}).get(name) or {}).get("value") for h in histories.values()
        )
        runs = from_entries and independent  # one labelled point per run, never a line
        # from the entries the x values are checkpoint indices: the note names the checkpoint
        # by its label, never "at step 1" for the one labelled 2000 (found in review)
        names = [str(e["label"]) for e in report["entries"]] if from_entries else None
        drawn: list[float] = []
        for i, (run, (steps, values), threshold) in enumerate(series):
            xs, ys = _series_points(
                steps, values, left, f"{name} of {run}", names and [names[t] for t in steps]
            )
            if ys:
                if runs:
                    ax.plot(xs, ys, color=f"C{i}", ls="none", marker="o", label=run)
                else:
                    marker = "." if len(xs) < 60 else None
                    ax.plot(xs, ys, color=f"C{i}", lw=1.0, marker=marker, label=run)
                drawn += ys
            if threshold is not None:
                tx, ty = _series_points(
                    *threshold,
                    left,
                    f"{name}_threshold of {run}",
                    names and [names[t] for t in threshold[0]],
                )
                if ty:
                    style = {"ls": "none", "marker": "_", "ms": 14} if runs else {"ls": "--"}
                    ax.plot(tx, ty, color=f"C{i}", lw=0.9, **style)
                    drawn += ty
        if drawn and all(v > 0 for v in drawn):
            ax.set_yscale("log")
        if any(threshold is not None for _, _, threshold in series):
            marks = "bars" if runs else "dashed"
            ax.set_title(f"{symbol} ({marks}: threshold {rule})", fontsize=9)
        else:
            ax.set_title(symbol, fontsize=9)
        ax.set_ylabel(symbol)
        if from_entries:
            entries = report["entries"]
            ax.set_xticks(
                range(len(entries)),
                [e["label"] for e in entries],
                rotation=30,
                ha="right",
                fontsize=7,
            )
            ax.set_xlabel("run" if independent else "checkpoint (in order)")
        else:
            ax.set_xlabel("step")
        if len(series) > 1:
            _legend(ax, fontsize=7)
    return _save(fig, path, left)


def _nqm_curve(entry: dict[str, Any], report: dict[str, Any], last: bool) -> dict[str, Any]:
    """The NQM's first (SGD) curve of an entry's spectrum (the report's for the last), or {}."""
    nqm = entry.get("nqm") or (report.get("nqm") if last else None)
    return next(iter(((nqm or {}).get("curves") or {}).values()), {})


def _nqm_critical(
    entry: dict[str, Any], report: dict[str, Any], last: bool, left: _LeftOut, examples: bool
) -> float | None:
    """The NQM's SGD critical batch size of an entry's spectrum (the report's for the last), in
    examples when ``examples`` (else in loss terms); a non-finite one (``inf``: no batch size
    doubles ``B · steps``) is recorded in ``left``."""
    curve = _nqm_curve(entry, report, last)
    if not curve:
        return None
    key = "critical_batch_size_examples" if examples else "critical_batch_size"
    return left.keep(curve.get(key), f"NQM at {entry['label']}")


def _batch_axis(
    ax: Any, points: list[tuple[float, float, str]], left: _LeftOut, where: str
) -> None:
    """A log axis for the ``(value, error, name)`` points drawn when every bar stays above 0,
    else a symmetric-log one (linear within the smallest nonzero ``|value|`` of 0) with a line at
    0 and a remark under the figure naming the values at or below 0: ``B_noise = tr(HΣ)/(GᵀHG)``
    is negative where the Hessian is indefinite, and a log axis dropped such values without a
    word (found in review)."""
    if not points:
        return
    if all(y - err > 0 for y, err, _ in points):
        ax.set_yscale("log")
        return
    nonzero = [abs(y) for y, _, _ in points if y != 0]
    linthresh = min(nonzero) if nonzero else 1.0
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.axhline(0.0, color="0.5", lw=0.6)
    low = [f"{name} = {y:.4g}" for y, _, name in points if y <= 0]
    shown = "; ".join(low[:3]) + (" …" if len(low) > 3 else "")
    left.remarks.append(
        f"{where}: symmetric-log axis (linear within ±{linthresh:.3g}), as "
        + (
            f"{len(low)} value{'s' if len(low) != 1 else ''} at or below 0 "
            f"{'are' if len(low) != 1 else 'is'} drawn: {shown}"
            if low
            else "error bars reach 0 or below"
        )
        + (" (B_noise < 0: tr(HΣ) < 0, an indefinite Hessian)" if "B_noise" in shown else "")
    )


def plot_critical_batch(report: dict[str, Any], path: Path) -> Path | None:
    """The critical batch size three ways: McCandlish et al.'s ``B_simple = tr(Σ)/|G|²`` and
    ``B_noise = tr(HΣ)/(GᵀHG)`` (± one standard error), and the NQM prediction from the measured
    Hessian spectrum (SGD). Drawn when ``noise_scale_hessian`` was measured: against the step for
    the histories, per checkpoint for the report's entries. Every finite value is drawn, also
    ``B_noise <= 0`` (an indefinite Hessian) and ``B_simple = 0`` (on a symmetric-log axis);
    non-finite ones are named under the figure. ``B_simple`` and ``B_noise`` count examples, the
    NQM's batch size loss terms (tokens for sequence models): it is drawn in examples where the
    report knows the loss terms per example (``critical_batch_size_examples``), else labelled
    as loss terms."""
    histories = {
        run: h["series"]
        for run, h in (report.get("histories") or {}).items()
        if h.get("series", {}).get("noise_scale_hessian")
    }
    entries = report["entries"]
    measured = [e for e in entries if _num(e["values"].get("noise_scale_hessian")) is not None]
    if not histories and not measured:
        return None
    cols = int(bool(histories)) + int(bool(measured))
    left = _LeftOut()
    fig = _figure(5.6 * cols, 3.9)
    panels = list(fig.subplots(1, cols, squeeze=False)[0])
    if histories:
        ax = panels.pop(0)
        drawn: list[tuple[float, float, str]] = []
        for i, (run, series) in enumerate(histories.items()):
            bn = series["noise_scale_hessian"]
            se = series.get("noise_scale_hessian_stderr")
            errs = se["value"] if se and len(se["value"]) == len(bn["value"]) else None
            pts = []
            for k, (t, v) in enumerate(zip(bn["step"], bn["value"])):
                y = left.keep(v, f"B_noise of {run} at step {t}")
                x = _finite(t)
                if x is not None and y is not None:
                    pts.append((x, y, _finite(errs[k]) if errs else None, t))
            if pts:
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                ax.plot(xs, ys, color=f"C{i}", lw=1.0, label=f"B_noise {run}")
                drawn += [(p[1], p[2] or 0.0, f"B_noise of {run} at step {p[3]}") for p in pts]
                band = [p for p in pts if p[2] is not None]
                if errs and band:
                    ax.fill_between(
                        [p[0] for p in band],
                        [p[1] - p[2] for p in band],
                        [p[1] + p[2] for p in band],
                        color=f"C{i}",
                        alpha=0.2,
                        lw=0,
                    )
            bs = series.get("noise_scale")
            if bs:
                xs, ys = _series_points(bs["step"], bs["value"], left, f"B_simple of {run}")
                if ys:
                    ax.plot(xs, ys, color=f"C{i}", ls="--", lw=1.0, label=f"B_simple {run}")
                    drawn += [(y, 0.0, f"B_simple of {run} at step {t}") for t, y in zip(xs, ys)]
        _batch_axis(ax, drawn, left, "left panel" if measured else "this figure")
        ax.set_xlabel("step")
        ax.set_ylabel("batch size (examples)")
        ax.set_title("B_noise (solid, ± 1 s.e.) and B_simple (dashed)", fontsize=9)
        _legend(ax, fontsize=7)
    if measured:
        ax = panels.pop(0)
        x = list(range(len(entries)))
        # B_simple and B_noise count examples; the NQM's batch counts loss terms, given in
        # examples where the loss terms per example are known (review s10: tokens and sequences
        # side by side on one axis before)
        curves = [_nqm_curve(e, report, e is entries[-1]) for e in entries]
        in_examples = all("critical_batch_size_examples" in c for c in curves if c)
        nqm_label = "NQM (SGD)" if in_examples else "NQM (SGD), in loss terms"
        marks = (("B_simple", "o", "C0"), ("B_noise", "s", "C1"), (nqm_label, "^", "C2"))
        drawn = []
        for label, marker, color in marks:
            xs, ys, errs, whats = [], [], [], []
            for i, e in enumerate(entries):
                v = e["values"]
                if label == "B_simple":
                    y, err = left.keep(v.get("noise_scale"), f"B_simple at {e['label']}"), 0.0
                elif label == "B_noise":
                    y = left.keep(v.get("noise_scale_hessian"), f"B_noise at {e['label']}")
                    err = _finite(v.get("noise_scale_hessian_stderr")) or 0.0
                else:
                    y = _nqm_critical(e, report, e is entries[-1], left, in_examples)
                    err = 0.0
                if y is not None:
                    xs.append(i)
                    ys.append(y)
                    errs.append(err)
                    whats.append(f"{label.split(',')[0]} at {e['label']}")
            if xs:
                ax.errorbar(xs, ys, yerr=errs, fmt=marker, color=color, capsize=3, label=label)
                drawn += list(zip(ys, errs, whats))
        _batch_axis(ax, drawn, left, "per-checkpoint panel" if histories else "this figure")
        ax.set_xticks(x, [e["label"] for e in entries], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(
            "critical batch size (examples)"
            if in_examples
            else "critical batch size (examples; NQM: loss terms)"
        )
        ax.set_title("critical batch size three ways", fontsize=9)
        _legend(ax, fontsize=7)
    return _save(fig, path, left)
