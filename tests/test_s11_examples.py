"""Review s11, examples: the NQM is read like the network in mnist1d_critical_batch (the same
relative smallest batch size), ``--quick`` keeps options given at their default value, and
mnist1d_wen_table2's ``--replot`` writes the live run's reference line. No training."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def examples(monkeypatch) -> ModuleType:
    """``examples/`` importable (its scripts import their helpers by module name)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("mnist1d_common")


def _import(name: str) -> ModuleType:
    return importlib.import_module(name)


# ------------------------------------------------------------- 1: B* from the same relative B_0
# S(B) = S_min (1 + B*/B) (McCandlish et al.): the rule "B·S doubles from its minimum" reports
# B* + 2·B_0 from a sweep starting at B_0. The "network" is swept from B_0 = 8; the "NQM" is the
# same network with every batch size scaled by K = 2.5 (B* x K), swept from B = 1. Read from the
# same relative start (b_0 = K·B_0 = 20), every ratio of the NQM equals the network's exactly.
B0, K = 8.0, 2.5
B_STAR = {"sgd": 20.0, "momentum": 100.0, "adam25": 160.0, "adam50": 240.0}
S_MIN = {"sgd": 100.0, "momentum": 90.0, "adam25": 60.0, "adam50": 40.0}
LABELS = {"sgd p=0": "sgd", "sgd p=0.25": "sgd", "sgd p=0.5": "sgd"}
for _beta in ("beta<=0.9999", "beta<=0.9"):
    LABELS.update(
        {
            f"momentum {_beta} p=0": "momentum",
            f"momentum {_beta} p=0.25": "adam25",
            f"momentum {_beta} p=0.5": "adam50",
        }
    )


def _steps(kind: str, b: float, scale: float = 1.0) -> float:
    return S_MIN[kind] * (1 + scale * B_STAR[kind] / b)


class _Exact:
    how = "closed form"

    def __call__(self, label: str, b: float) -> float:
        return _steps(LABELS[label], b, K)


def _synthetic_sweep(bs: list[float]) -> dict:
    from curvlab.nqm import critical_batch_from_steps

    curves = {}
    for label, kind in LABELS.items():
        steps = [_steps(kind, b, K) for b in bs]
        curves[label] = {
            "steps": steps,
            "critical_batch_size": critical_batch_from_steps(bs, steps),
        }
    return {"batch_sizes": bs, "target": 1.0, "curves": curves}


def _network(kind: str) -> float:
    """The rule's B* of the network swept from B0 (exact for this S: B* + 2·B0)."""
    return B_STAR[kind] + 2 * B0


@pytest.mark.parametrize("exact", [True, False], ids=["exact steps", "interpolated sweep"])
def test_nqm_ratios_are_read_from_the_networks_relative_smallest_batch_size(examples, exact):
    cb = _import("mnist1d_critical_batch")
    bs = [2.0 ** (k / 16) for k in range(16 * 14 + 1)]  # 1 ... 16384, fine enough to interpolate
    sw = _synthetic_sweep(bs)
    largest = 1024.0
    rel = {"largest B": largest / _network("sgd"), "smallest B": B0 / _network("sgd")}
    pred = cb.nqm_ratios(sw, rel, _Exact()) if exact else cb.nqm_ratios(sw, rel)
    tol = 2e-4 if exact else 2e-3
    for variant in ("beta<=0.9", "beta<=0.9999"):
        p = pred[variant]
        for label, kind in (("momentum", "momentum"), ("Adam p=0.25", "adam25")):
            # the network's own ratios: B* ratio and steps ratios at B0 and at 1024
            crit = _network(kind) / _network("sgd")
            small = _steps(kind, B0) / _steps("sgd", B0)
            large = _steps(kind, largest) / _steps("sgd", largest)
            assert p[f"critical {label}/SGD"] == pytest.approx(crit, rel=tol)
            assert p[f"steps {label}/SGD at smallest B"] == pytest.approx(small, rel=tol)
            assert p[f"steps {label}/SGD at largest B"] == pytest.approx(large, rel=tol)
        assert p["nqm batch at largest B"] == pytest.approx(K * largest, rel=tol)
    assert pred["matched_start"] == pytest.approx(K * B0, rel=tol)
    assert pred["sgd_critical_batch_size"] == pytest.approx(K * _network("sgd"), rel=tol)
    # read from B = 1, as before, the NQM's ratio would be (B*_m + 2)/(B*_s + 2), not the network's
    from_one = (
        sw["curves"]["momentum beta<=0.9 p=0"]["critical_batch_size"]
        / sw["curves"]["sgd p=0"]["critical_batch_size"]
    )
    assert from_one == pytest.approx((K * 100 + 2) / (K * 20 + 2), rel=1e-3)
    assert abs(from_one / pred["beta<=0.9"]["critical momentum/SGD"] - 1) > 0.4


