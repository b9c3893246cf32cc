"""Readings of the data (review s26, RA): a generator found on the data that is one of the
global RNGs (sklearn's ``check_random_state(None)``, ``random._inst``,
``generator=torch.default_generator``) is carried once; a sampler's plain state (accelerate's
``SeedableRandomSampler`` epoch) is put back; and the func backend maps a forward drawing from
numpy's or Python's RNG with the per-example loop (each example its own draws)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import grad
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, TensorDataset

import curvlab as cl
from curvlab._data import iter_batches
from tests.test_data_readings_s25 import _hessian_trace

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _host_states():
    return np.random.get_state(), random.getstate(), torch.get_rng_state()


def _same_states(a, b) -> bool:
    (na, ra, ta), (nb, rb, tb) = a, b
    return (
        ra == rb
        and torch.equal(ta, tb)
        and all(
            np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(na, nb)
        )
    )


def _seed_all(seed: int) -> None:
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- 1. a found global generator


class _Held(Dataset):
    """Draws from the generator it holds (one of the global ones)."""

    def __init__(self, rng) -> None:
        self.rng = rng

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i):
        return torch.tensor([float(self.rng.random())], dtype=DT), torch.tensor(0)


class _TorchAug(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i):
        return torch.rand(1, dtype=DT), torch.tensor(0)


def _loaders():
    return {
        "random._inst": lambda: DataLoader(_Held(random._inst), batch_size=2),
        "np.random.mtrand._rand": lambda: DataLoader(_Held(np.random.mtrand._rand), batch_size=2),
        "torch.default_generator": lambda: DataLoader(
            _TorchAug(), batch_size=2, shuffle=True, generator=torch.default_generator
        ),
    }


@pytest.mark.parametrize("name", list(_loaders()))
def test_a_held_global_generator_reads_the_users_batches(name):
    # was: every batch the same draws ([0.844, 0.758] three times for [0.844, 0.758],
    # [0.421, 0.259], [0.511, 0.405]) and the global state left at the reading's stream
    loader = _loaders()[name]()
    _seed_all(0)
    before = _host_states()
    expected = [b[0].flatten().tolist() for b in loader]
    _seed_all(0)
    got = [b[0].flatten().tolist() for b in iter_batches(loader)]
    assert got == expected
    assert _same_states(_host_states(), before)


def test_sklearn_global_random_state_exact_trace():
    # was: exact trace 2.2478 for brute force 1.3398 on the loader's batches, numpy moved
    def check_random_state(seed):  # as sklearn.utils.check_random_state
        return np.random.mtrand._rand if seed is None else np.random.RandomState(seed)

    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    class Jitter(Dataset):
        def __init__(self, random_state=None) -> None:
            self.rng = check_random_state(random_state)

        def __len__(self) -> int:
            return 8

        def __getitem__(self, i):
            return x[i] + torch.from_numpy(self.rng.normal(size=3)), y[i]

    model, loss_fn = _model(), nn.CrossEntropyLoss()
    loader = DataLoader(Jitter(), batch_size=3)
    _seed_all(0)
    reference = list(loader)  # one reading from the caller's states
    _seed_all(0)
    before = _host_states()
    expected = _hessian_trace(model, loss_fn, reference)
    for _ in range(2):
        got = cl.trace(model, loss_fn, loader, method="exact").value
        assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)
        assert _same_states(_host_states(), before)


# ---------------------------------------------------------------- 3. a sampler's own state


class SeedableRandomSampler(RandomSampler):
    """accelerate.data_loader.SeedableRandomSampler's logic: re-seeds from its epoch, and
    moves its epoch on after a full pass."""

    def __init__(self, *args, data_seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.initial_seed = data_seed
        self.epoch = 0

    def __iter__(self):
        if self.generator is None:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.initial_seed)
        self.generator.manual_seed(self.epoch + self.initial_seed)
        yield from super().__iter__()
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


_XS = torch.randn(12, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
_YS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])


def _seedable_loader(batch_sampler: bool = False) -> DataLoader:
    ds = TensorDataset(_XS, _YS)
    sampler = SeedableRandomSampler(ds)
    if batch_sampler:
        return DataLoader(ds, batch_sampler=BatchSampler(sampler, 5, drop_last=False))
    return DataLoader(ds, batch_size=5, sampler=sampler)


def _sampler(loader: DataLoader) -> SeedableRandomSampler:
    return getattr(loader.batch_sampler, "sampler", loader.sampler)


@pytest.mark.parametrize("batch_sampler", [False, True])
def test_seedable_sampler_epoch_is_put_back(batch_sampler):
    # was: each reading moved the sampler's epoch on: epoch 1's order [2,2,2,0,1,2,...] with
    # a call between epochs, [0,2,2,2,0,2,...] without
    model, loss_fn = _model(), nn.CrossEntropyLoss()

    def orders(call: bool):
        loader = _seedable_loader(batch_sampler)
        out = []
        for _ in range(3):
            out.append(torch.cat([t for _, t in loader]).tolist())
            if call:
                expected_loader = _seedable_loader(batch_sampler)  # at the loop's epoch
                _sampler(expected_loader).epoch = len(out)
                expected = _hessian_trace(model, loss_fn, list(expected_loader))
                got = cl.trace(model, loss_fn, loader, method="exact").value
                assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)
        return out

    assert orders(True) == orders(False)


def test_seedable_sampler_analyze_reads_the_same_batches():
    # was: ReadingsDifferError ("another batch 0") blaming an unreachable generator
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    loader = _seedable_loader()
    result = cl.analyze(
        model, loss_fn, loader, quantities=["loss", "trace_hessian"], progress=False, nqm=False
    )
    expected = nn.CrossEntropyLoss(reduction="sum")
    batches = list(_seedable_loader())
    with torch.no_grad():
        want = sum(float(expected(model(x), t)) for x, t in batches) / 12
    assert result.trajectory("loss")[0] == pytest.approx(want, rel=1e-12)
    assert loader.sampler.epoch == 0


# ---------------------------------------------------------------- 2. func: host-RNG forwards


class _Scale(nn.Module):  # a custom layer: auto picks the func backend
    def __init__(self, n: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.g


class _SignNoise(nn.Module):
    """Multiplies each example by a random sign drawn with numpy or Python's random."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source
        self.sc = _Scale(3)
        self.l = nn.Linear(3, 3)

    def forward(self, x):
        if self.source == "numpy":
            sign = torch.from_numpy(np.random.choice([-1.0, 1.0], size=(x.shape[0], 1)))
        else:
            sign = torch.tensor([[random.choice([-1.0, 1.0])] for _ in range(x.shape[0])])
        return self.l(self.sc(x) * sign.to(x.dtype))


