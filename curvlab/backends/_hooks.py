"""The hooks backend: per-example gradients from curvlab's own layer hooks, the fast path.

A forward hook on every module that owns trainable parameters records the module's input and the
autograd edge of its output; the backward pass then runs only to those outputs (no weight
gradients), and the layer's rule (:mod:`curvlab.backends._rules`) turns input and output gradient
into per-example gradients, or straight into their squares. Covered: ``Linear``, ``Conv1d``/
``Conv2d``, HuggingFace ``Conv1D``, ``Embedding``, ``LayerNorm``, ``RMSNorm`` and eval-mode
``BatchNorm``, with any extra (sequence) dimensions. A parameter used several times (a weight tied
between an embedding and the output head, a layer applied twice) gets the sum of its uses'
per-example contributions before squaring, so the result stays exact: row ``i`` of every use is
example ``i``'s, which the first forward pass checks on the gradient
(:meth:`~curvlab.backends._hook_session._HookSession._check_rows_in_order`; a use on a reordered
view of the batch, a MoCo-style shuffle, hands over).

The first forward pass of a session checks the model: every trainable parameter must enter the
graph exactly as often as the hooks saw its modules run (not used outside its module, e.g.
``x @ self.lin.weight``), and no recorded input may change in place afterwards. Modules with
``inplace=True`` run out of place on tensors that require grad (a layer output that is a view
would lose its gradient edge if changed in place), and every forward pass checks on the graph that
nothing else reads such a module's input (:class:`~curvlab.backends._base.InplaceGuard`: a model
that relies on ``self.act(h)`` changing ``h`` is another function out of place). Otherwise the
backend hands over (:class:`~curvlab.backends.Handover`) and the engine uses another one.
Like the other backends it works on the chunk's NLL *sum*.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from curvlab._data import Inputs
from curvlab._layout import call_input
from curvlab._losses import LossSpec
from curvlab._notrace import first_forward_hooks
from curvlab._scan import ModelScan, scan_model
from curvlab.backends._base import Handover, InplaceGuard, ModelFacts, in_place_modules
from curvlab.backends._hook_session import Layer, _HookSession, _Tap, _tap_grad
from curvlab.backends._layers import add_examples, add_squares, draw_labels, with_zeros
from curvlab.backends._rules import PARAM_ATTRS, Rule, rule_for

__all__ = ["HooksBackend", "Layer"]


_SHARED_BLOCK_BYTES = 256 * 2**20
"""Per-example gradients of parameters used several times are built for blocks of examples of at
most this size together (at least one example): GPT-2's tied embedding and head take 154 MB per
example in float32, all four W5 sequences at once 618 MB plus as much for their squares."""


def _shared_blocks(
    taps: list[_Tap], outs: list[Tensor], params: dict[str, nn.Parameter], n: int
) -> list[tuple[int, int]]:
    """``[lo, hi)`` example blocks whose per-example gradients of the shared parameters fit
    :data:`_SHARED_BLOCK_BYTES`.

    An entry takes the bytes of the gradients' dtype: that of a tap's input and output gradient
    together (float32 for an autocast pass), or the parameter's if wider (8 for float64: blocks
    counted at 4 bytes were 512 MiB, found in review).
    """
    names = {p for t in taps for p in t.layer.names.values()}
    itemsize = max(
        (torch.promote_types(t.input.dtype, g.dtype).itemsize for t, g in zip(taps, outs)),
        default=4,
    )
    per_example = sum(
        params[p].numel() * max(itemsize, params[p].element_size()) for p in names if p in params
    )
    step = max(1, _SHARED_BLOCK_BYTES // max(per_example, 1))
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _spare_for(
    rule: Rule,
    names: dict[str, str],
    spare: dict[str, Tensor] | None,
    total: dict[str, Tensor],
    a: Tensor,
    g: Tensor,
) -> dict[str, Tensor] | None:
    """``{attr: spare tensor}`` for a first dense use that can be written into them, else None."""
    if not spare or rule.write_into is None or any(p in total for p in names.values()):
        return None
    bufs = {attr: spare.get(p) for attr, p in names.items()}
    n, dtype = a.shape[0], torch.result_type(a, g)
    for b in bufs.values():
        if b is None or b.shape[0] != n or b.dtype != dtype or not b.is_contiguous():
            return None
    return bufs  # type: ignore[return-value]  (no None left)


def _shares_memory(x: Tensor, y: Tensor) -> bool:
    return x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()


class HooksBackend:
    """First-order primitives (squared and per-example gradients) from curvlab's own hooks.

    ``.grad`` of the parameters is never touched.
    """

    name = "hooks"
    primitives = frozenset({"sum_grad_squared", "batch_grad", "output_grads"})
    needs_math_attention = False  # first derivatives by plain backward: any kernel
    shares_examples_check = True  # _HookSession.apart, in its first forward pass

    def __init__(self, layers: dict[str, Layer] | None = None) -> None:
        self._layers = layers

    @staticmethod
    def layers_of(model: nn.Module, scan: ModelScan | None = None) -> dict[str, Layer] | None:
        """The modules to hook if every trainable parameter is a weight/bias of a module with a
        rule (see :mod:`curvlab.backends._rules`), else ``None``."""
        scan = scan if scan is not None else scan_model(model)
        if not scan.trainable:
            return None
        by_id = {id(p): n for n, p in scan.trainable.items()}
        covered: set[str] = set()
        layers: dict[str, Layer] = {}
        for mname, module in scan.modules:
            if not module._parameters:  # e.g. activations, containers
                continue
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
        handles = []

        def hook(name: str, layer: Layer):  # noqa: ANN202
            def forward(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
                if session.dims is not None:  # a probe forward: only the leading sizes
                    if isinstance(output, Tensor):
                        session.dims.append(int(output.shape[0]) if output.ndim else -1)
                    return
                if session.grad_pass and not torch.is_grad_enabled():
                    # a call without autograd inside the batch pass: its parameters get no
                    # gradient the hooks can see (found in review: HF's reentrant gradient
                    # checkpointing was refused as "runs different layers on 2 examples")
                    raise Handover(
                        f"module '{name}' ran without autograd inside the model's forward, "
                        "so the hooks cannot read its gradients. Under torch.utils.checkpoint "
                        "with use_reentrant=True (as HF's gradient_checkpointing_enable() may "
                        "set), the other backends and the operators refuse it too (their "
                        "torch.autograd.grad gets no gradient for the checkpointed layers): "
                        "checkpoint with use_reentrant=False (gradient_checkpointing_kwargs="
                        "{'use_reentrant': False}) for the call. Under torch.no_grad() in the "
                        "forward, backend='func' computes the model (that module's parameters "
                        "get no gradient there, as in torch's own backward pass)"
                    )
                if not (isinstance(output, Tensor) and output.requires_grad):
                    return
                x = call_input(module, args, kwargs)  # layer(x) or layer(input=x)
                if not isinstance(x, Tensor):
                    raise Handover(f"module '{name}' was called without its input tensor")
                a = x.detach()
                edge = get_gradient_edge(output)
                session.taps.append(_Tap(name, layer, a, a._version, output, edge))

            return forward

        # in-place modules run out of place on the graph (a recorded output that is a view would
        # lose its edge), checked to compute the same function (InplaceGuard)
        with InplaceGuard(in_place_modules(scan.modules)).installed(model):
            try:
                # first of the forward hooks: the layer's own output, a forward hook of the
                # user's that changes it is downstream of the layer (found in review s19: read at
                # the hooked output, the Fisher diagonals were 0.25x for 2 * out + 0.1)
                handles += first_forward_hooks(
                    {layer.module: hook(name, layer) for name, layer in layers.items()},
                    with_kwargs=True,
                )
                yield session
            finally:
                for h in handles:
                    h.remove()
                session.taps.clear()

    def output_grads(
        self,
        s: _HookSession,
        output: Tensor,
        label_sets: list[Tensor],
        retain_graph: bool = False,
        drawn: bool = False,
    ) -> tuple[list[_Tap], list[list[Tensor]]]:
        """The recorded calls and, per label set, the NLL-sum gradient at each call's output.

        ``output`` comes from :meth:`_HookSession.forward`. The backward passes stop at the module
        outputs (no weight gradients); a call whose output does not reach the loss gets zeros.
        The graph is kept after the last label set only if ``retain_graph``. ``drawn``: the label
        sets were drawn from the model (:meth:`curvlab._losses.LossSpec.sample_targets`).

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
                s.nll(output, labels, drawn),
                edges,
                retain_graph=retain_graph or k < len(label_sets) - 1,
                allow_unused=True,
            )
            grads.append([_tap_grad(t, g) for g, t in zip(gs, taps)])
        return taps, grads

    @staticmethod
    def per_example(
        taps: list[_Tap],
        outs: list[Tensor],
        lo: int = 0,
        hi: int | None = None,
        spare: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Per-example gradients ``(n, *shape)`` per parameter, every use summed.

        ``lo``/``hi``: only the examples ``lo:hi`` (``hi=None``: to the end). Dense uses come
        first; a sparse use (an embedding tied to the output head) adds into their tensor in
        place (:attr:`~curvlab.backends._rules.Rule.add_into`). ``spare``: tensors the caller
        no longer needs (a previous block's), overwritten with a parameter's first dense use
        where its rule can write into them and they have the block's shape and dtype.
        """
        total: dict[str, Tensor] = {}
        whole = lo == 0 and hi is None
        order = sorted(range(len(taps)), key=lambda i: taps[i].layer.rule.add_into is not None)
        for i in order:
            t, g = taps[i], outs[i]
            a = t.input if whole else t.input[lo:hi]
            g = g if whole else g[lo:hi]
            rule, names = t.layer.rule, t.layer.names
            if rule.add_into is not None and all(p in total for p in names.values()):
                rule.add_into(t.module, a, g, {attr: total[p] for attr, p in names.items()})
                continue
            bufs = _spare_for(rule, names, spare, total, a, g)
            if bufs is None:
                made = rule.per_example(t.module, a, g)
            else:
                made = rule.write_into(t.module, a, g, bufs)
            for attr, value in made.items():
                pname = names.get(attr)
                if pname is not None:
                    total[pname] = total[pname].add_(value) if pname in total else value
        return total

    def _squares(
        self,
        s: _HookSession,
        output: Tensor,
        labels: Tensor,
        with_grad: bool,
        retain: bool = False,
        drawn: bool = False,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Squared-gradient sums (and gradients) by name for one label set."""
        taps, (outs,) = self.output_grads(s, output, [labels], retain_graph=retain, drawn=drawn)
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
        if shared_taps:  # parameters used several times: sum the uses, then square
            n = shared_taps[0].input.shape[0]
            spare: dict[str, Tensor] = {}
            for lo, hi in _shared_blocks(shared_taps, shared_outs, s.params, n):
                values = self.per_example(shared_taps, shared_outs, lo, hi, spare)
                for pname, value in values.items():
                    if with_grad:
                        grad[pname] = add_examples(grad.get(pname), value)
                    sq[pname] = add_squares(sq.get(pname), value)
                    if not _shares_memory(sq[pname], value):  # consumed: the next block's
                        spare[pname] = value
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
        # example-major draws: each example's labels do not depend on the chunk boundaries
        draws = draw_labels(s.spec, output, generator, targets, mc_samples)
        for i, sampled in enumerate(draws):
            sq, _ = self._squares(s, output, sampled, False, retain=i < mc_samples - 1, drawn=True)
            for n, v in sq.items():  # the draws' sums are fresh tensors: added in place
                total[n] = total[n].add_(v) if n in total else v
        if mc_samples > 1:  # one draw: no division, no copy (GPT-2 small: 0.17 s, 0.5 GB)
            for v in total.values():
                v.div_(mc_samples)
        return total, {}, output

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
        at_sampled, _ = self._squares(s, output, sampled, False, drawn=True)
        return at_labels, grads, at_sampled, output

    def batch_grad(
        self,
        s: _HookSession,
        inputs: Inputs,
        targets: Tensor,
        sampled: bool = False,
        generator: torch.Generator | None = None,
        drawn: bool = False,
    ) -> dict[str, Tensor]:
        """Per-example gradients ``grad NLL_n`` (labels or one model sample), each ``(n, *shape)``.

        ``drawn``: ``targets`` were themselves drawn from the model (``sample_targets``).
        """
        output = s.forward(inputs, targets)
        labels = s.spec.sample_targets(output, generator, targets) if sampled else targets
        taps, (outs,) = self.output_grads(s, output, [labels], drawn=sampled or drawn)
        per = self.per_example(taps, outs)
        n = output.shape[0]
        return {k: per[k] if k in per else p.new_zeros(n, *p.shape) for k, p in s.params.items()}
