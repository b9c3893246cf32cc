"""The Krylov basis of Lanczos: vectors in the parameters' dtype (optionally in host memory),
full reorthogonalisation in row chunks, thick restarts and locks, with the small projected
problem in float64.

:class:`KrylovBasis` is shared by top-k Lanczos (:mod:`curvlab.estimators._lanczos`), stochastic
Lanczos quadrature (:mod:`curvlab.estimators._density`) and the warm-started sharpness of
:mod:`curvlab.analysis._sharpness`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab._finite import raise_product
from curvlab._precision import axpy_dot, plain_norm_ok, scaled_norm
from curvlab.estimators._memory import (
    CHUNK_ELEMENTS,
    PROJECTION_START,
    storage_dtype,
)
from curvlab.estimators._protocol import checked_matmat

__all__ = [
    "KrylovBasis",
    "apply_to_vector",
    "inner",
    "invariance_floor",
    "norm",
    "project_out",
]


def apply_to_vector(op, v: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``A v`` for one vector, as a new tensor on ``device`` in ``dtype`` that the caller owns.

    The vector is handed to the operator in the operator's device and dtype (a 16-bit model gets
    16-bit vectors; its products come back converted to the basis dtype), and the product is
    checked by :func:`~curvlab.estimators._protocol.checked_matmat`: a ``(D, 1)`` tensor in new
    memory, the vector left as it was (found in review s24: a ``matmat`` that multiplied its
    input in place, the basis vector itself, gave a Lanczos top eigenvalue of 57.2 for 3.0,
    marked converged, and SLQ nodes near 1e9). ``x`` is ``v`` itself where the dtypes and
    devices match, so a result not in ``x``'s memory is not in ``v``'s. The product is always
    copied: an operator that writes each product into one buffer of its own
    (``torch.matmul(A, V, out=self.buf)``) hands back that buffer, which the basis would adopt
    and the next product overwrite (a Lanczos top eigenvalue of 21.6 for 3.0 before review s24,
    then a wrong-culprit "modified its input" refusal); one vector per product, next to the
    product itself.
    """
    x = v.to(op.device, op.dtype)
    return checked_matmat(op, x[:, None])[:, 0].to(device, dtype, copy=True)


def project_out(basis: list[Tensor], w: Tensor) -> Tensor:
    """One classical Gram-Schmidt pass: ``h = B^T w``, ``w <- w - B h`` in place; returns ``h``.

    ``B`` is a list of vectors. The inner products ``h`` are accumulated in float64 (see
    :func:`inner`), the update is done in ``w``'s dtype, one vector at a time (no stacked copy of
    the basis), except for a small float64 basis (at most ``CHUNK_ELEMENTS`` entries), which is
    stacked for one matrix-vector product each way.
    """
    if not basis:
        return torch.zeros(0, dtype=torch.float64, device=w.device)
    if w.dtype == torch.float64 and len(basis) * w.numel() <= CHUNK_ELEMENTS:
        B = torch.stack(basis)
        h = B @ w
        w.addmv_(B.T, h, alpha=-1)
        return h
    h = inner(basis, w)
    for b, c in zip(basis, h.to(w.dtype)):
        w.addcmul_(b, c, value=-1)
    return h


REDUCE_ROWS = 2**16
"""Rows of one chunk of :func:`inner`. On 2 CPU cores, ten vectors of GPT-2 small's length took
0.68-0.73 s with one float64 copy and dot per vector and chunk of this size, 1.9-4.4 s with
chunks of 2^14 rows, and 0.7-2.9 s (erratic) with stacked float64 chunks of up to 2^18 rows,
the route before session 16."""


def inner(basis: list[Tensor], w: Tensor) -> Tensor:
    """``B^T w`` as a float64 ``(m,)`` tensor, accumulated in float64 over row chunks.

    Float32 dot products of long vectors lose digits: at ``D = 3e7`` a float32 BLAS dot on a CPU
    has relative errors of ``1e-4`` to ``1e-3``, enough to put a Ritz value above the largest
    eigenvalue. Chunks of :data:`REDUCE_ROWS` rows are copied into float64, where every product
    is exact, and summed there. (Float32 sums within a chunk are twice as fast but were found in
    review to cost Lanczos its guarantee: on vectors concentrated on a few coordinates their
    error reached ``3e-6`` of ``||b|| ||w||``, and a float32 run reported ``converged=True`` with
    true residuals twice the tolerance.)

    On a CPU each chunk is one copy and dot product per vector, with the chunk of ``w`` kept in
    cache; elsewhere the chunk of the basis is stacked for one matrix-vector product (fewer
    kernels).
    """
    return _chunk_dots(basis, w, stacked=w.device.type != "cpu")


