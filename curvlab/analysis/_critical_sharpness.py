"""The in-loop measurement of critical sharpness (forward passes along the optimizer's update).

``"critical_sharpness"``
    ``λ_c = 2/η_c`` with ``η_c`` the smallest step size along the update ``opt.step()`` would apply
    now on the measured batch at which the loss rises above its current value (Kalra et al.,
    2026), ``η`` the learning rate of the first group at ``lr > 0`` holding a parameter the
    update moves (:func:`~curvlab.analysis._optimizer_state.reference_lr`, the unit of the other
    sharpness measurements too: a group at ``lr = 0``, one of another module's parameters and
    one frozen whole add nothing to the update). The update comes from one fresh gradient of the measured batch and the optimizer's
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
    modelled update and ``λ_c`` does not describe it. Every forward pass starts from the
    buffers as the measurement found them, small integer ones (a call counter) included
    (docs/conventions.md); the user's buffers are left as they were. A forward that draws random
    numbers (MC dropout ``F.dropout(x, p, training=True)``, an input noise ``x + σ·randn_like(x)``,
    a VAE's sample) is evaluated with one draw per batch and measurement (common random numbers):
    the global RNG is seeded alike before each batch's every pass (the gradient's and each point
    of the line search's), so all compare one function, and the search then runs in the model's
    own dtype (float64 would draw other numbers); the caller's RNG is put back after. Each pass
    drew afresh before review s24: ``L(θ + s u) − L(θ)`` was mostly the draws' difference
    (MC dropout: 0.253 to 4.018 over 20 seeds, for 0.259 to 0.598 on one mask each).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._data import (
    Batch,
    call_model,
    check_inputs_fit,
    dtype_errors_named,
    fresh_inputs,
)
from curvlab._losses import LossSpec
from curvlab._notrace import buffer_snapshot, each_forward_on
from curvlab._precision import upcast
from curvlab._reading_rngs import Kept, held_states
from curvlab._rng import forward_draws, seed_global
from curvlab._scan import model_device
from curvlab._stateless import functional_call
from curvlab.analysis._batch_gradient import gradient_sums
from curvlab.analysis._optimizer_state import (
    check_optimizer,
    check_step_hooks,
    critical_threshold,
    reference_lr,
    stepped_without_gradient,
    would_be_update,
)
from curvlab.analysis._registry import Context, Measurement, measurement
from curvlab.analysis._sharpness import device_batches, refuse_distributed
from curvlab.distributed import unwrap_model

__all__ = ["CRITICAL_TOL", "GROWTH", "RESOLVABLE_FALL", "critical_step"]

CRITICAL_TOL = 1e-2
"""Default relative width of the final bracket of ``critical_sharpness``'s ``η_c``."""
GROWTH = 2.0
"""``critical_sharpness``'s bracket search moves by 1.25, then by this factor per forward pass. It
grew by 2.5, 5, 10, ... before, and from ``s = 1`` evaluated 1.25, 3.1, 15.6, 156: a first rise
on (19, 150) was jumped over and a later root returned (58 times too small a ``λ_c``, found in
review). A rise narrower than a factor 2 can still be missed. The search ends at ``2^±40`` times
its start (``λ_c = inf``, or 0: the loss rises at once), about 40 passes at this factor."""
RESOLVABLE_FALL = 4.0
"""``critical_sharpness``'s line search runs in float64; for a model that cannot (its forward
fixes a dtype) it runs in the model's dtype. In either, it refuses when the loss falls along the
update by less than this many times ``eps · L`` (``eps`` of the search's dtype, ``L`` the summed
batch loss), a bound on the loss's rounding: the located step would be rounding noise (float32
near a minimum at 1.7 times gave 40 for a true 2.09). The fall is the largest the search saw,
and, where that is too small, the fall at half the located step ``s_c`` (where a quadratic
falls the most; one more forward pass): a search whose points all lie next to ``s_c``
(warm-started at the previous answer, or the optimizer's own step just short of it) sees the
loss barely below ``L`` (review s22: a second measurement on the unchanged model with
``critical_tol=1e-6`` was refused, a fall of 3.6e-15 of 26.5, though the first gave the
right value)."""


def _forward_at(model: nn.Module, params: dict[str, Tensor] | None, inputs: Any) -> Tensor:
    """The model's output with ``params`` in place of its parameters (``None``: as they are)."""
    if params is None:
        return call_model(model, inputs)
    inputs = fresh_inputs(inputs)  # the model may write into them, as in call_model (review s22)
    with dtype_errors_named(model, inputs):
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


