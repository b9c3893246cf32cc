"""Review s12, failure injection; each test failed on the code before its fix.

1. ``kfac(kind="exact"/"empirical")`` returned NaN ``A`` and ``G`` factors when the forward pass
   gave NaN for one example (a ``log`` of a negative feature), and an inf ``A`` for a float32
   ``exp`` overflow, while every other entry point raises ``NonFiniteError``; an overflow the model
   cleans before its output (finite loss) gave an inf ``A`` for every kind, ``"mc"`` included.
   ``fisher_norms`` raised a plain ``FloatingPointError``, which ``except cl.NonFiniteError``
   missed.
2. ``Report.save(overwrite=True)`` moved its files in one at a time: a failure at the third move
   left the new ``report.html`` beside the old ``report.json``. The replaced files are now moved
   aside first and everything is put back on any failure.
3. ``NoisyOptimizer.step``: a failure in the noise draw (an out-of-memory error, after the capture
   closed) left the noise generator advanced, and a reusable sampler's cached curvature that of
   the failed step, so a loop that skipped the batch drew other noise than a run without it. A
   failure in the separate curvature pass (``"mc"`` label draws) or in the optimizer's step did
   the same.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.analysis import _report as report_mod
from curvlab.analysis._report import Report
from curvlab.noise import (
    DiagFisherNoise,
    FisherTraceNoise,
    FullFisherNoise,
    IsotropicNoise,
    KFACNoise,
    MultiplicativeNoise,
    NoisyOptimizer,
)

CE = nn.CrossEntropyLoss()
DT = torch.float64


# ---------------------------------------------------------------------- 1. non-finite forward
class _Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class _Exp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


class _Clean(nn.Module):
    """An overflow the model hides from its output (finite loss), not from the next layer's A."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)


def _log_model_and_data() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The reviewer's case: float64, finite inputs and parameters; one example of batch 3 has a
    negative feature, whose log is NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(_Log(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.rand(4, 4, generator=g, dtype=DT) + 0.1, torch.randint(0, 3, (4,), generator=g))
        for _ in range(3)
    ]
    X = data[2][0].clone()
    X[1, 2] = -1.0
    data[2] = (X, data[2][1])
    return model, data


def _exp_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(3)]  # fmt: skip
    X = data[2][0].clone()
    X[1] = 200.0  # exp overflows to inf in float32 for this example only
    data[2] = (X, data[2][1])
    return data


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_kfac_raises_for_a_nan_forward_on_one_example(kind: str) -> None:
    model, data = _log_model_and_data()
    assert not torch.isfinite(CE(model(torch.cat([X for X, _ in data])), torch.cat([y for _, y in data])))  # fmt: skip
    with pytest.raises(cl.NonFiniteError, match=r"A factor of layer '1' holds \d+ non-finite"):
        cl.kfac(model, CE, data, kind=kind)
    # the same model on the clean batches: finite factors, as before
    f = cl.kfac(model, CE, data[:2], kind=kind)
    assert all(torch.isfinite(v.A).all() and torch.isfinite(v.G).all() for v in f.values())


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_kfac_raises_for_a_float32_exp_overflow(kind: str) -> None:
    model = _exp_model()
    with pytest.raises(cl.NonFiniteError, match="kfac.*layer '2'.*float64"):
        cl.kfac(model, CE, _exp_data(), kind=kind)


def _exp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), _Exp(), nn.Linear(5, 3)).eval()


@pytest.mark.parametrize("case", ["nan", "overflow"])
@pytest.mark.parametrize("matrix", ["hessian", "ggn", "empirical_fisher"])
@pytest.mark.parametrize("product", ["matvec", "matmat", "quadratic_forms", "product_parts"])
def test_non_finite_operator_products_are_an_error(case: str, matrix: str, product: str) -> None:
    """``curvature_operator(...) @ v`` handed back NaN where every quantity raised."""
    if case == "nan":
        model, data = _log_model_and_data()
    else:  # one float32 batch, exp overflowing for one example
        model, g = _exp_model(), torch.Generator().manual_seed(1)
        X = torch.randn(6, 4, generator=g)
        X[3] *= 200.0
        data = [(X, torch.randint(0, 3, (6,), generator=g))]
    op = cl.curvature_operator(model, CE, data, matrix=matrix)
    V = torch.ones(op.shape[1], 2, dtype=op.dtype)
    call = {
        "matvec": lambda: op @ V[:, 0],
        "matmat": lambda: op @ V,
        "quadratic_forms": lambda: op.quadratic_forms(V),
        "product_parts": lambda: op.product_parts(
            list(V[:, 0].split([p.numel() for p in model.parameters()]))
        ),
    }[product]
    with pytest.raises(cl.NonFiniteError, match="operator's product is not finite"):
        call()


