"""Where ``curvlab demo`` writes its runs' training logs, and removing an earlier demo's logs.

Every run is tracked by :class:`curvlab.Diagnostics`, which appends to ``metrics.jsonl`` in the
run's log folder. With ``--overwrite`` an earlier demo's logs in the same ``--out`` would be
appended to (two runs in one log), so they are removed first: only the files the demo wrote, in
the folders the demo names, never anything else under ``diagnostics/``.

Example:
    >>> run_log_dir(Path("out"), "LB+diag-Fisher", 1, 4).as_posix()
    'out/diagnostics/seed4/LB_diag-Fisher'
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["run_log_dir", "remove_earlier_logs"]

_LOG_FILES = ("metrics.jsonl", "metrics.csv")
"""The files a run's :class:`~curvlab.analysis.Diagnostics` writes into its log folder."""


def run_log_dir(out: Path, name: str, seed_index: int, seed: int) -> Path:
    """The log folder of run ``name``: ``diagnostics/<name>`` for the first seed,
    ``diagnostics/seed<seed>/<name>`` for the others (``+`` written as ``_``)."""
    folder = out / "diagnostics"
    if seed_index > 0:
        folder = folder / f"seed{seed}"
    return folder / name.replace("+", "_")


def remove_earlier_logs(out: Path, runs: Iterable[str]) -> None:
    """Remove the training logs an earlier demo wrote into ``out``, and nothing else.

    Only the log files (``metrics.jsonl``, ``metrics.csv``) of the run folders the demo names
    (``diagnostics/<run>/`` and ``diagnostics/seed<N>/<run>/`` for every name in ``runs``) are
    removed, then those folders and ``diagnostics/`` where nothing else is left in them: every
    other file there is the user's and stays.
    """
    root = out / "diagnostics"
    if not root.is_dir() or root.is_symlink():
        return
    names = [name.replace("+", "_") for name in runs]
    seed_folders = sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.is_symlink() and re.fullmatch(r"seed-?\d+", p.name)
    )
    for parent in [root, *seed_folders]:
        for name in names:
            folder = parent / name
            if not folder.is_dir() or folder.is_symlink():
                continue
            for file in _LOG_FILES:
                if (folder / file).is_file():
                    (folder / file).unlink()
            _remove_if_empty(folder)
        if parent != root:
            _remove_if_empty(parent)
    _remove_if_empty(root)


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
