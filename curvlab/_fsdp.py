"""FSDP2 (``torch.distributed.fsdp.fully_shard``) models: which calls take them, and the refusals.

Under FSDP2 every rank holds a shard of each parameter (a ``DTensor``). curvlab computes the
first-order quantities of such a model exactly, with each rank passing its shard of the data
(:data:`SUPPORTED`; the route is :mod:`curvlab.backends._fsdp2`: the parameters all-gathered once
for the call, curvlab's layer hooks, the sweep's one all-reduce; results are plain full tensors,
identical on every rank, keyed by the user's parameter names; the call's process group must fit
the model's device mesh, :func:`group_mesh_message`), and the noise samplers built on
them (``DiagFisherNoise``, ``FisherTraceNoise``; ``IsotropicNoise`` needs none):
``sampler.sample`` returns full draws, identical on every rank, and
:class:`~curvlab.noise.NoisyOptimizer` adds to each sharded ``.grad`` this rank's part of one
shared draw (:func:`place_like`). Everything else is refused before any work with a clear
``NotImplementedError`` (:func:`unsupported_message`): second-order products (a double backward
does not go through FSDP's hooks, pytorch#106637), the gradient-norm penalties of
:mod:`curvlab.regularizers` (:func:`penalty_message`), K-FAC, ``fisher_norms``, ``analyze``, the
other noise samplers, FSDP1 (``FullyShardedDataParallel``), DTensor parameters outside FSDP2
(tensor parallelism) and a submodule of an FSDP2 model that is not a ``fully_shard`` unit itself,
whose parameters an enclosing unit holds (:func:`enclosed_parameters`).

An entry point opts in with :func:`supports_fsdp2` (decorating it outside ``@collective``), or
for one ``unwrap_model`` with :func:`fsdp2_allowed` (``Diagnostics``, the noise samplers, which
check the model themselves right after); :func:`curvlab.distributed.unwrap_model` lets an FSDP2
model through only for a call that opted in (:func:`take_allowance`), so every other entry point,
and any call nested in an opted-in one that does not opt in itself, refuses. See
docs/distributed.md, "FSDP2".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "FIRST_ORDER_QUANTITIES",
    "FULL_COPY",
    "PENALTIES",
    "SUPPORTED",
    "check_quantities",
    "dtensor_type",
    "enclosed_message",
    "enclosed_parameters",
    "fsdp2_allowed",
    "fsdp2_module_type",
    "fsdp_kind",
    "group_mesh_message",
    "mesh_layouts",
    "penalty_message",
    "place_like",
    "supports_fsdp2",
    "take_allowance",
    "unsupported_message",
]

FIRST_ORDER_QUANTITIES = (
    "loss",
    "grad_norm",
    "trace_empirical_fisher",
    "noise_scale",
    "trace_fisher",
)
"""The ``Diagnostics`` quantities measured on an FSDP2 model (one sweep of the hooks)."""

SUPPORTED = (
    "diag_fisher (kind='empirical', 'mc' or 'exact'), gradient_stats (mean, variance, noise "
    "scale), Diagnostics with the first-order quantities "
    + ", ".join(FIRST_ORDER_QUANTITIES)
    + ", and the noise of DiagFisherNoise (any kind), FisherTraceNoise and IsotropicNoise "
    "(NoisyOptimizer, sampler.sample)"
)
"""What curvlab computes on an FSDP2 model (named in every refusal)."""

FULL_COPY = (
    "Gather a full copy instead and measure it in one process: on every rank (a collective) "
    "sd = torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
    "options=StateDictOptions(full_state_dict=True, cpu_offload=True)); then on rank 0 (which "
    "alone receives it with cpu_offload=True) load sd into an unsharded instance of the model "
    "(plain.load_state_dict(sd)) and call curvlab with process_group='local' (or, with "
    "cpu_offload=False, wrap such a copy in DistributedDataParallel on every rank if it fits "
    "one device)"
)

_ALLOW: ContextVar[bool] = ContextVar("curvlab_fsdp2_allowed", default=False)

F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- what the model is
def fsdp2_module_type() -> type | None:
    """``torch.distributed.fsdp.FSDPModule``, or ``None`` on a build without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - builds without FSDP2
        return None
    return FSDPModule


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or ``None`` on a build without it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without DTensor
        return None
    return DTensor


