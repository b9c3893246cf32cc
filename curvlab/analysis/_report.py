"""The result of :func:`curvlab.analyze`: numbers, per-layer breakdowns, figures and an HTML page.

Example:
    >>> import torch, curvlab as cl
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    >>> report = cl.analyze(model, torch.nn.CrossEntropyLoss(), (X, y), quantities=["loss"])
    >>> abs(report["loss"] - torch.nn.CrossEntropyLoss()(model(X), y).item()) < 1e-5
    True
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import secrets
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curvlab._warn import user_stacklevel
from curvlab.analysis import _plotting as plotting
from curvlab.analysis._glossary import (
    STDERR_KEYS,
    as_number,
    nqm_in_examples,
    nqm_probe_spread,
    top_residual,
    uncertainty,
)
from curvlab.analysis._page import render_html

__all__ = ["Report"]

_FIGURES = (
    ("training.png", plotting.plot_histories, "Training runs"),
    ("spectrum.png", plotting.plot_spectrum, "Hessian spectrum"),
    ("layers.png", plotting.plot_layers, "Per layer"),
    ("trajectory.png", plotting.plot_trajectory, "Across the checkpoints"),
    ("nqm.png", plotting.plot_nqm, "Noisy quadratic model"),
    ("sharpness.png", plotting.plot_sharpness, "Sharpness and its stability thresholds"),
    ("critical_batch_size.png", plotting.plot_critical_batch, "Critical batch size three ways"),
)
_FIGURE_NAMES = frozenset(f for f, _, _ in _FIGURES)
_WRITTEN = ("report.json", "report.html") + tuple(f for f, _, _ in _FIGURES)


def _clean(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


_TEXT_KEYS = frozenset({"label", "checkpoint", "note", "batch_size_unit", "noise"})
"""Keys whose values are text, never a number (a label ``"nan"`` stays a string)."""


def _unclean(x: Any) -> Any:
    """:func:`_clean` undone in the number positions of a report: the strings ``"inf"``,
    ``"-inf"``, ``"nan"`` become floats again (a new copy; text keys, :data:`_TEXT_KEYS`, as
    they are)."""
    if isinstance(x, str):
        number = as_number(x)
        return x if number is None else number
    if isinstance(x, dict):
        return {k: v if k in _TEXT_KEYS else _unclean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unclean(v) for v in x]
    return x


def _unclean_entry(entry: Any) -> Any:
    """An entry of a loaded report.json with its numbers restored: ``values``, ``per_layer``,
    ``arrays``, ``nqm`` and ``seconds`` hold numbers; ``label`` and ``errors`` are text."""
    if not isinstance(entry, dict):
        return entry
    numeric = ("values", "per_layer", "arrays", "nqm", "seconds")
    return {k: _unclean(v) if k in numeric else v for k, v in entry.items()}


_HISTORY_NUMBERS = frozenset(
    {"series", "batch_size", "updates", "epochs", "lr", "momentum", "seconds"}
)
"""The keys of a run's history that hold numbers (its ``noise`` and any other are text)."""


def _history_problem(history: Any) -> str | None:
    """What is wrong with one run's history of a report dict (``None`` if nothing): the
    figures read ``history["series"][name]["step"]`` and ``["value"]``, paired."""
    if not isinstance(history, dict):
        return f" is {type(history).__name__}, not a dict"
    if "series" not in history:
        return (
            f" has no 'series' key (a dict of {{name: {{'step': [...], 'value': [...]}}}}); "
            f"its keys are {sorted(map(str, history))}"
        )
    series = history["series"]
    if not isinstance(series, dict):
        return f"['series'] is {type(series).__name__}, not a dict"
    for name, s in series.items():
        where = f"['series'][{name!r}]"
        if not isinstance(s, dict):
            return f"{where} is {type(s).__name__}, not a dict"
        for key in ("step", "value"):
            if key not in s:
                return f"{where} has no {key!r} key; its keys are {sorted(map(str, s))}"
            if not isinstance(s[key], (list, tuple)):
                return f"{where}[{key!r}] is {type(s[key]).__name__}, not a list"
        if len(s["step"]) != len(s["value"]):
            return f"{where} has {len(s['step'])} steps but {len(s['value'])} values"
    return None


