"""The exact GGN's square-root columns of a float16 model, scaled by powers of two (review s19).

1. The power of two that brings a column's largest entry to ``[0.5, 1)`` overflowed float32
   where that entry is below ``2^-128``: a confident example's column of its likely class ``c``
   holds ``-p_j sqrt(p_c) ~ p_j``, at a margin of 89 or more below ``2^-128``; ``2^128`` is inf
   in float32 and ``inf * 0`` NaN. ``kfac(kind="exact")`` (one scale per column over a chunk:
   every example of the chunk that confident) and the func backend's exact GGN diagonal and
   square root (one example that confident in the batch) raised ``NonFiniteError``.
2. ``fisher_norms(kind="exact")`` of a float16 model went through BackPACK's ``SqrtGGNExact``,
   whose loss Hessian square roots were formed in float16 (``p = 6e-9`` is 0 there): exactly 0.0
   for a classifier at a margin of 19.

The float64 references use the float16 model's own hidden layer and logits (exact in float64),
so what they leave to the library is the loss Hessian, its square roots and the last layer's
Jacobian; ``Lambda_n = diag(p) - p p^T`` with ``p_i (1 - p_i)`` taken without forming ``1 - p_i``
(float64's ``1 - p_c`` is 0 at these margins).

Tolerances: a scaled column is rounded to float16 once (``u = 2^-11`` relative) and, on the func
backend, its product with the hidden layer in the float16 backward pass once more: a factor's
entries within ``2u``, a sum of their products within ``4u`` of the sum of their magnitudes
(float32 sums add ``2^-20`` at most). Values below float32's normal range (``2^-126``) are
rounded to multiples of ``2^-149``: each product and each scaling of such a value within
``2^-150``, counted where the references are that small.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvlab as cl

U = 2.0**-11  # float16's unit roundoff
RTOL = 4 * U + 2.0**-20


def _model(x0: list[float]) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float16 classifier ``Linear(3, 3) -> Tanh -> Linear(3, 3)`` whose class-0 logit is
    ``100 tanh(x_0)``, the others 0 (a margin of ``100 tanh(x_0)``); inputs and labels."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[0].bias.zero_()
        model[2].weight.zero_()
        model[2].weight[0, 0] = 100.0
        model[2].bias.zero_()
    n = len(x0)
    rest = torch.rand(n, 2, generator=torch.Generator().manual_seed(0)) - 0.5
    X = torch.cat([torch.tensor(x0)[:, None], rest], 1)
    return model.half(), X.half(), torch.zeros(n, dtype=torch.long)


def _loss_hessians(f: torch.Tensor) -> torch.Tensor:
    """``(n, C, C)`` float64 Hessians of the per-example cross-entropy at the logits ``f``."""
    logp = torch.log_softmax(f, 1)
    C = f.shape[1]
    others = torch.stack(
        [torch.logsumexp(f[:, [j for j in range(C) if j != i]], 1) for i in range(C)], 1
    )
    log1mp = others - torch.logsumexp(f, 1, keepdim=True)  # log(1 - p_i), no cancellation
    H = -torch.exp(logp[:, :, None] + logp[:, None, :])
    diag = torch.exp(logp + log1mp)
    return H - torch.diag_embed(H.diagonal(dim1=1, dim2=2)) + torch.diag_embed(diag)


def _sqrt_columns(f: torch.Tensor) -> torch.Tensor:
    """``(n, C, K)`` float64 square roots ``S_n`` (column ``k`` = ``sqrt(p_k) (e_k - p)``), the
    ones curvlab and BackPACK take, with ``sqrt(p_k) (1 - p_k)`` formed without ``1 - p_k``."""
    p = torch.softmax(f, 1)
    sq = p.sqrt()
    S = -p[:, :, None] * sq[:, None, :]
    one_minus = torch.diagonal(_loss_hessians(f), dim1=1, dim2=2) / p  # 1 - p_k
    return S - torch.diag_embed(S.diagonal(dim1=1, dim2=2)) + torch.diag_embed(sq * one_minus)


def _check_hessians(f: torch.Tensor, y: torch.Tensor, H: torch.Tensor) -> None:
    """The references against torch.func's Hessian where it has no cancellation (off the
    diagonal), and ``S S^T = Lambda``."""

    def nll(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(z[None], t[None], reduction="sum")

    auto = torch.func.vmap(torch.func.hessian(nll))(f, y)
    off = ~torch.eye(f.shape[1], dtype=torch.bool)
    assert torch.allclose(H[:, off], auto[:, off], rtol=1e-12, atol=0)
    S = _sqrt_columns(f)
    assert torch.allclose(S @ S.transpose(1, 2), H, rtol=1e-12, atol=1e-300)


def _confident() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Every example at a margin of 89.6 to 92.2: ``p_j`` from ``1.2e-39`` down to ``9e-41``,
    below ``2^-128`` and above ``2^-149 / 2^-11`` (float32's subnormals resolve them)."""
    return _model([1.45, 1.5, 1.55, 1.6])


def _mixed() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Margins of 1, -2 and 3, and one example at 92.2."""
    return _model([0.01, -0.02, 0.03, 1.6])


def _margin_19() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Margins of 19 to 24 (``p_j`` from ``5.6e-9``: 0 in float16) and one example at 92.2."""
    return _model([0.1923, 0.2132, 0.2448, 1.6])


