"""Review of the operators and leave-no-trace (ninth sweep): each case was wrong or unclear.

* weight normalisation (``parametrizations.weight_norm`` and ``nn.utils.weight_norm``, dim 0/1,
  Linear and Conv): torch's double backward of ``torch._weight_norm`` is wrong on CPU, so the
  Hessian (operator, exact trace, ``diag_hessian``'s columns) was off by 16-48%;
* buffers: train-mode forward passes inside curvlab's calls updated ``InstanceNorm`` running
  statistics and ``spectral_norm``'s power-iteration vectors of the user's model, and an operator
  over several batches was not one fixed matrix (every product's forward took another step);
  chunked one-pass quantities depended on the chunking the same way;
* ``nn.Embedding(scale_grad_by_freq=True)``: autograd's rescaled gradient made every matrix that
  of another objective (Hessian 42% off, GGN 15%, empirical Fisher 12%);
* ``nn.EmbeddingBag`` in the operators: torch's raw "derivative ... not implemented" instead of
  curvlab's message with the way out;
* ``kfac`` merged two weight-normalised layers into one block (it keyed layers by the ``id`` of a
  computed weight, which a later one reuses).

References: float64 brute force (``torch.func.hessian`` / ``jacrev``) of hand-written functions of
the flat parameters.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations as P

import curvlab as cl
from curvlab.operators._matrices import missing_derivative

DT = torch.float64


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Flat:
    """The trainable parameters of ``model`` as one flat vector (``named_parameters`` order)."""

    def __init__(self, model: nn.Module) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()

    def split(self, theta: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for n, s in zip(self.names, self.shapes):
            out[n] = theta[start : start + s.numel()].reshape(s)
            start += s.numel()
        return out


def _ce_matrices(
    out: Callable[[Tensor], Tensor], theta: Tensor, y: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Hessian, GGN and empirical Fisher of ``mean_n CE(out(theta)_n, y_n)`` (dense float64)."""
    n = y.shape[0]
    H = torch.func.hessian(lambda t: F.cross_entropy(out(t), y))(theta)
    J = torch.func.jacrev(out)(theta)  # (n, C, D)
    p = out(theta).detach().softmax(1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("ncd,nce,nef->df", J, lam, J) / n
    g = torch.func.jacrev(lambda t: F.cross_entropy(out(t), y, reduction="none"))(theta)
    return H, G, g.T @ g / n


# --------------------------------------------------------------------------- weight_norm (O1)
WN_CASES = ["linear_dim0", "linear_dim1", "conv_dim0", "old_linear_dim0", "old_conv_dim1"]


def _wn(v: Tensor, g: Tensor, dim: int) -> Tensor:
    dims = [d for d in range(v.ndim) if d != dim]
    return g * v / v.pow(2).sum(dims, keepdim=True).sqrt()


def _weight_norm_problem(case: str) -> tuple[nn.Module, Tensor, Tensor, Callable]:
    torch.manual_seed(1)
    conv = "conv" in case
    base = nn.Conv2d(2, 3, 2) if conv else nn.Linear(3, 4)
    dim = 1 if case.endswith("dim1") else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.utils.weight_norm is deprecated
        layer = nn.utils.weight_norm(base, dim=dim) if case.startswith("old") else None
    if layer is None:
        layer = P.weight_norm(base, dim=dim)
    width = 12 if conv else 4
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(width, 3)).to(DT)
    X = torch.randn(6, 2, 3, 3, dtype=DT) if conv else torch.randn(6, 3, dtype=DT)
    y = torch.randint(0, 3, (6,))
    flat = Flat(model)
    gname, vname = (
        ("0.weight_g", "0.weight_v")
        if case.startswith("old")
        else ("0.parametrizations.weight.original0", "0.parametrizations.weight.original1")
    )

    def out(theta: Tensor) -> Tensor:
        d = flat.split(theta)
        W = _wn(d[vname], d[gname], dim)
        h = F.conv2d(X, W, d["0.bias"]) if conv else F.linear(X, W, d["0.bias"])
        return F.linear(torch.tanh(h).flatten(1), d["3.weight"], d["3.bias"])

    return model, X, y, (out, flat.theta)


