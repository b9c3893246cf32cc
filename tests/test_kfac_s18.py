"""Review s18 (K-FAC): A of a layer that runs on some batches only, layers on some rows, and the
refusals for a weight shared by layers K-FAC cannot combine (with KFACNoise's diagonal for it).

Brute force: dense float64 GGN / empirical Fisher blocks from torch.func, written here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl
import curvlab.quantities._kfac as kfac_module
from curvlab.distributed import Comm

D = torch.float64
# float64 sums of a few products of O(1) numbers: rounding is ~1e-16 relative; 1e-12 leaves room
# for the different summation orders of brute force and K-FAC, and is far below any 2x error
RTOL = 1e-12


class MultiTask(nn.Module):
    """Two heads; a batch runs one of them, by the task flag in its first row's last column."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x[:, :3]))
        return self.a(h) if x[0, 3] == 0 else self.b(h)


class Routed(nn.Module):
    """Each example's row goes to head ``a`` or ``b`` by the sign of its first feature (the
    indexing of a mixture of experts); a head gets a call on no rows when none is routed to it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        mask = x[:, 0] > 0
        out = x.new_zeros(x.shape[0], 2)
        out = out.index_put((mask,), self.a(x[mask]))
        return out.index_put((~mask,), self.b(x[~mask]))


def _batch(n: int, task: int, gen: torch.Generator, classes: int = 2) -> tuple[Tensor, Tensor]:
    x = torch.cat([torch.randn(n, 3, generator=gen, dtype=D), torch.full((n, 1), task, dtype=D)], 1)
    return x, torch.randint(0, classes, (n,), generator=gen)


def _model(cls: type[nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return cls().double()


def _block(model: nn.Module, loss_fn: nn.Module, data: list, name: str, matrix: str) -> Tensor:
    """Dense block of parameter ``name`` (row-major flattening): the GGN (``"ggn"``: the loss
    Hessian in output space between output Jacobians) or the empirical Fisher (per-example
    gradient outer products), in curvlab's scaling (1/N under "mean" for cross-entropy and MSE's
    ``c`` terms per example: 1/(N c) for the GGN, 1/(N c^2) for the empirical Fisher)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    p0 = params[name]
    summed = type(loss_fn)(reduction="sum")
    N = sum(x.shape[0] for x, _ in data)
    c = data[0][1][0].numel() if isinstance(loss_fn, nn.MSELoss) else 1
    mean = loss_fn.reduction == "mean"

    def out(p: Tensor, x: Tensor) -> Tensor:
        return functional_call(model, {**params, name: p.reshape(p0.shape)}, (x,))

    block = torch.zeros(p0.numel(), p0.numel(), dtype=D)
    for x, y in data:
        if matrix == "ggn":
            o = out(p0.reshape(-1), x)
            J = jacrev(out)(p0.reshape(-1), x).reshape(o.numel(), -1)
            H = hessian(lambda f, y=y, o=o: summed(f.reshape(o.shape), y))(o.reshape(-1))
            block += J.T @ H @ J / (N * c if mean else 1)
        else:
            for i in range(x.shape[0]):
                g = jacrev(lambda p, i=i, x=x, y=y: summed(out(p, x[i : i + 1]), y[i : i + 1]))(
                    p0.reshape(-1)
                )
                block += torch.outer(g, g) / (N * c * c if mean else 1)
    return block


def _inputs_of_head(data: list, task: int) -> Tensor:
    """The head's inputs (``tanh(body(x))``) of the examples whose batch runs it."""
    return torch.cat([x[:, :3] for x, _ in data if x[0, 3] == task])


# ------------------------------------------------------ A of a layer run on some batches only
@pytest.mark.parametrize("chunk_size", [1, None])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_head_of_one_example_among_two_batches_is_exact(
    kind: str, reduction: str, approx: str, chunk_size: int | None
) -> None:
    """Two batches of one example each, routed to heads a and b: each head is used by one
    example, where kron(G, A) is the exact block (A was divided by both examples: 0.5x)."""
    gen = torch.Generator().manual_seed(0)
    model = _model(MultiTask, 1)
    data = [_batch(1, 0, gen), _batch(1, 1, gen)]
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    f = cl.kfac(model, loss_fn, data, kind=kind, approx=approx, chunk_size=chunk_size)
    matrix = "ggn" if kind == "exact" else "empirical"
    for head in ("a", "b"):
        exact = _block(model, loss_fn, data, f"{head}.weight", matrix)
        torch.testing.assert_close(f[head].weight_block(), exact, rtol=RTOL, atol=0)
        bias = _block(model, loss_fn, data, f"{head}.bias", matrix)
        torch.testing.assert_close(f[head].bias_block(), bias, rtol=RTOL, atol=0)


