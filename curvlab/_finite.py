"""Non-finite values (NaN, infinity): one error type and the checks every entry point shares.

A single NaN in the inputs or the parameters turns every curvature quantity into NaN, or makes a
linear-algebra routine fail far from the cause ("linalg.eigh: The algorithm failed to converge",
"probability tensor contains either inf, nan or element < 0"). curvlab checks what it is given
once per call, before the expensive work, and raises :class:`NonFiniteError` naming the culprit:

* :func:`check_batch_finite`: the floating-point inputs and targets of batch ``k`` (called where
  ``data`` is normalised, :func:`curvlab._data.iter_batches`);
* :func:`check_parameters_finite`: the model's parameters, by ``named_parameters()`` name;
* :func:`check_products_finite`: curvature products of an estimator, by step;
* :func:`check_values_finite`: the entries of a result, by name.

Each check synchronises with the device once per call (per batch for the data). The regularisers
and the noise samplers' one-pass captures never call them; a noise sampler's separate curvature
pass (``NoisyOptimizer.step(inputs=, targets=)``, the ``"mc"``/``"exact"`` kinds, a model with a
LayerNorm or an Embedding) calls them through the engine on every measuring step
(docs/noise.md, "Host reads in a step").

Example:
    >>> import torch
    >>> try:
    ...     check_parameters_finite({"0.weight": torch.tensor([1.0, float("nan")])})
    ... except NonFiniteError as exc:
    ...     print(str(exc).split(";")[0])
    parameter '0.weight' holds 1 non-finite value (NaN or inf)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "NonFiniteError",
    "all_finite",
    "check_batch_finite",
    "check_parameters_finite",
    "check_products_finite",
    "check_values_finite",
    "raise_product",
]


class NonFiniteError(FloatingPointError, ValueError):
    """NaN or infinity where curvlab needs finite numbers; the message names where.

    A subclass of both ``FloatingPointError`` and ``ValueError``, so either ``except`` catches it.
    """


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one host synchronisation per device
    (two where a sum of finite values overflows)."""
    floats = [
        t for t in tensors if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())
    ]
    if not floats:
        return True
    if all(t.device.type == "cpu" and not t.is_complex() for t in floats):
        # No device to synchronise with: each tensor's sum is read on the host and added in
        # float64, which no float32 sums overflow (about half the cost of adding on the tensors).
        # A NaN or infinity anywhere makes its tensor's sum non-finite, so a finite total proves
        # every entry finite; a non-finite one may be an overflow within a tensor's own sum, so
        # each tensor is then checked exactly.
        if math.isfinite(sum([t.detach().sum().item() for t in floats])):
            return True
        return all(bool(torch.isfinite(t.detach()).all()) for t in floats)
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in floats:
        by_device.setdefault(t.device, []).append(t)
    for group in by_device.values():
        # A NaN or infinity anywhere makes the sum non-finite, so a finite sum proves every entry
        # finite (sums are 4-5x cheaper than isfinite on the CPU). A non-finite sum may also be an
        # overflow of finite values: then each tensor is checked exactly.
        total = group[0].detach().sum()
        for t in group[1:]:
            total = total + t.detach().sum()
        if bool(torch.isfinite(total)):
            continue
        flags = torch.stack([torch.isfinite(t.detach()).all() for t in group])
        if not bool(flags.all()):
            return False
    return True


def _count(t: Tensor) -> str:
    bad = int((~torch.isfinite(t.detach())).sum())
    return f"{bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf)"


def check_batch_finite(inputs: Tensor | Mapping[str, Tensor], targets: Tensor, index: int) -> None:
    """Raise :class:`NonFiniteError` if the floating-point inputs or targets of a batch are not finite.

    Args:
        inputs: a Tensor or a mapping of Tensors (integer tensors such as token ids are skipped).
        targets: the batch's targets.
        index: the batch's position in ``data`` (named in the message).
    """
    named = {"inputs": inputs} if isinstance(inputs, Tensor) else dict(inputs)
    named = {**named, "targets": targets}
    if all_finite(list(named.values())):
        return
    for key, t in named.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            what = key if isinstance(inputs, Tensor) or key == "targets" else f"inputs[{key!r}]"
            raise NonFiniteError(
                f"the {what} of batch {index} of data hold {_count(t)}; curvature of non-finite "
                "data is undefined: clean or drop those examples (e.g. torch.nan_to_num, or keep "
                "rows where torch.isfinite(x).all(dim=1))"
            )


