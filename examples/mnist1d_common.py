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

from curvlab.demo.mnist1d import accuracy, load_mnist1d  # noqa: E402

Split = tuple[Tensor, Tensor]

__all__ = [
    "accuracy",
    "base_parser",
    "fmt_ms",
    "load_splits",
    "mean_std",
    "permutation_batches",
    "save_outputs",
]


def base_parser(description: str, name: str) -> argparse.ArgumentParser:
    """--seeds, --out, --quick, --threads and --cache-dir, the options every script shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (default: 3)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "output" / name,
        help="output folder (default: examples/output/%(default)s)".replace("%(default)s", name),
    )
    parser.add_argument("--quick", action="store_true", help="a seconds-long run (for tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="MNIST-1D cache (default: ~/.cache/curvlab)"
    )
    return parser


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
    """``"mean ± std"`` of ``values * scale`` (``"mean"`` alone for one value)."""
    vals = [v * scale for v in values]
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
