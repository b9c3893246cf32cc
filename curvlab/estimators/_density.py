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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvlab._progress import ProgressBar
from curvlab._rng import make_generator
from curvlab.estimators._lanczos import KrylovBasis
from curvlab.estimators._protocol import check_operator
from curvlab.estimators._trace import draw_probes

__all__ = ["DensityResult", "slq"]


@dataclass
class DensityResult:
    """A smoothed spectral density and the quadrature it comes from.

    Attributes:
        grid: ``(G,)`` float64 points.
        density: ``(G,)`` the smoothed density on ``grid`` (integrates to 1 by the trapezoid rule).
        nodes: ``(n_v, m)`` Ritz values of each probe's Lanczos run.
        weights: ``(n_v, m)`` their quadrature weights (each row sums to 1).
        stderr: ``(G,)`` standard error of ``density`` over probes (``nan`` for one probe).
        sigma: the Gaussian broadening width.
        num_matvecs: operator products used.
        seed: the probes' seed (``None`` when a generator was passed).
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    stderr: Tensor
    sigma: float
    num_matvecs: int
    seed: int | None

    def moment(self, j: int) -> float:
        """Quadrature estimate of ``(1/D) tr(A^j)`` (exact per probe for ``j < 2m``)."""
        return float((self.weights * self.nodes**j).sum(1).mean())

    def plot(self, ax: Any = None, log: bool = True, **kwargs: Any) -> Any:
        """Plot the density (log scale by default, as in Ghorbani et al.); returns the axes."""
        import matplotlib

        matplotlib.use("Agg")
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
) -> DensityResult:
    """Stochastic Lanczos quadrature with Gaussian broadening.

    Args:
        op: the operator (``shape``, ``dtype``, ``device``, ``matmat``).
        num_steps: Lanczos steps ``m`` per probe (at most ``D``).
        num_probes: independent Rademacher probes ``n_v``.
        sigma: broadening width (default 1% of the spread of the nodes).
        grid_size: grid points; the grid spans the nodes plus ``5 sigma`` on each side.
        seed / generator: the probes' randomness (default seed 0).
        reorth_passes: Gram-Schmidt passes against the whole basis per step. The default 0 is
            the plain three-term recurrence (``O(D)`` work per step, so SLQ costs its products);
            once it loses orthogonality the nodes include copies of converged Ritz values and
            spurious values between eigenvalues, but the quadrature's low moments and the
            broadened density stay accurate, which is what SLQ needs (Ubaru, Chen & Saad 2017;
            tests/test_kfac_any_model.py checks both). Use 2 for full reorthogonalisation
            (``O(D m)`` per step), under which the nodes are Ritz values proper: with ``m = D``
            steps, the eigenvalues.
        show_progress: progress bar on stderr.
    """
    op = check_operator(op)
    dim = op.shape[0]
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive int, got {num_probes!r}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if not isinstance(grid_size, int) or grid_size < 2:
        raise ValueError(f"grid_size must be an int >= 2, got {grid_size!r}")
    steps = min(num_steps, dim)
    gen = make_generator(seed=seed, generator=generator, device=op.device)
    used_seed = None if generator is not None else (0 if seed is None else seed)
    node_rows, weight_rows = [], []
    matvecs = 0
    bar = ProgressBar(total=steps * num_probes, desc="slq", enable=show_progress)
    eps = torch.finfo(op.dtype).eps
    for _ in range(num_probes):
        v = draw_probes(dim, 1, gen, "rademacher", op.device, op.dtype)[:, 0]
        kry = KrylovBasis(op, v, steps, reorth_passes=reorth_passes)
        scale = 0.0
        for _ in range(steps):
            beta = kry.step()
            bar.update()
            scale = max(scale, float(kry.H[kry.m - 1, kry.m - 1].abs()), beta)
            if beta <= 10 * eps * scale:  # invariant subspace: the quadrature is exact
                break
        matvecs += kry.num_matvecs
        theta, S = torch.linalg.eigh(kry.projected())
        tau = S[0] ** 2
        pad = steps - theta.numel()
        node_rows.append(torch.cat([theta, theta.new_zeros(pad)]))
        weight_rows.append(torch.cat([tau, tau.new_zeros(pad)]))
    bar.close()
    nodes, weights = torch.stack(node_rows), torch.stack(weight_rows)
    live = nodes[weights > 0]
    lo, hi = float(live.min()), float(live.max())
    width = sigma if sigma is not None else max(0.01 * (hi - lo), 1e-8 * max(abs(lo), abs(hi), 1.0))
    grid = torch.linspace(lo - 5 * width, hi + 5 * width, grid_size, dtype=torch.float64)
    z = (grid[None, None, :] - nodes[:, :, None]) / width
    kernel = torch.exp(-0.5 * z**2) / (width * math.sqrt(2 * math.pi))
    per_probe = (weights[:, :, None] * kernel).sum(1)
    per_probe = per_probe / torch.trapezoid(per_probe, grid, dim=1)[:, None]
    density = per_probe.mean(0)
    if num_probes > 1:
        stderr = per_probe.std(0, unbiased=True) / math.sqrt(num_probes)
    else:
        stderr = torch.full_like(density, math.nan)
    return DensityResult(grid, density, nodes, weights, stderr, width, matvecs, used_seed)