def test_head_of_one_example_mse_exact() -> None:
    gen = torch.Generator().manual_seed(2)
    model = _model(MultiTask, 3)
    data = [
        (x, torch.randn(1, 2, generator=gen, dtype=D))
        for x, _ in (_batch(1, t, gen) for t in (1, 0, 1))
    ]
    f = cl.kfac(model, nn.MSELoss(), data, kind="exact")
    exact = _block(model, nn.MSELoss(), data, "a.weight", "ggn")
    torch.testing.assert_close(f["a"].weight_block(), exact, rtol=RTOL, atol=0)


@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_A_averages_the_examples_of_the_batches_that_ran_the_layer(chunk_size: int | None) -> None:
    """Batches of several examples (the documented formula: A = (1/N_b) sum over the N_b
    examples whose chunk ran the layer, G summed with the weight of all N)."""
    gen = torch.Generator().manual_seed(4)
    model = _model(MultiTask, 5)
    data = [_batch(3, 0, gen), _batch(2, 1, gen), _batch(2, 0, gen)]
    f = cl.kfac(model, nn.CrossEntropyLoss(), data, kind="exact", chunk_size=chunk_size)
    with torch.no_grad():
        for head, task in (("a", 0), ("b", 1)):
            h = torch.tanh(model.body(_inputs_of_head(data, task)))
            torch.testing.assert_close(f[head].A, h.T @ h / h.shape[0], rtol=RTOL, atol=0)
        x = torch.cat([x[:, :3] for x, _ in data])
        torch.testing.assert_close(f["body"].A, x.T @ x / 7, rtol=RTOL, atol=0)
    assert f.info["num_examples"] == 7


