"""curvlab under torch.distributed: 2, 3 and 4 gloo CPU processes against one process on all data.

Each world is one spawn; the checks run inside it (tests/distributed_checks.py) and report back
through one JSON file per rank. Outside a spawn: the API without torch.distributed.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import curvlab as cl
from curvlab.distributed import (
    active,
    communication_stats,
    decode_counts,
    encode_counts,
    group_scope,
    unwrap_model,
)
from tests import distributed_checks

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_spawned_world_matches_one_process(world: int, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "diag").mkdir()
    mp.spawn(
        distributed_checks.worker,
        args=(world, str(tmp_path / "init"), str(out)),
        nprocs=world,
        join=True,
    )
    failures = []
    for rank in range(world):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["checks"] > 50, report
        failures += report["failures"]
    assert not failures, "\n".join(failures)


def test_nothing_changes_without_torch_distributed() -> None:
    assert not torch.distributed.is_initialized()
    model, loss_fn = nn.Linear(3, 2), nn.CrossEntropyLoss()
    data = (torch.randn(6, 3), torch.randint(0, 2, (6,)))
    before = communication_stats()
    a = cl.diag_fisher(model, loss_fn, data)
    b = cl.diag_fisher(model, loss_fn, data, process_group="local")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert active() is None and communication_stats() == before
    with group_scope("local"):
        assert active() is None


def test_entry_points_document_process_group() -> None:
    for fn in (
        cl.diag_fisher,
        cl.diag_hessian,
        cl.kfac,
        cl.gradient_stats,
        cl.fisher_norms,
        cl.curvature_operator,
        cl.trace,
        cl.eigenvalues,
        cl.spectral_density,
        cl.fisher_trace,
        cl.analyze,
    ):
        assert "process_group" in inspect.signature(fn).parameters, fn.__name__
    for cls in (cl.Diagnostics, cl.noise.NoisyOptimizer):
        assert "process_group" in inspect.signature(cls).parameters, cls.__name__


def test_clear_errors() -> None:
    model, loss_fn = nn.Linear(3, 2), nn.CrossEntropyLoss()
    data = (torch.randn(6, 3), torch.randint(0, 2, (6,)))
    with pytest.raises(ValueError, match="not initialised"):
        cl.diag_fisher(model, loss_fn, data, process_group=object())
    with pytest.raises(ValueError, match="'local'"):
        cl.diag_fisher(model, loss_fn, data, process_group="global")
    with pytest.raises(ValueError, match="at least 2\\s+processes"):
        cl.analysis.data_parallel_noise_scale(model, loss_fn, data)


def test_counts_travel_exactly_in_float32() -> None:
    counts = [0, 1, 2047, 2048, 5_000_001, 2**40 + 12345]
    enc = encode_counts(counts, torch.float32, "cpu")
    assert decode_counts(enc * 4, len(counts)) == [4 * c for c in counts]


def test_unwrap_model_passes_plain_modules_through() -> None:
    model = nn.Linear(2, 2)
    assert unwrap_model(model) is model
    assert unwrap_model(nn.DataParallel(model)) is model
