"""Review s14, numerics: one coordinate's cancellation in gradient_stats, fisher_norms' float32
squares, the exact GGN's square-root columns counted before they are built, MSE Monte-Carlo
labels kept in float64, and float class indices named as a dtype problem."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab as cl
from curvlab._losses import loss_spec
from curvlab.estimators._memory import EstimatorMemoryError


def _per_example_grads(model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor):
    """Brute force: ``grad l_n`` of ``l_n = loss_fn(model(x_n), y_n)`` per example."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, t):
        return loss_fn(functional_call(model, p, (x[None],)), t[None])

    return vmap(grad(one), in_dims=(None, 0, 0))(params, X, y)


def _runtime_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


# ---------------------------------------------------------------- 1. gradient_stats, per coordinate
@pytest.mark.parametrize("spread", [1e-3, 1e-4])
def test_gradient_stats_warns_for_one_near_constant_input_column(spread):
    """Input column 0 is ``1 +- spread``, the others standardised: weight[0, 0]'s float32
    variance is 14% off (1e-3) or clamped to 0 (1e-4) while the parameter's summed bound is tiny;
    the warning names the parameter and one of its 8 coordinates (it was silent)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    X = torch.randn(256, 8, dtype=torch.float64)
    X[:, 0] = 1 + spread * torch.randn(256, dtype=torch.float64)
    y = 3 + spread * torch.randn(256, 1, dtype=torch.float64)
    m = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        m.weight.zero_()
    X32, y32 = X.float(), y.float()
    stats, messages = _runtime_warnings(lambda: cl.gradient_stats(m, nn.MSELoss(), (X32, y32)))
    g = _per_example_grads(copy.deepcopy(m).double(), nn.MSELoss(), X32.double(), y32.double())
    var = g["weight"].var(0, unbiased=False)
    got = stats.variance["weight"].double()
    assert float(abs(got[0, 0] - var[0, 0]) / var[0, 0]) > 0.1  # the float32 value is wrong
    assert float(((got[0, 1:] - var[0, 1:]).abs() / var[0, 1:]).max()) < 1e-3  # the rest is not
    assert len(messages) == 1
    assert "'weight' (1 of 8 coordinates" in messages[0]
    assert "noise_scale are not" in messages[0]


def test_gradient_stats_stays_silent_on_ordinary_models():
    """An MLP and a CNN on random data, cross-entropy and MSE: no coordinate warns."""
    torch.set_num_threads(1)
    for seed in range(3):
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5))
        cnn = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 5),
        )
        for model, X in [(mlp, torch.randn(128, 10)), (cnn, torch.randn(64, 3, 8, 8))]:
            n = X.shape[0]
            for lf, y in [
                (nn.CrossEntropyLoss(), torch.randint(0, 5, (n,))),
                (nn.MSELoss(), torch.randn(n, 5)),
            ]:
                _, messages = _runtime_warnings(
                    lambda model=model, lf=lf, X=X, y=y: cl.gradient_stats(model, lf, (X, y))
                )
                assert messages == [], (seed, type(model[0]).__name__, type(lf).__name__)


# ---------------------------------------------------------------- 2. fisher_norms, float64 squares
@pytest.mark.parametrize("chunk_size", [None, 16])
def test_fisher_norms_squares_a_large_float32_gram_in_float64(chunk_size):
    """MSE targets 3e8: the float32 Gram entries of the NLL gradients (up to 2.6e19) are
    finite, the sum of their squares is not; ||F||_F = 1.4e17 was a NonFiniteError. Now the
    brute-force value (float64 per-example gradients)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lf = nn.MSELoss()
    X, y = torch.randn(64, 16), torch.randn(64, 4) * 3e8
    m = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    V = _flat(_per_example_grads(m, nn.MSELoss(reduction="sum"), X, y))  # grad NLL_n, float32
    gram = V @ V.T
    assert bool(torch.isfinite(gram).all()) and not bool(torch.isfinite((gram**2).sum()))
    m64 = copy.deepcopy(m).double()
    G = _flat(_per_example_grads(m64, lf, X.double(), y.double()))  # grad l_n, mean convention
    expected = float((G @ G.T).norm()) / 64  # F = (1/N) sum_n g_n g_n^T
    kw = {} if chunk_size is None else {"chunk_size": chunk_size}
    got = cl.fisher_norms(m, lf, (X, y), **kw).frobenius
    assert got == pytest.approx(expected, rel=1e-4)


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten(1) for v in grads.values()], 1)


