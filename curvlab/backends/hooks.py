"""The hooks backend: per-example gradients from curvlab's own layer hooks, the fast path.

A forward hook on every module that owns trainable parameters records the module's input and the
autograd edge of its output; the backward pass then runs only to those outputs (no weight
gradients), and the layer's rule (:mod:`curvlab.backends.rules`) turns input and output gradient
into per-example gradients, or straight into their squares. Covered: ``Linear``, ``Conv1d``/
``Conv2d``, HuggingFace ``Conv1D``, ``Embedding``, ``LayerNorm``, ``RMSNorm`` and eval-mode
``BatchNorm``, with any extra (sequence) dimensions. A parameter used several times (a weight tied
between an embedding and the output head, a layer applied twice) gets the sum of its uses'
per-example contributions before squaring, so the result stays exact.

The first forward pass of a session checks the model: every trainable parameter must enter the
graph exactly as often as the hooks saw its modules run (not used outside its module, e.g.
``x @ self.lin.weight``), and no recorded input may change in place afterwards. Otherwise the
backend hands over (:class:`~curvlab.backends.base.Handover`) and the engine uses another one.
Like the other backends it works on the chunk's NLL *sum*.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from curvlab.backends.base import Handover, ModelFacts, parameter_uses
from curvlab.backends.layers import with_zeros
from curvlab.backends.rules import PARAM_ATTRS, Rule, rule_for
from curvlab.backends.validation import check_batchnorm
from curvlab.data import Inputs, call_model, num_examples, slice_inputs
from curvlab.losses import LossSpec
from curvlab.scan import ModelScan, scan_model

__all__ = ["HooksBackend", "Layer"]


@dataclass(frozen=True)
class Layer:
    """A hooked module: its rule and which parameter name each of its attributes holds."""

    module: nn.Module
    rule: Rule
    names: dict[str, str]  # attribute ("weight", "bias") -> parameter name


@dataclass
class _Tap:
    """One hooked module in one call of a forward pass.

    ``edge`` is the autograd node that produced the output: the gradient flowing into it is the
    one at the module's own output, even if the model's ``forward`` later changes that tensor in
    place (``h += x``), which would re-point ``output`` to a new node.
    """

    name: str
    layer: Layer
    input: Tensor  # detached: shares storage and version counter with the module input
    input_version: int
    output: Tensor
    edge: GradientEdge
    source: Tensor | None = None  # a broadcast module's own input (``input`` is its expansion)
    sign: float = 1.0  # the consumer's factor on a broadcast module's output
    grad_shape: tuple[int, ...] | None = None  # of the gradient at ``edge``, if not output's

    def check_input(self) -> None:
        """Hand over if the module's input changed in place after the module used it."""
        a = self.input if self.source is None else self.source
        if a._version != self.input_version:
            raise Handover(
                f"the input of module '{self.name}' was modified in place after the module used "
                "it (e.g. x += ... in the model's forward); the hooks need the input as the "
                "module saw it"
            )

    @property
    def module(self) -> nn.Module:
        return self.layer.module