def fsdp_kind(model: nn.Module) -> str | None:
    """``"fsdp1"``, ``"fsdp2"``, ``"fsdp2_enclosed"`` (parameters of a ``fully_shard`` unit that
    encloses ``model``, :func:`enclosed_parameters`), ``"dtensor"`` (DTensor parameters without
    FSDP2) or ``None``.

    Costs one ``is_initialized()`` check when ``torch.distributed`` is not initialised (FSDP
    needs it), else one walk of the modules.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - builds without FSDP
        FullyShardedDataParallel = None  # noqa: N806
    fsdp2 = fsdp2_module_type()
    modules = list(model.modules())
    if FullyShardedDataParallel is not None and any(
        isinstance(m, FullyShardedDataParallel) for m in modules
    ):
        return "fsdp1"
    if enclosed_parameters(model):
        return "fsdp2_enclosed"
    if fsdp2 is not None and any(isinstance(m, fsdp2) for m in modules):
        return "fsdp2"
    dtensor = dtensor_type()
    if dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters()):
        return "dtensor"
    return None


def enclosed_parameters(model: nn.Module) -> list[str]:
    """Names of ``model``'s sharded parameters that a ``fully_shard`` unit *enclosing* ``model``
    holds: ``model`` is a submodule of an FSDP2 tree (``outer.net``) but not a unit itself, and
    these parameters lie outside every unit inside it, so they belong to the enclosing unit's
    group, which only that unit (a collective of all ranks) can gather.

    Told apart from tensor parallelism by FSDP2's mark on the modules whose parameters a unit
    manages (``_is_fsdp_managed_module``). One walk of the modules.
    """
    fsdp2, dtensor = fsdp2_module_type(), dtensor_type()
    if fsdp2 is None or dtensor is None:
        return []
    found: list[str] = []
    stack: list[tuple[str, nn.Module, bool]] = [("", model, False)]
    while stack:
        prefix, module, inside = stack.pop()
        inside = inside or isinstance(module, fsdp2)  # a unit inside model gathers its own
        if not inside and getattr(module, "_is_fsdp_managed_module", False):
            found += [prefix + a for a, p in module._parameters.items() if isinstance(p, dtensor)]
        stack.extend(
            (f"{prefix}{name}.", child, inside)
            for name, child in reversed(module._modules.items())
            if child is not None
        )
    return found


def enclosed_message(model: nn.Module, what: str = "this curvlab call") -> str:
    """The refusal for a submodule of an FSDP2 tree that is not a unit itself
    (:func:`enclosed_parameters`)."""
    names = enclosed_parameters(model)
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return (
        f"{what} cannot measure this module: it is a submodule of a fully_shard (FSDP2) model "
        f"but not a fully_shard unit itself, and its parameters {names[:4]}{more} belong to "
        "the enclosing unit's parameter group (they lie outside every fully_shard unit inside "
        "this module), which only the enclosing unit can gather. Measure the enclosing "
        "fully_shard module (e.g. cl.diag_fisher(outer, ...) instead of outer.net; results are "
        "keyed by its names, 'net.4.weight'), or make this module a unit of its own: "
        "fully_shard(outer.net) before fully_shard(outer) (docs/distributed.md, 'FSDP2')"
    )


# --------------------------------------------------------------------------- opting in
def supports_fsdp2(fn: F) -> F:
    """Mark an entry point (decorate *outside* ``@collective``) as computing FSDP2 models.

    The wrapper grants the next :func:`curvlab.distributed.unwrap_model` of the call the right
    to pass an FSDP2 model through (:func:`take_allowance`); calls nested inside it do not
    inherit the right.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _ALLOW.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _ALLOW.reset(token)

    return wrapper  # type: ignore[return-value]


