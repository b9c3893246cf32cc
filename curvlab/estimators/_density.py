"""Spectral density by stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; Ghorbani et al. 2019).

For a symmetric ``D x D`` operator with eigenpairs ``(lambda_i, u_i)`` the spectral density is
``phi(t) = (1/D) sum_i delta(t - lambda_i)``. For a unit-norm Rademacher probe ``v``
(``E[v v^T] = I / D``), ``v^T f(A) v`` is an unbiased estimate of ``(1/D) tr f(A) = integral f dphi``.
``m`` Lanczos steps from ``v`` give the tridiagonal
``T_m = S diag(theta) S^T`` and the Gauss quadrature ``v^T f(A) v ~= sum_i tau_i f(theta_i)`` with
nodes ``theta_i`` and weights ``tau_i = S_{1i}^2`` (exact for polynomials of degree ``< 2m``).
Averaging over ``n_v`` probes and smoothing each node with a Gaussian of width ``sigma`` gives
``phi_sigma(t) = (1/n_v) sum_l sum_i tau_i^(l) N(t; theta_i^(l), sigma^2)``.

Cost: ``m`` products per probe plus ``O(D m)`` flops (``O(D m^2)`` with full reorthogonalisation).
Memory: by default (``reorth_passes=0``) the plain three-term recurrence
``beta_{j+1} v_{j+1} = A v_j - alpha_j v_j - beta_j v_{j-1}`` with no stored basis, i.e. three
parameter-vectors per probe (``v_{j-1}``, ``v_j`` and the product ``A v_j``), whatever ``m``; full
reorthogonalisation (``reorth_passes >= 1``, on request) keeps the ``m + 1`` basis vectors, checked
against ``memory_budget`` and the memory available before the first product. The broadening is a
running sum over the nodes, ``O(n_v G)`` float64 host memory for ``G`` grid points (checked against
the memory available before the first product, :func:`density_bytes`).

Example:
    >>> import torch
    >>> from curvlab.estimators._protocol import TensorOperator
    >>> A = TensorOperator(torch.diag(torch.linspace(0, 1, 50, dtype=torch.float64)))
    >>> res = slq(A, num_steps=20, num_probes=2, seed=0)
    >>> round(float(torch.trapezoid(res.density, res.grid)), 6)
    1.0
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlab._finite import raise_product
from curvlab._numbers import is_count, is_positive
from curvlab._precision import axpy_dot, plain_norm_ok, scaled_norm
from curvlab._progress import ProgressBar
from curvlab._rng import check_randomness, make_generator
from curvlab._warn import user_stacklevel
from curvlab.estimators._krylov import KrylovBasis, invariance_floor, norm
from curvlab.estimators._memory import (
    EstimatorMemoryError,
    agree,
    budget_limit,
    check_basis_device,
    check_memory_budget,
    projection_bytes,
    require,
    storage_dtype,
    vector_bytes,
)
from curvlab.estimators._parts import part_products, split
from curvlab.estimators._protocol import check_operator, checks_values_once
from curvlab.estimators._trace import draw_probes

__all__ = ["DensityResult", "check_slq_args", "check_slq_plan", "slq", "tridiagonal_bytes"]


@dataclass
class DensityResult:
    """A smoothed spectral density and the quadrature it comes from.

    Attributes:
        grid: ``(G,)`` float64 points.
        density: ``(G,)`` the smoothed density at the ``grid`` points: per probe the Gaussian
            mixture ``sum_i tau_i N(t; theta_i, sigma^2)`` divided by its mass on the grid's
            span (it lacks only the tails beyond ``5 sigma``, under ``6e-7``), so it integrates
            to 1 over the span: by the trapezoid rule exactly when ``sigma`` is at least the
            grid spacing (that sum is the mass to ``5e-9``), within 1.4% down to half the
            spacing. Below half of it the values are still exact at the points (the exact mass
            is used), but peaks fall between them and the trapezoid sum is not 1: a warning
            says so and how to fix it (until review s12 such a density was divided by that
            sum: off by 1.1-2.6x at ``sigma = spacing / 10``, NaN where every peak missed the
            grid).
        nodes: ``(n_v, m)`` Ritz values of each probe's Lanczos run; a run that stopped early
            (an invariant subspace) is padded with nodes 0 of weight 0, so read the nodes with
            their weights (``nodes[weights > 0]``), not ``nodes.min()``.
        weights: ``(n_v, m)`` their quadrature weights (each row sums to 1).
        stderr: ``(G,)`` standard error of ``density`` over probes (``nan`` for one probe).
        sigma: the Gaussian broadening width.
        num_matvecs: operator products used.
        seed: the probes' seed (``None`` when a generator was passed).
        info: how it was computed where that is not the default (``"compiled"``: a
            ``torch.compile``d model; docs/training-loops.md); from
            :func:`curvlab.spectral_density` also ``"loss_terms"``, the number ``M`` of loss
            terms of the data (the Hessian of a ``"sum"`` loss divided by ``M`` is that of the
            ``"mean"`` loss), and ``"terms_per_example"``, ``M / N``.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    stderr: Tensor
    sigma: float
    num_matvecs: int
    seed: int | None
    info: dict[str, Any] = field(default_factory=dict)

    def moment(self, j: int) -> float:
        """Quadrature estimate of ``(1/D) tr(A^j)`` (exact per probe for ``j < 2m``)."""
        return float((self.weights * self.nodes**j).sum(1).mean())

    def plot(self, ax: Any = None, log: bool = True, **kwargs: Any) -> Any:
        """Plot the density (log scale by default, as in Ghorbani et al.); returns the axes.

        Without ``ax``, a new pyplot figure in the user's own backend (shown inline in a
        notebook); the backend is not switched.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        y = self.density.clamp_min(1e-12) if log else self.density
        ax.plot(self.grid.numpy(), y.numpy(), **kwargs)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax


def check_slq_args(
    num_steps: int,
    num_probes: int,
    sigma: float | None,
    grid_size: int,
    reorth_passes: int,
    memory_budget: float | None = None,
) -> None:
    """The checks of :func:`slq`'s arguments, also made by :func:`curvlab.spectral_density`
    before it reads the data."""
    if not is_count(num_steps):
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not is_count(num_probes):
        raise ValueError(f"num_probes must be a positive int, got {num_probes!r}")
    if sigma is not None and not is_positive(sigma):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not is_count(grid_size, 2):
        raise ValueError(f"grid_size must be an int >= 2, got {grid_size!r}")
    if not is_count(reorth_passes, 0):
        raise ValueError(f"reorth_passes must be an int >= 0, got {reorth_passes!r}")
    check_memory_budget(memory_budget)
    _density_require(num_probes, grid_size)


def density_bytes(num_probes: int, grid_size: int) -> int:
    """Bytes of the broadened density's float64 host arrays at their peak: the ``(n_v, G)``
    per-probe densities and two temporaries of that size (the running sum's term, then the
    normalisation's and the standard error's), plus the grid, the density and ``stderr``
    (measured: ``8 (3 n_v G + 2 G)`` bytes)."""
    return 8 * (3 * num_probes * grid_size + 3 * grid_size)


def _density_require(num_probes: int, grid_size: int) -> None:
    """Refuse a density whose arrays (:func:`density_bytes`) exceed the host memory available,
    before any product (until review s20 ``grid_size=1e8`` failed after every product with a
    raw "can't allocate 96000000000 bytes"). ``memory_budget`` bounds the Lanczos vectors, not
    these arrays (they are allocated after the vectors are freed)."""
    require(
        f"the spectral density on grid_size={grid_size:,} points for num_probes={num_probes:,} "
        f"(3 arrays of {num_probes:,} x {grid_size:,} float64 values on the host)",
        density_bytes(num_probes, grid_size),
        torch.device("cpu"),
        "pass a smaller grid_size (spread / sigma + 11 points resolve every peak; the default "
        "1000 is plenty for a plot) or fewer num_probes",
    )


def _slq_require(
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    steps: int,
    reorth_passes: int,
    memory_budget: float | None,
    *,
    available: bool = True,
) -> None:
    """Refuse, with the numbers, SLQ vectors (3, or ``steps + 2`` with reorthogonalisation)
    of ``dim`` entries of ``dtype`` on ``device`` that exceed ``memory_budget`` or, with
    ``available``, the memory available there."""
    held = 3 if reorth_passes == 0 else steps + 2
    what = (
        f"slq with reorth_passes={reorth_passes}: {held} vectors of {dim:,} "
        f"{str(dtype).removeprefix('torch.')} entries"
    )
    host = "" if device.type == "cpu" else ", basis_device='cpu'"
    hint = (
        "use reorth_passes=0 (the three-term recurrence: 3 vectors), fewer num_steps"
        f"{host} or a larger memory_budget"
        if reorth_passes
        else "raise memory_budget or free memory on the device"
    )
    need = held * vector_bytes(dim, dtype)
    require(what, need, device if available else None, hint, budget=budget_limit(memory_budget))
    if available:
        require(
            f"slq with num_steps={steps:,}: the {steps:,} x {steps:,} tridiagonal eigenproblem "
            "of each probe (float64 arrays on the host)",
            tridiagonal_bytes(steps, reorth_passes, dim),
            torch.device("cpu"),
            "pass fewer num_steps (its host memory grows as num_steps^2: 90 steps, the "
            "default, take 253 KiB) or free host memory",
        )


def tridiagonal_bytes(steps: int, reorth_passes: int, dim: int) -> int:
    """Host bytes of one probe's ``m x m`` projected problem (``m = steps``) at its peak: with
    the three-term recurrence the tridiagonal ``T``, its eigenvectors and LAPACK's ``2 m^2``
    workspace (``32 m^2``); with reorthogonalisation the Krylov basis' projection
    (:func:`curvlab.estimators._memory.projection_bytes`, ``40 m^2`` beyond 128 steps). Until
    review s23 it was not counted: ``num_steps = D = 40,000`` and ``memory_budget=2**20``
    passed the check and failed after all 40,000 products with a raw "can't allocate
    12800000000 bytes".

    Example:
        >>> tridiagonal_bytes(90, 0, 10**6)
        259200
    """
    if reorth_passes:
        return projection_bytes(steps, steps, dim)
    return 8 * 4 * steps * steps


def check_slq_plan(
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    num_steps: int,
    reorth_passes: int,
    memory_budget: float | None,
    basis_device: torch.device | str | None = None,
) -> None:
    """What :func:`slq` would refuse on an operator of ``dim`` entries of ``dtype`` on
    ``device`` that the arguments alone decide (vectors that cannot fit ``memory_budget``),
    refused the same way; :func:`curvlab.spectral_density` checks this before it reads the data
    (found in review: such a budget was refused after the operator's forward and backward
    pass). The memory available is consulted later, by :func:`slq`.

    Raises:
        EstimatorMemoryError: the vectors exceed ``memory_budget``, with the numbers.
    """
    checked_device = check_basis_device(basis_device)
    bdev = device if checked_device is None else checked_device
    steps = min(num_steps, dim)
    _slq_require(
        dim, storage_dtype(dtype), bdev, steps, reorth_passes, memory_budget, available=False
    )


@checks_values_once
def slq(
    op,
    num_steps: int = 90,
    num_probes: int = 1,
    sigma: float | None = None,
    grid_size: int = 1000,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    reorth_passes: int = 0,
    show_progress: bool | None = False,
    *,
    memory_budget: float | None = None,
    basis_device: torch.device | str | None = None,
) -> DensityResult:
    """Stochastic Lanczos quadrature with Gaussian broadening.

    Args:
        op: the operator (``shape``, ``dtype``, ``device``, ``matmat``).
        num_steps: Lanczos steps ``m`` per probe (at most ``D``).
        num_probes: independent Rademacher probes ``n_v``.
        sigma: broadening width (default 1% of the spread of the nodes, at least ``1e-8`` of
            their largest ``|theta|``, so that one repeated value gets a width; ``1e-8`` only
            when every node is 0).
        grid_size: grid points; the grid spans the nodes plus ``5 sigma`` on each side. A
            ``sigma`` below half the grid spacing (``(spread + 10 sigma) / (grid_size - 1)``)
            gives a density that is exact at the grid points but whose peaks fall between
            them: warned, with the ``grid_size`` that resolves it (``spread / sigma + 11``).
        seed / generator: the probes' randomness (default seed 0).
        reorth_passes: Gram-Schmidt passes against the whole basis per step. The default 0 is
            the plain three-term recurrence: three parameter-vectors and ``O(D)`` work per step,
            so SLQ costs its products; once it loses orthogonality the nodes include copies of
            converged Ritz values and spurious values between eigenvalues, but the quadrature's
            low moments and the broadened density stay accurate, which is what SLQ needs
            (Ubaru, Chen & Saad 2017; tests/test_kfac_any_model.py checks both). Use 2 for full
            reorthogonalisation (``m + 1`` stored vectors, ``O(D m)`` work per step), under which
            the nodes are Ritz values proper: with ``m = D`` steps, the eigenvalues.
        show_progress: progress bar on stderr.
        memory_budget: bytes the stored vectors may take (3 vectors by default, ``m + 2`` with
            reorthogonalisation); a run that needs more raises before its first product.
            The ``m x m`` float64 host arrays of each probe's projected problem
            (:func:`tridiagonal_bytes`, ``32 m^2`` bytes, ``40 m^2`` with reorthogonalisation)
            are checked against the host memory available, before the first product.
            ``None`` or ``float("inf")``: no budget, only the memory available. It does not
            cover the broadened density's float64 host arrays, ``8 (3 n_v G + 3 G)`` bytes
            (:func:`density_bytes`; 24 kB at the defaults), made after the vectors are freed:
            those are checked against the host memory available before the first product.
        basis_device: where the vectors are kept (default: the operator's device), e.g.
            ``"cpu"`` for a reorthogonalised run whose basis does not fit on the GPU.

    Raises:
        EstimatorMemoryError: (a ``MemoryError``) when the vectors do not fit ``memory_budget``
            or the memory available, or the density's arrays (``num_probes x grid_size``) do
            not fit the host memory available, before any product.
    """
    op = check_operator(op)
    dim = op.shape[0]
    check_slq_args(num_steps, num_probes, sigma, grid_size, reorth_passes, memory_budget)
    checked_device = check_basis_device(basis_device)
    check_randomness(seed, generator, op.device)
    steps = min(num_steps, dim)
    bdev = op.device if checked_device is None else checked_device
    bdtype = storage_dtype(op.dtype)
    try:
        _slq_require(dim, bdtype, bdev, steps, reorth_passes, memory_budget)
        refusal = None
    except EstimatorMemoryError as exc:
        refusal = exc
    agree(getattr(op, "_comm", None), 0, refusal)  # a refusal on one rank stops all of them
    gen = make_generator(seed=seed, generator=generator, device=op.device)
    used_seed = None if generator is not None else (0 if seed is None else seed)
    node_rows, weight_rows = [], []
    matvecs = 0
    bar = ProgressBar(total=steps * num_probes, desc="slq", enable=show_progress)
    eps = invariance_floor(op.dtype)  # the fraction of the column scale that is rounding

    def draw() -> Tensor:
        return draw_probes(dim, 1, gen, "rademacher", op.device, bdtype)[:, 0]

    for _ in range(num_probes):
        if reorth_passes == 0:
            T, used = _three_term(op, draw, steps, eps, bdev, bdtype, bar)
        else:
            T, used = _reorthogonalised(op, draw, steps, eps, reorth_passes, bdev, bar)
        matvecs += used
        theta, S = torch.linalg.eigh(T)
        del T  # (tridiagonal_bytes: one probe's m x m arrays at a time)
        tau = S[0] ** 2
        del S
        pad = steps - theta.numel()
        node_rows.append(torch.cat([theta, theta.new_zeros(pad)]))
        weight_rows.append(torch.cat([tau, tau.new_zeros(pad)]))
    bar.close()
    nodes, weights = torch.stack(node_rows), torch.stack(weight_rows)
    grid, per_probe, width = _broadened(nodes, weights, sigma, grid_size)
    density = per_probe.mean(0)
    if num_probes > 1:
        # each grid point's spread of the probes taken on values divided by their largest: the
        # squares of plain values underflow (inf after the division by a tiny sigma) or overflow
        # at float64's extremes, ||A|| below 1e-154 or above 1e154 (found in review)
        top = per_probe.abs().amax(0).clamp_min(torch.finfo(per_probe.dtype).tiny)
        stderr = (per_probe / top).std(0, unbiased=True) * top / math.sqrt(num_probes)
    else:
        stderr = torch.full_like(density, math.nan)
    return DensityResult(grid, density, nodes, weights, stderr, width, matvecs, used_seed)


def _broadened(
    nodes: Tensor, weights: Tensor, sigma: float | None, grid_size: int
) -> tuple[Tensor, Tensor, float]:
    """Each probe's Gaussian mixture ``sum_i tau_i N(t; theta_i, sigma^2)`` at the grid points,
    divided by its mass on the grid's span: its trapezoid sum where ``sigma`` is at least the
    grid spacing (equal to the exact mass to ``5e-9``; it makes the returned density's trapezoid
    sum 1), else the exact mass ``sum_i tau_i (Phi(b_i) - Phi(a_i))`` (the trapezoid sum misses
    peaks between grid points). Returns the grid, the ``(n_v, G)`` densities and ``sigma``.
    Warns where ``sigma`` is below half the grid spacing (a peak between two points is then
    sampled at 61% of its height or less, and the trapezoid sum is off by more than 1%).

    Each term ``tau_i N(t; theta_i, sigma^2)`` is computed as before review s20 (the same
    operations, bit for bit); the terms are summed in node order, one ``(n_v, G)`` array at a
    time, where ``.sum`` over an ``(n_v, m, G)`` array summed them in its own order: the
    densities differ from those by rounding (at most ``1.3e-15`` relative over 200 random cases
    of up to 200 nodes; the bound is ``m`` eps)."""
    live = nodes[weights > 0]
    lo, hi = float(live.min()), float(live.max())
    width = sigma if sigma is not None else _default_sigma(lo, hi)
    grid = torch.linspace(lo - 5 * width, hi + 5 * width, grid_size, dtype=torch.float64)
    gauss = width * math.sqrt(2 * math.pi)
    # a running sum over the nodes, one (n_v, G) term at a time, in place: O(n_v G) memory
    # (until review s20 one (n_v, m, G) array per step, 572 MB for grid_size=2e5 and a raw
    # "can't allocate 96000000000 bytes" for 1e8, after all products)
    per_probe = torch.zeros(nodes.shape[0], grid_size, dtype=torch.float64)
    term = torch.empty_like(per_probe)
    for i in range(nodes.shape[1]):
        torch.sub(grid[None, :], nodes[:, i, None], out=term)
        term.div_(width).square_().mul_(-0.5).exp_().div_(gauss).mul_(weights[:, i, None])
        per_probe.add_(term)
    del term
    spacing = float(grid[1] - grid[0])
    if width >= spacing:  # the trapezoid sum is the mass on the span to 5e-9
        per_probe.div_(torch.trapezoid(per_probe, grid, dim=1)[:, None])
    else:  # it misses peaks between grid points: the exact mass
        ends = (grid[[0, -1]][None, None, :] - nodes[:, :, None]) / width
        inside = torch.special.ndtr(ends[..., 1]) - torch.special.ndtr(ends[..., 0])
        per_probe.div_((weights * inside).sum(1)[:, None])
    if width < spacing / 2:
        total = float(torch.trapezoid(per_probe.mean(0), grid))
        need = math.ceil((hi - lo) / width) + 11
        warnings.warn(
            f"spectral density: sigma={width:.3g} is below half the grid spacing {spacing:.3g} "
            f"({grid_size} points over [{float(grid[0]):.6g}, {float(grid[-1]):.6g}]): the "
            "density is exact at the grid points, but its peaks fall between them (trapezoid "
            f"sum {total:.4g} instead of 1, a plot misses them); pass grid_size >= {need} or "
            f"sigma >= {spacing:.3g}",
            stacklevel=user_stacklevel(),
        )
    return grid, per_probe, width


def _default_sigma(lo: float, hi: float) -> float:
    """The default broadening for nodes in ``[lo, hi]``: 1% of their spread, at least ``1e-8``
    of their largest ``|theta|`` (relative to the spectrum's scale, and at least the smallest
    normal float64, whose reciprocal is finite); ``1e-8`` only when every node is 0. Until
    review s16 the floor was ``1e-8 * max(|lo|, |hi|, 1)``, an absolute ``1e-8`` for small
    spectra: nodes ``{1, 3} * 1e-10`` got a width 50 times their spread and one merged peak."""
    top = max(abs(lo), abs(hi))
    if top == 0.0:
        return 1e-8
    return max(0.01 * (hi - lo), 1e-8 * top, torch.finfo(torch.float64).tiny)


def _three_term(
    op,
    draw: Callable[[], Tensor],
    steps: int,
    eps: float,
    device: torch.device,
    dtype: torch.dtype,
    bar: ProgressBar,
) -> tuple[Tensor, int]:
    """The plain Lanczos recurrence from a probe ``v = draw()`` with three vectors: ``v_{j-1}``,
    ``v_j`` and ``w`` (the probe itself becomes ``v_1``, so no reference to it outlives its step).

    Step ``j`` computes ``w = A v_j - beta_j v_{j-1}``, ``alpha_j = v_j^T w`` and
    ``w <- w - alpha_j v_j`` (Paige's A(2,7) ordering, the stable form of the recurrence), then
    ``beta_{j+1} = ||w||`` and ``v_{j+1} = w / beta_{j+1}``; ``alpha`` and ``beta`` fill the
    tridiagonal ``T``. ``||w||`` comes from the sweep's float64 squares, and is redone on the
    rescaled entries where those underflow or overflow (a float64 operator with ``||A||`` below
    ``1e-154`` or above ``1e154``; until review s16 the first gave ``beta = 0``, one node of
    weight 1, and the second a false "not finite" error). The vectors stay in the operator's
    per-parameter parts and each update shares its sweep with its float64 reduction
    (:mod:`curvlab.estimators._parts`); the product's
    scale (the operator's weight) enters through the coefficients. Stops early, with an exact
    quadrature, when ``beta <= 10 eps * scale`` (an invariant subspace).

    Returns:
        ``T`` (float64, CPU, ``m x m``) and the products used.
    """
    sizes, product = part_products(op, device, dtype)
    dim = sum(sizes)
    first = draw().to(device, dtype)
    first.div_(norm(first).to(first.dtype))
    cur = split(first, sizes)
    del first  # its parts are v_1: the probe goes with them
    prev: list[Tensor] | None = None
    diag: list[float] = []
    off: list[float] = []
    beta = 0.0
    scale = 0.0
    used = 0
    for _ in range(steps):
        w, c = product(cur)  # A v_j = c * w, c > 0 (the operator's weight)
        used += 1
        d = axpy_dot(w, beta / c, prev, cur)  # w <- w - (beta_j / c) v_{j-1}; d = v_j^T w
        r2 = axpy_dot(w, d, cur, None)  # w <- w - d v_j; r2 = ||w||^2
        col = torch.stack([d * c, r2.sqrt() * c]).cpu()  # the one host sync of the step
        if not plain_norm_ok(float(col[1]) / c, dim) and math.isfinite(float(col[0])):
            col[1] = float(scaled_norm(w)) * c  # squares out of range (||A|| < 1e-154, > 1e154)
        if not bool(torch.isfinite(col).all()):
            raise_product("the curvature product at Lanczos step", used, op=op)
        if prev is not None:
            off.append(beta)
        diag.append(float(col[0]))
        beta = float(col[1])
        bar.update()
        scale = max(scale, abs(diag[-1]), beta)
        if beta <= eps * scale or used == steps:  # invariant subspace: the quadrature is exact
            break
        inv = c / beta  # v_{j+1} = c w / beta
        # finite in the vectors' own dtype too: a float32 basis overflows at 3.4e38, where the
        # Python float does not (review s26: a float32 model's ||A|| near 1e-38)
        if math.isfinite(inv) and abs(inv) <= min(torch.finfo(t.dtype).max for t in w):
            for t in w:
                t.mul_(inv)
        else:  # beta near the smallest normal float64 (||A|| ~ 1e-308): c / beta overflowed
            # and the next product refused its own inf vector (review s26); divide by ||w||
            length = beta / c
            for t in w:
                t.div_(length)
        prev, cur = cur, w
    # filled in place: one m x m array (three more before review s23; tridiagonal_bytes)
    T = torch.zeros(len(diag), len(diag), dtype=torch.float64)
    T.diagonal().copy_(torch.tensor(diag, dtype=torch.float64))
    if off:
        e = torch.tensor(off, dtype=torch.float64)
        T.diagonal(1).copy_(e)
        T.diagonal(-1).copy_(e)
    return T, used


def _reorthogonalised(
    op,
    draw: Callable[[], Tensor],
    steps: int,
    eps: float,
    passes: int,
    device: torch.device,
    bar: ProgressBar,
) -> tuple[Tensor, int]:
    """Lanczos from a probe ``draw()`` with ``passes`` Gram-Schmidt passes against the stored
    basis."""
    kry = KrylovBasis(op, draw(), steps, reorth_passes=passes, basis_device=device)
    scale = 0.0
    for _ in range(steps):
        beta = kry.step()
        bar.update()
        scale = max(scale, float(kry.H[kry.m - 1, kry.m - 1].abs()), beta)
        if beta <= eps * scale:  # invariant subspace: the quadrature is exact
            break
    return kry.projected(), kry.num_matvecs
