"""Review s14 (fixC): batches without a batch axis, and K-FAC on a TorchScript model.

* ``DataLoader(dataset, batch_size=None)`` over single samples of an autoencoder yields
  ``(x_i, x_i)`` of shape ``(D,)``: it passed validation as ``D`` examples, the model (a
  ``Linear`` takes an unbatched vector) ran on it, and the per-example passes then raised torch's
  raw ``mat1 and mat2 shapes cannot be multiplied``. Now a ``ValueError`` names the likely cause
  (no batch axis) and the fix, before the backward passes; valid batches are computed as before
  (compared with dense brute force).
* ``kfac`` on ``torch.jit.script``/``torch.jit.trace`` said "the model has no Linear ... layer"
  although it has two (RecursiveScriptModules, on which module hooks do not run). Now it names
  the layers as TorchScript modules and asks for the eager model.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl
from tests import bruteforce as B
from tests import reference as R

_NO_AXIS = r"no batch axis.*batch_size=None.*DataLoader\(dataset, batch_size=B\)"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 3)).double()


def _samples() -> Tensor:
    return torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _unbatched(X: Tensor, y: Tensor) -> DataLoader:
    """Single samples, no batch axis: what ``DataLoader(ds, batch_size=None)`` yields."""
    return DataLoader(TensorDataset(X, y), batch_size=None)


def _scripted(model: nn.Module, how: str, X: Tensor) -> nn.Module:
    with warnings.catch_warnings():  # torch.jit.script is deprecated in torch 2.14
        warnings.simplefilter("ignore")
        return torch.jit.script(model) if how == "script" else torch.jit.trace(model, X)


UNBATCHED_CALLS: dict[str, Any] = {
    "diag_fisher-empirical": lambda m, lf, d: cl.diag_fisher(m, lf, d),
    "diag_fisher-mc": lambda m, lf, d: cl.diag_fisher(m, lf, d, "mc", seed=0),
    "gradient_stats": lambda m, lf, d: cl.gradient_stats(m, lf, d),
    "kfac-empirical": lambda m, lf, d: cl.kfac(m, lf, d, "empirical"),
    "kfac-exact": lambda m, lf, d: cl.kfac(m, lf, d, "exact"),
}


@pytest.mark.parametrize("call", UNBATCHED_CALLS)
def test_autoencoder_samples_without_batch_axis_get_a_clear_error(call: str) -> None:
    torch.set_num_threads(1)
    model, X = _mlp(), _samples()
    before = R.snapshot(model)
    with pytest.raises(ValueError, match=_NO_AXIS) as err:
        UNBATCHED_CALLS[call](model, nn.MSELoss(), _unbatched(X, X))
    message = str(err.value)
    assert "inputs of shape (3,)" in message and "read as 3 examples" in message
    assert "mat1 and mat2" in message  # the model's own error, quoted
    assert isinstance(err.value.__cause__, RuntimeError)  # and chained
    R.assert_untouched(model, before)


def test_one_example_without_leading_axis_gets_the_same_error() -> None:
    torch.set_num_threads(1)
    model, X = _mlp(), _samples()
    with pytest.raises(ValueError, match=_NO_AXIS):
        cl.diag_fisher(model, nn.MSELoss(), (X[0], X[0]))


def test_zero_dim_targets_name_the_missing_batch_axis() -> None:
    """Classification samples without a batch axis: ``(x_i, y_i)`` with a 0-dim label; refused
    at validation (before any forward pass) with the cause, not only "leading dimensions"."""
    torch.set_num_threads(1)
    model, X = _mlp(), _samples()
    y = torch.tensor([0, 2, 1, 1, 0])
    for call in ("diag_fisher-empirical", "gradient_stats", "kfac-exact"):
        with pytest.raises(ValueError, match=r"targets of shape \(\).*" + _NO_AXIS):
            UNBATCHED_CALLS[call](model, nn.CrossEntropyLoss(), _unbatched(X, y))


def test_model_that_fails_on_the_whole_batch_keeps_its_own_error() -> None:
    """A model that cannot take the batch at all is not blamed on the batch axis."""
    torch.set_num_threads(1)
    model = _mlp()
    X = torch.randn(4, 5, dtype=torch.float64)  # 5 features for a Linear(3, 2)
    for call in ("diag_fisher-empirical", "kfac-exact"):
        with pytest.raises(RuntimeError, match="mat1 and mat2") as err:
            UNBATCHED_CALLS[call](model, nn.MSELoss(), (X, torch.randn(4, 3).double()))
        assert "batch axis" not in str(err.value)


# ------------------------------------------------------------- valid batches: computed as before


class _Tokens(nn.Module):
    """A sequence model on ``(N, T)`` token ids (optionally passed as a dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(input_ids))).mean(1)


def _valid_cases() -> dict[str, tuple[nn.Module, nn.Module, list]]:
    g = torch.Generator().manual_seed(2)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (6, 5), generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    torch.manual_seed(3)
    tokens = _Tokens().double()
    return {
        "2-D (N, D) autoencoder": (_mlp(), nn.MSELoss(), [(X[:4], X[:4]), (X[4:], X[4:])]),
        "sequences (N, T)": (tokens, nn.CrossEntropyLoss(), [(ids[:4], y[:4]), (ids[4:], y[4:])]),
        "dict inputs": (
            tokens,
            nn.CrossEntropyLoss(),
            [({"input_ids": ids[:3]}, y[:3]), ({"input_ids": ids[3:]}, y[3:])],
        ),
    }


