"""What an optimizer says about stability, read from its hyper-parameters and state (never written).

The in-loop sharpness measurements (:mod:`curvlab.analysis._sharpness`) need three things from the
user's optimizer, all computed here from ``param_groups`` and ``state`` without calling
``step()`` and without writing anything (the state's tensors are only read, so training goes on
bit for bit as without the measurement):

* **Stability thresholds** (the param groups' shared ``lr`` ``η`` and momentum; a group at
  ``lr = 0``, a frozen backbone, counts as parameters the optimizer does not hold): gradient
  descent on a quadratic with curvature ``λ`` diverges once ``λ > 2/η``; heavy-ball momentum
  ``β`` with dampening ``τ`` (PyTorch's ``buf <- β buf + (1 − τ) g``, ``θ <- θ − η buf``) once
  ``λ > (2 + 2β)/((1 − τ) η)``; Nesterov momentum once ``λ > (2 + 2β)/((1 + β + β(1 − τ)) η)``
  (``(2 + 2β)/((1 + 2β) η)`` without dampening); SGD's weight decay ``wd`` moves each down by
  ``wd``. Adam with a frozen preconditioner ``P`` is heavy-ball momentum on ``P⁻¹H`` with
  ``β = τ = β₁``, so its preconditioned sharpness ``λ_max(P⁻¹H)`` is stable below
  ``(2 + 2β₁)/((1 − β₁) η)`` (38/η for β₁ = 0.9; Cohen et al., 2022), AdamW's decoupled decay
  ``λ`` moves it to ``(1 + β₁)(2 − ηλ)/((1 − β₁) η)``; with several groups the smallest of the
  groups' own bounds (:func:`preconditioned_threshold`). Only the groups holding a parameter
  the measured operator covers count (a group whose parameters were all frozen with
  ``requires_grad_(False)`` is not in ``H``). No threshold under ``maximize=True``, nor for SGD
  groups in ``H`` with different learning rates or momenta.
* **Adam's preconditioner** after its last step ``t``:
  ``P = (1 − β₁ᵗ) (diag(sqrt(v_t / (1 − β₂ᵗ))) + ε)`` with ``v_t`` its ``exp_avg_sq`` (its
  running maximum under ``amsgrad``), so that the step is ``θ <- θ − η P⁻¹ m_t``. Parameter
  groups with another learning rate ``η_g`` get ``(η / η_g) P`` so that every group's step reads
  ``−η P⁻¹ m``.
* **The unit ``η``**, one rule for the three measurements and their thresholds
  (:func:`reference_lr`): the learning rate of the first param group at ``lr > 0`` that holds a
  parameter the measurement covers (the operator's for ``sharpness`` and
  ``preconditioned_sharpness``, the update's for ``critical_sharpness``); a group of another
  module's parameters in the same optimizer, or one frozen whole, sets no unit.
* **The update ``opt.step()`` would apply now** for a given gradient, computed functionally from
  the state (SGD with momentum, dampening, Nesterov, weight decay, ``maximize``; Adam and AdamW
  with weight decay, ``amsgrad``, ``maximize``), including the parameters ``step()`` moves
  without a gradient (a zero ``.grad``: frozen mid-run, or not reached by the loss).

Supported optimizers are exactly ``torch.optim.SGD``, ``torch.optim.Adam`` and
``torch.optim.AdamW`` (a subclass may change ``step``, so it is refused with a clear error rather
than guessed); wrappers that hold one as ``.optimizer`` or ``._optimizer`` (HuggingFace
Accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, curvlab's
``NoisyOptimizer``) are unwrapped. For ``NoisyOptimizer`` that models the inner optimizer's
**noise-free** step: the noise its ``step()`` adds to the gradient is random and left out.

**Step hooks** change ``step`` as a subclass can: torch runs the pre-hooks
(``opt.register_step_pre_hook``, and process-wide
``torch.optim.optimizer.register_optimizer_step_pre_hook``) and post-hooks (``..._post_hook``)
inside ``step()``, and a hook that rescales ``.grad`` or moves the parameters changes the step
that the functions here rebuild from the param groups and state (a pre-hook scaling ``.grad``
by 0.1 under SGD momentum 0.9 at ``lr = 0.3``: ``critical_sharpness`` 0.736 for a true 0.216,
``sharpness_threshold`` 12.7 for a true 126.7, silently; found in review s23). They are found by
:func:`step_hooks`; ``critical_sharpness`` refuses them (:func:`check_step_hooks`) and the
thresholds are left out with a ``RuntimeWarning``, unless the caller passes
``options={"ignore_optimizer_hooks": True}`` (:data:`IGNORE_HOOKS`) for hooks that do not change
the step (logging, an EMA copy of the weights). An LR scheduler wraps ``opt.step`` on the
instance rather than registering a hook, and changes only ``lr``, which is read at each
measurement; it is not a step hook.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> round(sharpness_threshold(sgd), 6)
    38.0
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "SUPPORTED",
    "IGNORE_HOOKS",
    "unwrap_optimizer",
    "check_optimizer_object",
    "check_optimizer",
    "step_hooks",
    "hooks_ignored",
    "check_step_hooks",
    "is_adam",
    "sharpness_threshold",
    "holds_all",
    "reference_lr",
    "preconditioned_threshold",
    "coupled_weight_decay",
    "critical_threshold",
    "adam_preconditioner",
    "would_be_update",
    "stepped_without_gradient",
    "record_grads",
]

SUPPORTED: tuple[type, ...] = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
"""The optimizers whose step curvlab reproduces (exact types, not subclasses)."""


WRAPPERS: frozenset[tuple[str, str]] = frozenset(
    {
        ("accelerate.optimizer", "AcceleratedOptimizer"),
        ("lightning.pytorch.core.optimizer", "LightningOptimizer"),
        ("pytorch_lightning.core.optimizer", "LightningOptimizer"),
        ("lightning.fabric.wrappers", "_FabricOptimizer"),
        ("lightning_fabric.wrappers", "_FabricOptimizer"),
        ("curvlab.noise._optim", "NoisyOptimizer"),
    }
)
"""(module, class) of the wrappers that step their inner optimizer (Accelerate's, Lightning's and
Fabric's pass ``step()`` through, a base of the class Lightning and Fabric make per instance;
curvlab's ``NoisyOptimizer`` adds its noise to the gradient and then calls it, and what is
modelled for it is the inner optimizer's noise-free step). Any other object holding an optimizer
as ``.optimizer`` (``Lookahead``, which moves the weights to slow copies every ``k`` steps) is
not unwrapped: its step may differ."""


_HAD_GRAD: ContextVar[frozenset[int] | None] = ContextVar("curvlab_had_grad", default=None)
"""Ids of the parameters that held a ``.grad`` tensor when :func:`record_grads` was entered."""


@contextmanager
def record_grads(model: nn.Module) -> Iterator[None]:
    """Remember, for the block, which of ``model``'s parameters hold a ``.grad`` tensor now.

    ``step()`` moves a parameter iff its ``.grad`` is not ``None``; curvlab's measurements run
    inside :func:`curvlab._notrace.leave_no_trace`, which sets every ``.grad`` to ``None`` for
    the block. Entered before it, this lets :func:`would_be_update` see the training loop's
    ``.grad`` (nothing is stored on the model; the record ends with the block).
    """
    token = _HAD_GRAD.set(frozenset(id(p) for p in model.parameters() if p.grad is not None))
    try:
        yield
    finally:
        _HAD_GRAD.reset(token)


def _has_grad(p: Tensor) -> bool:
    """Whether ``p`` has a ``.grad`` tensor in the training loop (:func:`record_grads`'s record
    where one is active, else ``p.grad`` itself)."""
    seen = _HAD_GRAD.get()
    return p.grad is not None if seen is None else id(p) in seen


def _inner(optimizer: Any) -> Any:
    """The optimizer a wrapper holds as ``.optimizer`` / ``._optimizer``, or ``None``."""
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(inner, torch.optim.Optimizer):
        inner = getattr(optimizer, "_optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else None


def _unwrapping(optimizer: Any) -> list[Any]:
    """``optimizer`` and the optimizers inside it that :func:`unwrap_optimizer` passes through,
    outermost first (the last is what it returns)."""
    chain = [optimizer]
    while type(optimizer) not in SUPPORTED and len(chain) <= 8:
        # Lightning and Fabric swap an instance's class for a made-up one, e.g. "LightningSGD"
        # with bases (LightningOptimizer, SGD): a known wrapper anywhere in the class's bases
        if not any((c.__module__, c.__name__) in WRAPPERS for c in type(optimizer).__mro__):
            break
        inner = _inner(optimizer)
        if inner is None:
            break
        optimizer = inner
        chain.append(optimizer)
    return chain


def unwrap_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim`` optimizer inside known wrappers (:data:`WRAPPERS`), or ``optimizer``
    itself."""
    return _unwrapping(optimizer)[-1]


def _holds_param_groups(optimizer: Any) -> bool:
    """Whether ``optimizer`` has ``param_groups`` as an optimizer has them (a list of dicts with
    ``"params"``): an optimizer that is no ``torch.optim.Optimizer`` (DeepSpeed's ZeRO ones)."""
    try:
        groups = getattr(optimizer, "param_groups", None)
    except Exception:  # noqa: BLE001 - a property that raises: not an optimizer's
        return False
    return isinstance(groups, (list, tuple)) and all(
        isinstance(g, dict) and "params" in g for g in groups
    )


def _is_scheduler(obj: Any) -> bool:
    """Whether ``obj`` is a ``torch.optim.lr_scheduler`` learning-rate scheduler."""
    schedulers = tuple(
        c
        for c in (
            getattr(torch.optim.lr_scheduler, "LRScheduler", None),
            getattr(torch.optim.lr_scheduler, "_LRScheduler", None),
            getattr(torch.optim.lr_scheduler, "ReduceLROnPlateau", None),
        )
        if isinstance(c, type)
    )
    return isinstance(obj, schedulers)


def check_optimizer_object(optimizer: Any) -> None:
    """Refuse, naming it, an ``optimizer=`` that is no optimizer at all.

    Accepted: a ``torch.optim.Optimizer`` (any kind: a subclass, ``ZeroRedundancyOptimizer``,
    Accelerate's ``AcceleratedOptimizer``), a known wrapper of one (:data:`WRAPPERS`:
    Lightning's, Fabric's, curvlab's ``NoisyOptimizer``), or an object with an optimizer's
    ``param_groups`` (DeepSpeed's). Whether the measurements can read its kind is
    :func:`check_optimizer`'s business. An LR scheduler (``optimizer=scheduler``, an easy slip),
    a string or the model's parameters were accepted before, and every record then lacked
    ``sharpness_threshold`` without a word (found in review).

    Raises:
        TypeError: naming the object's type and what to pass instead.
    """
    if isinstance(optimizer, torch.optim.Optimizer) or _holds_param_groups(optimizer):
        return
    if isinstance(unwrap_optimizer(optimizer), torch.optim.Optimizer):
        return
    head = (
        "optimizer= must be the training loop's optimizer (a torch.optim.Optimizer, or a "
        f"wrapper of one); got {type(optimizer).__name__}"
    )
    inner = _inner(optimizer)
    if _is_scheduler(optimizer) or (
        inner is not None and "schedul" in type(optimizer).__name__.lower()
    ):
        raise TypeError(
            f"{head}, a learning-rate scheduler: pass the optimizer it schedules, "
            "optimizer=scheduler.optimizer"
        )
    if inner is not None:
        attr = "optimizer" if getattr(optimizer, "optimizer", None) is inner else "_optimizer"
        raise TypeError(
            f"{head}, which holds a {type(inner).__name__} as .{attr}: if its step() is that "
            f"optimizer's, pass optimizer=<{type(optimizer).__name__}>.{attr}"
        )
    if isinstance(optimizer, str):
        raise TypeError(
            f"{head} {optimizer!r}: pass the optimizer object itself, e.g. "
            "opt = torch.optim.SGD(model.parameters(), lr=0.1); Diagnostics(..., optimizer=opt)"
        )
    if isinstance(optimizer, dict):  # settings ({"lr": 0.1}) or a state_dict, not parameters
        raise TypeError(
            f"{head}: pass the optimizer object itself (not its settings or state_dict), e.g. "
            "opt = torch.optim.SGD(model.parameters(), lr=0.1); Diagnostics(..., optimizer=opt)"
        )
    if isinstance(optimizer, (list, tuple)) or hasattr(optimizer, "__next__"):
        raise TypeError(
            f"{head} (its parameters?): pass the optimizer built from them, e.g. "
            "opt = torch.optim.SGD(model.parameters(), lr=0.1); Diagnostics(..., optimizer=opt)"
        )
    raise TypeError(f"{head}: pass the optimizer whose step() trains the model")


def check_optimizer(optimizer: Any, what: str, adam_only: bool = False) -> torch.optim.Optimizer:
    """``optimizer`` unwrapped, or a clear error naming the measurement ``what`` that needs it.

    Raises:
        ValueError: when ``optimizer`` is ``None``.
        TypeError: when it is not (a wrapper of) ``SGD``, ``Adam`` or ``AdamW`` (only the last two
            with ``adam_only``).
    """
    need = "an Adam or AdamW" if adam_only else "an SGD, Adam or AdamW"
    if optimizer is None:
        raise ValueError(
            f"{what} needs optimizer=, {need} (torch.optim) optimizer: "
            f"Diagnostics(model, loss_fn, quantities=[{what!r}], optimizer=opt)"
        )
    opt = unwrap_optimizer(optimizer)
    allowed = SUPPORTED[1:] if adam_only else SUPPORTED
    if type(opt) not in allowed:
        inner = _inner(opt)
        if inner is not None:
            raise TypeError(
                f"{what} needs optimizer=, {need} (torch.optim) optimizer; got "
                f"{type(opt).__name__} wrapping {type(inner).__name__}, a wrapper whose step() "
                "may differ from the inner optimizer's (Lookahead moves the weights every k "
                "steps); if its step() is exactly the inner one's, pass "
                "optimizer=<wrapper>.optimizer"
            )
        if isinstance(opt, allowed):
            why = "a subclass, refused: its step may differ from the class it extends"
        else:  # RMSprop, Adagrad, DeepSpeed's: the reason is not that it subclasses (review s23)
            names = ", ".join(f"torch.optim.{c.__name__}" for c in allowed)
            why = f"only exactly {names} are supported: their step is rebuilt from their state"
        # the optimizer refused, not the wrapper it came in (the HF Trainer's accelerate
        # AcceleratedOptimizer, NoisyOptimizer): "got AcceleratedOptimizer" for an Adafactor
        # until review s23
        inside = "" if opt is optimizer else f" inside {type(optimizer).__name__}"
        raise TypeError(
            f"{what} needs optimizer=, {need} (torch.optim) optimizer; got "
            f"{type(opt).__name__}{inside} ({why})"
        )
    if not opt.param_groups:
        raise ValueError(f"{what}: the optimizer has no parameter groups")
    return opt


IGNORE_HOOKS = "ignore_optimizer_hooks"
"""The measurement option (``Diagnostics(..., options={"ignore_optimizer_hooks": True})``) that
says the optimizer's step hooks (:func:`step_hooks`) do not change its step: logging, an EMA
copy of the weights. Without it ``critical_sharpness`` refuses them and the thresholds are left
out with a ``RuntimeWarning``."""

_OBSERVERS: frozenset[str] = frozenset(
    {
        "torch.profiler",
        "torch.distributed._tools.mem_tracker",
        "torch.distributed._tools.fsdp2_mem_tracker",
    }
)
"""Modules of torch's own step hooks that only observe the step: the profiler's global post-hook
(registered under ``KINETO_USE_DAEMON``, counts steps) and the memory trackers' (record the
state's tensors while tracking). :func:`step_hooks` leaves them out."""


def _hook_name(hook: Any) -> str:
    """``module.qualname`` of a hook (the function a ``functools.partial`` holds)."""
    fn = getattr(hook, "func", hook)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not isinstance(name, str):  # a callable object: its class
        fn, name = type(fn), f"{type(fn).__qualname__} object"
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if isinstance(module, str) and module != "builtins" else name


def _observes(hook: Any) -> bool:
    return getattr(getattr(hook, "func", hook), "__module__", None) in _OBSERVERS


def step_hooks(optimizer: Any) -> list[str]:
    """The step hooks torch runs inside ``optimizer.step()``, each as ``"<pre|post>-hook <name>
    (<where>)"``: those registered on the optimizer (``register_step_pre_hook`` /
    ``register_step_post_hook``, on it or on a wrapper :func:`unwrap_optimizer` passes through)
    and the process-wide ones (``torch.optim.optimizer.register_optimizer_step_pre_hook`` /
    ``_post_hook``), leaving out torch's own observers (:data:`_OBSERVERS`). Empty when there
    are none.

    The functions here rebuild the step from the param groups and state alone; a hook may
    change it (a pre-hook rescaling ``.grad``, a post-hook projecting the weights), so a
    non-empty list means that what they model may not be what ``step()`` does (found in review
    s23). An LR scheduler is no step hook (it wraps ``opt.step`` on the instance).
    """
    from torch.optim import optimizer as torch_optimizer

    found: list[str] = []
    seen: set[int] = set()

    def add(hooks: Any, kind: str, where: str) -> None:
        if not isinstance(hooks, dict) or id(hooks) in seen:
            return  # (Lightning's optimizer shares the inner one's __dict__, hooks included)
        seen.add(id(hooks))
        found.extend(
            f"{kind}-hook {_hook_name(h)} ({where})" for h in hooks.values() if not _observes(h)
        )

    for obj in _unwrapping(optimizer):
        where = f"registered on the {type(obj).__name__} with register_step_{{}}_hook"
        for kind in ("pre", "post"):
            add(getattr(obj, f"_optimizer_step_{kind}_hooks", None), kind, where.format(kind))
    for kind in ("pre", "post"):
        add(
            getattr(torch_optimizer, f"_global_optimizer_{kind}_hooks", None),
            kind,
            f"global, torch.optim.optimizer.register_optimizer_step_{kind}_hook",
        )
    return found


def hooks_ignored(options: Mapping[str, Any] | None) -> bool:
    """Whether ``options`` say the optimizer's step hooks do not change its step
    (:data:`IGNORE_HOOKS`)."""
    return bool((options or {}).get(IGNORE_HOOKS, False))


def check_step_hooks(optimizer: Any, what: str, options: Mapping[str, Any] | None = None) -> None:
    """Refuse an optimizer whose ``step()`` runs step hooks (:func:`step_hooks`) for the
    measurement ``what``, which models the update ``step()`` applies, unless ``options`` say they
    do not change it (:data:`IGNORE_HOOKS`).

    Raises:
        ValueError: naming the hooks (function, pre or post, on the optimizer or global) and
            the ways out.
    """
    hooks = [] if hooks_ignored(options) else step_hooks(optimizer)
    if hooks:
        raise ValueError(
            f"{what} models the update opt.step() applies from the optimizer's param groups and "
            f"state, but its step() also runs step hooks, which may change it: "
            f"{'; '.join(hooks)}. Remove them (handle.remove()) or leave {what} out; if they do "
            "not change the step (logging, an EMA copy of the weights), pass "
            f"options={{{IGNORE_HOOKS!r}: True}}"
        )


def is_adam(optimizer: Any) -> bool:
    """Whether ``optimizer`` (unwrapped) is exactly ``Adam`` or ``AdamW``."""
    return type(unwrap_optimizer(optimizer)) in SUPPORTED[1:]


def _lr(group: dict[str, Any]) -> float:
    lr = float(group["lr"])
    if not lr >= 0 or math.isinf(lr):
        raise ValueError(f"the optimizer's learning rate must be finite and >= 0, got {lr}")
    return lr


def _maximizes(groups: list[dict[str, Any]]) -> bool:
    """Whether some group ascends (``maximize=True``): a step then raises the loss by design, and
    no threshold describes when it diverges (that is ``−λ_min``'s business, not ``λ_max``'s)."""
    return any(bool(g.get("maximize", False)) for g in groups)


def _uniform(groups: list[dict[str, Any]], keys: tuple[str, ...]) -> bool:
    """Whether every group has the first group's values of ``keys`` (learning rates checked)."""
    for g in groups:
        _lr(g)
    first = groups[0]
    return all(float(g.get(k, 0.0)) == float(first.get(k, 0.0)) for g in groups[1:] for k in keys)


def _moving(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The param groups whose step moves their parameters (``lr > 0``), or all of them when none
    does (``lr = 0`` everywhere: the end of a linear decay, where no threshold exists).

    A group at ``lr = 0`` (a frozen backbone beside a trained head) is treated like parameters
    the optimizer does not hold: thresholds and the preconditioner come from the other groups.
    It was refused before ("the learning rate is 0", "P^-1 H undefined") though the head moved,
    found in review.
    """
    moving = [g for g in groups if _lr(g) > 0]
    return moving or list(groups)


def reference_lr(
    optimizer: Any, model: nn.Module | None = None, names: Collection[str] | None = None
) -> float:
    """``η``, the unit of the three sharpness measurements and their thresholds: the learning
    rate of the first param group that moves (``lr > 0``) and holds a parameter the measurement
    covers (:func:`_reference_groups`); 0 when none moves.

    One rule for all three (review s25): ``sharpness_threshold`` read the groups holding a
    parameter ``H`` covers; ``critical_sharpness`` those holding any parameter of the model, a
    frozen one too; ``preconditioned_sharpness`` the first moving group whatever it held, so that
    a group of another module's parameters first in the same optimizer at a third of the model's
    learning rate gave ``λ_max(P⁻¹H)`` and its threshold 3 times too large (107.73 for 35.91,
    38000 for 12666.7), and a first group frozen whole (a backbone at 1e-5 beside a head at
    1e-3) 100 times.

    Args:
        optimizer: the optimizer (or a wrapper of one).
        model: the measured model; ``None``: the first moving group.
        names: the parameters of ``model`` the measurement covers (the operator's ``names``; the
            parameters the update moves for ``critical_sharpness``); ``None``: all of them.
    """
    opt = unwrap_optimizer(optimizer)
    return _lr(_reference_groups(opt.param_groups, model, names)[0])


def _reference_groups(
    groups: list[dict[str, Any]], model: nn.Module | None, names: Collection[str] | None
) -> list[dict[str, Any]]:
    """The param groups that move (:func:`_moving`), hold a parameter of ``model``
    (:func:`_held`) and one named in ``names`` (:func:`_covered`), each filter skipped where no
    group passes it: their first gives ``η`` (:func:`reference_lr`), and they are the groups
    whose ``maximize`` and hyper-parameters a threshold reads."""
    return _covered(_held(_moving(groups), model), model, names)


def _max_decay(groups: list[dict[str, Any]]) -> float:
    return max(float(g.get("weight_decay", 0.0)) for g in groups)


def _covered(
    groups: list[dict[str, Any]], model: nn.Module | None, names: Collection[str] | None
) -> list[dict[str, Any]]:
    """The groups of ``groups`` that hold a parameter of ``model`` named in ``names`` (the
    parameters the measured operator covers), or ``groups`` itself when ``model`` or ``names`` is
    ``None`` or when no group does.

    A group whose parameters the operator leaves out (frozen with ``requires_grad_(False)``, the
    optimizer's state kept) moves them, if at all (a zero ``.grad``), by its momentum and decay
    alone: its own dynamics do not involve ``H``, so its learning rate, momentum and decay are no
    part of a threshold on ``λ_max`` of the operator. Such a group set the threshold before (600
    for a true 3800 under Adam with a frozen head at ``β₁ = 0.5``; SGD's was dropped as "groups
    differ"; found in review s20).
    """
    if model is None or names is None:
        return groups
    wanted = set(names)
    ids = _names(model)
    return [g for g in groups if any(ids.get(id(p)) in wanted for p in g["params"])] or groups


def _held(groups: list[dict[str, Any]], model: nn.Module | None) -> list[dict[str, Any]]:
    """The groups of ``groups`` holding a parameter of ``model`` (:func:`_covered` over all its
    parameters): a group of another module's parameters in the same optimizer adds nothing to
    the model's update. ``groups`` itself when ``model`` is ``None`` or none does."""
    return groups if model is None else _covered(groups, model, _names(model).values())


def sharpness_threshold(
    optimizer: Any, model: nn.Module | None = None, names: Collection[str] | None = None
) -> float | None:
    """The stability threshold of ``λ_max(H)`` under (momentum) SGD.

    ``T = 2/η`` without momentum; ``(2 + 2β)/((1 − τ) η)`` with heavy-ball momentum ``β`` and
    dampening ``τ``; ``(2 + 2β)/((1 + β + β(1 − τ)) η)`` with Nesterov momentum; ``T − wd`` with
    weight decay ``wd`` (SGD's decay is a gradient term: the step descends ``H + wd I``, stable
    iff ``λ_max(H) + wd < T``; with several groups' decays the largest, a sufficient condition).
    ``None`` for any other optimizer (Adam's threshold is that of the preconditioned sharpness),
    at ``η = 0``, under ``maximize=True``, and when the param groups differ in ``lr``,
    ``momentum``, ``dampening`` or ``nesterov`` (the stability condition is then one on
    ``diag(η)^½ H diag(η)^½``, not a threshold of ``λ_max(H)``). Groups at ``lr = 0`` are left
    out (:func:`_moving`): the threshold is that of the groups that move, which
    :func:`holds_all` then says do not cover every parameter. With ``model`` and ``names``
    only the groups holding a parameter named in ``names`` count (:func:`_covered`): a group
    whose parameters are all frozen does not make the groups differ, and its decay is not taken.

    Args:
        optimizer: the optimizer (or a wrapper of one).
        model: the model whose parameter names ``names`` are.
        names: the parameters ``H`` covers (the operator's ``names``: the trainable ones).
    """
    opt = unwrap_optimizer(optimizer)
    if type(opt) is not torch.optim.SGD or not opt.param_groups:
        return None
    groups = _reference_groups(opt.param_groups, model, names)  # η: reference_lr's
    if _maximizes(groups) or not _uniform(groups, ("lr", "momentum", "dampening", "nesterov")):
        return None
    group = groups[0]
    lr = _lr(group)
    if lr == 0:  # no step, no threshold (the end of a linear decay, a warm-up's start)
        return None
    beta = float(group.get("momentum", 0.0))
    tau = float(group.get("dampening", 0.0))
    if beta == 0:
        threshold = 2.0 / lr
    elif group.get("nesterov", False):
        threshold = (2.0 + 2.0 * beta) / ((1.0 + beta + beta * (1.0 - tau)) * lr)
    elif tau >= 1:
        return None  # the momentum buffer never sees a gradient after the first step
    else:
        threshold = (2.0 + 2.0 * beta) / ((1.0 - tau) * lr)
    return threshold - _max_decay(groups)


def holds_all(optimizer: Any, model: nn.Module) -> bool:
    """Whether ``optimizer`` (unwrapped) steps every trainable parameter of ``model``: the
    Hessian covers them all, so a threshold read from an optimizer of part of them (the body's,
    beside another optimizer for the head, or beside a group at ``lr = 0``) does not describe
    the step taken."""
    opt = unwrap_optimizer(optimizer)
    groups = getattr(opt, "param_groups", None) or []
    held = {id(p) for g in _moving(groups) for p in g["params"]}
    return all(id(p) in held for p in model.parameters() if p.requires_grad)


def _decoupled(opt: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    return bool(group.get("decoupled_weight_decay", type(opt) is torch.optim.AdamW))


def preconditioned_threshold(
    optimizer: Any, model: nn.Module | None = None, names: Collection[str] | None = None
) -> float | None:
    """The stability threshold of ``λ_max(P⁻¹H)`` under Adam/AdamW (Cohen et al., 2022).

    ``(2 + 2β₁)/((1 − β₁) η)`` with one param group. With decoupled weight decay ``λ`` (AdamW:
    ``θ <- (1 − ηλ) θ − η P⁻¹ m``) the linearised step with a frozen ``P`` is stable iff
    ``λ_max(P⁻¹H) < (1 + β₁)(2 − ηλ)/((1 − β₁) η)``. With several groups, group ``g`` (its own
    ``β₁,g``, learning rate ``η_g`` and decoupled decay ``λ_g``) decays by ``η_g λ_g`` per step
    and its ``P`` is scaled by ``η/η_g`` (:func:`adam_preconditioner`, ``η`` of
    :func:`reference_lr`), so its own bound is ``(1 + β₁,g)(2 − η_g λ_g)/((1 − β₁,g) η)``; the smallest of
    them is returned, a sufficient condition. It used ``β₁`` of the first group and
    ``η · max λ_g`` before: 722 for a true 380 with a second group at ten times the learning
    rate (found in review). Coupled (L2) decay is a gradient term and sits in the operator
    instead (:func:`coupled_weight_decay`). ``None`` at ``η = 0`` and under ``maximize=True``.
    Groups at ``lr = 0`` are left out (:func:`_moving`), and so are the groups holding no
    parameter the operator covers (:func:`_covered`): a head frozen mid-run with
    ``requires_grad_(False)`` keeps its Adam state but is not in ``H`` (its group's bound, 600
    at ``β₁ = 0.5``, was returned for a true 3800 before; found in review s20). ``η`` is the first
    of those groups' (:func:`reference_lr`), the unit :func:`adam_preconditioner` scales ``P`` to
    (it was the first moving group's, whatever it held: 38000 for a true 12666.7 with another
    module's group first at a third of the model's learning rate, found in review s25).

    Args:
        optimizer: ``torch.optim.Adam`` or ``AdamW`` (or a wrapper of one).
        model: when given, only the groups that hold a parameter of ``model`` the operator covers
            count; every moving group when ``None`` or when none does.
        names: the parameters of ``model`` the operator covers (its ``names``); by default those
            of ``model`` that require a gradient and the optimizer has stepped (those
            ``preconditioned_sharpness`` measures on).
    """
    opt = check_optimizer(optimizer, "preconditioned_sharpness", adam_only=True)
    if model is not None and names is None:
        names = _preconditioned_names(opt, model)
    # maximize is read on the covered groups only: a frozen group ascending dropped the
    # threshold of the measured ones (found in review s23); η is the first covered group's
    # (reference_lr), the unit adam_preconditioner scales P to (review s25)
    groups = _reference_groups(opt.param_groups, model, names)
    lr = _lr(groups[0])
    if lr == 0 or _maximizes(groups):
        return None
    bounds = []
    for g in groups:
        beta1 = float(g["betas"][0])
        decay = _lr(g) * float(g.get("weight_decay", 0.0)) if _decoupled(opt, g) else 0.0
        bounds.append((1.0 + beta1) * (2.0 - decay) / ((1.0 - beta1) * lr))
    return min(bounds)


def coupled_weight_decay(optimizer: Any, model: nn.Module) -> dict[str, float]:
    """Per parameter name, the L2 decay ``wd`` Adam adds to the gradient (``Adam(weight_decay=)``
    without decoupled decay): the step then descends ``L + wd/2 ‖θ‖²``, whose Hessian is
    ``H + wd I`` on those parameters. Only nonzero entries; empty for AdamW's decoupled decay."""
    opt = check_optimizer(optimizer, "preconditioned_sharpness", adam_only=True)
    names = _names(model)
    out: dict[str, float] = {}
    for group in opt.param_groups:
        wd = float(group.get("weight_decay", 0.0))
        if wd == 0 or _decoupled(opt, group):
            continue
        for p in group["params"]:
            if id(p) in names:
                out[names[id(p)]] = wd
    return out


def critical_threshold(
    optimizer: Any, model: nn.Module | None = None, names: Collection[str] | None = None
) -> float | None:
    """``2/η`` with ``η`` of :func:`reference_lr`: the step ``−η d`` raises the loss iff
    ``λ_c > 2/η``; ``None`` at ``η = 0`` and under ``maximize=True`` (an ascent step raises it
    by design).

    With ``model`` only the groups holding one of its parameters count (:func:`_held`), for
    ``η`` and for ``maximize``: a group of another module's parameters in the same optimizer
    set ``η`` (``λ_c`` and the threshold 3 times too large with such a group first at a third
    of the model's learning rate) and, ascending, dropped the threshold (found in review s23).
    With ``names`` (the parameters the update moves) only the groups holding one of those: a
    first group frozen whole (``requires_grad_(False)``, its ``.grad`` ``None``), which
    ``step()`` does not move, set ``η`` (100 times too large a ``λ_c`` for a backbone at 1e-5
    beside a head at 1e-3; found in review s25).
    """
    opt = check_optimizer(optimizer, "critical_sharpness")
    groups = _reference_groups(opt.param_groups, model, names)
    lr = _lr(groups[0])
    return None if lr == 0 or _maximizes(groups) else 2.0 / lr


def _names(model: nn.Module) -> dict[int, str]:
    """Parameter object id -> its (first) name in ``model.named_parameters()``."""
    out: dict[int, str] = {}
    for name, p in model.named_parameters():
        out.setdefault(id(p), name)
    return out


def _step_count(state: dict[str, Any]) -> float:
    step = state.get("step", 0)
    return float(step.item() if isinstance(step, Tensor) else step)


def _stepped(opt: torch.optim.Optimizer, p: Tensor) -> bool:
    """Whether Adam has stepped ``p`` (its state has a second moment after step 1 or later)."""
    state = opt.state.get(p) or {}
    return "exp_avg_sq" in state and _step_count(state) >= 1


def _preconditioned_names(opt: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The parameters of ``model`` ``preconditioned_sharpness`` measures on, as far as the
    optimizer tells: those that require a gradient and that Adam has stepped."""
    return [n for n, p in model.named_parameters() if p.requires_grad and _stepped(opt, p)]


def adam_preconditioner(
    optimizer: Any, model: nn.Module, names: Collection[str] | None = None
) -> dict[str, Tensor]:
    """The diagonal of Adam's preconditioner ``P`` per parameter name (see the module docstring).

    Only parameters the optimizer has stepped (that have a state) and moves (their group's
    ``lr > 0``, :func:`_moving`; every group when none does) are included, in float64 on the
    parameter's device; ``P`` is scaled by ``η/η_g`` for a group whose learning rate ``η_g``
    differs from ``η``, the first moving group's that holds a parameter the operator covers
    (:func:`reference_lr`; ``names``, by default those that require a gradient and that Adam has
    stepped). ``η`` was the first moving group's whatever it held before review s25: another
    module's group first at a third of the model's learning rate gave ``λ_max(P⁻¹H)`` 3 times
    too large (107.73 for 35.91), a first group frozen whole 100 times (1e-5 beside 1e-3).

    Raises:
        ValueError: if the optimizer holds none of the model's parameters (it was built on
            another copy of the model), holds them only in groups at ``lr = 0``, or has not
            stepped them yet (no state).
    """
    opt = check_optimizer(optimizer, "preconditioned_sharpness", adam_only=True)
    if names is None:
        names = _preconditioned_names(opt, model)
    lr0 = reference_lr(opt, model, names)
    groups = _moving(opt.param_groups)
    ids = _names(model)
    out: dict[str, Tensor] = {}
    for group in groups:
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        lr = _lr(group)
        scale = 1.0 if lr == lr0 else lr0 / lr
        for p in group["params"]:
            name = ids.get(id(p))
            if name is None or not _stepped(opt, p):
                continue
            state = opt.state[p]
            t = _step_count(state)
            v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
            v = v.detach().to(torch.float64)
            bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
            out[name] = (bc1 * scale) * ((v / bc2).sqrt() + eps)
    if not out:
        if not any(id(p) in ids for g in opt.param_groups for p in g["params"]):
            # "no state yet" misled here: it had stepped, on other tensors (found in review)
            raise ValueError(
                "preconditioned_sharpness: the optimizer holds none of the model's parameters "
                "(was it built on another copy of the model, e.g. before a deepcopy, or on an "
                "EMA copy's parameters?); pass the optimizer that steps this model's parameters"
            )
        if not any(id(p) in ids for g in groups for p in g["params"]):
            raise ValueError(
                "preconditioned_sharpness: the optimizer holds the model's parameters only in "
                "param groups at lr = 0, which do not move them; measure while their lr is > 0"
            )
        raise ValueError(
            "preconditioned_sharpness: the optimizer has no state for the model's parameters "
            "yet (Adam's preconditioner exists after its first step); measure after opt.step()"
        )
    return out


def would_be_update(
    optimizer: Any, model: nn.Module, grads: dict[str, Tensor | None]
) -> dict[str, Tensor]:
    """The change ``Δθ`` that ``optimizer.step()`` would apply now if ``.grad`` were ``grads``.

    Computed functionally from the param groups and the state (nothing is written): SGD
    (weight decay, momentum with dampening, Nesterov, ``maximize``), Adam and AdamW (coupled or
    decoupled weight decay, ``amsgrad``, ``maximize``). ``step()`` moves every parameter it
    holds whose ``.grad`` is not ``None``, whether or not it requires a gradient; a parameter
    the loop's backward does not reach (``grads`` gives ``None`` or leaves it out: frozen with
    ``requires_grad_(False)`` mid-run, or unused by the loss) is therefore skipped when its
    ``.grad`` is ``None`` (inside :func:`record_grads`: was ``None`` on entry) and otherwise
    stepped with a zero gradient, what ``zero_grad(set_to_none=False)`` and a backward that does
    not reach it leave in ``.grad`` (momentum, Adam's moments and weight decay still move it; it
    was left out before, 5.37 for a true 5.50, found in review). Results are keyed by
    ``model.named_parameters()`` names, in the parameters' dtype, dense: a sparse gradient or
    the sparse momentum buffer ``step()`` keeps for one (``nn.Embedding(sparse=True)``) is
    densified first (it raised torch's "add(sparse, dense) is not supported", found in review
    s20).

    Args:
        optimizer: ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (or a wrapper of one).
        model: the model whose parameter names key ``grads`` and the result.
        grads: name -> the gradient the loop's backward would leave in ``.grad`` (``None``:
            it does not reach the parameter).

    Step hooks (:func:`step_hooks`) are not modelled: ``step()`` runs them, this does not
    (``critical_sharpness`` refuses them first, :func:`check_step_hooks`).

    Raises:
        TypeError: for another optimizer.
    """
    opt = check_optimizer(optimizer, "critical_sharpness")
    names = _names(model)
    params = dict(model.named_parameters())
    adam = type(opt) is not torch.optim.SGD
    out: dict[str, Tensor] = {}
    for group in opt.param_groups:
        lr = float(group["lr"])
        wd = float(group.get("weight_decay", 0.0))
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                continue
            g = grads.get(name)
            if g is None:
                if not _has_grad(p):  # step() skips it
                    continue
                g = torch.zeros_like(p.detach())  # step() uses the zero .grad backward leaves
            g = _dense(g.detach()).to(p.dtype)
            if group.get("maximize", False):
                g = -g
            state = opt.state.get(p) or {}
            theta = params[name].detach()
            if adam:
                out[name] = _adam_update(group, state, theta, g, lr, wd, type(opt))
            else:
                out[name] = _sgd_update(group, state, theta, g, lr, wd)
    return out


def _dense(t: Tensor) -> Tensor:
    """``t`` as a strided tensor (a sparse one densified, its repeated indices summed)."""
    return t.to_dense() if t.layout != torch.strided else t


def _sgd_update(
    group: dict[str, Any], state: dict[str, Any], theta: Tensor, g: Tensor, lr: float, wd: float
) -> Tensor:
    """SGD's step for the gradient ``g``, dense. ``step()`` keeps a sparse momentum buffer for a
    sparse gradient (``nn.Embedding(sparse=True)``); it is densified here, which changes no
    number (a sparse buffer plus a dense gradient raised torch's "add(sparse, dense) is not
    supported", found in review s20)."""
    if wd != 0:
        g = g + wd * theta
    beta = float(group.get("momentum", 0.0))
    if beta != 0:
        buf = state.get("momentum_buffer")
        tau = float(group.get("dampening", 0.0))
        new_buf = g.clone() if buf is None else beta * _dense(buf.detach()) + (1.0 - tau) * g
        g = g + beta * new_buf if group.get("nesterov", False) else new_buf
    return -lr * g


def _adam_update(
    group: dict[str, Any],
    state: dict[str, Any],
    theta: Tensor,
    g: Tensor,
    lr: float,
    wd: float,
    kind: type,
) -> Tensor:
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    decoupled = bool(group.get("decoupled_weight_decay", kind is torch.optim.AdamW))
    if wd != 0 and not decoupled:
        g = g + wd * theta
    t = _step_count(state) + 1.0
    m = state.get("exp_avg")
    v = state.get("exp_avg_sq")
    m = (1.0 - beta1) * g if m is None else beta1 * m.detach() + (1.0 - beta1) * g
    v = (1.0 - beta2) * g * g if v is None else beta2 * v.detach() + (1.0 - beta2) * g * g
    if group.get("amsgrad", False):
        vmax = state.get("max_exp_avg_sq")
        v = v if vmax is None else torch.maximum(vmax.detach(), v)
    bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
    step = -(lr / bc1) * m / ((v / bc2).sqrt() + eps)
    if wd != 0 and decoupled:
        step = step - (lr * wd) * theta
    return step


def stepped_without_gradient(optimizer: Any, model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters that ``optimizer.step()`` moves though they do not require a
    gradient: held by the optimizer, ``requires_grad`` ``False`` and a ``.grad`` tensor (a
    parameter frozen mid-run in a loop that zeroes with ``zero_grad(set_to_none=False)``; see
    :func:`would_be_update`; inside :func:`record_grads`, the ``.grad`` it recorded)."""
    opt = unwrap_optimizer(optimizer)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    return [
        n
        for n, p in model.named_parameters()
        if not p.requires_grad and id(p) in held and _has_grad(p)
    ]
