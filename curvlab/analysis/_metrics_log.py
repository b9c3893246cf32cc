r"""Where in-loop diagnostics write: JSON lines, optionally CSV and TensorBoard, flushed per record.

Every record and event is one JSON line of ``log_dir/metrics.jsonl``, written and flushed at once,
so a crash loses nothing already measured; non-finite floats are written as strings (JSON has no
NaN). ``csv=True`` adds ``metrics.csv`` with one column per scalar quantity (every quantity of
the records so far: a record with a new one rewrites the file with the union of the columns),
``tensorboard=True`` scalars under ``curvlab/<name>`` (needs the ``tensorboard``
package: ``pip install 'curvlab[tensorboard]'``; without it a warning and JSONL only).

The files are appended to. A file whose last line was cut short (the process killed, or the disk
full, in the middle of a write) is repaired first, so that the records appended now start on a
line of their own: a last line that is whole but lacks its line end (a JSON record that parses,
a CSV row ending in ``\r``) gets it, and a partial one is dropped, with a warning (every
complete line is kept). A run resumed from a saved ``Diagnostics`` state moves the lines
written after the state was saved (by the run that went on, then stopped) to
``metrics.dropped.jsonl`` / ``metrics.dropped.csv``: :meth:`MetricsLog.drop_from`.

One ``log_dir`` is written by one ``Diagnostics`` at a time in a process. Two writers of one
folder interleaved their records, put a second CSV header in the middle of ``metrics.csv``, and a
resume's cut of the log (which replaces the files) left the other one writing to
an unlinked file, its records lost (found in review). A log opened on a folder that another live
one writes takes it over (a notebook cell ``diag = cl.Diagnostics(..., log_dir=d)`` run again,
the old object still bound): the older log's files are closed, with a ``RuntimeWarning`` naming
the folder, and its later writes raise a ``RuntimeError`` (:meth:`MetricsLog.check_writable`).
The folder is released by :meth:`MetricsLog.close` (``Diagnostics.close``, the end of a
callback's training), when the log is garbage collected, or when its constructor fails; closing
one and opening another in sequence (a resumed run) is quiet.

:meth:`MetricsLog.position` is where the log ends (the bytes of ``metrics.jsonl``, the rows of
``metrics.csv``): ``Diagnostics.state_dict`` saves it, with the log's folder and a fingerprint of
the bytes before the position (:meth:`MetricsLog.tail`), and a resume cuts the log there
(:meth:`MetricsLog.drop_from`), so the lines written before the state was saved stay, by
whichever run wrote them. A position is only applied to the log it was taken of: a resume into
another folder, or into a log replaced since, cuts nothing (with a warning); a run folder moved as
a whole is still cut.
"""

from __future__ import annotations

import csv as _csv
import functools
import gc
import hashlib
import io
import json
import math
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from curvlab._warn import user_stacklevel

__all__ = [
    "UNNAMED_LOG_DIR",
    "MetricsLog",
    "check_log_dir",
    "holds_saved_log",
    "log_cut",
    "same_log_dir",
    "start_afresh_with_cut",
]

_OPEN: dict[str, weakref.ref[MetricsLog]] = {}
"""The log folders open in this process (resolved paths) and the logs writing them."""
_OPEN_LOCK = threading.RLock()  # re-entered by a weakref callback that a gc.collect() runs


def check_log_dir(log_dir: Any) -> Path | None:
    """``log_dir`` as an absolute ``Path`` (``None`` stays ``None``), checked before anything is
    made.

    A relative folder is taken against the working directory now, once: the log's files, the
    reopening after a resume's cut and the TensorBoard writer all use this path, so a later
    ``os.chdir`` (a library, a notebook cell) does not move the log (a relative path opened again
    after it raised a ``FileNotFoundError`` from ``load_state_dict``, or wrote the records to
    another folder's log, found in review s20). ``Path.absolute``: symbolic links are kept.

    Raises:
        TypeError: if it is not a ``str`` or ``os.PathLike`` (a raw ``os.fspath`` error came
            only when training started, found in review).
        NotADirectoryError: if it names an existing file.
    """
    if log_dir is None:
        return None
    if not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(
            f"log_dir must be a folder path (a str or os.PathLike) or None, got "
            f"{type(log_dir).__name__} {log_dir!r}"
        )
    path = Path(log_dir).absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"log_dir {str(path)!r} exists and is not a folder; pass a folder for the log files"
        )
    return path


