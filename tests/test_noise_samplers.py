"""curvlab.noise samplers: exact curvature states and the moments of their draws.

Deterministic tests compare the measured state (diagonals, K-FAC factors, single draws) with
brute-force references from torch.func. Statistical tests draw many samples and check the mean
(zero) and the covariance against the documented matrix, entry by entry, with a tolerance of
``Z`` Monte-Carlo standard errors estimated from the samples themselves (the standard error of the
mean of ``x_i * x_j``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from curvlab._losses import loss_spec
from curvlab._rng import make_generator
from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    IsotropicNoise,
    KFACNoise,
    MultiplicativeNoise,
    wen_scale,
)
from curvlab.noise._diagonal import diag_curvature
from tests import reference as R
from tests.problems import make_problem

Z = 5.5  # standard errors allowed per checked entry


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: one intra-op thread avoids OpenMP spin-waiting on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flat_sample(sample: dict[str, Tensor], model: nn.Module) -> Tensor:
    return torch.cat([sample[n].reshape(-1) for n in R.param_names(model)])


def moments_ok(samples: Tensor, cov: Tensor, z: float = Z) -> tuple[bool, str]:
    """Whether mean ~ 0 and E[x x^T] ~ cov within ``z`` Monte-Carlo standard errors per entry."""
    m = samples.shape[0]
    mean = samples.mean(0)
    se_mean = samples.std(0) / math.sqrt(m)
    atol = 1e-12 * float(cov.abs().max())
    bad_mean = (mean.abs() > z * se_mean + atol).sum().item()
    prods = samples[:, :, None] * samples[:, None, :]
    emp = prods.mean(0)
    se = prods.std(0) / math.sqrt(m)
    excess = (emp - cov).abs() - (z * se + atol)
    bad_cov = (excess > 0).sum().item()
    return bad_mean == 0 and bad_cov == 0, f"{bad_mean} mean and {bad_cov} covariance entries off"


def assert_moments(samples: Tensor, cov: Tensor) -> None:
    ok, msg = moments_ok(samples, cov)
    assert ok, msg
    # the check has power: a 30% larger covariance must be rejected
    assert not moments_ok(samples, 1.3 * cov)[0], "moment check cannot tell a 30% scale error"


def one_batch(name: str):
    p = make_problem(name)
    return p, p.X, p.y


# ---------------------------------------------------------------------------- scale rule
def test_wen_scale_and_validation() -> None:
    assert wen_scale(4096, 128) == pytest.approx(math.sqrt((4096 - 128) / (4096 * 128)))
    assert DiagFisherNoise(large_batch=64, small_batch=64).scale == 0.0
    assert DiagFisherNoise(scale=0.3).scale == 0.3
    with pytest.raises(ValueError, match="small_batch"):
        wen_scale(8, 16)
    with pytest.raises(ValueError, match="not both"):
        DiagFisherNoise(scale=0.1, large_batch=8, small_batch=2)
    with pytest.raises(ValueError, match="give the noise scale"):
        DiagFisherNoise()
    with pytest.raises(ValueError, match="kind must be one of"):
        DiagFisherNoise("hessian", scale=1.0)
    with pytest.raises(ValueError, match="std must be"):
        IsotropicNoise(-1.0)
    with pytest.raises(ValueError, match="reduction"):
        DiagFisherNoise(scale=1.0).sample(
            nn.Linear(2, 2),
            nn.CrossEntropyLoss(reduction="none"),
            torch.randn(3, 2),
            torch.tensor([0, 1, 0]),
        )


# ---------------------------------------------------------------------------- exact states
DIAG_PROBLEMS = [
    "mlp-ce-mean-one",
    "mlp-mse-mean-one",
    "cnn-mse-sum-one",
    "res-bce-mean-one",
    "conv1d-mse-sum-one",
    "cnnbn-ce-mean-three",  # BatchNorm (eval): BackPACK fallback
]


@pytest.mark.parametrize("name", DIAG_PROBLEMS)
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_diag_state_matches_dense(name: str, kind: str) -> None:
    p, X, y = one_batch(name)
    before = R.snapshot(p.model)
    diag = diag_curvature(p.model, p.loss_fn, X, y, kind, make_generator(0))
    R.assert_untouched(p.model, before)
    dense = R.dense_empirical_fisher(p) if kind == "empirical" else R.dense_ggn(p)
    R.assert_dicts_close(diag, R.as_dict(p.model, dense), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", ["mlp-ce-mean-one", "cnn-mse-mean-one", "mlp-bce-sum-one"])
def test_diag_mc_state_matches_sampled_labels(name: str) -> None:
    p, X, y = one_batch(name)
    diag = diag_curvature(p.model, p.loss_fn, X, None, "mc", make_generator(5))
    spec = loss_spec(p.loss_fn)
    with torch.no_grad():
        out = p.model(X)
    y_hat = spec.sample_targets(out, make_generator(5))
    c = R.terms_per_example(p)
    q = make_problem(name)
    q.y = y_hat
    S = R.per_example_grads(q) * c  # grad NLL_n at the sampled labels
    w = spec.nll_weight(out, X.shape[0])
    R.assert_dicts_close(diag, R.split_diag(p.model, w * (S * S).sum(0)), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", ["mlp-ce-mean-one", "cnn-mse-sum-one"])
def test_full_fisher_one_draw_matches_weighted_gradients(name: str) -> None:
    """The empirical draw is exactly scale * sqrt(e) * sum_n r_n grad NLL_n."""
    p, X, y = one_batch(name)
    sampler = FullFisherNoise("empirical", scale=0.7)
    before = R.snapshot(p.model)
    eps = sampler.sample(p.model, p.loss_fn, X, y, generator=make_generator(3))
    R.assert_untouched(p.model, before)
    signs = torch.randint(0, 2, (X.shape[0],), generator=make_generator(3)).double() * 2 - 1
    G = R.per_example_grads(p)  # g_n (mean convention)
    if p.loss_fn.reduction == "mean":
        expected = 0.7 * (signs @ G) / math.sqrt(X.shape[0])
    else:
        expected = 0.7 * (signs @ (G * R.terms_per_example(p)))
    torch.testing.assert_close(flat_sample(eps, p.model), expected)


# ---------------------------------------------------------------------------- moments
def draws(sampler, model, state, m: int, seed: int = 1) -> Tensor:
    gen = make_generator(seed)
    return torch.stack([flat_sample(sampler.draw(model, state, gen), model) for _ in range(m)])


@pytest.mark.parametrize("name", ["mlp-ce-mean-one", "cnn-mse-sum-one"])
def test_diag_noise_moments(name: str) -> None:
    p, X, y = one_batch(name)
    sampler = DiagFisherNoise("empirical", large_batch=64, small_batch=4)
    state = sampler.estimate(p.model, p.loss_fn, X, y, make_generator(0))
    samples = draws(sampler, p.model, state, 4000)
    F = R.dense_empirical_fisher(p)
    assert_moments(samples, sampler.scale**2 * torch.diag(torch.diagonal(F)))


def test_fisher_trace_noise_moments() -> None:
    p, X, y = one_batch("mlp-mse-mean-one")
    sampler = FisherTraceNoise("exact", scale=0.5)
    state = sampler.estimate(p.model, p.loss_fn, X, y, make_generator(0))
    G = R.dense_ggn(p)
    d = G.shape[0]
    torch.testing.assert_close(state, torch.trace(G) / d)
    samples = draws(sampler, p.model, state, 3000)
    assert_moments(samples, 0.25 * torch.trace(G) / d * torch.eye(d, dtype=G.dtype))


def test_isotropic_and_multiplicative_moments() -> None:
    p, X, y = one_batch("mlp-ce-mean-one")
    iso = IsotropicNoise(0.2)
    samples = draws(iso, p.model, None, 3000)
    d = samples.shape[1]
    assert_moments(samples, 0.04 * torch.eye(d, dtype=samples.dtype))
    assert IsotropicNoise.langevin(lr=0.5, num_examples=8, temperature=2.0).std == pytest.approx(
        1.0
    )
    mult = MultiplicativeNoise(0.5)
    grads = mult.estimate(p.model, p.loss_fn, X, y, make_generator(0))
    g = flat_sample(grads, p.model)
    torch.testing.assert_close(g, torch.func.grad(lambda t: R.objective(p, t))(R.flat(p.model)))
    samples = draws(mult, p.model, grads, 3000)
    assert_moments(samples, 0.25 * torch.diag(g * g))


@pytest.mark.parametrize(
    "name,kind",
    [
        ("mlp-ce-mean-one", "true"),
        ("mlp-mse-sum-one", "true"),
        ("cnn-bce-mean-one", "true"),
        ("mlp-ce-mean-one", "empirical"),
        ("mlp-mse-mean-one", "empirical"),
    ],
)
def test_full_fisher_noise_moments(name: str, kind: str) -> None:
    p, X, y = one_batch(name)
    sampler = FullFisherNoise(kind, scale=0.5)
    gen = make_generator(2)
    m = 2500
    samples = torch.stack(
        [flat_sample(sampler.estimate(p.model, p.loss_fn, X, y, gen), p.model) for _ in range(m)]
    )
    dense = R.dense_ggn(p) if kind == "true" else R.dense_empirical_fisher(p)
    assert_moments(samples, 0.25 * dense)


def _mlp_kfac_reference(p, X: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Empirical K-FAC factors of the 2-layer MLP, from a hand-written forward pass."""
    lin1, lin2 = p.model[0], p.model[2]
    z1 = lin1(X)
    z1.retain_grad()
    h = torch.tanh(z1)
    z2 = lin2(h)
    z2.retain_grad()
    spec = loss_spec(p.loss_fn)
    n = X.shape[0]
    c = spec.terms_per_example(z2)
    nll = spec.per_example_nll(z2, y).sum()
    nll.backward()
    e = 1.0 / (n * c * c) if spec.reduction == "mean" else 1.0
    return {
        "0": (e * z1.grad.T @ z1.grad, X.T @ X / n),
        "2": (e * z2.grad.T @ z2.grad, h.detach().T @ h.detach() / n),
    }


