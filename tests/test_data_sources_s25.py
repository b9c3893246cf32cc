"""Review s25 (DS): readings of a loader, checked against dense float64 brute force.

DS-1: ``noise_scale_hessian`` read the data twice, ``g_n`` and ``G`` from one reading and the
Hessian operator from another: with an augmentation drawing from Python's ``random``, ``GᵀHG``
was 0.2406 where one reading gives 0.1460 (H of reading 3 with G of reading 2), with a standard
error of 0.

DS-2: a reading kept and put back only torch's global RNG and the loader's own generators: an
augmentation drawing from numpy's or Python's global RNG, or from a generator the dataset or a
wrapper of the loader holds, saw other draws at every reading (``analyze`` of three identical
checkpoints: loss 1.095 / 1.117 / 1.125), and a curvlab call between epochs changed training.
What cannot be put back (a generator curvlab cannot reach) is refused by ``analyze`` by name.

DS-3: ``iter(loader)`` of a ``persistent_workers=True`` loader restarts the iterator the user's
loop is consuming: a call in the loop ended the loop's epoch after the current batch.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, vmap
from torch.utils.data import DataLoader, Dataset, SequentialSampler, TensorDataset

import curvlab as cl
from curvlab.analysis._measures import measure

DT = torch.float64
N = 8


def _problem(n: int = N, seed: int = 0) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    X = torch.randn(n, 3, dtype=DT)
    y = torch.randint(0, 3, (n,))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    return model, nn.CrossEntropyLoss(), X, y


class _Shifted(Dataset):
    """``X[i]`` plus a shift drawn by ``draw()`` at every read (the augmentation)."""

    def __init__(self, X: Tensor, y: Tensor, draw) -> None:
        self.X, self.y, self.draw = X, y, draw

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.X[i] + self.draw(), self.y[i]


def _unreachable_draw(seed: int = 0):
    """An augmentation drawing from a generator curvlab cannot see (a closure's)."""
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(3, generator=g, dtype=DT)


def _flat_params(model: nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    return torch.cat([p.reshape(-1) for p in params.values()]), params


def _unflat(v: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, o = {}, 0
    for n, p in like.items():
        out[n] = v[o : o + p.numel()].view_as(p)
        o += p.numel()
    return out


def _loss_of(model: nn.Module, loss_fn: nn.Module):
    flat, like = _flat_params(model)

    def f(v: Tensor, X: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, _unflat(v, like), (X,)), y)

    return f, flat


def _stacked(batches) -> tuple[Tensor, Tensor]:
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


# ----------------------------------------------------------------------------------- DS-1


def test_noise_scale_hessian_uses_one_reading_of_the_data():
    """G, g_n and H of one reading: exact tr(HΣ) and GᵀHG against torch.func on that reading."""
    model, loss_fn, X, y = _problem(6)
    reads: list[list[Tensor]] = []

    class Logged(SequentialSampler):
        def __iter__(self):
            reads.append([])
            yield from super().__iter__()

    draw = _unreachable_draw()

    class Aug(_Shifted):
        def __getitem__(self, i):
            x, t = super().__getitem__(i)
            reads[-1].append(x)
            return x, t

    dl = DataLoader(Aug(X, y, draw), batch_size=3, sampler=Logged(range(6)))
    out = measure(model, loss_fn, dl, ["noise_scale_hessian"], options={"num_probes": 10})
    assert [len(r) for r in reads] == [6]  # one reading (two before: g_n's and the operator's)
    Xr = torch.stack(reads[0])
    f, flat = _loss_of(model, loss_fn)
    H = hessian(f)(flat, Xr, y)
    G = grad(f)(flat, Xr, y)
    g_n = vmap(grad(lambda v, x, t: f(v, x[None], t[None])), in_dims=(None, 0, 0))(flat, Xr, y)
    D = g_n - G
    tr_h_sigma = float(torch.einsum("ni,ij,nj->", D, H, D) / 6)
    ghg = float(G @ H @ G)
    v = out.values
    assert v["grad_hessian_grad"] == pytest.approx(ghg, rel=1e-10)
    assert v["trace_hessian_covariance"] == pytest.approx(tr_h_sigma, rel=1e-10)
    assert v["trace_hessian_covariance_stderr"] == 0.0
    assert v["noise_scale_hessian"] == pytest.approx(tr_h_sigma / ghg, rel=1e-10)


# ----------------------------------------------------------------------------------- DS-2


def _numpy_draw():
    return torch.from_numpy(np.random.normal(0.0, 0.5, 3))


def _python_draw():
    return torch.full((3,), random.choice([0.0, 0.5, -0.5]), dtype=DT)


def _host_states():
    return random.getstate(), np.random.get_state()[1].tobytes(), torch.get_rng_state()


def _same_states(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


@pytest.mark.parametrize("draw", [_numpy_draw, _python_draw], ids=["numpy", "python_random"])
def test_host_rng_augmentation_is_the_same_at_every_checkpoint(draw):
    """numpy / Python ``random`` augmentation: three identical checkpoints give the loss and
    gradient norm of the data the next epoch reads (1.095 / 1.117 / 1.125 before), and the
    states are put back."""
    model, loss_fn, X, y = _problem(16)
    dl = DataLoader(_Shifted(X, y, draw), batch_size=4, shuffle=True)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    before = _host_states()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = cl.analyze(
            model,
            loss_fn,
            dl,
            checkpoint=[sd, sd, sd],
            quantities=["loss", "grad_norm"],
            progress=False,
            nqm=False,
        )
    assert _same_states(before, _host_states())
    Xs, ys = _stacked(list(dl))  # the reading the caller's states give: curvlab's
    f, flat = _loss_of(model, loss_fn)
    want_loss = float(f(flat, Xs, ys))
    want_norm = float(grad(f)(flat, Xs, ys).norm())
    assert rep.trajectory("loss") == pytest.approx([want_loss] * 3, rel=1e-12)
    assert rep.trajectory("grad_norm") == pytest.approx([want_norm] * 3, rel=1e-10)


@pytest.mark.parametrize("draw", [_numpy_draw, _python_draw], ids=["numpy", "python_random"])
def test_a_call_between_epochs_leaves_training_as_it_was(draw):
    """Training with a numpy / Python ``random`` augmentation is bit for bit the same with a
    ``cl.eigenvalues`` call between epochs (0.0289 off before)."""
    _, loss_fn, X, y = _problem(16)

    def run(call: bool) -> Tensor:
        torch.manual_seed(1), np.random.seed(1), random.seed(1)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dl = DataLoader(_Shifted(X, y, draw), batch_size=4, shuffle=True)
        for _ in range(2):
            for xb, yb in dl:
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
            if call:
                cl.eigenvalues(model, loss_fn, dl, k=1)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(False), run(True))


class _DeviceLoader:
    """The tutorials' wrapper: moves each batch of its loader to a device."""

    def __init__(self, loader: DataLoader, device: str = "cpu") -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        for xb, yb in self.loader:
            yield xb.to(self.device), yb.to(self.device)

    def __len__(self) -> int:
        return len(self.loader)


_OWNED = {
    "torch": (
        lambda: torch.Generator().manual_seed(5),
        lambda g: torch.randn(3, generator=g, dtype=DT),
        lambda g: g.get_state().clone(),
    ),
    "numpy": (
        lambda: np.random.default_rng(5),
        lambda g: torch.from_numpy(g.normal(0.0, 1.0, 3)),
        lambda g: repr(g.bit_generator.state),
    ),
    "random": (
        lambda: random.Random(5),
        lambda g: torch.full((3,), g.gauss(0.0, 1.0), dtype=DT),
        lambda g: g.getstate(),
    ),
}


def _owned_generator_dataset(X: Tensor, y: Tensor, kind: str) -> Dataset:
    make, draw, _ = _OWNED[kind]

    class Owned(Dataset):
        def __init__(self) -> None:
            self.rng = make()

        def __len__(self) -> int:
            return len(X)

        def __getitem__(self, i: int):
            return X[i] + draw(self.rng), y[i]

    return Owned()


@pytest.mark.parametrize("where", ["wrapper", "torch", "numpy", "random"])
def test_generators_of_a_wrapped_loader_and_of_the_dataset_are_kept(where):
    """A ``DataLoader(generator=g)`` inside a wrapper (1.189 / 1.195 before, ``g`` advanced) and a
    generator the dataset holds (torch, numpy, ``random.Random``): every reading the same, the
    generator put back."""
    model, loss_fn, X, y = _problem(10)
    if where == "wrapper":
        g = torch.Generator().manual_seed(0)
        data = _DeviceLoader(
            DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True, drop_last=True, generator=g)
        )
        state_of = _OWNED["torch"][2]
    else:
        data = DataLoader(_owned_generator_dataset(X, y, where), batch_size=4)
        g, state_of = data.dataset.rng, _OWNED[where][2]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    state = state_of(g)
    rep = cl.analyze(
        model, loss_fn, data, checkpoint=[sd, sd], quantities=["loss"], progress=False, nqm=False
    )
    after = state_of(g)
    assert torch.equal(state, after) if isinstance(state, Tensor) else state == after
    Xs, ys = _stacked(list(data))
    f, flat = _loss_of(model, loss_fn)
    assert rep.trajectory("loss") == pytest.approx([float(f(flat, Xs, ys))] * 2, rel=1e-12)


def test_analyze_refuses_a_source_that_grows():
    """A source whose readings give more batches each time (a stream, a growing folder): refused,
    naming the counts."""
    model, loss_fn, X, y = _problem(12)

    readings = [0]  # held outside the source (a folder that grows): a wrapper's own plain
    # counter is carried over a reading and put back (review s26, RX1-1)

    class Growing:
        def __iter__(self):
            readings[0] += 1
            for i in range(min(readings[0], 3)):
                yield X[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]

    with pytest.raises(ValueError, match="2 batches or more, where it gave 1 before"):
        cl.analyze(model, loss_fn, Growing(), quantities=["loss"], progress=False, nqm=False)


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_analyze_refuses_data_that_reads_otherwise_each_time(on_error):
    """An augmentation drawing from a generator curvlab cannot reach gives other batches at each
    reading: ``analyze`` raises naming the cause and the ways out, not a mix of readings."""
    model, loss_fn, X, y = _problem(16)
    dl = DataLoader(_Shifted(X, y, _unreachable_draw()), batch_size=4)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="other batches when read again") as info:
        cl.analyze(
            model,
            loss_fn,
            dl,
            checkpoint=[sd, sd],
            quantities=["loss", "grad_norm"],
            on_error=on_error,
            progress=False,
            nqm=False,
        )
    message = str(info.value)
    assert "DataLoader" in message and "list of batches" in message and "seed" in message