def same_log_dir(saved: Any, mine: Path) -> bool:
    """Whether ``saved`` (a log folder a saved state names, as a string) is the folder ``mine``.

    The two are compared resolved (symbolic links followed, ``..`` taken), as the log's writer
    is registered (:func:`_claim`): a resume of a checkpoint into the same folder spelled
    another way (``logs/../logs``, a link to it) cuts its log, and one into another folder cuts
    nothing there (a resume with the same settings into another folder cut that folder's log
    at the saved byte position, moving another run's lines to ``metrics.dropped.jsonl``, found
    in review s20). Anything but a path (``None``: a state saved without a log) is not it.
    """
    if not isinstance(saved, (str, os.PathLike)):
        return False
    try:
        return Path(saved).resolve() == Path(mine).resolve()
    except (OSError, RuntimeError):  # a symbolic link loop: the spellings decide
        return os.path.abspath(saved) == os.path.abspath(mine)


def holds_saved_log(state: Any, log_dir: Path) -> bool | None:
    """Whether the log in ``log_dir`` is the one a saved ``Diagnostics`` ``state`` was taken
    of, by the state's fingerprint (``"log_tail"``: the bytes of ``metrics.jsonl`` before its
    ``"log_position"`` are the saved ones), as :meth:`MetricsLog.drop_from` decides where it
    has one: a run folder moved or copied as a whole is the same log, one replaced since is
    not. ``None`` where the state has no fingerprint (saved at an empty log, or by curvlab
    before review s22): its folder decides (:func:`same_log_dir`). Reads the end of one file.

    The training callbacks ask it to tell their warnings (they compared the folders alone,
    so a moved run folder resumed from a checkpoint was not cut and logged a step twice:
    ``[2, 4, 4, 6, 8]`` for ``[2, 4, 6, 8]``, found in review s22); a malformed state is
    ``False`` here and refused, naming what is wrong, when it is loaded.
    """
    tail = state.get("log_tail") if isinstance(state, Mapping) else None
    if tail is None:
        return None
    position = state.get("log_position")
    size = position.get("jsonl") if isinstance(position, Mapping) else None
    if not isinstance(tail, str) or not isinstance(size, int) or isinstance(size, bool):
        return False
    return size >= 0 and _tail_digest(Path(log_dir) / "metrics.jsonl", size) == tail


UNNAMED_LOG_DIR = object()
"""A saved state that does not name the folder of its log position (``"log_dir"``: curvlab
before review s22): the position is taken as the resumed log's, as it was (and as the training
callbacks take a state file of theirs without the folder)."""

_TAIL = 4096
"""How many bytes before a saved log position its fingerprint covers (:meth:`MetricsLog.tail`)."""


def log_cut(state: Any) -> dict[str, Any]:
    """Where a saved ``Diagnostics`` state cuts the log: its ``"log_position"`` (left out for a
    state of an earlier curvlab, which has none: cut by step), the ``"log_dir"`` and
    ``"log_tail"`` that position is of (left out where the state has none) and its
    ``"seen_step"`` (an earlier curvlab's: its ``"last_step"``), as
    :meth:`Diagnostics.load_state_dict` reads them (it checks them: :func:`start_afresh_with_cut`).

    Raises:
        ValueError: if ``state`` is not a dict (of a ``Diagnostics`` state).
    """
    if not isinstance(state, Mapping):
        raise ValueError(
            f"not a Diagnostics state_dict: a {type(state).__name__} (save diag.state_dict())"
        )
    cut = {"seen_step": state.get("seen_step", state.get("last_step"))}
    for key in ("log_position", "log_dir", "log_tail"):
        if key in state:
            cut[key] = state[key]
    return cut


