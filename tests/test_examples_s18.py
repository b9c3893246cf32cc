"""Review s18, examples: a summary that fails after the training loses no run (every LB run of
mnist1d_wen_table2 diverged: ``min()`` of an empty list, nothing saved); a critical-batch figure
whose curves reach no target is drawn without them (matplotlib's log axis raised, no figure);
every numeric option of every example is checked when the arguments are parsed, before any
folder or work; and a training run of an mnist1d script refuses to replace an earlier run's
outputs (the committed docs/results/ of a full run included) unless ``--overwrite``.

Nothing here trains: the scripts' own functions are called on saved results, and where a
script's ``main`` runs, its first piece of work is replaced by a stub that raises
:class:`_WorkStarted` (so a missing refusal fails fast, and never writes a result).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RESULTS = ROOT / "docs" / "results"


class _WorkStarted(Exception):
    """Raised by the stub of a script's first piece of work."""


class _Boom:
    """A stand-in for a function or a class whose use starts the work: raises :class:`_WorkStarted`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _WorkStarted

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # introspection (pytest's collection), not the work
            raise AttributeError(name)
        raise _WorkStarted


_boom = _Boom()


@pytest.fixture
def examples(monkeypatch) -> None:
    """``examples/`` importable (its scripts import their helpers by module name)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))


def _import(name: str) -> ModuleType:
    return importlib.import_module(name)


