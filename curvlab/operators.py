"""Matrix-free curvature operators: Hessian, GGN, Monte-Carlo Fisher and empirical Fisher.

A :class:`CurvatureOperator` represents one symmetric ``D x D`` matrix of the objective
``L = w * sum_n NLL_n`` (see :mod:`curvlab.losses`) over all the data given, acting on flat vectors of
the selected trainable parameters concatenated in ``model.named_parameters()`` order:

* ``"hessian"``: ``H = d^2 L / d theta^2``, by double backward (Pearlmutter's trick);
* ``"ggn"``: ``G = w * sum_n J_n^T Lambda_n J_n`` with ``J_n`` the Jacobian of example ``n``'s output
  and ``Lambda_n`` the Hessian of ``NLL_n`` w.r.t. that output (the true Fisher for these losses);
* ``"fisher"``: the Monte-Carlo Fisher ``F = w * sum_n s_n s_n^T`` with ``s_n = grad NLL_n(y_hat_n)``
  and labels ``y_hat_n`` drawn *once* per operator from the model (``E[F] = G``);
* ``"empirical_fisher"``: ``(1/N) sum_n g_n g_n^T`` with ``g_n = grad NLL_n(y_n) / c`` under
  ``"mean"`` and ``sum_n s_n s_n^T`` under ``"sum"`` (``c`` loss terms per example);
* ``"residual"``: ``H - G = w * sum_n sum_k r_nk d^2 f_nk / d theta^2`` with ``r_n = dNLL_n / df_n``,
  the part of the Hessian the GGN drops (zero inside each layer's block for piecewise-linear nets).

Every product is exactly weighted over batches: raw NLL-sum products are accumulated batch by batch
and scaled once by ``w``. Under ``torch.distributed`` the batches are this rank's shard, and each
product's raw sum is added over the ranks by one all-reduce before the scaling, so every rank holds
the operator of all the data (docs/distributed.md); every rank must then apply the same products.
With one batch (or ``keep_graph=True``) the autograd graph of each batch is built once and reused
by every product, so a Hessian-vector product costs one extra backward pass.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> H = curvature_operator(model, nn.CrossEntropyLoss(), (X, y), matrix="hessian")
    >>> H.shape
    (26, 26)
    >>> (H @ torch.ones(26)).shape
    torch.Size([26])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlab.backends.validation import check_batchnorm
from curvlab.data import Batch, call_model, iter_batches, num_examples, to_device
from curvlab.distributed import active, collective, rank_generator, unwrap_model
from curvlab.finite import check_parameters_finite
from curvlab.losses import LossSpec, loss_spec
from curvlab.notrace import leave_no_trace
from curvlab.rng import make_generator
from curvlab.scan import scan_model
from curvlab.selection import Params, select_parameters

__all__ = ["MATRICES", "CurvatureOperator", "curvature_operator", "select_parameters"]

MATRICES = ("hessian", "ggn", "fisher", "empirical_fisher", "residual")


def _batched_default(model: nn.Module, device: torch.device) -> bool:
    """Whether products of several vectors run batched (``is_grads_batched``) by default.

    Measured on 2 CPU cores: a batched Hessian product of 16 vectors costs 0.8x the loop on an MLP
    (W1) but 2.2x on a small CNN (W2), whose convolution backward passes vectorise poorly; so on a
    CPU only models without convolutions batch. Other devices always do.
    """
    if device.type != "cpu":
        return True
    return not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


class CurvatureOperator:
    """A symmetric curvature matrix of the loss, applied without ever forming it.

    Build it with :func:`curvature_operator`. The operator is a fixed matrix: the Monte-Carlo
    Fisher's labels are drawn once at construction. It refers to the parameters as they are when
    built; after they change (an optimizer step), build a new operator.

    Attributes:
        matrix: which matrix (one of :data:`MATRICES`).
        names: the parameter names it acts on, in flat order.
        shapes: their shapes.
        shape: ``(D, D)``.
        dtype, device: those of the model; products return tensors of this dtype/device.
        batched: whether products with several vectors run as one batched backward pass
            (default: on CUDA, and on a CPU for models without convolutions, where that is
            faster than a loop of single products).
        num_examples: ``N``, the number of examples over all batches.
        weight: the scale ``w`` applied to raw NLL-sum products (``w / c`` for the empirical
            Fisher under ``"mean"``).
        num_matvecs: products applied so far (a matmat with ``k`` columns counts ``k``).
        seed: the seed of the Monte-Carlo labels (``None`` when a generator was passed).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Any,
        matrix: str = "hessian",
        *,
        params: Params = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        keep_graph: bool | None = None,
        batched: bool | None = None,
    ) -> None:
        if matrix not in MATRICES:
            raise ValueError(f"matrix must be one of {MATRICES}, got {matrix!r}")
        model = unwrap_model(model)
        self._comm = active()  # the group every product is reduced over (None: local)
        self.spec: LossSpec = loss_spec(loss_fn)
        scan = scan_model(model)
        self._scan = scan  # one walk of the model for every product's leave_no_trace
        check_batchnorm(scan)
        check_parameters_finite(scan.trainable)
        self.model = model
        self.matrix = matrix
        selected = select_parameters(model, params)
        self.names: list[str] = list(selected)
        self._params: list[nn.Parameter] = list(selected.values())
        self.shapes: list[torch.Size] = [p.shape for p in self._params]
        self._sizes: list[int] = [p.numel() for p in self._params]
        dim = sum(self._sizes)
        self.shape: tuple[int, int] = (dim, dim)
        self.device: torch.device = scan.device
        self.dtype: torch.dtype = scan.dtype
        self._batches: list[Batch] = list(iter_batches(data))
        self.num_examples = sum(num_examples(b[0]) for b in self._batches)
        self.keep_graph = len(self._batches) == 1 if keep_graph is None else bool(keep_graph)
        self.seed = None if generator is not None else (0 if seed is None else seed)
        self.num_matvecs = 0
        self.batched: bool = _batched_default(model, self.device) if batched is None else batched
        self._batched_ok = self.batched
        self._versions = [p._version for p in self._params]
        self._graphs: list[dict[str, Any] | None] = [None] * len(self._batches)
        self._targets: list[Tensor] = []
        gen = None
        if matrix == "fisher":
            gen = rank_generator(make_generator(seed=seed, generator=generator, device=self.device))
        count: Tensor | int = 0
        terms = 1
        with leave_no_trace(model, scan=scan):
            for i, batch in enumerate(self._batches):
                inputs, targets = to_device(batch, self.device)
                if i > 0 and not self.keep_graph and matrix != "fisher":
                    self._targets.append(targets)
                    count = count + self._count(targets, inputs, terms)
                    continue
                with torch.set_grad_enabled(self.keep_graph):
                    output = self._forward(inputs, targets)
                if i == 0:
                    self.spec.check_shapes(output, targets)
                    terms = self.spec.terms_per_example(output)
                count = count + self._count(targets, inputs, terms)
                if matrix == "fisher":
                    targets = self.spec.sample_targets(output, gen, targets)
                self._targets.append(targets)
                if self.keep_graph:
                    self._graphs[i] = self._build(inputs, targets, output)
        if self._comm is not None:  # the counts of all shards, in one all-reduce
            _, (self.num_examples, count) = self._comm.reduce_sums(
                {}, [self.num_examples, count], device=self.device
            )
        total = float(count)
        if total == 0 and self.spec.reduction == "mean":
            raise ValueError(
                f"every target of the data is ignore_index={self.spec.ignore_index}: the mean "
                "loss is undefined (0/0); pass data with at least one counted label"
            )
        c = total / self.num_examples
        w = 1.0 if self.spec.reduction == "sum" else 1.0 / total
        if matrix == "empirical_fisher" and self.spec.reduction == "mean":
            w = w / c
        self.weight: float = w
        self.terms_per_example: float = c

    @property
    def sampled_targets(self) -> list[Tensor] | None:
        """The Monte-Carlo Fisher's labels, one tensor per batch (``None`` for other matrices)."""
        return list(self._targets) if self.matrix == "fisher" else None

    # ------------------------------------------------------------------ layout helpers
    def flatten(self, tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (dict keyed by :attr:`names`, or a list) flat."""
        if isinstance(tensors, dict):
            missing = [n for n in self.names if n not in tensors]
            extra = [n for n in tensors if n not in self.names]
            if missing or extra:
                raise ValueError(
                    f"vector dict keys must be the operator's parameters; missing {missing}, "
                    f"unexpected {extra}"
                )
            tensors = [tensors[n] for n in self.names]
        parts = []
        for t, shape, name in zip(tensors, self.shapes, self.names):
            if t.shape != shape:
                raise ValueError(
                    f"entry {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
                )
            parts.append(t.reshape(-1).to(self.device, self.dtype))
        return torch.cat(parts)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat vector (or the rows of a ``(D, k)`` matrix) into a per-parameter dict."""
        trailing = tuple(vector.shape[1:])
        parts = vector.split(self._sizes)
        return {n: v.reshape((*s, *trailing)) for n, v, s in zip(self.names, parts, self.shapes)}

    def block_slices(self, by: str = "module") -> dict[str, list[slice]]:
        """Index ranges of each layer (``by="module"``) or parameter (``by="parameter"``)."""
        out: dict[str, list[slice]] = {}
        start = 0
        for name, size in zip(self.names, self._sizes):
            key = name.rpartition(".")[0] if by == "module" else name
            out.setdefault(key, []).append(slice(start, start + size))
            start += size
        return out

    # ------------------------------------------------------------------ products
    def matvec(self, v: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """``A v`` for a flat vector of length ``D`` (or a per-parameter dict, returning a dict)."""
        as_dict = isinstance(v, dict)
        flat = self.flatten(v) if as_dict else self._as_matrix(v, want_vector=True)
        out = self.matmat(flat[:, None])[:, 0]
        return self.unflatten(out) if as_dict else out

    def __matmul__(self, other: Tensor) -> Tensor:
        if isinstance(other, Tensor) and other.ndim == 2:
            return self.matmat(other)
        return self.matvec(other)

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for a ``(D, k)`` matrix.

        All ``k`` products share each batch's graph. With :attr:`batched` they run as one batched
        backward pass (``is_grads_batched``, where autograd supports it), else as a loop over
        columns.
        """
        V = self._as_matrix(V, want_vector=False)
        self._check_versions()
        k = V.shape[1]
        rows = V.T
        per_param = [t.reshape(k, *s) for t, s in zip(rows.split(self._sizes, dim=1), self.shapes)]
        acc: Tensor | None = None
        with leave_no_trace(self.model, scan=self._scan):
            for i, batch in enumerate(self._batches):
                graph = self._graphs[i]
                if graph is None:
                    inputs, _ = to_device(batch, self.device)
                    graph = self._build(inputs, self._targets[i], None)
                res = self._apply_many(graph, per_param, k)
                acc = res if acc is None else acc.add_(res)
                del graph
        self.num_matvecs += k
        assert acc is not None
        if self._comm is not None:  # the products of all shards: one all-reduce per product
            self._comm.all_reduce_(acc)
        return acc.T.mul_(self.weight)

    def _apply_many(self, graph: dict[str, Any], per_param: list[Tensor], k: int) -> Tensor:
        """Raw products of one batch with ``k`` vectors, as a ``(k, D)`` tensor."""
        if k > 1 and self._batched_ok:
            try:
                out = self._apply(graph, per_param, batched=True)
                return torch.cat([t.reshape(k, -1) for t in out], dim=1)
            except RuntimeError:  # an op without a batching rule: fall back to a loop
                self._batched_ok = False
        cols = []
        for j in range(k):
            out = self._apply(graph, [t[j] for t in per_param], batched=False)
            cols.append(torch.cat([t.reshape(-1) for t in out]))
        return torch.stack(cols)

    def to_scipy(self) -> Any:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` on NumPy arrays."""
        from scipy.sparse.linalg import LinearOperator

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def mv(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x, dtype=np_dtype).reshape(-1))
            return self.matvec(t.to(self.device)).detach().cpu().numpy()

        def mm(X: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(X, dtype=np_dtype))
            return self.matmat(t.to(self.device)).detach().cpu().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np_dtype)

    def to_dense(self) -> Tensor:
        """The dense ``D x D`` matrix (``D`` products; for small models and tests only)."""
        eye = torch.eye(self.shape[0], device=self.device, dtype=self.dtype)
        cols = [self.matmat(eye[:, i : i + 256]) for i in range(0, self.shape[0], 256)]
        return torch.cat(cols, dim=1)

    # ------------------------------------------------------------------ internals
    def _forward(self, inputs: Any, targets: Tensor) -> Tensor:
        return self.spec.prepare(call_model(self.model, inputs), targets)

    def _count(self, targets: Tensor, inputs: Any, terms: int) -> Tensor | int:
        """Loss terms of one batch: counted labels for cross-entropy, else examples x terms."""
        if self.spec.kind == "cross_entropy" and not targets.is_floating_point():
            return (targets != self.spec.ignore_index).sum()
        return num_examples(inputs) * terms

    def _as_matrix(self, V: Tensor, want_vector: bool) -> Tensor:
        if not isinstance(V, Tensor):
            raise TypeError(f"expected a torch Tensor, got {type(V).__name__}")
        ndim = 1 if want_vector else 2
        if V.ndim != ndim or V.shape[0] != self.shape[0]:
            want = f"({self.shape[0]},)" if want_vector else f"({self.shape[0]}, k)"
            raise ValueError(f"expected a tensor of shape {want}, got {tuple(V.shape)}")
        return V.to(self.device, self.dtype)

    def _check_versions(self) -> None:
        if any(p._version != v for p, v in zip(self._params, self._versions)):
            raise RuntimeError(
                "the model's parameters changed since this operator was built; build a new "
                "operator with curvature_operator(...) for the new parameters"
            )

    def _grads(self, out: Tensor, inputs: Sequence[Tensor], grad_out: Any, **kw: Any) -> tuple:
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True, **kw)
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))

    def _build(self, inputs: Tensor, targets: Tensor, output: Tensor | None) -> dict[str, Any]:
        """Forward (unless given) and the reusable part of one batch's graph."""
        with torch.enable_grad():
            if output is None:
                output = self._forward(inputs, targets)
            if self.matrix in ("hessian", "residual"):
                loss = self.spec.nll_sum(output, targets)
                if self.matrix == "residual":  # H - G = sum_n sum_k r_nk d^2 f_nk: r held fixed
                    leaf = output.detach().requires_grad_(True)
                    (r,) = torch.autograd.grad(self.spec.nll_sum(leaf, targets), leaf)
                    loss = (r * output).sum()
                grads = self._grads(loss, self._params, None, create_graph=True)
                return {"grads": grads}
            # J^T u is linear in u; differentiating it w.r.t. u gives J v (double-backward trick)
            u = torch.zeros_like(output, requires_grad=True)
            jtu = self._grads(output, self._params, u, create_graph=True)
            graph: dict[str, Any] = {"output": output, "u": u, "jtu": jtu, "targets": targets}
            out = output.detach()
            if self.matrix != "ggn":
                leaf = out.clone().requires_grad_(True)
                nll = self.spec.nll_sum(leaf, targets)
                (s,) = torch.autograd.grad(nll, leaf)
                graph["s"] = s
            return graph

    def _apply(self, graph: dict[str, Any], v: Sequence[Tensor], batched: bool) -> tuple:
        """Raw NLL-sum product of one batch with one vector (or ``k`` stacked ones if batched)."""
        kw: dict[str, Any] = {"retain_graph": True, "is_grads_batched": batched}
        lead = 1 if batched else 0
        if self.matrix in ("hessian", "residual"):
            live = [i for i, g in enumerate(graph["grads"]) if g.requires_grad]
            if not live:
                return tuple(torch.zeros_like(x) for x in v)
            outs = [graph["grads"][i] for i in live]
            res = self._grads(outs, self._params, [v[i] for i in live], **kw)
            if batched:  # unused parameters came back without the batch dimension
                res = tuple(r.expand_as(x) if r.shape != x.shape else r for r, x in zip(res, v))
            return res
        (jv,) = torch.autograd.grad(graph["jtu"], graph["u"], tuple(v), **kw)
        if self.matrix == "ggn":
            hv = self.spec.hessian_product(graph["output"], jv, graph["targets"], lead)
        else:
            s = graph["s"]
            n = s.shape[0]
            coeff = (s * jv).reshape(*jv.shape[:lead], n, -1).sum(dim=-1)
            hv = s * coeff.reshape(*coeff.shape, *([1] * (s.ndim - 1)))
        res = self._grads(graph["output"], self._params, hv, **kw)
        if batched:
            res = tuple(r.expand_as(x) if r.shape != x.shape else r for r, x in zip(res, v))
        return res

    def __repr__(self) -> str:
        return (
            f"CurvatureOperator(matrix={self.matrix!r}, shape={self.shape}, dtype={self.dtype}, "
            f"device={self.device}, batches={len(self._batches)}, examples={self.num_examples})"
        )


