"""Review sweep 12, K-FAC: 16-bit products, shared-weight bias noise, no_grad calls, conv refusals.

Every number is checked against a brute force written here: float64 sums of the layers' own
16-bit values, torch.func's GGN block, and the documented diagonal Fisher for the noise (with a
tolerance from the standard error of the draws).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl
from curvlab.noise import KFACNoise, NoisyOptimizer


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# --- 1. 16-bit models: the products are taken in float32 ----------------------------------------


def _sequence_mlp(dtype: torch.dtype) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """A sequence MLP whose first layer sees activations of about 30 on 8 x 64 tokens (the sum of
    ``x x^T`` is ~5e5, past float16's 65504) and whose output gradients at that layer are about
    1e-4 (``delta delta^T`` ~ 1e-8, float16 subnormals). Returns the 16-bit model, its float32
    twin (the same 16-bit values), inputs and labels."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        model[0].weight.mul_(0.05)
        model[2].weight.mul_(0.01)
        model[4].weight.mul_(0.01)
    low = model.to(dtype)
    twin = copy.deepcopy(low).float()
    X = (torch.randn(8, 64, 8, generator=g) * 30).to(dtype)
    y = torch.randint(0, 5, (8, 64), generator=g)
    return low, twin, X, y


def _factors_by_hand(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """``A = (1/N) sum_n (1/T) sum_t u u^T`` and ``G = sum_{n,t} d d^T`` (empirical, reduction
    ``"sum"``: weight 1) of every Linear layer, from the model's own (16-bit) inputs and output
    gradients, summed in float64."""
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def hook(name: str):  # noqa: ANN202
        def fn(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
            inputs[name], outputs[name] = inp[0].detach(), out

        return fn

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        out = model(X)
    finally:
        for h in handles:
            h.remove()
    nll = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")
    names = list(outputs)
    grads = torch.autograd.grad(nll, [outputs[n] for n in names])
    n_ex, T = X.shape[0], X.shape[1]
    result = {}
    for name, d in zip(names, grads):
        u = inputs[name].double().reshape(-1, inputs[name].shape[-1])
        d = d.double().reshape(-1, d.shape[-1])
        result[name] = (u.T @ u / (n_ex * T), d.T @ d)
    return result


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_factors_are_float32_sums_of_the_16bit_values(dtype: torch.dtype) -> None:
    """Found in review: the outer products were summed in the 16-bit dtype and only then upcast:
    float16 ``A`` overflowed to inf (float32 twin: max 1022), float16 ``G`` was 20% off from
    subnormal products, bfloat16 ``A`` 1.8e-3 off. Now every factor is the float32 sum of the
    layer's own 16-bit values (float64 brute force) and close to the float32 twin's."""
    torch.set_num_threads(1)
    low, twin, X, y = _sequence_mlp(dtype)
    lf = nn.CrossEntropyLoss(reduction="sum")
    got = cl.kfac(low, lf, (X, y), kind="empirical")
    want = _factors_by_hand(low, X, y)
    ref = cl.kfac(twin, lf, (X.float(), y), kind="empirical")
    for name, (A, G) in want.items():
        f = got[name]
        assert f.A.dtype == f.G.dtype == torch.float32
        assert torch.isfinite(f.A).all() and torch.isfinite(f.G).all(), name
        assert _rel(f.A, A) < 1e-6, (name, _rel(f.A, A))
        assert _rel(f.G, G) < 1e-5, (name, _rel(f.G, G))
        # the 16-bit forward itself rounds (bfloat16: 8 bits), so the twin agrees to that
        tol = 5e-3 if dtype == torch.float16 else 5e-2
        assert _rel(f.A, ref[name].A) < tol, (name, _rel(f.A, ref[name].A))
        assert _rel(f.G, ref[name].G) < tol, (name, _rel(f.G, ref[name].G))
    # the case float16 sums fail on: sum_{n,t} x x^T of layer 0 (before the 1/(N T)) past
    # float16's largest number, its output gradients' products below its smallest normal one
    tokens = X.shape[0] * X.shape[1]
    assert float(want["0"][0].max()) * tokens > 65504
    assert float(want["0"][1].abs().max()) / tokens < 6.1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_reduce_factors_are_float32_sums(dtype: torch.dtype) -> None:
    """``approx="reduce"`` sums each example's columns over positions: in float32 too."""
    torch.set_num_threads(1)
    low, twin, X, y = _sequence_mlp(dtype)
    lf = nn.CrossEntropyLoss(reduction="sum")
    got = cl.kfac(low, lf, (X, y), kind="empirical", approx="reduce")
    ref = cl.kfac(twin, lf, (X.float(), y), kind="empirical", approx="reduce")
    tol = 5e-3 if dtype == torch.float16 else 5e-2
    for name, f in got.items():
        assert torch.isfinite(f.A).all() and torch.isfinite(f.G).all(), name
        assert _rel(f.A, ref[name].A) < tol, (name, _rel(f.A, ref[name].A))
        assert _rel(f.G, ref[name].G) < tol, (name, _rel(f.G, ref[name].G))


# --- 2. KFACNoise: biases of layers sharing one weight get their diagonal ------------------------


class _Share(nn.Module):
    """Two Linear layers sharing one weight, each with a bias of its own (``kfac`` gives the block
    ``has_bias=False``), and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.h = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.h(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _share_problem() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    model = _Share().double()
    X = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


def test_shared_weight_biases_get_their_diagonal_noise() -> None:
    """Found in review: ``draw`` overwrote the diagonal noise of ``a.bias`` with the block's ``G``
    (the sum over both layers: variance 2.2x to 1600x its Fisher diagonal). The covariance of many
    draws is now ``scale^2 diag(F)`` (documented), within 5 standard errors per entry."""
    torch.set_num_threads(1)
    model, lf, X, y = _share_problem()
    assert cl.kfac(model, lf, (X, y), kind="empirical")["a"].has_bias is False
    diag = cl.diag_fisher(model, lf, (X, y), kind="empirical")
    sampler = KFACNoise("empirical", scale=0.5)
    state = sampler.estimate(model, lf, X, y, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    n = 4000
    draws = [sampler.draw(model, state, gen) for _ in range(n)]
    for name in ("a.bias", "b.bias"):
        Z = torch.stack([d[name] for d in draws])  # (n, 3), mean zero
        cov = Z.T @ Z / n
        sd = 0.5 * diag[name].sqrt()
        want = torch.diag(sd**2)
        # Var(z_i z_j) = s_i^2 s_j^2 (1 + [i == j]) for independent Gaussian entries
        se = torch.outer(sd, sd) * (1 + torch.eye(3, dtype=sd.dtype)).sqrt() / n**0.5
        assert ((cov - want).abs() <= 5 * se + 1e-15).all(), (name, cov, want)


def test_shared_weight_bias_noise_comes_from_the_diagonal_deterministic() -> None:
    """The bias noise of ``a`` and ``b`` is exactly the diagonal part's (zero where the saved
    diagonal is zero), the weight noise still the block's; the state saves and loads (the old
    ``_saved_problem`` counted ``a.bias`` as the block's and refused the state it had made)."""
    torch.set_num_threads(1)
    model, lf, X, y = _share_problem()
    sampler = KFACNoise("empirical", scale=1.0)
    state = sampler.estimate(model, lf, X, y, torch.Generator().manual_seed(0))
    assert sorted(state["__diagonal__"]) == ["a.bias", "b.bias"]
    assert sampler._saved_problem(state, model) is None
    state["__diagonal__"] = {k: torch.zeros_like(v) for k, v in state["__diagonal__"].items()}
    noise = sampler.draw(model, state, torch.Generator().manual_seed(2))
    assert noise["a.bias"].abs().max() == 0 and noise["b.bias"].abs().max() == 0
    assert noise["a.weight"].abs().max() > 0 and noise["h.bias"].abs().max() > 0

    opt = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, lf, seed=0)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = lf(model(X), y)
        loss.backward()
        return loss

    opt.step(closure)
    saved = opt.state_dict()
    again = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        KFACNoise("empirical", scale=1.0),
        model,
        lf,
        seed=0,
    )
    again.load_state_dict(saved)  # raised 'not parameters of the model ['a.bias']' before


