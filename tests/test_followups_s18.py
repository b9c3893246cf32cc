"""Follow-ups of review s18 in K-FAC and its users.

* ``kfac(memory_budget=)`` took only Python ``int``/``float``: a numpy scalar (a budget read from a
  config, ``np.prod(shape) * 4``) was refused as "not a positive number", although the estimators'
  budgets take them (:func:`curvlab.estimators._memory.check_memory_budget`).
* A model that mixes the "examples" of a batch without a batch axis (a ``DataLoader`` with
  ``batch_size=None``) through a batch-axis operation alone (no attention layer to give it away):
  ``kfac``, ``fisher_trace`` and ``fisher_norms`` said "the model mixes the examples" without
  naming the missing batch axis, which the sweep quantities name since a8252d6.
* ``KFACNoise``: a layer that did not run on the batch put zeros into the engine path's diagonal,
  drawn before the layers' factors, so the engine path's noise of every layer differed from the
  one-pass (captured) path's on the same batch and generator (docs/noise.md promises identical
  noise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl
from curvlab._layout import MixedExamplesError

# --- 1. kfac's memory budget: numpy scalars, fractional budgets ---------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (6,), generator=g)


# float64 factors: layer 0 has A 3x3 and G 4x4, layer 2 has A 4x4 and G 3x3: (9 + 16) * 8 bytes each
_BLOCK = (3 * 3 + 4 * 4) * 8
_TOTAL = 2 * _BLOCK


@pytest.mark.parametrize("budget", [np.int64(_TOTAL), np.float32(_TOTAL), np.float64(1e9)])
def test_kfac_takes_numpy_budgets(budget: object) -> None:
    """A numpy budget the factors fit gives the factors of no budget at all; the brute force:
    the first layer's ``A`` is the mean outer product of the inputs (every example uses it)."""
    model, (X, y) = _mlp(), _batch()
    loss = nn.CrossEntropyLoss()
    got = cl.kfac(model, loss, (X, y), kind="exact", memory_budget=budget)
    ref = cl.kfac(model, loss, (X, y), kind="exact", memory_budget=None)
    assert got.info["factor_bytes"] == _TOTAL
    A = torch.einsum("ni,nj->ij", X, X) / X.shape[0]
    torch.testing.assert_close(got["0"].A, A, rtol=1e-12, atol=1e-14)
    for name in ref:
        assert torch.equal(got[name].A, ref[name].A) and torch.equal(got[name].G, ref[name].G)


def test_kfac_numpy_budget_over_the_factors_names_the_budget() -> None:
    """Over the budget by one byte: the budget refusal (not "must be a positive number")."""
    model, data = _mlp(), _batch()
    with pytest.raises(ValueError, match=rf"over memory_budget={_TOTAL - 1} bytes"):
        cl.kfac(model, nn.CrossEntropyLoss(), data, memory_budget=np.int64(_TOTAL - 1))
    with pytest.raises(
        ValueError, match=r"no selected layer's K-FAC factors fit memory_budget=150 "
    ):
        cl.kfac(model, nn.CrossEntropyLoss(), data, memory_budget=np.float64(150))


def test_kfac_fractional_budget_shown_as_given() -> None:
    """250.5 bytes (exact in float32) is shown as 250.5, in bytes and in the readable size."""
    model, data = _mlp(), _batch()
    with pytest.raises(ValueError) as info:
        cl.kfac(model, nn.CrossEntropyLoss(), data, memory_budget=np.float32(250.5))
    msg = str(info.value)
    assert "over memory_budget=250.5 bytes (250.5 B)" in msg, msg


@pytest.mark.parametrize("budget", [0, -1, True, float("nan"), "2GiB", torch.tensor(1000)])
def test_kfac_still_refuses_non_budgets(budget: object) -> None:
    model, data = _mlp(), _batch()
    with pytest.raises(ValueError, match="memory_budget must be a number of bytes"):
        cl.kfac(model, nn.CrossEntropyLoss(), data, memory_budget=budget)


def test_kfac_infinite_budget_is_no_limit() -> None:
    model, data = _mlp(), _batch()
    got = cl.kfac(model, nn.CrossEntropyLoss(), data, kind="exact", memory_budget=float("inf"))
    assert got.info["factor_bytes"] == _TOTAL


# --- 2. a coupling on batches without a batch axis names the axis (no attention layer) -----------


