"""MNIST-1D (Greydanus & Kobak, ICML 2024), generated offline and cached, and its reference models.

:func:`load_mnist1d` returns the standard split of the ``mnist1d`` package (4,000 training and
1,000 test signals of length 40, 10 classes) as float32 / int64 tensors. It always *generates* the
data with ``mnist1d.data.make_dataset(get_dataset_args())`` (a second on a CPU; never the package's
``get_dataset``, whose default path downloads a pickle) and caches the arrays as ``.npz`` in
``cache_dir`` (default ``$CURVLAB_CACHE/mnist1d`` or ``~/.cache/curvlab/mnist1d``). The package
seeds NumPy's and Python's global generators; :func:`load_mnist1d` restores both afterwards, so
loading leaves the caller's global random state untouched.

:func:`mnist1d_cnn` is the paper's CNN (three stride-2 Conv1d layers of 25 channels and a linear
read-out, about 5k parameters; ≈ 94% test accuracy with Adam in the paper) and :func:`mnist1d_mlp`
its MLP (≈ 68%). Both initialise from their own ``seed`` (PyTorch's default scheme) without
touching the global generator, and take inputs of shape ``(n, 40)``.

Example:
    >>> model = mnist1d_cnn(seed=0)
    >>> model(torch.zeros(3, 40)).shape
    torch.Size([3, 10])
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "load_mnist1d",
    "mnist1d_cnn",
    "mnist1d_mlp",
    "default_cache_dir",
    "train_reference_cnn",
]

NUM_CLASSES = 10
LENGTH = 40


def default_cache_dir() -> Path:
    """``$CURVLAB_CACHE/mnist1d`` if set, else ``~/.cache/curvlab/mnist1d``."""
    root = os.environ.get("CURVLAB_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "curvlab") / "mnist1d"


def _generate(seed: int) -> dict[str, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args
        from mnist1d.data import make_dataset as _make
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError(
            "MNIST-1D needs the 'mnist1d' package: python -m pip install mnist1d"
        ) from exc
    args = get_dataset_args()
    args.seed = int(seed)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = _make(args)  # generates locally; seeds the global NumPy/random generators
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def load_mnist1d(
    cache_dir: str | Path | None = None, seed: int = 42, regenerate: bool = False
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The MNIST-1D split ``((X, y), (X_test, y_test))``: ``X`` float32 ``(4000, 40)``, ``y`` int64.

    Args:
        cache_dir: where the generated arrays are cached (``mnist1d_seed{seed}.npz``); ``None``:
            :func:`default_cache_dir`. Created if missing.
        seed: the dataset seed (42 is the package's default, i.e. the standard MNIST-1D).
        regenerate: generate again even if a cached file exists.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"mnist1d_seed{int(seed)}.npz"
    arrays: dict[str, np.ndarray] | None = None
    if path.is_file() and not regenerate:
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, KeyError, ValueError):  # a corrupt or partial cache: rebuild it
            arrays = None
    if arrays is None:
        arrays = _generate(seed)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: concurrent loaders never see half a file
    return (
        (torch.from_numpy(arrays["x"]).float(), torch.from_numpy(arrays["y"]).long()),
        (torch.from_numpy(arrays["x_test"]).float(), torch.from_numpy(arrays["y_test"]).long()),
    )


def _seeded(build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def mnist1d_cnn(seed: int = 0, channels: int = 25, classes: int = NUM_CLASSES) -> nn.Module:
    """The MNIST-1D paper's CNN: Conv1d(1,c,5,s2,p1)-ReLU-Conv1d(c,c,3,s2,p1)-ReLU-Conv1d(c,c,3,s2,p1)-ReLU-Linear(5c, classes)."""
    return _seeded(
        lambda: nn.Sequential(
            nn.Unflatten(1, (1, LENGTH)),
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(5 * channels, classes),
        ),
        seed,
    )


def mnist1d_mlp(seed: int = 0, hidden: int = 100, classes: int = NUM_CLASSES) -> nn.Module:
    """The MNIST-1D paper's MLP: Linear(40,h)-ReLU-Linear(h,h)-ReLU-Linear(h, classes)."""
    return _seeded(
        lambda: nn.Sequential(
            nn.Linear(LENGTH, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        ),
        seed,
    )


def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Fraction of ``X`` that ``model`` classifies as ``y`` (no gradients)."""
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def train_reference_cnn(
    data: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
    seed: int = 0,
    steps: int = 6000,
    batch: int = 100,
    lr: float = 1e-2,
) -> dict[str, float]:
    """The MNIST-1D paper's CNN recipe (Adam, lr 1e-2, batch 100, 6000 steps): final accuracies."""
    (X, y), (Xt, yt) = data
    model = mnist1d_cnn(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed + 1000)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (batch,), generator=g)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    return {"train_accuracy": accuracy(model, X, y), "test_accuracy": accuracy(model, Xt, yt)}