@pytest.mark.parametrize("source", ["numpy", "python"])
@pytest.mark.parametrize("backend", ["auto", "func"])
def test_host_rng_forward_gets_per_example_draws_under_func(source, backend):
    # was: one draw for all the examples of a chunk: trace_covariance 3.8e-17 and the
    # empirical diagonal [0.0359, 0.1548, 0.1141] for a forward whose examples differ
    torch.manual_seed(0)
    model, loss_fn = _SignNoise(source).to(DT), nn.CrossEntropyLoss()
    n = 16
    x = torch.randn(1, 3, dtype=DT).expand(n, 3).clone()
    y = torch.zeros(n, dtype=torch.long)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def nll(p, s):  # one example's loss at sign s
        out = torch.nn.functional.linear(x[:1] * p["sc.g"] * s, p["l.weight"], p["l.bias"])
        return loss_fn(out, y[:1])

    plus, minus = grad(nll)(params, 1.0), grad(nll)(params, -1.0)
    np.random.seed(1)
    random.seed(1)
    before = _host_states()
    diag = cl.diag_fisher(model, loss_fn, (x, y), kind="empirical", backend=backend)
    assert _same_states(_host_states(), before)
    # every example is one of two: the diagonal is (k g+^2 + (n-k) g-^2) / n for some 0 < k < n
    got = diag["l.weight"].reshape(-1)
    gp, gm = plus["l.weight"].reshape(-1) ** 2, minus["l.weight"].reshape(-1) ** 2
    k = float(((got - gm) @ (gp - gm)) / ((gp - gm) @ (gp - gm)) * n)
    assert abs(k - round(k)) < 1e-8 and 0 < round(k) < n
    for name in params:
        want = (round(k) * plus[name] ** 2 + (n - round(k)) * minus[name] ** 2) / n
        torch.testing.assert_close(diag[name], want, rtol=1e-10, atol=1e-14)
    stats = cl.gradient_stats(model, loss_fn, (x, y), backend=backend)
    assert stats.trace_covariance > 1e-3
