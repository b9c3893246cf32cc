"""The ``curvlab`` command (also ``python -m curvlab``): ``demo``, ``analyze`` and ``nqm``.

Errors in the user's input are reported as one line on stderr (``curvlab: error: ...``) with exit
code 2; when ``analyze`` measured nothing because every quantity failed, each reason gets a line
(exit code 1). Warnings are one line each (``curvlab: warning: ...``), without Python source
lines. Messages carry no terminal escape sequences. Set ``CURVLAB_DEBUG=1`` to see the full
traceback instead.

Example:
    >>> main(["--version"]) == 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from curvlab import _cli_parser as cli_parser
from curvlab._text import strip_ansi

__all__ = ["main", "build_parser", "load_object"]


class UsageError(ValueError):
    """A problem with the command line (reported as one line, exit code 2)."""


_DATA_FACTORIES = ("data", "make_data", "get_data")
"""What ``analyze`` looks for in the model's module when ``--data`` is not given, in order."""

_DEFAULT_TOP_K = 5
"""``curvlab.analyze``'s default ``k``, which ``--top-k`` sets (its help says so too)."""


class _Modules:
    """The user's modules of one command.

    A file (``path/to/file.py``) is executed once however many options name it, under a module
    name registered in ``sys.modules`` while the command runs: ``dataclasses``, ``typing`` and
    ``pickle`` look a class's module up there (a ``@dataclass`` under ``from __future__ import
    annotations`` fails without it). The name is the file's stem, or a private one when that name
    is taken. The file's folder and the working directory are on ``sys.path`` while the command
    runs, so the file imports the modules beside it as under ``python file.py``, the same under
    ``curvlab`` and ``python -m curvlab`` (the console script had neither, found in review); a
    dotted name is imported with the working directory on ``sys.path``. :meth:`close` removes
    what was registered and put on ``sys.path``, and the modules imported from those folders
    during the command (a ``model.py`` beside another file of that name in the next command is
    imported afresh).
    """

    def __init__(self) -> None:
        self._files: dict[Path, ModuleType] = {}
        self._registered: list[tuple[str, ModuleType]] = []
        self._paths: list[str] = []  # what this object put on sys.path
        # the folders the user's modules are imported from, whether this object put them on
        # sys.path or they were there already (python -c, Jupyter: the working directory)
        self._folders: set[str] = set()
        self._before = set(sys.modules)  # the names loaded before the command's imports

    def _on_path(self, folder: str) -> None:
        """Put ``folder`` on ``sys.path`` (after the entries this object put there first)."""
        self._folders.add(folder)
        if folder in sys.path or (folder == os.getcwd() and "" in sys.path):
            return
        sys.path.insert(len(self._paths), folder)
        self._paths.append(folder)

    def load(self, module_name: str, what: str) -> ModuleType:
        """The module ``module_name`` (a dotted name or a ``.py`` path) for option ``--what``.

        Raises:
            UsageError: naming the file or module that could not be imported.
        """
        if not (module_name.endswith(".py") or os.sep in module_name):
            self._on_path(os.getcwd())
            try:
                return importlib.import_module(module_name)
            except ImportError as exc:
                raise UsageError(
                    f"--{what}: cannot import module '{module_name}' ({exc})"
                ) from None
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"--{what}: file '{path}' does not exist")
        key = path.resolve()
        if key in self._files:
            return self._files[key]
        self._on_path(str(key.parent))  # as `python file.py` has it: the modules beside it
        self._on_path(os.getcwd())  # as `python -m curvlab` has it, whichever command runs
        name = _free_module_name(path.stem)
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise UsageError(f"--{what}: cannot import '{path}'")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except BaseException as exc:
            if sys.modules.get(name) is module:
                del sys.modules[name]
            if not isinstance(exc, Exception):
                raise
            raise UsageError(
                f"--{what}: importing '{path}' failed: {type(exc).__name__}: {exc}"
            ) from None
        self._registered.append((name, module))
        self._files[key] = module
        return module

    def close(self) -> None:
        """Unregister the files' modules from ``sys.modules``, take the folders this object put
        on ``sys.path`` off it, and unregister the modules imported from those folders (whose
        top-level package lies in one of them and was not loaded before)."""
        for name, module in reversed(self._registered):
            if sys.modules.get(name) is module:
                del sys.modules[name]
        # every folder the modules came from: a working directory already on sys.path kept
        # them otherwise, and a second command ran the stale model (found in review)
        folders = {Path(f).resolve() for f in self._folders}
        new = [n for n in list(sys.modules) if n not in self._before]
        # the top-level packages to drop first, then every module under them: popping as we go
        # found a package's submodules after the package itself was gone, and kept them (a
        # later `import pkg.mod` then lacked the attribute; found in review)
        drop = {
            n
            for n in new
            if "." not in n
            and n not in self._before
            and _imported_from(sys.modules.get(n), folders)
        }
        for name in new:
            if name.partition(".")[0] in drop:
                sys.modules.pop(name, None)
        for folder in self._paths:
            if folder in sys.path:
                sys.path.remove(folder)
        self._paths.clear()
        self._folders.clear()
        self._registered.clear()
        self._files.clear()


