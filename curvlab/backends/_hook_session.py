"""The hooks backend's session: the taps on each layer call and the first-forward checks.

A :class:`_HookSession` records, for every call of a module that owns trainable parameters, the
module's input and the autograd edge of its output (a :class:`_Tap`). On the first forward pass of
a session it checks that every parameter enters the loss exactly as often as its modules' outputs
reach it, classifies modules that do not hold the examples in their first dimension (a position
embedding on ``arange(T)``) and rebinds them at the addition that broadcasts them over the batch;
anything else hands over (:class:`~curvlab.backends.Handover`). It also checks, for every
parameter used several times (whose calls' rows are added by position), that each of those calls
holds example ``n`` at row ``n`` (:meth:`_HookSession._check_rows_in_order`: a shared encoder
run on a shuffled view of the batch, the shuffle undone afterwards, hands over). Every later
forward pass (also one that starts from a remembered layout) runs the same modules in the same
order as the first and gives every batch-major module as many leading rows as the chunk has
examples, or hands over: O(layers) integer comparisons. See :mod:`curvlab.backends._hooks` for
the backend itself.

Not seen: a module run on a selection of rows (a masked-LM head on the masked tokens alone,
``head(h[mask])``) whose number of rows happens to equal the number of examples on every chunk
*and* on the classification probe's examples, the first and the last (one row each there, e.g.
masked counts ``[1, 2, 0, 1]``); its rows are then read as the examples. One row per example everywhere is
right (the rows are the examples, in order). Nor a call of a parameter used several times that
holds the examples in order on the first chunk but not on a later one (a ``torch.randperm``
shuffle drawn afresh on every pass that is the identity on the first chunk: 1 in ``n!`` for
``n`` examples).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from curvlab._data import Inputs, call_model, num_examples
from curvlab._layout import pick_examples, probe_rows
from curvlab._losses import LossSpec
from curvlab._rng import global_rng_kept
from curvlab._scan import model_device
from curvlab.backends._base import Handover, parameter_uses
from curvlab.backends._rules import Rule

__all__ = ["Layer"]


@dataclass(frozen=True)
class Layer:
    """A hooked module: its rule and which parameter name each of its attributes holds."""

    module: nn.Module
    rule: Rule
    names: dict[str, str]  # attribute ("weight", "bias") -> parameter name


@dataclass
class _Tap:
    """One hooked module in one call of a forward pass.

    ``edge`` is the autograd node that produced the output: the gradient flowing into it is the
    one at the module's own output, even if the model's ``forward`` later changes that tensor in
    place (``h += x``), which would re-point ``output`` to a new node.
    """

    name: str
    layer: Layer
    input: Tensor  # detached: shares storage and version counter with the module input
    input_version: int
    output: Tensor
    edge: GradientEdge
    source: Tensor | None = None  # a broadcast module's own input (``input`` is its expansion)
    sign: float = 1.0  # the consumer's factor on a broadcast module's output
    grad_shape: tuple[int, ...] | None = None  # of the gradient at ``edge``, if not output's

    def check_input(self) -> None:
        """Hand over if the module's input changed in place after the module used it."""
        a = self.input if self.source is None else self.source
        if a._version != self.input_version:
            raise Handover(
                f"the input of module '{self.name}' was modified in place after the module used "
                "it (e.g. x += ... in the model's forward); the hooks need the input as the "
                "module saw it"
            )

    @property
    def module(self) -> nn.Module:
        return self.layer.module


