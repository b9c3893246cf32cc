"""When a Lanczos run of :func:`~curvlab.estimators._lanczos.lanczos_eigenvalues` may stop.

The stopping rules, apart from the recurrence that feeds them: which Ritz values are wanted,
when they have converged (by their residuals or their eigenvalue error estimates, with the
rounding level at 0), when they may be locked for the verification of a restarted run, when
the newest segment of the Krylov space is settled, and, for a run that stops unconverged, why.
The module docstring of :mod:`curvlab.estimators._lanczos` holds the method these rules serve.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab.estimators._krylov import KrylovBasis
from curvlab.estimators._memory import storage_dtype

VERIFY_SHARE = 10
"""A run that never restarts is verified (a fresh random segment orthogonal to the locked wanted
Ritz vectors, as a restarted one) when ``k >= D / VERIFY_SHARE``: the residual test only says
that each Ritz value is near *some* eigenvalue, and an interior eigenvalue that no Ritz value has
reached is not seen. Found in review s12: with a default (unrestarted) basis, ``tol=1e-4``,
generic spectra, 3–9 of 50 runs per share ``k/D`` of 0.1, 0.15, 0.2 and 0.3 returned a wrong
``k``-th value with ``converged=True`` (errors up to 290x ``tol * ||A||``), 0 of 50 at 0.02 and
0.05. Smaller shares are not verified by default (the cost, about the products of converging
one more eigenvalue plus ``k``, would fall on every run: W1's top 5 would take 123 products
instead of 75); ``verify=True`` asks for it."""


ZERO_ROUNDING = 10
"""``criterion="eigenvalue"`` also accepts a Ritz pair whose error estimate is at most
``min(tol, ZERO_ROUNDING * eps) * ||A||`` (``eps`` of the vectors' dtype: the rounding of the
products, below which no value is known better): a value within rounding of 0 cannot meet an
error bound relative to ``|theta|``. Until review s16 a PSD matrix with a null space, ``k=3``
smallest, ran to ``max_matvecs`` (1000 products) and returned ``converged=False`` with values
``1e-14`` and residuals ``2e-16``; the residual criterion stopped after 96."""


DENSE_SHARE = 0.05
"""``info["unconverged"]`` of a run stopped on an unsettled segment names a dense bulk of
eigenvalues only where the segment's next Ritz value lies within this share of the spread of
its Ritz values below the most extreme one (found in review s22: a bulk was named for a fresh
segment of one vector, and for one whose values were 2 apart)."""


def _zero_level(tol: float, dtype: torch.dtype) -> float:
    """The error estimate, relative to ``||A||``, that ``criterion="eigenvalue"`` accepts
    whatever ``|theta|`` (see :data:`ZERO_ROUNDING`); never above ``tol``, so never looser
    than the residual criterion."""
    return min(tol, ZERO_ROUNDING * torch.finfo(storage_dtype(dtype)).eps)


def _converged(
    theta: Tensor,
    res: Tensor,
    idx: Tensor,
    tol: float,
    norm: float,
    criterion: str,
    zero: float = 0.0,
) -> bool:
    """The stopping test of :func:`lanczos_eigenvalues` for the wanted Ritz pairs ``idx``
    (``zero``: :func:`_zero_level`, for ``criterion="eigenvalue"``)."""
    if criterion == "residual":
        return bool((res[idx] <= tol * norm).all())
    if theta.numel() < 2:
        return False
    others = (theta[idx, None] - theta[None, :]).abs()
    others[torch.arange(idx.numel()), idx] = float("inf")
    gap = others.min(dim=1).values.clamp_min(torch.finfo(torch.float64).tiny)
    r = res[idx]
    bound = torch.minimum(r, r * (r / gap))  # r * (r / gap): no underflow of r^2 at tiny scales
    target = (tol * theta[idx].abs()).clamp_min(zero * norm)
    return bool((bound <= target).all())


def _lockable(
    kry: KrylovBasis,
    theta: Tensor,
    S: Tensor,
    idx: Tensor,
    tol: float,
    norm: float,
    criterion: str,
    locks: int,
    zero: float = 0.0,
) -> bool:
    """Whether the wanted Ritz vectors ``idx`` are accurate enough to be locked
    (:meth:`KrylovBasis.lock`): the residual of every unit vector in their span, couplings to
    vectors discarded at earlier locks included, is at most ``tol * scale * (t + 1) / (t + 2)``
    after ``t`` locks (``tol * scale``: ``tol * ||A||`` for ``criterion="residual"``, for
    ``"eigenvalue"`` ``tol`` times the smallest ``|theta|`` among them, at least
    ``zero * ||A||``, see :func:`_zero_level`). The couplings of locked vectors stay in their
    residuals, so the allowances of successive locks add up to less than the tolerance and the
    locked values keep passing the test."""
    if criterion == "residual":
        allowance = tol * norm
    else:
        allowance = max(tol * float(theta[idx].abs().min()), zero * norm)
    return kry.lock_bound(S[:, idx]) <= allowance * (locks + 1) / (locks + 2)


def _why_unconverged(
    theta: Tensor,
    res: Tensor,
    idx: Tensor,
    tol: float,
    norm: float,
    criterion: str,
    matvecs: int,
    limit: int,
    locks: int,
    segments: int,
    zero: float = 0.0,
    *,
    mass: Tensor | None = None,
    which: str = "largest",
    measured: str | None = None,
    unmeasured: str | None = None,
) -> str:
    """What kept a run from converging, for ``info["unconverged"]`` (``mass``: each Ritz
    vector's share in the newest segment, :meth:`KrylovBasis.segment_mass`, which the message
    on an unsettled segment reads its state from).

    A segment that had not settled was blamed on "a dense bulk of eigenvalues right below the
    wanted ones" whatever was seen (review s22: a fresh segment of one vector, or one whose
    values were 2 below the wanted one); the message now gives the segment's most extreme Ritz
    value and its residual, and names a bulk only where the segment's Ritz values show one
    (:data:`DENSE_SHARE`).

    ``measured``: the products' dtype where the recurrence's test passed and the residuals were
    then measured with ``k`` products (after a lock or an invariant subspace, and always for a
    16-bit model); when those fail the test, more products cannot help: the products' rounding
    limits the accuracy, and the message gives a ``tol`` above it (review s27: it said "raise
    max_matvecs" for a bfloat16 model that stopped after 186 of 1000 or 5000 products).
    ``unmeasured``: a 16-bit dtype whose residuals could not be measured (no room left)."""
    if measured is not None and not _converged(theta, res, idx, tol, norm, criterion, zero):
        worst = float(res[idx].max())
        suggest = _round_up(2 * worst / max(norm, torch.finfo(torch.float64).tiny))
        copy = {"bfloat16": "a float32 or float64", "float16": "a float32 or float64"}.get(
            measured, "a float64"
        )
        copy_hint = "" if measured == "float64" else f", or measure {copy} copy of the model"
        return (
            f"the residuals read from the recurrence met tol={tol:g} after {matvecs} products, "
            f"but those measured at the end (one product each) reach {worst:.3g}, above "
            f"tol * ||A|| = {tol * norm:.3g}: the rounding of the {measured} products limits "
            f"the accuracy (more products do not help); pass tol >= {suggest:.1g}{copy_hint}"
        )
    if unmeasured is not None:
        return (
            f"the residuals of a model whose products are {unmeasured} must be measured with "
            f"one product per wanted value (the recurrence's claim an accuracy far below the "
            f"products' rounding), and max_matvecs={limit} left no room for them after "
            f"{matvecs} products: raise max_matvecs"
        )
    if not _converged(theta, res, idx, tol, norm, criterion, zero):
        if criterion == "eigenvalue" and _converged(theta, res, idx, tol, norm, "residual"):
            small = float(theta[idx].abs().min())
            return (
                f"the wanted Ritz values met the residual test (residuals <= tol * ||A|| = "
                f"{tol * norm:.3g}) but not criterion='eigenvalue' after {matvecs} products "
                f"(max_matvecs={limit}): it asks for an error below tol * |theta|, which for "
                f"values far below ||A|| (here |theta| = {small:.3g}, ||A|| ~ {norm:.3g}) "
                "takes residuals far below the residual test's, down to the rounding of the "
                "products for values near 0; use criterion='residual' (|theta - lambda| <= "
                "residual), which these values pass, or raise max_matvecs"
            )
        return (
            f"the wanted Ritz values had not met tol={tol:g} after {matvecs} products "
            f"(max_matvecs={limit}): raise max_matvecs or tol"
        )
    if segments == 1:
        return (
            f"the wanted values passed the residual test, but the run must verify them before "
            f"it claims convergence (it restarted, or verify=True, or k >= D/10) and "
            f"max_matvecs={limit} left no room for the verification (about the products of "
            "converging one more eigenvalue): raise max_matvecs"
        )
    what = (
        "the verification (a fresh random segment orthogonal to the locked wanted vectors)"
        if locks
        else "the newest segment (after an invariant subspace)"
    )
    head = f"the wanted values passed the residual test, but {what} had not settled within "
    head += f"max_matvecs={limit}"
    way_out = "raise max_matvecs, max_basis or memory_budget (fewer restarts), or tol"
    delta = tol * norm
    best = None if mass is None else _newest_best(theta, mass, which, delta)
    if best is None:
        return f"{head}: it had no Ritz value yet (it starts from a fresh direction); {way_out}"
    t, x, cand = best
    top = torch.nonzero((t - x).abs() <= delta).flatten()
    value = float(x) if which == "largest" else -float(x)
    if _converged(theta, res, top, tol, norm, criterion, zero):
        return (
            f"{head}: its most extreme Ritz value {value:.6g} had converged and is among the "
            "wanted ones (another copy of a wanted eigenvalue, or one the older segments "
            f"missed), so a further fresh segment must show that nothing more comes; {way_out}"
        )
    below = t[cand & (t < x - delta)]
    state = (
        f"its most extreme Ritz value {value:.6g} (residual {float(res[top].max()):.3g}, "
        f"tol * ||A|| = {delta:.3g}) had not converged"
    )
    if below.numel() and float(x - below.max()) <= DENSE_SHARE * float(x - below.min()):
        # the next value is inward: below the largest, above the smallest (it said "below" for
        # which="smallest" too, found in review s22)
        side = "below" if which == "largest" else "above"
        return (
            f"{head}: {state}; the segment's next Ritz value is {float(x - below.max()):.3g} "
            f"{side} it, within {DENSE_SHARE:.0%} of the spread of its Ritz values: it sits on a "
            "dense bulk of "
            f"eigenvalues, where Ritz values converge slowly; {way_out}"
        )
    return f"{head}: {state} (it settles once that value has); {way_out}"


def _round_up(x: float) -> float:
    """``x > 0`` rounded up to one significant digit (``0.0023`` -> ``0.003``)."""
    e = math.floor(math.log10(x))
    return math.ceil(x / 10.0**e * (1 - 1e-12)) * 10.0**e


def _newest_best(
    theta: Tensor, mass: Tensor, which: str, delta: float
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The newest segment's most extreme Ritz value at the wanted end, as ``(t, x, cand)``:
    ``t`` the Ritz values signed so that larger is better, ``x`` the best of those that are the
    segment's (or tied with one within ``delta``: ``cand``, a mask); ``None`` when the segment
    has no Ritz vector yet. ``mass``: :meth:`KrylovBasis.segment_mass`."""
    t = theta if which == "largest" else -theta  # larger is better
    near = ((t[:, None] - t[None, :]).abs() <= delta).to(torch.float64)
    cand = (near @ mass) > 0.5  # a Ritz value of the newest segment (or tied with one)
    if not bool(cand.any()):
        return None
    return t, t[cand].max(), cand


def _newest_segment(
    theta: Tensor,
    mass: Tensor,
    res: Tensor,
    k: int,
    which: str,
    tol: float,
    norm: float,
    criterion: str,
    zero: float = 0.0,
) -> str:
    """Whether the newest segment (the Krylov space grown from the vector after the latest
    invariant subspace or lock, see :meth:`KrylovBasis.new_segment`) adds nothing to the wanted
    values, so the run may stop: ``"settled"``; ``"adds"`` when its most extreme value has
    converged and belongs among the wanted ones; else ``"pending"``.

    ``mass`` is each Ritz vector's share in the newest segment
    (:meth:`KrylovBasis.segment_mass`). The segment's most extreme Ritz value at the wanted end
    (``x``) must have converged, and the other segments must hold at least ``k`` values at
    least as good as ``x`` (ties within ``tol * norm`` count as nothing new); otherwise ``x``
    may be one more copy of an eigenvalue (or one the exhausted segments could not reach) and
    the segment is grown until it becomes invariant in turn and the next fresh segment is
    judged. Shares are summed over Ritz values within ``tol * norm`` of each other, so a
    repeated value whose copies from several segments the eigensolver mixed is still counted
    right. A segment with no Ritz vector yet is pending.
    """
    delta = tol * norm
    best = _newest_best(theta, mass, which, delta)
    if best is None:
        return "pending"
    t, x, _ = best
    top = torch.nonzero((t - x).abs() <= delta).flatten()
    if not _converged(theta, res, top, tol, norm, criterion, zero):
        return "pending"
    others = float((1.0 - mass)[t >= x - delta].sum())  # older values as good as x, ties too
    return "settled" if others > k - 0.5 else "adds"


def _verified(k: int, dim: int, verify: bool) -> bool:
    """Whether a run verifies before it claims convergence even if it never restarts: with
    ``verify=True``, or ``k >= 2`` and ``k >= D / VERIFY_SHARE`` (restarted runs with ``k >= 2``
    always do).

    ``k = 1`` is not verified by default, restarted or not: sharpness in a training loop pays
    for every product. Its residual test then guarantees only that the value is within its
    residual of *an* eigenvalue; where another eigenvalue sits within a few ``tol * ||A||``
    below the top one, that one can be returned in its place with ``converged=True`` (review
    s16: four top values ``1 + 1e-5 * [1, .7, .4, .1]`` over a bulk in ``[0, 0.9]``, ``D = 50``,
    ``tol=1e-6``: 12 of 100 seeds returned a value 3 ``tol * ||A||`` below the top one; with
    ``verify=True`` none did, at 50 products on average instead of 36.7). An exact copy of the
    top value missed changes nothing returned."""
    return verify or (k > 1 and k * VERIFY_SHARE >= dim)


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the ``k`` wanted Ritz values (most extreme first); ``theta`` is ascending."""
    n = theta.numel()
    k = min(k, n)
    if which == "largest":
        return torch.arange(n - 1, n - 1 - k, -1)
    return torch.arange(0, k)