def _imported_from(module: ModuleType | None, folders: set[Path]) -> bool:
    """Whether ``module`` (a top-level one) was found directly in one of ``folders``
    (``folder/name.py`` or ``folder/name/__init__.py``), not in a package installed below it."""
    file = getattr(module, "__file__", None)
    if not file:
        return False
    where = Path(file).resolve().parent
    if Path(file).stem == "__init__":
        where = where.parent
    return where in folders


def _free_module_name(stem: str) -> str:
    """``stem`` when it is an identifier no loaded module has, else a private unused name."""
    if stem.isidentifier() and stem not in sys.modules:
        return stem
    base = "_curvlab_user_" + "".join(c if c.isalnum() else "_" for c in stem)
    name, n = base, 1
    while name in sys.modules:
        n += 1
        name = f"{base}_{n}"
    return name


def load_object(spec: str, what: str, modules: _Modules | None = None) -> Any:
    """The object named by ``"pkg.module:name"`` or ``"path/to/file.py:name"``.

    A file is executed as a module registered in ``sys.modules`` (as an import would), with its
    folder on ``sys.path`` (the modules beside it import); ``modules`` executes each file once per
    command and unregisters them (and takes the folders off ``sys.path``) when closed.

    Raises:
        UsageError: naming what could not be found.
    """
    if ":" not in spec or spec.endswith(":") or spec.startswith(":"):
        raise UsageError(
            f"--{what} must look like 'package.module:factory' or 'file.py:factory', got {spec!r}"
        )
    module_name, _, attr = spec.rpartition(":")
    module = (modules or _Modules()).load(module_name, what)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UsageError(f"--{what}: module '{module_name}' has no attribute '{attr}'") from None


def _is_factory(obj: Any) -> bool:
    """Whether ``obj`` (what ``--model``/``--data`` named) is a factory to call with no arguments:
    a function, a class, a method, a ``functools.partial``. A model and data are used as they
    are: every ``nn.Module`` is callable (its forward), and calling it failed with "missing 1
    required positional argument" (found in review); so are tensors, a ``DataLoader``, a
    ``Dataset`` and lists, tuples and dicts of batches, whatever ``__call__`` they define."""
    from torch import Tensor, nn
    from torch.utils.data import DataLoader, Dataset

    if isinstance(obj, (nn.Module, Tensor, DataLoader, Dataset, list, tuple, Mapping)):
        return False
    return callable(obj)


def _call_factory(obj: Any, what: str) -> Any:
    """``obj()`` when ``obj`` is a factory (:func:`_is_factory`), else ``obj`` itself.

    Raises:
        UsageError: naming the option and the factory's error.
    """
    if not _is_factory(obj):
        return obj
    try:
        return obj()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed
        raise UsageError(
            f"--{what}: calling the factory failed: {type(exc).__name__}: {exc}"
        ) from None


