"""Sharpness in the training loop: the edge of stability, preconditioned and critical sharpness, and
the Hessian-weighted gradient noise scale.

Four measurements for :class:`~curvlab.analysis.Diagnostics` (and, those that need no optimizer,
for :func:`~curvlab.analyze`). Each writes its value under its name and, where they apply,
``<name>_threshold`` (the optimizer's stability threshold), ``<name>_hvps`` (Hessian-vector
products used), ``<name>_forwards`` (forward passes used) and ``<name>_stderr`` (one standard
error). ``H`` is the Hessian of the objective ``L = loss_fn(model(X), y)`` on the measured data with
the loss's own reduction (docs/conventions.md), at the current parameters, in eval mode.

``"sharpness"``
    ``λ_max(H)`` by thick-restart Lanczos until the residual ``r = ||H y − λ y||`` of the top Ritz
    pair is at most ``sharpness_tol |λ|`` (default 1e-3; it bounds the error of ``λ``),
    **warm-started** from the previous measurement's top Ritz vectors (kept by ``Diagnostics``
    between measurements; :func:`warm_top_eigenvalue`), so that a measurement after a small
    change of the parameters needs fewer products than a cold start (a measurement over other
    parameters, by names and shapes, starts cold). Threshold (SGD only):
    ``2/η``, ``(2 + 2β)/((1 − τ) η)`` with momentum ``β`` and dampening ``τ``,
    ``(2 + 2β)/((1 + β + β(1 − τ)) η)`` with Nesterov momentum (Cohen et al., 2021: under
    gradient descent ``λ_max`` rises to ``2/η`` and hovers there;
    :func:`~curvlab.analysis._optimizer_state.sharpness_threshold`), each less SGD's weight decay
    (the step descends ``H + wd I``); none at ``η = 0``, under ``maximize=True``, for param
    groups with different learning rates or momenta, or when the optimizer does not step every
    trainable parameter (a group at ``lr = 0`` counts as not held). Only the groups holding a
    parameter ``H`` covers count: a group whose parameters are all frozen
    (``requires_grad_(False)``) neither makes the groups differ nor adds its decay. Also
    ``sharpness_residual`` (``r``).
``"preconditioned_sharpness"``
    For Adam/AdamW, ``λ_max(P⁻¹H) = λ_max(P^-1/2 H P^-1/2)`` with the optimizer's preconditioner
    after its last step ``t``, ``P = (1 − β₁ᵗ)(diag(sqrt(v_t/(1 − β₂ᵗ))) + ε)``, over the
    parameters the optimizer has stepped and moves (a group at ``lr = 0``, a frozen backbone, is
    left out, and ``η`` is the first moving group's holding a parameter the operator covers,
    :func:`~curvlab.analysis._optimizer_state.reference_lr`: another module's group or one frozen
    whole sets no unit, found in review s25); warm-started likewise. With Adam's coupled
    (L2) weight decay ``wd`` the step descends ``L + wd/2 ‖θ‖²`` and ``H`` is that objective's,
    ``H + wd I``. Threshold ``(2 + 2β₁)/((1 − β₁) η)`` (Cohen et al., 2022: adaptive edge of
    stability), with AdamW's decoupled decay ``λ`` ``(1 + β₁)(2 − ηλ)/((1 − β₁) η)``; with
    several param groups the smallest of the groups' own bounds
    ``(1 + β₁,g)(2 − η_g λ_g)/((1 − β₁,g) η)`` (a sufficient condition) over the groups holding
    a parameter the operator covers (a group frozen mid-run keeps its state but is not in ``H``).
``"critical_sharpness"``
    :mod:`curvlab.analysis._critical_sharpness`.
``"noise_scale_hessian"``
    :mod:`curvlab.analysis._noise_scale_hessian`.

The thresholds (``sharpness_threshold``, ``preconditioned_sharpness_threshold``,
``critical_sharpness_threshold``) are read from the optimizer's param groups and state; when its
``step()`` runs step hooks (``opt.register_step_pre_hook`` / ``register_step_post_hook``, or the
global ``torch.optim.optimizer.register_optimizer_step_pre_hook`` / ``_post_hook``), which may
change the step, they are left out with a ``RuntimeWarning`` naming the hooks (the sharpness
values do not depend on the step and are written), and ``critical_sharpness`` is refused
(:func:`~curvlab.analysis._optimizer_state.check_step_hooks`); a pre-hook scaling ``.grad`` by 0.1
gave ``sharpness_threshold`` 12.7 where the hooked dynamics' is 126.7 (found in review s23).
``options={"ignore_optimizer_hooks": True}`` says the hooks do not change the step (logging, an
EMA copy of the weights) and measures as without them.

This module also holds what those two share: the refusal under ``torch.distributed`` and the
measured batches on the model's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from curvlab._compiled import eager_name
from curvlab._data import Batch, to_device
from curvlab._kept_batches import read_batches
from curvlab._rng import make_generator
from curvlab._warn import warn_once
from curvlab.analysis._estimator_measures import measurement_seed
from curvlab.analysis._optimizer_state import (
    IGNORE_HOOKS,
    adam_preconditioner,
    check_optimizer,
    check_optimizer_object,
    check_step_hooks,
    coupled_weight_decay,
    holds_all,
    hooks_ignored,
    preconditioned_threshold,
    sharpness_threshold,
    step_hooks,
)
from curvlab.analysis._registry import Context, Measurement, measurement
from curvlab.distributed import active, unwrap_model
from curvlab.estimators._krylov import KrylovBasis, apply_to_vector
from curvlab.estimators._memory import (
    SIXTEEN_AIM,
    EstimatorMemoryError,
    agree,
    projection_bytes,
    require,
    sixteen_bit,
    storage_dtype,
    vector_bytes,
)
from curvlab.estimators._protocol import values_checked_once
from curvlab.operators import curvature_operator

__all__ = [
    "refuse_distributed",
    "device_batches",
    "OPTIMIZER_QUANTITIES",
    "check_optimizer_for",
    "threshold_modelled",
    "SHARPNESS_TOL",
    "PreconditionedOperator",
    "warm_top_eigenvalue",
    "WARM_MIX",
]

OPTIMIZER_QUANTITIES = ("preconditioned_sharpness", "critical_sharpness")
"""The measurements that need ``Diagnostics(..., optimizer=opt)`` (not available in ``analyze``)."""
SHARPNESS_TOL = 1e-3
"""Default relative accuracy of ``sharpness`` and ``preconditioned_sharpness`` (for a 16-bit
model at least :data:`SIXTEEN_BIT_TOL` ``eps``)."""

SIXTEEN_BIT_TOL = 2
"""A 16-bit model's default ``sharpness_tol`` is at least this many ``eps`` of its dtype
(bfloat16: 1.6e-2, float16: 2.0e-3): its products are rounded to about ``eps`` and its residual
is measured with one product (review s27: on a bfloat16 MLP the measured relative residual was
2.7e-3, above the 1e-3 default)."""


def check_optimizer_for(
    quantities: tuple[str, ...], optimizer: Any, options: Mapping[str, Any] | None = None
) -> None:
    """Raise a clear error at once when ``quantities`` need an optimizer ``optimizer`` is not,
    or when ``optimizer`` (given) is no optimizer at all, whatever the quantities.

    With ``options`` (the measurements' options, checked) ``critical_sharpness`` is refused here
    too for an optimizer whose ``step()`` runs step hooks, unless ``options`` ignore them
    (:func:`~curvlab.analysis._optimizer_state.check_step_hooks`); without, and for hooks
    registered later, the measurement refuses them.

    Raises:
        ValueError: ``preconditioned_sharpness`` or ``critical_sharpness`` without
            ``optimizer=``; ``critical_sharpness`` with an optimizer that runs step hooks.
        TypeError: an ``optimizer`` that is no optimizer (an LR scheduler, a string, a list of
            parameters: :func:`check_optimizer_object`), or an optimizer of another kind than
            they read (Adam/AdamW for the first; SGD, Adam or AdamW for the second).
    """
    if optimizer is not None:
        check_optimizer_object(optimizer)
    if "preconditioned_sharpness" in quantities:
        check_optimizer(optimizer, "preconditioned_sharpness", adam_only=True)
    if "critical_sharpness" in quantities:
        check_optimizer(optimizer, "critical_sharpness")
        if options is not None:
            check_step_hooks(optimizer, "critical_sharpness", options)


def threshold_modelled(ctx: Context, what: str) -> bool:
    """Whether ``ctx.optimizer``'s thresholds describe its step: ``False``, with a
    ``RuntimeWarning`` naming them, when its ``step()`` runs step hooks
    (:func:`~curvlab.analysis._optimizer_state.step_hooks`) that ``ctx.options`` do not
    ignore. ``what`` names the threshold left out."""
    hooks = [] if hooks_ignored(ctx.options) else step_hooks(ctx.optimizer)
    if hooks:
        warn_once(
            f"{what} left out: it is read from the optimizer's param groups and state, but its "
            f"step() also runs step hooks, which may change the step: {'; '.join(hooks)}. "
            "If they do not change it (logging, an EMA copy of the weights), pass "
            f"options={{{IGNORE_HOOKS!r}: True}}",
            RuntimeWarning,
        )
    return not hooks


class PreconditionedOperator:
    """``P^-1/2 (H + W) P^-1/2`` for an operator ``H``, a positive diagonal ``P`` and an optional
    nonnegative diagonal ``W`` (``shift``; flat, like ``H``'s vectors): symmetric, with the
    eigenvalues of ``P⁻¹(H + W)``."""

    def __init__(self, op: Any, diag: Tensor, shift: Tensor | None = None) -> None:
        if not bool((diag > 0).all()):
            raise ValueError(
                "the preconditioner's diagonal must be positive (Adam with eps=0 and parameters "
                "whose gradient was always 0 has zeros there)"
            )
        self.op = op
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.inv_sqrt = diag.rsqrt()
        # P^-1/2 W P^-1/2 = W / P for a diagonal W added to H (Adam's coupled L2 decay)
        self.extra = None if shift is None or not bool(shift.any()) else shift / diag

    def matmat(self, V: Tensor) -> Tensor:
        s = self.inv_sqrt.to(V.device, V.dtype)[:, None]
        out = s * self.op.matmat(s * V)
        if self.extra is not None:
            out = out + self.extra.to(V.device, V.dtype)[:, None] * V
        return out


WARM_MIX = 0.1
"""Weight of the previous second, third, ... Ritz vectors in a warm start (the top one has 1)."""

WARM_RANDOM = 0.3
"""Norm of the random vector (from the measurement's seed) added to a warm start whose Ritz
vectors have norm 1. Without it a new top eigenvector outside their span (a direction that was
not among the top ones before) has no component in the start; Lanczos then converges to the best
eigenvalue inside it and the residual test passes there: on ``diag(1, .., 99, 200)`` from
``e_99, e_98, e_97`` a start without it returned 99 after 2 products, with it 200 after 7, as
many as a cold start. On W2's training run (``benchmarks/bench_sharpness_warm.py``) the warm
starts took the same products with and without it.

It does not make a warm start as safe as a cold one: along each of ``D`` directions it puts
about ``0.3/√D`` against the old top vector's 1, so a new top eigenvector outside the kept span
whose eigenvalue is close above the old top can stay hidden while Lanczos converges, residual
test passed, on the old top eigenpair (still an eigenpair). Found in review on ``diag`` spectra
(bulk in [0, 1], old top 10, 9, 8, a new top in a new direction): a new top 2% higher was missed
for every seed at ``D`` = 2,000 to 200,000, 10% higher in 1–3 of 3 seeds, 30% higher never;
a weight of 3 instead of 0.3 still missed 6 of 27 such cases, so only a cold start
(``sharpness_vectors=0``) removes it. Training runs turn the top eigenvector gradually (no miss
in 40 warm measurements of an MLP under minibatch SGD, each checked against ``eigvalsh``)."""


def warm_top_eigenvalue(
    op: Any,
    starts: Tensor | None,
    tol: float,
    seed: int = 0,
    keep: int = 3,
    max_basis: int = 20,
    max_matvecs: int = 1000,
) -> tuple[float, float, int, Tensor, bool]:
    """``λ_max`` of a symmetric operator by thick-restart Lanczos, warm-started from ``starts``.

    The Krylov process (:class:`~curvlab.estimators._krylov.KrylovBasis`) starts from
    ``y_1 + 0.1 (y_2 + ... + y_keep) + 0.3 z``, the previous measurement's top Ritz vectors (unit
    length) and a random unit vector ``z`` from ``seed`` (``z`` alone without them): close to the
    new top eigenvector after a small change of the parameters, with enough of the next ones that
    the top eigenvector is still found within two or three products when the top eigenvalues
    crossed since (a start from ``y_1`` alone would then converge to the second), and, through
    ``z``, a component along every eigenvector: a new top eigenvector outside the span of the
    ``y_i`` is found when its eigenvalue is well above the old top's, and can be missed when it is
    close (:data:`WARM_RANDOM`; a cold start, ``starts=None``, has no such bias). It stops when the top Ritz
    pair's residual ``r = ||A y − θ y||`` is at most ``tol |θ|`` (ARPACK's relative tolerance),
    which bounds the error of ``θ`` by ``tol |θ|`` (and in practice by ``r²/gap``, far less); it
    restarts thickly when the basis reaches ``max_basis`` vectors. For a 16-bit model (products
    in 16 bits, vectors in float32) the recurrence's residual claims an accuracy far below the
    products' rounding, so the top Ritz pair's residual is measured with one more product and
    ``converged`` judged on it (review s27: a bfloat16 MLP logged 7.9e-5 for an error of 3.6e-4).

    Returns:
        ``(θ, r, products, vectors, converged)`` with ``vectors`` the ``keep`` top Ritz vectors
        ``(D, keep)`` (unit length, descending) for the next warm start.

    Raises:
        EstimatorMemoryError: where the basis does not fit the memory available; under
            ``torch.distributed`` (an operator whose products are all-reduced) on every rank
            when it does not fit on one (:func:`~curvlab.estimators._memory.agree`).
    """
    dim = op.shape[0]
    dtype, device = storage_dtype(op.dtype), op.device
    sixteen = int(sixteen_bit(op.dtype))  # the residual is then measured: one more product
    aim = tol / SIXTEEN_AIM if sixteen else tol
    met_at: int | None = None  # 16-bit: the products when the recurrence first met tol
    keep = max(1, min(keep, dim))
    cap = min(dim, max(max_basis, keep + 2))
    held = cap + 1 + keep
    try:
        require(
            f"sharpness: a Krylov basis of {held} vectors of {dim:,} entries",
            held * vector_bytes(dim, dtype),
            device,
            "pass options={'sharpness_max_basis': <fewer vectors>} (at least 5)",
        )
        reach = min(cap, max_matvecs)  # the projection grows with the basis the run reaches
        require(
            f"sharpness: the projected problem of a Krylov basis of up to {reach} vectors "
            "(float64 arrays on the host)",
            projection_bytes(cap, reach, dim),
            torch.device("cpu"),
            "pass options={'sharpness_max_basis': <fewer vectors>} (at least 5)",
        )
        refusal = None
    except EstimatorMemoryError as exc:
        refusal = exc
    # under torch.distributed every product is a collective: a refusal on one rank (its own
    # free memory) stops all of them, as in the public estimators (found in review s19: the
    # refusing rank raised alone while the others waited in the first product's all-reduce)
    agree(_comm_of(op), 0, refusal)
    # the cold start, and the random part of a warm one (whose norm it keeps above zero)
    gen = make_generator(seed=seed, device=device)
    start = torch.randn(dim, generator=gen, device=device, dtype=dtype)
    if starts is not None:
        mix = torch.full((starts.shape[1],), WARM_MIX, device=device, dtype=dtype)
        mix[0] = 1.0
        z = start
        start = (starts.to(device, dtype) @ mix).add_(z, alpha=WARM_RANDOM / float(z.norm()))
        del z
    # no code of the user's runs between the products: the model's values (changes through
    # .data) are compared before the first and after the last (values_checked_once)
    with values_checked_once(_curvature_of(op), "sharpness"):
        kry = KrylovBasis(op, start, cap)
        del start
        while True:
            kry.step()
            theta, S, res = kry.ritz()
            top = theta.numel() - 1
            # 16-bit: aim below tol, so that the product's rounding added by the measurement
            # does not push a converged pair over it (review s27: 3 of 120 bfloat16
            # measurements missed the default tol by a hair and blamed the rounding)
            converged = bool(res[top] <= aim * abs(theta[top])) or kry.m == dim
            if sixteen and not converged and bool(res[top] <= tol * abs(theta[top])):
                # met tol but not the aim: as many products again, then measured against tol
                # (a restarted 16-bit recurrence may never read the aim)
                met_at = kry.num_matvecs if met_at is None else met_at
                converged = kry.num_matvecs >= 2 * met_at
            if converged or kry.num_matvecs >= max_matvecs - sixteen:
                break
            if kry.m == cap:
                n = min(kry.m - 1, keep + max(1, (cap - keep) // 2))
                kry.restart(torch.arange(top, top - n, -1), theta, S)
        n = min(keep, theta.numel())
        vectors = kry.vectors(S[:, torch.arange(top, top - n, -1)])
        residual = 0.0 if kry.m == dim else float(res[top])
        spent, rounding = kry.num_matvecs, False
        if sixteen and converged:
            # 16-bit products are rounded far above the recurrence's residual (review s27:
            # bfloat16, 7.9e-5 logged for an error of 3.6e-4): measure it, one product
            v = vectors[:, 0]
            w = apply_to_vector(op, v, device, dtype)
            residual = float((w.double() - float(theta[top]) * v.double()).norm())
            del w
            spent += 1  # (counted where spent: review s27, one was counted unspent)
            converged = residual <= tol * abs(float(theta[top]))
            rounding = not converged  # the recurrence met tol / SIXTEEN_AIM, the product not
    out = TopPair((float(theta[top]), residual, spent, vectors, converged))
    out.rounding_limited = rounding
    return out


class TopPair(tuple):
    """:func:`warm_top_eigenvalue`'s ``(θ, r, products, vectors, converged)``, and in
    ``rounding_limited`` whether it failed because the measured residual of a 16-bit model
    missed ``tol`` after the recurrence's met ``tol / SIXTEEN_AIM`` (the products' rounding is
    the limit: more products do not help)."""

    rounding_limited: bool = False


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _curvature_of(op: Any) -> Any:
    """The curvature operator inside ``op`` (``op`` itself, or the one a
    :class:`PreconditionedOperator` wraps), ``None`` where there is none."""
    while op is not None and not hasattr(op, "_comm"):
        op = getattr(op, "op", None)
    return op


def _comm_of(op: Any) -> Any:
    """The process group whose products ``op`` all-reduces (an operator's ``_comm``, through a
    :class:`PreconditionedOperator`), ``None`` for a local one."""
    return getattr(_curvature_of(op), "_comm", None)


def _coordinates(op: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The coordinates of ``op``'s vectors: its parameters' names (without ``torch.compile``'s
    ``_orig_mod`` segments: :func:`~curvlab._compiled.eager_name`) and shapes, in flat order."""
    inner = _curvature_of(op)
    return tuple(
        (eager_name(str(n)), tuple(int(d) for d in s)) for n, s in zip(inner.names, inner.shapes)
    )


