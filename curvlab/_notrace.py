"""Leave no trace: restore a model's gradients, modes and the global RNG after a computation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from curvlab._compiled import eager
from curvlab._precision import without_autocast
from curvlab._rng import global_rng_kept
from curvlab._scan import ModelScan, scan_model

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def _math_attention():  # noqa: ANN202
        return sdpa_kernel(SDPBackend.MATH)
except ImportError:  # pragma: no cover - older torch: its default kernels are used
    from contextlib import nullcontext as _math_attention

__all__ = ["batchnorm_stats_kept", "leave_no_trace"]


@contextmanager
def leave_no_trace(
    model: nn.Module,
    mode: bool | None = None,
    scan: ModelScan | None = None,
    math_attention: bool = True,
) -> Iterator[nn.Module]:
    """Run a block that may touch ``.grad``, train/eval mode and the global RNG, then restore them.

    Inside the block every parameter's ``.grad`` is ``None`` (so backward passes start clean) and
    autograd is enabled (curvature needs it, also when the caller is inside ``torch.no_grad()``);
    on exit the original ``.grad`` objects, each module's ``training`` flag, the grad mode, the
    global CPU (and model-device CUDA) RNG state and the weights of ``Embedding(max_norm=...)``
    layers (which every forward pass renormalises in place) are put back, also when the block
    raises.
    Any ambient ``torch.autocast`` region is switched off inside the block (curvlab's passes
    compute in the parameters' dtype). Inside the block ``scaled_dot_product_attention`` uses its math kernel: the fused kernels
    have no double backward and no ``vmap`` rule, which curvature passes need. Compiled parts of
    the model (``module.compile()``, a ``torch.compile``d submodule) run eagerly inside the block,
    for the same reason (:func:`curvlab._compiled.eager`).

    Args:
        model: the user's model.
        mode: ``True``/``False`` to switch the model to train/eval mode inside the block;
            ``None`` keeps the mode it is in.
        scan: the model's :func:`~curvlab._scan.scan_model`, if the caller has one already.
        math_attention: force the math kernel of ``scaled_dot_product_attention`` (default);
            ``False`` for a block that needs only first derivatives without ``vmap`` (the hooks
            backend's passes), which any kernel gives.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> with leave_no_trace(model, mode=False):
        ...     model(torch.randn(3, 2)).sum().backward()
        >>> model.weight.grad is None
        True
    """
    scan = scan if scan is not None else scan_model(model)
    params = list(scan.params.values())
    modules = [m for _, m in scan.modules]
    device = scan.device
    grads = [p.grad for p in params]
    modes = [m.training for m in modules]
    # Embedding(max_norm=...) renormalises the rows it looks up in place in every forward pass
    # (torch's own forward does too): the user's weight is put back as it was
    renormed = [
        (m.weight, m.weight.detach().clone())
        for m in modules
        if isinstance(m, nn.Embedding) and m.max_norm is not None
    ]
    try:
        with (
            global_rng_kept(device),
            torch.enable_grad(),
            _math_attention() if math_attention else nullcontext(),
            without_autocast(),
            eager(modules),
        ):
            for p in params:
                if p.grad is not None:
                    p.grad = None
            if mode is not None:
                model.train(mode)
            yield model
    finally:
        for p, g in zip(params, grads):
            if p.grad is not g:
                p.grad = g
        for m, training in zip(modules, modes):
            if m.training != training:
                m.training = training
        for weight, saved in renormed:
            if not torch.equal(weight.detach(), saved):
                with torch.no_grad():
                    weight.copy_(saved)


@contextmanager
def batchnorm_stats_kept(model: nn.Module) -> Iterator[None]:
    """Run the block with the running statistics of train-mode BatchNorm layers left as they were
    (see :func:`buffers_kept`)."""
    with _on_copies(
        (m, name)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
        for name in ("running_mean", "running_var", "num_batches_tracked")
    ):
        yield


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Run the block with every buffer of ``model`` left as it was (a forward pass may update
    running statistics: BatchNorm's, a running input normaliser's, an EMA codebook's)."""
    with _on_copies((m, name) for m in model.modules() for name in m._buffers):
        yield


@contextmanager
def _on_copies(slots: Iterable[tuple[nn.Module, str]]) -> Iterator[None]:
    """Each ``(module, buffer name)``'s buffer is replaced by a copy for the block (the block's
    forward updates the copy) and the user's own tensor is put back after; restoring values in
    place instead would bump the buffers' version counters and break a graph built on them."""
    saved = []  # (module, buffer name, the user's tensor)
    for m, name in slots:
        buf = m._buffers.get(name)
        if buf is not None and not isinstance(buf, nn.parameter.UninitializedBuffer):
            saved.append((m, name, buf))
    for m, name, buf in saved:
        m._buffers[name] = buf.clone()
    try:
        yield
    finally:
        for m, name, buf in saved:
            m._buffers[name] = buf
