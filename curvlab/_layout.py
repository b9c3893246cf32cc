"""Whether a layer holds the examples in its first dimension: the probe on fewer examples.

Per-example rules (a layer's input and output gradient read row by row, K-FAC's factors) need
each call of a layer to hold example ``n`` at index ``n`` of the first dimension of its input and
output. Shapes alone cannot always tell: a sequence-first layer (``nn.TransformerEncoderLayer``
with ``batch_first=False`` sees ``(T, N, d)``) or a layer run once on position features ``(T, p)``
whose output is broadcast over the batch has leading size ``T``, which may equal ``N``. A second
forward pass on fewer examples settles it (:func:`probe_size`: two, or one for a batch of two): a
batch-major call then has that leading size, the others keep theirs (:func:`misplaced`). K-FAC,
the noise captures and the BackPACK backend (whose rules read every hooked layer's first dimension
as the examples) decide with these functions; :mod:`curvlab.backends._hook_session` does the same
for its taps.

The probe runs without gradient, on the module inside DDP and ``torch.compile`` wrappers, with the
global RNG put back (a Dropout mask drawn in it changes nothing later).

The same idea, on values, tells whether a model keeps the examples apart at all
(:class:`ExamplesApart`, :func:`check_examples_apart`): the outputs of two examples run without
the others must be their rows of the batch pass, up to rounding, or per-example quantities are
undefined (feature centering over the batch, in-batch contrastive logits; found in review: each
backend answered with another wrong number). The one-pass quantities check it once per call
signature before any per-example work (:func:`curvlab.quantities._sweep.examples_apart`), K-FAC
against its own pass. A coupling found on a batch that evidently has no batch axis (one sequence
of a ``DataLoader(batch_size=None)`` through an attention layer) names that axis first
(:class:`LikelyUnbatched`, :func:`loader_unbatched`, :func:`unbatched_message`); one found in a
sequence-first layer that reads the batch's first axis as time names the time-major layout first
(:class:`LikelyTimeMajor`), and an output that keeps the batch's leading size on fewer examples
is refused as one whose first axis is not the examples' (:mod:`curvlab._time_major`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._data import (
    _GIVE_BATCH_AXIS,
    _NO_BATCH_AXIS,
    Inputs,
    check_inputs_fit,
    dtype_errors_named,
    fresh_inputs,
    num_examples,
    raise_if_part_failed,
    resource_error,
    slice_inputs,
)
from curvlab._notrace import buffers_kept, tensor_hooks_off
from curvlab._rng import forward_draws, global_rng_kept
from curvlab._scan import model_device
from curvlab._time_major import not_following_message, time_major_call, time_major_message

__all__ = [
    "COUPLING_HINT",
    "COUPLING_TOLERANCE",
    "COUPLING_TOLERANCE_16",
    "ExamplesApart",
    "LikelyTimeMajor",
    "LikelyUnbatched",
    "MixedExamplesError",
    "call_input",
    "MISPLACED_HINT",
    "check_examples_apart",
    "coupling_message",
    "examples_mixed",
    "finding_error",
    "loader_unbatched",
    "unbatched_message",
    "Sizes",
    "first_tensor",
    "leading",
    "misplaced",
    "pick_examples",
    "probe_one_example",
    "probe_rows",
    "probe_size",
    "recording",
]

Sizes = dict[str, list[tuple[int, int]]]
"""Per layer name, per call: the leading sizes of its input and of its output."""


def leading(t: Any) -> int:
    """The first dimension's size of a tensor (``-1`` for a scalar or a non-tensor)."""
    return int(t.shape[0]) if isinstance(t, Tensor) and t.ndim else -1


def call_input(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """A layer call's input, for forward hooks registered ``with_kwargs=True``: the first
    positional argument, else the keyword argument named like the first parameter of the
    layer's ``forward`` (``input`` for Linear/Conv, ``x`` for HuggingFace ``Conv1D``: a layer
    called as ``layer(input=x)`` has no positional argument); ``None`` when there is neither."""
    if args:
        return args[0]
    if not kwargs:
        return None
    name = _first_parameter(getattr(type(module), "forward", None))
    return kwargs.get(name) if name is not None else None


@functools.lru_cache(maxsize=256)
def _first_parameter(forward: Callable[..., Any] | None) -> str | None:
    """The name of the first parameter after ``self`` of a ``forward`` function that can be
    passed by keyword (``None`` for ``forward(self, *args)`` or no signature to read)."""
    if forward is None:
        return None
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):  # a builtin: no signature
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return params[0].name if params and params[0].kind in keyword else None


