"""The `curvlab nqm` subcommand, called through argparse and run() directly."""

from __future__ import annotations

import argparse
import csv
import math

import pytest

from curvlab.nqm._cli import add_subparser, run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvlab")
    add_subparser(parser.add_subparsers(dest="command"))
    return parser


SMALL = [
    "--dim",
    "300",
    "--bins",
    "20",
    "--batch-sizes",
    "1,8,64",
    "--powers",
    "0,1",
    "--target",
    "0.1",
]


def test_help_lists_the_sweep_options(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["nqm", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--batch-sizes", "--powers", "--target", "--out", "--overwrite", "--no-ema"):
        assert opt in text


def test_run_writes_csv_and_pngs_and_refuses_to_overwrite(tmp_path, capsys) -> None:
    out = tmp_path / "nqm"
    args = _parser().parse_args(["nqm", "--out", str(out), *SMALL])
    assert args.func(args) == 0
    for name in ("nqm_sweep.csv", "nqm_fig3a.png", "nqm_fig4_ema.png", "nqm_optimal_lr.png"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader((out / "nqm_sweep.csv").open()))
    assert len(rows) == 3 * 2 * 3  # optimizers x powers x batch sizes
    assert {r["optimizer"] for r in rows} == {"sgd", "momentum", "ema"}
    assert all(float(r["steps"]) > 0 for r in rows)
    assert "critical batch size" in capsys.readouterr().out
    before = (out / "nqm_sweep.csv").read_bytes()
    with pytest.raises(ValueError, match="--overwrite"):
        run(args)
    assert (out / "nqm_sweep.csv").read_bytes() == before
    args = _parser().parse_args(["nqm", "--out", str(out), "--overwrite", "--no-ema", *SMALL])
    assert run(args) == 0
    # the earlier run's EMA figure does not linger beside a sweep without EMA
    assert not (out / "nqm_fig4_ema.png").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--powers", "0,2"], "--powers"),
        (["--batch-sizes", "1,x"], "--batch-sizes"),
        (["--target", "-1"], "--target"),
        (["--target", "1000"], "initial risk"),  # met at step 0: no critical batch size to read
    ],
)
def test_user_errors_are_value_errors(tmp_path, extra, match) -> None:
    args = _parser().parse_args(["nqm", "--out", str(tmp_path / "o"), *SMALL, *extra])
    with pytest.raises(ValueError, match=match):
        run(args)
    assert not (tmp_path / "o").exists()


def test_critical_batch_of_steps_all_zero_is_nan() -> None:
    """A target met at step 0 everywhere gave the second batch size as "critical"."""
    from curvlab.nqm import critical_batch_from_steps

    assert math.isnan(critical_batch_from_steps([1, 4, 16], [0.0, 0.0, 0.0]))


def test_critical_batch_size_is_printed_in_words_where_it_is_not_a_number() -> None:
    from curvlab.nqm._cli import _critical_text
    from curvlab.nqm._sweep import SweepResult
    from curvlab.nqm._tuning import OptimalResult

    def rows(steps: list[float]) -> list[OptimalResult]:
        return [
            OptimalResult(s, 0.1, 0.0, 0.0, "sgd", b, 0.0, 0.1)
            for b, s in zip([1.0, 8.0, 64.0], steps)
        ]

    def text(steps: list[float]) -> str:
        sweep = SweepResult(rows=rows(steps), batch_sizes=[1.0, 8.0, 64.0], target=0.1)
        return _critical_text(sweep, "sgd", 0.0, 64.0)

    assert text([6400.0, 800.0, 100.0]) == "> 64"  # perfect scaling throughout: inf
    assert text([math.inf] * 3) == "none reached"  # nan
    assert text([800.0, 100.0, 100.0]) not in ("> 64", "none reached")
    assert math.isfinite(float(text([800.0, 100.0, 100.0])))
