"""The demo's seed is checked against the seeds torch takes before anything runs (review s19).

``DemoConfig(seed=2**64)`` was accepted and ``curvlab demo --seed 18446744073709551615`` (parsed
with ``type=int``) trained for seconds and then failed with torch's raw "Overflow when unpacking
long long": the runs seed torch with ``seed + k + 1`` and ``seed + k + 2`` for ``k < seeds``, and
``torch.Generator.manual_seed`` takes ``[-2**63, 2**64 - 1]``.
"""

from __future__ import annotations

import pytest
import torch

import curvlab.demo._train as demo_train
from curvlab.cli import main
from curvlab.demo import DemoConfig

LOW, HIGH = -(2**63), 2**64 - 1  # torch.Generator.manual_seed's range


def _torch_takes(seed: int) -> bool:
    try:
        torch.Generator().manual_seed(seed)
    except (RuntimeError, ValueError):  # torch: "Overflow when unpacking long long"
        return False
    return True


@pytest.mark.parametrize("seeds", [1, 3])
def test_demo_config_seed_bound_is_the_largest_seed_torch_takes(seeds):
    top = HIGH - seeds - 1  # the largest run seed is seed + (seeds - 1) + 2
    cfg = DemoConfig(seed=top, seeds=seeds)
    # every seed the runs give torch is taken at the bound ...
    assert all(_torch_takes(cfg.seed + k + j) for k in range(seeds) for j in (0, 1, 2))
    # ... and one more is not: refused when made, naming the setting
    assert not _torch_takes(top + 1 + seeds + 1)
    for bad in (top + 1, HIGH, 2**64):
        with pytest.raises(ValueError, match=r"^seed must be in \[") as info:
            DemoConfig(seed=bad, seeds=seeds)
        assert str(bad) in str(info.value)
    assert _torch_takes(LOW) and not _torch_takes(LOW - 1)
    DemoConfig(seed=LOW, seeds=seeds)
    with pytest.raises(ValueError, match=r"^seed must be >= "):
        DemoConfig(seed=LOW - 1, seeds=seeds)


@pytest.mark.parametrize(
    ("seed", "seeds", "expected"),
    [
        (HIGH, 1, "curvlab: error: --seed must be at most"),  # torch takes it, seed + 2 not
        (HIGH - 2, 2, "curvlab: error: --seed must be at most"),  # seed + 1 + 2 overflows
        (2**64, 1, "argument --seed: must be an integer in ["),  # torch takes no such seed
        (LOW - 1, 1, "argument --seed: must be an integer in ["),
    ],
)
def test_cli_demo_refuses_the_seed_before_training(
    tmp_path, monkeypatch, capsys, seed, seeds, expected
):
    def reached(*args, **kwargs):
        raise AssertionError("run_demo was reached with a seed torch cannot take")

    monkeypatch.setattr(demo_train, "run_demo", reached)
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--no-progress", "--out", str(out)]
    try:
        rc = main([*argv, "--seed", str(seed), "--seeds", str(seeds)])
    except SystemExit as exc:  # argparse's own refusal of the option
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert "Overflow" not in err and "run_demo was reached" not in err
    assert not out.exists()
