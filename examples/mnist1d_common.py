"""Shared helpers of the MNIST-1D reproduction scripts (examples/mnist1d_*.py).

Data: the standard MNIST-1D split (:func:`curvlab.demo.mnist1d.load_mnist1d`, generated offline
and cached); the scripts that tune hyper-parameters hold out the last ``val`` of the 4,000
training signals as a validation set and report the 1,000 test signals. Spread over seeds is the
sample standard deviation (``ddof=1``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from example_args import (  # noqa: E402
    non_negative_int,
    positive_float,
    positive_floats,
    positive_int,
    positive_ints,
    unit_interval,
)

from curvlab.demo.mnist1d import accuracy, load_mnist1d  # noqa: E402

Split = tuple[Tensor, Tensor]
EXAMPLES = Path(__file__).resolve().parent

__all__ = [
    "accuracy",
    "base_parser",
    "out_folder",
    "positive_float",
    "positive_floats",
    "positive_int",
    "positive_ints",
    "unit_interval",
    "quick",
    "fmt_ms",
    "load_splits",
    "mean_std",
    "permutation_batches",
    "rerun_problem",
    "save_outputs",
]


_UNSET = object()


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that remembers which options the command line gave (``given``).

    :func:`quick` needs it: an option given explicitly is kept even when its value equals the
    default, which comparing with the default cannot tell.
    """

    given: frozenset[str] = frozenset()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        # a first parse into a namespace pre-filled with a marker: argparse fills in defaults
        # only where an attribute is missing, so what still holds the marker was not given
        probe = argparse.Namespace(
            **{a.dest: _UNSET for a in self._actions if a.dest != argparse.SUPPRESS}
        )
        super().parse_known_args(argv, probe)
        self.given = frozenset(k for k, v in vars(probe).items() if v is not _UNSET)
        return super().parse_known_args(argv, namespace)


def base_parser(
    description: str,
    name: str,
    *,
    seeds: int | None = 3,
    results: bool = False,
    out_help: str | None = None,
) -> argparse.ArgumentParser:
    """--seeds (or --seed when ``seeds`` is None), --out, --quick, --threads and --cache-dir.

    ``results``: a full run writes into docs/results/ (the committed figures), a ``--quick`` one
    into examples/output/<name>; otherwise both write into examples/output/<name>. ``--out``
    is then ``None`` until :func:`out_folder` resolves it. A ``results`` parser also has
    ``--overwrite`` (see :func:`rerun_problem`). The parser records the options its last parse
    was given (for :func:`quick`). ``out_help``: the help of ``--out`` where the script places
    its outputs otherwise (its default folder is then its own to describe).
    """
    parser = _Parser(description=description)
    if seeds is None:
        parser.add_argument(
            "--seed", type=non_negative_int, default=0, help="the seed (default: 0)"
        )
    else:
        parser.add_argument(
            "--seeds",
            type=positive_int,
            default=seeds,
            help="seeds per setting (default: %(default)s)",
        )
    default_out = None if results else EXAMPLES / "output" / name
    where = (
        f"docs/results/; examples/output/{name} with --quick"
        if results
        else f"examples/output/{name}"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out,
        help=out_help or f"output folder (default: {where})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run (10-21 s on an idle 2-core machine, over a minute on a loaded one: "
        "mnist1d_critical_batch 71 s at load average 5; for tests); options given explicitly "
        "are kept",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch CPU threads (default: 1)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="MNIST-1D cache (default: $CURVLAB_CACHE/mnist1d or ~/.cache/curvlab/mnist1d)",
    )
    if results:
        parser.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the outputs of an earlier run in the output folder (without it a run, "
            f"or --replot, refuses to: the committed docs/results/{name}.json included)",
        )
    return parser


def rerun_problem(out: Path, name: str, outputs: Sequence[Path], overwrite: bool) -> str | None:
    """Why a training run must not write into ``out`` (``None`` if it may), checked before any work.

    The outputs have fixed names, so a run into a folder that holds an earlier run's
    ``{name}.json`` would replace that run (the committed docs/results/ of a full run without
    ``--out`` included) without a word; it is refused unless ``overwrite``.

    Args:
        out: the output folder.
        name: the script's name (``{name}.json`` marks an earlier run).
        outputs: the files the run writes (named in the message where they exist).
        overwrite: ``--overwrite``: an earlier run's outputs may be replaced.

    Returns:
        A usage-error message naming the files and the fix, or ``None``.
    """
    if overwrite or not (out / f"{name}.json").exists():
        return None
    taken = ", ".join(str(p) for p in outputs if p.exists())
    return (
        f"{out} holds an earlier run ({taken}); pass --overwrite to replace it, or --out DIR "
        "to write this run elsewhere"
    )


