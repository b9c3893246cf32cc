"""``fisher_trace(chunk_size=)`` bounds memory (review s20).

docs/conventions.md promises that batches are split into chunks of at most ``chunk_size``
examples to bound memory (``fisher_trace``: 64). ``fisher_trace`` ran its no-grad forward, the
label draw and the output gradients on every whole batch, and moved all batches to the device
up front; ``chunk_size`` reached only the per-example gradient passes (one batch of 500 examples
of a ``Linear(4, 20000)``, ``chunk_size=16``: 545 MB against 28 MB for the same data split into
batches of 16). Now every pass sees at most ``chunk_size`` examples, and the labels of the
chunks are drawn in example order from the same stream: the value, its standard error and the
per-batch proxies are those of the labels drawn for the whole batch at once.

The brute force draws the labels as the CPU's sampler does (one uniform per row, in order, by
inverse transform on the float64 cumulative probabilities) and takes per-example gradients with
``torch.func``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import curvlab as cl

DT = torch.float64


def _model(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, classes)).to(DT)


def _data(n: int, classes: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def _batch_sizes(model: nn.Module) -> tuple[list[int], object]:
    """Record the leading size of every input the model's forward sees (outside ``vmap``: a
    per-example pass inside it sees one example)."""
    sizes: list[int] = []

    def pre(_: nn.Module, args: tuple) -> None:
        sizes.append(int(args[0].shape[0]))

    return sizes, model.register_forward_pre_hook(pre)


def _drawn_labels(logits: Tensor, gen: torch.Generator) -> Tensor:
    """The CPU sampler's labels: the first class whose cumulative probability exceeds
    ``u * total``, one ``u ~ U[0, 1)`` per example, drawn in example order."""
    cdf = torch.softmax(logits, dim=1).cumsum(1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=gen, dtype=DT)
    draws = torch.searchsorted(cdf, u * total, right=True)
    return draws.clamp(max=logits.shape[1] - 1)[:, 0]


def _brute(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], seed: int, ignore: int = -100
) -> tuple[float, float, list[float]]:
    """``Tr(F)``, its standard error and ``Tr(F^B)`` per batch of ``CrossEntropyLoss(mean)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def nll(p: dict[str, Tensor], x: Tensor, label: Tensor) -> Tensor:
        out = functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, label.unsqueeze(0), reduction="sum")

    gen = torch.Generator().manual_seed(seed)
    sq, counts, sums = [], [], []
    for X, y in batches:
        with torch.no_grad():
            labels = _drawn_labels(model(X), gen)
        kept = y != ignore
        g = vmap(grad(nll), in_dims=(None, 0, 0))(params, X, labels)
        flat = torch.cat([v.reshape(len(X), -1) for v in g.values()], 1) * kept[:, None]
        sq.append(flat.pow(2).sum(1))
        counts.append(int(kept.sum()))
        sums.append(flat.sum(0))
    m, s = sum(counts), torch.cat(sq)
    value = float(s.sum() / m)
    stderr = float(s.std() * len(s) / math.sqrt(len(s)) / m)
    return value, stderr, [float((t / c).pow(2).sum()) for t, c in zip(sums, counts)]


def test_no_forward_sees_more_than_chunk_size_examples() -> None:
    # old code: the no-grad forward that draws the labels saw each whole batch (12, then 7)
    model, (X, y) = _model(), _data(19)
    sizes, handle = _batch_sizes(model)
    try:
        res = cl.fisher_trace(
            model, nn.CrossEntropyLoss(), [(X[:12], y[:12]), (X[12:], y[12:])], chunk_size=3
        )
    finally:
        handle.remove()
    assert res.num_examples == 19
    assert sizes and max(sizes) <= 3, sizes


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_no_forward_sees_more_than_chunk_size_examples_for_regression_and_bce(loss: str) -> None:
    model, (X, _) = _model(2), _data(10)
    g = torch.Generator().manual_seed(2)
    targets = torch.randn(10, 2, generator=g, dtype=DT)
    lf = nn.MSELoss() if loss == "mse" else nn.BCEWithLogitsLoss()
    if loss == "bce":
        targets = (targets > 0).to(DT)
    sizes, handle = _batch_sizes(model)
    try:
        chunked = cl.fisher_trace(model, lf, (X, targets), chunk_size=4, seed=3)
    finally:
        handle.remove()
    assert max(sizes) <= 4, sizes
    # the labels of the chunks are the stretch of the stream their examples take in the batch
    whole = cl.fisher_trace(model, lf, (X, targets), chunk_size=64, seed=3)
    assert chunked.value == pytest.approx(whole.value, rel=1e-12)
    assert chunked.per_batch == pytest.approx(whole.per_batch, rel=1e-12)


def test_chunked_value_stderr_and_proxies_are_those_of_the_whole_batch_draw() -> None:
    model, (X, y) = _model(), _data(17)
    y = y.clone()
    y[[2, 9]] = -100  # ignored labels: the per-batch counts are summed over the chunks
    batches = [(X[:11], y[:11]), (X[11:], y[11:])]
    value, stderr, per_batch = _brute(model, batches, seed=5)
    lf = nn.CrossEntropyLoss()
    for chunk_size in (1, 4, 64):
        gen = torch.Generator().manual_seed(5)
        res = cl.fisher_trace(model, lf, batches, generator=gen, chunk_size=chunk_size)
        # float64 sums of at most 17 terms of size ~1: rounding ~1e-15 relative
        assert res.value == pytest.approx(value, rel=1e-12), chunk_size
        assert res.stderr == pytest.approx(stderr, rel=1e-12), chunk_size
        assert res.per_batch == pytest.approx(per_batch, rel=1e-12), chunk_size
        assert res.batch_value == pytest.approx(sum(per_batch) / 2, rel=1e-12), chunk_size


def test_one_batch_in_chunks_equals_the_same_data_split_into_batches_of_a_chunk() -> None:
    # the same passes on the same examples in the same order, and the same label stream
    model, (X, y) = _model(), _data(12)
    lf = nn.CrossEntropyLoss(reduction="sum")
    one = cl.fisher_trace(model, lf, (X, y), chunk_size=4, seed=0)
    split = cl.fisher_trace(
        model, lf, [(X[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)], chunk_size=4, seed=0
    )
    assert one.value == split.value
    assert one.stderr == split.stderr
    # under "sum" the proxy of the batch is the squared norm of the sum of the chunks' gradients
    _, _, per_batch = _brute(model, [(X, y)], seed=0)
    assert one.per_batch == pytest.approx([per_batch[0] * 12**2], rel=1e-12)
