"""K-FAC noise: a matrix-variate Gaussian per layer (Wen et al., appendix A.6 and A.8).

For a Linear/Conv layer with weight viewed as ``W`` (``out x in'``, ``in' = in * kernel``,
row-major like ``weight.view(out, -1)``) and per-position inputs ``a`` and pre-activation
gradients ``g = d NLL / d z``, K-FAC approximates the layer's Fisher block by ``kron(G, A)`` for
the row-major flattening of ``W`` (docs/conventions.md's convention), and the bias block by ``G``:

* ``A = (1/(N T)) sum_{n,t} a_nt a_nt^T`` (``T`` positions per example: 1 for a Linear layer on a
  vector, the spatial size for a convolution),
* ``G = k * sum_{n,t} g_nt g_nt^T`` with ``k = w`` (``"mc"``, labels drawn from the model; ``w`` as
  in :mod:`curvlab._losses`) or ``k = e = 1/(N c^2)`` ("mean") / 1 ("sum") (``"empirical"``, the
  data labels).

For one example and position this is exact (``grad W = g a^T`` and ``vec_row(g a^T) = g (x) a``).

Sampling: with factors ``B`` (``B B^T = G``) and ``C`` (``C^T C = A``),
``eps_W = scale * B Z C`` with ``Z`` standard normal has ``Cov(vec_row(eps_W)) = scale^2 * (B B^T) (x)
(C^T C) = scale^2 * kron(G, A)``, and ``eps_b = scale * B z`` has ``Cov = scale^2 * G``; weight and
bias are drawn independently. A factor is the eigen-decomposition square root ``sqrt(Lambda) V^T``
(canonical: eigenvalues at rounding level are zero, eigenvector signs fixed), whether the Gram
matrices come from the training step's own backward pass (:meth:`KFACNoise.capture`) or from a pass
of the engine (:func:`curvlab.kfac`, any model and layout): both paths draw the same noise.

HuggingFace ``Conv1D`` (GPT-2; ``y = x @ W + b``, ``W`` stored ``(in, out)``) is the Linear layer of
weight ``W.T``: its noise is ``eps_W = scale * (B Z C)^T`` in the parameter's own ``(in, out)``
layout, so ``Cov(vec_row(eps_W)) = scale^2 * kron(A, G)`` (``scale^2 * kron(G, A)`` for
``vec_row(eps_W.T)``). Its factors come from the engine path (the one-pass capture handles
Linear/Conv only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from curvlab._finite import NonFiniteError
from curvlab._losses import loss_spec
from curvlab._numbers import is_budget
from curvlab.backends._layers import input_stats, output_rows
from curvlab.backends._rules import is_hf_conv1d
from curvlab.noise._base import (
    KindedSampler,
    batch_targets,
    check_batch,
    describe_saved,
    diagonal_problem,
    standard_normal_like,
    trainable_params,
)
from curvlab.noise._capture import Taps, tappable_layers
from curvlab.quantities._kfac import DEFAULT_MEMORY_BUDGET, NEVER_RAN, kfac_refuses
from curvlab.quantities._kfac_budget import _fmt_bytes, factor_sizes, fmt_budget

__all__ = ["KFACNoise"]

_KINDS = ("empirical", "mc")
LayerState = dict[str, Tensor]


def _check_finite_evals(evals: Tensor) -> None:
    """Raise :class:`torch.linalg.LinAlgError` where ``evals`` are not finite, as a failed
    decomposition: ``eigh`` of a NaN matrix of size 1 or 2 returns NaN eigenvalues on CPU without
    an error (from size 3 it raises), so before review s20 a model whose factored layers all had
    width <= 2 drew NaN noise where a wider one was refused (:meth:`_FactorTaps._refuse_nonfinite`).
    On a CPU checked for those sizes only, where LAPACK does not refuse such a matrix itself: one
    host read per factor of size 1 or 2 (wider ones add none; docs/noise.md, "Host reads in a
    step"). On another device every factor is checked (one read each, after the decomposition's
    own synchronisation): whether its solver refuses a non-finite matrix is not relied on.

    Raises:
        torch.linalg.LinAlgError: where some eigenvalue is NaN or inf.
    """
    if evals.device.type == "cpu" and evals.numel() > 2:  # LAPACK's eigh raises from size 3
        return
    if not bool(torch.isfinite(evals).all()):
        raise torch.linalg.LinAlgError(
            "KFACNoise: the eigen-decomposition of a K-FAC factor gave eigenvalues that are not "
            "finite: the factor holds NaN or inf"
        )


def _psd_factor(m: Tensor) -> Tensor:
    """``C`` with ``C^T C = m`` for a symmetric PSD ``m``: ``sqrt(Lambda) V^T`` from its
    eigen-decomposition, canonical so that equal matrices (to rounding) give equal factors.

    Eigenvalues at rounding level (below ``dim * eps * max``, e.g. the null space of a Gram matrix
    of fewer rows than columns) are set to zero, and each eigenvector's largest entry is made
    positive; the one-pass (captured) and the separate (engine) path then draw the same noise.
    """
    # float64: the float32 solver fails to converge on the ill-conditioned factors of wide layers
    m64 = m.double() if m.dtype != torch.float64 else m
    try:
        evals, evecs = torch.linalg.eigh(m64)
    except torch.linalg.LinAlgError:  # many repeated (zero) eigenvalues: the SVD of a PSD matrix
        evecs, evals, _ = torch.linalg.svd(m64)
    _check_finite_evals(evals)
    floor = evals.abs().max() * m64.shape[0] * torch.finfo(m.dtype).eps
    evals = torch.where(evals > floor, evals, torch.zeros_like(evals))
    pivot = evecs.abs().argmax(dim=0, keepdim=True)
    evecs = evecs * torch.sign(evecs.gather(0, pivot))
    return (evals.sqrt().unsqueeze(1) * evecs.t()).to(m.dtype)


def _psd_factor_of_rows(rows: Tensor, weight: float) -> Tensor:
    """:func:`_psd_factor` of ``m = weight * rows^T rows`` without forming or decomposing ``m``
    when there are fewer rows ``r`` than columns ``d``.

    The nonzero eigenpairs of ``m`` come from the ``r x r`` matrix ``weight * rows rows^T``
    (``rows^T u / sqrt(lambda)`` are ``m``'s unit eigenvectors); the result is the same canonical
    ``d x d`` factor, its null-space rows zero and first (``eigh``'s ascending order), at the cost
    of an ``r x r`` instead of a ``d x d`` eigen-decomposition (W2's 2048-wide layer at batch 512:
    0.05 s instead of 1.3 s).
    """
    r, d = rows.shape
    if r >= d:
        return _psd_factor(weight * (rows.t() @ rows))
    R = rows.double() * weight**0.5
    lam, U = torch.linalg.eigh(R @ R.t())
    _check_finite_evals(lam)
    floor = lam.abs().max() * d * torch.finfo(rows.dtype).eps
    keep = lam > floor
    lam, U = lam[keep], U[:, keep]
    V = (R.t() @ U) / lam.sqrt()  # d x r': orthonormal eigenvectors of m, ascending eigenvalues
    pivot = V.abs().argmax(dim=0, keepdim=True)
    V = V * torch.sign(V.gather(0, pivot))
    C = torch.zeros(d, d, dtype=torch.float64, device=rows.device)
    C[d - lam.shape[0] :] = lam.sqrt().unsqueeze(1) * V.t()
    return C.to(rows.dtype)


def _layer_states(
    factors: dict[str, Any],
    modules: dict[str, nn.Module],
    owners: dict[int, list[nn.Module]],
    name_of: dict[int, str],
) -> tuple[dict[str, Any], set[str]]:
    """Per layer of ``factors`` (:func:`curvlab.kfac`'s result, emptied here) its state
    ``{"B": out x out, "C": in' x in'}`` with ``B B^T = G`` and ``C^T C = A``, and the names of
    the parameters those states cover.

    A layer whose weight or bias is computed (a parametrization), or tied to a module that is
    not a layer (a GPT head tied to its embedding), gets none: the diagonal covers it. Each
    entry is taken out of ``factors`` before its factors are built, its ``G`` released once
    ``B`` is and its ``A`` once ``C`` is, so ``A``/``G`` and ``B``/``C`` together hold at most
    ``memory_budget``'s count (``in'^2 + out^2`` numbers per layer) plus one layer's
    eigen-decomposition temporaries: before review s23 the whole result stayed until the last
    layer's ``B`` and ``C`` were built (the estimate's peak 2.2x the budget on ten 500-wide
    float64 layers, 1.25x now).
    """
    state: dict[str, Any] = {}
    covered: set[str] = set()
    for name in list(factors):
        f = factors.pop(name)
        layer = modules[name]
        weight, bias = _own(layer, "weight"), _own(layer, "bias")
        if weight is None or (f.has_bias and bias is None):
            continue  # a computed weight or bias (a parametrization): the diagonal
        mine = [weight] + ([bias] if f.has_bias else [])
        if any(not all(_is_layer(o) for o in owners[id(p)]) for p in mine):
            continue  # tied to an embedding (or other module): the diagonal covers it
        covered.update(name_of[id(p)] for p in mine)
        A, G = f.A, f.G
        del f  # the entry's last reference: A and G are held below only
        B = _psd_factor(G).t()  # B B^T = G
        del G  # free before C's decomposition
        state[name] = {"B": B, "C": _psd_factor(A)}  # C^T C = A
        del A, B
    return state, covered


def _check_budget(budget: object) -> None:
    """Refuse a ``memory_budget=`` that is not a number of bytes (:func:`curvlab.kfac`'s test,
    :func:`curvlab._numbers.is_budget`), at construction: before review s20 ``-5``, ``"1GB"``
    and NaN were accepted until the first noisy step.

    Raises:
        ValueError: naming the value and what to pass.
    """
    if not is_budget(budget):
        raise ValueError(
            "KFACNoise: memory_budget must be a number of bytes > 0 (an int, a float or a numpy "
            f"scalar), float('inf') or None (no limit), got {budget!r}"
        )


def _check_factor_memory(
    layers: dict[str, nn.Module], budget: float | None, params: dict[str, nn.Parameter]
) -> None:
    """Refuse, from the weights' shapes before any pass or hook, factors of ``layers`` (the
    layers sharing one weight one block, as in :func:`curvlab.kfac`) over ``budget``.

    The total is :func:`curvlab.kfac`'s (a block of sizes ``(in', out)`` counts ``in'^2 +
    out^2`` numbers of ``max(4, itemsize)`` bytes), so its own check, on the separate path, then
    passes too; the message is KFACNoise's own: :func:`curvlab.kfac`'s offers ``params=``, which
    KFACNoise does not take (found in review s20: following it raised a ``TypeError``).

    Raises:
        ValueError: naming the total, the budget and the largest layers (or, where no layer
            fits on its own, the smallest), and the ways out: a larger ``memory_budget=``,
            freezing the largest layers, or :class:`DiagFisherNoise`.
    """
    _check_budget(budget)
    name_of = {id(p): n for n, p in params.items()}
    blocks: dict[int, tuple[str, nn.Module]] = {}
    for name, module in layers.items():
        blocks.setdefault(id(_own(module, "weight")), (name, module))
    sizes: dict[str, tuple[int, int, int, str, str]] = {}  # -> (in', out, bytes, type, weight)
    for weight_id, (name, module) in blocks.items():
        a, g = factor_sizes(module)
        item = max(4, module._parameters["weight"].element_size())
        what = (type(module).__name__, name_of.get(weight_id, "?"))
        sizes[name] = (a, g, (a * a + g * g) * item, *what)
    total = sum(b for _, _, b, _, _ in sizes.values())
    if budget is None or total <= budget:
        return
    head = (
        f"KFACNoise: the K-FAC factors of the {len(sizes)} layer(s) it factors would take "
        f"{_fmt_bytes(total)}, over memory_budget={fmt_budget(budget)} bytes "
        f"({_fmt_bytes(budget)}); nothing was computed"
    )
    diag = "use DiagFisherNoise (memory of the weights' size) for these steps"
    least_key = min(sizes, key=lambda k: sizes[k][2])
    a, g, least, kind, weight = sizes[least_key]
    if least > budget:
        raise ValueError(
            f"{head}, and not even the smallest, '{least_key}' ({kind}, weight '{weight}': "
            f"A {a}x{a}, G {g}x{g}), fits on its own ({least:,} bytes). Raise memory_budget= "
            f"to at least {total:,} bytes (None for no limit) if the memory is there, or {diag}"
        )
    ranked = sorted(sizes, key=lambda k: -sizes[k][2])
    shown = []
    for key in ranked[:5]:
        a, g, b, kind, weight = sizes[key]
        item = b // (a * a + g * g)
        shown.append(
            f"'{key}' ({kind}, weight '{weight}'): A {a}x{a} = {_fmt_bytes(a * a * item)}, "
            f"G {g}x{g} = {_fmt_bytes(g * g * item)}"
        )
    drop, left = [], total  # the fewest largest layers whose freezing fits the budget
    for key in ranked:
        if left <= budget:
            break
        drop.append(key)
        left -= sizes[key][2]
    frozen = " and ".join(f"model.get_submodule({k!r})" for k in drop[:2])
    more = f" (and {len(drop) - 2} more)" if len(drop) > 2 else ""
    raise ValueError(
        f"{head}. Largest: {'; '.join(shown)}. Options: (1) raise memory_budget= (bytes; None "
        f"for no limit) to at least {total:,} bytes if the memory is there; (2) freeze the "
        f"largest layers for these steps, {frozen}{more}, with .requires_grad_(False): a "
        f"frozen layer is neither trained nor factored; (3) {diag}"
    )


def _check_captured_memory(
    layers: dict[str, tuple[nn.Module, str, str | None]],
    budget: float | None,
    params: dict[str, nn.Parameter],
) -> None:
    """Refuse, before any hook is installed, factors of the tapped ``layers`` over ``budget``:
    the check :meth:`KFACNoise.estimate` makes before its pass (:func:`_check_factor_memory`).

    The tapped layers share no weight (:func:`tappable_layers`), so each is a block of its own.
    Until review s20 the one-pass path never checked ``memory_budget``: a budget of 1,000 bytes
    was refused by :meth:`KFACNoise.estimate` and accepted here, with 1,080,036 bytes of factors.
    """
    _check_factor_memory({name: module for name, (module, _, _) in layers.items()}, budget, params)


class _FactorTaps:
    """Collect each layer's input and output-gradient Gram matrices during one backward pass."""

    def __init__(self, layers: dict[str, tuple[nn.Module, str, str | None]]) -> None:
        self.layers = layers
        self.inputs: dict[str, tuple[str, Tensor, int]] = {}
        self.grads: dict[str, Tensor] = {}
        self.state: dict[str, LayerState] = {}  # the factors built so far (:meth:`factors`)

    def on_forward(self, name: str, module: nn.Module, a: Tensor) -> None:
        self.inputs[name] = input_stats(module, a)  # rows (fewer than the width) or their Gram

    def on_backward(self, name: str, module: nn.Module, a: Tensor, g: Tensor) -> None:
        rows = output_rows(module, g)
        self.grads[name] = rows.t() @ rows

    def factors(self, g_weight: float) -> dict[str, LayerState]:
        """Per layer the factors of ``A = (1/(N T)) sum a a^T`` and ``G = g_weight * sum g g^T``
        (``g_weight`` turns the captured output gradients into those of the Fisher; the same on
        every call, the taps' batch's).

        Each layer's captured statistics are released as soon as its factors are built, so the
        statistics and the factors together hold ``memory_budget``'s count (``in'^2 + out^2``
        numbers per layer) plus one layer's temporaries: before review s23 every layer's
        statistics stayed until the last layer's factors were built (up to twice the count: the
        peak 2.4x the budget on ten 500-wide float64 layers at batch 600, 1.5x now). The factors
        built are kept, so a later call (the
        taps' :meth:`~curvlab.noise._capture.Taps.result` read twice, or again after a layer's
        refusal) gives the same state.
        """
        for name in [name for name in self.inputs if name in self.grads]:
            kind, value, nrows = self.inputs[name]
            try:
                C = _psd_factor_of_rows(value, 1.0 / nrows) if kind == "rows" else None
                if C is None:
                    C = _psd_factor(value / nrows)
                self.state[name] = {"B": _psd_factor(self.grads[name] * g_weight).t(), "C": C}
            except torch.linalg.LinAlgError:
                self._refuse_nonfinite(name)
                raise
            del self.inputs[name], self.grads[name], value, C
        return {name: dict(parts) for name, parts in self.state.items()}

    def _refuse_nonfinite(self, name: str) -> None:
        """After a decomposition of layer ``name``'s factors failed: raise
        :class:`NonFiniteError` where its captured statistics are not finite (one host
        synchronisation, on this failure only; the decompositions synchronised already).

        The step's backward pass gave the loss output a gradient of 0 (or one that is not finite)
        that the capture could not see in the graph (a factor held in a tensor,
        ``torch.where(flag, loss, 0.0)``, ``loss.clamp(max=0)``): each captured output gradient,
        divided by it, is NaN. Before review s20 torch's ``_LinAlgError`` from ``svd`` came out.
        The step raises before the optimizer's: the generator goes back and the parameters stay.
        """
        stats = [self.inputs[name][1], self.grads[name]]
        if all(bool(torch.isfinite(t).all()) for t in stats):
            return  # a failure of the solver itself: torch's error, as it is
        raise NonFiniteError(
            f"KFACNoise: the K-FAC statistics captured at layer {name!r} hold NaN or inf, so no "
            "factors can be computed from them: most likely this step's backward pass gave the "
            "loss a gradient of 0, or one that is not finite, by a factor the autograd graph "
            "does not show (a weight held in a tensor, torch.where(flag, loss, 0.0), "
            "loss.clamp(max=0)), and the captured gradients, divided by it, are NaN. No noise "
            "was added and the parameters are unchanged; for such steps skip the capture and "
            "call noisy.step(inputs=..., targets=...), or multiply the loss by a Python number"
        ) from None