def _main(mod: ModuleType, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", [f"{mod.__name__}.py", *map(str, argv)])
    mod.main()


# ------------------------------------------------ 1: every LB run diverged (mnist1d_wen_table2)
def test_wen_verdict_with_every_lb_run_diverged_is_untestable(examples):
    wen = _import("mnist1d_wen_table2")
    accs = {"train_accuracy": [1.0, 0.99], "test_accuracy": [0.9, 0.91]}
    table = {m: dict(accs) for m in ("SB", "LB+trace", "LB+diag")}
    table["LB"] = {"train_accuracy": [], "test_accuracy": []}  # every LB run diverged
    v = wen.verdict(table)
    assert v["outcome"] == "untestable"
    assert "every LB run diverged" in v["reason"]
    assert math.isnan(v["preconditions"]["lb_train_accuracy_min"])


def test_wen_summary_of_a_run_whose_lb_runs_all_diverged(examples):
    wen = _import("mnist1d_wen_table2")
    saved = json.loads((RESULTS / "mnist1d_wen_table2.json").read_text())
    for r in saved["runs"]:
        if r["method"] == "LB":
            r["diverged"] = True
    text = wen.summarise(saved)
    assert saved["verdict"]["outcome"] == "untestable"
    assert "every LB run diverged" in text
    lb_row = next(line for line in text.splitlines() if line.startswith("| LB | "))
    assert "nan" not in lb_row and "—" in lb_row  # no accuracy: a dash, not "nan ± nan"


def _fake_wen_train(method, lr, seed, cfg, data, norms_at):
    record = {"method": method, "lr": lr, "seed": seed, "diverged": True, "seconds": 0.0}
    return record, nn.Linear(1, 1)


def _tiny_splits(val: int = 0, cache_dir=None):
    def split(n: int):
        return torch.zeros(n, 1, 40), torch.zeros(n, dtype=torch.long)

    return split(12), split(4), split(4)


def test_wen_main_saves_the_runs_before_the_summary(examples, monkeypatch, tmp_path):
    """The summary failed after all the training, and nothing had been saved."""
    wen = _import("mnist1d_wen_table2")
    monkeypatch.setattr(wen, "train", _fake_wen_train)
    monkeypatch.setattr(wen.common, "load_splits", _tiny_splits)
    monkeypatch.setattr(wen, "summarise", _boom)
    out = tmp_path / "wen"
    with pytest.raises(_WorkStarted):
        _main(wen, monkeypatch, "--quick", "--seeds", "1", "--out", out)
    saved = json.loads((out / "mnist1d_wen_table2.json").read_text())
    assert saved["runs"] and all(r["diverged"] for r in saved["runs"])
    assert "--replot" in (out / "mnist1d_wen_table2.md").read_text()


def _fake_fe_train(lr, penalty, alpha, seed, epochs, data):
    return {
        "method": "baseline" if penalty is None else penalty,
        "seed": seed,
        "lr": lr,
        "alpha": alpha if penalty is not None else 0.0,
        "updates": 3,
        "diverged": True,
        "train_accuracy": 0.0,
        "val_accuracy": 0.0,
        "test_accuracy": 0.0,
        "max_trace_fisher": None,
        "final_trace_fisher": None,
        "trace_fisher_steps": [0],
        "trace_fisher": [None],
        "seconds": 0.0,
    }


def test_fisher_explosion_main_saves_the_runs_before_the_verdict(examples, monkeypatch, tmp_path):
    fe = _import("mnist1d_fisher_explosion")
    monkeypatch.setattr(fe, "train", _fake_fe_train)
    monkeypatch.setattr(fe.common, "load_splits", _tiny_splits)
    monkeypatch.setattr(fe, "verdict", _boom)
    out = tmp_path / "fe"
    with pytest.raises(_WorkStarted):
        _main(fe, monkeypatch, "--quick", "--seeds", "1", "--out", out)
    saved = json.loads((out / "mnist1d_fisher_explosion.json").read_text())
    assert len(saved["runs"]) == 5 and "verdict" not in saved


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # std of infs
def test_fisher_explosion_json_takes_the_non_finite_numbers_of_diverged_runs(examples):
    """A diverged baseline makes max Tr(F) inf and a ratio of two NaN; ``allow_nan=False``
    refused them after all the training."""
    fe = _import("mnist1d_fisher_explosion")
    runs = [_fake_fe_train(0.1, None, 0.0, s, 2.0, None) for s in (0, 1)]
    result = fe.verdict({"eta*": runs, "eta*/10": runs})
    assert math.isnan(result["small_lr_max_trace_over_eta_star"])  # inf / inf
    back = json.loads(fe.dump({"verdict": result, "x": [1.0, math.inf, -math.inf]}))
    assert back["verdict"]["small_lr_max_trace_over_eta_star"] == "nan"
    assert back["x"] == [1.0, "inf", "-inf"]


# ------------------------------------- 2: no run reaches the target (mnist1d_critical_batch)
def _unreached(cb: ModuleType) -> tuple[dict, list[str], list[int]]:
    """The committed run with every network run short of every target (no verdict to draw)."""
    res = cb._unclean(json.loads((RESULTS / "mnist1d_critical_batch.json").read_text()))
    s = res["settings"]
    keys = [f"{t:g}" for t in s["targets_validation_accuracy"]]
    for r in res["runs"]:
        r["steps_to_target"] = {k: math.inf for k in r["steps_to_target"]}
    note = "SGD's critical batch size not measured: no ratio to test"
    res["verdict"] = {k: {"note": note} for k in keys}
    return res, keys, list(s["batch_sizes"])


def test_critical_batch_figure_leaves_out_the_curves_that_reach_no_target(examples, tmp_path):
    cb = _import("mnist1d_critical_batch")
    res, keys, batches = _unreached(cb)
    path = tmp_path / "cb.png"
    assert cb.plot(res, keys, batches, path) is True  # the NQM panels are still drawn
    assert path.stat().st_size > 1000


def test_critical_batch_with_nothing_to_draw_writes_the_json_and_says_so(
    examples, tmp_path, capsys
):
    cb = _import("mnist1d_critical_batch")
    res, _, _ = _unreached(cb)
    for name in ("measured_spectrum", "paper"):
        for curve in res["nqm"][name]["sweep"]["curves"].values():
            curve["steps"] = [math.inf] * len(curve["steps"])
    res["table_md"] = "| the table |"
    wrote = cb.write(res, tmp_path)
    assert wrote == [tmp_path / "mnist1d_critical_batch.json"]
    assert not (tmp_path / "mnist1d_critical_batch.png").exists()
    saved = json.loads(wrote[0].read_text())
    assert saved["table_md"] == "| the table |"
    assert "nothing to plot" in capsys.readouterr().out


# ----------------------------------------------- 3: numeric options checked when parsed
def test_unit_interval_and_grids(examples):
    ea = _import("example_args")
    assert ea.unit_interval("0") == 0.0 and ea.unit_interval("0.9") == 0.9
    for bad in ("1", "-0.1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            ea.unit_interval(bad)
    assert ea.non_negative_float("0") == 0.0
    for bad in ("-1e-9", "inf", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            ea.non_negative_float(bad)
    assert ea.positive_floats("0.1, 0.2") == [0.1, 0.2]
    for bad in ("0.1,abc", "0.1,,0.2", "", "0.1,inf", "0.1,0"):
        with pytest.raises(argparse.ArgumentTypeError, match="in |no empty entry"):
            ea.positive_floats(bad)


# (script, the name of its first piece of work, which a stub replaces, arguments)
BAD_ARGS = [
    ("nqm_schedules", "NQM", ("--pieces", "0")),
    ("nqm_schedules", "NQM", ("--target", "inf")),
    ("wen_fig23_classifier", "digits", ("--lr", "nan")),
    ("wen_fig23_classifier", "digits", ("--lr", "-1")),
    ("mnist1d_fisher_explosion", "common.load_splits", ("--quick", "--epochs", "inf")),
    ("fisher_explosion", "make_dataset", ("--quick", "--lrs", "0.1,abc")),
    ("fisher_explosion", "make_dataset", ("--quick", "--small-lr", "0")),
    ("fisher_explosion", "make_dataset", ("--quick", "--label-noise", "1.5")),
    ("fisher_explosion", "make_dataset", ("--quick", "--alphas", "-0.1")),
    ("mnist1d_wen_table2", "common.load_splits", ("--quick", "--momentum", "-0.5")),
    ("mnist1d_wen_table2", "common.load_splits", ("--quick", "--momentum", "1")),
    ("mnist1d_wen_table2", "common.load_splits", ("--quick", "--sb-grid", "0.01,,0.02")),
    ("edge_of_stability", "common.load_splits", ("--quick", "--lrs", "0.1", "inf")),
    ("edge_of_stability", "common.load_splits", ("--quick", "--adam-lr", "nan")),
    ("edge_of_stability", "common.load_splits", ("--quick", "--seed", "-1")),
]


@pytest.mark.parametrize(("script", "work", "args"), BAD_ARGS)
def test_bad_numbers_are_usage_errors_before_the_folder_or_any_work(
    examples, monkeypatch, tmp_path, capsys, script, work, args
):
    mod = _import(script)
    owner, _, attr = work.rpartition(".")
    monkeypatch.setattr(getattr(mod, owner) if owner else mod, attr, _boom)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        _main(mod, monkeypatch, "--out", out, *args)
    assert exit_.value.code == 2
    option = next(a for a in args if a.startswith("--") and a != "--quick")
    assert re.search(rf"argument {option}: (in '[^']*': )?expected ", capsys.readouterr().err)
    assert not out.exists()


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


NOT_SCRIPTS = {"example_args", "mnist1d_common", "mnist1d_critical_batch_nqm"}
NUMERIC = re.compile(r"^[-+0-9.eE, ]+$")


def test_every_numeric_option_of_every_example_is_checked_by_its_type(examples, monkeypatch):
    """A plain ``int``/``float`` (or a number parsed later from a string) let 0, nan, inf and
    negative values through to the training."""
    # hf_trainer imports transformers; its parser has no option
    assert "add_argument" not in (EXAMPLES / "hf_trainer.py").read_text()
    scripts = sorted(
        p.stem for p in EXAMPLES.glob("*.py") if p.stem not in NOT_SCRIPTS | {"hf_trainer"}
    )

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    unchecked = []
    for script in scripts:
        mod = _import(script)
        with pytest.raises(_Captured) as got:
            (getattr(mod, "parse", None) or mod.main)()
        for action in got.value.parser._actions:
            default = action.default
            plain = action.type in (int, float)
            number = isinstance(default, (int, float)) and not isinstance(default, bool)
            numbers = isinstance(default, str) and bool(NUMERIC.match(default))
            later = action.type is None and (number or numbers)
            if plain or later:
                unchecked.append(f"{script} {action.option_strings}")
    assert unchecked == []


# ------------------------------------------------------ 4: a run never replaces an earlier one
def test_rerun_problem_names_the_files_and_the_flag(examples, tmp_path):
    common = _import("mnist1d_common")
    outs = [tmp_path / "x.json", tmp_path / "x.png", tmp_path / "x.md"]
    assert common.rerun_problem(tmp_path, "x", outs, overwrite=False) is None  # no earlier run
    outs[0].write_text("{}")
    outs[1].write_text("png")
    problem = common.rerun_problem(tmp_path, "x", outs, overwrite=False)
    assert f"{outs[0]}, {outs[1]}" in problem and "--overwrite" in problem
    assert str(outs[2]) not in problem
    assert common.rerun_problem(tmp_path, "x", outs, overwrite=True) is None


MNIST1D = ["mnist1d_wen_table2", "mnist1d_critical_batch", "mnist1d_fisher_explosion"]


@pytest.mark.parametrize("script", MNIST1D)
def test_a_run_into_an_earlier_runs_folder_is_refused_before_any_work(
    examples, monkeypatch, tmp_path, capsys, script
):
    mod = _import(script)
    monkeypatch.setattr(mod.common, "load_splits", _boom)
    earlier = tmp_path / f"{script}.json"
    earlier.write_text('{"an": "earlier run"}')
    with pytest.raises(SystemExit) as exit_:
        _main(mod, monkeypatch, "--quick", "--seeds", "1", "--out", tmp_path)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert str(earlier) in err and "--overwrite" in err
    assert earlier.read_text() == '{"an": "earlier run"}'
    with pytest.raises(_WorkStarted):  # --overwrite: the run goes ahead
        _main(mod, monkeypatch, "--quick", "--seeds", "1", "--out", tmp_path, "--overwrite")


@pytest.mark.parametrize("script", MNIST1D)
def test_a_full_run_without_out_never_replaces_the_committed_results(
    examples, monkeypatch, capsys, script
):
    mod = _import(script)
    monkeypatch.setattr(mod.common, "load_splits", _boom)
    committed = RESULTS / f"{script}.json"
    assert committed.is_file()
    with pytest.raises(SystemExit) as exit_:
        _main(mod, monkeypatch, "--seeds", "1")
    assert exit_.value.code == 2
    assert str(committed) in capsys.readouterr().err