def _data_source(args: argparse.Namespace, modules: _Modules) -> tuple[str, Any]:
    """What ``--data`` names, or the first of ``data``, ``make_data``, ``get_data`` in the model's
    module (its name, ``""`` for ``--data``, and the object; imported, not yet called).

    Raises:
        UsageError: when there is none, or naming what could not be imported.
    """
    if args.data is not None:
        return "", load_object(args.data, "data", modules)
    module_name = args.model.rpartition(":")[0]
    module = modules.load(module_name, "model")  # loaded for --model already: not run again
    for name in _DATA_FACTORIES:
        factory = getattr(module, name, None)
        if factory is None or isinstance(factory, ModuleType):  # e.g. torch.utils.data
            continue
        return name, factory
    raise UsageError(
        "no data: pass --data pkg.module:factory (returning (inputs, targets) or a list "
        "of such batches), or define data() in the model's module"
    )


def _data(args: argparse.Namespace, name: str, factory: Any) -> Any:
    """The data of :func:`_data_source`: the factory's result, or the object itself.

    Raises:
        UsageError: naming the factory that failed and its error.
    """
    if not name:
        return _call_factory(factory, "data")
    module_name = args.model.rpartition(":")[0]
    if _is_factory(factory):
        try:
            return factory()
        except Exception as exc:  # noqa: BLE001 - the user's factory failed
            raise UsageError(
                f"{name}() of the --model module '{module_name}' (the data, as --data was not "
                f"given) failed: {type(exc).__name__}: {exc}"
            ) from None
    return factory


def _quantities(text: str | None) -> list[str] | None:
    """``--quantities`` as a list, refusing the quantities the command cannot measure (before the
    model is imported).

    Raises:
        UsageError: for ``noise_scale_dp`` (needs torch.distributed) and the quantities that read
            the training loop's optimizer.
    """
    if text is None:
        return None
    from curvlab.analysis._sharpness import OPTIMIZER_QUANTITIES

    names = [q.strip() for q in text.split(",")]
    if not any(names) or not all(names):  # "a,,b" dropped the empty entry (review s20)
        raise UsageError(
            f"--quantities {text!r} has an empty entry: pass comma-separated names, e.g. "
            "--quantities loss,trace_hessian"
        )
    if "noise_scale_dp" in names:
        raise UsageError(
            "noise_scale_dp needs torch.distributed (the ranks' gradients), which the curvlab "
            "command does not start; use noise_scale (one process) or measure noise_scale_dp "
            "with cl.analyze / cl.Diagnostics inside your torchrun job"
        )
    optimizer = [q for q in names if q in OPTIMIZER_QUANTITIES]
    if optimizer:
        raise UsageError(
            f"--quantities {optimizer} read the training loop's optimizer, which the curvlab "
            "command has not: measure them with cl.Diagnostics(model, loss_fn, "
            "quantities=[...], optimizer=opt)"
        )
    return names


def _check_known(names: list[str] | None) -> None:
    """Refuse unknown ``--quantities``, listing those the command measures (after the user's
    modules are imported, which may register more; before their factories are called).

    Raises:
        UsageError: naming the unknown quantities.
    """
    if names is None:
        return
    from curvlab.analysis._measures import QUANTITIES
    from curvlab.analysis._registry import MEASUREMENTS
    from curvlab.analysis._sharpness import OPTIMIZER_QUANTITIES

    refused = (*OPTIMIZER_QUANTITIES, "noise_scale_dp")
    known = [n for r in MEASUREMENTS for n in r.names]
    rank = {n: i for i, n in enumerate(QUANTITIES)}
    allowed = sorted((n for n in known if n not in refused), key=lambda n: rank.get(n, len(rank)))
    unknown = [q for q in names if q not in allowed]
    if unknown or not names:
        raise UsageError(
            f"--quantities: {'unknown ' + str(unknown) if unknown else 'empty'}; choose from "
            f"{', '.join(allowed)}"
        )


def _loss(name: str, reduction: str) -> Any:
    from torch import nn

    return {
        "cross_entropy": nn.CrossEntropyLoss,
        "mse": nn.MSELoss,
        "bce": nn.BCEWithLogitsLoss,
    }[name](reduction=reduction)


