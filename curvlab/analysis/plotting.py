"""Figures of a :class:`~curvlab.analysis.report.Report` (matplotlib, Agg backend, PNG files).

Each function takes the report's dict form and a file path, draws one figure and returns the path,
or ``None`` when the report holds nothing to draw for it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["plot_spectrum", "plot_layers", "plot_trajectory", "plot_nqm", "plot_histories"]

_TRAJECTORY = (
    ("loss", "loss"),
    ("grad_norm", "‖∇L‖"),
    ("trace_fisher", "Tr(F)"),
    ("trace_empirical_fisher", "Tr(empirical F)"),
    ("trace_hessian", "Tr(H)"),
    ("top_eigenvalue", "λ_max(H)"),
    ("noise_scale", "noise scale B_simple"),
)
_LABELS = dict(_TRAJECTORY)


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
    """Hessian spectral densities (log scale) of every checkpoint, largest eigenvalues marked."""
    entries = [
        e
        for e in report["entries"]
        if e.get("arrays", {}).get("spectral_density") or e["values"].get("top_eigenvalues")
    ]
    if not entries:
        return None
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
    ax.set_title("Hessian spectrum")
    if floor is not None:
        ax.set_ylim(bottom=floor)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layers(report: dict[str, Any], path: Path) -> Path | None:
    """Per-layer bars of each per-layer quantity (one panel each, one bar colour per checkpoint)."""
    entries = report["entries"][-6:]
    names: list[str] = []
    for e in entries:
        names += [n for n, v in e.get("per_layer", {}).items() if v and n not in names]
    if not names:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(3.8 * len(names), 3.8), squeeze=False)
    width = 0.8 / len(entries)
    for ax, name in zip(axes[0], names):
        layers: list[str] = []
        for e in entries:
            layers += [k for k in e.get("per_layer", {}).get(name, {}) if k not in layers]
        positive = True
        for j, e in enumerate(entries):
            vals = [e.get("per_layer", {}).get(name, {}).get(k, 0.0) for k in layers]
            positive = positive and all(v > 0 for v in vals)
            xs = [i + (j - (len(entries) - 1) / 2) * width for i in range(len(layers))]
            ax.bar(xs, vals, width=width, color=f"C{j}", label=e["label"])
        ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=8)
        ax.set_title(_LABELS.get(name, name), fontsize=10)
        if positive:
            ax.set_yscale("log")
    if len(entries) > 1:
        axes[0][0].legend(fontsize=7)
    fig.suptitle("per layer (module name)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trajectory(report: dict[str, Any], path: Path) -> Path | None:
    """Scalar quantities over the checkpoints of a trajectory (needs two or more)."""
    entries = report["entries"]
    if len(entries) < 2:
        return None
    names = [n for n, _ in _TRAJECTORY if any(_scalar(e["values"], n) is not None for e in entries)]
    if not names:
        return None
    plt = _pyplot()
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.0 * rows), squeeze=False)
    x = list(range(len(entries)))
    for ax, name in zip(axes.flat, names):
        ax.plot(x, [_scalar(e["values"], name) for e in entries], "o-")
        ax.set_title(_LABELS[name], fontsize=10)
        ax.set_xticks(x, [e["label"] for e in entries], rotation=45, ha="right", fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("over the checkpoints")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_nqm(report: dict[str, Any], path: Path) -> Path | None:
    """NQM steps to target vs batch size from the measured spectrum, critical sizes marked."""
    nqm = report.get("nqm")
    if not nqm or not nqm.get("curves"):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for i, (label, curve) in enumerate(nqm["curves"].items()):
        pts = [(b, s) for b, s in zip(curve["batch_size"], curve["steps"]) if math.isfinite(s)]
        if not pts:
            continue
        ax.loglog(*zip(*pts), "o-", color=f"C{i}", label=label)
        crit = curve.get("critical_batch_size")
        if crit is not None and math.isfinite(crit):
            ax.axvline(crit, color=f"C{i}", ls="--", lw=0.8)
    ax.set_xlabel("batch size")
    ax.set_ylabel("steps to target (NQM)")
    ax.set_title("NQM from the measured Hessian spectrum (C = H)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
        ax.set_title(_LABELS.get(name, name), fontsize=10)
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
