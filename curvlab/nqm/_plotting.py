"""Plots of NQM batch-size sweeps in the style of Zhang et al. (2019), Figs. 3a and 4.

Steps to target against batch size on log-log axes, one colour per preconditioning power, the
``solid`` optimizer drawn solid and the ``dashed`` one dashed, plus the information-theoretic
lower bound tr(H⁻¹C)/(2·target·B) (``NQM.lower_bound``; d/(2·target·B) for C = H) as a black
dashed line. Batch sizes that do not reach the target (steps ``inf``) and those that meet it at
step 0 (a target at or above the initial risk: no step to draw on a log axis, no learning rate
to tune) have no point; a figure with no point says why.

Example:
    >>> from curvlab.nqm import NQM, batch_size_sweep
    >>> sweep = batch_size_sweep(NQM.paper(d=100, bins=10), [1, 4], ("sgd",), target=0.1)
    >>> path = "/tmp/nqm_doc_example.png"
    >>> plot_sweep(sweep, path, solid="sgd", dashed=None, overwrite=True).name
    'nqm_doc_example.png'

An existing file is replaced only with ``overwrite=True`` (as ``Report.save``): otherwise a
``FileExistsError`` names it, before anything is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from curvlab.nqm._sweep import SweepResult
from curvlab.nqm._tuning import OptimalResult

__all__ = ["plot_sweep", "plot_optimal_lr"]

_LABEL = {"sgd": "SGD", "momentum": "momentum", "ema": "SGD + EMA"}


def plot_sweep(
    sweep: SweepResult,
    path: str | Path,
    solid: str = "momentum",
    dashed: str | None = "sgd",
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a log-log plot of optimal steps vs batch size (Fig. 3a with momentum, Fig. 4 with EMA).

    Args:
        sweep: a :class:`SweepResult` containing the ``solid`` (and ``dashed``) optimizers.
        path: PNG file to write (parent folders are created).
        solid: optimizer drawn with solid lines.
        dashed: optimizer drawn dashed (None for none).
        title: figure title.
        overwrite: replace an existing file at ``path``.

    Returns:
        The path written.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is False (before drawing).
        ValueError: if the sweep has no ``solid`` rows.
    """
    import matplotlib
    from matplotlib.figure import Figure

    powers = sorted({p for o, p in sweep.curves() if o == solid})
    if not powers:
        raise ValueError(f"the sweep has no {solid!r} rows; it has {sweep.curves()}")
    path = _writable(path, overwrite)
    fig = Figure(figsize=(6, 4.5))  # no pyplot: the user's backend and figures stay as they are
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"]
    drawn = False
    for n, p in enumerate(powers):
        color = cmap(n / max(1, len(powers) - 1))
        for opt, style in ((solid, "-"), (dashed, "--")):
            if opt is None or (opt, p) not in sweep.curves():
                continue
            rows = [r for r in sweep.select(opt, p) if _drawable(r.steps)]
            drawn = drawn or bool(rows)
            label = f"power {p:g}" if style == "-" else None
            ax.plot(
                [r.batch_size for r in rows],
                [r.steps for r in rows],
                style,
                color=color,
                marker="o",
                ms=3,
                label=label,
            )
    ax.plot(sweep.batch_sizes, sweep.lower_bound, "k--", lw=1, label="lower bound")
    if not drawn:
        opts = [solid] if dashed is None else [solid, dashed]
        what = " or ".join(_LABEL.get(o, o) for o in opts)
        _say_why(ax, sweep, [r for r in sweep.rows if r.optimizer in opts], what)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"steps to risk {sweep.target:g}")
    dash = f", dashed: {_LABEL.get(dashed, dashed)}" if dashed else ""
    ax.set_title(title or f"NQM — solid: {_LABEL.get(solid, solid)}{dash}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_optimal_lr(
    sweep: SweepResult, path: str | Path, optimizer: str = "sgd", overwrite: bool = False
) -> Path:
    """Optimal (effective) learning rate vs batch size per power (Fig. 14 of the paper).

    Batch sizes that do not reach the target, and those that meet it at step 0 (a target at
    or above the initial risk: ``lr`` is ``nan``, every learning rate meets it), have no optimal
    learning rate and no point; when no batch size has one, the figure says why. An existing
    ``path`` is replaced only with ``overwrite=True`` (else ``FileExistsError``, before
    drawing); parent folders are created. Returns the path.
    """
    from matplotlib.figure import Figure

    path = _writable(path, overwrite)
    fig = Figure(figsize=(6, 4.5))  # no pyplot: the user's backend and figures stay as they are
    ax = fig.subplots()
    drawn = False
    for o, p in sweep.curves():
        if o != optimizer:
            continue
        rows = [r for r in sweep.select(o, p) if _drawable(r.steps)]
        if not rows:
            continue
        ax.plot(
            [r.batch_size for r in rows],
            [r.effective_lr for r in rows],
            "-o",
            ms=3,
            label=f"power {p:g}",
        )
        drawn = True
    ax.set_xlabel("batch size")
    ax.set_ylabel("optimal effective learning rate α/(1−β)")
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        rows = [r for r in sweep.rows if r.optimizer == optimizer]
        _say_why(ax, sweep, rows, _LABEL.get(optimizer, optimizer))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _drawable(steps: float) -> bool:
    """Whether a row has a point: the target reached (finite steps) after at least one step
    (steps 0, the target met at the start, has no learning rate and no place on a log axis)."""
    return math.isfinite(steps) and steps > 0


def _say_why(ax: Any, sweep: SweepResult, rows: list[OptimalResult], what: str) -> None:
    """Write on ``ax`` why no batch size of ``rows`` has a point."""
    if rows and all(r.steps == 0 for r in rows):
        text = (
            f"risk {sweep.target:g} is met at step 0 by {what}\n(it is at or above the initial "
            "risk):\nno steps to draw, no learning rate to tune"
        )
    else:
        text = f"no batch size reached risk {sweep.target:g}\nwith {what}"
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9)


def _writable(path: str | Path, overwrite: bool) -> Path:
    """``path`` as a Path, its folder created; a FileExistsError if it exists and not
    ``overwrite`` (as ``Report.save``: nothing a user saved is replaced unasked)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
