"""Which layers :func:`curvlab.kfac` gives factors, and how their calls are captured.

The Linear, Conv1d/Conv2d and HuggingFace ``Conv1D`` layers with a trainable weight
(:func:`is_kfac_layer`), selected with ``params=`` and checked before any pass
(:func:`_select_layers`: grouped or non-zero-padded convolutions and TorchScript modules are
refused, naming the ways out; layers whose weight is computed from the parameters trained, by a
parametrization or an old-style ``spectral_norm``/``weight_norm`` hook, and those whose weight is
not registered on them but set in the forward, :func:`_unregistered_weight`, are left out, each
with why in ``info["left_out"]``), the subclasses whose own ``forward`` is not the plain layer's
(:func:`_unlike_plain`, on the first chunk), one identity per weight so that layers sharing it form
one block (:func:`_weight_key`), and the forward hooks that record each call's input and output
(:func:`_capture`; first of the layer's forward hooks, so the output is the layer's own and a
forward hook of the user's that changes it is part of the model downstream; the recomputation
of activation checkpointing is not recorded again, reentrant checkpointing is refused). The
passes are run by :mod:`curvlab.quantities._kfac`, the factor sums added by
:mod:`curvlab.quantities._kfac_sums`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from curvlab._layout import call_input
from curvlab._notrace import first_forward_hooks
from curvlab._selection import Params, _select, refuse_complex
from curvlab._text import few
from curvlab.backends._base import parameter_uses
from curvlab.backends._layers import overridden, plain_output
from curvlab.backends._rules import is_hf_conv1d

__all__ = ["is_kfac_layer", "kfac_refuses"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_LAYER_NAMES = "Linear/Conv1d/Conv2d/HuggingFace Conv1D"
_SCRIPTED_NAMES = ("Linear", "Conv1d", "Conv2d", "Conv1D")  # a TorchScript module's original_name


@dataclass
class _Capture:
    inputs: list[Tensor]
    outputs: list[Tensor]


class _Store(dict[str, _Capture]):
    """Each layer's recorded calls (:func:`_capture`); nothing is recorded while ``paused``."""

    paused: bool = False


@contextmanager
def _capture(layers: dict[str, nn.Module]) -> Iterator[_Store]:
    store = _Store((name, _Capture([], [])) for name in layers)
    handles = []
    # the backward pass running at the start: -1, or the user's own when kfac is called from
    # one of their backward hooks (a forward of curvlab's passes then runs inside it, and was
    # taken for checkpoint recomputation, recording nothing: found in review s24)
    started_in = torch._C._current_graph_task_id()

    def hook(name: str):  # noqa: ANN202
        def fn(
            module: nn.Module, inp: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor
        ) -> Tensor | None:
            if store.paused:  # a pass of curvlab's own checks, not the factors' pass
                return None
            if torch._C._current_graph_task_id() != started_in:
                # inside a backward pass of curvlab's own (one started after the capture):
                # activation checkpointing (torch.utils.checkpoint, HF's
                # gradient_checkpointing_enable) recomputes the layer; the forward's call was
                # recorded already (recording it again paired other gradients, found in
                # review). The same clone keeps the recomputed graph the forward's.
                return out.clone()
            if not out.requires_grad and _in_reentrant_checkpoint():
                raise ValueError(
                    f"kfac: layer '{name}' runs inside reentrant activation checkpointing "
                    "(torch.utils.checkpoint(..., use_reentrant=True), or HF's "
                    "gradient_checkpointing_enable with use_reentrant=True), whose forward runs "
                    "without autograd, so its output gradients cannot be seen (its G came out "
                    "0, found in review); use use_reentrant=False, or turn checkpointing off for "
                    "the call (model.gradient_checkpointing_disable())"
                )
            store[name].inputs.append(_layer_input(name, module, inp, kwargs).detach())
            store[name].outputs.append(out)
            return out.clone()  # later in-place ops must not modify the tensor we differentiate

        return fn

    try:
        # with the keywords: a layer called as layer(input=x) has no positional input (its hook
        # raised a raw IndexError, found in review); first of the forward hooks: the layer's own
        # output, a forward hook of the user's that changes it is downstream of the layer (G
        # read at the hooked output was 4x off for 2 * out + 0.1, found in review s19)
        handles += first_forward_hooks(
            {layer: hook(name) for name, layer in layers.items()}, with_kwargs=True
        )
        yield store
    finally:
        for h in handles:
            h.remove()


