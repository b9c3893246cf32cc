"""The BackPACK backend: one-pass per-example and second-order quantities.

Every primitive here works on the *negative log-likelihood sum* ``sum_n NLL_n`` of one chunk of
examples (see :mod:`curvlab.losses`), never on the user's reduction: scaling to the ``"mean"`` or
``"sum"`` objective happens once, in :mod:`curvlab.quantities`. BackPACK's forward/backward hooks are
installed on the user's model for the duration of a :func:`extended` block and removed afterwards,
together with every attribute BackPACK stores on modules and parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from backpack import backpack, extend
from backpack import extensions as bext
from backpack.context import CTX
from torch import Tensor, nn

from curvlab.backends.validation import needs_converter, validate_model
from curvlab.losses import LossSpec

__all__ = ["BackpackBackend"]

# attributes BackPACK may leave on parameters and modules
_PARAM_FIELDS = (
    "grad_batch",
    "sum_grad_squared",
    "variance",
    "batch_l2",
    "diag_ggn_exact",
    "diag_ggn_mc",
    "diag_h",
    "diag_h_batch",
    "sqrt_ggn_exact",
    "sqrt_ggn_mc",
    "kfac",
    "kflr",
    "kfra",
)
_MODULE_FIELDS = ("input0", "input1", "output", "_backpack_extend")


@dataclass
class _Session:
    """The extended model of one :func:`BackpackBackend.extended` block."""

    module: nn.Module
    loss: nn.Module
    spec: LossSpec
    params: dict[str, nn.Parameter]
    on_output: Callable[[Tensor], None] | None = None

    def nll(self, output: Tensor, targets: Tensor) -> Tensor:
        """The chunk's NLL sum; first hands the output to ``on_output`` (checks before backward)."""
        if self.on_output is not None:
            self.on_output(output)
        return self.loss(output, targets)