def test_a_layer_with_its_own_bias_used_twice_keeps_the_block_bias() -> None:
    """One layer called twice (one bias): ``G`` is that bias's block, so its noise is ``B z``."""
    torch.set_num_threads(1)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.h = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.h(torch.tanh(self.a(torch.tanh(self.a(x)))))

    model = Twice().double()
    X = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    sampler = KFACNoise("empirical", scale=1.0)
    state = sampler.estimate(model, nn.CrossEntropyLoss(), X, y, torch.Generator().manual_seed(0))
    assert "a.bias" not in state.get("__diagonal__", {})
    assert sampler._saved_problem(state, model) is None
    gen = torch.Generator().manual_seed(3)
    noise = sampler.draw(model, state, gen)
    gen = torch.Generator().manual_seed(3)
    B = state["a"]["B"]
    torch.randn((B.shape[1], state["a"]["C"].shape[0]), generator=gen, dtype=B.dtype)  # weight
    torch.testing.assert_close(
        noise["a.bias"], B @ torch.randn((B.shape[1],), generator=gen, dtype=B.dtype)
    )


# --- 3. a call under no_grad inside forward is no use of the weight ----------------------------


class _Gated(nn.Module):
    """A layer applied twice: once under ``no_grad`` (a gate, constant for the weights), once in
    the graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            gate = torch.sigmoid(self.l(2 * x))
        return self.l(x) * gate


def _ggn_blocks(model: nn.Module, lf: nn.Module, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The exact GGN blocks of ``l.weight`` (row-major) and ``l.bias`` by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(w: Tensor, b: Tensor) -> Tensor:
        return functional_call(model, {**params, "l.weight": w, "l.bias": b}, (X,))

    Jw, Jb = jacrev(f, argnums=(0, 1))(params["l.weight"], params["l.bias"])
    out = f(params["l.weight"], params["l.bias"]).detach()
    k = out.numel()
    H = hessian(lambda o: lf(o.reshape(out.shape), y))(out.reshape(-1))
    Jw, Jb = Jw.reshape(k, -1), Jb.reshape(k, -1)
    return Jw.T @ H @ Jw, Jb.T @ H @ Jb


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_no_grad_call_is_no_use_one_example_is_the_exact_block(approx: str) -> None:
    """Found in review: the gate call counted as a use in ``A``'s average, so for one example
    (where K-FAC is exact) ``weight_block()`` was 1.5 (relative) off torch.func's GGN block."""
    torch.set_num_threads(1)
    model = _Gated().double()
    lf = nn.CrossEntropyLoss()
    X = torch.randn(1, 4, dtype=torch.float64)
    y = torch.tensor([1])
    f = cl.kfac(model, lf, (X, y), kind="exact", approx=approx)["l"]
    Dw, Db = _ggn_blocks(model, lf, X, y)
    assert _rel(f.weight_block(), Dw) < 1e-12
    assert _rel(f.bias_block(), Db) < 1e-12