class _CentredOverAxis0(nn.Module):
    """Features centred over the first axis: over the batch for a batch ``(B, T, d)`` (a genuine
    coupling), over the positions of one unbatched sample ``(T, d)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x)
        return z - z.mean(0)


def _unbatched_loader() -> DataLoader:
    g = torch.Generator().manual_seed(2)
    X = torch.randn(3, 5, 3, generator=g, dtype=torch.float64)  # 3 samples of 5 positions
    y = torch.randint(0, 4, (3, 5), generator=g)
    return DataLoader(TensorDataset(X, y), batch_size=None)  # one (5, 3) sample per batch


def _centred() -> nn.Module:
    torch.manual_seed(0)
    return _CentredOverAxis0().double()


def _names_batch_axis_first(call) -> None:  # noqa: ANN001
    with pytest.raises(MixedExamplesError) as info:
        call()
    msg = str(info.value)
    assert msg.startswith("the batch most likely has no batch axis: data is a DataLoader"), msg
    assert "batch_size=B" in msg, msg  # the fix
    assert msg.index("no batch axis") < msg.index("LayerNorm"), msg  # before the coupling's advice


def test_kfac_unbatched_loader_names_the_batch_axis() -> None:
    _names_batch_axis_first(lambda: cl.kfac(_centred(), nn.CrossEntropyLoss(), _unbatched_loader()))


def test_kfac_unbatched_loader_one_example_chunks() -> None:
    """chunk_size=1: the check on two examples of the batch (kfac's other check)."""
    model, loader = _centred(), _unbatched_loader()
    _names_batch_axis_first(lambda: cl.kfac(model, nn.CrossEntropyLoss(), loader, chunk_size=1))


def test_fisher_trace_unbatched_loader_names_the_batch_axis() -> None:
    model, loader = _centred(), _unbatched_loader()
    _names_batch_axis_first(lambda: cl.fisher_trace(model, nn.CrossEntropyLoss(), loader, seed=0))
    # and through trace's exact per-example path (which calls fisher_trace)
    _names_batch_axis_first(
        lambda: cl.trace(model, nn.CrossEntropyLoss(), loader, matrix="fisher", method="exact")
    )


def test_fisher_norms_unbatched_loader_names_the_batch_axis() -> None:
    model, loader = _centred(), _unbatched_loader()
    _names_batch_axis_first(lambda: cl.fisher_norms(model, nn.CrossEntropyLoss(), loader))


def test_batched_loader_keeps_the_coupling_message() -> None:
    """The same model on real batches mixes the examples: the coupling message, no batch axis."""
    loader = DataLoader(_unbatched_loader().dataset, batch_size=3)
    for call in (
        lambda: cl.kfac(_centred(), nn.CrossEntropyLoss(), loader),
        lambda: cl.fisher_trace(_centred(), nn.CrossEntropyLoss(), loader, seed=0),
        lambda: cl.fisher_norms(_centred(), nn.CrossEntropyLoss(), loader),
    ):
        with pytest.raises(MixedExamplesError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith("the model mixes the examples of a batch: "), msg
        assert "batch axis" not in msg, msg


# --- 3. KFACNoise: a layer that did not run, one-pass and engine paths draw the same noise -------


class _Skip(nn.Module):
    """``extra`` does not run on this batch (conditional computation)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.extra, self.b = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class _Direct(nn.Module):
    """``a``'s weight and bias used directly by the parent: the layer never runs, yet its
    parameters have gradients (as ``nn.MultiheadAttention``'s ``out_proj``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(F.linear(x, self.a.weight, self.a.bias)))


def _noise(model_cls: type[nn.Module], path: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = model_cls().double()
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    sampler = cl.noise.KFACNoise("empirical", scale=1.0)
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, loss_fn, seed=3
    )
    noisy.zero_grad()
    loss_fn(model(X), y).backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if path == "one-pass":  # the same gradients again, measured inside the step's backward
        noisy.zero_grad()
        with noisy.capture():
            loss_fn(model(X), y).backward()
        noisy.step()
    else:  # a separate pass of the engine on the batch
        noisy.step(inputs=X, targets=y)
    return {n: p.grad - clean[n] for n, p in model.named_parameters() if p.grad is not None}


def test_kfac_noise_paths_agree_with_a_layer_that_did_not_run() -> None:
    one, engine = _noise(_Skip, "one-pass"), _noise(_Skip, "separate")
    assert set(one) == set(engine) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    for n in one:
        assert one[n].abs().max() > 0, n
        # the same factorisation of the same Gram matrices: equal up to float64 rounding
        torch.testing.assert_close(one[n], engine[n], rtol=1e-10, atol=1e-12)


def test_kfac_noise_engine_keeps_directly_used_weights_on_the_diagonal() -> None:
    """A layer that never runs but whose parameters the model uses directly keeps its diagonal
    noise on the engine path: the Fisher diagonal of ``a``'s weight, brute force, is nonzero."""
    torch.manual_seed(0)
    model = _Direct().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    state = cl.noise.KFACNoise("empirical", scale=1.0).estimate(
        model, nn.CrossEntropyLoss(), X, y, torch.Generator().manual_seed(0)
    )
    params = {n: p.detach() for n, p in model.named_parameters()}

    def nll(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return F.cross_entropy(out, t.unsqueeze(0))

    per_ex = torch.func.vmap(torch.func.grad(nll), in_dims=(None, 0, 0))(params, X, y)
    for n in ("a.weight", "a.bias"):
        diag = per_ex[n].pow(2).sum(0) / X.shape[0]  # empirical Fisher of the mean loss (1/N)
        torch.testing.assert_close(state["__diagonal__"][n], diag, rtol=1e-10, atol=1e-14)
        assert diag.abs().max() > 0