@dataclass
class _HookSession:
    module: nn.Module
    spec: LossSpec
    params: dict[str, nn.Parameter]
    taps: list[_Tap] = field(default_factory=list)  # per forward pass, in the order applied
    on_output: Callable[[Tensor, Tensor], None] | None = None
    probe: bool = True  # check the first forward pass of the session (see forward)
    examples: int = 0  # of the forward pass running
    sequential: bool = False  # a plain nn.Sequential chain (informational)
    provisional: bool = False  # the layout came from one example: classify again on the next
    layout: list[bool] | None = None  # per recorded call: batch-major (True) or broadcast
    names: tuple[str, ...] | None = None  # the recorded calls' modules on the first forward
    resumed: bool = False  # names and layout came from a previous session (the choice memo)
    dims: list[int] | None = None  # leading output dims, recorded during a probe forward
    grad_pass: bool = False  # a forward pass with gradient of forward() is running
    # the caller's pending check that the model keeps the examples apart, run on the first
    # forward pass: (inputs, the batch pass's output, a context for its first pass on two
    # examples, which records this session's leading sizes, or None)
    apart: (
        Callable[[Inputs, Any, Callable[[], AbstractContextManager[Any]] | None], None] | None
    ) = None
    notes: list[str] = field(default_factory=list)  # fallbacks taken (none in this backend)

    def nll(self, output: Tensor, targets: Tensor, drawn: bool = False) -> Tensor:
        return self.spec.nll_sum(output, targets, drawn)

    def learned(self) -> tuple[tuple[str, ...], tuple[bool, ...]] | None:
        """What the first forward pass established (the recorded modules and their layout), or
        ``None`` if none ran."""
        if self.probe or self.layout is None or self.provisional or self.names is None:
            return None
        return self.names, tuple(self.layout)

    def resume(self, learned: tuple[tuple[str, ...], tuple[bool, ...]] | None) -> None:
        """Start with the checks of a previous session on the same signature already done.

        The layout applies to the modules it was learned on: a first forward pass that runs
        other modules (a multi-task model's other head) is classified afresh.
        """
        if learned is not None:
            names, layout = learned
            self.probe, self.names, self.layout, self.resumed = False, names, list(layout), True

    def uses(self, reached: set[int] | None = None) -> dict[str, int]:
        """How many recorded calls each parameter took part in (this forward pass).

        With ``reached`` (the ids of the loss's autograd nodes) only the calls whose output
        reaches the loss count.
        """
        count = dict.fromkeys(self.params, 0)
        for t in self.taps:
            if reached is not None and id(t.edge.node) not in reached:
                continue  # e.g. an auxiliary output the loss does not use
            for pname in t.layer.names.values():
                count[pname] += 1
        return count

    def forward(self, inputs: Inputs, targets: Tensor) -> Tensor:
        """The model's (prepared) output, with every hooked module's input and output recorded.

        Every forward pass also checks that every trainable parameter enters the graph exactly
        once per recorded call of its modules, that the same modules ran in the same order as on
        the session's first forward pass (Gram blocks pair the layers of different chunks by
        position) and that every batch-major module has one leading row per example; otherwise
        it hands over.
        """
        self.taps.clear()
        self.examples = num_examples(inputs)
        self.grad_pass = torch.is_grad_enabled()
        received: list[Inputs] = []  # the copy of the inputs the model ran on
        try:
            raw = call_model(self.module, inputs, received=received)
        finally:
            self.grad_pass = False
        output = self.spec.prepare(raw, targets)
        if not torch.is_grad_enabled():  # nothing recorded: a forward for the output alone
            if self.on_output is not None:
                self.on_output(output, targets)
            return output
        names = tuple(t.name for t in self.taps)
        if self.names is None or (self.resumed and names != self.names):
            # the session's first forward (a remembered layout belongs to other modules)
            self.names, self.layout = names, None
        elif names != self.names:
            raise Handover(
                f"the model ran other layers than on the first chunk ({_differ(self.names, names)})"
            )
        self.resumed = False
        classified = self.layout is None or self.provisional
        if classified:
            self.layout = self._classify(inputs, raw)
        else:
            if self.apart is not None:  # a remembered layout: the check's passes alone
                check, self.apart = self.apart, None
                self._run_check(check, inputs, raw, None)
            self._check_rows()
        if not all(self.layout):
            _rebind_broadcast(
                [t for t, batch_major in zip(self.taps, self.layout) if not batch_major],
                output,
                self.examples,
            )
        # every forward pass, not the first alone (40 us on W4): a parameter used outside its
        # module only on some batches (data-dependent control flow) is caught on those batches,
        # also after the choice memo skipped the first-pass checks
        self.probe = False
        reached: set[int] = set()
        counts = parameter_uses(output, self.params, reached)
        seen = self.uses(reached)  # calls whose output reaches the loss
        for name, uses in counts.items():
            if uses != seen[name]:
                cut = self._cut_off(name, reached)
                if cut is not None:
                    raise Handover(
                        f"the output of module '{cut}' (parameter '{name}') was changed in "
                        "place after the module returned it (e.g. a write into a slice of it, "
                        "h[:, 0].mul_(3.0)), which cuts the hooks' link to the gradient at that "
                        "output; clone the output before writing into it "
                        "(h = layer(x).clone()) or write out of place"
                    )
                raise Handover(
                    f"parameter '{name}' enters the loss {uses} times but the outputs of its "
                    f"modules reach the loss {seen[name]} times: it is used outside its "
                    "module (e.g. x @ layer.weight), so the hooks cannot see all of its gradient"
                )
        if classified:  # where the layout is learned: the first chunk of two examples or more
            self._check_rows_in_order(output, raw, received[0])
        if self.on_output is not None:
            self.on_output(output, targets)
        return output

    def _run_check(
        self,
        check: Callable[[Inputs, Any, Callable[[], AbstractContextManager[Any]] | None], None],
        inputs: Inputs,
        raw: Any,
        first_pass: Callable[[], AbstractContextManager[Any]] | None,
    ) -> None:
        """The pending :attr:`apart` check, with the calls its own passes record dropped: a
        layer run under ``torch.enable_grad()`` inside the forward has an output that requires
        grad in the check's passes without gradient too, and its call on a few examples was
        recorded beside the batch's (review s26: torch's "The size of tensor a (6) must match
        the size of tensor b (2)" from the empirical Fisher diagonal)."""
        recorded = len(self.taps)
        try:
            check(inputs, raw, first_pass)
        finally:
            del self.taps[recorded:]

    def _cut_off(self, param: str, reached: set[int]) -> str | None:
        """The module of ``param`` whose recorded output the loss no longer reaches because the
        output was changed in place (its autograd node is not the one recorded: an in-place
        write into a view of a view, ``h[:, 0].mul_(3.0)`` on a sequence Linear's output,
        re-points it), or ``None``: then the parameter is used outside its module."""
        for t in self.taps:
            if (
                param in t.layer.names.values()
                and id(t.edge.node) not in reached
                and t.source is None  # a broadcast tap's edge is its consumer's
                and t.output.grad_fn is not t.edge.node
            ):
                return t.name
        return None

    def _check_rows_in_order(self, output: Tensor, raw: Tensor, given: Inputs) -> None:
        """Hand over if a call of a parameter used several times holds its examples out of order.

        The hooks add the calls' row ``i`` together as example ``i``'s gradient
        (:meth:`~curvlab.backends._hooks.HooksBackend.per_example`). A call on a reordered view
        of the batch (a shared encoder run on ``x`` and on ``x[perm]``, the order put back
        afterwards: a MoCo/SimSiam-style shuffle) keeps every leading size and the examples
        apart, but its row ``i`` belongs to another example: the sum added different examples'
        gradients before squaring (``diag_fisher`` 0.59 off, found in review s22). A parameter
        used once is not checked: its squares do not depend on the order of its rows.

        On the gradient, where the order matters: with the cotangent at the model's output kept
        on the examples whose index has bit ``b`` set and zero elsewhere, row ``i`` of a call in
        order gets a gradient only if bit ``b`` of ``i`` is set (exact zeros: no rounding). One
        backward pass to those calls' outputs per bit of ``n - 1``, ``ceil(log2 n)`` in all (two
        for 4 examples, six for 64), tells every reordering from the identity (two different
        rows differ in some bit); on the first chunk of a call only (the layout's forward pass,
        not a remembered one), with one host read. Not seen: a reordering drawn afresh on every
        forward pass (``torch.randperm``) that happens to be the identity on that chunk (1 in
        ``n!``).

        A call evidently in order needs no pass: one whose input is the batch as the model got
        it (the same rows of the same storage: an embedding of the token ids) or whose output
        is the model's output (a head): the examples are apart, so its row ``i`` is example
        ``i``'s. A tied embedding and head (GPT-2) then costs nothing; a call on ``x[perm]``
        (a copy) is checked.
        """
        n = self.examples
        if n < 2 or output.ndim == 0 or output.shape[0] != n or output.grad_fn is None:
            return
        counts = self.uses()
        batch = [given] if isinstance(given, Tensor) else list(given.values())
        anchors = [t for t in batch if isinstance(t, Tensor)] + [raw]
        taps = [
            t
            for t in self.taps
            if any(counts[p] > 1 for p in t.layer.names.values())
            and not any(_same_rows(x, a, n) for x in (t.input, t.output) for a in anchors)
        ]
        if not taps:
            return
        recorded = len(self.taps)  # a checkpointed region recomputed in these passes adds calls
        edges = [t.edge for t in taps]
        # a cotangent with no zero, the same on every example's entries (no global RNG)
        entry = torch.arange(output[0].numel(), device=output.device) % 9973
        pattern = torch.cos(entry.to(torch.float32)).add_(1.5).to(output.dtype)
        pattern = pattern.reshape(output.shape[1:])
        rows = torch.arange(n, device=output.device)
        out_of_order = [output.new_zeros((), dtype=torch.bool) for _ in taps]
        try:
            for b in range((n - 1).bit_length()):
                kept = ((rows >> b) & 1).bool()
                v = pattern * kept.to(output.dtype).reshape(n, *[1] * (output.ndim - 1))
                grads = torch.autograd.grad(output, edges, v, retain_graph=True, allow_unused=True)
                for k, g in enumerate(grads):
                    if g is None or g.ndim == 0 or g.shape[0] != n:
                        continue  # unused here; a broadcast's shape is checked in the passes
                    reached = g.reshape(n, -1).abs().gt(0).any(1)  # NaN rows (0 * inf) ignored
                    out_of_order[k] = out_of_order[k] | (reached & ~kept).any()
        finally:
            del self.taps[recorded:]
        found = torch.stack(out_of_order).tolist()  # one host read, on the first chunk only
        for t, bad in zip(taps, found):
            if bad:
                raise Handover(
                    f"module '{t.name}' is applied more than once and one of its calls holds "
                    "the examples out of order (run on a reordered view of the batch, "
                    "x[perm], the order put back afterwards, as in a MoCo-style shuffle): the "
                    "hooks add the calls' rows by position, which would sum different "
                    "examples' gradients"
                )

    def _check_rows(self) -> None:
        """Hand over if a batch-major call's leading size is not this chunk's number of examples.

        A module run on a selection of rows (a masked-LM head on the masked tokens) that had one
        row per example on the chunk it was classified on has as many rows as selected tokens on
        another; the rows would be read as examples.
        """
        n = self.examples
        for t, batch_major in zip(self.taps, self.layout):
            if batch_major and (t.output.ndim == 0 or t.output.shape[0] != n):
                shape = tuple(t.output.shape)
                raise Handover(
                    f"module '{t.name}' has output {shape} for {n} examples but was classified "
                    "as holding the examples in its first dimension: it runs on a selection of "
                    "rows (e.g. the masked tokens), not one row per example"
                )

    def _classify(self, inputs: Inputs, raw: Tensor) -> list[bool]:
        """Which recorded calls keep the examples in their first dimension (else: broadcast).

        A module run on something other than the batch (a position embedding on ``arange(T)``,
        broadcast over the examples later) is told apart by its leading output size, which does
        not follow the number of examples: a second forward pass (no gradients) on the first and
        the last example (:func:`~curvlab._layout.probe_rows`; the first one for a chunk of two)
        compares them. Two, not one: a module run on selected rows (the masked tokens,
        ``head(h[mask])``) with masked counts ``[1, 0, 2]`` has one row on the first example and
        as many as examples on the chunk, like a batch-major one; on the first and the last
        example together it has 3 rows, not 2. Batch-major: as many
        rows as examples on both; broadcast: the same size on both; else it hands over.

        With a pending :attr:`apart` check, that check's first pass (on the first and the last
        example) is the probe, and ``raw`` (this chunk's output) its batch pass: one forward
        pass less for each.

        Raises:
            ValueError: if the model ran on the chunk but fails on its first examples alone
                (:func:`curvlab._data.part_failed`: most likely a batch without a batch axis).
        """
        n = self.examples
        full = [int(t.output.shape[0]) if t.output.ndim else -1 for t in self.taps]
        # one example: a broadcast module's leading size is 1 as well, so the sizes cannot tell
        # them apart; right for this chunk either way (the sum over one example is that
        # example), but classified again on the next chunk and never remembered (a first chunk
        # of one example made GPT-2's position embedding batch-major for every later chunk)
        self.provisional = n == 1
        if n == 1:
            if self.apart is not None:  # nothing to compare on one example
                check, self.apart = self.apart, None
                self._run_check(check, inputs, raw, None)
            return [d == n for d in full]
        p = 2 if n >= 3 else 1  # a probe as large as the chunk would tell nothing apart
        small: list[int] = []
        if self.apart is not None:
            check, self.apart = self.apart, None

            @contextmanager
            def recorded() -> Iterator[None]:
                self.dims = []
                try:
                    yield
                finally:
                    small.extend(self.dims)
                    self.dims = None

            self._run_check(check, inputs, raw, recorded)
        else:
            self.dims = []
            try:
                # the global RNG put back: a Dropout mask drawn here shifted every later chunk's
                # masks, so a first call (with this probe) differed from a remembered one
                # (without)
                with torch.no_grad(), global_rng_kept(model_device(self.module)):
                    # a failure on the first examples of a batch the model just ran on: most
                    # likely a "batch" without a batch axis (batch_size=None), said so (found in
                    # review: torch's raw "mat1 and mat2 shapes cannot be multiplied")
                    call_model(self.module, pick_examples(inputs, probe_rows(n)), whole=inputs)
                small = self.dims
            finally:
                self.dims = None
        few = "one example" if p == 1 else f"{p} examples"
        if len(small) != len(full):
            raise Handover(f"the model runs different layers on {few} than on the batch")
        layout = []
        for t, d_full, d_few in zip(self.taps, full, small):
            if d_full == n and d_few == p:
                layout.append(True)
            elif d_full == d_few:
                layout.append(False)
            else:
                raise Handover(
                    f"module '{t.name}' has leading output size {d_full} for {n} examples and "
                    f"{d_few} for {few}: it does not hold the examples in its first dimension"
                )
        return layout