def _saved_coordinates(saved: Any) -> tuple[tuple[str, tuple[int, ...]], ...] | None:
    """``ctx.state[key + "/params"]`` as :func:`_coordinates` gives it (``torch.load`` may give
    lists back), ``None`` where it is not one."""
    try:
        return tuple((eager_name(str(n)), tuple(int(d) for d in s)) for n, s in saved)
    except (TypeError, ValueError):
        return None


def _top_eigenpair(op: Any, ctx: Context, key: str, what: str) -> tuple[float, float, int]:
    """``λ_max`` of ``op`` warm-started from ``ctx.state[key]`` (then replaced by the new top Ritz
    vectors); returns the value, its residual norm and the products used.

    The vectors are kept with the coordinates they are in (``ctx.state[key + "/params"]``: the
    operator's parameter names and shapes, in flat order) and reused only by an operator over
    the same ones: vectors of another parameter set of the same total size (one block frozen and
    another of equal size unfrozen since) would start Lanczos in the wrong coordinates, so that
    measurement starts cold (it matched on the total size alone before, found in review s23). A
    state saved before the coordinates were kept is matched on the size, as before."""
    default = SHARPNESS_TOL
    if sixteen_bit(op.dtype):  # its products' rounding (SIXTEEN_BIT_TOL)
        default = max(default, SIXTEEN_BIT_TOL * torch.finfo(op.dtype).eps)
    tol = float(ctx.options.get("sharpness_tol", default))
    if not 0 < tol < 1:
        raise ValueError(f"sharpness_tol must be in (0, 1), got {tol!r}")
    keep = int(ctx.options.get("sharpness_vectors", 3))  # 0: every measurement starts cold
    prev = ctx.state.get(key) if keep > 0 else None
    coordinates = _coordinates(op)
    layout = f"{key}/params"
    ok = isinstance(prev, Tensor) and prev.ndim == 2 and prev.shape[0] == op.shape[0]
    if ok and layout in ctx.state:  # (absent from a state saved before they were kept)
        ok = _saved_coordinates(ctx.state[layout]) == coordinates
    found = warm_top_eigenvalue(
        op,
        prev if ok else None,
        tol,
        # a new random part at every measurement: each gets its own chance at a new top
        # eigenvector that the kept vectors miss (the same z every time, found in review)
        seed=measurement_seed(ctx, key),
        keep=max(1, keep),
        max_basis=int(ctx.options.get("sharpness_max_basis", 20)),
        max_matvecs=int(ctx.options.get("sharpness_max_matvecs", 1000)),
    )
    value, residual, hvps, vectors, converged = found
    if not converged and found.rounding_limited:
        suggest = 2 * residual / max(abs(value), torch.finfo(torch.float64).tiny)
        raise RuntimeError(
            f"{what}: the residual of the top Ritz pair, measured with one product, is "
            f"{residual:.3g} (relative {residual / max(abs(value), 1e-300):.3g}), above the "
            f"relative accuracy {tol:g}: the rounding of the model's {_dtype_name(op.dtype)} "
            "products limits the accuracy (more products do not help); pass "
            f"options={{'sharpness_tol': {suggest:.1g}}} or more, or measure a float32 copy"
        )
    if not converged:
        raise RuntimeError(
            f"{what}: Lanczos did not reach the relative accuracy {tol:g} within {hvps} Hessian "
            f"products (residual {residual:.3g}); raise options['sharpness_max_matvecs'] or "
            "loosen options['sharpness_tol']"
        )
    if keep > 0:
        ctx.state[key], ctx.state[layout] = vectors, coordinates
    else:  # cold starts: vectors loaded from a warm-started run's state are not carried on
        # (review s27: every later checkpoint kept them, against "cold starts, a small file")
        ctx.state.pop(key, None)
        ctx.state.pop(layout, None)
    return value, residual, hvps


