"""What an operator's forward passes read of the model besides the data: every parameter (the
selected ones and the rest) and buffer, recorded when the operator is built.

An operator is one fixed matrix. Its products run the model's forward pass again (a graph rebuilt
for each of several batches, a forward-mode ``J v``), so a parameter outside ``params=``, a frozen
one or a buffer changed in place after the build gave products at the new state with several
batches and at the old one with one (found in review: ``op @ v`` off by 0.11 after an optimizer
step on the backbone of a ``params=`` head). :class:`ModelState` records each tensor's identity,
storage and version counter; products refuse after any of them moved outside curvlab's own passes.

None of these moves when the values change in place through ``.data`` (``p.data.add_(-lr * g)``
of a hand-written SGD step, ``p.data.clamp_(-c, c)`` of WGAN clipping, an EMA or SAM step written
with ``.data``): products with several batches then ran at the new values, silently (found in
review: a Hessian product 0.40 away from the built matrix). Each tensor's values are therefore
recorded too, as a fingerprint of its bits (:func:`bit_sums`: exact integer sums, at the speed
of a plain sum on a CPU), compared on the device before every product
(:meth:`ModelState.values_moved`) and read once the product has run; inside an estimator's run,
before its first product and after its last
(``CurvatureOperator._values_checked_once``).

Some tensors move at every forward pass without changing: the weight of an
``nn.Embedding(max_norm=...)``, which torch renormalises in place (``embedding_renorm_`` bumps the
version counter even when no row exceeds the norm, and :func:`curvlab._notrace.leave_no_trace`
puts the values back), or a buffer a module rewrites with ``copy_`` (an observer's range). For
these (the max_norm weights, and whatever the operator's first forward passes moved)
:class:`ModelState` keeps a fingerprint of the values and accepts a moved version when the values
are the same (found in review: every Hessian quantity refused max_norm models with "the model's
parameters changed").

What the first forward passes over some batches change once (a rotary cos/sin cache registered
again, longer, for a longer sequence: ``"<name> (grown)"``) is left to the operator, which runs
that product again (:meth:`curvlab.operators.CurvatureOperator._over_batches`). The modules,
hooks and plain attributes the forward passes run are recorded too
(:class:`~curvlab.operators._structure.ModelStructure`, :attr:`ModelState.structure`); the
tensors kept in plain attributes (not buffers: a temperature ``self.temp = torch.tensor(2.0)``)
have their fingerprints compared before every product with the others' (:meth:`values_moved`;
found in review s20: a product silently the changed model's), except those the operator's own
forward passes write.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> state = ModelState(model, copied=[])
    >>> state.changes().changed
    []
    >>> with torch.no_grad():
    ...     _ = model.bias.add_(1.0)
    >>> state.changes().changed
    ['bias']
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._kept_batches import fingerprint, same_fingerprint
from curvlab._text import few
from curvlab.operators._structure import ModelStateError, ModelStructure, Snapshot

__all__ = [
    "ModelState",
    "ModelStateError",
    "Changes",
    "changed_error",
    "first_pass_error",
    "own_pass_error",
    "relative_difference",
    "values_fingerprint",
    "bit_sums",
    "BitWeights",
    "tensor_versions",
    "versions",
]


_CHUNK = 1 << 22
"""Entries per chunk of :func:`_weighted_sum` (bounds its temporary memory)."""


def values_fingerprint(t: Tensor) -> tuple[Tensor, ...]:
    """:func:`~curvlab._kept_batches.fingerprint` (64 entries and the sum) and a position-weighted
    sum ``sum_i (i + 1) t_i`` in float64, all on ``t``'s device without a host synchronisation.

    The weighted sum sees what the other two miss: a change of entries that were not sampled
    which keeps the sum (rows swapped; an SGD step on an embedding followed by a LayerNorm, whose
    gradient rows sum to zero).
    """
    entries, total = fingerprint(t)
    return entries, total, _weighted_sum(t)


def _weighted_sum(t: Tensor) -> Tensor:
    """``sum_i (i + 1) t_i`` over the flat entries (real and imaginary parts of complex ones)."""
    flat = t.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    acc = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK].to(torch.float64)
        weights = torch.arange(
            start + 1, start + 1 + part.numel(), dtype=torch.float64, device=flat.device
        )
        acc += torch.dot(part, weights)
    return acc


_BITS_CHUNK = 1 << 20
"""Entries per chunk of the integer path of :func:`bit_sums` (bounds its temporary memory: 24
bytes an entry)."""

_NEXT_CHUNK = -7046029254386353131
"""An odd 64-bit multiplier (``0x9E3779B97F4A7C15`` as a signed integer) that chains the chunks
of :func:`bit_sums`."""

_WORDS_PER_ROW = 1024
"""Words per row of the first stage of the word path of :func:`bit_sums` (one weight per
column): an int64 matrix-vector product, which a CPU runs at the speed of a plain sum."""


def _shift_right(z: Tensor, k: int) -> Tensor:
    """A logical right shift of int64 entries (torch's ``>>`` keeps the sign)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix(z: Tensor) -> Tensor:
    """splitmix64 of int64 positions (pseudo-random int64 weights, modulo 2^64)."""
    z = z * _NEXT_CHUNK
    z = (z ^ _shift_right(z, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = (z ^ _shift_right(z, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return z ^ _shift_right(z, 31)


def bit_weights(n: int, device: torch.device) -> Tensor:
    """Two rows of ``n`` odd pseudo-random int64 weights (splitmix64 of the positions): those of
    the integer path of :func:`bit_sums`. Row ``r``'s first ``m`` entries are the same for
    every ``n >= m``."""
    z = torch.arange(1, n + 1, dtype=torch.int64, device=device)
    return _splitmix(torch.stack((z, z + (1 << 40)))) | 1  # odd: see BitWeights


class BitWeights:
    """The pseudo-random weights of :func:`bit_sums` on one device, made once and grown as
    needed (a longer set starts with the same weights)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._chunk = bit_weights(0, self.device)
        z = torch.arange(1, _WORDS_PER_ROW + 1, dtype=torch.int64, device=self.device)
        # odd: a change of one word always changes the sum (an odd number is invertible
        # modulo 2^64)
        self.columns = _splitmix(torch.stack((z + (2 << 40), z + (3 << 40)))) | 1
        self._rows = self.columns.new_empty(0)

    def chunk(self, n: int) -> Tensor:
        """The ``(2, >= n)`` weights of the integer path."""
        if self._chunk.shape[1] < n:
            self._chunk = bit_weights(n, self.device)
        return self._chunk

    def rows(self, n: int) -> Tensor:
        """``>= n`` odd weights of the second stage of the word path (one per row)."""
        if self._rows.numel() < n:
            z = torch.arange(1, n + 1, dtype=torch.int64, device=self.device)
            self._rows = _splitmix(z + (4 << 40)) | 1
        return self._rows


def _bits(t: Tensor) -> Tensor | None:
    """``t``'s entries as flat integers of their own bits (8-byte entries as two 4-byte halves,
    so that a sign bit is no top bit of the sums); ``None`` for a tensor without plain storage
    (sparse, quantised, a subclass that refuses the view)."""
    try:
        # contiguous: the flattening of a strided tensor (a parameter that is a view,
        # ``w[::2]``) is a strided view that no dtype view takes, and its values were never
        # compared (found in review s19)
        flat = t.detach().reshape(-1).contiguous()
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.view(torch.uint8)
        size = flat.element_size()
        return flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int32}[size])
    except (RuntimeError, KeyError, NotImplementedError, TypeError):
        return None


def _bytes(bits: Tensor) -> Tensor | None:
    """The flat bytes of :func:`_bits` (``uint8``, a view) where the word path can read them as
    int64 words at any byte offset (a CPU tensor with an untyped storage); else ``None``."""
    if bits.device.type != "cpu":
        return None
    try:
        data = bits.view(torch.uint8)
        data.untyped_storage()
        return data
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def bit_sums(t: Tensor, weights: BitWeights | None = None) -> Tensor | None:
    """Integer fingerprints of ``t``'s bits, modulo 2^64, as an int64 tensor on ``t``'s device
    (``(3,)`` on a CPU, ``(2,)`` elsewhere): no host synchronisation. ``weights``: those of
    ``t``'s device (made here when not given; :class:`ModelState` keeps one set per device).

    Integer sums are exact, so the result does not depend on the order of the additions (the
    number of CPU threads, the device's reduction). All weights are odd (invertible modulo
    2^64): a change of one entry of at most 4 bytes (on a CPU: 8 bytes) always changes the
    result. Another change
    leaves it as it was by a chance of about ``2^-(63 - k)``, where ``2^k`` divides the change
    of the lowest changed bit of a 4-byte half (``k <= 31``: about ``2^-32`` for flipped sign
    bits, the worst case).

    On a CPU (the word path) the bytes are read in place as int64 words twice, from byte 0 and
    from byte 4, so that every 4-byte half of the data is the low half of a word once (a sign
    bit is then bit 31 of a word, not its top bit, which a sum modulo 2^64 sees only through
    its parity). Each pass is one int64 matrix-vector product of rows of ``_WORDS_PER_ROW``
    words with pseudo-random weights, then a weighted sum of its rows; the at most 7 bytes in
    no word's low half go through the integer path (the third sum). Two passes over the data
    at the speed of a plain float ``t.sum()``: on 124M float32 entries about 0.07 s on one
    CPU core, where the integer path takes 0.3-2 s.

    Elsewhere (CUDA has no int64 matrix products: the integer path) each entry's integer bits
    (8-byte entries as two 4-byte halves) are converted to int64, multiplied by two rows of
    pseudo-random weights and summed, chunk by chunk. ``None`` where ``t`` has no plain storage
    (:func:`_bits`).
    """
    bits = _bits(t)
    if bits is None:
        return None
    weights = BitWeights(bits.device) if weights is None else weights
    data = _bytes(bits)
    if data is None:
        return _sum_bits(bits, weights.chunk(min(bits.numel(), _BITS_CHUNK)))
    return _sum_words(data, weights)


def _words(data: Tensor, start: int, count: int) -> Tensor:
    """``count`` int64 words of the bytes ``data`` from byte ``start``: a view of its storage at
    any byte offset (a 4-byte offset has no view as another dtype), no copy."""
    if count <= 0:
        return data.new_empty(0, dtype=torch.int64)
    begin = data.storage_offset() + start
    storage = data.untyped_storage()[begin : begin + 8 * count]
    return data.new_empty(0, dtype=torch.int64).set_(storage)


def _word_sum(words: Tensor, columns: Tensor, weights: BitWeights) -> Tensor:
    """``sum_r u_r sum_c w_c x_rc`` modulo 2^64 of int64 ``words`` laid out in rows of
    ``_WORDS_PER_ROW`` (the last one short), ``w`` = ``columns``, ``u``: the row weights."""
    rows = words.numel() // _WORDS_PER_ROW
    full = words[: rows * _WORDS_PER_ROW].view(rows, _WORDS_PER_ROW) @ columns
    rest = words[rows * _WORDS_PER_ROW :]
    last = (rest * columns[: rest.numel()]).sum()
    u = weights.rows(rows + 1)
    return (full * u[:rows]).sum() + last * u[rows]


def _sum_words(data: Tensor, weights: BitWeights) -> Tensor:
    """The three sums of :func:`bit_sums` over flat bytes ``data`` on a CPU (its word path)."""
    n = data.numel()
    whole, shifted = n // 8, max(0, (n - 4) // 8)  # words from byte 0 and from byte 4
    # the bytes in no word's low half: after the last low half of either pass (at most 7)
    tail = data[max(0, 8 * whole - 4, 8 * shifted) :]
    return torch.stack(
        (
            _word_sum(_words(data, 0, whole), weights.columns[0], weights),
            _word_sum(_words(data, 4, shifted), weights.columns[1], weights),
            _sum_bits(tail, weights.chunk(tail.numel()))[0],
        )
    )


def _sum_bits(bits: Tensor, weights: Tensor) -> Tensor:
    """The two weighted sums of the integer path of :func:`bit_sums` over flat integer
    ``bits``."""
    acc: Tensor | None = None
    for start in range(0, bits.numel(), _BITS_CHUNK):
        part = bits[start : start + _BITS_CHUNK].to(torch.int64)
        sums = (part * weights[:, : part.numel()]).sum(dim=1)
        acc = sums if acc is None else acc * _NEXT_CHUNK + sums
    return torch.zeros(2, dtype=torch.int64, device=bits.device) if acc is None else acc


@dataclass
class _Slot:
    """One tensor of the model as recorded: identity, storage, version, the :func:`bit_sums` of
    its values (``bits``; ``None`` for a tensor without plain storage) and, for tensors a
    forward pass rewrites with the same values, their :func:`values_fingerprint`."""

    kind: str  # "parameter" or "buffer"
    tensor: Tensor
    version: int | None
    ptr: int | None
    values: tuple[Tensor, ...] | None = None
    bits: Tensor | None = None


@dataclass
class Changes:
    """What moved since the state was recorded.

    Attributes:
        changed: names of parameters and buffers changed in place, through ``.data``, replaced by
            other tensors, added or removed (``"<name> (new)"``, ``"<name> (removed)"``,
            ``"<name> (replaced)"``; ``"<name> (grown)"``: a buffer replaced by a larger one whose
            leading entries hold the recorded values, as a cache grown for longer inputs).
        parameters: whether any of ``changed`` is a parameter (else all are buffers).
        rewritten: whether a tensor that a forward pass rewrites in place moved with the same
            values (accepted and recorded again; a graph kept before may hold its old version).
    """

    changed: list[str] = field(default_factory=list)
    parameters: bool = False
    rewritten: bool = False


class ModelState:
    """The parameters and buffers of ``model`` as recorded (see the module docstring).

    Args:
        model: the model (unwrapped).
        copied: ``(module, buffer name, ...)`` of the buffers the operator's passes run on copies
            of (:func:`curvlab._notrace.buffer_snapshot`): the model's own tensors there are not
            read by the operator, and a train-mode forward of the user's may update them.
        before: :func:`versions` of the model before the operator's first forward passes: the
            tensors they moved get a fingerprint too.
        before_structure: the model's :func:`~curvlab.operators._structure.snapshot` then (the
            plain attributes those passes changed are the model's own state).

    Attributes:
        structure: the modules, hooks and plain attributes as recorded
            (:class:`~curvlab.operators._structure.ModelStructure`).
    """

    def __init__(
        self,
        model: nn.Module,
        copied: Iterable[tuple[nn.Module, str, Any]],
        before: dict[int, int | None] | None = None,
        before_structure: Snapshot | None = None,
    ) -> None:
        self.model = model
        self._copied = {(id(m), name) for m, name, *_ in copied}
        moved = {i for i, v in versions(model).items() if before is not None and before.get(i) != v}
        self._rewrites = moved | {
            id(m.weight)
            for m in model.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
        }
        self._slots: dict[str, _Slot] = {}
        self._weights: dict[torch.device, BitWeights] = {}  # bit_sums' weights per device
        self.structure = ModelStructure(model, before_structure)
        self._record_tensors()

    def _current(self) -> dict[str, tuple[str, Tensor]]:
        """``name -> (kind, tensor)`` of every parameter and every buffer the operator reads."""
        out: dict[str, tuple[str, Tensor]] = {}
        for name, p in self.model.named_parameters():
            out[name] = ("parameter", p)
        for prefix, m in self.model.named_modules():
            for name, b in m._buffers.items():
                if b is None or (id(m), name) in self._copied:
                    continue
                out.setdefault(f"{prefix}.{name}" if prefix else name, ("buffer", b))
        return out

    def record(self) -> None:
        """Record every tensor, and the structure, as they are now, after forward passes of
        curvlab's own (the plain attributes they changed are the model's own state)."""
        self._record_tensors()
        self.structure.after_own_passes()

    def rewrites_too(self, names: Iterable[str]) -> None:
        """Give the tensors ``names`` (changed in place by a forward pass) a fingerprint: from
        now on a move with the same values is accepted (a forward that rewrites them)."""
        wanted = {n.split(" ")[0] for n in names}
        self._rewrites |= {id(t) for n, (_, t) in self._current().items() if n in wanted}

    def _record_tensors(self) -> None:
        """Record every tensor as it is now."""
        rewritten = self._rewrites
        self._slots = {
            name: _Slot(
                kind,
                t,
                _version(t),
                _ptr(t),
                values_fingerprint(t) if id(t) in rewritten else None,
                self._bit_sums(t),
            )
            for name, (kind, t) in self._current().items()
        }

    def _bit_sums(self, t: Tensor) -> Tensor | None:
        """:func:`bit_sums` of ``t`` with this state's weights for its device."""
        weights = self._weights.get(t.device)
        if weights is None:
            weights = self._weights[t.device] = BitWeights(t.device)
        return bit_sums(t, weights)

    def values_moved(self) -> list[Tensor]:
        """Per device of the recorded tensors, a bool tensor on it: whether the values of one
        of them changed since :meth:`record` (in place through ``.data``, which moves neither
        the version counter nor the storage that :meth:`changes` compares). Computed on the
        device and not read here (no host synchronisation): the caller reads it when it
        synchronises anyway; :meth:`values_changed` names the tensors. The tensors kept in
        plain attributes count too, changed in place or replaced by other values since the
        structure's record
        (:meth:`~curvlab.operators._structure.ModelStructure.tensor_attributes`)."""
        now: dict[torch.device, list[Tensor]] = {}
        then: dict[torch.device, list[Tensor]] = {}
        for slot in self._slots.values():
            if slot.bits is not None:
                sums = self._bit_sums(slot.tensor)
                if sums is not None:
                    now.setdefault(sums.device, []).append(sums)
                    then.setdefault(sums.device, []).append(slot.bits)
        flags = []
        for _, was, value in self.structure.tensor_attributes():  # (compared like buffers)
            if was.same_kind(value):
                now.setdefault(value.bits.device, []).append(value.bits)
                then.setdefault(value.bits.device, []).append(was.bits)
            else:  # another shape or dtype: known here
                flags.append(torch.ones((), dtype=torch.bool))
        return flags + [torch.stack(now[d]).ne(torch.stack(then[d])).any() for d in now]

    def values_changed(self) -> Changes:
        """The tensors whose values changed since :meth:`record` without moving their version
        counter or storage (in place through ``.data``): the names behind :meth:`values_moved`
        (one host synchronisation per tensor)."""
        out = Changes()
        for name, slot in self._slots.items():
            sums = None if slot.bits is None else self._bit_sums(slot.tensor)
            if sums is not None and slot.bits is not None and not torch.equal(sums, slot.bits):
                out.changed.append(name)
                out.parameters = out.parameters or slot.kind == "parameter"
        for name, was, value in self.structure.tensor_attributes():
            if not was.same_kind(value) or not torch.equal(was.bits, value.bits):
                out.changed.append(f"{name} (a tensor in a plain attribute)")
        out.changed.sort()
        return out

    def changes(self) -> Changes:
        """What moved since :meth:`record`; a rewritten tensor with unchanged values is recorded
        again (its new version counter). The tensors kept in plain attributes count too, where
        one changed in place (its version counter or storage moved, and its values with it:
        ``"<name> (a tensor in a plain attribute)"``;
        :meth:`~curvlab.operators._structure.ModelStructure.moved_in_place`)."""
        out = Changes()
        now = self._current()
        for name in now.keys() - self._slots.keys():
            out.changed.append(f"{name} (new)")
            out.parameters = out.parameters or now[name][0] == "parameter"
        for name, slot in self._slots.items():
            kind, t = now.get(name, (slot.kind, None))
            if t is None:
                out.changed.append(f"{name} (removed)")
            elif t is not slot.tensor:
                if (
                    kind == "buffer"
                    and _version(slot.tensor) == slot.version
                    and _same(slot.tensor, t)
                ):
                    # a buffer registered again with the same values (a forward that
                    # re-registers a table): the function is the same
                    self._slots[name] = _Slot(
                        kind, t, _version(t), _ptr(t), slot.values, self._bit_sums(t)
                    )
                    continue
                grown = (
                    kind == "buffer"
                    and _version(slot.tensor) == slot.version
                    and _grown(slot.tensor, t)
                )
                out.changed.append(f"{name} ({'grown' if grown else 'replaced'})")
            elif _version(t) == slot.version and _ptr(t) == slot.ptr:
                continue
            elif slot.values is not None and same_fingerprint(values_fingerprint(t), slot.values):
                slot.version, slot.ptr = _version(t), _ptr(t)
                out.rewritten = True
                continue
            else:
                out.changed.append(name)
            out.parameters = out.parameters or kind == "parameter"
        # the tensors in plain attributes changed in place too, as buffers (found in review s20:
        # a graph kept at construction raised autograd's raw in-place error at the next product)
        moved, rewritten = self.structure.moved_in_place()
        out.changed += moved
        out.rewritten = out.rewritten or rewritten
        out.changed.sort()
        return out


def tensor_versions(tensors: Iterable[Tensor]) -> list[int | None]:
    """The version counters of ``tensors``, in order (``None`` for an inference tensor): moved
    by every in-place change."""
    return [_version(t) for t in tensors]


def versions(model: nn.Module) -> dict[int, int | None]:
    """``id -> version counter`` of every parameter and buffer of ``model``."""
    out = {id(p): _version(p) for p in model.parameters()}
    out.update((id(b), _version(b)) for b in model.buffers())
    return out


def changed_error(
    changes: Changes,
    selected: Iterable[str],
    after_product: bool = False,
    during: str | None = None,
) -> ModelStateError:
    """The error for parameters or buffers changed since an operator (acting on the parameters
    ``selected``) was built; ``after_product``: values changed through ``.data``, seen once a
    product had run (:meth:`ModelState.values_moved`), which refuses it and every later one;
    ``during``: seen at the end of that estimator's run, whose products were not checked one by
    one (``CurvatureOperator._values_checked_once``)."""
    names = changes.changed
    outside = [n for n in names if n.split(" ")[0] not in set(selected)]
    attribute = " (a tensor in a plain attribute)"
    if changes.parameters:
        what = "parameters"
    elif all(n.endswith(attribute) for n in names):
        what = "tensors"
    else:
        what = "buffers"
    note = ""
    if outside and changes.parameters:
        note = (
            " (parameters outside the operator's selection, params= or frozen ones, count too: "
            "its forward passes read them)"
        )
    if any(n.endswith(" (grown)") for n in names):
        note += (
            " (grown: replaced by a larger buffer that starts with the old values, as a forward "
            "pass on longer inputs grows a cache; whether the function stayed the same cannot "
            "be told)"
        )
    if during is not None:
        note += (
            f". Seen at the end of {during}, which compares them before its first product and "
            "after its last: they changed while it ran (by the model's forward pass, or by "
            "code of yours in another thread), and its result is dropped"
        )
    if after_product:
        return ModelStateError(
            f"the model's {what} changed since this operator was built: the values of "
            f"{few(names)} changed in place without autograd seeing it (through .data: "
            "p.data.add_(...), p.data.copy_(...), p.data.clamp_(...), by code of yours or in "
            f"the model's forward pass){note}. "
            + (
                _REFUSED_FROM_NOW
                if during is None
                else "This operator refuses every later product (a retry is not the fix). "
            )
            + "Build a new operator with curvature_operator(...) for the new parameters (or "
            "change them only after the last product of this one)"
        )
    return ModelStateError(
        f"the model's {what} changed since this operator was built: {few(names)} changed in "
        f"place, through .data, or were replaced{note}; build a new operator with "
        "curvature_operator(...) for the new parameters"
    )


_REFUSED_FROM_NOW = (
    "This operator refuses this product and every later one (a retry is not the fix). "
)


def own_pass_error(names: list[str], forward_mode: bool = False) -> ModelStateError:
    """The error for parameters or buffers that an operator's own forward passes change again
    and again (not only on their first pass over a batch)."""
    if forward_mode:
        way = (
            "Make that update conditional on module.training and put the module in eval mode "
            "(keep_graph=True does not help here: this operator computes J v in forward mode, "
            "which runs the model's forward pass at every product)"
        )
    else:
        way = (
            "Build the operator with keep_graph=True (every batch's graph built once, at "
            "construction: products run no forward pass), or make that update conditional on "
            "module.training and put the module in eval mode"
        )
    return ModelStateError(
        f"the model's forward pass changes {few(names)} in place or replaces them, each time "
        "it runs and not only on its first pass over a batch (a custom module's running "
        "statistic in a buffer, a hook that rewrites a weight, a buffer that keeps growing): "
        "each product of this operator runs forward passes and would apply another matrix. "
        + _REFUSED_FROM_NOW
        + way
    )


def first_pass_error(names: list[str], relative: float) -> ModelStateError:
    """The error for buffers that the first forward passes over some batches changed once, in a
    way that changes the products (the same product before and after differs by
    ``relative``)."""
    return ModelStateError(
        f"the model's forward pass changed {few(names)} on its first pass over some batches "
        "(a state it keeps, such as a table rebuilt for the longest input seen), and this "
        f"product computed before and after that change differs by {relative:.1e} relative: "
        "the operator's matrix would depend on the order of its passes. "
        + _REFUSED_FROM_NOW
        + "Build the operator with keep_graph=True (every batch's graph built once, at "
        "construction, in one pass over the data), or set that state before building it "
        "(a forward pass on the longest input first)"
    )


def relative_difference(a: Any, b: Any) -> float:
    """``max |a - b| / max |a|`` of two sums (tensors, or lists of tensors); entries equal in
    both (NaN in both included) count as no difference."""
    diff, scale = 0.0, 0.0
    for x, y in zip(a, b) if isinstance(a, list) else [(a, b)]:
        if not x.numel():
            continue
        x, y = x.double(), y.double()
        same = (x == y) | (x.isnan() & y.isnan())
        d = (x - y).abs().masked_fill(same, 0.0).nan_to_num(nan=float("inf"))
        diff = max(diff, float(d.max()))
        scale = max(scale, float(x.abs().nan_to_num(nan=0.0, posinf=0.0).max()))
    return diff / scale if scale > 0 else diff


def _grown(old: Tensor, new: Tensor) -> bool:
    """Whether ``new`` is ``old`` grown: the same dtype, device and number of dimensions, at
    least as large in each, and its leading block equal to ``old`` (a cache rebuilt larger)."""
    if (
        new.dtype != old.dtype
        or new.device != old.device
        or new.ndim != old.ndim
        or any(n < o for n, o in zip(new.shape, old.shape))
    ):
        return False
    return torch.equal(new[tuple(slice(0, o) for o in old.shape)], old)


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors hold the same values (shape, dtype and device too)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _version(t: Tensor) -> int | None:
    """The version counter (``None`` for an inference tensor, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _ptr(t: Tensor) -> int | None:
    """Where the tensor's data starts (``None`` where there is no such address)."""
    try:
        return t.data_ptr()
    except RuntimeError:
        return None