def _differ(first: tuple[str, ...], now: tuple[str, ...]) -> str:
    """Where two sequences of recorded modules part, for a hand-over's message."""
    for i, (a, b) in enumerate(zip(first, now)):
        if a != b:
            return f"call {i}: '{b}' instead of '{a}'"
    return f"{len(now)} layer calls instead of {len(first)}"


_CONSUMERS = {"AddBackward0": (1.0, 1.0), "SubBackward0": (1.0, -1.0)}
"""Nodes through which a broadcast output may reach the batch: sign of their first/second input."""


def _rebind_broadcast(taps: list[_Tap], output: Tensor, n: int) -> None:
    """Point each broadcast module's tap at the batch-major sum its output is added into.

    A module whose output ``o`` (shape ``rest`` or ``(1, *rest)``) is broadcast over the examples
    by one addition ``x + o`` (``x`` of shape ``(n, *rest)``) gets, at the sum's gradient edge,
    the per-example gradients of ``o``; its input is expanded over the examples to match. Any
    other use of ``o`` hands over.
    """
    wanted = {(id(t.edge.node), t.edge.output_nr): t for t in taps}
    found: dict[tuple[int, int], list[tuple[Any, int]]] = {k: [] for k in wanted}
    root = output.grad_fn
    stack, seen = ([root], {id(root)}) if root is not None else ([], set())
    while stack:
        node = stack.pop()
        for i, (nxt, nr) in enumerate(node.next_functions):
            if nxt is None:
                continue
            key = (id(nxt), nr)
            if key in found:
                found[key].append((node, i))
            if id(nxt) not in seen and not hasattr(nxt, "variable"):
                seen.add(id(nxt))
                stack.append(nxt)
    for key, t in wanted.items():
        uses = found[key]
        kind = type(uses[0][0]).__name__ if len(uses) == 1 else None
        o, a = t.output, t.input
        if kind not in _CONSUMERS or o.ndim == 0 or a.ndim == 0:
            raise Handover(
                f"module '{t.name}' runs on something other than the batch (output "
                f"{tuple(o.shape)} for {n} examples) and its output is not simply added to a "
                "batch-major tensor, so the hooks cannot separate its per-example gradients"
            )
        node, index = uses[0]
        sign = _CONSUMERS[kind][index] if index < 2 else 0.0
        if index == 1:
            sign *= float(getattr(node, "_saved_alpha", 1.0))
        if o.shape[0] == 1 and a.shape[0] == 1:  # (1, *rest): broadcast along its first axis
            expanded = a.expand(n, *a.shape[1:])
            grad_shape = (n, *o.shape[1:])
        else:  # rest: a new leading axis
            expanded = a.unsqueeze(0).expand(n, *a.shape)
            grad_shape = (n, *o.shape)
        t.source, t.input = a, expanded
        t.edge = GradientEdge(node, 0)
        t.sign, t.grad_shape = sign, grad_shape


def _tap_grad(t: _Tap, g: Tensor | None) -> Tensor:
    """The gradient at a tap's module output: zeros if unused; a broadcast tap's checked."""
    if t.grad_shape is None:
        return torch.zeros_like(t.output) if g is None else g
    if g is None:
        return t.output.new_zeros(t.grad_shape)
    if tuple(g.shape) != t.grad_shape:
        raise Handover(
            f"the output of module '{t.name}' is broadcast to {tuple(g.shape)}, not over the "
            f"examples alone ({t.grad_shape})"
        )
    return g if t.sign == 1.0 else g * t.sign


def _same_rows(a: Tensor, b: Tensor, n: int) -> bool:
    """Whether ``a`` holds the rows of ``b`` in ``b``'s order: the same storage, offset, number
    of rows (``n``) and row stride (``b`` itself or a view of it that keeps its rows, such as
    ``b.view(n, -1)``; a copy, ``b[perm]``, is another storage)."""
    if a.ndim == 0 or b.ndim == 0 or a.shape[0] != n or b.shape[0] != n:
        return False
    try:
        same = a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (fake, functional)
        return False
    return same and a.storage_offset() == b.storage_offset() and a.stride(0) == b.stride(0)
