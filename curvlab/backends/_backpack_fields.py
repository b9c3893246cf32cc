"""BackPACK's results as curvlab needs them: cached extensions and sum losses, the fields it
stores on parameters read back (zeros where the loss does not reach, a hand-over where BackPACK
missed a parameter that has a gradient), ``.grad`` cleared between passes, and BackPACK's own
failures that mean "not this model" turned into hand-overs (:func:`_extending`); for 16-bit
models, extensions whose products and squares are float32 (:func:`_upcast_products`) and whose
loss factors and output gradients enter the 16-bit backward pass scaled by powers of two
(:func:`_scaled_loss_factors`, :func:`_scaled_hessian_factors`, :func:`_scaled_sqrt_columns`,
:func:`scaled_residual_output`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import backpack as backpack_package
import torch
from backpack import backpack, hook_run_extensions, hook_store_io
from backpack import extensions as bext
from backpack.core.derivatives.bcewithlogitsloss import BCELossWithLogitsDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from backpack.extensions.saved_quantities import SavedQuantities
from backpack.extensions.secondorder.diag_ggn.losses import DiagGGNLoss
from backpack.extensions.secondorder.diag_hessian import conv1d as diag_h_conv1d
from backpack.extensions.secondorder.diag_hessian import conv2d as diag_h_conv2d
from backpack.extensions.secondorder.diag_hessian import linear as diag_h_linear
from backpack.extensions.secondorder.diag_hessian.losses import DiagHLoss
from backpack.extensions.secondorder.sqrt_ggn.losses import SqrtGGNBaseLossModule
from backpack.utils import conv as conv_utils
from backpack.utils import linear as linear_utils
from backpack.utils.subsampling import subsample
from torch import Tensor, nn

from curvlab._losses import LossSpec
from curvlab._precision import is_sixteen, unit_exponents, upcast
from curvlab.backends._base import Handover

__all__ = ["scaled_residual_output", "sum_loss"]


_EXTENSIONS: dict[tuple[type, bool], BackpropExtension] = {}


def _extension(cls: type[BackpropExtension], sixteen: bool = False) -> BackpropExtension:
    """A BackPACK extension of class ``cls`` (without arguments), built once per process.

    Building one sets up a module-extension object per supported layer type, which costs as much
    as a small model's backward pass (about 60 us for ``DiagGGNExact``). The only state an
    extension keeps is the quantities backpropagated during one backward pass: it starts empty
    each time, also after a backward pass that raised.

    ``sixteen``: for a 16-bit model, an instance of its own whose parameter rules square in
    float32 (:func:`_upcast_products`); float32/float64 models keep BackPACK's rules unchanged.
    """
    ext = _EXTENSIONS.get((cls, sixteen))
    if ext is None:
        ext = _EXTENSIONS[(cls, sixteen)] = cls()
        stable = _STABLE_BCE.get(cls)
        if stable is not None:  # this instance is curvlab's own: BackPACK's others keep theirs
            ext.set_module_extension(nn.BCEWithLogitsLoss, stable(), overwrite=True)
        if sixteen:
            _upcast_products(ext)
    ext.saved_quantities = SavedQuantities()
    ext.__dict__.pop(_SCALE, None)  # set by the loss's rule of each backward pass
    ext.__dict__.pop(_COLUMNS, None)  # likewise (a 16-bit SqrtGGNExact)
    ext.__dict__.pop(_RESIDUAL, None)  # set before each backward pass (scaled_residual_output)
    return ext


def _upcast_products(ext: BackpropExtension) -> None:
    """Make every parameter rule of ``ext`` (this instance's own) compute in float32.

    BackPACK's ``SumGradSquared``, ``DiagGGNExact`` and ``DiagHessian`` form each example's
    gradient (or GGN factor) ``g_n a_n^T`` and square it in the layer's dtype: for a float16
    model a square below ``6e-8`` was 0 and one above ``65504`` inf (13 of 35 exact GGN entries
    exactly 0, NonFiniteError for finite per-example gradients of 1866; found in review). Each
    rule now gets the layer's input, its output gradient and the backpropagated factors copied
    to float32 (the 16-bit values themselves: the model's forward and backward are unchanged),
    so the products, squares and sums are float32 as on the hooks backend. The factors are
    still backpropagated through the layers in the model's dtype.
    """
    hessian = isinstance(ext, bext.DiagHessian)
    if hessian:  # its rules sum into a tensor of the weight's dtype
        for layer, rule in _FLOAT32_DIAG_H.items():
            ext.set_module_extension(layer, rule(), overwrite=True)
    module_extensions = ext._BackpropExtension__module_extensions  # type: ignore[attr-defined]
    scaled = isinstance(ext, bext.DiagGGNExact)
    columns = isinstance(ext, bext.SqrtGGNExact)
    first = isinstance(ext, bext.SumGradSquared)
    for layer, module_extension in module_extensions.items():
        if scaled and layer in _LOSSES_SCALED:
            module_extension.backpropagate = _scaled_loss_factors(module_extension.backpropagate)
        if columns and layer in _LOSSES_SCALED:
            module_extension.backpropagate = _scaled_sqrt_columns(module_extension.backpropagate)
        if hessian:
            wrap = _scaled_hessian_factors if layer in _LOSSES_SCALED else _unscaled_residuals
            module_extension.backpropagate = wrap(module_extension.backpropagate)
        for param in module_extension._ModuleExtension__params:  # type: ignore[attr-defined]
            rule = _upcasting(
                getattr(module_extension, param),
                unscale=scaled,
                gradient=(module_extension.derivatives, param) if first else None,
                columns=columns,
            )
            setattr(module_extension, param, rule)


GRAD32 = "_curvlab_grad32"
"""Field a 16-bit ``SumGradSquared`` pass stores on each parameter beside its squares: the
gradient summed over the examples in float32 (``.grad`` is the 16-bit backward's: its rounding,
``2^-11`` of the gradient, made ``gradient_stats``' variance at ``mean^2 / variance = 239`` 14%
off, found in review)."""


_SCALE = "_curvlab_scale"
"""Attribute of a 16-bit ``DiagGGNExact`` instance: the power of two its loss's square-root
factors were scaled by in the running backward pass (a 0-dim float32 tensor)."""
_LOSSES_SCALED = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


def _unit_scale(t: Tensor) -> Tensor:
    """The power of two ``2^-e`` that brings ``t``'s largest magnitude ``m 2^e`` into
    ``[0.5, 1)`` (a float32 0-dim tensor; 1 where that is 0 or not finite). Exact to undo, and
    no host synchronisation. ``e`` is kept to ``[-126, 126]`` (:func:`curvlab._precision.unit_exponents`)."""
    top = t.detach().abs().amax().float()
    return torch.pow(2.0, -unit_exponents(top))


def _scaled_sqrt_columns(backpropagate: Callable[..., Any]) -> Callable[..., Any]:
    """A loss's ``SqrtGGNExact`` rule computing the square-root columns ``S`` (``(V, n, ...)``:
    column ``v`` of example ``n``) from float32 copies of the 16-bit logits and handing each
    ``S[v, n]`` on as ``2^-e S[v, n]`` in the logits' dtype, its largest entry brought to
    ``[0.5, 1)``; the factors ``2^e`` (float32, ``(V, n)``) go to ``ext`` (:data:`_COLUMNS`) for
    the parameter rules (:func:`_upcasting`), which multiply their float32 factors by them
    (exact: powers of two). Column by column and example by example, so that neither an
    example's nor a column's small entries are measured against another's large ones.

    BackPACK formed them in float16, where ``p = 6e-9`` is 0: ``fisher_norms(kind="exact")``
    of a float16 classifier at a margin of 19 was exactly 0.0 for ``||F||_F = 5.553e-4`` (found
    in review s19).
    """

    def scaled(
        ext: BackpropExtension, module: nn.Module, g_inp: Any, g_out: Any, backproped: Any
    ) -> Any:
        with _upcast_input(module) as dtype:
            S = backpropagate(ext, module, g_inp, g_out, backproped)
        if dtype is None or not isinstance(S, Tensor) or S.ndim < 2:
            return S
        top = S.detach().abs().reshape(S.shape[0], S.shape[1], -1).amax(2).float()
        exponent = unit_exponents(top)
        ext.__dict__[_COLUMNS] = torch.pow(2.0, exponent)
        down = torch.pow(2.0, -exponent).reshape(*exponent.shape, *[1] * (S.ndim - 2))
        return (S * down).to(dtype)

    return scaled


_COLUMNS = "_curvlab_column_scales"
"""Attribute of a 16-bit ``SqrtGGNExact`` instance: per column and example ``(V, n)`` the power
of two that undoes the scaling of the running backward pass's square-root columns
(:func:`_scaled_sqrt_columns`)."""


def _scaled_loss_factors(backpropagate: Callable[..., Any]) -> Callable[..., Any]:
    """A loss's ``DiagGGNExact`` rule computing its square-root factors ``S`` from float32
    copies of the 16-bit logits and handing them on as ``2^k S`` in the logits' dtype.

    In float16, ``sqrt(p (1 - p))``-type factors of a classifier that fits its batch are
    subnormal or 0 (``1 - p`` rounds to 0 from ``z ~ 8``); ``2^k`` brings the largest to
    ``[0.5, 1)``, as a ``GradScaler`` does, and the parameter rules divide their squares by
    ``4^k`` (exact: powers of two). ``k`` stays a tensor (no host synchronisation).
    """

    def scaled(
        ext: BackpropExtension, module: nn.Module, g_inp: Any, g_out: Any, backproped: Any
    ) -> Any:
        with _upcast_input(module) as dtype:
            factors = backpropagate(ext, module, g_inp, g_out, backproped)
        if dtype is None or not isinstance(factors, Tensor):
            return factors
        scale = _unit_scale(factors)
        ext.__dict__[_SCALE] = scale
        return (factors * scale).to(dtype)

    return scaled


_RESIDUAL = "_curvlab_residual_unscale"
"""Attribute of a 16-bit ``DiagHessian`` instance: ``1 / s``, ``s`` the power of two the output
gradient of the running backward pass was scaled by (:func:`scaled_residual_output`)."""


def _scaled_hessian_factors(backpropagate: Callable[..., Any]) -> Callable[..., Any]:
    """A loss's ``DiagHessian`` rule computing the loss Hessian's square root ``S`` from float32
    copies of the 16-bit logits and handing it on as ``2^k S`` in the logits' dtype, its sign
    multiplied by ``4^-k`` (a 0-dim float32 tensor: the parameter rules' ``_signed_sum`` undo
    the scale; exact, powers of two).

    BackPACK's factors of a confident float16 classifier (``sqrt(p (1 - p)) ~ 4e-5`` and below)
    were formed in float16 and flushed to 0 or subnormal: the Hessian diagonal was 11% off at
    logits ~280 and 0 at ~420 (found in review s18; float64: 9.46e-9 and 1.99e-12).
    """

    def scaled(
        ext: BackpropExtension, module: nn.Module, g_inp: Any, g_out: Any, backproped: Any
    ) -> Any:
        with _upcast_input(module) as dtype:
            out = backpropagate(ext, module, g_inp, g_out, backproped)
        if dtype is None:
            return out
        factors = []
        signs = []
        for S, sign in zip(out["matrices"], out["signs"]):
            scale = _unit_scale(S)
            factors.append((S * scale).to(dtype))
            signs.append(sign / scale / scale)  # not / scale^2: inf above 2^64 (review s19)
        return {"matrices": factors, "signs": signs}

    return scaled


def _unscaled_residuals(backpropagate: Callable[..., Any]) -> Callable[..., Any]:
    """A layer's ``DiagHessian`` rule whose new (residual) factors, ``sqrt`` of the layer's
    second derivative times its output gradient, get their sign multiplied by ``1 / s`` (the
    output gradient's scale, :data:`_RESIDUAL`; a 0-dim float32 tensor)."""

    def unscaled(
        ext: BackpropExtension, module: nn.Module, g_inp: Any, g_out: Any, backproped: Any
    ) -> Any:
        before = len(backproped["signs"]) if isinstance(backproped, dict) else 0
        out = backpropagate(ext, module, g_inp, g_out, backproped)
        unscale = ext.__dict__.get(_RESIDUAL)
        if unscale is None or not isinstance(out, dict) or len(out["signs"]) == before:
            return out
        signs = list(out["signs"])
        signs[before:] = [sign * unscale for sign in signs[before:]]
        return {"matrices": out["matrices"], "signs": signs}

    return unscaled


class _GradientOf(torch.autograd.Function):
    """``output`` itself (a view: BackPACK finds a layer's quantities by the address of its
    output's storage), whose backward pass hands on the given ``grad`` instead of the incoming
    gradient."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, grad: Tensor) -> Tensor:
        ctx.grad = grad
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor, None]:
        return ctx.grad, None


def scaled_residual_output(
    ext: BackpropExtension, spec: LossSpec, output: Tensor, targets: Tensor
) -> Tensor:
    """``output`` for a 16-bit model's ``DiagHessian`` backward pass, whose gradient there is
    ``s r``: ``r = dNLL/d output`` computed from a float32 copy, ``s`` the power of two that
    brings its largest entry to ``[0.5, 1)``, in ``output``'s dtype; ``1 / s`` goes to ``ext``
    (:data:`_RESIDUAL`, for :func:`_unscaled_residuals`).

    The layers' residual terms (``f''(a)`` times the output gradient, e.g. of a ``Tanh``) were
    taken from the 16-bit backward's gradient, which is 0 for a confident float16 classifier
    (``1 - p`` rounds to 0; the operator's Hessian products take ``r`` the same way). Tensors
    throughout: no host synchronisation.
    """
    with torch.enable_grad():
        leaf = upcast(output.detach()).requires_grad_(True)
        (r,) = torch.autograd.grad(spec.nll_sum(leaf, targets), leaf)
    scale = _unit_scale(r)
    ext.__dict__[_RESIDUAL] = 1 / scale
    return _GradientOf.apply(output, (r * scale).to(output.dtype))


@contextmanager
def _upcast_input(module: nn.Module) -> Iterator[torch.dtype | None]:
    """``module.input0`` as a float32 copy for the block where it is 16-bit (put back after);
    yields its 16-bit dtype, else ``None``."""
    own = module.__dict__
    saved = own.get("input0")
    if not (isinstance(saved, Tensor) and is_sixteen(saved.dtype)):
        yield None
        return
    own["input0"] = saved.float()
    try:
        yield saved.dtype
    finally:
        own["input0"] = saved


def _upcasting(
    rule: Callable[..., Any],
    unscale: bool = False,
    gradient: tuple[Any, str] | None = None,
    columns: bool = False,
) -> Callable[..., Any]:
    """``rule(ext, module, g_inp, g_out, backproped)`` on float32 copies of 16-bit tensors
    (``module.input0`` included, put back after). ``unscale``: divide the result by the square
    of the loss factors' scale (:func:`_scaled_loss_factors`). ``gradient``: (the rule's
    derivatives, the parameter's name): also store the parameter's float32 gradient
    (:data:`GRAD32`). ``columns``: multiply the result's ``(V, n, ...)`` square-root factors by
    their columns' scales (:func:`_scaled_sqrt_columns`)."""

    def upcast_rule(
        ext: BackpropExtension, module: nn.Module, g_inp: Any, g_out: Any, backproped: Any
    ) -> Any:
        with _upcast_input(module):
            g_inp, g_out = _upcast_all(g_inp), _upcast_all(g_out)
            value = rule(ext, module, g_inp, g_out, _upcast_all(backproped))
            if gradient is not None:
                derivatives, name = gradient
                summed = derivatives.param_mjp(name, module, g_inp, g_out, g_out[0])
                getattr(module, name).__dict__[GRAD32] = summed
        if columns:
            up = ext.__dict__.get(_COLUMNS)
            if up is None or not isinstance(value, Tensor):
                return value
            return value * up.reshape(*up.shape, *[1] * (value.ndim - up.ndim))
        scale = ext.__dict__.get(_SCALE) if unscale else None
        # divided twice: a scale above 2^64 (factors below 2^-64, examples at a margin of 89)
        # has its square inf in float32, and made the diagonal exactly 0 (found in review s19)
        return value if scale is None else value / scale / scale

    return upcast_rule


def _signed_sum(backproped: dict, diagonal: Callable[[Tensor], Tensor], like: Tensor) -> Tensor:
    """``sum_k sign_k diagonal(S_k)`` over DiagHessian's backpropagated factors ``S_k``, summed
    in the factors' dtype (BackPACK's rules sum into ``zeros_like(weight)``: 16-bit)."""
    total = None
    for S, sign in zip(backproped["matrices"], backproped["signs"]):
        part = diagonal(S) * sign  # a sign of a 16-bit pass: a 0-dim tensor, with its unscale
        total = part if total is None else total.add_(part)
    return torch.zeros_like(like, dtype=upcast(like).dtype) if total is None else total


class _DiagHLinear(diag_h_linear.DiagHLinear):
    """BackPACK's Hessian-diagonal rule of ``nn.Linear``, summing in float32 for 16-bit models."""

    def bias(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, bp: dict) -> Tensor:
        return _signed_sum(bp, lambda S: linear_utils.extract_bias_diagonal(module, S), module.bias)

    def weight(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, bp: dict) -> Tensor:
        return _signed_sum(
            bp, lambda S: linear_utils.extract_weight_diagonal(module, S), module.weight
        )


class _DiagHConv:
    """BackPACK's Hessian-diagonal rules of convolutions, summing in float32 (a mixin)."""

    def bias(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, bp: dict) -> Tensor:
        return _signed_sum(bp, lambda S: conv_utils.extract_bias_diagonal(module, S), module.bias)

    def weight(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, bp: dict) -> Tensor:
        X = conv_utils.unfold_input(module, module.input0)
        return _signed_sum(
            bp, lambda S: conv_utils.extract_weight_diagonal(module, X, S), module.weight
        )


class _DiagHConv1d(_DiagHConv, diag_h_conv1d.DiagHConv1d):
    pass


class _DiagHConv2d(_DiagHConv, diag_h_conv2d.DiagHConv2d):
    pass


_FLOAT32_DIAG_H: dict[type[nn.Module], type[ModuleExtension]] = {
    nn.Linear: _DiagHLinear,
    nn.Conv1d: _DiagHConv1d,
    nn.Conv2d: _DiagHConv2d,
}
"""The layers BackPACK's ``DiagHessian`` computes parameter diagonals for (of those curvlab hands
it), with rules that sum in the factors' dtype (float32 for a 16-bit model, see
:func:`_upcast_products`)."""


def _upcast_all(value: Any) -> Any:
    """``value`` (a tensor, or tuples, lists and dicts of them) with 16-bit tensors in float32."""
    if isinstance(value, Tensor):
        return upcast(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_upcast_all(v) for v in value)
    if isinstance(value, dict):
        return {k: _upcast_all(v) for k, v in value.items()}
    return value


class _StableBCEDerivatives(BCELossWithLogitsDerivatives):
    """BackPACK's BCEWithLogits derivatives with the loss Hessian's square root taken as
    ``sqrt(sigmoid(z) sigmoid(-z))`` on float32 (at least) logits.

    BackPACK's ``sqrt(s (1 - s))`` in the logits' dtype is 0 once ``s`` rounds to 1 (``z >= 17``
    in float32, ``z >= 6`` in bfloat16): the exact diagonal GGN and the exact GGN trace of a
    binary classifier that fits its positives were 0 (52% off at bfloat16 ``z ~ 6``).
    """

    def _sqrt_hessian(
        self,
        module: nn.BCEWithLogitsLoss,
        g_inp: tuple[Tensor],
        g_out: tuple[Tensor],
        subsampling: list[int] | None,
    ) -> Tensor:
        self._check_is_default(module)
        self._check_input_dims(module)
        z = upcast(subsample(module.input0, subsampling=subsampling)).unsqueeze(0)
        sqrt_h = (torch.sigmoid(z) * torch.sigmoid(-z)).sqrt()
        if module.reduction == "mean":
            sqrt_h = sqrt_h / module.input0.shape[0] ** 0.5
        return sqrt_h.to(module.input0.dtype)


_STABLE_BCE: dict[type, Callable[[], ModuleExtension]] = {
    bext.DiagGGNExact: lambda: DiagGGNLoss(derivatives=_StableBCEDerivatives()),
    bext.DiagHessian: lambda: DiagHLoss(derivatives=_StableBCEDerivatives()),
    bext.SqrtGGNExact: lambda: SqrtGGNBaseLossModule(_StableBCEDerivatives()),
}
"""The second-order extensions curvlab runs through a BCE loss, and the stable module extension
of the loss for each."""


def _release_extensions() -> None:
    """Drop what the cached extensions saved during the last backward pass (tensors of the
    user's graph), so nothing of a call outlives it."""
    for ext in _EXTENSIONS.values():
        ext.saved_quantities = SavedQuantities()
        ext.__dict__.pop(_SCALE, None)
        ext.__dict__.pop(_COLUMNS, None)
        ext.__dict__.pop(_RESIDUAL, None)


def _field(params: dict[str, nn.Parameter], field: str) -> dict[str, Tensor]:
    """Each parameter's BackPACK field (``.grad`` included); zeros where the loss did not reach.

    Raises:
        Handover: for a parameter with a gradient but no field (see :func:`_unseen`).
    """
    out = {}
    for n, p in params.items():
        v = p.grad if field == "grad" else p.__dict__.get(field)
        if v is None and field != "grad":
            _unseen(n, p, field)
        out[n] = torch.zeros_like(p) if v is None else v
    return out


def _unseen(name: str, p: nn.Parameter, field: str) -> None:
    """Hand over if ``p`` got a gradient that BackPACK's module hooks did not see.

    A parameter that enters the loss once, but not through its module's output (``F.linear(x,
    layer.weight)``, or its module's output unused and the weight used outside), passes the
    forward check; BackPACK then computes nothing for it, and zeros would be wrong.
    """
    if p.grad is not None:
        raise Handover(
            f"parameter '{name}' has a gradient but BackPACK computed no {field} for it: it "
            "enters the loss outside its module (e.g. F.linear(x, layer.weight)), where "
            "BackPACK's module hooks cannot see it"
        )


def _zeros(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    return {n: torch.zeros_like(p) for n, p in params.items()}


def _zero_grads(params: dict[str, nn.Parameter]) -> None:
    for p in params.values():
        p.grad = None


_LOSSES: dict[str, nn.Module] = {}


def _extended_sum_loss(spec: LossSpec) -> nn.Module:
    """A sum-reduction loss of ``spec``'s family with BackPACK's hooks, built once per process.

    The module is curvlab's own (never the user's), so its hooks stay; the tensors BackPACK stores
    on it are removed after every block.
    """
    loss = _LOSSES.get(spec.kind)
    if loss is None:
        loss = sum_loss(spec)
        loss.register_forward_hook(hook_store_io)
        loss.register_full_backward_hook(hook_run_extensions)
        _LOSSES[spec.kind] = loss
    return loss


def sum_loss(spec: LossSpec) -> nn.Module:
    """A fresh sum-reduction loss module of the same family as ``spec``."""
    if spec.kind == "cross_entropy":
        return nn.CrossEntropyLoss(reduction="sum")
    if spec.kind == "mse":
        return nn.MSELoss(reduction="sum")
    return nn.BCEWithLogitsLoss(reduction="sum")


@contextmanager
def _extending(*extensions: Any, retain_graph: bool = False) -> Iterator[None]:
    """``backpack(...)``, with BackPACK's "no rule for this" (``NotImplementedError`` in its
    backward hooks: e.g. an adaptive pooling whose input size is no multiple of its output
    size), its ``AssertionError`` for a backpropagated quantity it lost (an operation between
    layers that its module hooks do not see) and its failure to ``view`` a layer's
    non-contiguous tensor (``DiagHessian`` on a ``channels_last`` CNN with a curved activation)
    turned into a hand-over to the next backend."""
    try:
        with backpack(*extensions, retain_graph=retain_graph):
            yield
    except NotImplementedError as e:
        raise Handover(f"BackPACK has no rule for a module of this model: {e}") from None
    except AssertionError as e:
        if _MISSING_QUANTITY not in str(e):
            raise
        raise Handover(
            "BackPACK's second-order rules lost the quantity they backpropagate: an operation "
            "between the model's layers (a container's own forward, a hook) that its module "
            "hooks do not see"
        ) from None
    except RuntimeError as e:
        if _strided_view_failure(e):
            raise Handover(
                "BackPACK's rules cannot reshape a layer's non-contiguous tensors (a "
                "channels_last model or input: torch.channels_last strides); the next backend "
                "computes it, or use model.to(memory_format=torch.contiguous_format) and "
                "contiguous inputs"
            ) from None
        if _shape_failure(e):
            raise Handover(
                "BackPACK's rules met a tensor of a shape they do not expect while "
                f"backpropagating ({str(e).splitlines()[0]}): an operation between the "
                "model's layers that its module hooks do not see (a slice of a hidden layer "
                "added to another layer's output, h[:, :3]); the next backend computes it"
            ) from None
        raise


_BACKPACK_DIR = os.path.dirname(backpack_package.__file__) + os.sep
_MISSING_QUANTITY = "BackPACK extension expects a backpropagation quantity but it is None"
_VIEW_FAILURE = "view size is not compatible with input tensor's size and stride"


_SHAPE_FAILURES = ("The size of tensor", "shape '", "mat1 and mat2 shapes cannot be multiplied")


def _in_backpack(e: BaseException) -> bool:
    """Whether ``e`` was raised in (or through) BackPACK's own code."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(_BACKPACK_DIR):
            return True
        tb = tb.tb_next
    return False


def _shape_failure(e: RuntimeError) -> bool:
    """Whether ``e`` is torch's shape mismatch inside BackPACK's own rules: a layer's
    backpropagated quantity that does not fit the layer, because something between the layers
    (a slice of a hidden layer added to another's output) changed it out of BackPACK's sight
    (found in review s17: ``backend="backpack"`` raised torch's raw error)."""
    return str(e).startswith(_SHAPE_FAILURES) and _in_backpack(e)


def _strided_view_failure(e: RuntimeError) -> bool:
    """Whether ``e`` is torch's ``view`` refusing a strided tensor inside BackPACK's own code."""
    return str(e).startswith(_VIEW_FAILURE) and _in_backpack(e)