def test_no_grad_call_leaves_a_of_the_graph_calls_engine_and_capture() -> None:
    """For several examples ``A`` is the mean of the graph call's ``x x^T`` alone, in ``kfac``,
    in ``KFACNoise``'s engine pass and in a ``NoisyOptimizer`` step; a shared weight whose second
    layer runs under ``no_grad`` likewise."""
    torch.set_num_threads(1)
    model = _Gated().double()
    lf = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    want = X.T @ X / 6
    for kind in ("exact", "empirical", "mc"):
        torch.testing.assert_close(cl.kfac(model, lf, (X, y), kind=kind, seed=0)["l"].A, want)
    state = KFACNoise("empirical", scale=1.0).estimate(
        model, lf, X, y, torch.Generator().manual_seed(0)
    )
    C = state["l"]["C"]
    torch.testing.assert_close(C.T @ C, want)
    opt = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        KFACNoise("empirical", scale=1.0),
        model,
        lf,
        seed=0,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = lf(model(X), y)
        loss.backward()
        return loss

    opt.step(closure)
    C = opt._state["l"]["C"]
    torch.testing.assert_close(C.T @ C, want)

    class SharedGate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
            self.b.weight = self.a.weight

        def forward(self, x: Tensor) -> Tensor:
            with torch.no_grad():
                gate = torch.sigmoid(self.b(3 * x))
            return self.a(x) * gate

    shared = SharedGate().double()
    torch.testing.assert_close(cl.kfac(shared, lf, (X, y), kind="exact")["a"].A, want)