@collective
def curvature_operator(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    matrix: str = "hessian",
    *,
    params: Params = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    keep_graph: bool | None = None,
    batched: bool | None = None,
) -> CurvatureOperator:
    """A matrix-free curvature operator of ``loss_fn`` over ``data`` (see the module docstring).

    Args:
        model: any ``nn.Module`` (BatchNorm must be in eval mode).
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (mean or sum).
        data: one ``(inputs, targets)`` batch or an iterable of them; the batches are kept (by
            reference) so that every product sees the same data.
        matrix: ``"hessian"``, ``"ggn"``, ``"fisher"`` (Monte-Carlo), ``"empirical_fisher"`` or
            ``"residual"`` (Hessian minus GGN).
        params: restrict to these parameters (names, module prefixes or a predicate
            ``fn(name, param) -> bool``); the operator is then that diagonal block.
        seed: seed of the Monte-Carlo labels (``"fisher"``); default 0.
        generator: alternatively a ``torch.Generator`` on the model's device.
        keep_graph: keep each batch's autograd graph across products (default: only for one
            batch). Faster, but holds the activations of every batch in memory.

    Returns:
        A :class:`CurvatureOperator` of the objective ``L`` (``"mean"``: example mean; ``"sum"``:
        the total), with ``.matvec``, ``.matmat``, ``@`` and ``.to_scipy()``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> data = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
        >>> G = curvature_operator(model, torch.nn.CrossEntropyLoss(), data, matrix="ggn")
        >>> G.to_scipy().shape
        (8, 8)
    """
    return CurvatureOperator(
        model,
        loss_fn,
        data,
        matrix,
        params=params,
        seed=seed,
        generator=generator,
        keep_graph=keep_graph,
        batched=batched,
    )