@pytest.mark.parametrize("case", WN_CASES)
def test_weight_norm_hessian_equals_bruteforce(case: str) -> None:
    model, X, y, (out, theta) = _weight_norm_problem(case)
    loss_fn = nn.CrossEntropyLoss()
    assert float(loss_fn(model(X), y).detach()) == pytest.approx(
        float(F.cross_entropy(out(theta), y))
    )
    H, G, _ = _ce_matrices(out, theta, y)
    weight_before = model[0].__dict__.get("weight")  # the old flavour's computed attribute
    op = cl.curvature_operator(model, loss_fn, (X, y), "hessian")
    assert _rel(op.to_dense(), H) < 1e-10
    assert "weight_norm" in op.info["hessian"]
    residual = cl.curvature_operator(model, loss_fn, [(X[:2], y[:2]), (X[2:], y[2:])], "residual")
    assert _rel(residual.to_dense(), H - G) < 1e-10
    diag = cl.diag_hessian(model, loss_fn, (X, y), backend="columns")
    flat_diag = torch.cat([diag[n].reshape(-1) for n in Flat(model).names])
    assert torch.allclose(flat_diag, H.diagonal(), rtol=1e-9, atol=1e-12)
    exact = cl.trace(model, loss_fn, (X, y), method="exact").value
    assert exact == pytest.approx(float(H.trace()), rel=1e-9, abs=1e-12)
    assert model[0].__dict__.get("weight") is weight_before  # put back as it was
    if case.startswith("old"):  # the user's own pre-hook is back in place
        (hook,) = model[0]._forward_pre_hooks.values()
        assert type(hook).__name__ == "WeightNorm"
    else:
        assert not model[0].parametrizations.weight[0]._forward_hooks


# --------------------------------------------------------------------------- buffers (O2)
def _spectral_problem() -> tuple[nn.Module, Tensor, Tensor]:
    """A train-mode spectral_norm layer whose weight moved since the last power step (a GAN
    discriminator after an optimizer step)."""
    torch.manual_seed(0)
    model = nn.Sequential(P.spectral_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    with torch.no_grad():
        model[0].parametrizations.weight.original.add_(torch.randn(4, 3, dtype=DT))
    X, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 3, (8,))
    return model, X, y


