"""Backends on adversarial models (review s17).

* BackPACK's graph converter registered a ``ScaleModule`` child on the user's model for every
  ``float * tensor`` in its forward and never removed it: the next call with ``backend="backpack"``
  failed, blaming ``'scale_module0'``.
* Small integer buffers (a forward that counts its calls) were not restored before each forward
  pass of ``diag_fisher``, ``gradient_stats``, ``kfac`` and ``fisher_norms``: 0.29 to 0.66 off
  depending on the chunking and the backend.
* An in-place write into a slice of a sequence Linear's output: ``backend="backpack"`` raised
  torch's raw ``RuntimeError``, ``backend="hooks"`` blamed a parameter "used outside its module".
* ``kfac`` on a layer whose weight is computed (``torch.nn.utils.parametrize``, old-style
  ``spectral_norm``) gave the factors of the computed weight (1.19 off the Fisher block of the
  parameter trained), took the old-style layer only after a forward, and its ``params=`` error
  suggested the very layer it then refused; BackPACK's refusal named the layer's bias.

References are dense float64 brute force written here (``torch.func``, per-example autograd).
"""

from __future__ import annotations

import ast
import copy
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.nn.utils import parametrizations as PZ

import curvlab as cl

DT = torch.float64
EPS = torch.finfo(DT).eps
# a few hundred float64 roundings on tiny models whose entries are O(1): 1e-10 relative is
# 10^5 eps of slack and still 10^9 times below the defects' errors (0.2 and more)
RTOL = 1e5 * EPS


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _flat(d, names: list[str]) -> Tensor:
    return torch.cat([d[n].reshape(-1) for n in names])


