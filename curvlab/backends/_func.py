"""The torch.func backend: every primitive, for any differentiable model.

Per-example quantities come from ``vmap`` over the examples of ``grad`` (or ``vjp``) of one
example's negative log-likelihood, through :func:`torch.func.functional_call` with the trainable
parameters (tied weights stay tied). This works for any model torch can differentiate:
embeddings, LayerNorm/RMSNorm, attention, tied heads, parameters owned by any module, a layer used
twice, in-place residual additions, dict inputs. Where ``vmap`` has no rule for an operation (or a
model's forward branches on data), the backend falls back to an exact loop over the examples.
A forward that calls random operations is mapped with each example's own draws only where they
come from the global RNG (a train-mode ``Dropout``: the result is random anyway); one whose draws
are fixed (a freshly seeded generator: fixed random features, a fixed random attention bias) is
deterministic, and ``vmap`` would draw another matrix for every example, so it takes the exact
loop, recorded in ``info["fallbacks"]`` (:mod:`curvlab.backends._random_forward`; the check, two
forwards without gradients on two examples, runs once per signature). So does a forward that
draws from numpy's or Python's global RNG for every example (``vmap`` cannot see those draws:
each example of a block got the same one; two more forwards without gradients, on one example and
on two, per signature tell it).

Costs, for a chunk of ``n`` examples and ``D`` parameters:

* per-example gradients (``sum_grad_squared``, ``batch_grad``): about one forward+backward per
  example, batched by ``vmap`` in blocks of examples of at most :data:`_BLOCK_FLOATS` entries;
  ``sum_grad_squared`` squares and sums block by block (one block held), ``batch_grad`` returns
  all ``n x D``;
* the exact GGN diagonal and square root (``diag_ggn``, ``sqrt_ggn``): one vector-Jacobian
  product per output entry of an example (``K`` = classes x positions for cross-entropy), so
  ``n K`` backward passes: exact and general, but costly on long sequences or large vocabularies.
  ``diag_ggn`` squares and sums the factors block by block (a block of ``K D`` per example,
  fewer examples where the memory available is short); ``sqrt_ggn`` returns all ``n K D``.
  What is held at once is checked against the memory available before the first factor.
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
from torch.func import grad, vjp, vmap
from torch.utils._pytree import tree_map

from curvlab._data import Inputs, call_model, num_examples, slice_inputs
from curvlab._losses import LossSpec, name_invalid_labels
from curvlab._precision import FLOAT32_NORMAL_EXPONENTS, is_sixteen, upcast
from curvlab._scan import ModelScan
from curvlab._stateless import functional_call
from curvlab.backends._base import ModelFacts
from curvlab.backends._func_drawn import chunk_output, drawn_grads, drawn_squares
from curvlab.backends._layers import draw_labels
from curvlab.backends._random_forward import OpSeen, host_draws, loop_needed, random_op_refused
from curvlab.estimators import _memory

__all__ = ["FuncBackend", "dense_embeddings"]

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
    # vmap's randomness: "unprobed" until a forward on the first block is seen not to draw
    # from numpy's or Python's RNG (_random_forward.host_draws), then "error" until the forward
    # is seen to call a random op, then "different" where its draws come from the global RNG
    # (_random_forward.loop_needed)
    randomness: str = "unprobed"
    why_loop: str = "vmap failed on this model before"

    def learned(self) -> tuple[bool, str, str]:
        """Whether ``vmap`` works on this model, the randomness it maps with, and why it does not
        (a failure, or a forward with fixed random draws, is not probed again on the same
        signature: a training step's repeated call pays no extra forward)."""
        return self.vmap_ok, self.randomness, self.why_loop

    def resume(self, learned: tuple[bool, str, str] | None) -> None:
        """Start where a previous session on the same signature ended (vmap or the loop)."""
        if learned is None:
            return
        self.vmap_ok, self.randomness, self.why_loop = learned
        if not self.vmap_ok:
            self.notes.append(f"func: per-example loop ({self.why_loop})")

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
            return functional_call(self.model, params, args, kwargs)

        return self.spec.prepare(call_model(fmodel, x, module=self.model), y)

    # ------------------------------------------------------------------ per-example maps
    def blocks(
        self,
        one: Callable[[dict[str, Tensor], Inputs, Tensor], dict[str, Tensor]],
        loop: Callable[[Inputs, Tensor], dict[str, Tensor]],
        inputs: Inputs,
        targets: Tensor,
        step: int,
        mapped_ok: bool = True,
    ) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """``one`` mapped over blocks of ``step`` examples (``vmap``); ``loop`` where vmap fails.

        ``one(params, x, y)`` sees one example without its batch axis; ``loop(x, y)`` one
        example with a batch axis of 1, run one example at a time (blocks of one);
        ``mapped_ok=False``: ``loop`` alone (``one`` is known to be wrong under ``vmap`` for
        this model). Yields ``(lo, {name: (m, ...)})``: the first example of a block and per
        parameter its ``m`` examples' results. A block is emptied when the next is asked for,
        so one block is held at a time (:func:`_fold` consumes them).
        """
        n = num_examples(inputs)
        params = {k: p.detach() for k, p in self.params.items()}
        for lo in range(0, n, step):
            x, y = slice_inputs(inputs, lo, lo + step), targets[lo : lo + step]
            block = self._mapped(one, params, x, y) if self.vmap_ok and mapped_ok else None
            if block is not None:
                block = {k: _dense(v) for k, v in block.items()}
                yield lo, block
                block.clear()
                continue
            for i in range(y.shape[0]):
                row = loop(slice_inputs(x, i, i + 1), y[i : i + 1])
                block = {k: row.pop(k).unsqueeze(0) for k in self.params}
                yield lo + i, block
                block.clear()

    def _mapped(
        self,
        one: Callable[[dict[str, Tensor], Inputs, Tensor], dict[str, Tensor]],
        params: dict[str, Tensor],
        x: Inputs,
        y: Tensor,
    ) -> dict[str, Tensor] | None:
        """``one`` mapped over the examples of a block, or ``None`` where the per-example loop
        must compute it (for the rest of the session, the reason in :attr:`notes`).

        Mapped with ``randomness="error"`` until the forward calls a random operation; then,
        once, :func:`~curvlab.backends._random_forward.loop_needed` on the block's first two
        examples: a forward whose draws are fixed (a freshly seeded generator: under
        ``randomness="different"`` every example drew another "fixed" matrix, the exact Fisher
        diagonal 17% off, found in review) takes the loop, which runs the real forward once per
        example; one that draws from the global RNG (train-mode ``Dropout``) is mapped with
        ``randomness="different"``, each example its own draws. Before the first map, one
        forward on the block's first two examples
        (:func:`~curvlab.backends._random_forward.host_draws`) tells a forward that draws from
        numpy's or Python's RNG for every example, which ``vmap`` cannot see (every example of a
        block got one draw: review s26); it takes the loop.
        """
        if self.randomness == "unprobed" and y.shape[0] > 1:  # vmap cannot see them (s26)
            why = host_draws(lambda k: self._probe(x, y, k), self._device(), self.model.modules())
            if why is not None:
                self.why_loop, self.vmap_ok = why, False
                self.notes.append(
                    f"func: per-example loop ({why}; vmap would give each example one draw)"
                )
                return None
            self.randomness = "error"
        # a block of one example cannot draw differently across examples: mapped with "error"
        # (or "different") while the probe waits for a block of two (review s26: "unprobed"
        # reached vmap, which raised, and the call took the loop with a bogus "vmap failed")
        randomness = "error" if self.randomness == "unprobed" else self.randomness
        while True:
            try:
                return vmap(one, in_dims=(None, 0, 0), randomness=randomness)(params, x, y)
            except Exception as e:
                if randomness == "error" and random_op_refused(e):
                    why = loop_needed(lambda: self._probe(x, y), self._device())
                    if why is None:
                        randomness = "different"
                        if self.randomness != "unprobed":
                            self.randomness = randomness
                        continue
                    self.why_loop = why
                    note = (
                        f"func: per-example loop ({why}; vmap would give each example other draws)"
                    )
                else:  # an op without a batching rule, data-dependent control flow
                    note = (
                        f"func: vmap failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "per-example loop used"
                    )
                self.vmap_ok = False  # the loop, for the rest of the call
                self.notes.append(note)
                return None

    def _probe(self, x: Inputs, y: Tensor, k: int = 2) -> Tensor:
        """The prepared output on the first ``k`` examples of ``x`` (not recorded)."""
        return self.spec.prepare(call_model(self.model, slice_inputs(x, 0, k)), y[:k])

    def _device(self) -> torch.device:
        return next(iter(self.params.values())).device if self.params else torch.device("cpu")

    def grad_blocks(
        self, inputs: Inputs, labels: Tensor, drawn: bool = False
    ) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """Per-example gradients ``grad NLL_n`` at ``labels`` in blocks (:meth:`blocks`), each
        block ``(m, *shape)`` per parameter, at most :data:`_BLOCK_FLOATS` entries (one example
        at least).

        ``drawn``: the labels were drawn from the model (see :meth:`LossSpec.nll_sum`).
        """

        def nll_one(params: dict[str, Tensor], x: Inputs, y: Tensor) -> Tensor:
            xb, yb = tree_map(lambda t: t.unsqueeze(0), x), y.unsqueeze(0)
            return self.nll(self._output(params, xb, yb), yb, drawn)

        def loop(x: Inputs, y: Tensor) -> dict[str, Tensor]:
            loss = self.nll(self.spec.prepare(call_model(self.model, x), y), y, drawn)
            return _grads_of(loss, self.params)

        size = sum(p.numel() for p in self.params.values())
        step = max(1, _BLOCK_FLOATS // max(size, 1))
        return self.blocks(grad(nll_one), loop, inputs, labels, step)

    def grads(self, inputs: Inputs, labels: Tensor, drawn: bool = False) -> dict[str, Tensor]:
        """Per-example gradients ``grad NLL_n`` at ``labels``: ``(n, *shape)`` per parameter.

        ``drawn``: the labels were drawn from the model (see :meth:`LossSpec.nll_sum`).
        """
        return _stacked(self.grad_blocks(inputs, labels, drawn), num_examples(inputs))

    def squares(
        self, inputs: Inputs, labels: Tensor, with_grad: bool, drawn: bool = False
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``sum_n (grad NLL_n)^2`` and (``with_grad``, else ``{}``) ``sum_n grad NLL_n`` at
        ``labels``, summed block by block (one block of per-example gradients at a time)."""
        sq: dict[str, Tensor] = {}
        total: dict[str, Tensor] = {}

        def add(lo: int, k: str, v: Tensor) -> None:
            if with_grad:
                total[k] = _add(total.get(k), upcast(v).sum(0))
            sq[k] = _add(sq.get(k), _squares(v).sum(0))

        _fold(self.grad_blocks(inputs, labels, drawn), add)
        return sq, total

    def sqrt_blocks(
        self, inputs: Inputs, targets: Tensor, kept: bool = False
    ) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """Per example the ``K`` vectors ``J_n^T s_nk`` in blocks: ``(m, K, *shape)`` per parameter.

        What is held at once is checked against the memory available before any factor is
        built: a block of factors and one parameter's squares of it (the streamed diagonal), or
        (``kept``: the caller keeps every block, :meth:`sqrt_factors`) all ``n`` examples'
        factors and one block. A block is made smaller (down to one example) where the memory
        available holds fewer examples than :data:`_BLOCK_FLOATS` does.

        Raises:
            EstimatorMemoryError: if even one example's block does not fit, with the numbers.
        """

        sixteen = any(is_sixteen(p.dtype) for p in self.params.values())

        def one(params: dict[str, Tensor], x: Inputs, y: Tensor) -> dict[str, Tensor]:
            xb, yb = tree_map(lambda t: t.unsqueeze(0), x), y.unsqueeze(0)
            out, pull = vjp(lambda p: self._output(p, xb, yb), params)
            if not sixteen:
                (back,) = vmap(pull)(self.spec.sqrt_columns(out, yb))
                return back
            down, up = _column_scales(self.spec.sqrt_columns(out, yb, wide=True), out.dtype)
            (back,) = vmap(pull)(down)
            return {k: _unscaled(v, up) for k, v in back.items()}

        def loop(x: Inputs, y: Tensor) -> dict[str, Tensor]:
            out = self.spec.prepare(call_model(self.model, x), y)
            if sixteen:
                cols, up = _column_scales(self.spec.sqrt_columns(out, y, wide=True), out.dtype)
            else:
                cols, up = self.spec.sqrt_columns(out, y), None
            rows = {
                k: p.new_empty((cols.shape[0], *p.shape), dtype=upcast(p[:0]).dtype)
                for k, p in self.params.items()
            }
            for i, col in enumerate(cols):  # each row written as it comes (no stacked copy)
                for k, g in _grads_of(out, self.params, col, retain=i < len(cols) - 1).items():
                    rows[k][i] = g if up is None else upcast(g) * up[i]
            return rows

        with OpSeen(_is_prelu) as seen:  # one example: a functional F.prelu is seen as it runs
            probe = self.forward(slice_inputs(inputs, 0, 1), targets[:1]).detach()
        nested_ok = not (self.prelu or seen.found)
        note = "func: per-example loop for the exact GGN (torch's nested vmap of prelu is wrong)"
        if not nested_ok and note not in self.notes:
            self.notes.append(note)
        n, K = num_examples(inputs), probe[0].numel()
        step = _sqrt_block(self.params, n, K, kept, nested_ok)
        return self.blocks(one, loop, inputs, targets, step, nested_ok)

    def sqrt_factors(self, inputs: Inputs, targets: Tensor) -> dict[str, Tensor]:
        """Per example the ``K`` vectors ``J_n^T s_nk``: ``(n, K, *shape)`` per parameter."""
        return _stacked(self.sqrt_blocks(inputs, targets, kept=True), num_examples(inputs))


def _column_scales(cols: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The float32 square-root columns ``cols`` (``(K, ...)``) of a 16-bit model, each scaled
    by the power of two ``2^-e_k`` that brings its largest magnitude ``m 2^e_k`` into
    ``[0.5, 1)`` and cast to ``dtype``, and the factors ``2^e_k`` (float32, ``(K,)``) that undo
    it. Cast as they were, a confident float16 classifier's columns (``sqrt(p_c) ~ 1e-7``) were
    subnormal and its exact GGN diagonal 3.5% low at a margin of 32 (found in review).
    ``floor(log2)`` rather than ``frexp``: it has a ``vmap`` rule (one power of two lower at
    worst, the largest entry then in ``[0.25, 0.5)``). ``e_k`` is kept to ``[-126, 126]``
    (:data:`curvlab._precision.FLOAT32_NORMAL_EXPONENTS`), where ``2^-e_k`` and ``2^e_k`` are both float32 normals: a column
    below ``2^-126`` is brought to ``[2^-23, 1)`` only. Unclamped, a column whose largest entry
    is below ``2^-128`` (a confident example's likely class ``c``, ``-p_j sqrt(p_c) ~ p_j`` at a
    margin of 89) got ``2^-e_k = inf`` and ``inf * 0 = NaN``: a false ``NonFiniteError`` (found
    in review s19)."""
    top = cols.detach().abs().flatten(1).amax(1)
    usable = torch.isfinite(top) & (top > 0)
    exponent = torch.where(usable, torch.floor(torch.log2(top)) + 1, torch.zeros_like(top))
    exponent = exponent.clamp(*FLOAT32_NORMAL_EXPONENTS)
    down = torch.pow(2.0, -exponent)
    return (cols * down.reshape(-1, *[1] * (cols.ndim - 1))).to(dtype), torch.pow(2.0, exponent)


def _unscaled(v: Tensor, up: Tensor) -> Tensor:
    """Factors ``(K, ...)`` of a scaled 16-bit pass (:func:`_column_scales`) in float32, each
    multiplied by its ``2^e_k`` (exact)."""
    return upcast(v) * up.reshape(-1, *[1] * (v.ndim - 1))


def _fold(
    blocks: Iterator[tuple[int, dict[str, Tensor]]], fn: Callable[[int, str, Tensor], None]
) -> None:
    """``fn(lo, name, value)`` on each parameter's share of each block, which is then dropped
    (no reference is left to a block while the next one is built)."""
    for lo, block in blocks:
        for k in list(block):
            fn(lo, k, block.pop(k))


def _stacked(blocks: Iterator[tuple[int, dict[str, Tensor]]], n: int) -> dict[str, Tensor]:
    """Per parameter the ``(n, ...)`` results of :meth:`_FuncSession.blocks`, each block written
    into them as it comes (the chunk's results and one block, no concatenated copy)."""
    out: dict[str, Tensor] = {}

    def write(lo: int, k: str, v: Tensor) -> None:
        if k not in out:
            out[k] = v.new_empty((n, *v.shape[1:]))
        out[k][lo : lo + v.shape[0]] = v

    _fold(blocks, write)
    return out


def _sqrt_block(params: dict[str, nn.Parameter], n: int, K: int, kept: bool, mapped: bool) -> int:
    """Examples per block of the exact GGN's square-root factors, after the memory check.

    Held at once, per example of a block: its ``K`` factors (a vector of all parameters each),
    the squares of one parameter's (:meth:`FuncBackend.diag_ggn` sums them block by block) and
    its loss-Hessian square root (:meth:`LossSpec.sqrt_columns`: ``K`` columns of its ``K``
    output entries, in the parameters' dtype; they outgrow the factors for long sequences:
    302.5 GB for ``(1, 25000, 11)`` logits, refused by the allocator alone before, found in
    review), plus one gradient (the per-example loop, after a failed ``vmap`` or with
    ``mapped=False``, writes its rows one by one into a block of one); with ``kept`` all ``n``
    examples' factors besides. Not counted: the backward passes' own intermediates
    (activation-sized, ``K`` of them per example under ``vmap``). The check used to cover one
    example's factors while a chunk's were held, concatenated and squared (2.3x the chunk's
    factors; found in review).

    Raises:
        EstimatorMemoryError: if one example's block does not fit the memory available.
    """
    if not params:
        return max(n, 1)
    # a 16-bit model's factors are float32 (its scaled columns undone, _column_scales)
    vector = sum(p.numel() * max(p.element_size(), 4) for p in params.values())
    widest = max(p.numel() * max(p.element_size(), 4) for p in params.values())
    item = max(next(iter(params.values())).element_size(), 4)  # the columns, float32 at least
    cols = K * K * item  # the square root's columns (sqrt_columns checks its temporaries too)
    floats = K * (sum(p.numel() for p in params.values()) + K)
    step = min(max(n, 1), max(1, _BLOCK_FLOATS // max(floats, 1)))
    unit = K * (vector + widest) + cols  # per example of a block
    fixed = n * K * vector if kept else 0
    device = next(iter(params.values())).device
    avail = _memory.available_bytes(device)

    def held(m: int) -> int:  # and one gradient being written (the per-example loop)
        return fixed + m * unit + vector

    if not mapped:  # the per-example loop: blocks of one
        step = 1
    elif avail is not None and held(step) > avail:  # fewer examples per block, down to one
        step = min(step, max(1, (avail - fixed - vector) // unit))
    loop = "" if mapped else " (the per-example loop: torch's nested vmap of prelu is wrong)"
    kept_text = f"; all {n:,} examples' factors are kept (fisher_norms)" if kept else ""
    _memory.require(
        f"the exact GGN's square-root factors ({K:,} output entries per example, each a vector "
        f"of {sum(p.numel() for p in params.values()):,} parameters, and the loss Hessian's "
        f"square root: {K:,} x {K:,} entries per example, {_memory.format_bytes(cols)}) for a "
        f"block of {min(step, n):,} of the chunk's {n:,} examples{loop}, with one parameter's "
        f"squares{kept_text}",
        held(step),
        device,
        "the exact GGN (kind='exact'/'ggn') back-propagates every output entry of an example; "
        "use kind='mc' (the Monte-Carlo Fisher: unbiased for the same matrix, one backward "
        "pass per label draw) or kind='empirical'" + (", or a smaller chunk_size=" if kept else ""),
    )
    return step


def _is_prelu(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether an operation is ``prelu`` (``torch.prelu``, ``F.prelu``, ``Tensor.prelu``)."""
    return getattr(func, "__name__", None) == "prelu"


@contextmanager
def dense_embeddings(scan: ModelScan) -> Iterator[None]:
    """Run the block with ``sparse=False`` on every ``nn.Embedding``/``nn.EmbeddingBag``, the
    flags put back after (also when the block raises).

    ``sparse=True`` changes only the layout of autograd's gradient of the weight (a sparse COO
    tensor), not its values; the per-example passes write and square dense gradients (a sparse
    one crashed inside torch: ``copy_`` between dense and sparse, assignment into a sparse
    tensor, ``addcmul`` on sparse; found in review).
    """
    flipped = [
        m
        for _, m in scan.modules
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and getattr(m, "sparse", False)
    ]
    try:
        for m in flipped:
            m.sparse = False
        yield
    finally:
        for m in flipped:
            m.sparse = True


def _dense(t: Tensor) -> Tensor:
    """``t`` with a strided layout (a sparse gradient, from a functional ``F.embedding(...,
    sparse=True)`` in the model's forward, made dense: same values)."""
    return t if t.layout == torch.strided else t.to_dense()


@contextmanager
def _chunk_labels(
    s: _FuncSession, inputs: Inputs, targets: Tensor, output: Tensor | None = None
) -> Iterator[None]:
    """Count the bad class indices of the whole chunk where a block of examples raised for its
    own (the per-example passes see one block: 2 of 3 bad labels were named, found in review).
    Only on that error path: one forward pass without gradients where ``output`` is not given."""
    try:
        yield
    except ValueError as e:
        if s.spec.kind != "cross_entropy" or targets.is_floating_point():
            raise
        if output is None:
            with torch.no_grad():
                output = s.spec.prepare(call_model(s.model, inputs), targets)
        name_invalid_labels(s.spec, output, targets, e)
        raise


def _squares(v: Tensor) -> Tensor:
    """``v**2``; a 16-bit ``v`` squared as a float32 copy, in place (a float16 square is 0 below
    ``6e-8`` and inf above ``65504``: 19 of 35 exact GGN entries were 0, found in review)."""
    return v.float().square_() if is_sixteen(v.dtype) else v.square()


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total.add_(value)


def _grads_of(
    out: Tensor,
    params: dict[str, nn.Parameter],
    grad_out: Tensor | None = None,
    retain: bool = False,
) -> dict[str, Tensor]:
    gs = torch.autograd.grad(
        out, list(params.values()), grad_out, retain_graph=retain, allow_unused=True
    )
    return {
        k: torch.zeros_like(p) if g is None else _dense(g) for (k, p), g in zip(params.items(), gs)
    }


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
        with dense_embeddings(scan):
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
        if mc_samples == 0:
            with torch.no_grad():
                output = s.forward(inputs, targets)
            with _chunk_labels(s, inputs, targets, output):
                sq, g = s.squares(inputs, targets, with_grad)
            return sq, g, output
        output, moved = chunk_output(s, inputs, targets)
        if moved:  # a random forward: labels from the forward differentiated (review s26)
            total = drawn_squares(s, inputs, targets, generator, mc_samples)
            return {k: v / mc_samples for k, v in total.items()}, {}, output
        total: dict[str, Tensor] = {}
        # example-major draws: each example's labels do not depend on the chunk boundaries
        for sampled in draw_labels(s.spec, output, generator, targets, mc_samples):
            for k, v in s.squares(inputs, sampled, False, drawn=True)[0].items():
                total[k] = _add(total.get(k), v)
        return {k: v / mc_samples for k, v in total.items()}, {}, output

    def sum_grad_squared_with_sampled(
        self, s: _FuncSession, inputs: Inputs, targets: Tensor, generator: torch.Generator | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Squared gradients at the labels and at one draw (see the other backends)."""
        output, moved = chunk_output(s, inputs, targets)
        with _chunk_labels(s, inputs, targets, output):
            at_labels, grads = s.squares(inputs, targets, True)
        if moved:  # a random forward: labels from the forward differentiated (review s26)
            return at_labels, grads, drawn_squares(s, inputs, targets, generator, 1), output
        sampled = s.spec.sample_targets(output, generator, targets)
        at_sampled, _ = s.squares(inputs, sampled, False, drawn=True)
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
            output, moved = chunk_output(s, inputs, targets)
            if moved:  # a random forward: labels from the forward differentiated (review s26)
                return drawn_grads(s, inputs, targets, generator)
            labels = s.spec.sample_targets(output, generator, targets)
        with _chunk_labels(s, inputs, labels):
            return s.grads(inputs, labels, drawn=sampled or drawn)

    # ---------------------------------------------------------------- second order
    def diag_ggn(self, s: _FuncSession, inputs: Inputs, targets: Tensor) -> dict[str, Tensor]:
        """``diag sum_n J_n^T (d^2 NLL_n / d f^2) J_n`` from the exact square-root factors,
        squared and summed block by block (never all of a chunk's factors at once)."""
        total: dict[str, Tensor] = {}

        def add(lo: int, k: str, v: Tensor) -> None:
            total[k] = _add(total.get(k), _squares(v).sum((0, 1)))

        _fold(s.sqrt_blocks(inputs, targets), add)
        return total

    def sqrt_ggn(self, s: _FuncSession, inputs: Inputs, targets: Tensor) -> dict[str, Tensor]:
        """Square-root factors of the NLL-sum GGN, ``(K, n, *shape)`` per parameter."""
        return {k: v.transpose(0, 1) for k, v in s.sqrt_factors(inputs, targets).items()}