def _spectral_out(model: nn.Module, X: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """The function every train-mode forward pass computes now: one power step from the buffers
    as they are (u, v then held fixed, as torch's no_grad power method does)."""
    sn = model[0].parametrizations.weight[0]
    W0 = model[0].parametrizations.weight.original.detach()
    u = F.normalize(W0 @ sn._v, dim=0, eps=sn.eps)
    v = F.normalize(W0.T @ u, dim=0, eps=sn.eps)
    flat = Flat(model)

    def out(theta: Tensor) -> Tensor:
        d = flat.split(theta)
        W = d["0.parametrizations.weight.original"]
        h = torch.tanh(F.linear(X, W / (u @ (W @ v)), d["0.bias"]))
        return F.linear(h, d["2.weight"], d["2.bias"])

    return out, flat.theta


def _state(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    return {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def _assert_state_kept(model: nn.Module, before: dict[str, tuple[Tensor, Tensor]]) -> None:
    now = model.state_dict(keep_vars=True)
    assert now.keys() == before.keys()
    for k, (obj, value) in before.items():
        assert now[k] is obj, k
        assert torch.equal(now[k].detach(), value), k


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_spectral_norm_train_operator_is_one_fixed_matrix(matrix: str) -> None:
    model, X, y = _spectral_problem()
    twin = copy.deepcopy(model)
    out, theta = _spectral_out(model, X)
    H, G, _ = _ce_matrices(out, theta, y)
    ref = H if matrix == "hessian" else G
    before = _state(model)
    data = [(X[:3], y[:3]), (X[3:4], y[3:4]), (X[4:], y[4:])]  # graphs rebuilt every product
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, matrix)
    first, second = op.to_dense(), op.to_dense()
    assert _rel(first, ref) < 1e-10
    assert _rel(second, ref) < 1e-10
    _assert_state_kept(model, before)
    loss_fn = nn.CrossEntropyLoss()
    assert float(loss_fn(model(X), y)) == float(loss_fn(twin(X), y))  # the user's next step


def test_forward_mode_products_leave_the_running_statistics_alone() -> None:
    """GGN products in forward mode (Hardsigmoid has no double backward) on a train-mode
    InstanceNorm that tracks running statistics: every forward pass (also inside ``jvp``, where
    torch.func refuses in-place writes to outside tensors) runs on copies of them; the matrix is
    the brute-force GGN and the statistics are as before."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4),
        nn.Unflatten(1, (2, 2)),
        nn.InstanceNorm1d(2, track_running_stats=True),
        nn.Flatten(),
        nn.Hardsigmoid(),
        nn.Linear(4, 3),
    ).to(DT)
    X, y = 2 * torch.randn(8, 3, dtype=DT), torch.randint(0, 3, (8,))
    data = [(X[:3], y[:3]), (X[3:4], y[3:4]), (X[4:], y[4:])]
    flat = Flat(model)

    def out_of(Xb: Tensor) -> Callable[[Tensor], Tensor]:
        def out(theta: Tensor) -> Tensor:
            d = flat.split(theta)
            h = F.linear(Xb, d["0.weight"], d["0.bias"]).view(-1, 2, 2)
            h = F.instance_norm(h, eps=1e-5).flatten(1)  # train mode: the instance's statistics
            return F.linear((h + 3).clamp(0, 6) / 6, d["5.weight"], d["5.bias"])

        return out

    G = sum(_ce_matrices(out_of(Xb), flat.theta, yb)[1] * len(yb) for Xb, yb in data) / 8
    before = _state(model)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, "ggn")
    # torch's Hardsigmoid derivative is 1/6 rounded to float32 (3e-8), also in float64
    assert _rel(op.to_dense(), G) < 1e-7
    assert "jacobian" in op.info
    _assert_state_kept(model, before)


def _norms_problem() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 2),
        nn.InstanceNorm2d(2, affine=True, track_running_stats=True),
        nn.Tanh(),
        nn.Flatten(),
        P.spectral_norm(nn.Linear(18, 4)),
        nn.Tanh(),
        nn.Linear(4, 3),
    ).to(DT)
    with torch.no_grad():
        model[4].parametrizations.weight.original.add_(torch.randn(4, 18, dtype=DT))
    X, y = 3 * torch.randn(6, 1, 4, 4, dtype=DT) + 1, torch.randint(0, 3, (6,))
    return model, X, y


ENTRY_POINTS: dict[str, Callable] = {
    "trace": lambda m, lf, d: cl.trace(m, lf, d, num_probes=3),
    "eigenvalues": lambda m, lf, d: cl.eigenvalues(m, lf, d, k=1, max_matvecs=12),
    "spectral_density": lambda m, lf, d: cl.spectral_density(m, lf, d, num_steps=5),
    "fisher_trace": lambda m, lf, d: cl.fisher_trace(m, lf, d),
    "operator": lambda m, lf, d: cl.curvature_operator(m, lf, d, "ggn").to_dense(),
    "kfac": lambda m, lf, d: cl.kfac(m, lf, d),
    "diag_hessian": lambda m, lf, d: cl.diag_hessian(m, lf, d),
    "diag_fisher": lambda m, lf, d: cl.diag_fisher(m, lf, d, kind="exact"),
    "gradient_stats": lambda m, lf, d: cl.gradient_stats(m, lf, d),
    "fisher_norms": lambda m, lf, d: cl.fisher_norms(m, lf, d),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_train_mode_buffers_are_left_as_they_were(entry: str) -> None:
    model, X, y = _norms_problem()
    twin = copy.deepcopy(model)
    before = _state(model)
    ENTRY_POINTS[entry](model, nn.CrossEntropyLoss(), [(X[:4], y[:4]), (X[4:], y[4:])])
    _assert_state_kept(model, before)
    with torch.no_grad():
        assert torch.equal(model.eval()(X), twin.eval()(X))


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_chunking_does_not_change_one_pass_quantities(kind: str) -> None:
    model, X, y = _spectral_problem()
    out, theta = _spectral_out(model, X)
    _, G, EF = _ce_matrices(out, theta, y)
    ref = (G if kind == "exact" else EF).diagonal()
    names = Flat(model).names
    for chunk_size in (None, 3):
        res = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), kind=kind, chunk_size=chunk_size)
        got = torch.cat([res[n].reshape(-1) for n in names])
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-13), chunk_size


def test_kfac_keeps_weight_normalised_layers_apart() -> None:
    """Old code: some layers' factors were merged into another's, depending on which ids Python
    reused. Since review s17 weight-normalised layers get no factors (those of the computed
    weight are not the trained parameters' block): every one is left out, each under its own
    name, every call alike."""
    torch.manual_seed(0)
    widths = [4, 4, 4, 4, 4, 4, 3]
    layers: list[nn.Module] = []
    for i in range(6):
        layers += [P.weight_norm(nn.Linear(widths[i], widths[i + 1])), nn.Tanh()]
    wn = nn.Sequential(*layers[:-1]).to(DT)
    X, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    for _ in range(3):
        with pytest.raises(ValueError, match="no Linear") as err:
            cl.kfac(wn, nn.CrossEntropyLoss(), (X, y), kind="exact")
        for i in range(0, 11, 2):  # each layer named with its own parameters
            assert (
                f"layer '{i}' is left out: its weight is computed from "
                f"'{i}.parametrizations.weight.original0'"
            ) in str(err.value)


# --------------------------------------------------------------------------- scale_grad_by_freq (O3)
class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3, scale_grad_by_freq=True)
        self.fc = nn.Linear(3, 3)

    def forward(self, idx: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.emb(idx)).mean(1))


def _freq_problem() -> tuple[nn.Module, Tensor, Tensor, Callable, Tensor]:
    torch.manual_seed(0)
    model = Bag().to(DT)
    X, y = torch.randint(0, 6, (8, 3)), torch.randint(0, 3, (8,))
    X[0] = 2  # an index three times in one example
    flat = Flat(model)

    def out(theta: Tensor) -> Tensor:
        d = flat.split(theta)
        return F.linear(torch.tanh(d["emb.weight"][X]).mean(1), d["fc.weight"], d["fc.bias"])

    return model, X, y, out, flat.theta


@pytest.mark.parametrize("keep_graph", [True, False])
def test_scale_grad_by_freq_matrices_are_those_of_the_loss(keep_graph: bool) -> None:
    model, X, y, out, theta = _freq_problem()
    H, G, EF = _ce_matrices(out, theta, y)
    data = [(X[:5], y[:5]), (X[5:], y[5:])]
    for matrix, ref in (("hessian", H), ("ggn", G), ("empirical_fisher", EF), ("residual", H - G)):
        op = cl.curvature_operator(
            model, nn.CrossEntropyLoss(), data, matrix, keep_graph=keep_graph
        )
        assert _rel(op.to_dense(), ref) < 1e-10, matrix
        assert model.emb.scale_grad_by_freq is True
    assert model.emb.scale_grad_by_freq is True


def test_scale_grad_by_freq_one_pass_quantities_are_those_of_the_loss() -> None:
    model, X, y, out, theta = _freq_problem()
    H, G, EF = _ce_matrices(out, theta, y)
    names = Flat(model).names
    loss_fn = nn.CrossEntropyLoss()
    for backend in ("auto", "hooks", "func"):
        res = cl.diag_fisher(model, loss_fn, (X, y), backend=backend)
        got = torch.cat([res[n].reshape(-1) for n in names])
        assert torch.allclose(got, EF.diagonal(), rtol=1e-9, atol=1e-14), backend
    exact = cl.diag_fisher(model, loss_fn, (X, y), kind="exact")
    got = torch.cat([exact[n].reshape(-1) for n in names])
    assert torch.allclose(got, G.diagonal(), rtol=1e-9, atol=1e-14)
    diag = cl.diag_hessian(model, loss_fn, (X, y))
    got = torch.cat([diag[n].reshape(-1) for n in names])
    assert torch.allclose(got, H.diagonal(), rtol=1e-9, atol=1e-14)
    assert model.emb.scale_grad_by_freq is True


def test_scale_grad_by_freq_is_put_back_when_a_call_raises() -> None:
    model, X, y, _, _ = _freq_problem()
    with pytest.raises(ValueError):
        cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y[:3]))  # mismatched sizes
    assert model.emb.scale_grad_by_freq is True
    model.emb.weight.grad = None
    nn.CrossEntropyLoss()(model(X), y).backward()  # the user's own step still rescales
    grad = model.emb.weight.grad
    model.emb.scale_grad_by_freq = False
    model.emb.weight.grad = None
    nn.CrossEntropyLoss()(model(X), y).backward()
    assert not torch.allclose(grad, model.emb.weight.grad)


# --------------------------------------------------------------------------- EmbeddingBag (O4)
class BagModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(6, 3, mode="mean")
        self.fc = nn.Linear(3, 3)

    def forward(self, idx: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.bag(idx)))


def test_missing_derivative_recognises_both_messages() -> None:
    old = RuntimeError("derivative for aten::hardsigmoid_backward is not implemented")
    new = NotImplementedError("the derivative for '_embedding_bag_backward' is not implemented.")
    assert missing_derivative(old) == "aten::hardsigmoid_backward"
    assert missing_derivative(new) == "_embedding_bag_backward"
    assert missing_derivative(RuntimeError("something else")) is None


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: no batching rule for embedding_bag
def test_embedding_bag_operators_raise_curvlabs_error_with_the_way_out() -> None:
    torch.manual_seed(0)
    model = BagModel().to(DT)
    X, y = torch.randint(0, 6, (8, 4)), torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss()
    way_out = (
        r"trace\(\.\.\., matrix='ggn', method='exact'\) and diag_fisher\(\.\.\., kind='exact'\)"
    )
    for matrix in ("hessian", "ggn", "empirical_fisher"):
        op = cl.curvature_operator(model, loss_fn, (X, y), matrix)
        with pytest.raises(NotImplementedError, match=rf"_embedding_bag.*{way_out}"):
            op.matvec(torch.ones(op.shape[0], dtype=DT))
    with pytest.raises(NotImplementedError, match=r"_embedding_bag_backward.*matrix='ggn'"):
        cl.diag_hessian(model, loss_fn, (X, y))
    flat = Flat(model)

    def out(theta: Tensor) -> Tensor:
        d = flat.split(theta)
        h = torch.tanh(d["bag.weight"][X].mean(1))
        return F.linear(h, d["fc.weight"], d["fc.bias"])

    _, G, _ = _ce_matrices(out, flat.theta, y)
    ggn_trace = cl.trace(model, loss_fn, (X, y), matrix="ggn", method="exact").value
    assert ggn_trace == pytest.approx(float(G.trace()), rel=1e-9)
    diag = cl.diag_fisher(model, loss_fn, (X, y), kind="exact")
    got = torch.cat([diag[n].reshape(-1) for n in flat.names])
    assert torch.allclose(got, G.diagonal(), rtol=1e-9, atol=1e-14)