def _chunk_dots(basis: list[Tensor], w: Tensor, stacked: bool) -> Tensor:
    """:func:`inner`: chunk sums in float64 (``stacked``: one matrix-vector product per stacked
    chunk, else a dot per vector)."""
    m, dim = len(basis), w.numel()
    rows = max(1, min(dim, REDUCE_ROWS))
    starts = range(0, dim, rows)
    f64 = torch.float64
    parts = torch.empty(len(starts), m, dtype=f64, device=w.device)
    convert = w.dtype != f64 or any(b.dtype != f64 for b in basis)
    wbuf = torch.empty(rows, dtype=f64, device=w.device) if convert else None
    if stacked:
        buf = torch.empty(m * rows, dtype=f64, device=w.device)
    else:
        bbuf = torch.empty(rows, dtype=f64, device=w.device) if convert else None
    for c, r0 in enumerate(starts):
        n = min(rows, dim - r0)
        wc = w[r0 : r0 + n]
        if wbuf is not None:
            wc = wbuf[:n].copy_(wc)
        if stacked:
            block = buf[: m * n].view(m, n)
            torch.stack([b[r0 : r0 + n] for b in basis], out=block)
            torch.mv(block, wc, out=parts[c])
            continue
        row = parts[c]
        for i, b in enumerate(basis):
            bc = b[r0 : r0 + n]
            if bbuf is not None:
                bc = bbuf[:n].copy_(bc)
            torch.dot(bc, wc, out=row[i])
    return parts.sum(0)


def norm(w: Tensor) -> Tensor:
    """``||w||`` as a float64 scalar tensor, accumulated in float64 (see :func:`inner`;
    :func:`curvlab._precision.axpy_dot` for 32- and 16-bit vectors), exact at every scale: a
    float64 norm whose plain squares underflow or overflow
    (:func:`curvlab._precision.plain_norm_ok`: entries below ``1e-154`` or above ``1e154``) is
    redone on the rescaled entries (:func:`curvlab._precision.scaled_norm`, two more sweeps on
    that rare path only; one host synchronisation for a float64 vector). Until review s16 a
    float64 operator with ``||A|| < 1e-155`` got norms from subnormal squares (``1.7e-4`` off
    at ``1e-160``, 0 at ``1e-170``: a false invariant subspace and a wrong value with
    ``converged=True``), and one above ``1e154`` a false "not finite" error."""
    plain = _plain_norm(w)
    if w.dtype != torch.float64 or plain_norm_ok(float(plain), w.numel()):
        return plain  # (squares of 32- and 16-bit entries are exact in float64)
    return scaled_norm([w])


def _plain_norm(w: Tensor) -> Tensor:
    """``||w||`` from plain float64 squares (one sweep, no host synchronisation)."""
    if w.dtype == torch.float64:
        return torch.linalg.vector_norm(w)
    return axpy_dot([w], 0.0, None, None).sqrt()


def invariance_floor(dtype: torch.dtype) -> float:
    """``||f||`` below this fraction of the projection's largest entry is rounding, not a new
    direction (an invariant subspace): ``10 eps`` of the products' dtype, ``eps`` for 16-bit
    products, whose rounding is already about ``eps`` in norm (``10 eps`` of bfloat16, 7.8%, took
    a bulk 3% of the top eigenvalue for rounding: SLQ stopped after 3 steps with 2 bulk nodes,
    where float32 used 31)."""
    eps = torch.finfo(dtype).eps
    return eps if dtype.itemsize <= 2 else 10 * eps