@contextmanager
def recording(modules: dict[str, nn.Module]) -> Iterator[Sizes]:
    """Record, while the block runs, the leading sizes of every call of each of ``modules``.

    Yields:
        layer name -> one ``(input, output)`` pair of leading sizes per call, appended as the
        calls happen (clear the lists to start a new forward pass); the hooks go with the block.
    """
    sizes: Sizes = {name: [] for name in modules}
    handles = []

    def hook(name: str):  # noqa: ANN202
        def fn(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            sizes[name].append((leading(call_input(module, args, kwargs)), leading(output)))

        return fn

    try:
        for name, module in modules.items():
            # with the keywords: a layer called as layer(input=x) (found in review)
            handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
        yield sizes
    finally:
        for h in handles:
            h.remove()


def probe_size(n: int) -> int:
    """How many examples the probe runs on for a batch of ``n > 1``: fewer than ``n`` (so a
    batch-major call's leading size differs from ``n``), two where that is possible (a
    train-mode BatchNorm refuses a batch of one)."""
    return 2 if n > 2 else 1


def probe_rows(n: int) -> list[int]:
    """The examples a layout probe runs on for a batch of ``n > 1``: the first and the last
    (:func:`probe_size` of them; the first alone for a batch of two). The hooks backend's probe
    and the first pass of :class:`ExamplesApart` (which serves as that probe on a first call)
    take the same rows, so a layout never depends on which of them ran."""
    return [0, n - 1] if n > 2 else [0]


def pick_examples(inputs: Inputs, rows: list[int]) -> Inputs:
    """Examples ``rows`` of ``inputs``: every tensor whose leading size is the batch's picked,
    any other value as it is."""
    return _picked(inputs, rows)


def probe_one_example(
    model: nn.Module,
    inputs: Inputs,
    modules: dict[str, nn.Module],
    m: int = 1,
    call: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    autocast: tuple[str, torch.dtype] | None = None,
) -> tuple[Sizes, int]:
    """The leading sizes each of ``modules``' calls has in ``model`` run on the first ``m``
    examples, and that of the model's output (its ``.logits``, or the first tensor of a tuple).

    ``call``: the step's own ``(args, kwargs)`` of the model call, replayed with every tensor
    whose leading size is the batch's cut to its first ``m`` entries (a mask passed beside the
    inputs); else ``inputs`` alone. ``autocast``: ``(device_type, dtype)`` of the autocast region
    the step's forward ran in, entered again for the probe. ``model`` should be the plain module
    (no DDP wrapper: its forward may communicate). Every buffer (BatchNorm statistics, a running
    normaliser's counts) and the global RNG are left as they were.
    """
    n = num_examples(inputs)
    if call is not None:
        args, kwargs = call

        def cut(v: Any) -> Any:
            return v[:m] if isinstance(v, Tensor) and v.ndim and v.shape[0] == n else v

        args = tuple(cut(a) for a in args)
        kwargs = {k: cut(v) for k, v in kwargs.items()}
    else:
        part = slice_inputs(inputs, 0, m)
        check_inputs_fit(model, part)  # a clear error for inputs of another dtype or device
        args, kwargs = ((), dict(part)) if isinstance(part, Mapping) else ((part,), {})
    args, kwargs = fresh_call(args, kwargs)  # the model may write into them (review s22)
    with (
        recording(modules) as sizes,
        torch.no_grad(),
        tensor_hooks_off(),
        global_rng_kept(model_device(model)),
        buffers_kept(model),
        torch.autocast(autocast[0], dtype=autocast[1]) if autocast else nullcontext(),
        dtype_errors_named(model, inputs) if call is None else nullcontext(),
    ):
        output = model(*args, **kwargs)
    return sizes, leading(first_tensor(output))


def fresh_call(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A model call's ``(args, kwargs)`` with each tensor copied
    (:func:`~curvlab._data.fresh_inputs`), other values as they are.

    The probes here run the model on the caller's tensors (or the user's step's own, in a
    capture) beside curvlab's other passes: a forward that writes into its input
    (``x.div_(2)``, a first ``nn.SiLU(inplace=True)``) rewrote the caller's data at each
    probe, and the later passes measured other inputs (found in review s22: the examples-apart
    probe's full pass halved the batch a ``diag_fisher`` then measured).
    """
    fresh = tuple(fresh_inputs(a) if isinstance(a, Tensor) else a for a in args)
    return fresh, dict(fresh_inputs(kwargs)) if kwargs else {}


def first_tensor(output: Any) -> Any:
    """The model's output as the captures read it: a Tensor, its ``.logits``, or the first Tensor
    of a tuple or list."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)):
        return next((t for t in output if isinstance(t, Tensor)), None)
    return None


def misplaced(full: Sizes, n: int, small: Sizes | None, m: int = 1) -> dict[str, str]:
    """The layers some call of which does not hold the ``n`` examples in its first dimension.

    Args:
        full: leading sizes of every call on the batch of ``n`` examples.
        n: the batch's number of examples.
        small: :func:`probe_one_example`'s sizes on ``m < n`` examples (needed when ``n > 1``:
            leading size ``n`` may be a coincidence), or ``None`` when ``n == 1`` (then a leading
            size of 1 is right either way: the sum over one example's positions is that
            example's).
        m: the probe's number of examples.

    Returns:
        layer name -> why, for the misplaced layers only.
    """
    bad = {}
    for name, calls in full.items():
        few = small.get(name, []) if small is not None else None
        for a, o in calls:
            if (a, o) != (n, n):
                bad[name] = f"leading sizes {a} (input) and {o} (output) for {n} examples"
                break
        else:
            if few is not None and (len(few) != len(calls) or any(s != (m, m) for s in few)):
                got = ", ".join(f"{a} and {o}" for a, o in few) or "no call"
                bad[name] = (
                    f"leading sizes {n} for {n} examples but {got} for {m} (input and output)"
                )
    return bad


MISPLACED_HINT = (
    "it does not hold the examples in its first dimension (a sequence-first layer such as "
    "nn.TransformerEncoderLayer without batch_first=True, inputs reshaped to (N*T, d) before the "
    "layer, or a layer run on features shared by all examples and broadcast over the batch)"
)
"""What a misplaced layer usually is, for error messages."""


# ---------------------------------------------------------------------------- examples apart
COUPLING_TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-2}
"""Largest relative difference (the largest absolute difference over the largest magnitude of the
batch pass's rows) between an example's output computed with the others and without them that
counts as rounding, by the output's dtype; 16-bit outputs: :data:`COUPLING_TOLERANCE_16`.
Batched kernels round differently for another batch size (float32 convolutions on TF32, say),
but an output that depends on the other examples (a mean over the batch, in-batch logits) moves
by a fraction of its size. float32 allows 2e-2: an eval-mode BatchNorm after a layer on inputs
far from 0 (longitudes of -122.42 +- 0.005) amplified the batch-size rounding to 6.2e-3 (found in
review, refused at 5e-3); a coupling weaker than that passes unseen."""

COUPLING_TOLERANCE_16 = 5e-2
""":data:`COUPLING_TOLERANCE` for float16 and bfloat16 outputs (eight or eleven bits)."""

COUPLING_HINT = (
    "Per-example quantities (gradient statistics, the Fisher diagonals and norms, K-FAC) need "
    "each example's loss to depend on that example alone, as for BatchNorm in train mode. Compute "
    "the features without statistics over the batch (running or fixed statistics, LayerNorm/"
    "GroupNorm), or measure the whole batch's loss with the matrix-free operators "
    "(cl.curvature_operator, cl.trace, cl.diag_hessian), which do not split it into examples"
)
"""The way out, for the coupling error."""


def _pick(v: Any, rows: list[int], n: int) -> Any:
    """Rows ``rows`` of ``v`` when it is a tensor whose leading size is the batch's ``n``; any
    other value (a mapping's shared entry, a flag) as it is."""
    if isinstance(v, Tensor) and v.ndim and v.shape[0] == n:
        return v.index_select(0, torch.tensor(rows, device=v.device))
    return v


def _picked(inputs: Inputs, rows: list[int]) -> Inputs:
    """Examples ``rows`` of ``inputs`` (:func:`_pick` on each tensor)."""
    n = num_examples(inputs)
    if isinstance(inputs, Tensor):
        return _pick(inputs, rows, n)
    return {k: _pick(v, rows, n) for k, v in inputs.items()}


_GROWS = "grows with the number of examples"


def _tolerance(dtype: torch.dtype) -> float:
    return COUPLING_TOLERANCE.get(dtype, COUPLING_TOLERANCE_16)


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)


