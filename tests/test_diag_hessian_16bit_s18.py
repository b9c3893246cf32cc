"""BackPACK's Hessian diagonal of confident float16 classifiers (review s18).

Its loss-Hessian square-root factors (``sqrt(p (1 - p))``, 1e-5 and below) went through the
float16 backward pass as they were, and its residual terms took the float16 output gradient
(``p - onehot``, 0 where ``1 - p`` rounds to 0): the diagonal was 11% off or 0 without a word.
References: float64 Hessians by ``torch.func.hessian`` of the upcast model, whose weights and
inputs are exact in float16. ``u = 2^-11`` (float16's unit roundoff).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl

U16 = 2.0**-11


def _diag_hessians(fn, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float64 Hessian diagonal of ``fn(params)`` per parameter (dense ``torch.func``)."""
    out = {}
    for name, p in params.items():

        def one(q: torch.Tensor, name: str = name) -> torch.Tensor:
            return fn({**params, name: q})

        out[name] = torch.func.hessian(one)(p).reshape(p.numel(), p.numel()).diagonal()
    return {n: d.reshape(params[n].shape) for n, d in out.items()}


def _cross_entropy(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy written around each row's largest logit ``j`` (a constant
    index): ``log1p(sum_{k != j} exp(z_k - z_j)) + z_j - z_y``. torch's form differentiates
    through ``p - p^2``, which in float64 keeps ``1 - p ~ 3e-14`` to 0.3% only (6u: a float64
    reference no better than the float16 result)."""
    j = z.detach().argmax(1, keepdim=True)
    zj = z.gather(1, j)
    rest = torch.exp(z - zj).scatter(1, j, 0.0).sum(1)
    return (torch.log1p(rest) + zj[:, 0] - z.gather(1, y[:, None])[:, 0]).mean()


def _linear_case(s: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """float16 ``Linear(4, 3)`` with rows ``0, s (1, 2, 4, 8), -s (1, 2, 4, 8)`` and inputs in
    ``{-1, 1}``: the logits ``s k`` (``k`` odd, ``|k| <= 15``) are exact in float16, their
    differences at least ``s``, so every ``p (1 - p) <= e^-s``."""
    g = torch.Generator().manual_seed(3)
    m = nn.Linear(4, 3).half()
    row = torch.tensor([1.0, 2.0, 4.0, 8.0]) * s
    with torch.no_grad():
        m.weight.copy_(torch.stack([0 * row, row, -row]))
        m.bias.zero_()
    X = (2 * torch.randint(0, 2, (16, 4), generator=g) - 1).half()
    y = torch.randint(0, 3, (16,), generator=g)
    return m, X, y


@pytest.mark.parametrize("s", [14.0, 20.0, 28.0])
def test_fp16_confident_linear_classifier_hessian_diagonal(s: float) -> None:
    """Gave a sum 11% off (``s = 14``: 8.37e-9 for 9.46e-9 in the review's case) and 0 (``s =
    20, 28``). ``H = GGN`` here, each entry a sum of nonnegative terms ``x^2 S^2``, ``x = +-1``:
    the factors ``S`` are float32 from exact logits (``2^-24``), rounded once to float16 after
    their power-of-two scaling (``u``), squared (``2u + u^2``) and summed in float32: within
    ``3u`` of the float64 entry, each entry."""
    m, X, y = _linear_case(s)
    lf = nn.CrossEntropyLoss()
    w64, b64, X64 = m.weight.double(), m.bias.double(), X.double()
    assert torch.equal(m(X).double(), X64 @ w64.T + b64)  # the float16 forward pass is exact

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return _cross_entropy(X64 @ p["weight"].T + p["bias"], y)

    ref = _diag_hessians(loss, {"weight": w64.detach(), "bias": b64.detach()})
    assert 0 < float(ref["bias"].max()) < 2.0**-14  # below float16's smallest normal number
    got = cl.diag_hessian(m, lf, (X, y))
    assert got.backend == "backpack"
    for name, r in ref.items():
        assert (r > 0).all()
        err = (got[name].double() - r).abs()
        assert (err <= 3 * U16 * r).all(), (name, float((err / r).max()) / U16)


A = 2.068359375
"""An exact float16 pre-activation whose float16 ``tanh`` is ``31/32``: then ``tanh' = 1 - h^2 =
63/1024`` and ``tanh'' = -2 h (1 - h^2) = -1953/16384``, which BackPACK forms from ``h`` in
float16, are exact too."""


def _tanh_case() -> tuple[nn.Sequential, torch.Tensor]:
    """A float16 ``Linear(4, 4) -> Tanh -> Linear(4, 3)``, the first weight ``A I``, the second's
    rows ``0, 32 (1, 1, 1, 2), -32 (1, 1, 1, 2)``, and the 16 inputs of ``{-1, 1}^4``: hidden
    values ``+-31/32``, logits ``31 k`` (``k`` odd, ``|k| <= 5``), all exact in float16, their
    differences at least 31 (``p (1 - p) < 4e-14``)."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).half()
    row = torch.tensor([1.0, 1.0, 1.0, 2.0]) * 32
    with torch.no_grad():
        net[0].weight.copy_(A * torch.eye(4))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.stack([0 * row, row, -row]))
        net[2].bias.zero_()
    X = torch.tensor(
        [[a, b, c, d] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1) for d in (-1, 1)]
    )
    return net, X.half()