def start_afresh_with_cut(diagnostics: Any, state: Any) -> None:
    """Cut the log of a new ``Diagnostics`` where a saved ``state`` says (:func:`log_cut`),
    and load nothing else of it: the Monte-Carlo generator, the Fisher-explosion window and the
    sharpness warm starts stay the new one's (fresh).

    A training-loop callback resumed from a state saved with other settings (``every``, the
    quantities, ...) cannot continue its measurements, but the lines its log got after the
    checkpoint (by the run that went on, then stopped) are measured again: without the cut the
    log held those steps twice (``[2, 4, 4, 5, ...]`` for ``[2, 4, 5, ...]``, found in review
    s20). The cut goes through :meth:`Diagnostics.load_state_dict` (the new one's own state with
    the saved cut), which checks the log position and moves the late lines to
    ``metrics.dropped.jsonl`` with a warning naming their steps.

    Raises:
        ValueError: if ``state`` is not a ``Diagnostics`` state dict or its log position or step
            is malformed (raised before anything is changed).
    """
    cut = log_cut(state)
    fresh = dict(diagnostics.state_dict())
    for key in ("log_position", "log_dir", "log_tail"):  # of the new log: the saved ones only
        fresh.pop(key, None)  # (absent in the saved state: an earlier curvlab's)
    diagnostics.load_state_dict({**fresh, **cut})