_DIAG = "__diagonal__"
"""State key of the diagonal part (parameters outside single-use Linear/Conv layers)."""
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _own(module: nn.Module, name: str) -> nn.Parameter | None:
    """The module's own parameter ``name`` (``"weight"``, ``"bias"``), never read as
    ``module.weight``: on a ``torch.nn.utils.parametrize``d module that attribute is computed at
    each read, and ``parametrizations.spectral_norm`` in train mode then runs a power iteration
    on the user's ``_u``/``_v`` (found in review s19: every KFACNoise pass moved them, and a
    zero-scale NoisyOptimizer trained another model than the plain loop). ``None`` for a
    computed one (a parametrization, an old-style ``spectral_norm``/``weight_norm`` hook's
    attribute), which has no factors of its own: its parameters get the diagonal."""
    if parametrize.is_parametrized(module, name):
        return None
    return module._parameters.get(name)


def _is_conv1d(module: nn.Module) -> bool:
    """:func:`is_hf_conv1d` without reading a parametrized module's weight (see :func:`_own`)."""
    return not parametrize.is_parametrized(module, "weight") and is_hf_conv1d(module)


def _is_layer(module: nn.Module) -> bool:
    """A layer with K-FAC factors: Linear, Conv1d/Conv2d or HuggingFace ``Conv1D`` that
    :func:`curvlab.kfac` accepts (not a subclass with its own ``forward``, a grouped or
    non-zero-padded convolution: those get the diagonal), whose weight is a parameter of its
    own (a parametrized weight is computed: :func:`_own`)."""
    return (
        (isinstance(module, _LAYERS) or _is_conv1d(module))
        and _own(module, "weight") is not None
        and not kfac_refuses(module)
    )


