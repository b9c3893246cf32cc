"""Review s9 (zoo1), backends: each against a float64 brute force (a per-example autograd loop;
a dense GGN from per-example Jacobians), losses with ``reduction="sum"`` (no weights).

* B1: a masked-LM head run on the masked tokens alone (``head(h[mask])``) is not read as one row
  per example by the hooks: on the chunk it is classified on (masked counts ``[1, 2, 0]``), on a
  later chunk, and after the choice memo;
* B2: the exact GGN through ``nn.PReLU``/``F.prelu`` on the func backend (torch's nested vmap of
  prelu is silently wrong for some sizes: one logit and two examples, three classes and three);
* B3: ``fisher_norms`` over chunks that ran different heads of a multi-task model;
* B4: average pooling with ``ceil_mode=True`` and a partial last window, second order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvlab as cl
from curvlab.backends._choice import CHOICES

# ----------------------------------------------------------------------------- brute force


def _call(model: nn.Module, x: Tensor | Mapping) -> Tensor:
    return model(**x) if isinstance(x, Mapping) else model(x)


def _slice(x: Tensor | Mapping, i: int) -> Tensor | Mapping:
    return {k: v[i : i + 1] for k, v in x.items()} if isinstance(x, Mapping) else x[i : i + 1]


def _examples(x: Tensor | Mapping) -> int:
    return (next(iter(x.values())) if isinstance(x, Mapping) else x).shape[0]


def _nll(loss_fn: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """The NLL sum; cross-entropy on ``(N, T, V)`` logits with ``(N, T)`` targets: last axis."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if out.ndim == 3 and tuple(y.shape) == tuple(out.shape[:2]):
            out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
        return F.cross_entropy(out, y, reduction="sum", ignore_index=-100)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return F.binary_cross_entropy_with_logits(out, y, reduction="sum")
    return F.mse_loss(out, y, reduction="sum")


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def _grad_rows(model: nn.Module, loss_fn: nn.Module, batches: list) -> Tensor:
    """``(N, D)``: the gradient of each example's NLL, one autograd pass per example."""
    params = list(_params(model).values())
    rows = []
    for x, y in batches:
        for i in range(_examples(x)):
            nll = _nll(loss_fn, _call(model, _slice(x, i)), y[i : i + 1])
            gs = torch.autograd.grad(nll, params, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).flatten()
                        for p, g in zip(params, gs)
                    ]
                )
            )
    return torch.stack(rows)


def _dense_ggn(model: nn.Module, loss_fn: nn.Module, batches: list) -> Tensor:
    """``sum_n J_n^T H_n J_n`` with ``J_n`` the Jacobian of example ``n``'s output."""
    names, params = zip(*_params(model).items())
    D = sum(p.numel() for p in params)
    G = torch.zeros(D, D, dtype=torch.float64)
    for x, y in batches:
        for i in range(_examples(x)):
            xi, yi = _slice(x, i), y[i : i + 1]

            def out_of(*ps: Tensor, xi: Tensor = xi) -> Tensor:
                return torch.func.functional_call(model, dict(zip(names, ps)), (xi,))

            out = out_of(*params).detach()
            jac = torch.autograd.functional.jacobian(out_of, tuple(p.detach() for p in params))
            J = torch.cat([j.reshape(out.numel(), -1) for j in jac], 1)
            H = torch.autograd.functional.hessian(
                lambda z, yi=yi, shape=out.shape: _nll(loss_fn, z.reshape(shape), yi),
                out.reshape(-1),
            )
            G += J.T @ H @ J
    return G


