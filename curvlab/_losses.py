"""The loss objects: everything curvlab needs to know about the user's loss function.

curvlab supports ``CrossEntropyLoss``, ``MSELoss`` and ``BCEWithLogitsLoss`` with ``reduction="mean"``
or ``"sum"``. Each is, up to a constant, a sum of per-example negative log-likelihoods
``NLL_n(f_n, y_n)`` of the model output ``f_n``:

* ``CrossEntropyLoss``: categorical likelihood with logits ``f_n`` (class dimension 1, or the last
  dimension in the GPT layout below), ``NLL_n = sum over positions t of -log softmax(f_nt)[y_nt]``,
  positions whose label is ``ignore_index`` left out;
* ``MSELoss``: Gaussian likelihood with variance 1/2, ``NLL_n = sum_k (f_nk - y_nk)^2`` (+ const);
* ``BCEWithLogitsLoss``: independent Bernoulli likelihoods with logits ``f_n``.

With ``M`` the number of loss terms over all the data (non-ignored positions for cross-entropy,
output entries for MSE/BCE) the objective is ``L = w * sum_n NLL_n`` with ``w = 1/M`` under
``"mean"`` and ``w = 1`` under ``"sum"``: exactly what ``loss_fn`` computes on all the data at once.
Example ``n``'s share under the mean convention (``L = (1/N) sum_n l_n``) is ``l_n = (N/M) NLL_n``;
without ``ignore_index`` that is ``NLL_n / c`` with ``c = M/N`` terms per example. The Monte-Carlo
Fisher samples ``y_hat ~ p(y | f_n)`` and uses ``w * grad NLL_n(y_hat) grad NLL_n(y_hat)^T``, whose
expectation is the generalised Gauss-Newton matrix of ``L``.

**GPT layout.** ``CrossEntropyLoss`` with logits ``(B, T, C)`` and integer targets ``(B, T)`` works
as it is: when the targets' shape is the logits' shape without the last axis and torch's own
class-axis-1 layout does not fit, the last axis holds the classes (:meth:`LossSpec.prepare` moves it
to axis 1). A sequence is one example. A batch with ``T == C`` fits both layouts: within one
computation (one :class:`LossSpec`) it follows the layout an earlier batch decided, else torch's;
:func:`classes_last` says the classes are last outright.

Example:
    >>> import torch
    >>> spec = loss_spec(torch.nn.CrossEntropyLoss(ignore_index=-100))
    >>> logits, y = torch.randn(2, 5, 7), torch.tensor([[1, 2, 3, -100, -100], [0, 1, 2, 3, 4]])
    >>> spec.prepare(logits, y).shape  # GPT layout: classes moved to axis 1
    torch.Size([2, 7, 5])
    >>> int(spec.count(spec.prepare(logits, y), y))  # the non-ignored tokens
    8
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from curvlab._compiled import _optimized_module
from curvlab._data import autocast_enabled
from curvlab._finite import NonFiniteError
from curvlab._precision import accumulation_dtype, upcast
from curvlab._scan import _foreign
from curvlab._stable_nll import stable_bce_with_logits, stable_cross_entropy
from curvlab._warn import user_stacklevel

__all__ = [
    "LossSpec",
    "loss_spec",
    "classes_last",
    "AmbiguousLayoutWarning",
    "LOSS_FAMILIES",
    "DRAWN_IGNORE",
    "check_counted",
]

DRAWN_IGNORE = -100
"""The label that marks an ignored position in labels *drawn from the model*.

Drawn labels are always classes, never "ignored": with ``CrossEntropyLoss(ignore_index=0)`` a drawn
``0`` is a real draw of class 0. The positions the data ignores carry this label instead (never a
class index), and drawn labels are scored with ``nll_sum(..., drawn=True)``, which ignores exactly
it. With the default ``ignore_index=-100`` both conventions coincide.
"""

CLASSES_LAST = "curvlab_classes_last"
"""An attribute that, set true on a ``CrossEntropyLoss``, says its logits hold the classes in the
last axis (``(B, T, V)`` against targets ``(B, T)``) even where torch's layout would also fit
(``T == V``): curvlab's own causal-LM loss (:mod:`curvlab.analysis.hf`) sets it."""


class AmbiguousLayoutWarning(UserWarning):
    """Logits ``(B, T, C)`` with ``T == C`` against targets ``(B, T)`` fit both layouts; read in
    torch's (classes in axis 1) unless the loss is marked with :func:`classes_last`."""


def check_counted(spec: LossSpec, total: float) -> None:
    """Raise when ``total`` (the data's counted loss terms) is 0 under ``"mean"``: every target
    is ``ignore_index``, so the mean loss is 0/0 (torch's ``NaN``)."""
    if total == 0 and spec.reduction == "mean":
        raise ValueError(
            f"every target of the data is ignore_index={spec.ignore_index}: the mean loss is "
            "undefined (0/0); pass data with at least one counted label"
        )


def no_terms_error(spec: LossSpec, what: str) -> ValueError:
    """The error for per-example statistics of data whose every label is ``ignore_index``.

    Gradient statistics use the mean convention, ``g_n = grad NLL_n / c`` whatever the
    reduction (docs/conventions.md); ``c = M/N = 0`` leaves them undefined (0/0), as
    :func:`check_counted` says of the mean loss. Under ``"sum"`` the pass does not raise itself
    (the loss, a sum of nothing, is 0): ``noise_scale = inf``, ``trace_covariance = 0`` and a
    misleading ``NonFiniteError`` came out instead (found in review).

    Args:
        spec: the loss.
        what: whose per-example gradients, e.g. ``"gradient_stats'"``.
    """
    return ValueError(
        f"every target of the data is ignore_index={spec.ignore_index}: {what} per-example "
        "gradients g_n = grad NLL_n / c (the mean convention, whatever the reduction) are "
        "undefined (0/0) with c = M/N = 0 loss terms per example; pass data with at least one "
        "counted label"
    )


def raise_invalid_labels(spec: LossSpec, bad: int, classes: int) -> None:
    """The error for ``bad`` class indices out of ``[0, classes)`` that are not ignored."""
    if bad:
        raise ValueError(
            f"{bad} target(s) are neither a class index in [0, {classes}) nor "
            f"ignore_index={spec.ignore_index}: a void label (e.g. 255 in segmentation) must be "
            "the loss's ignore_index (nn.CrossEntropyLoss(ignore_index=255)) or be mapped to it"
        )


def name_invalid_labels(spec: LossSpec, output: Tensor, targets: Tensor, exc: Exception) -> None:
    """Raise curvlab's error for class indices out of range in place of torch's ``IndexError``
    ("Target 3 is out of bounds.", which names neither the fix nor ``ignore_index``); does
    nothing when the labels are in range (``exc`` is then another error). One host
    synchronisation, on this error path only."""
    bad = spec.invalid_labels(output, targets)
    if bad is not None and int(bad):
        try:
            raise_invalid_labels(spec, int(bad), output.shape[1])
        except ValueError as named:
            raise named from exc


def loss_module(loss_fn: object) -> object:
    """The loss module inside any ``torch.compile`` wrappers of ``loss_fn`` (``_orig_mod``, as
    often as it is nested); ``loss_fn`` itself when it is none.

    Every test of what kind of loss curvlab was given (``isinstance(..., nn.CrossEntropyLoss)``)
    reads this module: the wrapper is an ``OptimizedModule``, and a compiled cross-entropy read as
    "not cross-entropy" skipped the encoder-decoder layout marking of the HF callback (found in
    review s17: T5's loss 2.786972 measured for the trainer's 2.458616) and failed the noise
    samplers' separate pass with the wrong culprit.

    Example:
        >>> import torch
        >>> ce = torch.nn.CrossEntropyLoss()
        >>> loss_module(ce) is ce
        True
    """
    return _compiled_chain(loss_fn)[-1]


def _compiled_chain(loss_fn: object) -> list[Any]:
    """``[loss_fn, loss_fn._orig_mod, ...]``: the ``torch.compile`` wrappers, then the module."""
    chain = [loss_fn]
    optimized = _optimized_module()
    while optimized is not None and isinstance(chain[-1], optimized):
        chain.append(chain[-1]._orig_mod)
    return chain


