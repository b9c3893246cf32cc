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
    change of the parameters needs fewer products than a cold start. Threshold (SGD only):
    ``2/η``, ``(2 + 2β)/((1 − τ) η)`` with momentum ``β`` and dampening ``τ``,
    ``(2 + 2β)/((1 + β + β(1 − τ)) η)`` with Nesterov momentum (Cohen et al., 2021: under
    gradient descent ``λ_max`` rises to ``2/η`` and hovers there;
    :func:`~curvlab.analysis._optimizer_state.sharpness_threshold`), each less SGD's weight decay
    (the step descends ``H + wd I``); none at ``η = 0``, under ``maximize=True``, for param
    groups with different learning rates or momenta, or when the optimizer does not step every
    trainable parameter (a group at ``lr = 0`` counts as not held). Also ``sharpness_residual``
    (``r``).
``"preconditioned_sharpness"``
    For Adam/AdamW, ``λ_max(P⁻¹H) = λ_max(P^-1/2 H P^-1/2)`` with the optimizer's preconditioner
    after its last step ``t``, ``P = (1 − β₁ᵗ)(diag(sqrt(v_t/(1 − β₂ᵗ))) + ε)``, over the
    parameters the optimizer has stepped and moves (a group at ``lr = 0``, a frozen backbone, is
    left out, and ``η`` is the first moving group's); warm-started likewise. With Adam's coupled
    (L2) weight decay ``wd`` the step descends ``L + wd/2 ‖θ‖²`` and ``H`` is that objective's,
    ``H + wd I``. Threshold ``(2 + 2β₁)/((1 − β₁) η)`` (Cohen et al., 2022: adaptive edge of
    stability), with AdamW's decoupled decay ``λ`` ``(1 + β₁)(2 − ηλ)/((1 − β₁) η)``; with
    several param groups the smallest of the groups' own bounds
    ``(1 + β₁,g)(2 − η_g λ_g)/((1 − β₁,g) η)`` (a sufficient condition).
``"critical_sharpness"``
    ``λ_c = 2/η_c`` with ``η_c`` the smallest step size along the update ``opt.step()`` would apply
    now on the measured batch at which the loss rises above its current value (Kalra et al.,
    2026), ``η`` the first moving group's learning rate (a group at ``lr = 0`` adds nothing to
    the update). The update comes from one fresh gradient of the measured batch and the optimizer's
    state, computed functionally (:func:`~curvlab.analysis._optimizer_state.would_be_update`;
    the state is only read); a parameter the optimizer holds that keeps a ``.grad`` tensor
    though it does not require one (frozen mid-run under ``zero_grad(set_to_none=False)``) is
    moved by ``step()`` with a zero gradient, and so is in the update. Under curvlab's
    ``NoisyOptimizer`` the update is the inner optimizer's **noise-free** one (the noise its
    ``step()`` adds is random and left out). Then forward passes only
    (:func:`critical_step`): a bracket warm-started at the previous ``η_c`` and interpolation of
    the root of ``(L(θ + s u) − L(θ))/s`` (exact on a quadratic) with bisection as the safeguard,
    until the
    bracket's relative width is at most ``critical_tol`` (default 1e-2). On a quadratic with update ``−η d`` and gradient ``g`` it is
    ``dᵀHd / gᵀd``. Threshold ``2/η``: the step ``opt.step()`` takes on this batch raises the
    batch loss iff ``λ_c > 2/η``, for the **unclipped** gradient. Gradient clipping
    (``clip_grad_norm_``, the HF Trainer's ``max_grad_norm``, default 1.0) is not modelled: for
    SGD without momentum or weight decay the clipped step is ``c = min(1, max_norm/‖g‖)`` times the
    modelled update, so it raises the loss iff ``c λ_c > 2/η`` (``λ_c`` along the clipped step
    is ``c λ_c``); with momentum, weight decay or Adam the clipped step is not a multiple of the
    modelled update and ``λ_c`` does not describe it.
``"noise_scale_hessian"``
    McCandlish et al.'s (2018) ``B_noise = tr(HΣ)/(GᵀHG)``, ``Σ = (1/N) Σ_n (g_n − G)(g_n − G)ᵀ``
    the covariance of the mean-convention per-example gradients ``g_n`` and ``G`` their mean,
    ``H`` the Hessian of the mean loss (the ratio does not depend on the reduction). ``tr(HΣ)`` is
    estimated without per-example Hessian products: with independent random signs ``s_n``,
    ``u = N^-1/2 (Σ_n s_n g_n − (Σ_n s_n) G)`` has ``E[u uᵀ] = Σ``, so ``uᵀHu`` is an unbiased
    probe of ``tr(HΣ)`` costing one backward pass (of ``Σ_n s_n ℓ_n``) and one Hessian product;
    ``num_probes`` of them (default 10), their standard error over probes, and ``GᵀHG`` exactly
    (one product). Also ``trace_hessian_covariance`` (``tr(HΣ)``) and ``grad_hessian_grad``
    (``GᵀHG``), both with the Hessian of the mean loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvlab._data import Batch, call_model, check_inputs_fit, num_examples, to_device
from curvlab._kept_batches import read_batches
from curvlab._precision import upcast
from curvlab._rng import make_generator
from curvlab._scan import model_device
from curvlab.analysis._first_order import ONE_EXAMPLE
from curvlab.analysis._optimizer_state import (
    adam_preconditioner,
    check_optimizer,
    coupled_weight_decay,
    critical_threshold,
    holds_all,
    preconditioned_threshold,
    reference_lr,
    sharpness_threshold,
    stepped_without_gradient,
    would_be_update,
)
from curvlab.analysis._registry import Context, Measurement, measurement
from curvlab.distributed import active, unwrap_model
from curvlab.estimators._krylov import KrylovBasis
from curvlab.estimators._memory import require, storage_dtype, vector_bytes
from curvlab.operators import curvature_operator

__all__ = [
    "OPTIMIZER_QUANTITIES",
    "check_optimizer_for",
    "SHARPNESS_TOL",
    "CRITICAL_TOL",
    "NOISE_PROBES",
    "PreconditionedOperator",
    "critical_step",
    "warm_top_eigenvalue",
    "WARM_MIX",
]

OPTIMIZER_QUANTITIES = ("preconditioned_sharpness", "critical_sharpness")
"""The measurements that need ``Diagnostics(..., optimizer=opt)`` (not available in ``analyze``)."""
SHARPNESS_TOL = 1e-3
"""Default relative accuracy of ``sharpness`` and ``preconditioned_sharpness``."""
CRITICAL_TOL = 1e-2
"""Default relative width of the final bracket of ``critical_sharpness``'s ``η_c``."""
NOISE_PROBES = 10
"""Default probes of ``noise_scale_hessian`` (option ``num_probes``)."""
GROWTH = 2.0
"""``critical_sharpness``'s bracket search moves by 1.25, then by this factor per forward pass. It
grew by 2.5, 5, 10, ... before, and from ``s = 1`` evaluated 1.25, 3.1, 15.6, 156: a first rise
on (19, 150) was jumped over and a later root returned (58 times too small a ``λ_c``, found in
review). A rise narrower than a factor 2 can still be missed. The search ends at ``2^±40`` times
its start (``λ_c = inf``, or 0: the loss rises at once), about 40 passes at this factor."""
RESOLVABLE_FALL = 4.0
"""``critical_sharpness``'s line search runs in float64; for a model that cannot (its forward
fixes a dtype) it runs in the model's dtype and refuses when the loss falls along the update by
less than this many times ``eps · L`` (``eps`` of that dtype, ``L`` the summed batch loss), a
bound on the loss's rounding: the located step would be rounding noise (float32 near a minimum
at 1.7 times gave 40 for a true 2.09)."""


def check_optimizer_for(quantities: tuple[str, ...], optimizer: Any) -> None:
    """Raise a clear error at once when ``quantities`` need an optimizer ``optimizer`` is not.

    Raises:
        ValueError: ``preconditioned_sharpness`` or ``critical_sharpness`` without ``optimizer=``.
        TypeError: an optimizer of another kind than they read (Adam/AdamW for the first; SGD,
            Adam or AdamW for the second).
    """
    if "preconditioned_sharpness" in quantities:
        check_optimizer(optimizer, "preconditioned_sharpness", adam_only=True)
    if "critical_sharpness" in quantities:
        check_optimizer(optimizer, "critical_sharpness")


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
    restarts thickly when the basis reaches ``max_basis`` vectors.

    Returns:
        ``(θ, r, products, vectors, converged)`` with ``vectors`` the ``keep`` top Ritz vectors
        ``(D, keep)`` (unit length, descending) for the next warm start.
    """
    dim = op.shape[0]
    dtype, device = storage_dtype(op.dtype), op.device
    keep = max(1, min(keep, dim))
    cap = min(dim, max(max_basis, keep + 2))
    held = cap + 1 + keep
    require(
        f"sharpness: a Krylov basis of {held} vectors of {dim:,} entries",
        held * vector_bytes(dim, dtype),
        device,
        "pass options={'sharpness_max_basis': <fewer vectors>} (at least 5)",
    )
    # the cold start, and the random part of a warm one (whose norm it keeps above zero)
    gen = make_generator(seed=seed, device=device)
    start = torch.randn(dim, generator=gen, device=device, dtype=dtype)
    if starts is not None:
        mix = torch.full((starts.shape[1],), WARM_MIX, device=device, dtype=dtype)
        mix[0] = 1.0
        z = start
        start = (starts.to(device, dtype) @ mix).add_(z, alpha=WARM_RANDOM / float(z.norm()))
        del z
    kry = KrylovBasis(op, start, cap)
    del start
    while True:
        kry.step()
        theta, S, res = kry.ritz()
        top = theta.numel() - 1
        converged = bool(res[top] <= tol * abs(theta[top])) or kry.m == dim
        if converged or kry.num_matvecs >= max_matvecs:
            break
        if kry.m == cap:
            n = min(kry.m - 1, keep + max(1, (cap - keep) // 2))
            kry.restart(torch.arange(top, top - n, -1), theta, S)
    n = min(keep, theta.numel())
    vectors = kry.vectors(S[:, torch.arange(top, top - n, -1)])
    residual = 0.0 if kry.m == dim else float(res[top])
    return float(theta[top]), residual, kry.num_matvecs, vectors, converged


def _top_eigenpair(op: Any, ctx: Context, key: str, what: str) -> tuple[float, float, int]:
    """``λ_max`` of ``op`` warm-started from ``ctx.state[key]`` (then replaced by the new top Ritz
    vectors); returns the value, its residual norm and the products used."""
    tol = float(ctx.options.get("sharpness_tol", SHARPNESS_TOL))
    if not 0 < tol < 1:
        raise ValueError(f"sharpness_tol must be in (0, 1), got {tol!r}")
    keep = int(ctx.options.get("sharpness_vectors", 3))  # 0: every measurement starts cold
    prev = ctx.state.get(key) if keep > 0 else None
    ok = isinstance(prev, Tensor) and prev.ndim == 2 and prev.shape[0] == op.shape[0]
    value, residual, hvps, vectors, converged = warm_top_eigenvalue(
        op,
        prev if ok else None,
        tol,
        seed=ctx.seed,
        keep=max(1, keep),
        max_basis=int(ctx.options.get("sharpness_max_basis", 20)),
        max_matvecs=int(ctx.options.get("sharpness_max_matvecs", 1000)),
    )
    if not converged:
        raise RuntimeError(
            f"{what}: Lanczos did not reach the relative accuracy {tol:g} within {hvps} Hessian "
            f"products (residual {residual:.3g}); raise options['sharpness_max_matvecs'] or "
            "loosen options['sharpness_tol']"
        )
    if keep > 0:
        ctx.state[key] = vectors
    return value, residual, hvps


@measurement("sharpness")
def sharpness(ctx: Context, names: tuple[str, ...], out: Measurement) -> None:
    """``λ_max(H)``, warm-started, with the (momentum) SGD threshold when an SGD optimizer is given."""
    op = curvature_operator(ctx.model, ctx.loss_fn, ctx.data, matrix="hessian", seed=ctx.seed)
    value, residual, hvps = _top_eigenpair(op, ctx, "sharpness", "sharpness")
    out.values["sharpness"] = value
    out.values["sharpness_residual"] = residual
    out.values["sharpness_hvps"] = hvps
    threshold = None if ctx.optimizer is None else sharpness_threshold(ctx.optimizer)
    if threshold is not None and holds_all(ctx.optimizer, unwrap_model(ctx.model)):
        out.values["sharpness_threshold"] = threshold


@measurement("preconditioned_sharpness")
def preconditioned_sharpness(ctx: Context, names: tuple[str, ...], out: Measurement) -> None:
    """``λ_max(P⁻¹H)`` with Adam's preconditioner, warm-started, with its threshold."""
    model = unwrap_model(ctx.model)
    diag = adam_preconditioner(ctx.optimizer, model)  # raises without an Adam/AdamW
    threshold = preconditioned_threshold(ctx.optimizer, model)
    op = curvature_operator(
        model,
        ctx.loss_fn,
        ctx.data,
        matrix="hessian",
        seed=ctx.seed,
        params=lambda name, p: name in diag,
    )
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
    if threshold is not None:
        out.values["preconditioned_sharpness_threshold"] = threshold


# ---------------------------------------------------------------------- critical sharpness
def _refuse_distributed(what: str) -> None:
    if active() is not None:
        raise NotImplementedError(
            f"{what} is not available under torch.distributed yet (its passes are not reduced "
            "over the ranks); measure it with process_group='local' for each rank's shard"
        )


def _forward_at(model: nn.Module, params: dict[str, Tensor] | None, inputs: Any) -> Tensor:
    """The model's output with ``params`` in place of its parameters (``None``: as they are)."""
    if params is None:
        return call_model(model, inputs)
    if isinstance(inputs, Mapping):
        out = functional_call(model, params, (), dict(inputs))
    else:
        out = functional_call(model, params, (inputs,))
    return out if isinstance(out, Tensor) else out.logits


def _to(x: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors of ``x`` (a tensor or a mapping of them) in ``dtype`` (``None``: as they
    are); integer tensors (token ids, counters) unchanged."""
    if dtype is None:
        return x
    if isinstance(x, Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, Mapping):
        return {k: _to(v, dtype) for k, v in x.items()}
    return x


def _batches(ctx: Context, device: torch.device) -> list[Batch]:
    return [to_device(b, device) for b in read_batches(ctx.data)]


def _gradient(
    model: nn.Module,
    ctx: Context,
    batches: list[Batch],
    params: dict[str, nn.Parameter],
    frozen: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor | None]:
    """``∇L`` of the objective (the loss's own reduction) on all batches with respect to
    ``params`` and ``frozen``; ``None`` where the loss does not reach a parameter.

    ``frozen`` are parameters that do not require a gradient (the optimizer still moves them):
    they are differentiated through detached copies put in their place by
    ``torch.func.functional_call``, so that their ``requires_grad`` stays as it is.
    """
    spec = ctx.spec
    leaves = {n: t.detach().requires_grad_(True) for n, t in (frozen or {}).items()}
    wrt = list(params.values()) + list(leaves.values())
    total: list[Tensor | None] = [None] * len(wrt)
    count: Tensor | int = 0
    for inputs, targets in batches:
        if leaves:
            check_inputs_fit(model, inputs)
            raw = _forward_at(model, leaves, inputs)
        else:
            raw = call_model(model, inputs)
        output = spec.prepare(raw, targets)
        spec.check_classes(output, targets)
        count = count + spec.count(output, targets)
        nll = spec.nll_sum(output, targets)
        grads = torch.autograd.grad(nll, wrt, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                total[i] = g if total[i] is None else total[i].add_(g)
    m = float(count)
    if spec.reduction == "mean" and m == 0:
        raise ValueError("every target of the data is ignore_index: the mean loss is undefined")
    w = 1.0 if spec.reduction == "sum" else 1.0 / m
    return {n: None if g is None else g.mul_(w) for n, g in zip([*params, *leaves], total)}


def _slope(grads: Mapping[str, Tensor | None], update: Mapping[str, Tensor]) -> float:
    """``gᵀu`` in float64: the loss's rate of change along the update at ``s = 0``.

    A float32 loss difference at tiny steps rounds to exactly 0, which the search would read as
    "does not rise": on an update that goes uphill it then narrowed in on that rounding edge and
    reported a large finite ``λ_c`` (1e7) instead of ``inf``.
    """
    total = 0.0
    for n, u in update.items():
        g = grads.get(n)
        if g is not None:
            total += float(torch.sum(g.double() * u.double()))
    return total


def critical_step(
    rise: Callable[[float], float], start: float, tol: float, max_evals: int = 60
) -> tuple[float, int]:
    """The smallest ``s > 0`` with ``rise(s) > 0`` (``rise(s) = L(θ + s u) − L(θ)``), to relative
    accuracy ``tol``.

    A bracket ``lo < s_c <= hi`` (``rise(lo) <= 0 < rise(hi)``) is found from ``start`` by a
    factor 1.25, then 2 per pass (:data:`GROWTH`), up or down. Inside it the root of ``h(s) = rise(s)/s`` (linear in ``s`` on
    a quadratic loss, whose root is then exact) is interpolated linearly between the ends and
    quadratically through the ends and the newest other point; when the two agree to ``tol/4``
    the estimate is trusted and a point ``tol/2`` beyond it closes the bracket, else the estimate
    is evaluated (with a bisection whenever the bracket did not halve). On a quadratic this takes
    two evaluations after the bracket. Stops when ``hi − lo <= tol · lo`` and returns the
    interpolated root inside the final bracket.

    A NaN rise (the loss blew up) counts as a rise. The bracket holds *a* root: where the loss
    falls, rises and falls again along the update, one above ``start``'s side of the first may be
    found.

    Returns:
        ``(s_c, evaluations)``; ``s_c = 0`` when the loss rises for every step down to
        ``start · 2⁻⁴⁰`` (not a descent direction), ``inf`` when it never rises up to
        ``start · 2⁴⁰``.

    Raises:
        RuntimeError: when ``max_evals`` evaluations do not bracket the root to ``tol``.
    """
    evals = 0
    seen: list[tuple[float, float]] = []  # (s, h(s)) of every evaluation

    def f(s: float) -> float:
        nonlocal evals
        evals += 1
        value = rise(s)
        seen.append((s, value / s))
        return value

    def out_of_forwards(where: str) -> RuntimeError:
        return RuntimeError(
            f"critical_sharpness: no step size where the loss rises {where} within {evals} "
            "forward passes; raise options['critical_max_forwards']"
        )

    s, fs = start, f(start)
    factor = 1.25
    if not fs <= 0:  # it rose (a NaN loss, a blow-up, counts as rising)
        hi, fhi = s, fs
        while True:
            s = hi / factor
            if s < start * 2.0**-40:
                return 0.0, evals
            if evals >= max_evals:
                raise out_of_forwards(f"and one where it does not was bracketed (below {hi:.6g})")
            fs = f(s)
            if fs <= 0:
                lo, flo = s, fs
                break
            hi, fhi, factor = s, fs, GROWTH
    else:
        lo, flo = s, fs
        while True:
            s = lo * factor
            if s > start * 2.0**40:
                return math.inf, evals
            if evals >= max_evals:
                raise out_of_forwards(f"was found (above {lo:.6g} times the optimizer's step)")
            fs = f(s)
            if not fs <= 0:
                hi, fhi = s, fs
                break
            lo, flo, factor = s, fs, GROWTH

    def estimate() -> tuple[float, bool]:
        """The root of ``h`` in ``[lo, hi]`` and whether it is trusted."""
        hlo, hhi = flo / lo, fhi / hi
        if not hhi > hlo:
            return 0.5 * (lo + hi), False
        lin = lo + (hi - lo) * (-hlo) / (hhi - hlo)
        others = [(x, h) for x, h in seen if x != lo and x != hi]
        if not others:
            return lin, False
        quad = _quadratic_root((lo, hlo), (hi, hhi), others[-1], lo, hi)
        if quad is None:
            return lin, False
        return quad, abs(quad - lin) <= tol / 4 * lin

    def update(p: float) -> None:
        nonlocal lo, flo, hi, fhi
        fp = f(p)
        if fp <= 0:
            lo, flo = p, fp
        else:
            hi, fhi = p, fp

    def done() -> bool:
        return hi - lo <= tol * lo or evals >= max_evals

    while not done():
        width = hi - lo
        p, trusted = estimate()
        if trusted and p <= lo * (1 + tol / 2):
            update(lo * (1 + tol / 2))  # the root is just above lo: close the bracket
        elif trusted and p >= hi / (1 + tol / 2):
            update(hi / (1 + tol / 2))
        else:
            update(p if lo < p < hi else 0.5 * (lo + hi))
            if trusted and not done():  # close the bracket just beyond the new end
                q = lo * (1 + tol / 2) if p == lo else hi / (1 + tol / 2)
                if lo < q < hi:
                    update(q)
        if hi - lo > 0.5 * width and not done():
            update(0.5 * (lo + hi))
    if hi - lo > tol * lo:
        raise RuntimeError(
            f"critical_sharpness: the step size was not bracketed to relative width {tol:g} "
            f"within {evals} forward passes (bracket [{lo:.6g}, {hi:.6g}] times the optimizer's "
            "step); raise options['critical_max_forwards']"
        )
    return min(max(estimate()[0], lo), hi), evals


def _quadratic_root(
    a: tuple[float, float], b: tuple[float, float], c: tuple[float, float], lo: float, hi: float
) -> float | None:
    """The root in ``[lo, hi]`` of the parabola through three points ``(x, h)`` (``None``: none,
    or the points are degenerate)."""
    (x0, h0), (x1, h1), (x2, h2) = a, b, c
    if len({x0, x1, x2}) < 3:
        return None
    d1 = (h1 - h0) / (x1 - x0)
    d2 = ((h2 - h1) / (x2 - x1) - d1) / (x2 - x0)
    qa, qb, qc = d2, d1 - d2 * (x0 + x1), h0 - d1 * x0 + d2 * x0 * x1
    if abs(qa) * (hi - lo) <= 1e-12 * abs(qb):  # a straight line
        roots = [-qc / qb] if qb != 0 else []
    else:
        disc = qb * qb - 4 * qa * qc
        if disc < 0:
            return None
        q = -0.5 * (qb + math.copysign(math.sqrt(disc), qb))
        roots = [q / qa] + ([qc / q] if q != 0 else [])
    inside = [r for r in roots if lo <= r <= hi]
    return min(inside, key=lambda r: abs(r - 0.5 * (lo + hi))) if inside else None


@measurement("critical_sharpness")
def critical_sharpness(ctx: Context, names: tuple[str, ...], out: Measurement) -> None:
    """``λ_c = 2/η_c`` along the optimizer's would-be update, by forward passes only.

    The update is that of the unclipped gradient: gradient clipping in the training loop is not
    modelled (module docstring).
    """
    threshold = critical_threshold(ctx.optimizer)  # raises without a supported optimizer
    opt = check_optimizer(ctx.optimizer, "critical_sharpness")
    # η: the first moving group's; a group at lr = 0 (a frozen backbone) adds nothing to the
    # update (it was refused as "the learning rate is 0" though the head moved, found in review)
    lr = reference_lr(opt)
    if lr == 0:
        raise ValueError(
            "critical_sharpness: the optimizer's learning rate is 0 in every param group, so "
            "its update is zero and has no critical step size (measure while it is > 0)"
        )
    _refuse_distributed("critical_sharpness")
    tol = float(ctx.options.get("critical_tol", CRITICAL_TOL))
    if not 0 < tol < 1:
        raise ValueError(f"critical_tol must be in (0, 1), got {tol!r}")
    model = unwrap_model(ctx.model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # parameters frozen mid-run that keep a (zero) .grad: step() still moves them (momentum,
    # Adam's moments, weight decay), so the update has them, with a zero gradient, and the slope
    # gᵀu needs the loss's gradient along them (they were left out: 5.37 for a true 5.50)
    every = dict(model.named_parameters())
    frozen = {n: every[n] for n in stepped_without_gradient(opt, model)}
    batches = _batches(ctx, model_device(model))
    grads = _gradient(model, ctx, batches, params, frozen)
    update = would_be_update(opt, model, {n: grads[n] for n in params})
    if not update:
        raise ValueError(
            "critical_sharpness: the optimizer would update none of the model's parameters "
            "(does it hold them, and does the loss reach them?)"
        )
    spec = ctx.spec
    if threshold is not None:  # (none under maximize=True)
        out.values["critical_sharpness_threshold"] = threshold
    if _slope(grads, update) >= 0:  # not a descent direction: the loss rises at once
        out.values["critical_sharpness"] = math.inf
        out.values["critical_sharpness_forwards"] = 0
        return
    with torch.no_grad():
        # the line search evaluates the loss in float64 (the model's parameters and buffers as
        # they are, upcast): near a minimum a float32 forward pass rounds the loss by more than
        # it falls along the update, and the search then locates rounding noise (40 and 7601
        # for a true 2.09 on a float32 linear regression). A model that cannot run in float64
        # (an op without it, a dtype fixed inside its forward) is searched in its own dtype.
        state = {n: t.detach() for n, t in model.named_parameters()}
        state.update({n: t for n, t in model.named_buffers()})

        def cast(dtype: torch.dtype | None) -> tuple[dict, dict, list]:
            """The parameters and buffers, the update and the batches in ``dtype``, once."""
            return (
                {n: _to(t, dtype) for n, t in state.items()},
                {n: _to(u, dtype) for n, u in update.items()},
                [(_to(x, dtype), _to(y, dtype)) for x, y in batches],  # MSE/BCE targets too
            )

        search: torch.dtype | None = torch.float64
        fixed, moves, data = cast(search)

        def loss_at(s: float) -> float:
            moved = dict(fixed)
            for n, u in moves.items():
                moved[n] = fixed[n] + s * u
            total = 0.0
            for inputs, targets in data:
                output = upcast(spec.prepare(_forward_at(model, moved, inputs), targets))
                # per-example terms at least float32, their sum float64: a 16-bit sum (4-6% off
                # on a bfloat16 model) or a float32 one would hide the small rises searched for
                total += float(spec.per_example_nll(output, targets).double().sum())
            return total

        try:
            l0 = loss_at(0.0)
        except (RuntimeError, TypeError):
            search = None  # in the model's own dtypes
            fixed, moves, data = cast(search)
            l0 = loss_at(0.0)
        dtype = search or next(iter(state.values())).dtype
        if not math.isfinite(l0):
            raise ValueError(
                f"critical_sharpness: the batch loss at the current parameters is {l0}; nothing "
                "can rise above it"
            )
        start = float(ctx.state.get("critical_sharpness", 1.0))
        deepest = 0.0  # the largest fall of the loss seen along the update

        def rise(s: float) -> float:
            nonlocal deepest
            value = loss_at(s) - l0
            if value < deepest:
                deepest = value
            return value

        step, evals = critical_step(
            rise,
            start if math.isfinite(start) and start > 0 else 1.0,
            tol,
            int(ctx.options.get("critical_max_forwards", 60)),
        )
        # a fall along the update within the rounding of the loss in the search's dtype leaves
        # the sign changes searched for to rounding noise (float32 near a minimum gave 40 and
        # 7601 for a true 2.09); the root's relative error is about rounding / (4 fall)
        rounding = torch.finfo(dtype).eps * abs(l0)
        if 0 < step < math.inf and -deepest < RESOLVABLE_FALL * rounding:
            raise ValueError(
                f"critical_sharpness: along the optimizer's update the batch loss falls by at "
                f"most {-deepest:.3g} of {l0:.6g}, within {RESOLVABLE_FALL:g} times what "
                f"{dtype} rounds it to ({rounding:.2g}): the step where it starts to rise cannot "
                "be located (a small gradient, near a minimum). Measure a float64 copy of the "
                "model, or on more examples"
            )
    if 0 < step < math.inf:
        ctx.state["critical_sharpness"] = step
    out.values["critical_sharpness"] = 2.0 / (step * lr) if step > 0 else math.inf
    out.values["critical_sharpness_forwards"] = evals + 1


# ---------------------------------------------------------------------- B_noise
@measurement("noise_scale_hessian")
def noise_scale_hessian(ctx: Context, names: tuple[str, ...], out: Measurement) -> None:
    """``B_noise = tr(HΣ)/(GᵀHG)`` with random-sign probes of ``tr(HΣ)`` and its standard error."""
    _refuse_distributed("noise_scale_hessian")
    probes = int(ctx.options.get("num_probes", NOISE_PROBES))
    if probes < 2:
        raise ValueError(
            f"noise_scale_hessian needs num_probes >= 2 (a standard error), got {probes}"
        )
    model = unwrap_model(ctx.model)
    op = curvature_operator(model, ctx.loss_fn, ctx.data, matrix="hessian", seed=ctx.seed)
    params = dict(zip(op.names, (dict(model.named_parameters())[n] for n in op.names)))
    device = op.device
    batches = _batches(ctx, device)
    spec = ctx.spec
    n_total = sum(num_examples(b[0]) for b in batches)
    terms = op.terms_per_example  # c = M/N: g_n = grad NLL_n / c (the mean convention)
    keep = len(batches) == 1
    cached: list[Tensor] = []

    def per_example(i: int) -> Tensor:
        """``NLL_n`` of batch ``i`` with its graph (kept when there is one batch)."""
        if cached and keep:
            return cached[0]
        inputs, targets = batches[i]
        output = spec.prepare(call_model(model, inputs), targets)
        # this forward is curvlab's own: what it rewrites in place (an Embedding(max_norm=...)
        # renormalising its rows) is not a change of the user's for the operator (found in
        # review: the measurement was refused on such models)
        op._state.record()
        nll = spec.per_example_nll(output, targets)
        if keep:
            cached.append(nll)
        return nll

    plist = list(params.values())

    def weighted_grad(weights: list[Tensor]) -> Tensor:
        """``Σ_n weight_n ∇NLL_n`` over all batches, flat in the operator's layout."""
        acc: Tensor | None = None
        for i, wts in enumerate(weights):
            nll = per_example(i)
            grads = torch.autograd.grad(
                nll, plist, wts.to(nll.dtype), retain_graph=keep, allow_unused=True
            )
            flat = torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(plist, grads)
                ]
            )
            acc = flat if acc is None else acc.add_(flat)
        assert acc is not None
        return acc

    sizes = [num_examples(b[0]) for b in batches]
    if n_total < 2:  # one example's gradient covariance is 0 by definition
        out.errors["noise_scale_hessian"] = ONE_EXAMPLE
        return
    ones = [torch.ones(n, device=device) for n in sizes]
    mean = weighted_grad(ones).div_(n_total * terms)  # G = (1/N) Σ g_n
    gen = ctx.generator
    values = []
    for _ in range(probes):
        signs = [
            torch.randint(0, 2, (n,), generator=gen, device=gen.device).to(device) * 2.0 - 1.0
            for n in sizes
        ]
        total_sign = float(sum(s.sum() for s in signs))
        u = weighted_grad(signs).div_(terms).sub_(mean, alpha=total_sign).div_(math.sqrt(n_total))
        values.append(float(torch.dot(u.double(), op.matvec(u).double())))
        del u
    ghg = float(torch.dot(mean.double(), op.matvec(mean).double()))
    # op is the Hessian of L (scale w); that of the mean loss is op / (w M)
    to_mean = 1.0 / (op.weight * n_total * terms)
    q = torch.tensor(values, dtype=torch.float64)
    trace, stderr = float(q.mean()), float(q.std() / math.sqrt(probes))
    out.values["noise_scale_hessian"] = trace / ghg if ghg != 0 else math.inf
    out.values["noise_scale_hessian_stderr"] = stderr / abs(ghg) if ghg != 0 else math.inf
    out.values["noise_scale_hessian_hvps"] = probes + 1
    out.values["trace_hessian_covariance"] = trace * to_mean
    out.values["grad_hessian_grad"] = ghg * to_mean