def test_finite_operator_products_are_unchanged() -> None:
    """The check is a check only: on finite data the product equals the dense Hessian's."""
    model, data = _log_model_and_data()
    data = data[:2]  # the two finite batches
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)

    def total(flat: torch.Tensor) -> torch.Tensor:
        ps, i = {}, 0
        for n in names:
            k = params[n].numel()
            ps[n] = flat[i : i + k].reshape(params[n].shape)
            i += k
        X = torch.cat([b[0] for b in data])
        y = torch.cat([b[1] for b in data])
        return CE(torch.func.functional_call(model, ps, (X,)), y)

    flat = torch.cat([params[n].reshape(-1) for n in names])
    H = torch.autograd.functional.hessian(total, flat)
    v = torch.randn(flat.numel(), dtype=DT, generator=torch.Generator().manual_seed(3))
    op = cl.curvature_operator(model, CE, data, matrix="hessian")
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["exact", "empirical", "mc"])
def test_kfac_raises_for_an_overflow_hidden_from_the_loss(kind: str) -> None:
    """The loss and the model's outputs are finite (no output check can see it), the A factor of
    the layer after the overflow is not: every kind raises, naming that layer."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), _Exp(), nn.Linear(5, 5), _Clean(), nn.Linear(5, 3)
    ).eval()
    data = _exp_data()
    assert all(torch.isfinite(CE(model(X), y)) for X, y in data)
    with pytest.raises(cl.NonFiniteError, match=r"the A factor of layer '2'"):
        cl.kfac(model, CE, data, kind=kind, seed=0 if kind == "mc" else None)


@pytest.mark.parametrize("backend", ["auto", "func"])
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("kind", ["empirical", "exact"])  # "mc" raised already (label draws)
def test_fisher_norms_raises_nonfinite_error(kind: str, chunk_size: int | None, backend: str) -> None:  # fmt: skip
    model, data = _log_model_and_data()
    with pytest.raises(cl.NonFiniteError, match=r"fisher_norms\(kind=.*not finite .*float64"):
        cl.fisher_norms(
            model,
            CE,
            data,
            kind=kind,
            chunk_size=chunk_size,
            backend=backend,
        )
    n = cl.fisher_norms(model, CE, data[:2], kind=kind)
    assert n.frobenius > 0 and n.diag_frobenius > 0


# ---------------------------------------------------------------------- 2. Report.save
def _entry(label: str, values: dict, per_layer: dict | None = None) -> dict[str, Any]:
    return {
        "label": label,
        "values": values,
        "per_layer": per_layer or {},
        "arrays": {},
        "errors": {},
        "seconds": 0.0,
    }


_PLAIN = Report(entries=[_entry("m", {"loss": 1.0}, {"grad_norm": {"0": 1.0}})])  # layers.png
_SPECTRAL = Report(entries=[_entry("m", {"loss": 2.0, "top_eigenvalues": [2.0, 1.0]})])
_MINE = {"training.png": b"my curve", "notes.txt": b"mine"}  # the user's, not a report's


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _earlier(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A folder with the user's files and an earlier report (layers.png, which the new one does
    not write: the overwrite removes it)."""
    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    for name, data in _MINE.items():
        (run / name).write_bytes(data)
    _PLAIN.save(run, overwrite=True)
    before = _contents(run)
    assert sorted(before) == sorted([*_MINE, "layers.png", "report.html", "report.json"])
    assert sorted(p.name for p in run.iterdir()) == sorted(before)  # no folder left behind
    return run, before