def classes_last(loss_fn: nn.Module) -> nn.Module:
    """``loss_fn`` marked as holding the classes in the last axis of the logits (GPT layout).

    Logits ``(B, T, C)`` against targets ``(B, T)`` are read in the GPT layout when torch's own
    layout (classes in axis 1) does not fit; a batch whose length ``T`` equals the number of
    classes ``C`` fits both, and follows the layout an earlier batch of the same computation
    decided, else torch's. Marked, every batch of class indices is read with the classes last;
    class-probability targets, which curvlab reads in torch's layout only, are refused with a
    marked loss (move the class axis to 1, or flatten to ``(B*T, C)``). The marker
    (:data:`CLASSES_LAST`) is read by curvlab only; torch's own ``loss_fn(logits, y)`` still
    takes the classes in axis 1, as it always does.

    Args:
        loss_fn: an ``nn.CrossEntropyLoss``, or a ``torch.compile`` wrapper of one (the copy is
            then a wrapper, compiled the same way, of a marked copy of the module inside it).

    Returns:
        A shallow copy of ``loss_fn`` carrying the marker (``loss_fn`` is left as it is).

    Raises:
        TypeError: if ``loss_fn`` is not an ``nn.CrossEntropyLoss`` (or a compiled one).

    Example:
        >>> import torch, curvlab as cl
        >>> loss_fn = cl.classes_last(torch.nn.CrossEntropyLoss())
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
        >>> ids = torch.randint(0, 10, (2, 4))  # T == C == 4: both layouts would fit
        >>> d = cl.diag_fisher(model, loss_fn, (ids, ids % 4))
    """
    chain = _compiled_chain(loss_fn)
    inner = chain[-1]
    if not isinstance(inner, nn.CrossEntropyLoss):
        wrapped = f" (compiled: torch.compile of {type(inner).__name__})" if len(chain) > 1 else ""
        raise TypeError(
            f"classes_last marks a nn.CrossEntropyLoss, got {type(loss_fn).__name__}{wrapped}: "
            "only cross-entropy has a class axis"
        )
    marked = copy.copy(inner)
    setattr(marked, CLASSES_LAST, True)
    for wrapper in reversed(chain[:-1]):  # rewrap: the user's wrappers keep their module
        marked = _rewrapped(wrapper, marked)
    return marked


def _rewrapped(wrapper: nn.Module, module: nn.Module) -> nn.Module:
    """A shallow copy of the ``torch.compile`` wrapper ``wrapper`` around ``module`` (its own
    ``_modules``, so ``wrapper`` keeps its module; its forward bound to ``module``)."""
    copied = copy.copy(wrapper)
    object.__setattr__(copied, "_modules", dict(wrapper._modules))
    copied._modules["_orig_mod"] = module
    initialize = getattr(type(copied), "_initialize", None)
    if callable(initialize):  # binds forward to module.__call__ under the same compile settings
        initialize(copied)
    return copied


_SUPPORTED = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)
LOSS_FAMILIES = {
    nn.CrossEntropyLoss: "cross_entropy",
    nn.MSELoss: "mse",
    nn.BCEWithLogitsLoss: "bce",
}