@dataclass
class _HookSession:
    module: nn.Module
    spec: LossSpec
    params: dict[str, nn.Parameter]
    taps: list[_Tap] = field(default_factory=list)  # per forward pass, in the order applied
    on_output: Callable[[Tensor, Tensor], None] | None = None
    probe: bool = True  # check the first forward pass of the session (see forward)
    examples: int = 0  # of the forward pass running
    sequential: bool = False  # a plain nn.Sequential chain: every module is batch-major
    layout: list[bool] | None = None  # per recorded call: batch-major (True) or broadcast
    dims: list[int] | None = None  # leading output dims, recorded during a probe forward

    def nll(self, output: Tensor, targets: Tensor) -> Tensor:
        return self.spec.nll_sum(output, targets)

    def uses(self, reached: set[int] | None = None) -> dict[str, int]:
        """How many recorded calls each parameter took part in (this forward pass).

        With ``reached`` (the ids of the loss's autograd nodes) only the calls whose output
        reaches the loss count.
        """
        count = dict.fromkeys(self.params, 0)
        for t in self.taps:
            if reached is not None and id(t.edge.node) not in reached:
                continue  # e.g. an auxiliary output the loss does not use
            for pname in t.layer.names.values():
                count[pname] += 1
        return count

    def forward(self, inputs: Inputs, targets: Tensor) -> Tensor:
        """The model's (prepared) output, with every hooked module's input and output recorded.

        The first forward pass of a session also checks that every trainable parameter enters
        the graph exactly once per recorded call of its modules; otherwise it hands over.
        """
        self.taps.clear()
        self.examples = num_examples(inputs)
        output = self.spec.prepare(call_model(self.module, inputs), targets)
        if not torch.is_grad_enabled():  # nothing recorded: a forward for the output alone
            if self.on_output is not None:
                self.on_output(output, targets)
            return output
        if self.layout is None:
            self.layout = self._classify(inputs)
        elif len(self.layout) != len(self.taps):
            raise Handover("the model ran a different set of layers than on the first chunk")
        if not all(self.layout):
            _rebind_broadcast(
                [t for t, batch_major in zip(self.taps, self.layout) if not batch_major],
                output,
                self.examples,
            )
        if self.probe:
            self.probe = False
            reached: set[int] = set()
            counts = parameter_uses(output, self.params, reached)
            seen = self.uses(reached)  # calls whose output reaches the loss
            for name, uses in counts.items():
                if uses != seen[name]:
                    raise Handover(
                        f"parameter '{name}' enters the loss {uses} times but the outputs of its "
                        f"modules reach the loss {seen[name]} times: it is used outside its "
                        "module (e.g. x @ layer.weight), so the hooks cannot see all of its "
                        "gradient"
                    )
        if self.on_output is not None:
            self.on_output(output, targets)
        return output

    def _classify(self, inputs: Inputs) -> list[bool]:
        """Which recorded calls keep the examples in their first dimension (else: broadcast).

        A module run on something other than the batch (a position embedding on ``arange(T)``,
        broadcast over the examples later) is told apart by its leading output size, which does
        not follow the number of examples: a second forward pass on one example (not needed for
        a plain ``nn.Sequential`` chain) compares them.
        """
        n = self.examples
        full = [int(t.output.shape[0]) if t.output.ndim else -1 for t in self.taps]
        if self.sequential or n == 1:
            return [d == n for d in full]
        self.dims = []
        try:
            with torch.no_grad():
                call_model(self.module, slice_inputs(inputs, 0, 1))
            small = self.dims
        finally:
            self.dims = None
        if len(small) != len(full):
            raise Handover("the model runs different layers on one example than on the batch")
        layout = []
        for t, d_full, d_one in zip(self.taps, full, small):
            if d_full == n and d_one == 1:
                layout.append(True)
            elif d_full == d_one:
                layout.append(False)
            else:
                raise Handover(
                    f"module '{t.name}' has leading output size {d_full} for {n} examples and "
                    f"{d_one} for one: it does not hold the examples in its first dimension"
                )
        return layout


_CONSUMERS = {"AddBackward0": (1.0, 1.0), "SubBackward0": (1.0, -1.0)}
"""Nodes through which a broadcast output may reach the batch: sign of their first/second input."""


def _rebind_broadcast(taps: list[_Tap], output: Tensor, n: int) -> None:
    """Point each broadcast module's tap at the batch-major sum its output is added into.

    A module whose output ``o`` (shape ``rest`` or ``(1, *rest)``) is broadcast over the examples
    by one addition ``x + o`` (``x`` of shape ``(n, *rest)``) gets, at the sum's gradient edge,
    the per-example gradients of ``o``; its input is expanded over the examples to match. Any
    other use of ``o`` hands over.
    """
    wanted = {(id(t.edge.node), t.edge.output_nr): t for t in taps}
    found: dict[tuple[int, int], list[tuple[Any, int]]] = {k: [] for k in wanted}
    root = output.grad_fn
    stack, seen = ([root], {id(root)}) if root is not None else ([], set())
    while stack:
        node = stack.pop()
        for i, (nxt, nr) in enumerate(node.next_functions):
            if nxt is None:
                continue
            key = (id(nxt), nr)
            if key in found:
                found[key].append((node, i))
            if id(nxt) not in seen and not hasattr(nxt, "variable"):
                seen.add(id(nxt))
                stack.append(nxt)
    for key, t in wanted.items():
        uses = found[key]
        kind = type(uses[0][0]).__name__ if len(uses) == 1 else None
        o, a = t.output, t.input
        if kind not in _CONSUMERS or o.ndim == 0 or a.ndim == 0:
            raise Handover(
                f"module '{t.name}' runs on something other than the batch (output "
                f"{tuple(o.shape)} for {n} examples) and its output is not simply added to a "
                "batch-major tensor, so the hooks cannot separate its per-example gradients"
            )
        node, index = uses[0]
        sign = _CONSUMERS[kind][index] if index < 2 else 0.0
        if index == 1:
            sign *= float(getattr(node, "_saved_alpha", 1.0))
        if o.shape[0] == 1 and a.shape[0] == 1:  # (1, *rest): broadcast along its first axis
            expanded = a.expand(n, *a.shape[1:])
            grad_shape = (n, *o.shape[1:])
        else:  # rest: a new leading axis
            expanded = a.unsqueeze(0).expand(n, *a.shape)
            grad_shape = (n, *o.shape)
        t.source, t.input = a, expanded
        t.edge = GradientEdge(node, 0)
        t.sign, t.grad_shape = sign, grad_shape