@measurement("sharpness")
def sharpness(ctx: Context, names: tuple[str, ...], out: Measurement) -> None:
    """``λ_max(H)``, warm-started, with the (momentum) SGD threshold when an SGD optimizer is given."""
    op = curvature_operator(ctx.model, ctx.loss_fn, ctx.data, matrix="hessian", seed=ctx.seed)
    value, residual, hvps = _top_eigenpair(op, ctx, "sharpness", "sharpness")
    out.values["sharpness"] = value
    out.values["sharpness_residual"] = residual
    out.values["sharpness_hvps"] = hvps
    model = unwrap_model(ctx.model)
    # the groups holding a parameter H covers: a group frozen whole is not in H (review s20)
    threshold = (
        None if ctx.optimizer is None else sharpness_threshold(ctx.optimizer, model, op.names)
    )
    if (
        threshold is not None
        and holds_all(ctx.optimizer, model)
        and threshold_modelled(ctx, "sharpness_threshold")
    ):
        out.values["sharpness_threshold"] = threshold


@measurement("preconditioned_sharpness")
def preconditioned_sharpness(ctx: Context, names: tuple[str, ...], out: Measurement) -> None:
    """``λ_max(P⁻¹H)`` with Adam's preconditioner, warm-started, with its threshold."""
    model = unwrap_model(ctx.model)
    diag = adam_preconditioner(ctx.optimizer, model)  # raises without an Adam/AdamW
    op = curvature_operator(
        model,
        ctx.loss_fn,
        ctx.data,
        matrix="hessian",
        seed=ctx.seed,
        params=lambda name, p: name in diag,
    )
    # over the groups holding a parameter the operator covers: a head frozen mid-run keeps its
    # Adam state, and its group's bound was taken (600 for a true 3800, found in review s20)
    threshold = preconditioned_threshold(ctx.optimizer, model, op.names)
    flat = torch.cat([diag[n].reshape(-1).to(op.device) for n in op.names])
    decay = coupled_weight_decay(ctx.optimizer, model)
    shift = None
    if decay:  # Adam's L2 term: it descends L + wd/2 |θ|², Hessian H + wd I
        shift = torch.cat(
            [torch.full_like(diag[n].reshape(-1), decay.get(n, 0.0)) for n in op.names]
        )
        shift = shift.to(op.device)
    pre = PreconditionedOperator(op, flat, shift)
    value, residual, hvps = _top_eigenpair(
        pre, ctx, "preconditioned_sharpness", "preconditioned_sharpness"
    )
    out.values["preconditioned_sharpness"] = value
    out.values["preconditioned_sharpness_residual"] = residual
    out.values["preconditioned_sharpness_hvps"] = hvps
    if threshold is not None and threshold_modelled(ctx, "preconditioned_sharpness_threshold"):
        out.values["preconditioned_sharpness_threshold"] = threshold


def refuse_distributed(what: str) -> None:
    """Refuse a measurement whose passes are not reduced over the ranks."""
    if active() is not None:
        raise NotImplementedError(
            f"{what} is not available under torch.distributed yet (its passes are not reduced "
            "over the ranks); measure it with process_group='local' for each rank's shard"
        )


def device_batches(ctx: Context, device: torch.device) -> list[Batch]:
    """The measured batches, moved to ``device``."""
    return [to_device(b, device) for b in read_batches(ctx.data)]