@dataclass(frozen=True)
class LossSpec:
    """What curvlab needs to know about a validated loss function (one object per call).

    Attributes:
        loss_fn: the user's loss module (unchanged; the module inside a ``torch.compile``
            wrapper).
        kind: ``"cross_entropy"``, ``"mse"`` or ``"bce"``.
        reduction: ``"mean"`` or ``"sum"``.
        ignore_index: the label cross-entropy leaves out (``None`` for MSE/BCE).
    """

    loss_fn: nn.Module
    kind: str
    reduction: str
    ignore_index: int | None = None
    _layout: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    """What :meth:`gpt_layout` decided so far: ``"gpt"`` the shapes of the first batch that
    fitted only the GPT layout, ``"ambiguous"`` those of the first batch that fitted both and was
    read in torch's (exchanged between ranks: :meth:`layout_counts`)."""
    global_hooks: tuple[str, ...] = field(default=(), repr=False, compare=False)
    """The global module forward (pre-)hooks of the user's (``register_module_forward_hook``,
    ``register_module_forward_pre_hook``) that apply to the loss module too: checked once, on the
    whole first batch with a counted target (:meth:`check_shapes`), for leaving
    ``loss_fn(output, targets)`` as it is."""
    _hooks_checked: list[bool] = field(default_factory=list, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ layout
    def gpt_layout(self, output: Tensor, targets: Tensor) -> bool:
        """Whether ``output`` holds the classes in its last axis (see the module docstring).

        Decided consistently for this object (one per computation): a batch that fits both
        layouts (``T == C``) follows a batch that fitted only the GPT layout before it, else
        torch's layout. Deciding per batch mixed the two in one objective under dynamic padding
        (found in review: an exact Hessian trace 0.826 for 1.462).

        Raises:
            ValueError: for a batch that fits only the GPT layout after one that fitted both
                was read in torch's layout (the objective would mix the two): mark the loss
                with :func:`classes_last`; and for class-probability targets of a loss marked
                with :func:`classes_last`, which are read in torch's layout only.
        """
        if self.kind != "cross_entropy" or output.ndim < 3:
            return False
        marked = getattr(self.loss_fn, CLASSES_LAST, False)
        if targets.is_floating_point():  # class probabilities: torch's layout only
            if marked:  # the marker promises the classes last: never read them in axis 1
                raise ValueError(
                    f"the loss is marked with curvlab.classes_last (the classes in the last axis "
                    f"of the logits {tuple(output.shape)}), but got class-probability targets "
                    f"{tuple(targets.shape)}, which curvlab reads in torch's layout only (the "
                    "classes in axis 1, shaped like the logits): it would not read them with the "
                    "classes last. Move the class axis of the logits and the targets to axis 1 "
                    "(the model returns logits.movedim(-1, 1); targets q.movedim(-1, 1)), or "
                    "flatten both to (B*T, C) (each position then one example), and pass the "
                    "unmarked loss; class indices (B, T) work with the marker as they are"
                )
            return False
        gpt_fits = tuple(targets.shape) == tuple(output.shape[:-1])
        if marked:  # told, not guessed (T == V is ambiguous)
            return gpt_fits
        torch_fits = tuple(targets.shape) == (output.shape[0], *output.shape[2:])
        if gpt_fits and torch_fits:  # T == C: the layout an earlier batch decided, else torch's
            if self._layout.get("gpt"):
                return True
            if "ambiguous" not in self._layout:
                self._layout["ambiguous"] = (tuple(output.shape), tuple(targets.shape))
                warnings.warn(
                    f"CrossEntropyLoss got logits {tuple(output.shape)} against targets "
                    f"{tuple(targets.shape)}: the sequence length equals the number of classes, "
                    "so both torch's layout (classes in axis 1) and the GPT layout (classes "
                    "last) fit; curvlab reads torch's, as the loss module itself would. If the "
                    "classes are last (a sequence model whose loop flattens or transposes the "
                    "logits), pass curvlab.classes_last(loss_fn) as the loss",
                    AmbiguousLayoutWarning,
                    stacklevel=user_stacklevel(),
                )
            return False
        if gpt_fits:
            seen = self._layout.get("ambiguous")
            if seen is not None:
                raise ValueError(
                    f"CrossEntropyLoss got logits {tuple(output.shape)} against targets "
                    f"{tuple(targets.shape)}, which hold the classes in the last axis (the GPT "
                    f"layout), but an earlier batch, logits {seen[0]} against targets {seen[1]}, "
                    "fitted torch's layout too (its length equals the number of classes) and was "
                    "read with the classes in axis 1: one objective would mix the two. Say that "
                    "the classes are last: pass curvlab.classes_last(loss_fn) as the loss"
                )
            self._layout.setdefault("gpt", (tuple(output.shape), tuple(targets.shape)))
        return gpt_fits

    def layout_counts(self) -> list[int]:
        """What :meth:`gpt_layout` decided on this rank, as two counts for the all-reduce of a
        computation's counts: ``[a batch that fitted both layouts was read in torch's, a batch
        fitted only the GPT layout]`` (each 0 or 1). After the all-reduce,
        :meth:`check_layout_counts` raises on every rank where the ranks' layouts differ."""
        return [int("ambiguous" in self._layout), int("gpt" in self._layout)]

    def check_layout_counts(self, ambiguous: int, gpt: int) -> None:
        """Raise where the ranks' batches were read in different layouts (the counts of
        :meth:`layout_counts` summed over the ranks; every rank gets the same sums, so every
        rank raises).

        Each rank decides the layout of a cross-entropy loss from its own batches: under dynamic
        padding a rank whose sequences have length ``T == C`` read torch's layout while a rank
        with another length read the GPT layout, and the all-reduce added the two objectives
        (found in review s19: an exact Hessian trace 1.29096 for 1.66084, silently). One process
        refuses that mix (:meth:`gpt_layout`); under ``torch.distributed`` every rank now
        refuses it too, with the same advice.

        Raises:
            ValueError: where some rank read an ambiguous batch in torch's layout and some rank
                saw a batch that fits only the GPT layout.
        """
        if not (ambiguous and gpt):
            return
        mine = self._layout.get("ambiguous") or self._layout.get("gpt")
        here = ""
        if mine is not None:
            which = (
                "fitted both layouts"
                if "ambiguous" in self._layout
                else "fitted only the GPT layout"
            )
            here = f"; this rank's batch, logits {mine[0]} against targets {mine[1]}, {which}"
        raise ValueError(
            "CrossEntropyLoss under torch.distributed: a rank's batch held the classes in the "
            "last axis (the GPT layout, its length differs from the number of classes), while "
            "another rank's batch fitted torch's layout too (its length equals the number of "
            f"classes) and was read with the classes in axis 1{here}: one objective would mix "
            "the two (every rank raises this error). Say that the classes are last: pass "
            "curvlab.classes_last(loss_fn) as the loss"
        )

    def prepare(self, output: Tensor, targets: Tensor) -> Tensor:
        """The model output in curvlab's layout: classes in axis 1 (a differentiable view).

        Also checks that ``targets`` fit it (:meth:`check_shapes`; attributes only, no host
        synchronisation, except one for class-probability targets of ``CrossEntropyLoss``, whose
        sums are checked), so every pass raises a clear error before its backward pass.
        """
        if self.gpt_layout(output, targets):
            output = output.movedim(-1, 1)
        self.check_shapes(output, targets)
        return output

    def check_shapes(self, output: Tensor, targets: Tensor) -> None:
        """Raise a clear error when ``targets`` cannot go with ``output`` (after :meth:`prepare`).

        On the first batch of a loss with :attr:`global_hooks` (and each later one until a batch
        shows a value: one with a counted target), also checks that they leave
        ``loss_fn(output, targets)`` as it is (:meth:`_check_global_hooks`).

        Raises:
            ValueError: for targets of the wrong shape (e.g. ``(N, 1)`` class indices for
                logits ``(N, C)``), or class indices for ``MSELoss`` / ``BCEWithLogitsLoss``.
            TypeError: for targets of a dtype the loss cannot take with this output (e.g.
                float class indices: ``y.long()``), and for global module hooks that change
                what the loss module returns.
        """
        self._check_targets(output, targets)
        if self.global_hooks and not self._hooks_checked:
            self._check_global_hooks(output, targets)

    def _check_global_hooks(self, output: Tensor, targets: Tensor) -> None:
        """Raise ``TypeError`` if the user's global module forward (pre-)hooks change what the
        loss module returns, checked on the whole batch (once per :class:`LossSpec`).

        The loss module is called as torch calls it, with the global hooks (its own hooks, which
        :func:`loss_spec` allowed only if curvlab's or BackPACK's, are left out, so no capture
        records the call), and compared with its class's ``forward`` called directly, which no
        hook reaches. Both run the same torch function on the same values, so an unchanged
        result is equal to rounding; a logging hook that returns ``None`` passes (found in
        review s17: every global hook was refused, even such a logger). The whole batch is
        compared: its first example alone passed a doubling hook when its label was
        ``ignore_index`` (NaN against NaN), and every hook whose effect depends on the batch
        size (``out * len(targets)``), silently (found in review s17: an exact Hessian trace
        2.00314 for 4.00628, 1.85119 for 11.10716). A batch that shows nothing (NaN or 0 on both
        sides: no counted target) does not count as checked: the next batch is. Class indices
        out of range are read as ignored here (the pass itself names them). One host
        synchronisation per batch checked, once per computation when the batch shows a value,
        only while such hooks are registered; one copy of the output (the hooks may write into
        their arguments). Under a ``torch.func`` transform (batched or gradient-tracking
        tensors) the check cannot read a value: it waits for a batch outside one.
        """
        if _functorch_wrapped(output) or _functorch_wrapped(targets):
            return
        base = next(b for b, kind in LOSS_FAMILIES.items() if kind == self.kind)
        out, tgt = output.detach(), targets.detach()
        ignore = self.ignore_index
        if ignore is not None and not tgt.is_floating_point() and out.ndim >= 2:
            valid = ((tgt >= 0) & (tgt < out.shape[1])) | (tgt == ignore)
            tgt = torch.where(valid, tgt, ignore)
        probe = copy.copy(self.loss_fn)  # the module without its own hooks: global ones only
        for attr in _MODULE_HOOK_DICTS:
            if attr in vars(probe):
                object.__setattr__(probe, attr, type(vars(probe)[attr])())
        with torch.no_grad():
            try:
                want = base.forward(self.loss_fn, out, tgt)  # no hook runs; reads its inputs
            except (IndexError, RuntimeError, ValueError):
                return  # data the pass itself names: checked on a later batch
            got = probe(out.clone(), tgt.clone())  # a hook may write into its arguments
        same = isinstance(got, Tensor) and got.shape == want.shape and got.dtype == want.dtype
        if same:
            eps = torch.finfo(want.dtype).eps if want.is_floating_point() else 0.0
            close = torch.isclose(got, want, rtol=16 * eps, atol=16 * eps, equal_nan=True).all()
            shows = (want.isfinite() & (want != 0)).all()  # NaN or 0: no target counted
            same, shows = torch.stack([close, shows]).tolist()  # one host read
            if same and not shows:
                return  # nothing to compare: the next batch is checked
        if not same:
            shown = (
                f"{float(got):.6g}"
                if isinstance(got, Tensor) and got.numel() == 1
                else type(got).__name__
            )
            name = type(self.loss_fn).__name__
            raise TypeError(
                f"the global module forward hook(s) {', '.join(self.global_hooks)} "
                f"(register_module_forward_hook / register_module_forward_pre_hook) change what "
                f"the loss module ({name}) returns: on the batch it returned {shown}, its "
                f"formula gives {float(want):.6g}; "
                f"{_IGNORED.format(base=base.__name__)}Remove the hook while curvlab runs (or "
                "let it return None for the loss module), or fold what it does into the model's "
                "output"
            )
        self._hooks_checked.append(True)

    def _check_targets(self, output: Tensor, targets: Tensor) -> None:
        """:meth:`check_shapes` less the global-hook check."""
        got, out = tuple(targets.shape), tuple(output.shape)
        name = type(self.loss_fn).__name__
        if self.kind == "cross_entropy":
            if targets.is_floating_point():
                ok = got == out
            else:
                ok = output.ndim >= 2 and got == (out[0], *out[2:])
            if not ok and targets.is_floating_point() and output.ndim >= 2:
                # the shape of class indices (torch's layout or the GPT one) in a float dtype:
                # labels loaded from a float array; the shape is right, the dtype is not
                index_shapes = ((out[0], *out[2:]), out[:-1] if output.ndim >= 3 else None)
                if got in index_shapes:
                    raise TypeError(
                        f"{name} got targets of shape {got} and dtype {targets.dtype} for logits "
                        f"of shape {out}: shaped like class indices, but class indices must be "
                        "integers; convert them: y.long() (floating-point targets are class "
                        f"probabilities, shaped like the logits {out})"
                    )
            if not ok:
                hint = ""
                if output.ndim >= 2 and got == (out[0], *out[2:], 1):
                    hint = "; here drop the trailing axis of size 1: y.squeeze(-1)"
                raise ValueError(
                    f"{name} got logits of shape {out} and targets of shape {got}: "
                    "targets must be class indices shaped like the logits without the class axis "
                    "(axis 1, or the last axis in the GPT layout (B, T, C) with targets (B, T))"
                    + hint
                )
            if (
                targets.is_floating_point()
                and targets.dtype != output.dtype
                and not autocast_enabled()
            ):
                raise TypeError(
                    f"{name} got class probabilities of dtype {targets.dtype} for logits of "
                    f"dtype {output.dtype}; convert them: y.to({output.dtype})"
                )
            if not targets.is_floating_point() and targets.dtype != torch.int64:
                raise TypeError(
                    f"{name} needs class indices of dtype torch.int64, got {targets.dtype}; "
                    "convert them: y.long()"
                )
            if targets.is_floating_point():
                if self.ignore_index is not None and self.ignore_index >= 0:
                    # torch: "ignore_index is not supported for floating point target"
                    raise ValueError(
                        f"{name}(ignore_index={self.ignore_index}) got class-probability "
                        f"targets (floating point, dtype {targets.dtype}): torch's loss refuses "
                        "them (ignore_index is not supported for floating point target), so "
                        "there is no objective to measure. Pass class indices (y.long(), of "
                        "shape (N, ...)), or construct the loss without ignore_index (torch's "
                        "default -100) for class probabilities"
                    )
                _check_probabilities(name, targets)
            return
        if not targets.is_floating_point():
            raise ValueError(
                f"{name} needs floating-point targets shaped like the outputs {out}, got "
                f"{targets.dtype} targets of shape {got}"
                + (
                    "; these look like class labels: use nn.CrossEntropyLoss (on the command "
                    "line: --loss cross_entropy), or one-hot encode them: F.one_hot(y, C).float()"
                    if got == (out[0],) and output.ndim == 2 and out[1] > 1
                    else ""
                )
            )
        if got != out:
            raise ValueError(
                f"{name} got outputs of shape {out} and targets of shape {got}; they must have "
                "the same shape (reshape the targets, e.g. y.view_as(output)): torch would "
                "broadcast them into a different loss"
            )
        # MSE targets of a wider dtype are scored in it, as torch's own MSELoss promotes them:
        # the Monte-Carlo labels are drawn in float64 (sample_targets), and float64 data targets
        # of a float32 model lose nothing
        wider = self.kind == "mse" and torch.promote_types(output.dtype, targets.dtype) == (
            targets.dtype
        )
        if targets.dtype != output.dtype and not autocast_enabled() and not wider:
            raise TypeError(
                f"{name} got targets of dtype {targets.dtype} for outputs of dtype "
                f"{output.dtype}; convert them: y.to({output.dtype})"
            )

    def terms_per_example(self, output: Tensor) -> int:
        """Number ``c`` of loss terms one example contributes, ignoring ``ignore_index``."""
        per_example = output[0].numel()
        if self.kind == "cross_entropy":
            return per_example // output.shape[1]
        return per_example

    def count(self, output: Tensor, targets: Tensor) -> Tensor | int:
        """Number of loss terms of this batch: non-ignored positions for cross-entropy.

        A Tensor (no host synchronisation) when labels may be ignored, else an ``int``.
        """
        if self.kind == "cross_entropy" and not targets.is_floating_point():
            return (targets != self.ignore_index).sum()
        return output.shape[0] * self.terms_per_example(output)

    def invalid_labels(self, output: Tensor, targets: Tensor) -> Tensor | None:
        """How many class indices are neither in ``[0, C)`` nor ``ignore_index`` (a 0-dim
        tensor, no host synchronisation; ``None`` for other losses and probability targets).

        torch raises for them in the loss itself, but the GGN, the Monte-Carlo Fisher and the
        operators read the labels only for the ignored positions, so a void label 255 with the
        default ``ignore_index=-100`` was counted as a loss term without a class (found in review:
        a GGN trace of 2.7302 for a true 2.8101 with ``ignore_index=255``).
        """
        if self.kind != "cross_entropy" or targets.is_floating_point() or output.ndim < 2:
            return None
        classes = output.shape[1]
        bad = (targets != self.ignore_index) & ((targets < 0) | (targets >= classes))
        return bad.sum()

    def check_classes(self, output: Tensor | int, targets: Tensor) -> None:
        """Raise when a class index is out of range (:meth:`invalid_labels`; one host
        synchronisation). Called by the analysis calls and by the separate curvature passes a
        training step may run (``FullFisherNoise``'s in ``NoisyOptimizer.step(inputs=,
        targets=)``: every step; docs/noise.md, "Host reads in a step"), never on the one-pass
        captures, where torch's own loss refuses such labels. ``output``: the prepared output,
        or its number of classes."""
        if self.kind != "cross_entropy" or (isinstance(output, Tensor) and output.ndim < 2):
            return  # no class axis: MSE, BCE, 1-D outputs (read ``shape[1]`` of (N,) before)
        classes = output if isinstance(output, int) else output.shape[1]
        if isinstance(output, int):
            output = torch.empty((1, classes), device=targets.device)
        bad = self.invalid_labels(output, targets)
        if bad is not None:
            raise_invalid_labels(self, int(bad), classes)

    # ------------------------------------------------------------------ scaling
    def ggn_weight(self, num_examples: int, terms: float) -> float:
        """``w`` with ``L = w * sum_n NLL_n``: ``1/(N c)`` under "mean", 1 under "sum".

        ``terms`` is ``c = M/N``, the mean number of loss terms per example. It scales NLL-sum
        Hessians, GGNs and Monte-Carlo Fishers to those of ``L``.
        """
        return 1.0 if self.reduction == "sum" else 1.0 / (num_examples * terms)

    def empirical_weight(self, num_examples: int, terms: float) -> float:
        """Scales ``sum_n grad NLL_n grad NLL_n^T`` to the empirical Fisher: ``N/M^2`` or 1."""
        return 1.0 if self.reduction == "sum" else 1.0 / (num_examples * terms**2)

    def captured_empirical_factor(self, num_examples: int) -> float:
        """Turns ``sum_n (grad_n L)^2``, the squared per-example gradients of ``L`` itself (as a
        training step's backward pass delivers them), into the empirical Fisher's diagonal.

        The per-example gradient of ``L`` is ``w grad NLL_n`` and the empirical Fisher weighs
        ``sum_n grad NLL_n grad NLL_n^T`` by ``e``; the factor is ``e / w^2``: ``N`` under
        "mean" (``e = N/M^2``, ``w = 1/M``, whatever ``M``), 1 under "sum".
        """
        return float(num_examples) if self.reduction == "mean" else 1.0

    def nll_weight(
        self, output: Tensor, num_examples: int, targets: Tensor | None = None
    ) -> float | Tensor:
        """``w`` with ``L = w * sum_n NLL_n`` for a batch of this ``output`` (and ``targets``).

        With ``targets`` the ignored labels are left out of the count (the weight is then a
        0-dim Tensor, without a host synchronisation, in float32 at least: a float16 count of
        65,520 tokens or more is ``inf``, and ``w * w`` of a float16 ``w`` underflows from about
        4,000 tokens on).
        """
        if self.reduction == "sum":
            return 1.0
        if targets is None:
            return self.ggn_weight(num_examples, self.terms_per_example(output))
        count = self.count(output, targets)
        if not isinstance(count, Tensor):
            return 1.0 / count
        return 1.0 / count.to(accumulation_dtype(output.dtype))

    # ------------------------------------------------------------------ the likelihood
    def _ignore(self, drawn: bool) -> int:
        """The label cross-entropy leaves out: the data's ``ignore_index``, or that of draws."""
        assert self.ignore_index is not None
        return DRAWN_IGNORE if drawn else self.ignore_index

    def nll_sum(
        self, output: Tensor, targets: Tensor, drawn: bool = False, twice: bool = False
    ) -> Tensor:
        """``sum_n NLL_n(output_n, targets_n)`` (the loss with sum reduction, up to constants).

        ``drawn``: ``targets`` come from :meth:`sample_targets` (ignored positions are marked
        :data:`DRAWN_IGNORE`, and a drawn label equal to ``ignore_index`` is a real class).
        ``twice``: the sum will be differentiated twice (Hessian products, gradient penalties;
        :func:`curvlab._stable_nll.stable_cross_entropy`): without it the cross-entropy's
        gradient is once differentiable, and a double backward raises.

        A 16-bit ``output`` is scored in float32 (:func:`_loss_terms`): the result is float32
        and the gradient reaching ``output`` keeps its dtype.
        """
        return _loss_terms(self, output, targets, "sum", drawn, twice)

    def objective(
        self,
        output: Tensor,
        targets: Tensor | None,
        labels: Tensor | None = None,
        drawn: bool = False,
    ) -> Tensor:
        """``L = w * sum_n NLL_n`` on one batch: what ``loss_fn(output, targets)`` computes
        (ignored labels left out of the sum and of the count).

        With ``labels`` the NLL is taken at them (``drawn``: drawn from the model, see
        :meth:`nll_sum`) while ``w`` still counts the data ``targets`` (``None``: no ignored
        position).
        """
        w = self.nll_weight(output, output.shape[0], targets)
        assert labels is not None or targets is not None
        return w * self.nll_sum(output, targets if labels is None else labels, drawn)

    def per_example_nll(self, output: Tensor, targets: Tensor, drawn: bool = False) -> Tensor:
        """``NLL_n`` for every example, shape ``(N,)`` (summed over its positions or outputs).

        Ignored positions contribute 0; ``drawn`` as for :meth:`nll_sum` (float32 for a 16-bit
        ``output``).
        """
        terms = _loss_terms(self, output, targets, "none", drawn)
        return terms.reshape(terms.shape[0], -1).sum(1)

    def mask(self, output: Tensor, targets: Tensor) -> Tensor | None:
        """Per position ``1`` where the label counts, ``0`` where it is ignored; ``None``: all count.

        Shaped like ``output`` without the class axis (cross-entropy only).
        """
        if self.kind != "cross_entropy" or targets.is_floating_point():
            return None
        return (targets != self.ignore_index).to(output.dtype)

    @torch.no_grad()
    def sample_targets(
        self,
        output: Tensor,
        generator: torch.Generator | None,
        targets: Tensor | None = None,
        *,
        checked: bool = True,
    ) -> Tensor:
        """Draw labels ``y_hat ~ p(y | output)`` from the model's predictive distribution.

        ``checked=False`` (the penalties, which run every step): off the CPU, cross-entropy
        classes are drawn by :func:`_race_draws`, without ``torch.multinomial``'s two host
        synchronisations (its checks of the probabilities); non-finite logits then give some
        class instead of a ``NonFiniteError``, and the caller's value at them is NaN. On the CPU
        the draws are the same either way.

        Draws on ``output``'s device from ``generator`` (never the global RNG when one is given).
        With the data ``targets``, positions whose label is ``ignore_index`` stay ignored: they
        hold :data:`DRAWN_IGNORE`, and every other position a class, so score the draws with
        ``nll_sum(output, draws, drawn=True)`` (a drawn class equal to ``ignore_index`` counts).
        Class probabilities of a 16-bit ``output`` are float32 (bfloat16 rounds a confident
        class's probability to 1, where the others would never be drawn).

        BCE labels: 1 iff ``u < sigmoid(z)`` for one uniform ``u`` per entry, float64
        (:func:`drawn_dtype`; float32 on MPS) whatever ``output``'s dtype, compared on the side
        of the smaller probability (``1 - u > sigmoid(-z)`` for ``z >= 0``), which float64 holds
        to its last bits. So ``P(label 1)`` is ``sigmoid(z)`` rounded up to the uniforms' grid
        (torch's CPU uniforms are multiples of ``2^-53``): each label is drawn with its
        probability to within ``1.1e-16``, and one of probability below that (``|z| > 36.7``)
        with probability 0 (the label 0, ``z > 0``) or ``2^-53`` (the label 1, ``z < 0``).
        A float64 ``output`` draws the labels it drew before for a given generator (an entry
        differs with probability ~1e-16); float32 and 16-bit outputs drew from float32 uniforms
        and a float32 ``sigmoid(z)``, which is 1 from ``z ~ 17`` on (the label 0, of probability
        4e-8, never drawn, so the Monte-Carlo Fisher there was 4e-8 times the GGN; review s22),
        and now draw other labels for a given generator, equally distributed.

        Regression labels ``output + noise`` are float64 (:func:`drawn_dtype`; float32 on MPS),
        the noise drawn in the output's dtype (float32 for 16-bit): in the output's dtype the sum
        rounded the noise to the output's spacing (outputs of 1e7 in float32: the Monte-Carlo
        Fisher 16% high). The noise is Box-Muller on uniforms of that dtype: float32 uniforms
        (multiples of ``2^-24``) bound the standard normal to ``|n| <= 5.77`` (a tail of
        probability 8e-9 missing) and make ``E[n^2]`` 5.5e-7 low (relative), far below the
        standard error of any feasible number of draws.
        """
        output = output.detach()
        wide = accumulation_dtype(output.dtype)  # bfloat16 rounds a class probability to 1
        if self.kind == "cross_entropy":
            probs = torch.softmax(output, dim=1, dtype=wide).movedim(1, -1)
            flat = probs.reshape(-1, probs.shape[-1])
            if _on_host(flat):  # inverse CDF: 5-10x faster than multinomial at V=50k
                draws = _inverse_cdf_draws(flat, generator)
            elif not checked:  # no host read: multinomial checks the probabilities on the host
                draws = _race_draws(flat, generator)
            else:
                try:
                    draws = torch.multinomial(flat, 1, generator=generator)
                except RuntimeError as exc:  # NaN/inf probabilities: name the cause
                    if "probability tensor" not in str(exc):
                        raise
                    raise NonFiniteError(_UNSAMPLEABLE) from None
            draws = draws.reshape(probs.shape[:-1])
            if targets is not None and not targets.is_floating_point():
                draws = torch.where(targets == self.ignore_index, DRAWN_IGNORE, draws)
            return draws
        if self.kind == "mse":  # Box-Muller on uniforms taken in order (torch.randn's CPU
            # stream pairs entries 8 apart in blocks of 16: a chunk's draws depended on its size)
            u = torch.rand(
                (*output.shape, 2), generator=generator, device=output.device, dtype=wide
            )
            noise = torch.sqrt(-2.0 * torch.log1p(-u[..., 0])) * torch.cos(2 * torch.pi * u[..., 1])
            # the labels in float64 (float32 on MPS): output + noise in the output's dtype rounded
            # the noise to the output's spacing (float32 outputs of 1e7: spacing 1 for noise of
            # 0.7, the Monte-Carlo Fisher 16% high, found in review); the same noise values
            label = drawn_dtype(output)
            return output.to(label) + (noise * (0.5**0.5)).to(label)
        # BCE: the label 1 iff u < sigmoid(z), u ~ U[0, 1) in float64 (float32 on MPS), compared
        # on the side of the smaller probability, which float64 holds to its last bits: for
        # z >= 0 as 1 - u > sigmoid(-z) (1 - u exact for torch's uniforms, multiples of 2^-53).
        # In float32, sigmoid(17) is 1 and u < 1 always: the label 0 of probability 4e-8 never
        # drawn (review s22); the float32 uniforms' grid rounded every probability by 6e-8
        z = output.to(drawn_dtype(output))
        u = torch.rand(output.shape, generator=generator, device=output.device, dtype=z.dtype)
        small = torch.sigmoid(-z.abs())  # the smaller of P(1) = sigmoid(z), P(0) = sigmoid(-z)
        ones = torch.where(z < 0, u < small, (1 - u) > small)
        return ones.to(output.dtype)

    def unsampleable(self, output: Tensor) -> Tensor | None:
        """A 0-dim boolean tensor on ``output``'s device: whether some position's class
        probabilities are not finite (a logit NaN or ``+inf``, or every logit ``-inf``), where
        :meth:`sample_targets` with ``checked=False`` draws an arbitrary class. Read by nothing
        here (no host synchronisation); ``None`` for the losses whose draws need no check (MSE
        and BCE labels carry a NaN output themselves).

        ``softmax`` subtracts each position's largest logit, so its probabilities are finite
        exactly where that largest logit is (``-inf`` logits beside a finite one give 0).
        """
        if self.kind != "cross_entropy":
            return None
        return ~torch.isfinite(output.detach().amax(dim=1)).all()

    def hessian_product(self, output: Tensor, v: Tensor, targets: Tensor, lead: int = 0) -> Tensor:
        """``Lambda v``: the NLL Hessian w.r.t. the output applied to ``v`` (``lead`` batch axes).

        ``output`` is detached; ``v`` has ``lead`` extra leading axes (batched products). The
        result is computed and returned in float32 at least (16-bit ``output`` and ``v`` are
        upcast; rounded back to float16, a confident classifier's ``1e-9`` was 0: the caller
        scales it first). Cross-entropy's ``p * (v - p.v)`` is taken as ``p * (u - p.u)`` with
        ``u = v - v_c``, ``c`` each position's most probable class: the same in exact arithmetic,
        but ``1 - p_c`` no longer cancels at ``c`` (in float32 the GGN of a classifier that fits
        its data lost 1.3% at a mean loss of 6e-7, 74% at 2.5e-9, and its symmetry). BCE's
        ``s (1 - s)`` is ``sigmoid(z) sigmoid(-z)``, which does not round to 0 for confident
        logits (``z >= 17`` in float32, ``z >= 6`` in bfloat16).
        """
        out, vv = upcast(output.detach()), upcast(v)
        if self.kind == "cross_entropy":
            p = torch.softmax(out, dim=1)
            top = out.argmax(dim=1, keepdim=True)
            u = vv - torch.gather(vv, 1 + lead, top.expand(*vv.shape[:lead], *top.shape))
            hv = p * (u - (p * u).sum(dim=1 + lead, keepdim=True))
            m = self.mask(out, targets)
            hv = hv if m is None else hv * m.unsqueeze(1)
        elif self.kind == "mse":
            return 2.0 * vv
        else:
            hv = torch.sigmoid(out) * torch.sigmoid(-out) * vv
        return hv

    def sqrt_hessian(self, output: Tensor, *, wide: bool = False) -> Tensor:
        """Columns ``S`` of the NLL Hessian w.r.t. one output position, ``S S^T = Lambda``.

        For cross-entropy ``output`` is ``(..., C)`` (classes last) and the result
        ``(..., C, C)`` holds ``diag(sqrt p) - p sqrt(p)^T`` (columns last); for MSE/BCE the
        Hessian is diagonal and the result ``(...)`` holds its square root entrywise
        (``sqrt(sigmoid(z) sigmoid(-z))`` for BCE). Computed in float32 at least, returned in
        ``output``'s dtype, or (``wide=True``) in float32 at least, for a caller that scales
        them before a 16-bit backward pass (cast to float16 as they are, a confident
        classifier's ``sqrt(p_c) ~ 1e-7`` is subnormal: ``kfac(kind="exact")``'s ``G`` was 8%
        low, found in review). (Cross-entropy's ``sqrt(p_c) (1 - p_c)`` may round to 0 at a
        confident class ``c``; its share of ``S S^T`` is ``(1 - p_c)^2``, second order.)
        """
        f = upcast(output.detach())
        if self.kind == "cross_entropy":
            p = torch.softmax(f, dim=-1)
            sq = p.sqrt()
            s = torch.diag_embed(sq) - p.unsqueeze(-1) * sq.unsqueeze(-2)
        elif self.kind == "mse":
            return torch.full_like(f if wide else output.detach(), 2.0**0.5)
        else:
            s = (torch.sigmoid(f) * torch.sigmoid(-f)).sqrt()
        return s if wide else s.to(output.dtype)

    def sqrt_columns(self, output: Tensor, targets: Tensor, *, wide: bool = False) -> Tensor:
        """All columns of example-wise loss-Hessian square roots: ``(K, *output.shape)``.

        Column ``k`` holds for every example ``n`` its ``k``-th column ``s_nk`` of ``S_n`` with
        ``sum_k s_nk s_nk^T = d^2 NLL_n / d f_n^2`` (ignored positions give zeros), so that the
        NLL-sum GGN is ``sum_{n,k} J_n^T s_nk s_nk^T J_n``. ``K`` is the number of output entries
        of one example: this is the exact (and costly) square root, ``K`` times the output's
        entries (``K^2`` per example); use it on small outputs. In ``output``'s dtype, or in
        float32 at least with ``wide=True`` (:meth:`sqrt_hessian`).

        Raises:
            EstimatorMemoryError: before anything is built, if the columns do not fit the memory
                available on ``output``'s device (a sequence model's ``(2, 25000, 11)`` logits
                asked for 302.5 GB and failed with the allocator's raw error, found in review).
        """
        f = output.detach()
        n = f.shape[0]
        K = f[0].numel()
        _check_columns(f, K, self.sqrt_columns_bytes(f, wide=wide))
        if self.kind == "cross_entropy":
            C = f.shape[1]
            cls_last = f.movedim(1, -1).reshape(n, -1, C)  # (n, P, C)
            S = self.sqrt_hessian(cls_last, wide=wide)  # (n, P, C, C): column index last
            m = self.mask(f, targets)
            if m is not None:
                S = S * m.reshape(n, -1, 1, 1)
            # column (t, c): example n's entries at position t' (class c') = S[n,t,c',c] [t == t'];
            # the positions t on the diagonal of axes 0 and 4: one allocation of the columns (an
            # einsum with the identity and a reshape took two)
            cols = torch.diag_embed(S.permute(3, 0, 2, 1), dim1=0, dim2=-1)  # (P, C, n, C, P)
            return cols.reshape(K, *f.shape)
        diag = self.sqrt_hessian(f, wide=wide).reshape(n, -1)  # (n, E)
        cols = torch.diag_embed(diag).permute(2, 0, 1)  # (E, n, E)
        return cols.reshape(K, *f.shape)

    def sqrt_columns_bytes(self, output: Tensor, *, wide: bool = False) -> int:
        """Bytes :meth:`sqrt_columns` holds at its peak for ``output``: the ``K`` columns
        (``K * output.numel()`` entries, in float32 at least with ``wide``) and the square
        roots' temporaries (up to ``4 C`` per output entry for cross-entropy's ``C x C`` blocks
        in float32, 3 for MSE/BCE)."""
        K = output[0].numel() if output.shape[0] else 0
        extra = 4 * output.shape[1] if self.kind == "cross_entropy" else 3
        size = max(output.element_size(), 4)  # the square roots are taken in float32 at least
        column = size if wide else output.element_size()
        return output.numel() * (K * column + extra * size)


def _check_columns(f: Tensor, K: int, needed: int) -> None:
    """Raise :class:`~curvlab.estimators.EstimatorMemoryError` unless the ``needed`` bytes of
    ``K`` square-root columns of ``f`` (``K * f.numel()`` entries) fit ``f``'s device (under
    ``vmap`` ``f`` is one example: the caller counts a block,
    :func:`curvlab.backends._func._sqrt_block`)."""
    from curvlab.estimators._memory import require  # curvlab.estimators imports this module

    require(
        f"the exact GGN's loss-Hessian square root: {K:,} columns of the output's "
        f"{f.numel():,} entries ({tuple(f.shape)}, {str(f.dtype).removeprefix('torch.')}; "
        f"{K:,} output entries per example, so {K:,}^2 per example)",
        needed,
        f.device,
        "the exact GGN (kind='exact'/'ggn') back-propagates every output entry of an example; "
        "use kind='mc' (the Monte-Carlo Fisher: unbiased for the same matrix, one backward pass "
        "per label draw) or kind='empirical', or fewer output entries per example (shorter "
        "sequences)",
    )


def _loss_terms(
    spec: LossSpec,
    output: Tensor,
    targets: Tensor,
    reduction: str,
    drawn: bool,
    twice: bool = False,
) -> Tensor:
    """The NLL terms of ``output`` (``reduction`` ``"sum"`` or ``"none"``), in float32 at least.

    A 16-bit ``output`` is scored in float32, never in its own dtype (curvlab._precision):
    bfloat16 log-probabilities of a fitted classifier (mean loss 1e-3) made the exact Hessian
    trace 20% low. Cross-entropy with class indices takes float32 log-probabilities of 16-bit
    logits (kept for the backward pass: 4 bytes per logit instead of 2; the cast is fused on
    CUDA), its twice-differentiable form and the other losses float32 copies of ``output`` and
    of 16-bit targets; ``output`` gets a gradient of its own dtype. Outputs of 32
    or 64 bits are scored as they are (no copy). Cross-entropy with class indices and BCE are
    written around the confident side (:mod:`curvlab._stable_nll`): torch's ``p − onehot`` and
    ``sigmoid(z) − y`` rounded the gradient and the Hessian at a fitted example to 0 in float32
    (found in review: the empirical Fisher 71% off at a mean loss of 7e-11).
    """
    if spec.kind == "cross_entropy":
        ignore = spec._ignore(drawn)
        if targets.is_floating_point():  # class probabilities
            return F.cross_entropy(upcast(output), upcast(targets), reduction=reduction)
        try:
            return stable_cross_entropy(output, targets, ignore, reduction, twice)
        except (IndexError, RuntimeError) as exc:
            name_invalid_labels(spec, output, targets, exc)
            raise
    output, targets = upcast(output), upcast(targets)
    if spec.kind == "mse":
        if targets.is_floating_point() and targets.element_size() > output.element_size():
            # wider targets (drawn labels, sample_targets; float64 data of a float32 model) are
            # scored in their dtype, as torch's MSELoss promotes them: the difference is the
            # drawn noise, unrounded; the loss and the gradient reaching ``output`` keep the
            # output's (upcast) dtype
            diff = output.to(targets.dtype) - targets
            terms = diff * diff
            return (terms.sum() if reduction == "sum" else terms).to(output.dtype)
        return F.mse_loss(output, targets, reduction=reduction)
    return stable_bce_with_logits(output, targets, reduction)


def drawn_dtype(output: Tensor) -> torch.dtype:
    """The dtype of Monte-Carlo regression labels drawn at ``output``, and of the uniforms and
    probabilities BCE labels are drawn from: float64 (float32 on MPS, which has no float64), so
    that ``output + noise`` keeps the noise however large the output, and a BCE label of
    probability ``sigmoid(-17) = 4e-8`` is drawn (:meth:`LossSpec.sample_targets`)."""
    if output.device.type == "mps":
        return torch.promote_types(output.dtype, torch.float32)
    return torch.float64


_UNSAMPLEABLE = (
    "the model's outputs (logits) hold NaN or inf (an overflow in the forward pass, or non-finite "
    "inputs?), so no label can be sampled from them; check the inputs, use float32/float64, or "
    "check the model's forward"
)


def _on_host(t: Tensor) -> bool:
    """Whether ``t`` is in CPU memory, where reading it back synchronises with nothing (the
    label samplers' branch; a test forces the accelerator's branch on the CPU)."""
    return t.device.type == "cpu"


def _race_draws(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One class per row of ``probs`` (``(R, C)``), as a ``(R, 1)`` index, with no host read.

    The exponential race ``argmax_c p_c / E_c`` with ``E_c ~ Exp(1)`` independent: ``E_c / p_c``
    is ``Exp(p_c)``, and the smallest of independent exponentials is that of class ``c`` with
    probability ``p_c / sum p`` (the draw ``torch.multinomial`` makes for one sample, less its
    two checks of ``probs``, each a host synchronisation on an accelerator). The variates are
    clamped to the dtype's smallest normal number, so a class of probability 0 is never drawn
    (``0 / 0`` would be NaN, which ``argmax`` picks). A row holding NaN or inf gives some class:
    the caller's value at such logits is NaN (no check here).
    """
    race = torch.empty_like(probs).exponential_(generator=generator)
    race.clamp_(min=torch.finfo(race.dtype).tiny)
    return probs.div(race).argmax(dim=-1, keepdim=True)


def _inverse_cdf_draws(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One class per row of ``probs`` (``(R, C)``, rows summing to 1), by inverse transform
    sampling: the first class whose cumulative probability (float64) exceeds ``u · total`` with
    ``u ~ U[0, 1)``; a class of probability 0 is never drawn.

    On the CPU, where ``torch.multinomial`` draws ``C`` exponential variates per row, this draws
    one uniform per row (GPT-2's 50,257 classes: about a tenth of the time). The finiteness check
    synchronises with nothing (CPU tensors).

    Raises:
        NonFiniteError: if a row holds NaN or inf.
    """
    cdf = probs.to(torch.float64).cumsum(dim=1).contiguous()  # searchsorted wants it contiguous
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all()):
        raise NonFiniteError(_UNSAMPLEABLE)
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device)
    draws = torch.searchsorted(cdf, u * total, right=True)
    return draws.clamp_(max=probs.shape[1] - 1)