def _named_layers(
    model: nn.Module, params: dict[str, nn.Parameter]
) -> dict[str, tuple[nn.Module, str, str | None]]:
    """Every Linear/Conv/Conv1D layer with a trainable weight of its own (:func:`_own`):
    ``name -> (module, weight, bias)``."""
    name_of = {id(p): n for n, p in params.items()}
    out = {}
    for name, m in model.named_modules():
        weight = _own(m, "weight") if _is_layer(m) else None
        if weight is not None and id(weight) in name_of:
            bias = _own(m, "bias")
            out[name] = (
                m,
                name_of[id(weight)],
                name_of.get(id(bias)) if bias is not None else None,
            )
    return out


def _block_biases(layers: dict[str, tuple[nn.Module, str, str | None]]) -> dict[str, str | None]:
    """Per layer the name of the bias whose block its ``G`` is, or ``None`` (one pass).

    As :func:`curvlab.kfac`'s ``has_bias``: a layer whose weight another layer shares with a bias
    of its own (or none) has ``G`` summed over both, no single bias's block; those biases get the
    diagonal. (Before, ``draw`` overwrote their diagonal noise with the block's ``G``, the sum
    over both layers: 2.2x to 1600x the bias's Fisher diagonal, found in review.) So does a bias
    that layers with different weights share (``b.bias = a.bias``): each layer's ``G`` holds its
    own calls only (before review s21 ``draw`` gave it each layer's ``B z`` in turn and kept the
    last, 4x below its Fisher diagonal). A bias in a state's diagonal is drawn from it, whatever
    this says (:meth:`KFACNoise.draw`: :func:`curvlab.kfac` gives ``has_bias=False`` also to a
    bias the model reads outside its layer's calls, found per batch).
    """
    biases: dict[str, set[str | None]] = {}
    weights: dict[str, set[str]] = {}  # keyed by the bias: the weights of the layers using it
    for _, wname, bname in layers.values():
        biases.setdefault(wname, set()).add(bname)
        if bname is not None:
            weights.setdefault(bname, set()).add(wname)
    return {
        name: bname
        if bname is not None and biases[wname] == {bname} and weights[bname] == {wname}
        else None
        for name, (_, wname, bname) in layers.items()
    }