def check_parameters_finite(params: Mapping[str, Tensor], where: str | None = None) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter that holds NaN or infinity.

    Args:
        params: parameters by ``model.named_parameters()`` name (or a ``state_dict``).
        where: where they come from (e.g. ``"checkpoint 'step100.pt'"``), named in the message.
    """
    if all_finite(list(params.values())):
        return
    for name, p in params.items():
        if not (isinstance(p, Tensor) and p.is_floating_point()):
            continue
        if not bool(torch.isfinite(p.detach()).all()):
            of = f" of {where}" if where else ""
            raise NonFiniteError(
                f"parameter '{name}'{of} holds {_count(p)}; every curvature quantity of this model "
                "would be NaN. The training that produced it diverged: use an earlier checkpoint, "
                "a smaller learning rate or gradient clipping"
            )


def check_products_finite(
    products: Tensor, what: str, step_offset: int = 0, op: object | None = None
) -> None:
    """Raise :class:`NonFiniteError` if a column of ``products`` (one product per column) is not.

    Args:
        products: ``(D, k)`` products, ``k`` steps side by side, or a ``(k,)`` tensor of one
            number per step (e.g. ``z^T A z`` per probe).
        what: what the products are (``"the Hessian-vector product"``), named in the message.
        step_offset: the step number of the first column.
        op: the operator that made them: its dtype and kind are named (see
            :func:`raise_product`); without it, ``products.dtype`` is named. Pass it wherever
            ``products`` are not in the operator's dtype (float64 sums ``z^T A z`` of a float32
            operator were said to overflow float64, found in review s22).
    """
    if bool(torch.isfinite(products).all()):
        return
    cols = products if products.ndim == 1 else products.reshape(-1, products.shape[-1]).T
    bad = [j for j in range(cols.shape[0]) if not bool(torch.isfinite(cols[j]).all())]
    raise_product(what, step_offset + (bad[0] if bad else 0), products.dtype, op=op)


def check_operator_products(products: list[Tensor] | Tensor) -> None:
    """Raise :class:`NonFiniteError` if an operator's products hold NaN or inf.

    With finite parameters (checked at build) and inputs, a non-finite product comes from the
    model's forward on some example (a ``log`` of a negative feature, a float32 ``exp`` that
    overflows, 0/0 in a custom layer) or from a curvature that overflows the dtype.
    """
    if all_finite(products if isinstance(products, list) else [products]):
        return
    raise NonFiniteError(
        "the curvature operator's product is not finite (NaN or inf) although the parameters "
        "are: the model's output, loss or their derivatives are not finite on some example of "
        "the data (a log of a negative value, an overflowing exp, 0/0 in a custom layer), or "
        "the curvature overflows in this dtype. Check the loss of each batch (and of each "
        "example), or use float64 (model.double() and float64 inputs)"
    )


def raise_product(
    what: str, step: int, dtype: torch.dtype | None = None, *, op: object | None = None
) -> None:
    """Raise the :class:`NonFiniteError` of a non-finite product at ``step``.

    ``op``: the operator (its ``dtype`` replaces ``dtype``, the products' otherwise; a float64
    one is not told to use float64). The product of a
    :class:`~curvlab.operators.CurvatureOperator` (or of curvlab's wrapper of one), whose
    inputs and parameters were checked, overflowed: the loss is to be rescaled. That of any
    other operator (a :class:`~curvlab.estimators.TensorOperator`, your own) has a NaN or inf
    entry in its matrix or overflowed its dtype, and nothing is said of a loss (found in review
    s22: a float32 matrix whose products overflow float32, or one with a NaN entry, was said to
    overflow float64 "although the inputs and parameters are" finite, with "Rescale the loss").
    """
    if op is not None:
        dtype = op.dtype  # type: ignore[attr-defined]
    name = "this dtype" if dtype is None else str(dtype).removeprefix("torch.")
    wide = dtype == torch.float64
    if op is not None and not _of_a_model(op):
        raise NonFiniteError(
            f"{what} {step} is not finite (NaN or inf): the operator ({type(op).__name__}, "
            f"{name}) holds a NaN or inf entry, or its product overflows {name}. Check its "
            "entries (torch.isfinite(A).all()) or divide it by a constant"
            + ("" if wide else ". Use float64 (A.double()) where its entries are finite")
        )
    way_out = (
        "Rescale the loss (reduction='mean', or divide it by a constant)"
        if wide
        else "Use float64 (model.double() and float64 inputs) or rescale the loss "
        "(reduction='mean')"
    )
    raise NonFiniteError(
        f"{what} {step} is not finite (NaN or inf) although the inputs and parameters "
        f"are: the curvature overflows {name}. {way_out}"
    )


def _of_a_model(op: object) -> bool:
    """Whether ``op`` is a :class:`~curvlab.operators.CurvatureOperator` or one of curvlab's
    wrappers of one (``op.op``, e.g. the preconditioned operator of the sharpness)."""
    from curvlab.operators._base import CurvatureOperator  # not at import: it imports this

    for _ in range(8):  # a wrapper of a wrapper, at most a few deep
        if isinstance(op, CurvatureOperator):
            return True
        if not type(op).__module__.startswith("curvlab."):
            return False
        op = getattr(op, "op", None)
    return False


def check_values_finite(values: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first entry of a result that holds NaN or inf.

    Synchronises with the device once: for analysis results, not inside training steps.
    """
    if all_finite(list(values.values())):
        return
    for name, value in values.items():
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteError(
                f"{what} of '{name}' is not finite (NaN or inf): check the model's parameters and "
                "inputs for non-finite values, or use float64 / a smaller learning rate"
            )
