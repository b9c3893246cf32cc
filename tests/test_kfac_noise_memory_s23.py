"""KFACNoise holds its factors once, as ``memory_budget`` counts them (review s23).

``memory_budget`` counts ``in'^2 + out^2`` numbers per layer (``A`` and ``G``; the state's ``C``
and ``B`` have the same sizes). Before review s23 :meth:`KFACNoise.estimate` built every layer's
``B``/``C`` while :func:`curvlab.kfac`'s whole result (every ``A``/``G``) was still held, and the
one-pass capture kept every layer's statistics until the last layer's factors were built: up to
twice the budget (2.2x measured on ten 500-wide float64 layers). The bytes held are counted here
with weak references to the tensors (exact, unlike a process's resident memory), at the start of
each eigen-decomposition (``_psd_factor``).

Also: a ``fractions.Fraction`` budget made the refusal message itself raise ``TypeError``
(``fmt_budget`` used ``:g``, which ``Fraction`` lacks before Python 3.12).
"""

from __future__ import annotations

import weakref
from fractions import Fraction

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

import curvlab as cl
import curvlab.noise._kfac as kfac_noise
import curvlab.quantities._kfac as kfac_quantities
from curvlab.noise import KFACNoise, NoisyOptimizer
from curvlab.quantities._kfac_budget import fmt_budget

WIDTHS = (5, 6, 6, 6, 3)  # four Linear layers of comparable factor sizes
LF = nn.CrossEntropyLoss()


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        mods += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(WIDTHS) - 2 else [])
    return nn.Sequential(*mods).double()


def _layer_bytes(model: nn.Module) -> list[int]:
    """Per Linear layer ``(in^2 + out^2) * 8``: the float64 ``A`` and ``G`` the budget counts."""
    return [(m.in_features**2 + m.out_features**2) * 8 for m in model if isinstance(m, nn.Linear)]


class _Held:
    """Weak references to tracked tensors; :meth:`bytes` sums those still alive."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[Tensor]] = []
        self.peaks: list[int] = []

    def track(self, t: Tensor) -> None:
        self.refs.append(weakref.ref(t))

    def bytes(self) -> int:
        alive = [r() for r in self.refs]
        return sum(t.numel() * t.element_size() for t in alive if t is not None)


def _count_at_each_decomposition(monkeypatch: pytest.MonkeyPatch, held: _Held) -> None:
    """Record the bytes held as each ``_psd_factor`` starts; track the factors it returns."""
    original = kfac_noise._psd_factor

    def counting(m: Tensor) -> Tensor:
        held.peaks.append(held.bytes())
        out = original(m)
        held.track(out)
        return out

    monkeypatch.setattr(kfac_noise, "_psd_factor", counting)


def test_estimate_builds_b_and_c_without_holding_every_a_and_g(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At each decomposition the live ``A``/``G`` of ``curvlab.kfac``'s result and the ``B``/``C``
    built so far take at most the budget's count (old code: count + all earlier layers' B/C,
    1.86x here); the state is the K-FAC factorisation of the brute-force
    one-example Fisher (``kron(G, A) = vec(dW) vec(dW)^T`` exactly for one example)."""
    model = _model()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(1, WIDTHS[0], generator=gen, dtype=torch.float64)
    y = torch.tensor([1])
    held = _Held()
    engine = kfac_quantities.kfac_where_batch_major

    def tracking(*args, **kwargs):
        result = engine(*args, **kwargs)
        for f in result.values():
            held.track(f.A)
            held.track(f.G)
        return result

    monkeypatch.setattr(kfac_quantities, "kfac_where_batch_major", tracking)
    _count_at_each_decomposition(monkeypatch, held)
    budget = sum(_layer_bytes(model))
    state = KFACNoise(scale=0.1, memory_budget=budget).estimate(model, LF, X, y, gen)

    assert len(held.peaks) == 2 * len(_layer_bytes(model))  # B and C of every layer
    assert held.peaks[0] == budget  # every A and G, nothing built yet: the budget's count
    assert max(held.peaks) <= budget, (
        f"KFACNoise.estimate held {max(held.peaks)} bytes of A/G and B/C at once, over the "
        f"{budget} bytes memory_budget counts ({max(held.peaks) / budget:.2f}x)"
    )

    # brute force: the one example's weight gradient; its outer product is kron(G, A) exactly
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p: dict[str, Tensor]) -> Tensor:
        return LF(functional_call(model, p, (X,)), y)

    g = grad(loss)(params)
    for name, m in model.named_children():
        if not isinstance(m, nn.Linear):
            continue
        B, C = state[name]["B"], state[name]["C"]
        gw = g[f"{name}.weight"].reshape(-1)
        want = torch.outer(gw, gw)
        got = torch.kron(B @ B.t(), C.t() @ C)
        # each entry is a product of O(1) numbers through one eigen-decomposition per factor
        tol = 100 * torch.finfo(torch.float64).eps * float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
        gb = g[f"{name}.bias"]
        torch.testing.assert_close(B @ B.t(), torch.outer(gb, gb), rtol=0, atol=tol)


