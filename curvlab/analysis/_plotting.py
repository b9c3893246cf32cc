"""Figures of a :class:`~curvlab.analysis.Report` (matplotlib, Agg backend, PNG files).

Each function takes the report's dict form and a file path, draws one figure and returns the path,
or ``None`` when the report holds nothing to draw for it. Every panel has labelled axes (the
quantities' symbols and titles from :mod:`curvlab.analysis._glossary`); layers are named by module
name and type; checkpoints that are independent runs (``meta["checkpoints_are"]``) are drawn as
separate series, never as one connected line; a selection of checkpoints is stated in the title.
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


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scalar(values: dict[str, Any], name: str) -> float | None:
    if name == "top_eigenvalue":
        ev = values.get("top_eigenvalues")
        return float(ev[0]) if ev else None
    v = values.get(name)
    return float(v) if isinstance(v, (int, float)) else None


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
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    floor = None
    for i, entry in enumerate(entries):
        density = entry.get("arrays", {}).get("spectral_density")
        if density:
            top = max(density["density"])
            floor = top * 1e-7 if floor is None else min(floor, top * 1e-7)
            d = [max(v, top * 1e-7) for v in density["density"]]
            ax.semilogy(density["grid"], d, color=f"C{i}", lw=1.2, label=entry["label"])
        for ev in entry["values"].get("top_eigenvalues") or []:
            ax.axvline(ev, color=f"C{i}", ls="--", lw=0.7)
    ax.set_xlabel("Hessian eigenvalue (dashed: top eigenvalues by Lanczos)")
    ax.set_ylabel("density (SLQ)")
    title = "Hessian spectrum"
    if len(entries) < len(measured):
        title += f" ({len(entries)} of {len(measured)} checkpoints, evenly spaced)"
    ax.set_title(title, fontsize=10)
    if floor is not None:
        ax.set_ylim(bottom=floor)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layers(report: dict[str, Any], path: Path) -> Path | None:
    """Per-layer horizontal bars of each per-layer quantity, one colour per checkpoint.

    At most :data:`MAX_CHECKPOINTS` checkpoints are drawn (evenly spaced, the last included); the
    title says so when it selects.
    """
    all_entries = report["entries"]
    picks = select_checkpoints(len(all_entries))
    entries = [all_entries[i] for i in picks]
    names: list[str] = []
    for e in entries:
        names += [n for n, v in e.get("per_layer", {}).items() if v and n not in names]
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
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    height = max(2.8, 0.32 * n_layers * max(1.0, len(entries) / 2) + 1.4)
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols + 1.6, height * rows), squeeze=False)
    bar = 0.8 / len(entries)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        layers = layers_by_name[name]
        positive, lo, hi = True, math.inf, 0.0
        for j, e in enumerate(entries):
            vals = [e.get("per_layer", {}).get(name, {}).get(k, 0.0) for k in layers]
            positive = positive and all(v > 0 for v in vals)
            lo, hi = min([lo, *vals]), max([hi, *vals])
            ys = [i + (j - (len(entries) - 1) / 2) * bar for i in range(len(layers))]
            ax.barh(ys, vals, height=bar, color=f"C{j}", label=e["label"])
        ax.set_yticks(range(len(layers)), [layer_label(k, types) for k in layers], fontsize=8)
        ax.invert_yaxis()  # the first layer on top
        ax.set_xlabel(_symbol(name), fontsize=9)
        ax.set_ylabel("layer (module name · type)", fontsize=9)
        if positive and hi > 50 * lo:  # a log axis only where the values span decades
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # no crowded minor tick labels
    handles, labels = axes[0][0].get_legend_handles_labels()
    title = "per layer"
    if len(entries) < len(all_entries):
        title += (
            f" ({len(entries)} of {len(all_entries)} checkpoints, evenly spaced, the last included)"
        )
    fig.suptitle(title, fontsize=10)
    if len(entries) > 1:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _error(entry: dict[str, Any], name: str) -> float:
    """The ± of a value: Tr(H)'s standard error, λ_max's Lanczos residual (0 if none)."""
    if name == "trace_hessian":
        v = entry["values"].get("trace_hessian_stderr")
    elif name == "top_eigenvalue":
        res = (entry.get("arrays", {}).get("top_eigenvalues") or {}).get("residuals") or [None]
        v = res[0]
    else:
        v = None
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else 0.0


def plot_trajectory(report: dict[str, Any], path: Path) -> Path | None:
    """Scalar quantities across the checkpoints (needs two or more).

    A trajectory is one connected line; independent runs are separate points. Error bars show
    ± one standard error (Tr(H)) or the Lanczos residual (λ_max).
    """
    entries = report["entries"]
    if len(entries) < 2:
        return None
    names = [n for n in _TRAJECTORY if any(_scalar(e["values"], n) is not None for e in entries)]
    if not names:
        return None
    independent = report.get("meta", {}).get("checkpoints_are") == "independent runs"
    plt = _pyplot()
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    x = list(range(len(entries)))
    labels = [e["label"] for e in entries]
    for ax, name in zip(axes.flat, names):
        ys = [_scalar(e["values"], name) for e in entries]
        errs = [_error(e, name) for e in entries]
        if independent:
            for i, (y, err) in enumerate(zip(ys, errs)):
                if y is not None:
                    ax.errorbar([i], [y], yerr=[err], fmt="o", color=f"C{i}", capsize=3)
        else:
            pts = [(i, y, err) for i, (y, err) in enumerate(zip(ys, errs)) if y is not None]
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_nqm(report: dict[str, Any], path: Path) -> Path | None:
    """NQM steps to target vs batch size from the measured spectrum, critical sizes marked.

    One colour per checkpoint with a prediction (each run's own, for independent runs), one line
    style per optimiser.
    """
    predictions = [(e["label"], e["nqm"]) for e in report["entries"] if e.get("nqm")]
    if not predictions and report.get("nqm"):
        nqm = report["nqm"]
        predictions = [(nqm.get("checkpoint", report["entries"][-1]["label"]), nqm)]
    if not predictions:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    styles = ("-", "--", ":", "-.")
    drawn = False
    for i, (ckpt, nqm) in enumerate(predictions):
        for j, (label, curve) in enumerate(nqm.get("curves", {}).items()):
            pts = [(b, s) for b, s in zip(curve["batch_size"], curve["steps"]) if math.isfinite(s)]
            if not pts:
                continue
            name = label if len(predictions) == 1 else f"{ckpt}: {label}"
            ax.loglog(*zip(*pts), marker="o", ms=3, ls=styles[j % 4], color=f"C{i}", label=name)
            drawn = True
            crit = curve.get("critical_batch_size")
            if crit is not None and math.isfinite(crit):
                ax.axvline(crit, color=f"C{i}", ls=styles[j % 4], lw=0.8)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("batch size B")
    ax.set_ylabel("steps to reach the target risk (NQM)")
    which = (
        f"from the spectrum of {predictions[0][0]}"
        if len(predictions) == 1
        else "one prediction per run"
    )
    ax.set_title(f"NQM with C = H, {which}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_histories(report: dict[str, Any], path: Path) -> Path | None:
    """Training histories (e.g. the demo's runs): one panel per series, one line per run."""
    histories = report.get("histories") or {}
    if not histories:
        return None
    series: list[str] = []
    for h in histories.values():
        for name in h["series"]:
            if name not in series:
                series.append(name)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.6), squeeze=False)
    for ax, name in zip(axes[0], series):
        for i, (run, h) in enumerate(histories.items()):
            s = h["series"].get(name)
            if not s:
                continue
            epochs = h.get("epochs")
            updates = h.get("updates")
            # runs of different batch sizes share the epoch axis
            x = [t * epochs / updates for t in s["step"]] if epochs and updates else s["step"]
            ax.plot(x, s["value"], color=f"C{i}", label=run, lw=0.8, alpha=0.85)
        ax.set_title(_short(name), fontsize=10)
        ax.set_ylabel(_symbol(name) + " (training batch)" if name == "loss" else _symbol(name))
        has_epochs = all(h.get("epochs") for h in histories.values())
        ax.set_xlabel("epoch (one point per update)" if has_epochs else "update")
        if all(
            v > 0 for h in histories.values() for v in h["series"].get(name, {}).get("value", [])
        ):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_SHARPNESS = (
    ("sharpness", "λ_max(H)", "2/η (SGD), (2+2β)/η (momentum)"),
    ("preconditioned_sharpness", "λ_max(P⁻¹H)", "(2+2β₁)/((1−β₁)η)"),
    ("critical_sharpness", "λ_c = 2/η_c", "2/η"),
)


