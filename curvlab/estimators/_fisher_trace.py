"""Exact traces from per-example gradients: Tr(F) of Jastrzębski et al., Tr(F^B), Tr(GGN), Tr(EF).

For the objective ``L = w * sum_n NLL_n`` (see :mod:`curvlab._losses`) with ``s_n = grad NLL_n``:

* ``Tr(F) = w * sum_n ||s_n(y_hat_n)||^2`` with labels ``y_hat_n`` drawn once from the model: the trace of
  the ``"fisher"`` operator with the same seed. For ``CrossEntropyLoss(mean)`` this is
  ``(1/N) sum_n ||grad l(x_n, y_hat_n)||^2``, eq. (1) of Jastrzębski et al. (2021), exact per sample.
  Its standard error ``w N std_n(||s_n(y_hat_n)||^2) / sqrt(N)`` is over the examples and their
  drawn labels together: the error against the data distribution's ``Tr(F)``, the examples taken
  as an i.i.d. sample of it (calibrated there: ``E[stderr^2]`` is the estimate's variance). As an
  error bar for this batch's own ``Tr(F)``, where only the labels are random (variance
  ``w^2 sum_n Var_y ||s_n(y)||^2``), it is too wide by the spread of ``E_y ||s_n(y)||^2`` between
  the examples (a ratio of 3.13 in variance on 40 examples; a model whose ``||s_n(y)||^2`` does not
  depend on ``y`` gets its exact value with a standard error that is not 0; review s21). The
  batch's value with no sampling error: ``trace(matrix="ggn", method="exact")`` (the true Fisher
  equals the GGN for curvlab's losses).
* ``Tr(F^B) = ||grad L_B(y_hat)||^2``, the squared norm of one mini-batch gradient at sampled labels
  (with the loss's own reduction), averaged over the batches: the cheap proxy of the paper (appendix
  C). Under ``"mean"`` its expectation is about ``Tr(F) / B`` (cross terms vanish since
  ``E[s_n] = 0``), so it tracks ``Tr(F)`` up to the batch size, not its value.
* ``Tr(G) = w * sum_n tr(J_n^T Lambda_n J_n) = w * sum_n sum_c ||J_n^T m_nc||^2`` with
  ``Lambda_n = M_n M_n^T`` (cross-entropy: ``m_c = sqrt(p_c) (e_c - p)``; MSE: ``sqrt(2) e_c``; BCE:
  ``sqrt(p_c (1 - p_c)) e_c``): the sum of BackPACK's exact GGN diagonal where BackPACK supports the
  model, else one per-example gradient pass per output entry.
* ``Tr(EF) = w' * sum_n ||s_n(y_n)||^2`` (``w' = w / c`` under ``"mean"``, 1 under ``"sum"``).

Per-example gradients come from ``torch.func.vmap`` over ``functional_call``, so any model works
whose forward is per-example (no BatchNorm in train mode); an exact loop over the examples where
``vmap`` has no rule for an operation, or where the forward's random draws are fixed (a freshly
seeded generator: ``vmap`` would draw another matrix for every example,
:mod:`curvlab.backends._random_forward`). Cost: one per-example gradient pass over the
data (``C`` passes for ``Tr(G)``); memory ``chunk_size x D``: ``fisher_trace`` runs every
pass, the forward that draws the labels included, on chunks of at most ``chunk_size`` examples.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> data = (torch.randn(6, 3), torch.randint(0, 2, (6,)))
    >>> res = fisher_trace(model, torch.nn.CrossEntropyLoss(), data, seed=0)
    >>> res.value > 0 and res.num_examples == 6
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from curvlab._compiled import strip_wrappers
from curvlab._data import (
    call_model,
    inputs_to_device,
    iter_chunks,
    num_examples,
    slice_inputs,
    to_device,
)
from curvlab._differentiating_forward import watched_finding
from curvlab._finite import check_parameters_finite
from curvlab._kept_batches import read_batches
from curvlab._layout import examples_mixed, raise_if_mixed
from curvlab._losses import LossSpec, check_counted, loss_spec
from curvlab._notrace import (
    buffer_snapshot,
    each_forward_on,
    leave_no_trace,
    on_buffers,
    plain_attributes_kept,
)
from curvlab._numbers import is_count
from curvlab._reading_rngs import held_generators, held_states, same_state
from curvlab._rng import (
    forward_draws,
    global_rng_kept,
    make_generator,
    reseed_global,
    reseed_held,
    rng_states,
)
from curvlab._scan import model_device, scan_model
from curvlab._selection import Params, select_parameters
from curvlab._stateless import functional_call
from curvlab._vocabulary import matrix_aliases, matrix_name
from curvlab.backends._random_forward import loop_needed, random_op_refused
from curvlab.backends._validation import check_batchnorm
from curvlab.distributed import active, collective, rank_generator

__all__ = [
    "FisherTraceResult",
    "check_no_train_dropout",
    "exact_trace_per_example",
    "fisher_trace",
]


@dataclass
class FisherTraceResult:
    """Tr(F) with sampled labels and its mini-batch proxy Tr(F^B).

    Attributes:
        value: ``Tr(F)`` of the objective (see the module docstring).
        stderr: its standard error over the examples and their drawn labels together: against
            the data distribution's ``Tr(F)`` (the examples an i.i.d. sample of it), too wide as
            an error bar for this batch's own ``Tr(F)`` (see the module docstring).
        batch_value: ``Tr(F^B)``, the mean over batches of ``||grad L_B(y_hat)||^2`` (over the
            batches where it is defined).
        per_batch: ``Tr(F^B)`` of each batch (``nan`` under ``"mean"`` for a batch whose targets
            are all ``ignore_index``: its mean loss is 0/0).
        num_examples: ``N``.
        seed: the seed of the labels (``None`` when a generator was passed).
        by_layer: ``Tr(F)`` of each layer's diagonal block (module name -> value).
        info: how it was computed where that is not the default (``"compiled"``: a
            ``torch.compile``d model; docs/training-loops.md).
    """

    value: float
    stderr: float
    batch_value: float
    per_batch: list[float]
    num_examples: int
    seed: int | None
    by_layer: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)


def _per_example_grads(
    model: nn.Module,
    names: list[str],
    inputs: Any,
    coeffs: Tensor,
    chunk: int,
    gpt: bool,
    mode: dict[str, str | None] | None = None,
) -> list[dict[str, Tensor]]:
    """Per-example gradients of ``coeffs_n . f(x_n)`` w.r.t. the named parameters, in chunks.

    ``gpt``: the output's classes are in its last axis (moved to axis 1 like ``coeffs``).
    ``vmap`` where it has rules for the model's operations and its random draws (if any) come
    from the global RNG, else an exact loop over examples. ``mode``: the ``vmap`` randomness
    found so far (key ``"randomness"``), carried from call to call (the chunks of one
    computation ask the model's forward once, not once per chunk) and updated here.
    """
    chosen = {n: p for n, p in model.named_parameters() if n in names}
    # the other parameters enter as constants: read live by functional_call they would carry
    # autograd graphs into every per-example gradient (kept memory, and torch's "Converting a
    # tensor with requires_grad=True to a scalar" warning under params=, found in review)
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    # so do the inputs: a batch that requires grad carried its graph into every per-example
    # gradient and the per-batch proxies (torch's same warning, found in review s20)
    inputs = (
        inputs.detach()
        if isinstance(inputs, Tensor)
        else {k: v.detach() if isinstance(v, Tensor) else v for k, v in inputs.items()}
    )

    def scalar(sel: dict[str, Tensor], x: Any, a: Tensor) -> Tensor:
        def fmodel(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, {**fixed, **sel}, args, kwargs)

        out = call_model(fmodel, tree_map(lambda t: t.unsqueeze(0), x), module=model)
        out = out.movedim(-1, 1) if gpt else out
        return (out[0] * a).sum()

    detached = {n: p.detach() for n, p in chosen.items()}
    # vmap's randomness: "error" until the forward calls a random op, then "different" where its
    # draws come from the global RNG; None: the real forward once per example, where its draws
    # are fixed (a freshly seeded generator: under "different" every example drew another
    # matrix, another function; found in review, see curvlab.backends._random_forward)
    randomness: str | None = "error" if mode is None else mode.get("randomness", "error")
    out = []
    for i in range(0, num_examples(inputs), chunk):
        x, a = slice_inputs(inputs, i, i + chunk), coeffs[i : i + chunk]
        g = None
        while randomness is not None:
            try:
                g = vmap(grad(scalar), in_dims=(None, 0, 0), randomness=randomness)(detached, x, a)
                break
            except Exception as e:  # no vmap rule for an op, data-dependent control flow: loop
                if randomness != "error" or not random_op_refused(e):
                    break
                probe = partial(call_model, model, slice_inputs(x, 0, 2))
                fixed_draws = loop_needed(probe, model_device(model))
                randomness = None if fixed_draws else "different"
        out.append(g if g is not None else _looped(model, chosen, x, a, gpt))
    if mode is not None:
        mode["randomness"] = randomness
    return out


def _looped(
    model: nn.Module, chosen: dict[str, nn.Parameter], x: Any, a: Tensor, gpt: bool
) -> dict[str, Tensor]:
    """:func:`_per_example_grads` of one chunk, one real forward and backward per example."""
    rows = []
    for j in range(a.shape[0]):
        raw = call_model(model, slice_inputs(x, j, j + 1))
        f = raw.movedim(-1, 1) if gpt else raw
        gs = torch.autograd.grad((f[0] * a[j]).sum(), list(chosen.values()), allow_unused=True)
        rows.append(
            {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(chosen.items(), gs)}
        )
    return {n: torch.stack([r[n] for r in rows]) for n in chosen}


def _examples_apart(model: nn.Module, inputs: Any, data: Any = None) -> None:
    """Refuse a model that mixes the examples of a batch (feature centering, in-batch
    contrastive logits: found in review, per-example gradients are then undefined and the trace
    another number): :func:`~curvlab._layout.examples_mixed` on the first chunk, every rank's
    finding gathered under ``torch.distributed`` so that every rank raises together. ``data``:
    the data ``inputs`` came from (a coupling on a ``DataLoader(batch_size=None)``'s batches
    names the missing batch axis first, :func:`~curvlab._layout.finding_error`). A forward
    pass that differentiates (a physics-informed network's ``du/dx``) is refused in the same
    gathered finding (:func:`~curvlab._differentiating_forward.watched_finding`; review s25)."""
    why = None
    if inputs is not None:
        why = watched_finding(model, inputs, lambda: examples_mixed(model, inputs))
    raise_if_mixed(why, data)


def _prepare(
    model: Any, loss_fn: Any, params: Any, caller: str = "fisher_trace"
) -> tuple[LossSpec, list[str]]:
    spec = loss_spec(loss_fn)
    scan = scan_model(model)
    check_batchnorm(scan)
    check_parameters_finite(scan.trainable)
    _no_train_dropout(scan, caller)
    return spec, list(select_parameters(model, params))


_DROPOUT_WHY = {
    "fisher_trace": (
        "the pass that draws the labels and the per-example gradient passes would use "
        "different Dropout masks and the trace would be biased",
        "trace(matrix='fisher') (Hutchinson)",
    ),
    "trace(matrix='fisher', method='exact')": (
        "the pass that draws the labels and the per-example gradient passes would use "
        "different Dropout masks and the trace would be biased",
        "method='hutchinson'",
    ),
    "trace(matrix='ggn', method='exact')": (
        "the passes of the exact diagonal would draw Dropout masks of their own, and the "
        "value would not be the trace of the 'ggn' operator",
        "method='hutchinson'",
    ),
    "trace(matrix='empirical_fisher', method='exact')": (
        "the passes of the exact diagonal would draw Dropout masks of their own, and the "
        "value would not be the trace of the 'empirical_fisher' operator",
        "method='hutchinson'",
    ),
    "trace(method='ggn_cv')": (
        "its exact Tr(G) would come from passes with Dropout masks other than those of the "
        "operator of H - G, and the two parts would not add up to Tr(H)",
        "method='hutchinson' or method='block'",
    ),
}


_DROPOUT_OTHER = (
    "its per-example passes would draw Dropout masks of their own, unlike a curvature "
    "operator's, and the value would not be the operator's trace",
    "trace(method='hutchinson')",
)


def check_no_train_dropout(model: nn.Module, caller: str) -> None:
    """Refuse Dropout in train mode for an exact per-example trace, naming ``caller`` (one of
    ``fisher_trace``, ``trace(matrix=..., method='exact')``, ``trace(method='ggn_cv')``);
    :func:`curvlab.trace` calls it before it reads the data or builds an operator."""
    _no_train_dropout(scan_model(strip_wrappers(model)), caller)


def _no_train_dropout(scan: Any, caller: str) -> None:
    """Refuse Dropout in train mode: the per-example passes draw masks of their own, unlike a
    curvature operator, which keeps each batch's masks. For the Fisher the labels come from one
    forward pass and the per-example gradients from others (a vectorised pass per chunk), whose
    masks differ, so the result would be neither the trace of the ``"fisher"`` operator drawn
    with the same seed nor unbiased for the GGN's (10.97 against 0 in a review's example)."""
    why, instead = _DROPOUT_WHY.get(caller, _DROPOUT_OTHER)
    for name, m in scan.modules:
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"{caller}: {type(m).__name__} at '{name or '<root>'}' is in train mode, so "
                f"{why}; call model.eval(), or use {instead}, whose operator keeps each "
                "batch's masks"
            )


_RANDOM_FORWARD_WHY = {
    caller: why.replace("Dropout masks", "random numbers")
    for caller, (why, _) in _DROPOUT_WHY.items()
}


def check_no_random_forward(model: nn.Module, inputs: Any, caller: str) -> None:
    """Refuse a forward pass that draws random numbers, as :func:`_no_train_dropout`
    refuses a Dropout module in train mode, naming ``caller``: ``F.dropout(x, p,
    self.training)``, drop-path, ``nn.RReLU`` or ``torch.randn_like`` noise in a forward is no
    module the scan can see (found in review s24: with ``F.dropout`` the labels came from one
    pass's masks and the per-example gradients from vmap's own draws, and ``fisher_trace`` gave
    ``2.853 +- 0.067`` where ``E_mask Tr(G_mask) = 2.317 +- 0.030``).

    One forward without gradient on the first two examples of ``inputs`` (a batch), moved to the
    model's device: whether a global RNG state (torch's on the CPU and the model's GPU, numpy's,
    Python's) or that of a generator a module holds as an attribute (a layer's ``self.gen =
    torch.Generator()`` its own Dropout mask is drawn from, ``np.random.default_rng(seed)``)
    moved (:func:`~curvlab._rng.forward_draws`; review s27: a held generator's mask was not
    seen, and ``fisher_trace`` paired the labels of one mask with the gradients of another,
    where the global twin is refused). The draws are undone (every
    state is put back) and the forward runs on copies of the buffers (a call counter is not
    moved: the computation's passes start from the buffers found). A forward that fails on two
    examples is not refused here: the computation's own passes raise its error. A generator
    held deeper (a closure's, a sub-object's) is not seen. A forward that moved a state runs
    twice more (:data:`_PROBE_RUNS`) from the same module state (buffers and plain attributes
    put back: a call counter, a cached draw) but from other RNG states (the global RNGs and the
    held generators re-seeded), and is refused unless the outputs agree bit for bit and every
    RNG state a run moved was left where the other runs left it: a forward
    that re-seeds (fixed random features: ``self.gen.manual_seed(0)`` in every call) is
    deterministic and is measured (review s27: on an instance that had not run a forward its
    generator moved from the default seed, and it was refused; a second run from the states
    the first left then took a forward that caches its draw, or draws every other call, for
    one that re-seeds: ``fisher_trace`` 2.528 for 2.352, 1.355 for 2.041).

    Raises:
        ValueError: naming ``caller``, what the draws do to the value, and the way out.
    """
    plain = strip_wrappers(model)
    device = model_device(plain)
    part = inputs_to_device(slice_inputs(inputs, 0, 2), device)
    # on copies of the buffers: a forward that counts its calls must not have counted this one
    # when the computation's passes snapshot the buffers they start from
    # the global RNGs and the generators the modules hold, put back (review s27: a layer's own
    # self.gen mask was not seen, and the trace paired its labels with other masks)
    # a forward that moved a state runs twice more from the same module state (buffers and
    # plain attributes put back: a call counter, a cached draw) but from other RNG states (the
    # global ones and the held generators re-seeded): one whose output does not depend on them
    # re-seeds itself (fixed random features, self.gen.manual_seed(0) in every call) and is
    # deterministic; one that draws gives other outputs (review s27: a fresh instance's re-seeding
    # forward was refused; then a forward caching its draw, or drawing every other call, was
    # taken for one that re-seeds: 2.528 for 2.352, 1.355 for 2.041)
    modules = list(plain.modules())
    snapshot = buffer_snapshot(modules)
    held = held_states(modules)
    outputs: list[list[Tensor]] = []
    starts: list[list[Any] | None] = []  # the RNG states each run started from
    ends: list[list[Any] | None] = []  # and those it left
    with (
        torch.no_grad(),
        global_rng_kept(device),
        forward_draws(device, modules, put_back=True),
        plain_attributes_kept(modules, every=True),
    ):
        for run in range(_PROBE_RUNS):
            with (
                on_buffers(snapshot),
                plain_attributes_kept(modules, every=True),
                global_rng_kept(device),
                forward_draws(device, modules, put_back=True) as drawn,
            ):
                for _ in range(run):  # run r from states r re-seedings away from the found ones
                    reseed_global(device)
                    reseed_held(held_generators(modules))
                starts.append(_states(device, held))
                try:
                    # copies: a forward that returns a buffer it refills would compare one
                    # tensor with itself (review s27)
                    outputs.append([t.clone() for t in _tensors(call_model(plain, part))])
                except Exception:  # noqa: BLE001 - not this check's to report (see the docstring)
                    return
                ends.append(_states(device, held))
            if run == 0 and not drawn():
                return
    # a forward that re-seeds ends in the same states whatever it started from; one that draws
    # (a drop-path that rarely changes the output: review s27, 14 of 20 calls accepted) does not
    if _same_ends(starts, ends) and all(_same_output(outputs[0], out) for out in outputs[1:]):
        return
    why = _RANDOM_FORWARD_WHY.get(
        caller, _DROPOUT_OTHER[0].replace("Dropout masks", "random numbers")
    )
    instead = _DROPOUT_WHY.get(caller, _DROPOUT_OTHER)[1]
    # model.eval() is a way out only where the model is in train mode (an eval-mode model that
    # draws draws in eval mode: MC dropout, input noise)
    training = any(m.training for m in plain.modules())
    way_out = (
        f"call model.eval() (if the draws are train-mode ones), or use {instead}"
        if training
        else f"use {instead}"
    )
    raise ValueError(
        f"{caller}: the model's forward draws random numbers from the global RNG (torch's, "
        f"numpy's or Python's; in train mode: F.dropout, drop-path, RReLU, torch.randn_like "
        f"noise, a LayerDrop's random.uniform) or from a generator a module holds (a "
        f"layer's own self.gen mask), so {why}; {way_out}, whose operator keeps each batch's "
        "draws"
    )


_PROBE_RUNS = 3
"""Forward passes of :func:`check_no_random_forward`'s probe for a forward that moved an RNG
state: the found states' and two others'; a forward whose outputs agree on all of them is
deterministic (two masks of a tiny layer agree by chance with probability ``2^-n`` each)."""


def _same_output(a: Any, b: Any) -> bool:
    """Whether two outputs of a forward pass hold the same tensors, bit for bit (NaN equal to
    NaN), found through mappings (a Hugging Face ``ModelOutput``), lists, tuples and dataclasses;
    an output without any tensor is not the same (nothing tells it apart)."""
    la, lb = _tensors(a), _tensors(b)
    if not la or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point() or x.is_complex():
            if not bool(((x == y) | (x.isnan() & y.isnan())).all()):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def _states(device: torch.device, held: list[Any]) -> list[Any] | None:
    """The global RNG states and the held generators' states now (``None``: unreadable)."""
    found = rng_states(device)
    return None if found is None else [*found, *(h.get() for h in held)]


def _same_ends(starts: list[list[Any] | None], ends: list[list[Any] | None]) -> bool:
    """Whether every RNG state that a run of the probe moved was left where the first run left
    it, by every run (a forward that re-seeds ends in the same state whatever it started from;
    one that draws from other starting states ends elsewhere; unknown states: not the same)."""
    if any(x is None for x in (*starts, *ends)):
        return False
    first = ends[0]
    for i in range(len(first)):  # type: ignore[arg-type]
        moved = any(not same_state(a[i], b[i]) for a, b in zip(starts, ends))  # type: ignore[index]
        if moved and not all(same_state(e[i], first[i]) for e in ends[1:]):  # type: ignore[index]
            return False
    return True


def _tensors(out: Any) -> list[Tensor]:
    """The tensors of a forward's output, in order (see :func:`_same_output`)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in _tensors(getattr(out, f.name))]
    return []


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def _nll_grad_out(spec: LossSpec, output: Tensor, targets: Tensor, drawn: bool = False) -> Tensor:
    leaf = output.detach().requires_grad_(True)
    with torch.enable_grad():
        (s,) = torch.autograd.grad(spec.nll_sum(leaf, targets, drawn), leaf)
    return s


def _squares_and_sums(
    model: nn.Module,
    names: list[str],
    inputs: Any,
    s: Tensor,
    chunk_size: int,
    gpt: bool,
    mode: dict[str, str | None] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One batch's squared per-example gradient norms per parameter ``(n, len(names))`` and its
    summed gradient per parameter (``mode``: as for :func:`_per_example_grads`)."""
    total: dict[str, Any] = {n: 0.0 for n in names}
    rows = []
    for g in _per_example_grads(model, names, inputs, s, chunk_size, gpt, mode):
        rows.append(
            torch.stack([g[n].reshape(g[n].shape[0], -1).pow(2).sum(1) for n in names], dim=1)
        )
        for n in names:
            total[n] = total[n] + g[n].sum(0)
    return torch.cat(rows), total


def _batch_terms(
    model: nn.Module,
    spec: LossSpec,
    names: list[str],
    inputs: Any,
    targets: Tensor,
    gen: torch.Generator,
    chunk_size: int,
    device: torch.device,
    mode: dict[str, str | None],
) -> tuple[Tensor, dict[str, Any], float]:
    """One batch's squared per-example gradient norms per parameter ``(n, len(names))``, its
    summed gradient per parameter at the drawn labels, and its number of loss terms, computed
    chunk by chunk: no pass (the forward that draws the labels included) sees more than
    ``chunk_size`` examples, and only the chunk at hand is on ``device``.

    The labels of each chunk are drawn from ``gen`` in example order, so where torch draws
    uniforms in order (the CPU's samplers, :meth:`~curvlab._losses.LossSpec.sample_targets`)
    they are the labels of the whole batch drawn at once, as the ``"fisher"`` operator draws
    them. The chunks' summed gradients are added in chunk order, as the per-example passes of
    the whole batch added them. (Drawing for the whole batch first held its logits, their
    probabilities and the no-grad forward of all its examples at once: 545 MB against 28 MB
    for chunks of 16 in a review's example, found in review s20.) ``mode``: as for
    :func:`_per_example_grads`.
    """
    n = num_examples(inputs)
    whole = chunk_size >= n
    rows: list[Tensor] = []
    total: dict[str, Any] = {}
    count: Tensor | int = 0
    for start in range(0, n, chunk_size):
        chunk = (
            (inputs, targets)
            if whole
            else (
                slice_inputs(inputs, start, start + chunk_size),
                targets[start : start + chunk_size],
            )
        )
        x, t = to_device(chunk, device)
        with torch.no_grad():
            raw = call_model(model, x)
        output = spec.prepare(raw, t)
        if start == 0:  # every label of the batch, before its per-example passes
            spec.check_classes(output, targets)
        count = count + spec.count(output, t)
        sampled = spec.sample_targets(output, gen, t)
        s = _nll_grad_out(spec, output, sampled, drawn=True)
        gpt = spec.gpt_layout(raw, t)
        per_param, part = _squares_and_sums(model, names, x, s, chunk_size, gpt, mode)
        rows.append(per_param)
        total = part if not total else {k: total[k] + part[k] for k in names}
    return torch.cat(rows), total, float(count)


@collective
def fisher_trace(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    params: Params = None,
    chunk_size: int = 64,
) -> FisherTraceResult:
    """``Tr(F)`` with labels sampled from the model (exact per sample) and the proxy ``Tr(F^B)``.

    ``F`` is the Monte-Carlo Fisher of the objective ``L``: under ``reduction="mean"`` the mean
    over the loss terms (``w = 1/M``, ``M`` the terms counted: the examples, or the non-ignored
    tokens), under ``"sum"`` their sum (``w = 1``), as :func:`curvlab.curvature_operator`.

    Every pass runs on chunks of at most ``chunk_size`` examples, moved to the model's device
    one at a time: the forward that draws the labels, the output gradients and the per-example
    gradients. Labels are drawn chunk by chunk, in example order, from one generator; where torch
    draws in order (the CPU) they are the labels :func:`curvlab.curvature_operator` draws for
    ``matrix="fisher"`` batch by batch, so with the same seed ``value`` is the exact trace of
    that operator. On a GPU ``torch.multinomial`` and ``torch.rand`` draw per call, so the
    chunks' labels are other draws from the same distribution unless ``chunk_size`` covers
    every batch.

    ``stderr`` is ``w N std_n(||s_n(y_hat_n)||^2) / sqrt(N)``, over the examples and their labels
    together: the error against the data distribution's ``Tr(F)``, the examples an i.i.d. sample
    of it. For this batch's own ``Tr(F)`` it is conservative (it adds the spread between the
    examples to the labels' variance); that value without sampling is
    ``trace(matrix="ggn", method="exact")``.

    Args:
        model, loss_fn, data: as everywhere in curvlab.
        seed: seed of the sampled labels (default 0); or pass ``generator``.
        params: restrict to some parameters (names, module prefixes or a predicate ``fn(name, param)``).
        chunk_size: examples per pass (the memory bound: about ``chunk_size`` times the model's
            activations, outputs and parameters).

    Raises:
        ValueError: for a forward that draws random numbers, a Dropout module in train mode or
            any draw from the global RNG (``F.dropout(x, p, self.training)``, drop-path,
            ``RReLU``; :func:`check_no_random_forward`, one forward on two examples before any
            other pass): the labels' pass and the per-example gradients would draw differently
            and the trace would be biased (call ``model.eval()``, or use
            ``trace(matrix="fisher")``); for a model that mixes the examples of a batch.
    """
    return _fisher_trace(model, loss_fn, data, seed, generator, params, chunk_size)


def _fisher_trace(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    seed: int | None,
    generator: torch.Generator | None,
    params: Params,
    chunk_size: int,
    caller: str = "fisher_trace",
) -> FisherTraceResult:
    """The body of :func:`fisher_trace`; its refusals name ``caller``."""
    if not is_count(chunk_size):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    spec, names = _prepare(model, loss_fn, params, caller)
    device = model_device(model)
    gen = rank_generator(make_generator(seed=seed, generator=generator, device=device))
    used_seed = None if generator is not None else (0 if seed is None else seed)
    sq_rows: list[Tensor] = []
    batch_sq: list[Tensor] = []
    layer_tot: dict[str, Tensor] = {}
    with (
        leave_no_trace(model),
        # every forward on copies of the buffers as the call found them (train-mode
        # spectral_norm moved the trace 0.24% between two batches, found in review)
        each_forward_on(model, buffer_snapshot(model.modules())),
    ):
        # the batches are read (and checked) before any pass, kept where they are: each chunk
        # moves to the model's device as it is computed (moving every batch up front held the
        # whole data on the device, found in review s20)
        batches = read_batches(data)
        num = sum(num_examples(b[0]) for b in batches)
        # on the first chunk, or two examples of the batch for chunks of one (chunk_size=1)
        first = None
        if batches:
            inputs, targets = batches[0]
            size = max(chunk_size, 2)
            first = to_device((slice_inputs(inputs, 0, size), targets[:size]), device)[0]
        if first is not None:  # before any pass that draws labels or gradients
            check_no_random_forward(model, first, caller)
        _examples_apart(model, first, data)
        counts = []
        mode: dict[str, str | None] = {}  # the vmap randomness, found on the first chunk
        for inputs, targets in batches:
            per_param, total, count = _batch_terms(
                model, spec, names, inputs, targets, gen, chunk_size, device, mode
            )
            counts.append(count)
            # Tr(F^B) of a batch whose targets are all ignored is 0/0 under "mean": nan, left
            # out of batch_value
            w_b = 1.0 if spec.reduction == "sum" else 1.0 / count if count else math.nan
            sq_rows.append(per_param.sum(1))
            for j, n in enumerate(names):
                key = _module_of(n)
                layer_tot[key] = layer_tot.get(key, 0.0) + per_param[:, j].sum()
            batch_sq.append(sum((w_b * t).pow(2).sum() for t in total.values()))
    sq = torch.cat(sq_rows).to(torch.float64)
    per_batch = [float(b) for b in batch_sq]
    comm = active()
    if comm is not None:  # sums over all shards; per-batch proxies of every rank, in rank order
        # each rank's count, mean and centred sum of squares in its own row (the others' rows
        # 0, so the all-reduce gathers them exactly); the raw sums' (s2 - s1^2/N) cancelled:
        # stderr 2.92 for 0.479, or 0 (clamped), where the ||s_n||^2 agree to 1e-8 (review s26)
        stats = torch.zeros(comm.size, 3, dtype=torch.float64, device=sq.device)
        if sq.numel():
            mean_r = sq.mean()
            stats[comm.rank] = torch.stack(
                [sq.new_tensor(float(sq.numel())), mean_r, (sq - mean_r).pow(2).sum()]
            )
        sums, (num, total_count, *layouts) = comm.reduce_sums(
            {
                "s1": sq.sum(),
                "stats": stats,
                **{("layer", k): v.double() for k, v in layer_tot.items()},
            },
            [num, round(sum(counts)), *spec.layout_counts()],
        )
        spec.check_layout_counts(*layouts)  # every rank read one layout, or every rank raises
        layer_tot = {k: sums[("layer", k)] for k in layer_tot}
        check_counted(spec, total_count)
        w = 1.0 if spec.reduction == "sum" else 1.0 / total_count
        value = float(w * sums["s1"])
        var = _pooled_m2(sums["stats"].cpu().tolist()) / (num - 1) if num > 1 else 0.0
        stderr = w * num * math.sqrt(var) / math.sqrt(num) if num > 1 else math.nan
        per_batch = [b for part in comm.all_gather_object(per_batch) for b in part]
    else:
        check_counted(spec, sum(counts))
        w = 1.0 if spec.reduction == "sum" else 1.0 / sum(counts)
        value = float(w * sq.sum())
        stderr = float(w * num * sq.std(unbiased=True) / math.sqrt(num)) if num > 1 else math.nan
    return FisherTraceResult(
        value=value,
        stderr=stderr,
        batch_value=_mean_defined(per_batch),
        per_batch=per_batch,
        num_examples=num,
        seed=used_seed,
        by_layer={k: float(w * v) for k, v in layer_tot.items()},
    )


def _pooled_m2(rows: list[list[float]]) -> float:
    """``sum_n (x_n - mean)^2`` over every rank's examples from the ranks' ``(n_r, m_r, M2_r)``.

    Chan, Golub and LeVeque's pairwise update, in rank order (so every rank gets the same
    number): with ``delta = m_r - m`` and ``n' = n + n_r``, ``m <- m + delta n_r / n'`` and
    ``M2 <- M2 + M2_r + delta^2 n n_r / n'``. Every term is non-negative, so nothing cancels: the
    result is the one-process two-pass sum to rounding, where the raw sums'
    ``sum x^2 - (sum x)^2 / N`` lose every digit once the ``x_n`` agree to ~1e-8 of their size.
    """
    n, mean, m2 = 0.0, 0.0, 0.0
    for n_r, mean_r, m2_r in rows:
        if n_r <= 0:
            continue
        total = n + n_r
        delta = mean_r - mean
        mean += delta * n_r / total
        m2 += m2_r + delta * delta * n * n_r / total
        n = total
    return m2


def _mean_defined(values: list[float]) -> float:
    """The mean of the batches' proxies that are defined (a batch of ignored targets has none)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def exact_trace_per_example(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    matrix: str,
    *,
    params: Params = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 64,
    caller: str | None = None,
) -> tuple[float, dict[str, float]]:
    """Exact trace of ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"`` from one-pass diagonals.

    ``matrix`` takes the aliases of every ``matrix=`` argument too (``"exact"`` and ``"true"``
    for ``"ggn"``, ``"mc"``, ``"empirical"``). ``"ggn"`` and ``"empirical_fisher"`` sum
    :func:`~curvlab.diag_fisher` (``kind="exact"`` / ``"empirical"``, computed by whichever
    backend can do the model exactly); ``"fisher"`` is
    :func:`fisher_trace` (the labels of the Monte-Carlo operator with the same seed). Refusals
    name ``caller`` (default ``trace(matrix=..., method='exact')``).

    Returns:
        ``(trace, by_layer)`` with ``by_layer`` keyed by module name.
    """
    model = strip_wrappers(model)  # a compiled/DDP model: the names of the module it wraps
    if caller is None:
        caller = f"trace(matrix={matrix!r}, method='exact')"
    # the aliases, as every matrix= argument (found in review s22: "exact", "empirical" refused)
    matrix = matrix_name(matrix)
    if matrix == "fisher":
        # its refusals (Dropout, a forward drawing random numbers) named for the caller
        res = _fisher_trace(model, loss_fn, data, seed, generator, params, chunk_size, caller)
        return res.value, res.by_layer
    if matrix not in ("ggn", "empirical_fisher"):
        names = ("ggn", "fisher", "empirical_fisher")
        raise ValueError(
            f"per-example exact traces exist for {names} (or the aliases "
            f"{matrix_aliases(names)}), not {matrix!r}"
        )
    from curvlab.quantities._diagonal import diag_fisher
    from curvlab.quantities._sweep import replayable

    _, names = _prepare(model, loss_fn, params, caller)
    data = replayable(data)  # a one-shot iterator: its batches kept, for the probe and the sum
    first = next(iter_chunks(data, 2), None)
    if first is not None:  # one forward on two examples, before the diagonal's passes
        with leave_no_trace(model):
            check_no_random_forward(model, first[0], caller)
    kind = "exact" if matrix == "ggn" else "empirical"
    diag = diag_fisher(model, loss_fn, data, kind=kind)
    by_layer: dict[str, float] = {}
    for n in names:
        key = _module_of(n)
        by_layer[key] = by_layer.get(key, 0.0) + float(diag[n].double().sum())
    return sum(by_layer.values()), by_layer
