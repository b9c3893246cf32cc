"""The hooks backend: per-example squared gradients of Linear/Conv layers from curvlab's own hooks.

For first-order quantities of models whose trainable parameters all live in ``Linear``, ``Conv1d``
and ``Conv2d`` layers, a forward hook keeps each layer's input and a tensor hook on its output meets
the output gradient in the backward pass; :func:`~curvlab.backends.layers.sum_sq_grads` turns the
two into ``sum_n (grad_n W)^2`` at once. This costs less than BackPACK's ``SumGradSquared`` (no
module backward hooks, strided-view patches instead of ``unfold``) and gives identical numbers.
Like :class:`~curvlab.backends.backpack.BackpackBackend` it works on the chunk's NLL *sum*.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvlab.backends.backpack import sum_loss
from curvlab.backends.layers import sum_sq_grads, tappable_layers
from curvlab.backends.validation import validate_model
from curvlab.losses import LossSpec

__all__ = ["HooksBackend"]


@dataclass
class _HookSession:
    module: nn.Module
    loss: nn.Module
    spec: LossSpec
    params: dict[str, nn.Parameter]
    acc: dict[str, Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    on_output: Callable[[Tensor], None] | None = None

    def nll(self, output: Tensor, targets: Tensor) -> Tensor:
        if self.on_output is not None:
            self.on_output(output)
        return self.loss(output, targets)


class HooksBackend:
    """First-order primitives (``sum_grad_squared``) from curvlab's own layer hooks."""

    name = "hooks"

    def __init__(self, layers: dict[str, tuple[nn.Module, str, str | None]] | None = None) -> None:
        self._layers = layers

    @staticmethod
    def layers_of(model: nn.Module) -> dict[str, tuple[nn.Module, str, str | None]] | None:
        """The layers to hook if every trainable parameter is in a Linear/Conv layer, else None."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return tappable_layers(model, params) if params else None

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether every trainable parameter lives in a Linear/Conv1d/Conv2d layer."""
        return cls.layers_of(model) is not None

    def check(self, model: nn.Module, second_order: bool, hessian: bool = False) -> None:
        """Raise before any work if the model cannot be handled."""
        if second_order:
            raise ValueError("the hooks backend computes first-order quantities only")
        validate_model(model, second_order=False)
        if self._layers is None:
            self._layers = self.layers_of(model)
        if self._layers is None:
            raise TypeError(
                "backend='hooks' needs every trainable parameter in a Linear, Conv1d or Conv2d "
                "layer (groups=1, integer zero padding, each layer used once); use "
                "backend='backpack'"
            )

    @contextmanager
    def extended(
        self, model: nn.Module, spec: LossSpec, second_order: bool = False
    ) -> Iterator[_HookSession]:
        """Install the layer hooks for the duration of the block; remove them on exit."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        layers = self._layers if self._layers is not None else (self.layers_of(model) or {})
        session = _HookSession(module=model, loss=sum_loss(spec), spec=spec, params=params)
        modules = list(model.modules())
        inplace = {
            id(m): m.inplace for m in modules if isinstance(getattr(m, "inplace", None), bool)
        }
        handles = []

        def hook(name: str, wname: str, bname: str | None):  # noqa: ANN202
            def forward(module: nn.Module, args: tuple, output: Tensor) -> None:
                if not (isinstance(output, Tensor) and output.requires_grad):
                    return
                session.calls[name] = session.calls.get(name, 0) + 1
                if session.calls[name] > 1:
                    raise ValueError(
                        f"layer '{name}' is applied more than once per forward pass; per-example "
                        "gradients need each layer used once (use backend='backpack')"
                    )
                a = args[0].detach()

                def backward(g: Tensor) -> None:
                    sq_w, sq_b = sum_sq_grads(module, a, g.detach())
                    session.acc[wname] = sq_w
                    if bname is not None:
                        session.acc[bname] = sq_b

                output.register_hook(backward)

            return forward

        try:
            for m in modules:  # tensor hooks must see the layer output before in-place changes
                if id(m) in inplace:
                    m.inplace = False
            for name, (module, wname, bname) in layers.items():
                handles.append(module.register_forward_hook(hook(name, wname, bname)))
            yield session
        finally:
            for h in handles:
                h.remove()
            for m in modules:
                if id(m) in inplace:
                    m.inplace = inplace[id(m)]

    def sum_grad_squared(
        self,
        s: _HookSession,
        inputs: Tensor,
        targets: Tensor,
        mc_samples: int = 0,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """``sum_n (grad NLL_n)^2`` at the labels (or averaged over ``mc_samples`` draws).

        Returns:
            (per-parameter sums, the gradient of the NLL sum at the labels used, the output).
        """
        for p in s.params.values():
            p.grad = None
        s.calls.clear()
        output = s.module(inputs)
        if mc_samples == 0:
            s.acc.clear()
            s.nll(output, targets).backward()
            return _ordered(s), {n: p.grad for n, p in s.params.items()}, output
        total: dict[str, Tensor] = {}
        for i in range(mc_samples):
            s.acc.clear()
            sampled = s.spec.sample_targets(output, generator)
            grads = torch.autograd.grad(
                s.nll(output, sampled),
                list(s.params.values()),
                retain_graph=i < mc_samples - 1,
            )
            del grads
            for n, v in _ordered(s).items():
                total[n] = total[n] + v if n in total else v
        return {n: v / mc_samples for n, v in total.items()}, {}, output

    def sum_grad_squared_with_sampled(
        self, s: _HookSession, inputs: Tensor, targets: Tensor, generator: torch.Generator | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]:
        """One forward, two backward passes: squared gradients at the labels and at one draw.

        Returns:
            (sums at the labels, gradient at the labels, sums at sampled labels, output).
        """
        for p in s.params.values():
            p.grad = None
        s.calls.clear()
        output = s.module(inputs)
        s.acc.clear()
        s.nll(output, targets).backward(retain_graph=True)
        at_labels = _ordered(s)
        grads = {n: p.grad for n, p in s.params.items()}
        s.acc.clear()
        sampled = s.spec.sample_targets(output, generator)
        torch.autograd.grad(s.nll(output, sampled), list(s.params.values()))
        return at_labels, grads, _ordered(s), output


def _ordered(s: _HookSession) -> dict[str, Tensor]:
    """The hooks' results in ``named_parameters`` order (hooks fire in backward order)."""
    return {n: s.acc[n] for n in s.params if n in s.acc}
