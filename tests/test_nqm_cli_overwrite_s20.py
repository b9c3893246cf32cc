"""`curvlab nqm --overwrite` replaces its outputs all together or not at all (review s20).

It wrote the CSV and each figure in place, one after the other: an interrupt while drawing the
last figure left this run's nqm_sweep.csv and nqm_fig3a.png beside the earlier run's
nqm_optimal_lr.png (figures of two targets, with no sign). ``SweepResult.to_csv`` and the
figures' ``_savefig`` wrote in place too, leaving a cut-off file instead of the earlier one.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path
from unittest import mock

import pytest

import curvlab.nqm._cli as nqm_cli
from curvlab.nqm import NQM, batch_size_sweep, plot_sweep
from curvlab.nqm._cli import add_subparser

_ALL = ("nqm_sweep.csv", "nqm_fig3a.png", "nqm_fig4_ema.png", "nqm_optimal_lr.png")
_SMALL = ["--dim", "20", "--bins", "5", "--batch-sizes", "1,4", "--powers", "0", "--no-ema"]


def _args(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="curvlab")
    add_subparser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["nqm", "--out", str(out), *_SMALL, "--target", "0.05", *extra])


def _earlier_run(out: Path) -> dict[str, bytes]:
    """An earlier run's four files (the EMA figure too), each with its own content."""
    out.mkdir(parents=True, exist_ok=True)
    for name in _ALL:
        (out / name).write_bytes(f"earlier run's {name}\n".encode())
    return {name: (out / name).read_bytes() for name in _ALL}


def _folder(out: Path) -> dict[str, bytes]:
    """Every entry of ``out``, hidden ones included (a staging folder must not linger)."""
    return {p.name: p.read_bytes() if p.is_file() else b"<folder>" for p in out.iterdir()}


def _interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt("simulated interrupt while drawing the last figure")


def test_interrupt_while_drawing_the_last_figure_leaves_the_earlier_run_as_it_was(
    tmp_path: Path,
) -> None:
    out = tmp_path / "nqm"
    before = _earlier_run(out)
    with (
        mock.patch.object(nqm_cli, "plot_optimal_lr", _interrupt),
        pytest.raises(KeyboardInterrupt),
    ):
        nqm_cli.run(_args(out, "--overwrite"))
    # the CSV and Fig. 3a were already drawn: neither replaced, the EMA figure (which
    # --no-ema deletes) still there, and no staging folder left
    assert _folder(out) == before


def test_a_failing_figure_leaves_the_earlier_run_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "nqm"
    before = _earlier_run(out)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    with mock.patch.object(nqm_cli, "plot_optimal_lr", fail), pytest.raises(OSError):
        nqm_cli.run(_args(out, "--overwrite"))
    assert _folder(out) == before


def test_an_interrupted_run_into_a_new_folder_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "a" / "nqm"
    with (
        mock.patch.object(nqm_cli, "plot_optimal_lr", _interrupt),
        pytest.raises(KeyboardInterrupt),
    ):
        nqm_cli.run(_args(out))
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_every_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "nqm"
    before = _earlier_run(out)
    assert nqm_cli.run(_args(out, "--overwrite")) == 0
    after = _folder(out)
    # exactly this run's three files: the earlier EMA figure gone, no staging folder
    assert sorted(after) == ["nqm_fig3a.png", "nqm_optimal_lr.png", "nqm_sweep.csv"]
    assert all(after[n] != before[n] for n in after)
    assert after["nqm_fig3a.png"].startswith(b"\x89PNG")
    rows = list(csv.DictReader((out / "nqm_sweep.csv").open()))
    assert len(rows) == 2 * 1 * 2  # optimizers x powers x batch sizes


@pytest.fixture(scope="module")
def sweep():
    return batch_size_sweep(NQM.paper(d=20, bins=5), [1, 4], ("sgd", "momentum"), [0], 0.05)


def test_to_csv_interrupted_midway_keeps_the_earlier_file(tmp_path: Path, sweep) -> None:
    path = tmp_path / "sweep.csv"
    path.write_text("earlier\n")

    class CutOff(csv.DictWriter):
        def writerow(self, row):  # the header and one row, then an interrupt
            if getattr(self, "_done", 0) == 1:
                raise KeyboardInterrupt
            self._done = getattr(self, "_done", 0) + 1
            return super().writerow(row)

    with mock.patch.object(csv, "DictWriter", CutOff), pytest.raises(KeyboardInterrupt):
        sweep.to_csv(path, overwrite=True)
    assert _folder(tmp_path) == {"sweep.csv": b"earlier\n"}  # not cut off, nothing left beside
    sweep.to_csv(path, overwrite=True)
    assert len(list(csv.DictReader(path.open()))) == len(sweep.rows)
    assert sorted(_folder(tmp_path)) == ["sweep.csv"]


def test_savefig_interrupted_midway_keeps_the_earlier_figure(tmp_path: Path, sweep) -> None:
    from matplotlib.figure import Figure

    path = tmp_path / "fig.png"
    path.write_bytes(b"earlier figure")

    def cut_off(self, fname, **kwargs):  # half an image, then an interrupt
        Path(fname).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    with mock.patch.object(Figure, "savefig", cut_off), pytest.raises(KeyboardInterrupt):
        plot_sweep(sweep, path, overwrite=True)
    assert _folder(tmp_path) == {"fig.png": b"earlier figure"}


def test_to_csv_writes_through_a_link_as_before(tmp_path: Path, sweep) -> None:
    real = tmp_path / "real.csv"
    real.write_text("earlier\n")
    link = tmp_path / "link.csv"
    os.symlink(real, link)
    sweep.to_csv(link, overwrite=True)
    assert link.is_symlink()
    assert len(list(csv.DictReader(real.open()))) == len(sweep.rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "real.csv"]


def test_a_failed_put_back_names_the_writer(tmp_path, monkeypatch) -> None:
    # the message of a swap whose putting back failed too named "Report.save" for every writer
    import curvlab.analysis._report as report

    out, staging = tmp_path / "out", tmp_path / "out" / ".stage"
    staging.mkdir(parents=True)
    (out / "a.csv").write_text("old")
    (staging / "a.csv").write_text("new")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) > 1:  # the old file moves aside; nothing moves after that
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(report.os, "replace", flaky)
    warned = pytest.warns(RuntimeWarning, match=r"^curvlab nqm failed and could not put back")
    with warned, pytest.raises(OSError, match="disk gone"):
        report._swap_in(staging, out, ["a.csv"], set(), what="curvlab nqm")
