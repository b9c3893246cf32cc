"""``curvlab demo``'s regime statement, batches and the NQM lines of its terminal summary."""

from __future__ import annotations

import pytest
import torch

from curvlab.analysis import Report
from curvlab.demo import DemoConfig
from curvlab.demo._train import _batches, regime_text


def test_batches_walk_permutations_without_dropping_examples():
    batches = list(_batches(10, 4, 5, torch.Generator().manual_seed(0)))  # 2 epochs exactly
    assert [len(b) for b in batches] == [4] * 5
    seen = torch.cat(batches)
    assert sorted(seen[:10].tolist()) == list(range(10))  # the first epoch: every example once
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert DemoConfig().updates(DemoConfig().large_batch) == 625  # ceil(80 x 4000 / 512)


def test_config_rejects_unknown_runs():
    with pytest.raises(ValueError, match="runs must be distinct names"):
        DemoConfig(runs=("SB", "LB+magic"))


def test_regime_in_the_papers_preconditions_reports_the_share_of_the_gap():
    text = regime_text(
        DemoConfig(),
        {"SB": [1.0], "LB": [0.995], "LB+diag-Fisher": [0.99]},
        {"SB": [0.94], "LB": [0.92], "LB+diag-Fisher": [0.93]},
    )
    assert "same 80 epochs" in text and "5,000 updates of 64" in text and "625 of 512" in text
    assert "needs >= 0.99: holds" in text and "SB - LB test accuracy +2.0 points" in text
    assert "LB+diag-Fisher - LB test accuracy +1.0 points, 50% of the SB - LB gap" in text
    assert "not expected to help" not in text and "not a test" in text


@pytest.mark.parametrize(
    ("lb_train", "lb_test", "why"),
    [(0.71, 0.69, "optimisation gap"), (1.0, 0.935, "no gap for the noise to close")],
)
def test_regime_outside_the_papers_preconditions_says_so(lb_train, lb_test, why):
    text = regime_text(
        DemoConfig(),
        {"SB": [0.99, 1.0], "LB": [lb_train, lb_train], "LB+diag-Fisher": [0.5, 0.6]},
        {"SB": [0.94, 0.94], "LB": [lb_test, lb_test], "LB+diag-Fisher": [0.5, 0.6]},
    )
    assert "does NOT hold" in text and why in text and "not expected to help" in text
    assert "means over 2 seeds" in text and "of the SB - LB gap" not in text


def _report(central: float, lo: float, hi: float) -> Report:
    curve = {"critical_batch_size": central, "critical_batch_size_range": [lo, hi]}
    nqm = {"curves": {"SGD": curve}, "num_probes": 20}
    return Report(entries=[{"label": "LB", "values": {}, "nqm": nqm}])


def test_nqm_summary_names_the_pooled_value_and_flags_a_range_that_excludes_it():
    # the demo printed "10.69 (single-probe predictions 8.813 to 9.781)": the central value is
    # the prediction of all probes' pooled spectrum, the range that of each probe alone
    outside = _report(10.69, 8.813, 9.781).summary().splitlines()[-1]
    assert outside.startswith("NQM critical batch size at LB, SGD: 10.69 (from the pooled")
    assert "20 SLQ probes; each probe alone predicts 8.813 to 9.781" in outside
    assert "excludes the pooled value" in outside
    inside = _report(9.0, 8.813, 9.781).summary().splitlines()[-1]
    assert "each probe alone predicts 8.813 to 9.781)" in inside and "excludes" not in inside
