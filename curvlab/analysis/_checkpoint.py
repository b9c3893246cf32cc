"""Loading checkpoints safely (``weights_only=True``) with errors that name what does not match.

A checkpoint is a path to a file written by ``torch.save``, a ``state_dict``, or a wrapper dict as
torch training scripts and PyTorch Lightning save them (``{"state_dict": ...}``,
``{"model": ...}``, ``{"model_state_dict": ...}``, ...). Keys prefixed with ``"module."``
(``DataParallel``, DDP), ``"_orig_mod."`` (``torch.compile``), ``"model."`` (a LightningModule
holding the network as ``self.model``) or ``"net."``, also stacked in any order
(``"module._orig_mod."``: a compiled model wrapped in DDP), are matched to the model's keys when
that makes them fit.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> sd = resolve_state_dict({"state_dict": model.state_dict()})
    >>> load_into(model, sd)
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._text import few, strip_ansi

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "read_checkpoint",
    "folder_checkpoint_message",
    "resolve_state_dict",
    "load_into",
    "check_fits",
    "checkpoint_label",
    "checkpoint_labels",
    "check_map_location",
    "checkpoint_type_message",
    "own_copies",
    "stand_ins",
]

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
_PREFIXES = ("module.", "model.", "_orig_mod.", "net.")


class CheckpointError(ValueError):
    """A checkpoint could not be read or understood."""


class CheckpointMismatchError(CheckpointError):
    """A state_dict does not fit the model; names the missing, unexpected and mis-shaped keys.

    Attributes:
        missing: keys the model has but the checkpoint lacks.
        unexpected: keys the checkpoint has but the model lacks.
        mis_shaped: ``{key: (checkpoint shape, model shape)}``.
    """

    def __init__(
        self,
        source: str,
        missing: list[str],
        unexpected: list[str],
        mis_shaped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
        advice: str = "",
        stripped: str = "",
    ) -> None:
        self.missing, self.unexpected, self.mis_shaped = missing, unexpected, mis_shaped
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if mis_shaped:
            shown = [
                f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, (a, b) in mis_shaped.items()
            ]
            parts.append(f"mis-shaped keys {_few(shown)}")
        named = (
            f" (named after stripping the checkpoint's wrapper prefix {stripped!r})"
            if stripped
            else ""
        )
        build = "build the model with the architecture the checkpoint was saved from"
        super().__init__(
            f"checkpoint {source} does not fit the model: "
            + "; ".join(parts)
            + named
            + (
                f". {advice[0].upper()}{advice[1:]}; otherwise {build}"
                if advice
                else f". {build[0].upper()}{build[1:]}"
            )
        )


def _few(items: list[str]) -> str:
    return f"[{few(items)}]"


def checkpoint_label(checkpoint: Any, index: int) -> str:
    """A short name for a checkpoint (its file name, or ``checkpoint <index>``).

    Several checkpoints are named by :func:`checkpoint_labels`, which keeps them apart.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        return Path(checkpoint).name
    return f"checkpoint {index}"


def checkpoint_labels(checkpoints: Sequence[Any]) -> list[str]:
    """Distinct short names for a list of checkpoints (``None``: ``"model"``).

    A file is named by its file name, as :func:`checkpoint_label` names it; files that share a
    name (``runA/last.pt`` and ``runB/last.pt``, or the ``model.safetensors`` of HuggingFace's
    ``checkpoint-500/`` and ``checkpoint-1000/``) are named by the shortest path suffix that
    tells them apart. The same path given twice (or ``None`` twice) is the same checkpoint and
    keeps one label.

    Example:
        >>> checkpoint_labels(["runA/last.pt", "runB/last.pt", "runB/best.pt", None])
        ['runA/last.pt', 'runB/last.pt', 'best.pt', 'model']
    """
    labels = ["model" if c is None else checkpoint_label(c, i) for i, c in enumerate(checkpoints)]
    paths = {
        i: Path(c).parts
        for i, c in enumerate(checkpoints)
        if isinstance(c, (str, os.PathLike)) and Path(c).parts
    }
    groups: dict[str, list[int]] = {}
    for i in paths:
        groups.setdefault(labels[i], []).append(i)
    for group in groups.values():
        distinct = {paths[i] for i in group}  # a path given twice keeps one label
        if len(distinct) < 2:
            continue
        k, longest = 2, max(len(parts) for parts in distinct)
        while k < longest and len({_suffix(parts, k) for parts in distinct}) < len(distinct):
            k += 1
        for i in group:
            labels[i] = _suffix(paths[i], k)
    return labels


def _suffix(parts: tuple[str, ...], k: int) -> str:
    """The last ``k`` path components joined by ``/`` (the whole path when there are fewer)."""
    if k >= len(parts):
        return str(Path(*parts))
    return "/".join(parts[-k:])


