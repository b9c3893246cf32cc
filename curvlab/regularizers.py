"""Gradient-norm regularisers: the Fisher penalty and GP, GP_x, GP_r (Jastrzębski et al., 2021).

Each penalty returns a differentiable scalar to add to the training loss, ``loss + penalty``.

* **Fisher penalty** (FP): ``alpha * || grad_theta L(x_{1:B}, y_hat) ||^2`` with labels ``y_hat``
  sampled from the model's predictive distribution ``p_theta(y | x)``. Under ``reduction="mean"``
  this is exactly ``alpha * || (1/B) sum_i g(x_i, y_hat_i) ||^2`` of the paper (eq. 2), a cheap
  proxy of ``Tr(F)`` that needs one extra backpropagation.
* **GP**: ``alpha * || grad_theta L(x_{1:B}, y) ||^2`` at the data labels.
* **GP_x**: ``alpha * (1/B) sum_i || d l_i / d x_i ||^2``, the mean squared norm of the per-example
  input gradients of the mean-convention losses ``l_i`` (input-output Jacobian regularisation).
* **GP_r**: ``alpha * || grad_theta L(x_{1:B}, y_r) ||^2`` with labels ``y_r`` drawn uniformly from
  the label set (classes for cross-entropy, {0, 1} for BCE; undefined for MSE).

``L`` is the objective ``loss_fn`` computes (its ``"mean"`` or ``"sum"`` reduction); the sampled
labels are constants, so only the dependence of the gradient on ``theta`` is differentiated.

The classes recompute the penalty every ``every`` calls and, in between, return a surrogate whose
value is the last penalty and whose gradient is the last computed gradient (appendix C of the paper
recomputes every 10 steps). Randomness comes from the penalty's own generator, never the global RNG.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 3)
    >>> loss_fn = torch.nn.CrossEntropyLoss()
    >>> X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> fp = FisherPenalty(model, loss_fn, alpha=0.1, every=10, seed=0)
    >>> output = model(X)
    >>> total = loss_fn(output, y) + fp(X, output=output)
    >>> total.backward()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._data import call_model
from curvlab._losses import LossSpec, loss_spec
from curvlab._rng import make_generator
from curvlab._scan import model_device

__all__ = [
    "fisher_penalty",
    "gradient_penalty",
    "input_gradient_penalty",
    "random_label_penalty",
    "GradientNormPenalty",
    "FisherPenalty",
]


def _check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    return float(alpha)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "model has no trainable parameters (requires_grad=True); nothing to penalise"
        )
    return params


def _objective(spec: LossSpec, output: Tensor, targets: Tensor) -> Tensor:
    """``L = w * sum_n NLL_n``: the loss with the user's reduction (ignored labels left out)."""
    return spec.nll_weight(output, output.shape[0], targets) * spec.nll_sum(output, targets)


