"""The ``curvlab`` command (also ``python -m curvlab``): ``demo``, ``analyze`` and ``nqm``.

Errors in the user's input are reported as one line on stderr (``curvlab: error: ...``) with exit
code 2; when ``analyze`` measured nothing because every quantity failed, each reason gets a line
(exit code 1). Warnings are one line each (``curvlab: warning: ...``), without Python source
lines. Messages carry no terminal escape sequences. Set ``CURVLAB_DEBUG=1`` to see the full
traceback instead.

Example:
    >>> main(["--version"]) == 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from curvlab.text import strip_ansi

__all__ = ["main", "build_parser", "load_object"]

_LOSSES = ("cross_entropy", "mse", "bce")


class UsageError(ValueError):
    """A problem with the command line (reported as one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (and exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def load_object(spec: str, what: str) -> Any:
    """The object named by ``"pkg.module:name"`` or ``"path/to/file.py:name"``.

    Raises:
        UsageError: naming what could not be found.
    """
    if ":" not in spec or spec.endswith(":") or spec.startswith(":"):
        raise UsageError(
            f"--{what} must look like 'package.module:factory' or 'file.py:factory', got {spec!r}"
        )
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"--{what}: file '{path}' does not exist")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        if mod_spec is None or mod_spec.loader is None:
            raise UsageError(f"--{what}: cannot import '{path}'")
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's code failed on import
            raise UsageError(
                f"--{what}: importing '{path}' failed: {type(exc).__name__}: {exc}"
            ) from None
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UsageError(f"--{what}: cannot import module '{module_name}' ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UsageError(f"--{what}: module '{module_name}' has no attribute '{attr}'") from None


def _call_factory(obj: Any, what: str) -> Any:
    if not callable(obj):
        return obj
    try:
        return obj()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed
        raise UsageError(
            f"--{what}: calling the factory failed: {type(exc).__name__}: {exc}"
        ) from None


def _loss(name: str, reduction: str) -> Any:
    from torch import nn

    return {
        "cross_entropy": nn.CrossEntropyLoss,
        "mse": nn.MSELoss,
        "bce": nn.BCEWithLogitsLoss,
    }[name](reduction=reduction)


# ---------------------------------------------------------------------- subcommands
def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from curvlab.demo.train import DemoConfig, run_demo

    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    cfg = replace(
        DemoConfig.quick() if args.quick else DemoConfig(), seed=args.seed, seeds=args.seeds
    )
    if args.steps is not None:
        cfg = cfg.with_steps(args.steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = run_demo(
            args.out, cfg, overwrite=args.overwrite, progress=False if args.no_progress else None
        )
    finally:
        torch.set_num_threads(threads)
    print(report.summary())
    for key in ("demo_settings", "demo_headline"):  # the runs' settings and the headline
        if key in report.meta:
            print(report.meta[key])
    print(f"\nwrote {Path(args.out) / 'report.html'} (open it in a browser)")
    return 0


def _run_analyze(args: argparse.Namespace) -> int:
    from torch import nn

    from curvlab.analysis.analyze import analyze

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out '{out}' already exists; pass --overwrite or choose another folder")
    model = _call_factory(load_object(args.model, "model"), "model")
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model must name an nn.Module or a factory returning one, got {type(model).__name__}"
        )
    if args.data is not None:
        data = _call_factory(load_object(args.data, "data"), "data")
    else:
        module_name = args.model.rpartition(":")[0]
        data = None
        for name in ("data", "make_data", "get_data"):
            try:
                data = _call_factory(load_object(f"{module_name}:{name}", "data"), "data")
                break
            except UsageError:
                continue
        if data is None:
            raise UsageError(
                "no data: pass --data pkg.module:factory (returning (inputs, targets) or a list "
                "of such batches), or define data() in the model's module"
            )
    quantities = (
        None
        if args.quantities is None
        else [q.strip() for q in args.quantities.split(",") if q.strip()]
    )
    checkpoints: Any = None
    if args.checkpoint:
        checkpoints = args.checkpoint if len(args.checkpoint) > 1 else args.checkpoint[0]
    report = analyze(
        model,
        _loss(args.loss, args.reduction),
        data,
        checkpoint=checkpoints,
        quantities=quantities,
        map_location=args.map_location,
        seed=args.seed,
        num_probes=args.num_probes,
        num_steps=args.lanczos_steps,
        nqm=not args.no_nqm,
        density_probes=args.density_probes,
        progress=False if args.no_progress else None,
    )
    report.save(out, overwrite=args.overwrite)
    print(report.summary())
    print(f"\nwrote {out / 'report.html'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvlab`` command."""
    from curvlab.analysis.measures import ANALYZE_DEFAULT, QUANTITIES

    parser = _Parser(
        prog="curvlab",
        description=(
            "Curvature diagnostics for PyTorch: Fisher, Hessian, gradient noise, Fisher-noise "
            "training and the noisy quadratic model."
        ),
        epilog="Run 'curvlab <command> --help' for the options of each command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{demo,analyze,nqm}")

    demo = sub.add_parser(
        "demo",
        help="train a small CNN (SB, LB, LB + Fisher noise), diagnose, analyse, write a report",
        description=(
            "Train the MNIST-1D CNN on MNIST-1D (generated offline by the mnist1d package and "
            "cached, no downloads) with small batch, large "
            "batch, large batch + diagonal-Fisher noise and large batch + full-Fisher noise, track "
            "Tr(F) with curvlab.Diagnostics, analyse the final models with curvlab.analyze "
            "(Tr(H), Tr(F), top eigenvalues, spectrum, NQM critical batch size) and write "
            "report.json, PNG figures and report.html. About 30 seconds on 2 CPU cores (32 s "
            "measured, one seed)."
        ),
    )
    demo.add_argument("--out", default="curvlab-demo", help="output folder (default: %(default)s)")
    demo.add_argument(
        "--overwrite", action="store_true", help="write into an existing --out folder"
    )
    demo.add_argument(
        "--quick", action="store_true", help="a shortened run (seconds) for a first look or tests"
    )
    demo.add_argument(
        "--steps",
        type=int,
        default=None,
        help="about this many small-batch updates (sets the epochs)",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of initialisation, batches and noise (default: 0)"
    )
    demo.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat every run with seeds seed, seed+1, ... and report the test accuracy's "
        "mean ± std (default: 1)",
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1; the demo's model is tiny, so one thread is as fast "
        "and immune to oversubscription)",
    )
    demo.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (by default they are shown when stderr is a terminal)",
    )
    demo.set_defaults(func=_run_demo)

    ana = sub.add_parser(
        "analyze",
        help="analyse your own model (and checkpoints): Tr(H), Tr(F), eigenvalues, spectrum, NQM",
        description=(
            "Load your model from a factory, optionally load checkpoints (read with "
            "weights_only=True; several --checkpoint options make a trajectory), measure the "
            "curvature quantities on your data and write report.json, figures and report.html."
        ),
    )
    ana.add_argument(
        "--model",
        required=True,
        help="'package.module:factory' or 'file.py:factory' returning an nn.Module",
    )
    ana.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        metavar="PATH",
        help="checkpoint file (state_dict or {'state_dict': ...}); repeat for a trajectory",
    )
    ana.add_argument(
        "--data",
        default=None,
        help="'package.module:factory' returning (inputs, targets) or a list of batches "
        "(default: data() in the model's module)",
    )
    ana.add_argument(
        "--loss", choices=_LOSSES, default="cross_entropy", help="loss (default: %(default)s)"
    )
    ana.add_argument(
        "--reduction",
        choices=("mean", "sum"),
        default="mean",
        help="loss reduction (default: %(default)s)",
    )
    ana.add_argument(
        "--quantities",
        default=None,
        help=f"comma-separated subset of {', '.join(QUANTITIES)} "
        f"(default: {', '.join(ANALYZE_DEFAULT)})",
    )
    ana.add_argument("--out", required=True, help="output folder for the report")
    ana.add_argument("--overwrite", action="store_true", help="write into an existing --out folder")
    ana.add_argument(
        "--map-location", default=None, help="device for loading checkpoints (default: the model's)"
    )
    ana.add_argument(
        "--seed", type=int, default=0, help="seed of probes and sampled labels (default: 0)"
    )
    ana.add_argument(
        "--num-probes", type=int, default=30, help="Hutchinson probes for Tr(H) (default: 30)"
    )
    ana.add_argument(
        "--lanczos-steps",
        type=int,
        default=60,
        help="Lanczos steps of the spectral density (default: 60)",
    )
    ana.add_argument(
        "--density-probes",
        type=int,
        default=4,
        help="SLQ probes of the spectral density; the NQM prediction reports its spread over "
        "them (default: 4)",
    )
    ana.add_argument(
        "--no-nqm", action="store_true", help="skip the NQM critical-batch-size prediction"
    )
    ana.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (by default one is shown when stderr is a terminal)",
    )
    ana.set_defaults(func=_run_analyze)

    try:
        from curvlab.nqm.cli import add_subparser
    except ImportError:  # pragma: no cover - the NQM ships with curvlab
        pass
    else:
        add_subparser(sub)
    return parser


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Print a warning as one line, ``curvlab: warning: ...``, without the Python source line."""
    text = " ".join(strip_ansi(str(message)).split())
    print(f"curvlab: warning: {text}", file=file if file is not None else sys.stderr, flush=True)


def _report_error(exc: Exception) -> int:
    """Print ``exc`` as ``curvlab: error: ...`` line(s) and return the exit code."""
    from curvlab.analysis.analyze import AnalysisError

    if isinstance(exc, AnalysisError):
        print(
            "curvlab: error: every requested quantity failed, nothing was written:", file=sys.stderr
        )
        for reason in exc.reasons:
            print(f"curvlab: error:   {' '.join(reason.split())}", file=sys.stderr)
        return 1
    text = strip_ansi(str(exc)).strip()
    message = text.splitlines()[0] if text else type(exc).__name__
    kind = (
        ""
        if isinstance(exc, (UsageError, ValueError, FileExistsError))
        else f"{type(exc).__name__}: "
    )
    print(f"curvlab: error: {kind}{message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvlab`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from curvlab import __version__

        print(f"curvlab {__version__}")
        return 0
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(func(args) or 0)
        except KeyboardInterrupt:
            print("curvlab: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - clear lines instead of a traceback
            if os.environ.get("CURVLAB_DEBUG"):
                raise
            return _report_error(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