def check_map_location(map_location: Any, name: str = "map_location") -> None:
    """Refuse a ``map_location`` that ``torch.load`` could not use, naming it (``name``).

    A device (``"cpu"``, ``"cuda:0"``, a ``torch.device``) must exist on this machine, and so must
    every device a dict maps to (``{"cuda:0": "cpu"}``). A function is ``torch.load``'s own
    business: :func:`curvlab.analyze` reads the first checkpoint file with it before the data is
    read, and :func:`read_checkpoint` names it where it fails on a file that loads onto the CPU.

    Raises:
        ValueError: for a string that is no device, or a device this machine does not have
            (also as a value of a dict, named ``map_location['cuda:0']``).
    """
    if map_location is None or callable(map_location):
        return
    if isinstance(map_location, Mapping):  # checked: a missing device was blamed on the file
        for key, value in map_location.items():  # as "corrupt" (found in review s23)
            if not isinstance(value, (str, torch.device)):
                raise ValueError(
                    f"{name}[{key!r}] must be a device such as 'cpu' or 'cuda:0', got "
                    f"{type(value).__name__}"
                )
            check_map_location(value, name=f"{name}[{key!r}]")
        return
    usage = f"pass {name} a device such as 'cpu' or 'cuda:0'" + (
        " (or omit it to load onto the model's device)" if "[" not in name else ""
    )
    if not isinstance(map_location, (str, torch.device)):
        raise ValueError(
            f"{name} must be a device, a dict or a function, got {type(map_location).__name__}; "
            + usage
        )
    try:
        device = torch.device(map_location)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name} {str(map_location)!r} is not a device; {usage}") from None
    if device.type == "cpu" and device.index not in (None, 0):
        raise ValueError(f"{name} {str(map_location)!r}: there is one CPU device, 'cpu'; {usage}")
    if device.type == "meta":
        raise ValueError(
            f"{name} {str(map_location)!r}: tensors on the meta device hold no values to measure; "
            + usage
        )
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if device.type == "mps":
        available = torch.backends.mps.is_available
    if available is not None and not available():
        raise ValueError(
            f"{name} {str(map_location)!r}: this machine has no {device.type} device; {usage}"
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ValueError(
            f"{name} {str(map_location)!r} names {device.type} device {device.index}, but this "
            f"machine has {count()} ({device.type}:0 to {device.type}:{count() - 1}); {usage}"
        )


def _loadable(map_location: Any) -> Any:
    """``map_location`` as ``torch.load`` takes it: ``"cpu:0"`` (which it refuses) as ``"cpu"``,
    and a dict's devices as strings (it refuses a ``torch.device`` there)."""
    if isinstance(map_location, Mapping):
        return {k: str(_loadable(v)) for k, v in map_location.items()}
    if isinstance(map_location, (str, torch.device)) and torch.device(map_location).type == "cpu":
        return "cpu"
    return map_location


def _torch_load(path: Path, map_location: Any, mmap: bool) -> Any:
    """``torch.load(path, weights_only=True)``, with ``mmap`` where the file's format allows it
    (torch's zip format; an older file is read as usual)."""
    if mmap:
        try:
            return torch.load(
                path, map_location=_loadable(map_location), weights_only=True, mmap=True
            )
        except RuntimeError as exc:  # no zip archive (torch < 1.6's format): read it
            if "mmap" not in str(exc):
                raise
    return torch.load(path, map_location=_loadable(map_location), weights_only=True)


def _weights_only_culprit(text: str) -> tuple[str, str]:
    """What torch's ``weights_only`` refusal ``text`` names: the class it refused
    (``"argparse.Namespace"`` of "Unsupported global: GLOBAL argparse.Namespace"; ``""`` where
    none is named) and its own line on the cause (its first line said only "Weights only load
    failed. This file can still be loaded, to do so you have two options", found in review s23).
    """
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return found.group(1), f"Unsupported global: GLOBAL {found.group(1)}"
    after = text.split("WeightsUnpickler error:", 1)
    lines = [line.strip() for line in (after[1] if len(after) > 1 else text).splitlines()]
    return "", next((line for line in lines if line), "")


_FOLDER_FILES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
"""The suffixes of the files a checkpoint folder may hold that :func:`folder_checkpoint_message`
names."""


def folder_checkpoint_message(path: Path, how: str = "checkpoint=") -> str:
    """Why the folder ``path``, given as a checkpoint, is refused, and what to pass instead: the
    file inside it (``model.safetensors`` of a HuggingFace ``save_pretrained`` folder, found in
    review), written ``{how}'{file}'``.

    Example:
        >>> folder_checkpoint_message(Path("/nonexistent"))[:40]
        "checkpoint '/nonexistent' is a folder, e"
    """
    text = (
        f"checkpoint '{path}' is a folder, expected a file (written by torch.save, or a "
        ".safetensors file)"
    )
    try:
        files = sorted(f.name for f in path.iterdir() if f.suffix in _FOLDER_FILES and f.is_file())
        index = sorted(f.name for f in path.iterdir() if f.name.endswith(".index.json"))
    except OSError:
        return text
    if index or any("-of-" in f for f in files):
        return (
            f"{text}; it holds a sharded checkpoint ({', '.join((index or files)[:3])}), which "
            "curvlab does not merge: build the model from the folder in your model factory "
            "(e.g. from_pretrained(folder)) and pass no checkpoint"
        )
    if len(files) == 1:
        return f"{text}; pass the file inside it: {how}'{path / files[0]}'"
    if files:
        return f"{text}; pass one of the files inside it: {', '.join(files[:5])}"
    return f"{text}; it holds no {', '.join(_FOLDER_FILES)} file"


def read_checkpoint(
    path: str | os.PathLike[str], map_location: Any = "cpu", mmap: bool = False
) -> Any:
    """``torch.load(path, map_location=map_location, weights_only=True)`` with clear errors.

    ``mmap=True`` maps the file's tensors instead of reading them into memory (torch's zip
    format; an older file is read as usual): a check of keys, shapes and values that costs no
    copy of the file (the checks before the data is read, :mod:`curvlab.analysis._analyze`).

    Raises:
        FileNotFoundError: if ``path`` does not exist (or is a folder).
        CheckpointError: if the file is not a readable ``torch.save`` file or needs unpickling
            of arbitrary objects (``weights_only=True`` refuses them: the message names the
            class and how to load the file).
        ValueError: if ``map_location`` is no device of this machine
            (:func:`check_map_location`), or fails on a file that loads onto the CPU (a dict or
            a function moving tensors to a device this machine lacks); never blamed on the file.
    """
    check_map_location(map_location)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint file '{p}' does not exist")
    if p.is_dir():
        raise FileNotFoundError(folder_checkpoint_message(p))
    try:
        return _torch_load(p, map_location, mmap)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds; all mean "unreadable"
        text = strip_ansi(str(exc)).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        with open(p, "rb") as f:  # torch.save writes a zip archive (or, before 1.6, a pickle)
            head = f.read(4)
        saved = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
        if saved and ("weights_only" in text or "Unsupported global" in text):
            refusal = CheckpointError(_weights_only_message(p, text))
            refusal.cli_message = _weights_only_message(p, text, for_cli=True)  # type: ignore[attr-defined]
            raise refusal from None
        if _loadable(map_location) != "cpu":
            _refuse_map_location(p, map_location, exc)
        raise CheckpointError(
            f"checkpoint '{p}' is corrupt or not a torch.save file ({type(exc).__name__}: {first})"
        ) from None


def _weights_only_message(path: Path, text: str, for_cli: bool = False) -> str:
    """Why ``weights_only=True`` refused the file ``path`` (torch's message ``text``), naming
    the class it holds and the ways out: re-save the state_dict, or, for a trusted file, allow
    the class or load the file yourself (found in review s23: only the first line of torch's
    message was kept, without the class or a way to load the file).

    ``for_cli``: the ways out the ``curvlab`` command has (the refusal's ``cli_message``, which
    it prints): there is no call to wrap nor a state_dict to pass, but the ``--model`` module
    runs at import, before the checkpoints are read, and may allow the class with
    ``torch.serialization.add_safe_globals`` (found in review s27: the command line was given
    the Python API's ways out only)."""
    culprit, why = _weights_only_culprit(text)
    resave = (
        "re-save the state_dict alone (torch.save(model.state_dict(), path), or beside "
        "plain values in a dict)"
    )
    if for_cli:
        allow = (
            f"; or, only if you trust the file, allow the class: call "
            f"`torch.serialization.add_safe_globals([{culprit}])` in the --model module (it "
            "runs before the checkpoints are read)"
            if culprit
            else ""
        )
        what = (
            f"an object of class {culprit}"
            if culprit
            else "objects other than tensors and plain containers"
        )
        return (
            f"checkpoint '{path}' holds {what}, which weights_only=True refuses to unpickle "
            f"({why}): {resave}{allow}"
        )
    trusted = (
        "load it yourself with torch.load(path, weights_only=False), which runs any code the "
        "file holds, and pass the state_dict"
    )
    if culprit:
        return (
            f"checkpoint '{path}' holds an object of class {culprit}, which weights_only=True "
            f"refuses to unpickle ({why}): {resave}; or, only if you trust the file, allow the "
            f"class (run the call inside `with torch.serialization.safe_globals([{culprit}]): "
            f"...`), or {trusted}"
        )
    return (
        f"checkpoint '{path}' holds objects other than tensors and plain containers, which "
        f"weights_only=True refuses to unpickle ({why}): {resave}; or, only if you trust the "
        f"file, {trusted}"
    )


def _refuse_map_location(path: Path, map_location: Any, exc: Exception) -> None:
    """Raise the ``ValueError`` naming ``map_location`` where the file ``path`` failed with it
    (``exc``) but loads onto the CPU: a dict or a function that moves tensors to a device this
    machine lacks (or fails), or ``None`` for a file saved on one. It was called "corrupt or not
    a torch.save file" (found in review s23). Returns where the file fails on the CPU too."""
    try:
        _torch_load(path, "cpu", mmap=True)
    except Exception:  # noqa: BLE001 - unreadable anyway: the caller says so
        return
    text = strip_ansi(str(exc)).strip()
    first = text.splitlines()[0] if text else ""
    shown = (
        f"(function {getattr(map_location, '__qualname__', type(map_location).__name__)})"
        if callable(map_location)
        else repr(map_location)
    )
    raise ValueError(
        f"map_location {shown} failed to place the tensors of checkpoint '{path}' "
        f"({type(exc).__name__}: {first}), which loads with map_location='cpu': map them to a "
        "device this machine has (a dict's values, or where a function moves them), or pass "
        "map_location='cpu'"
    ) from None


_ONE_CHECKPOINT = (
    'a file path, a state_dict, a dict holding one under "state_dict" / "model" / '
    '"model_state_dict"'
)


def checkpoint_type_message(checkpoint: Any, what: str) -> str:
    """Why ``checkpoint`` (named ``what``) is no checkpoint, and what is taken instead.

    An iterable that is no list (a ``Path.glob`` generator, a set, ``dict.values()``) is told
    to become one: ``analyze`` takes a list of checkpoints (a trajectory, in its order), and
    gave the generic message only after the data was read twice (found in review).
    """
    kind = type(checkpoint).__name__
    taken = f"{_ONE_CHECKPOINT}, or a list of these (a trajectory, in its order)"
    if isinstance(checkpoint, (str, bytes, Tensor)) or not isinstance(checkpoint, Iterable):
        return f"{what} is a {kind}; pass {taken}"
    order = (
        "a set has no order"
        if isinstance(checkpoint, (set, frozenset))
        else "only a list or a tuple is read as a trajectory"
    )
    return (
        f"{what} is a {kind}; pass {taken}: {order}. Wrap it in sorted(...) to order the files "
        'by name, e.g. checkpoint=sorted(Path(d).glob("*.pt")) (check that the names sort in '
        "training order: step_10.pt sorts before step_9.pt unless zero-padded), or in list(...) "
        "where it is in training order already"
    )


_SAVE_STATE_DICT = (
    "save the model's state_dict on its own (torch.save(model.state_dict(), path)), or in a "
    'dict beside the rest (torch.save({"model": model.state_dict(), "optimizer": '
    "optimizer.state_dict()}, path))"
)


def _file_content_message(content: Any, source: str) -> str:
    """Why the file ``source``, which holds ``content`` (no mapping), is no checkpoint, and what
    to save instead. Its list was blamed on the argument before, as if the caller had passed a
    list ("pass a file path ... only a list or a tuple is read as a trajectory"), without naming
    the file (found in review)."""
    kind = type(content).__name__
    if isinstance(content, Tensor):
        return (
            f"checkpoint {source} holds a single tensor of shape {list(content.shape)}, not a "
            f"state_dict (a dict of parameter names to tensors): {_SAVE_STATE_DICT}"
        )
    if isinstance(content, (list, tuple)):
        maps = [i for i, item in enumerate(content) if isinstance(item, Mapping)]
        sds = [i for i in maps if _is_state_dict(content[i])]
        n = len(content)
        pick = (
            f" Its item {sds[0]} is a state_dict: pass checkpoint=torch.load(path, "
            f"weights_only=True)[{sds[0]}], or"
            if sds
            else " Instead,"
        )
        return (
            f"checkpoint {source} holds a {kind} of {n} item{'s' if n != 1 else ''}, not a "
            "state_dict: a list inside one file is not read as a trajectory (a trajectory is a "
            f"list of checkpoints passed as the checkpoint, one file or state_dict each).{pick} "
            f"{_SAVE_STATE_DICT}"
        )
    return f"checkpoint {source} holds a {kind}, not a state_dict: {_SAVE_STATE_DICT}"


_EXTRA_STATE = "_extra_state"
"""The key torch gives a module's ``get_extra_state()`` in a ``state_dict`` (after its prefix)."""


def _is_extra_state(key: Any) -> bool:
    """Whether ``key`` names a module's extra state (``get_extra_state``, any object), which a
    ``state_dict`` holds beside the tensors as ``"<module>._extra_state"``."""
    return isinstance(key, str) and (key == _EXTRA_STATE or key.endswith("." + _EXTRA_STATE))


def _is_state_dict(obj: Any) -> bool:
    """Whether ``obj`` is a ``state_dict``: names to tensors, and to any object under extra-state
    keys (a module's ``get_extra_state``; refused before as "missing keys ['0._extra_state']",
    found in review s23)."""
    return (
        isinstance(obj, Mapping)
        and any(isinstance(v, Tensor) for v in obj.values())
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, Tensor) or _is_extra_state(k) for k, v in obj.items())
    )