def _failing_replace(monkeypatch: pytest.MonkeyPatch, exc: type[BaseException], at: int, persist: bool) -> list[int]:  # fmt: skip
    """``os.replace`` raising ``exc`` at call ``at`` (and at every later call if ``persist``)."""
    real = os.replace
    calls = [0]

    def replace(src: Any, dst: Any) -> None:
        calls[0] += 1
        if calls[0] == at or (persist and calls[0] > at):
            raise exc(f"injected at move {calls[0]}")
        real(src, dst)

    monkeypatch.setattr(report_mod.os, "replace", replace)
    return calls


def _moves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    run, _ = _earlier(tmp_path)
    with monkeypatch.context() as m:
        calls = _failing_replace(m, OSError, 0, persist=False)
        _SPECTRAL.save(run, overwrite=True)
    return calls[0]


@pytest.mark.parametrize("exc", [OSError, KeyboardInterrupt])
def test_a_failed_move_leaves_the_earlier_report_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: type[BaseException]) -> None:  # fmt: skip
    """A failure at every position of the moves (aside, and in) leaves every file as it was: the
    earlier report whole, its stale figure kept, the user's files untouched, no staging folder."""
    n = _moves(tmp_path, monkeypatch)
    assert n >= 3  # 3 earlier files moved aside, 3 new ones moved in (6)
    for at in range(1, n + 1):
        run, before = _earlier(tmp_path)
        with monkeypatch.context() as m:
            _failing_replace(m, exc, at, persist=False)
            with pytest.raises(exc, match="injected"):
                _SPECTRAL.save(run, overwrite=True)
        assert _contents(run) == before, at
        assert sorted(p.name for p in run.iterdir()) == sorted(before), at
    # and without a failure the new report replaces the earlier one, the user's files stay
    _SPECTRAL.save(run, overwrite=True)
    after = _contents(run)
    assert sorted(after) == sorted([*_MINE, "spectrum.png", "report.html", "report.json"])
    assert all(after[name] == data for name, data in _MINE.items())
    assert b'"spectrum.png"' in after["report.json"]


