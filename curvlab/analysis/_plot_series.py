"""The figures of a :class:`~curvlab.analysis.Report` against the training step: training
histories (``training.png``), sharpness and its stability thresholds (``sharpness.png``) and the
critical batch size three ways (``critical_batch_size.png``).

Drawn as the other figures (:mod:`curvlab.analysis._plotting`, whose conventions they follow and
which re-exports them): each function takes the report's dict form and a file path and returns
the path, or ``None`` when there is nothing to draw. Figures are made and written through
``_plotting._figure`` and ``_plotting._save``, looked up there at each call, so that one place
makes and saves every figure of a report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from curvlab.analysis import _plotting as _base
from curvlab.analysis._plotting import (
    _break_at_gaps,
    _finite,
    _LeftOut,
    _legend,
    _no_value,
    _num,
    _short,
    _symbol,
)

__all__ = ["plot_histories", "plot_sharpness", "plot_critical_batch"]


def _series_points(
    steps: list[Any],
    values: list[Any],
    left: _LeftOut,
    what: str,
    labels: list[str] | None = None,
    breaks: bool = False,
) -> tuple[list[float], list[float]]:
    """The finite ``(step, value)`` points of a series; non-finite values are recorded (``at
    step {t}``, or ``at {label}`` with ``labels``, one per step: checkpoints drawn at their
    index are named by their label). With ``breaks``, a step without a finite value (non-finite,
    or ``None``: no value there) between finite ones gives a NaN point, which breaks a line
    drawn through them."""
    xs, ys = [], []
    for k, (t, v) in enumerate(zip(steps, values)):
        x = _finite(t)
        y = left.keep(v, f"{what} at {labels[k]}" if labels else f"{what} at step {t}")
        if x is not None and (y is not None or breaks):
            xs.append(x)
            ys.append(math.nan if y is None else y)
    while ys and math.isnan(ys[-1]):  # a NaN at either end breaks nothing: left out
        xs.pop(), ys.pop()
    while ys and math.isnan(ys[0]):
        xs.pop(0), ys.pop(0)
    return xs, ys


def _isolated(values: list[float]) -> bool:
    """Whether a finite value of ``values`` has no finite neighbour (a line draws nothing of it)."""
    for k, v in enumerate(values):
        before = k > 0 and math.isfinite(values[k - 1])
        after = k + 1 < len(values) and math.isfinite(values[k + 1])
        if math.isfinite(v) and not before and not after:
            return True
    return False


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
    figure names the runs without them: one unit for all the lines of a figure. A line breaks
    at a non-finite value (named under the figure), never bridging it, and a series of fewer
    than 60 points, or with a point between two breaks, is drawn with markers (a single
    measurement is a visible point).
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
    fig = _base._figure(4.2 * len(series), 3.6)
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, name in zip(axes[0], series):
        drawn: list[float] = []
        every_update = True  # whether each drawn run has a point at every update
        for i, (run, h) in enumerate(histories.items()):
            s = h["series"].get(name)
            if not s:
                continue
            known = [x for x in map(_finite, s["step"]) if x is not None]
            every_update &= all(b - a == 1 for a, b in zip(known, known[1:]))
            # a line breaks where a value is not finite (a NaN point), never bridging it
            steps, values = _series_points(
                s["step"], s["value"], left, f"{name} of {run}", breaks=True
            )
            f = scale[run]
            x = [t * f for t in steps] if in_epochs and f is not None else steps
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                # markers on a short series: one measurement was an invisible line of one
                # point, listed in the legend (found in review), as a point between NaNs is
                marker = "." if len(x) < 60 or _isolated(values) else None
                ax.plot(x, values, color=f"C{i}", label=run, lw=0.8, alpha=0.85, marker=marker)
                drawn += finite
        ax.set_title(_short(name), fontsize=10)
        ax.set_ylabel(_symbol(name) + " (training batch)" if name == "loss" else _symbol(name))
        # Diagnostics' series are measured every k updates: "one point per update" was said
        # of them too (found in review s20)
        per = "update" if every_update else "measurement"
        ax.set_xlabel(f"epoch (one point per {per})" if in_epochs else "update")
        if drawn and all(v > 0 for v in drawn):
            ax.set_yscale("log")
        _legend(ax, fontsize=7)
    return _base._save(fig, path, left)


_SHARPNESS = (
    # the optimizer's own rule (Nesterov, decay, AdamW: docs/analysis.md; review s23)
    ("sharpness", "λ_max(H)", "of the optimizer, docs/analysis.md"),
    ("preconditioned_sharpness", "λ_max(P⁻¹H)", "of Adam(W), docs/analysis.md"),
    ("critical_sharpness", "λ_c = 2/η_c", "2/η"),
)


def _sharpness_series(
    report: dict[str, Any], name: str, left: _LeftOut
) -> list[tuple[str, Any, Any]]:
    """``(run, (steps, values), (steps, thresholds) or None)`` of ``name`` as stored (possibly
    non-finite): each history's series, else the checkpoints when two or more measured it: one
    series of them in order for a trajectory, one single-point series per run for independent
    runs (x: the checkpoint's index).

    A trajectory's series holds every checkpoint from the first measured to the last, ``None``
    at one without a value (the quantity failed there): the line breaks there, and a remark in
    ``left`` names it (:func:`~curvlab.analysis._plotting._break_at_gaps`); the line was drawn
    straight through it without a word (found in review). The threshold likewise."""
    out = []
    for run, h in (report.get("histories") or {}).items():
        s = h.get("series", {}).get(name)
        if s and s.get("value"):
            t = h["series"].get(f"{name}_threshold")
            # a threshold series of None only (no optimizer's rule known) is none: the title
            # said "(dashed: threshold ...)" over no dashed line (found in review s20)
            known = t and any(_finite(v) is not None for v in t.get("value") or [])
            out.append((run, (s["step"], s["value"]), (t["step"], t["value"]) if known else None))
    if out:
        return out
    entries = report["entries"]
    key = f"{name}_threshold"
    measured = [i for i, e in enumerate(entries) if _num(e["values"].get(name)) is not None]
    if len(measured) < 2:
        return []
    if report.get("meta", {}).get("checkpoints_are") == "independent runs":
        pts = [(i, entries[i]["values"][name], entries[i]["values"].get(key)) for i in measured]
        return [
            (entries[i]["label"], ([i], [v]), ([i], [t]) if _num(t) is not None else None)
            for i, v, t in pts
        ]
    span = [i for i, _, _ in _break_at_gaps([(i, 0.0, 0.0) for i in measured], entries, name, left)]
    values = [entries[i]["values"].get(name) for i in span]  # None at a gap
    thresholds = [entries[i]["values"].get(key) for i in span]
    have = [i for i, t in zip(span, thresholds) if _num(t) is not None]
    if not have:
        return [("checkpoints", (span, values), None)]
    # the threshold's own gaps, where the value is there (a failed value is named above)
    gaps = [
        entries[i]["label"]
        for i, v, t in zip(span, values, thresholds)
        if have[0] < i < have[-1] and _num(t) is None and _num(v) is not None
    ]
    if gaps:
        left.remarks.append(
            f"threshold of {_short(name)}: no value at {', '.join(gaps[:3])}"
            f"{' …' if len(gaps) > 3 else ''}; the dashed line is broken there"
        )
    return [("checkpoints", (span, values), (span, thresholds))]


def plot_sharpness(report: dict[str, Any], path: Path) -> Path | None:
    """Sharpness, preconditioned sharpness and critical sharpness against the step, each with
    its stability threshold (dashed): under gradient descent ``λ_max(H)`` rises to ``2/η`` and
    hovers there (Cohen et al., 2021), under Adam ``λ_max(P⁻¹H)`` to ``38/η`` (Cohen et al.,
    2022). One line per run (histories), the checkpoints in order (a trajectory), or one
    labelled point per run (independent runs). Non-finite values (``critical_sharpness = inf``
    where the update is no descent direction) are left out and named under the figure, and so
    is a checkpoint without a value between measured ones (the quantity failed there); a line
    breaks at both."""
    left = _LeftOut()
    panels = [(n, sym, thr, _sharpness_series(report, n, left)) for n, sym, thr in _SHARPNESS]
    panels = [p for p in panels if p[3]]
    if not panels:
        return None
    independent = report.get("meta", {}).get("checkpoints_are") == "independent runs"
    histories = report.get("histories") or {}
    fig = _base._figure(4.8 * len(panels), 3.8)
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
        dashed = False  # whether a threshold was drawn: the title names it only then
        for i, (run, (steps, values), threshold) in enumerate(series):
            # a line breaks where a value is missing or not finite (NaN points), never bridges
            xs, ys = _series_points(
                steps,
                values,
                left,
                f"{name} of {run}",
                names and [names[t] for t in steps],
                breaks=not runs,
            )
            finite = [y for y in ys if math.isfinite(y)]
            if finite:
                if runs:
                    ax.plot(xs, ys, color=f"C{i}", ls="none", marker="o", label=run)
                else:
                    marker = "." if len(xs) < 60 else None
                    ax.plot(xs, ys, color=f"C{i}", lw=1.0, marker=marker, label=run)
                drawn += finite
            if threshold is not None:
                tx, ty = _series_points(
                    *threshold,
                    left,
                    f"{name}_threshold of {run}",
                    names and [names[t] for t in threshold[0]],
                    breaks=not runs,
                )
                finite = [y for y in ty if math.isfinite(y)]
                if finite:
                    style = {"ls": "none", "marker": "_", "ms": 14} if runs else {"ls": "--"}
                    ax.plot(tx, ty, color=f"C{i}", lw=0.9, **style)
                    drawn += finite
                    dashed = True
        if drawn and all(v > 0 for v in drawn):
            ax.set_yscale("log")
        if dashed:
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
    return _base._save(fig, path, left)


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


_INDEFINITE = (
    " (B_noise = tr(HΣ)/(GᵀHG) < 0: tr(HΣ) and GᵀHG differ in sign, an indefinite Hessian)"
)

_NQM_SCALE = (
    "NQM: its absolute scale is arbitrary: every direction starts at the variance init_var = 1, "
    "which is not measured, and its critical batch size changes with it (roughly as 1/init_var); "
    "compare its ratios between checkpoints (at equal init_var), not its value with B_simple's "
    "or B_noise's"
)
"""The caveat on the NQM's critical batch size beside the measured ``B_simple`` and ``B_noise``
(docs/analysis.md): it was drawn among them without one (found in review s20: a linear model's
NQM gave 34.95 at every checkpoint while ``B_simple`` went from 5.3 to 9699)."""


def _negative_b_noise(trace_hc: Any, ghg: Any) -> str | None:
    """Which factor of ``B_noise = tr(HΣ)/(GᵀHG) < 0`` is negative, in words, from the stored
    ``trace_hessian_covariance`` and ``grad_hessian_grad``; ``None`` where they are not both
    finite with opposite signs. The note said "tr(HΣ) < 0" for every negative ``B_noise``, also
    where ``GᵀHG < 0 < tr(HΣ)`` (found in review s20)."""
    a, b = _finite(trace_hc), _finite(ghg)
    if a is None or b is None:
        return None
    if a < 0 < b:
        return f"tr(HΣ) < 0: tr(HΣ) = {a:.3g}, GᵀHG = {b:.3g}"
    if b < 0 < a:
        return f"GᵀHG < 0: tr(HΣ) = {a:.3g}, GᵀHG = {b:.3g}"
    return None


def _batch_axis(
    ax: Any,
    points: list[tuple[float, float, str]],
    left: _LeftOut,
    where: str,
    causes: dict[str, str] | None = None,
) -> None:
    """A log axis for the ``(value, error, name)`` points drawn when every bar stays above 0,
    else a symmetric-log one (linear within the smallest nonzero ``|value|`` of 0) with a line at
    0 and a remark under the figure naming the values at or below 0: ``B_noise = tr(HΣ)/(GᵀHG)``
    is negative where ``tr(HΣ)`` and ``GᵀHG`` differ in sign (an indefinite Hessian), and a log
    axis dropped such values without a word (found in review). ``causes`` maps a point's name
    to which of them is negative there (:func:`_negative_b_noise`), said beside its value."""
    if not points:
        return
    if all(y - err > 0 for y, err, _ in points):
        ax.set_yscale("log")
        return
    causes = causes or {}
    nonzero = [abs(y) for y, _, _ in points if y != 0]
    linthresh = min(nonzero) if nonzero else 1.0
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.axhline(0.0, color="0.5", lw=0.6)
    low = [
        f"{name} = {y:.4g}" + (f" ({causes[name]})" if name in causes else "")
        for y, _, name in points
        if y <= 0
    ]
    shown = "; ".join(low[:3]) + (" …" if len(low) > 3 else "")
    negative_b_noise = any(y < 0 and name.startswith("B_noise") for y, _, name in points)
    left.remarks.append(
        f"{where}: symmetric-log axis (linear within ±{linthresh:.3g}), as "
        + (
            f"{len(low)} value{'s' if len(low) != 1 else ''} at or below 0 "
            f"{'are' if len(low) != 1 else 'is'} drawn: {shown}"
            if low
            else "error bars reach 0 or below"
        )
        + (_INDEFINITE if negative_b_noise else "")
    )


def _by_step(series: dict[str, Any] | None) -> dict[float, Any] | None:
    """A history's series as ``{step: value}`` (finite steps), ``None`` where there is none:
    companions of ``B_noise`` (its standard error, ``tr(HΣ)``, ``GᵀHG``) are read at its steps,
    never by position (a series of another length was dropped whole before)."""
    if not series:
        return None
    out = {}
    for t, v in zip(series.get("step") or [], series.get("value") or []):
        x = _finite(t)
        if x is not None:
            out[x] = v
    return out


def _no_stderr(unknown: list[str], panel: str, tail: str) -> str:
    """The remark naming the ``B_noise`` points drawn without a valid standard error."""
    shown = "; ".join(unknown[:3]) + (" …" if len(unknown) > 3 else "")
    points = "1 point has" if len(unknown) == 1 else f"{len(unknown)} points have"
    return f"{panel}: {points} no valid standard error ({tail}): {shown}"


def _name_missing(entries: list[dict[str, Any]], key: str, label: str, left: _LeftOut) -> None:
    """A remark naming the checkpoints without a value of ``key`` (drawn as ``label``) where
    another checkpoint has one: the per-checkpoint panel left such a point out without a word
    (found in review). Non-finite values are named as such by ``left.keep``."""
    if not any(_num(e["values"].get(key)) is not None for e in entries):
        return  # not measured at all: nothing is missing
    missing = [e for e in entries if _num(e["values"].get(key)) is None]
    if missing:
        left.remarks.append(_no_value(missing, key, label, "no point drawn there"))


def _history_panel(ax: Any, runs: dict[str, dict[str, Any]], left: _LeftOut, where: str) -> None:
    """``B_noise`` (solid, its standard error a band) and ``B_simple`` (dashed) of each run
    against the step. A line breaks at a non-finite value, never bridging it (it was drawn
    straight through, found in review s20), and a short series or a point between breaks has
    markers; the band breaks at a point without a valid standard error, which the note names
    (it was drawn through it, as if the value were exact)."""
    drawn: list[tuple[float, float, str]] = []
    causes: dict[str, str] = {}
    unknown: list[str] = []  # the B_noise points without a valid standard error
    banded = False
    for i, (run, series) in enumerate(runs.items()):
        bn = series["noise_scale_hessian"]
        se = _by_step(series.get("noise_scale_hessian_stderr"))
        trace_hc = _by_step(series.get("trace_hessian_covariance")) or {}
        ghg = _by_step(series.get("grad_hessian_grad")) or {}
        pts: list[tuple[float, float, float]] = []  # (step, B_noise, s.e.); NaN breaks
        for t, v in zip(bn["step"], bn["value"]):
            what = f"B_noise of {run} at step {t}"
            y = left.keep(v, what)
            x = _finite(t)
            if x is None:
                continue
            if y is None:
                pts.append((x, math.nan, math.nan))  # a break, never a bridge
                continue
            err = _finite(se.get(x)) if se is not None else None
            if se is not None and err is None:
                # a band drawn through it read as a known error (found in review s20)
                unknown.append(f"{run} at step {t} (standard error {se.get(x, 'missing')})")
            pts.append((x, y, math.nan if err is None else err))
            drawn.append((y, 0.0 if err is None else err, what))
            if y < 0 and (cause := _negative_b_noise(trace_hc.get(x), ghg.get(x))):
                causes[what] = cause
        while pts and math.isnan(pts[-1][1]):  # a NaN at either end breaks nothing
            pts.pop()
        while pts and math.isnan(pts[0][1]):
            pts.pop(0)
        if pts:
            xs, ys, errs = ([p[k] for p in pts] for k in range(3))
            marker = "." if len(xs) < 60 or _isolated(ys) else None
            ax.plot(xs, ys, color=f"C{i}", lw=1.0, marker=marker, label=f"B_noise {run}")
            top = [y + e for y, e in zip(ys, errs)]  # NaN where the band breaks
            if any(math.isfinite(v) for v in top):
                banded = True
                ax.fill_between(
                    xs, [y - e for y, e in zip(ys, errs)], top, color=f"C{i}", alpha=0.2, lw=0
                )
                pad = [False] + [math.isfinite(v) for v in top] + [False]
                lone = [k for k in range(len(top)) if pad[k + 1] and not (pad[k] or pad[k + 2])]
                if lone:  # a band of one point has no area: a bar there
                    bar = {"fmt": "none", "color": f"C{i}", "capsize": 2, "lw": 0.8}
                    ax.errorbar(*([v[k] for k in lone] for v in (xs, ys, errs)), **bar)
        bs = series.get("noise_scale")
        if bs:
            xs, ys = _series_points(
                bs["step"], bs["value"], left, f"B_simple of {run}", breaks=True
            )
            if ys:
                marker = "." if len(xs) < 60 or _isolated(ys) else None
                ax.plot(
                    xs, ys, color=f"C{i}", ls="--", lw=1.0, marker=marker, label=f"B_simple {run}"
                )
                drawn += [
                    (y, 0.0, f"B_simple of {run} at step {t}")
                    for t, y in zip(xs, ys)
                    if math.isfinite(y)
                ]
    if unknown:
        left.remarks.append(_no_stderr(unknown, f"B_noise, {where}", "no band there"))
    _batch_axis(ax, drawn, left, where, causes)
    ax.set_xlabel("step")
    ax.set_ylabel("batch size (examples)")
    band = ", ± 1 s.e." if banded else ""
    ax.set_title(f"B_noise (solid{band}) and B_simple (dashed)", fontsize=9)
    _legend(ax, fontsize=7)


def plot_critical_batch(report: dict[str, Any], path: Path) -> Path | None:
    """The critical batch size three ways: McCandlish et al.'s ``B_simple = tr(Σ)/|G|²`` and
    ``B_noise = tr(HΣ)/(GᵀHG)`` (± one standard error), and the NQM prediction from the measured
    Hessian spectrum (SGD). Drawn when ``noise_scale_hessian`` was measured: against the step for
    the histories, per checkpoint for the report's entries. Every finite value is drawn, also
    ``B_noise <= 0`` (``tr(HΣ)`` and ``GᵀHG`` of opposite signs, the note says which is
    negative) and ``B_simple = 0`` (on a symmetric-log axis); non-finite ones are named under
    the figure, and a line breaks at them. ``B_simple`` and ``B_noise`` count examples, the
    NQM's batch loss terms (tokens for sequence models): it is drawn in examples where the report
    knows the loss terms per example, else labelled as loss terms. The NQM's absolute scale is
    arbitrary (``init_var = 1``, not measured), as the legend and the note say: compare its
    ratios only. A checkpoint without ``B_simple`` or ``B_noise`` where another has one has no
    point, a ``B_noise`` without a valid standard error where another has one no error bar (no
    band against the step); the note names both."""
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
    fig = _base._figure(5.6 * cols, 3.9)
    panels = list(fig.subplots(1, cols, squeeze=False)[0])
    if histories:
        _history_panel(panels.pop(0), histories, left, "left panel" if measured else "this figure")
    if measured:
        ax = panels.pop(0)
        x = list(range(len(entries)))
        # B_simple and B_noise count examples; the NQM's batch counts loss terms, given in
        # examples where the loss terms per example are known (review s10: tokens and sequences
        # side by side on one axis before)
        curves = [_nqm_curve(e, report, e is entries[-1]) for e in entries]
        in_examples = all("critical_batch_size_examples" in c for c in curves if c)
        nqm_label = "NQM (SGD)" if in_examples else "NQM (SGD), in loss terms"
        nqm_legend = ("NQM (SGD" if in_examples else "NQM (SGD, in loss terms") + (
            "; arbitrary scale, init_var = 1)"
        )
        marks = (("B_simple", "o", "C0"), ("B_noise", "s", "C1"), (nqm_label, "^", "C2"))
        drawn = []
        causes: dict[str, str] = {}
        for label, key in (("B_simple", "noise_scale"), ("B_noise", "noise_scale_hessian")):
            _name_missing(entries, key, label, left)
        # as in trajectory.png: where some checkpoint has a standard error of B_noise, a point
        # without a valid one has no error bar and is named (it had one of width 0, found in
        # review s20)
        with_errors = any(
            e["values"].get("noise_scale_hessian_stderr") is not None for e in entries
        )
        unknown: list[str] = []
        for label, marker, color in marks:
            xs, ys, errs, whats = [], [], [], []
            for i, e in enumerate(entries):
                v = e["values"]
                what = f"{label.split(',')[0]} at {e['label']}"
                if label == "B_simple":
                    y, err = left.keep(v.get("noise_scale"), f"B_simple at {e['label']}"), 0.0
                elif label == "B_noise":
                    y = left.keep(v.get("noise_scale_hessian"), f"B_noise at {e['label']}")
                    raw = v.get("noise_scale_hessian_stderr")
                    err = _finite(raw)
                    if y is not None and err is None and with_errors:
                        missing = "missing" if raw is None else raw
                        unknown.append(f"{e['label']} (standard error {missing})")
                    err = math.nan if err is None else err
                    cause = _negative_b_noise(
                        v.get("trace_hessian_covariance"), v.get("grad_hessian_grad")
                    )
                    if y is not None and y < 0 and cause:
                        causes[what] = cause
                else:
                    y = _nqm_critical(e, report, e is entries[-1], left, in_examples)
                    err = 0.0
                if y is not None:
                    xs.append(i)
                    ys.append(y)
                    errs.append(err)
                    whats.append(what)
            if xs:
                ax.errorbar(xs, ys, yerr=errs, fmt=marker, color=color, capsize=3, label=label)
                drawn += [
                    (y, 0.0 if math.isnan(err) else err, w) for y, err, w in zip(ys, errs, whats)
                ]
                if label == nqm_label:
                    left.remarks.append(_NQM_SCALE)
        if unknown:
            left.remarks.append(_no_stderr(unknown, "B_noise", "no error bar drawn"))
        where = "per-checkpoint panel" if histories else "this figure"
        _batch_axis(ax, drawn, left, where, causes)
        ax.set_xticks(x, [e["label"] for e in entries], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(
            "critical batch size (examples)"
            if in_examples
            else "critical batch size (examples; NQM: loss terms)"
        )
        ax.set_title("critical batch size three ways", fontsize=9)
        # the legend says the NQM's scale is arbitrary; its artist keeps its plain label
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            shown = [nqm_legend if lab == nqm_label else lab for lab in labels]
            ax.legend(handles, shown, fontsize=7)
    return _base._save(fig, path, left)
