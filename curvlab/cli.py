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

from curvlab import _cli_parser as cli_parser
from curvlab._text import strip_ansi

__all__ = ["main", "build_parser", "load_object"]


class UsageError(ValueError):
    """A problem with the command line (reported as one line, exit code 2)."""


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

    from curvlab.demo._train import DemoConfig, run_demo

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
    # the runs' settings, the headline and the regime (the same text as the report's top)
    for key in ("demo_settings", "demo_headline", "demo_regime"):
        if key in report.meta:
            print(report.meta[key])
    print(f"\nwrote {Path(args.out) / 'report.html'} (open it in a browser)")
    return 0


def _run_analyze(args: argparse.Namespace) -> int:
    from torch import nn

    from curvlab.analysis._analyze import analyze
    from curvlab.analysis._checkpoint import check_map_location

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out '{out}' already exists; pass --overwrite or choose another folder")
    check_map_location(args.map_location, name="--map-location")  # before the model is built
    quantities = (
        None
        if args.quantities is None
        else [q.strip() for q in args.quantities.split(",") if q.strip()]
    )
    if quantities is not None and "noise_scale_dp" in quantities:
        raise UsageError(
            "noise_scale_dp needs torch.distributed (the ranks' gradients), which the curvlab "
            "command does not start; use noise_scale (one process) or measure noise_scale_dp "
            "with cl.analyze / cl.Diagnostics inside your torchrun job"
        )
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
    """The argument parser of the ``curvlab`` command (:mod:`curvlab._cli_parser`)."""
    return cli_parser.build_parser(_run_demo, _run_analyze)


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
    from curvlab.analysis._analyze import AnalysisError

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