def resolve_state_dict(
    checkpoint: Any, map_location: Any = "cpu", source: str = "checkpoint", mmap: bool = False
) -> dict[str, Tensor]:
    """The ``state_dict`` inside ``checkpoint`` (a path, a state_dict or a wrapper dict; a path
    read with ``mmap`` as :func:`read_checkpoint`).

    Raises:
        FileNotFoundError, CheckpointError: for unreadable files or contents without a state_dict
            (a file holding a list, a tuple or a tensor: naming the file and what it holds; one
            of curvlab's own states, a ``Diagnostics``, ``NoisyOptimizer`` or penalty
            ``state_dict()``: naming which), or a state_dict whose tensors are on the meta
            device (no values).
        TypeError: for a checkpoint argument of another type.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        source = f"'{checkpoint}'"
        checkpoint = read_checkpoint(checkpoint, map_location, mmap=mmap)
        if not isinstance(checkpoint, (Mapping, nn.Module)):
            raise CheckpointError(_file_content_message(checkpoint, source))
    return _held(_state_dict_in(checkpoint, source), source)


def _state_dict_in(checkpoint: Any, source: str) -> dict[str, Tensor]:
    """The ``state_dict`` inside ``checkpoint`` (a file's contents, a state_dict, a wrapper dict
    or a module): :func:`resolve_state_dict` after reading the file."""
    if isinstance(checkpoint, nn.Module):
        return dict(checkpoint.state_dict())
    if not isinstance(checkpoint, Mapping):
        raise TypeError(checkpoint_type_message(checkpoint, "checkpoint"))
    if _is_state_dict(checkpoint):
        return dict(checkpoint)
    for key in _WRAPPER_KEYS:
        inner = checkpoint.get(key)
        if isinstance(inner, nn.Module):
            return dict(inner.state_dict())
        if _is_state_dict(inner):
            return dict(inner)
    own = _curvlab_state(checkpoint)
    if own is not None:
        raise CheckpointError(
            f"checkpoint {source} is a curvlab {own}, not model weights: pass the "
            "model's checkpoint (its state_dict, or a file or dict holding it)"
        )
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, Tensor) or _is_extra_state(k)}
    if _is_state_dict(tensors):
        # a state_dict with a few extra entries (e.g. "epoch": 3); check_fits refuses it where
        # none of its keys is the model's
        return _TopLevelTensors(tensors, keys=[str(k) for k in checkpoint])
    raise CheckpointError(
        f"checkpoint {source} holds no state_dict: its top-level keys are "
        f"{_few([str(k) for k in checkpoint])}; expected parameter names or one of "
        f"{list(_WRAPPER_KEYS)}"
    )


_CURVLAB_STATES: tuple[tuple[str, frozenset[str]], ...] = (
    (
        "Diagnostics state (Diagnostics.state_dict(); the HuggingFace callback saves it as "
        "curvlab_diagnostics.pt beside the model's weights)",
        frozenset({"generator", "calls", "last_step", "exploded", "warm"}),
    ),
    (
        "NoisyOptimizer state (NoisyOptimizer.state_dict())",
        frozenset({"optimizer", "steps_taken", "generator", "sampler"}),
    ),
    (
        "penalty state (GradientNormPenalty.state_dict() or FisherPenalty.state_dict())",
        frozenset({"generator", "calls", "kind", "alpha", "cached_grads"}),
    ),
)
"""curvlab's own state layouts (their ``state_dict()`` keys each always holds): a file of one
passed as the checkpoint was read as a state_dict of its tensor entries, refused as "missing
keys [...]; unexpected keys ['generator']" (found in review s24)."""


