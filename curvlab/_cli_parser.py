"""The command line of ``curvlab``: its argument parser (the runners live in :mod:`curvlab.cli`)."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "build_parser",
    "LOSSES",
    "positive_int",
    "non_negative_int",
    "seed_int",
    "check_out_folder",
]

LOSSES = ("cross_entropy", "mse", "bce")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (and exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _int_at_least(text: str, low: int, what: str) -> int:
    """``text`` as a whole number ``>= low``, else argparse's error saying it must be ``what``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(
            f"must be {what}{' (>= 1)' if low == 1 else ''}, got {text!r}"
        )
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse names the option in its error)."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0 (argparse names the option in its error)."""
    return _int_at_least(text, 0, "an integer >= 0")


def seed_int(text: str) -> int:
    """An argparse type: a whole number that ``torch.Generator.manual_seed`` takes
    (:data:`curvlab._rng.SEED_RANGE`); argparse names the option in its error. A seed of
    ``2**64`` was taken and failed with torch's "Overflow when unpacking long long" after the
    model was built and the data read (found in review)."""
    from curvlab._rng import SEED_RANGE

    low, high = SEED_RANGE
    value = _int_at_least(text, low, f"an integer in [{low}, {high}]")
    if value > high:
        raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text!r}")
    return value


def check_out_folder(out: str | os.PathLike[str], option: str = "--out") -> None:
    """Refuse an output folder that cannot be written, before any work is done.

    An existing ``out`` must be a folder; a missing one needs its nearest existing parent to be a
    folder. Either must take a new entry: a folder is created there and removed again at once, so
    nothing is left behind.

    Raises:
        ValueError: naming ``option``, the path and why.
    """
    path = Path(out)
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"{option} '{path}' exists and is not a folder; name a folder (new or existing)"
            )
        where = path
    else:
        where = next(p for p in path.absolute().parents if p.exists())
        if not where.is_dir():
            raise ValueError(
                f"{option} '{path}' cannot be created: '{where}' is a file, not a folder"
            )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".curvlab-write-test-", dir=where))
    except OSError as exc:
        raise ValueError(
            f"{option} '{path}' cannot be written: creating an entry in '{where}' failed "
            f"({exc.strerror or exc}); choose a folder you can write to"
        ) from None


def build_parser(
    run_demo: Callable[[argparse.Namespace], int], run_analyze: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """The argument parser of the ``curvlab`` command; each subcommand's ``func`` is its runner."""
    parser = Parser(
        prog="curvlab",
        description=(
            "Curvature diagnostics for PyTorch: Fisher, Hessian, gradient noise, Fisher-noise "
            "training and the noisy quadratic model."
        ),
        epilog="Run 'curvlab <command> --help' for the options of each command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{demo,analyze,nqm}")

    _add_demo(sub, run_demo)
    _add_analyze(sub, run_analyze)

    try:
        from curvlab.nqm._cli import add_subparser
    except ImportError:  # pragma: no cover - the NQM ships with curvlab
        pass
    else:
        add_subparser(sub)
    return parser


def _add_demo(sub: Any, run: Callable[[argparse.Namespace], int]) -> None:
    demo = sub.add_parser(
        "demo",
        help="train a small CNN (SB, LB, LB + Fisher noise), diagnose, analyse, write a report",
        description=(
            "Train the MNIST-1D CNN on MNIST-1D (generated offline by the mnist1d package and "
            "cached, no downloads) with small batch, large "
            "batch and large batch + diagonal-Fisher noise (full-Fisher noise on request, see "
            "DemoConfig.runs), track "
            "Tr(F) with curvlab.Diagnostics, analyse the final models with curvlab.analyze "
            "(Tr(H), Tr(F), top eigenvalues, spectrum, NQM critical batch size) and write "
            "report.json, PNG figures and report.html. Under a minute on 2 CPU cores (one "
            "seed)."
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
        type=positive_int,  # argparse names --steps (DemoConfig.with_steps said "steps")
        default=None,
        help="about this many small-batch updates (sets the epochs)",
    )
    demo.add_argument(
        "--seed",
        type=seed_int,  # type=int took 2**64 and failed with torch's text inside training
        default=0,
        help="seed of initialisation, batches and noise, an integer in [-2**63, 2**64 - 2 - "
        "seeds] (the runs seed torch with seed + k + 1 and seed + k + 2 for k < seeds; "
        "default: 0)",
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
    demo.set_defaults(func=run)


def _add_analyze(sub: Any, run: Callable[[argparse.Namespace], int]) -> None:
    from curvlab.analysis._measures import ANALYZE_DEFAULT, QUANTITIES

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
        help="'package.module:name' or 'file.py:name': a factory returning an nn.Module, or the "
        "nn.Module itself (a file imports the modules beside it)",
    )
    ana.add_argument(  # both "--checkpoint a b" and "--checkpoint a --checkpoint b" (the docs'
        # usage line showed the first, which "append" refused as unrecognized arguments)
        "--checkpoint",
        action="extend",
        nargs="+",
        default=None,
        metavar="PATH",
        help="checkpoint file(s) (state_dict or {'state_dict': ...}, a torch.save file or, where "
        "torch.load reads it, a .safetensors file); several, given after one --checkpoint or each "
        "after its own, make a trajectory in the order given",
    )
    ana.add_argument(
        "--data",
        default=None,
        help="'package.module:name' or 'file.py:name': a factory returning (inputs, targets), a "
        "list of batches or a DataLoader, or that data itself (default: data() in the model's "
        "module)",
    )
    ana.add_argument(
        "--loss", choices=LOSSES, default="cross_entropy", help="loss (default: %(default)s)"
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
        help=f"comma-separated subset of {', '.join(q for q in QUANTITIES if q != 'noise_scale_dp')} "
        f"(default: {', '.join(ANALYZE_DEFAULT)})",
    )
    ana.add_argument("--out", required=True, help="output folder for the report")
    ana.add_argument("--overwrite", action="store_true", help="write into an existing --out folder")
    ana.add_argument(
        "--map-location", default=None, help="device for loading checkpoints (default: the model's)"
    )
    _add_measurement_options(ana)
    ana.set_defaults(func=run)


def _add_measurement_options(ana: argparse.ArgumentParser) -> None:
    """``curvlab analyze``'s options of the measurements themselves (seeds, probes, steps)."""
    ana.add_argument(
        "--seed",
        type=seed_int,  # a seed out of torch's range failed after the model was built
        default=0,
        help="seed of probes and sampled labels, an integer in [-2**63, 2**64 - 1] (default: 0)",
    )
    ana.add_argument(
        "--num-probes",
        type=positive_int,
        default=30,
        help="Hutchinson probes for Tr(H) and its standard error, at least 2 (default: 30)",
    )
    ana.add_argument(
        "--top-k",
        type=positive_int,
        default=None,
        help="number of largest Hessian eigenvalues (top_eigenvalues), at most the number of "
        "trainable parameters (default: 5)",
    )
    ana.add_argument(
        "--lanczos-steps",
        type=positive_int,
        default=60,
        help="Lanczos steps of the spectral density (default: 60)",
    )
    ana.add_argument(
        "--density-probes",
        type=positive_int,
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