def test_matched_start_on_a_real_nqm_against_a_direct_sweep_from_it(examples):
    """b_0 = rel · B*_SGD(read from b_0): checked with a fresh sweep that starts at b_0."""
    nq = _import("mnist1d_critical_batch_nqm")
    from curvlab.nqm import NQM, batch_size_sweep, critical_batch_size

    nqm = NQM.paper(d=1000, bins=20)
    grid = {"lr_points_per_decade": 4, "decay_points": 5, "refine": 1}
    bs = [2.0**k for k in range(0, 13)]
    sw = nq.nqm_sweeps(nqm, bs, 0.01, grid)
    rel = 0.2
    b0 = nq.matched_start(nq.ExactSteps(nqm, sw, grid), bs, rel)
    direct = batch_size_sweep(nqm, [b0] + [b for b in bs if b > b0], ("sgd",), (0.0,), 0.01, **grid)
    assert b0 / critical_batch_size(direct, "sgd", 0.0) == pytest.approx(rel, rel=2 * nq.RTOL)
    assert bs[0] < b0 < bs[-1]


def test_off_grid_steps_are_never_extrapolated_and_bad_starts_are_refused(examples):
    nq = _import("mnist1d_critical_batch_nqm")
    bs = [2.0**k for k in range(0, 9)]
    sw = _synthetic_sweep(bs)
    at = nq.InterpolatedSteps(sw)
    assert at("sgd p=0", 4.0) == pytest.approx(_steps("sgd", 4.0, K))
    with pytest.raises(ValueError, match="outside the saved NQM sweep"):
        at("sgd p=0", 300.0)
    with pytest.raises(ValueError, match=r"\(0, 0.5\)"):
        nq.matched_start(at, bs, 0.5)
    with pytest.raises(ValueError, match="sweep the NQM from smaller batch sizes"):
        nq.matched_start(at, bs[5:], 0.2)  # starts at 32, past b_0 = 0.2 (50 + 2 b_0) = 16.7
    with pytest.raises(ValueError, match="to larger batch sizes"):
        nq.matched_start(at, bs[:3], 0.2)  # ends at 4: B·S never doubles, no b_0 inside
    # after the training, such a sweep leaves a reason instead of an exception (runs are kept)
    cb = _import("mnist1d_critical_batch")
    short = _synthetic_sweep(bs[:3])
    pred = cb._predict(short, {"smallest B": 0.2, "largest B": 1.0}, nq.InterpolatedSteps(short))
    assert "to larger batch sizes" in pred["error"]


# ------------------------------------------------------------- 4: --quick and explicit options
def _quick_args(common: ModuleType, argv: list[str]):
    parser = common.base_parser("x", "mnist1d_fisher_explosion", seeds=3, results=True)
    parser.add_argument("--epochs", type=float, default=250)
    args = parser.parse_args(argv)
    common.quick(parser, args, epochs=2.0, seeds=2)
    return args


def test_quick_keeps_options_given_at_their_default_value(examples):
    common = examples
    args = _quick_args(common, ["--quick", "--seeds", "3", "--epochs", "250"])
    assert (args.seeds, args.epochs) == (3, 250.0)  # given explicitly: kept (were 2 and 2.0)
    args = _quick_args(common, ["--quick", "--seed=3"])  # an abbreviation is given too
    assert (args.seeds, args.epochs) == (3, 2.0)
    args = _quick_args(common, ["--quick"])
    assert (args.seeds, args.epochs) == (2, 2.0)
    args = _quick_args(common, ["--seeds", "3"])  # no --quick: nothing changes
    assert (args.seeds, args.epochs) == (3, 250.0)


def test_quick_refuses_what_it_cannot_tell(examples):
    import argparse

    common = examples
    plain = argparse.ArgumentParser()
    plain.add_argument("--quick", action="store_true")
    with pytest.raises(TypeError, match="base_parser"):
        common.quick(plain, plain.parse_args(["--quick"]), quick=False)
    parser = common.base_parser("x", "y")
    with pytest.raises(ValueError, match="not options"):
        common.quick(parser, parser.parse_args(["--quick"]), epochs=2)


# ------------------------------------------------------------- 5: wen_table2 --replot = live .md
def test_wen_replot_writes_the_reference_line_of_the_live_run(examples, tmp_path, monkeypatch):
    wen = _import("mnist1d_wen_table2")
    monkeypatch.setattr(wen, "plot", lambda *args, **kwargs: None)  # the .md is what is tested
    saved = json.loads((ROOT / "docs" / "results" / "mnist1d_wen_table2.json").read_text())
    saved["reference_cnn"] = [
        {"train_accuracy": 1.0, "test_accuracy": a, "seed": s, "steps": 6000}
        for s, a in enumerate((0.924, 0.932, 0.946))
    ]
    live = wen.summarise(json.loads(json.dumps(saved)))  # what main() prints and writes
    line = (
        "Reference: the MNIST-1D paper's CNN recipe (Adam 1e-2, batch 100, 6000 steps, 4,000 "
        "signals): test 0.934 ± 0.011."
    )
    assert live.endswith("\n" + line)
    src = tmp_path / "saved" / "mnist1d_wen_table2.json"
    src.parent.mkdir()
    src.write_text(json.dumps(saved))
    wen.replot(src, tmp_path / "out")
    md = (tmp_path / "out" / "mnist1d_wen_table2.md").read_text()
    assert md == live + f"\n\n(wall time {saved['seconds']:.0f} s)\n"
    # a JSON saved before the step count was recorded still gets its line
    for r in saved["reference_cnn"]:
        del r["steps"]
    assert wen.reference_line(saved["reference_cnn"]).startswith(
        "Reference: the MNIST-1D paper's CNN recipe (Adam 1e-2, batch 100, steps not recorded"
    )