@contextmanager
def fsdp2_allowed(allowed: bool = True) -> Iterator[None]:
    """Let the next ``unwrap_model`` in the block pass an FSDP2 model through (if ``allowed``)."""
    token = _ALLOW.set(allowed)
    try:
        yield
    finally:
        _ALLOW.reset(token)


def take_allowance() -> bool:
    """Whether the running call may take an FSDP2 model; the right is used up by asking."""
    allowed = _ALLOW.get()
    if allowed:
        _ALLOW.set(False)  # nested calls start without it (the opt-in's reset restores it)
    return allowed


def unsupported_message(kind: str, what: str = "this curvlab call") -> str:
    """The refusal for a sharded model of ``kind`` (see :func:`fsdp_kind`)."""
    if kind == "fsdp2":
        return (
            f"{what} does not run on an FSDP2 (fully_shard) model. Under FSDP2 curvlab computes "
            f"first-order quantities only (and noise built on them), exactly, with each rank "
            f"passing its shard of the data: {SUPPORTED} (docs/distributed.md, 'FSDP2'). "
            "Second-order products (curvature_operator, trace, eigenvalues, spectral_density, "
            "diag_hessian, fisher_trace, analyze) and the gradient-norm penalties "
            "(curvlab.regularizers) need a double backward, which does not go through FSDP's "
            "hooks (pytorch#106637); kfac, fisher_norms and the other noise samplers (KFACNoise, "
            "FullFisherNoise, MultiplicativeNoise) are not implemented for sharded parameters. "
            + FULL_COPY
        )
    if kind == "fsdp2_enclosed":
        return (
            f"{what} cannot measure a submodule of a fully_shard (FSDP2) model that is not a "
            "fully_shard unit itself: parameters outside the units inside it belong to the "
            "enclosing unit's group. Measure the enclosing fully_shard module, or "
            "fully_shard(this module) before the enclosing one (docs/distributed.md, 'FSDP2')"
        )
    if kind == "dtensor":
        return (
            f"{what} does not support DTensor parameters outside FSDP2 (tensor parallelism, or a "
            f"2-D mesh whose all-gathered parameters are still sharded): curvature needs every "
            f"parameter whole. On an FSDP2 (fully_shard) model curvlab computes {SUPPORTED}. "
            + FULL_COPY
        )
    return (
        "curvlab does not support FullyShardedDataParallel (FSDP1) models: curvature needs every "
        "parameter whole on each rank. Supported: plain models and DistributedDataParallel under "
        "torch.distributed (each rank holds a full replica and its own data shard), and on an "
        f"FSDP2 (fully_shard) model {SUPPORTED}. " + FULL_COPY
    )