def _curvlab_state(checkpoint: Mapping[Any, Any]) -> str | None:
    """Which of curvlab's own states (:data:`_CURVLAB_STATES`) ``checkpoint`` is, if any."""
    keys = {k for k in checkpoint if isinstance(k, str)}
    return next((name for name, needed in _CURVLAB_STATES if needed <= keys), None)


class _TopLevelTensors(dict):  # type: ignore[type-arg]
    """The tensor entries of a checkpoint dict that holds no state_dict under a known key (a
    state_dict saved with extra entries, ``{**sd, "epoch": 3}``), with the dict's top-level
    ``keys``: :func:`check_fits` refuses it as no state_dict where none of its keys is the
    model's (it was refused as a model mismatch: "missing keys [...]; unexpected keys
    ['generator']", found in review s24)."""

    def __init__(self, tensors: dict[str, Any], keys: list[str]) -> None:
        super().__init__(tensors)
        self.keys_of = keys


def _held(sd: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """``sd``, refused where its tensors are on the meta device (shapes without values): the
    finiteness check failed on them with torch's "Tensor.item() cannot be called on meta
    tensors" (found in review s23).

    Raises:
        CheckpointError: naming the checkpoint and its first meta tensor.
    """
    meta = [k for k, v in sd.items() if isinstance(v, Tensor) and v.is_meta]
    if meta:
        raise CheckpointError(
            f"checkpoint {source} holds tensors on the meta device ({_few(meta)}), which have "
            "shapes but no values to load: pass a state_dict of real tensors (one of a model "
            "built on 'cpu' or a GPU, or loaded from its file)"
        )
    return sd


def _match_prefix(sd: dict[str, Tensor], expected: set[str]) -> tuple[dict[str, Tensor], str]:
    """``sd`` with the stack of wrapper prefixes (:data:`_PREFIXES`, in any order and number)
    stripped that makes the most keys the model's, and that stack (``""``: none stripped).

    Keys that fit as they are stay as they are; a stack is stripped only when it makes more keys
    fit, and never when two keys would then share a name. Only one prefix was stripped before:
    a compiled model wrapped in DDP (``module._orig_mod.``, or ``_orig_mod.module.``) was refused
    (found in review).
    """
    if set(sd) == expected:
        return sd, ""
    best, best_stack, best_hits = sd, "", len(set(sd) & expected)
    for stack in _prefix_stacks(sd):
        stripped = {k[len(stack) :] if k.startswith(stack) else k: v for k, v in sd.items()}
        if len(stripped) < len(sd):  # two keys on one name: one would be lost
            continue
        hits = len(set(stripped) & expected)
        if hits > best_hits:
            best, best_stack, best_hits = stripped, stack, hits
    return best, best_stack


def _prefix_stacks(keys: Iterable[str]) -> list[str]:
    """Every stack of known wrapper prefixes that a key starts with, shortest first
    (``"module._orig_mod.0.weight"`` gives ``"module."`` and ``"module._orig_mod."``)."""
    found: set[str] = set()
    for key in keys:
        stack = ""
        while True:
            rest = key[len(stack) :]
            prefix = next((p for p in _PREFIXES if rest.startswith(p)), None)
            if prefix is None:
                break
            stack += prefix
            found.add(stack)
    return sorted(found, key=lambda s: (len(s), s))


def _prefix_advice(missing: list[str], unexpected: list[str]) -> str:
    """What to do about a prefix that tells a checkpoint's keys from the model's, or ``""``.

    A prefix (any, e.g. ``"backbone."``) that unexpected keys carry over missing ones (strip it),
    or that missing keys carry over unexpected ones (the checkpoint holds a submodule alone).
    """
    notes = []
    for extra, lacking, where in (
        (unexpected, set(missing), "checkpoint's"),
        (missing, set(unexpected), "model's"),
    ):
        counts: dict[str, int] = {}
        for key in extra:
            for i, ch in enumerate(key):
                if ch == "." and key[i + 1 :] in lacking:
                    counts[key[: i + 1]] = counts.get(key[: i + 1], 0) + 1
        if not counts:
            continue
        prefix, n = max(counts.items(), key=lambda kv: (kv[1], -len(kv[0])))
        if where == "checkpoint's":
            notes.append(
                f"the checkpoint's keys carry the prefix {prefix!r}, which the model's lack ({n} "
                f"fit without it): strip it "
                f"({{k.removeprefix({prefix!r}): v for k, v in state_dict.items()}}), or pass "
                f"the model the checkpoint was saved from (it holds this one as {prefix[:-1]!r})"
            )
        else:
            notes.append(
                f"the model's keys carry the prefix {prefix!r}, which the checkpoint's lack ({n} "
                f"fit with it): the checkpoint may hold the submodule {prefix[:-1]!r} alone; "
                f"measure that submodule, or load the checkpoint into it yourself "
                f"(model.{prefix[:-1]}.load_state_dict(state_dict)) and pass no checkpoint"
            )
    return "; ".join(notes)


def _tied(model: nn.Module) -> dict[str, list[str]]:
    """For every ``state_dict`` key whose tensor the model also holds under other keys (tied
    weights, e.g. GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``), those other keys."""
    keys: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, Tensor):  # not extra state (two modules may give one object)
            keys.setdefault(id(tensor), []).append(key)
    return {k: [o for o in ks if o != k] for ks in keys.values() if len(ks) > 1 for k in ks}