def _logits(model: nn.Module, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model[:2](X).double(), model(X).double()


def test_reference_square_roots():
    model, X, y = _confident()
    _, f = _logits(model, X)
    _check_hessians(f, y, _loss_hessians(f))
    model, X, y = _mixed()
    _, f = _logits(model, X)
    _check_hessians(f, y, _loss_hessians(f))


@pytest.mark.parametrize("which", ["confident", "mixed"])
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_kfac_exact_G_of_confident_float16_examples(which, chunk_size):
    model, X, y = _confident() if which == "confident" else _mixed()
    _, f = _logits(model, X)
    margins = f[:, 0] - f[:, 1:].amax(1)
    assert margins.max() > 89  # p_j < 2^-128: the old scale 2^128 was inf
    H = _loss_hessians(f)
    want = H.mean(0)  # the last layer's G: (1/N) sum_n Lambda_n (its output is the model's)
    got = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact", chunk_size=chunk_size)
    G = got["2"].G.double()
    assert torch.isfinite(got["0"].G).all()
    # K = 3 columns: each product of a subnormal value within 2^-150, the 1/N within 2^-150
    bound = RTOL * H.abs().mean(0) + 4 * 2.0**-150
    assert ((G - want).abs() <= bound).all(), (G, want)


def _last_layer_rows(
    h: torch.Tensor, f: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last layer's (weight, then bias) GGN square-root rows ``v_nk = J_n^T s_nk``
    (``(n K, C H + C)``), its GGN ``F = (1/N) sum v v^T`` and ``B = (1/N) sum |v| |v|^T``."""
    S = _sqrt_columns(f)  # (n, C, K)
    n, C, K = S.shape
    rows = torch.cat(
        [
            (S.transpose(1, 2)[:, :, :, None] * h[:, None, None, :]).reshape(n, K, -1),
            S.transpose(1, 2),
        ],
        2,
    ).reshape(n * K, -1)
    return rows, rows.T @ rows / n, rows.abs().T @ rows.abs() / n


@pytest.mark.parametrize("which", ["confident", "mixed"])
@pytest.mark.parametrize("what", ["diag_fisher func", "diag_fisher auto", "diag_hessian auto"])
def test_exact_diagonals_of_confident_float16_examples(which, what):
    model, X, y = _confident() if which == "confident" else _mixed()
    h, f = _logits(model, X)
    _, F, B = _last_layer_rows(h, f)
    # the last layer is linear in its parameters: its Hessian block is its GGN block
    quantity, backend = what.split()
    fn = cl.diag_fisher if quantity == "diag_fisher" else cl.diag_hessian
    kw = {"kind": "exact"} if quantity == "diag_fisher" else {}
    got = fn(model, nn.CrossEntropyLoss(), (X, y), backend=backend, **kw)
    assert all(torch.isfinite(v).all() for v in got.values())
    assert all(v.abs().sum() > 0 for v in got.values())  # the scale^2 of 2^64 was inf: all 0
    d = torch.cat([got["2.weight"].double().flatten(), got["2.bias"].double()])
    # each square of a subnormal value within 2^-150, n K = 12 of them, and the 1/N
    bound = RTOL * B.diagonal() + 13 * 2.0**-150
    assert ((d - F.diagonal()).abs() <= bound).all(), (d, F.diagonal())


@pytest.mark.parametrize("backend", ["auto", "func"])
def test_fisher_norms_exact_of_a_confident_float16_classifier(backend):
    model, X, y = _margin_19()
    model[0].requires_grad_(False)  # the last layer's Fisher, whose rows the test forms
    h, f = _logits(model, X)
    _, F, B = _last_layer_rows(h, f)
    got = cl.fisher_norms(model, nn.CrossEntropyLoss(), (X, y), kind="exact", backend=backend)
    # |F^ - F| <= 4u B entrywise (rows within 2u), so the norms within 4u ||B||
    frob, diag = float(F.norm()), float(F.diagonal().norm())
    assert abs(got.frobenius - frob) <= RTOL * float(B.norm()), (got.frobenius, frob)
    assert abs(got.diag_frobenius - diag) <= RTOL * float(B.diagonal().norm()), (
        got.diag_frobenius,
        diag,
    )


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
@pytest.mark.parametrize("which", ["confident", "mixed"])
def test_exact_traces_of_confident_float16_examples(matrix, which):
    """The operators' output-side scaling (``_output_scale``) of a column whose largest entry is
    a float32 subnormal overflowed to ``inf`` (``inf * 0 = NaN``: a false ``NonFiniteError``);
    kept to float32's normal powers of two, the exact traces follow the float64 model with the
    same (float16) weights. Tolerance: the float16 forward pass (hidden layer and logits rounded,
    ``u`` each, the margin near 90 moving ``p`` by up to ``90 u`` relative), 5% here."""
    model, X, y = _confident() if which == "confident" else _mixed()
    loss = nn.CrossEntropyLoss(reduction="sum")
    ref = cl.trace(
        copy.deepcopy(model).double(), loss, (X.double(), y), matrix=matrix, method="exact"
    ).value
    got = cl.trace(model, loss, (X, y), matrix=matrix, method="exact").value
    assert ref > 0 and abs(got - ref) <= 0.05 * ref
