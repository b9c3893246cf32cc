"""``cl.trace(method="exact")`` checks ``num_probes`` as every other method does, before the data.

Found in review: ``check_trace_args`` returned in the exact branch before the positive-int check,
so ``num_probes="x"``, ``-3``, ``0``, ``2.5`` or ``True`` were accepted without a word.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import curvlab as cl

DT = torch.float64


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X = torch.randn(6, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (6,), generator=g)
    return model, X, y


@pytest.mark.parametrize("num_probes", ["x", -3, 0, 2.5, True, None])
@pytest.mark.parametrize("method", ["exact", "hutchinson", "hutch++", "block"])
def test_a_bad_num_probes_is_refused_before_the_data(method: str, num_probes: object) -> None:
    model, X, y = _problem()
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="num_probes must be a positive int"):
        cl.trace(model, nn.CrossEntropyLoss(), (X, y), method=method, num_probes=num_probes)
    assert calls == []


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_exact_with_a_valid_num_probes_is_the_exact_trace(matrix: str) -> None:
    """A positive int is still accepted (and unused): the value is the dense float64 trace."""
    model, X, y = _problem()
    loss_fn = nn.CrossEntropyLoss()
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)

    if matrix == "hessian":
        H = hessian(lambda p: loss_fn(functional_call(model, p, (X,)), y))(params)
        want = sum(float(H[n][n].reshape(params[n].numel(), -1).diagonal().sum()) for n in names)
    else:  # GGN = Jᵀ (∂²L/∂f²) J, from the dense Jacobian of the outputs
        f = functional_call(model, params, (X,))
        jac = torch.func.jacrev(lambda p: functional_call(model, p, (X,)))(params)
        J = torch.cat([jac[n].reshape(f.numel(), -1) for n in names], dim=1)
        Hf = hessian(lambda z: loss_fn(z.reshape(f.shape), y))(f.reshape(-1))
        want = float(torch.trace(J.T @ Hf @ J))
    for num_probes in (1, 7):
        got = cl.trace(
            model, loss_fn, (X, y), matrix=matrix, method="exact", num_probes=num_probes
        ).value
        # float64 sums of at most ~40 terms of size O(1): far below 1e-10 relative
        assert got == pytest.approx(want, rel=1e-10)