def _filled_by_torch(model: nn.Module) -> set[str]:
    """The keys ``load_state_dict(strict=True)`` fills itself when a state_dict lacks them: the
    ``num_batches_tracked`` of batch-norm layers (a buffer since torch 0.4.1; for a state_dict
    without version metadata, as curvlab passes it, ``_NormBase._load_from_state_dict`` keeps the
    layer's own count)."""
    from torch.nn.modules.batchnorm import _NormBase

    return {
        f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        for name, module in model.named_modules()
        if isinstance(module, _NormBase)
        and module.track_running_stats
        and module.num_batches_tracked is not None
    }


def _fill_tied(sd: dict[str, Tensor], tied: dict[str, list[str]], source: str) -> dict[str, Tensor]:
    """``sd`` with every tied key it lacks taken from the key it is tied to (a checkpoint written
    by HuggingFace's ``save_pretrained`` stores one of them).

    Raises:
        CheckpointError: if the checkpoint holds different values under keys the model ties (one
            tensor cannot hold both; torch would keep whichever it copies last).
    """
    out = dict(sd)
    for key, others in tied.items():
        present = [o for o in others if o in sd]
        if key in sd:
            for other in present:
                a, b = sd[key], sd[other]
                if key < other and a.shape == b.shape and not torch.equal(a, b.to(a)):
                    raise CheckpointError(
                        f"checkpoint {source} holds different values for {key!r} and "
                        f"{other!r}, which the model ties (one tensor): build the model "
                        "untied, as the checkpoint was saved from"
                    )
        elif present:
            out[key] = sd[present[0]]
    return out