def out_folder(args: argparse.Namespace, name: str) -> Path:
    """``--out``, or the default of a ``results`` parser: docs/results/ for a full run,
    examples/output/<name> for a ``--quick`` one (a quick check never replaces the committed
    results)."""
    if args.out is not None:
        return Path(args.out)
    return EXAMPLES / "output" / name if args.quick else EXAMPLES.parent / "docs" / "results"


def quick(parser: argparse.ArgumentParser, args: argparse.Namespace, **values: Any) -> None:
    """``--quick``: set each option in ``values`` unless the command line gave it.

    An option given explicitly is kept, also at its default value (``--quick --seeds 3`` runs 3
    seeds where 3 is the default); the parser of :func:`base_parser` records what was given.

    Raises:
        TypeError: for a parser not made by :func:`base_parser` (it cannot tell what was given).
        ValueError: for a name in ``values`` that is not one of the parser's options.
    """
    if not isinstance(parser, _Parser):
        raise TypeError(
            "quick() needs the parser of base_parser(), which records the options given; got "
            f"{type(parser).__name__}"
        )
    dests = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - dests)
    if unknown:
        raise ValueError(f"quick() got names that are not options of the parser: {unknown}")
    if not args.quick:
        return
    for key, value in values.items():
        if key not in parser.given:
            setattr(args, key, value)


def load_splits(val: int, cache_dir: Path | None = None) -> tuple[Split, Split, Split]:
    """``(train, val, test)``: the first ``4000 - val`` training signals, the last ``val``, the test set."""
    (X, y), test = load_mnist1d(cache_dir)
    n = X.shape[0] - val
    if val <= 0:
        return (X, y), (X[:0], y[:0]), test
    return (X[:n], y[:n]), (X[n:], y[n:]), test


def permutation_batches(n: int, batch: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index batches from a stream of fresh permutations of ``range(n)``, without end.

    A batch takes the next ``batch`` indices of the stream; a permutation's leftover is completed
    from the next permutation, so no example is dropped and the epochs are exact.
    """
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch]
        pending = pending[batch:]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN/inf values propagate)."""
    a = np.asarray(list(values), dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def fmt_ms(values: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """``"mean ± std"`` of ``values * scale`` (``"mean"`` alone for one value, ``"—"`` for none:
    every run of the setting diverged)."""
    vals = [v * scale for v in values]
    if not vals:
        return "—"
    m, s = mean_std(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def save_outputs(
    out: Path, name: str, results: dict[str, Any], table_md: str, started: float
) -> None:
    """Write ``{name}.json`` (every number) and ``{name}.md`` (the table) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["environment"] = environment()
    (out / f"{name}.json").write_text(json.dumps(results, indent=1, default=_json_default))
    (out / f"{name}.md").write_text(table_md + f"\n\n(wall time {results['seconds']:.0f} s)\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def pyplot():
    """matplotlib.pyplot with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def replot_problem(saved: Path, outputs: Sequence[Path], overwrite: bool) -> str | None:
    """Why ``--replot saved`` must not run (``None`` if it may), checked before any work.

    A missing or non-file ``saved`` is refused, and so, unless ``overwrite``, is any of the
    replot's ``outputs`` that exists already: the outputs have fixed names, so they would
    replace another saved run (or ``saved`` itself) without a word.

    Args:
        saved: the JSON to replot (``--replot FILE``).
        outputs: the files the replot would write.
        overwrite: ``--overwrite``: existing outputs may be replaced.

    Returns:
        A usage-error message naming the files and the fix, or ``None``.
    """
    if not saved.is_file():
        return f"--replot {saved}: no such file"
    taken = [p for p in outputs if p.exists()]
    if overwrite or not taken:
        return None
    what = ", ".join(
        f"{p} (the file being replotted)" if p.resolve() == saved.resolve() else str(p)
        for p in taken
    )
    return (
        f"--replot would overwrite {what}; pass --overwrite to replace "
        f"{'them' if len(taken) > 1 else 'it'}, or --out DIR to write the replot elsewhere"
    )
