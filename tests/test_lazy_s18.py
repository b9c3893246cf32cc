"""Models with lazy (uninitialized) modules: refused by every entry point before any pass (review
s18: ``analyze`` left them materialized with fresh random weights, the others failed inside torch
with "Can't access the shape of an uninitialized parameter"); once materialized, measured as their
plain twins."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy

import curvlab as cl


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (6,), generator=g
    )


CALLS = {
    "diag_fisher": lambda m, d: cl.diag_fisher(m, nn.CrossEntropyLoss(), d, kind="exact"),
    "diag_hessian": lambda m, d: cl.diag_hessian(m, nn.CrossEntropyLoss(), d),
    "gradient_stats": lambda m, d: cl.gradient_stats(m, nn.CrossEntropyLoss(), d),
    "fisher_norms": lambda m, d: cl.fisher_norms(m, nn.CrossEntropyLoss(), d),
    "kfac": lambda m, d: cl.kfac(m, nn.CrossEntropyLoss(), d, kind="exact"),
    "trace": lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, num_probes=3),
    "eigenvalues": lambda m, d: cl.eigenvalues(m, nn.CrossEntropyLoss(), d),
    "spectral_density": lambda m, d: cl.spectral_density(m, nn.CrossEntropyLoss(), d, num_steps=4),
    "curvature_operator": lambda m, d: cl.curvature_operator(m, nn.CrossEntropyLoss(), d),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_lazy_model_is_refused_and_left_lazy(name: str) -> None:
    model = nn.Sequential(nn.LazyLinear(3, dtype=torch.float64))
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"uninitialized \(lazy\).*'0\.weight'.*forward pass"):
        CALLS[name](model, _batch())
    assert isinstance(model[0], nn.LazyLinear) and is_lazy(model[0].weight)
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_lazy_buffer_alone_is_named() -> None:
    model = nn.Sequential(nn.Linear(5, 3, dtype=torch.float64), nn.LazyBatchNorm1d(affine=False))
    model.eval()
    with pytest.raises(ValueError, match=r"'1\.running_mean', '1\.running_var'"):
        cl.diag_fisher(model, nn.CrossEntropyLoss(), _batch())


def test_a_materialized_lazy_model_is_its_plain_twin() -> None:
    torch.manual_seed(0)
    lazy = nn.Sequential(nn.LazyLinear(4, dtype=torch.float64), nn.Tanh(), nn.Linear(4, 3).double())
    X, y = _batch()
    lazy(X)  # the user's first forward pass materializes it
    twin = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    twin.load_state_dict(lazy.state_dict())
    got = cl.diag_fisher(lazy, nn.CrossEntropyLoss(), (X, y), kind="exact")
    params = dict(twin.named_parameters())

    # brute force: the GGN diagonal J^T H_out J of the mean loss, per example
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    diag = torch.zeros_like(flat)
    for n in range(len(y)):

        def out(v: torch.Tensor, n: int = n) -> torch.Tensor:
            chunks, i = {}, 0
            for k, p in params.items():
                chunks[k] = v[i : i + p.numel()].view_as(p)
                i += p.numel()
            return torch.func.functional_call(twin, chunks, (X[n : n + 1],))[0]

        J = torch.func.jacrev(out)(flat)  # (C, D)
        p_n = torch.softmax(out(flat), 0)
        H = torch.diag(p_n) - torch.outer(p_n, p_n)
        diag += torch.einsum("cd,ce,ed->d", J, H, J) / len(y)
    want, i = {}, 0
    for n, p in params.items():
        want[n] = diag[i : i + p.numel()].view_as(p)
        i += p.numel()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14)