# ---------------------------------------------------------------- 3. the square-root columns' memory
class _Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.head = nn.Linear(8, 11)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def test_exact_ggn_refuses_square_root_columns_that_cannot_fit():
    """Logits (2, 25000, 11): one example's square-root columns are 275,000^2 floats (302.5 GB);
    it failed with the allocator's raw RuntimeError after the pass began. Now an
    EstimatorMemoryError naming the size and kind='mc', before any factor is built."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = _Seq()
    X, y = torch.randint(0, 11, (2, 25000)), torch.randint(0, 11, (2, 25000))
    with pytest.raises(EstimatorMemoryError, match=r"275,000 x 275,000.*kind='mc'"):
        cl.diag_fisher(m, nn.CrossEntropyLoss(), (X, y), kind="exact", backend="func")
    spec = loss_spec(nn.CrossEntropyLoss())
    logits = torch.zeros(1, 11, 25000)  # what sqrt_columns would expand: checked first
    with pytest.raises(EstimatorMemoryError, match=r"275,000\^2 per example.*kind='mc'"):
        spec.sqrt_columns(logits, torch.zeros(1, 25000, dtype=torch.long))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_sqrt_columns_square_the_loss_hessian(loss):
    """Brute force: sum_k s_nk s_nk^T is example n's NLL Hessian w.r.t. its outputs (ignored
    positions zero), for (n, C, T) outputs; the columns are built in one allocation now."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lf = nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss()
    spec = loss_spec(lf)
    f = torch.randn(3, 4, 5, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, 4, (3, 5))
        y[1, 2] = -100
    else:
        y = torch.randn(3, 4, 5, dtype=torch.float64)
    cols = spec.sqrt_columns(f, y)
    assert cols.shape == (20, 3, 4, 5)
    for n in range(3):
        S = cols[:, n].reshape(20, 20)
        H = torch.autograd.functional.hessian(
            lambda z, n=n: spec.nll_sum(z.reshape(1, 4, 5), y[n : n + 1], twice=True),
            f[n].reshape(-1),
        )
        torch.testing.assert_close(S.T @ S, H, rtol=1e-10, atol=1e-12)


def test_exact_ggn_in_small_blocks_matches_brute_force(monkeypatch):
    """With the memory available holding a block of about two examples' square-root columns,
    the func backend's exact GGN diagonal still equals the brute-force J^T H J."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = _Seq().double()
    X, y = torch.randint(0, 11, (5, 6)), torch.randint(0, 11, (5, 6))
    lf = nn.CrossEntropyLoss(reduction="sum")
    expected = cl.diag_fisher(m, lf, (X, y), kind="exact", backend="func")
    from curvlab.backends import _func
    from curvlab.estimators import _memory

    K = 6 * 11
    steps = []
    block = _func._sqrt_block

    def spy(*args):  # noqa: ANN002, ANN202
        steps.append(block(*args))
        return steps[-1]

    # per example its factors (K (1,496 + 792) bytes) and square-root columns (K^2 8 bytes)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 360_000)
    monkeypatch.setattr(_func, "_sqrt_block", spy)
    got = cl.diag_fisher(m, lf, (X, y), kind="exact", backend="func")
    monkeypatch.undo()
    assert steps == [1]  # the columns counted (two examples' factors alone fit)
    params = dict(m.named_parameters())
    spec = loss_spec(lf)
    for k, p in params.items():
        diag = torch.zeros_like(p).flatten()
        for n in range(5):

            def out(w, k=k, n=n, p=p):
                return functional_call(m, {**params, k: w.view_as(p)}, (X[n : n + 1],))

            J = torch.autograd.functional.jacobian(out, p.detach().flatten()).reshape(K, -1)
            H = torch.autograd.functional.hessian(
                lambda z, n=n: spec.nll_sum(
                    z.reshape(1, 6, 11).movedim(-1, 1), y[n : n + 1], twice=True
                ),
                out(p.detach().flatten()).detach().reshape(-1),
            )
            diag += torch.einsum("ka,kl,la->a", J, H, J)
        torch.testing.assert_close(got[k].flatten(), diag, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(expected[k], got[k], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- 4. MSE labels in float64
def test_mse_mc_fisher_keeps_the_noise_at_large_outputs():
    """Outputs near 1e7 in float32: output + noise was rounded to float32's spacing (1), the
    Monte-Carlo Fisher +16% above the exact GGN. The draws are float64 now: the float32 model's
    MC diagonal at outputs 1e7 equals its value at outputs 0 (the same noise, seed for seed)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    X = torch.randn(256, 4)
    lf = nn.MSELoss()
    base = nn.Linear(4, 1)
    results = {}
    for off in [0.0, 1e7]:
        m = copy.deepcopy(base)
        with torch.no_grad():
            m.bias.fill_(off)
        y = m(X).detach() + torch.randn(256, 1)
        exact = cl.diag_fisher(m, lf, (X, y), kind="exact")
        mc = cl.diag_fisher(m, lf, (X, y), kind="mc", mc_samples=64, seed=0)
        total = sum(float(v.sum()) for v in mc.values())
        results[off] = total / sum(float(v.sum()) for v in exact.values())
    assert results[1e7] == pytest.approx(results[0.0], rel=1e-5)
    assert abs(results[1e7] - 1) < 0.03  # 64 x 256 draws: a standard error of ~1.1%


