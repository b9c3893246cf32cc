"""Extreme eigenvalues by thick-restart Lanczos with full reorthogonalisation.

For a symmetric ``D x D`` operator ``A`` the Lanczos process builds an orthonormal Krylov basis
``V_m = [v_1 .. v_m]`` of ``span{v_1, A v_1, .., A^{m-1} v_1}`` and the projection ``T_m = V_m^T A V_m``.
We keep every basis vector and orthogonalise each new ``A v_j`` against all of them twice (classical
Gram-Schmidt, twice is enough), so ``A V_m = V_m T_m + f e_m^T`` holds to working precision and the
Ritz pairs ``(theta_i, y_i = V_m s_i)`` of ``T_m`` have residual norms
``||A y_i - theta_i y_i|| = ||f|| |e_m^T s_i|``, read off without extra products. A Ritz value is
converged when that residual is at most ``tol * ||A||`` (``||A||`` estimated by the largest ``|theta|``);
then ``|theta_i - lambda| <= residual`` and usually ``<= residual^2 / gap``. When the basis reaches
``max_basis`` vectors it is restarted thickly (Wu & Simon 2000; Stewart's Krylov-Schur): the best
Ritz vectors are kept, so no information about the wanted end of the spectrum is lost.

Cost: one product per step, ``O(D m)`` flops per step for reorthogonalisation, ``O(D m)`` memory.
Two host synchronisations per step (the DGKS reorthogonalisation test and the convergence test).

Example:
    >>> import torch
    >>> from curvlab.estimators._protocol import TensorOperator
    >>> A = TensorOperator(torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64)))
    >>> res = lanczos_eigenvalues(A, k=2, tol=1e-10)
    >>> [round(v, 6) for v in res.values.tolist()], res.converged
    ([100.0, 99.0], True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from curvlab._finite import raise_product
from curvlab._progress import ProgressBar
from curvlab._rng import make_generator
from curvlab.estimators._protocol import check_operator

__all__ = ["EigenResult", "KrylovBasis", "lanczos_eigenvalues"]


@dataclass
class EigenResult:
    """Converged (or not) extreme eigenvalues of a symmetric operator.

    Attributes:
        values: ``(k,)`` float64 CPU tensor; for ``which="largest"`` in descending order, for
            ``"smallest"`` in ascending order (most extreme first).
        vectors: ``(D, k)`` Ritz vectors on the operator's device (columns match ``values``),
            or ``None`` unless asked for.
        residuals: ``(k,)`` residual norms ``||A y - theta y||`` (absolute).
        tol: the relative tolerance asked for; converged means ``residuals <= tol * norm``.
        norm: the estimate of ``||A||`` (largest ``|Ritz value|`` seen).
        converged: whether every one of the ``k`` values met the tolerance.
        num_matvecs: operator products used.
        num_restarts: thick restarts performed.
        seed: the seed of the starting vector (``None`` when a generator was passed).
        which: ``"largest"`` or ``"smallest"``.
    """

    values: Tensor
    vectors: Tensor | None
    residuals: Tensor
    tol: float
    norm: float
    converged: bool
    num_matvecs: int
    num_restarts: int
    seed: int | None
    which: str

    @property
    def relative_residuals(self) -> Tensor:
        """``residuals / ||A||``."""
        return self.residuals / max(self.norm, torch.finfo(torch.float64).tiny)


class KrylovBasis:
    """An orthonormal Krylov basis with its projected matrix (shared by Lanczos and SLQ).

    Args:
        op: the operator (see :mod:`curvlab.estimators._protocol`).
        start: the starting vector (any nonzero vector; it is normalised).
        max_basis: the capacity (number of basis vectors kept).
        reorth_passes: Gram-Schmidt passes against the whole basis per step (2 = full
            reorthogonalisation to working precision, the second pass only where the first
            lost more than ``1 - 1/sqrt(2)`` of the vector's norm, the DGKS test; 1 is
            cheaper; 0 = the plain three-term recurrence, whose loss of orthogonality adds
            copies of converged and spurious Ritz values but keeps the quadrature's low
            moments, which SLQ tolerates: Ubaru, Chen & Saad 2017).
    """

    def __init__(self, op, start: Tensor, max_basis: int, reorth_passes: int = 2) -> None:
        dim = op.shape[0]
        self.op = op
        self.capacity = max_basis
        self.passes = reorth_passes
        self.V = torch.zeros(max_basis + 1, dim, device=op.device, dtype=op.dtype)
        self.H = torch.zeros(max_basis, max_basis, dtype=torch.float64)
        self.V[0] = start / torch.linalg.vector_norm(start)
        self.m = 0  # columns of H computed (vectors with A applied)
        self.beta = 0.0
        self.num_matvecs = 0

    def step(self) -> float:
        """Apply ``A`` to the newest basis vector, orthogonalise, and return ``||f||``."""
        j = self.m
        w = self.op.matmat(self.V[j][:, None])[:, 0]
        self.num_matvecs += 1
        start = 0 if self.passes > 0 else max(0, j - 1)  # 0 passes: three-term recurrence only
        basis = self.V[start : j + 1]
        norm_in = torch.linalg.vector_norm(w)
        h = basis @ w
        w = torch.addmv(w, basis.T, h, alpha=-1)  # w - basis^T h, without a temporary
        if self.passes > 1 and not self._orthogonal_enough(norm_in, w):
            for _ in range(self.passes - 1):
                h2 = basis @ w
                w = torch.addmv(w, basis.T, h2, alpha=-1)
                h = h + h2
        beta_t = torch.linalg.vector_norm(w)
        col = torch.cat([h, beta_t[None]]).to("cpu", torch.float64)  # a host sync (DGKS: two)
        if not bool(torch.isfinite(col).all()):  # on the host already: no further sync
            raise_product("the curvature product at Lanczos step", self.num_matvecs)
        self.H[start : j + 1, j] = col[:-1]
        self.beta = float(col[-1])
        self.m = j + 1
        scale = float(col.abs().max())
        if self.beta > 10 * torch.finfo(self.op.dtype).eps * max(scale, 1e-300):
            self.V[self.m] = w / beta_t
        else:  # invariant subspace found: continue with a fresh orthogonal direction
            self.V[self.m] = self._fresh_direction()
        return self.beta

    @staticmethod
    def _orthogonal_enough(norm_in: Tensor, w: Tensor) -> bool:
        """The DGKS test (Daniel, Gragg, Kaufman & Stewart 1976; "twice is enough"): one
        Gram-Schmidt pass that kept more than ``1/sqrt(2)`` of the vector's norm left it
        orthogonal to working precision, so a second pass would change nothing."""
        return bool(torch.linalg.vector_norm(w) > 0.7071 * norm_in)

    def _fresh_direction(self) -> Tensor:
        """A random unit vector orthogonal to the basis (deterministic)."""
        gen = torch.Generator(device=self.op.device)
        gen.manual_seed(self.m)
        basis = self.V[: self.m]
        for _ in range(3):
            x = torch.randn(
                self.op.shape[0], generator=gen, device=self.op.device, dtype=self.op.dtype
            )
            for _ in range(2):
                x = x - basis.T @ (basis @ x)
            nrm = torch.linalg.vector_norm(x)
            if float(nrm) > 1e-8:
                return x / nrm
        return torch.zeros_like(x)

    def projected(self) -> Tensor:
        """The symmetric ``m x m`` projection ``V^T A V`` (float64, CPU)."""
        upper = torch.triu(self.H[: self.m, : self.m])
        return upper + torch.triu(upper, 1).T

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), eigenvectors of the projection and residual norms."""
        theta, S = torch.linalg.eigh(self.projected())
        res = self.beta * S[-1].abs()
        return theta, S, res

    def vectors(self, S: Tensor) -> Tensor:
        """Ritz vectors ``V_m S`` as a ``(D, k)`` tensor."""
        return self.V[: self.m].T @ S.to(self.V.device, self.V.dtype)

    def restart(self, keep: Tensor, theta: Tensor, S: Tensor) -> None:
        """Thick restart keeping the Ritz pairs with indices ``keep`` (Krylov-Schur form)."""
        p = int(keep.numel())
        Y = self.vectors(S[:, keep])
        nxt = self.V[self.m].clone()
        self.V.zero_()
        self.V[:p] = Y.T
        self.V[p] = nxt
        self.H.zero_()
        self.H[:p, :p] = torch.diag(theta[keep])
        self.m = p


