"""Review s26 (RX1, FX3): a reading carries the plain attributes of the loader itself and of a
wrapper (accelerate's ``DataLoaderShard.iteration``); the func backend takes the per-example
loop for a forward drawing per example from a numpy or Python generator a layer holds, and
puts that generator back; a block of one example is mapped without the internal "unprobed"
randomness reaching ``vmap``."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, dtype=DT, generator=g), torch.arange(n) % 3


def _hessian_trace(model: nn.Module, batches) -> float:
    """Dense float64 tr H of the mean cross-entropy over the batches (weighted by size)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])

    def loss(p):
        return nn.functional.cross_entropy(functional_call(model, p, (xs,)), ys)

    h = hessian(loss)(params)
    return float(sum(h[k][k].reshape(p.numel(), p.numel()).trace() for k, p in params.items()))


# ---------------------------------------------------------------- 1. the loader's own state
def _orders(loader, call=None, epochs: int = 3) -> list[list[int]]:
    out = []
    for _ in range(epochs):
        out.append(torch.cat([t for _, t in loader]).tolist())
        if call is not None:
            call(loader)
    return out


def test_accelerate_prepared_loader_keeps_its_iteration():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import DataLoaderConfiguration

    x, y = _data()
    model = _model()

    def prepared():
        acc = accelerate.Accelerator(
            cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
        )
        return acc.prepare(DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True))

    reference = prepared()
    expected = _orders(reference)
    loader = prepared()
    got = _orders(loader, lambda ld: cl.trace(model, nn.CrossEntropyLoss(), ld, method="exact"))
    assert got == expected  # the user's epochs take the order they take without the call
    assert loader.iteration == reference.iteration == 3


def test_accelerate_prepared_loader_trace_exact_and_analyze_accepts_it():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import DataLoaderConfiguration

    x, y = _data()
    model = _model()
    acc = accelerate.Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )
    loader = acc.prepare(DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True))
    got = cl.trace(model, nn.CrossEntropyLoss(), loader, method="exact")
    value = float(getattr(got, "value", got))
    # the reading sees the epoch the user's loop would see next: the first one
    assert value == pytest.approx(_hessian_trace(model, list(loader)), rel=1e-10)
    assert loader.iteration == 1  # (the user's pass above)
    r = cl.analyze(
        model,
        nn.CrossEntropyLoss(),
        loader,
        quantities=["loss", "trace_hessian"],
        progress=False,
        nqm=False,
    )
    assert len(r.trajectory("loss")) == 1
    assert loader.iteration == 1 and loader.batch_sampler.sampler.epoch == 1


class _EpochLoader(DataLoader):
    """A loader subclass that reshuffles from its own epoch counter and moves it on after a
    pass (as accelerate's ``DataLoaderShard`` does with ``iteration``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(100 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g)
        ds = self.dataset
        for i in range(0, len(order), 5):
            idx = order[i : i + 5]
            yield ds.tensors[0][idx], ds.tensors[1][idx]
        self.epoch += 1


def test_loader_subclass_epoch_counter_is_kept():
    x, y = _data()
    model = _model()
    ref = _EpochLoader(TensorDataset(x, y), batch_size=5)
    expected = _orders(ref)
    w = _EpochLoader(TensorDataset(x, y), batch_size=5)
    values = []

    def call(ld):
        batches = list(_EpochLoader.__iter__(_Frozen(ld)))
        values.append((cl.trace(model, nn.CrossEntropyLoss(), ld, method="exact"), batches))

    got = _orders(w, call)
    assert got == expected and w.epoch == 3
    for value, batches in values:
        value = float(getattr(value, "value", value))
        assert value == pytest.approx(_hessian_trace(model, batches), rel=1e-10)


class _ReadOnce:
    """A wrapper (no loader) that counts its readings and refuses a second one."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.reads = loader, 0

    def __iter__(self):
        self.reads += 1
        if self.reads > 1:
            raise RuntimeError("this stream was read already")
        return iter(self.loader)