def test_kfac_noise_single_example_is_exact_fisher_block() -> None:
    """With one example K-FAC is exact: each weight's covariance is its empirical-Fisher block."""
    p = make_problem("mlp-mse-mean-one")
    X, y = p.X[:1], p.y[:1]
    sampler = KFACNoise("empirical", scale=0.5)
    state = sampler.estimate(p.model, p.loss_fn, X, y, make_generator(0))
    samples = draws(sampler, p.model, state, 4000)
    q = make_problem("mlp-mse-mean-one")
    q.X, q.y = X, y
    F = R.dense_empirical_fisher(q)
    ref = torch.zeros_like(F)
    for sl in R.blocks(p.model).values():
        ref[sl, sl] = F[sl, sl]
    assert_moments(samples, 0.25 * ref)


@pytest.mark.parametrize("name", ["mlp-ce-mean-one", "mlp-mse-sum-one"])
def test_kfac_noise_moments_match_kron(name: str) -> None:
    p, X, y = one_batch(name)
    sampler = KFACNoise("empirical", scale=0.5)
    state = sampler.estimate(p.model, p.loss_fn, X, y, make_generator(0))
    factors = _mlp_kfac_reference(make_problem(name), X, y)
    ref = torch.zeros(R.flat(p.model).numel(), R.flat(p.model).numel(), dtype=X.dtype)
    blocks = R.blocks(p.model)
    for layer, (G, A) in factors.items():
        B, C = state[layer]["B"], state[layer]["C"]
        torch.testing.assert_close(B @ B.T, G)
        torch.testing.assert_close(C.T @ C, A)
        sw, sb = blocks[f"{layer}.weight"], blocks[f"{layer}.bias"]
        ref[sw, sw] = torch.kron(G, A)
        ref[sb, sb] = G
    samples = draws(sampler, p.model, state, 4000)
    assert_moments(samples, 0.25 * ref)


