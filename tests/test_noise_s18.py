"""Review s18 of the noise samplers and ``NoisyOptimizer`` (each test fails on the code before its
fix).

* H1: a sampler's layout confirmation was keyed by the input signature and the layer names only,
  so a sampler shared by two models (or one model whose layers switch to a sequence-first call of
  the same input) read the second one's time-major rows as examples: ``enc.weight``'s empirical
  diagonal summed to 0.0638 against the exact 0.0226.
* H2: every step of a model with an ``Embedding(sparse=True)`` raised torch's
  ``add(sparse, dense) is not supported`` after the curvature pass and the draw.
* H3: loading a plain optimizer's ``state_dict()`` raised a bare ``KeyError('optimizer')``; a
  state without another entry raised a ``KeyError`` after the optimizer state was loaded.
* H4: ``MultiplicativeNoise``, which reads ``.grad`` inside ``NoisyOptimizer``, was refused without
  a supported ``loss_fn`` it never calls.
"""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    IsotropicNoise,
    KFACNoise,
    MultiplicativeNoise,
    NoisyOptimizer,
)

N, T, D, H, C = 4, 4, 3, 5, 2  # T == N: a sequence-first layer's leading size is the batch's
TOL = 1e-12  # float64 sums of a few dozen terms of order 1


# ------------------------------------------------------------------ H1: layouts per model
class _Seq(nn.Module):
    """An encoder over ``(N, T, D)`` inputs, batch-major or sequence-first (``seq_first``)."""

    def __init__(self, seq_first: bool, classes: int = C, pool: bool = True) -> None:
        super().__init__()
        self.seq_first, self.pool = seq_first, pool
        self.enc, self.head = nn.Linear(D, H), nn.Linear(H, classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.seq_first:  # a time-major encoder: its rows are positions, not examples
            h = torch.tanh(self.enc(x.transpose(0, 1)))
            return self.head(h.transpose(0, 1).mean(1)) if self.pool else self.head(h)
        h = torch.tanh(self.enc(x))
        return self.head(h.mean(1)) if self.pool else self.head(h)


def _twins() -> tuple[_Seq, _Seq]:
    torch.manual_seed(0)
    a = _Seq(False).double()
    b = copy.deepcopy(a)
    b.seq_first = True  # the same function of the same parameters, time-major inside
    return a, b


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, T, D, generator=g, dtype=torch.float64), torch.randint(
        0, C, (N,), generator=g
    )


def _empirical_diag(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``(1/N) sum_n g_n**2``, ``g_n`` the gradient of example ``n``'s NLL (mean CE)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def nll(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        out = functional_call(model, p, (x[None],))
        return nn.functional.cross_entropy(out, t[None], reduction="sum")

    g = vmap(grad(nll), in_dims=(None, 0, 0))(params, X, y)
    return {n: (v**2).sum(0) / X.shape[0] for n, v in g.items()}


def _captured(model: nn.Module, sampler: DiagFisherNoise, X: Tensor, y: Tensor) -> dict:
    lf = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, lf)
    noisy.zero_grad()
    with noisy.capture():
        lf(model(X), y).backward()
    noisy.step()
    return noisy._state


def test_a_shared_sampler_checks_the_layout_of_each_model() -> None:
    """The second model of a shared sampler runs its encoder sequence-first on an input of the
    same signature: its captured diagonal is the brute-force one (it was the first model's rows
    read as examples: 0.0638 against 0.0226 for ``enc.weight``)."""
    a, b = _twins()
    X, y = _batch()
    exact = _empirical_diag(b, X, y)
    assert torch.allclose(exact["enc.weight"], _empirical_diag(a, X, y)["enc.weight"], atol=TOL)
    shared = DiagFisherNoise("empirical", scale=1.0)
    first = _captured(a, shared, X, y)
    second = _captured(b, shared, X, y)
    for name in exact:
        torch.testing.assert_close(first[name], exact[name], rtol=0, atol=TOL)
        torch.testing.assert_close(second[name], exact[name], rtol=0, atol=TOL)


def test_one_model_whose_layer_turns_sequence_first_is_checked_again() -> None:
    """Same model, same sampler, same input signature: a flag switches the encoder to a
    time-major call between steps (its input transposed: other strides), so the layout is
    confirmed again and the diagonal stays the brute-force one."""
    a, _ = _twins()
    X, y = _batch()
    exact = _empirical_diag(a, X, y)
    sampler = DiagFisherNoise("empirical", scale=1.0)
    lf = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(torch.optim.SGD(a.parameters(), lr=0.0), sampler, a, lf)
    for flag in (False, True):
        a.seq_first = flag
        noisy.zero_grad()
        with noisy.capture():
            lf(a(X), y).backward()
        noisy.step()
        for name in exact:
            torch.testing.assert_close(noisy._state[name], exact[name], rtol=0, atol=TOL)