def test_capture_releases_each_layers_statistics_once_its_factors_are_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One-pass path: the captured Gram matrices (``in' x in'`` and ``out x out``, as many numbers
    as the budget counts) and the factors built so far take at most the count plus the one
    factor (``C``) of the layer in progress (old code: every layer's statistics to the end); a
    second read of the result gives the same factors."""
    model = _model()
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(8, WIDTHS[0], generator=gen, dtype=torch.float64)  # 8 rows >= every width:
    y = torch.randint(0, WIDTHS[-1], (8,), generator=gen)  # the inputs are kept as Gram matrices
    held = _Held()
    on_forward, on_backward = kfac_noise._FactorTaps.on_forward, kfac_noise._FactorTaps.on_backward

    def forward(self, name, module, a):
        on_forward(self, name, module, a)
        held.track(self.inputs[name][1])

    def backward(self, name, module, a, g):
        on_backward(self, name, module, a, g)
        held.track(self.grads[name])

    monkeypatch.setattr(kfac_noise._FactorTaps, "on_forward", forward)
    monkeypatch.setattr(kfac_noise._FactorTaps, "on_backward", backward)
    _count_at_each_decomposition(monkeypatch, held)
    layer_bytes = _layer_bytes(model)
    budget = sum(layer_bytes)
    sampler = KFACNoise("empirical", scale=0.1, memory_budget=budget)
    noisy = NoisyOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, LF, seed=0)
    with noisy.capture():
        LF(model(X), y).backward()
    first = noisy._pending.result()
    assert first is not None, "the step's own backward must measure the factors (one pass)"
    assert held.peaks and held.peaks[0] == budget  # every Gram matrix captured: the count
    one_factor = max(m.in_features**2 * 8 for m in model if isinstance(m, nn.Linear))
    assert max(held.peaks) <= budget + one_factor, (
        f"the capture held {max(held.peaks)} bytes of statistics and factors at once, over the "
        f"{budget} bytes memory_budget counts plus one layer's C ({one_factor})"
    )
    again = noisy._pending.result()  # the statistics are gone: the factors built are kept
    assert set(again) == set(first) == {"0", "2", "4", "6"}
    for layer, parts in first.items():
        for key, value in parts.items():
            assert torch.equal(again[layer][key], value)
    noisy.step()
    for layer, parts in first.items():
        for key, value in parts.items():
            assert torch.equal(noisy._state[layer][key], value)


def test_fraction_budget_formats_in_the_refusal() -> None:
    """``fmt_budget`` formats any real number as a float (``Fraction`` has no ``:g`` before
    Python 3.12); a ``Fraction`` budget is refused with a ``ValueError``, never a ``TypeError``
    from the message's own formatting."""
    assert fmt_budget(Fraction(1000, 3)) == "333.333"
    assert fmt_budget(Fraction(2000, 2)) == "1000"
    model = _model()
    X, y = torch.randn(4, WIDTHS[0], dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="memory_budget"):
        cl.kfac(model, LF, (X, y), kind="empirical", memory_budget=Fraction(1000, 3))
    with pytest.raises(ValueError, match="memory_budget"):
        KFACNoise(scale=0.1, memory_budget=Fraction(1000, 3)).sample(model, LF, X, y)