def loss_spec(loss_fn: object, *, layout_of: LossSpec | None = None) -> LossSpec:
    """Validate ``loss_fn`` and describe it.

    curvlab computes the likelihood of the loss family itself (never by calling ``loss_fn``), so
    anything that makes ``loss_fn(output, targets)`` compute something else is refused: a subclass
    overriding ``forward``, ``__call__`` or ``_call_impl``, an instance attribute ``forward``, and
    hooks of the user's on the module (forward, forward pre-, backward and backward pre-hooks).
    Global backward (pre-)hooks on every module (``register_module_full_backward_hook``,
    ``register_module_full_backward_pre_hook``) are accepted: curvlab's passes switch them off
    (:func:`curvlab._notrace.module_backward_hooks_off`; refused until review s19). Global
    forward (pre-)hooks (``register_module_forward_hook``, ``register_module_forward_pre_hook``)
    are not refused here:
    they are named in :attr:`LossSpec.global_hooks`, and the whole first batch (with a counted
    target) checks that they leave the loss module's value as it is (:meth:`LossSpec.check_shapes`; a logging hook that returns
    ``None`` passes). torch's own global observers, such as ``FlopCounterMode``'s, are fine.
    curvlab's own hooks (the noise samplers' captures) and BackPACK's
    (``backpack.extend(loss_fn)``) change nothing and are allowed. A ``torch.compile`` wrapper is
    replaced by the module inside it (``_orig_mod``, :func:`loss_module`), which is checked the
    same way.

    Cheap (attribute reads, no host synchronisation): a caller that keeps a loss across calls
    validates it again on each (hooks, options or ``forward`` changed since are refused or
    followed), passing its earlier spec as ``layout_of``.

    Args:
        loss_fn: the loss module (or a ``torch.compile`` wrapper of one).
        layout_of: an earlier spec of the same computation whose layout decisions
            (:meth:`LossSpec.gpt_layout`: a batch of ``T == C`` after GPT-layout batches) the new
            spec shares; ``None``: a fresh computation.

    Raises:
        TypeError: for a loss curvlab does not support, or one whose call is changed as above
            (curvlab would otherwise silently replace it by its own formula); global forward
            hooks that change the loss module's value raise it on the first batch instead (the
            first with a counted target).
        ValueError: for ``reduction="none"`` or options that change the likelihood
            (class weights, label smoothing, ``pos_weight``).
    """
    chain = _compiled_chain(loss_fn)  # torch.compile(loss_fn): the module inside it
    for wrapper in chain[:-1]:
        _refuse_hooks(wrapper, "torch.compile wrapper of the loss")
    loss_fn = chain[-1]
    if not isinstance(loss_fn, _SUPPORTED):
        raise TypeError(
            f"unsupported loss {type(loss_fn).__name__}: curvlab supports nn.CrossEntropyLoss, "
            "nn.MSELoss and nn.BCEWithLogitsLoss (pass one of these modules, not a function)"
        )
    base = next(b for b in _SUPPORTED if isinstance(loss_fn, b))
    name = type(loss_fn).__name__
    global_hooks = _refuse_changed_call(loss_fn, base)
    reduction = loss_fn.reduction
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f'{name}(reduction="{reduction}") is not supported: curvature is defined for a scalar '
            f'objective; use reduction="mean" or reduction="sum"'
        )
    if getattr(loss_fn, "weight", None) is not None:
        raise ValueError(
            f"{name} with class weights is not supported; construct it without weight="
        )
    if getattr(loss_fn, "pos_weight", None) is not None:
        raise ValueError(
            f"{name} with pos_weight is not supported; construct it without pos_weight="
        )
    ignore_index = None
    if isinstance(loss_fn, nn.CrossEntropyLoss):  # loss_fn: the module inside any wrapper
        if loss_fn.label_smoothing != 0.0:
            raise ValueError(
                "CrossEntropyLoss with label_smoothing is not supported; use label_smoothing=0.0"
            )
        ignore_index = int(loss_fn.ignore_index)
    spec = LossSpec(
        loss_fn=loss_fn,
        kind=LOSS_FAMILIES[base],
        reduction=reduction,
        ignore_index=ignore_index,
        global_hooks=global_hooks,
    )
    if layout_of is not None:  # the same dict: decisions of either go to both
        object.__setattr__(spec, "_layout", layout_of._layout)
    return spec


