"""The torch.func backend: every primitive, for any differentiable model.

Per-example quantities come from ``vmap`` over the examples of ``grad`` (or ``vjp``) of one
example's negative log-likelihood, through :func:`torch.func.functional_call` with the trainable
parameters (tied weights stay tied). This works for any model torch can differentiate:
embeddings, LayerNorm/RMSNorm, attention, tied heads, parameters owned by any module, a layer used
twice, in-place residual additions, dict inputs. Where ``vmap`` has no rule for an operation (or a
model's forward branches on data), the backend falls back to an exact loop over the examples.

Costs, for a chunk of ``n`` examples and ``D`` parameters:

* per-example gradients (``sum_grad_squared``, ``batch_grad``): about one forward+backward per
  example, batched by ``vmap`` (memory ``n x D`` per chunk, in blocks of examples);
* the exact GGN diagonal and square root (``diag_ggn``, ``sqrt_ggn``): one vector-Jacobian
  product per output entry of an example (``K`` = classes x positions for cross-entropy), so
  ``n K`` backward passes: exact and general, but costly on long sequences or large vocabularies.
  Through ``prelu`` torch's ``vmap`` of the ``K`` products nested in the ``vmap`` over the
  examples is silently wrong for some sizes (one logit and 2-5 examples: 100-400% off), so a
  model with an ``nn.PReLU``, or whose first example of a chunk runs ``F.prelu``, takes the exact
  per-example loop there.

Like the other backends it works on the chunk's NLL *sum*; scaling happens in the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from curvlab._data import Inputs, call_model, num_examples, slice_inputs
from curvlab._losses import LossSpec
from curvlab._scan import ModelScan
from curvlab.backends._base import ModelFacts
from curvlab.estimators._memory import require

__all__ = ["FuncBackend"]

_BLOCK_FLOATS = 2**26
"""Per-example gradients held at once: examples are processed in blocks of at most this many floats."""


@dataclass
class _FuncSession:
    model: nn.Module
    spec: LossSpec
    params: dict[str, nn.Parameter]
    vmap_ok: bool = True
    on_output: Callable[[Tensor, Tensor], None] | None = None
    notes: list[str] = field(default_factory=list)
    prelu: bool = False  # the model has an nn.PReLU (nested vmap wrong, see sqrt_factors)

    def learned(self) -> bool:
        """Whether ``vmap`` works on this model (a failure is not retried on the same signature)."""
        return self.vmap_ok

    def resume(self, learned: bool) -> None:
        """Start where a previous session on the same signature ended (vmap or the loop)."""
        if not learned:
            self.vmap_ok = False
            self.notes.append("func: per-example loop (vmap failed on this model before)")

    def forward(self, inputs: Inputs, targets: Tensor) -> Tensor:
        """The model's (prepared) output on a whole chunk."""
        out = self.spec.prepare(call_model(self.model, inputs), targets)
        if self.on_output is not None:
            self.on_output(out, targets)
        return out

    def nll(self, output: Tensor, targets: Tensor, drawn: bool = False) -> Tensor:
        return self.spec.nll_sum(output, targets, drawn)

    def _output(self, params: dict[str, Tensor], x: Inputs, y: Tensor) -> Tensor:
        def fmodel(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, params, args, kwargs, strict=False)

        return self.spec.prepare(call_model(fmodel, x), y)

    # ------------------------------------------------------------------ per-example maps
    def per_example(
        self,
        one: Callable[[dict[str, Tensor], Inputs, Tensor], dict[str, Tensor]],
        loop: Callable[[Inputs, Tensor], dict[str, Tensor]],
        inputs: Inputs,
        targets: Tensor,
        floats_per_example: int,
        mapped_ok: bool = True,
    ) -> dict[str, Tensor]:
        """``one`` mapped over the examples (``vmap``), in blocks; ``loop`` where vmap fails.

        ``one(params, x, y)`` sees one example without its batch axis; ``loop(x, y)`` one
        example with a batch axis of 1; ``mapped_ok=False``: ``loop`` alone (``one`` is known
        to be wrong under ``vmap`` for this model). Returns per parameter the stacked results
        ``(n, ...)``.
        """
        n = num_examples(inputs)
        step = max(1, _BLOCK_FLOATS // max(floats_per_example, 1))
        params = {k: p.detach() for k, p in self.params.items()}
        blocks: list[dict[str, Tensor]] = []
        for lo in range(0, n, step):
            x, y = slice_inputs(inputs, lo, lo + step), targets[lo : lo + step]
            if self.vmap_ok and mapped_ok:
                try:
                    mapped = vmap(one, in_dims=(None, 0, 0), randomness="different")
                    blocks.append(mapped(params, x, y))
                    continue
                except Exception as e:  # an op without a batching rule, data-dependent control
                    self.vmap_ok = False  # flow: the loop below, for the rest of the call
                    self.notes.append(
                        f"func: vmap failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "per-example loop used"
                    )
            rows = [loop(slice_inputs(x, i, i + 1), y[i : i + 1]) for i in range(y.shape[0])]
            blocks.append({k: torch.stack([r[k] for r in rows]) for k in self.params})
        return {k: torch.cat([b[k] for b in blocks]) for k in self.params}

    def grads(self, inputs: Inputs, labels: Tensor, drawn: bool = False) -> dict[str, Tensor]:
        """Per-example gradients ``grad NLL_n`` at ``labels``: ``(n, *shape)`` per parameter.

        ``drawn``: the labels were drawn from the model (see :meth:`LossSpec.nll_sum`).
        """

        def nll_one(params: dict[str, Tensor], x: Inputs, y: Tensor) -> Tensor:
            xb, yb = tree_map(lambda t: t.unsqueeze(0), x), y.unsqueeze(0)
            return self.nll(self._output(params, xb, yb), yb, drawn)

        def loop(x: Inputs, y: Tensor) -> dict[str, Tensor]:
            loss = self.nll(self.spec.prepare(call_model(self.model, x), y), y, drawn)
            return _grads_of(loss, self.params)

        size = sum(p.numel() for p in self.params.values())
        return self.per_example(grad(nll_one), loop, inputs, labels, size)

    def sqrt_factors(self, inputs: Inputs, targets: Tensor) -> dict[str, Tensor]:
        """Per example the ``K`` vectors ``J_n^T s_nk``: ``(n, K, *shape)`` per parameter."""

        def one(params: dict[str, Tensor], x: Inputs, y: Tensor) -> dict[str, Tensor]:
            xb, yb = tree_map(lambda t: t.unsqueeze(0), x), y.unsqueeze(0)
            out, pull = vjp(lambda p: self._output(p, xb, yb), params)
            cols = self.spec.sqrt_columns(out, yb)
            (back,) = vmap(pull)(cols)
            return back

        def loop(x: Inputs, y: Tensor) -> dict[str, Tensor]:
            out = self.spec.prepare(call_model(self.model, x), y)
            cols = self.spec.sqrt_columns(out, y)
            rows = [
                _grads_of(out, self.params, col, retain=k < cols.shape[0] - 1)
                for k, col in enumerate(cols)
            ]
            return {k: torch.stack([r[k] for r in rows]) for k in self.params}

        with _PreluSeen() as seen:  # one example: a functional F.prelu is seen as it runs
            probe = self.forward(slice_inputs(inputs, 0, 1), targets[:1]).detach()
        nested_ok = not (self.prelu or seen.found)
        note = "func: per-example loop for the exact GGN (torch's nested vmap of prelu is wrong)"
        if not nested_ok and note not in self.notes:
            self.notes.append(note)
        K = probe[0].numel()
        size = sum(p.numel() for p in self.params.values())
        first = next(iter(self.params.values()), None)
        if first is not None:  # one example's K factors at least, before any of them is built
            require(
                f"the exact GGN's square-root factors of one example ({K:,} output entries, "
                f"each a vector of {size:,} parameters)",
                K * size * first.element_size(),
                first.device,
                "the exact GGN (kind='exact'/'ggn') back-propagates every output entry of an "
                "example; use kind='mc' (the Monte-Carlo Fisher: unbiased for the same "
                "matrix, one backward pass per label draw) or kind='empirical'",
            )
        return self.per_example(one, loop, inputs, targets, K * size, nested_ok)


class _PreluSeen(TorchFunctionMode):
    """Records whether ``prelu`` ran (``torch.prelu``, ``F.prelu``, ``Tensor.prelu``)."""

    def __init__(self) -> None:
        super().__init__()
        self.found = False

    def __torch_function__(
        self,
        func: Callable,
        types: Any,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> Any:
        if getattr(func, "__name__", None) == "prelu":
            self.found = True
        return func(*args, **(kwargs or {}))


def _grads_of(
    out: Tensor,
    params: dict[str, nn.Parameter],
    grad_out: Tensor | None = None,
    retain: bool = False,
) -> dict[str, Tensor]:
    gs = torch.autograd.grad(
        out, list(params.values()), grad_out, retain_graph=retain, allow_unused=True
    )
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), gs)}


