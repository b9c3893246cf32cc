"""Extreme eigenvalues by thick-restart Lanczos with full reorthogonalisation, in bounded memory.

For a symmetric ``D x D`` operator ``A`` the Lanczos process builds an orthonormal Krylov basis
``V_m = [v_1 .. v_m]`` of ``span{v_1, A v_1, .., A^{m-1} v_1}`` and the projection ``T_m = V_m^T A V_m``.
We keep every basis vector and orthogonalise each new ``A v_j`` first against ``v_{j-1}`` and
``v_j`` (the three-term recurrence: its large components), then against all of them (classical
Gram-Schmidt; "twice is enough": a further pass only where the DGKS test asks for one), so
``A V_m = V_m T_m + f e_m^T`` holds to working precision and the Ritz pairs
``(theta_i, y_i = V_m s_i)`` of ``T_m`` have residual norms
``||A y_i - theta_i y_i|| = ||f|| |e_m^T s_i|``, read off without extra products. A Ritz value is
converged when that residual is at most ``tol * ||A||`` (``||A||`` estimated by the largest ``|theta|``);
then ``|theta_i - lambda| <= residual`` and usually ``<= residual^2 / gap``.

Invariant subspaces. When ``||f||`` becomes tiny the Krylov space is invariant: exactly (``||f||`` at
rounding level) or within the tolerance (``||f|| <= tol * ||A||``). Every Ritz value then has a
tiny residual, but the wanted set can still miss eigenvalues: a start vector reaches only one
direction of each eigenspace, so a repeated eigenvalue (the Hessian ``(X^T X) kron I`` of a linear
layer under MSE) or a null space (a low-rank GGN, ``which="smallest"``) is found once per
invariant subspace. Either way the run goes on from a fresh random direction (drawn from the
call's generator) orthogonal to the whole basis, locked vectors included
(:meth:`KrylovBasis.renew`): only such a direction reaches every direction the basis lacks. (Until
review s12 a space invariant within the tolerance went on from ``f / ||f||``, which is built from
the exhausted space and often lies near an eigenvector of an unwanted value: ``nn.Linear(5, 4)``
under MSE, top 5 at the default ``tol``, listed the top eigenvalue 3 times instead of 4 with
``converged=True``.) The discarded ``f`` couples only to the newest vector, by ``||f||``; that
coupling is added to the residuals the recurrence reports (a bound), and ``k`` products at the
end give the true residuals. Each such event starts a new *segment*, the Krylov space grown from
the fresh direction (tracked as a per-vector weight, rotated along at restarts). The run is
converged only when, besides the usual test, the newest segment is settled: its most extreme Ritz
value at the wanted end has converged and is not better (by more than ``tol * ||A||``) than the
``k``-th wanted value of the other segments. A segment that does contribute a wanted value is
grown until it too becomes invariant, and the next one is judged; so every copy of a repeated
eigenvalue that the segments reach is listed. Runs that never find one (``||f||`` stays above
``tol * ||A||``) and never restart take the same steps as without this test (unless ``k`` is a
sizeable share of ``D``: see the verification below). The limitation that remains: a
single-vector Krylov method cannot see the multiplicity of an eigenvalue when no invariant
subspace is reached (e.g. a repeated top eigenvalue above a large generic bulk), and lists it
once.

Memory is bounded by the basis size ``max_basis`` (``m_max``, ARPACK's ``ncv``): when the basis
reaches ``m_max`` vectors it is restarted thickly (Wu & Simon 2000; Stewart's Krylov-Schur
decomposition for symmetric matrices): the ``p = k + (m_max - k) / 2`` best Ritz vectors
``Y = V_m S_p`` replace the basis, ``T`` becomes ``diag(theta_1..theta_p)`` bordered by the couplings
``beta s_{m,i}`` to the next vector ``v_{m+1}`` (an arrowhead), and the process continues from
``v_{m+1}``; the Ritz values at the wanted end keep improving. After an invariant subspace or a
lock, where the ``p`` best hold none of the newest segment's Ritz vectors, the ``k`` best are kept
with the segment's ``p - k`` best in place of the older ones (:func:`_restart_keep`; until review
s22 a basis that filled as the start's space became invariant kept only older ones and restarted
the new segment from its residual alone, which never settled: ``diag(3, 1, 1, -1, -1)``,
``k=1``, ``max_basis=3``, 1000 products and ``converged=False``, now 5). What a restarted basis
cannot do is become invariant while the Krylov space of the start is larger than it, so it never
shows the multiplicity of a repeated eigenvalue as an unrestarted one does (diag of six values,
three times each, top 3: ``max_basis=5`` listed ``[5, 3.4, 1.8]`` for ``[5, 5, 5]``, found in review).
A run that has restarted therefore verifies before it claims convergence: once the wanted values
have converged (their residuals, as a span, within a margin of the tolerance), they are locked
(:meth:`KrylovBasis.lock`): kept, with the next Lanczos vector replaced by a random direction
orthogonal to them, whose Krylov space is a new segment judged as above; a segment that adds a
wanted value (another copy) is locked in turn, and the run converges when one adds nothing. The
couplings of the locked vectors to the discarded Lanczos vectors are added to the residuals the
recurrence reports (a bound), and ``k`` products at the end give the true residuals. Extra
cost: about the products of converging the best value outside the wanted ones, plus ``k``
(W1, top 5 at ``tol=1e-4`` with ``max_basis=12``: 152 products; the default basis of 120 does
not restart there and takes 75 with no verification). The same check runs without a restart
where the residual test alone is not enough: the residual test only says that each Ritz value
is near *some* eigenvalue, and an interior eigenvalue that no Ritz value has reached yet is not
seen, which for ``k >= D / 10`` (:data:`VERIFY_SHARE`) happened in 6-18% of unrestarted runs on
generic spectra (review s12: ``D = 45``, ``k = 27``, the 24th value 0.63 for 1.55); with
``verify=True`` every run is checked (a fresh direction also finds an eigenvalue that the start
vector barely touched: unverified, 13 of 192 runs with ``k`` from 2 to ``D / 4`` on spectra with
a bulk at the wanted end missed one, by 1-7 and once 230 times ``tol * ||A||``). ``k = 1`` is
not verified by default, restarted or not (sharpness in a training loop pays for every
product): a missed exact copy of the top value changes nothing returned, but an eigenvalue a
few ``tol * ||A||`` below the top one can be returned in its place with ``converged=True``, and
the first value of a small unverified ``k`` likewise (review s16: 12 of 100 seeds on a tight top
cluster, none with ``verify=True``; see :func:`_verified`). So ``k``
eigenvalues need ``O(k)`` parameter-vectors whatever the number of steps: the basis holds at most
``m_max + 1`` vectors (the next Lanczos vector included), allocated one at a time as the basis
grows (never reserved ahead), and the rotation ``V_m S_p`` is done in place in row chunks. The
vectors are stored in the operator's dtype (float32 for 16-bit models, see
:func:`curvlab.estimators._memory.storage_dtype`) on the operator's device or on ``basis_device``;
the small projected problem (tridiagonal, arrowhead after a restart) is solved in float64 on the
host.

Cost: one product per step, ``O(D m)`` flops per step for reorthogonalisation, ``m_max + 1``
parameter-vectors of memory (``max(m_max + 1, 2k)`` with ``return_vectors``). Two host
synchronisations per step (the DGKS reorthogonalisation test and the convergence test).

Example:
    >>> import torch
    >>> from curvlab.estimators._protocol import TensorOperator
    >>> A = TensorOperator(torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64)))
    >>> res = lanczos_eigenvalues(A, k=2, tol=1e-10)
    >>> [round(v, 6) for v in res.values.tolist()], res.converged
    ([100.0, 99.0], True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlab._numbers import is_count, is_positive
from curvlab._progress import ProgressBar
from curvlab._rng import check_randomness, make_generator
from curvlab.estimators._krylov import KrylovBasis
from curvlab.estimators._lanczos_stopping import (
    VERIFY_SHARE,
    ZERO_ROUNDING,
    _converged,
    _lockable,
    _newest_segment,
    _verified,
    _wanted,
    _why_unconverged,
    _zero_level,
)
from curvlab.estimators._memory import (
    SIXTEEN_AIM,
    EstimatorMemoryError,
    agree,
    check_basis_device,
    check_memory_budget,
    lanczos_basis_size,
    require,
    sixteen_bit,
    storage_dtype,
    vector_bytes,
)
from curvlab.estimators._protocol import check_operator, checks_values_once

__all__ = [
    "VERIFY_SHARE",
    "ZERO_ROUNDING",
    "EigenResult",
    "check_lanczos_args",
    "check_lanczos_plan",
    "lanczos_eigenvalues",
]


@dataclass
class EigenResult:
    """Converged (or not) extreme eigenvalues of a symmetric operator.

    Attributes:
        values: ``(k,)`` float64 CPU tensor; for ``which="largest"`` in descending order, for
            ``"smallest"`` in ascending order (most extreme first).
        vectors: ``(D, k)`` Ritz vectors (columns match ``values``) on the device the basis was
            kept on (the operator's unless ``basis_device`` says otherwise), in the basis dtype
            (float32 for 16-bit models), or ``None`` unless asked for.
        residuals: ``(k,)`` residual norms ``||A y - theta y||`` (absolute); for a 16-bit
            operator (products in 16 bits, vectors in float32) measured with one product each,
            as the recurrence's claim an accuracy far below the products' rounding (review s27:
            bfloat16, 1.4e-5 for a true 2.0e-3 with ``converged=True`` at ``tol=1e-4``).
        tol: the relative tolerance asked for; converged means ``residuals <= tol * norm``.
        norm: the estimate of ``||A||`` (largest ``|Ritz value|`` seen).
        converged: whether every one of the ``k`` values met the tolerance (each is then within
            its residual of *an* eigenvalue) and, after an invariant subspace, a restart (with
            ``k >= 2``), with ``k >= D / 10`` or ``verify=True``, a fresh segment added no wanted
            value (see :func:`lanczos_eigenvalues`). Without that verification a value can be
            an eigenvalue a few ``tol * norm`` short of the wanted one, and a copy of a
            repeated wanted eigenvalue that no invariant subspace exposes is missed: the next
            distinct eigenvalue takes its place, off by any amount (a linear head under MSE
            has each Hessian eigenvalue once per output: ``k=4`` gave ``[3.85, 3.47, 3.01,
            1.78]`` for a true ``[3.85, 3.85, 3.85, 3.47]``, found in review s23). Pass
            ``verify=True`` where the wanted values may be repeated.
        num_matvecs: operator products used.
        num_restarts: thick restarts performed.
        seed: the seed of the starting vector (``None`` when a generator was passed).
        which: ``"largest"`` or ``"smallest"``.
        max_basis: the basis size used (Lanczos vectors before a thick restart).
        peak_vectors: the most parameter-vectors the estimator held at once (the basis, the
            next Lanczos vector and the newest product; at most ``max(max_basis + 1, 2k)``).
        info: how it was computed where that is not the default (``"compiled"``: a
            ``torch.compile``d model, docs/training-loops.md; ``"locks"`` and
            ``"lock_matvecs"``: the verification (of a restarted basis, with ``k >= D / 10`` or
            ``verify=True``), the locks and the products from the first lock on;
            ``"unconverged"``: when not converged, what was missing (the wanted values' residuals,
            or a verification or new segment that had not settled) and what to change).
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
    max_basis: int = 0
    peak_vectors: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def relative_residuals(self) -> Tensor:
        """``residuals / ||A||``."""
        return self.residuals / max(self.norm, torch.finfo(torch.float64).tiny)


def check_lanczos_args(
    k: int,
    tol: float,
    which: str,
    criterion: str,
    max_basis: int | None,
    max_matvecs: int | None,
    memory_budget: float | None,
    dim: int | None = None,
    verify: bool = False,
    return_vectors: bool = False,
) -> None:
    """The checks of :func:`lanczos_eigenvalues`' arguments (``dim``: the operator's size, when
    known), also made by :func:`curvlab.eigenvalues` before it reads the data. The flags must be
    bools (found in review s19: ``return_vectors="no"`` returned the vectors)."""
    if not isinstance(verify, bool):
        raise ValueError(f"verify must be True or False, got {verify!r}")
    if not isinstance(return_vectors, bool):
        raise ValueError(f"return_vectors must be True or False, got {return_vectors!r}")
    if not is_count(k) or (dim is not None and k > dim):
        size = "" if dim is None else f" in [1, {dim}] (the operator's size)"
        raise ValueError(f"k must be a positive int{size}, got {k!r}")
    if not is_positive(tol):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if criterion not in ("residual", "eigenvalue"):
        raise ValueError(f"criterion must be 'residual' or 'eigenvalue', got {criterion!r}")
    if max_basis is not None and not is_count(max_basis):
        raise ValueError(f"max_basis must be a positive int or None, got {max_basis!r}")
    if max_matvecs is not None and not is_count(max_matvecs):
        raise ValueError(f"max_matvecs must be a positive int or None, got {max_matvecs!r}")
    if max_matvecs is not None and max_matvecs < k:
        raise ValueError(
            f"max_matvecs={max_matvecs} is fewer than k={k}: Lanczos needs one product per "
            "Ritz value, so k values take at least k products; pass max_matvecs >= k"
        )
    if max_basis is not None and dim is not None and min(dim, max_basis) < min(dim, k + 2):
        floor = min(dim, k + 2)
        rule = f"min(k + 2, D) = {floor}" if floor < k + 2 else f"k + 2 = {k + 2}"
        raise ValueError(f"max_basis must be at least {rule}, got {max_basis!r}")
    check_memory_budget(memory_budget)


@checks_values_once
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
    *,
    memory_budget: float | None = None,
    basis_device: torch.device | str | None = None,
    start: Tensor | None = None,
    verify: bool = False,
) -> EigenResult:
    """The ``k`` largest (or smallest) algebraic eigenvalues of a symmetric operator.

    Args:
        op: the operator (``shape``, ``dtype``, ``device``, ``matmat``).
        k: how many eigenvalues.
        tol: relative residual tolerance: each Ritz pair must satisfy
            ``||A y - theta y|| <= tol * ||A||``; at least five times the eps of the vectors'
            dtype (about ``6e-7`` for float32: a float32 run at ``tol=1e-9`` reported residuals
            of ``1e-9`` while the true ones were ``1.4e-7``).
        which: ``"largest"`` or ``"smallest"`` (algebraic).
        max_basis: Lanczos vectors kept before a thick restart (at least ``min(k + 2, D)``;
            more than D is used as D);
            the basis then holds at most ``max_basis + 1`` parameter-vectors. Default:
            ``max(120, 3k)`` while those take at most 4 GiB
            (:data:`~curvlab.estimators._memory.DEFAULT_BASIS_BYTES`), else as many as fit
            in 4 GiB but at least ``max(10, 2k + 2)``, and never more than half the memory
            available on the basis device.
        max_matvecs: give up (``converged=False``) after this many products
            (default ``max(1000, 40 k)``; at least ``k``).
        seed: seed of the random starting vector and of the fresh random directions after an
            invariant subspace or a lock (default 0).
        generator: alternatively a generator on the operator's device (drawn from for both).
        return_vectors: ``True``: also return the Ritz vectors (``k`` more parameter-vectors at
            the end); a bool, as ``verify``.
        criterion: ``"residual"`` (default): converged when ``r_i <= tol * ||A||`` for the
            residual norms ``r_i``; ``"eigenvalue"``: when the a-posteriori eigenvalue error
            estimate ``min(r_i, r_i^2 / gap_i) <= tol * |theta_i|`` (``gap_i`` the distance to the
            nearest other Ritz value), which usually stops once the values themselves are
            accurate to ``tol`` while the vectors may still be rough, but is not a bound: an
            eigenvalue near a wanted one that is not yet among the Ritz values makes the gap
            look larger than it is (errors up to 700x ``tol`` measured on a tight top cluster).
            A value within rounding of 0 cannot meet an error relative to ``|theta_i|``: the
            estimate is also accepted at ``min(tol, 10 eps) * ||A||`` (:data:`ZERO_ROUNDING`;
            ``eps`` of the vectors' dtype), never looser than the residual criterion, so a null
            space under ``which="smallest"`` converges (with residuals at that level: more
            products than ``"residual"``, which needs only ``tol * ||A||``).
            ``"residual"`` guarantees ``|theta_i - lambda| <= r_i``.
        show_progress: print progress to stderr.
        memory_budget: bytes the basis may take (sets ``max_basis`` to what fits, at most
            ``max(120, 3k)``, unless ``max_basis`` is given, which must then fit);
            ``float("inf")``: no budget, ``max(120, 3k)`` cut to what the memory available
            holds.
        basis_device: where the basis is kept, e.g. ``"cpu"`` to keep it in host memory while
            the products run on a GPU (one vector crosses per step each way; the
            orthogonalisation then runs on the host).
        start: the starting vector ``(D,)`` (a warm start, e.g. the top eigenvector of a previous
            measurement; not modified) instead of a random one from ``seed``/``generator``.
            Lanczos finds only eigenvectors with a component in it: a start inside an invariant
            subspace (old eigenvectors of a matrix whose top eigenvector is now elsewhere)
            exhausts it, and the run goes on with fresh directions until they add no wanted
            value, which for a large operator can take up to ``max_matvecs`` (then
            ``converged=False``). Add a random part unless the start is known to overlap the
            wanted eigenvectors, as ``Diagnostics``' warm start does
            (:data:`curvlab.analysis._sharpness.WARM_RANDOM`).
        verify: verify every run before it claims convergence, as a restarted one is (a fresh
            random segment orthogonal to the locked wanted Ritz vectors must add no wanted
            value; about the products of converging one more eigenvalue, plus ``k``). By
            default (``False``) runs that restarted with ``k >= 2`` and unrestarted ones with
            ``k >= 2`` and ``k >= D / 10`` (:data:`VERIFY_SHARE`) are verified; the others rely
            on the residual test, which cannot see an eigenvalue inside the wanted range that
            no Ritz value has reached (rare where the wanted values are well separated, as at
            the top of a network's Hessian; more common where they sit in a bulk, e.g.
            ``which="smallest"``: see the module docstring). That includes the most extreme
            one, ``k = 1`` too: each value is within its residual of *an* eigenvalue, and where
            eigenvalues lie within a few ``tol * ||A||`` of the extreme one, an unverified run
            may return one of them in its place (review s16, a top cluster of four values
            ``1e-5`` wide over a bulk, ``tol=1e-6``, ``k=1``: 12 of 100 seeds 3 ``tol * ||A||``
            short; at the default ``tol`` a cluster ``1e-3`` wide, ``D = 100``: 6, 5 and 1 of
            100 seeds for ``k`` = 1, 2, 3). ``verify=True`` found the top value on every one
            of those seeds, at 50 products on average instead of 36.7 (the first example) and
            67-76 instead of 38-44 (the second).

    After an invariant subspace (exact, or within ``tol * ||A||``: every Ritz value then passes
    the residual test), the run goes on from a fresh random direction orthogonal to the basis
    (a new segment of the Krylov space; ``k`` products at the end give the true residuals) and
    is converged only once the newest segment adds no wanted value (see the module docstring):
    repeated eigenvalues are then listed with their multiplicity and a null space is found for
    ``which="smallest"``, at the cost of more products (up to ``D`` for an operator whose
    eigenvalues are all repeated). A repeated eigenvalue that no invariant subspace exposes (a
    repeated top eigenvalue above a large generic bulk) is listed once: one start vector cannot
    see multiplicity without one. A run whose basis restarted (``max_basis`` or
    ``memory_budget`` smaller than the steps it takes; the default basis on large models) never
    becomes invariant while the Krylov space of the start is larger than the basis: it is
    converged only after a verification, a fresh random segment orthogonal to the locked wanted
    Ritz vectors that adds no wanted value (see the module docstring; repeated eigenvalues are
    then listed with their multiplicity). That costs about as many products as converging the
    next value beyond the wanted ones, plus ``k`` for the true residuals (recorded in
    ``info["locks"]`` and ``info["lock_matvecs"]``); a basis large enough not to restart avoids
    it, unless ``k >= D / 10`` or ``verify=True``.

    Returns:
        An :class:`EigenResult` with the values, residuals and whether all converged.

    Raises:
        EstimatorMemoryError: (a ``MemoryError``) before anything is allocated, when the basis
            it can reach does not fit ``memory_budget`` or the memory available.
    """
    op = check_operator(op)
    dim = op.shape[0]
    check_lanczos_args(
        k,
        tol,
        which,
        criterion,
        max_basis,
        max_matvecs,
        memory_budget,
        dim,
        verify=verify,
        return_vectors=return_vectors,
    )
    checked_device = check_basis_device(basis_device)
    check_randomness(seed, generator, op.device)
    _check_tol_floor(tol, op.dtype)
    _check_sixteen_bit_matvecs(k, max_matvecs, op.dtype)
    limit = max_matvecs if max_matvecs is not None else max(1000, 40 * k)
    bdev = op.device if checked_device is None else checked_device
    try:
        cap, refusal = (
            _basis_size(op, k, max_basis, memory_budget, limit, return_vectors, bdev),
            None,
        )
    except EstimatorMemoryError as exc:
        cap, refusal = 0, exc
    cap = agree(getattr(op, "_comm", None), cap, refusal)  # one basis size for all ranks
    gen = make_generator(seed=seed, generator=generator, device=op.device)
    used_seed = None if generator is not None else (0 if seed is None else seed)
    if start is None:
        start = torch.randn(dim, generator=gen, device=op.device, dtype=storage_dtype(op.dtype))
    elif tuple(start.shape) != (dim,) or not bool(torch.isfinite(start).all() & start.any()):
        raise ValueError(
            f"start must be a finite nonzero ({dim},) vector, got {tuple(start.shape)}"
        )
    else:
        used_seed = None  # the starting vector was given
    kry = KrylovBasis(op, start, cap, basis_device=bdev, generator=gen)
    del start
    bar = ProgressBar(desc=f"lanczos top-{k}", enable=show_progress)
    restarts = locks = first_lock = 0
    norm = 0.0
    zero = _zero_level(tol, op.dtype)  # criterion="eigenvalue": values within rounding of 0
    checked = _verified(k, dim, verify)  # verified before convergence even without a restart
    # 16-bit products are rounded far above the float32 basis: the recurrence's residuals claim an
    # accuracy they do not have, so the k residuals are measured at the end (review s27)
    sixteen = sixteen_bit(op.dtype)
    # and the recurrence aims below tol, so that a measured residual (the products' rounding on
    # top) that misses tol is the rounding's doing, not a hair's (review s27)
    aim = tol / SIXTEEN_AIM if sixteen else tol
    met_at: int | None = None  # 16-bit: the products when the recurrence first met tol
    while True:
        kry.step()
        bar.update(postfix=f"matvecs={kry.num_matvecs}")
        full = kry.m == dim
        if not full and kry.beta <= tol * max(norm, kry.scale):
            kry.renew()  # invariant within the tolerance: go on from a fresh random direction
        if kry.m < min(k, dim) and not full:
            continue
        theta, S, res = kry.ritz()
        norm = max(norm, float(theta.abs().max()))
        idx = _wanted(theta, k, which)
        ok, level = _converged(theta, res, idx, aim, norm, criterion, zero), aim
        if sixteen and not ok and _converged(theta, res, idx, tol, norm, criterion, zero):
            # met tol but not the aim: as many products again as meeting tol took, then it is
            # measured against tol (a restarted 16-bit recurrence may never read the aim: a
            # basis of 4 vectors ran to max_matvecs)
            met_at = kry.num_matvecs if met_at is None else met_at
            if kry.num_matvecs >= 2 * met_at:
                ok, level = True, tol
        newest = "settled"
        if ok and kry.segments > 1:  # an invariant subspace was found (or a lock): see there
            newest = _newest_segment(
                theta, kry.segment_mass(S), res, k, which, level, norm, criterion, zero
            )
            ok = newest == "settled"
        # a restarted basis that converged without an invariant subspace may have missed copies
        # of a repeated eigenvalue, and a segment that adds a wanted value cannot become
        # invariant next to the kept vectors: lock the wanted ones and verify with a fresh
        # segment (KrylovBasis.lock; k products at the end give the true residuals); so do
        # unrestarted runs with k a sizeable share of D, or all with verify=True (_verified)
        # (k = 1 is not verified by default, for its cost: an exact copy of the top value
        # missed changes nothing returned, but an eigenvalue a few tol * ||A|| below the top
        # one can be returned in its place: see _verified)
        restarted = restarts > 0 or locks > 0  # (an unrestarted basis grows "adds" segments)
        lock_now = (
            not full
            and (checked or (k > 1 and restarted))
            and ((ok and kry.segments == 1) or (newest == "adds" and restarted))
        )
        ok = (ok and not lock_now) or full
        if lock_now and cap >= dim and dim - kry.m <= max(k, kry.m):
            # the rest of the space costs no more than a lock, whose fresh segment takes about
            # the products spent so far (D = 43, top 5: 61 products with a lock, 31 before the
            # check, found in self-review): finish the space, the exact answer
            lock_now = False
        if ok or kry.num_matvecs >= limit - (k if locks or sixteen else 0):
            break
        room = kry.num_matvecs + k < limit  # a step and the k residual products still fit
        if lock_now and room and _lockable(kry, theta, S, idx, level, norm, criterion, locks, zero):
            first_lock = kry.num_matvecs if not locks else first_lock
            kry.lock(idx, theta, S)
            locks += 1
            continue
        if kry.m == cap:
            keep_n = min(kry.m - 1, k + max(1, (cap - k) // 2))
            kry.restart(_restart_keep(theta, kry.segment_mass(S), k, keep_n, which), theta, S)
            restarts += 1
    bar.close()
    info: dict[str, Any] = {}
    # the newest segment's share of each Ritz vector, for the message (before ritz_residuals
    # consumes the basis; none where its fresh direction was not applied yet)
    mass = None if kry.segment_unstarted else kry.segment_mass(S)
    cols = S[:, idx]
    passed, measured = ok, None  # the recurrence's test; the products' dtype where measured
    room = kry.num_matvecs + idx.numel() <= limit
    if (sixteen or (kry.leak.shape[1] and not full)) and room:
        # after a lock or a fresh direction (KrylovBasis.renew) the recurrence gives bounds,
        # and for 16-bit products residuals far below their rounding (review s27: bfloat16,
        # 1.4e-5 reported for a true 2.0e-3, converged=True at tol=1e-4): the true residuals,
        # k products (a run with no room left keeps the bounds)
        read = float(res[idx].max())  # the recurrence's (a bound after a lock)
        res = res.clone()
        res[idx] = kry.ritz_residuals(cols, theta[idx])
        cols = torch.eye(idx.numel(), dtype=torch.float64)  # the basis is the Ritz vectors now
        ok = ok and _converged(theta, res, idx, tol, norm, criterion, zero)
        # the rounding is named as the limit only where the measured residuals are far above
        # what the recurrence read (review s27: a float32 run after a lock missed tol by a
        # hair, 3.02e-6 for 3e-6, and was told to measure a float32 copy of itself)
        if sixteen or float(res[idx].max()) > SIXTEEN_AIM * read:
            measured = _name(op.dtype)
    elif full and not sixteen:
        res = torch.zeros_like(res)
    elif sixteen:
        ok = False  # 16-bit residuals read from the recurrence certify nothing
    if locks:
        info.update(locks=locks, lock_matvecs=kry.num_matvecs - first_lock)
    if not ok:
        info["unconverged"] = _why_unconverged(
            theta,
            res,
            idx,
            tol,
            norm,
            criterion,
            kry.num_matvecs,
            limit,
            locks,
            kry.segments,
            zero,
            mass=mass,
            which=which,
            measured=measured if passed else None,
            unmeasured=_name(op.dtype) if sixteen and measured is None else None,
        )
    vectors = kry.take_vectors(cols) if return_vectors else None
    return EigenResult(
        values=theta[idx].clone(),
        vectors=vectors,
        residuals=res[idx].clone(),
        tol=tol,
        norm=norm,
        converged=ok,
        num_matvecs=kry.num_matvecs,
        num_restarts=restarts,
        seed=used_seed,
        which=which,
        max_basis=cap,
        peak_vectors=kry.peak_vectors,
        info=info,
    )


def _restart_keep(theta: Tensor, mass: Tensor, k: int, keep_n: int, which: str) -> Tensor:
    """The Ritz pairs a thick restart keeps: the ``keep_n`` best (most extreme first), unless
    none of them belongs to the newest segment (``mass``: :meth:`KrylovBasis.segment_mass`)
    while it has Ritz vectors. Then the ``k`` best are kept with the newest segment's
    ``keep_n - k`` best in place of the older ones beyond them.

    The older segments ended in an invariant subspace (or are the locked wanted vectors): their
    Ritz vectors beyond the ``k`` wanted ones are eigenvectors that nothing more comes from, and
    they outnumber the slots when the basis filled as the start's space became invariant. Kept
    instead of the newest segment's, they left it only the next Lanczos vector, a restart from
    the residual whose Ritz values cycled and never converged, so the segment never settled
    (found in review s22: ``diag(3, 1, 1, -1, -1)``, ``k=1``, ``max_basis=3``: 1000 products
    and ``converged=False`` for 6 with ``max_basis=4``; ``D = 12``, eigenvalues ``0..7`` with
    ``0..3`` twice, ``k=2``, ``max_basis=8``: 400 products, unconverged). Its best Ritz vector
    kept, the segment's best value does not decrease from one restart to the next. The ``k``
    best are all older ones then, so whether the segment settles is judged as before. Runs whose
    kept pairs include one of the newest segment (every run with one segment) keep the same
    pairs as before."""
    keep = _wanted(theta, keep_n, which)
    newest = mass > 0.5
    if bool(newest[keep].any()) or not bool(newest.any()):
        return keep
    order = _wanted(theta, theta.numel(), which)  # all, most extreme first
    return torch.cat([order[:k], order[newest[order]][: keep_n - k]])


def _basis_size(
    op,
    k: int,
    max_basis: int | None,
    memory_budget: float | None,
    limit: int,
    return_vectors: bool,
    device: torch.device,
) -> int:
    """The basis size ``m_max`` (:func:`~curvlab.estimators._memory.lanczos_basis_size`),
    checked against the budget and the memory available before anything is allocated."""
    dim, dtype = op.shape[0], storage_dtype(op.dtype)
    cap = lanczos_basis_size(dim, dtype, k, max_basis, memory_budget, limit, return_vectors, device)
    if device != op.device or dtype != op.dtype:  # the product's input and output on op.device
        require(
            f"a Lanczos product's input and output ({dim:,} entries each)",
            2 * vector_bytes(dim, op.dtype),
            op.device,
            f"free memory on {op.device}",
        )
    return cap


def check_lanczos_plan(
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    k: int,
    tol: float,
    max_basis: int | None,
    max_matvecs: int | None,
    memory_budget: float | None,
    return_vectors: bool,
    basis_device: torch.device | str | None,
) -> None:
    """What :func:`lanczos_eigenvalues` would refuse on an operator of ``dim`` entries of
    ``dtype`` on ``device`` that the arguments alone decide (the tolerance the vectors' dtype
    can certify, a basis that cannot fit ``memory_budget``), refused the same way;
    :func:`curvlab.eigenvalues` checks this before it reads the data. The memory available is
    consulted later, by the estimator."""
    _check_tol_floor(tol, dtype)
    _check_sixteen_bit_matvecs(k, max_matvecs, dtype)
    limit = max_matvecs if max_matvecs is not None else max(1000, 40 * k)
    checked_device = check_basis_device(basis_device)
    bdev = device if checked_device is None else checked_device
    lanczos_basis_size(
        dim,
        storage_dtype(dtype),
        k,
        max_basis,
        memory_budget,
        limit,
        return_vectors,
        bdev,
        available=False,
    )


def _check_tol_floor(tol: float, dtype: torch.dtype) -> None:
    """Refuse a tolerance below what Lanczos vectors stored for ``dtype`` can certify."""
    floor = 5 * torch.finfo(storage_dtype(dtype)).eps
    if tol < floor:
        raise ValueError(
            f"tol={tol:g} is below what {_name(storage_dtype(dtype))} Lanczos vectors can "
            f"certify (about {floor:.1e}: the residuals read from the recurrence would claim an "
            "accuracy the products do not have); pass tol >= that, or use a float64 model"
        )


def _check_sixteen_bit_matvecs(k: int, max_matvecs: int | None, dtype: torch.dtype) -> None:
    """Refuse ``max_matvecs < 2k`` for a 16-bit operator, whose ``k`` residuals are measured
    with ``k`` more products after at least ``k`` (review s27: ``k=43, max_matvecs=46`` spent 43
    products and then said "raise max_matvecs")."""
    if sixteen_bit(dtype) and max_matvecs is not None and max_matvecs < 2 * k:
        raise ValueError(
            f"max_matvecs={max_matvecs} is fewer than 2k={2 * k}: a {_name(dtype)} operator's k "
            f"residuals are measured with k more products after at least k; pass "
            f"max_matvecs >= {2 * k}"
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