def _sharpness_series(report: dict[str, Any], name: str) -> list[tuple[str, Any, Any]]:
    """``(run, (steps, values), (steps, thresholds) or None)`` of ``name``: each history's series,
    else the checkpoints (in order) when two or more measured it."""
    out = []
    for run, h in (report.get("histories") or {}).items():
        s = h.get("series", {}).get(name)
        if s and s.get("value"):
            t = h["series"].get(f"{name}_threshold")
            out.append((run, (s["step"], s["value"]), (t["step"], t["value"]) if t else None))
    if out:
        return out
    pts = [
        (i, e["values"][name], e["values"].get(f"{name}_threshold"))
        for i, e in enumerate(report["entries"])
        if isinstance(e["values"].get(name), (int, float))
    ]
    if len(pts) < 2:
        return []
    thr = [(i, t) for i, _, t in pts if isinstance(t, (int, float))]
    return [
        (
            "checkpoints",
            ([i for i, _, _ in pts], [v for _, v, _ in pts]),
            ([i for i, _ in thr], [t for _, t in thr]) if thr else None,
        )
    ]


def plot_sharpness(report: dict[str, Any], path: Path) -> Path | None:
    """Sharpness, preconditioned sharpness and critical sharpness against the step, each with
    its stability threshold (dashed): under gradient descent ``λ_max(H)`` rises to ``2/η`` and
    hovers there (Cohen et al., 2021), under Adam ``λ_max(P⁻¹H)`` to ``38/η`` (Cohen et al.,
    2022). One line per run (histories), or the checkpoints in order."""
    panels = [(n, sym, thr, _sharpness_series(report, n)) for n, sym, thr in _SHARPNESS]
    panels = [p for p in panels if p[3]]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for ax, (_name, symbol, rule, series) in zip(axes[0], panels):
        positive = True
        for i, (run, (steps, values), threshold) in enumerate(series):
            ax.plot(
                steps,
                values,
                color=f"C{i}",
                lw=1.0,
                marker="." if len(steps) < 60 else None,
                label=run,
            )
            positive = positive and all(v > 0 for v in values)
            if threshold is not None:
                ax.plot(*threshold, color=f"C{i}", ls="--", lw=0.9)
                positive = positive and all(v > 0 for v in threshold[1])
        if positive:
            ax.set_yscale("log")
        ax.set_title(f"{symbol} (dashed: threshold {rule})", fontsize=9)
        ax.set_ylabel(symbol)
        ax.set_xlabel("checkpoint (in order)" if series[0][0] == "checkpoints" else "step")
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nqm_critical(entry: dict[str, Any], report: dict[str, Any], last: bool) -> float | None:
    """The NQM's SGD critical batch size of an entry's spectrum (the report's for the last)."""
    nqm = entry.get("nqm") or (report.get("nqm") if last else None)
    for curve in ((nqm or {}).get("curves") or {}).values():
        crit = curve.get("critical_batch_size")
        return float(crit) if isinstance(crit, (int, float)) and math.isfinite(crit) else None
    return None