class KrylovBasis:
    """An orthonormal Krylov basis with its projected matrix (shared by Lanczos and SLQ).

    The basis is a list of vectors, one allocated per step (nothing is reserved ahead), so it
    holds ``m + 1`` vectors after ``m`` steps (the next Lanczos vector included) and at most
    ``max_basis + 1``; :meth:`restart` rotates it in place to the kept Ritz vectors.

    Args:
        op: the operator (see :mod:`curvlab.estimators._protocol`).
        start: the starting vector (any nonzero vector; it is normalised, not modified).
        max_basis: the capacity ``m_max``: Lanczos vectors (columns of the projection) before a
            restart is needed.
        reorth_passes: Gram-Schmidt passes against the whole basis per step, after the
            three-term part (the product's components along ``v_{j-1}`` and ``v_j``, whose
            removal leaves only rounding along the older vectors): 2 = full
            reorthogonalisation to working precision, the second pass only where the first
            lost more than ``1 - 1/sqrt(2)`` of the vector's norm (the DGKS test; after the
            three-term part that happens only near an invariant subspace or right after a
            restart); 1 is cheaper; 0 = the plain three-term recurrence, whose loss of
            orthogonality adds copies of converged and spurious Ritz values but keeps the
            quadrature's low moments, which SLQ tolerates: Ubaru, Chen & Saad 2017; SLQ runs
            that case without a stored basis, see :mod:`curvlab.estimators._density`).
        basis_device: where the vectors are kept (default: the operator's device); products
            move one vector to the operator's device and back.
        generator: where the fresh random directions (after an invariant subspace,
            :meth:`renew`, :meth:`lock`) are drawn from: the caller's generator, so that each
            seed gets its own directions; default (``None``): a generator seeded with the
            number of vectors applied (deterministic whatever the caller's seed).

    Attributes:
        V: the basis vectors ``v_1 .. v_{m+1}`` (list of ``(D,)`` tensors).
        H: the projection (float64, CPU; upper triangle filled): ``n x n`` with ``n >= m``,
            grown as the basis grows (:meth:`_room`), never beyond ``max_basis``. It was
            ``max_basis x max_basis`` from the start until review s23: ``max_basis = D`` on
            ``D = 303,601`` asked for 737 GB of host memory for a run of 20 products.
        m: Lanczos vectors with ``A`` applied (columns of ``H`` computed).
        beta: ``||f||``, the norm of the newest residual.
        dtype, device: those of the stored vectors.
        num_matvecs: products applied.
        peak_vectors: the most parameter-vectors held at once (basis and newest product).
        weight: the newest segment's share of each basis vector (float64, one per vector of
            ``V``): a segment is the Krylov space grown from the start or from the fresh
            random direction after an invariant subspace (see :meth:`new_segment`); 1 for the
            vectors of the newest segment, 0 for older ones, and the weighted sums
            ``sum_i S[i, j]^2 w_i`` after a restart (see :meth:`segment_mass`).
        segments: how many segments were started (1 + the invariant subspaces found + the
            locks, see :meth:`lock`).
        leak: ``(n, q)`` float64 (``n`` the rows of ``H``): the couplings ``u_t^T A v_i`` of
            the basis vectors to the ``q`` vectors ``u_t`` that :meth:`renew` and :meth:`lock`
            discarded (zero rows for vectors applied since); :meth:`ritz` adds them to the
            residual norms.
    """

    def __init__(
        self,
        op,
        start: Tensor,
        max_basis: int,
        reorth_passes: int = 2,
        basis_device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.op = op
        self._gen = generator
        self.dim = op.shape[0]
        self.capacity = max_basis
        self.passes = reorth_passes
        self.dtype = storage_dtype(op.dtype)
        self.device = op.device if basis_device is None else torch.device(basis_device)
        n = min(max_basis, self.dim, PROJECTION_START)  # grown on demand (_room)
        self.H = torch.zeros(n, n, dtype=torch.float64)
        v = start.to(self.device, self.dtype)
        self.V: list[Tensor] = [v / norm(v).to(v.dtype)]
        self.m = 0  # columns of H computed (vectors with A applied)
        self.beta = 0.0
        self.num_matvecs = 0
        self.peak_vectors = 1
        self.weight: list[float] = [1.0]
        self.segments = 1
        self.scale = 0.0  # the largest |entry| of the projection seen: a lower bound of ||A||
        self._new_segment = False  # V[m] starts a segment (after an invariant subspace)
        self._floor = invariance_floor(op.dtype)  # relative size of a product's rounding
        self.leak = torch.zeros(n, 0, dtype=torch.float64)

    @property
    def segment_unstarted(self) -> bool:
        """Whether the next vector starts a segment that has no applied vector yet (so no Ritz
        vector; :attr:`weight` still gives the older vectors theirs)."""
        return self._new_segment

    @property
    def num_vectors(self) -> int:
        """Parameter-vectors the basis holds now."""
        return len(self.V)

    def _note(self, held: int) -> None:
        self.peak_vectors = max(self.peak_vectors, held)

    def _room(self, j: int) -> None:
        """Make :attr:`H` (and the rows of :attr:`leak`) hold column ``j``: doubled, at least to
        ``j + 1``, at most to the capacity, so that the projection takes the host memory of the
        basis reached (:func:`curvlab.estimators._memory.projection_bytes`), not of the
        capacity."""
        n = self.H.shape[0]
        if j < n:
            return
        size = min(self.capacity, self.dim, max(j + 1, 2 * n))
        H = torch.zeros(size, size, dtype=torch.float64)
        H[:n, :n] = self.H
        leak = torch.zeros(size, self.leak.shape[1], dtype=torch.float64)
        leak[:n] = self.leak
        self.H, self.leak = H, leak

    def step(self) -> float:
        """Apply ``A`` to the newest basis vector, orthogonalise, and return ``||f||``."""
        j = self.m
        if j >= self.capacity or j >= self.dim:
            raise RuntimeError(
                f"the Krylov basis is full ({j} vectors of capacity {self.capacity}, size "
                f"{self.dim}): restart it (or stop) before another step"
            )
        if self._new_segment:  # the fresh direction is applied: its segment starts now
            self.weight = [0.0] * j + [1.0]
            self._new_segment = False
        self._room(j)
        w = apply_to_vector(self.op, self.V[j], self.device, self.dtype)
        self.num_matvecs += 1
        self._note(len(self.V) + 1)
        start = 0 if self.passes > 0 else max(0, j - 1)  # 0 passes: three-term recurrence only
        basis = self.V[start : j + 1]
        local = self.V[max(start, j - 1) : j + 1]
        # the three-term part first (v_{j-1}, v_j: the large components of A v_j), then the
        # passes against the whole basis remove what rounding left along the older vectors
        h = torch.zeros(len(basis), dtype=torch.float64, device=w.device)
        h[len(basis) - len(local) :] = project_out(local, w)
        if self.passes > 0:
            norm_in = _plain_norm(w)  # only compared with the next one (DGKS), no sync
            h += project_out(basis, w)
            if self.passes > 1 and not self._orthogonal_enough(norm_in, w):
                for _ in range(self.passes - 1):
                    h += project_out(basis, w)
        beta_t = _plain_norm(w)
        col = torch.cat([h, beta_t[None]]).to("cpu", torch.float64)  # a host sync (DGKS: two)
        if not plain_norm_ok(float(col[-1]), self.dim) and bool(torch.isfinite(col[:-1]).all()):
            beta_t = scaled_norm([w])  # squares out of range (see norm): rescaled
            col[-1] = beta_t.to("cpu")
        if not bool(torch.isfinite(col).all()):  # on the host already: no further sync
            raise_product("the curvature product at Lanczos step", self.num_matvecs, op=self.op)
        self.H[start : j + 1, j] = col[:-1]
        self.beta = float(col[-1])
        self.scale = max(self.scale, float(col.abs().max()))
        self.m = j + 1
        if self.m == self.dim:  # the whole space: no next vector exists
            return self.beta
        scale = float(col.abs().max())
        if self.beta > self._floor * max(scale, torch.finfo(torch.float64).tiny):
            self.V.append(
                w.div_(beta_t.to(w.dtype))
            )  # the product becomes the next vector: no copy
        else:  # invariant subspace found: continue with a fresh orthogonal direction
            del w
            self.V.append(self._fresh_direction())
            self.new_segment()
        self.weight.append(1.0)
        return self.beta

    def new_segment(self) -> None:
        """Mark the next vector ``v_{m+1}`` as the start of a new segment (a fresh random
        direction after an invariant subspace, see :meth:`step`, :meth:`renew` and
        :meth:`lock`): when it is applied, the older vectors' weights become 0. Nothing else
        changes."""
        if not self._new_segment:
            self._new_segment = True
            self.segments += 1

    def renew(self) -> None:
        """Go on from a fresh random direction instead of the next Lanczos vector: a new segment.

        For a Krylov space that became invariant within a tolerance (``||f|| = beta`` small but
        above rounding). The next Lanczos vector ``u = f / ||f||`` is not a fresh start: it is
        built from the exhausted space and often lies close to an eigenvector of an unwanted
        value, so a segment grown from it can settle at once while copies of a repeated wanted
        eigenvalue are still missing (found in review: ``nn.Linear`` under MSE, four copies of
        the top value, three listed, ``converged=True``). Only a random direction orthogonal to
        the whole basis (the locked vectors included) reaches every direction the basis lacks.
        ``u`` is discarded: its coupling ``beta`` to ``v_m`` goes to :attr:`leak` (the residual
        norms of :meth:`ritz` become bounds, as after a :meth:`lock`). No product is applied.
        Nothing happens when the next vector already starts a segment (an exact invariant
        subspace, :meth:`step`) or there is none (the whole space)."""
        if self._new_segment or self.m >= self.dim or len(self.V) <= self.m:
            return
        self.V.pop()  # u: freed before the fresh direction is drawn
        col = torch.zeros(self.leak.shape[0], 1, dtype=torch.float64)
        col[self.m - 1, 0] = self.beta
        self.leak = torch.cat([self.leak, col], 1)
        self.V.append(self._fresh_direction())
        self.beta = 0.0
        self.new_segment()

    @staticmethod
    def _orthogonal_enough(norm_in: Tensor, w: Tensor) -> bool:
        """The DGKS test (Daniel, Gragg, Kaufman & Stewart 1976; "twice is enough"): one
        Gram-Schmidt pass that kept more than ``1/sqrt(2)`` of the vector's norm left it
        orthogonal to working precision, so a second pass would change nothing. Both norms
        come from plain squares (``norm_in`` from :func:`_plain_norm`): where those underflow
        to 0 or overflow, the test fails and the second pass runs, which is never wrong."""
        return bool(_plain_norm(w) > 0.7071 * norm_in)

    def _fresh_direction(
        self, basis: list[Tensor] | None = None, seed: int | None = None
    ) -> Tensor:
        """A random unit vector orthogonal to ``basis`` (default: the vectors with ``A`` applied),
        drawn from the basis' generator, or without one deterministically from ``seed``
        (default ``m``)."""
        gen = self._gen
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(self.m if seed is None else int(seed))
        basis = self.V[: self.m] if basis is None else basis
        x = torch.empty(0)
        for _ in range(3):
            x = torch.randn(self.dim, generator=gen, device=gen.device, dtype=self.dtype)
            x = x.to(self.device)
            for _ in range(2):
                project_out(basis, x)
            nrm = norm(x)
            if float(nrm) > 1e-8:
                return x.div_(nrm.to(x.dtype))
        return torch.zeros_like(x)

    def projected(self) -> Tensor:
        """The symmetric ``m x m`` projection ``V^T A V`` (float64, CPU)."""
        upper = torch.triu(self.H[: self.m, : self.m])
        return upper + torch.triu(upper, 1).T

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), eigenvectors of the projection and residual norms.

        The residual of ``y = V_m s`` is ``beta |s_m|``; after a :meth:`lock` it is bounded by
        that plus ``sum_t |leak_t^T s|`` (the couplings to the discarded vectors).
        """
        theta, S = torch.linalg.eigh(self.projected())
        res = self.beta * S[-1].abs()
        if self.leak.shape[1]:
            res = res + (S.T @ self.leak[: self.m]).abs().sum(1)
        return theta, S, res

    def lock_bound(self, S: Tensor) -> float:
        """A bound of the residual norm of every unit vector in the span of the Ritz vectors
        ``V_m S`` (``(m, p)``, orthonormal columns): ``beta ||S[-1]|| + sum_t ||S^T leak_t||``."""
        bound = self.beta * float(torch.linalg.vector_norm(S[-1]))
        if self.leak.shape[1]:
            bound += float(torch.linalg.vector_norm(S.T @ self.leak[: self.m], dim=0).sum())
        return bound

    def segment_mass(self, S: Tensor) -> Tensor:
        """How much of each Ritz vector ``V_m S[:, r]`` lies in the newest segment:
        ``sum_i S[i, r]^2 w_i`` (float64, ``(r,)``; near 1 for its Ritz vectors, near 0 for
        those of older segments, which the projection keeps decoupled from it)."""
        w = torch.tensor(self.weight[: self.m], dtype=torch.float64)
        return (S.square() * w[:, None]).sum(0)

    def vectors(self, S: Tensor) -> Tensor:
        """Ritz vectors ``V_m S`` as a new ``(D, k)`` tensor (the basis is left as it is)."""
        out = torch.empty(self.dim, S.shape[1], device=self.device, dtype=self.dtype)
        S = S.to(self.device, self.dtype)
        for r0, r1 in self._row_chunks(self.m + S.shape[1]):
            out[r0:r1] = torch.stack([v[r0:r1] for v in self.V[: self.m]]).T @ S
        return out

    def take_vectors(self, S: Tensor) -> Tensor:
        """Ritz vectors ``V_m S`` as a ``(D, k)`` tensor, consuming the basis (in place: the
        peak is ``max(m + 1, 2k)`` vectors); the basis is empty afterwards."""
        k = S.shape[1]
        self._rotate(S)
        kept = self.V[:k]
        self.V = []
        self.weight = []
        self._note(2 * k)
        out = torch.empty(self.dim, k, device=self.device, dtype=self.dtype)
        for j in range(k):
            out[:, j].copy_(kept.pop(0))  # each basis vector is freed once copied
        return out

    def ritz_residuals(self, S: Tensor, theta: Tensor) -> Tensor:
        """The true residual norms ``||A y_j - theta_j y_j||`` of the Ritz vectors ``V_m S``,
        one product each, consuming the basis: it becomes those vectors (rotated in place; the
        peak is ``max(m + 1, k + 2)`` vectors), for :meth:`take_vectors` with the identity.

        After a :meth:`lock` the residuals read from the recurrence are bounds (the couplings to
        discarded vectors are added, :meth:`ritz`); these are the residuals themselves.
        """
        k = S.shape[1]
        self._rotate(S)
        self.V = self.V[:k]
        self.weight = self.weight[:k]
        self.m = k
        out = torch.empty(k, dtype=torch.float64)
        for j, v in enumerate(self.V):
            w = apply_to_vector(self.op, v, self.device, self.dtype)
            self.num_matvecs += 1
            self._note(k + 1)
            out[j] = self._residual_norm(w, v, float(theta[j]))
            del w
            if not bool(torch.isfinite(out[j])):
                raise_product("the curvature product of Ritz vector", j, op=self.op)
        return out

    def _residual_norm(self, w: Tensor, v: Tensor, theta: float) -> float:
        """``||w - theta v||`` in float64 over row chunks (no ``(D,)`` temporary), exact at every
        scale: where the plain squares underflow or overflow
        (:func:`curvlab._precision.plain_norm_ok`), the chunks are summed again divided by the
        largest ``|entry|`` (two more sweeps, on that rare path only)."""
        f64 = torch.float64
        chunks = self._row_chunks(2)

        def diff(r0: int, r1: int) -> Tensor:
            return w[r0:r1].to(f64) - theta * v[r0:r1].to(f64)

        acc = torch.zeros((), dtype=f64, device=w.device)
        for r0, r1 in chunks:
            acc += diff(r0, r1).square().sum()
        value = float(acc.sqrt())
        if plain_norm_ok(value, self.dim) or not math.isfinite(float(w.abs().max())):
            return value
        top = max(float(diff(r0, r1).abs().max()) for r0, r1 in chunks)
        if top == 0.0:
            return 0.0
        acc.zero_()
        for r0, r1 in chunks:
            acc += diff(r0, r1).div_(top).square().sum()
        return float(acc.sqrt()) * top

    def restart(self, keep: Tensor, theta: Tensor, S: Tensor) -> None:
        """Thick restart keeping the Ritz pairs with indices ``keep`` (Krylov-Schur form).

        ``V_p <- V_m S[:, keep]`` in place (row chunks), the next vector ``v_{m+1}`` is kept, and
        the projection becomes ``diag(theta[keep])``; the next step fills in the couplings.
        """
        p = int(keep.numel())
        nxt = self.V[self.m]
        self._rotate(S[:, keep])
        self.V = [*self.V[:p], nxt]
        self.weight = [*self.segment_mass(S[:, keep]).tolist(), self.weight[self.m]]
        self._rotate_leak(S[:, keep])
        self.H.zero_()
        self.H[:p, :p] = torch.diag(theta[keep])
        self.m = p

    def lock(self, keep: Tensor, theta: Tensor, S: Tensor) -> None:
        """Keep the Ritz pairs ``keep`` and go on from a fresh random direction: a new segment.

        A restarted basis never becomes invariant when the Krylov space of the start is larger
        than the basis, so it cannot see a repeated eigenvalue (the start reaches one direction
        of each eigenspace) the way an unrestarted one does. Here, once the wanted values have
        converged, the kept Ritz vectors ``Y`` are "locked": the next Lanczos vector ``u`` (the
        only direction their products leave the basis along, with couplings
        ``beta S[-1, keep]``) is discarded and replaced by a random unit vector orthogonal to
        ``Y`` only, whose Krylov space is a new segment (:func:`_newest_segment` judges it as
        after an invariant subspace). Not orthogonal to ``u`` as well: ``u`` may carry a wanted
        eigenvector that the locked vectors lack, which a direction orthogonal to it could
        never reach (found in review: ``D = 27``, ``k = 22`` smallest, an eigenvalue missed
        with ``converged=True``). ``A Y = Y Theta + u b^T`` still holds and the products of the
        new vectors give their couplings to ``Y`` (``b u^T z``, full reorthogonalisation), so
        the projection stays ``V^T A V``; the couplings ``b`` go to :attr:`leak` and into the
        residual norms of :meth:`ritz` (a bound: ``u`` is no longer in the basis). The peak is
        ``p + 2`` vectors.
        """
        p = int(keep.numel())
        nxt = self.V[self.m]
        coupling = self.beta * S[-1, keep]
        self._rotate(S[:, keep])
        self.V = [*self.V[:p], nxt]
        self._note(p + 2)
        fresh = self._fresh_direction(self.V[:p], seed=self.num_matvecs + self.segments)
        self.V = [*self.V[:p], fresh]
        del nxt
        self._rotate_leak(S[:, keep])
        fresh_col = torch.zeros(self.leak.shape[0], 1, dtype=torch.float64)
        self.leak = torch.cat([self.leak, fresh_col], 1)
        self.leak[:p, -1] = coupling
        self.H.zero_()
        self.H[:p, :p] = torch.diag(theta[keep])
        self.m = p
        self.weight = [0.0] * (p + 1)
        self._new_segment = False
        self.new_segment()  # the fresh vector starts a segment when it is applied

    def _rotate_leak(self, S: Tensor) -> None:
        """The couplings to discarded vectors of the rotated basis ``V_m S``."""
        if self.leak.shape[1]:
            rotated = S.T @ self.leak[: S.shape[0]]
            self.leak.zero_()
            self.leak[: S.shape[1]] = rotated

    def _rotate(self, S: Tensor) -> None:
        """``V[:p] <- V[:m] S`` in place for an ``(m, p)`` matrix ``S`` (``p <= m``), in row chunks
        whose temporaries hold at most ``CHUNK_ELEMENTS`` entries."""
        m, p = S.shape
        St = S.T.to(self.device, self.dtype).contiguous()
        for r0, r1 in self._row_chunks(m + p):
            block = torch.stack([v[r0:r1] for v in self.V[:m]])  # (m, rows): a copy
            new = St @ block  # (p, rows): each new vector's rows contiguous (2.7x faster on
            for j in range(p):  # GPT-2 small than strided columns of (rows, p))
                self.V[j][r0:r1].copy_(new[j])

    def _row_chunks(self, width: int) -> list[tuple[int, int]]:
        rows = max(1, min(self.dim, CHUNK_ELEMENTS // max(width, 1)))
        return [(r, min(self.dim, r + rows)) for r in range(0, self.dim, rows)]
