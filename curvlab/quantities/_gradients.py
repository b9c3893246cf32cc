"""Per-example gradient statistics: mean, variance, second moment, noise scale, per layer."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._fsdp import supports_fsdp2
from curvlab._losses import no_terms_error
from curvlab._precision import accumulation_dtype, is_sixteen
from curvlab._results import check_finite
from curvlab._selection import Params, select_parameters
from curvlab._warn import user_stacklevel
from curvlab.distributed import collective
from curvlab.quantities._sweep import DEFAULT_CHUNK_SIZE, sweep

__all__ = ["gradient_stats", "GradientStats", "LayerGradientStats"]


@dataclass
class LayerGradientStats:
    """Summary of one module's parameters (Wen et al.'s per-layer gradient variance, Fig. 2).

    Attributes:
        trace_covariance: ``sum`` of the per-coordinate variances of the module's parameters
            (NaN, with :attr:`snr`, where their squared per-example gradients underflowed and
            the coordinates concerned carry more than 1% of it, as for
            :attr:`GradientStats.noise_scale`: checked for each module whatever the total;
            until review s22 only where the total was, else 0.0 and snr inf).
        grad_norm: ``||mean gradient||`` over the module's parameters.
        snr: signal-to-noise ratio ``||mean||^2 / trace_covariance``: inf if the variance is 0
            and the mean gradient is not, NaN (``0 / 0``) if both are 0 (every example's
            gradient of the module's parameters is 0), NaN where ``trace_covariance`` is.
        num_params: number of scalar parameters.
    """

    trace_covariance: float
    grad_norm: float
    snr: float
    num_params: int


@dataclass
class GradientStats:
    """Statistics of the per-example gradients ``g_n = grad l_n`` (mean convention, always).

    Attributes:
        mean: ``(1/N) sum_n g_n`` per parameter (the gradient of the mean loss).
        second_moment: ``(1/N) sum_n g_n^2`` per parameter (the empirical Fisher diagonal of
            the ``"mean"`` loss; under ``"sum"`` :func:`curvlab.diag_fisher` is ``N c^2`` times
            it, ``c`` the loss terms per example).
        variance: ``(1/N) sum_n (g_n - mean)^2`` per parameter.
        trace_covariance: ``sum`` of all variances, ``tr(Sigma)``.
        noise_scale: McCandlish et al.'s simple noise scale ``B_simple = tr(Sigma) / ||mean||^2``:
            inf if ``||mean||^2 = 0`` while ``tr(Sigma) > 0``, NaN (``0 / 0``, undefined) if both
            are 0, i.e. every per-example gradient is 0 (an exact fit). Also NaN, with
            ``trace_covariance``, a ``RuntimeWarning`` and ``info["squares_underflowed"]``
            saying why, where the squared per-example gradients underflowed (coordinates whose
            sum of squares is 0 or below float32's normal range, ``1.2e-38``, while their
            gradient sum is not 0: per-example gradients all below ``~1e-19``; the coordinates
            concerned carry more than 1% of ``tr(Sigma)``): compute on a float64 copy of the
            model and data.
        num_examples: ``N``.
        layers: per-module summaries keyed by ``model.named_modules()`` name.
        backend: who computed it.
        info: how it was computed where that is not the default (``"compiled"``: a
            ``torch.compile``d model; docs/training-loops.md); ``"squares_underflowed"`` (the
            reason) and ``"underflowed_parameters"`` (a list of names) where some parameter's
            squares underflowed, with a ``RuntimeWarning``, whether or not the totals are
            affected (:attr:`noise_scale` NaN says they are).
    """

    mean: dict[str, Tensor]
    second_moment: dict[str, Tensor]
    variance: dict[str, Tensor]
    trace_covariance: float
    noise_scale: float
    num_examples: int
    layers: dict[str, LayerGradientStats] = field(default_factory=dict)
    backend: str = "backpack"
    info: dict[str, Any] = field(default_factory=dict)


@supports_fsdp2  # a fully_shard model: unsharded for the call (curvlab/backends/_fsdp2.py)
@collective
def gradient_stats(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    params: Params = None,
) -> GradientStats:
    """Mean, variance and second moment of per-example gradients over all of ``data``.

    The per-example gradients are those of the mean convention, ``g_n = grad l_n`` with ``l_n``
    example ``n``'s share of the mean loss (for ``MSELoss`` including the ``1/output-size`` factor),
    whatever ``loss_fn.reduction`` is. One pass per chunk (squared per-example gradients plus the
    gradient; curvlab's own layer hooks where they apply, else BackPACK's ``SumGradSquared``):
    ``variance = second_moment - mean^2``, clamped at 0 against rounding. At least two examples
    (else a ``ValueError``: one example's variance is 0 by definition) and one label that is not
    ``ignore_index`` (else a ``ValueError`` under either reduction: ``g_n`` divides by the loss
    terms per example, 0 then). The difference cancels
    where ``mean^2`` dwarfs the variance: its rounding error is about ``eps * second_moment``
    (``eps`` of the sums' dtype, ``1.2e-7`` in float32, plus ``u^2`` for a 16-bit parameter,
    whose per-example gradients are rounded to its unit roundoff ``u``: ``2^-8`` in bfloat16,
    ``2^-11`` in float16), so a ``RuntimeWarning`` names the parameters with a coordinate where
    that bound exceeds 1% of the variance reported, i.e. ``mean^2 / variance > ~8e4`` in
    float32, ``~650`` in bfloat16, ``~3e4`` in float16, how many coordinates, and whether
    ``trace_covariance`` and ``noise_scale`` are affected (targets 2000 +- 1: a bias's variance
    10.6% off; near-constant inputs: ``noise_scale`` 18% off; one near-constant input column: its
    weight's variance 14% off).
    Compute those in float64 (docs/quantities.md). The bound holds whatever the number of
    batches or chunks: the sums are added over chunks in float64 (float32 running totals lost
    1.6% of a variance over 4096 batches of one example, found in review s22). Squares are
    formed in the parameters' accumulation dtype: where a coordinate's per-example gradients are
    all below ``~1e-19`` in float32 (a classifier fit at logit margins above ~45) they underflow
    (its sum of squares 0 or below float32's normal range), and ``trace_covariance`` and
    ``noise_scale`` are NaN with a ``RuntimeWarning`` naming the parameters (they were 0.0 or
    NaN without a word), the mean gradient still right; so are a layer's ``trace_covariance``
    and ``snr`` where its own parameters' squares underflowed, whatever the total.

    ``params`` (names, module prefixes or a predicate ``(name, param) -> bool``) restricts every
    field to those parameters: ``trace_covariance``, ``noise_scale`` and ``layers`` are then those
    of the selected block (e.g. the noise scale of the attention weights alone). The pass itself
    still runs over the whole model.

    Under ``torch.distributed`` ``data`` is this rank's shard and the statistics are those of all
    shards (``process_group=``; docs/distributed.md); a ``fully_shard`` (FSDP2) model is accepted
    too, its statistics full tensors identical on every rank (docs/distributed.md, "FSDP2").

    Example:
        >>> import torch, curvlab as cl
        >>> model = torch.nn.Linear(3, 2)
        >>> X, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> stats = cl.gradient_stats(model, torch.nn.CrossEntropyLoss(), (X, y))
        >>> stats.noise_scale > 0
        True
    """

    chosen = set(select_parameters(model, params))  # refuses complex parameters (review s27)
    keep = None if params is None else chosen

    def fn(be, s, X, y):  # noqa: ANN001, ANN202
        sgs, grad, _ = be.sum_grad_squared(s, X, y)
        return {**{("sq", k): v for k, v in sgs.items()}, **{("g", k): v for k, v in grad.items()}}

    raw, info = sweep(
        model,
        loss_fn,
        data,
        fn,
        needs={"sum_grad_squared"},
        chunk_size=chunk_size,
        backend=backend,
        defer_checks=True,
    )
    n, c = info.num_examples, info.terms
    if n < 2:
        raise ValueError(
            "gradient_stats needs at least two examples: the variance of one example's gradient "
            "is 0 by definition, so tr(Sigma) and the noise scale would say nothing (a packed "
            "batch, one row of concatenated sequences, is one example). Pass a batch of several "
            "examples; for one example's gradient use torch.autograd.grad"
        )
    if info.loss_terms == 0:  # every label ignored under "sum" ("mean": the sweep raised)
        raise no_terms_error(info.spec, "gradient_stats'")
    if keep is not None:
        raw = {key: v for key, v in raw.items() if key[1] in keep}
    dtypes = _parameter_dtypes(model, {k: v for (_, k), v in raw.items()})
    # before the scaling: the squares' share lost to underflow, from the raw sums (0-dim, float64)
    lost_of = underflow_losses(
        {
            k: (raw[("sq", k)], v, accumulation_dtype(dtypes[k]))
            for (tag, k), v in raw.items()
            if tag == "g" and ("sq", k) in raw
        },
        n,
    )
    # the sweep's sums are this call's own tensors: scaled in place, one new tensor per parameter
    mean = {k: v.div_(n * c) for (tag, k), v in raw.items() if tag == "g"}
    second = {k: v.div_(n * c * c) for (tag, k), v in raw.items() if tag == "sq"}
    variance = {k: torch.addcmul(second[k], mean[k], mean[k], value=-1).clamp_min_(0) for k in mean}
    check_finite(variance, "gradient variance", info.unchecked)
    # one pass per parameter for each sum (0-dim float64 tensors), shared by the totals and the
    # layers; ||mean||^2 from float64 squares (a float32 square of a mean gradient below 1e-19
    # flushed to 0 while tr(Sigma) did not: a noise scale of inf or NaN)
    f64 = torch.float64
    tr_of = {k: v.sum(dtype=f64) for k, v in variance.items()}
    g2_of = {k: torch.linalg.vector_norm(m, dtype=f64).square() for k, m in mean.items()}
    lost_of = {k: v / (n * c * c) for k, v in lost_of.items()}  # in second_moment's units
    # per parameter tr, ||mean||^2 and the squares' share lost, read in one host synchronisation
    per = _per_parameter(tr_of, g2_of, lost_of)
    trace_cov = sum(r[0] for r in per.values())
    grad_sq = sum(r[1] for r in per.values())
    # each parameter, layer and the total checked against its own lost part: a layer checked
    # only where the total was flagged read 0.0 (snr inf) without a word (found in review s22)
    underflowed = [k for k, (tr, _, lost) in per.items() if _affected(lost, tr)]
    underflow = _affected(sum(r[2] for r in per.values()), trace_cov)
    layers, nan_layers = {}, []
    for mod_name, module in model.named_modules():
        names = [
            f"{mod_name}.{pn}" if mod_name else pn
            for pn, p in module.named_parameters(recurse=False)
            if p.requires_grad
        ]
        names = [k for k in names if k in mean]
        if not names:
            continue
        tr = sum(per[k][0] for k in names)
        g2 = sum(per[k][1] for k in names)
        lost_here = _affected(sum(per[k][2] for k in names), tr)
        if lost_here:  # this layer's squares underflowed: NaN (the warning names it)
            nan_layers.append(mod_name)
        layers[mod_name] = LayerGradientStats(
            trace_covariance=math.nan if lost_here else tr,
            grad_norm=g2**0.5,
            snr=math.nan if lost_here else _ratio(g2, tr),
            num_params=sum(mean[k].numel() for k in names),
        )
    if underflowed:
        _warn_underflow(underflowed, nan_layers, underflow)
    if not underflow:  # the squares are not there to cancel: the underflow warning alone there
        rest = [k for k in tr_of if k not in underflowed]
        _warn_cancellation(
            {k: variance[k] for k in rest},
            {k: second[k] for k in rest},
            {k: tr_of[k] for k in rest},
            {k: g2_of[k] for k in rest},
            dtypes,
        )
    if underflow:  # not a number the squares could give: NaN, and the warning says why
        trace_cov = math.nan
    return GradientStats(
        mean=mean,
        second_moment=second,
        variance=variance,
        trace_covariance=trace_cov,
        noise_scale=_ratio(trace_cov, grad_sq),
        num_examples=n,
        layers=layers,
        backend=info.backend,
        info={"squares_underflowed": UNDERFLOW, "underflowed_parameters": underflowed}
        if underflowed
        else {},
    )


UNDERFLOW = (
    "the squared per-example gradients underflowed to zero or below float32's normal range "
    "(a coordinate's sum of squares below 1.2e-38: in float32 per-example gradients all below "
    "about 1e-19, e.g. a classifier fitting its examples at logit margins above ~45), so E[g^2], "
    "tr(Sigma) and the noise scale cannot be computed from them, though the mean gradient is "
    "right; compute them on a float64 copy of the model and data (copy.deepcopy(model).double() "
    "and float64 inputs)"
)
"""Why ``trace_covariance`` and ``noise_scale`` are NaN where the squares underflowed (also the
``noise_scale`` error of ``Diagnostics``/``analyze``, and ``GradientStats.info``)."""

_UNDERFLOW_SHARE = 0.01
"""The share of ``tr(Sigma)`` the coordinates whose squares underflowed may carry before the
statistics built on the squares are withheld."""


def squares_underflowed(sq: Tensor, grad: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """The part of ``sum_n g_n^2`` that underflow may have lost: a float64 0-dim tensor, 0 where
    the squares were formed in range. On the device, no host synchronisation.

    ``sq`` and ``grad`` are one parameter's raw sums of ``rows`` per-example gradients and of
    their squares, the squares formed in ``dtype`` (the parameter's accumulation dtype) by the
    backend. A coordinate whose sum of squares ``sq`` is below ``dtype``'s smallest normal
    number (``2^-126 = 1.2e-38`` in float32: per-example gradients all below ``~1e-19``) while
    its gradient sum (of the gradients themselves, accurate) or ``sq`` is not 0 had every square
    flushed to 0 or rounded as a subnormal: such a coordinate counts with ``max(sq, grad^2 /
    rows)`` (the latter a lower bound of the true ``sum_n g_n^2``, exact in float64). A
    coordinate with a normal sum is kept: a square flushed or rounded below the normal range is
    off by at most half the subnormal spacing (``2^-150`` in float32), so ``rows`` of them by at
    most ``rows * 2^-24`` of the smallest normal number, below 1% of the sum for fewer than
    ``1.7e5`` examples (squares formed from factors, ``g^2 a^2`` of a Linear layer, may lose
    more where ``g^2`` underflows against a large input ``a``: not detected).

    A float32 classifier fit at logit margins above ~57 reported ``noise_scale = 0.0`` in
    ``Diagnostics`` and NaN in :func:`gradient_stats` for a true 6.72 (found in review s22; one
    example dominating at margin 48, squares ~3e-42, 6.966 for 7.000). Until review s22 (R2)
    the test was the *mean* square ``sq / rows``: a sparse coordinate, 2 of 100 examples with
    normal squares ``4e-38``, the rest 0, was withheld (a noise scale of NaN with a warning for
    a true 49.0).
    """
    tiny = torch.finfo(dtype).tiny
    total = torch.zeros((), dtype=torch.float64, device=sq.device)
    sq, grad = sq.reshape(-1), grad.reshape(-1)
    for i in range(0, sq.numel(), _BLOCK):
        s, g = sq[i : i + _BLOCK].double(), grad[i : i + _BLOCK].double()
        low = (s < tiny) & ((s > 0) | (g != 0))
        total += torch.where(low, torch.maximum(s, g * g / rows), 0.0).sum()
    return total


def underflow_losses(
    pairs: dict[str, tuple[Tensor, Tensor, torch.dtype]], rows: int
) -> dict[str, Tensor]:
    """:func:`squares_underflowed` of each parameter's ``(sq, grad, dtype)``, computed only where
    a coordinate's sum of squares is below ``dtype``'s smallest normal number: one comparison
    pass per parameter and one host read for them all first (the float64 passes of
    :func:`squares_underflowed` over every coordinate took 2.2 s on GPT-2 small's 124M
    parameters, a third of ``gradient_stats``' time there; the check alone 0.1 s). A 0-dim
    float64 zero for the others."""
    if not pairs:
        return {}
    names = list(pairs)
    device = pairs[names[0]][0].device
    low = torch.stack(
        [(sq < torch.finfo(dtype).tiny).any().to(device) for sq, _, dtype in pairs.values()]
    ).tolist()  # one host read: a measurement, not a training step's path
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return {
        k: squares_underflowed(*pairs[k][:2], rows, pairs[k][2]) if flag else zero
        for k, flag in zip(names, low)
    }


def _affected(lost: float, trace_cov: float) -> bool:
    """Whether squares lost to underflow (``lost``, in ``tr(Sigma)``'s units) may move
    ``trace_cov`` by more than :data:`_UNDERFLOW_SHARE`."""
    return lost > _UNDERFLOW_SHARE * trace_cov if lost > 0 else False


def _per_parameter(
    tr_of: dict[str, Tensor], g2_of: dict[str, Tensor], lost_of: dict[str, Tensor]
) -> dict[str, list[float]]:
    """Per parameter of ``tr_of``: its ``tr``, ``||mean||^2`` and the part of its squares lost
    to underflow (0 where not known), float64 0-dim tensors read in one host synchronisation."""
    if not tr_of:
        return {}
    names = list(tr_of)
    device = tr_of[names[0]].device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    rows = [
        torch.stack([t.to(device) for t in (tr_of[k], g2_of[k], lost_of.get(k, zero))])
        for k in names
    ]
    return dict(zip(names, torch.stack(rows).tolist()))


def _warn_underflow(names: list[str], layers: list[str], total: bool) -> None:
    """The warning for :data:`UNDERFLOW`, naming the parameters ``names`` whose squares lost more
    than :data:`_UNDERFLOW_SHARE` of their ``tr``, the ``layers`` (module names) whose
    ``trace_covariance`` and ``snr`` are NaN therefore, and whether the totals are (``total``)."""

    def listed(items: list[str]) -> str:
        return ", ".join(f"'{k}'" if k else "'' (the model itself)" for k in items[:3]) + (
            f" and {len(items) - 3} more" if len(items) > 3 else ""
        )

    where = (
        f"the trace_covariance and snr of layers {listed(layers)} are NaN"
        if layers
        else "no layer's trace_covariance or snr is affected"
    )
    totals = (
        "trace_covariance and noise_scale are NaN"
        if total
        else "trace_covariance and noise_scale are not affected (the squares lost are below "
        f"{_UNDERFLOW_SHARE:.0%} of tr(Sigma))"
    )
    warnings.warn(
        f"gradient_stats: {UNDERFLOW}. Parameters affected: {listed(names)} "
        "(info['underflowed_parameters']): their second_moment and variance are not the true "
        f"values either; {where}; {totals}",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def _ratio(num: float, den: float) -> float:
    """``num / den`` of two sums of squares: inf for ``x / 0`` with ``x > 0``, NaN for ``0 / 0``
    (every per-example gradient 0, an exact fit: neither noise nor signal, the ratio undefined;
    until review s17 it was inf, as if the noise dominated)."""
    if den > 0:
        return num / den
    return math.inf if num > 0 else math.nan


def _parameter_dtypes(model: nn.Module, variance: dict[str, Tensor]) -> dict[str, torch.dtype]:
    """The dtype of each parameter of ``variance`` (the variance's own where not found)."""
    params = dict(model.named_parameters())
    return {k: params[k].dtype if k in params else v.dtype for k, v in variance.items()}


def _rounding(sums: torch.dtype, param: torch.dtype) -> float:
    """The relative rounding bound of ``variance = E[g^2] - mean^2`` against ``E[g^2]``:
    ``eps`` of the sums' dtype, plus ``u^2`` for a 16-bit parameter (``u`` its unit roundoff,
    ``2^-8`` in bfloat16, ``2^-11`` in float16), whose per-example gradients the 16-bit
    backward pass rounds to relative ``u`` each: the variance of those errors, up to
    ``u^2 E[g^2]``, adds to the variance reported (found in review: a bfloat16 bias's
    variance 7% off at ``mean^2 / variance = 1.7e4``, 17% at ``6.9e4``, without a warning)."""
    eps = torch.finfo(sums).eps
    if not is_sixteen(param):
        return eps
    u = torch.finfo(param).eps / 2
    return eps + u * u


_CANCELLATION = 0.01
"""The share of a reported variance its rounding bound may reach before gradient_stats warns."""


_BLOCK = 1 << 22
"""Coordinates per block of :func:`_flagged` (16 MB of float32 temporaries)."""


def _flagged(second: Tensor, variance: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """How many coordinates' rounding bound ``eps * E[g^2]`` exceeds 1% of their variance, and
    their largest ``mean^2 / variance`` (inf where the variance was clamped to 0; a coordinate
    whose gradient is always 0 is not counted), as 0-dim tensors on the device.

    ``E[g^2] / variance`` is taken in blocks of :data:`_BLOCK` coordinates: over a whole
    parameter its temporaries (and the int64 copy a boolean sum makes) took 0.35 GB more and
    0.3 s on GPT-2's tied embedding, found in review."""
    count = torch.zeros((), dtype=torch.int64, device=second.device)
    worst = torch.zeros((), dtype=second.dtype, device=second.device)
    for i in range(0, second.numel(), _BLOCK):
        r = torch.div(second[i : i + _BLOCK], variance[i : i + _BLOCK])
        r.nan_to_num_(nan=0.0, posinf=math.inf)
        count += torch.gt(r, _CANCELLATION / eps).sum()
        worst = torch.maximum(worst, r.amax())
    return count, worst - 1  # E[g^2] / variance - 1 = mean^2 / variance


def _warn_cancellation(
    variance: dict[str, Tensor],
    second: dict[str, Tensor],
    tr_of: dict[str, Tensor],
    g2_of: dict[str, Tensor],
    dtypes: dict[str, torch.dtype],
) -> None:
    """Warn where ``variance = E[g^2] - mean^2`` may have lost more than 1% to rounding.

    The subtraction's error is about ``eps * E[g^2]`` in each coordinate, with ``eps`` the
    :func:`_rounding` bound of the sums' dtype (float32 for 16-bit models) and of the
    parameter's (``dtypes``: a 16-bit parameter's per-example gradients are rounded to 16 bits,
    which no float32 sum undoes). Checked coordinate by coordinate: a bound summed over a parameter
    hid one near-constant input's weights among the others (their variance 14% off, or clamped
    to 0, found in review). Per parameter the flagged coordinates are counted and their largest
    ``mean^2 / variance`` taken on the device, then read with the totals ``tr_of`` and ``g2_of``
    in one host synchronisation. A total ``tr(Sigma)`` whose bound ``eps * (tr + ||mean||^2)``
    exceeds 1% is reported too.
    """
    if not tr_of:
        return
    names = list(tr_of)
    param = {k: dtypes.get(k, variance[k].dtype) for k in names}
    bound = {k: _rounding(variance[k].dtype, param[k]) for k in names}
    coarse = max(  # the dtype named: the coarsest rounding (a 16-bit parameter's, else the sums')
        (param[k] if is_sixteen(param[k]) else variance[k].dtype for k in names),
        key=lambda dt: torch.finfo(dt).eps,
    )
    eps = max(bound.values())
    device = tr_of[names[0]].device
    rows = []
    for k in names:
        count, worst = _flagged(second[k].reshape(-1), variance[k].reshape(-1), bound[k])
        parts = (tr_of[k], g2_of[k], count, worst)
        rows.append(torch.stack([t.to(device, torch.float64) for t in parts]))
    table = torch.stack(rows).tolist()  # the one host synchronisation
    bad = sorted(
        ((worst, int(count), k) for k, (_, _, count, worst) in zip(names, table) if count > 0),
        reverse=True,
    )
    if not bad:
        return
    total_tr = sum(row[0] for row in table)
    total_bound = sum(bound[k] * (row[0] + row[1]) for k, row in zip(names, table))
    total = total_bound / total_tr if total_tr > 0 else math.inf
    numel = {k: variance[k].numel() for k in names}
    shown = ", ".join(
        f"'{k}' ({count:,} of {numel[k]:,} coordinates, "
        + (f"mean^2 / variance up to {r:.3g})" if r < math.inf else "some rounded to 0)")
        for r, count, k in bad[:3]
    )
    more = f" and {len(bad) - 3} more parameters" if len(bad) > 3 else ""
    totals = "are affected too" if total > _CANCELLATION else "are not"
    if is_sixteen(coarse):
        advice = (
            f"The 16-bit backward pass rounds each per-example gradient to {str(coarse)[6:]} "
            "(the bound includes u^2 E[g^2], u its unit roundoff); recompute on a float64 copy "
            "of the model and data (copy.deepcopy(model).double()), which removes that rounding, "
            "or make the examples' gradients less alike (centre regression targets, normalise "
            "the inputs)"
        )
    elif coarse == torch.float64:  # no higher precision at hand (review s17: it advised float64)
        advice = (
            "The sums are float64 already, so a float64 copy does not help: the spread there is "
            "at float64 rounding level (the examples' gradients agree to within it), and the "
            "variance reported is good only to within that bound (possibly 0)"
        )
    else:
        advice = (
            "Recompute on a float64 copy of the model and data, or make the examples' gradients "
            "less alike (centre regression targets, normalise the inputs)"
        )
    warnings.warn(
        f"gradient_stats: variance = E[g^2] - mean^2 cancels in {str(coarse)[6:]} where the "
        f"mean gradient dwarfs its spread: the rounding bound eps * E[g^2] (eps up to {eps:.2g}) "
        f"exceeds 1% of the variance reported in {shown}{more}; trace_covariance and "
        f"noise_scale {totals} (bound {total:.2g} of tr(Sigma)). {advice}",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )
