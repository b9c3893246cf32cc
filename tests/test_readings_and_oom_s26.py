"""Review s26 (FX1): an accelerator's global RNG carried across data readings (GP-1), and
resource errors (out of memory, an interrupt) in a small test forward passed through unchanged
(IR-1).

No GPU here: the CUDA module's ``is_initialized`` and ``default_generators`` are replaced by a
fake (a CPU ``torch.Generator`` standing in for the device's default generator), which the
loader draws from as a GPU augmentation draws from ``torch.cuda.default_generators[i]``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

import curvlab
from curvlab._reading_rngs import reading_rngs

N, B = 12, 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (N,), generator=g
    )


class DeviceAug:
    """Batches with noise drawn from the (fake) CUDA default generator, as ``torch.randn(...,
    device="cuda")`` in a device loader draws it."""

    def __init__(self) -> None:
        self.X, self.y = _xy()

    def __iter__(self):
        gen = torch.cuda.default_generators[0]
        for i in range(0, N, B):
            x = self.X[i : i + B]
            noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            yield x + 0.1 * noise, self.y[i : i + B]


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> torch.Generator:
    fake = torch.Generator().manual_seed(5)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "default_generators", (fake,))
    return fake


def _expected_batches(state: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches the user's own loop reads from the device generator's state ``state``."""
    X, y = _xy()
    gen = torch.Generator().set_state(state)
    out = []
    for i in range(0, N, B):
        x = X[i : i + B]
        out.append(
            (x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64), y[i : i + B])
        )
    return out


def _brute_diag_fisher(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher by dense per-example gradients: mean over examples of g_n²."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(p, x, t):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, t.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, y)
    return {k: (v**2).mean(0) for k, v in g.items()}


def _brute_loss(model: nn.Module, batches) -> float:
    with torch.no_grad():
        X = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        return float(nn.functional.cross_entropy(model(X), y))


# ----------------------------------------------------------------------------------- GP-1


def test_device_generator_carried_and_put_back_by_one_reading(fake_cuda):
    model, data = _model(), DeviceAug()
    state = fake_cuda.get_state()
    got = curvlab.diag_fisher(model, nn.CrossEntropyLoss(), data, kind="empirical")
    # the caller's device RNG state put back (it was advanced by the reading)
    assert torch.equal(fake_cuda.get_state(), state)
    # batch 2 continues where batch 1 stopped: the user's loop's batches
    want = _brute_diag_fisher(model, _expected_batches(state))
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-14)


def test_analyze_reads_device_augmentation_alike(fake_cuda):
    model, data = _model(), DeviceAug()
    state = fake_cuda.get_state()
    report = curvlab.analyze(
        model,
        nn.CrossEntropyLoss(),
        data,
        quantities=["loss", "grad_norm", "trace_empirical_fisher"],
    )  # ReadingsDifferError before the fix: each reading drew other noise
    assert torch.equal(fake_cuda.get_state(), state)
    want = _brute_loss(model, _expected_batches(state))
    assert abs(float(report["loss"]) - want) < 1e-3 * abs(want)  # the report rounds
    fisher = _brute_diag_fisher(model, _expected_batches(state))
    trace = float(sum(v.sum() for v in fisher.values()))
    assert abs(float(report["trace_empirical_fisher"]) - trace) < 1e-3 * trace


def test_device_generator_given_to_loader_carried_once(fake_cuda):
    """A loader whose own generator is the device's default one: carried once, not twice (two
    handles on one state made every batch draw the same numbers)."""
    reading = reading_rngs(DeviceAug())
    states = [k.get() for k in reading]
    assert (
        sum(isinstance(s, torch.Tensor) and torch.equal(s, fake_cuda.get_state()) for s in states)
        == 1
    )

    class Holding(DeviceAug):
        def __init__(self) -> None:
            super().__init__()
            self.generator = fake_cuda

    assert len(reading_rngs(Holding())) == len(reading)
    model, data = _model(), Holding()
    state = fake_cuda.get_state()
    got = curvlab.diag_fisher(model, nn.CrossEntropyLoss(), data, kind="empirical")
    assert torch.equal(fake_cuda.get_state(), state)
    want = _brute_diag_fisher(model, _expected_batches(state))
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-14)