def test_rows_routed_to_a_layer_under_chunk_size_one() -> None:
    """A layer on some rows of the batch (x[mask]) cannot be split into examples: refused with
    the way out, chunk_size=1, under which each example uses the head it is routed to (the
    call of the other head on no rows is no use; it was refused as a misplaced layout)."""
    gen = torch.Generator().manual_seed(6)
    model = _model(Routed, 7)
    X = torch.randn(4, 3, generator=gen, dtype=D)
    X[:, 0] = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=D)  # rows 0, 2, 3 -> a; row 1 -> b
    y = torch.randint(0, 2, (4,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="chunk_size=1"):
        cl.kfac(model, loss_fn, (X, y), kind="exact", chunk_size=None)
    f = cl.kfac(model, loss_fn, (X, y), kind="exact", chunk_size=1)
    xa, xb = X[[0, 2, 3]], X[[1]]
    torch.testing.assert_close(f["a"].A, xa.T @ xa / 3, rtol=RTOL, atol=0)
    torch.testing.assert_close(f["b"].A, xb.T @ xb, rtol=RTOL, atol=0)
    # head b is used by one example: exact
    exact = _block(model, loss_fn, [(X, y)], "b.weight", "ggn")
    torch.testing.assert_close(f["b"].weight_block(), exact, rtol=RTOL, atol=0)


# --------------------------------------------------- under torch.distributed: heads per rank
def _simulated_rank(other: list[Tensor] | None) -> tuple[type[Comm], list[Tensor]]:
    """A two-rank group simulated in one process: the rank records what it sends, and adds the
    other rank's buffers (recorded on its own run) to its all-reduces."""
    sent: list[Tensor] = []

    class Simulated(Comm):
        def all_reduce_(self, buffer: Tensor) -> Tensor:
            sent.append(buffer.clone())
            if other is not None:
                theirs = other.pop(0)
                assert theirs.shape == buffer.shape, "the ranks' buffers differ"
                buffer.add_(theirs)
            return buffer

        def all_gather_object(self, obj: Any) -> list[Any]:
            return [obj, obj]

    return Simulated, sent


def test_heads_on_different_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 runs head a, rank 1 head b: each block and its examples' count travel in the
    all-reduce (rank 0 had no b block to send, the buffers differed in size)."""
    gen = torch.Generator().manual_seed(8)
    model = _model(MultiTask, 9)
    mine = [_batch(3, 0, gen), _batch(1, 0, gen)]
    theirs = [_batch(2, 1, gen)]
    loss_fn = nn.CrossEntropyLoss()
    Rank1, sent = _simulated_rank(None)
    monkeypatch.setattr(kfac_module, "active", lambda: Rank1(None, 1, 2))
    cl.kfac(model, loss_fn, theirs, kind="exact")
    Rank0, _ = _simulated_rank(sent)
    monkeypatch.setattr(kfac_module, "active", lambda: Rank0(None, 0, 2))
    got = cl.kfac(model, loss_fn, mine, kind="exact")
    monkeypatch.undo()
    expected = cl.kfac(model, loss_fn, mine + theirs, kind="exact")
    assert set(got) == set(expected) == {"body", "a", "b"}
    for name in expected:
        torch.testing.assert_close(got[name].A, expected[name].A, rtol=RTOL, atol=0)
        torch.testing.assert_close(got[name].G, expected[name].G, rtol=RTOL, atol=0)
    with torch.no_grad():
        h = torch.tanh(model.body(_inputs_of_head(theirs, 1)))
    torch.testing.assert_close(got["b"].A, h.T @ h / 2, rtol=RTOL, atol=0)


# ------------------------------------------------------- selections of a shared weight
class Tied(nn.Module):
    """Two Linear layers sharing one weight (named ``a.weight``: named_parameters names it once)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


class Mixed(nn.Module):
    """A square weight shared by a HuggingFace Conv1D (stored (in, out)) and an nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c = Conv1D(3, 3)
        self.l = nn.Linear(3, 3)
        self.l.weight = self.c.weight
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.l(torch.tanh(self.c(x)))))


def _data(gen: torch.Generator, classes: int) -> tuple[Tensor, Tensor]:
    return torch.randn(4, 3, generator=gen, dtype=D), torch.randint(0, classes, (4,), generator=gen)


def test_selecting_a_layer_whose_weight_is_shared_names_the_weight() -> None:
    """params="b" selects b's bias alone (the weight is 'a.weight'): the message named 'b' as a
    selection to make; it names the shared weight, and that selection works."""
    model = _model(Tied, 10)
    batch = _data(torch.Generator().manual_seed(11), 3)
    with pytest.raises(ValueError) as err:
        cl.kfac(model, nn.CrossEntropyLoss(), batch, kind="exact", params="b")
    msg = str(err.value)
    assert "layer 'b' uses weight 'a.weight' (shared with 'a'); select 'a.weight'" in msg
    assert "e.g. one of ['a']" in msg
    f = cl.kfac(model, nn.CrossEntropyLoss(), batch, kind="exact", params="a.weight")
    assert list(f) == ["a"]


def test_weight_shared_by_conv1d_and_linear_points_to_the_diagonal() -> None:
    """One Parameter used (in, out) and (out, in): no params= leaves one layer out; the way out
    is the weight's diagonal (the message said "Leave one out with params=")."""
    model = _model(Mixed, 12)
    batch = _data(torch.Generator().manual_seed(13), 2)
    for sel in (None, "c"):
        with pytest.raises(ValueError) as err:
            cl.kfac(model, nn.CrossEntropyLoss(), batch, kind="exact", params=sel)
        msg = str(err.value)
        assert "Leave one out" not in msg
        assert "curvlab.diag_fisher(model, loss_fn, data, params='c.weight')" in msg
    with pytest.raises(ValueError) as err:
        cl.kfac(model, nn.CrossEntropyLoss(), batch, kind="exact", params="l")
    msg = str(err.value)
    assert "layer 'l' uses weight 'c.weight' (shared with 'c'); K-FAC refuses that weight" in msg
    assert "'c'" not in msg.split("e.g. one of")[-1]  # not suggested: it is refused too
    # the way out given works: the other layers' factors
    f = cl.kfac(
        model, nn.CrossEntropyLoss(), batch, kind="exact", params=lambda n, p: n != "c.weight"
    )
    assert list(f) == ["head"]


def test_kfac_noise_gives_a_weight_kfac_refuses_its_diagonal() -> None:
    """KFACNoise raised kfac's refusal for the shared (in, out)/(out, in) weight; the weight (and
    the biases of its layers) get the empirical Fisher diagonal, the head its factors."""
    from curvlab.noise._kfac import _DIAG

    model = _model(Mixed, 14)
    X, y = _data(torch.Generator().manual_seed(15), 2)
    loss_fn = nn.CrossEntropyLoss()
    state = cl.noise.KFACNoise(scale=0.1).estimate(model, loss_fn, X, y, torch.Generator())
    assert set(state) == {"head", _DIAG}
    assert set(state[_DIAG]) == {"c.weight", "c.bias", "l.bias"}
    for name in ("c.weight", "c.bias", "l.bias"):
        exact = torch.diagonal(_block(model, loss_fn, [(X, y)], name, "empirical"))
        torch.testing.assert_close(state[_DIAG][name].reshape(-1), exact, rtol=RTOL, atol=0)
    noise = cl.noise.KFACNoise(scale=0.1).sample(model, loss_fn, X, y, seed=0)
    assert set(noise) == {n for n, _ in model.named_parameters()}
