"""Layers that are a supported class by ``isinstance`` but compute something else.

The per-example rules (the hooks backend, the noise captures, K-FAC) and BackPACK pick a layer's
rule by its class. Found in review, each silently wrong before:

* subclasses with their own ``forward`` (timm's ``StdConv2d`` weight standardisation, an
  equalised-learning-rate scale, ``Conv2dSame`` padding inside ``forward``, a clamped
  embedding): even the plain gradient came out 88-100% off;
* convolutions with ``padding_mode`` circular/reflect/replicate or ``padding="same"`` under BackPACK
  (which unfolds with zeros): 40-84% off; ``"same"`` crashed second order;
* average pooling with ``divisor_override`` (44% / 182% off) or ``count_include_pad=False`` and an
  adaptive pooling of non-divisible size (BackPACK crashed instead of handing over).

Now they go to the general engine (exact), ``kfac`` refuses them naming the layer, and
``KFACNoise`` gives them the diagonal. References: tests/bruteforce.py's dense float64 matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import curvlab as cl
from tests.bruteforce import Dense, assert_dicts_close

DT = torch.float64


class StdConv2d(nn.Conv2d):
    """Weight standardisation (timm's StdConv2d formula)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """Pads inside ``forward`` (its ``padding`` attribute stays 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0)


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * 0.5, self.bias)


class TanhLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * torch.tanh(self.weight)


@dataclass
class Problem:
    model: nn.Module
    loss_fn: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]


def _images(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
        for n in (3, 2)
    ]


def _cnn(first: nn.Module, pool: nn.Module | None = None) -> nn.Module:
    layers: list[nn.Module] = [first, nn.Tanh()]
    if pool is not None:
        layers.append(pool)
    return nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(3))


