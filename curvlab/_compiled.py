"""``torch.compile``d models: curvlab's own passes run the original module, eagerly.

``torch.compile(model)`` returns an ``OptimizedModule`` whose parameters are named
``_orig_mod.<name>`` and whose forward runs through AOTAutograd, which has no double backward
(Hessian products, the Fisher penalty) and turns curvlab's layer hooks into graph breaks. The user's
model, with the user's names, is ``model._orig_mod``. So:

* :func:`strip_wrappers` takes the module out of any nesting of ``torch.compile``,
  ``DistributedDataParallel`` and ``DataParallel`` wrappers (``curvlab.distributed.unwrap_model``
  uses it, so every entry point that unwraps DDP unwraps ``torch.compile`` the same way);
* :func:`compiled_note` says whether the model as passed was compiled (a wrapper, ``module.compile()``
  or a compiled submodule), as the note recorded in the result's ``info["compiled"]``
  (:func:`record_compiled`);
* :func:`eager` runs a block with ``torch.compiler.set_stance("force_eager")`` when the modules
  still hold compiled parts (``module.compile()``, a compiled submodule), so that they run eagerly
  too; it costs nothing when the modules hold no compiled part;
* :func:`eager_code` runs a block (the noise samplers' in-step captures, whose hooks must see the
  user's own forward and backward) with every compiled model and function eager: dynamo does not
  guard on module hooks, so hooks added after compilation may silently never run in compiled code.
  ``import curvlab`` imports ``torch._dynamo`` (``torch.compiler.disable`` on its step functions),
  so the ``"torch._dynamo" not in sys.modules`` shortcuts below never apply after it: every such
  block switches the stance, a few microseconds, compiled or not;
* :func:`from_compiled_graph` tells whether an output's graph went through compiled code (no
  double backward: the regularisers then run their own eager forward).

docs/training-loops.md describes the behaviour for users.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> strip_wrappers(model) is model, compiled_note(model) is None
    (True, True)
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from curvlab._graph import graph_nodes

__all__ = [
    "COMPILED_NOTE",
    "COMPILED_PARTS_NOTE",
    "COMPILED_STEP_NOTE",
    "compiled_note",
    "eager",
    "eager_name",
    "eager_code",
    "from_compiled_graph",
    "has_compiled_parts",
    "record_compiled",
    "strip_wrappers",
]

COMPILED_NOTE = (
    "torch.compile'd model: ran the original module (model._orig_mod) eagerly, keyed by its "
    "names; hooks and double backward need eager mode"
)
"""``info["compiled"]`` of a result computed for a ``torch.compile(model)`` wrapper."""

COMPILED_PARTS_NOTE = (
    "model with compiled parts (module.compile() or a torch.compile'd submodule): ran them "
    "eagerly (torch.compiler.set_stance('force_eager')); hooks and double backward need eager mode"
)
"""``info["compiled"]`` of a result computed for a model holding compiled submodules."""

COMPILED_STEP_NOTE = (
    "compiled model or step: on the steps that capture curvature the user's forward and backward "
    "run eagerly (torch.compiler.set_stance('force_eager')), since hooks need eager mode; other "
    "steps run compiled, and separate curvature passes run the original module eagerly"
)
"""``info["compiled"]`` of a :class:`~curvlab.noise.NoisyOptimizer` given a compiled model."""

R = TypeVar("R")


def _optimized_module() -> type | None:
    """``OptimizedModule``, or ``None`` while ``torch._dynamo`` is not imported (nothing compiled)."""
    module = sys.modules.get("torch._dynamo.eval_frame")
    return None if module is None else getattr(module, "OptimizedModule", None)


def _is_compiled_module(module: Any, optimized: type | None) -> bool:
    if optimized is not None and isinstance(module, optimized):
        return True
    return module.__dict__.get("_compiled_call_impl") is not None  # module.compile()


def wrapper_chain(model: Any) -> Iterator[Any]:
    """``model`` and the modules inside its nesting of ``torch.compile``, DDP and
    ``DataParallel`` wrappers, outermost first; the last is the module they wrap (``model``
    alone for anything else)."""
    optimized = _optimized_module()
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        yield model
        if isinstance(model, wrappers):
            model = model.module
        elif optimized is not None and isinstance(model, optimized):
            model = model._orig_mod
        else:
            return


def eager_name(name: str) -> str:
    """A parameter's name without the ``_orig_mod`` segments of ``torch.compile`` wrappers
    (``"block._orig_mod.weight"`` is ``"block.weight"``): the same parameter of the same model
    before and after a submodule was compiled. ``Diagnostics`` states compare names this way
    (found in review s25: a state saved before compiling a submodule was refused as "of another
    model", and its sharpness warm starts dropped).

    Example:
        >>> eager_name("_orig_mod.block._orig_mod.weight")
        'block.weight'
    """
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def strip_wrappers(model: Any) -> Any:
    """The module inside any nesting of ``torch.compile``, DDP and ``DataParallel`` wrappers.

    Anything else (a plain module, a non-module) is returned as it is.
    """
    *_, inner = wrapper_chain(model)
    return inner


def has_compiled_parts(modules: Iterable[nn.Module]) -> bool:
    """Whether any of ``modules`` is compiled (``module.compile()`` or an ``OptimizedModule``).

    ``False`` at the cost of one dictionary lookup when ``torch._dynamo`` was never imported.
    """
    if "torch._dynamo" not in sys.modules:
        return False
    optimized = _optimized_module()
    return any(_is_compiled_module(m, optimized) for m in modules)


def compiled_note(model: Any) -> str | None:
    """The ``info["compiled"]`` note for ``model`` as the user passed it, or ``None``.

    :data:`COMPILED_NOTE` when a ``torch.compile`` wrapper encloses the model (also inside or
    around DDP), :data:`COMPILED_PARTS_NOTE` when the model holds compiled parts, else ``None``.
    """
    if "torch._dynamo" not in sys.modules or not isinstance(model, nn.Module):
        return None
    optimized = _optimized_module()
    *outer, inner = wrapper_chain(model)
    if optimized is not None and any(isinstance(m, optimized) for m in outer):
        return COMPILED_NOTE
    return COMPILED_PARTS_NOTE if has_compiled_parts(_submodules(inner)) else None


def _submodules(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` and its descendants (each module once), without ``named_modules``' name strings."""
    seen: set[int] = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield module
        stack.extend(c for c in module._modules.values() if c is not None)


def eager_code() -> AbstractContextManager[Any]:
    """Run a block with every compiled function and module eager (``force_eager``).

    For the blocks whose forward hooks must see the user's own forward (the noise samplers'
    in-step captures): dynamo does not guard on module hooks (``skip_nnmodule_hook_guards``), so
    hooks added after a model or step was compiled may silently never run inside compiled code.
    A no-op context when ``torch._dynamo`` was never imported (nothing can be compiled; never the
    case once ``curvlab`` is imported, which imports it: the switch then costs a few microseconds
    per block, whether anything was compiled or not), and inside a compiled region, where the
    stance cannot change (the block then runs as it is).
    """
    if "torch._dynamo" not in sys.modules or torch.compiler.is_compiling():
        return nullcontext()
    try:
        return torch.compiler.set_stance("force_eager")
    except RuntimeError:  # called from code a compiled region runs: the stance is fixed there
        return nullcontext()


def eager(modules: Iterable[nn.Module]) -> AbstractContextManager[Any]:
    """:func:`eager_code` if any of ``modules`` is compiled, else a no-op context.

    For curvlab's own passes over a model (:func:`curvlab._notrace.leave_no_trace`), which need
    double backward and hooks on every layer: compiled parts (``module.compile()``, a compiled
    submodule) would fail or hide them.
    """
    return eager_code() if has_compiled_parts(modules) else nullcontext()


def from_compiled_graph(output: Any) -> bool:
    """Whether the autograd graph of ``output`` holds a compiled (AOTAutograd) node.

    Such a graph has no double backward. ``False`` without a walk when ``torch._dynamo`` was never
    imported; else one walk of the graph, stopping at the first compiled node.
    """
    if "torch._dynamo" not in sys.modules or not isinstance(output, Tensor):
        return False
    return any("CompiledFunction" in type(node).__name__ for node in graph_nodes(output))


def record_compiled(result: R, note: str | None) -> R:
    """Write ``note`` to the result's ``info["compiled"]`` (a ``Report``'s ``meta["compiled"]``).

    Every result type of the public entry points has an ``info`` dict (``ParamDict``,
    ``CurvatureOperator``, ``TraceResult``, ...) except :class:`~curvlab.analysis.Report`, whose
    ``meta`` holds it. ``note=None`` leaves the result as it is.
    """
    if note is None:
        return result
    info = getattr(result, "info", None)
    if isinstance(info, dict):
        info["compiled"] = note
        return result
    meta = getattr(result, "meta", None)
    if isinstance(meta, dict):
        meta["compiled"] = note
    return result