def lanczos_eigenvalues(
    op,
    k: int = 1,
    tol: float = 1e-4,
    which: str = "largest",
    max_basis: int | None = None,
    max_matvecs: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    return_vectors: bool = False,
    criterion: str = "residual",
    show_progress: bool | None = False,
) -> EigenResult:
    """The ``k`` largest (or smallest) algebraic eigenvalues of a symmetric operator.

    Args:
        op: the operator (``shape``, ``dtype``, ``device``, ``matmat``).
        k: how many eigenvalues.
        tol: relative residual tolerance: each Ritz pair must satisfy
            ``||A y - theta y|| <= tol * ||A||``.
        which: ``"largest"`` or ``"smallest"`` (algebraic).
        max_basis: basis vectors kept before a thick restart (default ``max(60, 3k)``, at most D).
        max_matvecs: give up (``converged=False``) after this many products
            (default ``max(1000, 40 k)``).
        seed: seed of the random starting vector (default 0).
        generator: alternatively a generator on the operator's device.
        return_vectors: also return the Ritz vectors.
        criterion: ``"residual"`` (default): converged when ``r_i <= tol * ||A||`` for the
            residual norms ``r_i``; ``"eigenvalue"``: when the a-posteriori eigenvalue error
            estimate ``min(r_i, r_i^2 / gap_i) <= tol * |theta_i|`` (``gap_i`` the distance to the
            nearest other Ritz value), which stops as soon as the values themselves are
            accurate to ``tol`` (relative) while the vectors may still be rough.
        show_progress: print progress to stderr.

    Returns:
        An :class:`EigenResult` with the values, residuals and whether all converged.
    """
    op = check_operator(op)
    dim = op.shape[0]
    if not isinstance(k, int) or k < 1 or k > dim:
        raise ValueError(f"k must be an int in [1, {dim}] (the operator's size), got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if criterion not in ("residual", "eigenvalue"):
        raise ValueError(f"criterion must be 'residual' or 'eigenvalue', got {criterion!r}")
    cap = min(dim, max_basis if max_basis is not None else max(60, 3 * k))
    if cap < min(dim, k + 2):
        raise ValueError(f"max_basis must be at least k + 2 = {k + 2}, got {max_basis!r}")
    limit = max_matvecs if max_matvecs is not None else max(1000, 40 * k)
    gen = make_generator(seed=seed, generator=generator, device=op.device)
    used_seed = None if generator is not None else (0 if seed is None else seed)
    start = torch.randn(dim, generator=gen, device=op.device, dtype=op.dtype)
    kry = KrylovBasis(op, start, cap)
    bar = ProgressBar(desc=f"lanczos top-{k}", enable=show_progress)
    restarts = 0
    norm = 0.0
    while True:
        kry.step()
        bar.update(postfix=f"matvecs={kry.num_matvecs}")
        full = kry.m == dim
        if kry.m < min(k, dim) and not full:
            continue
        theta, S, res = kry.ritz()
        norm = max(norm, float(theta.abs().max()))
        idx = _wanted(theta, k, which)
        ok = _converged(theta, res, idx, tol, norm, criterion) or full
        if ok or kry.num_matvecs >= limit:
            break
        if kry.m == cap:
            keep_n = min(kry.m - 1, k + max(1, (cap - k) // 2))
            kry.restart(_wanted(theta, keep_n, which), theta, S)
            restarts += 1
    bar.close()
    if full:
        res = torch.zeros_like(res)
    return EigenResult(
        values=theta[idx].clone(),
        vectors=kry.vectors(S[:, idx]) if return_vectors else None,
        residuals=res[idx].clone(),
        tol=tol,
        norm=norm,
        converged=ok,
        num_matvecs=kry.num_matvecs,
        num_restarts=restarts,
        seed=used_seed,
        which=which,
    )


def _converged(
    theta: Tensor, res: Tensor, idx: Tensor, tol: float, norm: float, criterion: str
) -> bool:
    """The stopping test of :func:`lanczos_eigenvalues` for the wanted Ritz pairs ``idx``."""
    if criterion == "residual":
        return bool((res[idx] <= tol * norm).all())
    if theta.numel() < 2:
        return False
    others = (theta[idx, None] - theta[None, :]).abs()
    others[torch.arange(idx.numel()), idx] = float("inf")
    gap = others.min(dim=1).values.clamp_min(torch.finfo(torch.float64).tiny)
    bound = torch.minimum(res[idx], res[idx] ** 2 / gap)
    return bool((bound <= tol * theta[idx].abs()).all())


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the ``k`` wanted Ritz values (most extreme first); ``theta`` is ascending."""
    n = theta.numel()
    k = min(k, n)
    if which == "largest":
        return torch.arange(n - 1, n - 1 - k, -1)
    return torch.arange(0, k)