def _split(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, p in _params(model).items():
        out[k] = flat[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _close(got: dict, ref: dict[str, Tensor]) -> None:
    scale = max(float(v.abs().max()) for v in ref.values())
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-9, atol=1e-12 * scale, msg=k)


def _close_norms(norms: cl.FisherNorms, F_: Tensor) -> None:
    assert norms.frobenius == pytest.approx(float(F_.norm()), rel=1e-9)
    assert norms.diag_frobenius == pytest.approx(float(torch.diagonal(F_).norm()), rel=1e-9)


# ----------------------------------------------------------------------------- B1: token rows


V, E, T = 6, 4, 5


class _MaskedLM(nn.Module):
    """The head runs on the masked tokens alone and is scattered back into ``(N, T, V)``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mix, self.head = nn.Embedding(V, E), nn.Linear(E, E), nn.Linear(E, V)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.emb(ids)))
        logits = h.new_zeros(*ids.shape, V)
        logits[mask] = self.head(h[mask])
        return logits


def _mlm() -> nn.Module:
    torch.manual_seed(0)
    return _MaskedLM().double()


def _mlm_batch(counts: list[int], seed: int) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = len(counts)
    ids = torch.randint(0, V, (n, T), generator=g)
    mask = torch.zeros(n, T, dtype=torch.bool)
    for i, k in enumerate(counts):
        mask[i, torch.randperm(T, generator=g)[:k]] = True
    labels = torch.randint(0, V, (n, T), generator=g)
    return {"ids": ids, "mask": mask}, torch.where(mask, labels, torch.full_like(labels, -100))


def _check_empirical(model: nn.Module, loss_fn: nn.Module, batches: list, **kw) -> None:
    S = _grad_rows(model, loss_fn, batches)
    _close(cl.diag_fisher(model, loss_fn, batches, **kw), _split(model, (S * S).sum(0)))
    _close_norms(cl.fisher_norms(model, loss_fn, batches, **kw), S.T @ S)


def test_b1_masked_head_with_as_many_rows_as_examples_is_not_batch_major():
    # counts [1, 2, 0]: 3 rows for 3 examples, 1 on the first example alone
    model, loss_fn = _mlm(), nn.CrossEntropyLoss(reduction="sum")
    batches = [_mlm_batch([1, 2, 0], seed=1)]
    CHOICES.clear()
    _check_empirical(model, loss_fn, batches)
    with pytest.raises(ValueError, match="head"):  # the hooks alone: a clear error, no number
        cl.diag_fisher(model, loss_fn, batches, backend="hooks")


def test_b1_masked_head_on_a_later_chunk_hands_over():
    # the first chunk has one masked token per example (right there), the second does not
    model, loss_fn = _mlm(), nn.CrossEntropyLoss(reduction="sum")
    batches = [_mlm_batch([1, 1, 1], seed=2), _mlm_batch([2, 1, 2], seed=3)]
    CHOICES.clear()
    _check_empirical(model, loss_fn, batches)


def test_b1_masked_head_after_the_choice_memo_hands_over():
    model, loss_fn = _mlm(), nn.CrossEntropyLoss(reduction="sum")
    first, second = [_mlm_batch([1, 1, 1, 1], seed=4)], [_mlm_batch([2, 1, 3, 2], seed=5)]
    CHOICES.clear()
    S = _grad_rows(model, loss_fn, first)
    got = cl.diag_fisher(model, loss_fn, first)  # one row per example: the hooks are right
    assert got.backend == "hooks"
    _close(got, _split(model, (S * S).sum(0)))
    S = _grad_rows(model, loss_fn, second)  # same shapes: the memo's layout, rows now tokens
    _close(cl.diag_fisher(model, loss_fn, second), _split(model, (S * S).sum(0)))


# ----------------------------------------------------------------------------- B2: prelu


class _FunctionalPReLU(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.a, self.h = nn.Linear(6, 4), nn.Linear(4, k)
        self.slope = nn.Parameter(torch.tensor([0.25]))

    def forward(self, x: Tensor) -> Tensor:
        return self.h(F.prelu(self.a(x), self.slope))


def _prelu_module(k: int) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 4), nn.PReLU(), nn.Linear(4, k))


@pytest.mark.parametrize("make", [_prelu_module, _FunctionalPReLU], ids=["module", "functional"])
@pytest.mark.parametrize(
    "loss_fn, k, n",
    [(nn.BCEWithLogitsLoss(reduction="sum"), 1, 2), (nn.CrossEntropyLoss(reduction="sum"), 3, 3)],
    ids=["bce", "ce"],
)
def test_b2_exact_ggn_through_prelu_on_func(make: Callable, loss_fn: nn.Module, k: int, n: int):
    torch.manual_seed(0)
    model = make(k).double()
    g = torch.Generator().manual_seed(6)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        y = torch.randint(0, k, (n,), generator=g)
    else:
        y = torch.randint(0, 2, (n, k), generator=g).double()
    batches = [(X, y)]
    G = _dense_ggn(model, loss_fn, batches)
    got = cl.diag_fisher(model, loss_fn, batches, kind="exact", backend="func")
    _close(got, _split(model, torch.diagonal(G)))
    assert any("prelu" in note for note in got.info["fallbacks"])
    _close_norms(cl.fisher_norms(model, loss_fn, batches, kind="exact", backend="func"), G)


# ----------------------------------------------------------------------------- B3: heads


class _MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 5)
        self.heads = nn.ModuleList([nn.Linear(5, 3), nn.Linear(5, 3)])

    def forward(self, x: Tensor, task: Tensor) -> Tensor:
        return self.heads[int(task[0])](torch.tanh(self.trunk(x)))


def _tasks(seed: int, tasks: list[int], sizes: list[int]) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, n in zip(tasks, sizes):
        x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        out.append(({"x": x, "task": torch.full((n,), t)}, torch.randint(0, 3, (n,), generator=g)))
    return out


def test_b3_fisher_norms_over_chunks_that_ran_different_heads():
    torch.manual_seed(0)
    model, loss_fn = _MultiTask().double(), nn.CrossEntropyLoss(reduction="sum")
    batches = _tasks(7, [0, 1, 0], [3, 3, 2])
    CHOICES.clear()
    _check_empirical(model, loss_fn, batches)
    with pytest.raises(ValueError, match="other layers"):
        cl.fisher_norms(model, loss_fn, batches, backend="hooks")


def test_b3_a_remembered_layout_of_the_other_head_is_classified_afresh():
    # one head per call, same shapes: the memo's layout belongs to the other head's calls
    torch.manual_seed(0)
    model, loss_fn = _MultiTask().double(), nn.CrossEntropyLoss(reduction="sum")
    CHOICES.clear()
    for t in (0, 1, 0):
        batches = _tasks(8 + t, [t], [4])
        S = _grad_rows(model, loss_fn, batches)
        got = cl.diag_fisher(model, loss_fn, batches)
        assert got.backend == "hooks"
        _close(got, _split(model, (S * S).sum(0)))


# ----------------------------------------------------------------------------- B4: ceil_mode


@pytest.mark.parametrize("dim", [1, 2])
def test_b4_avg_pool_ceil_mode_with_a_partial_window_hands_over(dim: int):
    # float32, the default dtype: BackPACK takes average pooling only there (its kernels are
    # built in the default dtype); the brute force on a float64 copy
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 2, 2, padding=1) if dim == 1 else nn.Conv2d(2, 2, 2, padding=1)
    pool = (nn.AvgPool1d if dim == 1 else nn.AvgPool2d)(3, 2, ceil_mode=True)
    X = torch.randn(3, 2, *(7,) * dim)  # conv: 8 wide, pool: 4 windows, the last one partial
    width = 2 * 4**dim
    model = nn.Sequential(conv, nn.Tanh(), pool, nn.Flatten(), nn.Linear(width, 3))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    y = torch.randint(0, 3, (3,))
    G = _dense_ggn(copy.deepcopy(model).double(), loss_fn, [(X.double(), y)])
    got = cl.diag_fisher(model, loss_fn, (X, y), kind="exact")
    ref = _split(model, torch.diagonal(G).float())
    scale = max(float(v.abs().max()) for v in ref.values())
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6 * scale, msg=k)
    norms = cl.fisher_norms(model, loss_fn, (X, y), kind="exact")
    assert norms.frobenius == pytest.approx(float(G.norm()), rel=1e-4)
    assert norms.diag_frobenius == pytest.approx(float(torch.diagonal(G).norm()), rel=1e-4)