@pytest.mark.parametrize("case", list(_valid_cases()))
def test_valid_batches_are_not_refused(case: str) -> None:
    torch.set_num_threads(1)
    model, loss_fn, batches = _valid_cases()[case]
    dense = B.Dense(SimpleNamespace(model=model, loss_fn=loss_fn, batches=batches))
    F = cl.diag_fisher(model, loss_fn, batches)
    assert F.backend == "hooks"  # the path whose probe now translates failures
    B.assert_dicts_close(dict(F), dense.diag("empirical_fisher"), rtol=1e-8)
    stats = cl.gradient_stats(model, loss_fn, batches)
    B.assert_dicts_close(dict(stats.mean), dense.split(dense.grad_mean), rtol=1e-8)
    B.assert_dicts_close(dict(stats.variance), dense.split(dense.grad_variance), rtol=1e-8)


# --------------------------------------------------------------------------- K-FAC on TorchScript


@pytest.mark.parametrize("how", ["script", "trace"])
def test_kfac_names_torchscript_layers(how: str) -> None:
    torch.set_num_threads(1)
    model, X = _mlp(), _samples()
    y = torch.tensor([0, 2, 1, 1, 0])
    scripted = _scripted(model, how, X)
    with pytest.raises(ValueError, match=r"layers '0', '2' are TorchScript modules.*eager model"):
        cl.kfac(scripted, nn.CrossEntropyLoss(), (X, y), "exact")
    # the other per-example quantities compute it exactly (through torch.func)
    dense = B.Dense(SimpleNamespace(model=model, loss_fn=nn.CrossEntropyLoss(), batches=[(X, y)]))
    F = cl.diag_fisher(scripted, nn.CrossEntropyLoss(), (X, y))
    B.assert_dicts_close(dict(F), dense.diag("empirical_fisher"), rtol=1e-8)


def test_kfac_on_a_partly_scripted_model() -> None:
    """A TorchScript layer inside an eager model is refused by name (its block would be missing
    from the result without a word); left out with ``params=``, the rest is the eager model's."""
    torch.set_num_threads(1)
    model, X = _mlp(), _samples()
    y = torch.tensor([0, 2, 1, 1, 0])
    mixed = nn.Sequential(model[0], model[1], _scripted(model[2], "script", X[:, :2]))
    with pytest.raises(ValueError, match=r"layer '2' is a TorchScript module.*params="):
        cl.kfac(mixed, nn.CrossEntropyLoss(), (X, y), "exact")
    got = cl.kfac(mixed, nn.CrossEntropyLoss(), (X, y), "exact", params="0")
    want = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), "exact", params="0")
    assert list(got) == list(want) == ["0"]
    torch.testing.assert_close(got["0"].A, want["0"].A, rtol=1e-12, atol=0)
    torch.testing.assert_close(got["0"].G, want["0"].G, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "call",
    {
        "fisher_norms": lambda m, lf, d: cl.fisher_norms(m, lf, d),
        "diag_fisher-exact": lambda m, lf, d: cl.diag_fisher(m, lf, d, "exact"),
        "diag_fisher-func": lambda m, lf, d: cl.diag_fisher(m, lf, d, backend="func"),
    }.items(),
    ids=lambda c: c[0],
)
def test_other_per_example_paths_give_the_same_error(call: Any) -> None:
    torch.set_num_threads(1)
    model, X = _mlp(), _samples()
    before = R.snapshot(model)
    with pytest.raises(ValueError, match=_NO_AXIS):
        call[1](model, nn.MSELoss(), _unbatched(X, X))
    R.assert_untouched(model, before)


# ------------------------------------------------------------------------ torch.distributed
_DDP_CALLS = {
    "kfac": lambda m, d: cl.kfac(m, nn.MSELoss(), d),
    "kfac_mc": lambda m, d: cl.kfac(m, nn.MSELoss(), d, kind="mc", seed=0),
    "diag_fisher": lambda m, d: cl.diag_fisher(m, nn.MSELoss(), d),
    "gradient_stats": lambda m, d: cl.gradient_stats(m, nn.MSELoss(), d),
    "fisher_norms": lambda m, d: cl.fisher_norms(m, nn.MSELoss(), d),
}


def _unbatched_rank(rank: int, init_file: str, out_dir: str) -> None:
    """Rank 0's batch has no batch axis, rank 1's is a proper batch: every quantity must raise
    the clear error on both ranks (review s14: kfac raised on rank 0 alone, rank 1 waited)."""
    import json
    import os
    import sys
    from pathlib import Path

    from tests.distributed_checks import join_gloo

    join_gloo(rank, 2, init_file, 60)
    try:
        X = _samples()
        data = _unbatched(X, X) if rank == 0 else (torch.randn(3, X.shape[-1], dtype=X.dtype),) * 2
        got = {}
        for name, call in _DDP_CALLS.items():
            try:
                call(_mlp(), data)
                got[name] = "answered"
            except ValueError as e:
                got[name] = str(e)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(got))
    finally:
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_under_ddp_a_batch_without_batch_axis_on_one_rank_is_refused_on_every_rank(tmp_path):  # type: ignore[no-untyped-def]
    import json

    import torch.multiprocessing as mp

    mp.spawn(_unbatched_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(got) == set(_DDP_CALLS)
        for name, message in got.items():
            assert "no batch axis" in message, (rank, name, message)


def test_diag_hessian_of_a_batch_without_batch_axis_takes_the_hessian_products() -> None:
    """BackPACK's layout probe failed with torch's raw shape error (review s14); the batch's
    Hessian needs no examples, so "auto" hands over to the products (what backend="columns"
    gives)."""
    model, X = _mlp(), _samples()
    x = X[0]
    got = cl.diag_hessian(model, nn.MSELoss(), (x, x.clone()))
    ref = cl.diag_hessian(model, nn.MSELoss(), (x, x.clone()), backend="columns")
    assert got.backend == "columns"
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
