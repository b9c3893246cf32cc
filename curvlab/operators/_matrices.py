"""The five curvature matrices, one class each, and the ``curvature_operator`` factory.

Each class names its matrix, builds the reusable autograd graph of one batch (a typed graph) and
applies the raw product of that batch's NLL sum; :class:`~curvlab.operators.CurvatureOperator`
does the rest (layout, batches, versions, batching, scaling, the all-reduce under
``torch.distributed``). A new matrix is one such class with ``@register_matrix``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp

try:  # the weight-normalisation forms torch differentiates twice wrongly (see _TwiceDifferentiable)
    from torch.nn.utils.parametrizations import _WeightNorm as _ParamWeightNorm
except ImportError:  # pragma: no cover - older torch: no such parametrization
    _ParamWeightNorm = ()  # type: ignore[assignment,misc]
try:
    from torch.nn.utils.weight_norm import WeightNorm as _OldWeightNorm
except ImportError:  # pragma: no cover - removed in some future torch
    _OldWeightNorm = ()  # type: ignore[assignment,misc]

from curvlab._data import call_model
from curvlab._graph import custom_functions, has_delayed_error, once_differentiable_functions
from curvlab._notrace import first_forward_hooks, leave_no_trace, on_buffers
from curvlab._precision import upcast
from curvlab._rng import seed_global
from curvlab._selection import Params
from curvlab._stateless import functional_call
from curvlab._text import few
from curvlab._vocabulary import matrix_name
from curvlab.distributed import collective
from curvlab.operators._base import MATRIX_CLASSES, CurvatureOperator, register_matrix
from curvlab.operators._state import ModelStateError

__all__ = [
    "HessianOperator",
    "ResidualOperator",
    "GGNOperator",
    "FisherOperator",
    "EmpiricalFisherOperator",
    "curvature_operator",
    "MATRICES",
]


@dataclass
class GradGraph:
    """The gradient of one batch's NLL sum with its graph (``create_graph=True``); for a model
    with 16-bit parameters of ``s`` times the sum, ``up = 1 / s`` (a power of two)."""

    grads: tuple[Tensor, ...]
    up: Tensor | None = None


@dataclass
class JacobianGraph:
    """``J^T u`` of one batch with its graph (the double-backward trick gives ``J v``), and for
    the Fisher matrices the per-output gradient ``s = dNLL / d output`` at the batch's labels.
    ``inputs`` serve forward-mode products ``J v`` where the trick cannot run."""

    output: Tensor
    u: Tensor
    jtu: tuple[Tensor, ...]
    targets: Tensor
    inputs: Any = None
    s: Tensor | None = None


@dataclass
class SplitGraph:
    """A Hessian graph of a model with 16-bit parameters: ``H = G + R`` as a Gauss-Newton
    (``jac``) and a residual (``residual``) part, each scaled on its own."""

    jac: JacobianGraph
    residual: GradGraph


# "derivative for aten::hardsigmoid_backward is not implemented" (an op without a formula) and
# "the derivative for '_embedding_bag_backward' is not implemented." (a formula that raises)
_MISSING = re.compile(r"derivative for '?((?:aten::)?[\w.]+)'? is not implemented")
_NO_FORWARD_AD = re.compile(r"forward AD with '?((?:aten::)?[\w.]+)'? that does not support it")
_FIRST_ORDER_ONLY = (
    "trace(..., matrix='ggn', method='exact') and diag_fisher(..., kind='exact') need only first "
    "derivatives of the model"
)


def _fused_attention(op: str) -> str:
    """For an error naming ``op``: where it is a fused attention kernel's backward, why curvlab's
    math kernel did not take its place and the way out (else empty)."""
    if "attention" not in op or "math" in op:
        return ""
    return (
        f". {op} is the backward of a fused scaled_dot_product_attention kernel: curvlab's passes "
        "select the math kernel, also inside an sdpa_kernel context of the model's own around "
        "F.scaled_dot_product_attention, but this forward reached the fused kernel another way "
        "(torch.ops.aten's fused op called directly, or attention computed on another thread). "
        "Call F.scaled_dot_product_attention on the calling thread, or let the model compute "
        "attention with SDPBackend.MATH for curvlab's calls"
    )


def _names(functions: Sequence[type]) -> str:
    """``Function 'A'`` or ``Functions 'A', 'B'``: custom ``autograd.Function`` classes, named."""
    return f"Function{'s' if len(functions) > 1 else ''} {few([f.__qualname__ for f in functions])}"


def _forward_mode_ready(function: type) -> bool:
    """Whether ``torch.func.jvp`` can run through the custom ``autograd.Function``: it defines
    ``jvp`` and ``setup_context`` (the forward that takes no ``ctx``)."""
    base = torch.autograd.Function
    return function.jvp is not base.jvp and function.setup_context is not base.setup_context


def missing_derivative(exc: BaseException) -> str | None:
    """The op whose derivative torch lacks, from autograd's error (``None``: another error)."""
    match = _MISSING.search(str(exc))
    return match.group(1) if match else None


