"""What every curvature operator checks around its products: that the model and the data are
still those of the build, and what the operator's own forward passes change.

:class:`ProductGuard` holds the checks as methods of the operator
(:class:`~curvlab.operators._base.CurvatureOperator` inherits them); the records they compare
with (:class:`~curvlab.operators._state.ModelState`, the data's versions and fingerprints, the
modes at build) are made by the operator's constructor.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import torch

from curvlab._kept_batches import fingerprint, same_fingerprint
from curvlab.operators._state import (
    ModelStateError,
    changed_error,
    first_pass_error,
    own_pass_error,
    relative_difference,
)
from curvlab.operators._structure import structure_error

__all__ = ["ProductGuard"]


class ProductGuard:
    """The checks of :class:`~curvlab.operators._base.CurvatureOperator` around a product.

    Reads the operator's records: ``_state`` (a :class:`~curvlab.operators._state.ModelState`),
    ``_data_versions`` (per batch, each tensor's version and fingerprint), ``_forwarded`` (batches
    whose first forward pass ran), ``_modes`` (train/eval per module at build), ``_refusal`` and
    ``_first_changes``; writes ``_structure_checked`` and ``_values_pending`` (the device flags of
    :meth:`~curvlab.operators._state.ModelState.values_moved`, read by :meth:`_check_values`),
    and ``_values_run`` / ``_values_products`` (:meth:`_values_checked_once`).
    """

    _values_pending: list[torch.Tensor]
    _values_run: str | None
    _values_products: int
    _refusal: str | None
    _first_changes: list[str]
    _structure_checked: bool
    _data_versions: list[list[list[Any]]]
    _forwarded: list[bool]

    def _check_versions(self) -> None:
        """Refuse products after what the operator's forward passes read changed: a parameter,
        selected or not (a ``params=`` subset's backbone, a frozen one: found in review, products
        silently at the old or the new parameters), or a buffer, changed in place (version
        counters), through a ``.data`` assignment (storage), or replaced by another tensor
        (``module.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``: products came
        out zero or at the old values) (:class:`~curvlab.operators._state.ModelState`). Likewise
        after the data's tensors, which the operator holds (not copies), changed in place
        (version counters): products of two or more batches changed silently (found in review:
        by 0.71 relative), one batch's raised autograd's in-place error. And after a parameter of
        the operator was frozen (``requires_grad_(False)``): products raised autograd's 'One of
        the differentiated Tensors does not require grad' (found in review).

        The weight of an ``nn.Embedding(max_norm=...)``, which every forward pass renormalises in
        place, may have moved with the same values (any forward pass of the model bumps its
        version): accepted, and graphs kept from before are built again (they may hold the old
        version).

        Where the product runs the model's forward pass again (a graph not kept, forward-mode
        ``J v``), also after the modules, their hooks or plain attributes changed
        (:class:`~curvlab.operators._structure.ModelStructure`: a ``Dropout``'s ``p``, a
        parameterless submodule replaced, a forward hook added gave products of the changed
        model, found in review). And after an earlier product was refused for good
        (:meth:`_refuse`).

        Values changed in place through ``.data`` (``p.data.add_(...)``: a hand-written SGD
        step, WGAN's ``p.data.clamp_``, an EMA or SAM step) move neither the version counter nor
        the storage: products with several batches or forward-mode ``J v`` ran at the new values,
        silently (found in review: 0.40 off). Here every tensor's
        :func:`~curvlab.operators._state.bit_sums` are compared with those recorded, on the
        device (``_values_pending``), and :meth:`_check_values` reads the result after the
        product's passes, when the product synchronises anyway."""
        if self._refusal is not None:
            raise ModelStateError(self._refusal)
        changes = self._state.changes()  # the selected parameters among them
        if changes.changed:
            raise changed_error(changes, self.names)
        if changes.rewritten:
            self._graphs = [None] * len(self._batches)
        frozen = [n for n, p in zip(self.names, self._params) if not p.requires_grad]
        if frozen:  # torch's 'One of the differentiated Tensors does not require grad' otherwise
            raise RuntimeError(
                "the parameters' requires_grad changed since this operator was built: "
                f"{frozen[:5]} no longer require grad (requires_grad_(False)), and the operator "
                "differentiates with respect to them; build a new operator with curvature_operator(...) for the "
                "parameters now trainable (or pass params= to choose them)"
            )
        for i, kept in enumerate(self._data_versions):
            for entry in kept:
                t, version, _ = entry
                if t._version == version:  # (a forward of curvlab's own re-records: below)
                    continue
                raise RuntimeError(
                    f"the tensors of batch {i} of the data changed in place since this operator "
                    "was built (the operator holds the tensors it was given, not copies): by "
                    "code of yours, or by the model's forward writing into its inputs (x /= 255; "
                    "make it out of place). Build a new operator for the new data, or give this "
                    "one copies (x.clone()) of data you mean to change"
                )
        self._structure_checked = any(g is None for g in self._graphs) or self._forward_passes()
        if self._structure_checked:
            self._check_structure()
        if self._values_run is None or not self._values_products:  # (a run: its first product)
            self._values_pending = self._state.values_moved()
        if self._values_run is not None:
            self._values_products += 1

    @contextmanager
    def _values_checked_once(self, caller: str) -> Iterator[None]:
        """Inside: the values of the parameters and buffers (changes through ``.data``) are
        compared before the first product and once at the end, not before every product.

        For a run of products in curvlab with no code of the user's between them (an estimator:
        Lanczos, Hutchinson, Hutch++, SLQ), entered where it starts (``caller``: its name, for
        the error). A fingerprint of every tensor's bits costs about 2% of a Hessian product on
        GPT-2 small on a CPU (found in review s19: 25-45% before the fingerprint's word path);
        one per product added that to every product of a run. A model whose own forward pass
        changes values through ``.data`` (refused at its second product outside a run) is
        refused at the end: the run's result is dropped, and this operator refuses every later
        product. A run of one product compares once, before it (as outside a run). Nested runs
        check in the outermost one; a run that raises checks nothing more.
        Products outside such a run (``op @ v`` by the user) are compared one by one.
        """
        if self._values_run is not None:
            yield
            return
        self._values_run, self._values_products = caller, 0
        try:
            yield
        finally:
            ran, self._values_run, self._values_products = self._values_products, None, 0
        # products after the first ran unchecked (a single product was checked before it)
        if ran > 1 and any(bool(flag) for flag in self._state.values_moved()):
            changes = self._state.values_changed()
            self._refuse(changed_error(changes, self.names, True, during=caller))

    def _check_values(self) -> None:
        """After a product's passes: refuse it, and every later product, if the values of a
        parameter or buffer had changed before it without moving a version counter or storage
        (through ``.data``; the flags :meth:`_check_versions` computed on the device).

        Read here rather than before the passes: one host synchronisation where the product
        waits for its passes anyway (its finiteness check), none before every product. The
        product ran at the changed values and is dropped; the refusal is for good, as with the
        other changes (the version counters never come back), also for a graph kept at
        construction (one batch), whose saved tensors share the parameters' storage: the
        operator is no longer the matrix it was built as."""
        pending, self._values_pending = self._values_pending, []
        if any(bool(flag) for flag in pending):
            self._refuse(changed_error(self._state.values_changed(), self.names, True))

    def _check_structure(self) -> None:
        """Refuse a product that would run the model's forward pass after its modules, hooks or
        plain attributes changed since the build."""
        changes = self._state.structure.changes()
        if changes:
            raise structure_error(changes, self._forward_passes())

    def _refuse(self, error: ModelStateError) -> NoReturn:
        """Raise ``error``, and the same for every later product (the model changes itself at
        its passes: the operator is no fixed matrix, and a retry must not look like a fix)."""
        self._refusal = str(error)
        raise error

    def _check_own_passes(self, first: bool, ran: bool) -> bool:
        """After a product: what its own forward passes changed in the model. The weights of
        ``Embedding(max_norm=...)`` layers come back with the same values (recorded again), and
        the plain attributes they change are the model's own state. Buffers changed by the
        first passes over some batches (``first``) are recorded, and the product runs again
        (returns ``True``: :meth:`_check_second_run`); anything else a forward pass writes gives
        every product another matrix: refused, for good
        (:func:`~curvlab.operators._state.own_pass_error`).

        Args:
            first: whether the product ran the first forward passes over some batches.
            ran: whether it ran forward passes at all.
        """
        changes = self._state.changes()
        if ran:
            self._state.structure.after_own_passes()
        if not changes.changed:
            return False
        if first and not changes.parameters:
            self._state.rewrites_too(changes.changed)  # a same-value rewrite is then accepted
            self._state.record()
            self._first_changes = changes.changed
            return True
        self._state.record()
        self._refuse(own_pass_error(changes.changed, self._forward_passes()))

    def _check_second_run(self, acc: Any, again: Any, ran: bool) -> None:
        """After the second run of a product whose first forward passes changed buffers: accept
        when the second run changed nothing and gives the same product, else refuse for good."""
        changes = self._state.changes()
        if ran:
            self._state.structure.after_own_passes()
        if changes.changed:
            self._state.record()
            self._refuse(own_pass_error(changes.changed, self._forward_passes()))
        relative = relative_difference(acc, again)
        if relative > (1e-10 if self.dtype == torch.float64 else 1e-4):
            self._refuse(first_pass_error(self._first_changes, relative))

    def _modes_as_built(self) -> None:
        """Switch every module to the train/eval mode it was in when the operator was built
        (inside :func:`~curvlab._notrace.leave_no_trace`, which puts the caller's modes back):
        the forward passes of products compute the matrix the operator was built as."""
        for (_, m), training in zip(self._scan.modules, self._modes):
            if m.training != training:
                m.training = training

    def _refresh_data(self, i: int) -> None:
        """Record batch ``i``'s tensors as they are after a forward pass of the model: a forward
        that writes into its own inputs with the same values at every pass (``ReLU(inplace=True)``
        as the first layer) is the model's, not a change of the data between products (found in
        review: such models were refused from the second product on). Its first pass may change
        them (that pass computed with the data as given); a later pass that changes them again
        (``x /= 255`` in the forward) would give every product other data: refused."""
        for entry in self._data_versions[i]:
            t = entry[0]
            if t._version == entry[1]:
                continue
            now = fingerprint(t)
            if self._forwarded[i] and not same_fingerprint(now, entry[2]):
                raise RuntimeError(
                    f"the model's forward pass changes the tensors of batch {i} of the data in "
                    "place at every pass (x /= 255; x.mul_(...)): each product would see other "
                    "data. Make that operation out of place in the model's forward"
                )
            entry[1], entry[2] = t._version, now
        self._forwarded[i] = True