def _squared_grad_norm(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    total = loss.new_zeros(())
    for g in grads:
        if g is not None:
            total = total + g.pow(2).sum()
    return total


def _forward(
    model: nn.Module,
    inputs: Any,
    output: Tensor | None,
    spec: LossSpec,
    targets: Tensor | None,
) -> Tensor:
    """The step's output in curvlab's layout (classes in axis 1; see :mod:`curvlab._losses`)."""
    if output is None:
        output = call_model(model, inputs)
    elif not isinstance(output, Tensor) and isinstance(getattr(output, "logits", None), Tensor):
        output = output.logits
    if (
        isinstance(inputs, Tensor)
        and isinstance(output, Tensor)
        and (output.shape[0] != inputs.shape[0])
    ):
        raise ValueError(
            "output must be model(inputs) for the same batch (got leading dimension "
            f"{getattr(output, 'shape', None)} for {inputs.shape[0]} inputs)"
        )
    if not output.requires_grad:
        raise ValueError(
            "output does not require grad (was it computed under torch.no_grad()?); pass the "
            "output of a normal forward pass, or output=None to let the penalty run one"
        )
    return output if targets is None else spec.prepare(output, targets)


def fisher_penalty(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    output: Tensor | None = None,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """Fisher penalty ``alpha * ||grad_theta L(x, y_hat)||^2`` with ``y_hat ~ p_theta(y | x)``.

    Args:
        model: the model being trained.
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (mean or sum).
        inputs: the mini-batch inputs ``x_{1:B}``.
        output: ``model(inputs)`` from the training step, reused to save a forward pass.
        alpha: the penalty coefficient (>= 0).
        generator: draws the labels; or ``seed`` (default 0) for a fresh generator.
        targets: optional data labels: only their shape (the GPT layout ``(B, T)`` for logits
            ``(B, T, C)``) and their ``ignore_index`` positions are used.

    Returns:
        A differentiable scalar to add to the loss.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 3)
        >>> X = torch.randn(8, 4)
        >>> fisher_penalty(model, torch.nn.CrossEntropyLoss(), X, alpha=0.1).ndim
        0
    """

    def sampled(spec: LossSpec, out: Tensor) -> Tensor:
        gen = make_generator(seed=seed, generator=generator, device=out.device)
        return spec.sample_targets(out, gen, targets)

    return _penalty_at(model, loss_fn, inputs, output, alpha, targets, sampled)


def _penalty_at(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    output: Tensor | None,
    alpha: float,
    targets: Tensor | None,
    labels: Callable[[LossSpec, Tensor], Tensor],
) -> Tensor:
    """``alpha * ||grad_theta L(x, labels)||^2``: the gradient-norm penalties differ only in the
    labels (sampled from the model, the data's, or uniform)."""
    spec = loss_spec(loss_fn)
    alpha = _check_alpha(alpha)
    params = _trainable(model)
    output = _forward(model, inputs, output, spec, targets)
    return alpha * _squared_grad_norm(_objective(spec, output, labels(spec, output)), params)


def gradient_penalty(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    output: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """GP: ``alpha * ||grad_theta L(x, y)||^2`` at the data labels (differentiable)."""
    return _penalty_at(model, loss_fn, inputs, output, alpha, targets, lambda spec, out: targets)


def _uniform_labels(spec: LossSpec, output: Tensor, generator: torch.Generator) -> Tensor:
    if spec.kind == "cross_entropy":
        classes = output.shape[1]
        shape = (output.shape[0],) + tuple(output.shape[2:])
        return torch.randint(0, classes, shape, generator=generator, device=output.device)
    if spec.kind == "bce":
        draws = torch.randint(0, 2, output.shape, generator=generator, device=output.device)
        return draws.to(output.dtype)
    raise ValueError(
        "random_label_penalty (GP_r) needs a finite label set: use CrossEntropyLoss or "
        "BCEWithLogitsLoss, not MSELoss"
    )


def random_label_penalty(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    output: Tensor | None = None,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """GP_r: ``alpha * ||grad_theta L(x, y_r)||^2``, labels drawn uniformly from the label set.

    ``targets`` (optional) give the layout and the ``ignore_index`` positions, as for
    :func:`fisher_penalty`.
    """

    def uniform(spec: LossSpec, out: Tensor) -> Tensor:
        gen = make_generator(seed=seed, generator=generator, device=out.device)
        labels = _uniform_labels(spec, out, gen)
        if targets is not None and spec.kind == "cross_entropy" and not targets.is_floating_point():
            labels = torch.where(targets == spec.ignore_index, targets, labels)
        return labels

    return _penalty_at(model, loss_fn, inputs, output, alpha, targets, uniform)


def input_gradient_penalty(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
) -> Tensor:
    """GP_x: ``alpha * (1/B) sum_i ||d l_i / d x_i||^2`` (``l_i``: mean-convention example losses).

    Runs its own forward pass on a copy of ``inputs`` that requires grad. Examples must not interact
    (no BatchNorm in train mode), so that ``d (sum_n l_n) / d x_i = d l_i / d x_i``.
    """
    spec = loss_spec(loss_fn)
    alpha = _check_alpha(alpha)
    _trainable(model)
    if not inputs.is_floating_point():
        raise TypeError(
            f"input_gradient_penalty (GP_x) needs floating-point inputs, got {inputs.dtype}; "
            "it is undefined for token ids or other integer inputs"
        )
    x = inputs.detach().requires_grad_(True)
    output = spec.prepare(call_model(model, x), targets)
    n = inputs.shape[0]
    count = spec.count(output, targets)
    count = count.to(output.dtype) if isinstance(count, Tensor) else count
    shares = spec.nll_sum(output, targets) * (n / count)  # sum_n l_n, mean convention
    (gx,) = torch.autograd.grad(shares, x, create_graph=True)
    return alpha * gx.pow(2).sum() / inputs.shape[0]


PENALTIES: dict[str, str] = {
    "fisher": "Fisher penalty: squared gradient norm at labels sampled from the model",
    "gradient": "GP: squared gradient norm at the data labels",
    "input": "GP_x: mean squared per-example input-gradient norm",
    "random": "GP_r: squared gradient norm at uniformly random labels",
}


class GradientNormPenalty:
    """A gradient-norm penalty recomputed every ``every`` calls (Jastrzębski et al., appendix C).

    On a recomputation step the penalty ``P(theta)`` and its gradient ``grad P`` are computed
    (one double-backward); the returned term is ``P + sum_p <grad P, p - stop_grad(p)>``, whose
    value is ``P`` and whose gradient with respect to the parameters is ``grad P``. On the other
    steps the same surrogate is built from the cached values, so the optimiser keeps receiving the
    most recently computed penalty gradient at the cost of nothing. ``every=1`` returns the exact
    differentiable penalty on every call.

    Args:
        model: the model being trained.
        loss_fn: a supported loss module (its reduction defines ``L``).
        kind: ``"fisher"`` (FP), ``"gradient"`` (GP), ``"input"`` (GP_x) or ``"random"`` (GP_r).
        alpha: coefficient (>= 0).
        every: recompute period in calls (>= 1).
        seed: seed of the penalty's own generator (labels for ``"fisher"`` and ``"random"``).

    Attributes:
        last_value: the last recomputed penalty (a detached tensor), or ``None``.
        calls: the number of calls so far.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 3)
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> gp = GradientNormPenalty(model, loss_fn, kind="gradient", alpha=0.01, every=5)
        >>> X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> out = model(X)
        >>> (loss_fn(out, y) + gp(X, y, output=out)).backward()
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        kind: str = "fisher",
        alpha: float = 1.0,
        every: int = 1,
        seed: int = 0,
    ) -> None:
        if kind not in PENALTIES:
            raise ValueError(f"kind must be one of {sorted(PENALTIES)}, got {kind!r}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.spec = loss_spec(loss_fn)
        if kind == "random" and self.spec.kind == "mse":
            raise ValueError(
                "kind='random' (GP_r) needs a finite label set: use CrossEntropyLoss or "
                "BCEWithLogitsLoss, not MSELoss"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.kind = kind
        self.alpha = _check_alpha(alpha)
        self.every = every
        self.generator = make_generator(seed=seed, device=model_device(model))
        self.calls = 0
        self.last_value: Tensor | None = None
        self._cached_grads: list[Tensor | None] | None = None

    def _compute(self, inputs: Tensor, targets: Tensor | None, output: Tensor | None) -> Tensor:
        if self.kind == "fisher":
            return fisher_penalty(
                self.model,
                self.loss_fn,
                inputs,
                output,
                self.alpha,
                generator=self.generator,
                targets=targets,
            )
        if self.kind == "random":
            return random_label_penalty(
                self.model,
                self.loss_fn,
                inputs,
                output,
                self.alpha,
                generator=self.generator,
                targets=targets,
            )
        if targets is None:
            raise ValueError(
                f"kind={self.kind!r} needs the batch targets: call penalty(inputs, targets)"
            )
        if self.kind == "gradient":
            return gradient_penalty(self.model, self.loss_fn, inputs, targets, output, self.alpha)
        return input_gradient_penalty(self.model, self.loss_fn, inputs, targets, self.alpha)

    def _surrogate(self, params: list[nn.Parameter]) -> Tensor:
        assert self.last_value is not None and self._cached_grads is not None
        term = self.last_value.clone()
        for p, g in zip(params, self._cached_grads):
            if g is not None:
                term = term + (g * (p - p.detach())).sum()
        return term

    def __call__(
        self, inputs: Tensor, targets: Tensor | None = None, output: Tensor | None = None
    ) -> Tensor:
        """The penalty term for this training step (add it to the loss before ``backward``).

        Args:
            inputs: the mini-batch inputs.
            targets: the labels (needed by ``"gradient"`` and ``"input"``).
            output: ``model(inputs)`` of this step, reused by ``"fisher"``, ``"gradient"`` and
                ``"random"`` on recomputation steps (``"input"`` always runs its own forward).
        """
        params = _trainable(self.model)
        recompute = self.calls % self.every == 0 or self._cached_grads is None
        self.calls += 1
        if not recompute:
            return self._surrogate(params)
        value = self._compute(inputs, targets, output)
        if self.every == 1:
            self.last_value = value.detach()
            self._cached_grads = None
            return value
        grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)
        self.last_value = value.detach()
        self._cached_grads = [None if g is None else g.detach() for g in grads]
        return self._surrogate(params)


class FisherPenalty(GradientNormPenalty):
    """The Fisher penalty, recomputed every ``every`` steps (default 10, as in the paper).

    See :class:`GradientNormPenalty`; ``FisherPenalty(model, loss_fn, alpha, every, seed)`` is
    ``GradientNormPenalty(model, loss_fn, "fisher", alpha, every, seed)``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        alpha: float = 1.0,
        every: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(model, loss_fn, kind="fisher", alpha=alpha, every=every, seed=seed)
