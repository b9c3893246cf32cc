"""The benchmark workloads W1-W3 of shared/BENCHMARKS.md, built deterministically."""

from __future__ import annotations

import torch
from torch import nn


def w1_mlp_digits(
    batch: int = 256,
) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """W1: scikit-learn digits, standardised and shuffled (seed 0); MLP 64-128-128-10."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32)
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-8)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    return model, nn.CrossEntropyLoss(), (X[:batch], y[:batch])


def cifar_like(n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The W2/W3 data: ``randn(n, 3, 32, 32)`` and ``randint(0, 10, (n,))`` from one generator (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return X, y


def _cnn(c1: int, c2: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 8 * 8, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def w2_model() -> nn.Module:
    """The W2 CNN, built right after ``torch.manual_seed(1)``."""
    torch.manual_seed(1)
    return _cnn(16, 32, 64)


def w2_cnn(batch: int = 128) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """W2: CIFAR-like random data; Conv16-Conv32-Linear64 CNN (136,874 parameters)."""
    X, y = cifar_like()
    return w2_model(), nn.CrossEntropyLoss(), (X[:batch], y[:batch])


def w3_cnn_wide(batch: int = 256) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """W3: as W2 with 32/64 channels and hidden 256 (1,070,794 parameters)."""
    X, y = cifar_like()
    torch.manual_seed(1)
    return _cnn(32, 64, 256), nn.CrossEntropyLoss(), (X[:batch], y[:batch])