def place_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full``, placed like the DTensor ``like`` (``full`` itself otherwise).

    ``full`` is a plain tensor of ``like``'s full shape, identical on every rank (a noise draw);
    ``distribute_tensor(..., src_data_rank=None)`` cuts out each rank's part locally, with no
    communication (torch >= 2.7; before, rank 0's copy is scattered), for any placements
    (uneven ``Shard(0)`` as FSDP2 makes them included), so ``like.add_(place_like(full, like))``
    adds ``full`` to a sharded gradient.
    """
    dtensor = dtensor_type()
    if dtensor is None or not isinstance(like, dtensor):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(like.dtype)
    try:
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    except TypeError:  # torch < 2.7: no src_data_rank; rank 0's copy is scattered (the same)
        return distribute_tensor(full, like.device_mesh, like.placements)


def check_quantities(model: nn.Module, quantities: Iterable[str]) -> None:
    """Refuse ``Diagnostics`` quantities that are not first-order on an FSDP2 model.

    Raises:
        NotImplementedError: naming the quantities that cannot be measured and those that can.
    """
    if fsdp_kind(model) != "fsdp2":
        return
    other = [q for q in quantities if q not in FIRST_ORDER_QUANTITIES]
    if other:
        raise NotImplementedError(
            f"Diagnostics cannot measure {other} on an FSDP2 (fully_shard) model: under FSDP2 "
            f"it measures the first-order quantities {list(FIRST_ORDER_QUANTITIES)} only "
            "(pass quantities=... with those). " + unsupported_message("fsdp2", "Measuring them")
        )


# --------------------------------------------------------------------------- group and mesh
def _param_groups(module: nn.Module) -> list[Any]:
    """The FSDP parameter groups of one ``fully_shard`` unit (FSDP2 internals)."""
    state = module._get_fsdp_state()
    found = getattr(state, "_fsdp_param_groups", None)
    if found is None:  # torch < 2.7 kept one group per state
        single = getattr(state, "_fsdp_param_group", None)
        found = [] if single is None else [single]
    return list(found)


def mesh_layouts(model: nn.Module) -> list[tuple[list[int], list[list[int]]]]:
    """For each distinct device mesh of ``model``'s ``fully_shard`` units: the global ranks
    that hold the model on it (the whole mesh, or the whole SPMD mesh with tensor-parallel
    dimensions) and its shard groups (the ranks along the mesh's shard dimension, one list per
    replica: the groups FSDP's all-gather runs over; the rows of an HSDP mesh).

    Read from each parameter group's ``mesh_info`` (FSDP2 internals); a group without a shard
    dimension (replication only) gathers nothing and is left out. Local: no communication.
    """
    fsdp = fsdp2_module_type()
    if fsdp is None:
        return []
    found: dict[tuple[Any, ...], tuple[list[int], list[list[int]]]] = {}
    for module in model.modules():
        if not isinstance(module, fsdp):
            continue
        for group in _param_groups(module):
            info = getattr(group, "mesh_info", None)
            mesh = getattr(info, "mesh", None)
            dim = getattr(info, "shard_mesh_dim", None)
            if mesh is None or dim is None:
                continue
            spmd = getattr(info, "spmd_mesh", None)
            ranks = torch.as_tensor(mesh.mesh)
            holders = sorted(
                torch.as_tensor((mesh if spmd is None else spmd).mesh).flatten().tolist()
            )
            shards = ranks.movedim(dim, -1).reshape(-1, ranks.shape[dim]).tolist()
            key = (tuple(holders), tuple(tuple(s) for s in shards))
            found.setdefault(key, (holders, shards))
    return list(found.values())


def _listed(ranks: Iterable[int], most: int = 8) -> str:
    """``ranks`` for a message: all of them, or the first ``most`` and the count."""
    ranks = list(ranks)
    if len(ranks) <= most:
        return str(ranks)
    return f"[{', '.join(map(str, ranks[:most]))}, ...] ({len(ranks)} ranks)"


def group_mesh_message(model: nn.Module, comm: Any) -> str | None:
    """Why the group of a call on the FSDP2 ``model`` does not fit its device mesh, or ``None``.

    FSDP2 gathers a parameter over its shard group (the ranks along the mesh's shard dimension)
    and curvlab adds the sums of every rank of the call's group, so the group must be

    * within the ranks that hold the model (the mesh): another rank's sums would be of another
      model, and a rank that does not call would be waited for; and
    * made of whole shard groups: a shard group that the call's group cuts would wait in FSDP's
      all-gather for its ranks outside the group, until the timeout (found in review: a group
      of 2 of a 3-rank mesh hung for gloo's whole timeout).

    So the group is the whole mesh (a 1-D mesh, the default group when the mesh spans the
    world) or, under HSDP (a 2-D ``(replicate, shard)`` mesh), any set of whole replicas
    (``process_group="local"`` where each replica is one rank). The answer depends only on the
    group and the mesh, which every rank of a mesh holds alike, so every member of the group
    refuses together, before any communication.

    Args:
        model: an FSDP2 model.
        comm: the call's :class:`curvlab.distributed.Comm`, ``None`` for this rank alone
            (``process_group="local"``, a group of one process, or a world of one).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    layouts = mesh_layouts(model)
    if comm is None:
        members = [torch.distributed.get_rank()]
    elif comm.group is None:
        members = list(range(torch.distributed.get_world_size()))
    else:
        members = sorted(torch.distributed.get_process_group_ranks(comm.group))
    group = set(members)
    for holders, shards in layouts:
        outside = sorted(group - set(holders))
        cut = [s for s in shards if 0 < len(group.intersection(s)) < len(s)]
        if comm is None and cut:
            return (
                "process_group='local' (or a group of one process) cannot be used with this "
                "FSDP2 (fully_shard) model: gathering its sharded parameters is a collective of "
                f"each shard group of its device mesh (here ranks {_listed(cut[0])}), so a rank "
                "calling alone would wait for the others. Call it on every rank of the mesh "
                "with the default group (each passing its shard of the data), or call it with "
                "process_group='local' on a full, unsharded copy of the model "
                "(docs/distributed.md, 'FSDP2')"
            )
        if outside:
            return (
                f"process_group= does not fit this FSDP2 (fully_shard) model: ranks "
                f"{_listed(outside)} of the group (ranks {_listed(members)}) hold no shard of "
                f"its parameters, which lie on the device mesh of ranks {_listed(holders)}. "
                "curvlab adds up the sums of every rank of the group, so theirs would be of "
                "another model (and ranks that do not call would be waited for until the "
                "timeout). Pass a group of the mesh's ranks: process_group="
                "torch.distributed.new_group(ranks) with ranks the whole mesh's (made on every "
                "rank; only its members call) or, under HSDP (a 2-D (replicate, shard) mesh), "
                "whole replicas (docs/distributed.md, 'FSDP2')"
            )
        if cut:
            missing = sorted(set(cut[0]) - group)
            listed = ", ".join(_listed(s) for s in shards[:4])
            listed += f" and {len(shards) - 4} more" if len(shards) > 4 else ""
            listed = ("shard group " if len(shards) == 1 else "shard groups ") + listed
            return (
                f"process_group= does not fit this FSDP2 (fully_shard) model: its parameters "
                f"are gathered over the {listed} of its "
                f"device mesh (a collective of each), and the group (ranks {_listed(members)}) "
                f"cuts {_listed(cut[0])}: the all-gather would wait for ranks "
                f"{_listed(missing)}, which do not call, until the timeout. Pass a group made "
                "of whole shard groups: the whole mesh (the default group when the mesh spans "
                "every rank) or, under HSDP (a 2-D (replicate, shard) mesh), whole replicas "
                "(docs/distributed.md, 'FSDP2')"
            )
    return None


PENALTIES = (
    "fisher_penalty, gradient_penalty, random_label_penalty, input_gradient_penalty, "
    "GradientNormPenalty and FisherPenalty"
)
"""The gradient-norm penalties (:mod:`curvlab.regularizers`), named in their refusal."""


def penalty_message(kind: str) -> str:
    """The refusal of a gradient-norm penalty on a sharded model of ``kind`` (see
    :func:`fsdp_kind`): the penalty's gradient is a double backward through the model."""
    what = f"the gradient-norm penalties of curvlab.regularizers ({PENALTIES})"
    if kind in ("fsdp2", "fsdp2_enclosed"):
        return (
            f"{what} do not run on an FSDP2 (fully_shard) model: a penalty is a gradient norm, "
            "and its gradient a double backward through the model, which does not go through "
            "FSDP's hooks (pytorch#106637): FSDP reshards parameters after the forward, so a "
            "penalty of the output= given leaves them out (its value and gradient are then "
            "wrong), and the penalty's backward fails inside FSDP. "
            "Train with DistributedDataParallel (every rank a full replica of the model) to "
            "use a penalty, or leave it out under FSDP2. Under FSDP2 curvlab computes "
            f"{SUPPORTED} (docs/distributed.md, 'FSDP2')"
        )
    if kind == "dtensor":
        return (
            f"{what} do not support DTensor parameters outside FSDP2 (tensor parallelism): "
            "a penalty's gradient differentiates every parameter twice, whole. Train with "
            "DistributedDataParallel (every rank a full replica of the model) to use a penalty"
        )
    return (
        f"{what} do not support FullyShardedDataParallel (FSDP1) models: a penalty's gradient "
        "is a double backward through the model, which needs every parameter whole on each "
        "rank. Train with DistributedDataParallel (every rank a full replica of the model) to "
        "use a penalty"
    )