def _claim(log_dir: Path, log: MetricsLog) -> str:
    """Register ``log`` as the writer of ``log_dir`` (its resolved path, returned).

    Another live log of this process that writes that folder is taken over
    (:meth:`MetricsLog._take_over`): its files are closed, with a ``RuntimeWarning`` naming the
    folder, so that two logs never write one file (refusing the new one refused a notebook cell
    run again, its old ``Diagnostics`` still bound; found in review s17).
    """
    key = str(log_dir.resolve())
    with _OPEN_LOCK:
        other = _OPEN.get(key)
        if other is not None and other() is not None:
            gc.collect()  # one that is unreachable but in a reference cycle is released now
        other = _OPEN.get(key)
        older = other() if other is not None else None
        if older is not None and older is not log:
            older._take_over()
            warnings.warn(
                f"curvlab.Diagnostics: log_dir {key!r} was still open in another curvlab "
                "Diagnostics (or training callback) of this process; this one takes it over: "
                "the other one's log files were closed, and its later step(), measure() or "
                "load_state_dict() raise a RuntimeError. Give each Diagnostics its own "
                "log_dir, or close the other one first (diag.close()) to open its folder again",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        _OPEN[key] = weakref.ref(log, functools.partial(_release_key, key))
    return key


def _release_key(key: str, ref: weakref.ref[MetricsLog]) -> None:
    """Free ``key`` if ``ref`` still holds it (a dead or closed log's folder)."""
    with _OPEN_LOCK:
        if _OPEN.get(key) is ref:
            del _OPEN[key]


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


class MetricsLog:
    """The log files of one :class:`~curvlab.analysis.Diagnostics` (``log_dir=None``:
    nothing is written, every method is a no-op)."""

    def __init__(
        self, log_dir: Path | None, *, csv: bool = False, tensorboard: bool = False
    ) -> None:
        self._jsonl: TextIO | None = None
        self._jsonl_path: Path | None = None  # absolute (check_log_dir): never the cwd's
        self._csv_file: TextIO | None = None
        self._csv: Any = None
        self._csv_rows = 0  # the data rows of metrics.csv (its position, for a resume's cut)
        self._tb: Any = None
        self._closed = False
        self._taken_over = False
        self._key: str | None = None
        self._end: dict[str, int | None] | None = None  # the position when it was closed
        log_dir = check_log_dir(log_dir)
        if log_dir is None:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self._key = _claim(log_dir, self)  # before any file is touched
        try:
            self._jsonl_path = log_dir / "metrics.jsonl"
            _end_last_line(self._jsonl_path, _whole_json)
            self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
            if csv:
                self._csv_path = log_dir / "metrics.csv"
                _end_last_line(self._csv_path, _whole_csv_row)
                self._csv_file = open(self._csv_path, "a", newline="")  # noqa: SIM115
                self._csv_rows = _count_csv_rows(self._csv_path)
            if tensorboard:
                self._tb = _tensorboard(log_dir)
        except BaseException:
            # a failed constructor frees the folder: a traceback kept alive (a notebook's last
            # exception) held the half-made log, and the retry was refused as "written by
            # another open Diagnostics" that never existed (found in review s17)
            self._closed = True
            self._close_files()
            self._release()
            raise

    def event(self, event: dict[str, Any]) -> None:
        """One event (a Fisher explosion, a failed measurement) as a JSON line."""
        self.check_writable()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_jsonable(event)) + "\n")
            self._jsonl.flush()

    def write(self, record: dict[str, Any]) -> None:
        """One measurement: a JSON line, a CSV row and TensorBoard scalars (where enabled)."""
        self.check_writable()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_jsonable(record)) + "\n")
            self._jsonl.flush()
        scalars = {k: v for k, v in record["values"].items() if isinstance(v, (int, float))}
        if "top_eigenvalues" in record["values"]:
            scalars["top_eigenvalue"] = record["values"]["top_eigenvalues"][0]
        if self._csv_file is not None:
            fields = ["step", *sorted(scalars)]
            if self._csv is None or any(c not in self._csv.fieldnames for c in fields):
                # the first record, or one with a quantity the earlier ones lacked (a quantity
                # that failed at first, a threshold left out at lr 0): the union of the columns
                known = list(self._csv.fieldnames) if self._csv is not None else []
                wanted = known + [c for c in fields if c not in known]
                columns = self._csv_columns(wanted)  # may reopen the file
                self._csv = _csv.DictWriter(
                    self._csv_file, fieldnames=columns, extrasaction="ignore"
                )
                if _size(self._csv_path) == 0:  # the file's, not this handle's position
                    self._csv.writeheader()
            self._csv.writerow({"step": record["step"], **scalars})
            self._csv_file.flush()
            self._csv_rows += 1
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"curvlab/{k}", v, record["step"])
            self._tb.flush()

    def _csv_columns(self, fields: list[str]) -> list[str]:
        """The columns of the rows from now on. A ``metrics.csv`` whose header lacks some of
        ``fields`` (an earlier run measured other quantities, or an earlier record of this run
        lacked a quantity) is rewritten with the union of the columns, its rows kept (blank
        where they had no value): written under the old header, values landed in the wrong
        columns or were dropped."""
        assert self._csv_file is not None
        self._csv_file.flush()
        if _size(self._csv_path) == 0:
            return fields
        with open(self._csv_path, newline="") as f:
            reader = _csv.DictReader(f)
            old = list(reader.fieldnames or [])
            rows = list(reader)
        self._csv_rows = len(rows)
        if old == fields:
            return fields
        union = old + [c for c in fields if c not in old]
        if union == old:  # this run's columns are among the old ones: write under that header
            return old
        self._csv_file.close()
        tmp = self._csv_path.with_name(self._csv_path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = _csv.DictWriter(f, fieldnames=union)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self._csv_path)
        self._csv_file = open(self._csv_path, "a", newline="")  # noqa: SIM115
        return union

    def check_writable(self) -> None:
        """Raise if another log took this one's folder over (:func:`_claim`).

        Raises:
            RuntimeError: naming the folder and the fix.
        """
        if self._taken_over:
            raise RuntimeError(
                "curvlab.Diagnostics: its log_dir was taken over by a newer Diagnostics (or "
                "training callback) opened on the same folder, which writes it now; this one "
                "writes no more. Give each Diagnostics its own log_dir (or close() this one "
                "before opening another on its folder)"
            )

    def position(self) -> dict[str, int | None] | None:
        """Where the log ends now: ``{"jsonl": bytes of metrics.jsonl, "csv": data rows of
        metrics.csv (None without csv)}``, ``None`` without a log. Read from the file's size
        (every record is flushed) and a row count kept as rows are written: no file is read."""
        if self._jsonl is None or self._jsonl.closed:  # no log_dir, or closed
            return None if self._end is None else dict(self._end)
        self._jsonl.flush()
        return {
            "jsonl": os.fstat(self._jsonl.fileno()).st_size,
            "csv": self._csv_rows if self._csv_file is not None else None,
        }

    def tail(self, position: dict[str, int | None] | None) -> str | None:
        """The fingerprint of the log at ``position`` (:meth:`position`): the SHA-256 of the
        last (up to 4096) bytes of ``metrics.jsonl`` before it, whose records carry their
        wall-clock times. ``None`` without a log or at an empty one (nothing to tell it by).
        One small read of the file: called when a state is saved, not at every step."""
        if self._jsonl_path is None or position is None or not position["jsonl"]:
            return None
        if self._jsonl is not None and not self._jsonl.closed:
            self._jsonl.flush()
        return _tail_digest(self._jsonl_path, int(position["jsonl"]))

    def drop_from(
        self,
        position: dict[str, int | None] | None,
        step: int | None,
        *,
        of: Any = UNNAMED_LOG_DIR,
        tail: str | None = None,
    ) -> None:
        """Move the lines written after ``position`` (:meth:`position` when the state was
        saved) out of the log, for a run resumed from a state saved at step ``step``: those were
        written after the state was saved (the run went on, then stopped), and the resumed run
        writes them again. The lines before ``position`` stay, whichever run wrote them (a cut
        by step number moved an earlier run's records of the same folder, found in review
        s17). ``position`` ``None`` (a state saved without a log) cuts nothing; a CSV position
        ``None`` (saved without ``csv=True``) leaves ``metrics.csv`` as it is. The lines go to
        ``metrics.dropped.jsonl`` (and ``metrics.dropped.csv``), appended before the log is
        replaced; a warning names their steps. TensorBoard hides its scalars from the first
        moved step on (``purge_step``).

        ``position`` is applied only to the log it was taken of (:meth:`_is_of`): ``of`` is the
        folder the state names (:data:`UNNAMED_LOG_DIR`: none, a state of curvlab before review
        s22, taken as this log's) and ``tail`` its fingerprint (:meth:`tail`; ``None``: none).
        A position of another folder's log, or of a log replaced since in this folder, cuts
        nothing, with a ``RuntimeWarning`` saying why: another folder was cut at the saved
        byte position, its unrelated lines moved to ``metrics.dropped.jsonl`` with a false
        warning that they "were written after it was saved" (found in review s22).
        """
        self.check_writable()
        if self._jsonl is None or self._closed or position is None:
            return
        size, rows = int(position["jsonl"] or 0), position.get("csv")
        why_not = self._is_of(of, tail, size)
        if why_not is not None:
            warnings.warn(
                f"curvlab.Diagnostics: resuming from a state saved "
                f"{'before its first step' if step is None else f'at step {step}'}: {why_not}; "
                "the rest of the state is loaded",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
            return
        self._cut(
            lambda path: _move_from(path, size),
            None if rows is None else (lambda i, row: i >= rows),
            step,
            by_position=True,
        )

    def _is_of(self, of: Any, tail: str | None, size: int) -> str | None:
        """``None`` if a position of ``size`` bytes saved with folder ``of`` and fingerprint
        ``tail`` is of this log, else why not. With a fingerprint, it decides: the bytes before
        the position are the saved ones (a run folder moved or copied as a whole is the same
        log; one replaced since in the same folder is not). Without one (a state saved at an
        empty log, or by curvlab before review s22), the folder decides, compared resolved
        (:func:`same_log_dir`); :data:`UNNAMED_LOG_DIR` is taken as this one."""
        assert self._jsonl_path is not None
        here = self._jsonl_path.parent
        if tail is not None:
            if _tail_digest(self._jsonl_path, size) == tail:
                return None
            if of is UNNAMED_LOG_DIR or same_log_dir(of, here):
                return (
                    f"the first {size} bytes of {str(self._jsonl_path)!r} are not those of the "
                    "log it was saved with (the file was replaced or rewritten since), so its log "
                    "position is not applied: the log is not cut (its lines stay; a step logged "
                    "in it after the state was saved may appear twice)"
                )
        elif of is UNNAMED_LOG_DIR or same_log_dir(of, here):
            return None
        named = f"log_dir {str(of)!r}" if isinstance(of, (str, os.PathLike)) else "no log_dir"
        return (
            f"its log position is of {named}, not this one's {str(here)!r}, so this log is not "
            "cut (its lines stay, and it is appended to as it is; the lines the run that went on "
            "wrote after the state was saved stay where they were written)"
        )

    def drop_after(self, step: int | None) -> None:
        """Move the records and events of a step after ``step`` out of the log: the cut of a
        state saved without a log position (by curvlab before review s17), whose lines of a
        later step are taken as written after it was saved. ``None``: a state saved before its
        first step, after which every line with a step is taken as written. A record of an
        earlier run appended to the same folder with a later step is moved too: states saved
        since record the log's position (:meth:`drop_from`). Otherwise as :meth:`drop_from`.
        """
        self.check_writable()
        if self._jsonl is None or self._closed:
            return
        self._cut(
            lambda path: _move_after(path, step),
            lambda i, row: _csv_after(row, step),
            step,
            by_position=False,
        )

    def _cut(
        self,
        move_jsonl: Callable[[Path], list[int]],
        late_row: Callable[[int, dict[str, str]], bool] | None,
        step: int | None,
        by_position: bool,
    ) -> None:
        """Close the log files, move their late lines out (``move_jsonl`` for
        ``metrics.jsonl``, returning the moved lines' steps; the CSV rows for which
        ``late_row(index, row)`` holds, none when ``None``) and open them again for appending,
        also when a move fails; then :meth:`_after_drop`."""
        assert self._jsonl is not None and self._jsonl_path is not None
        path = self._jsonl_path  # not the handle's name, which is resolved against the cwd
        self._jsonl.close()
        try:
            steps = move_jsonl(path)
        finally:
            self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if self._csv_file is not None and late_row is not None:
            self._csv_file.close()
            try:
                self._csv_rows = _move_csv_rows(self._csv_path, late_row)
            finally:
                self._csv_file = open(self._csv_path, "a", newline="")  # noqa: SIM115
                self._csv = None  # the header is read back from the file
        self._after_drop(path, steps, step, by_position=by_position)

    def _after_drop(
        self, path: Path, steps: list[int], step: int | None, by_position: bool
    ) -> None:
        """TensorBoard's purge and the warning after lines were moved (``steps``: theirs)."""
        if self._tb is not None and steps:
            self._tb.close()
            purge = min(steps) if step is None or by_position else step + 1
            self._tb = _tensorboard(path.parent, purge_step=purge)  # the absolute log_dir
        if not steps:
            return
        shown = sorted(set(steps))
        listed = ", ".join(str(s) for s in shown[:8]) + (
            f" and {len(shown) - 8} more" if len(shown) > 8 else ""
        )
        saved = "before its first step" if step is None else f"at step {step}"
        why = (
            "were written after it was saved (the run went on, then stopped)"
            if by_position
            else "are taken as written after it was saved (the state, of a curvlab before "
            "review s17, holds no log position, so the lines of a later step are cut)"
        )
        warnings.warn(
            f"curvlab.Diagnostics: resuming from a state saved {saved}, "
            f"{len(steps)} line(s) of {str(path)!r} of later steps ({listed}) {why} and would be "
            f"written again: they were moved to {str(path.with_name(_DROPPED))!r}",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._end = self.position()
            self._close_files()
        finally:
            self._release()

    def _close_files(self) -> None:
        """Close the open files (those that were opened)."""
        try:
            for f in (self._jsonl, self._csv_file):
                if f is not None:
                    f.close()
        finally:
            if self._tb is not None:
                self._tb.close()

    def _take_over(self) -> None:
        """Another log opens this one's folder (:func:`_claim`): close the files, and refuse
        the writes from now on (:meth:`check_writable`)."""
        self._taken_over = True
        self._key = None  # the folder is the new log's: this one's close() leaves it
        self.close()

    def _release(self) -> None:
        """Free this log's folder for another ``Diagnostics`` (:func:`_claim`)."""
        key, self._key = self._key, None
        if key is not None:
            with _OPEN_LOCK:
                ref = _OPEN.get(key)
                if ref is not None and ref() is self:
                    del _OPEN[key]


def _whole_json(line: bytes) -> bool:
    """Whether a JSON line without its line end is whole: it parses (a cut JSON object never
    does, its closing brace being its last character)."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # not JSON, or cut inside a UTF-8 character
        return False


def _whole_csv_row(line: bytes) -> bool:
    r"""Whether a CSV row without its ``\n`` is whole: the writer ends rows with ``\r\n``, so a
    row cut between the two has every field (a row cut earlier cannot be told from a whole one:
    ``0.96`` may be ``0.9634`` cut short)."""
    return line.endswith(b"\r")


def _end_last_line(path: Path, whole: Callable[[bytes], bool]) -> None:
    r"""Make ``path`` end with a line end before records are appended to it.

    A last line without its ``\n`` that ``whole`` accepts gets the ``\n``; any other is dropped
    (a warning says so), so an appended record is never glued to a partial one. Only the file's
    tail is read.
    """
    try:
        f = open(path, "r+b")  # noqa: SIM115
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        start, pos = 0, end  # start: where the last line begins
        while pos > 0:
            low = max(0, pos - (1 << 16))
            f.seek(low)
            i = f.read(pos - low).rfind(b"\n")
            if i >= 0:
                start = low + i + 1
                break
            pos = low
        f.seek(start)
        tail = f.read(end - start)
        if whole(tail):
            f.seek(end)
            f.write(b"\n")
            return
        f.truncate(start)
    warnings.warn(
        f"curvlab.Diagnostics: the last line of {str(path)!r} was cut short (the process was "
        f"killed, or the disk filled, while writing it): its {len(tail)} bytes "
        f"({tail[:60]!r}{'...' if len(tail) > 60 else ''}) were dropped so that the records "
        "appended now start on a line of their own; every complete line is kept",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


_DROPPED = "metrics.dropped.jsonl"
_DROPPED_CSV = "metrics.dropped.csv"


def _line_step(line: str) -> int | None:
    """The ``"step"`` of a JSON line (``None``: no record, or no integer step)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _after(value: float, step: int | None) -> bool:
    """Whether a line's step ``value`` comes after the cut ``step`` (``None``: every step)."""
    return step is None or value > step


def _move_after(path: Path, step: int | None) -> list[int]:
    """Move the lines of ``path`` whose step is after ``step`` (``None``: every line with a
    step) to ``metrics.dropped.jsonl`` (appended and flushed first; then ``path`` is replaced
    by its other lines): their steps."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    steps = [_line_step(line) for line in lines]
    late = [s is not None and _after(s, step) for s in steps]
    if not any(late):
        return []
    with open(path.with_name(_DROPPED), "a", encoding="utf-8") as f:
        f.writelines(line for line, out in zip(lines, late) if out)
        f.flush()
        os.fsync(f.fileno())
    _replace(path, "".join(line for line, out in zip(lines, late) if not out), newline=None)
    return [s for s, out in zip(steps, late) if out and s is not None]


def _tail_digest(path: Path, size: int) -> str | None:
    """The SHA-256 (hex) of the last (up to :data:`_TAIL`) bytes of ``path`` before byte
    ``size``; ``None`` if the file is missing or shorter."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) < size:
                return None
            f.seek(max(0, size - _TAIL))
            return hashlib.sha256(f.read(size - max(0, size - _TAIL))).hexdigest()
    except FileNotFoundError:
        return None


def _move_from(path: Path, size: int) -> list[int]:
    """Move the lines of ``path`` that end after its first ``size`` bytes (a line cut by
    ``size`` included) to ``metrics.dropped.jsonl`` (appended and flushed first; then ``path``
    is cut to the lines before): the steps of the moved lines that have one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    keep = data.rfind(b"\n", 0, size) + 1 if size < len(data) else len(data)
    if keep >= len(data):
        return []
    moved = data[keep:]
    with open(path.with_name(_DROPPED), "ab") as f:
        f.write(moved)
        f.flush()
        os.fsync(f.fileno())
    _replace_bytes(path, data[:keep])
    lines = moved.decode("utf-8", errors="replace").splitlines()
    return [s for s in map(_line_step, lines) if s is not None]


def _csv_after(row: dict[str, str], step: int | None) -> bool:
    """Whether a CSV row's step comes after the cut ``step`` (a row without one: no)."""
    try:
        value = float(row.get("step") or "nan")
    except ValueError:
        return False
    return not math.isnan(value) and _after(value, step)


def _move_csv_rows(path: Path, late: Callable[[int, dict[str, str]], bool]) -> int:
    """Move the rows of ``metrics.csv`` that ``late(index, row)`` picks to
    ``metrics.dropped.csv`` (rewritten with the union of both files' columns): the number of
    rows left."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, newline="") as f:
        reader = _csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    out = [late(i, r) for i, r in enumerate(rows)]
    if not any(out):
        return len(rows)
    side = path.with_name(_DROPPED_CSV)
    known: list[str] = []
    old: list[dict[str, str]] = []
    if side.exists() and side.stat().st_size > 0:
        with open(side, newline="") as f:
            reader = _csv.DictReader(f)
            known, old = list(reader.fieldnames or []), list(reader)
    columns = known + [c for c in header if c not in known]
    dropped = [r for r, o in zip(rows, out) if o]
    kept = [r for r, o in zip(rows, out) if not o]
    _replace(side, _csv_text(columns, old + dropped), newline="")
    _replace(path, _csv_text(header, kept), newline="")
    return len(kept)


def _count_csv_rows(path: Path) -> int:
    """The data rows of a CSV file (0 for none or a header only): read once, when it is
    opened; the log counts the rows it writes from then on."""
    try:
        with open(path, newline="") as f:
            return max(0, sum(1 for _ in _csv.reader(f)) - 1)
    except FileNotFoundError:
        return 0


def _csv_text(columns: list[str], rows: list[dict[str, str]]) -> str:
    """``rows`` as CSV text under ``columns`` (blank where a row has no value)."""
    out = io.StringIO(newline="")
    writer = _csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _size(path: Path) -> int:
    """The size of ``path`` on disk (0 if missing): whether a CSV header is written is decided
    by it, not by a handle's position (a second writer's handle stood at 0 in a file with rows:
    a header in the middle of ``metrics.csv``, found in review)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _replace(path: Path, text: str, newline: str | None) -> None:
    """Write ``text`` to ``path`` atomically, in UTF-8 (``newline`` as :func:`open` takes it:
    ``None`` writes each ``\n`` as ``os.linesep``, ``""`` as it is): :func:`_replace_bytes`."""
    if newline is None:
        text = text.replace("\n", os.linesep)
    _replace_bytes(path, text.encode("utf-8"))


def _replace_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file, then ``os.replace``)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tensorboard(log_dir: Path, purge_step: int | None = None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn(
            "tensorboard=True but the tensorboard package is not installed "
            "(pip install 'curvlab[tensorboard]'); writing JSONL only",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
