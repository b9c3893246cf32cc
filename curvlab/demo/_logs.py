"""Where ``curvlab demo`` writes its runs' training logs, and removing an earlier demo's logs.

Every run is tracked by :class:`curvlab.Diagnostics`, which appends to ``metrics.jsonl`` in the
run's log folder. With ``--overwrite`` an earlier demo's logs in the same ``--out`` would be
appended to (two runs in one log), so they are replaced: only the files the demo wrote, in
the folders the demo names, never anything else under ``diagnostics/``, and only where a demo
wrote them: the demo marks ``diagnostics/`` with :data:`MARKER` (a report of an earlier demo,
``report.json`` with ``meta["demo_config"]``, counts as well). Log files in the demo's folders
without either are the user's: the demo refuses to write there, naming them (found in review:
``--overwrite`` deleted a user's own ``diagnostics/LB/metrics.jsonl``).

The demo trains into a staging folder inside ``--out`` and swaps its logs in together with its
report once all is done (:func:`curvlab.demo._train.run_demo`): a demo that fails or is
interrupted leaves an earlier demo's logs as they were (found in review s22: they were removed
before training).

Example:
    >>> run_log_dir(Path("out"), "LB+diag-Fisher", 1, 4).as_posix()
    'out/diagnostics/seed4/LB_diag-Fisher'
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from curvlab.analysis._metrics_log import check_log_dir
from curvlab.analysis._report import refuse_non_files

__all__ = [
    "run_log_dir",
    "earlier_logs",
    "check_earlier_logs",
    "check_log_targets",
    "remove_earlier_logs",
    "remove_empty_log_folders",
    "mark_logs",
]

_LOG_FILES = ("metrics.jsonl", "metrics.csv")
"""The files a run's :class:`~curvlab.analysis.Diagnostics` writes into its log folder."""

MARKER = ".curvlab-demo"
"""The file in ``diagnostics/`` that says a demo wrote the run logs beside it."""


def run_log_dir(out: Path, name: str, seed_index: int, seed: int) -> Path:
    """The log folder of run ``name``: ``diagnostics/<name>`` for the first seed,
    ``diagnostics/seed<seed>/<name>`` for the others (``+`` written as ``_``)."""
    folder = out / "diagnostics"
    if seed_index > 0:
        folder = folder / f"seed{seed}"
    return folder / name.replace("+", "_")


def earlier_logs(out: Path, runs: Iterable[str], follow_links: bool = False) -> list[Path]:
    """The log files (``metrics.jsonl``, ``metrics.csv``) in the run folders a demo of ``runs``
    names (``diagnostics/<run>/`` and ``diagnostics/seed<N>/<run>/``), sorted; folders that are
    symbolic links are looked into only with ``follow_links`` (what the demo writes through:
    the check for a user's logs; the demo deletes nothing through a link it does not write)."""
    root = out / "diagnostics"
    if not root.is_dir() or (root.is_symlink() and not follow_links):
        return []
    names = [name.replace("+", "_") for name in runs]
    seed_folders = sorted(
        p
        for p in root.iterdir()
        if p.is_dir()
        and (follow_links or not p.is_symlink())
        and re.fullmatch(r"seed-?\d+", p.name)
    )
    found = []
    for parent in [root, *seed_folders]:
        for name in names:
            folder = parent / name
            if not folder.is_dir() or (folder.is_symlink() and not follow_links):
                continue
            found += [folder / file for file in _LOG_FILES if (folder / file).is_file()]
    return sorted(found)


def _written_by_demo(out: Path) -> bool:
    """Whether a demo wrote the logs in ``out``: its marker, or an earlier demo's report."""
    if (out / "diagnostics" / MARKER).is_file():
        return True
    try:
        with open(out / "report.json", encoding="utf-8") as f:
            meta = json.load(f).get("meta")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(meta, dict) and "demo_config" in meta