def _tap_grad(t: _Tap, g: Tensor | None) -> Tensor:
    """The gradient at a tap's module output: zeros if unused; a broadcast tap's checked."""
    if t.grad_shape is None:
        return torch.zeros_like(t.output) if g is None else g
    if g is None:
        return t.output.new_zeros(t.grad_shape)
    if tuple(g.shape) != t.grad_shape:
        raise Handover(
            f"the output of module '{t.name}' is broadcast to {tuple(g.shape)}, not over the "
            f"examples alone ({t.grad_shape})"
        )
    return g if t.sign == 1.0 else g * t.sign


class HooksBackend:
    """First-order primitives (squared and per-example gradients) from curvlab's own hooks.

    ``.grad`` of the parameters is never touched.
    """

    name = "hooks"
    primitives = frozenset({"sum_grad_squared", "batch_grad", "output_grads"})

    def __init__(self, layers: dict[str, Layer] | None = None) -> None:
        self._layers = layers

    @staticmethod
    def layers_of(model: nn.Module, scan: ModelScan | None = None) -> dict[str, Layer] | None:
        """The modules to hook if every trainable parameter is a weight/bias of a module with a
        rule (see :mod:`curvlab.backends.rules`), else ``None``."""
        scan = scan if scan is not None else scan_model(model)
        if not scan.trainable:
            return None
        by_id = {id(p): n for n, p in scan.trainable.items()}
        covered: set[str] = set()
        layers: dict[str, Layer] = {}
        for mname, module in scan.modules:
            own = {a: p for a, p in module._parameters.items() if p is not None and p.requires_grad}
            if not own:
                continue
            rule = rule_for(module)
            if rule is None or any(a not in PARAM_ATTRS for a in own):
                return None
            names = {a: by_id[id(p)] for a, p in own.items()}
            covered.update(names.values())
            layers[mname] = Layer(module, rule, names)
        return layers if covered == set(scan.trainable) else None

    def refuses(self, facts: ModelFacts, needs: frozenset[str], auto: bool) -> str | None:
        """Why the hooks cannot compute this model (``None``: they can try)."""
        missing = needs - self.primitives
        if missing:
            return f"the hooks backend computes first-order quantities only (not {sorted(missing)})"
        if self._layers is None:
            self._layers = self.layers_of(facts.scan.model, facts.scan)
        if self._layers is None:
            return (
                "the hooks backend needs every trainable parameter to be the weight or bias of a "
                "Linear, Conv1d/Conv2d (groups=1, zero padding), Embedding, LayerNorm, RMSNorm "
                "or eval-mode BatchNorm module"
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
        """Install the module hooks for the duration of the block; remove them on exit."""
        scan = scan if scan is not None else scan_model(model)
        layers = self._layers if self._layers is not None else (self.layers_of(model, scan) or {})
        session = _HookSession(
            module=model, spec=spec, params=scan.trainable, sequential=scan.sequential
        )
        inplace = [m for _, m in scan.modules if m.__dict__.get("inplace") is True]
        handles = []

        def hook(name: str, layer: Layer):  # noqa: ANN202
            def forward(module: nn.Module, args: tuple, output: Tensor) -> None:
                if session.dims is not None:  # a probe forward: only the leading sizes
                    if isinstance(output, Tensor):
                        session.dims.append(int(output.shape[0]) if output.ndim else -1)
                    return
                if not (isinstance(output, Tensor) and output.requires_grad):
                    return
                if not args or not isinstance(args[0], Tensor):
                    raise Handover(f"module '{name}' was called without a positional input")
                a = args[0].detach()
                edge = get_gradient_edge(output)
                session.taps.append(_Tap(name, layer, a, a._version, output, edge))

            return forward

        try:
            for m in inplace:  # the recorded outputs must not be overwritten in place
                m.inplace = False
            for name, layer in layers.items():
                handles.append(layer.module.register_forward_hook(hook(name, layer)))
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
        """The recorded calls and, per label set, the NLL-sum gradient at each call's output.

        ``output`` comes from :meth:`_HookSession.forward`. The backward passes stop at the module
        outputs (no weight gradients); a call whose output does not reach the loss gets zeros.
        The graph is kept after the last label set only if ``retain_graph``.

        Raises:
            Handover: if a module's input was modified in place after the module used it.
        """
        taps = list(s.taps)
        if not taps:  # no hooked module took part in this forward pass
            return taps, [[] for _ in label_sets]
        for t in taps:
            t.check_input()
        edges = [t.edge for t in taps]
        grads = []
        for k, labels in enumerate(label_sets):
            gs = torch.autograd.grad(
                s.nll(output, labels),
                edges,
                retain_graph=retain_graph or k < len(label_sets) - 1,
                allow_unused=True,
            )
            grads.append([_tap_grad(t, g) for g, t in zip(gs, taps)])
        return taps, grads

    @staticmethod
    def per_example(taps: list[_Tap], outs: list[Tensor]) -> dict[str, Tensor]:
        """Per-example gradients ``(n, *shape)`` per parameter, every use summed."""
        total: dict[str, Tensor] = {}
        for t, g in zip(taps, outs):
            for attr, value in t.layer.rule.per_example(t.module, t.input, g).items():
                pname = t.layer.names.get(attr)
                if pname is not None:
                    total[pname] = total[pname].add_(value) if pname in total else value
        return total

    def _squares(
        self, s: _HookSession, output: Tensor, labels: Tensor, with_grad: bool, retain: bool = False
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Squared-gradient sums (and gradients) by name for one label set."""
        taps, (outs,) = self.output_grads(s, output, [labels], retain_graph=retain)
        uses = s.uses()
        sq: dict[str, Tensor] = {}
        grad: dict[str, Tensor] = {}
        shared_taps, shared_outs = [], []
        for t, g in zip(taps, outs):
            single = all(uses[p] == 1 for p in t.layer.names.values())
            if single and t.layer.rule.squares is not None:
                tsq, tgrad = t.layer.rule.squares(t.module, t.input, g, with_grad)
                for attr, pname in t.layer.names.items():
                    sq[pname] = tsq[attr]
                    if with_grad:
                        grad[pname] = tgrad[attr]
            else:
                shared_taps.append(t)
                shared_outs.append(g)
        for pname, value in self.per_example(shared_taps, shared_outs).items():
            sq[pname] = value.square().sum(0)
            if with_grad:
                grad[pname] = value.sum(0)
        return with_zeros(sq, s.params), with_zeros(grad, s.params) if with_grad else {}

    def sum_grad_squared(
        self,
        s: _HookSession,
        inputs: Inputs,
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
        self, s: _HookSession, inputs: Inputs, targets: Tensor, generator: torch.Generator | None
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

    def batch_grad(
        self,
        s: _HookSession,
        inputs: Inputs,
        targets: Tensor,
        sampled: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-example gradients ``grad NLL_n`` (labels or one model sample), each ``(n, *shape)``."""
        output = s.forward(inputs, targets)
        labels = s.spec.sample_targets(output, generator, targets) if sampled else targets
        taps, (outs,) = self.output_grads(s, output, [labels])
        per = self.per_example(taps, outs)
        n = output.shape[0]
        return {k: per[k] if k in per else p.new_zeros(n, *p.shape) for k, p in s.params.items()}