class BackpackBackend:
    """Computes raw (NLL-sum) quantities on chunks of examples with BackPACK.

    Attributes:
        name: ``"backpack"``, recorded in every result this backend computes.
    """

    name = "backpack"

    def check(self, model: nn.Module, second_order: bool, hessian: bool = False) -> None:
        """Raise before any work if ``model`` holds a module BackPACK cannot handle."""
        validate_model(model, second_order=second_order, hessian=hessian)

    @contextmanager
    def extended(self, model: nn.Module, spec: LossSpec, second_order: bool) -> Iterator[_Session]:
        """Extend ``model`` (and a sum-reduction copy of the loss) for the duration of the block.

        First-order quantities only need hooks on the modules that own parameters, so the model's
        graph may be anything (residual connections included). Second-order quantities backpropagate
        through every module: a model that is not a plain ``nn.Sequential`` chain is converted with
        BackPACK's graph converter, which shares the parameters with ``model``.
        """
        n_handles = len(CTX.hook_handles)
        warnings_ctx = warnings.catch_warnings()
        warnings_ctx.__enter__()
        # torch warns when the first layer's input needs no gradient; that is expected here
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        modules = list(model.modules())
        had_flag = {id(m): hasattr(m, "_backpack_extend") for m in modules}
        inplace = {
            id(m): m.inplace for m in modules if isinstance(getattr(m, "inplace", None), bool)
        }
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        loss = sum_loss(spec)
        try:
            for m in modules:  # in-place ops clash with BackPACK's module hooks; same values
                if id(m) in inplace:
                    m.inplace = False
            if second_order and needs_converter(model):
                module = extend(model, use_converter=True)
            elif second_order:
                module = extend(model)
            else:
                for m in modules:
                    if any(True for _ in m.parameters(recurse=False)):
                        extend(m)
                module = model
            extend(loss)
            yield _Session(module=module, loss=loss, spec=spec, params=params)
        finally:
            warnings_ctx.__exit__(None, None, None)
            for handle in CTX.hook_handles[n_handles:]:
                handle.remove()
            del CTX.hook_handles[n_handles:]
            for m in modules:
                if isinstance(getattr(m, "inplace", None), bool) and id(m) in inplace:
                    m.inplace = inplace[id(m)]
                for f in _MODULE_FIELDS:
                    if f == "_backpack_extend" and had_flag.get(id(m), False):
                        continue
                    if f in m.__dict__:
                        delattr(m, f)
            for p in model.parameters():
                for f in _PARAM_FIELDS:
                    if f in p.__dict__:
                        delattr(p, f)

    # ---------------------------------------------------------------- first order
    def sum_grad_squared(
        self,
        s: _Session,
        inputs: Tensor,
        targets: Tensor,
        mc_samples: int = 0,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """``sum_n (grad NLL_n)^2`` at the data labels, or averaged over ``mc_samples`` draws.

        Returns:
            (per-parameter sums, the gradient ``sum_n grad NLL_n`` at the labels used, the output).
        """
        _zero_grads(s.params)
        output = s.module(inputs)
        if mc_samples == 0:
            with backpack(bext.SumGradSquared()):
                s.nll(output, targets).backward()
            sgs = {n: p.sum_grad_squared for n, p in s.params.items()}
            grad = {n: p.grad for n, p in s.params.items()}
            return sgs, grad, output
        total: dict[str, Tensor] = {}
        for i in range(mc_samples):
            sampled = s.spec.sample_targets(output, generator)
            _zero_grads(s.params)
            with backpack(bext.SumGradSquared(), retain_graph=i < mc_samples - 1):
                s.nll(output, sampled).backward(retain_graph=i < mc_samples - 1)
            for n, p in s.params.items():
                if n in total:
                    total[n].add_(p.sum_grad_squared)
                else:
                    total[n] = p.sum_grad_squared.clone()
        return {n: v / mc_samples for n, v in total.items()}, {}, output

    def sum_grad_squared_with_sampled(
        self, s: _Session, inputs: Tensor, targets: Tensor, generator: torch.Generator | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]:
        """One forward, two backward passes: squared gradients at the labels and at one draw.

        Returns:
            (sums at the labels, gradient at the labels, sums at sampled labels, output).
        """
        _zero_grads(s.params)
        output = s.module(inputs)
        with backpack(bext.SumGradSquared(), retain_graph=True):
            s.nll(output, targets).backward(retain_graph=True)
        at_labels = {n: p.sum_grad_squared for n, p in s.params.items()}
        grads = {n: p.grad for n, p in s.params.items()}
        _zero_grads(s.params)
        sampled = s.spec.sample_targets(output, generator)
        with backpack(bext.SumGradSquared()):
            s.nll(output, sampled).backward()
        at_sampled = {n: p.sum_grad_squared for n, p in s.params.items()}
        return at_labels, grads, at_sampled, output

    def batch_grad(
        self,
        s: _Session,
        inputs: Tensor,
        targets: Tensor,
        sampled: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-example gradients ``grad NLL_n`` (labels or one model sample), each ``(n, *shape)``."""
        _zero_grads(s.params)
        output = s.module(inputs)
        labels = s.spec.sample_targets(output, generator) if sampled else targets
        with backpack(bext.BatchGrad()):
            s.nll(output, labels).backward()
        return {n: p.grad_batch for n, p in s.params.items()}

    # ---------------------------------------------------------------- second order
    def diag_ggn(self, s: _Session, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``diag sum_n J_n^T (d^2 NLL_n / d f^2) J_n``."""
        _zero_grads(s.params)
        output = s.module(inputs)
        with backpack(bext.DiagGGNExact()):
            s.nll(output, targets).backward()
        return {n: p.diag_ggn_exact for n, p in s.params.items()}

    def diag_hessian(self, s: _Session, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``diag d^2 (sum_n NLL_n) / d theta^2``."""
        _zero_grads(s.params)
        output = s.module(inputs)
        with backpack(bext.DiagHessian()):
            s.nll(output, targets).backward()
        return {n: p.diag_h for n, p in s.params.items()}

    def sqrt_ggn(self, s: _Session, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Per-example square-root factors ``V`` of the NLL-sum GGN, ``GGN = sum_{c,n} v v^T``.

        Returns per parameter a tensor of shape ``(C, n, *shape)``.
        """
        _zero_grads(s.params)
        output = s.module(inputs)
        with backpack(bext.SqrtGGNExact()):
            s.nll(output, targets).backward()
        return {n: p.sqrt_ggn_exact for n, p in s.params.items()}


def _zero_grads(params: dict[str, nn.Parameter]) -> None:
    for p in params.values():
        p.grad = None


def sum_loss(spec: LossSpec) -> nn.Module:
    """A fresh sum-reduction loss module of the same family as ``spec``."""
    if spec.kind == "cross_entropy":
        return nn.CrossEntropyLoss(reduction="sum")
    if spec.kind == "mse":
        return nn.MSELoss(reduction="sum")
    return nn.BCEWithLogitsLoss(reduction="sum")