def _gradient(
    model: nn.Module,
    ctx: Context,
    batches: list[Batch],
    params: dict[str, nn.Parameter],
    frozen: Mapping[str, Tensor] | None = None,
    seeds: list[int] | None = None,
    drawn: list[bool] | None = None,
    held: list[Kept] | None = None,
    starts: list[list[Any]] | None = None,
) -> dict[str, Tensor | None]:
    """``∇L`` of the objective (the loss's own reduction) on all batches with respect to
    ``params`` and ``frozen``; ``None`` where the loss does not reach a parameter.

    ``frozen`` are parameters that do not require a gradient (the optimizer still moves them):
    they are differentiated through detached copies put in their place by
    ``torch.func.functional_call``, so that their ``requires_grad`` stays as it is. ``seeds``:
    the global RNG is seeded with ``seeds[i]`` before batch ``i``'s forward pass (its random
    draws, those of the line search's passes too; ``None``: not seeded). ``drawn``: a list to
    which whether each forward pass drew is appended, from the global RNGs or from a generator a
    module holds (:func:`~curvlab._rng.forward_draws`). ``held``: the states of the generators
    the modules hold (:func:`~curvlab._reading_rngs.held_states`), whose states before each
    batch's forward are appended to ``starts``, for the line search to put back before its
    passes of that batch (they cannot be seeded: a numpy ``Generator`` has no global seed).
    """
    leaves = {n: t.detach().requires_grad_(True) for n, t in (frozen or {}).items()}
    device = model_device(model)
    order = iter(seeds or ())

    def forward(inputs: Any) -> Tensor:
        seed = next(order, None)  # gradient_sums runs one forward per batch, in order
        if seed is not None:
            seed_global(device, seed)
        if starts is not None:
            starts.append([h.get() for h in held or ()])
        with forward_draws(device, model.modules()) as drew:
            if leaves:
                check_inputs_fit(model, inputs)
                out = _forward_at(model, leaves, inputs)
            else:
                out = call_model(model, inputs)
        if drawn is not None:
            drawn.append(drew())
        return out

    sums = gradient_sums(ctx.spec, batches, [*params.values(), *leaves.values()], forward)
    w = sums.weight(ctx.spec)
    return {
        n: None if g is None else g.mul_(w).to(t.dtype)  # the optimizer's update in its dtype
        for (n, t), g in zip([*params.items(), *leaves.items()], sums.grads)
    }


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

    Raises:
        ValueError: before any forward pass, for an optimizer whose ``step()`` runs step hooks
            that ``options`` do not ignore (the update may not be the one modelled:
            :func:`~curvlab.analysis._optimizer_state.check_step_hooks`), for one that holds
            none of the model's parameters and for data whose every label is ``ignore_index``
            (no loss term: :func:`_check_counted`); after the gradient pass, for an update along which the
            loss's slope ``gᵀu`` is exactly 0 (:func:`_check_slope`).
    """
    model = unwrap_model(ctx.model)
    opt = check_optimizer(ctx.optimizer, "critical_sharpness")  # raises without a supported one
    # hooks run by step() change the update modelled here: refused before any pass (review s23)
    check_step_hooks(ctx.optimizer, "critical_sharpness", ctx.options)
    # 0 only when no group moves (η itself is read once the update is known, below)
    if reference_lr(opt, model) == 0:
        raise ValueError(
            "critical_sharpness: the optimizer's learning rate is 0 in every param group, so "
            "its update is zero and has no critical step size (measure while it is > 0)"
        )
    refuse_distributed("critical_sharpness")
    tol = float(ctx.options.get("critical_tol", CRITICAL_TOL))
    if not 0 < tol < 1:
        raise ValueError(f"critical_tol must be in (0, 1), got {tol!r}")
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    if not any(id(p) in held for p in model.parameters()):
        # was found only after a forward and backward pass ("would update none")
        raise ValueError(
            "critical_sharpness: the optimizer holds none of the model's parameters (was it "
            "built on another copy of the model, e.g. before a deepcopy, or on an EMA copy's "
            "parameters?); pass the optimizer that steps this model's parameters"
        )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # parameters frozen mid-run that keep a (zero) .grad: step() still moves them (momentum,
    # Adam's moments, weight decay), so the update has them, with a zero gradient, and the slope
    # gᵀu needs the loss's gradient along them (they were left out: 5.37 for a true 5.50)
    every = dict(model.named_parameters())
    frozen = {n: every[n] for n in stepped_without_gradient(opt, model)}
    batches = device_batches(ctx, model_device(model))
    _check_counted(ctx.spec, batches)
    # every forward pass (the gradient's, each of the line search's) starts from the buffers as
    # found, small integer ones included: a forward that counts its calls ran on over the
    # passes, so the loss compared along the update was another function at every step (0.08710
    # for a true 0.08192, the user's counter left at 21; found in review s17)
    found = buffer_snapshot(model.modules())  # empty: no buffers
    # common random numbers: a forward that draws (MC dropout, an input noise, a VAE's sample)
    # draws alike in every pass of a batch, the global RNG seeded with that batch's seed first
    # (the caller's RNG is put back by the Diagnostics' leave_no_trace): each pass drew afresh,
    # and L(θ + s u) − L(θ) was mostly the draws' difference (MC dropout: 0.253 to 4.018 over
    # 20 seeds, 3 of them at the threshold 2/η, for 0.259 to 0.598 on one mask each; review s24)
    device = model_device(model)
    seeds = [int(s) for s in torch.randint(0, 2**62, (len(batches),))]
    # a generator a module holds (self.gen, its own Dropout mask) cannot be seeded: its state
    # before each batch's gradient pass is put back before that batch's passes of the search
    # (review s27: each pass drew afresh from it, and a float32 model was searched in float64)
    held = held_states(model.modules())
    starts: list[list[Any]] = []
    with each_forward_on(model, found):
        drawn: list[bool] = []
        grads = _gradient(model, ctx, batches, params, frozen, seeds, drawn, held, starts)
    update = would_be_update(opt, model, {n: grads[n] for n in params})
    if not update:
        raise ValueError(
            "critical_sharpness: the optimizer would update none of the model's parameters "
            "(does it hold them, and does the loss reach them?)"
        )
    # η: the first moving group's that holds a parameter the update moves (reference_lr, the
    # rule of the other two measurements). A group at lr = 0 (a frozen backbone) adds nothing
    # to the update (it was refused as "the learning rate is 0" though the head moved, found in
    # review), nor does one of another module's parameters (review s23), nor one whose
    # parameters are all frozen with a .grad of None, which step() skips (a backbone at 1e-5
    # beside a head at 1e-3 set η: λ_c and 2/η 100 times too large, review s25)
    lr = reference_lr(opt, model, update)
    threshold = critical_threshold(opt, model, update)
    spec = ctx.spec
    slope = _slope(grads, update)
    _check_slope(slope)
    if slope > 0:  # not a descent direction: the loss rises at once
        _write(out, math.inf, 0, threshold)
        return
    with torch.no_grad():
        # the line search evaluates the loss in float64 (the model's parameters and buffers as
        # they are, upcast): near a minimum a float32 forward pass rounds the loss by more than
        # it falls along the update, and the search then locates rounding noise (40 and 7601
        # for a true 2.09 on a float32 linear regression). A model that cannot run in float64
        # (an op without it, a dtype fixed inside its forward) is searched in its own dtype.
        state = {n: t.detach() for n, t in model.named_parameters()}
        state.update({n: t for n, t in model.named_buffers()})
        # the buffers a forward pass may update in place (``found``'s) go into each pass as
        # fresh copies, so that each starts from them as found (the pre-hook of
        # each_forward_on would replace the search's float64 casts by the model's dtype)
        slots = {(id(m), n) for m, n, _ in found}
        fresh = [
            f"{prefix}.{n}" if prefix else n
            for prefix, m in model.named_modules()
            for n in m._buffers
            if (id(m), n) in slots and (f"{prefix}.{n}" if prefix else n) in state
        ]

        def cast(dtype: torch.dtype | None) -> tuple[dict, dict, list]:
            """The parameters and buffers, the update and the batches in ``dtype``, once."""
            return (
                {n: _to(t, dtype) for n, t in state.items()},
                {n: _to(u, dtype) for n, u in update.items()},
                [(_to(x, dtype), _to(y, dtype)) for x, y in batches],  # MSE/BCE targets too
            )

        # a forward that draws is searched in the model's dtype: in float64 it draws other
        # numbers (randn_like, a dropout mask) than the gradient's pass drew
        search: torch.dtype | None = None if any(drawn) else torch.float64
        fixed, moves, data = cast(search)

        def loss_at(s: float) -> float:
            moved = dict(fixed)
            for n, u in moves.items():
                moved[n] = fixed[n] + s * u
            for n in fresh:
                moved[n] = fixed[n].clone()
            total = 0.0
            for (inputs, targets), seed, start in zip(data, seeds, starts):
                seed_global(device, seed)  # the draws of this batch's gradient pass
                for h, state in zip(held, start):
                    h.put(state)
                output = upcast(spec.prepare(_forward_at(model, moved, inputs), targets))
                # per-example terms at least float32, their sum float64: a 16-bit sum (4-6% off
                # on a bfloat16 model) or a float32 one would hide the small rises searched for
                total += float(spec.per_example_nll(output, targets).double().sum())
            return total

        try:
            l0 = loss_at(0.0)
        except (RuntimeError, TypeError):
            if search is None:
                raise
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
            # the points searched may all lie next to the root, where the loss has barely fallen
            # (a warm start at the previous answer, or the optimizer's own step just short of
            # it): a second measurement on the unchanged model was refused (review s22). The
            # fall at half the step, where a quadratic falls the most, decides (RESOLVABLE_FALL)
            rise(0.5 * step)
            evals += 1
        if 0 < step < math.inf and -deepest < RESOLVABLE_FALL * rounding:
            raise ValueError(
                f"critical_sharpness: along the optimizer's update the batch loss falls by at "
                f"most {abs(deepest):.3g} of {l0:.6g}, within {RESOLVABLE_FALL:g} times what "
                f"{dtype} rounds it to ({rounding:.2g}): the step where it starts to rise cannot "
                "be located (a small gradient, near a minimum). Measure a float64 copy of the "
                "model, or on more examples"
            )
    if 0 < step < math.inf:
        ctx.state["critical_sharpness"] = step
    _write(out, 2.0 / (step * lr) if step > 0 else math.inf, evals + 1, threshold)


def _check_counted(spec: LossSpec, batches: list[Batch]) -> None:
    """Refuse data whose every class label is ``ignore_index``, before the gradient pass.

    The batch loss then has no term: identically 0 under ``"sum"`` (no step raises it, and the
    slope test read ``gᵀu = 0`` as "rises at once": ``λ_c = inf``, found in review) and 0/0 under
    ``"mean"`` (refused only after a forward and backward pass). One host synchronisation.

    Raises:
        ValueError: every label of every batch is ``ignore_index``.
    """
    if spec.kind != "cross_entropy":
        return
    counts = [
        (targets != spec.ignore_index).sum()  # class indices (the loss's own count)
        for _, targets in batches
        if isinstance(targets, Tensor) and not targets.is_floating_point()
    ]
    if len(counts) == len(batches) and counts and int(sum(counts)) == 0:
        raise ValueError(
            f"critical_sharpness: every target of the data is ignore_index={spec.ignore_index}: "
            "the batch loss has no term (identically 0 under reduction='sum', 0/0 under "
            "'mean'), so no step size along the optimizer's update raises it and λ_c is "
            "undefined; pass data with at least one counted label"
        )


def _check_slope(slope: float) -> None:
    """Refuse an update along which the loss's slope ``gᵀu`` is exactly 0.

    On a quadratic ``λ_c = dᵀHd / gᵀd``, undefined for ``gᵀd = 0``; the test for a descent
    direction read a zero slope as "the loss rises at once" and wrote ``λ_c = inf`` (also for a
    loss that is identically 0, found in review).

    Raises:
        ValueError: ``slope == 0``.
    """
    if slope == 0:
        raise ValueError(
            "critical_sharpness: the loss's slope along the optimizer's update is exactly 0 "
            "(the gradient of the measured data is 0 on every parameter the update moves, or "
            "orthogonal to the update, or the update is 0), so λ_c = 2/η_c (dᵀHd / gᵀd on a "
            "quadratic) is undefined; measure on data where the loss has a nonzero gradient"
        )


def _write(out: Measurement, value: float, forwards: int, threshold: float | None) -> None:
    """Write ``critical_sharpness`` with its forward passes and threshold, all at once.

    Only a measurement that succeeded writes anything: the threshold was written before the line
    search, so a search that failed (out of ``critical_max_forwards``, a NaN loss) left a record
    holding the threshold alone, and a step whose every quantity failed was logged as a partial
    success (found in review).
    """
    out.values["critical_sharpness"] = value
    out.values["critical_sharpness_forwards"] = forwards
    if threshold is not None:  # (none under maximize=True)
        out.values["critical_sharpness_threshold"] = threshold
