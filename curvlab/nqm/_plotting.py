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
``FileExistsError`` names it, before anything is drawn. A path without a suffix gets ``.png``
(the file written, and the path returned); a suffix matplotlib cannot write is refused with a
``ValueError`` before any folder is created, as is a path that exists and is not a regular file
(a folder), with or without ``overwrite``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from curvlab.nqm._sweep import SweepResult
from curvlab.nqm._tuning import OptimalResult
from curvlab.nqm._validate import _file_target

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
        path: image file to write, PNG unless its suffix names another format matplotlib
            writes (``.pdf``, ``.svg``, ...); without a suffix ``.png`` is appended. Missing
            parent folders are created (and removed again if writing fails).
        solid: optimizer drawn with solid lines.
        dashed: optimizer drawn dashed (None for none).
        title: figure title.
        overwrite: replace an existing file at ``path``.

    Returns:
        The path written (``path`` with ``.png`` appended when it had no suffix).

    Raises:
        FileExistsError: if the file exists and ``overwrite`` is False (before drawing).
        ValueError: if the sweep has no ``solid`` rows, matplotlib cannot write files of the
            path's suffix (before any folder is created), or the path exists and is not a
            regular file (a folder, say; with or without ``overwrite``, before drawing).
        ImportError: if matplotlib cannot be imported (naming the install command).
    """
    matplotlib = require_matplotlib()
    from matplotlib.figure import Figure

    powers = sorted({p for o, p in sweep.curves() if o == solid})
    if not powers:
        raise ValueError(f"the sweep has no {solid!r} rows; it has {sweep.curves()}")
    path, fmt = _writable(path, overwrite)
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
    _savefig(fig, path, fmt)
    return path


def plot_optimal_lr(
    sweep: SweepResult, path: str | Path, optimizer: str = "sgd", overwrite: bool = False
) -> Path:
    """Optimal (effective) learning rate vs batch size per power (Fig. 14 of the paper).

    Batch sizes that do not reach the target, and those that meet it at step 0 (a target at
    or above the initial risk: ``lr`` is ``nan``, every learning rate meets it), have no optimal
    learning rate and no point; when no batch size has one, the figure says why. ``path`` is
    read as in :func:`plot_sweep` (``.png`` appended without a suffix, an unwritable suffix or
    a path that exists and is not a regular file a ``ValueError``); an existing file is replaced only with ``overwrite=True`` (else
    ``FileExistsError``, before drawing); missing parent folders are created. Returns the path
    written.
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    path, fmt = _writable(path, overwrite)
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
    _savefig(fig, path, fmt)
    return path


def require_matplotlib(what: str = "the NQM plots") -> Any:
    """The ``matplotlib`` module, with what the plots need to write a PNG imported.

    Args:
        what: the figures that need it, for the message (the report's pass their own name).

    Raises:
        ImportError: naming the install command when matplotlib (a dependency of curvlab, so
            a broken installation) cannot be imported; the CLI calls this before its sweep.
    """
    try:
        import matplotlib
        import matplotlib.backends.backend_agg  # noqa: F401 - writes the PNG files
        import matplotlib.figure  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"{what} need matplotlib, which cannot be imported ({exc}); it is a "
            "dependency of curvlab, so the installation is incomplete: "
            "python -m pip install 'matplotlib>=3.7'",
            name="matplotlib",
        ) from exc
    return matplotlib


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


def _writable(path: str | Path, overwrite: bool) -> tuple[Path, str]:
    """The file ``path`` names and its image format, checked before anything is drawn.

    A path without a suffix gets ``.png`` (matplotlib appends it when saving: the existence
    check looked at ``fig`` while ``fig.png`` was replaced, found in review); a suffix matplotlib
    cannot write is refused here, before any folder is created.

    Raises:
        ValueError: if matplotlib cannot write files of the path's suffix, or the path exists
            and is not a regular file (a folder, say; with or without ``overwrite``).
        FileExistsError: if the file exists and not ``overwrite`` (as ``Report.save``: nothing a
            user saved is replaced unasked).
    """
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    fmt = os.path.splitext(path.name)[1][1:].lower()  # as matplotlib reads it ("fig." -> "")
    if not fmt:
        fmt = "png"
        path = path.with_name(path.name.rstrip(".") + ".png")
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(
            f"'{path}': matplotlib cannot write '.{fmt}' files; use one of "
            f"{', '.join('.' + k for k in sorted(supported))} (e.g. '.png')"
        )
    _file_target(path, "figure")  # (a folder failed after the drawing, raw IsADirectoryError)
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' already exists; pass overwrite=True to replace it")
    return path, fmt


def _savefig(fig: Any, path: Path, fmt: str) -> None:
    """Write ``fig`` to ``path``, creating its missing folders; if writing fails, the folders it
    created and a file it started are removed (no trace of a failed call).

    The figure is written into a staging folder beside ``path`` and renamed onto it once
    complete: saving in place left a cut-off image in place of an earlier file replaced with
    ``overwrite=True`` when interrupted (found in review s20); a failure now leaves it as it was.
    """
    created = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        target = Path(os.path.realpath(path))  # a link is written through, as before
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            part = staging / target.name
            fig.savefig(part, dpi=120, format=fmt)
            os.replace(part, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        for d in created:  # innermost first
            try:
                d.rmdir()
            except OSError:
                break
        raise