_IGNORED = "curvlab computes the {base} likelihood itself and would silently ignore it. "

_LOSS_HOOKS = (
    ("_forward_pre_hooks", "forward pre-hook (register_forward_pre_hook)"),
    ("_forward_hooks", "forward hook (register_forward_hook)"),
    ("_backward_pre_hooks", "backward pre-hook (register_full_backward_pre_hook)"),
    ("_backward_hooks", "backward hook (register_full_backward_hook)"),
)

_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks")
"""The global module hooks that act on the loss module's value in curvlab's passes: the global
backward hooks are off there (:func:`curvlab._notrace.module_backward_hooks_off`; they were
refused until review s19, which the docs promised were switched off)."""


_MODULE_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)
"""A module's own hook tables (left out of the global-hook check's call of the loss)."""


def _functorch_wrapped(t: object) -> bool:
    """Whether ``t`` is a tensor of a ``torch.func`` transform (no value to read)."""
    try:
        from torch._C._functorch import is_functorch_wrapped_tensor
    except ImportError:  # pragma: no cover - torch without functorch
        return False
    return isinstance(t, Tensor) and bool(is_functorch_wrapped_tensor(t))


def _hook_name(hook: object) -> str:
    """``module.qualname`` of a hook, for the error naming it."""
    module = getattr(hook, "__module__", None) or "?"
    return f"{module}.{getattr(hook, '__qualname__', type(hook).__name__)}"