def test_fp16_confident_tanh_classifier_hessian_diagonal_with_residuals() -> None:
    """A curved layer: the first layer's residual ``f''(a) (W^T r) x^2`` took the float16 ``r``
    (0 at ``1 - p ~ 3e-14``) and the Gauss-Newton parts the flushed factors: 0 for entries of
    1e-14 to 3e-13 (a fifth of the largest is residual: the test fails without it).

    The reference's activation is ``tanh(a + c)``, ``c = atanh(31/32) - a`` a constant: its
    value is the float16 model's ``h`` (so the logits and ``p`` are the same), its derivatives
    those BackPACK takes from ``h``. Rounding left (float16 unless said): the second layer's
    entries are sums of nonnegative ``h^2 S^2`` (``S`` float32, cast once: ``3u``, as for the
    linear model); the first layer's Gauss-Newton factors ``tanh' W^T S`` take the cast of
    ``S``, the sum of ``W^T S`` and the product with ``tanh'`` (``3u``, squared ``6u +``), the
    residual ``tanh'' W^T r`` the cast of ``r``, the sum and the product (``3u``), its square
    root (``2u``) squared (``5u +``): within ``8u`` of ``GGN + sum_n |R_n|``, entry by entry
    (the examples' residuals cancel in some entries)."""
    net, X = _tanh_case()
    h16 = torch.tanh(A * X.double()).to(torch.float16).double()
    assert (h16.abs() == 31 / 32).all()
    y = net(X).argmax(1)  # every example classified right, confidently
    lf = nn.CrossEntropyLoss()
    X64 = X.double()
    params = {n: p.detach().double() for n, p in net.named_parameters()}
    z = h16 @ params["2.weight"].T
    assert torch.equal(net(X).double(), z)  # the float16 forward pass is exact
    assert float(z.topk(2, dim=1).values.diff(dim=1).abs().min()) >= 31
    shift = torch.atanh(h16) - A * X64  # a constant: tanh(a + shift) = h, as in float16

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.tanh(X64 @ p["0.weight"].T + p["0.bias"] + shift)
        return _cross_entropy(h @ p["2.weight"].T + p["2.bias"], y)

    ref = _diag_hessians(loss, params)
    ggn, spread = _first_layer_parts(params["2.weight"], h16, y)
    residual = ref["0.bias"] - ggn  # of the bias and (x^2 = 1) each weight
    assert (residual.abs() > 0.2 * ggn).any()  # a large part of it
    got = cl.diag_hessian(net, lf, (X, y))
    assert got.backend == "backpack"
    for name in ("2.weight", "2.bias"):
        r = ref[name]
        assert (r > 0).all() and float(r.max()) < 6e-8  # below float16's smallest subnormal
        err = (got[name].double() - r).abs()
        assert (err <= 3 * U16 * r).all(), (name, float((err / r).max()) / U16)
    bound = 8 * U16 * (ggn + spread)
    for name in ("0.weight", "0.bias"):
        err = (got[name].double() - ref[name]).abs()
        assert (err <= bound.reshape(-1, *([1] * (err.ndim - 1)))).all(), name


def _first_layer_parts(
    W2: torch.Tensor, h: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the first bias's Hessian diagonal (float64, the mean loss): the Gauss-Newton part
    ``(1/N) sum_n diag(J_n^T Lambda_n J_n)``, ``J_n = W2 diag(1 - h_n^2)``, and the examples'
    residuals' magnitudes ``(1/N) sum_n |tanh''_n (W2^T r_n)|``, ``r_n = p_n - e_{y_n}`` (taken
    as ``-sum_{c != y} p_c`` at ``y``)."""
    p = torch.softmax(h @ W2.T, dim=1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    J = W2[None] * (1 - h**2)[:, None, :]
    ggn = torch.einsum("nci,ncd,ndi->i", J, lam, J) / len(y)
    others = p.scatter(1, y[:, None], 0.0)
    r = others.scatter(1, y[:, None], -others.sum(1, keepdim=True))
    second = -2 * h * (1 - h**2)
    return ggn, (second * (r @ W2)).abs().sum(0) / len(y)