def test_analyze_refuses_noise_scale_hessian_on_data_that_reads_otherwise():
    """DS-1's reproducer under ``analyze``: refused by name, not G of one reading and H of
    another (0.2406 with a standard error of 0, where one reading gives 0.1460)."""
    model, loss_fn, X, y = _problem(6)
    dl = DataLoader(_Shifted(X, y, _unreachable_draw()), batch_size=6)
    with pytest.raises(ValueError, match="other batches when read again"):
        cl.analyze(
            model,
            loss_fn,
            dl,
            quantities=["noise_scale_hessian"],
            num_probes=10,
            progress=False,
            nqm=False,
        )


def test_analyze_of_a_loader_that_reads_alike_is_not_refused():
    """A shuffled loader with torch-RNG augmentation reads alike: measured, as brute force."""
    model, loss_fn, X, y = _problem(12)
    dl = DataLoader(
        _Shifted(X, y, lambda: 0.3 * torch.randn(3, dtype=DT)), batch_size=4, shuffle=True
    )
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    rep = cl.analyze(
        model,
        loss_fn,
        dl,
        checkpoint=[sd, sd],
        quantities=["loss", "trace_hessian"],
        num_probes=4,
        progress=False,
        nqm=False,
    )
    Xs, ys = _stacked(list(dl))
    f, flat = _loss_of(model, loss_fn)
    assert rep.trajectory("loss") == pytest.approx([float(f(flat, Xs, ys))] * 2, rel=1e-12)