def _layer_input(
    name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor:
    """The input tensor of one call of a layer (:func:`curvlab._layout.call_input`: its first
    positional argument, or the keyword named like the first parameter of its ``forward``).

    Raises:
        ValueError: naming the layer, when the call has no such tensor.
    """
    x = call_input(module, args, kwargs)
    if isinstance(x, Tensor):
        return x
    got = (
        f"a {type(x).__name__} as its first argument"
        if args
        else f"keyword arguments {sorted(kwargs)}"
        if kwargs
        else "no arguments"
    )
    raise ValueError(
        f"kfac: layer '{name}' ({type(module).__name__}) was called with {got}, not its input "
        f"tensor: K-FAC reads a layer's input from its first argument (or the keyword named "
        f"like the first parameter of its forward); call the layer on its input tensor, or "
        f"{_leave_out(name)}"
    )


@contextmanager
def _paused(store: _Store) -> Iterator[None]:
    """Record none of the layers' calls in the block (:func:`_capture`)."""
    store.paused = True
    try:
        yield
    finally:
        store.paused = False


def _in_reentrant_checkpoint() -> bool:
    """Whether the running code is inside ``torch.utils.checkpoint``'s reentrant forward (an
    ``autograd.Function`` that runs the block under ``no_grad``): told from a layer run under
    ``no_grad`` on purpose (a teacher branch, whose ``G`` is 0) by the calling frames."""
    frame = sys._getframe(1)
    for _ in range(64):
        if frame is None:
            return False
        if frame.f_code.co_name == "forward" and frame.f_code.co_filename.endswith(
            _CHECKPOINT_FILE
        ):
            return True
        frame = frame.f_back
    return False


_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")


def kfac_refuses(layer: nn.Module) -> bool:
    """Whether :func:`kfac` refuses this Linear/Conv/Conv1D layer (:func:`_check_layer`)."""
    try:
        _check_layer("", layer)
    except ValueError:
        return True
    return False


def _unlike_plain(
    names: list[str], layers: dict[str, nn.Module], store: dict[str, Any]
) -> dict[str, str]:
    """The layers with a ``forward`` of their own (:func:`overridden`) whose outputs on this chunk
    are not what the plain layer computes from their inputs (weight standardisation, a scale):
    K-FAC's factors are the plain layer's. A subclass that merely casts (a Whisper-style Linear
    running in the input's dtype) or renames passes (to ``1e-4`` of the output's largest entry).
    """
    bad = {}
    for name in names:
        layer = layers[name]
        own = overridden(layer)
        if own is None:
            continue
        for x, z in zip(store[name].inputs, store[name].outputs):
            with torch.no_grad():
                ref = plain_output(layer, x.to(layer.weight.dtype))
                out = z.detach()
                ok = ref is not None and ref.shape == out.shape
                if ok:
                    scale = float(out.abs().max()) or 1.0
                    ok = float((ref.to(out.dtype) - out).abs().max()) <= 1e-4 * scale
            if not ok:
                bad[name] = f"{own}, and it does not ({type(layer).__name__}'s outputs differ)"
                break
    return bad


def _check_layer(name: str, layer: nn.Module) -> None:
    """Refuse the convolutions K-FAC has no factors for, naming the ways out (before any pass)."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if layer.groups != 1:
            raise ValueError(
                f"kfac: layer '{name}' has groups={layer.groups} (a grouped or depthwise "
                f"convolution); only groups=1 is supported: {_leave_out(name)} "
                "(KFACNoise gives such a layer its diagonal by itself)"
            )
        if (isinstance(layer.padding, str) and layer.padding != "valid") or (
            layer.padding_mode != "zeros"
        ):
            same = (
                " (padding='same' with an odd kernel is the integer padding "
                "dilation * (kernel_size - 1) // 2 on each side)"
                if layer.padding == "same" and layer.padding_mode == "zeros"
                else ""
            )
            raise ValueError(
                f"kfac: layer '{name}' uses padding={layer.padding!r}, padding_mode="
                f"{layer.padding_mode!r}; only explicit integer zero padding is supported{same}: "
                f"{_leave_out(name)} (KFACNoise gives such a layer its diagonal by itself)"
            )


def _leave_out(name: str) -> str:
    """The ways out for a layer K-FAC has no factors for (leave it out, take its diagonal)."""
    return (
        f"leave the layer out with params=lambda name, p: not name.startswith({name + '.'!r}) "
        "and take its Fisher diagonal with curvlab.diag_fisher(..., params=...), which handles "
        "any layer"
    )


def _select_layers(model: nn.Module, params: Params) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The Linear/Conv/Conv1D layers with a trainable weight (of the ``params`` selection),
    checked, and the selected layers left out with why: those whose weight is computed from the
    parameters trained (:func:`_computed_weight`), which have no factors of their own, and those
    whose weight is not registered on them but set in the forward (:func:`_unregistered_weight`;
    under ``params=`` named where the selection holds the layer's bias or a parameter no such
    layer registers, which it may be computed from)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    layers, computed, set_in_forward = {}, {}, {}
    for name, m in model.named_modules():
        if not is_kfac_layer(m):
            continue
        made = _computed_weight(m, name_of)
        if made is not None:  # never m.weight: it would run the parametrization
            if any(p.requires_grad for p in made[0]):
                computed[name] = made
        elif _unregistered_weight(m):
            # absent, or a plain attribute the forward sets (``self.lin.weight = self.big[:3]``):
            # a raw AttributeError on a fresh model, and after a forward factors keyed by the
            # layer though the parameter trained is another (found in review s22)
            weight = m.__dict__.get("weight")
            if not isinstance(weight, Tensor) or weight.requires_grad:
                set_in_forward[name] = m
        elif m.weight.requires_grad:
            layers[name] = m
    scripted = _scripted_layers(model)  # hooks do not run on them: refused, not left out
    if scripted and params is not None:
        chosen = {id(p) for p in _select(model, params).values()}
        scripted = {n: m for n, m in scripted.items() if id(m.weight) in chosen}
    if scripted:
        _refuse_scripted(list(scripted))
    if params is not None:
        # without the complex check: a complex parameter of a layer K-FAC does not cover is left
        # out as that layer is; the covered layers' are refused below (review s27: refused here)
        chosen = {id(p) for p in _select(model, params).values()}
        computed = {n: c for n, c in computed.items() if any(id(p) in chosen for p in c[0])}
        # what a weight set in the forward is computed from is unknown: named where the
        # selection holds a parameter of the layer (its bias) or one no such layer registers
        owned = {
            id(p) for m in model.modules() if is_kfac_layer(m) for p in m.parameters(recurse=False)
        }
        set_in_forward = {
            n: m
            for n, m in set_in_forward.items()
            if any(id(p) in chosen for p in m.parameters(recurse=False))
            or any(i not in owned for i in chosen)
        }
    left_out = {
        name: _computed_reason(originals, how, name_of)
        for name, (originals, how) in computed.items()
    }
    left_out.update((name, _SET_IN_FORWARD_WHY) for name in set_in_forward)
    if not layers:
        raise ValueError(
            f"kfac: the model has no {_LAYER_NAMES} layer with a trainable weight"
            f"{_left_out_note(left_out)}"
        )
    if params is not None:
        # the layers with a trainable weight alone (found in review: a layer whose weight is
        # frozen was suggested, and selecting it raised the same error; so was a layer whose
        # weight is computed, spectral_norm's)
        every = layers
        layers = {name: m for name, m in layers.items() if id(m.weight) in chosen}
        if not layers:
            raise ValueError(
                "kfac: params selects no Linear/Conv1d/Conv2d weight (nor a HuggingFace Conv1D "
                f"one){_frozen_weights(model, chosen)}{_left_out_note(left_out)}"
                f"{_shared_weights(model, every, params, name_of)}{_examples(every, name_of)}"
            )
    for name, layer in layers.items():
        # a complex layer's factors are complex, not those of its real coordinates (review s27);
        # complex parameters of layers K-FAC does not cover are left out as any such layer's
        own = layer.named_parameters(prefix=name, recurse=False)
        refuse_complex({n: p for n, p in own if p.requires_grad}, has_params=True)
        _check_layer(name, layer)
    return layers, left_out


def _computed_weight(
    layer: nn.Module, name_of: dict[int, str]
) -> tuple[list[nn.Parameter], str] | None:
    """The parameters a layer's weight is computed from, and by what, where the weight is not a
    ``Parameter`` of the layer itself (``None`` where it is, or where the layer holds a frozen
    weight as a buffer): a ``torch.nn.utils.parametrize`` parametrization (``weight_norm``,
    ``spectral_norm``, ``orthogonal`` of ``torch.nn.utils.parametrizations``: ``layer.weight``
    is computed at each access) or a forward pre-hook (the old-style
    ``torch.nn.utils.spectral_norm``/``weight_norm``: ``weight_orig``, ``weight_g``/``weight_v``).

    K-FAC's factors of such a layer would be those of the computed weight ``W``, not of the
    parameters trained (1.19 off the Fisher block of ``orthogonal``'s ``original``, found in
    review), and the old-style layer was taken only after a forward had set its ``weight``.
    """
    if "weight" in layer._parameters or "weight" in layer._buffers:
        return None
    if parametrize.is_parametrized(layer, "weight"):
        originals = list(layer.parametrizations["weight"].parameters())
        how = "a torch.nn.utils.parametrize parametrization"
    else:
        originals = [p for n, p in layer._parameters.items() if p is not None and n != "bias"]
        how = "a forward pre-hook (old-style torch.nn.utils.spectral_norm or weight_norm)"
    originals = [p for p in originals if id(p) in name_of]
    return (originals, how) if originals else None


def _unregistered_weight(layer: nn.Module) -> bool:
    """Whether the layer's ``weight`` is neither a registered parameter or buffer of it nor a
    parametrization's (:func:`_computed_weight` returned ``None``): absent (deleted, e.g.
    ``del layer.weight``) or a plain attribute its model's forward sets
    (``layer.weight = self.big[:3]``). ``layer.weight`` is never read here (a raw
    ``AttributeError`` on a fresh model)."""
    return (
        "weight" not in layer._parameters
        and "weight" not in layer._buffers
        and not parametrize.is_parametrized(layer, "weight")
    )


_SET_IN_FORWARD_WHY = (
    "its weight is not a parameter registered on the layer (deleted, or a plain attribute "
    "computed or set in the forward pass, e.g. layer.weight = self.big[:3]), so K-FAC's factors "
    "would be those of a tensor computed from the parameters trained, not of them; take their "
    "Fisher diagonal with curvlab.diag_fisher(..., params=...)"
)
"""Why :func:`kfac` leaves out a layer whose weight is set in the forward
(:func:`_unregistered_weight`; ``info["left_out"]``)."""


def _computed_reason(originals: list[nn.Parameter], how: str, name_of: dict[int, str]) -> str:
    """Why :func:`kfac` leaves out a layer whose weight is computed (:func:`_computed_weight`)."""
    names = ", ".join(repr(name_of[id(p)]) for p in originals)
    return (
        f"its weight is computed from {names} by {how}, so K-FAC's factors would be those of "
        "the computed weight, not of the parameters trained; take their Fisher diagonal with "
        "curvlab.diag_fisher(..., params=...) (KFACNoise gives them the diagonal by itself)"
    )


def _left_out_note(left_out: dict[str, str]) -> str:
    """The selected layers :func:`kfac` leaves out, with why, for its errors ("" for none)."""
    if not left_out:
        return ""
    return "; " + "; ".join(f"layer '{name}' is left out: {why}" for name, why in left_out.items())


def _examples(layers: dict[str, nn.Module], name_of: dict[int, str]) -> str:
    """The selections that give factors, for the error: the layers whose module name selects
    their weight (not a layer whose weight is shared and named after another module: selecting
    it by its name selects only its bias, found in review), else the weights' names; never a
    weight K-FAC refuses (:func:`_mixed`). ``""`` when there is none."""
    fine = {n: m for n, m in layers.items() if not _mixed(m, layers)}
    own = sorted(n for n, m in fine.items() if name_of[id(m.weight)].startswith(n + "."))
    shown = own[:8] or sorted({name_of[id(m.weight)] for m in fine.values()})[:8]
    if not shown:
        return ""
    return f"; select a layer's trainable weight or its module, e.g. one of {shown}"


def _mixed(layer: nn.Module, layers: dict[str, nn.Module]) -> bool:
    """Whether the layer's weight is shared by a HuggingFace ``Conv1D`` (stored ``(in, out)``)
    and a layer storing it ``(out, in)``: K-FAC cannot combine their factors (refused by
    :func:`curvlab.quantities._kfac_budget.check_memory`)."""
    return len({is_hf_conv1d(o) for o in layers.values() if o.weight is layer.weight}) > 1


def _shared_weights(
    model: nn.Module, layers: dict[str, nn.Module], params: Params, name_of: dict[int, str]
) -> str:
    """Why a selection by a layer's own name gives no factors where its weight is shared: the
    weight is named after the module it is shared with (``model.named_parameters()`` names a
    shared parameter once), so ``params="b"`` selects ``b``'s bias alone. Names the weight to
    select, or, where K-FAC refuses that weight (shared by a HuggingFace ``Conv1D``, stored
    ``(in, out)``, and a layer storing it ``(out, in)``), its diagonal ("" for no such layer)."""
    modules = dict(model.named_modules())
    notes = []
    for name, m in layers.items():
        weight = name_of[id(m.weight)]
        alias = f"{name}.weight"
        if weight.startswith(name + ".") or not _selects(params, alias, m.weight):
            continue
        owner = weight.rpartition(".")[0]
        also = f" (shared with '{owner}')" if owner in modules else ""
        if _mixed(m, layers):
            way = (
                f"K-FAC refuses that weight (a HuggingFace Conv1D stores it (in, out), a layer "
                f"sharing it (out, in)): take its Fisher diagonal with "
                f"curvlab.diag_fisher(..., params={weight!r})"
            )
        else:
            way = f"select {weight!r}"
        notes.append(f"layer '{name}' uses weight {weight!r}{also}; {way}")
    return "; " + "; ".join(notes[:4]) if notes else ""


def _selects(params: Params, name: str, p: nn.Parameter) -> bool:
    """Whether ``params`` (names, prefixes or a predicate) selects a parameter of this name.
    A module or tensor (taken by identity, never by an alias's name) selects none here; a
    module was called as a predicate and a tensor read as a list of entries (review s20)."""
    if isinstance(params, (nn.Module, torch.Tensor)):
        return False
    if callable(params):
        try:
            return bool(params(name, p))
        except Exception:  # a predicate that does not expect this name: not selected
            return False
    entries = [params] if isinstance(params, str) else list(params or [])
    return any(
        isinstance(e, str) and (e == "" or name == e or name.startswith(e + ".")) for e in entries
    )


def _frozen_weights(model: nn.Module, chosen: set[int]) -> str:
    """Why a selection of parameters of Linear/Conv/Conv1D layers gives no factors, where it
    does: the layers some of whose parameters (a bias) are selected have a frozen weight, and
    K-FAC gives factors to trainable weights alone ("" when no such layer is selected)."""
    frozen = [
        name
        for name, m in model.named_modules()
        if is_kfac_layer(m)
        and ("weight" in m._parameters or "weight" in m._buffers)  # not computed: not run
        and not m.weight.requires_grad
        and any(id(p) in chosen for p in m.parameters(recurse=False))
    ]
    if not frozen:
        return ""
    one = len(frozen) == 1
    return (
        f": the selected layer{'' if one else 's'} {few(frozen)} "
        f"{'has its' if one else 'have their'} weight frozen (requires_grad=False), and K-FAC "
        "gives factors to trainable weights alone (the bias block of such a layer is in "
        "curvlab.diag_fisher(..., params=...))"
    )


def _scripted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The TorchScript modules (``torch.jit.script``/``trace``) of ``model`` that were a Linear,
    Conv1d, Conv2d or HuggingFace Conv1D layer with a trainable weight: module hooks do not run
    on them, so K-FAC cannot read their inputs and output gradients."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.jit.ScriptModule)
        and getattr(m, "original_name", None) in _SCRIPTED_NAMES
        and isinstance(getattr(m, "weight", None), Tensor)
        and m.weight.requires_grad
    }


def _refuse_scripted(scripted: list[str]) -> None:
    """Refuse a selection holding TorchScript layers (:func:`_scripted_layers`), by name.

    Raises:
        ValueError: naming the layers and the ways out.
    """
    raise ValueError(
        f"kfac: layer{'s' if len(scripted) > 1 else ''} {few(scripted)} "
        f"{'are TorchScript modules' if len(scripted) > 1 else 'is a TorchScript module'} "
        "(the model went through torch.jit.script or torch.jit.trace): K-FAC reads each "
        "layer's inputs and output gradients through module hooks, which TorchScript does not "
        "run. Pass the eager model (the nn.Module given to torch.jit.script/trace, whose "
        "parameters the TorchScript module shares; for a file from torch.jit.load, build the "
        "eager model and load its state_dict), or leave these layers out with params=. "
        "diag_fisher, gradient_stats and the operators compute a TorchScript model exactly "
        "(through torch.func)"
    )


def _checked_weights(
    model: nn.Module, layers: dict[str, nn.Module], group: dict[str, str]
) -> dict[str, Tensor]:
    """Per block (keyed as ``group``'s values) the weight whose uses :func:`_uses_outside` checks:
    every weight but one an ``nn.Embedding`` (or ``nn.EmbeddingBag``) also owns. A head tied to
    an embedding keeps the factors of its layers' calls, as documented (the embedding's share of
    its Fisher is not in them; :class:`~curvlab.noise.KFACNoise` gives it the diagonal).

    Until review s23 any other owner exempted the weight too: a tied autoencoder whose decoder
    module registers the encoder's weight and reads it (``F.linear(h, self.w.t())``) got the
    encoder's factors alone, its one-example block 75% off the true one, silently, where the
    same model reading ``enc.weight`` directly was refused. A module that only holds the weight
    and never reads it adds no use, so its layers keep their factors."""
    embedded = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        for p in m._parameters.values()
        if p is not None
    }
    return {
        key: layers[key].weight
        for key in dict.fromkeys(group.values())
        if id(layers[key].weight) not in embedded
    }


def _sole_biases(
    model: nn.Module, layers: dict[str, nn.Module], group: dict[str, str]
) -> dict[str, Tensor]:
    """Per block (keyed as ``group``'s values) the trainable bias whose block ``G`` can be: one
    that every layer of the block uses and that no layer of another weight shares (``b.bias =
    a.bias``; :class:`~curvlab.noise.KFACNoise` keys biases the same way). The uses
    :func:`_uses_outside` then checks per batch. A block whose layers each have a bias of their
    own, or none, is not here.

    ``G`` holds the output gradients of the block's calls only: a bias shared with a layer of
    another weight got each layer's ``G`` as its block (found in review s21: 0.859 where its
    one-example empirical Fisher block is 3.435, and KFACNoise kept the last layer's draw). A
    module that is no such layer may own the bias too (BERT's MLM head holds its decoder's bias
    as ``self.bias``): where the model reads it outside the calls, the edge count says so."""
    owners: dict[int, list[nn.Module]] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(m)
    found = {}
    for key in dict.fromkeys(group.values()):
        bias, weight = layers[key].bias, layers[key].weight
        if bias is None or not bias.requires_grad:
            continue
        if any(layers[name].bias is not bias for name, k in group.items() if k == key):
            continue
        if all(
            o._parameters.get("weight") is weight
            for o in owners.get(id(bias), ())
            if is_kfac_layer(o)
        ):
            found[key] = bias
    return found


def _call_nodes(
    store: dict[str, _Capture], group: dict[str, str], keys: Any
) -> dict[str, list[Any]]:
    """Per block of ``keys`` the autograd nodes of its layers' recorded outputs on this chunk
    (held, so that their ids stay theirs during :func:`_uses_outside`'s graph walk); taken before
    the calls on no rows are forgotten (such a call is still in the graph)."""
    nodes: dict[str, list[Any]] = {key: [] for key in keys}
    for name, key in group.items():
        if key in nodes:
            nodes[key].extend(z.grad_fn for z in store[name].outputs if z.grad_fn is not None)
    return nodes


def _uses_outside(
    output: Any,
    weights: dict[str, Tensor],
    nodes: dict[str, list[Any]],
    name_of: dict[int, str],
    biases: dict[str, Tensor] | None = None,
) -> tuple[dict[str, str], set[str]]:
    """The blocks whose weight enters the graph of ``output`` (the chunk's prepared model output)
    more often than through its layers' recorded calls that reach it, each with why it gets no
    factors: the model also reads the weight outside those calls (``F.linear(h,
    layer.weight)``, a matmul or ``F.embedding`` on it, ``nn.MultiheadAttention``'s
    ``out_proj``), and ``kron(G, A)`` of the calls misses that use's share of the weight's Fisher
    block (found in review s18: ``KFACNoise`` drew 0.273 for a weight whose empirical-Fisher
    diagonal sums to 0.592, and the one-example block the docs call exact was not). And the
    blocks of ``biases`` (:func:`_sole_biases`) whose bias the model reads outside the calls
    (``layer(x) + layer.bias``): they keep the weight's factors, but ``G`` is not the bias's
    block (found in review s21: 0.313 where the one-example empirical Fisher block is 1.253).

    Counted as :class:`curvlab.noise._capture.Taps` does, from the autograd graph's structure
    (:func:`curvlab.backends._base.parameter_uses`: each call of a layer is one edge into its
    weight's and its bias's gradient accumulator, or into autocast's cast of them), in one walk:
    no host synchronisation.
    """
    biases = biases or {}
    if not (weights or biases) or not isinstance(output, Tensor):
        return {}, set()
    reached: set[int] = set()
    params: dict[Any, Tensor] = {("weight", k): w for k, w in weights.items()}
    params.update({("bias", k): b for k, b in biases.items()})
    uses = parameter_uses(output, params, reached)  # keyed (what, block)
    found = {}
    extra_bias = set()
    for (what, key), param in params.items():
        calls = sum(id(node) in reached for node in nodes.get(key, ()))
        if uses[(what, key)] <= calls:
            continue
        if what == "bias":
            extra_bias.add(key)
            continue
        wname = name_of.get(id(param), f"{key}.weight")
        extra = uses[(what, key)] - calls
        found[key] = (
            f"the model uses its weight {wname!r} outside the layer's calls ({extra} "
            f"use{'s' if extra != 1 else ''} in the graph besides {calls} layer "
            f"call{'s' if calls != 1 else ''}: F.linear(x, layer.weight), a matmul or "
            "F.embedding on it, or nn.MultiheadAttention's out_proj), so K-FAC's factors of "
            "the calls would miss that use's share of the weight's Fisher block; take its "
            f"Fisher diagonal with curvlab.diag_fisher(..., params=[{wname!r}]) (KFACNoise "
            "gives it the diagonal by itself)"
        )
    return found, extra_bias


def _weight_key(layer: nn.Module) -> int:
    """One identity per weight (layers sharing one get the same): the ``Parameter``'s (a layer
    whose weight is computed has no factors: :func:`_computed_weight`)."""
    return id(layer.weight)


def is_kfac_layer(module: nn.Module) -> bool:
    """Whether :func:`kfac` gives ``module`` factors: Linear, Conv1d/Conv2d or HF ``Conv1D``."""
    return isinstance(module, _LAYERS) or is_hf_conv1d(module)