def test_kfac_conv_factors_and_mc_kind() -> None:
    p, X, y = one_batch("cnn-ce-mean-one")
    for kind in ("empirical", "mc"):
        state = KFACNoise(kind, scale=1.0).estimate(p.model, p.loss_fn, X, y, make_generator(0))
        B, C = state["0"]["B"], state["0"]["C"]
        cols = torch.nn.functional.unfold(X, 3, padding=1)  # (n, 18, 16)
        rows = cols.transpose(1, 2).reshape(-1, 18)
        torch.testing.assert_close(C.T @ C, rows.T @ rows / rows.shape[0])
        assert B.shape[0] == 3 and torch.linalg.eigvalsh(B @ B.T).min() > -1e-12
    # BatchNorm (eval) parameters are outside Linear/Conv layers: since KFACNoise works on any
    # model they get the diagonal Fisher, the layers their K-FAC blocks (it used to refuse)
    model, loss_fn, X, y = _bn_problem()
    state = KFACNoise(scale=1.0).estimate(model, loss_fn, X, y, make_generator(0))
    bn = {n for n, _ in model.named_parameters() if n not in _kfac_covered(model, state)}
    assert bn and set(state["__diagonal__"]) == bn
    noise = KFACNoise(scale=1.0).sample(model, loss_fn, X, y, generator=make_generator(0))
    assert set(noise) == {n for n, _ in model.named_parameters()}
    assert all(bool(torch.isfinite(v).all()) for v in noise.values())


def _kfac_covered(model: nn.Module, state: dict) -> set[str]:
    """Parameter names of the layers that got K-FAC blocks."""
    modules = dict(model.named_modules())
    out = set()
    for name in state:
        if name in modules:
            out.update(f"{name}.{k}" for k, p in modules[name].named_parameters() if p is not None)
    return out


def _bn_problem():
    p = make_problem("cnnbn-ce-mean-three")
    return p.model, p.loss_fn, p.X, p.y


