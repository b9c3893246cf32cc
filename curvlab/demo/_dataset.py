"""A small image-classification dataset generated deterministically (no downloads).

Each class has a smooth random template (a sum of Gaussian blobs on a ``size x size`` grid). An
example is its class template, randomly shifted by up to ``max_shift`` pixels, scaled by a random
contrast and buried in Gaussian pixel noise; a fraction ``label_noise`` of the training labels is
replaced by random classes, so that memorisation (and the generalisation gap) is visible. The same
``seed`` gives bitwise the same tensors on every machine (CPU generator, float32).

Example:
    >>> (X, y), (Xt, yt) = make_dataset(n_train=64, n_test=32, seed=0)
    >>> X.shape, y.shape, int(y.max()) < 4
    (torch.Size([64, 1, 12, 12]), torch.Size([64]), True)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["make_dataset", "small_cnn"]


def _templates(classes: int, size: int, blobs: int, g: torch.Generator) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.zeros(classes, size, size)
    for c in range(classes):
        for _ in range(blobs):
            cy, cx = (torch.rand(2, generator=g) * (size - 1)).tolist()
            width = 1.0 + 1.5 * float(torch.rand((), generator=g))
            sign = 1.0 if float(torch.rand((), generator=g)) < 0.7 else -1.0
            out[c] += sign * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    out -= out.mean(dim=(1, 2), keepdim=True)
    return out / out.flatten(1).norm(dim=1).view(-1, 1, 1) * size / 2


def _examples(
    templates: Tensor, n: int, noise: float, max_shift: int, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    classes, size, _ = templates.shape
    y = torch.randint(0, classes, (n,), generator=g)
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=g)
    contrast = 0.6 + 0.8 * torch.rand(n, generator=g)
    X = torch.empty(n, 1, size, size)
    for i in range(n):
        img = torch.roll(
            templates[y[i]], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(0, 1)
        )
        X[i, 0] = contrast[i] * img
    X += noise * torch.randn(X.shape, generator=g)
    return X, y


def make_dataset(
    n_train: int = 2048,
    n_test: int = 1024,
    classes: int = 4,
    size: int = 12,
    noise: float = 1.0,
    max_shift: int = 2,
    label_noise: float = 0.2,
    seed: int = 0,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Train and test sets ``((X, y), (X_test, y_test))``, images ``(n, 1, size, size)``.

    Args:
        n_train, n_test: numbers of examples.
        classes: number of classes (>= 2).
        size: image side in pixels.
        noise: standard deviation of the pixel noise.
        max_shift: largest random shift of a template, in pixels.
        label_noise: fraction of training labels replaced by uniformly random classes
            (test labels are clean).
        seed: the dataset's seed.
    """
    if classes < 2:
        raise ValueError(f"classes must be >= 2, got {classes!r}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train!r}, {n_test!r}")
    if not 0 <= label_noise <= 1:
        raise ValueError(f"label_noise must lie in [0, 1], got {label_noise!r}")
    g = torch.Generator().manual_seed(seed)
    templates = _templates(classes, size, blobs=4, g=g)
    X, y = _examples(templates, n_train, noise, max_shift, g)
    Xt, yt = _examples(templates, n_test, noise, max_shift, g)
    flip = torch.rand(n_train, generator=g) < label_noise
    y = torch.where(flip, torch.randint(0, classes, (n_train,), generator=g), y)
    return (X, y), (Xt, yt)


def small_cnn(classes: int = 4, seed: int = 0) -> nn.Module:
    """Conv(1,8,3)-ReLU-MaxPool-Conv(8,16,3)-ReLU-MaxPool-Linear(144,32)-ReLU-Linear(32,classes).

    Initialised from its own generator (the global RNG is not used).
    """
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 32),
        nn.ReLU(),
        nn.Linear(32, classes),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.zero_()
    return model