def test_mse_draws_are_float64_with_the_same_noise():
    """The drawn labels are float64 and ``output + noise`` with the noise values the float32
    draw used (the same uniforms), so seeded results change only by the rounding removed."""
    torch.set_num_threads(1)
    spec = loss_spec(nn.MSELoss())
    out = torch.full((8, 3), 1e7)
    d = spec.sample_targets(out, torch.Generator().manual_seed(0))
    d0 = spec.sample_targets(torch.zeros(8, 3), torch.Generator().manual_seed(0))
    assert d.dtype == torch.float64 and d0.dtype == torch.float64
    torch.testing.assert_close(d - 1e7, d0, rtol=0, atol=0)
    assert float(d0.float().double().sub(d0).abs().max()) == 0  # float32 noise values
    # scored unrounded, with a gradient of the output's dtype: d/df (f - y)^2 = 2 (f - y)
    f = out.clone().requires_grad_(True)
    spec.nll_sum(f, d, drawn=True).backward()
    assert f.grad.dtype == torch.float32
    torch.testing.assert_close(f.grad.double(), -2 * d0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["hooks", "func", "backpack"])
def test_mse_mc_consumers_take_float64_draws(backend):
    """Every route that draws MSE labels and scores them works with the float64 draws (their
    checks refused float64 targets for a float32 output): diag_fisher, fisher_norms (one chunk
    and several), kfac, trace of the Fisher, fisher_trace; float64 data targets of a float32
    model give the float32 targets' numbers (torch's MSELoss scores them in float64 too)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    X = torch.randn(16, 4)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    y = m(X).detach() + torch.randn(16, 2)
    lf = nn.MSELoss()
    D = (X, y)
    mc = cl.diag_fisher(m, lf, D, kind="mc", mc_samples=3, seed=0, backend=backend)
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in mc.values())
    one = cl.fisher_norms(m, lf, D, kind="mc", mc_samples=3, seed=0, backend=backend).frobenius
    many = cl.fisher_norms(m, lf, D, kind="mc", mc_samples=3, seed=0, backend=backend, chunk_size=4)
    assert many.frobenius == pytest.approx(one, rel=1e-5)
    for kind in ["empirical", "exact"]:
        be = "auto" if (backend, kind) == ("hooks", "exact") else backend  # hooks: first order
        a = cl.diag_fisher(m, lf, (X, y.double()), kind=kind, backend=be)
        b = cl.diag_fisher(m, lf, D, kind=kind, backend=be)
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=0)
    if backend == "hooks":
        assert float(cl.kfac(m, lf, D, kind="mc", mc_samples=2, seed=0)["0"].G.sum()) > 0
        assert cl.trace(m, lf, D, matrix="fisher", seed=0).value > 0
        assert cl.fisher_trace(m, lf, D, seed=0).value > 0
    with pytest.raises(TypeError, match="targets of dtype torch.float16 for outputs"):
        cl.diag_fisher(m, lf, (X, y.half()), backend=backend)  # narrower: still refused


# ---------------------------------------------------------------- 5. float class indices
def test_float_class_indices_are_named_as_a_dtype_problem():
    """Targets (N,) of dtype float64 for logits (N, C): the message blamed the shape, which is
    right; it says the dtype now (y.long()). Float targets shaped like the logits stay class
    probabilities."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    X = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    with pytest.raises(TypeError, match=r"class indices must be integers.*y\.long\(\)"):
        cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y.double()))
    seq = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 4)).double()  # GPT layout (B, T, C)
    ids, labels = torch.randint(0, 5, (2, 7)), torch.randint(0, 4, (2, 7))
    with pytest.raises(TypeError, match=r"class indices must be integers"):
        cl.diag_fisher(seq, nn.CrossEntropyLoss(), (ids, labels.double()))
    probs = torch.softmax(torch.randn(6, 4, dtype=torch.float64), 1)
    d = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, probs))  # class probabilities: valid
    assert all(bool(torch.isfinite(v).all()) for v in d.values())
    with pytest.raises(ValueError, match=r"targets of shape \(6, 3\)"):  # a wrong shape
        cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, probs[:, :3]))