# ---------------------------------------------------------------------------- projections
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_full_fisher_projections_on_a_larger_cnn(kind: str) -> None:
    """Var(u^T eps) = scale^2 u^T F u along random directions (1,144 parameters)."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Net().double()
    X = torch.randn(24, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (24,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    names = R.param_names(model)
    theta = R.flat(model)
    U = torch.randn(4, theta.numel(), generator=gen, dtype=torch.float64)
    U /= U.norm(dim=1, keepdim=True)

    def out(t: Tensor) -> Tensor:
        return functional_call(model, R.unflatten(model, t), (X,))

    spec = loss_spec(loss_fn)
    f = out(theta).detach()
    if kind == "true":  # u^T J^T H_f J u, with H_f of L = mean CE
        H = torch.func.hessian(lambda o: loss_fn(o, y))(f).reshape(f.numel(), f.numel())
        JU = torch.stack([jvp(out, (theta,), (u,))[1].reshape(-1) for u in U])
        quad = JU @ H @ JU.T
    else:  # (1/N) sum_n (grad NLL_n . u)(grad NLL_n . v)  (c = 1)
        D = torch.stack(
            [jvp(lambda t: spec.per_example_nll(out(t), y), (theta,), (u,))[1] for u in U]
        )
        quad = D @ D.T / X.shape[0]
    sampler = FullFisherNoise(kind, scale=0.5)
    g = make_generator(1)
    proj = torch.stack(
        [U @ flat_sample(sampler.estimate(model, loss_fn, X, y, g), model) for _ in range(1500)]
    )
    assert names
    assert_moments(proj, 0.25 * quad)


@pytest.mark.parametrize("dims", [1, 2])
def test_diag_state_for_strided_dilated_convolutions(dims: int) -> None:
    """The hooks' patch extraction handles stride, dilation and asymmetric padding."""
    from tests.problems import Problem

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if dims == 2:
            conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 0))
            X = torch.randn(5, 2, 7, 6, generator=gen, dtype=torch.float64)
        else:
            conv = nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=1)
            X = torch.randn(5, 2, 9, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            width = conv(X.float()).flatten(1).shape[1]
        model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(width, 3)).double()
    y = torch.randint(0, 3, (5,), generator=gen)
    p = Problem("conv", model, nn.CrossEntropyLoss(), (X, y), X, y)
    diag = diag_curvature(model, p.loss_fn, X, y, "empirical", make_generator(0))
    R.assert_dicts_close(diag, R.as_dict(model, R.dense_empirical_fisher(p)), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", ["cnn-ce-mean-one", "mlp-mse-sum-one", "conv1d-mse-sum-one"])
def test_kfac_noise_kron_matches_curvlab_kfac(name: str) -> None:
    """kron(G, A) of the noise equals cl.kfac's (the noise's G carries the T of A for convs)."""
    kfac = pytest.importorskip("curvlab.quantities._kfac").kfac
    p = make_problem(name)
    factors = kfac(p.model, p.loss_fn, (p.X, p.y), kind="empirical")
    state = KFACNoise(scale=1.0).estimate(p.model, p.loss_fn, p.X, p.y, make_generator(0))
    assert set(factors) == set(state)
    for layer, fac in factors.items():
        B, C = state[layer]["B"], state[layer]["C"]
        torch.testing.assert_close(torch.kron(B @ B.T, C.T @ C), torch.kron(fac.G, fac.A))


@pytest.mark.parametrize(
    "make",
    [
        lambda: FullFisherNoise("true", scale=0.1),
        lambda: FullFisherNoise("empirical", scale=0.1),
        lambda: MultiplicativeNoise(0.1),
    ],
)
def test_sample_keeps_train_mode_batchnorm_statistics(make) -> None:
    """The samplers' own forward pass left BatchNorm's running statistics updated a second time
    (found in review; the penalties already kept them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    X, y = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make().sample(model, nn.CrossEntropyLoss(), X, y, seed=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sample_on_a_lazy_batchnorm_not_yet_run() -> None:
    """A model whose lazy BatchNorm has not run yet is refused, naming it, and left lazy: the
    sample's own forward would materialize it, a change to the user's model (review s18: every
    entry point refuses lazy modules; this sample used to initialise them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LazyBatchNorm1d(), nn.Linear(6, 3))
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=r"uninitialized \(lazy\).*'1\.weight'"):
        MultiplicativeNoise(0.1).sample(model, nn.CrossEntropyLoss(), X, y, seed=0)
    assert isinstance(model[1], nn.LazyBatchNorm1d)
    model(X)  # the user's first forward pass materializes it; then it is sampled
    eps = MultiplicativeNoise(0.1).sample(model, nn.CrossEntropyLoss(), X, y, seed=0)
    assert set(eps) == {n for n, _ in model.named_parameters()}
