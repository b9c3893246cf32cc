"""NoisyOptimizer's one-pass capture on a layer whose output the model changes in place.

On inputs of more than two dimensions ``F.linear`` returns a view of its 2-D result. A model that
changes that output in place (a residual ``z = self.l2(h); z += h``) drops the view's backward node
from the graph, so a tensor hook on the output never fired: the captured diagonal of ``l2`` was all
zeros and K-FAC left ``l2`` out (zero noise), while the capture still counted as exact. Now

* the capture reads the gradient at the edge of the output's base and equals the separate pass
  (``cl.diag_fisher`` / ``sampler.estimate``) on the same batch, in one pass;
* a 2-D input (the output is no view) is the control;
* a layer gradient the hooks miss is never answered with a silent zero: the capture gives no state
  and NoisyOptimizer measures in its separate pass (checked by putting the hook back on the view).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import curvlab as cl
import curvlab.noise._capture as capture_mod
from curvlab.noise import DiagFisherNoise, KFACNoise, NoisyOptimizer

V, T, D = 5, 4, 3
LF = nn.CrossEntropyLoss()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SeqMLP(nn.Module):
    """Three Linear layers; ``l2``'s output gets a residual added in place."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(D, 6), nn.Linear(6, 6), nn.Linear(6, V)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, D) or (B, D)
        h = torch.tanh(self.l1(x))
        z = self.l2(h)
        z += h  # residual added in place into l2's output
        return self.l3(torch.tanh(z))