# ---------------------------------------------------------------------- subcommands
def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from curvlab._rng import SEED_RANGE
    from curvlab.analysis._report import check_matplotlib
    from curvlab.demo._train import DemoConfig, check_demo_out, run_demo

    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    top = SEED_RANGE[1] - args.seeds - 1  # the runs seed torch with seed + k + 2 for k < seeds
    if args.seed > top:
        raise UsageError(
            f"--seed must be at most 2**64 - 2 - seeds = {top} with --seeds {args.seeds} (the "
            f"runs seed torch with seed + k + 1 and seed + k + 2 for k < seeds), got {args.seed}"
        )
    cfg = replace(
        DemoConfig.quick() if args.quick else DemoConfig(), seed=args.seed, seeds=args.seeds
    )
    if args.steps is not None:
        cfg = cfg.with_steps(args.steps)
    out = Path(args.out)
    # --out after every other option, and what --overwrite would not get past (a file, an
    # unwritable folder, a taken output name, the user's own logs) before the clash it would
    # (found in review s22); all before any training
    cli_parser.check_out_folder(out)
    check_demo_out(out, cfg, overwrite=args.overwrite)
    check_matplotlib()  # the report's figures need it: a broken install fails before training
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = run_demo(
            out, cfg, overwrite=args.overwrite, progress=False if args.no_progress else None
        )
    finally:
        torch.set_num_threads(threads)
    print(report.summary())
    # the runs' settings, the headline and the regime (the same text as the report's top)
    for key in ("demo_settings", "demo_headline", "demo_regime"):
        if key in report.meta:
            print(report.meta[key])
    print(f"\nwrote {out / 'report.html'} (open it in a browser)")
    return 0


def _run_analyze(args: argparse.Namespace) -> int:
    modules = _Modules()
    try:
        return _analyze(args, modules)
    finally:
        modules.close()


def _analyze(args: argparse.Namespace, modules: _Modules) -> int:
    from torch import nn

    from curvlab.analysis._analyze import FirstBatchError, analyze
    from curvlab.analysis._checkpoint import check_map_location, checkpoint_labels
    from curvlab.analysis._report import check_matplotlib, check_report_names

    out = Path(args.out)
    check_map_location(args.map_location, name="--map-location")  # before the model is built
    if args.num_probes < 2:  # (analyze refuses it too, but only after the model was built)
        raise UsageError(
            f"--num-probes must be >= 2: Tr(H) and B_noise are reported with a standard error "
            f"over their probes, which needs two; got {args.num_probes}"
        )
    _check_checkpoint_files(args.checkpoint or [])
    quantities = _quantities(args.quantities)
    # --out last, after every other option, and what --overwrite would not get past (a file, an
    # unwritable folder, an output name taken by a folder) before the clash it would: the clash
    # was reported first, and "pass --overwrite" then met another refusal (found in review s22)
    cli_parser.check_out_folder(out)  # before anything is measured
    check_report_names(out, "the report")  # (it failed after measuring, found in review s22)
    # an existing empty folder is written into, as Report.save does (review s22)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out '{out}' already exists; pass --overwrite or choose another folder")
    check_matplotlib()  # the report's figures need it: fail here, not after measuring
    # the user's modules are imported (they may register quantities), the quantities checked,
    # and only then the factories called: a misspelt quantity was refused after both factories
    # ran (a from_pretrained, a data set's tokenization; found in review)
    model_factory = load_object(args.model, "model", modules)
    data_name, data_factory = _data_source(args, modules)
    _check_known(quantities)
    model = _call_factory(model_factory, "model")
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model must name an nn.Module or a factory returning one, got {type(model).__name__}"
        )
    if args.checkpoint:  # the command's own model: a lazy one takes its shapes from them
        _materialize(model, args.checkpoint[0], args.map_location)
    _refuse_lazy(model, args.checkpoint)  # lazy modules: before the data factory runs
    _check_top_k(model, args.top_k, quantities)  # before the data factory runs, too
    _check_checkpoints_fit(model, args.checkpoint or [], args.map_location)  # and this
    data = _data(args, data_name, data_factory)
    checkpoints: Any = None
    labels = None
    if args.checkpoint:
        checkpoints = args.checkpoint if len(args.checkpoint) > 1 else args.checkpoint[0]
        labels = checkpoint_labels(args.checkpoint)  # runA/last.pt and runB/last.pt kept apart
    try:
        report = analyze(
            model,
            _loss(args.loss, args.reduction),
            data,
            checkpoint=checkpoints,
            labels=labels,
            quantities=quantities,
            map_location=args.map_location,
            seed=args.seed,
            num_probes=args.num_probes,
            k=args.top_k,
            num_steps=args.lanczos_steps,
            nqm=not args.no_nqm,
            density_probes=args.density_probes,
            progress=False if args.no_progress else None,
        )
    except FirstBatchError as exc:  # the data does not fit the model: name where it came from
        raise UsageError(
            f"{exc.failure}; check that {_data_named(args, data_name, data_factory)} gives "
            f"batches that --model {args.model} takes"
        ) from exc
    report.save(out, overwrite=args.overwrite)
    print(report.summary())
    print(f"\nwrote {out / 'report.html'}")
    return 0


