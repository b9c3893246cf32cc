"""The base of every curvature operator: parameter layout, graphs, batching and scaling.

A subclass is one matrix: it names itself (``matrix``), builds the reusable graph of one batch
(``_graph``) and applies the raw NLL-sum product of one batch (``_apply``); everything else is here.
See :mod:`curvlab.operators` for the matrices and the conventions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlab._ambient import saved_tensors_hooks_off
from curvlab._compiled import compiled_note
from curvlab._data import (
    Batch,
    batch_tensors,
    call_model,
    num_examples,
    to_device,
)
from curvlab._finite import all_finite, check_operator_products, check_parameters_finite
from curvlab._kept_batches import fingerprint, read_batches
from curvlab._losses import LossSpec, check_counted, loss_spec
from curvlab._notrace import (
    buffer_snapshot,
    gradient_hooks_off,
    leave_no_trace,
    math_attention,
    on_buffers,
)
from curvlab._precision import (
    FLOAT32_NORMAL_EXPONENTS,
    accumulation_dtype,
    axpy_dot,
    is_sixteen,
    upcast,
    without_autocast,
)
from curvlab._rng import make_generator, seed_global
from curvlab._scan import scan_model
from curvlab._selection import Params, select_parameters
from curvlab._vocabulary import matrix_aliases, matrix_name
from curvlab.backends._validation import check_batchnorm
from curvlab.distributed import active, failing_together, rank_generator, unwrap_model
from curvlab.operators._guard import ProductGuard
from curvlab.operators._state import ModelState, ModelStateError, tensor_versions, versions
from curvlab.operators._structure import snapshot

__all__ = ["CurvatureOperator", "MATRIX_CLASSES", "register_matrix"]

MATRIX_CLASSES: dict[str, type[CurvatureOperator]] = {}
"""The registry: ``matrix=`` name -> operator class (filled by :func:`register_matrix`)."""


def register_matrix(cls: type[CurvatureOperator]) -> type[CurvatureOperator]:
    """Class decorator: make ``cls`` available as ``matrix=cls.matrix`` everywhere."""
    if not cls.matrix or cls.matrix in MATRIX_CLASSES:
        raise ValueError(f"matrix name {cls.matrix!r} is empty or already registered")
    MATRIX_CLASSES[cls.matrix] = cls
    return cls


def _registered(matrix: object) -> str:
    """The registered name ``matrix`` means (``None``: ``"hessian"``; an alias: its matrix).

    Raises:
        ValueError: for a name of no registered matrix, listing the names and the aliases.
    """
    name = "hessian" if matrix is None else matrix_name(matrix)  # type: ignore[arg-type]
    if not isinstance(name, str) or name not in MATRIX_CLASSES:
        names = tuple(MATRIX_CLASSES)
        raise ValueError(
            f"matrix must be one of {names} (or the aliases {matrix_aliases(names)}), "
            f"got {matrix!r}"
        )
    return name


def _batched_default(model: nn.Module, device: torch.device) -> bool:
    """Whether products of several vectors run batched (``is_grads_batched``) by default.

    Measured on 2 CPU cores: a batched Hessian product of 16 vectors costs 0.8x the loop on an MLP
    (W1) but 2.2x on a small CNN (W2), whose convolution backward passes vectorise poorly; and on
    GPT-2 small (124M parameters, W5) ten batched products took 8.0 s each against 4.9 s one at a
    time, holding ten times the backward pass's memory (+9 GB). So on a CPU only models without
    convolutions and of at most :data:`BATCHED_MAX_PARAMETERS` parameters batch. Other devices
    always do (an out-of-memory batched product falls back to one vector at a time, recorded in
    ``info``).
    """
    if device.type != "cpu":
        return True
    if sum(p.numel() for p in model.parameters() if p.requires_grad) > BATCHED_MAX_PARAMETERS:
        return False
    return not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


BATCHED_MAX_PARAMETERS = 10_000_000
"""Largest model whose products run batched by default on a CPU (see ``_batched_default``)."""

_ANOMALY_NOTE = (
    "products ran one vector at a time under torch.autograd.detect_anomaly() (its NaN check "
    "has no batching rule); batched again outside anomaly mode"
)
"""``info["batched"]`` of an operator whose products ran under anomaly mode."""


class CurvatureOperator(ProductGuard):
    """A symmetric curvature matrix of the loss, applied without ever forming it.

    Build it with :func:`curvature_operator` (``CurvatureOperator(..., matrix=name)`` gives the
    registered subclass of that name too, for the same names and aliases; ``matrix=None``, the
    default, is the Hessian). The operator is a fixed matrix: the Monte-Carlo
    Fisher's labels are drawn once at construction, and with Dropout in train mode every forward
    pass of a batch (the graph's, one rebuilt for a product, a forward-mode Jacobian product's)
    draws the masks that batch drew at construction (a seed per batch drawn then from the global
    RNG, which is put back), and every forward pass runs on copies of the buffers as they were at
    construction (a train-mode ``spectral_norm`` or ``InstanceNorm(track_running_stats=True)``
    updates them; the user's own buffers are never changed), with every module in the train/eval
    mode it was in at construction (``model.train()`` afterwards changes no product). It refers
    to the model as it is when built: every parameter, those it acts on and the others (outside
    ``params=``, frozen ones), and every other buffer; after one changes (an optimizer step, a
    ``load_state_dict``, an EMA update of a frozen backbone, a ``Parameter`` replaced) products
    raise: build a new operator. The weight of an ``nn.Embedding(max_norm=...)``, which every
    forward pass renormalises in place, may move with the same values. Products that run the
    model's forward pass again (several batches without ``keep_graph=True``, forward-mode
    ``J v``) also raise after its structure changed: a submodule replaced, a hook added or
    removed, an instance-level ``forward``, a plain attribute such as ``Dropout.p`` (those the
    model's own forward passes change, a rotary cache's length, are its own state and not
    compared). A buffer the first forward passes over the batches change once (a cos/sin cache
    grown for a longer sequence) is accepted when a second run of that product changes nothing
    and gives the same product; a forward that changes the model at every pass, or once in a way
    that changes the products, makes this and every later product raise. It holds the data's
    tensors (not copies; a dict of inputs is copied, its tensors are not): after they change in
    place, products raise too. A parameter's or buffer's values changed in place through
    ``.data`` (``p.data.add_(-lr * g)``, ``p.data.clamp_(-c, c)``: autograd's version counter does
    not move) are seen by a fingerprint of their bits, compared on the device before every
    product and read once its passes have run: that product and every later one raise, a graph
    kept for one batch included (its saved tensors share the parameters' storage). Inside a run
    of a curvlab estimator (no code of the user's between its products) the fingerprint is
    compared before the run's first product and after its last only; a forward pass that
    changes values through ``.data`` is then refused at the run's end, its result dropped.
    Values written back unchanged are no change. The data's tensors changed through ``.data``
    are not seen.

    Attributes:
        matrix: which matrix (a name of :data:`MATRIX_CLASSES`).
        names: the parameter names it acts on, in flat order.
        shapes: their shapes.
        shape: ``(D, D)``.
        dtype, device: those of the model; products return tensors of this dtype/device.
        batched: whether products with several vectors run as one batched backward pass
            (default: on CUDA, and on a CPU for models without convolutions of at most
            :data:`BATCHED_MAX_PARAMETERS` (10M) parameters, where that is faster than a loop
            of single products and fits in memory).
        num_examples: ``N``, the number of examples over all batches.
        weight: the scale ``w`` applied to raw NLL-sum products (``w / c`` for the empirical
            Fisher under ``"mean"``).
        num_matvecs: products applied so far (a matmat with ``k`` columns counts ``k``).
        seed: the seed of the Monte-Carlo labels (``None`` when a generator was passed).
    """

    matrix: str = ""
    samples_labels: bool = False
    """Whether the matrix uses labels drawn from the model once at construction (MC Fisher)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> CurvatureOperator:
        if cls is CurvatureOperator:  # dispatch on matrix= (4th positional or keyword)
            # None (the signature's default) is the Hessian, and the aliases are accepted as by
            # curvature_operator (found in review s22: matrix="exact", "empirical" and the
            # default None were refused here)
            matrix = args[3] if len(args) > 3 else kwargs.get("matrix")
            cls = MATRIX_CLASSES[_registered(matrix)]
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Any,
        matrix: str | None = None,
        *,
        params: Params = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        keep_graph: bool | None = None,
        batched: bool | None = None,
    ) -> None:
        if matrix is not None and matrix_name(matrix) != self.matrix:  # an alias is that matrix
            _registered(matrix)  # a name of no matrix is refused as such, listing the names
            raise ValueError(f"{type(self).__name__} is matrix {self.matrix!r}, not {matrix!r}")
        compiled = compiled_note(model)  # before unwrapping: the model as the user passed it
        model = unwrap_model(model)
        self._comm = active()  # the group every product is reduced over (None: local)
        self.spec: LossSpec = loss_spec(loss_fn)
        scan = scan_model(model)
        self._scan = scan  # one walk of the model for every product's leave_no_trace
        check_batchnorm(scan)
        check_parameters_finite(scan.trainable)
        self.model = model
        selected = select_parameters(model, params)
        self.names: list[str] = list(selected)
        self._params: list[nn.Parameter] = list(selected.values())
        self.shapes: list[torch.Size] = [p.shape for p in self._params]
        self._sizes: list[int] = [p.numel() for p in self._params]
        dim = sum(self._sizes)
        self.shape: tuple[int, int] = (dim, dim)
        self.device: torch.device = scan.device
        self._dtypes: list[torch.dtype] = [p.dtype for p in self._params]
        self.dtype: torch.dtype = _operator_dtype(self._dtypes, scan.dtype)
        self._acc: torch.dtype = accumulation_dtype(self.dtype)  # the products' dtype
        # 16-bit scaling (see _in_model_dtype and _output_scale): the vectors when a selected
        # parameter is 16-bit; the output-side products when any parameter of the model is (the
        # backward passes run through every layer between the output and the selected ones)
        self._sixteen = any(is_sixteen(d) for d in self._dtypes)
        self._scaled_outputs = any(is_sixteen(p.dtype) for p in scan.params.values())
        self._float16 = any(p.dtype == torch.float16 for p in scan.params.values())
        # a batch one rank's shard alone fails (non-finite, empty, mismatched sizes): every
        # rank raises together, none left waiting in _read_batches' all-reduce (found in
        # review s20: rank 0 waited until the process group's timeout)
        with failing_together(self._comm, self.device):
            self._batches: list[Batch] = read_batches(data)
        self.num_examples = sum(num_examples(b[0]) for b in self._batches)
        self.keep_graph = len(self._batches) == 1 if keep_graph is None else bool(keep_graph)
        self.seed = None if generator is not None else (0 if seed is None else seed)
        self.num_matvecs = 0
        self.batched: bool = _batched_default(model, self.device) if batched is None else batched
        self._batched_ok = self.batched
        # every forward pass of the operator runs in the modes the modules are in now (a model
        # switched to train mode afterwards gave products with the Dropout masks, or the
        # train-mode BatchNorm refused above, of several batches: found in review, off by 16)
        self._modes = [m.training for _, m in scan.modules]
        self._batch_index = 0
        self._graphs: list[Any] = [None] * len(self._batches)
        self._targets: list[Tensor] = []
        gen = None
        if self.samples_labels:
            gen = rank_generator(make_generator(seed=seed, generator=generator, device=self.device))
        # every forward pass of the operator (its graphs', a rebuilt graph's, a forward-mode
        # product's) runs on copies of the buffers as they are now: a train-mode forward updates
        # running statistics or spectral_norm's vectors in place, and the matrix would drift
        # (small integer and boolean buffers too: a forward that counts its calls, found in review)
        self._buffers_built = buffer_snapshot((m for _, m in scan.modules))
        self.info: dict[str, str] = {} if compiled is None else {"compiled": compiled}
        """How the products are computed where that is not the default (e.g. ``"jacobian"``:
        forward-mode Jacobian products, with the reason; ``"compiled"``: a ``torch.compile``d
        model, whose original module runs eagerly), so that no route is taken silently."""
        before = versions(model)
        before_structure = snapshot(model)
        self._renormed = _max_norm_weights(scan.modules)
        self._kept_at: list[int] | None = None  # their versions when a graph was first kept
        self._graphs_checked: set[int] = set()  # batches whose graph _check_graph has seen
        with leave_no_trace(model, scan=scan):
            total = self._read_batches(gen)
        self._drop_stale_graphs()
        # every parameter (selected or not) and buffer its forward passes read, and the modules,
        # hooks and plain attributes they run, as they are after its first forward passes:
        # products refuse after they change (_check_versions)
        self._state = ModelState(model, self._buffers_built, before, before_structure)
        self._refusal: str | None = None  # why every product is refused from now on
        self._values_pending: list[Tensor] = []  # changes through .data seen (_check_values)
        self._values_run: str | None = None  # an estimator's run (_values_checked_once)
        self._values_products = 0  # the products of that run so far
        self._first_changes: list[str] = []  # what the first passes over some batches changed
        self._structure_checked = False  # whether the current product checked the structure
        # the batches are the caller's tensors, not copies: their versions as the matrix was
        # built (after its first forward passes), checked before every product; the contents
        # (a fingerprint) tell a forward that rewrites its inputs with the same values from one
        # that changes them at every pass (_refresh_data)
        self._data_versions = [
            [[t, t._version, fingerprint(t)] for t in batch_tensors(batch)]
            for batch in self._batches
        ]
        self._forwarded = [  # batches whose first forward pass ran at construction
            i == 0 or self.keep_graph or self.samples_labels for i in range(len(self._batches))
        ]
        c = total / self.num_examples
        self.weight: float = self._weight(total, c)
        self.terms_per_example: float = c

    def _read_batches(self, gen: torch.Generator | None) -> float:
        """One pass over the batches at construction: shapes checked, loss terms counted (over
        all ranks), Monte-Carlo labels drawn, and the graphs built where they are kept. Under
        ``torch.distributed`` an error of one rank's pass (:func:`~curvlab.distributed.
        failing_together`) is raised on every rank before the counts' all-reduce.

        Returns:
            ``M``, the loss terms of all the data (the non-ignored tokens under ``ignore_index``).
        """
        count: Tensor | int = 0
        # every forward pass of batch i (here, and again in products that rebuild its graph or
        # need forward-mode Jacobian products) draws the same Dropout masks: the global RNG is
        # seeded with seeds[i] first (inside leave_no_trace, which puts the caller's RNG back),
        # so the operator is one fixed matrix whatever the caller draws between products
        self._seeds = [int(s) for s in torch.randint(0, 2**62, (len(self._batches),))]
        classes: int | None = None  # of the first batch's output
        # under torch.distributed a rank whose shard fails a check here (a class label out of
        # range, a forward pass that raises on its data) raises on every rank, the others
        # naming it, before the counts' all-reduce below (found in review s20: it raised alone
        # and the others waited in that all-reduce until the process group's timeout)
        with failing_together(self._comm, self.device):
            for i, batch in enumerate(self._batches):
                inputs, targets = to_device(batch, self.device)
                if i > 0 and not self.keep_graph and not self.samples_labels:
                    if classes is not None:
                        self.spec.check_classes(classes, targets)
                    self._targets.append(targets)
                    count = count + self._count(targets)
                    continue
                self._batch_index = i
                seed_global(self.device, self._seeds[i])
                with torch.set_grad_enabled(self.keep_graph):
                    output = self._forward(inputs, targets)
                if i == 0:
                    self.spec.check_shapes(output, targets)
                    classes = output.shape[1] if output.ndim >= 2 else None
                self.spec.check_classes(output, targets)  # (once per batch, when it is built)
                count = count + self._count(targets)
                if self.samples_labels:
                    targets = self.spec.sample_targets(output, gen, targets)
                self._targets.append(targets)
                if self.keep_graph:
                    self._graphs[i] = self._build(inputs, targets, output)
                    self._kept()
        if self._comm is not None:  # the counts of all shards, in one all-reduce
            # with the layouts each rank's cross-entropy read: ranks that read torch's layout
            # and the GPT layout all raise, as one process does (found in review s19: the
            # products added the two objectives, an exact Hessian trace 1.29096 for 1.66084)
            _, (self.num_examples, count, *layouts) = self._comm.reduce_sums(
                {}, [self.num_examples, count, *self.spec.layout_counts()], device=self.device
            )
            self.spec.check_layout_counts(*layouts)
        total = float(count)
        check_counted(self.spec, total)
        return total

    def _kept(self) -> None:
        """Record the versions of the ``Embedding(max_norm=...)`` weights when the first graph
        of a block is kept (:meth:`_drop_stale_graphs`)."""
        if self._kept_at is None:
            self._kept_at = tensor_versions(self._renormed)

    def _drop_stale_graphs(self) -> None:
        """Drop the graphs kept in a block (:func:`~curvlab._notrace.leave_no_trace`) after which
        an ``Embedding(max_norm=...)`` weight moved in place: a later batch's forward pass
        renormalised its rows again, or the block put the user's values back.

        The forward pass renormalises rows of the weight in place, and the graph computes with
        those values: where it holds the weight itself (tied to a head's ``F.linear``), putting
        the old values back made every product fail with torch's raw in-place error (found in
        review), and a product on those values would be another matrix. The graphs are then
        built again in each product (inside the block, on the renormalised weight), as for
        several batches without ``keep_graph``: the Hessian at the weights the forward pass
        uses, one forward pass more per product.
        """
        kept_at, self._kept_at = self._kept_at, None
        if kept_at is None or tensor_versions(self._renormed) == kept_at:
            return
        self._graphs = [None] * len(self._batches)
        self.info["graphs"] = (
            "built again at every product: the forward pass renormalises rows of an "
            "Embedding(max_norm=...) weight in place, and a kept graph that may hold the weight "
            "(a layer tied to it, or a use outside the embedding; not told apart, so an "
            "untied embedding pays this forward pass too) is stale after a later batch's pass "
            "or the user's values put back after the pass move it again"
        )

    def _weight(self, total: float, c: float) -> float:
        """The scale ``w`` of raw NLL-sum products: ``1`` under "sum", ``1 / M`` under "mean"."""
        return 1.0 if self.spec.reduction == "sum" else 1.0 / total

    @property
    def sampled_targets(self) -> list[Tensor] | None:
        """The Monte-Carlo Fisher's labels, one tensor per batch (``None`` for other matrices)."""
        return list(self._targets) if self.samples_labels else None

    # ------------------------------------------------------------------ layout helpers
    def flatten(self, tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (dict keyed by :attr:`names`, or a list) flat, in the
        model's dtype (float32 for a 16-bit model, the dtype of its products: the products scale
        a vector before they cast it to 16 bits, see :meth:`_in_model_dtype`), or in its complex
        dtype where some tensor is complex (:meth:`matvec` of a complex dict).

        Raises:
            ValueError: for a dict whose keys are not :attr:`names`, a list of another length
                than :attr:`names` (found in review s24: the four tensors of a model whose
                operator acts on its last layer's two were cut to the first two, layer 0's
                values, without an error), or a tensor of another shape than its parameter's.
            TypeError: for a tensor (a flat vector needs no flattening) or entries that are
                not tensors.
        """
        if isinstance(tensors, Tensor):
            raise TypeError(
                f"flatten takes one tensor per parameter (a dict keyed by the operator's names "
                f"or a list in their order), got one tensor of shape {tuple(tensors.shape)}; a "
                f"flat vector of length {self.shape[0]} is used as it is"
            )
        if isinstance(tensors, dict):
            missing = [n for n in self.names if n not in tensors]
            extra = [n for n in tensors if n not in self.names]
            if missing or extra:
                raise ValueError(
                    f"vector dict keys must be the operator's parameters; missing {missing}, "
                    f"unexpected {extra}"
                )
            tensors = [tensors[n] for n in self.names]
        tensors = list(tensors)
        if len(tensors) != len(self.names):
            raise ValueError(
                f"flatten takes one tensor per parameter of the operator, {len(self.names)} "
                f"({self.names[:8]}{' ...' if len(self.names) > 8 else ''}), got "
                f"{len(tensors)}; pass a dict keyed by these names, or a list in their order"
            )
        for t, name in zip(tensors, self.names):
            if not isinstance(t, Tensor):
                raise TypeError(f"entry {name!r} is a {type(t).__name__}, not a torch Tensor")
        dtype = self._acc
        if any(t.is_complex() for t in tensors):  # (cast to the real dtype, Im was lost)
            dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        parts = []
        for t, shape, name in zip(tensors, self.shapes, self.names):
            if t.shape != shape:
                raise ValueError(
                    f"entry {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
                )
            parts.append(t.reshape(-1).to(self.device, dtype))
        return torch.cat(parts)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat vector (or the rows of a ``(D, k)`` matrix) into a per-parameter dict.

        Raises:
            TypeError: for an argument that is not a tensor.
            ValueError: for a tensor that is not ``(D,)`` or ``(D, k)``, naming ``D`` (torch's
                raw ``split_with_sizes`` error before review s24).
        """
        if not isinstance(vector, Tensor):
            raise TypeError(f"unflatten takes a torch Tensor, got {type(vector).__name__}")
        if vector.ndim not in (1, 2) or vector.shape[0] != self.shape[0]:
            raise ValueError(
                f"unflatten takes a vector of shape ({self.shape[0]},) or a matrix of shape "
                f"({self.shape[0]}, k), the operator's {len(self.names)} parameters flat, got "
                f"{tuple(vector.shape)}"
            )
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
        """``A v`` for a flat vector of length ``D`` (or a per-parameter dict, returning a dict).

        A complex ``v`` gives ``A Re(v) + i A Im(v)`` (:meth:`matmat`)."""
        as_dict = isinstance(v, dict)
        if not as_dict:  # cast by matmat, which names an entry beyond the dtype's range
            self._check_shape(v, want_vector=True)
        flat = self.flatten(v) if as_dict else v
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
        columns. ``k = 0`` gives the empty ``(D, 0)`` product and runs no pass (scipy's
        convention; it raised autograd's ``IndexError`` or a bare ``AssertionError`` before, found
        in review). A complex ``V`` (scipy's ``A - z I`` with a complex shift ``z`` passes
        complex vectors) gives ``A Re(V) + i A Im(V)``, the product of the real matrix ``A``: the
        ``2k`` real columns in one pass (:attr:`num_matvecs` counts ``2k``), returned in the
        complex dtype of the products (``complex64`` for a float32 or 16-bit model). It was cut to
        ``A Re(V)`` before, with only torch's cast warning (found in review).

        Raises:
            ValueError: for a ``V`` holding NaN or inf (or an entry beyond the range of the
                operator's dtype), naming the first such entry and its parameter. Found in
                review s24: it was blamed on the model and the data (``NonFiniteError``, "use
                float64"). Read only when a product is not finite: a finite one costs nothing
                more.
            NonFiniteError: for a product that is not finite with a finite ``V``.
        """
        given = V
        V = self._as_matrix(V, want_vector=False)
        if V.is_complex():  # (not through self.matmat: a subclass's would run twice)
            k = V.shape[1]
            out = self._real_products(torch.cat([V.real, V.imag], dim=1), given)
            return torch.complex(out[:, :k], out[:, k:])
        return self._real_products(V, given)

    def _real_products(self, V: Tensor, given: Tensor) -> Tensor:
        """``A V`` for a real ``(D, k)`` matrix on the operator's device (:meth:`matmat`);
        ``given`` the caller's ``V``, named where the products are not finite."""
        if V.shape[1] == 0:
            return torch.zeros(self.shape[0], 0, dtype=self._acc, device=self.device)
        used = V
        V, exponents = self._in_model_dtype(V)
        acc = self._over_batches(
            self._split_columns(V),
            V.shape[1],
            lambda g, pp, k: self._apply_many(g, pp, k).to(self._acc),
        )
        if self._comm is not None:  # the products of all shards: one all-reduce per product
            self._comm.all_reduce_(acc)
        self._check_products(acc, given, used)  # NaN from one example's forward (found in review)
        out = acc.T.mul_(self.weight)
        return out if exponents is None else out.mul_(_powers_of_two(exponents, out.dtype))

    def quadratic_forms(self, V: Tensor) -> Tensor:
        """``v_j^T A v_j`` for the columns of a ``(D, k)`` matrix, as a float64 ``(k,)`` tensor.

        The products of :meth:`matmat` reduced against the columns parameter by parameter as
        they come out of the backward pass: ``A V`` is never assembled as one ``(D, k)`` matrix
        (on GPT-2 small that saves a copy and a pass over 124M entries per product). Sums in
        float64 over the float32 (16-bit models: upcast) elementwise products. ``k = 0`` gives
        the empty ``(0,)`` result and runs no pass.

        Raises:
            TypeError: for a complex ``V`` (``v^T A v`` and ``v^H A v`` differ for it; the latter
                is ``quadratic_forms(V.real) + quadratic_forms(V.imag)``).
            ValueError: for a ``V`` holding NaN or inf, as :meth:`matmat`.
        """
        given = V
        V = self._as_matrix(V, want_vector=False)
        if V.is_complex():
            raise TypeError(
                f"quadratic_forms takes real vectors, got {V.dtype}: for complex v, v^H A v is "
                "quadratic_forms(V.real) + quadratic_forms(V.imag) (A is real and symmetric)"
            )
        if V.shape[1] == 0:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        used = V
        V, exponents = self._in_model_dtype(V)
        acc = self._over_batches(self._split_columns(V), V.shape[1], self._apply_forms)
        if self._comm is not None:
            self._comm.all_reduce_(acc)
        self._check_products(acc, given, used)
        acc = acc * self.weight
        return acc if exponents is None else acc * _powers_of_two(2 * exponents, acc.dtype)

    def product_parts(self, parts: Sequence[Tensor]) -> tuple[list[Tensor], float]:
        """``A v`` for one vector given per parameter, without a flat copy of the product.

        The Lanczos recurrence of :func:`curvlab.estimators.slq` works on these parts: on GPT-2
        small, concatenating a product into one flat vector and scaling it costs about a tenth
        of the product itself.

        Args:
            parts: one tensor per parameter (:attr:`names` order), of its ``numel`` entries
                (any shape with that many entries, any float dtype).

        Returns:
            ``(raw, scale)`` with ``A v = scale * raw``: ``raw`` holds one new flat tensor per
            parameter that the caller owns (float32 for a 16-bit model), ``scale > 0`` the
            operator's weight (:meth:`matmat` applies it). Under ``torch.distributed`` the
            products of all shards (one all-reduce).

        Raises:
            ValueError: for a part holding NaN or inf, as :meth:`matmat`.
        """
        if len(parts) != len(self._sizes):
            raise ValueError(f"expected {len(self._sizes)} parts, got {len(parts)}")
        if any(t.is_complex() for t in parts):
            raise TypeError(
                "product_parts takes real parts, got complex ones: use matvec, which gives "
                "A Re(v) + i A Im(v) for a complex v"
            )
        exponent = None
        if self._sixteen:  # 16-bit: scaled as in _in_model_dtype
            exponent = torch.frexp(
                torch.stack([t.detach().abs().amax().to(torch.float64) for t in parts]).amax()
            ).exponent
            down = [
                upcast(t.to(self.device)) * _powers_of_two(-exponent, accumulation_dtype(t.dtype))
                for t in parts
            ]
        per_param = [  # each parameter's part in its own dtype (a mixed-dtype model)
            t.reshape(1, *s).to(self.device, d)
            for t, s, d in zip(parts if exponent is None else down, self.shapes, self._dtypes)
        ]

        def apply(graph: Any, pp: list[Tensor], k: int) -> list[Tensor]:
            res = self._apply(graph, [t[0] for t in pp], batched=False)
            out = []
            for r, x, given in zip(res, pp, parts):
                r = r.to(self._acc).reshape(-1)
                if r.untyped_storage().data_ptr() in (
                    x.untyped_storage().data_ptr(),
                    given.untyped_storage().data_ptr(),
                ):
                    r = r.clone()  # a product that is its input: never hand back the caller's
                out.append(r)
            return out

        raw = self._over_batches(per_param, 1, apply)
        if self._comm is not None:  # the products of all shards, in one all-reduce
            flat = self._comm.all_reduce_(torch.cat(raw))
            raw = list(flat.split(self._sizes))
        self._check_products(raw, list(parts), per_param)
        if exponent is not None:
            raw = [r.mul_(_powers_of_two(exponent, r.dtype)) for r in raw]
        return raw, self.weight

    def _check_products(
        self,
        products: Tensor | list[Tensor],
        given: Tensor | list[Tensor],
        used: Tensor | list[Tensor],
    ) -> None:
        """Refuse products that are not finite, naming the culprit: the caller's vectors
        ``given`` where they hold NaN or inf, or ``used`` (them on the operator's device and in
        its dtype) where the cast overflowed, with a ``ValueError``; else the model and the data
        (:func:`~curvlab._finite.check_operator_products`). The vectors are read only when the
        products are not finite: finite products cost what they did."""
        if all_finite(products if isinstance(products, list) else [products]):
            return
        self._check_vectors(given, None)
        self._check_vectors(used, given)
        check_operator_products(products)

    def _check_vectors(
        self, vectors: Tensor | list[Tensor], given: Tensor | list[Tensor] | None
    ) -> None:
        """Raise the ``ValueError`` of :meth:`_check_products` when ``vectors`` (a ``(D,)``
        vector, a ``(D, k)`` matrix, or per-parameter parts) hold NaN or inf: the first such
        entry in row-major order, its row's parameter and index in it. ``given``: the caller's
        finite vectors of which ``vectors`` is the cast (the entry overflowed the dtype)."""
        parts = vectors if isinstance(vectors, list) else [vectors]
        start, row, col, entry = 0, None, None, None
        for part in parts:
            values = part.detach().reshape(-1) if isinstance(vectors, list) else part.detach()
            bad = ~torch.isfinite(values)
            if bool(bad.any()):
                first = bad.nonzero()[0].tolist()
                entry = values[tuple(first)].item()
                row = start + first[0]
                col = first[1] if len(first) > 1 else None
                break
            start += part.numel()
        if row is None:
            return
        offsets = [0, *np.cumsum(self._sizes).tolist()]
        p = int(np.searchsorted(offsets, row, side="right")) - 1
        index = tuple(int(i) for i in np.unravel_index(row - offsets[p], tuple(self.shapes[p])))
        width = given.shape[1] if isinstance(given, Tensor) and given.ndim == 2 else None
        if col is not None and width:  # a complex V's real and imaginary columns: the caller's
            col %= width
        multi = col is not None and (width or vectors.shape[1]) > 1  # type: ignore[union-attr]
        at = f"[{row}, {col}]" if multi else f"{row}"
        where = f"entry {at} (parameter {self.names[p]!r}, index {index})"
        if given is None:
            raise ValueError(
                f"the vector is not finite: {where} is {entry}, so its product with the "
                f"curvature cannot be (not a fault of the model or the data); replace the "
                f"NaN/inf entries (check torch.isfinite(v).all() before the product)"
            )
        raise ValueError(
            f"the vector does not fit the operator's dtype "
            f"{str(self.dtype).removeprefix('torch.')}: {where} is beyond its range; divide "
            f"the vector by a constant c and multiply the product by it (A v = c A (v / c))"
        )

    def _split_columns(self, V: Tensor) -> list[Tensor]:
        """The columns of a ``(D, k)`` matrix as per-parameter ``(k, *shape)`` tensors, each in
        its parameter's dtype (a mixed-dtype model's float32 layers keep float32 vectors)."""
        k = V.shape[1]
        return [
            t.reshape(k, *s).to(d)
            for t, s, d in zip(V.T.split(self._sizes, dim=1), self.shapes, self._dtypes)
        ]

    def _over_batches(self, per_param: list[Tensor], k: int, apply: Callable[..., Any]) -> Any:
        """``apply(graph, per-parameter columns, k)`` summed over the operator's batches (a
        tensor, or a list of tensors summed entry by entry).

        The first product of an operator over several batches whose graphs are not kept runs
        the first forward passes over the batches after the first. What they change in the
        model's buffers once (a rotary cos/sin cache grown for a longer sequence, a table
        rebuilt for it: found in review, refused on the first product and accepted on a retry)
        is checked by running the product again: accepted when that second run changes
        nothing and gives the same product (the matrix is the one of a single pass over the
        data, as ``keep_graph=True`` builds it), refused for good otherwise."""
        self._check_versions()
        first = not all(self._forwarded)
        acc, ran = self._passes(per_param, k, apply)
        self._check_values()  # (read now: the passes are done, no synchronisation before them)
        if self._check_own_passes(first, ran):
            again, ran = self._passes(per_param, k, apply)
            self._check_second_run(acc, again, ran)
            acc = again
        self.num_matvecs += k
        return acc

    def _passes(
        self, per_param: list[Tensor], k: int, apply: Callable[..., Any]
    ) -> tuple[Any, bool]:
        """One run of :meth:`_over_batches`: the sum, and whether it ran forward passes."""
        acc: Any = None
        self._kept_at = None
        # products on kept graphs run no forward pass (nothing to restore): skip the bookkeeping
        cached = all(g is not None for g in self._graphs) and not self._forward_passes()
        # curvlab's products compute outside the caller's autocast (leave_no_trace does it too),
        # with the math attention kernel the graphs were built with: non-reentrant activation
        # checkpointing recomputes attention inside the product and refused another kernel's
        # metadata (CheckpointError, found in review)
        try:
            with (
                nullcontext() if not cached else math_attention(),
                without_autocast() if cached else leave_no_trace(self.model, scan=self._scan),
                # (leave_no_trace does it too) the user's default saved-tensor hooks off: the
                # products' own backward passes save tensors (review s25)
                saved_tensors_hooks_off() if cached else nullcontext(),
                # the user's gradient hooks on the parameters (a rescaling register_hook) are off
                # in curvlab's products, as in every pass of leave_no_trace (found in review: x4
                # traces)
                gradient_hooks_off(self.model.parameters()) if cached else nullcontext(),
            ):
                if not cached:
                    self._modes_as_built()
                for i, batch in enumerate(self._batches):
                    graph = self._graphs[i]
                    self._batch_index = i  # whose seed a forward of this batch takes
                    if graph is None:
                        inputs, _ = to_device(batch, self.device)
                        seed_global(self.device, self._seeds[i])  # its masks at construction
                        graph = self._build(inputs, self._targets[i], None)
                        self._refresh_data(i)  # what the model's forward wrote into its inputs
                        if self.keep_graph:  # rebuilt after a same-value rewrite: kept again
                            self._graphs[i] = graph
                            self._kept()
                    res = apply(graph, per_param, k)
                    if acc is None:
                        acc = res
                    elif isinstance(acc, list):
                        for a, r in zip(acc, res):
                            a.add_(r)
                    else:
                        acc.add_(res)
                    del graph
            self._drop_stale_graphs()  # (the block put the user's max_norm weights back)
        except BaseException as exc:
            self._state.changes()  # a rewrite of the failed passes' (max_norm) is recorded
            if (not cached or self._forward_passes()) and not isinstance(exc, ModelStateError):
                self._state.structure.after_own_passes()  # (a refusal's change is the user's)
            raise
        assert acc is not None
        return acc, not cached or self._forward_passes()

    def _forward_passes(self) -> bool:
        """Whether products run forward passes of the model (forward-mode Jacobian products)."""
        return False

    def _apply_batched(self, graph: Any, per_param: list[Tensor], k: int) -> tuple | None:
        """The ``k`` products as one batched pass (per-parameter ``(k, ...)`` tensors), or
        ``None`` when batching is off or fails (then it stays off, with the reason in ``info``)."""
        if k == 1 or not self._batched_ok:
            return None
        if torch.is_anomaly_enabled():
            # anomaly mode's NaN check reads each gradient with .item(), which has no batching
            # rule: the batched product would fail, after torch's anomaly machinery warned
            # "Error detected in ..." with a traceback into curvlab (review s25). One vector
            # at a time for this product, said so; batched again outside anomaly mode
            self.info["batched"] = _ANOMALY_NOTE
            return None
        try:
            return self._apply(graph, per_param, batched=True)
        except ModelStateError:  # a refusal, not a failed batching
            raise
        except RuntimeError as exc:  # no batching rule, or out of memory: one at a time
            self._batched_ok = False
            why = (
                "out of memory"
                if isinstance(exc, torch.OutOfMemoryError)
                else str(exc).strip().splitlines()[0][:200]
            )
            self.info["batched"] = (
                f"products run one vector at a time from here on (the batched product "
                f"failed: {why})"
            )
            return None

    def _apply_many(self, graph: Any, per_param: list[Tensor], k: int) -> Tensor:
        """Raw products of one batch with ``k`` vectors, as a ``(k, D)`` tensor."""
        out = self._apply_batched(graph, per_param, k)
        if out is not None:
            return torch.cat([t.reshape(k, -1) for t in out], dim=1)
        cols: Tensor | None = None
        for j in range(k):
            res = self._apply(graph, [t[j] for t in per_param], batched=False)
            if cols is None:  # written in place: no second copy of all k products
                cols = torch.empty(k, self.shape[0], dtype=res[0].dtype, device=res[0].device)
            torch.cat([t.reshape(-1) for t in res], out=cols[j])
        assert cols is not None
        return cols

    def _apply_forms(self, graph: Any, per_param: list[Tensor], k: int) -> Tensor:
        """``v_j^T (A_batch v_j)`` of one batch, float64 ``(k,)``."""
        out = self._apply_batched(graph, per_param, k)
        forms = torch.zeros(k, dtype=torch.float64, device=self.device)
        for j in range(k):
            if out is not None:
                res = [o[j] for o in out]
            else:
                res = self._apply(graph, [t[j] for t in per_param], batched=False)
            products = [o.reshape(-1) for o in res]
            forms[j] = axpy_dot(products, 0.0, None, [v[j].reshape(-1) for v in per_param])
        return forms

    def to_scipy(self) -> Any:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` on NumPy arrays.

        Its ``dtype`` is the products' real dtype; complex vectors (scipy's ``A - z I`` with a
        complex ``z``) give ``A Re(x) + i A Im(x)`` in the matching complex dtype
        (:meth:`matmat`), and a ``(D, 0)`` matrix the empty product.
        """
        from scipy.sparse.linalg import LinearOperator

        # a 16-bit model's products are float32 (NumPy has no bfloat16; float16 would round
        # the vectors before the operator scales them)
        np_dtype = torch.empty((), dtype=self._acc).numpy().dtype

        def array(x: np.ndarray) -> Tensor:
            # complex stays complex (cast to the real dtype, it lost Im(x): found in review)
            x = np.asarray(x)
            dtype = np.result_type(np_dtype, np.complex64) if np.iscomplexobj(x) else np_dtype
            return torch.as_tensor(np.asarray(x, dtype=dtype)).to(self.device)

        def mv(x: np.ndarray) -> np.ndarray:
            return self.matvec(array(x).reshape(-1)).detach().cpu().numpy()

        def mm(X: np.ndarray) -> np.ndarray:
            return self.matmat(array(X)).detach().cpu().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np_dtype)

    def to_dense(self) -> Tensor:
        """The dense ``D x D`` matrix (``D`` products; for small models and tests only)."""
        eye = torch.eye(self.shape[0], device=self.device, dtype=self.dtype)
        cols = [self.matmat(eye[:, i : i + 256]) for i in range(0, self.shape[0], 256)]
        return torch.cat(cols, dim=1)

    # ------------------------------------------------------------------ internals
    def _top_exponent(self, output: Tensor) -> int:
        """The binary exponent ``q`` of the largest entry an output-side vector of this batch
        enters a 16-bit backward pass with (:meth:`_output_scale`).

        ``0`` (entries up to 1) for bfloat16, whose range is float32's. A float16 backward sums
        over the batch's ``n`` positions (rows of ``output``, times its positions past the class
        axis): ``q = min(0, 8 - ceil(log2 n))`` keeps those sums below ``2^8`` times an entry of
        the layers' inputs, as a mean loss (``2^-log2 n``) does with ``2^8`` to spare, while an
        entry down to ``2^(-24 - q)`` of the largest stays nonzero (``2^-12`` at ``n = 4096``).
        The raw NLL-sum products overflowed at ``n ||A|| > 65504`` before (found in review: a
        float16 ``MSELoss`` over 4096 examples whose mean-loss Hessian is 17.05 raised
        ``NonFiniteError``).
        """
        if not self._float16:
            return 0
        n = output.numel() // output.shape[1] if output.ndim >= 2 else output.numel()
        return min(0, 8 - max(n - 1, 0).bit_length())

    def _output_scale(self, top: Tensor, exponent: int) -> tuple[Tensor, Tensor]:
        """The power of two ``s = 2^(q - e)`` that brings ``top`` (``e`` its binary exponent, one
        entry per column) to ``[2^(q-1), 2^q)``, ``q = exponent``, and ``1 / s`` (both exact;
        ``1`` where ``top`` is 0 or not finite, which then shows in the products). Tensors: no
        host synchronisation."""
        top = top.detach().float()
        e = torch.frexp(top).exponent
        usable = torch.isfinite(top) & (top > 0)
        # kept to [-126, 126], where 2^shift and 2^-shift are both float32 normals: a column
        # whose top is a float32 subnormal (a confident float16 classifier's loss-Hessian
        # product at a margin of about 100) got down = inf, and inf * 0 = NaN: a false
        # NonFiniteError (found in review s19); it is brought up by 2^126 only
        shift = torch.where(usable, exponent - e, torch.zeros_like(e)).clamp(
            *FLOAT32_NORMAL_EXPONENTS
        )
        down = _powers_of_two(shift, torch.float32)
        up = _powers_of_two(-shift, torch.float32)
        return down, up

    def _scaled_down(self, t: Tensor, lead: int, output: Tensor) -> tuple[Tensor, Tensor | None]:
        """An output-side vector ``t`` (float32 at least; ``lead`` batch axes) for the backward
        pass through ``output``: where the model has 16-bit parameters, each column scaled by
        a power of two to the range of :meth:`_top_exponent` before it is cast to ``output``'s
        dtype, with the factors that undo it (``None``: not scaled).

        The loss-Hessian products of a confident float16 classifier (``1e-9`` to ``1e-12``) were
        cast to float16 as they were: 0 or subnormal, and the products 0 (found in review:
        eigenvalues 0.0 for 9.25e-9). The same as the exact-GGN diagonal's factors
        (:mod:`curvlab.backends._backpack_fields`).
        """
        if not self._scaled_outputs:
            return t.to(output.dtype), None
        top = t.detach().abs().flatten(lead).amax(-1) if lead else t.detach().abs().amax()
        down, up = self._output_scale(top, self._top_exponent(output))
        shape = (*down.shape, *([1] * (t.ndim - lead)))
        return (t * down.reshape(shape)).to(output.dtype), up

    def _scaled_up(self, res: Sequence[Tensor], up: Tensor | None, batched: bool) -> tuple:
        """Products of a scaled backward pass (:meth:`_scaled_down`) in the products' dtype,
        the scaling undone (exact: powers of two)."""
        if up is None:
            return tuple(res)
        return tuple(
            r.to(self._acc) * (up.reshape(-1, *([1] * (r.ndim - 1))) if batched else up)
            for r in res
        )

    def _forward(self, inputs: Any, targets: Tensor) -> Tensor:
        with on_buffers(self._buffers_built):
            return self.spec.prepare(call_model(self.model, inputs), targets)

    def _count(self, targets: Tensor) -> Tensor | int:
        """Loss terms of one batch, from its own targets: counted labels for cross-entropy with
        class indices, else the targets' entries (per class, axis 1, for cross-entropy's
        probabilities).

        Each batch is counted from its own targets: batches of sequences of different lengths
        have different terms per example (counted with the first batch's, ``MSELoss`` on lengths
        3 and 5 was scaled by 32/24 too much).
        """
        if self.spec.kind == "cross_entropy" and not targets.is_floating_point():
            return (targets != self.spec.ignore_index).sum()
        if self.spec.kind == "cross_entropy":
            return targets.numel() // targets.shape[1]
        return targets.numel()

    def _check_shape(self, V: Tensor, want_vector: bool) -> None:
        """Refuse a ``V`` that is not a ``(D,)`` (``want_vector``) or ``(D, k)`` tensor."""
        if not isinstance(V, Tensor):
            raise TypeError(f"expected a torch Tensor, got {type(V).__name__}")
        ndim = 1 if want_vector else 2
        if V.ndim != ndim or V.shape[0] != self.shape[0]:
            want = f"({self.shape[0]},)" if want_vector else f"({self.shape[0]}, k)"
            raise ValueError(f"expected a tensor of shape {want}, got {tuple(V.shape)}")

    def _as_matrix(self, V: Tensor, want_vector: bool) -> Tensor:
        self._check_shape(V, want_vector)
        if V.is_complex():  # split into real products by matmat (A is real)
            return V.to(self.device)
        if self._sixteen and V.dtype in (torch.float32, torch.float64):
            return V.to(self.device)  # a 16-bit model's vectors: cast after scaling (matmat)
        return V.to(self.device, self.dtype)

    def _in_model_dtype(self, V: Tensor) -> tuple[Tensor, Tensor | None]:
        """``V`` for the backward passes (:meth:`_split_columns` casts each parameter's rows to
        its dtype), and where a selected parameter is 16-bit the binary exponents ``e_j`` its
        columns were scaled by (``None`` otherwise).

        A 16-bit model's products take each column as ``2^-e_j v_j``, its largest entry in
        ``[0.5, 1)``, and scale the products back by ``2^e_j`` (exact: powers of two): the
        operator is linear, so ``A (c v) = c A v`` whatever ``c``, where a plain cast to float16
        flushed small entries to zero (found in review: ``1e-7 v`` gave products 31-40% off) and
        overflowed large ones (``1e4 v``: ``NonFiniteError`` for a product that fits).
        """
        if not self._sixteen:
            return V.to(self.dtype), None
        V = upcast(V)  # a 16-bit vector's factor 2^-e_j may not fit 16 bits (2^16 in float16)
        exponents = torch.frexp(V.detach().abs().amax(0)).exponent
        scaled = V * _powers_of_two(-exponents, V.dtype)
        return scaled.to(self._acc), exponents

    def _grads(self, out: Tensor, inputs: Sequence[Tensor], grad_out: Any, **kw: Any) -> tuple:
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True, **kw)
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))

    def _build(self, inputs: Any, targets: Tensor, output: Tensor | None) -> Any:
        """Forward (unless ``output`` is given) and the reusable part of one batch's graph,
        checked by :meth:`_check_graph` the first time the batch's graph is built (a graph
        built again for each product is the same graph: checked once, not per product)."""
        with torch.enable_grad():
            if output is None:
                output = self._forward(inputs, targets)
            first = self._batch_index not in self._graphs_checked
            if first:
                self._check_graph(output, None)
            graph = self._graph(output, targets, inputs)
            if first:
                self._check_graph(output, graph)
                self._graphs_checked.add(self._batch_index)
            return graph

    def _check_graph(self, output: Tensor, graph: Any) -> None:
        """Refuse (or reroute) products the autograd graph of one batch cannot give exactly:
        called with ``graph=None`` on the forward pass's ``output`` before the matrix's graph is
        built, then with the built graph (:meth:`_graph`). A walk of the graph, no tensor
        touched; nothing by default."""

    def _graph(self, output: Tensor, targets: Tensor, inputs: Any) -> Any:
        """The matrix's reusable graph of one batch's ``output`` (grad mode is on)."""
        raise NotImplementedError

    def _apply(self, graph: Any, v: Sequence[Tensor], batched: bool) -> tuple:
        """Raw NLL-sum product of one batch with one vector (or ``k`` stacked ones if batched)."""
        raise NotImplementedError

    @staticmethod
    def _batch_shaped(res: tuple, v: Sequence[Tensor], batched: bool) -> tuple:
        """Batched products of unused parameters come back without the batch dimension."""
        if not batched:
            return res
        return tuple(r.expand_as(x) if r.shape != x.shape else r for r, x in zip(res, v))

    def __repr__(self) -> str:
        return (
            f"CurvatureOperator(matrix={self.matrix!r}, shape={self.shape}, dtype={self.dtype}, "
            f"device={self.device}, batches={len(self._batches)}, examples={self.num_examples})"
        )


def _max_norm_weights(modules: Sequence[tuple[str, nn.Module]]) -> list[Tensor]:
    """The weights of the ``nn.Embedding(max_norm=...)`` layers among ``modules``, which every
    forward pass renormalises in place and :func:`~curvlab._notrace.leave_no_trace` puts back."""
    return [
        m.weight
        for _, m in modules
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
    ]


def _operator_dtype(dtypes: Sequence[torch.dtype], default: torch.dtype) -> torch.dtype:
    """The operator's :attr:`~CurvatureOperator.dtype` from its parameters' dtypes: theirs when
    they share one; for a mixed selection the 16-bit one where the others are float32 (the
    products float32, to 16-bit accuracy), else the widest."""
    kinds = list(dict.fromkeys(dtypes))
    if len(kinds) <= 1:
        return kinds[0] if kinds else default
    wide = kinds[0]
    for d in kinds[1:]:
        wide = torch.promote_types(wide, d)
    sixteen = [d for d in kinds if is_sixteen(d)]
    return sixteen[0] if sixteen and accumulation_dtype(wide) == torch.float32 else wide


def _powers_of_two(exponents: Tensor, dtype: torch.dtype) -> Tensor:
    """``2^exponents`` in ``dtype`` (exact where the powers are normal numbers of ``dtype``)."""
    return torch.pow(2.0, exponents.to(torch.float64)).to(dtype)