def _per_example_grads(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Rows ``grad NLL_n``, each from a fresh copy of the model (its buffers as found)."""
    rows = []
    for n in range(X.shape[0]):
        m = copy.deepcopy(model)
        loss = nn.functional.cross_entropy(m(X[n : n + 1]), y[n : n + 1])
        gs = torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad])
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


# ------------------------------------------------------------------ 1. the converter's children


class _Scaled(nn.Module):
    """A residual-free model whose forward scales by a float: BackPACK's converter turns the
    scale into a ``ScaleModule`` child."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.act, self.l2 = nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(self.act(self.l1(x))) * 0.5


class _Unconvertible(_Scaled):
    """The converter adds the scale's child, then fails on ``h * h`` (two tensors)."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.l1(x)) * 0.5
        return self.l2(h * h)


def _tree(model: nn.Module) -> list[tuple[str, int, tuple[str, ...]]]:
    return [(n, id(m), tuple(m._modules)) for n, m in model.named_modules()]


def _ggn_diag(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``(1/N) sum_n diag(J_n^T (diag p_n - p_n p_n^T) J_n)``: the mean-CE GGN diagonal."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    total = 0.0
    for n in range(X.shape[0]):
        J = jacrev(lambda ps, x=X[n : n + 1]: functional_call(model, ps, (x,))[0])(params)
        Jf = torch.cat([J[k].reshape(J[k].shape[0], -1) for k in names], 1)
        p = torch.softmax(model(X[n : n + 1])[0], 0).detach()
        H = torch.diag(p) - torch.outer(p, p)
        total = total + torch.einsum("ci,cd,di->i", Jf, H, Jf)
    return total / X.shape[0]


def test_backpack_converter_leaves_the_model_tree_and_computes_every_call():
    g = torch.Generator().manual_seed(0)
    model = _Scaled().to(DT).eval()
    X, y = torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    before = _tree(model)
    ref = _ggn_diag(model, X, y)
    names = [n for n, _ in model.named_parameters()]
    for _ in range(2):  # the second call failed, blaming 'scale_module0'
        r = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), "exact", backend="backpack")
        assert r.backend == "backpack"
        assert _rel(_flat(r, names), ref) < RTOL
        assert _tree(model) == before


def test_backpack_converter_failing_partway_leaves_the_model_tree():
    g = torch.Generator().manual_seed(1)
    model = _Unconvertible().to(DT).eval()
    X, y = torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    before = _tree(model)
    for _ in range(2):
        with pytest.raises(ValueError, match="graph converter cannot convert") as err:
            cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), "exact", backend="backpack")
        assert "scale_module" not in str(err.value)
        assert _tree(model) == before


# ------------------------------------------------------------------ 2. small integer buffers


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cnt", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.cnt += 1
        return x * (1.0 + 0.1 * self.cnt)


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.c, self.out = nn.Linear(3, 4), _Counter(), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.c(self.l1(x))))


def _counting_problem() -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    model = _Counting().to(DT).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    X, y = torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    return model, X, y


@pytest.mark.parametrize(
    ("backend", "chunk_size"), [("auto", None), ("auto", 2), ("func", None), ("backpack", 4)]
)
def test_every_forward_of_a_sweep_starts_from_the_counter_the_call_found(backend, chunk_size):
    model, X, y = _counting_problem()
    G = _per_example_grads(model, X, y)  # every forward from cnt = 0
    names = [n for n, _ in model.named_parameters()]
    ce = nn.CrossEntropyLoss()
    r = cl.diag_fisher(model, ce, (X, y), "empirical", backend=backend, chunk_size=chunk_size)
    assert _rel(_flat(r, names), (G**2).mean(0)) < RTOL
    s = cl.gradient_stats(model, ce, (X, y), backend=backend, chunk_size=chunk_size)
    assert _rel(_flat(s.mean, names), G.mean(0)) < RTOL
    F = G.T @ G / X.shape[0]  # the empirical Fisher of the mean loss
    norms = cl.fisher_norms(model, ce, (X, y), backend=backend, chunk_size=chunk_size)
    assert abs(norms.frobenius - float(torch.linalg.norm(F))) < RTOL * float(torch.linalg.norm(F))
    assert int(model.c.cnt) == 0  # the user's counter left alone


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_kfac_input_factor_starts_from_the_counter_the_call_found(chunk_size):
    model, X, y = _counting_problem()
    m = copy.deepcopy(model)
    with torch.no_grad():  # the input of 'out' with the counter as found (0 before the pass)
        a = torch.tanh(m.c(m.l1(X)))
    f = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), "empirical", chunk_size=chunk_size)
    assert _rel(f["out"].A, a.T @ a / X.shape[0]) < RTOL
    assert int(model.c.cnt) == 0


# ------------------------------------------------------------------ 3. in-place slice writes


class _SliceWrite(nn.Module):
    def __init__(self, clone: bool) -> None:
        super().__init__()
        self.l1, self.out, self.clone = nn.Linear(3, 4), nn.Linear(4, 3), clone

    def forward(self, x: Tensor) -> Tensor:  # x: (N, T, 3)
        h = self.l1(x)
        if self.clone:
            h = h.clone()
        h[:, 0].mul_(3.0)
        return self.out(torch.tanh(h).mean(1))


def _slice_problem(clone: bool) -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    model = _SliceWrite(clone).to(DT).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    X, y = torch.randn(6, 4, 3, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    return model, X, y


def test_a_write_into_a_slice_of_a_layer_output_is_named_by_both_hook_backends():
    model, X, y = _slice_problem(clone=False)
    ce = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"writes in place into a slice of a layer's output"):
        cl.diag_fisher(model, ce, (X, y), backend="backpack")
    with pytest.raises(ValueError, match=r"output of module 'l1' .*changed in place") as err:
        cl.diag_fisher(model, ce, (X, y), backend="hooks")
    assert "used outside its module" not in str(err.value)
    G = _per_example_grads(model, X, y)
    r = cl.diag_fisher(model, ce, (X, y))  # auto: another backend, exact
    assert _rel(_flat(r, [n for n, _ in model.named_parameters()]), (G**2).mean(0)) < RTOL
    assert "changed in place" in r.info["handed_over"][0]


@pytest.mark.parametrize("backend", ["hooks", "backpack"])
def test_the_advised_clone_is_computed_exactly(backend):
    model, X, y = _slice_problem(clone=True)
    G = _per_example_grads(model, X, y)
    r = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), backend=backend)
    assert _rel(_flat(r, [n for n, _ in model.named_parameters()]), (G**2).mean(0)) < RTOL


# ------------------------------------------------------------------ 4. computed weights in kfac


def _mlp(middle: nn.Module) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), middle, nn.Tanh(), nn.Linear(4, 3)).to(DT)


def test_kfac_leaves_a_parametrized_layer_out_and_says_why():
    model = _mlp(PZ.orthogonal(nn.Linear(4, 4))).eval()
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(1, 3, generator=g, dtype=DT), torch.randint(0, 3, (1,), generator=g)
    f = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="empirical")
    assert sorted(f) == ["0", "4"]  # '2' had the factors of the computed W (1.19 off)
    assert "2.parametrizations.weight.original" in f.info["left_out"]["2"]
    # one example: kron(G, A) of a plain Linear is its exact empirical Fisher block
    w = model[4].weight
    (gw,) = torch.autograd.grad(nn.functional.cross_entropy(model(X), y), [w])
    block = torch.outer(gw.reshape(-1), gw.reshape(-1))
    assert _rel(f["4"].weight_block(), block) < RTOL


def test_kfac_on_an_old_style_spectral_norm_layer_is_one_answer_and_its_advice_selectable():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the old-style one
        model = _mlp(nn.utils.spectral_norm(nn.Linear(4, 4))).eval()
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(4, 3, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g)
    ce = nn.CrossEntropyLoss()
    before = cl.kfac(model, ce, (X, y), kind="exact")
    model(X)  # the pre-hook sets layer.weight: the layer was taken from then on
    after = cl.kfac(model, ce, (X, y), kind="exact")
    assert sorted(before) == sorted(after) == ["0", "4"]
    assert before.info["left_out"] == after.info["left_out"]
    assert "'2.weight_orig'" in after.info["left_out"]["2"]
    for sel in ("2.weight_orig", "2"):
        with pytest.raises(ValueError, match=r"layer '2' is left out: its weight is computed") as e:
            cl.kfac(model, ce, (X, y), kind="exact", params=sel)
        suggested = str(e.value).rsplit("e.g. one of ", 1)[1]
        assert "'2'" not in suggested  # suggested, then refused again: circular
        for name in ast.literal_eval(suggested):  # every suggestion is selectable
            assert name in cl.kfac(model, ce, (X, y), kind="exact", params=name)


def test_backpack_refusal_names_the_parametrized_weight_not_the_bias():
    model = _mlp(PZ.orthogonal(nn.Linear(4, 4))).eval()
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(4, 3, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g)
    with pytest.raises(ValueError, match=r"2\.parametrizations\.weight\.original") as err:
        cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), backend="backpack")
    assert "['bias']" not in str(err.value)
