"""The ``curvlab nqm`` subcommand: batch-size sweep on the NQM → CSV and Fig. 3a / Fig. 4 PNGs.

Registered by the top-level CLI through :func:`add_subparser`; :func:`run` does the work and
returns an exit code. User errors raise ``ValueError`` with a one-line message.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="curvlab")
    >>> add_subparser(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["nqm", "--out", "/tmp/nqm_cli_doc", "--batch-sizes", "1,4"])
    >>> args.func is run
    True
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from pathlib import Path

from curvlab._cli_parser import check_out_folder, non_negative_int, positive_int
from curvlab.analysis._report import _ASIDE, _missing_folders, _swap_in
from curvlab.nqm._critical import critical_batch_size
from curvlab.nqm._model import NQM
from curvlab.nqm._plotting import plot_optimal_lr, plot_sweep, require_matplotlib
from curvlab.nqm._sweep import SweepResult, batch_size_sweep, repeated

__all__ = ["add_subparser", "run"]

_FILES = ("nqm_sweep.csv", "nqm_fig3a.png", "nqm_fig4_ema.png", "nqm_optimal_lr.png")


def _floats(text: str, name: str) -> list[float]:
    """``--name``'s comma-separated numbers.

    Raises:
        ValueError: naming the option, for an empty entry (``"1,,2"``, ``"1,2,"``, ``""``: one
            was dropped without a word, found in review s20, where every other list option
            refuses it) or one that is no number.
    """
    parts = [x.strip() for x in text.split(",")]
    if not any(parts):
        raise ValueError(f"--{name} must not be empty")
    if not all(parts):
        raise ValueError(
            f"--{name} must be a comma-separated list of numbers with no empty entry, got {text!r}"
        )
    try:
        return [float(x) for x in parts]
    except ValueError:
        raise ValueError(
            f"--{name} must be a comma-separated list of numbers, got {text!r}"
        ) from None


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``nqm`` subcommand on ``subparsers``."""
    p = subparsers.add_parser(
        "nqm",
        help="noisy quadratic model: steps to target vs batch size (Zhang et al. 2019)",
        description=(
            "Sweep batch sizes on the noisy quadratic model (h_i = 1/i, C = H, theta_0 ~ N(0, I)), "
            "tuning the learning rate (and momentum / EMA decay) on fine grids for each batch "
            "size, optimizer and preconditioning power p (P = H^p). Writes nqm_sweep.csv, "
            "nqm_fig3a.png (SGD dashed, momentum solid, lower bound black), nqm_fig4_ema.png "
            "(SGD dashed, EMA solid) and nqm_optimal_lr.png to --out, and prints the critical "
            "batch size of each curve (where B x steps reaches 2x its minimum)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument(
        "--batch-sizes",
        default=",".join(str(2**k) for k in range(16)),
        help="comma-separated batch sizes",
    )
    p.add_argument(
        "--powers", default="0,0.25,0.5,0.75,1", help="preconditioning powers p in [0,1]"
    )
    p.add_argument("--target", type=float, default=0.01, help="target risk")
    p.add_argument("--dim", type=positive_int, default=10_000, help="dimension d of the NQM")
    p.add_argument(
        "--bins", type=non_negative_int, default=100, help="eigenvalue bins (0 = no binning)"
    )
    p.add_argument("--init-var", type=float, default=1.0, help="variance of theta_0")
    p.add_argument("--no-ema", action="store_true", help="skip the EMA sweep (Fig. 4)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=(
            "replace existing output files instead of failing; with --no-ema an earlier run's "
            "nqm_fig4_ema.png is deleted, so that the folder holds only this run's results. "
            "The files are replaced together once all are written: a run that fails or is "
            "interrupted leaves the earlier files as they were"
        ),
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the sweep described by ``args``; returns 0 on success. Raises ValueError on bad input
    (a list with an empty entry or one that is no number, a repeated batch size or power, then,
    once every value passed, an ``--out`` that cannot be written, an output name taken by a
    folder or anything but a file, with or without ``--overwrite``: all before the sweep),
    and when no configuration of the sweep reaches ``--target`` (before writing anything); an
    ImportError naming the install command, before the sweep, when matplotlib cannot be imported
    (the sweep ran and wrote its CSV, then failed on the first figure, found in review). The CSV
    and figures are written all together or not at all (:func:`_write_outputs`): a failure or an
    interrupt while writing leaves an earlier run's files in ``--out`` as they were."""
    # every value is parsed and checked first: a malformed one was reported only after the
    # clash with an existing --out (found in review s20), which --overwrite would not have fixed
    batch_sizes = _floats(args.batch_sizes, "batch-sizes")
    powers = _floats(args.powers, "powers")
    if any(not 0 <= p <= 1 for p in powers):
        raise ValueError(f"--powers must lie in [0, 1], got {args.powers!r}")
    for name, values, text in (
        ("batch-sizes", batch_sizes, args.batch_sizes),
        ("powers", powers, args.powers),
    ):
        twice = repeated(values)
        if twice:  # before the sweep: each would be one curve point twice
            raise ValueError(
                f"--{name} repeats {', '.join(f'{v:g}' for v in twice)} (got {text!r}); "
                "give each value once"
            )
    if not math.isfinite(args.target) or args.target <= 0:
        raise ValueError(f"--target must be > 0, got {args.target!r}")
    # the options the API refuses under its own parameter names (d, init_var, batch_sizes),
    # refused here under the options' (found in review); --dim and --bins by their types
    if not math.isfinite(args.init_var) or args.init_var <= 0:
        raise ValueError(f"--init-var must be finite and > 0, got {args.init_var!r}")
    if any(not math.isfinite(b) or b <= 0 for b in batch_sizes):
        raise ValueError(f"--batch-sizes must be finite numbers > 0, got {args.batch_sizes!r}")
    try:  # d above 2**53, or an unbinned d above 2**27 (review s21), named as the options
        nqm = NQM.paper(d=args.dim, bins=args.bins or None, init_var=args.init_var)
    except ValueError as err:
        raise ValueError(f"--dim {args.dim} with --bins {args.bins}: {err}") from err
    if args.target >= nqm.initial_risk():
        raise ValueError(
            f"--target {args.target:g} is at or above the initial risk {nqm.initial_risk():.4g}: "
            "every batch size meets it at step 0, so there is no scaling to read; lower it"
        )
    out = Path(args.out)
    check_out_folder(out)  # a file or an unwritable path, before the sweep
    names = [n for n in _FILES if not (args.no_ema and "ema" in n)]
    # an output name taken by a folder (or anything but a file) cannot be written or replaced:
    # refused with or without --overwrite (it ran the sweep, wrote the CSV, then failed with a
    # raw IsADirectoryError, found in review s19); the EMA figure too, which --no-ema deletes
    for n in _FILES:
        if (out / n).exists() and not (out / n).is_file():
            kind = "a folder" if (out / n).is_dir() else "not a regular file"
            raise ValueError(
                f"{out / n} exists and is {kind}: it cannot be written or replaced, with or "
                "without --overwrite; remove or rename it, or choose another --out"
            )
    clash = [n for n in _FILES if (out / n).exists()]  # an earlier run's EMA figure counts too
    if clash and not args.overwrite:
        raise ValueError(f"{out / clash[0]} already exists; pass --overwrite to replace it")
    require_matplotlib()  # the figures need it: a broken install fails here, not after the sweep
    optimizers = ("sgd", "momentum") if args.no_ema else ("sgd", "momentum", "ema")
    sweep = batch_size_sweep(nqm, batch_sizes, optimizers, powers, args.target)
    if not any(math.isfinite(r.steps) for r in sweep.rows):  # before anything is written
        raise ValueError(
            f"--target {args.target:g}: no batch size, optimizer and power of the sweep reaches "
            f"it (every one needs more than 2^48 steps; the initial risk is "
            f"{nqm.initial_risk():.4g}), so there is nothing to plot; raise --target"
        )
    _write_outputs(sweep, out, names, clash, args)
    print(f"{'optimizer':>9} {'power':>5} {'critical batch size':>20}")
    for opt, pw in sweep.curves():
        print(f"{opt:>9} {pw:5g} {_critical_text(sweep, opt, pw, max(batch_sizes)):>20}")
    print(f"wrote {', '.join(str(out / n) for n in names)}")
    return 0


def _write_outputs(
    sweep: SweepResult, out: Path, names: list[str], clash: list[str], args: argparse.Namespace
) -> None:
    """Write the CSV and the figures ``names`` into ``out``, all of them or none.

    Everything is written into a staging folder in ``out`` first and swapped in together (as
    :meth:`curvlab.analysis.Report.save`): the files replaced, and with ``--no-ema`` an earlier
    run's EMA figure, are moved aside first and put back should anything fail. Writing them one
    at a time in place left this run's CSV and first figure beside the earlier run's last figure
    (figures of two targets, with no sign) when interrupted midway (found in review s20). A
    failure leaves the earlier files as they were, no staging folder, and no ``out`` if this call
    created it.
    """
    created = _missing_folders(out)  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".curvlab-nqm-", dir=out))
        swapped = False
        try:
            sweep.to_csv(staging / "nqm_sweep.csv")
            plot_sweep(
                sweep,
                staging / "nqm_fig3a.png",
                solid="momentum",
                dashed="sgd",
                title="NQM (Fig. 3a): momentum solid, SGD dashed",
            )
            if not args.no_ema:
                plot_sweep(
                    sweep,
                    staging / "nqm_fig4_ema.png",
                    solid="ema",
                    dashed="sgd",
                    title="NQM (Fig. 4): EMA solid, SGD dashed",
                )
            plot_optimal_lr(sweep, staging / "nqm_optimal_lr.png", optimizer="sgd")
            taken = [n for n in names if (out / n).exists()]
            if taken and not args.overwrite:  # written there during the sweep: still not replaced
                raise ValueError(f"{out / taken[0]} already exists; pass --overwrite to replace it")
            # --overwrite --no-ema: the earlier EMA figure goes, only once the rest is in
            stale = {n for n in set(clash) - set(names) if (out / n).is_file()}
            swapped = _swap_in(staging, out, names, stale, what="curvlab nqm")
        finally:
            aside = staging / _ASIDE  # kept only if an earlier file could not be put back
            if swapped or not (aside.is_dir() and any(aside.iterdir())):
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        for folder in created:  # a failed run leaves no folder of its own behind
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _critical_text(sweep: SweepResult, optimizer: str, power: float, largest: float) -> str:
    """The critical batch size as printed: ``> B`` when every swept size is below it (``inf``),
    ``none reached`` when no batch size reached the target (``nan``)."""
    value = critical_batch_size(sweep, optimizer, power)
    if math.isinf(value):
        return f"> {largest:g}"
    if math.isnan(value):
        return "none reached"
    return f"{value:.4g}"