def check_earlier_logs(out: Path, runs: Iterable[str]) -> list[Path]:
    """Refuse to write into ``out`` when the demo's run folders there hold log files that no demo
    wrote (neither :data:`MARKER` nor a demo's ``report.json``): the demo would delete or append
    to the user's own logs. Touches nothing; returns the log files found (:func:`earlier_logs`).
    Folders that are symbolic links are looked into, as the demo writes its logs through them
    (a user's log in a linked ``diagnostics/`` was replaced, and lost, found in review s22).

    Raises:
        FileExistsError: naming the files (at most five) and what to do.
    """
    found = earlier_logs(out, runs, follow_links=True)
    if not found or _written_by_demo(out):
        return found
    shown = ", ".join(str(p.relative_to(out)) for p in found[:5]) + (" …" if len(found) > 5 else "")
    raise FileExistsError(
        f"'{out}' holds training logs that no curvlab demo wrote ({shown}: no "
        f"'diagnostics/{MARKER}' and no demo's report.json there); the demo would replace them, "
        "so it leaves them alone: move them or choose another --out"
    )


def check_log_targets(out: Path, runs: Iterable[str], seeds: int, seed: int) -> None:
    """Refuse an ``out`` where the training log of a run (``runs``, for the seeds ``seed`` to
    ``seed + seeds - 1``) cannot be written: one of the folders it goes into
    (``diagnostics/``, ``diagnostics/seed<N>/``, ``diagnostics/<run>/``) is a file
    (:func:`~curvlab.analysis._metrics_log.check_log_dir`), or a log file or the demo's
    :data:`MARKER` is taken by a folder or anything else that is neither a file nor a symbolic
    link. Touches nothing. Such a folder was refused only when that run's Diagnostics opened,
    after the runs before it had trained (found in review s22).

    Raises:
        NotADirectoryError: naming the file that stands where a folder goes.
        ValueError: naming the entry that stands where a file goes.
    """
    logs = [run_log_dir(Path(), name, k, seed + k) for k in range(seeds) for name in runs]
    folders: dict[Path, None] = {}  # every folder a log goes into and those above it, in order
    for rel in logs:  # diagnostics[/seed<N>]/<run>
        for i in range(1, len(rel.parts) + 1):
            folders[out.joinpath(*rel.parts[:i])] = None
    for folder in folders:
        try:
            check_log_dir(folder)
        except NotADirectoryError:
            raise NotADirectoryError(
                f"'{folder}' exists and is not a folder: curvlab demo writes its runs' training "
                "logs into a folder of that name, with or without --overwrite; remove or rename "
                "it, or choose another --out"
            ) from None
    files = [out / "diagnostics" / MARKER] + [out / rel / f for rel in logs for f in _LOG_FILES]
    refuse_non_files(
        files,
        "curvlab demo writes a file of that name (a run's training log)",
        "--overwrite",
        "--out",
    )


def remove_earlier_logs(out: Path, runs: Iterable[str]) -> None:
    """Remove the training logs an earlier demo wrote into ``out``, and nothing else.

    Only the log files (``metrics.jsonl``, ``metrics.csv``) of the run folders the demo names
    (``diagnostics/<run>/`` and ``diagnostics/seed<N>/<run>/`` for every name in ``runs``) and
    the demo's :data:`MARKER` are removed, then those folders and ``diagnostics/`` where nothing
    else is left in them: every other file there is the user's and stays.

    Raises:
        FileExistsError: where such log files are there but no demo wrote them
            (:func:`check_earlier_logs`), before anything is removed.
    """
    check_earlier_logs(out, runs)
    found = earlier_logs(out, runs)  # none through a symbolic link
    root = out / "diagnostics"
    for file in found:
        file.unlink()
    if (root / MARKER).is_file():
        (root / MARKER).unlink()
    remove_empty_log_folders(out, found)


def remove_empty_log_folders(out: Path, files: Iterable[Path]) -> None:
    """Remove the run folders of ``files`` (earlier logs gone from ``out``) where nothing is left
    in them, a ``seed<N>/`` folder above them too, and ``diagnostics/`` if it is left empty."""
    root = out / "diagnostics"
    for folder in sorted({f.parent for f in files}, key=lambda p: -len(p.parts)):
        _remove_if_empty(folder)
        if folder.parent != root:
            _remove_if_empty(folder.parent)
    _remove_if_empty(root)


def mark_logs(out: Path) -> None:
    """Write :data:`MARKER` into ``out/diagnostics`` (made if missing): the run logs there are a
    demo's, which a later ``--overwrite`` may replace."""
    root = out / "diagnostics"
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(
        "curvlab demo wrote the training logs in this folder; curvlab demo --overwrite "
        "replaces them\n",
        encoding="utf-8",
    )


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        folder.rmdir()