def _problem(shape: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = SeqMLP().double()
    if shape == "sequence":
        X = torch.randn(6, T, D, dtype=torch.float64)
        y = torch.randint(0, V, (6, T))
    else:
        X = torch.randn(12, D, dtype=torch.float64)
        y = torch.randint(0, V, (12,))
    return model, X, y


def _loss(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    return LF(model(X).reshape(-1, V), y.reshape(-1))


def _counting_estimate(sampler) -> list[int]:
    calls: list[int] = []
    estimate = sampler.estimate

    def counted(*a, **k):
        calls.append(1)
        return estimate(*a, **k)

    sampler.estimate = counted
    return calls


def _gram(state: dict) -> dict[str, tuple[Tensor, Tensor]]:
    """K-FAC state -> per layer (G, A) = (B B^T, C^T C), independent of the factorisation."""
    return {k: (s["B"] @ s["B"].T, s["C"].T @ s["C"]) for k, s in state.items()}


def _assert_kfac_equal(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref) == ["l1", "l2", "l3"]
    g, r = _gram(got), _gram(ref)
    for k in r:
        torch.testing.assert_close(g[k][0], r[k][0], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(g[k][1], r[k][1], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("shape", ["sequence", "flat"])
def test_diag_capture_of_a_layer_changed_in_place_equals_diag_fisher(shape: str) -> None:
    """The captured diagonal (one pass) equals cl.diag_fisher on the batch, l2 included."""
    model, X, y = _problem(shape)
    sampler = DiagFisherNoise("empirical", scale=0.1)
    calls = _counting_estimate(sampler)
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, LF, seed=0)
    with noisy.capture():
        _loss(model, X, y).backward()
    captured = noisy._pending.result()
    assert captured is not None, "the capture must see l2's gradient (no second pass needed)"
    ref = cl.diag_fisher(model, LF, (X, y), kind="empirical")
    assert float(ref["l2.weight"].max()) > 0
    assert sorted(captured) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(captured[k], ref[k], rtol=1e-8, atol=1e-12)
    noisy.step()
    assert calls == []  # one pass: no separate estimate
    for k in ref:
        torch.testing.assert_close(noisy._state[k], ref[k], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("shape", ["sequence", "flat"])
def test_kfac_capture_of_a_layer_changed_in_place_equals_its_separate_pass(shape: str) -> None:
    """The captured K-FAC factors equal sampler.estimate's on the batch, l2 included, and the
    noise drawn for l2 is not zero."""
    model, X, y = _problem(shape)
    sampler = KFACNoise("empirical", scale=0.1)
    calls = _counting_estimate(sampler)
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, LF, seed=0)

    def closure() -> Tensor:
        noisy.zero_grad()
        loss = _loss(model, X, y)
        loss.backward()
        return loss

    noisy.step(closure)
    assert calls == []  # captured in the training pass
    ref = sampler.estimate(model, LF, X, y, torch.Generator().manual_seed(0))
    _assert_kfac_equal(noisy._state, ref)
    eps = sampler.draw(model, noisy._state, torch.Generator().manual_seed(1))
    assert float(eps["l2.weight"].abs().max()) > 0


def _hook_on_the_view(report_fragile: bool) -> Callable[[Tensor, Callable], bool]:
    """The old tap: a tensor hook on the layer output itself, which a view changed in place
    never fires. ``report_fragile``: say so to the caller (a view that is no plain reshape)."""

    def hook_output_grad(output: Tensor, hook: Callable[[Tensor], None]) -> bool:
        output.register_hook(hook)
        return not (report_fragile and output._is_view())

    return hook_output_grad


def _fallback_step(monkeypatch, sampler, report_fragile: bool):  # noqa: ANN001, ANN202
    """One captured step with the old hook on the view: the capture must give no state (and be
    inexact), and the step must take the separate pass exactly once. Returns the optimizer and
    the separate pass's own state on the same batch."""
    monkeypatch.setattr(capture_mod, "_hook_output_grad", _hook_on_the_view(report_fragile))
    model, X, y = _problem("sequence")
    calls = _counting_estimate(sampler)
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, LF, seed=0)
    with noisy.capture():
        _loss(model, X, y).backward()
    taps = noisy._pending
    assert taps.result() is None and not taps.exact
    noisy.step()
    assert calls == [1]
    return noisy, sampler.estimate(model, LF, X, y, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("report_fragile", [False, True])
def test_diag_missed_layer_gradient_falls_back_to_the_separate_pass(monkeypatch, report_fragile):
    """A tapped layer that ran and reaches the loss but whose gradient hook never fired makes the
    capture inexact: NoisyOptimizer takes its separate pass, never a zero diagonal."""
    sampler = DiagFisherNoise("empirical", scale=0.1)
    noisy, ref = _fallback_step(monkeypatch, sampler, report_fragile)
    assert float(ref["l2.weight"].max()) > 0
    for k in ref:
        torch.testing.assert_close(noisy._state[k], ref[k], rtol=1e-12, atol=0.0)


def test_kfac_view_hook_changed_in_place_falls_back_to_the_separate_pass(monkeypatch) -> None:
    """K-FAC (no parameter check) with a hook on a view that is then changed in place: the
    capture gives no state and the separate pass measures every layer."""
    sampler = KFACNoise("empirical", scale=0.1)
    noisy, ref = _fallback_step(monkeypatch, sampler, True)
    _assert_kfac_equal(noisy._state, ref)


def test_view_output_hook_is_not_flagged_without_an_in_place_change(monkeypatch) -> None:
    """Control: a view hook whose output is not changed in place fires, so the capture stays
    exact (one pass) even where the tap reports the view as fragile."""
    monkeypatch.setattr(capture_mod, "_hook_output_grad", _hook_on_the_view(True))

    class Plain(SeqMLP):
        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.l1(x))
            return self.l3(torch.tanh(self.l2(h) + h))

    torch.manual_seed(0)
    model = Plain().double()
    X = torch.randn(6, T, D, dtype=torch.float64)
    y = torch.randint(0, V, (6, T))
    sampler = KFACNoise("empirical", scale=0.1)
    calls = _counting_estimate(sampler)
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, LF, seed=0)
    with noisy.capture():
        _loss(model, X, y).backward()
    noisy.step()
    assert calls == []
    _assert_kfac_equal(noisy._state, sampler.estimate(model, LF, X, y, torch.Generator()))


@pytest.mark.parametrize("make", ["diag", "kfac"])
def test_a_layer_called_twice_falls_back_to_the_separate_pass(make):
    """One Linear applied twice in the forward: the one-pass capture cannot tap it, and the
    closure path raised while ``step(inputs=...)`` handled the model; it falls back to the
    separate pass now, with the same step."""
    from torch import nn as _nn

    from curvlab.noise import DiagFisherNoise, KFACNoise, NoisyOptimizer

    class Twice(_nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l, self.o = _nn.Linear(4, 4), _nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(torch.tanh(self.l(torch.tanh(self.l(x)))))

    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    lf = _nn.CrossEntropyLoss()
    ends = []
    for mode in ("closure", "inputs"):
        torch.manual_seed(0)
        m = Twice().double()
        sampler = DiagFisherNoise(scale=0.5) if make == "diag" else KFACNoise(scale=0.5)
        noisy = NoisyOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), sampler, m, lf, seed=3)

        def closure(m=m, noisy=noisy) -> torch.Tensor:
            noisy.zero_grad()
            loss = lf(m(X), y)
            loss.backward()
            return loss

        if mode == "closure":
            noisy.step(closure)
        else:
            closure()
            noisy.step(inputs=X, targets=y)
        ends.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(ends[0], ends[1])