def _unused(
    info: dict[str, Any],
    modules: dict[str, nn.Module],
    name_of: dict[int, str],
    rest: list[str],
    diag: dict[str, Tensor],
) -> set[str]:
    """The parameters among ``rest`` of the layers :func:`curvlab.kfac` found never ran
    (``info["skipped"]``) whose Fisher diagonal ``diag`` is zero: not used on the batch.

    They get no entry in the diagonal, as the captured state has none for a layer whose hooks
    never fired: zeros there were drawn before the layers' factors, so the generator, and every
    layer's noise, differed between the engine and the one-pass path (found in review). A
    layer's weight that the model reads without calling the layer (``out_proj`` of
    ``nn.MultiheadAttention``: the layer never runs) has a nonzero diagonal and keeps it. One
    host synchronisation, only when some layer never ran.
    """
    idle = [
        name_of[id(p)]
        for name, why in info.get("skipped", {}).items()
        if why == NEVER_RAN
        for p in (_own(modules[name], "weight"), _own(modules[name], "bias"))
        if p is not None and name_of.get(id(p)) in rest
    ]
    idle = list(dict.fromkeys(idle))
    if not idle:
        return set()
    nonzero = torch.stack([diag[n].ne(0).any() for n in idle]).tolist()
    return {n for n, used in zip(idle, nonzero) if not used}


