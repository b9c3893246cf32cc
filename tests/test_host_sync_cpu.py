"""The in-step paths never ask for a host synchronisation, checked on the CPU.

``test_noise_optim.test_cuda_step_does_not_synchronise`` checks this with CUDA's sync debug mode,
which needs a GPU. Here a dispatch mode records every operator that would make a CUDA device wait
for the host (``.item()``/``bool()``/``float()`` of a tensor, ``nonzero``, boolean-mask indexing,
``torch.equal``, ...) and every ``Tensor.cpu``/``numpy``/``tolist``/``item`` call made from
curvlab's own code, so the promise is guarded on every machine:

* a ``NoisyOptimizer`` step of the samplers whose curvature comes from the step's own backward
  pass (docs/noise.md: "No host synchronisation in a step"), recomputation steps included;
* a ``Diagnostics.step`` on a step that is not measured (docs/analysis.md: "No synchronisation
  when not measuring").

(The CPU-only reads of the engine's finiteness checks and of the CPU label draws, which have
device-side paths on a GPU, are not on these paths.)
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import curvlab as cl

# operators that make a CUDA device wait for the host (a value or a data-dependent shape read)
_SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "nonzero_static",
    "argwhere",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "equal",
    "is_nonzero",
    "allclose",
    "repeat_interleave",
    "bincount",
}


# reads of tensors that live on the host by design (index arithmetic built with torch.arange on
# the CPU, whatever the model's device): no device is waited for
_HOST_SIDE = {"_put_back"}


def _curvlab_frame() -> str | None:
    """The innermost stack frame in curvlab's package (``None``: the call is the test's or
    torch's own)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if path.endswith("/curvlab/_notrace.py") and frame.name == "__torch_function__":
            continue  # the math-attention mode passes torch's calls through: not their origin
        if "/curvlab/" in path and "/tests/" not in path:
            return f"{path.split('/curvlab/')[-1]}:{frame.lineno} ({frame.name})"
    return None


class _SyncRecorder(TorchDispatchMode):
    def __init__(self, hits: list[str]) -> None:
        super().__init__()
        self.hits = hits

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        sync = name in _SYNC_OPS
        if name in ("index", "index_put", "index_put_") and len(args) > 1:
            sync = any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
            )
        where = _curvlab_frame() if sync else None
        if where is not None and not any(f"({fn})" in where for fn in _HOST_SIDE):
            self.hits.append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _record_syncs() -> Iterator[list[str]]:
    hits: list[str] = []
    originals = {m: getattr(torch.Tensor, m) for m in ("cpu", "numpy", "tolist", "item")}

    def wrapped(method: str):  # type: ignore[no-untyped-def]
        original = originals[method]

        def call(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if (where := _curvlab_frame()) is not None:
                hits.append(f"Tensor.{method} at {where}")
            return original(self, *args, **kwargs)

        return call

    try:
        for method in originals:
            setattr(torch.Tensor, method, wrapped(method))
        with _SyncRecorder(hits):
            yield hits
    finally:
        for method, original in originals.items():
            setattr(torch.Tensor, method, original)


def test_the_recorder_sees_a_synchronisation() -> None:
    """The recorder itself: curvlab's CPU finiteness check reads a sum on the host."""
    from curvlab._finite import all_finite

    with _record_syncs() as hits:
        all_finite([torch.ones(3)])
    assert any("_finite.py" in h for h in hits), hits


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    return model, torch.randn(16, 6), torch.randint(0, 4, (16,))


def _cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))
    return model, torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,))


SAMPLERS = {
    "diag-empirical": lambda: cl.noise.DiagFisherNoise(kind="empirical", scale=0.1),
    "trace-empirical": lambda: cl.noise.FisherTraceNoise(kind="empirical", scale=0.1),
    "full-empirical": lambda: cl.noise.FullFisherNoise("empirical", scale=0.1),
    "multiplicative": lambda: cl.noise.MultiplicativeNoise(0.1),
    "isotropic": lambda: cl.noise.IsotropicNoise(0.1),
}


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_noisy_step_does_not_synchronise(sampler: str, make) -> None:  # type: ignore[no-untyped-def]
    model, X, y = make()
    loss_fn = nn.CrossEntropyLoss()
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        SAMPLERS[sampler](),
        model,
        loss_fn,
        recompute_every=2,
        seed=0,
    )

    def closure() -> torch.Tensor:
        noisy.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    noisy.step(closure)  # the first step may probe the layout (once per input shape)
    for _ in range(4):  # recomputation steps and reuse steps
        with _record_syncs() as hits:
            noisy.step(closure)
        assert hits == [], hits


def test_unmeasured_diagnostics_step_does_not_synchronise(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, X, y = _mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    quantities = ["trace_fisher", "sharpness", "critical_sharpness", "noise_scale"]
    diag = cl.Diagnostics(
        model, loss_fn, quantities=quantities, every=3, log_dir=tmp_path, optimizer=opt
    )
    measured = []
    for step in range(7):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        with _record_syncs() as hits:
            diag.step(step, X, y)
        if step % 3:
            assert hits == [], (step, hits)
        else:
            measured.append(len(hits))
    diag.close()
    assert all(n > 0 for n in measured)  # measuring reads its values: the recorder sees them


@pytest.mark.parametrize("sampler", ["diag-empirical", "full-empirical"])
def test_noisy_step_under_a_grad_scaler_does_not_synchronise(sampler: str) -> None:
    """The capture's hook on the loss output and its division by the scale add no host read
    (the scaler's own ``found_inf`` check is torch's, outside curvlab's frames)."""
    model, X, y = _mlp()
    loss_fn = nn.CrossEntropyLoss()
    noisy = cl.noise.NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01),
        SAMPLERS[sampler](),
        model,
        loss_fn,
        recompute_every=2,
        seed=0,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    for step in range(5):
        with _record_syncs() as hits:
            noisy.zero_grad()
            with noisy.capture():
                loss = loss_fn(model(X), y)
                scaler.scale(loss).backward()
            scaler.step(noisy)
            scaler.update()
        if step:
            assert hits == [], hits