def test_a_failure_while_putting_back_loses_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Every move from the fourth on fails (the disk went away): what cannot be put back is kept
    in the staging folder, named in a warning; no byte of the earlier report is lost."""
    n = _moves(tmp_path, monkeypatch)
    for at in range(1, n + 1):
        run, before = _earlier(tmp_path)
        with monkeypatch.context() as m:
            _failing_replace(m, OSError, at, persist=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with pytest.raises(OSError, match="injected"):
                    _SPECTRAL.save(run, overwrite=True)
        kept = [p for p in run.rglob("*") if p.is_file() and p.parent != run]
        notes = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert bool(kept) == bool(notes), at
        if notes:
            assert "could not put back" in notes[0] and str(run) in notes[0]
        found = {**{p.name: p.read_bytes() for p in kept}, **_contents(run)}
        for name, data in before.items():  # each earlier file is in the folder or kept aside
            assert found.get(name) == data or any(p.read_bytes() == data for p in kept), (at, name)


# ---------------------------------------------------------------------- 3. NoisyOptimizer
_SAMPLERS: dict[str, Callable[[], Any]] = {
    "diag_empirical": lambda: DiagFisherNoise("empirical", scale=0.5),
    "diag_mc": lambda: DiagFisherNoise("mc", scale=0.5),
    "kfac_empirical": lambda: KFACNoise("empirical", scale=0.5),
    "kfac_mc": lambda: KFACNoise("mc", scale=0.5),
    "trace": lambda: FisherTraceNoise("empirical", scale=0.5),
    "full_true": lambda: FullFisherNoise("true", scale=0.5),
    "isotropic": lambda: IsotropicNoise(0.1),
    "multiplicative": lambda: MultiplicativeNoise(0.1),
}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
        for _ in range(6)
    ]


def _train(name: str, form: str, recompute_every: int, *, skip: int | None = None, fail_at: int | None = None, where: str = "draw") -> tuple[torch.Tensor, NoisyOptimizer]:  # fmt: skip
    """Six SGD-with-momentum steps; batch ``skip`` left out, or an out-of-memory error raised
    at batch ``fail_at`` after ``where`` (``"draw"``, ``"estimate"``: after the sampler's method
    returned, its draws taken; ``"optimizer"``: in the optimizer's step), the batch skipped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    noisy = NoisyOptimizer(opt, _SAMPLERS[name](), model, CE, seed=0, recompute_every=recompute_every)  # fmt: skip
    armed = [False]
    raised = [False]

    def fail() -> None:
        if armed[0]:
            armed[0] = False
            raised[0] = True
            raise torch.OutOfMemoryError("injected out of memory")

    def after(method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = method(*args, **kwargs)
            fail()
            return out

        return wrapped

    if where == "optimizer":
        opt.register_step_pre_hook(lambda *_: fail())
    else:
        setattr(noisy.sampler, where, after(getattr(noisy.sampler, where)))
    for k, (X, y) in enumerate(_batches()):
        if k == skip:
            continue
        armed[0] = k == fail_at

        def closure(X: torch.Tensor = X, y: torch.Tensor = y) -> torch.Tensor:
            noisy.zero_grad()
            loss = CE(model(X), y)
            loss.backward()
            return loss

        try:
            if form == "closure":
                noisy.step(closure)
            elif form == "capture":
                noisy.zero_grad()
                with noisy.capture():
                    CE(model(X), y).backward()
                noisy.step()
            else:
                closure()
                noisy.step(inputs=X, targets=y)
        except torch.OutOfMemoryError:
            assert k == fail_at
    assert raised[0] == (fail_at is not None), "the failure was not injected"
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), noisy


def _assert_as_without_the_batch(name: str, form: str, every: int, fail_at: int, where: str) -> None:  # fmt: skip
    ref, ref_noisy = _train(name, form, every, skip=fail_at)
    got, noisy = _train(name, form, every, fail_at=fail_at, where=where)
    assert noisy.steps_taken == ref_noisy.steps_taken == 5
    assert torch.equal(noisy.generator.get_state(), ref_noisy.generator.get_state())
    assert noisy._state_step == ref_noisy._state_step
    assert torch.equal(got, ref), float((got - ref).abs().max())


@pytest.mark.parametrize("every,fail_at", [(1, 2), (2, 2), (2, 3)])
@pytest.mark.parametrize("form", ["closure", "capture", "inputs"])
@pytest.mark.parametrize(
    "name",
    [
        "diag_empirical",
        "diag_mc",
        "kfac_empirical",
        "kfac_mc",
        "trace",
        "isotropic",
        "multiplicative",
    ],  # fmt: skip
)
def test_a_failed_draw_leaves_the_run_without_that_batch(name: str, form: str, every: int, fail_at: int) -> None:  # fmt: skip
    """An out-of-memory error in the noise draw: the run goes on bitwise as the run that never
    saw the batch (with ``recompute_every=2``: on a step that measures the curvature, whose
    state was cached, and on one that reuses it)."""
    _assert_as_without_the_batch(name, form, every, fail_at, "draw")


def test_a_failed_draw_of_full_fisher_noise_in_a_separate_pass() -> None:
    _assert_as_without_the_batch("full_true", "inputs", 1, 2, "draw")


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("name", ["diag_mc", "kfac_mc"])
def test_a_failed_curvature_pass_leaves_the_run_without_that_batch(name: str, every: int) -> None:  # fmt: skip
    """The separate pass draws Monte-Carlo labels from the noise generator, then fails."""
    _assert_as_without_the_batch(name, "inputs", every, 2, "estimate")


@pytest.mark.parametrize("form", ["closure", "inputs"])
@pytest.mark.parametrize("name", ["diag_empirical", "kfac_mc", "isotropic"])
def test_a_failed_optimizer_step_leaves_the_run_without_that_batch(name: str, form: str) -> None:  # fmt: skip
    """The optimizer's step raises before it changes anything (its pre-hook): the noise drawn
    for it is given back."""
    _assert_as_without_the_batch(name, form, 2, 2, "optimizer")
