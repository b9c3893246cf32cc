"""Readings of the data and the host RNGs (review s25, RX1): numpy's and Python's global RNGs
carried over every batch of a reading (not dropped after a first batch that drew nothing),
read and set in place; a forward that draws from them is one function per batch and leaves them
as they were; persistent loaders held deep in a wrapper, or left mid-epoch by curvlab's own
partial readings, and the message of a wrapper's differing readings."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.data import DataLoader, Dataset, TensorDataset

import curvlab as cl
from curvlab._reading_rngs import reading_rngs
from curvlab._same_readings import ReadingsDifferError

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _hessian_trace(model: nn.Module, loss_fn, batches) -> float:
    """Dense float64 tr H of the mean loss over the batches (batches weighted by size)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def unflat(v):
        out, o = {}, 0
        for n, p in params.items():
            out[n] = v[o : o + p.numel()].view_as(p)
            o += p.numel()
        return out

    n = sum(len(b[1]) for b in batches)

    def loss(v):
        return (
            sum(loss_fn(functional_call(model, unflat(v), (x,)), t) * len(t) for x, t in batches)
            / n
        )

    return float(hessian(loss)(flat).diagonal().sum())


_X = torch.randn(12, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
_Y = torch.tensor([0, 0, 0, 0, 1, 0, 1, 0, 0, 1, 0, 1])  # batch 0 holds no rare example


class _RareNoise(Dataset):
    """Jitters the rare class only, from numpy's or Python's global RNG: batch 0 draws nothing."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i):
        x = _X[i]
        if _Y[i] == 1:
            if self.source == "numpy":
                noise = torch.from_numpy(np.random.normal(0, 1.0, 3))
            else:
                noise = torch.tensor([random.gauss(0, 1) for _ in range(3)], dtype=DT)
            x = x + noise
        return x, _Y[i]


def _host_states():
    return np.random.get_state(), random.getstate()


def _same_host(a, b) -> bool:
    (na, ra), (nb, rb) = a, b
    return ra == rb and all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(na, nb)
    )


@pytest.mark.parametrize("source", ["numpy", "python"])
def test_augmentation_drawing_after_first_batch_is_carried(source):
    # was: numpy's state dropped after batch 0 (which drew nothing): exact trace 0.847703 and
    # 1.292938 on the next call for brute force 1.478802, numpy's state moved (RX1-1)
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    dl = DataLoader(_RareNoise(source), batch_size=4)
    np.random.seed(0)
    random.seed(0)
    before = _host_states()
    reference = list(dl)  # one reading from the caller's states
    np.random.set_state(before[0])
    random.setstate(before[1])
    expected = _hessian_trace(model, loss_fn, reference)
    for _ in range(2):
        got = cl.trace(model, loss_fn, dl, method="exact").value
        assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)
        assert _same_host(_host_states(), before)


def test_analyze_identical_checkpoints_with_late_numpy_draws():
    # was: ReadingsDifferError ("another batch 1") for numpy augmentation the docs say is kept
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    dl = DataLoader(_RareNoise("numpy"), batch_size=4)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    np.random.seed(3)
    before = _host_states()
    result = cl.analyze(
        model, loss_fn, dl, checkpoint=[sd, sd], quantities=["loss"], progress=False, nqm=False
    )
    losses = result.trajectory("loss")
    assert len(losses) == 2 and losses[0] == losses[1]
    assert _same_host(_host_states(), before)


def test_host_states_round_trip_with_cached_normals():
    # numpy's words and cached normal, Python's words and gauss_next: put back exactly
    kept = reading_rngs([])
    np.random.seed(5)
    random.seed(5)
    np.random.standard_normal()  # a cached normal (has_gauss = 1)
    random.gauss(0, 1)  # a cached gauss_next
    saved = [k.get() for k in kept]
    expected = (np.random.standard_normal(4), [random.gauss(0, 1) for _ in range(3)])
    np.random.rand(1000)
    random.random()
    random.gauss(0, 1)
    for k, state in zip(kept, saved):
        k.put(state)
    got = (np.random.standard_normal(4), [random.gauss(0, 1) for _ in range(3)])
    assert np.array_equal(got[0], expected[0]) and got[1] == expected[1]


class _LayerDrop(nn.Module):
    """HF-style LayerDrop: skips a layer when Python's (or numpy's) RNG says so, in train mode."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source
        self.a, self.h = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x, skip=None):
        if skip is None:
            u = random.uniform(0, 1) if self.source == "python" else np.random.random()
            skip = self.training and u < 0.5
        return self.h(x) if skip else self.h(torch.tanh(self.a(x)))