def test_a_wrappers_own_counter_is_left_as_the_reading_leaves_it():
    """A wrapper's plain attributes may guard state no reading can put back: they are not
    restored (its loader's and sampler's are)."""
    x, y = _data()
    data = _ReadOnce(DataLoader(TensorDataset(x, y), batch_size=5))
    model = _model()
    got = cl.trace(model, nn.CrossEntropyLoss(), data, method="exact")
    assert data.reads == 1
    value = float(getattr(got, "value", got))
    batches = [(x[i : i + 5], y[i : i + 5]) for i in range(0, len(x), 5)]
    assert value == pytest.approx(_hessian_trace(model, batches), rel=1e-10)
    with pytest.raises(RuntimeError, match="read already"):
        iter(data)


class _Frozen:
    """A copy of a loader's state whose epoch does not move (to list the batches it gives)."""

    def __init__(self, w: _EpochLoader) -> None:
        self.dataset, self.epoch = w.dataset, w.epoch


# ---------------------------------------------------------------- 4. blocks of one example
def _diag_empirical(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Dense float64 (1/N) sum_n g_n^2 of the per-example cross-entropy gradients."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(y)):
        g = grad(one)(params, x[i], y[i])
        for k in out:
            out[k] += g[k] ** 2 / len(y)
    return out


def _close(got, expected) -> None:
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("how", ["chunk_size=1", "first batch of one"])
def test_block_of_one_example_is_mapped(how):
    x, y = _data(8)
    model = _model()
    if how == "chunk_size=1":
        r = cl.diag_fisher(
            model, nn.CrossEntropyLoss(), (x, y), kind="empirical", backend="func", chunk_size=1
        )
    else:
        data = [(x[:1], y[:1]), (x[1:], y[1:])]
        r = cl.diag_fisher(model, nn.CrossEntropyLoss(), data, kind="empirical", backend="func")
    assert r.info["fallbacks"] == ()  # no bogus "vmap failed", no loop for later batches
    _close(r, _diag_empirical(model, x, y))


def test_block_of_one_with_dropout_then_larger_block():
    """A first block of one example with a train-mode Dropout is mapped; a larger block after
    it is still probed (the Dropout's draws are the global RNG's: mapped, "different")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    x, y = _data(6)
    data = [(x[:1], y[:1]), (x[1:], y[1:])]
    r = cl.diag_fisher(model, nn.CrossEntropyLoss(), data, kind="empirical", backend="func")
    assert not any("vmap failed" in f for f in r.info["fallbacks"])


# ---------------------------------------------------------------- 2. a generator a layer holds
_DRAWN: list[torch.Tensor] = []
"""The noise each forward of :class:`_HeldNoise` drew (kept outside the model)."""


class _Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.linspace(0.5, 1.5, n, dtype=DT))

    def forward(self, x):
        return x * self.g


class _HeldNoise(nn.Module):
    """Per-example noise from a generator the layer holds (one row per example)."""

    def __init__(self, kind: str, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.sc, self.lin, self.kind = _Scale(3), nn.Linear(3, 3).to(DT), kind
        self.rng = {
            "default_rng": lambda: np.random.default_rng(seed),
            "RandomState": lambda: np.random.RandomState(seed),
            "Random": lambda: random.Random(seed),
        }[kind]()

    def state(self):
        if self.kind == "default_rng":
            return self.rng.bit_generator.state
        return self.rng.get_state() if self.kind == "RandomState" else self.rng.getstate()

    def forward(self, x):
        n = x.shape[0]
        if self.kind == "Random":
            noise = torch.tensor([[self.rng.gauss(0, 1) for _ in range(3)] for _ in range(n)])
        else:
            noise = torch.from_numpy(np.asarray(self.rng.normal(size=(n, 3))))
        noise = noise.to(DT)
        _DRAWN.append(noise)
        return self.lin(self.sc(x) * noise)


def _per_example_grads(model, x, y, noises) -> torch.Tensor:
    """Dense float64 per-example gradients (flattened), example n with noise row ``noises[n]``."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def one(p, xi, yi, ni):
        h = functional_call(model.sc, {"g": p["sc.g"]}, (xi[None],)) * ni[None]
        out = functional_call(model.lin, {"weight": p["lin.weight"], "bias": p["lin.bias"]}, h)
        return nn.functional.cross_entropy(out, yi[None])

    rows = []
    for i in range(len(y)):
        g = grad(one)(params, x[i], y[i], noises[i])
        rows.append(torch.cat([g[k].reshape(-1) for k in params]))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["default_rng", "RandomState", "Random"])