class KFACNoise(KindedSampler):
    """Matrix-variate Gaussian noise with each layer's K-FAC Fisher block as covariance.

    For every Linear/Conv1d/Conv2d layer, ``eps_W`` has mean zero and covariance exactly
    ``scale**2 * kron(G, A)`` for ``W`` viewed row-major as ``(out, in * kernel)``, and the bias
    ``scale**2 * G`` (the biases of layers that share one weight but each have a bias of their
    own, ``has_bias=False`` in :func:`curvlab.kfac`, get their diagonal Fisher instead, as do a
    bias that layers of different weights share (``b.bias = a.bias``) or that the model also
    reads outside its layer's calls (``layer(x) + layer.bias``; before review s21 both drew
    from ``G``, 4x below their Fisher diagonal on one example), a
    weight shared by a HuggingFace ``Conv1D`` and a layer storing it ``(out, in)``, which
    :func:`curvlab.kfac` refuses, a weight the model also uses outside its layers' calls
    (``F.linear(h, layer.weight)``, which :func:`curvlab.kfac` leaves out: before review s18 it
    got its calls' ``kron(G, A)``, summed variance 0.273 where its Fisher diagonal sums to 0.592),
    and those layers' biases); different layers, and weight and
    bias, are independent. A HuggingFace
    ``Conv1D`` weight (stored ``(in, out)``) gets noise in that layout with covariance
    ``scale**2 * kron(A, G)`` for its own row-major flattening. ``A`` and ``G`` are
    the K-FAC factors of the ``kind`` Fisher (``"empirical"``: data labels; ``"mc"``: labels drawn
    from the model) defined in :mod:`curvlab.noise._kfac`. Sampling costs two matrix products per
    layer; the factors (eigen-decompositions) are meant to be recomputed only every ``k`` steps
    (``NoisyOptimizer(recompute_every=k)``). ``kind="empirical"`` can be measured inside the training
    step's own backward pass.

    Args:
        kind: ``"empirical"`` (default) or ``"mc"``.
        scale, large_batch, small_batch: the noise scale, as for :class:`DiagFisherNoise`.
        memory_budget: bytes for all layers' factors together (``None`` for no limit; a number
            ``> 0`` or ``float("inf")``, checked here), checked from the weights' shapes before
            any pass on both paths, with :func:`curvlab.kfac`'s count and an error of
            KFACNoise's own: by :meth:`estimate` before :func:`curvlab.kfac`'s pass, and by
            :meth:`capture` before it taps the training step. A layer of sizes ``(in', out)``
            counts ``in'^2 + out^2`` numbers of ``max(4, itemsize)`` bytes (``A`` and ``G``; the
            state's ``C`` and ``B`` have the same sizes); the float64 copies that one layer's
            eigen-decompositions make while the factors are computed (a few ``in' x in'`` and
            ``out x out`` float64 matrices, one layer at a time) are not counted. Each layer's
            ``A`` and ``G`` (or captured statistics) are released as its ``B`` and ``C`` are
            built, so both together stay within the count plus those temporaries (before
            review s23 every layer's stayed to the end: 2.2x the budget). Weights tied
            to other modules (a GPT head tied to its embedding) get the diagonal and no
            factors, so they do not count.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> eps = KFACNoise(scale=0.1).sample(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> eps["2.weight"].shape
        torch.Size([2, 4])
    """

    kinds = _KINDS
    default_kind = "empirical"

    def __init__(
        self,
        kind: str | None = None,
        *,
        scale: float | None = None,
        large_batch: int | None = None,
        small_batch: int | None = None,
        memory_budget: float | None = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        super().__init__(kind, scale=scale, large_batch=large_batch, small_batch=small_batch)
        _check_budget(memory_budget)
        self.memory_budget = memory_budget

    def estimate(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Any,
        targets: Tensor | None,
        generator: torch.Generator,
    ) -> dict[str, Any]:
        """Per layer the factors ``B`` and ``C`` (``B B^T = G``, ``C^T C = A``) of
        :func:`curvlab.kfac`'s ``A`` and ``G`` for the Linear/Conv weights that only layers use
        (a weight shared by several layers, or a layer applied more than once, gets ``kfac``'s
        factors of it: ``A`` averaged over its uses, ``G`` summed), and the diagonal of the same
        Fisher for every other parameter (embeddings, norms, a head tied to an embedding, a weight
        the model also uses outside its layers' calls and its layer's bias, which
        :func:`curvlab.kfac` leaves out): one pass of the engine each (any model, any layout,
        ``ignore_index``).

        A layer that did not run on the batch has no entry, as in the captured state: its
        parameters get no noise (they have no gradient), and the generator draws the other
        layers' noise as on the one-pass path. Its parameters keep the diagonal when the model
        uses them without calling the layer (``nn.MultiheadAttention``'s ``out_proj``): their
        Fisher diagonal is not zero then.
        """
        from curvlab.quantities._diagonal import diag_fisher
        from curvlab.quantities._kfac import kfac_where_batch_major

        check_batch(inputs, targets, needs_targets=self.kind == "empirical")
        targets = batch_targets(model, loss_fn, inputs, targets, "KFACNoise")
        params = trainable_params(model)
        name_of = {id(p): n for n, p in params.items()}
        owners: dict[int, list[nn.Module]] = {}
        for _, m in model.named_modules():
            for p in m._parameters.values():
                if p is not None and id(p) in name_of:
                    owners.setdefault(id(p), []).append(m)
        batch = (inputs, targets)
        # factors only for the weights every owner of which is a layer (no tied head's V x V G),
        # and not for a weight that a HuggingFace Conv1D (stored (in, out)) shares with a layer
        # storing it (out, in): kfac refuses it (KFACNoise raised that refusal, found in review)
        # (a layer's own weight only: never m.weight, which runs a parametrization, _own)
        weights = [_own(m, "weight") for _, m in model.named_modules() if _is_layer(m)]
        eligible = {
            id(w)
            for w in weights
            if w is not None
            and id(w) in owners
            and all(_is_layer(o) for o in owners[id(w)])
            and len({_is_conv1d(o) for o in owners[id(w)]}) == 1
        }
        if eligible:  # the blocks kfac selects below, checked with KFACNoise's own message
            chosen = {
                name: m
                for name, m in model.named_modules()
                if _is_layer(m) and id(_own(m, "weight")) in eligible
            }
            _check_factor_memory(chosen, self.memory_budget, params)
        if eligible or not any(
            isinstance(m, _LAYERS) or _is_conv1d(m) for _, m in model.named_modules()
        ):
            # without any layer at all, kfac raises its own error; layers that do not hold the
            # examples in their first dimension, or never ran, get the diagonal below
            factors = kfac_where_batch_major(
                model,
                loss_fn,
                batch,
                kind=self.kind,
                generator=generator,
                params=(lambda _, p: id(p) in eligible) if eligible else None,
                memory_budget=self.memory_budget,
            )
        else:  # every layer's weight is tied to another module: the diagonal covers them all
            factors = {}
        modules = dict(model.named_modules())
        # factors' entries go as their B and C are built (its info stays, for _unused)
        state, covered = _layer_states(factors, modules, owners, name_of)
        rest = [n for n in params if n not in covered]
        if rest:
            diag = diag_fisher(
                model,
                loss_fn,
                batch,
                kind=self.kind,
                generator=generator if self.kind == "mc" else None,
            )
            unused = _unused(getattr(factors, "info", {}), modules, name_of, rest, diag)
            kept = {n: diag[n] for n in rest if n not in unused}
            if kept:
                state[_DIAG] = kept
        return state

    def draw(
        self, model: nn.Module, state: dict[str, LayerState], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """``scale * B Z C`` per weight and ``scale * B z`` per bias (zeros for untouched layers)."""
        params = trainable_params(model)
        noise = {n: torch.zeros_like(p.detach()) for n, p in params.items()}
        for n, d in state.get(_DIAG, {}).items():  # parameters outside single-use layers
            noise[n] = standard_normal_like(d, generator).mul_(d.sqrt().mul_(self.scale))
        layers = _named_layers(model, params)
        block_bias = _block_biases(layers)  # biases of shared-weight layers: the diagonal
        diagonal = state.get(_DIAG, {})
        for name, (module, wname, _) in layers.items():
            if name not in state:
                continue
            # a bias with a diagonal (has_bias=False in kfac: read outside the layer's calls,
            # shared with a layer of another weight) keeps it: B z overwrote it before review s21
            bname = block_bias[name] if block_bias[name] not in diagonal else None
            b_factor, c_factor = state[name]["B"], state[name]["C"]
            z = torch.randn(
                (b_factor.shape[1], c_factor.shape[0]),
                generator=generator,
                device=b_factor.device,
                dtype=b_factor.dtype,
            )
            eps = self.scale * (b_factor @ (z @ c_factor))  # (out, in'): the (out, in) view
            if is_hf_conv1d(module):  # stored (in, out): Cov(vec_row(eps.T)) = kron(A, G)
                eps = eps.t().contiguous()
            noise[wname] = eps.reshape(params[wname].shape)
            if bname is not None:
                zb = torch.randn(
                    (b_factor.shape[1],),
                    generator=generator,
                    device=b_factor.device,
                    dtype=b_factor.dtype,
                )
                noise[bname] = self.scale * (b_factor @ zb)
        return noise

    def _saved_problem(self, saved: Any, model: nn.Module) -> str | None:
        """A saved state must hold, per Linear/Conv layer it names, factors ``B`` (``out x out``)
        and ``C`` (``in' x in'``) of the layer's weight, and diagonals shaped like the trainable
        parameters no such entry covers (a captured state has no entry for a layer that did not
        run: its parameters have no gradient, and get no noise)."""
        if not isinstance(saved, dict):
            return f"{describe_saved(saved)}, not K-FAC factors"
        params = trainable_params(model)
        layers = _named_layers(model, params)
        block_bias = _block_biases(layers)
        diag = saved.get(_DIAG, {})
        covered: set[str] = set()
        for name, entry in saved.items():
            if name == _DIAG:
                continue
            if name not in layers or not isinstance(entry, dict) or set(entry) != {"B", "C"}:
                return f"{describe_saved(saved)}, not K-FAC factors: no layer's factors at {name!r}"
            module, wname, _ = layers[name]
            weight = params[wname]
            out = weight.shape[1] if is_hf_conv1d(module) else weight.shape[0]
            want = {"B": (out, out), "C": (weight.numel() // out,) * 2}
            for key, shape in want.items():
                got = entry[key]
                if not isinstance(got, Tensor) or tuple(got.shape) != shape:
                    what = describe_saved(got)
                    return f"K-FAC factors whose {key} of layer {name!r} is {what}, not {shape}"
            bname = block_bias[name]  # a bias in the diagonal is drawn from it (draw)
            if isinstance(diag, dict) and bname in diag:
                bname = None
            covered.update(n for n in (wname, bname) if n is not None)
        rest = {n: p for n, p in params.items() if n not in covered}
        problem = diagonal_problem(diag, rest, "the diagonal of the rest", every=False)
        return None if problem is None else f"K-FAC factors with {problem}"

    def capture(
        self, model: nn.Module, loss_fn: nn.Module, generator: torch.Generator
    ) -> Taps | None:
        """Measure the empirical factors inside the user's forward/backward (``None`` for "mc").

        As :meth:`DiagFisherNoise.capture`: a step whose backward pass is not that of
        ``loss_fn(model(inputs), targets)`` alone measures in a separate pass of :meth:`estimate`,
        and so does a step in which a parameter enters the graph other than once through its
        layer's call (a weight the model reads without calling its layer, as
        ``nn.MultiheadAttention`` reads ``out_proj``, or reads beside that call): the taps see no
        statistics of such a use (before review s18 its noise was 0.0 here, where the engine path
        draws its diagonal). Found from the autograd graph's metadata, no host synchronisation.

        Raises:
            ValueError: the tapped layers' factors exceed ``memory_budget`` (or it is not a
                number of bytes), before any hook is installed: :meth:`estimate`'s check.
        """
        if self.kind != "empirical":
            return None
        spec = loss_spec(loss_fn)
        params = trainable_params(model)
        layers = tappable_layers(model, params)
        if layers is None:  # a separate pass (see estimate)
            return None
        # the budget, from the shapes, before any hook or pass (the separate path's check)
        _check_captured_memory(layers, self.memory_budget, params)
        collect = _FactorTaps(layers)

        def finish(taps: Taps) -> dict[str, LayerState]:
            return collect.factors(spec.captured_empirical_factor(taps.batch_size()))

        return Taps(
            model,
            loss_fn,
            layers,
            on_forward=collect.on_forward,
            on_backward=collect.on_backward,
            finish=finish,
            params=params,
            layouts=self.layouts(),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, scale={self.scale:.6g})"