class FuncBackend:
    """Computes every raw (NLL-sum) primitive with ``torch.func`` for any differentiable model.

    Attributes:
        name: ``"func"``, recorded in every result this backend computes.
    """

    name = "func"
    primitives = frozenset({"sum_grad_squared", "batch_grad", "diag_ggn", "sqrt_ggn"})
    needs_math_attention = True  # double backward / vmap

    def refuses(self, facts: ModelFacts, needs: frozenset[str], auto: bool) -> str | None:
        missing = needs - self.primitives
        if missing:
            return f"the func backend has no {sorted(missing)}"
        return None

    @contextmanager
    def extended(
        self, model: nn.Module, spec: LossSpec, second_order: bool, scan: ModelScan
    ) -> Iterator[_FuncSession]:
        prelu = any(isinstance(m, nn.PReLU) for _, m in scan.modules)
        yield _FuncSession(model=model, spec=spec, params=scan.trainable, prelu=prelu)

    # ---------------------------------------------------------------- first order
    def sum_grad_squared(
        self,
        s: _FuncSession,
        inputs: Inputs,
        targets: Tensor,
        mc_samples: int = 0,
        generator: torch.Generator | None = None,
        with_grad: bool = True,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """``sum_n (grad NLL_n)^2`` at the labels (or averaged over ``mc_samples`` draws).

        Returns:
            (per-parameter sums, the gradient at the labels (``{}`` for Monte-Carlo labels or
            without ``with_grad``), the output).
        """
        with torch.no_grad():
            output = s.forward(inputs, targets)
        if mc_samples == 0:
            g = s.grads(inputs, targets)
            sq = {k: v.square().sum(0) for k, v in g.items()}
            return sq, ({k: v.sum(0) for k, v in g.items()} if with_grad else {}), output
        total: dict[str, Tensor] = {}
        for _ in range(mc_samples):
            sampled = s.spec.sample_targets(output, generator, targets)
            for k, v in s.grads(inputs, sampled, drawn=True).items():
                sq = v.square().sum(0)
                total[k] = total[k].add_(sq) if k in total else sq
        return {k: v / mc_samples for k, v in total.items()}, {}, output

    def sum_grad_squared_with_sampled(
        self, s: _FuncSession, inputs: Inputs, targets: Tensor, generator: torch.Generator | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Squared gradients at the labels and at one draw (see the other backends)."""
        at_labels, grads, output = self.sum_grad_squared(s, inputs, targets)
        sampled = s.spec.sample_targets(output, generator, targets)
        at_sampled = {k: v.square().sum(0) for k, v in s.grads(inputs, sampled, drawn=True).items()}
        return at_labels, grads, at_sampled, output

    def batch_grad(
        self,
        s: _FuncSession,
        inputs: Inputs,
        targets: Tensor,
        sampled: bool = False,
        generator: torch.Generator | None = None,
        drawn: bool = False,
    ) -> dict[str, Tensor]:
        """Per-example gradients ``grad NLL_n`` (labels or one model sample), each ``(n, *shape)``.

        ``drawn``: ``targets`` were themselves drawn from the model (``sample_targets``).
        """
        labels = targets
        if sampled:
            with torch.no_grad():
                output = s.forward(inputs, targets)
            labels = s.spec.sample_targets(output, generator, targets)
        return s.grads(inputs, labels, drawn=sampled or drawn)

    # ---------------------------------------------------------------- second order
    def diag_ggn(self, s: _FuncSession, inputs: Inputs, targets: Tensor) -> dict[str, Tensor]:
        """``diag sum_n J_n^T (d^2 NLL_n / d f^2) J_n`` from the exact square-root factors."""
        return {k: v.square().sum((0, 1)) for k, v in s.sqrt_factors(inputs, targets).items()}

    def sqrt_ggn(self, s: _FuncSession, inputs: Inputs, targets: Tensor) -> dict[str, Tensor]:
        """Square-root factors of the NLL-sum GGN, ``(K, n, *shape)`` per parameter."""
        return {k: v.transpose(0, 1) for k, v in s.sqrt_factors(inputs, targets).items()}
