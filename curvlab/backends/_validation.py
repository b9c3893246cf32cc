"""Up-front checks that a model can be handled, raised before any expensive work."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from curvlab._scan import ModelScan, scan_model
from curvlab.backends._layers import overridden

__all__ = ["check_batchnorm", "check_no_train_batchnorm", "validate_model", "SUPPORTED_MODULES"]

_PARAMETRIC = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
_PARAMETER_FREE = (
    nn.ReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.LogSigmoid,
    nn.Dropout,
    nn.Identity,
    nn.Flatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.ZeroPad2d,
)
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = _PARAMETRIC + _PARAMETER_FREE
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)


def _names(types: tuple[type, ...]) -> str:
    return ", ".join(t.__name__ for t in types)


def check_batchnorm(scan: ModelScan) -> None:
    """Raise for a BatchNorm in train mode or without running statistics (it normalises with the
    batch's statistics, coupling the examples), which no backend can compute per example.

    Raises:
        ValueError: naming the module, with the fix (``model.eval()``).
        ValueError: for a model without trainable parameters.
    """
    _no_train_batchnorm(scan.modules)
    if not scan.trainable:
        raise ValueError("model has no trainable parameters (all have requires_grad=False)")


def _no_train_batchnorm(modules: Iterable[tuple[str, nn.Module]]) -> None:
    for name, module in modules:
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        where = f"{type(module).__name__} at '{name or '<root>'}'"
        if module.training:
            raise ValueError(
                f"{where} is in train mode: it couples the examples of a batch, so per-example "
                "and second-order quantities are undefined; call model.eval() first"
            )
        if module.running_mean is None or module.running_var is None:
            raise ValueError(
                f"{where} has no running statistics (track_running_stats=False), so it normalises "
                "with the batch's statistics also in eval mode: it couples the examples of a "
                "batch, so per-example and second-order quantities are undefined; use a "
                "BatchNorm that tracks running statistics (or LayerNorm/GroupNorm)"
            )


def _unlike_backpack(module: nn.Module, second_order: bool) -> str | None:
    """Why a module of a supported class computes something BackPACK's rule for the class does not
    (its rules look at the class and a few attributes), or ``None``.

    A subclass with its own ``forward``; convolutions padding other than with explicit zeros
    (``padding_mode`` ``"circular"``/``"reflect"``/``"replicate"``, ``padding="same"``: BackPACK
    unfolds with zeros; ``padding="valid"`` is padding 0, which the backend hands BackPACK as
    integers); for second-order quantities (which go through every module's rule) also
    parameter-free subclasses with their own ``forward`` and average pooling with
    ``divisor_override``, ``count_include_pad=False`` or ``ceil_mode=True`` (a partial last
    window: BackPACK's transposed convolution cannot produce the input's size and torch raises).
    """
    own = overridden(module)  # Linear, Conv, BatchNorm: forward (and _conv_forward)
    if own is not None:
        return own
    for cls in _PARAMETER_FREE if second_order else ():
        if isinstance(module, cls):
            if type(module).forward is not cls.forward:
                return f"{type(module).__name__} overrides {cls.__name__}.forward()"
            break
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and (
        module.padding == "same" or module.padding_mode != "zeros"
    ):
        return (
            f"padding={module.padding!r} with padding_mode={module.padding_mode!r} (BackPACK "
            "unfolds with explicit zero padding only)"
        )
    if second_order and isinstance(module, (nn.AvgPool1d, nn.AvgPool2d)):
        if getattr(module, "divisor_override", None) is not None:
            return f"divisor_override={module.divisor_override}"
        if not module.count_include_pad:
            return "count_include_pad=False"
        if module.ceil_mode:
            return "ceil_mode=True (no rule for a partial last window)"
    return None


def check_no_train_batchnorm(model: nn.Module) -> None:
    """:func:`check_batchnorm`'s BatchNorm test alone, without a model scan (a training step's
    check): a BatchNorm in train mode, or without running statistics, couples the examples, also
    one without parameters of its own (``affine=False``) that no layer hook sees.

    Raises:
        ValueError: naming the module, with the fix (``model.eval()``).
    """
    _no_train_batchnorm(model.named_modules())


def validate_model(
    model: nn.Module,
    second_order: bool = True,
    hessian: bool = False,
    scan: ModelScan | None = None,
) -> None:
    """Check every module of ``model`` before any computation.

    Args:
        model: the user's model.
        second_order: whether the quantity backpropagates curvature through every module
            (then parameter-free modules must be supported too).
        hessian: whether the exact Hessian diagonal is asked for (BatchNorm is not supported there).
        scan: the model's :func:`~curvlab._scan.scan_model`, if the caller has one already.

    Raises:
        TypeError: naming the path and type of a module that cannot be handled.
        ValueError: for BatchNorm in train mode or a model without trainable parameters.
    """
    if scan is None:
        scan = scan_model(model)
    check_batchnorm(scan)
    for name, module in scan.modules:
        path = name or "<root>"
        if isinstance(module, _BATCHNORM) and hessian:
            raise TypeError(
                f"{type(module).__name__} at '{path}' is not supported for the Hessian "
                "diagonal; use diag_fisher(kind='exact') (the GGN) or remove the module"
            )
        if any(child is not None for child in module._modules.values()):
            own = [n for n, p in module._parameters.items() if p is not None and p.requires_grad]
            if own:
                raise TypeError(
                    f"module '{path}' ({type(module).__name__}) owns parameters {own} directly; "
                    f"curvlab supports parameters only in {_names(_PARAMETRIC)} layers. Move "
                    "them into such a layer, or set requires_grad=False to freeze them"
                )
            continue
        if isinstance(module, SUPPORTED_MODULES):
            why = _unlike_backpack(module, second_order)
            if why is not None:
                raise TypeError(
                    f"module '{path}' ({type(module).__name__}): {why}; BackPACK's rules for "
                    "this class do not model that"
                )
            continue
        trainable = any(p is not None and p.requires_grad for p in module._parameters.values())
        if trainable or second_order:
            raise TypeError(
                f"module '{path}' of type {type(module).__name__} is not supported by the BackPACK "
                f"backend. Supported layers: {_names(_PARAMETRIC)}; parameter-free modules: "
                f"{_names(_PARAMETER_FREE)}. Replace the module or freeze it "
                "(requires_grad=False, first-order quantities only)"
            )
    if hessian and not scan.sequential:
        raise TypeError(
            f"the exact Hessian diagonal on BackPACK needs a plain nn.Sequential chain, but in "
            f"the {type(model).__name__} {scan.not_chain} (e.g. residual connections), for "
            "which BackPACK's DiagHessian has no rule; use backend='func' (or the default "
            "backend), diag_fisher(kind='exact') (the GGN) or cl.trace(..., matrix='hessian')"
        )