def test_held_generator_forward_takes_the_loop(kind):
    n = 10
    x = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(3)).expand(n, 3)
    x, y = x.clone(), torch.zeros(n, dtype=torch.long)
    model = _HeldNoise(kind, 0)
    start = model.state()
    _DRAWN.clear()
    r = cl.diag_fisher(model, nn.CrossEntropyLoss(), (x, y), kind="empirical", backend="func")
    assert any("per-example loop" in f for f in r.info["fallbacks"])
    # the loop's forwards: the last n of one example each, each its own noise row
    ones = [d for d in _DRAWN if d.shape[0] == 1][-n:]
    noises = torch.cat(ones)
    assert len(ones) == n and not torch.allclose(noises[0], noises[1])
    g = _per_example_grads(model, x, y, noises)
    expected = (g**2).mean(0)
    got = torch.cat([r[k].reshape(-1) for k, _ in model.named_parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    assert expected.sum() > 0.1  # (vmap gave every example one noise row: the same gradient)
    np.testing.assert_equal(model.state(), start)  # the held generator put back


@pytest.mark.parametrize("kind", ["default_rng", "RandomState", "Random"])
def test_held_generator_gradient_stats(kind):
    n = 12
    x = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(3)).expand(n, 3)
    x, y = x.clone(), torch.zeros(n, dtype=torch.long)
    model = _HeldNoise(kind, 1)
    start = model.state()
    _DRAWN.clear()
    s = cl.gradient_stats(model, nn.CrossEntropyLoss(), (x, y), backend="func")
    noises = torch.cat([d for d in _DRAWN if d.shape[0] == 1][-n:])
    g = _per_example_grads(model, x, y, noises)
    expected = float(((g - g.mean(0)) ** 2).sum() / n)  # Sigma with 1/N (docs/analysis.md)
    assert s.trace_covariance == pytest.approx(expected, rel=1e-9)
    assert expected > 0.01  # (vmap: 1e-17, one noise row per block)
    np.testing.assert_equal(model.state(), start)


def test_held_sign_noise_is_not_read_as_mixing():
    """±1 signs from a held RandomState: the examples-apart check's runs drew from the held
    generator (review s26: 3 seeds of 8 raised a false MixedExamplesError)."""

    class Sign(_HeldNoise):
        def forward(self, x):
            s = torch.from_numpy(self.rng.choice([-1.0, 1.0], size=(x.shape[0], 1)))
            return self.lin(self.sc(x) * s.to(DT))

    x = torch.randn(1, 3, dtype=DT, generator=torch.Generator().manual_seed(3)).expand(16, 3)
    x, y = x.clone(), torch.zeros(16, dtype=torch.long)
    for seed in range(8):
        s = cl.gradient_stats(Sign("RandomState", seed), nn.CrossEntropyLoss(), (x, y))
        assert s.trace_covariance > 0.01


def test_held_torch_generator_put_back_after_the_call():
    """A layer's own ``torch.Generator`` (the loop runs for it) is left as the call found it."""

    class Held(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.sc, self.lin = _Scale(3), nn.Linear(3, 3).to(DT)
            self.gen = torch.Generator().manual_seed(5)

        def forward(self, x):
            noise = torch.randn(x.shape[0], 3, dtype=DT, generator=self.gen)
            return self.lin(self.sc(x) * noise)

    x, y = _data(6)
    model = Held()
    start = model.gen.get_state()
    cl.diag_fisher(model, nn.CrossEntropyLoss(), (x, y), kind="empirical", backend="func")
    assert torch.equal(model.gen.get_state(), start)
