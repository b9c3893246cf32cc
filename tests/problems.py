"""Tiny float64 problems shared by all tests: models x losses x batching x reduction.

``make_problem("mlp-ce-mean-one")`` builds a fresh, deterministic problem. ``PROBLEMS`` lists every
combination; ``SMALL_PROBLEMS`` a cross-section for slower tests.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

K = 3  # outputs / classes


class ResBlock(nn.Module):
    """x + lin2(tanh(lin1(x))), then a linear head: needs BackPACK's graph converter."""

    def __init__(self, width: int = 4, out: int = K) -> None:
        super().__init__()
        self.lin1 = nn.Linear(width, width)
        self.act = nn.Tanh()
        self.lin2 = nn.Linear(width, width)
        self.head = nn.Linear(width, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x + self.lin2(self.act(self.lin1(x))))


def _mlp(out: int = K) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out))


def _cnn(out: int = K) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, out),
    )


def _cnn_bn(out: int = K) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Sigmoid(),
        nn.MaxPool2d(2),  # BackPACK 1.7 AvgPool2d derivatives fail in float64
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, out),
    )


def _conv1d(out: int = K) -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, out))


MODELS = {"mlp": _mlp, "cnn": _cnn, "res": ResBlock, "cnnbn": _cnn_bn, "conv1d": _conv1d}
INPUT_SHAPES = {"mlp": (4,), "cnn": (2, 4, 4), "res": (4,), "cnnbn": (2, 4, 4), "conv1d": (2, 6)}
LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}
BATCH_SIZES = {"one": (7,), "three": (3, 1, 5)}


@dataclass
class Problem:
    """One test problem: a model, a loss and data (one batch or a list of batches)."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    data: object
    X: Tensor  # all inputs together
    y: Tensor  # all targets together

    @property
    def batches(self) -> list[tuple[Tensor, Tensor]]:
        return [self.data] if isinstance(self.data, tuple) else list(self.data)


def make_problem(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> Problem:
    """Build the problem ``"<model>-<loss>-<reduction>-<batching>"`` deterministically."""
    model_name, loss_name, reduction, batching = name.split("-")
    out = 1 if loss_name == "bce" else K  # BCE: one logit per example (binary classification)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        model = MODELS[model_name](out=out).to(dtype)
    if model_name == "cnnbn":
        bn = model[1]
        bn.running_mean.copy_(0.1 * torch.randn(3, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(1.0 + 0.5 * torch.rand(3, generator=gen, dtype=torch.float64))
        model.eval()
    sizes = BATCH_SIZES[batching]
    n = sum(sizes)
    X = torch.randn(n, *INPUT_SHAPES[model_name], generator=gen, dtype=torch.float64).to(dtype)
    if loss_name == "ce":
        y = torch.randint(0, K, (n,), generator=gen)
    elif loss_name == "mse":
        y = torch.randn(n, out, generator=gen, dtype=torch.float64).to(dtype)
    else:
        y = torch.randint(0, 2, (n, out), generator=gen).to(dtype)
    loss_fn = LOSSES[loss_name](reduction=reduction)
    splits = list(zip(X.split(list(sizes)), y.split(list(sizes))))
    data = splits[0] if len(splits) == 1 else splits
    return Problem(name=name, model=model, loss_fn=loss_fn, data=data, X=X, y=y)


PROBLEMS = [
    "-".join(p)
    for p in itertools.product(["mlp", "cnn", "res"], LOSSES, ["mean", "sum"], BATCH_SIZES)
]
EXTRA_PROBLEMS = ["cnnbn-ce-mean-three", "conv1d-mse-sum-one", "cnnbn-bce-sum-one"]
SMALL_PROBLEMS = [
    "mlp-ce-mean-one",
    "cnn-mse-sum-three",
    "res-bce-mean-three",
    "mlp-mse-mean-three",
    "cnn-ce-sum-one",
]