@pytest.mark.parametrize("source", ["python", "numpy"])
def test_forward_drawing_from_host_rngs_is_one_function_per_batch(source):
    # was: random.getstate() changed by trace/diag_fisher/eigenvalues; identical seeded
    # eigenvalues gave 0.508731, 0.549392, ...; exact trace 1.635169 then 1.146060 (RX1-5)
    torch.manual_seed(0)
    model = _LayerDrop(source).to(DT).train()
    loss_fn = nn.CrossEntropyLoss()
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(2))
    data = [(_X[:6], y[:6]), (_X[6:], y[6:])]
    random.seed(0)
    np.random.seed(0)
    before = _host_states()
    traces = [cl.trace(model, loss_fn, data, method="exact").value for _ in range(3)]
    eigs = [float(cl.eigenvalues(model, loss_fn, data, k=1, seed=0).values[0]) for _ in range(3)]
    cl.diag_fisher(model, loss_fn, data)
    assert _same_host(_host_states(), before)
    assert traces[0] == traces[1] == traces[2]
    assert eigs[0] == eigs[1] == eigs[2]

    # the exact trace is that of one fixed draw per batch: one of the four skip patterns
    candidates = []
    for s0 in (False, True):
        for s1 in (False, True):
            h0 = _hessian_trace(_Wrap(model, s0), loss_fn, data[:1])
            h1 = _hessian_trace(_Wrap(model, s1), loss_fn, data[1:])
            candidates.append((h0 + h1) / 2)
    assert min(abs(traces[0] - c) for c in candidates) < 1e-10


class _Wrap(nn.Module):
    def __init__(self, model, skip):
        super().__init__()
        self.a, self.h, self.skip = model.a, model.h, skip

    def forward(self, x):
        return self.h(x) if self.skip else self.h(torch.tanh(self.a(x)))


class _DeviceLoader:
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        yield from self.loader

    def __len__(self):
        return len(self.loader)


class _Prefetch:
    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        yield from self.inner


class _Multi:
    def __init__(self, dl):
        self.loaders = {"train": dl}

    def __iter__(self):
        yield from self.loaders["train"]


def _persistent(dataset=None, batch_size=4):
    dataset = dataset if dataset is not None else TensorDataset(_X, _Y)
    return DataLoader(dataset, batch_size=batch_size, num_workers=1, persistent_workers=True)


@pytest.mark.parametrize(
    "make", [lambda dl: _DeviceLoader(_Prefetch(dl)), _Multi], ids=["two_levels", "dict"]
)
def test_persistent_loader_held_deep_is_refused_mid_epoch(make):
    # was: the user's loop saw 1 of 3 batches, without a word (RX1-2)
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    data = make(_persistent())
    seen = 0
    for step, _ in enumerate(data):
        seen += 1
        if step == 0:
            with pytest.raises(ValueError, match="persistent_workers=True .*middle of an epoch"):
                cl.trace(model, loss_fn, data, method="exact")
    assert seen == 3


def test_wrapper_of_persistent_loader_between_epochs_is_read():
    # was: analyze and trace(matrix="ggn", method="exact") refused it as "in the middle of an
    # epoch" that curvlab's own partial reading had left (RX1-3)
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    data = _DeviceLoader(_persistent())
    for _ in data:
        pass
    batches = [(_X[i : i + 4], _Y[i : i + 4]) for i in range(0, 12, 4)]
    result = cl.analyze(
        model,
        loss_fn,
        data,
        quantities=["loss", "trace_hessian"],
        progress=False,
        nqm=False,
    )
    assert result is not None
    ggn = cl.trace(model, loss_fn, data, matrix="ggn", method="exact").value
    assert ggn == pytest.approx(
        cl.trace(model, loss_fn, batches, matrix="ggn", method="exact").value
    )
    hess = cl.trace(model, loss_fn, data, method="exact").value
    assert hess == pytest.approx(_hessian_trace(model, loss_fn, batches), rel=1e-10)
    # the user's next epoch still sees all its batches, and mid-epoch is still refused
    seen = 0
    for step, _ in enumerate(data):
        seen += 1
        if step == 0:
            with pytest.raises(ValueError, match="middle of an epoch"):
                cl.trace(model, loss_fn, data, method="exact")
    assert seen == 3


class _TorchAug(Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return _X[i] + 0.3 * torch.randn(3, dtype=DT), _Y[i]


def test_differing_readings_of_persistent_wrapper_name_the_loader():
    # was: blamed a generator curvlab cannot reach and advised torch's global RNG (RX1-4)
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    data = _DeviceLoader(_persistent(_TorchAug(), batch_size=12))
    for _ in data:
        pass
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ReadingsDifferError) as info:
        cl.analyze(
            model,
            loss_fn,
            data,
            checkpoint=[sd, sd],
            quantities=["loss"],
            progress=False,
            nqm=False,
        )
    message = str(info.value)
    assert "persistent_workers=True (its .loader)" in message
    assert "persistent_workers=False" in message and "DataLoader itself" in message