def test_uninitialised_cuda_left_alone(monkeypatch):
    """CUDA not initialised: its state is never read (reading it would initialise CUDA)."""
    touched = []

    def refuse(*args, **kwargs):
        touched.append(args)
        raise AssertionError("torch.cuda state read while CUDA is not initialised")

    for name in (
        "get_rng_state",
        "get_rng_state_all",
        "set_rng_state",
        "set_rng_state_all",
        "_lazy_init",
    ):
        monkeypatch.setattr(torch.cuda, name, refuse)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    fake = torch.Generator().manual_seed(5)
    monkeypatch.setattr(torch.cuda, "default_generators", (fake,))
    assert len(reading_rngs([])) == 3  # torch's CPU, Python's and numpy's
    model, data = _model(), DeviceAug()
    curvlab.diag_fisher(model, nn.CrossEntropyLoss(), data, kind="empirical")
    assert not touched


# ----------------------------------------------------------------------------------- IR-1


class FailsOnce(nn.Module):
    """Raises ``error`` on the ``at``-th forward (a transient OOM or an interrupt)."""

    def __init__(self, error: BaseException, at: int = 1) -> None:
        super().__init__()
        self.error, self.at, self.calls = error, at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return x


def _failing_model(error: BaseException, at: int = 1) -> tuple[nn.Module, FailsOnce]:
    torch.manual_seed(0)
    fault = FailsOnce(error, at)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), fault, nn.Linear(6, 3)).double().eval()
    return model, fault


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (5,), generator=g
    )


ERRORS = [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)"),
    lambda: MemoryError("cannot allocate"),
    lambda: KeyboardInterrupt(),
]


def _first_probe(call, error) -> int:
    """The index of the first forward whose error is turned into something else (0: none)."""
    for at in range(1, 12):
        model, fault = _failing_model(error(), at)
        try:
            call(model)
        except BaseException as e:  # noqa: BLE001
            if fault.calls < at:
                return 0  # never reached: no more forwards to fault
            if type(e) is not type(fault.error) or e is not fault.error:
                return at
        else:
            if fault.calls < at:
                return 0
    return 0


CALLS = {
    "kfac_empirical": lambda m: curvlab.kfac(m, nn.CrossEntropyLoss(), _batch(), kind="empirical"),
    "kfac_mc": lambda m: curvlab.kfac(m, nn.CrossEntropyLoss(), _batch(), kind="mc", seed=0),
    "fisher_norms": lambda m: curvlab.fisher_norms(m, nn.CrossEntropyLoss(), _batch()),
    "diag_fisher_backpack": lambda m: curvlab.diag_fisher(
        m, nn.CrossEntropyLoss(), _batch(), kind="exact", backend="backpack"
    ),
    "diag_hessian": lambda m: curvlab.diag_hessian(m, nn.CrossEntropyLoss(), _batch()),
    "analyze": lambda m: curvlab.analyze(
        m, nn.CrossEntropyLoss(), [_batch()], quantities=["loss"], on_error="raise"
    ),
}


@pytest.mark.parametrize("error", ERRORS, ids=["oom", "runtime_oom", "memory", "interrupt"])
@pytest.mark.parametrize("name", list(CALLS))
def test_resource_error_in_any_forward_passes_through(name, error):
    if name == "diag_fisher_backpack":
        pytest.importorskip("backpack")
    at = _first_probe(CALLS[name], error)
    assert at == 0, f"{name}: the error at forward {at} came back as another error"


def test_resource_error_on_the_probe_is_the_original():
    """The reviewer's case: an OOM on K-FAC's first (probe) forward is the OOM itself, not a
    ValueError about a missing batch axis, and no whole-batch forward follows it."""
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    model, fault = _failing_model(oom, 1)
    with pytest.raises(torch.OutOfMemoryError) as info:
        curvlab.kfac(model, nn.CrossEntropyLoss(), _batch(), kind="empirical")
    assert info.value is oom
    assert fault.calls == 1
    # and the model computes afterwards, as a shape error on the probe is still named
    got = curvlab.kfac(model, nn.CrossEntropyLoss(), _batch(), kind="empirical")
    assert got is not None