def load_into(model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Copy ``state_dict`` into ``model`` after checking every key and shape (:func:`check_fits`).

    Accepts what ``model.load_state_dict(state_dict, strict=True)`` accepts (a module's extra
    state, a 0-dim parameter stored with shape ``[1]``), and a checkpoint that stores a tied
    weight under one of its names only (HuggingFace's ``save_pretrained`` leaves out
    ``lm_head.weight``, which the model ties to the input embedding): the tensor is loaded from
    the name present. A batch-norm layer's missing ``num_batches_tracked`` keeps the layer's own
    count, as torch does. Every other missing, unexpected or mis-shaped key is refused before
    anything is copied. Tensors are cast to the dtype of the model's (as ``load_state_dict``
    copies them): a value beyond the model's dtype's range is refused.

    Raises:
        CheckpointMismatchError: naming the missing, unexpected and mis-shaped keys.
        CheckpointError: if keys the model ties hold different values in the checkpoint, or a
            finite value becomes inf in the model's dtype.
    """
    model.load_state_dict(check_fits(model, state_dict, source), strict=True)


def check_fits(
    model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint"
) -> dict[str, Tensor]:
    """Check that ``state_dict`` fits ``model`` (what :func:`load_into` checks), loading nothing.

    Reads the model's keys, shapes and dtypes only: the model is left untouched (no tensor
    written, no version counter moved), so that every checkpoint can be checked before the data
    is read. Shapes are compared as ``load_state_dict`` compares them: a 0-dim tensor of the
    model takes a checkpoint's ``[1]``, and an uninitialized (lazy) one any shape. The
    checkpoint's floating-point tensors are cast to the model's dtype (``load_state_dict``
    copies them into the model's tensors), and checked to stay finite there.

    Returns:
        ``state_dict`` as :func:`load_into` loads it: wrapper prefixes stripped, tied weights
        filled from the name present.

    Raises:
        CheckpointMismatchError: naming the missing, unexpected and mis-shaped keys.
        CheckpointError: if ``state_dict`` is the tensor entries of a dict without a state_dict
            (:func:`resolve_state_dict`'s last resort) none of whose keys is the model's, if keys
            the model ties hold different values in the checkpoint, or a finite value of the
            checkpoint overflows the model's dtype (a float32 ``1e5`` in a
            float16 model, whose largest value is 65504), naming the key and both dtypes.
    """
    expected = model.state_dict()
    tied = _tied(model)
    matched, stripped = _match_prefix(state_dict, set(expected))
    if isinstance(state_dict, _TopLevelTensors) and not set(matched) & set(expected):
        raise CheckpointError(
            f"checkpoint {source} holds no state_dict of this model: its top-level keys are "
            f"{_few(state_dict.keys_of)}, and none of its tensor entries "
            f"{_few(list(state_dict))} is one of the model's parameters or buffers; expected "
            f"parameter names or one of {list(_WRAPPER_KEYS)}"
        )
    sd = _fill_tied(matched, tied, source)
    filled = _filled_by_torch(model)
    missing = [k for k in expected if k not in sd and k not in filled]
    unexpected = [k for k in sd if k not in expected]
    mis_shaped = {
        k: (tuple(sd[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in sd and not _shape_fits(sd[k], expected[k])
    }
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(
            source, missing, unexpected, mis_shaped, _prefix_advice(missing, unexpected), stripped
        )
    _check_casts(sd, expected, source)
    return sd


def _shape_fits(value: Any, target: Any) -> bool:
    """Whether ``load_state_dict`` takes ``value`` for the model's ``target``: the same shape, a
    ``[1]`` for a 0-dim tensor (torch's loading of 0.3's files: it was refused as "mis-shaped",
    found in review s23), any shape for an uninitialized (lazy) tensor, and anything for what is
    not a tensor on both sides (a module's extra state)."""
    if not (isinstance(value, Tensor) and isinstance(target, Tensor)):
        return True
    if nn.parameter.is_lazy(target):
        return True
    if target.dim() == 0 and tuple(value.shape) == (1,):
        return True
    return value.shape == target.shape


def _check_casts(sd: dict[str, Any], expected: dict[str, Any], source: str) -> None:
    """Refuse a finite floating-point value of the checkpoint that becomes inf when cast to the
    dtype of the model's tensor (as ``load_state_dict`` copies it): a float32 ``1e5`` in a float16
    model was refused after the data was read, as a checkpoint of a training that diverged
    (found in review s23). Only a cast to a narrower range is checked, by the largest magnitude
    of each tensor (rounding is monotone: where it stays finite, every value does), with one host
    read per device and dtype and no copy of a tensor.

    Raises:
        CheckpointError: naming the key, both dtypes and the checkpoint.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, Tensor, torch.dtype]]] = {}
    for key, target in expected.items():
        value = sd.get(key)
        if not (isinstance(value, Tensor) and isinstance(target, Tensor)):
            continue
        if not (value.is_floating_point() and target.is_floating_point()):
            continue
        if value.dtype == target.dtype or value.is_meta or value.numel() == 0:
            continue
        if torch.finfo(target.dtype).max < torch.finfo(value.dtype).max:
            groups.setdefault((value.device, value.dtype), []).append((key, value, target.dtype))
    for items in groups.values():
        peaks = torch.stack(
            [torch.maximum(v.detach().amax(), -v.detach().amin()) for _, v, _ in items]
        )
        for (key, value, dtype), peak in zip(items, peaks.cpu().tolist()):
            if not math.isfinite(peak):
                continue  # non-finite in the checkpoint itself: check_parameters_finite names it
            if math.isfinite(torch.tensor(peak, dtype=value.dtype).to(dtype).item()):
                continue
            have, want = (str(d).removeprefix("torch.") for d in (value.dtype, dtype))
            raise CheckpointError(
                f"checkpoint {source}: {key!r} holds values up to {peak:.4g} in magnitude "
                f"({have}), beyond the largest {want} value ({torch.finfo(dtype).max:.6g}): cast "
                f"to the model's dtype {want}, as loading copies it, they become inf. Measure the "
                f"model in {have} (e.g. model.to(torch.{have})), or pass a checkpoint whose values "
                f"fit {want}"
            )


def _registered(model: nn.Module) -> list[tuple[dict[str, Any], str, Tensor]]:
    """``(table, name, tensor)`` for every parameter and persistent buffer of ``model`` held in a
    module's ``_parameters``/``_buffers`` table (a tensor shared by two modules: once each)."""
    out = []
    for _, m in model.named_modules():
        for name, p in m._parameters.items():
            if p is not None:
                out.append((m._parameters, name, p))
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                out.append((m._buffers, name, b))
    return out


def own_copies(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with a copy of every tensor that shares memory with ``model``'s.

    A live ``model.state_dict()`` (or the model itself) given as one checkpoint of a trajectory
    holds the model's own memory: loading an earlier checkpoint overwrote it, and that
    checkpoint was measured twice (found in review: ``[init, model.state_dict()]`` reported
    init's value for both). Call this for every checkpoint before any is loaded.
    """
    held = {_storage(t) for _, _, t in _registered(model)}
    held.discard(None)
    return {
        k: v.detach().clone() if isinstance(v, Tensor) and _storage(v) in held else v
        for k, v in state_dict.items()
    }


def _storage(t: Tensor) -> tuple[str, int] | None:
    """The device and start of a tensor's storage (``None``: none to compare, e.g. empty)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return (str(t.device), ptr) if ptr else None


@contextmanager
def stand_ins(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Run a block that loads checkpoints into ``model`` without a trace on the user's tensors.

    In the block every parameter and persistent buffer (plain tensors; subclasses stay) is a
    stand-in: a tensor of the same memory with its own version counter (a ``Parameter`` again,
    with the original's ``requires_grad`` and attributes; tied weights one stand-in). Loading a
    checkpoint writes the model's memory as ``load_state_dict`` always does, but moves no version
    counter of the user's tensors. On exit the user's tensors are registered again and their
    values written back through ``.data`` (bit-identical, version counters untouched): a loss the
    user computed before the call can still run backward, and an operator built before it still
    takes products (found in review: both raised, every version counter had moved by four).
    Tensors of other types (a quantised subclass) are loaded in place and restored with
    ``load_state_dict``, which moves their version counters. A module's extra state
    (``get_extra_state``, which a checkpoint's replaces) is copied and set back on exit.

    Yields:
        A copy of ``model.state_dict()`` as it was (load it for "the model as given").
    """
    slots = _registered(model)
    clones: dict[int, Tensor] = {}  # one copy of each tensor, shared with ``original``
    for _, _, t in slots:
        if id(t) not in clones:
            clones[id(t)] = t.detach().clone()
    original = {
        k: clones[id(v)] if id(v) in clones else (v.detach().clone() if _is_tensor(v) else _copy(v))
        for k, v in model.state_dict(keep_vars=True).items()
    }
    stand: dict[int, Tensor] = {}
    users: dict[int, Tensor] = {}
    for table, name, t in slots:
        if type(t) not in (nn.Parameter, Tensor):
            continue
        if id(t) not in stand:
            alias = t.data  # the same memory, a version counter of its own
            if isinstance(t, nn.Parameter):
                alias = nn.Parameter(alias, requires_grad=t.requires_grad)
                alias.__dict__.update(t.__dict__)
            elif t.requires_grad:
                alias.requires_grad_(True)
            stand[id(t)], users[id(t)] = alias, t
        table[name] = stand[id(t)]
    try:
        yield original
    finally:
        for table, name, t in slots:
            if id(t) in stand:
                table[name] = t
        for i, t in users.items():
            t.data.copy_(clones[i])  # through .data: the values back, the version as it was
        now = model.state_dict()
        rest = {
            k: v
            for k, v in original.items()
            if _is_tensor(v) and _is_tensor(now.get(k)) and not _same_values(now[k], v)
        }
        # a module's extra state (any object) is set back as it was: a checkpoint's replaced it
        extra = {k: v for k, v in original.items() if _is_extra_state(k) and not _is_tensor(v)}
        if rest or extra:  # tensors without a stand-in (subclasses, a custom _save_to_state_dict)
            model.load_state_dict({**rest, **extra}, strict=False)


def _is_tensor(v: Any) -> bool:
    return isinstance(v, Tensor)


def _copy(v: Any) -> Any:
    """A deep copy of a module's extra state (``v`` itself where it cannot be copied): a module
    may give its live state, which loading a checkpoint's then changes in place."""
    try:
        return copy.deepcopy(v)
    except Exception:  # noqa: BLE001 - any object; an uncopyable one is kept as it is
        return v


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors hold the same values (NaN equal to NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.isclose(a, b.to(a.device), rtol=0, atol=0, equal_nan=True).all())
    return torch.equal(a, b.to(a.device))
