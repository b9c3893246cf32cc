"""Kronecker-factored (K-FAC) approximations of the Fisher blocks of Linear and Conv layers.

Layers: ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (groups 1, integer zero padding) and
HuggingFace's ``transformers.pytorch_utils.Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``).

Convention (docs/conventions.md): a weight ``W`` is viewed as a matrix ``(out, in * kernel)`` and
flattened row-major (``W.reshape(-1)``, PyTorch's own order). Its Fisher block is approximated by
``kron(G, A)`` with

* ``A = (1/N_b) sum_n (1/T_n) sum_t u_{n,t} u_{n,t}^T`` (input side, ``in*kernel x in*kernel``),
  ``u_{n,t}`` the layer input (a patch of it for convolutions) of example ``n`` at output position
  ``t`` of ``T_n``, the positions of all the calls of the layer's weight on the example (one
  call on ``T`` positions: ``T_n = T``; calls on ``T_1, ..., T_R`` positions: ``T_n = T_1 + ...
  + T_R``, a call on more positions weighs more, as the same positions in one call would; before
  review s21 each call's own mean weighed ``1/R``, an ``A`` of 0.897 where one call on the same
  positions gives 0.728), the sum over the ``N_b`` examples that used the layer: those of the chunks
  (``chunk_size`` examples of a batch) in which it ran, all ``N`` unless the model skips it for
  some batches (a multi-task head, LayerDrop, a data-dependent branch; before review s18 ``A``
  was divided by all ``N`` there, a block ``N/N_b`` too small);
* ``G = w sum_n sum_t delta_{n,t} delta_{n,t}^T`` (output side, ``out x out``), ``delta`` the
  gradient of the example's negative log-likelihood with respect to the layer output, back-propagated
  from the data labels (``"empirical"``), from labels sampled from the model (``"mc"``), or from the
  columns of the loss Hessian's square root (``"exact"``, i.e. KFLR); ``w`` is the matrix's scaling
  (``1/(N c)`` under ``"mean"``, ``1`` under ``"sum"``; the empirical Fisher uses ``1/(N c^2)``).

Extra dimensions follow K-FAC-expand (Eschenhagen et al., NeurIPS 2023): a Linear layer on
``(B, T, d)`` inputs treats its ``T`` positions like a convolution's; ``approx="reduce"`` instead
builds ``A`` from each example's mean input (over all positions of all calls) and ``G`` from its
summed output gradient. A weight applied ``R`` times (one layer called twice, or several Linear
layers sharing one weight) is one block, keyed by the first module's name: ``A`` averages over the
positions of the ``R`` uses, ``G`` sums them. Only uses by
Linear/Conv layers enter: a Linear weight tied to an ``Embedding`` (a GPT output head) gets the
head's factors, the embedding's contribution to that weight's Fisher is not in them. A weight that
only such layers own but that the model also reads outside their calls (``F.linear(h,
layer.weight)``, a matmul or ``F.embedding`` on it, ``nn.MultiheadAttention``'s ``out_proj``) gets
no factors: ``kron(G, A)`` of the calls would miss that use's share of its Fisher block (before
review s18 it was returned, and the one-example block called exact below was not). Its layers are
left out with why in ``info["left_out"]``, found per batch from the autograd graph's structure (the
weight's edges against its layers' calls, no host synchronisation). A call whose
output does not require grad (under ``torch.no_grad()`` inside the forward) is no use: it has no
output gradient and does not enter ``A`` (a layer run only that way keeps ``A`` of its calls and
``G = 0``).

A layer's input is its first argument, passed positionally or by keyword (``layer(input=x)``).
Every call of a layer must hold the examples in the first dimension of its input and output; a
sequence-first layer, inputs reshaped to ``(N*T, d)`` or a layer on features broadcast over the
batch is refused with a ``ValueError`` naming it (told by the leading sizes, and where those equal
``N`` by coincidence, by a forward pass on fewer examples: :mod:`curvlab._layout`). So is a layer
run on some of a chunk's rows only (``layer(x[mask])``, mixture-of-experts routing): which examples
the rows are is not known. Under ``chunk_size=1`` every example runs alone, and such a layer is
used by the examples routed to it (a call on no rows, ``x[mask]`` with no row selected, is no use
and adds nothing). Layers that share a weight but each have a bias of their own get
``has_bias=False``: ``G`` sums their uses, so it is no single bias's block. So does a layer whose
bias a layer of another weight shares (``b.bias = a.bias``), or that the model also reads outside
the layer's calls (``layer(x) + layer.bias``, by any module; found per batch from the bias's edges
in the autograd graph against the calls, as for the weight): ``G`` holds the output gradients of
the calls only (before review s21 it was returned as the bias block, 4x below the one-example
block called exact below); the weight keeps its factors. A module that only holds the bias (BERT's
MLM head, ``decoder.bias = self.bias``) changes nothing.

For a Linear layer (``T = 1``) that one example uses (the data's only one, or the only one whose
batch runs the layer) and whose weight enters the model through that call alone (not tied to an
``Embedding``; a direct use leaves it out, above) ``kron(G, A)`` is the exact block. The bias
block is approximated by ``G`` (exact for ``T = 1``; for convolutions when the output gradients at
different positions are uncorrelated, the same assumption K-FAC makes).

HuggingFace ``Conv1D`` computes ``y = x @ W + b`` with ``W`` stored ``(in, out)``: it is the Linear
layer of weight ``W.T``, and its ``A`` (``in x in``) and ``G`` (``out x out``) are exactly that
Linear layer's. So ``kron(G, A)`` is the block of ``W.T.reshape(-1)`` (the ``(out, in)`` view of the
contract), and the block of the parameter's own row-major flattening ``W.reshape(-1)`` (index
``i * out + o``) is ``kron(A, G)``: example ``n``'s gradient is ``sum_t a_nt g_nt^T`` (``in x out``),
whose flattening is ``sum_t a_nt (x) g_nt``. :meth:`KFACFactors.weight_block` returns the block in
the parameter's own layout (``weight_layout`` says which), ``layout="out_in"`` the contract's.

16-bit models: inputs and output gradients are upcast to float32 before their products, so ``A``
and ``G`` are the float32 sums of the 16-bit values (:mod:`curvlab._precision`), at the cost of a
float32 copy of one call's input columns or output gradients at a time.

Memory: the factors of a layer take ``(in'^2 + out^2)`` numbers; a tied GPT-2 head has
``out = 50257`` (a 10 GB ``G`` in float32). Before any forward pass :func:`kfac` adds up every
block's factor size from the shapes alone and raises a ``ValueError`` naming the largest layers
when the total exceeds ``memory_budget`` (:data:`DEFAULT_MEMORY_BUDGET` bytes unless given).

Layout: this module holds the public API, the pass driver and the checks of its results; the
layers that get factors and the hooks that capture their calls are in
:mod:`curvlab.quantities._kfac_layers`, the factor sums in :mod:`curvlab.quantities._kfac_sums`,
the memory budget in :mod:`curvlab.quantities._kfac_budget`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._data import (
    call_model,
    iter_chunks,
    num_examples,
    raise_if_part_failed,
    slice_inputs,
)
from curvlab._differentiating_forward import watched_finding
from curvlab._finite import NonFiniteError, all_finite, check_parameters_finite
from curvlab._layout import (
    MISPLACED_HINT,
    ExamplesApart,
    NotSplittable,
    examples_mixed,
    finding_error,
    leading,
    misplaced,
    probe_size,
    shareable,
)
from curvlab._losses import loss_spec
from curvlab._notrace import buffer_snapshot, buffers_kept, each_forward_on, leave_no_trace
from curvlab._numbers import is_count, is_positive
from curvlab._precision import accumulation_dtype, is_sixteen
from curvlab._results import ParamDict
from curvlab._rng import check_randomness, make_generator
from curvlab._scan import scan_model
from curvlab._selection import Params
from curvlab._text import few
from curvlab._vocabulary import quantity_kind
from curvlab.backends._layers import draw_labels  # noqa: F401  (tests check _kfac has it)
from curvlab.backends._rules import is_hf_conv1d
from curvlab.backends._validation import check_batchnorm
from curvlab.distributed import (
    RankFailure,
    active,
    collective,
    decode_counts,
    encode_counts,
    raise_for,
    rank_generator,
)
from curvlab.operators._state import tensor_versions
from curvlab.quantities._kfac_budget import check_memory, factor_sizes, fmt_budget
from curvlab.quantities._kfac_layers import (
    _call_nodes,
    _capture,
    _checked_weights,
    _leave_out,
    _paused,
    _select_layers,
    _sole_biases,
    _unlike_plain,
    _uses_outside,
    _weight_key,
    is_kfac_layer,  # noqa: F401  (kept importable from here)
    kfac_refuses,  # noqa: F401  (imported from here by curvlab.noise._kfac)
)
from curvlab.quantities._kfac_sums import _add_input_side, _add_output_side, _passes
from curvlab.quantities._sweep import DEFAULT_CHUNK_SIZE, Counter

__all__ = ["kfac", "KFACFactors", "KFAC_KINDS", "KFAC_APPROX", "DEFAULT_MEMORY_BUDGET"]

KFAC_APPROX = ("expand", "reduce")

KFAC_KINDS = ("mc", "exact", "empirical")

NEVER_RAN = "it never ran"
"""Why :func:`kfac_where_batch_major` left out a layer no chunk ran (``info["skipped"]``)."""

NEVER_RAN_WHY = (
    "it never ran: no batch called its forward, so K-FAC has no statistics for it (where the "
    "model does not use its weight otherwise either, its Fisher block on this data is zero)"
)
"""Why :func:`kfac` left out a selected layer no chunk ran (``info["left_out"]``)."""

NO_ROWS_WHY = (
    "its forward was called on no rows only (layer(x[mask]) with no row selected, in every "
    "batch), so K-FAC has no statistics for it (where the model does not use its weight "
    "otherwise either, its Fisher block on this data is zero)"
)
"""Why :func:`kfac` left out a selected layer whose calls were all on no rows: it was reported
as "it never ran: no batch called its forward", which its forward had been (found in review
s19)."""

DEFAULT_MEMORY_BUDGET = 4 * 2**30
"""Default ``memory_budget`` of :func:`kfac`: 4 GiB for all factors of the result together (GPT-2
small's 48 transformer-block layers need 1.3 GB in float32; its tied 50257-token head alone 10 GB)."""


@dataclass
class KFACFactors:
    """The K-FAC factors of one layer: weight block ``~ kron(G, A)``, bias block ``~ G``.

    ``kron(G, A)`` is the block of the weight viewed as ``(out, in*kernel)`` and flattened row-major.
    For HuggingFace ``Conv1D`` (weight stored ``(in, out)``, ``weight_layout == "in_out"``) that view
    is ``W.T``; the block of the stored ``W.reshape(-1)`` is ``kron(A, G)``.

    Attributes:
        A: input-side factor, ``(in*kernel, in*kernel)``.
        G: output-side factor, ``(out, out)``.
        module_type: the layer's class name.
        weight_shape: shape of the layer's weight (``(in, out)`` for HuggingFace ``Conv1D``).
        has_bias: whether :meth:`bias_block` is the block of a trainable bias: the layer has
            one, every layer sharing its weight uses that same bias, no layer of another
            weight shares it, and the model reads it through those layers' calls only (layers
            that share a weight but each have a bias of their own get ``False``: ``G`` sums all
            their uses, so it is no single bias's block; a bias shared with a layer of another
            weight, or read outside the calls (``layer(x) + layer.bias``), gets ``False``:
            ``G`` misses the other uses).
        weight_layout: ``"out_in"`` (the weight is ``(out, in, *kernel)``: Linear, Conv) or
            ``"in_out"`` (stored transposed, ``(in, out)``: HuggingFace ``Conv1D``).
    """

    A: Tensor
    G: Tensor
    module_type: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    weight_layout: str = "out_in"

    def weight_block(self, layout: str = "param") -> Tensor:
        """The dense approximation of the weight's Fisher block.

        Args:
            layout: ``"param"`` (default): for the parameter's own row-major flattening
                ``weight.reshape(-1)``, i.e. ``kron(G, A)`` for Linear/Conv and ``kron(A, G)`` for
                HuggingFace ``Conv1D``; ``"out_in"``: ``kron(G, A)``, for the weight viewed as
                ``(out, in*kernel)`` (``weight.T`` for ``Conv1D``) flattened row-major.
        """
        if layout not in ("param", "out_in"):
            raise ValueError(f"layout must be 'param' or 'out_in', got {layout!r}")
        if layout == "param" and self.weight_layout == "in_out":
            return torch.kron(self.A, self.G)
        return torch.kron(self.G, self.A)

    def bias_block(self) -> Tensor | None:
        """The approximation ``G`` of the bias block, or ``None`` without a bias."""
        return self.G if self.has_bias else None

    def eigh(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Eigendecompositions ``(evals_A, evecs_A, evals_G, evecs_G)`` of the symmetric factors.

        The eigenvalues of ``kron(G, A)`` are all products ``evals_G[i] * evals_A[j]``.
        """
        evals_a, evecs_a = torch.linalg.eigh(self.A)
        evals_g, evecs_g = torch.linalg.eigh(self.G)
        return evals_a, evecs_a, evals_g, evecs_g


@collective
def kfac(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    kind: str = "mc",
    *,
    mc_samples: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    approx: str = "expand",
    params: Params = None,
    memory_budget: float | None = DEFAULT_MEMORY_BUDGET,
) -> ParamDict:
    """K-FAC factors of every ``Linear``, ``Conv1d``, ``Conv2d`` and HuggingFace ``Conv1D`` layer
    with a trainable weight.

    See the module docstring for the exact definition of ``A`` and ``G`` and their scaling.
    The factors are computed with curvlab's own forward hooks and autograd (``backend="torch"``),
    which works for any model graph, residual connections included.

    Args:
        model: the model (BatchNorm in eval mode).
        loss_fn: a supported loss (mean or sum reduction).
        data: one batch or an iterable of batches.
        kind: ``"mc"`` (labels sampled from the model), ``"exact"`` (KFLR) or ``"empirical"``.
        mc_samples: label draws per example for ``"mc"``.
        seed, generator: randomness of the label draws.
        chunk_size: examples processed at once.
        approx: how extra (sequence, weight-sharing) dimensions enter (Eschenhagen et al.,
            NeurIPS 2023): ``"expand"`` (default; every position is an example of the layer:
            ``A`` averages positions and uses, ``G`` sums them) or ``"reduce"`` (``A`` from each
            example's mean input over positions and uses, ``G`` from its summed output gradient).
            Both are exact for a Linear layer on vectors used once.
        params: only the layers whose weight is selected (names, module prefixes or a
            predicate ``(name, param) -> bool``); hooks go on those layers alone, so a selection
            also costs less. ``None``: every layer. Parameter names are
            ``model.named_parameters()``'s: a weight tied to an embedding is named after the
            embedding (GPT-2's head: ``"transformer.wte.weight"``).
        memory_budget: the most bytes the factors of all selected blocks may take together
            (``(in'^2 + out^2)`` numbers per block, 4 bytes each in float32 and for 16-bit
            models, 8 in float64), checked from the shapes before any forward pass: a number
            ``> 0`` (``int``, ``float`` or a numpy scalar); ``None`` or ``float("inf")``: no
            limit. The pass itself holds one more temporary of the largest factor's size (the
            factors are scaled in place); under ``torch.distributed`` the all-reduce copies
            the sums into one buffer: twice the factors' size at the end of the call.
            Default :data:`DEFAULT_MEMORY_BUDGET` (4 GiB).

    Returns:
        dict module name -> :class:`KFACFactors` (a :class:`~curvlab.ParamDict` with
        ``.backend == "torch"``; ``info["factor_bytes"]`` holds the factors' size, and
        ``info["left_out"]`` the selected layers left out, each with why: those whose weight is
        computed from the parameters trained, by a ``torch.nn.utils.parametrize``
        parametrization or the old-style ``spectral_norm``/``weight_norm`` hooks, have no
        factors of their own; so do those whose weight the model also uses outside their calls
        (``F.linear(h, layer.weight)``; see the module docstring), and those no batch ran; their
        Fisher diagonal is in :func:`curvlab.diag_fisher`).

    Raises:
        ValueError: if the factors would exceed ``memory_budget``; the message names the largest
            layers with their factor sizes and the ways out (leave them out with ``params=``,
            raise the budget, or their Fisher diagonal from :func:`curvlab.diag_fisher`); when
            no selected layer fits on its own, it names the smallest and the budget it needs. Also
            for a layer that does not hold the examples in its first dimension (see the module
            docstring), named with the same ways out, and for a model that mixes the examples
            of a batch (feature centering over the batch, in-batch contrastive logits:
            :class:`curvlab._layout.ExamplesApart`), before the backward passes; for selected
            layers that are TorchScript modules (``torch.jit.script``/``trace``: hooks do not
            run on them), naming them, before any pass; and for a batch without a batch axis
            (the model runs on it but not on some of its examples: a ``DataLoader`` with
            ``batch_size=None``), before the backward passes.
        NonFiniteError: for non-finite parameters or inputs (before any pass), and for a factor
            that comes out NaN or inf although they are finite (the forward pass overflows or
            gives NaN for some example), naming the layer and the factor.

    Example:
        >>> import torch, curvlab as cl
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> f = cl.kfac(model, torch.nn.CrossEntropyLoss(), (X, y), kind="exact")
        >>> f["2"].weight_block().shape
        torch.Size([8, 8])
    """
    return _kfac(
        model,
        loss_fn,
        data,
        kind,
        mc_samples=mc_samples,
        seed=seed,
        generator=generator,
        chunk_size=chunk_size,
        approx=approx,
        params=params,
        memory_budget=memory_budget,
    )


@collective
def kfac_where_batch_major(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    kind: str = "mc",
    *,
    generator: torch.Generator | None = None,
    params: Params = None,
    memory_budget: float | None = DEFAULT_MEMORY_BUDGET,
) -> ParamDict:
    """:func:`kfac` for the layers that hold the examples in their first dimension; the others
    (and layers that never ran) are left out of the result instead of raising (for
    :class:`curvlab.noise.KFACNoise`, which gives their parameters the Fisher diagonal).
    ``info["skipped"]`` lists the layers left out."""
    return _kfac(
        model,
        loss_fn,
        data,
        kind,
        generator=generator,
        params=params,
        memory_budget=memory_budget,
        skip_misplaced=True,
    )


def _kfac(model: nn.Module, loss_fn: nn.Module, data: Any, kind: str, **kw: Any) -> ParamDict:
    """:func:`_kfac_factors` on copies of the model's buffers: reading a parametrized weight
    (``layer.weight``, for its shape) runs its parametrization, and ``spectral_norm`` in train
    mode then takes a power-iteration step on its buffers in place (the user's model would
    change)."""
    with buffers_kept(model, every=False):
        return _kfac_factors(model, loss_fn, data, kind, **kw)


def _kfac_factors(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    kind: str,
    *,
    mc_samples: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    approx: str = "expand",
    params: Params = None,
    memory_budget: float | None = DEFAULT_MEMORY_BUDGET,
    skip_misplaced: bool = False,
) -> ParamDict:
    kind = quantity_kind(kind, KFAC_KINDS)
    if not is_count(mc_samples):
        raise ValueError(f"mc_samples must be an int >= 1 (not a bool), got {mc_samples!r}")
    mc_samples = int(mc_samples)
    check_randomness(seed, generator, both=kind == "mc")
    spec = loss_spec(loss_fn)
    scan = scan_model(model)
    check_batchnorm(scan)
    check_parameters_finite(scan.trainable)
    layers, left_out = _select_layers(model, params)
    if approx not in KFAC_APPROX:
        raise ValueError(f"approx must be one of {KFAC_APPROX}, got {approx!r}")
    # modules sharing one weight form one block, keyed by the first of them
    first: dict[int, str] = {}
    group = {name: first.setdefault(_weight_key(m), name) for name, m in layers.items()}
    try:
        factor_bytes = check_memory(layers, group, memory_budget, scan.params)
    except ValueError:
        _refuse_if_none_fits(layers, group, memory_budget, scan.params)
        raise
    gen = rank_generator(make_generator(seed, generator, scan.device)) if kind == "mc" else None
    A_raw: dict[str, Tensor] = {}
    G_raw: dict[str, Tensor] = {}
    used: dict[str, int] = {}  # block -> examples of the chunks that used it (A's N)
    counter = Counter(spec)
    comm = active()
    skipped: dict[str, str] = {}  # misplaced layers -> why
    # blocks whose weight the model also uses outside their layers' calls -> why (left out)
    outside: dict[str, str] = {}
    no_rows: set[str] = set()  # layers called on no rows (layer(x[mask]), nothing selected)
    checked = _checked_weights(model, layers, group)
    sole = _sole_biases(model, layers, group)  # the biases G can be the block of
    bias_outside: set[str] = set()  # blocks whose bias the model also reads outside the calls
    name_of = {id(p): nm for nm, p in scan.params.items()}
    coupled: str | None = None  # why the model mixes the examples (under DDP: agreed after)
    probed = checked_plain = paired = False
    buffers = buffer_snapshot((m for _, m in scan.modules))
    failure: Exception | None = None  # under DDP: raised after the gather, on every rank
    try:
        with (
            leave_no_trace(model, scan=scan),
            # every chunk's forward on the buffers as they were at the start
            each_forward_on(model, buffers),
            _capture(layers) as store,
        ):
            chunks = iter_chunks(data, chunk_size, scan.device)
            for X, y in chunks:
                n = num_examples(X)
                one, m, apart = None, probe_size(n), None
                if not probed and n > 1:  # leading size n may be a coincidence: fewer examples tell
                    # one pass on m examples (the first and the last) gives the layers' leading
                    # sizes and the outputs for the check that the model keeps the examples apart;
                    # a forward that differentiates (a physics-informed network) has no factors
                    found = watched_finding(model, X, partial(_examples_apart, model, X, layers, m))
                    apart, coupled = found if isinstance(found, tuple) else (None, found)
                    probed = True
                    one = _rows(apart.sizes) if apart is not None else None
                    if coupled is not None and comm is None:
                        _raise_coupled(coupled, data)
                    if coupled is not None:  # no more work; every rank raises after the gather
                        break
                elif not paired and chunks.pair is not None and n == 1:
                    # chunks of one example (chunk_size=1): the check on two examples of the batch,
                    # computed together as the batch would be (found in review: not checked at all)
                    pair = chunks.pair
                    coupled = watched_finding(model, pair, partial(examples_mixed, model, pair))
                    if coupled is not None and comm is None:
                        _raise_coupled(coupled, data)
                    if coupled is not None:  # no more work; every rank raises after the gather
                        break
                elif not paired:  # a first batch of one example: the check has no pass to watch
                    with _paused(store):
                        coupled = watched_finding(model, X, lambda: None)
                    if coupled is not None and comm is None:
                        _raise_coupled(coupled, data)
                    if coupled is not None:  # no more work; every rank raises after the gather
                        break
                paired = True
                for c in store.values():
                    c.inputs.clear()
                    c.outputs.clear()
                raw = call_model(model, X)
                if apart is not None:  # before the backward passes: a coupled model has no factors
                    # the check may run the model again (outputs that differ from the probe's: a
                    # generator of the model's own, a tied max_norm embedding): those passes are
                    # not this chunk's calls (recorded, their leading sizes were blamed on the
                    # layout, found in review)
                    moved = tensor_versions(scan.params.values())
                    with _paused(store):
                        coupled = apart.check(raw)
                    if coupled is None and tensor_versions(scan.params.values()) != moved:
                        # the check's passes rewrote a weight in place (the rows of a max_norm
                        # embedding renormalised again, the same values): this chunk's graph,
                        # which holds the weight (tied to a head), is stale; run it again
                        for c in store.values():
                            c.inputs.clear()
                            c.outputs.clear()
                        raw = call_model(model, X)
                    if coupled is not None and comm is None:
                        _raise_coupled(coupled, data)
                    if coupled is not None:  # no more work; every rank raises after the gather
                        break
                output = spec.prepare(raw, y)
                counter.on_output(output, y)
                counter.add(X, y)
                dropped = {group[name] for name in skipped} | set(outside)
                weights = {k: w for k, w in checked.items() if k not in dropped}
                biases = {
                    k: b for k, b in sole.items() if k not in dropped and k not in bias_outside
                }
                # before the calls on no rows go
                nodes = _call_nodes(store, group, {*weights, *biases})
                no_rows.update(_drop_empty_calls(store))
                sizes = {
                    name: [(leading(x), leading(z)) for x, z in zip(c.inputs, c.outputs)]
                    for name, c in store.items()
                    if name not in skipped
                }
                bad = misplaced(sizes, n, one, m)
                if not checked_plain:  # subclasses with a forward of their own, on the first chunk
                    bad.update(_unlike_plain([nm for nm in layers if nm not in bad], layers, store))
                    checked_plain = True
                if bad and not skip_misplaced and comm is None:  # under DDP: agreed after the pass
                    _raise_misplaced(bad)
                for name in bad:
                    skipped[name] = bad[name]
                    A_raw.pop(group[name], None)
                    G_raw.pop(group[name], None)
                # a weight the model also uses outside its layers' calls has no factors (found in
                # review s18: kron(G, A) of the calls missed that use's share of its Fisher block)
                misplaced_keys = {group[name] for name in skipped}  # those say why already
                weights = {k: w for k, w in weights.items() if k not in misplaced_keys}
                biases = {k: b for k, b in biases.items() if k not in misplaced_keys}
                # a bias read outside the calls too keeps the weight's factors, not G as its
                # block (found in review s21: 4x below the one-example block called exact)
                found, extra_bias = _uses_outside(output, weights, nodes, name_of, biases)
                bias_outside.update(extra_bias)
                for key, why in found.items():
                    outside[key] = why
                    A_raw.pop(key, None)
                    G_raw.pop(key, None)
                # a weight shared with a misplaced layer has no factors either
                dropped = {group[name] for name in skipped} | set(outside)
                names = [nm for nm in layers if store[nm].outputs and group[nm] not in dropped]
                if not names:
                    continue
                zs = [z for n in names for z in store[n].outputs]
                # outputs that do not reach the loss (an auxiliary head, a branch under no_grad)
                # have a zero output gradient: their G is 0, as is their Fisher block
                live = [i for i, z in enumerate(zs) if z.requires_grad]
                sixteen = any(is_sixteen(t.dtype) for t in (output, *zs))
                passes = _passes(spec, kind, output, y, gen, mc_samples, sixteen)
                for i, (target, grad_out, up) in enumerate(passes):
                    got: tuple[Tensor | None, ...] = ()
                    if live and target.requires_grad:
                        got = torch.autograd.grad(
                            target,
                            [zs[j] for j in live],
                            grad_outputs=grad_out,
                            retain_graph=i < len(passes) - 1,
                            allow_unused=True,
                        )
                    found: list[Tensor | None] = [None] * len(zs)
                    for j, g in zip(live, got):
                        found[j] = g
                    grads = tuple(
                        torch.zeros_like(z) if g is None else g for z, g in zip(zs, found)
                    )
                    _add_output_side(G_raw, grads, names, store, layers, group, approx, up)
                _add_input_side(A_raw, names, store, layers, group, approx)
                # the chunk's examples count in the A of the blocks it used (each has a use in A:
                # _uses keeps one call at least); A divided by all N, a head not run on some
                # batches came out N/N_used too small (found in review: 2x, multi-task heads)
                for key in dict.fromkeys(group[nm] for nm in names):
                    used[key] = used.get(key, 0) + n
    except Exception as exc:
        if comm is None:
            raise
        # this rank's data alone failed (a memory refusal of the exact GGN's square root, a
        # data check): the others learn of it in the gather below and raise with it (found in
        # review s19: this rank raised alone while the others waited in the gather)
        failure = exc
    if comm is not None:  # every rank leaves out (or refuses) the layers misplaced on any
        mine = None if failure is None else RankFailure.of(comm.rank, failure)
        gathered = comm.all_gather_object(
            (skipped, shareable(coupled), outside, sorted(no_rows), sorted(bias_outside), mine)
        )
        raise_for([f for *_, f in gathered if f is not None], failure)
        coupled = coupled or next((c for _, c, *_ in gathered if c is not None), None)
        if coupled is not None:  # found on some rank's first chunk: every rank refuses
            _raise_coupled(coupled, data)
        for theirs, _, used_outside, empty, bias_used, _ in gathered:
            bias_outside.update(bias_used)  # the bias block of none, as on all the data
            # a layer called on no rows on some rank's data, never on the others': left out
            # for that reason on every rank, as one process on all the data says (found in
            # review s19: each rank gave its own reason)
            no_rows.update(empty)
            for name, why in theirs.items():
                skipped.setdefault(name, why)
                A_raw.pop(group[name], None)
                G_raw.pop(group[name], None)
            for key, why in used_outside.items():  # every rank leaves the block out
                outside.setdefault(key, why)
                A_raw.pop(key, None)
                G_raw.pop(key, None)
        if skipped and not skip_misplaced:
            _raise_misplaced(skipped)
    return _factors(
        _Sums(A_raw, G_raw, used, counter, {k for k in sole if k not in bias_outside}),
        spec,
        kind,
        mc_samples,
        layers,
        group,
        factor_bytes,
        left_out,
        skipped if skip_misplaced else None,
        outside,
        no_rows,
    )


@dataclass
class _Sums:
    """The raw sums of one :func:`kfac` call on this rank: ``A`` and ``G`` per block, per block
    the examples of the chunks that used it (``A``'s ``N``), the examples and loss terms, and the
    blocks whose bias ``G`` is the block of (``has_bias``: agreed by every rank)."""

    A: dict[str, Tensor]
    G: dict[str, Tensor]
    used: dict[str, int]
    counter: Counter
    biased: set[str]


def _factors(
    sums: _Sums,
    spec: Any,
    kind: str,
    mc_samples: int,
    layers: dict[str, nn.Module],
    group: dict[str, str],
    factor_bytes: int,
    left_out: dict[str, str],
    skipped: dict[str, str] | None = None,
    outside: dict[str, str] | None = None,
    no_rows: set[str] | None = None,
) -> ParamDict:
    """The raw sums (of all ranks) scaled into :class:`KFACFactors`, one per block.

    ``A`` is divided by the examples of the chunks that used its block (a head run on some
    batches only averages those), ``G`` scaled by the loss's weight of all ``N`` examples (the
    others add nothing to it). A block no chunk used (on any rank) has no factors: with
    ``skipped`` (:func:`kfac_where_batch_major`) its layers are recorded there as never run,
    without it in ``left_out`` (a call none of whose selected layers ran raises). The blocks of
    ``outside`` (block -> why: the model also uses the weight outside its layers' calls, agreed
    by every rank) have no factors either; their layers go to ``left_out`` with why. A block's
    bias factor is its layer's alone: ``has_bias`` for the blocks of ``sums.biased`` only
    (:func:`~curvlab.quantities._kfac_layers._sole_biases`, less those whose bias the model
    also reads outside their calls): layers that share a weight but each have a bias of their
    own, a bias shared with a layer of another weight, and a bias read outside the calls
    (``layer(x) + layer.bias``) get ``has_bias=False`` (``G`` is not that bias's block). A
    layer of ``no_rows`` (its forward called on no rows only, :func:`_drop_empty_calls`) is
    left out with :data:`NO_ROWS_WHY`, not as never run.
    """
    A_raw, G_raw, used, counter = sums.A, sums.G, sums.used, sums.counter
    outside = outside or {}
    # misplaced, or used outside their layers' calls (agreed by every rank)
    dropped = {group[name] for name in skipped or {}} | set(outside)
    blocks = [key for key in dict.fromkeys(group.values()) if key not in dropped]
    comm = active()
    if comm is not None:  # example-weighted averages over ranks: add raw sums and counts once
        # (the invalid labels' count too: a label out of range on one rank raises on every
        # rank). Every rank sends every block, zeros for one it did not run (a multi-task head
        # run on other ranks), and the blocks' example counts travel in the same all-reduce
        device = layers[next(iter(layers))].weight.device
        for key in blocks:
            if key not in A_raw:
                a, g = factor_sizes(layers[key])
                dtype = accumulation_dtype(layers[key].weight.dtype)
                A_raw[key] = torch.zeros(a, a, dtype=dtype, device=device)
                G_raw[key] = torch.zeros(g, g, dtype=dtype, device=device)
        counts = encode_counts([used.get(key, 0) for key in blocks], torch.float32, device)
        raw = counter.reduce(
            comm,
            {
                **{("A", k): v for k, v in A_raw.items()},
                **{("G", k): v for k, v in G_raw.items()},
                ("N", ""): counts,
            },
        )
        A_raw = {k: raw[("A", k)] for k in A_raw}
        G_raw = {k: raw[("G", k)] for k in G_raw}
        used = dict(zip(blocks, decode_counts(raw[("N", "")], len(blocks))))
    for key in blocks:
        if not used.get(key, 0):  # never ran (on any rank)
            A_raw.pop(key, None)
            G_raw.pop(key, None)
    for name in layers:  # each layer of such a block, with why (found in review s18: absent)
        if group[name] in outside:
            left_out[name] = outside[group[name]]
    if skipped is not None:
        for name in layers:
            if group[name] not in A_raw and name not in skipped and name not in left_out:
                skipped[name] = NEVER_RAN
    elif not A_raw and outside:
        name, why = next((n, left_out[n]) for n in layers if n in left_out and group[n] in outside)
        raise ValueError(
            f"kfac: none of the selected layers ({few(list(layers), 5)}) has factors: layer "
            f"'{name}' is left out: {why}"
        )
    elif not A_raw:
        raise ValueError(
            f"kfac: none of the selected layers ({few(list(layers), 5)}) ran in the forward "
            "pass (a module whose weight the model uses directly, like nn.MultiheadAttention's "
            "out_proj, is never called): K-FAC has no statistics for them; take their Fisher "
            "diagonal with curvlab.diag_fisher(..., params=...)"
        )
    else:  # a layer no chunk ran (a head the data never routes to) was silently absent
        for name in layers:
            if group[name] not in A_raw and name not in left_out:
                left_out[name] = NO_ROWS_WHY if name in (no_rows or ()) else NEVER_RAN_WHY
    num_examples, terms = counter.examples, counter.terms_per_example()
    if kind == "empirical":
        w = spec.empirical_weight(num_examples, terms)
    else:
        w = spec.ggn_weight(num_examples, terms) / (mc_samples if kind == "mc" else 1)
    # scaled in place: the raw sums are fresh tensors of this call's own, and copies of all of
    # them took the factors' memory twice (found in review: 267 MiB for 137 MiB of factors)
    result = {
        name: KFACFactors(
            A=A_raw[name].div_(used[name]),
            G=G_raw[name].mul_(w),
            module_type=type(layers[name]).__name__,
            weight_shape=tuple(layers[name].weight.shape),
            has_bias=name in sums.biased,
            weight_layout="in_out" if is_hf_conv1d(layers[name]) else "out_in",
        )
        # in the model's order: A_raw's is the order this rank's batches first ran the layers
        # (found in review s21: under DDP two ranks routing heads differently got two orders)
        for name in blocks
        if name in A_raw
    }
    _check_factors_finite(result, kind)
    return ParamDict(
        result,
        backend="torch",
        kind=kind,
        reduction=spec.reduction,
        num_examples=num_examples,
        mc_samples=mc_samples if kind == "mc" else None,
        factor_bytes=factor_bytes,
        left_out=left_out,
        **({} if skipped is None else {"skipped": skipped}),
    )


def _refuse_if_none_fits(
    layers: dict[str, nn.Module],
    group: dict[str, str],
    budget: Any,
    params: dict[str, nn.Parameter],
) -> None:
    """Refuse a budget that not even the smallest selected block's factors fit, naming it.

    :func:`check_memory`'s refusal suggests leaving the largest layers out with ``params=``;
    with every block over the budget on its own that selection left out all of them, and
    following it raised "params selects no Linear/Conv1d/Conv2d weight" (found in review).
    Returns (for :func:`check_memory`'s own error to go on) when the budget is not a number of
    bytes ``> 0`` or some block fits it.

    Raises:
        ValueError: naming the smallest block with its size, the total, and the ways out.
    """
    if not is_positive(budget):  # not a budget (check_memory names it), or inf (all fit)
        return
    sizes: dict[str, tuple[int, int, int]] = {}  # key -> (in', out, bytes)
    for key in dict.fromkeys(group.values()):
        a, g = factor_sizes(layers[key])
        sizes[key] = (a, g, (a * a + g * g) * max(4, layers[key].weight.element_size()))
    key = min(sizes, key=lambda k: sizes[k][2])
    a, g, least = sizes[key]
    if least <= budget:
        return
    name_of = {id(p): n for n, p in params.items()}
    weight = name_of.get(id(layers[key].weight), "?")
    total = sum(b for _, _, b in sizes.values())
    which = (
        f"the one selected layer, '{key}'"
        if len(sizes) == 1
        else f"the smallest of the {len(sizes)} selected layers, '{key}'"
    )
    raise ValueError(
        f"kfac: no selected layer's K-FAC factors fit memory_budget={fmt_budget(budget)} bytes on their "
        f"own: {which} ({type(layers[key]).__name__}, weight '{weight}'), needs {least:,} "
        f"bytes (A {a}x{a}, G {g}x{g}), so leaving layers out with params= cannot help; "
        f"nothing was computed. Raise memory_budget= to at least {least:,} bytes (that layer "
        f"alone, with params=) or {total:,} bytes (all selected layers), or None for no limit, "
        "if the memory is there; or take the layers' Fisher diagonal (memory of the weights' "
        "size) with curvlab.diag_fisher(model, loss_fn, data, params=...)"
    ) from None


def _check_factors_finite(result: dict[str, KFACFactors], kind: str) -> None:
    """Raise :class:`NonFiniteError` naming the first layer whose ``A`` or ``G`` holds NaN or inf.

    The parameters and each batch's inputs were checked finite before the passes; a non-finite
    factor then comes from the forward pass itself (a ``log`` of a negative feature, a float32
    ``exp`` overflow) on some example: NaN factors came back silently before (found in review).
    One reduction per factor (one host synchronisation per device), after the ranks' sums are
    added, so every rank raises alike.
    """
    if all_finite([t for f in result.values() for t in (f.A, f.G)]):
        return
    # the A factors first: the first layer whose inputs are not finite comes right after the
    # overflow (the G factors of the layers before it are NaN through the backward pass)
    bad = [
        (side, name, t)
        for side in ("A", "G")
        for name, f in result.items()
        for t in (f.A if side == "A" else f.G,)
        if not bool(torch.isfinite(t).all())
    ]
    side, name, t = bad[0]
    count = int((~torch.isfinite(t)).sum())
    where = "in the layer's inputs" if side == "A" else "after the layer (its output gradients)"
    others = [f"{s} of '{n}'" for s, n, _ in bad[1:]]
    more = f" and {len(others) - 4} more" if len(others) > 4 else ""
    also = f" (also not finite: {', '.join(others[:4])}{more})" if others else ""
    raise NonFiniteError(
        f"kfac(kind={kind!r}): the {side} factor of layer '{name}' holds {count} non-finite "
        f"value{'s' if count != 1 else ''} (NaN or inf){also} although the parameters and the "
        f"inputs are finite: the forward pass overflows or gives NaN {where} for some example "
        "(e.g. exp overflowing in float32, log or sqrt of a negative value). Find those "
        "examples with torch.isfinite(model(X)).flatten(1).all(1) per batch and drop or fix "
        "them, or use float64 (model.double() and float64 inputs)"
    )


def _drop_empty_calls(store: dict[str, Any]) -> set[str]:
    """Forget the calls of a layer on no rows (leading size 0 in and out: ``layer(x[mask])``
    with no example routed to it, as under ``chunk_size=1`` for the examples a
    mixture-of-experts router sends elsewhere). Such a call adds nothing to ``A`` or ``G``,
    and it is no use of the weight (counted as one, it would halve the average over the uses
    of a layer also called on rows); its leading size 0 was refused as a misplaced layout
    before (found in review). Returns the names of the layers that had such a call."""
    dropped = set()
    for name, c in store.items():
        keep = [i for i, (x, z) in enumerate(zip(c.inputs, c.outputs)) if not _empty(x, z)]
        if len(keep) < len(c.inputs):
            c.inputs[:] = [c.inputs[i] for i in keep]
            c.outputs[:] = [c.outputs[i] for i in keep]
            dropped.add(name)
    return dropped


def _rows(sizes: dict[str, list[tuple[int, int]]]) -> dict[str, list[tuple[int, int]]]:
    """The layout probe's leading sizes without the calls on no rows (:func:`_drop_empty_calls`)."""
    return {name: [s for s in calls if s != (0, 0)] for name, calls in sizes.items()}


def _empty(x: Any, z: Any) -> bool:
    """Whether a call ran on no rows: leading size 0 of its input and of its output."""
    return leading(x) == 0 and leading(z) == 0


def _raise_coupled(why: str, data: Any) -> None:
    """Refuse a model that mixes the examples of a batch (:class:`curvlab._layout.ExamplesApart`),
    or a batch it cannot split into examples (:class:`curvlab._layout.NotSplittable`).

    ``data``: the call's data; a coupling found on the batches of a ``DataLoader(batch_size=None)``
    names the missing batch axis first (:func:`curvlab._layout.finding_error`; found in review:
    a model centring its features over the first axis read one unbatched sample's positions as
    the examples, and the error advised LayerNorm).

    Raises:
        ValueError: naming where the examples mix (or the batch axis) and the way out.
    """
    raise finding_error(why, data)


def _raise_misplaced(bad: dict[str, str]) -> None:
    name, why = next(iter(bad.items()))
    others = f" (also: {few(list(bad)[1:], 4)})" if len(bad) > 1 else ""
    if why.startswith("leading sizes"):
        what = (
            f"has {why}: {MISPLACED_HINT}{others}. K-FAC reads each example's inputs and output "
            "gradients from the first dimension of the layer's input and output, so its factors "
            "would be wrong. A layer run on some examples' rows only (x[mask], mixture-of-experts "
            "routing) is refused too (which examples the rows are is not known); chunk_size=1 "
            "runs each example alone and gives such a layer the factors of the examples routed "
            "to it. Make the model batch-first (e.g. batch_first=True), or"
        )
    else:
        what = f"{why}{others}: K-FAC's factors are those of the plain layer, so"
    raise ValueError(f"kfac: layer '{name}' {what} {_leave_out(name)}")


def _examples_apart(
    model: nn.Module, X: Any, layers: dict[str, nn.Module], m: int
) -> tuple[ExamplesApart | None, NotSplittable | None]:
    """The first chunk's :class:`ExamplesApart` probe (on ``m`` of its examples, recording the
    layers' leading sizes), or, when the model fails there but runs on the whole chunk, the
    finding for a batch without a batch axis (:func:`curvlab._data.part_failed`; found in
    review: a ``DataLoader(batch_size=None)`` gave torch's raw shape error), which every rank
    raises after the gather (raised on one rank alone, the others waited in it)."""
    try:
        return ExamplesApart(model, X, layers), None
    except Exception as e:
        try:
            raise_if_part_failed(model, X, slice_inputs(X, 0, m), e)
        except ValueError as named:
            return None, NotSplittable.of(named)
        raise