def plot_critical_batch(report: dict[str, Any], path: Path) -> Path | None:
    """The critical batch size three ways: McCandlish et al.'s ``B_simple = tr(Σ)/|G|²`` and
    ``B_noise = tr(HΣ)/(GᵀHG)`` (± one standard error), and the NQM prediction from the measured
    Hessian spectrum (SGD). Drawn when ``noise_scale_hessian`` was measured: against the step for
    the histories, per checkpoint for the report's entries."""
    histories = {
        run: h["series"]
        for run, h in (report.get("histories") or {}).items()
        if h.get("series", {}).get("noise_scale_hessian")
    }
    entries = report["entries"]
    measured = [e for e in entries if isinstance(e["values"].get("noise_scale_hessian"), float)]
    if not histories and not measured:
        return None
    plt = _pyplot()
    cols = int(bool(histories)) + int(bool(measured))
    fig, axes = plt.subplots(1, cols, figsize=(5.6 * cols, 3.9), squeeze=False)
    panels = list(axes[0])
    if histories:
        ax = panels.pop(0)
        for i, (run, series) in enumerate(histories.items()):
            bn = series["noise_scale_hessian"]
            se = series.get("noise_scale_hessian_stderr")
            ax.plot(bn["step"], bn["value"], color=f"C{i}", lw=1.0, label=f"B_noise {run}")
            if se and len(se["value"]) == len(bn["value"]):
                lo = [v - e for v, e in zip(bn["value"], se["value"])]
                hi = [v + e for v, e in zip(bn["value"], se["value"])]
                ax.fill_between(bn["step"], lo, hi, color=f"C{i}", alpha=0.2, lw=0)
            bs = series.get("noise_scale")
            if bs:
                ax.plot(
                    bs["step"], bs["value"], color=f"C{i}", ls="--", lw=1.0, label=f"B_simple {run}"
                )
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("batch size (examples)")
        ax.set_title("B_noise (solid, ± 1 s.e.) and B_simple (dashed)", fontsize=9)
        ax.legend(fontsize=7)
    if measured:
        ax = panels.pop(0)
        x = list(range(len(entries)))
        marks = (("B_simple", "o", "C0"), ("B_noise", "s", "C1"), ("NQM (SGD)", "^", "C2"))
        for label, marker, color in marks:
            xs, ys, errs = [], [], []
            for i, e in enumerate(entries):
                v = e["values"]
                if label == "B_simple":
                    y, err = v.get("noise_scale"), 0.0
                elif label == "B_noise":
                    y, err = v.get("noise_scale_hessian"), v.get("noise_scale_hessian_stderr", 0.0)
                else:
                    y, err = _nqm_critical(e, report, e is entries[-1]), 0.0
                if isinstance(y, (int, float)) and math.isfinite(y) and y > 0:
                    xs.append(i)
                    ys.append(y)
                    errs.append(err if isinstance(err, (int, float)) and math.isfinite(err) else 0)
            if xs:
                ax.errorbar(xs, ys, yerr=errs, fmt=marker, color=color, capsize=3, label=label)
        ax.set_yscale("log")
        ax.set_xticks(x, [e["label"] for e in entries], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("critical batch size (examples)")
        ax.set_title("critical batch size three ways", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