def _refuse_hooks(module: nn.Module, where: str, base: str = "loss") -> None:
    """Raise ``TypeError`` for a hook of the user's on ``module`` (curvlab's and BackPACK's own
    are fine: :func:`curvlab._scan._foreign`)."""
    for attr, what in _LOSS_HOOKS:
        hooks = getattr(module, attr, None)
        foreign = _foreign(hooks) if hooks else []
        if foreign:
            raise TypeError(
                f"the {where} has a {what}, {_hook_name(foreign[0])}, which may change what "
                f"loss_fn(output, targets) computes; {_IGNORED.format(base=base)}Remove the "
                "hook, or fold what it does into the model's output"
            )


def _refuse_changed_call(loss_fn: nn.Module, base: type) -> tuple[str, ...]:
    """Raise ``TypeError`` when anything but ``base.forward`` may decide what
    ``loss_fn(output, targets)`` returns (see :func:`loss_spec`), naming the culprit; return the
    names of the user's global module forward (pre-)hooks, which :meth:`LossSpec.check_shapes`
    checks on the first batch instead (global backward hooks are off in curvlab's passes)."""
    cls, name = type(loss_fn), type(loss_fn).__name__
    fix = (
        f"{_IGNORED.format(base=base.__name__)}Pass a plain nn.{base.__name__}, or fold the "
        "change into the model's output"
    )
    for attr, owner in (
        ("forward", base),
        ("__call__", nn.Module),
        ("_wrapped_call_impl", nn.Module),
        ("_call_impl", nn.Module),
    ):
        if getattr(cls, attr, None) is not getattr(owner, attr, None):
            raise TypeError(f"{name} subclasses {base.__name__} but overrides {attr}(); " + fix)
    own = vars(loss_fn)
    for attr in ("forward", "_wrapped_call_impl", "_call_impl"):
        # accelerate's autocast wrapper (the original kept as ``_original_forward``) changes the
        # precision only, which curvlab sets itself (curvlab._precision.own_forwards)
        if attr in own and not (attr == "forward" and "_original_forward" in own):
            raise TypeError(
                f"{name} has its own {attr} (an instance attribute: loss_fn.{attr} = ...); " + fix
            )
    _refuse_hooks(loss_fn, f"loss module ({name})", base.__name__)
    glob = nn.modules.module
    forward_hooks: list[str] = []
    for attr in _GLOBAL_HOOKS:  # checked on the first batch (LossSpec.check_shapes)
        hooks = getattr(glob, attr, None)
        # torch's own global hooks observe (FlopCounterMode, torch.utils.module_tracker)
        forward_hooks.extend(
            _hook_name(h)
            for h in (_foreign(hooks) if hooks else [])
            if not _hook_name(h).startswith("torch.")
        )
    return tuple(forward_hooks)