# --- 4. refused convolutions name the ways out ---------------------------------------------------


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(3, 3, 3, groups=3, padding=1),
        lambda: nn.Conv2d(3, 3, 3, padding="same"),
        lambda: nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
        lambda: nn.Conv1d(3, 3, 3, padding=1, padding_mode="circular"),
    ],
)
def test_refused_convolutions_name_the_ways_out(conv) -> None:  # noqa: ANN001
    """The refusal comes before any forward and says what to do; the ``params=`` it names works,
    and ``KFACNoise`` gives the layer its diagonal."""
    torch.set_num_threads(1)
    layer = conv()
    flat = nn.Flatten()
    head = nn.Linear(3 * 5 * 5, 2) if isinstance(layer, nn.Conv2d) else nn.Linear(3 * 5, 2)
    model = nn.Sequential(
        nn.Conv2d(3, 3, 1) if isinstance(layer, nn.Conv2d) else nn.Conv1d(3, 3, 1),
        layer,
        nn.Tanh(),
        flat,
        head,
    ).double()
    shape = (4, 3, 5, 5) if isinstance(layer, nn.Conv2d) else (4, 3, 5)
    X = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 2, (4,))
    lf = nn.CrossEntropyLoss()
    calls = []
    h = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"layer '1'") as err:
            cl.kfac(model, lf, (X, y))
    finally:
        h.remove()
    assert calls == []
    msg = str(err.value)
    for part in ("params=", "diag_fisher", "KFACNoise"):
        assert part in msg, msg
    hint = re.search(r"params=(lambda name, p: [^)]*\))", msg)
    assert hint is not None, msg
    f = cl.kfac(model, lf, (X, y), params=eval(hint.group(1)))  # noqa: S307 - the message's own hint
    assert sorted(f) == ["0", "4"]
    eps = KFACNoise("empirical", scale=1.0).sample(
        model, lf, X, y, generator=torch.Generator().manual_seed(0)
    )
    assert eps["1.weight"].shape == layer.weight.shape


def test_same_padding_hint_is_the_same_convolution() -> None:
    """The message's hint: ``padding="same"`` with an odd kernel is the integer padding
    ``dilation * (kernel_size - 1) // 2``."""
    torch.set_num_threads(1)
    same = nn.Conv2d(2, 3, (3, 5), padding="same", dilation=(2, 1)).double()
    with pytest.raises(ValueError, match=r"dilation \* \(kernel_size - 1\) // 2"):
        cl.kfac(
            nn.Sequential(same),
            nn.MSELoss(),
            (
                torch.randn(2, 2, 6, 6, dtype=torch.float64),
                torch.randn(2, 3, 6, 6, dtype=torch.float64),
            ),
        )
    ints = nn.Conv2d(2, 3, (3, 5), padding=(2, 2), dilation=(2, 1)).double()
    ints.load_state_dict(same.state_dict())
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(same(x), ints(x), rtol=0, atol=0)