def _problem(name: str) -> Problem:
    torch.manual_seed(0)
    batches = _images(1)
    if name == "std_conv":
        model: nn.Module = _cnn(StdConv2d(2, 3, 3, padding=1))
    elif name == "conv_same_subclass":
        model = _cnn(Conv2dSame(2, 3, 3))
    elif name.startswith("padding_"):
        mode = name.removeprefix("padding_")
        conv = nn.Conv2d(2, 3, 3, padding="same" if mode == "same" else 1)
        if mode != "same":
            conv.padding_mode = mode
        model = _cnn(conv)
    elif name == "avg_divisor":
        model = _cnn(nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(2, divisor_override=3))
    elif name == "avg_no_pad_count":
        model = _cnn(nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(3, 2, 1, count_include_pad=False))
    elif name == "adaptive_nondivisible":
        g = torch.Generator().manual_seed(2)
        batches = [
            (torch.randn(n, 2, 8, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
            for n in (3, 2)
        ]
        model = nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool1d(3), nn.Flatten(),
            nn.Linear(9, 3),
        )  # fmt: skip
    elif name == "scaled_linear":
        g = torch.Generator().manual_seed(3)
        batches = [
            (torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
            for n in (3, 2)
        ]
        model = nn.Sequential(ScaledLinear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    elif name == "tanh_layernorm":
        g = torch.Generator().manual_seed(4)
        batches = [
            (torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
            for n in (3, 2)
        ]
        model = nn.Sequential(nn.Linear(5, 4), TanhLayerNorm(4), nn.Linear(4, 3))
    else:
        raise ValueError(name)
    model = model.to(DT)
    model(batches[0][0])  # materialise the lazy layer
    return Problem(model.eval(), nn.CrossEntropyLoss(), batches)


SUBCLASSES = ["std_conv", "conv_same_subclass", "scaled_linear", "tanh_layernorm"]
BACKPACK_SETTINGS = [
    "padding_circular",
    "padding_reflect",
    "padding_replicate",
    "padding_same",
    "avg_divisor",
    "avg_no_pad_count",
    "adaptive_nondivisible",
]


@pytest.mark.parametrize("name", SUBCLASSES + BACKPACK_SETTINGS)
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_diag_fisher_equals_brute_force(name: str, kind: str) -> None:
    p = _problem(name)
    ref = Dense(p)
    got = cl.diag_fisher(p.model, p.loss_fn, p.batches, kind=kind)
    assert_dicts_close(got, ref.diag("empirical_fisher" if kind == "empirical" else "ggn"))


@pytest.mark.parametrize("name", SUBCLASSES + ["padding_circular", "padding_same"])
def test_gradient_stats_equal_brute_force(name: str) -> None:
    p = _problem(name)
    ref = Dense(p)
    s = cl.gradient_stats(p.model, p.loss_fn, p.batches)
    assert_dicts_close(s.mean, ref.split(ref.grad_mean))
    assert_dicts_close(s.variance, ref.split(ref.grad_variance))
    assert float(s.noise_scale) == pytest.approx(ref.noise_scale, rel=1e-9)


@pytest.mark.parametrize("name", ["padding_reflect", "avg_divisor", "adaptive_nondivisible"])
def test_diag_hessian_equals_brute_force(name: str) -> None:
    p = _problem(name)
    assert_dicts_close(cl.diag_hessian(p.model, p.loss_fn, p.batches), Dense(p).diag("hessian"))


@pytest.mark.parametrize("backend", ["hooks", "backpack"])
def test_forced_fast_backends_refuse_a_subclass_with_its_own_forward(backend: str) -> None:
    p = _problem("std_conv")
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot compute this model exactly"):
        cl.diag_fisher(p.model, p.loss_fn, p.batches, backend=backend)


def test_kfac_refuses_and_kfac_noise_gives_the_diagonal() -> None:
    p = _problem("std_conv")
    with pytest.raises(ValueError, match=r"kfac: layer '0' StdConv2d overrides Conv2d\.forward"):
        cl.kfac(p.model, p.loss_fn, p.batches, kind="exact")
    X = torch.cat([b[0] for b in p.batches])
    y = torch.cat([b[1] for b in p.batches])
    state = cl.noise.KFACNoise("empirical", scale=1.0).estimate(
        p.model, p.loss_fn, X, y, torch.Generator().manual_seed(0)
    )
    ref = Dense(p).diag("empirical_fisher")
    assert set(state) == {"3", "__diagonal__"}  # the Linear head keeps its factors
    assert_dicts_close(state["__diagonal__"], {k: ref[k] for k in ("0.weight", "0.bias")})


def test_captured_diagonal_noise_on_a_subclass_is_exact() -> None:
    """The noise capture does not tap the subclass: the separate pass measures exactly."""
    p = _problem("scaled_linear")
    X = torch.cat([b[0] for b in p.batches])
    y = torch.cat([b[1] for b in p.batches])
    opt = torch.optim.SGD(p.model.parameters(), lr=0.0)
    noisy = cl.noise.NoisyOptimizer(
        opt, cl.noise.DiagFisherNoise("empirical", scale=1.0), p.model, p.loss_fn, seed=0
    )
    with noisy.capture():
        p.loss_fn(p.model(X), y).backward()
    noisy.step()
    full = Problem(p.model, p.loss_fn, [(X, y)])
    assert_dicts_close(noisy._state, Dense(full).diag("empirical_fisher"))


class CastingLinear(nn.Linear):
    """A Linear running in its input's dtype (Whisper's, modded-nanogpt's CastedLinear): a forward
    of its own that computes the plain layer's function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(
            x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )


def test_kfac_keeps_a_subclass_that_computes_the_plain_layer() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(CastingLinear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    twin = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    twin.load_state_dict(model.state_dict())
    X, y = torch.randn(6, 5, dtype=DT), torch.randint(0, 3, (6,))
    got = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact")
    ref = cl.kfac(twin, nn.CrossEntropyLoss(), (X, y), kind="exact")
    for name in ("0", "2"):
        torch.testing.assert_close(got[name].A, ref[name].A, rtol=1e-12, atol=0)
        torch.testing.assert_close(got[name].G, ref[name].G, rtol=1e-12, atol=0)