def test_a_shared_full_fisher_sampler_checks_each_models_output() -> None:
    """``FullFisherNoise("empirical")`` signs the examples on the output's first axis. On the
    first (batch-major) model its noise is ``c * sum_n r_n g_n`` with ``|c| = scale * sqrt(N) /
    (N T)`` (mean over ``N T`` tokens, checked by least squares against the per-example
    gradients); the second model's output is sequence-first ``(T, N, C)`` with ``T == N``,
    which a fresh sampler refuses: the shared one refuses too (it signed the positions)."""
    torch.manual_seed(0)
    a = _Seq(False, classes=3, pool=False).double()
    b = copy.deepcopy(a)
    b.seq_first = True
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, T, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N, T), generator=g)
    lf, scale = nn.CrossEntropyLoss(), 0.5

    def loss(m: _Seq) -> Tensor:  # (N, C, T) for torch's class axis 1
        out = m(X)
        return lf(out.permute(1, 2, 0) if m.seq_first else out.transpose(1, 2), y)

    def run(m: _Seq, sampler: FullFisherNoise) -> Tensor:
        noisy = NoisyOptimizer(torch.optim.SGD(m.parameters(), lr=0.0), sampler, m, lf, seed=3)
        noisy.zero_grad()
        with noisy.capture():
            loss(m).backward()
        noisy_grad = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
        noisy.step()
        m.zero_grad()
        loss(m).backward()
        return noisy_grad - torch.cat([p.grad.reshape(-1) for p in m.parameters()])

    params = {n: p.detach() for n, p in a.named_parameters()}

    def nll(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        out = functional_call(a, p, (x[None],))
        return nn.functional.cross_entropy(out.reshape(-1, 3), t, reduction="sum")

    per = vmap(grad(nll), in_dims=(None, 0, 0))(params, X, y)
    G = torch.cat([per[n].reshape(N, -1) for n, _ in a.named_parameters()], 1)  # (N, P)

    with pytest.raises(RuntimeError, match="first axis"):
        run(b, FullFisherNoise("empirical", scale=scale))  # a fresh sampler refuses
    shared = FullFisherNoise("empirical", scale=scale)
    eps = run(a, shared)
    coef = torch.linalg.lstsq(G.T, eps[:, None]).solution[:, 0]
    torch.testing.assert_close(G.T @ coef, eps, rtol=0, atol=TOL)
    torch.testing.assert_close(
        coef.abs(), torch.full((N,), scale * N**0.5 / (N * T), dtype=torch.float64)
    )
    with pytest.raises(RuntimeError, match="first axis"):
        run(b, shared)


def test_confirmations_are_a_cache_of_live_models_only() -> None:
    """A freed model takes its confirmations with it; copies and pickles start empty."""
    a, _ = _twins()
    X, y = _batch()
    sampler = DiagFisherNoise("empirical", scale=1.0)
    _captured(a, sampler, X, y)
    assert len(sampler.layouts()) == 1  # the layers' layout for this model and signature
    assert len(copy.deepcopy(sampler).layouts()) == 0
    assert len(pickle.loads(pickle.dumps(sampler)).layouts()) == 0
    del a
    gc.collect()
    assert len(sampler.layouts()) == 0


# ------------------------------------------------------------------ H2: sparse embeddings
class _Bag(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.e, self.l = nn.Embedding(7, 4, sparse=sparse), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.l(self.e(x))


SPARSE_SAMPLERS = {
    "diag_emp": lambda: DiagFisherNoise("empirical", scale=0.5),
    "diag_mc": lambda: DiagFisherNoise("mc", scale=0.5),
    "trace": lambda: FisherTraceNoise(scale=0.5),
    "kfac": lambda: KFACNoise("empirical", scale=0.5),
    "iso": lambda: IsotropicNoise(0.1),
    "full": lambda: FullFisherNoise("true", scale=0.5),
    "mult": lambda: MultiplicativeNoise(0.5),
}


@pytest.mark.parametrize("path", ["closure", "separate"])
@pytest.mark.parametrize("which", sorted(SPARSE_SAMPLERS))
def test_a_sparse_embedding_gets_the_dense_twins_noise(which: str, path: str) -> None:
    """An ``Embedding(sparse=True)`` model steps (it raised ``add(sparse, dense)``), with the
    gradient and parameters of its dense-embedding twin, bit for bit up to float64 rounding."""
    torch.manual_seed(0)
    dense = _Bag(False).double()
    sparse = _Bag(True).double()
    sparse.load_state_dict(dense.state_dict())
    g = torch.Generator().manual_seed(1)
    X, y = torch.randint(0, 7, (8,), generator=g), torch.randint(0, 3, (8,), generator=g)
    lf = nn.CrossEntropyLoss()
    grads = {}
    for label, model in (("dense", dense), ("sparse", sparse)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        noisy = NoisyOptimizer(opt, SPARSE_SAMPLERS[which](), model, lf, seed=4)
        for _ in range(2):
            noisy.zero_grad()
            if path == "closure":

                def closure(m: nn.Module = model, opt: NoisyOptimizer = noisy) -> Tensor:
                    opt.zero_grad()
                    out = lf(m(X), y)
                    out.backward()
                    return out

                noisy.step(closure)
            else:
                lf(model(X), y).backward()
                noisy.step(inputs=X, targets=y)
        grads[label] = {
            n: p.grad.to_dense() if p.grad.is_sparse else p.grad
            for n, p in model.named_parameters()
        }
    for (n, p), q in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=TOL)
        torch.testing.assert_close(grads["sparse"][n], grads["dense"][n], rtol=0, atol=TOL)


def test_sparse_adam_is_refused_with_dense_noise_naming_the_parameter() -> None:
    torch.manual_seed(0)
    model = _Bag(True).double()
    lf = nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match=r"SparseAdam with DiagFisherNoise.*e\.weight"):
        NoisyOptimizer(
            torch.optim.SparseAdam(model.e.parameters()), DiagFisherNoise(scale=0.5), model, lf
        )
    # MultiplicativeNoise keeps the gradient's rows: SparseAdam steps it
    NoisyOptimizer(torch.optim.SparseAdam(model.e.parameters()), MultiplicativeNoise(0.1), model)


# ------------------------------------------------------------------ H3: a plain optimizer's state
def _noisy(model: nn.Module) -> NoisyOptimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return NoisyOptimizer(opt, DiagFisherNoise(scale=0.1), model, nn.CrossEntropyLoss())


def test_a_plain_optimizer_state_is_refused_saying_where_it_goes() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    plain.step()
    saved = plain.state_dict()
    noisy = _noisy(model)
    with pytest.raises(ValueError, match=r"noisy\.optimizer\.load_state_dict\(state\)"):
        noisy.load_state_dict(saved)
    assert noisy.optimizer.state_dict()["state"] == {}  # nothing loaded
    noisy.optimizer.load_state_dict(saved)  # the documented way: momentum restored
    torch.testing.assert_close(
        noisy.optimizer.state_dict()["state"][0]["momentum_buffer"],
        saved["state"][0]["momentum_buffer"],
    )


def test_a_state_without_an_entry_is_refused_before_anything_is_loaded() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    noisy = _noisy(model)
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    noisy.zero_grad()
    nn.CrossEntropyLoss()(model(X), y).backward()
    noisy.step(inputs=X, targets=y)
    state = noisy.state_dict()
    del state["generator"]
    fresh = _noisy(model)
    with pytest.raises(ValueError, match="'generator'"):
        fresh.load_state_dict(state)
    assert fresh.optimizer.state_dict()["state"] == {} and fresh.steps_taken == 0


# ------------------------------------------------------------------ H4: MultiplicativeNoise's loss
@pytest.mark.parametrize(
    "loss_fn", [None, nn.L1Loss(), nn.CrossEntropyLoss(reduction="none")], ids=str
)
def test_multiplicative_noise_needs_no_loss_fn(loss_fn: nn.Module | None) -> None:
    """Inside NoisyOptimizer ``MultiplicativeNoise`` reads ``.grad``: the step adds ``g * std *
    xi`` (``xi`` the seeded generator's normals, in parameter order) whatever loss trained."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        MultiplicativeNoise(0.5),
        model,
        loss_fn,
        seed=4,
    )
    noisy.zero_grad()
    (model(X) ** 2).sum().backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    noisy.step()
    gen = torch.Generator().manual_seed(4)
    for n, p in model.named_parameters():
        xi = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        torch.testing.assert_close(p.grad, g[n] * (1 + 0.5 * xi), rtol=0, atol=TOL)


def test_curvature_samplers_still_need_a_supported_loss_fn() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="needs loss_fn="):
        NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), DiagFisherNoise(scale=0.1), model
        )
    with pytest.raises(TypeError, match="L1Loss"):
        NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            FisherTraceNoise(scale=0.1),
            model,
            nn.L1Loss(),
        )