def _check_probabilities(name: str, targets: Tensor) -> None:
    """Raise unless class-probability targets sum to 1 at every position (one synchronisation;
    on the error path another, for the sums over the last axis of ``(B, T, C)`` targets, whose
    classes may be last: the advice then says to move them, not to normalise axis 1).

    The loss Hessian of ``-sum_c q_c log softmax(f)_c`` with respect to ``f`` is
    ``(sum_c q_c) (diag(p) - p p^T)``: the GGN, the Monte-Carlo Fisher and BackPACK's rules take
    ``sum_c q_c = 1``. Multi-hot or unnormalised targets made them 0.53-0.98x the truth, silently.
    Tolerance ``5e-3`` (``1e-2`` for 16-bit targets; a 16-bit teacher's softmax cast to float32
    sums to within ``3e-3``): a sum off by less changes the GGN by less than that fraction.
    """
    if targets.numel() == 0:
        return
    targets = targets.detach()  # float() of a tensor requiring grad warns
    sums = targets.sum(dim=1, dtype=torch.float32)
    tol = 1e-2 if targets.element_size() < 4 else 5e-3
    low, high = (float(v) for v in torch.aminmax(sums))
    if abs(low - 1.0) <= tol and abs(high - 1.0) <= tol:
        return
    advice = (
        "Normalise them over the classes (y / y.sum(1, keepdim=True)), or use "
        "nn.BCEWithLogitsLoss for multi-label targets"
    )
    if targets.ndim >= 3:  # (B, T, C) with the classes last, as a sequence model has them?
        last = torch.aminmax(targets.sum(dim=-1, dtype=torch.float32))
        move = (
            "torch's class-probability targets hold the classes in axis 1, shaped like the "
            "logits (N, C, d1, ...): with the classes in the last axis ((B, T, C), a sequence "
            "model's layout) move the class axis of the logits and the targets to axis 1 "
            "(.movedim(-1, 1)), or flatten both to (B*T, C)"
        )
        if all(abs(float(v) - 1.0) <= tol for v in last):
            advice = f"Their sums over the last axis are 1, so the classes look to be last: {move}"
        else:
            advice = (
                f"{move}; with the classes in axis 1, normalise them (y / y.sum(1, "
                "keepdim=True)), or use nn.BCEWithLogitsLoss for multi-label targets"
            )
    raise ValueError(
        f"{name} got class-probability targets whose sums over the classes (axis 1) range "
        f"over [{low:.6g}, {high:.6g}], not 1: curvlab's Fisher and GGN take each position's "
        f"targets to be a probability distribution. {advice}"
    )
