"""Data-free baselines: isotropic (SGLD-style) and multiplicative gradient noise."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from curvlab._losses import LossSpec
from curvlab._notrace import buffer_snapshot, each_forward_on
from curvlab._numbers import is_real
from curvlab._precision import accumulation_dtype, upcast
from curvlab.noise._base import (
    NoiseSampler,
    check_batch,
    objective_gradient,
    standard_normal_like,
    trainable_params,
)

__all__ = ["IsotropicNoise", "MultiplicativeNoise"]


def _check_std(std: float) -> float:
    if not is_real(std) or std < 0:
        raise ValueError(f"std must be a finite float >= 0, got {std!r}")
    return float(std)


class IsotropicNoise(NoiseSampler):
    """Isotropic Gaussian gradient noise ``eps = std * xi``: mean zero, covariance ``std**2 * I``.

    Added to the gradient before an SGD step with learning rate ``lr`` this is the update
    ``theta <- theta - lr * grad L - lr * std * xi``. :meth:`langevin` picks ``std`` so that this is
    stochastic-gradient Langevin dynamics at a temperature.

    Inside :class:`~curvlab.noise.NoisyOptimizer` a parameter whose ``.grad`` is ``None`` at step
    time (a layer the step's forward skipped, after ``zero_grad()`` with its default
    ``set_to_none=True``) gets no noise, while a stale zero ``.grad``
    (``zero_grad(set_to_none=False)``) gets ``std * xi``: the variance per coordinate is
    ``std**2`` either way, and the total ``std**2`` times the number of coordinates that get
    noise. :meth:`sample` draws for every trainable parameter.

    Args:
        std: the standard deviation per coordinate.

    Example:
        >>> import torch
        >>> eps = IsotropicNoise(0.1).sample(torch.nn.Linear(3, 2), seed=0)
        >>> eps["weight"].shape
        torch.Size([2, 3])
    """

    adds_over_ranks = True
    fsdp2 = True

    uses_curvature = False

    def __init__(self, std: float) -> None:
        super().__init__(scale=_check_std(std))
        self.std = self.scale

    @classmethod
    def langevin(cls, lr: float, num_examples: int = 1, temperature: float = 1.0) -> IsotropicNoise:
        """Noise that makes SGD with step ``lr`` on ``L`` a Langevin sampler at ``temperature``.

        With ``L`` the mean loss over ``num_examples`` training examples (pass 1 for a sum loss),
        the target density is ``exp(-num_examples * L / temperature)``; SGLD moves
        ``theta <- theta - lr * grad L + sqrt(2 lr T / N) xi``, i.e. gradient noise with
        ``std = sqrt(2 T / (lr N))``.

        ``std`` is fixed by the ``lr`` given here: under a learning-rate schedule (or any later
        change of the optimizer's ``lr``) SGD's step ``t``, at learning rate ``lr_t``, moves
        by the noise ``lr_t * std * xi`` of variance ``2 lr_t^2 T / (lr N)``: Langevin dynamics
        at the drifting temperature ``T * lr_t / lr``, not ``T`` (a schedule decaying ``lr``
        tenfold cools the chain tenfold). For a fixed temperature keep the learning rate
        constant while the noise is on.

        Example:
            >>> round(IsotropicNoise.langevin(lr=0.1, num_examples=1000).std, 6)
            0.141421
        """
        if not (0 < lr < math.inf) or not num_examples >= 1 or not (0 <= temperature < math.inf):
            raise ValueError(
                f"need lr > 0, num_examples >= 1 and temperature >= 0, got lr={lr!r}, "
                f"num_examples={num_examples!r}, temperature={temperature!r}"
            )
        return cls(math.sqrt(2.0 * temperature / (lr * num_examples)))

    def sample(  # type: ignore[override]
        self,
        model: nn.Module,
        loss_fn: nn.Module | None = None,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> dict[str, Tensor]:
        """One sample; ``loss_fn``, ``inputs`` and ``targets`` are accepted and ignored."""
        return super().sample(model, loss_fn, inputs, targets, generator=generator, seed=seed)

    def draw(
        self, model: nn.Module, state: object, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """``std * xi`` for every trainable parameter."""
        return {
            n: self.std * standard_normal_like(p.detach(), generator)
            for n, p in trainable_params(model).items()
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(std={self.std:.6g})"


class MultiplicativeNoise(NoiseSampler):
    """Multiplicative gradient noise ``eps = g * std * xi`` (Wen et al.'s "Multiplicative" baseline).

    Given the gradient ``g``, each sample has mean zero and covariance ``std**2 * diag(g**2)``; the
    noisy gradient ``g + eps = g * (1 + std * xi)`` multiplies every coordinate by an independent
    ``N(1, std**2)`` factor. Inside :class:`~curvlab.noise.NoisyOptimizer` ``g`` is the current
    ``.grad``; :meth:`sample` computes ``g`` on the batch it is given.

    Args:
        std: the standard deviation of the multiplicative factor.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> eps = MultiplicativeNoise(0.5).sample(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> eps["bias"].shape
        torch.Size([2])
    """

    adds_over_ranks = True

    reusable = False
    uses_gradient = True

    def __init__(self, std: float) -> None:
        super().__init__(scale=_check_std(std))
        self.std = self.scale

    def estimate(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor,
        targets: Tensor | None,
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        """The gradient of ``loss_fn(model(inputs), targets)`` (dict name -> Tensor).

        For a 16-bit output it is ``sqrt(w)`` times the gradient of ``sqrt(w) sum_n NLL_n``
        (``L = w sum_n NLL_n``), so that the gradient reaching the output is ``sqrt(w) (p - y)``,
        not ``w (p - y)``: float16 holds the latter as a subnormal (a float16 model's gradient
        was 2.7% off at 65,536 tokens, 0 with the float16 count before).

        The forward runs on copies of the buffers a forward updates (norm statistics,
        ``spectral_norm``'s vectors, integer and boolean buffers of at most 64 KiB: call
        counters), as the call found them, and the model keeps its own (before review s19 each
        call left a call counter one further on).
        """
        check_batch(inputs, targets, needs_targets=True)
        roots: list[Tensor | float] = []

        def objective(spec: LossSpec, output: Tensor, labels: Tensor) -> Tensor:
            if accumulation_dtype(output.dtype) == output.dtype:
                return spec.objective(output, labels)
            roots.append(spec.nll_weight(output, output.shape[0], labels) ** 0.5)
            return roots[0] * spec.nll_sum(output, labels)

        with each_forward_on(model, buffer_snapshot(model.modules())):
            grads = objective_gradient(
                model, loss_fn, inputs, targets, objective, type(self).__name__
            )
        if not roots:
            return grads
        return {n: (upcast(g) * roots[0]).to(g.dtype) for n, g in grads.items()}

    def draw(
        self, model: nn.Module, state: dict[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """``g * std * xi`` for the gradient ``state``."""
        return {n: g * (self.std * standard_normal_like(g, generator)) for n, g in state.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(std={self.std:.6g})"
