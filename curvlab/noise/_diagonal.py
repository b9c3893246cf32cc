"""Diagonal-Fisher noise (Wen et al., Algorithm 1 / Eq. 6) and the Fisher-trace baseline.

Conventions (:mod:`curvlab._losses`, docs/conventions.md): the objective is ``L = w * sum_n NLL_n`` over the
``N`` examples of the batch, ``w = 1/(N c)`` under ``"mean"`` (``c`` loss terms per example) and
``w = 1`` under ``"sum"``. The diagonals are those of

* ``"empirical"``: the empirical Fisher, ``(1/N) sum_n g_n g_n^T`` with ``g_n = grad NLL_n / c``
  under ``"mean"``, ``sum_n s_n s_n^T`` with ``s_n = grad NLL_n`` under ``"sum"``;
* ``"mc"``: the Monte-Carlo Fisher with one label ``y_hat_n`` drawn from the model per example,
  ``w * sum_n grad NLL_n(y_hat_n) grad NLL_n(y_hat_n)^T`` (its expectation is the GGN);
* ``"exact"``: the generalised Gauss-Newton matrix (true Fisher) of ``L``.

The diagonals come from :func:`curvlab.diag_fisher`, so from whichever backend computes the model
exactly (docs/models.md): curvlab's own layer hooks where every trainable parameter sits in a layer
they have a rule for (``sum_n (grad_n W)^2`` from the layer input and output gradient), else
BackPACK (``SumGradSquared``, ``DiagGGNExact``), else ``torch.func``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._losses import loss_spec
from curvlab._precision import accumulation_dtype
from curvlab.backends._layers import sum_sq_grads, with_zeros
from curvlab.noise._base import (
    KindedSampler,
    batch_targets,
    check_batch,
    describe_saved,
    diagonal_problem,
    standard_normal_like,
    trainable_params,
)
from curvlab.noise._capture import Taps, tappable_layers

__all__ = ["DiagFisherNoise", "FisherTraceNoise", "diag_curvature"]

_KINDS = ("empirical", "mc", "exact")


def _sum_squares_taps(
    layers: dict[str, tuple[nn.Module, str, str | None]],
) -> tuple[dict[str, Tensor], Any]:
    acc: dict[str, Tensor] = {}

    def on_backward(name: str, module: nn.Module, a: Tensor, g: Tensor) -> None:
        _, wname, bname = layers[name]
        sq_w, sq_b = sum_sq_grads(module, a, g)
        _accumulate(acc, wname, sq_w)
        if bname is not None and sq_b is not None:
            _accumulate(acc, bname, sq_b)

    return acc, on_backward


def _accumulate(acc: dict[str, Tensor], name: str, value: Tensor) -> None:
    if name in acc:
        acc[name] = acc[name] + value
    else:
        acc[name] = value


def diag_curvature(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Any,
    targets: Tensor | None,
    kind: str,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """The diagonal of the ``kind`` Fisher of ``L`` on one batch (see the module docstring).

    One pass of the engine (:func:`curvlab.diag_fisher`: any model, the backend chosen per call);
    leaves no trace on the model. ``targets`` may be ``None`` for ``"mc"`` on logits ``(N, C)``.
    """
    from curvlab.quantities._diagonal import diag_fisher

    check_batch(inputs, targets, needs_targets=kind != "mc")
    targets = batch_targets(model, loss_fn, inputs, targets, f"kind={kind!r} noise")
    gen = generator if kind == "mc" else None
    return dict(diag_fisher(model, loss_fn, (inputs, targets), kind=kind, generator=gen))


class DiagFisherNoise(KindedSampler):
    """Gaussian noise with the diagonal of a Fisher matrix as covariance (Wen et al., Eq. 6).

    Each sample is ``eps = scale * sqrt(diag F) * xi`` with ``xi ~ N(0, I)``: mean zero and
    covariance exactly ``scale**2 * diag(F)``, with ``F`` the ``kind`` Fisher of the objective on the
    batch (``"empirical"``, ``"mc"`` or ``"exact"``; see :mod:`curvlab.noise._diagonal`). With the
    default Wen et al. scale, large-batch SGD plus this noise has the per-coordinate gradient
    variance of small-batch SGD (Algorithm 1).

    ``kind="empirical"`` can be measured inside the training step's own backward pass
    (:meth:`capture`, used by :class:`~curvlab.noise.NoisyOptimizer`), so the diagonal costs one
    extra batched product per layer and no second pass.

    Args:
        kind: ``"empirical"`` (default), ``"mc"`` or ``"exact"``.
        scale: the noise scale; or give ``large_batch`` and ``small_batch`` for
            ``sqrt((M_L - M_S) / (M_L * M_S))``.
        large_batch: ``M_L``.
        small_batch: ``M_S``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> sampler = DiagFisherNoise(large_batch=8, small_batch=2)
        >>> eps = sampler.sample(model, torch.nn.CrossEntropyLoss(), X, y, seed=0)
        >>> sorted(eps), eps["weight"].shape
        (['bias', 'weight'], torch.Size([2, 3]))
    """

    kinds = _KINDS
    default_kind = "empirical"

    adds_over_ranks = True
    fsdp2 = True

    def estimate(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor,
        targets: Tensor | None,
        generator: torch.Generator,
    ) -> Any:
        """``diag F`` on the batch (dict name -> Tensor), from a pass of its own."""
        diag = diag_curvature(model, loss_fn, inputs, targets, self.kind, generator)
        return self._reduce(diag)

    def _reduce(self, diag: dict[str, Tensor]) -> Any:
        """The state kept from the diagonal (the diagonal itself)."""
        return diag

    def _saved_problem(self, saved: Any, model: nn.Module) -> str | None:
        """A saved diagonal must have one entry shaped like each trainable parameter."""
        return diagonal_problem(saved, trainable_params(model), "a Fisher diagonal")

    def draw(
        self, model: nn.Module, state: dict[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """``scale * sqrt(diag F) * xi`` for the diagonal ``state``."""
        # every diagonal here is a sum of squares times a positive factor, hence >= 0
        return {
            n: standard_normal_like(d, generator).mul_(d.sqrt().mul_(self.scale))
            for n, d in state.items()
        }

    def capture(
        self, model: nn.Module, loss_fn: nn.Module, generator: torch.Generator
    ) -> Taps | None:
        """Measure the empirical diagonal inside the user's forward/backward (``None`` otherwise).

        Reads the gradient each layer receives as the per-example gradient of ``L``, which it is
        where the backward pass is that of ``loss_fn(model(inputs), targets)``. Where it is not
        (other terms reaching the model's output or hidden layers, the loss module called more
        than once, a parameter used outside its layer) the capture finds out without a host
        synchronisation and the step measures in a separate, exact pass
        (:mod:`curvlab.noise._capture`).
        """
        if self.kind != "empirical":
            return None
        params = trainable_params(model)
        layers = tappable_layers(model, params)
        if layers is None:
            return None
        spec = loss_spec(loss_fn)
        acc, on_backward = _sum_squares_taps(layers)

        def finish(taps: Taps) -> dict[str, Tensor] | None:
            n = taps.batch_size()
            if not taps.exact:  # a parameter used outside its layer: a separate, exact pass
                return None
            factor = spec.captured_empirical_factor(n)
            if not acc:
                raise RuntimeError(
                    "no gradient reached the model's layers inside the noise-capturing step; "
                    "call loss.backward() inside it"
                )
            return self._reduce({n: v * factor for n, v in with_zeros(acc, params).items()})

        return Taps(
            model,
            loss_fn,
            layers,
            on_backward=on_backward,
            finish=finish,
            params=params,
            layouts=self.layouts(),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, scale={self.scale:.6g})"


class FisherTraceNoise(DiagFisherNoise):
    """Isotropic noise with the Fisher's mean eigenvalue as variance (Wen et al.'s "Fisher Trace").

    Each sample is ``eps = scale * sqrt(Tr(F) / d) * xi`` with ``xi ~ N(0, I_d)`` and ``d`` the number
    of coordinates the draw is added to: mean zero, covariance exactly ``scale**2 * Tr(F) / d * I``,
    the same total variance ``scale**2 * Tr(F)`` as :class:`DiagFisherNoise` and
    :class:`FullFisherNoise` but without their structure. ``F`` and ``kind`` are as for
    :class:`DiagFisherNoise`; the state is the 0-dimensional tensor ``Tr(F) / D`` with ``D`` the
    number of trainable parameters (``Tr(F)`` over all of them).

    ``d`` is ``D`` for :meth:`sample` (every trainable parameter gets noise). Inside
    :class:`~curvlab.noise.NoisyOptimizer` it counts the parameters whose ``.grad`` is not
    ``None`` at step time, the ones that get noise: a layer the step's forward skipped
    (conditional computation) has a ``None`` ``.grad`` after ``zero_grad()`` (``set_to_none=True``,
    the default) and gets no noise, while a stale zero ``.grad`` (``zero_grad(set_to_none=False)``)
    counts and receives noise, so the total added variance is ``scale**2 * Tr(F)`` either way
    (before review s23 ``d`` was always ``D``: ``scale**2 * Tr(F) * 43/58`` for a skipped layer
    holding 15 of 58 coordinates). ``d`` is a Python count from the parameters' shapes (no host
    synchronisation). Where another optimizer steps some parameters, this one adds its part of
    the draw (``Tr(F) / d`` per coordinate, ``d`` counted over all parameters with a ``.grad``).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> eps = FisherTraceNoise(scale=0.1).sample(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> eps["bias"].shape
        torch.Size([2])
    """

    fsdp2 = True

    counts_receivers = True
    """:meth:`draw` takes ``receives=``, the parameters the draw is added to, and spreads the
    total variance over their coordinates (:class:`~curvlab.noise.NoisyOptimizer` passes those
    whose ``.grad`` is not ``None`` at step time)."""

    def _reduce(self, diag: dict[str, Tensor]) -> Tensor:
        """The state kept from the diagonal: ``Tr(F) / D`` (0-dim tensor; ``D`` every trainable
        parameter's coordinates, :meth:`draw` rescales to the ones that receive noise)."""
        return _mean_diag(diag)

    def _saved_problem(self, saved: Any, model: nn.Module) -> str | None:
        """A saved state must be the 0-dim tensor ``Tr(F) / d``."""
        if isinstance(saved, Tensor) and saved.ndim == 0:
            return None
        return f"{describe_saved(saved)}, not the 0-dim tensor Tr(F) / d"

    def draw(
        self,
        model: nn.Module,
        state: Tensor,
        generator: torch.Generator,
        receives: Collection[str] | None = None,
    ) -> dict[str, Tensor]:
        """``scale * sqrt(Tr(F)/d) * xi`` for every trainable parameter.

        Drawn in the parameter's accumulation dtype (float32 for a 16-bit parameter, as
        :class:`DiagFisherNoise` draws from its float32 diagonal): a standard deviation rounded to
        bfloat16 had a variance up to 0.8% off ``scale**2 * Tr(F) / d``.

        Args:
            model: the model whose trainable parameters the draw is shaped like.
            state: ``Tr(F) / D``, ``D`` the number of trainable parameters.
            generator: the noise generator.
            receives: the names of the trainable parameters the draw will be added to; ``d``
                counts their coordinates, so that these get the total variance
                ``scale**2 * Tr(F)`` (``None``: all, ``d = D``). Every parameter is drawn all
                the same (the generator's stream does not depend on it).

        Raises:
            ValueError: for a name in ``receives`` that is not a trainable parameter of ``model``.
        """
        params = trainable_params(model)
        std = self.scale * state.clamp(min=0).sqrt()
        if receives is not None:
            unknown = [n for n in receives if n not in params]
            if unknown:
                raise ValueError(
                    f"FisherTraceNoise.draw: receives= names {unknown[:3]}, not trainable "
                    "parameters of the model; pass names of model.named_parameters() that "
                    "require grad"
                )
            total = sum(p.numel() for p in params.values())
            count = sum(params[n].numel() for n in set(receives))
            if 0 < count < total:  # Tr(F) / d = (Tr(F) / D) * D / d, a Python factor
                std = std * math.sqrt(total / count)
        noise = {}
        for n, p in params.items():
            dtype = accumulation_dtype(p.dtype)
            xi = torch.randn(p.shape, generator=generator, device=p.device, dtype=dtype)
            noise[n] = xi.mul_(std.to(device=p.device, dtype=dtype))
        return noise


def _mean_diag(diag: dict[str, Tensor]) -> Tensor:
    total = sum(v.sum() for v in diag.values())
    count = sum(v.numel() for v in diag.values())
    return torch.as_tensor(total) / count