def _data_named(args: argparse.Namespace, name: str, factory: Any) -> str:
    """How a message names the data of :func:`_data_source`: ``--data SPEC``, or the factory (or
    object) of the ``--model`` module that gave it."""
    if not name:
        return f"--data {args.data}"
    called = "()" if _is_factory(factory) else ""
    return f"{name}{called} of the --model module '{args.model.rpartition(':')[0]}'"


def _check_checkpoints_fit(model: Any, checkpoints: Sequence[str], map_location: Any) -> None:
    """Read every ``--checkpoint`` and check it against the ``--model`` (a state dict inside,
    finite values, the model's keys and shapes) before the data factory runs, as
    :func:`curvlab.analyze` does before it reads the data: a checkpoint of another model was
    refused only after the factory ran (found in review s21). One at a time, nothing loaded
    into the model.

    Raises:
        CheckpointError, CheckpointMismatchError, NonFiniteError: naming the checkpoint.
    """
    if not checkpoints:
        return
    from curvlab._scan import model_device
    from curvlab.analysis._analyze import _check_checkpoints_fit as check

    location = model_device(model) if map_location is None else map_location
    check(model, list(checkpoints), location)


def _materialize(model: Any, checkpoint: str, map_location: Any) -> None:
    """Load the first ``--checkpoint`` into a ``--model`` with lazy (uninitialized) modules,
    which materializes them with its shapes and values (torch's lazy modules do so on
    ``load_state_dict``): the model is the command's own, and every checkpoint is loaded into it
    again before it is measured. Refused after review s18 as "run one forward pass first", which
    a command line cannot do; a model without lazy modules is left alone, as is one that this
    checkpoint does not fit (the refusal then names the lazy modules).

    The checkpoint fits as :func:`~curvlab.analysis._checkpoint.check_fits` decides for the
    model built: wrapper prefixes stacked in any order (Lightning's ``"model."``), a batch-norm
    layer's missing ``num_batches_tracked``, a tied weight stored once. Only the exact keys after
    ``""``, ``"module."`` or ``"_orig_mod."`` were taken before: a checkpoint the command took
    for the model built did not materialize the lazy one (found in review s23)."""
    from curvlab._scan import scan_model
    from curvlab.analysis._checkpoint import check_fits, resolve_state_dict

    if not scan_model(model).lazy:
        return
    # read onto the CPU where no --map-location is given: load_state_dict copies each tensor to
    # the device of the model's (the lazy ones materialize there)
    state = resolve_state_dict(checkpoint, "cpu" if map_location is None else map_location)
    with contextlib.suppress(RuntimeError, ValueError):  # analyze names a mismatch
        model.load_state_dict(check_fits(model, state, f"'{checkpoint}'"), strict=True)


def _check_top_k(model: Any, top_k: int | None, quantities: list[str] | None) -> None:
    """Refuse a ``--top-k`` above the ``--model``'s trainable parameters before the data factory
    runs, as :func:`curvlab.analyze` does before it reads the data (a given ``--top-k``, or
    ``top_eigenvalues`` named in ``--quantities``): the factory, a data set's download or
    tokenization, ran first (found in review s19). Without ``--top-k`` the message says that
    ``k=5`` is the default and how to set it: it blamed ``--top-k``, which the user had not
    given (found in review s20).

    Raises:
        UsageError: naming ``--top-k`` (and the default, where it was not given) and the
            parameter count.
    """
    from curvlab._scan import scan_model
    from curvlab.analysis._analyze import _check_top_k as check
    from curvlab.analysis._measures import ANALYZE_DEFAULT

    if top_k is None and quantities is None:  # the default k in the default set: see analyze
        return
    try:
        names = ANALYZE_DEFAULT if quantities is None else quantities
        check(model, _DEFAULT_TOP_K if top_k is None else top_k, names)
    except ValueError as exc:
        if top_k is not None:
            raise UsageError(str(exc)) from None
        dim = sum(p.numel() for p in scan_model(model).trainable.values())
        raise UsageError(
            f"top_eigenvalues (in --quantities) asks for the k={_DEFAULT_TOP_K} largest "
            f"eigenvalues (the default, as --top-k was not given) of a model with {dim} "
            f"trainable parameters: pass --top-k K with K <= {dim}, or leave top_eigenvalues "
            "out of --quantities"
        ) from None