def _weight_norm(v: Tensor, g: Tensor, dim: int) -> Tensor:
    """``torch._weight_norm(v, g, dim)`` through ops whose second derivative torch gets right."""
    return g * v / torch.norm_except_dim(v, 2, dim)


class _TwiceDifferentiable:
    """Within the block, modules whose op torch cannot differentiate twice (or differentiates
    twice wrongly) return the same values through ops it differentiates twice correctly:

    * ``nn.Hardsigmoid``: ``clamp(x + 3, 0, 6) / 6``, whose second derivative vanishes away from
      the kinks, as Hardsigmoid's does (torch has no derivative of ``hardsigmoid_backward``);
    * weight normalisation (``torch.nn.utils.parametrizations.weight_norm`` and the older
      ``torch.nn.utils.weight_norm``): ``g * v / norm_except_dim(v, 2, dim)`` instead of
      ``torch._weight_norm``, whose double backward is wrong on CPU (torch 2.14: ``gradgradcheck``
      fails for ``dim=0`` and the last dim; Hessians off by 16-48%). The older flavour's computed
      weight attribute is put back on exit.

    The substitutes are forward hooks that run first (:func:`curvlab._notrace.first_forward_hooks`;
    the older flavour's takes the place of torch's pre-hook), so that the user's own forward hooks
    on these modules act on the substitute's output as they act on the module's.
    """

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        self.hardsigmoid = [m for _, m in modules if isinstance(m, nn.Hardsigmoid)]
        self.weight_norm = [m for _, m in modules if isinstance(m, _ParamWeightNorm)]
        self.old_weight_norm = [
            (m, key, hook)
            for _, m in modules
            if m._forward_pre_hooks
            for key, hook in m._forward_pre_hooks.items()
            if isinstance(hook, _OldWeightNorm)
        ]
        self.handles: list[Any] = []
        self.weights: list[tuple[nn.Module, str, Any]] = []

    def weight_norm_modules(self) -> list[nn.Module]:
        """The modules with weight normalisation (either flavour) this block would swap."""
        return self.weight_norm + [m for m, _, _ in self.old_weight_norm]

    @property
    def notes(self) -> list[str]:
        """What is computed another way (empty: nothing)."""
        notes = []
        if self.hardsigmoid:
            notes.append(
                "nn.Hardsigmoid computed as clamp(x + 3, 0, 6) / 6 (same values; torch has no "
                "second derivative of aten::hardsigmoid_backward, and Hardsigmoid's vanishes "
                "away from its kinks)"
            )
        if self.weight_norm or self.old_weight_norm:
            notes.append(
                "weight_norm computed as g * v / norm_except_dim(v, 2, dim) (same values; "
                "torch's second derivative of torch._weight_norm is wrong)"
            )
        return notes

    def __enter__(self) -> _TwiceDifferentiable:
        # first of the forward hooks: a hook of the user's on the module (activation steering,
        # a scale) then acts on the substitute's output, as it acts on the module's own outside
        # the block (appended, the substitute replaced what the user's hook returned: a trace
        # 0.8668 for 2.6988, found in review s19)
        substitutes = dict.fromkeys(self.hardsigmoid, _hardsigmoid_twice_differentiable)
        substitutes.update(dict.fromkeys(self.weight_norm, _weight_norm_twice_differentiable))
        if substitutes:
            self.handles += first_forward_hooks(substitutes)
        for m, key, hook in self.old_weight_norm:
            self.weights.append((m, hook.name, m.__dict__.get(hook.name, _ABSENT)))
            m._forward_pre_hooks[key] = _OldWeightNormTwiceDifferentiable(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for m, key, hook in self.old_weight_norm:
            if key in m._forward_pre_hooks:
                m._forward_pre_hooks[key] = hook
        for m, name, weight in self.weights:  # the weight the user's last forward pass computed
            if weight is _ABSENT:
                m.__dict__.pop(name, None)
            else:
                m.__dict__[name] = weight
        self.weights.clear()


_ABSENT = object()


def _hardsigmoid_twice_differentiable(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return (args[0] + 3).clamp(0, 6) / 6


def _weight_norm_twice_differentiable(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    g, v = args  # parametrizations._WeightNorm.forward(weight_g, weight_v)
    return _weight_norm(v, g, module.dim)


class _OldWeightNormTwiceDifferentiable:
    """Stands in for a ``torch.nn.utils.weight_norm`` forward pre-hook (same place, same
    attribute set, computed by :func:`_weight_norm`)."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        name = self.hook.name
        g, v = getattr(module, name + "_g"), getattr(module, name + "_v")
        setattr(module, name, _weight_norm(v, g, self.hook.dim))


@register_matrix
class HessianOperator(CurvatureOperator):
    """``H = d^2 L / d theta^2`` by double backward (Pearlmutter's trick)."""

    matrix = "hessian"

    def _forward(self, inputs: Any, targets: Tensor) -> Tensor:
        with _TwiceDifferentiable(self._scan.modules) as swap:
            output = super()._forward(inputs, targets)
        if swap.notes:
            self.info["hessian"] = "; ".join(swap.notes)
        return output

    def _loss(self, output: Tensor, targets: Tensor) -> Tensor:
        return self.spec.nll_sum(output, targets, twice=True)  # its gradient is differentiated

    def _check_graph(self, output: Tensor, graph: GradGraph | SplitGraph | None) -> None:
        """Refuse a model whose graph holds a custom ``autograd.Function`` with a backward marked
        ``@once_differentiable``: torch computes that backward under ``no_grad``, and the double
        backward with respect to the parameters drops its part of the second derivative without
        an error (torch's ``DelayedError`` is pruned). Found in review: a Hessian product 79% off
        its finite difference, eigenvalues 0.0666, 0.0525 for 0.3986, 0.3428. The forward pass's
        graph names the Functions; the kept gradient's ``DelayedError`` nodes catch such a
        backward one level down (a ``@once_differentiable`` helper a backward calls)."""
        if graph is None:
            functions = once_differentiable_functions(output, self._params)
            if functions:
                self._refuse_once_differentiable(
                    f"the custom autograd {_names(functions)}, whose backward is"
                )
            return
        parts = (graph,) if isinstance(graph, GradGraph) else (graph.jac, graph.residual)
        kept = [t for p in parts for t in (p.grads if isinstance(p, GradGraph) else p.jtu)]
        if has_delayed_error(kept):
            self._refuse_once_differentiable(
                "a custom autograd Function whose backward calls a function"
            )

    def _refuse_once_differentiable(self, what: str) -> None:
        raise NotImplementedError(
            f"the {self.matrix} of this model needs the second derivative of {what} marked "
            "@once_differentiable: torch computes it under no_grad, and a double backward with "
            "respect to the parameters drops its part without an error (the products would be "
            "silently wrong). For this matrix, give the Function a backward torch can "
            "differentiate (torch operations, without @once_differentiable); matrix='ggn', "
            "'fisher' and 'empirical_fisher' need no second derivative of the model (their "
            "J v runs in forward mode where the Function defines jvp and setup_context), and "
            f"{_FIRST_ORDER_ONLY}"
        )

    def _graph(self, output: Tensor, targets: Tensor, inputs: Any) -> GradGraph | SplitGraph:
        if not self._scaled_outputs:
            loss = self._loss(output, targets)
            return GradGraph(self._grads(loss, self._params, None, create_graph=True))
        # a model with 16-bit parameters: H = G + R, each part's output-side vector scaled by a
        # power of two to the range of _top_exponent before its 16-bit backward pass. One scale
        # for the NLL sum cannot serve both: a confident classifier's Lambda (1e-9) is 0 in
        # float16 where a misclassified example's r = dNLL/df (~1) is not, and the raw sum's
        # products overflowed float16 at n ||H|| > 65504 (found in review: a Hessian of
        # 9.46e-9 gave eigenvalues 0.0; MSELoss(mean) over 4096 examples, NonFiniteError)
        u = torch.zeros_like(output, requires_grad=True)
        jtu = self._grads(output, self._params, u, create_graph=True)
        return SplitGraph(
            JacobianGraph(output, u, jtu, targets), self._residual_graph(output, targets)
        )

    def _residual_graph(self, output: Tensor, targets: Tensor) -> GradGraph:
        """``s J^T r`` with its graph (``r = dNLL/df`` held fixed, float32, ``s`` its scale)."""
        r = self._residuals(output, targets)
        down, up = self._output_scale(r.abs().amax(), self._top_exponent(output))
        loss = ((r * down).to(output.dtype) * output).sum()
        return GradGraph(self._grads(loss, self._params, None, create_graph=True), up)

    def _residuals(self, output: Tensor, targets: Tensor) -> Tensor:
        """``r = dNLL / d output``, float32 at least (a 16-bit ``r`` of a confident classifier
        is 0)."""
        with torch.enable_grad():
            leaf = upcast(output.detach()).requires_grad_(True)
            (r,) = torch.autograd.grad(self.spec.nll_sum(leaf, targets), leaf)
        return r

    def _apply(self, graph: GradGraph | SplitGraph, v: Sequence[Tensor], batched: bool) -> tuple:
        if isinstance(graph, GradGraph):
            return self._double_backward(graph, v, batched)
        return tuple(
            g + r
            for g, r in zip(
                self._gauss_newton(graph.jac, v, batched),
                self._double_backward(graph.residual, v, batched),
            )
        )

    def _gauss_newton(self, graph: JacobianGraph, v: Sequence[Tensor], batched: bool) -> tuple:
        """``J^T Lambda J v`` of one batch, ``Lambda J v`` scaled for the 16-bit backward."""
        used = [(j, t) for j, t in zip(graph.jtu, v) if j.requires_grad]
        if not used:
            return tuple(torch.zeros_like(x, dtype=self._acc) for x in v)
        kw: dict[str, Any] = {"retain_graph": True, "is_grads_batched": batched}
        with self._second_derivative():
            (jv,) = torch.autograd.grad([j for j, _ in used], graph.u, [t for _, t in used], **kw)
        lead = 1 if batched else 0
        hv = self.spec.hessian_product(graph.output, jv, graph.targets, lead)
        hv, up = self._scaled_down(hv, lead, graph.output)
        res = self._grads(graph.output, self._params, hv, **kw)
        return self._scaled_up(self._batch_shaped(res, v, batched), up, batched)

    def _double_backward(self, graph: GradGraph, v: Sequence[Tensor], batched: bool) -> tuple:
        live = [i for i, g in enumerate(graph.grads) if g.requires_grad]
        if not live:
            return self._scaled_up([torch.zeros_like(x) for x in v], graph.up, batched)
        outs = [graph.grads[i] for i in live]
        kw: dict[str, Any] = {"retain_graph": True, "is_grads_batched": batched}
        with self._second_derivative():
            res = self._grads(outs, self._params, [v[i] for i in live], **kw)
        return self._scaled_up(self._batch_shaped(res, v, batched), graph.up, batched)

    @contextmanager
    def _second_derivative(self) -> Iterator[None]:
        """Autograd's error for an op without a second derivative, as one naming the way out."""
        try:
            yield
        except RuntimeError as exc:
            op = missing_derivative(exc)
            if op is None:
                raise
            raise NotImplementedError(
                f"the {self.matrix} of this model needs the second derivative of {op}, which "
                "torch does not implement; matrix='ggn' (the Gauss-Newton matrix), 'fisher' and "
                "'empirical_fisher' need no second derivative of the model (their products "
                f"take forward mode where the double-backward trick fails), and {_FIRST_ORDER_ONLY}"
                f"{_fused_attention(op)}"
            ) from None


@register_matrix
class ResidualOperator(HessianOperator):
    """``H - G = w sum_n sum_k r_nk d^2 f_nk / d theta^2``, ``r_n = dNLL_n / df_n`` held fixed."""

    matrix = "residual"

    def _loss(self, output: Tensor, targets: Tensor) -> Tensor:
        return (self._residuals(output, targets) * output).sum()

    def _graph(self, output: Tensor, targets: Tensor, inputs: Any) -> GradGraph | SplitGraph:
        if not self._scaled_outputs:
            return super()._graph(output, targets, inputs)
        return self._residual_graph(output, targets)  # (16-bit: R alone, scaled)


@register_matrix
class GGNOperator(CurvatureOperator):
    """``G = w sum_n J_n^T Lambda_n J_n`` (the true Fisher for these losses)."""

    matrix = "ggn"

    _forward_mode = False  # J v by forward-mode AD (set where the double-backward trick fails)
    _no_double_backward = ""  # the op whose missing derivative set _forward_mode

    def _check_graph(self, output: Tensor, graph: JacobianGraph | None) -> None:
        """``J v`` in forward mode where a custom ``autograd.Function`` of the model has a
        backward marked ``@once_differentiable``: the double-backward trick differentiates that
        backward with respect to ``u``, which torch computes under ``no_grad``, so ``J v`` lost
        its part (torch's "appears to not have been used in the graph", or wrong values where
        some of the output does not pass through the Function). ``J^T`` (its backward itself)
        is exact: with the Function's ``jvp`` (and ``setup_context``, which ``torch.func.jvp``
        needs) the products are exact; without, they are refused here, naming the Functions."""
        if graph is None:
            functions = once_differentiable_functions(output, self._params)
            if not functions:
                return
            what = f"the backward of the custom autograd {_names(functions)}"
        elif not self._forward_mode and graph.jtu and has_delayed_error(graph.jtu):
            what = "a custom autograd Function's backward that calls a function"
            functions = custom_functions(output, self._params)  # (which one calls it is not told)
            graph.jtu = ()  # (not used in forward mode: not kept)
        else:
            return
        unready = [f for f in functions if not _forward_mode_ready(f)]
        if unready:
            raise NotImplementedError(
                f"the {self.matrix} products of this model need J v, which the double-backward "
                f"trick cannot give through {what} marked @once_differentiable (torch computes "
                "it under no_grad, so J v would lose its part), and forward mode "
                f"(torch.func.jvp) needs the custom autograd {_names(unready)} to define the "
                "static methods jvp and setup_context. Define them (or give the backward "
                "operations torch can differentiate, without @once_differentiable); "
                f"{_FIRST_ORDER_ONLY} (no J v)"
            )
        if self._forward_mode:  # (already: for an op without a second derivative)
            return
        self._forward_mode = True
        self._no_double_backward = f"{what} marked @once_differentiable"
        self.info["jacobian"] = (
            f"forward mode (the double-backward trick would differentiate {what} marked "
            "@once_differentiable, which torch computes under no_grad); one extra forward pass "
            "per product"
        )

    def _graph(self, output: Tensor, targets: Tensor, inputs: Any) -> JacobianGraph:
        # J^T u is linear in u; differentiating it w.r.t. u gives J v (double-backward trick)
        u = torch.zeros_like(output, requires_grad=True)
        jtu = () if self._forward_mode else self._grads(output, self._params, u, create_graph=True)
        return JacobianGraph(output, u, jtu, targets, inputs)

    def _forward_passes(self) -> bool:
        return self._forward_mode

    def _jv(self, graph: JacobianGraph, v: Sequence[Tensor], batched: bool) -> Tensor:
        """``J v`` (``k`` stacked products if ``batched``): the double-backward trick, or forward
        mode where torch cannot differentiate an op's backward (e.g. Hardsigmoid's)."""
        if not self._forward_mode:
            kw: dict[str, Any] = {"retain_graph": True, "is_grads_batched": batched}
            # a parameter the output does not depend on has a constant zero J^T u (no graph)
            used = [(j, t) for j, t in zip(graph.jtu, v) if j.requires_grad]
            if not used:
                zero = torch.zeros_like(graph.u)
                return zero.expand(v[0].shape[0], *zero.shape) if batched else zero
            try:
                (jv,) = torch.autograd.grad(
                    [j for j, _ in used], graph.u, [t for _, t in used], **kw
                )
                return jv
            except RuntimeError as exc:
                op = missing_derivative(exc)
                if op is None:
                    raise
                self._forward_mode = True
                self._no_double_backward = op
                self.info["jacobian"] = (
                    f"forward mode (torch has no derivative of {op}, which the double-backward "
                    "trick needs); one extra forward pass per product"
                )
                # forward mode runs the model's forward pass: as the model was built? (checked
                # at the product's start where it rebuilds graphs; here curvlab's passes may have
                # swapped a forward or a flag for the block)
                if not self._structure_checked:
                    self._check_structure()
        try:
            if not batched:
                return self._forward_jv(graph, v)
            k = v[0].shape[0]
            return torch.stack([self._forward_jv(graph, [t[j] for t in v]) for j in range(k)])
        except NotImplementedError as exc:
            match = _NO_FORWARD_AD.search(str(exc))
            if match is None:
                raise
            raise NotImplementedError(
                f"the {self.matrix} products of this model need J v, which torch computes "
                f"neither by the double-backward trick (no derivative of {self._no_double_backward})"
                f" nor in forward mode (no forward-mode derivative of {match.group(1)}); "
                f"{_FIRST_ORDER_ONLY} (no J v){_fused_attention(self._no_double_backward)}"
            ) from None
        except RuntimeError as exc:
            if "mutate a captured Tensor" not in str(exc):
                raise
            error = self._mutation_error(graph, str(exc))
            self._refusal = str(error)  # every product would fail so: refused for good
            raise error from None

    def _mutation_error(self, graph: JacobianGraph, message: str) -> ModelStateError:
        """The error for a forward pass that updates a tensor of the model in place, which
        ``torch.func``'s forward mode refuses ("mutate a captured Tensor"): naming the buffers
        one forward pass of this batch updates (run on copies of every buffer)."""
        match = re.search(r"in-place operation \(([^)]+)\)", message)
        op = f" ({match.group(1)})" if match else ""
        names = self._buffers_updated(graph)
        what = "a tensor of the model"
        if names:
            what = f"the buffer{'s' if len(names) > 1 else ''} {few(names)}"
        return ModelStateError(
            f"the {self.matrix} products of this model compute J v in forward mode "
            f"(torch.func.jvp: no derivative of {self._no_double_backward}, which the "
            f"double-backward trick needs), and its forward pass updates {what} in place{op} "
            "(a custom module's running statistic, in train mode), which forward mode cannot "
            "run. Put the model (or that module) in eval mode before building the operator, "
            "with the update conditional on module.training; keep_graph=True does not help "
            "here (forward-mode products run the model's forward pass at every product)"
        )

    def _buffers_updated(self, graph: JacobianGraph) -> list[str]:
        """The buffers one forward pass of the model on this batch (in the modes and on the
        buffers as built) updates in place or replaces, found on copies of every buffer: the
        user's are left alone (empty when that pass fails)."""
        modules = self._scan.modules
        try:
            with (
                leave_no_trace(self.model, scan=self._scan),
                torch.no_grad(),
                on_buffers(self._buffers_built),
            ):
                self._modes_as_built()
                slots = [(m, n, b) for _, m in modules for n, b in m._buffers.items()]
                with on_buffers(slots):
                    copies = [(m, n, m._buffers.get(n)) for m, n, _ in slots]
                    seen = [None if c is None else c._version for _, _, c in copies]
                    seed_global(self.device, self._seeds[self._batch_index])
                    call_model(self.model, graph.inputs)
                    moved = {
                        (id(m), n)
                        for (m, n, c), v in zip(copies, seen)
                        if c is not None and (m._buffers.get(n) is not c or c._version != v)
                    }
        except Exception:  # (the error names no buffer then)
            return []
        return [
            f"{prefix}.{n}" if prefix else n
            for prefix, m in modules
            for n in m._buffers
            if (id(m), n) in moved
        ]

    def _forward_jv(self, graph: JacobianGraph, v: Sequence[Tensor]) -> Tensor:
        names, model = self.names, self.model

        def f(*values: Tensor) -> Tensor:
            params = dict(zip(names, values))

            def fmodel(*args: Any, **kwargs: Any) -> Any:
                return functional_call(model, params, args, kwargs)

            # on the buffers the operator was built with, as every forward pass of its graphs;
            # copied inside the transform, which lets a train-mode forward update them in place
            with on_buffers(self._buffers_built):
                return self.spec.prepare(
                    call_model(fmodel, graph.inputs, module=model), graph.targets
                )

        primals = tuple(p.detach() for p in self._params)
        with leave_no_trace(model, scan=self._scan):
            self._modes_as_built()  # the modes the operator was built in, as every pass
            # the Dropout masks of this batch's graph (curvlab/operators/_base.py, _read_batches):
            # J v and J^T u of one matrix, not of two different forward passes
            seed_global(self.device, self._seeds[self._batch_index])
            _, jv = jvp(f, primals, tuple(t.to(p.dtype) for t, p in zip(v, primals)))
        return jv

    def _output_product(self, graph: JacobianGraph, jv: Tensor, lead: int) -> Tensor:
        """The loss-Hessian (or its Fisher stand-in) times ``J v``, per output entry (float32 at
        least: :meth:`_apply` scales it before it casts it to a 16-bit output's dtype)."""
        return self.spec.hessian_product(graph.output, jv, graph.targets, lead)

    def _apply(self, graph: JacobianGraph, v: Sequence[Tensor], batched: bool) -> tuple:
        kw: dict[str, Any] = {"retain_graph": True, "is_grads_batched": batched}
        jv = self._jv(graph, v, batched)
        lead = 1 if batched else 0
        hv, up = self._scaled_down(self._output_product(graph, jv, lead), lead, graph.output)
        res = self._grads(graph.output, self._params, hv, **kw)
        return self._scaled_up(self._batch_shaped(res, v, batched), up, batched)


@register_matrix
class FisherOperator(GGNOperator):
    """The Monte-Carlo Fisher ``w sum_n s_n s_n^T``, labels drawn once at construction."""

    matrix = "fisher"
    samples_labels = True

    def _graph(self, output: Tensor, targets: Tensor, inputs: Any) -> JacobianGraph:
        graph = super()._graph(output, targets, inputs)
        # float32 at least: a confident 16-bit classifier's s (1e-9) is 0 in float16
        leaf = upcast(output.detach()).clone().requires_grad_(True)
        drawn = self.samples_labels  # the Monte-Carlo labels drawn at construction
        (graph.s,) = torch.autograd.grad(self.spec.nll_sum(leaf, targets, drawn), leaf)
        return graph

    def _output_product(self, graph: JacobianGraph, jv: Tensor, lead: int) -> Tensor:
        s = graph.s
        assert s is not None
        n = s.shape[0]
        coeff = (s * upcast(jv)).reshape(*jv.shape[:lead], n, -1).sum(dim=-1)
        return s * coeff.reshape(*coeff.shape, *([1] * (s.ndim - 1)))


@register_matrix
class EmpiricalFisherOperator(FisherOperator):
    """``(1/N) sum_n g_n g_n^T`` ("mean") or ``sum_n s_n s_n^T`` ("sum") at the data labels."""

    matrix = "empirical_fisher"
    samples_labels = False

    def _weight(self, total: float, c: float) -> float:
        w = super()._weight(total, c)
        return w / c if self.spec.reduction == "mean" else w


MATRICES = ("hessian", "ggn", "fisher", "empirical_fisher", "residual")
"""The built-in matrices (``curvature_operator`` accepts every name of ``MATRIX_CLASSES``, so a
matrix registered later too)."""


@collective
def curvature_operator(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    matrix: str = "hessian",
    *,
    params: Params = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    keep_graph: bool | None = None,
    batched: bool | None = None,
) -> CurvatureOperator:
    """A matrix-free curvature operator of ``loss_fn`` over ``data`` (see the module docstring).

    Args:
        model: any ``nn.Module`` (BatchNorm must be in eval mode).
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (mean or sum).
        data: one ``(inputs, targets)`` batch or an iterable of them; the batches are kept so
            that every product sees the same data (their tensors by reference: changed in place,
            products raise; a dict of inputs as a copy of the dict).
        matrix: ``"hessian"``, ``"ggn"``, ``"fisher"`` (Monte-Carlo), ``"empirical_fisher"`` or
            ``"residual"`` (Hessian minus GGN).
        params: restrict to these parameters (names, module prefixes or a predicate
            ``fn(name, param) -> bool``); the operator is then that diagonal block.
        seed: seed of the Monte-Carlo labels (``"fisher"``); default 0.
        generator: alternatively a ``torch.Generator`` on the model's device.
        keep_graph: keep each batch's autograd graph across products (default: only for one
            batch). Faster, but holds the activations of every batch in memory.

    Returns:
        A :class:`CurvatureOperator` of the objective ``L`` (``"mean"``: example mean; ``"sum"``:
        the total), with ``.matvec``, ``.matmat``, ``@`` and ``.to_scipy()``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> data = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
        >>> G = curvature_operator(model, torch.nn.CrossEntropyLoss(), data, matrix="ggn")
        >>> G.to_scipy().shape
        (8, 8)
    """
    matrix = matrix_name(matrix)
    if matrix not in MATRIX_CLASSES:
        raise ValueError(f"matrix must be one of {tuple(MATRIX_CLASSES)}, got {matrix!r}")
    return MATRIX_CLASSES[matrix](
        model,
        loss_fn,
        data,
        params=params,
        seed=seed,
        generator=generator,
        keep_graph=keep_graph,
        batched=batched,
    )
