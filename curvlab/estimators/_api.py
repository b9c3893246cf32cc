"""Model-level entry points: ``cl.trace``, ``cl.eigenvalues`` and ``cl.spectral_density``.

Each builds a :class:`curvlab.operators.CurvatureOperator` for the objective ``L`` over ``data`` and
runs an estimator from :mod:`curvlab.estimators` on it. Conventions (mean vs sum, the matrices) are
those of :func:`curvlab.curvature_operator`: the matrices are of ``L`` itself, the mean of the
loss terms under ``reduction="mean"`` and their sum under ``"sum"``.

Randomness comes from ``seed=`` (``None``, the default, means 0) or ``generator=`` (a
``torch.Generator`` on the model's device), never both. ``seed=s`` seeds the Monte-Carlo
Fisher's labels and the estimator's draws (probes, starting vector) each with ``s``. A generator
is one stream: the operator draws the labels from it first (``matrix="fisher"`` only), then the
estimator draws from where they left off, and the generator is left advanced past both. So
``generator=torch.Generator().manual_seed(s)`` gives exactly the result of ``seed=s`` for every
matrix without drawn labels (as :func:`curvlab.curvature_operator` and the estimators, where a
generator seeded with ``s`` is ``seed=s``); for ``"fisher"`` the labels are those of ``seed=s``
and the probes are other draws.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
    >>> loss_fn = torch.nn.CrossEntropyLoss()
    >>> t = trace(model, loss_fn, data, method="exact")
    >>> e = eigenvalues(model, loss_fn, data, k=2, tol=1e-6)
    >>> t.stderr, e.converged, e.values.shape
    (0.0, True, torch.Size([2]))
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

from curvlab._compiled import strip_wrappers
from curvlab._differentiating_forward import DifferentiatingForwardError
from curvlab._rng import check_randomness
from curvlab._scan import model_device
from curvlab._selection import Params, select_parameters
from curvlab._vocabulary import matrix_name
from curvlab.distributed import collective, unwrap_model
from curvlab.estimators._density import DensityResult, check_slq_args, check_slq_plan, slq
from curvlab.estimators._fisher_trace import check_no_train_dropout, exact_trace_per_example
from curvlab.estimators._lanczos import (
    EigenResult,
    check_lanczos_args,
    check_lanczos_plan,
    lanczos_eigenvalues,
)
from curvlab.estimators._memory import check_basis_device
from curvlab.estimators._trace import (
    TraceResult,
    block_group,
    block_hutchinson,
    check_trace_args,
    check_trace_plan,
    exact_trace,
    hutchinson,
    hutchpp,
)
from curvlab.operators import MATRIX_CLASSES, CurvatureOperator, curvature_operator

__all__ = ["trace", "eigenvalues", "spectral_density", "TRACE_METHODS"]

TRACE_METHODS = ("hutchinson", "hutch++", "exact", "block", "ggn_cv")


def _check_randomness(
    model: nn.Module, seed: object, generator: object, *, both: bool = True
) -> int | None:
    """Check ``seed=`` and ``generator=`` before the data is read (:func:`check_randomness`: a
    generator on another device type than the model's is refused too), and return the seed the
    result reports: ``None`` for a generator, else the seed (``None`` means 0).

    ``both``: refuse the two given together (every call that draws; a call that draws nothing,
    ``trace(method="exact")`` of a matrix without drawn labels, accepts them as the one-pass
    quantities of a deterministic kind do: docs/conventions.md).
    """
    device = None if generator is None else model_device(strip_wrappers(model))
    check_randomness(seed, generator, device, both=both)
    return None if generator is not None else (0 if seed is None else int(seed))  # type: ignore[call-overload]


def _operator_plan(model: nn.Module, params: Params) -> tuple[int, torch.dtype, torch.device]:
    """The size, dtype and device of the operator :func:`curvlab.curvature_operator` would build
    on ``model`` and ``params``, without reading the data: the selected parameters' count and
    the first parameter's dtype and device (the operator's, :func:`curvlab._scan.scan_model`)."""
    dim = sum(p.numel() for p in select_parameters(unwrap_model(model), params).values())
    first = next(unwrap_model(model).parameters())
    return dim, first.dtype, first.device


@collective
def trace(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    matrix: str = "hessian",
    method: str = "hutchinson",
    num_probes: int = 30,
    seed: int | None = None,
    *,
    generator: torch.Generator | None = None,
    by_layer: bool = False,
    params: Params = None,
    distribution: str = "rademacher",
    rtol: float | None = None,
    batch_size: int | None = None,
    memory_budget: float | None = None,
    keep_graph: bool | None = None,
    show_progress: bool | None = None,
) -> TraceResult:
    """The trace of a curvature matrix of ``loss_fn`` over ``data``.

    The trace is that of the matrix of the objective ``L``: under ``reduction="mean"`` the mean
    over the loss terms (the examples, or the non-ignored tokens), under ``"sum"`` their sum
    (``M`` times as large for the same losses, ``M`` the terms); see
    :func:`curvlab.curvature_operator`.

    Args:
        model, loss_fn, data: as in :func:`curvlab.curvature_operator`.
        matrix: ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``, ``"residual"``
            (``H - G``), or an alias (``"exact"``/``"true"``: ``"ggn"``; ``"mc"``;
            ``"empirical"``). For
            ``"fisher"`` (labels drawn once per call) the standard error is over the probes
            given the drawn labels, not against the Fisher's expectation (the GGN): use
            :func:`curvlab.fisher_trace` for that (docs/estimators.md).
        method: ``"hutchinson"`` (``num_probes`` products), ``"hutch++"`` (``num_probes``
            products in all), ``"block"`` (block-diagonal Hutchinson by layer: ``num_probes``
            probes, one product per layer each), ``"ggn_cv"`` (Hessian only: the exact GGN trace
            plus block Hutchinson on the residual ``H - G``, which is zero inside every layer
            of a piecewise-linear network) or ``"exact"`` (``D`` products for the Hessian; one
            per-example gradient pass per output for the GGN and Fishers).
        num_probes: probes (see ``method``); the maximum when ``rtol`` is given.
        seed: seed of the probes and of the Monte-Carlo Fisher's labels (``None``: 0 unless
            ``generator`` is given).
        generator: alternatively a ``torch.Generator`` on the model's device, drawn from for the
            labels first, then the probes (see the module docstring: for ``"fisher"`` not the
            result of ``seed=``; for the other matrices a generator seeded with ``s`` is
            ``seed=s``). Refused together with an explicit ``seed`` except by
            ``method="exact"`` on a matrix without drawn labels, which draws nothing.
        by_layer: ``True``: also return each layer's diagonal-block trace (keyed by module
            name); a bool.
        params: restrict to some parameters (names, module prefixes or a predicate ``fn(name, param)``).
        distribution: ``"rademacher"`` or ``"gaussian"`` probes.
        rtol: stop once ``stderr <= rtol * |value|`` (``"hutchinson"``, ``"block"``,
            ``"ggn_cv"``; refused by the others), tested at every probe count from 10 on, so
            the stop and the estimate do not depend on ``batch_size`` or ``memory_budget``
            (Hutchinson makes the rest of its last batch's products, counted in
            ``num_matvecs`` but not used). The stopping time depends on the probes, so
            the value is then slightly biased (a fraction of its standard error; docs/
            estimators.md): keep ``None`` for results that will be averaged.
        batch_size: probes per batched product (``"hutchinson"``, ``"hutch++"``, and unit
            vectors for ``"exact"`` on the Hessian; default: at most 10 for Hutchinson, all of
            Hutch++'s sketch, 64 unit vectors, fewer where ``memory_budget`` allows fewer). A
            positive int or ``None`` for every method; the others (``"block"``, ``"ggn_cv"``,
            and ``"exact"`` on the GGN and the Fishers, whose one-pass diagonals use no probes)
            do not use it.
        memory_budget: bytes the estimator's probe blocks may take (default: the smaller of
            1 GiB and half the memory available on the model's device; ``float("inf")``: no
            budget, only the memory available); see docs/estimators.md for each method's memory. A number of bytes
            ``> 0``, ``inf`` or ``None`` for every method, checked before the data is read;
            ``"exact"`` on the GGN and the Fishers (one-pass diagonals, no probe blocks) does
            not use it.
        keep_graph: keep autograd graphs across products (default: for a single batch).
        show_progress: a progress bar on stderr (``None``: when stderr is a terminal).

    Returns:
        A :class:`TraceResult` (``.value``, ``.stderr``, ``.num_matvecs``, ``.by_layer``).

    Raises:
        ValueError: for an invalid argument (a count that is not a positive int, a bool, a
            ``memory_budget`` that is not a number of bytes, a ``seed`` that is not an int,
            ``seed`` and ``generator`` both, a generator on another device type, a ``by_layer``
            that is not a bool), before the data is read.
        TypeError: for a ``generator`` that is not a ``torch.Generator``, before the data is read.
        EstimatorMemoryError: (a ``MemoryError``) where the probe blocks (one probe with its
            product at the least, ``batch_size`` probes, Hutch++'s sketch beside a batch) do
            not fit ``memory_budget``: before the data is read; where they do not fit the
            memory available: before the first product (``"ggn_cv"``: before the exact GGN
            trace).
    """
    matrix = matrix_name(matrix)
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    if method == "ggn_cv" and matrix != "hessian":
        raise ValueError(f"method='ggn_cv' is for matrix='hessian', got matrix={matrix!r}")
    check_trace_args(method, num_probes, rtol, batch_size, memory_budget)  # before the data
    if not isinstance(by_layer, bool):  # found in review s19: by_layer="no" gave the layers
        raise ValueError(f"by_layer must be True or False, got {by_layer!r}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    # a matrix of labels drawn at construction (the Monte-Carlo Fisher, or one registered so)
    labels = bool(getattr(MATRIX_CLASSES.get(matrix), "samples_labels", False))
    draws = method != "exact" or labels  # probes, or the labels
    used_seed = _check_randomness(model, seed, generator, both=draws)
    per_example = method == "exact" and matrix in ("ggn", "fisher", "empirical_fisher")
    if per_example or method == "ggn_cv":  # Dropout in train mode: refused before any pass
        caller = (
            "trace(method='ggn_cv')"
            if method == "ggn_cv"
            else f"trace(matrix={matrix!r}, method='exact')"
        )
        check_no_train_dropout(model, caller)
    if not per_example:  # a budget the probe blocks cannot fit: refused before the data
        dim, dtype, device = _operator_plan(model, params)
        check_trace_plan(method, dim, dtype, device, num_probes, batch_size, memory_budget)
    if per_example:
        try:
            value, layers = exact_trace_per_example(
                model, loss_fn, data, matrix, params=params, seed=seed, generator=generator
            )
        except DifferentiatingForwardError:
            # a forward that differentiates (a physics-informed network) has no per-example
            # diagonals: the products follow the whole batch's graph, one per parameter
            # (refused before any pass or label draw; review s25)
            dim, dtype, device = _operator_plan(model, params)
            check_trace_plan(method, dim, dtype, device, num_probes, batch_size, memory_budget)
        else:
            used = used_seed if labels else None  # only the Fisher's labels are drawn
            return TraceResult(value, 0.0, 0, used, "exact", 0, layers if by_layer else None)
    if method == "ggn_cv":
        return _ggn_cv(
            model,
            loss_fn,
            data,
            num_probes,
            seed,
            generator,
            params,
            distribution,
            rtol,
            keep_graph,
            show_progress,
            by_layer,
            memory_budget,
        )
    if not draws:  # nothing is drawn: the generator's state is left alone
        seed = generator = None
    op = curvature_operator(
        model,
        loss_fn,
        data,
        matrix,
        params=params,
        seed=seed,
        generator=generator,
        keep_graph=keep_graph,
    )
    blocks = op.block_slices() if by_layer or method == "block" else None
    if method == "hutchinson":
        res = hutchinson(
            op,
            num_probes,
            distribution,
            seed=seed,
            generator=generator,
            blocks=blocks,
            rtol=rtol,
            batch_size=batch_size,
            show_progress=show_progress,
            memory_budget=memory_budget,
        )
    elif method == "hutch++":
        res = hutchpp(
            op,
            num_probes,
            distribution,
            seed=seed,
            generator=generator,
            blocks=blocks,
            batch_size=batch_size,
            memory_budget=memory_budget,
        )
    elif method == "block":
        assert blocks is not None
        res = block_hutchinson(
            op,
            blocks,
            num_probes,
            distribution,
            seed=seed,
            generator=generator,
            rtol=rtol,
            show_progress=show_progress,
            memory_budget=memory_budget,
        )
    else:
        res = exact_trace(op, blocks, batch_size, memory_budget=memory_budget)
        res.seed = used_seed if labels else None
    if not by_layer:
        res.by_layer = res.by_layer_stderr = None
    return _batched_note(res, op)


def _ggn_cv(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    num_probes: int,
    seed: int | None,
    generator: torch.Generator | None,
    params: Any,
    distribution: str,
    rtol: float | None,
    keep_graph: bool | None,
    show_progress: bool | None,
    by_layer: bool,
    memory_budget: float | None = None,
) -> TraceResult:
    """``Tr(H) = Tr(G) + Tr(H - G)``: exact GGN trace, block Hutchinson on the residual."""
    op = curvature_operator(model, loss_fn, data, "residual", params=params, keep_graph=keep_graph)
    blocks = op.block_slices()
    # refused before the exact GGN trace's passes, naming this method
    block_group(op, len(blocks), memory_budget, "trace(method='ggn_cv')")
    # both parts on the batches the operator read (a second reading of a loader may differ:
    # another shuffle with drop_last, random augmentation; a generator is spent)
    ggn_value, ggn_layers = exact_trace_per_example(
        model, loss_fn, op._batches, "ggn", params=params, caller="trace(method='ggn_cv')"
    )
    res = block_hutchinson(
        op,
        blocks,
        num_probes,
        distribution,
        seed=seed,
        generator=generator,
        rtol=rtol,
        offset=ggn_value,
        show_progress=show_progress,
        memory_budget=memory_budget,
    )
    layers = {n: ggn_layers.get(n, 0.0) + v for n, v in (res.by_layer or {}).items()}
    return TraceResult(
        ggn_value + res.value,
        res.stderr,
        res.num_matvecs,
        res.seed,
        "ggn_cv",
        res.num_probes,
        layers if by_layer else None,
        res.by_layer_stderr if by_layer else None,
        extra={"ggn_trace": ggn_value, "residual_trace": res.value},
    )


@collective
def eigenvalues(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    matrix: str = "hessian",
    k: int = 1,
    tol: float = 1e-4,
    seed: int | None = None,
    *,
    generator: torch.Generator | None = None,
    which: str = "largest",
    return_vectors: bool = False,
    vectors_as: str = "flat",
    params: Params = None,
    max_basis: int | None = None,
    max_matvecs: int | None = None,
    criterion: str = "residual",
    memory_budget: float | None = None,
    basis_device: str | None = None,
    keep_graph: bool | None = None,
    show_progress: bool | None = None,
    verify: bool = False,
) -> EigenResult:
    """The ``k`` largest (or smallest) algebraic eigenvalues by thick-restart Lanczos.

    They are the eigenvalues of the matrix of the objective ``L``: under ``reduction="mean"``
    the mean over the loss terms (the examples, or the non-ignored tokens), under ``"sum"``
    their sum (``M`` times as large for the same losses, ``M`` the terms); see
    :func:`curvlab.curvature_operator`.

    Converged means every Ritz pair has ``||A y - theta y|| <= tol * ||A||`` (and, for a basis
    that restarted, that a fresh random direction found no further wanted value: see
    :func:`curvlab.estimators.lanczos_eigenvalues`); the result says whether that happened
    (``.converged``) and gives the residuals. The arguments are checked before the data is read,
    with what they decide given the selected parameters' size and dtype (a ``tol`` below what
    the dtype can certify, a basis that cannot fit ``memory_budget``).

    Args:
        model, loss_fn, data, matrix, params, keep_graph: as in :func:`curvlab.curvature_operator`.
        k: how many eigenvalues.
        tol: relative residual tolerance.
        seed: seed of the starting vector and of the fresh directions after an invariant
            subspace or a lock (and of the Monte-Carlo Fisher's labels); ``None``: 0 unless
            ``generator`` is given.
        generator: alternatively a ``torch.Generator`` on the model's device (not with
            ``seed``), drawn from for the Monte-Carlo Fisher's labels first, then the starting
            vector and the fresh directions (see the module docstring).
        which: ``"largest"`` or ``"smallest"``.
        return_vectors: ``True``: also return eigenvectors, as a flat ``(D, k)`` tensor
            (``vectors_as="flat"``) or a dict name -> ``(*param_shape, k)`` (``"dict"``).
        max_basis, max_matvecs, criterion: see :func:`curvlab.estimators.lanczos_eigenvalues`
            (``criterion="eigenvalue"``: an uncertified estimate of the values' error, see there).
            The basis holds at most ``max_basis + 1`` parameter-vectors; by default
            ``max(120, 3k)`` Lanczos vectors, fewer for models whose basis would exceed 4 GiB
            (at least ``max(10, 2k + 2)``), restarted thickly when full.
        memory_budget: bytes the Lanczos basis may take (sets ``max_basis``;
            ``float("inf")``: no budget, ``max(120, 3k)`` cut to what the memory available
            holds).
        basis_device: where the basis is kept (default: the model's device; ``"cpu"`` keeps
            it in host memory while the products run on the GPU); a device torch does not know
            or this machine lacks is refused before the data is read.
        show_progress: a progress bar on stderr (``None``: when stderr is a terminal).
        verify: verify the run before it claims convergence even where it would not by
            default (see :func:`curvlab.estimators.lanczos_eigenvalues`: runs that restarted
            and runs with ``k >= D / 10`` are verified anyway, for ``k >= 2``).
    """
    matrix = matrix_name(matrix)
    if vectors_as not in ("flat", "dict"):
        raise ValueError(f"vectors_as must be 'flat' or 'dict', got {vectors_as!r}")
    # the seed and generator too (found in review: refused after a forward pass)
    _check_randomness(model, seed, generator)
    # before the data is read: the arguments, and what they decide with the selected
    # parameters' size and the model's dtype (the tolerance its vectors can certify, a basis
    # that cannot fit memory_budget)
    dim, dtype, device = _operator_plan(model, params)
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
    check_basis_device(basis_device)
    check_lanczos_plan(
        dim,
        dtype,
        device,
        k,
        tol,
        max_basis,
        max_matvecs,
        memory_budget,
        return_vectors,
        basis_device,
    )
    op = curvature_operator(
        model,
        loss_fn,
        data,
        matrix,
        params=params,
        seed=seed,
        generator=generator,
        keep_graph=keep_graph,
    )
    res = lanczos_eigenvalues(
        op,
        k=k,
        tol=tol,
        which=which,
        max_basis=max_basis,
        max_matvecs=max_matvecs,
        seed=seed,
        generator=generator,
        return_vectors=return_vectors,
        criterion=criterion,
        show_progress=show_progress,
        memory_budget=memory_budget,
        basis_device=basis_device,
        verify=verify,
    )
    if return_vectors and vectors_as == "dict" and res.vectors is not None:
        res.vectors = op.unflatten(res.vectors)  # type: ignore[assignment]
    return _batched_note(res, op)


@collective
def spectral_density(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    matrix: str = "hessian",
    num_steps: int = 90,
    num_probes: int = 1,
    seed: int | None = None,
    *,
    generator: torch.Generator | None = None,
    sigma: float | None = None,
    grid_size: int = 1000,
    params: Params = None,
    reorth_passes: int = 0,
    memory_budget: float | None = None,
    basis_device: str | None = None,
    keep_graph: bool | None = None,
    show_progress: bool | None = None,
) -> DensityResult:
    """The spectral density by stochastic Lanczos quadrature (see :func:`curvlab.estimators.slq`).

    The density is that of the eigenvalues of the matrix of the objective ``L``: under
    ``reduction="mean"`` the mean over the loss terms (the examples, or the non-ignored tokens),
    under ``"sum"`` their sum (eigenvalues ``M`` times as large for the same losses, ``M`` the
    terms); see :func:`curvlab.curvature_operator`.

    Args:
        model, loss_fn, data, keep_graph: as in :func:`curvlab.curvature_operator`.
        matrix: ``"hessian"``, ``"ggn"``, ``"fisher"`` (labels drawn once per call),
            ``"empirical_fisher"``, ``"residual"`` (``H - G``), or an alias (``"exact"``/
            ``"true"``: ``"ggn"``; ``"mc"``; ``"empirical"``).
        num_steps: Lanczos steps per probe (a positive int; at most ``D`` are taken).
        num_probes: independent Rademacher probes (a positive int; ``.stderr`` is ``nan`` for
            one).
        seed: seed of the probes (and of the Monte-Carlo Fisher's labels); ``None``: 0 unless
            ``generator`` is given.
        generator: alternatively a ``torch.Generator`` on the model's device (not with
            ``seed``), drawn from for the Monte-Carlo Fisher's labels first, then the probes
            (see the module docstring).
        sigma: the Gaussian broadening's width (default 1% of the spread of the nodes, at
            least ``1e-8`` of their largest ``|theta|``; see
            :func:`curvlab.estimators.slq`).
        grid_size: points of ``.grid`` (an int >= 2), which spans the nodes plus ``5 sigma`` on
            each side.
        params: restrict to some parameters (names, module prefixes or a predicate
            ``fn(name, param)``): the density of that diagonal block.
        reorth_passes: 0 (default): the three-term recurrence, three parameter-vectors per
            probe; 2: full reorthogonalisation, ``num_steps + 2`` vectors (refused with the
            numbers where they do not fit ``memory_budget`` or the memory available).
        memory_budget: bytes the Lanczos vectors may take (``None`` or ``float("inf")``: no
            budget, only the memory available); checked before the data is read, as the
            other arguments and ``seed``: a budget below the vectors' need is refused then
            (:class:`~curvlab.estimators.EstimatorMemoryError`), the memory available before
            the first product. The density's float64 host arrays (about
            ``3 * num_probes * grid_size`` numbers, made after the vectors are freed) are not
            counted in it; a ``grid_size`` whose arrays exceed the host memory available is
            refused before the data is read.
        basis_device: where they are kept (default: the model's device); a device torch does
            not know or this machine lacks is refused before the data is read.
        show_progress: a progress bar on stderr (``None``: when stderr is a terminal).

    Returns:
        A :class:`DensityResult` with ``.grid``, ``.density`` (integrates to 1, see
        :class:`~curvlab.estimators.DensityResult`), ``.nodes``, ``.weights``, ``.stderr`` and
        ``.plot()``.
    """
    matrix = matrix_name(matrix)
    check_slq_args(num_steps, num_probes, sigma, grid_size, reorth_passes, memory_budget)
    check_basis_device(basis_device)
    _check_randomness(model, seed, generator)  # before the data, as the other arguments
    dim, dtype, device = _operator_plan(model, params)
    check_slq_plan(dim, dtype, device, num_steps, reorth_passes, memory_budget, basis_device)
    op: CurvatureOperator = curvature_operator(
        model,
        loss_fn,
        data,
        matrix,
        params=params,
        seed=seed,
        generator=generator,
        keep_graph=keep_graph,
    )
    res = slq(
        op,
        num_steps=num_steps,
        num_probes=num_probes,
        sigma=sigma,
        grid_size=grid_size,
        seed=seed,
        generator=generator,
        reorth_passes=reorth_passes,
        show_progress=show_progress,
        memory_budget=memory_budget,
        basis_device=basis_device,
    )
    res.info["loss_terms"] = float(op.num_examples * op.terms_per_example)
    res.info["terms_per_example"] = float(op.terms_per_example)
    return _batched_note(res, op)


R = TypeVar("R", TraceResult, EigenResult, DensityResult)


def _batched_note(res: R, op: CurvatureOperator) -> R:
    """``res`` with the operator's ``info["batched"]`` (its products ran one vector at a time:
    under anomaly mode, or after a failed batched product), where it has one."""
    note = op.info.get("batched")
    if note is not None:
        res.info["batched"] = note
    return res
