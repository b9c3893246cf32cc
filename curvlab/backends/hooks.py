"""The hooks backend: per-example squared gradients of Linear/Conv layers from curvlab's own hooks.

For first-order quantities of models whose trainable parameters all live in ``Linear``, ``Conv1d``
and ``Conv2d`` layers, a forward hook records each layer's input and output; the backward pass then
runs only to those outputs, and :func:`~curvlab.backends.layers.sum_sq_grads` turns each layer's
input and output gradient into ``sum_n (grad_n W)^2`` (and the gradient itself) at once. This costs
less than BackPACK's ``SumGradSquared``: no module backward hooks, no weight-gradient products that
are thrown away, strided-view patches instead of ``unfold``; the numbers are identical.
Like :class:`~curvlab.backends.backpack.BackpackBackend` it works on the chunk's NLL *sum*.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from curvlab.backends.base import Handover, ModelFacts, parameter_uses
from curvlab.backends.layers import sum_sq_grads, tappable_layers, with_zeros
from curvlab.backends.validation import check_batchnorm
from curvlab.data import Inputs, call_model
from curvlab.losses import LossSpec
from curvlab.scan import ModelScan, scan_model

__all__ = ["HooksBackend"]


@dataclass
class _Tap:
    """One hooked layer in one forward pass.

    ``edge`` is the autograd node that produced the output: the gradient flowing into it is the
    one at the layer's own output, even if the model's ``forward`` later changes that tensor in
    place (``h += x``), which would re-point ``output`` to a new node.
    """

    name: str
    module: nn.Module
    wname: str
    bname: str | None
    input: Tensor  # detached: shares storage and version counter with the layer input
    input_version: int
    output: Tensor
    edge: GradientEdge


@dataclass
class _HookSession:
    module: nn.Module
    spec: LossSpec
    params: dict[str, nn.Parameter]
    taps: list[_Tap] = field(default_factory=list)  # per forward pass, in the order applied
    on_output: Callable[[Tensor, Tensor], None] | None = None
    probe: bool = True  # check the first forward pass of the session (see forward)

    def nll(self, output: Tensor, targets: Tensor) -> Tensor:
        return self.spec.nll_sum(output, targets)

    def forward(self, inputs: Inputs, targets: Tensor) -> Tensor:
        """The model's (prepared) output, with every hooked layer's input and output recorded.

        The first forward pass of a session also checks that every trainable parameter enters
        the graph exactly through its own layer, once (not tied, not used outside the layer, the
        layer not applied twice); otherwise it hands over (:class:`~curvlab.backends.base.Handover`).
        """
        self.taps.clear()
        output = self.spec.prepare(call_model(self.module, inputs), targets)
        if self.probe:
            self.probe = False
            fired = set()
            for t in self.taps:
                fired.update(n for n in (t.wname, t.bname) if n is not None)
            for name, uses in parameter_uses(output, self.params).items():
                if uses != (1 if name in fired else 0):
                    raise Handover(
                        f"parameter '{name}' enters the loss {uses} times but its layer "
                        f"{'ran' if name in fired else 'did not run'}: it is used outside its "
                        "layer (tied or shared), so the hooks backend cannot compute its "
                        "per-example gradients"
                    )
        if self.on_output is not None:
            self.on_output(output, targets)
        return output


class HooksBackend:
    """First-order primitives (``sum_grad_squared``) from curvlab's own layer hooks.

    The backward pass runs only down to the hooked layers' outputs (``torch.autograd.grad`` with
    the outputs' gradient edges as inputs), so autograd computes no weight gradients: the squared
    per-example gradients, and the gradient itself when it is wanted, come from the saved layer
    input ``a`` and the output gradient ``g`` (:func:`~curvlab.backends.layers.sum_sq_grads`).
    ``.grad`` of the parameters is never touched.
    """

    name = "hooks"
    primitives = frozenset({"sum_grad_squared", "output_grads"})

    def __init__(self, layers: dict[str, tuple[nn.Module, str, str | None]] | None = None) -> None:
        self._layers = layers

    @staticmethod
    def layers_of(
        model: nn.Module, scan: ModelScan | None = None
    ) -> dict[str, tuple[nn.Module, str, str | None]] | None:
        """The layers to hook if every trainable parameter is in a Linear/Conv layer, else None."""
        scan = scan if scan is not None else scan_model(model)
        if not scan.trainable:
            return None
        return tappable_layers(model, scan.trainable, scan.modules)

    def refuses(self, facts: ModelFacts, needs: frozenset[str], auto: bool) -> str | None:
        """Why the hooks cannot compute this model (``None``: they can try)."""
        missing = needs - self.primitives
        if missing:
            return f"the hooks backend computes first-order quantities only (not {sorted(missing)})"
        if self._layers is None:
            self._layers = self.layers_of(facts.scan.model, facts.scan)
        if self._layers is None:
            return (
                "the hooks backend needs every trainable parameter in its own Linear, Conv1d or "
                "Conv2d layer (groups=1, integer zero padding, not tied to another module)"
            )
        return None

    def check(self, model: nn.Module, scan: ModelScan) -> None:
        """Raise before any work for what no backend can do (BatchNorm in train mode)."""
        check_batchnorm(scan)

    @contextmanager
    def extended(
        self,
        model: nn.Module,
        spec: LossSpec,
        second_order: bool = False,
        scan: ModelScan | None = None,
    ) -> Iterator[_HookSession]:
        """Install the layer hooks for the duration of the block; remove them on exit."""
        scan = scan if scan is not None else scan_model(model)
        layers = self._layers if self._layers is not None else (self.layers_of(model, scan) or {})
        session = _HookSession(module=model, spec=spec, params=scan.trainable)
        inplace = [m for _, m in scan.modules if m.__dict__.get("inplace") is True]
        handles = []

        def hook(name: str, wname: str, bname: str | None):  # noqa: ANN202
            def forward(module: nn.Module, args: tuple, output: Tensor) -> None:
                if not (isinstance(output, Tensor) and output.requires_grad):
                    return
                if any(t.module is module for t in session.taps):
                    raise Handover(
                        f"layer '{name}' is applied more than once per forward pass; the hooks "
                        "backend needs each layer used once"
                    )
                a = args[0].detach()
                edge = get_gradient_edge(output)
                session.taps.append(_Tap(name, module, wname, bname, a, a._version, output, edge))

            return forward

        try:
            for m in inplace:  # the recorded layer outputs must not be overwritten in place
                m.inplace = False
            for name, (module, wname, bname) in layers.items():
                handles.append(module.register_forward_hook(hook(name, wname, bname)))
            yield session
        finally:
            for h in handles:
                h.remove()
            for m in inplace:
                m.inplace = True
            session.taps.clear()

    def output_grads(
        self,
        s: _HookSession,
        output: Tensor,
        label_sets: list[Tensor],
        retain_graph: bool = False,
    ) -> tuple[list[_Tap], list[list[Tensor]]]:
        """The recorded layers and, per label set, the NLL-sum gradient at each layer's output.

        ``output`` comes from :meth:`_HookSession.forward`. The backward passes stop at the layer
        outputs (no weight gradients); a layer whose output does not reach the loss gets zeros.
        The graph is kept after the last label set only if ``retain_graph``.

        Returns:
            (the taps, for each label set the list of output gradients in the taps' order).

        Raises:
            ValueError: if a layer's input was modified in place after the layer used it.
        """
        taps = list(s.taps)
        if not taps:  # no hooked layer took part in this forward pass
            return taps, [[] for _ in label_sets]
        for t in taps:
            if t.input._version != t.input_version:
                raise Handover(
                    f"the input of layer '{t.name}' was modified in place after the layer used it "
                    "(e.g. x += ... in the model's forward); the hooks backend needs the input as "
                    "the layer saw it"
                )
        edges = [t.edge for t in taps]
        grads = []
        for k, labels in enumerate(label_sets):
            gs = torch.autograd.grad(
                s.nll(output, labels),
                edges,
                retain_graph=retain_graph or k < len(label_sets) - 1,
                allow_unused=True,
            )
            grads.append([torch.zeros_like(t.output) if g is None else g for g, t in zip(gs, taps)])
        return taps, grads

    def _squares(
        self, s: _HookSession, output: Tensor, labels: Tensor, with_grad: bool, retain: bool = False
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Squared-gradient sums (and gradients) by name for one label set."""
        taps, (outs,) = self.output_grads(s, output, [labels], retain_graph=retain)
        sq: dict[str, Tensor] = {}
        grad: dict[str, Tensor] = {}
        for t, g in zip(taps, outs):
            parts = sum_sq_grads(t.module, t.input, g, with_grad=with_grad)
            sq[t.wname] = parts[0]
            if t.bname is not None:
                sq[t.bname] = parts[1]
            if with_grad:
                grad[t.wname] = parts[2]
                if t.bname is not None:
                    grad[t.bname] = parts[3]
        return with_zeros(sq, s.params), with_zeros(grad, s.params) if with_grad else {}

    def sum_grad_squared(
        self,
        s: _HookSession,
        inputs: Tensor,
        targets: Tensor,
        mc_samples: int = 0,
        generator: torch.Generator | None = None,
        with_grad: bool = True,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """``sum_n (grad NLL_n)^2`` at the labels (or averaged over ``mc_samples`` draws).

        Returns:
            (per-parameter sums, the gradient of the NLL sum at the labels used, the output);
            the gradient is ``{}`` for Monte-Carlo labels or when ``with_grad`` is false.
        """
        output = s.forward(inputs, targets)
        if mc_samples == 0:
            return (*self._squares(s, output, targets, with_grad), output)
        total: dict[str, Tensor] = {}
        for i in range(mc_samples):
            sampled = s.spec.sample_targets(output, generator, targets)
            sq, _ = self._squares(s, output, sampled, False, retain=i < mc_samples - 1)
            for n, v in sq.items():
                total[n] = total[n] + v if n in total else v
        return {n: v / mc_samples for n, v in total.items()}, {}, output

    def sum_grad_squared_with_sampled(
        self, s: _HookSession, inputs: Tensor, targets: Tensor, generator: torch.Generator | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]:
        """One forward, two backward passes: squared gradients at the labels and at one draw.

        Returns:
            (sums at the labels, gradient at the labels, sums at sampled labels, output).
        """
        output = s.forward(inputs, targets)
        at_labels, grads = self._squares(s, output, targets, True, retain=True)
        sampled = s.spec.sample_targets(output, generator, targets)
        at_sampled, _ = self._squares(s, output, sampled, False)
        return at_labels, grads, at_sampled, output