def _missing_folders(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` would create, deepest first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _written_by_earlier_report(out: Path) -> set[str]:
    """The figures an earlier report in ``out`` wrote: those its ``report.json`` lists (only
    names a report writes; none when there is no readable ``report.json``)."""
    try:
        with open(out / "report.json", encoding="utf-8") as f:
            listed = json.load(f).get("figures")
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(listed, list):
        return set()
    return {name for name in listed if isinstance(name, str) and name in _FIGURE_NAMES}


_ASIDE = "replaced"
"""Subfolder of the staging folder that holds the files a save replaces until it has succeeded."""


def _swap_in(
    staging: Path, out: Path, names: list[str], stale: set[str], what: str = "Report.save"
) -> bool:
    """Move the files ``names`` from ``staging`` into ``out``, all of them or none.

    The files of ``out`` they replace, and ``stale`` (an earlier report's figures that this one
    does not write), are first moved aside into ``staging / _ASIDE``, then the new files are
    moved in: renames within one folder, or, where a folder of ``out`` is a symbolic link onto
    another file system, a copy renamed in (:func:`_move`: a demo's ``diagnostics/`` linked
    onto another disk failed after all the training with a raw ``EXDEV`` error naming the
    staging folder, found in review s22). A failure at any move (an ``OSError``, a
    ``KeyboardInterrupt``) puts every file back where it was before re-raising: moving the files
    one at a time left a mix of new and old files when the third move failed (found in review).
    Should putting back fail as well, the files not put back stay in the staging folder (it is
    then not removed) and a ``RuntimeWarning`` says where, naming the writer ``what``
    (``Report.save``, ``curvlab nqm``, ``curvlab demo``). Returns ``True`` once all moved.

    A name may hold folders (``diagnostics/SB/metrics.jsonl``, as ``curvlab demo`` swaps its
    training logs in with its report): the folders missing in ``out`` are made for it, and removed
    again should the swap fail.
    """
    aside = staging / _ASIDE
    aside.mkdir()
    moved_aside: list[str] = []
    moved_in: list[str] = []
    made: list[Path] = []  # folders made in ``out`` for the new files, shallowest first
    try:
        for name in sorted(set(names) | stale):
            old = out / name
            # a folder of that name stays: moving the new file onto it fails, as it did before
            if os.path.lexists(old) and (old.is_symlink() or not old.is_dir()):
                (aside / name).parent.mkdir(parents=True, exist_ok=True)
                _move(old, aside / name)
                moved_aside.append(name)
        for name in names:
            missing = _missing_folders((out / name).parent)
            for folder in reversed(missing):
                folder.mkdir()
                made.append(folder)
            _move(staging / name, out / name)
            moved_in.append(name)
    except BaseException as exc:
        not_back = _put_back(out, aside, moved_in, moved_aside)
        for folder in reversed(made):  # deepest first; one that is not empty stays
            with contextlib.suppress(BaseException):
                folder.rmdir()
        if not_back:
            msg = (
                f"{what} failed and could not put back the earlier run's files "
                f"{not_back}: they are kept in '{aside}'; move them into '{out}' by hand"
            )
            note = getattr(exc, "add_note", None)  # Python >= 3.11
            if note is not None:
                note(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=user_stacklevel())
        raise
    return True


def _move(src: Path, dst: Path) -> None:
    """Move the file (or symbolic link) ``src`` to ``dst``, replacing it: ``os.replace``, or
    where the two are on different file systems (``EXDEV``: a folder on the way is a symbolic
    link onto another disk) a copy into ``dst``'s folder renamed over ``dst``, then ``src``
    removed. Either way ``dst`` is replaced at once (never a partial file there), and a move
    that fails or is interrupted before ``dst`` is replaced leaves ``src`` (and ``dst``) as they
    were: a copy that stopped halfway is removed."""
    try:
        os.replace(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.curvlab-tmp")  # dst's file system
    try:
        shutil.copy2(src, tmp, follow_symlinks=False)  # a symbolic link is moved as one
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(BaseException):
            tmp.unlink(missing_ok=True)
        raise
    src.unlink()


def _put_back(out: Path, aside: Path, moved_in: list[str], moved_aside: list[str]) -> list[str]:
    """Undo :func:`_swap_in`'s moves; returns the names of earlier files not put back."""
    had = set(moved_aside)
    for name in reversed(moved_in):
        if name not in had:  # a new file with no namesake before it goes; the others are
            with contextlib.suppress(BaseException):  # overwritten by their earlier files below
                (out / name).unlink(missing_ok=True)
    not_back = []
    for name in reversed(moved_aside):  # over the new file of that name, if it went in
        try:
            _move(aside / name, out / name)
        except BaseException:  # noqa: BLE001 - put back as much as possible
            not_back.append(name)
    return sorted(not_back)


def check_report_names(out: Path, what: str = "a report") -> None:
    """Refuse an ``out`` where a name :meth:`Report.save` writes (``report.json``,
    ``report.html``, the figures) is taken by a folder or anything else that is neither a
    regular file nor a symbolic link: it can be neither written nor replaced, with or without
    ``overwrite``. Checked before anything is measured (``curvlab analyze``), trained
    (``curvlab demo``) or drawn (:meth:`Report.save`): it failed after all of it, with a raw
    ``IsADirectoryError`` naming a hidden staging path (found in review s22).

    Raises:
        ValueError: naming the path, what it is, and what to do.
    """
    refuse_non_files(
        (out / name for name in _WRITTEN),
        f"{what} writes a file of that name",
        "overwrite (--overwrite)",
        "folder",
    )


def refuse_non_files(paths: Iterable[Path], writes: str, flag: str, other: str) -> None:
    """Refuse the first of ``paths`` that exists and is neither a regular file nor a symbolic
    link (a folder, a device): a file of that name cannot be written or swapped in there.

    Args:
        paths: the files a writer will write.
        writes: what writes them, for the message ("the report writes a file of that name").
        flag: the overwrite option, for the message.
        other: what to choose instead, for the message ("folder", "--out").

    Raises:
        ValueError: naming the path, what it is, and what to do.
    """
    for path in paths:
        if path.is_symlink() or not os.path.lexists(path):
            continue
        if not stat.S_ISREG(os.lstat(path).st_mode):
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise ValueError(
                f"'{path}' exists and is {kind}: {writes} and can neither write nor replace it "
                f"there, with or without {flag}; remove or rename it, or choose another {other}"
            )


def check_matplotlib() -> None:
    """Check that matplotlib, which draws the report's figures, can be imported.

    The figures import matplotlib only when drawn, so a missing or broken matplotlib surfaced in
    :meth:`Report.save`, after everything was measured (``curvlab analyze``, ``curvlab demo``);
    they call this first (found in review).

    Raises:
        ImportError: naming the install command (:func:`curvlab.nqm._plotting.require_matplotlib`,
            which checks what the figures need to write a PNG).
    """
    from curvlab.nqm._plotting import require_matplotlib

    require_matplotlib("the report's figures")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


@dataclass
class Report:
    """What :func:`curvlab.analyze` measured, per checkpoint.

    Attributes:
        entries: one dict per checkpoint (``label``, ``values``, ``per_layer``, ``arrays``,
            ``errors``, ``seconds``); the last is the final model.
        meta: how it was measured (quantities, loss, reduction, examples, parameters, seed, ...).
        nqm: the NQM prediction from the measured spectrum (``None`` if not computed).
        histories: optional training histories ``{run: {"series": {name: {"step": [...],
            "value": [...]}}}}`` (the demo fills it from its Diagnostics).
    """

    entries: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    nqm: dict[str, Any] | None = None
    histories: dict[str, Any] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, Any]:
        """Scalar results of the last checkpoint."""
        return self.entries[-1]["values"]

    @property
    def per_layer(self) -> dict[str, dict[str, float]]:
        """Per-layer results of the last checkpoint (keyed by module name)."""
        return self.entries[-1]["per_layer"]

    def __getitem__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise KeyError(f"{name!r} was not measured; available: {sorted(self.values)}") from None

    def trajectory(self, name: str) -> list[Any]:
        """The value of ``name`` at each checkpoint (``None`` where it was not measured)."""
        return [e["values"].get(name) for e in self.entries]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite floats as strings)."""
        return _clean(
            {
                "meta": self.meta,
                "entries": self.entries,
                "nqm": self.nqm,
                "histories": self.histories,
            }
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict` output (e.g. a loaded ``report.json``).

        The strings ``"inf"``, ``"-inf"``, ``"nan"`` that :meth:`to_dict` writes for non-finite
        floats become floats again where the report holds numbers (the entries' ``values``,
        ``per_layer``, ``arrays``, ``nqm`` and ``seconds``, the NQM prediction, the histories'
        series and numeric settings), so ``report["noise_scale"]`` is ``inf`` as before
        saving, never the string ``"inf"`` (found in review); labels, messages and ``meta`` stay
        as they are. ``d`` is copied, never shared with the report.

        Raises:
            ValueError: if ``d`` is not a curvlab report (not a dict; ``entries`` missing, not a
                list or empty; an entry not a dict or without ``label`` and a ``values`` dict;
                ``meta``, ``nqm`` or ``histories`` not a dict; a history not a dict with a
                ``series`` dict of ``{"step": [...], "value": [...]}`` dicts, lists of one
                length), naming what is wrong. A raw ``KeyError: 'entries'`` or
                ``AttributeError`` told neither (found in review s20); a history without
                ``series`` was accepted and :meth:`save` failed in ``plot_histories`` with a raw
                ``KeyError: 'series'`` (review s23).
        """

        def refuse(what: str) -> ValueError:
            return ValueError(
                f"Report.from_dict: not a curvlab report ({what}); it expects what "
                "Report.to_dict() returns, as saved in report.json: a dict with 'entries', a "
                "non-empty list of dicts each with 'label' and 'values' (a dict), and optional "
                "'meta', 'nqm' and 'histories' dicts"
            )

        if not isinstance(d, dict):
            raise refuse(f"got {type(d).__name__}, not a dict")
        if "entries" not in d:
            raise refuse(f"no 'entries' key; its keys are {sorted(map(str, d))}")
        if not isinstance(d["entries"], list):
            raise refuse(f"'entries' is {type(d['entries']).__name__}, not a list")
        if not d["entries"]:
            raise refuse("'entries' is an empty list: a report has one entry per checkpoint")
        for i, e in enumerate(d["entries"]):
            if not isinstance(e, dict):
                raise refuse(f"entries[{i}] is {type(e).__name__}, not a dict")
            for key in ("label", "values"):
                if key not in e:
                    raise refuse(
                        f"entries[{i}] has no {key!r} key; its keys are {sorted(map(str, e))}"
                    )
            if not isinstance(e["values"], dict):
                raise refuse(f"entries[{i}]['values'] is {type(e['values']).__name__}, not a dict")
        for key in ("meta", "nqm", "histories"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise refuse(f"{key!r} is {type(d[key]).__name__}, not a dict")
        for run, h in (d.get("histories") or {}).items():
            wrong = _history_problem(h)
            if wrong is not None:
                raise refuse(f"histories[{run!r}]{wrong}")
        d = copy.deepcopy(d)
        histories = d.get("histories") or {}
        histories = {  # (each a dict, checked above)
            run: {k: _unclean(v) if k in _HISTORY_NUMBERS else v for k, v in h.items()}
            for run, h in histories.items()
        }
        return cls(
            entries=[_unclean_entry(e) for e in d["entries"]],
            meta=d.get("meta") or {},
            nqm=_unclean(d.get("nqm")),
            histories=histories,
        )

    def summary(self) -> str:
        """A plain-text table of the scalar results (one column per checkpoint).

        Estimates carry their standard error (``value±stderr``; the Lanczos residual bound for
        ``λ_max`` and the sharpness), and one whose ± is missing or not finite says so
        (``12 (no valid standard error)``), never reading as exact; NQM predictions name their
        checkpoint and give the critical batch size of all SLQ probes' pooled spectrum, then the
        range of the single probes' own predictions (saying how many probes give one where some
        saw no positive curvature, and when that range excludes the pooled value: the
        prediction is nonlinear in the spectrum, so it can), in loss terms and, where the report
        knows the loss terms per example, in examples; failures are listed last.
        """
        hidden = set(STDERR_KEYS.values())
        names: list[str] = []
        for e in self.entries:
            names += [n for n in e["values"] if n not in names and n not in hidden]
        labels = [str(e["label"]) for e in self.entries]
        rows: list[tuple[str, list[str]]] = []
        for n in names:
            row = []
            for e in self.entries:
                v = e["values"].get(n)
                if isinstance(v, list):
                    v = v[0] if v else None
                if n == "top_eigenvalues":
                    se = top_residual(e)
                else:
                    se = e["values"].get(STDERR_KEYS.get(n, ""))
                text = "-" if v is None else _fmt(v)
                if v is not None:
                    pm, note = uncertainty(n, v, se)
                    text += note if pm is None else f"±{pm:.2g}"
                row.append(text)
            suffix = " (largest)" if n == "top_eigenvalues" else ""
            rows.append((n + suffix, row))
        width = max([len(n) for n, _ in rows] + [8])
        # each column as wide as its label (never cut: two checkpoints must stay distinguishable)
        widths = [
            max([14, len(lab)] + [len(row[j]) for _, row in rows]) for j, lab in enumerate(labels)
        ]
        lines = [" " * width + "  " + "  ".join(f"{lab:>{w}}" for lab, w in zip(labels, widths))]
        for name, row in rows:
            cells = "  ".join(f"{text:>{w}}" for text, w in zip(row, widths))
            lines.append(f"{name:<{width}}  " + cells)
        for e in self.entries:
            prediction = e.get("nqm") or (self.nqm if e is self.entries[-1] else None)
            for label, curve in ((prediction or {}).get("curves") or {}).items():
                spread = curve.get("critical_batch_size_range")
                probes = nqm_probe_spread(curve, prediction, count=False)
                extra = ""
                if probes and prediction:  # the pooled value is no mean of the probes' own
                    central = as_number(curve.get("critical_batch_size"))
                    outside = (
                        bool(spread)
                        and central is not None
                        and math.isfinite(central)
                        and not spread[0] <= central <= spread[1]
                    )
                    alone = "each probe alone predicts " if spread else ""
                    extra = (
                        f" (from the pooled spectrum of {prediction.get('num_probes')} SLQ "
                        f"probes; {alone}{probes}"
                        + (
                            ", a range that excludes the pooled value: the prediction is "
                            "nonlinear in the spectrum"
                            if outside
                            else ""
                        )
                        + ")"
                    )
                # the NQM's batch counts loss terms; B_simple above counts examples (found in
                # review: 762.3 tokens printed without a unit beside B_simple in sequences)
                lines.append(
                    f"NQM critical batch size at {e['label']}, {label}: "
                    f"{_fmt(curve.get('critical_batch_size'))}{extra} loss terms"
                    + nqm_in_examples(curve, prediction, ", i.e. {}")
                )
        failed = [(e["label"], k, v) for e in self.entries for k, v in e.get("errors", {}).items()]
        if failed:
            lines.append("")
            lines.append(f"failed ({len(failed)}; the values above omit them):")
            lines += [f"  {what} at {label}: {why}" for label, what, why in failed]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def save(self, directory: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write ``report.json``, PNG figures and ``report.html`` into ``directory``.

        Everything is written into a staging folder first and moved in once complete: a failure
        leaves an earlier report as it was, and removes ``directory`` again if this call created
        it (the files a save replaces are moved aside first, and put back should any move
        fail). With ``overwrite=True`` the files this report writes replace their namesakes, and
        the figures an earlier report in ``directory`` wrote (those its ``report.json`` lists)
        that this one does not write are removed; no other file is touched. Figures are drawn
        from the values as measured; non-finite ones (inf, NaN) are left out of them, with a
        note under the figure.

        Raises:
            NotADirectoryError: if ``directory`` exists and is not a folder (with or without
                ``overwrite``; checked first).
            ValueError: if a name this method writes (``report.json``, ``report.html``, a
                figure's) is taken in ``directory`` by a folder or anything else that is neither
                a file nor a symbolic link (with or without ``overwrite``), before anything is
                drawn: it failed after the drawing with a raw ``IsADirectoryError`` naming the
                staging folder (found in review s22).
            FileExistsError: if ``directory`` exists, is not empty and ``overwrite`` is False
                (after the checks above, which ``overwrite`` would not get past); an existing
                empty folder is written into without ``overwrite``, and left in place should
                the save fail.
            ImportError: if matplotlib cannot be imported (naming the install command), before
                any folder is created.
        """
        out = Path(directory)
        # what overwrite=True would not get past first: a file given as the folder was told to
        # pass overwrite=True, which then refused it as no folder (found in review s22)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"'{out}' exists and is not a folder")
        check_report_names(out)
        # an existing empty folder holds nothing to lose (pytest's tmp_path, a folder made for
        # the report): written into as a new one (found in review s22: refused without overwrite)
        if out.exists() and not overwrite and any(out.iterdir()):
            raise FileExistsError(
                f"report folder '{out}' already exists; pass overwrite=True (--overwrite) or "
                "choose another folder"
            )
        check_matplotlib()  # the figures need it: before any folder is made
        created = _missing_folders(out)  # deepest first
        out.mkdir(parents=True, exist_ok=True)
        try:
            self._write(out)
        except BaseException:
            for folder in created:  # a failed save leaves no folder of its own behind
                if folder == out:
                    for name in _WRITTEN:
                        (out / name).unlink(missing_ok=True)
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise
        return out

    def _write(self, out: Path) -> None:
        # written into a staging folder first: an earlier report is replaced only once the new
        # one is complete (a figure that fails to render leaves the old report as it was)
        staging = Path(tempfile.mkdtemp(prefix=".curvlab-report-", dir=out))
        swapped = False
        try:
            written = self._stage(staging)
            swapped = _swap_in(staging, out, written, self._stale(out, written))
        finally:
            aside = staging / _ASIDE
            if swapped or not (aside.is_dir() and any(aside.iterdir())):
                shutil.rmtree(staging, ignore_errors=True)

    def _stage(self, staging: Path) -> list[str]:
        """Write the report's files into the folder ``staging``; returns their names, sorted
        (``curvlab demo`` swaps them into its ``--out`` together with its training logs)."""
        plain = {  # the real numbers (to_dict writes non-finite ones as strings)
            "meta": self.meta,
            "entries": self.entries,
            "nqm": self.nqm,
            "histories": self.histories,
        }
        figures = []
        for filename, fn, title in _FIGURES:
            if fn(plain, staging / filename) is not None:
                figures.append((filename, title))
        d = self.to_dict()
        d["figures"] = [f for f, _ in figures]
        with open(staging / "report.json", "w", encoding="utf-8") as f:
            json.dump(d, f, indent=1)
        (staging / "report.html").write_text(self._html(figures), encoding="utf-8")
        return sorted(name for name in _WRITTEN if (staging / name).is_file())

    @staticmethod
    def _stale(out: Path, written: list[str]) -> set[str]:
        """The figures an earlier report in ``out`` wrote that this one (``written``) does not:
        they must not linger beside it."""
        earlier = _written_by_earlier_report(out)
        return {name for name in earlier - set(written) if (out / name).is_file()}

    def _html(self, figures: list[tuple[str, str]]) -> str:
        return render_html(self, figures)