# ----------------------------------------------------------------------------------- DS-3


def _persistent(X: Tensor, y: Tensor, **kw) -> DataLoader:
    return DataLoader(
        TensorDataset(X, y), batch_size=4, num_workers=1, persistent_workers=True, **kw
    )


def test_a_call_mid_epoch_on_a_persistent_loader_leaves_the_epoch():
    """``cl.trace`` on the loader of the loop, at its first step: the loop still sees its four
    batches (one before), in the order it would have, and the trace is that of all the data."""
    model, loss_fn, X, y = _problem(16)
    f, flat = _loss_of(model, loss_fn)
    want = float(torch.diagonal(hessian(f)(flat, X, y)).sum())

    def epoch(call: bool) -> tuple[list[float], float | None]:
        torch.manual_seed(2)
        dl = _persistent(X, y, shuffle=True)
        seen, got = [], None
        for step, (xb, _) in enumerate(dl):
            seen.append(float(xb.sum()))
            if call and step == 0:
                got = cl.trace(model, loss_fn, dl, method="exact").value
        return seen, got

    plain, _ = epoch(False)
    seen, got = epoch(True)
    assert seen == plain and len(seen) == 4
    assert got == pytest.approx(want, rel=1e-10)


def test_a_wrapper_of_a_persistent_loader_mid_epoch_is_refused():
    """A wrapper around a persistent loader in the middle of its epoch cannot be read without
    restarting the loop's iterator: refused before reading, naming the loader and the ways out;
    the loop goes on undisturbed."""
    model, loss_fn, X, y = _problem(16)
    data = _DeviceLoader(_persistent(X, y))
    seen = []
    for step, (xb, _) in enumerate(data):
        seen.append(float(xb.sum()))
        if step == 0:
            with pytest.raises(ValueError, match="persistent_workers") as info:
                cl.trace(model, loss_fn, data, method="exact")
            message = str(info.value)
            assert "_DeviceLoader" in message and "list of batches" in message
    assert len(seen) == 4


def test_persistent_workers_augmentation_reads_alike():
    """Torch-RNG augmentation in persistent workers: the workers' RNG no longer advances with
    each reading, so identical checkpoints agree with brute force on the next epoch's data."""
    model, loss_fn, X, y = _problem(8)
    ds = _Shifted(X, y, lambda: 0.3 * torch.randn(3, dtype=DT))
    dl = DataLoader(ds, batch_size=4, num_workers=1, persistent_workers=True)
    list(dl)  # the workers started and one epoch read: their RNG moved on
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(4)
    rep = cl.analyze(
        model, loss_fn, dl, checkpoint=[sd, sd], quantities=["loss"], progress=False, nqm=False
    )
    losses = rep.trajectory("loss")
    assert losses[0] == losses[1]
    torch.manual_seed(4)  # a fresh epoch of fresh workers from the same state: curvlab's reading
    fresh = DataLoader(ds, batch_size=4, num_workers=1)
    Xs, ys = _stacked(list(fresh))
    f, flat = _loss_of(model, loss_fn)
    assert losses[0] == pytest.approx(float(f(flat, Xs, ys)), rel=1e-12)