def _refuse_lazy(model: Any, checkpoints: Sequence[str] | None) -> None:
    """Refuse a ``--model`` still lazy (uninitialized) after :func:`_materialize`, with the
    way out a command line has: ``--checkpoint``. The library's refusal said to "run one forward
    pass ... or load a checkpoint into the model (model.load_state_dict(...))", which a command
    line cannot do (found in review s19).

    Raises:
        UsageError: naming the uninitialized tensors, and ``--checkpoint`` (or, where one was
            given, that it does not fit the model).
    """
    from curvlab._scan import refuse_lazy

    try:
        refuse_lazy(model, "--model")
    except ValueError as exc:
        head = str(exc).split(" Materialize them first:")[0].rstrip(".")
        if checkpoints:
            how = (
                f"The first --checkpoint '{checkpoints[0]}' did not load into it (its entries or "
                "shapes are not the model's), so it could not materialize them: pass a checkpoint "
                "of this model first"
            )
        else:
            how = (
                "Pass --checkpoint PATH: the first checkpoint is loaded into the model, which "
                "materializes them with its shapes and values (or have the --model factory run "
                "one forward pass on example inputs before it returns the model)"
            )
        raise UsageError(f"{head}. {how}") from None


def _check_checkpoint_files(paths: Sequence[str]) -> None:
    """Refuse a ``--checkpoint`` that is no file before the model is built and the data read (a
    misspelt path was found only after both, found in review).

    Raises:
        UsageError: naming the missing file, or the folder given instead of a file and the file
            inside it to pass (a ``save_pretrained`` folder's ``model.safetensors``).
    """
    from curvlab.analysis._checkpoint import folder_checkpoint_message

    for path in paths:
        p = Path(path)
        if not p.exists():
            raise UsageError(f"--checkpoint: checkpoint file '{p}' does not exist")
        if p.is_dir():
            raise UsageError(f"--checkpoint: {folder_checkpoint_message(p, '--checkpoint ')}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvlab`` command (:mod:`curvlab._cli_parser`)."""
    return cli_parser.build_parser(_run_demo, _run_analyze)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Print a warning as one line, ``curvlab: warning: ...``, without the Python source line."""
    text = " ".join(strip_ansi(str(message)).split())
    print(f"curvlab: warning: {text}", file=file if file is not None else sys.stderr, flush=True)


def _report_error(exc: Exception) -> int:
    """Print ``exc`` as ``curvlab: error: ...`` line(s) and return the exit code."""
    from curvlab.analysis._analyze import AnalysisError

    if isinstance(exc, AnalysisError):
        print(
            "curvlab: error: every requested quantity failed, nothing was written:", file=sys.stderr
        )
        for reason in exc.reasons:
            print(f"curvlab: error:   {' '.join(reason.split())}", file=sys.stderr)
        return 1
    # a refusal with ways out of its own for the command line (a checkpoint weights_only=True
    # refuses: allow its class in the --model module; review s27)
    text = strip_ansi(str(getattr(exc, "cli_message", exc))).strip()
    message = text.splitlines()[0] if text else type(exc).__name__
    kind = (
        ""
        if isinstance(exc, (UsageError, ValueError, FileExistsError))
        else f"{type(exc).__name__}: "
    )
    print(f"curvlab: error: {kind}{message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvlab`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from curvlab import __version__

        print(f"curvlab {__version__}")
        return 0
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(func(args) or 0)
        except KeyboardInterrupt:
            print("curvlab: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - clear lines instead of a traceback
            if os.environ.get("CURVLAB_DEBUG"):
                raise
            return _report_error(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