class ExamplesApart:
    """Whether a model computes each example's output from that example alone.

    Per-example gradients, and every quantity built from them, are defined when example ``n``'s
    loss depends on example ``n`` alone. A forward that mixes the examples outside BatchNorm
    (feature centering ``z - z.mean(0)``, in-batch contrastive logits ``f(x) @ g(x').T``) makes
    them undefined, and each backend would give another wrong number. The check runs the model
    on two examples, the first and the last (a cumulative sum over the batch agrees on the
    first examples), then on the second and the last but one (the middle one alone of three: a
    coupling to the first or the last example, ``h + h[-1:]``, or a branch on the whole batch
    that one of them triggers, agrees on the first pair); each alone for a batch of two. It compares their outputs with their rows in the
    batch pass (:meth:`check`): a value off by more than rounding
    (:data:`COUPLING_TOLERANCE`), or an output dimension that grows with the number of
    examples, is a coupling, and a second pair of passes with hooks on every module then names
    where it happens. An output that keeps the batch's leading size on the picked examples
    alone does not hold the examples first (a time-major batch): refused as such
    (:class:`NotSplittable`). Skipped (nothing can be compared) for a single example, an output
    whose leading size is not the number of examples, and a forward that draws random numbers
    (the global RNG moves, e.g. train-mode Dropout, or two runs on the same examples differ).

    The passes run without gradient, with the global RNG and every buffer put back (the caller
    runs them inside its own :func:`~curvlab._notrace.leave_no_trace`).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        modules: dict[str, nn.Module] | None = None,
        call: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
        autocast: tuple[str, torch.dtype] | None = None,
        first_pass: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        """Run the model on the picked examples alone.

        Args:
            model: the plain module (no DDP wrapper).
            inputs: the batch.
            modules: layers whose leading sizes the first pass records in :attr:`sizes`, as
                :func:`probe_one_example` on :func:`probe_size` examples would (one pass serves
                both; its errors are raised, as the probe's are).
            call, autocast: as for :func:`probe_one_example` (a capture of the user's own
                pass: its ``(args, kwargs)``, every tensor whose leading size is the batch's
                picked alike, and its autocast region).
            first_pass: a context entered around the first pass alone (on the examples of
                :func:`probe_rows`), for a caller that records something in it (the hooks
                backend's leading sizes: the pass serves its layout probe too).
        """
        self.model = model
        self.inputs = inputs
        self.call = call
        self.autocast = autocast
        self.n = num_examples(inputs)
        self.device = model_device(model)
        n = self.n
        # the first and the last example together (a cumulative sum over the batch agrees on
        # the first examples), then the second and the last but one (the middle one alone for
        # three): a coupling to the first or the last example, or a branch on the whole batch
        # that one of them triggers, agrees on the first pair (found in review: h + h[-1:]
        # passed, and a batch-level branch on the last example gave the batch's rows 3.6x off).
        # Pairs, not single examples, where there are enough: a kernel's rounding for one row
        # differs more (an eval BatchNorm amplified it to 2e-2 for one float32 example)
        inner = [1, n - 2] if n > 3 else [1]
        self.picks: list[list[int]] = (
            [probe_rows(n), inner] if n > 2 else [[0], [1]] if n == 2 else []
        )
        self.alone: list[Tensor] = []
        self.failed: Exception | None = None  # the model's error on some examples alone
        self.sizes: Sizes | None = None
        self._raised = False  # whether the last pass raised (else it drew random numbers)
        kept: list[list[int]] = []
        for i, rows in enumerate(self.picks):
            # the inner examples are an extra: a model that runs on the first pair but not on
            # them (a squeeze() of the batch axis of the middle one of three) is compared on the
            # first pair, as before
            extra = i > 0 and n > 2
            if i == 0 and modules is not None:
                with recording(modules) as self.sizes:
                    out = self._run(rows, strict=True)
            elif i == 0 and first_pass is not None:
                with first_pass():
                    out = self._run(rows)
            else:
                out = self._run(rows, extra=extra)
            if out is None and extra and self._raised:
                continue
            if out is None:  # a random forward: no comparison tells coupling from noise
                kept, self.alone = [], []
                break
            kept.append(rows)
            self.alone.append(out)
        self.picks = kept

    def _arguments(self, rows: list[int] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The model call's ``(args, kwargs)`` for examples ``rows`` (``None``: all)."""
        if self.call is not None:
            args, kwargs = self.call
            if rows is None:
                return args, kwargs
            n = self.n
            return tuple(_pick(a, rows, n) for a in args), {
                k: _pick(v, rows, n) for k, v in kwargs.items()
            }
        part = self.inputs if rows is None else _picked(self.inputs, rows)
        return ((), dict(part)) if isinstance(part, Mapping) else ((part,), {})

    def _run(
        self, rows: list[int] | None, strict: bool = False, extra: bool = False
    ) -> Tensor | None:
        """The model's output on examples ``rows`` (``None``: all), or ``None`` if the forward
        drew from the global RNG or, unless ``strict``, raised (recorded in :attr:`failed`
        unless ``extra``)."""
        self._raised = False
        # on copies: a forward that writes into its input would change the caller's data and
        # the later passes' (review s22: x.div_(2) in forward; fresh_call)
        args, kwargs = fresh_call(*self._arguments(rows))
        if strict and self.call is None:  # a clear error for inputs of another dtype or device
            check_inputs_fit(self.model, _picked(self.inputs, rows or [0]))
        autocast = self.autocast
        with (
            torch.no_grad(),
            tensor_hooks_off(),
            global_rng_kept(self.device),
            # the buffers a forward pass updates (norm statistics) kept; others as any pass
            # of curvlab's leaves them (a frozen base kept as a buffer is not copied, and a
            # buffer with state beside an attribute stays consistent with it)
            buffers_kept(self.model, every=False),
            torch.autocast(autocast[0], dtype=autocast[1]) if autocast else nullcontext(),
            # a forward drawing from Python's or numpy's RNG (a LayerDrop) draws too (review
            # s25: it was taken for a model that mixes the examples); and from a generator a
            # module holds (self.rng = np.random.RandomState(seed)), put back after (review
            # s26: two runs' ±1 signs agreed on a pair, read as mixing)
            forward_draws(self.device, self.model.modules(), put_back=True) as drawn,
        ):
            try:
                with (
                    dtype_errors_named(self.model, self.inputs)
                    if self.call is None
                    else nullcontext()
                ):
                    out = first_tensor(self.model(*args, **kwargs))
            except Exception as e:  # a forward that needs the whole batch: the passes tell
                # an out-of-memory error is no answer about the examples: passed on as it
                # is (review s26: taken for a failed forward, it switched the check off,
                # and a model mixing its examples was measured: a gradient mean 0.0457
                # for 0.2158)
                if strict or resource_error(e):
                    raise
                self._raised = True
                if rows is not None and self.failed is None and not extra:
                    self.failed = e
                return None
        return None if drawn() or not isinstance(out, Tensor) else out.detach()

    def full_output(self) -> Tensor | None:
        """The model's output on all the examples (for a caller without a pass of its own)."""
        return self._run(None) if self.picks else None

    def check(self, full: Any) -> str | None:
        """Why the model mixes the examples, or ``None`` (also when it cannot tell); a
        :class:`LikelyUnbatched` when a layer of the batch pass took an unbatched input holding
        the "examples" (the batch most likely has no batch axis).

        Args:
            full: the model's output on all the examples (a Tensor, an object with ``.logits``
                or a tuple), computed as the caller's passes compute it.
        """
        full = first_tensor(full)
        if not isinstance(full, Tensor):
            return None
        full = full.detach()
        for rows, alone in zip(self.picks, self.alone):
            if _stays(full, alone, self.n, len(rows)):
                return self._not_following(rows, alone)
            why = _rows_differ(full, rows, alone, self.n)
            if why is None:
                continue
            if _GROWS in why and len(rows) > 1:  # confirmed by one example alone: a padding
                # trimmed to the longest sequence gives that sequence's length, not 1 (found in
                # review: sequences trimmed to length 2 of a batch of 2 read as a growing axis)
                one = self._run(rows[:1])
                if one is None or _rows_differ(full, rows[:1], one, self.n) is None:
                    continue
            again = self._run(rows)  # a generator of the model's own?
            if again is None or _differ(alone, again, len(rows), rows) is not None:
                return None
            where, mixer, full_pass = self._culprit(rows)
            why = f"{where}; {why}" if where else why
            if full_pass.unbatched:
                return LikelyUnbatched(why, full_pass.unbatched)
            time_major = full_pass.time_major.get(mixer, "")
            return LikelyTimeMajor(why, time_major) if time_major else why
        return None

    def _not_following(self, rows: list[int], alone: Tensor) -> NotSplittable:
        """The finding for an output that keeps the batch's leading size on examples ``rows``
        alone: its first axis is not the examples' (a time-major input to a sequence-first
        model whose output pools over time, ``T == B``; found in review s25: the per-example
        passes fed the model one time step of every sequence and the loss reported that slice's
        shapes as the user's). A sequence-first layer reading the first axis as time is named."""
        names = {id(m): name or "<root>" for name, m in self.model.named_modules()}
        full = _Recorder(self.model, names, rows, self.n)
        with full:
            self._run(None)
        evidence = next(iter(full.time_major.values()), "")
        message = not_following_message(self.n, len(rows), tuple(alone.shape), evidence)
        return NotSplittable.of(ValueError(message))

    def _culprit(self, rows: list[int]) -> tuple[str, str, _Recorder]:
        """Where the examples first mix: the first module whose input or output on ``rows``
        alone differs from those rows in the batch pass (in the order the calls happen), the
        name of the module that mixes them (``""``: none found), and the batch pass's
        recording, whose evidence of a batch without a batch axis (a module called on an
        unbatched input holding the examples, :func:`_unbatched_call`) or of a time-major batch
        (a sequence-first layer reading the examples as time, :func:`time_major_call`) the
        caller reads."""
        names = {id(m): name or "<root>" for name, m in self.model.named_modules()}
        full = _Recorder(self.model, names, rows, self.n)
        with full:
            self._run(None)
        where, mixer = self._where(full, names, rows)
        return where, mixer, full

    def _where(self, full: _Recorder, names: dict[int, str], rows: list[int]) -> tuple[str, str]:
        """:meth:`_culprit`'s text and module that mixes the examples, from the batch pass's
        recording ``full`` (``("", "")`` when no module's input or output differs)."""
        small = _Recorder(self.model, names, list(range(len(rows))), len(rows))
        with small:
            self._run(rows)
        for key, value in full.seen.items():
            other = small.seen.get(key)
            if other is None:
                continue
            if _differ(value, other, self.n, rows) is None:
                continue
            kind, name, _ = key
            module = dict(self.model.named_modules()).get(name if name != "<root>" else "")
            kind_of = type(module).__name__ if module is not None else "?"
            what = f"'{name}' ({kind_of})"
            if kind == "output":
                if name == "<root>":
                    return (
                        f"the forward of the model ({kind_of}) mixes them after "
                        "its submodules (their outputs agree, the model's does not)"
                    ), name
                return f"module {what} mixes them (its output differs, its input agrees)", name
            parent = full.parents[key]
            return (
                f"the forward of '{parent[0]}' ({parent[1]}) mixes them before it calls module "
                f"{what}, whose input already differs"
            ), parent[0]
        return "", ""


class _Recorder:
    """Hooks on every module recording its input's and output's rows ``rows`` (by
    ``(kind, module name, call)``, in the order the calls happen), for :meth:`ExamplesApart.
    _culprit`; tensors whose leading size is not ``n`` are left out."""

    def __init__(self, model: nn.Module, names: dict[int, str], rows: list[int], n: int) -> None:
        self.model, self.names, self.rows, self.n = model, names, rows, n
        self.seen: dict[tuple[str, str, int], Tensor] = {}
        self.parents: dict[tuple[str, str, int], tuple[str, str]] = {}
        self.calls: dict[tuple[str, str], int] = {}
        self.stack: list[nn.Module] = []
        self.handles: list[Any] = []
        self.unbatched = ""  # the first call on an unbatched input holding the examples
        # per module name: its first call reading the examples as time (time_major_call)
        self.time_major: dict[str, str] = {}

    def _keep(self, kind: str, module: nn.Module, t: Any) -> None:
        name = self.names.get(id(module), "?")
        call = self.calls.get((kind, name), 0)
        self.calls[(kind, name)] = call + 1
        if isinstance(t, Tensor) and t.ndim and t.shape[0] == self.n:
            key = (kind, name, call)
            index = torch.tensor(self.rows, device=t.device)
            self.seen[key] = t.detach().index_select(0, index)
            up = self.stack[-2] if len(self.stack) > 1 else module
            self.parents[key] = (self.names.get(id(up), "?"), type(up).__name__)

    def __enter__(self) -> _Recorder:
        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.stack.append(module)
            first = _first_input(args, kwargs)
            name = self.names.get(id(module), "?")
            if not self.unbatched:
                self.unbatched = _unbatched_call(module, name, first, self.n)
            if name not in self.time_major:  # its own input (a packed sequence is none)
                evidence = time_major_call(module, name, call_input(module, args, kwargs), self.n)
                if evidence:
                    self.time_major[name] = evidence
            self._keep("input", module, first)

        def post(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self.stack and self.stack[-1] is module:
                self.stack.pop()
            self._keep("output", module, first_tensor(output))

        for m in self.model.modules():
            self.handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            self.handles.append(m.register_forward_hook(post, always_call=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


_UNBATCHED_NDIM: tuple[tuple[tuple[type[nn.Module], ...], int], ...] = (
    (
        (
            nn.MultiheadAttention,
            nn.RNNBase,
            nn.Transformer,
            nn.TransformerEncoder,
            nn.TransformerDecoder,
            nn.TransformerEncoderLayer,
            nn.TransformerDecoderLayer,
            nn.Conv1d,
            nn.ConvTranspose1d,
        ),
        2,
    ),
    ((nn.Conv2d, nn.ConvTranspose2d), 3),
    ((nn.Conv3d, nn.ConvTranspose3d), 4),
)
"""Layers that take an unbatched input (one sequence ``(T, d)``, one image ``(C, H, W)``), by
the number of dimensions of that input (a batched one has one more)."""


def _unbatched_call(module: nn.Module, name: str, first: Any, n: int) -> str:
    """Evidence that the batch has no batch axis: ``module`` (named ``name``) called on an
    unbatched input (:data:`_UNBATCHED_NDIM`) whose first axis holds the batch's ``n``
    "examples", as one sequence's ``(T, d)`` does in an attention layer; ``""`` otherwise."""
    if not isinstance(first, Tensor) or not first.ndim or first.shape[0] != n:
        return ""
    for kinds, ndim in _UNBATCHED_NDIM:
        if isinstance(module, kinds) and first.ndim == ndim:
            return (
                f"module '{name}' ({type(module).__name__}) was called on an unbatched input of "
                f"shape {tuple(first.shape)} (a batched one has {ndim + 1} dimensions): "
                f"{_NO_BATCH_AXIS}"
            )
    return ""


def loader_unbatched(data: Any) -> str:
    """Evidence that ``data``'s batches have no batch axis: a ``DataLoader`` with
    ``batch_size=None`` and no ``batch_sampler`` (automatic batching off) yields its dataset's
    samples one at a time, as they are; ``""`` for any other data."""
    from torch.utils.data import DataLoader

    if isinstance(data, DataLoader) and data.batch_size is None and data.batch_sampler is None:
        return (
            "data is a DataLoader with batch_size=None, which yields the dataset's samples one "
            "at a time as they are, so each batch is a single example (a TensorDataset's sample "
            "has no batch axis)"
        )
    return ""


def _rows_differ(full: Tensor, rows: list[int], alone: Tensor, n: int) -> str | None:
    """How the batch pass's rows ``rows`` of ``full`` (``n`` examples) differ from ``alone``
    (the same examples run without the others), or ``None`` if they agree up to rounding or
    cannot be compared (another leading size: not the examples)."""
    if full.ndim == 0 or alone.ndim == 0 or full.shape[0] != n or alone.shape[0] != len(rows):
        return None
    index = torch.tensor(rows, device=full.device)
    return _differ(full.index_select(0, index), alone, n, rows)


def _stays(full: Tensor, alone: Tensor, n: int, k: int) -> bool:
    """Whether the output keeps the batch pass's leading size ``n`` on ``k < n`` examples
    alone (``full``: the batch pass's, ``alone``: theirs): its first axis is not the examples'."""
    return bool(full.ndim and alone.ndim and k < n and full.shape[0] == n == alone.shape[0])


def _differ(mine: Tensor, alone: Tensor, n: int, rows: list[int]) -> str | None:
    """How ``mine`` (examples ``rows``' rows of a pass on ``n`` examples) differs from
    ``alone`` (the same examples run without the others), or ``None``."""
    k = len(rows)
    if alone.ndim == 0 or alone.shape[0] != k or mine.shape[0] != k:
        return None
    if tuple(mine.shape) != tuple(alone.shape):
        if mine.ndim == alone.ndim:
            grows = [d for d in range(1, mine.ndim) if mine.shape[d] == n and alone.shape[d] == k]
            if grows and n != k:
                return (
                    f"its output has {n} entries along dimension {grows[0]} for {n} examples "
                    f"but {k} for {k} (shape {(n, *mine.shape[1:])} against "
                    f"{tuple(alone.shape)}): that dimension "
                    f"{_GROWS}, as in-batch contrastive logits do (one column per example of the "
                    "batch)"
                )
        return None  # another size for another reason: nothing to compare
    # in the outputs' dtype (float32 at least): the tolerances are far above its rounding, and a
    # vocabulary's logits in float64 cost GPT-2 0.13 s per check
    dtype = torch.promote_types(torch.promote_types(mine.dtype, alone.dtype), torch.float32)
    a, b = mine.to(dtype), alone.to(mine.device, dtype)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return None  # non-finite outputs are refused elsewhere, with their culprit
    scale = float(a.abs().max()) if a.numel() else 0.0
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    tol = _tolerance(mine.dtype)
    if diff <= tol * scale:
        return None
    rel = diff / scale if scale > 0 else float("inf")
    which = " and ".join(str(r) for r in rows)
    return (
        f"the output of example{'s' if k > 1 else ''} {which} computed without the other "
        f"{n - k} differs from {'their rows' if k > 1 else 'its row'} in the batch pass by "
        f"{rel:.2g} (relative; rounding allows {tol:.0e})"
    )


def examples_mixed(
    model: nn.Module,
    inputs: Inputs,
    full: Any = None,
    first_pass: Callable[[], AbstractContextManager[Any]] | None = None,
) -> str | None:
    """Why ``model`` mixes the examples of ``inputs`` (:class:`ExamplesApart`), or ``None``; a
    :class:`NotSplittable` when it fails on some of them though it runs on the batch.

    Args:
        model: the plain module (no DDP wrapper), inside the caller's ``leave_no_trace``.
        inputs: a batch (its first chunk).
        full: the model's output on ``inputs`` from the caller's own pass (``None``: a pass
            without gradient here).
        first_pass: as for :class:`ExamplesApart`.
    """
    probe = ExamplesApart(model, inputs, first_pass=first_pass)
    if probe.failed is not None:  # runs on the batch, not on some of its examples: most likely
        # a batch without a batch axis (DataLoader(batch_size=None)), said before any pass, on
        # every rank alike (raise_if_mixed gathers it as it gathers a coupling)
        part = slice_inputs(inputs, 0, probe_size(num_examples(inputs)))
        try:
            raise_if_part_failed(model, inputs, part, probe.failed)
        except ValueError as exc:
            return NotSplittable.of(exc)
    if not probe.picks:
        return None
    return probe.check(probe.full_output() if full is None else full)


class NotSplittable(str):
    """A finding of :func:`examples_mixed` that is not a coupling: the model runs on the batch
    but fails on some of its examples (a batch without a batch axis), or its output keeps the
    batch's leading size on some of them alone (a time-major batch, :meth:`ExamplesApart.
    _not_following`); the string is the error, ``error`` the exception itself on the rank that
    found it."""

    error: ValueError | None = None

    @classmethod
    def of(cls, error: ValueError) -> NotSplittable:
        """The finding for ``error`` (:func:`curvlab._data.part_failed`), raised as it is on
        this rank (chained to the model's error)."""
        found = cls(str(error))
        found.error = error
        return found


class LikelyUnbatched(str):
    """A coupling found by :meth:`ExamplesApart.check` (the string, as for a plain one) with
    evidence that the batch has no batch axis (``evidence``: a layer called on an unbatched
    input holding the "examples", :func:`_unbatched_call`); its error names the batch axis
    first (:func:`finding_error`). Found in review: one sequence of a
    ``DataLoader(batch_size=None)`` through an attention layer read as a model that mixes the
    examples, and the error advised LayerNorm."""

    evidence: str

    def __new__(cls, why: str, evidence: str) -> LikelyUnbatched:
        found = super().__new__(cls, why)
        found.evidence = evidence
        return found

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:  # gathered across ranks whole
        return type(self), (str(self), self.evidence)


class LikelyTimeMajor(LikelyUnbatched):
    """A coupling found by :meth:`ExamplesApart.check` in a sequence-first layer
    (``batch_first=False``) whose first axis, which it runs along as time, held the batch's
    "examples" (``evidence``: :func:`curvlab._time_major.time_major_call`): the batch is most
    likely time-major ``(T, B, ...)``, and its error names that first
    (:func:`~curvlab._time_major.time_major_message`). Found in review s25: torch's
    word_language_model layout read as a model that mixes the examples, and the error advised
    norm layers without batch statistics."""


class MixedExamplesError(ValueError):
    """The model mixes the examples of a batch (:func:`coupling_message`): per-example
    quantities are undefined, the whole batch's loss is not."""


def finding_error(why: str, data: Any = None) -> ValueError:
    """The error for a finding of :func:`examples_mixed` (a coupling or a :class:`NotSplittable`).

    Args:
        why: the finding.
        data: the data the batch came from, when the caller has it: a coupling found on the
            batches of a ``DataLoader(batch_size=None)`` (:func:`loader_unbatched`), or a
            :class:`LikelyUnbatched` one, names the missing batch axis first
            (:func:`unbatched_message`); a :class:`LikelyTimeMajor` one (from a batch not of
            such a loader) names the time-major layout first
            (:func:`~curvlab._time_major.time_major_message`).
    """
    if isinstance(why, NotSplittable):
        return why.error if why.error is not None else ValueError(str(why))
    if isinstance(why, LikelyTimeMajor) and not loader_unbatched(data):
        return MixedExamplesError(time_major_message(why, why.evidence))
    evidence = loader_unbatched(data) or (why.evidence if isinstance(why, LikelyUnbatched) else "")
    if evidence:
        return MixedExamplesError(unbatched_message(why, evidence))
    return MixedExamplesError(coupling_message(why))


def shareable(why: str | None) -> str | None:
    """``why`` as the ranks exchange it: a :class:`NotSplittable` without its exception."""
    return NotSplittable(why) if isinstance(why, NotSplittable) else why


def check_examples_apart(model: nn.Module, inputs: Inputs) -> None:
    """Raise when ``model`` mixes the examples of ``inputs`` (:func:`examples_mixed`).

    Raises:
        ValueError: naming where the examples mix, by how much, and the way out.
    """
    why = examples_mixed(model, inputs)
    if why is not None:
        raise finding_error(why)


def raise_if_mixed(why: str | None, data: Any = None) -> None:
    """Raise the coupling error for ``why`` (this rank's :func:`examples_mixed`), on every rank:
    under ``torch.distributed`` the ranks' findings are gathered (one small collective, on every
    call, so the ranks stay in step), and a coupling that only one rank's shard shows (a forward
    that branches on a rare input anywhere in the batch) makes every rank raise, not that rank
    alone while the others wait in the next collective. ``data``: as for
    :func:`finding_error`.

    Raises:
        ValueError: naming where the examples mix (or the missing batch axis) and the way out.
    """
    from curvlab.distributed import active

    comm = active()
    if comm is not None:
        mine = shareable(why)
        found = [(r, w) for r, w in enumerate(comm.all_gather_object(mine)) if w is not None]
        if found and why is None:
            rank, theirs = found[0]
            note = f" (on rank {rank}'s first chunk; every rank raises this error)"
            why = _noted(theirs, note)
    if why is not None:
        raise finding_error(why, data)


def _noted(why: str, note: str) -> str:
    """``why`` with ``note`` appended, of its kind (a :class:`NotSplittable` stays one, a
    :class:`LikelyUnbatched` keeps its evidence)."""
    if isinstance(why, LikelyUnbatched):  # a LikelyTimeMajor too
        return type(why)(f"{why}{note}", why.evidence)
    return type(why)(f"{why}{note}")


def coupling_message(why: str) -> str:
    """The error for a model that mixes the examples (``why``: :meth:`ExamplesApart.check`)."""
    return f"the model mixes the examples of a batch: {why}. {COUPLING_HINT}"


def unbatched_message(why: str, evidence: str) -> str:
    """The error for a coupling found on a batch that evidently has no batch axis: the likely
    cause and its fix first, then the coupling (``why``) and, should the batch have its axis
    after all, the coupling's way out (:data:`COUPLING_HINT`)."""
    return (
        f"the batch most likely has no batch axis: {evidence}. curvlab reads the first axis of "
        f"every tensor as the examples, and so read, the model mixes them: {why}. "
        f"{_GIVE_BATCH_AXIS}. If the batch does hold its examples in its first axis (a dataset "
        "whose samples are whole batches, a layer that attends across the examples on purpose), "
        f"the model mixes the examples of a batch. {COUPLING_HINT}"
    )
