"""One pass over the data in chunks: validation, leave-no-trace, raw sums, scaling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from curvlab.backends import get_backend
from curvlab.backends.backpack import BackpackBackend
from curvlab.data import iter_chunks
from curvlab.losses import LossSpec, loss_spec
from curvlab.notrace import leave_no_trace
from curvlab.scan import ModelScan, scan_model

__all__ = ["DEFAULT_CHUNK_SIZE", "SweepInfo", "sweep"]

DEFAULT_CHUNK_SIZE = 1024
"""Examples processed at once by default (the ``chunk_size=`` knob of every quantity)."""

ChunkFn = Callable[[BackpackBackend, Any, Tensor, Tensor], dict[str, Tensor]]


@dataclass
class SweepInfo:
    """What a sweep saw: the loss, the backend, the number of examples ``N`` and terms ``c``."""

    spec: LossSpec
    backend: str
    num_examples: int
    terms: int

    @property
    def ggn_weight(self) -> float:
        """``w`` with ``L = w sum_n NLL_n``: scales NLL-sum Hessians, GGNs and MC Fishers."""
        return self.spec.ggn_weight(self.num_examples, self.terms)

    @property
    def empirical_weight(self) -> float:
        """Scales ``sum_n grad NLL_n grad NLL_n^T`` to DESIGN.md's empirical Fisher."""
        return self.spec.empirical_weight(self.num_examples, self.terms)


def sweep(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    fn: ChunkFn,
    *,
    second_order: bool,
    hessian: bool = False,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    backend: str = "backpack",
    hooks_ok: bool = False,
    scan: ModelScan | None = None,
) -> tuple[dict[str, Tensor], SweepInfo]:
    """Sum ``fn(backend, session, X, y)`` over all chunks of ``data``.

    Validates the loss, the model and ``chunk_size`` before any work, runs under
    :func:`~curvlab.notrace.leave_no_trace` with the backend's hooks installed, and returns the raw
    sums (detached) with the information needed to scale them. ``hooks_ok`` says that ``fn`` only
    needs ``sum_grad_squared``, so ``backend="auto"`` may pick the faster hooks backend. ``scan``
    is the model's :func:`~curvlab.scan.scan_model` if the caller made one for this call.
    """
    spec = loss_spec(loss_fn)
    scan = scan if scan is not None else scan_model(model)
    be = get_backend(backend, model, hooks_ok=hooks_ok and not second_order, scan=scan)
    be.check(model, second_order=second_order, hessian=hessian, scan=scan)
    total: dict[str, Tensor] = {}
    seen = {"examples": 0, "terms": None}

    def on_output(output: Tensor) -> None:
        if seen["terms"] is not None:
            return
        terms = spec.terms_per_example(output)
        if second_order and spec.kind == "bce" and terms > 1:
            raise ValueError(
                f"BCEWithLogitsLoss with {terms} logits per example is not supported for "
                "second-order quantities by the BackPACK backend (it handles one logit per "
                "example); use kind='empirical' or kind='mc', or a single-logit output"
            )
        seen["terms"] = terms

    with (
        leave_no_trace(model, scan=scan),
        be.extended(model, spec, second_order=second_order, scan=scan) as session,
    ):
        session.on_output = on_output
        for inputs, targets in iter_chunks(data, chunk_size, scan.device):
            values = fn(be, session, inputs, targets)
            for name, value in values.items():
                if name in total:
                    total[name].add_(value.detach())
                else:  # fresh tensors of this chunk: accumulate into them in place
                    total[name] = value.detach()
            seen["examples"] += inputs.shape[0]
    terms, num_examples = seen["terms"], seen["examples"]
    if terms is None:
        raise ValueError("data is empty: it yielded no batch; pass at least one (inputs, targets)")
    return total, SweepInfo(spec=spec, backend=be.name, num_examples=num_examples, terms=terms)
