"""Review s25 (RX2): regressions of this session's own fixes, checked against dense float64 brute
force.

RX2-1: an interrupt (``KeyboardInterrupt``) inside a checkpoint's recomputation skipped the
always-called forward hook that pops the math-attention mode, and its stale entry kept the mode
from being pushed again: every later call on the model raised torch's ``CheckpointError``
(``trace`` 0.449664 before the interrupt, an error after it).

RX2-2: the time-major refusal advised transposing inside ``forward`` for a Transformer layer,
which ``kfac`` then refuses (its inner Linear layers).

RX2-3: the recomputation's global module hooks made torch warn "Using `torch.compile(module)`
when there are global hooks" at every product on a model with a compiled, checkpointed block.

RX2-4: a bfloat16/float16 CSR, CSC or BSR ``TensorOperator`` (and a BSC one of any dtype) was
accepted, then raised torch's raw ``NotImplementedError`` at the first product on the CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend
from torch.overrides import _get_current_function_mode_stack

import curvlab as cl
import curvlab._notrace as notrace
from curvlab._layout import MixedExamplesError
from curvlab.estimators import TensorOperator, exact_trace
from tests.test_regressions_s25 import _Checkpointed
from tests.test_regressions_s25 import _dense_hessian_ggn as _dense

DT = torch.float64
EPS = torch.finfo(DT).eps


def _problem(kernel: SDPBackend | None) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(1)
    twin = _Checkpointed(None, False).to(DT)  # no kernel of its own, no checkpoint
    model = _Checkpointed(kernel, True).to(DT)
    model.load_state_dict(twin.state_dict())
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(5, 6, 8, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    return model, twin, X, y


def _global_hooks() -> tuple[int, int, int]:
    m = nn.modules.module
    return (
        len(m._global_forward_pre_hooks),
        len(m._global_forward_hooks),
        len(m._global_forward_hooks_always_called),
    )


# ----------------------------------------------------------------------------------- RX2-1


def test_interrupt_in_checkpoint_recomputation_then_retry() -> None:
    model, twin, X, y = _problem(SDPBackend.FLASH_ATTENTION)
    H, _ = _dense(twin, X, y)
    want = float(H.trace())
    tol = H.shape[0] * 1e2 * EPS * float(H.diagonal().abs().sum())
    loss = nn.CrossEntropyLoss()
    hooks = _global_hooks()

    def trace() -> float:
        return float(cl.trace(model, loss, (X, y), matrix="hessian", method="exact").value)

    assert abs(trace() - want) <= tol  # 0.44966427238985607
    model.blk.trip = KeyboardInterrupt()  # Ctrl-C arriving inside the recomputation
    with pytest.raises(KeyboardInterrupt):
        trace()
    model.blk.trip = None
    # was [(Block, _MathAttentionMode)] for good, and the retry raised CheckpointError
    assert notrace._CALLS.__dict__.get("calls", []) == []
    assert not _get_current_function_mode_stack()
    assert _global_hooks() == hooks
    assert abs(trace() - want) <= tol
    assert notrace._CALLS.__dict__.get("calls", []) == []
    assert not _get_current_function_mode_stack()


def test_ordinary_error_in_recomputation_still_cleaned_up() -> None:
    model, twin, X, y = _problem(SDPBackend.FLASH_ATTENTION)
    _, G = _dense(twin, X, y)
    loss = nn.CrossEntropyLoss()
    model.blk.trip = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        cl.trace(model, loss, (X, y), matrix="ggn", method="exact")
    model.blk.trip = None
    assert notrace._CALLS.__dict__.get("calls", []) == []
    tr = float(cl.trace(model, loss, (X, y), matrix="ggn", method="exact").value)
    assert abs(tr - float(G.trace())) <= G.shape[0] * 1e2 * EPS * float(G.diagonal().sum())


# ----------------------------------------------------------------------------------- RX2-3


def test_compiled_checkpointed_block_no_global_hook_warning() -> None:
    model, twin, X, y = _problem(None)
    model.blk = torch.compile(model.blk)
    _, G = _dense(twin, X, y)
    loss = nn.CrossEntropyLoss()
    hooks = _global_hooks()
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tr = float(cl.trace(model, loss, (X, y), matrix="ggn", method="exact").value)
        diag = cl.diag_fisher(model, loss, (X, y), kind="empirical")
    # was five "Using `torch.compile(module)` when there are global hooks" warnings
    assert not [w for w in seen if "global hooks" in str(w.message)]
    assert warnings.filters == filters
    assert abs(tr - float(G.trace())) <= G.shape[0] * 1e2 * EPS * float(G.diagonal().sum())
    assert all(bool(torch.isfinite(v).all()) for v in diag.values())
    assert _global_hooks() == hooks
    assert notrace._CALLS.__dict__.get("calls", []) == []


# ----------------------------------------------------------------------------------- RX2-4


def _symmetric(dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(0)
    B = torch.randn(12, 12, generator=g, dtype=DT)
    A = (B + B.T) / 2
    A[A.abs() < 0.7] = 0
    return A.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["csr", "csc", "bsr"])
def test_sparse_16bit_compressed_refused_at_construction(dtype: torch.dtype, layout: str) -> None:
    A = _symmetric(dtype)
    sparse = {
        "csr": A.to_sparse_csr,
        "csc": A.to_sparse_csc,
        "bsr": lambda: A.to_sparse_bsr((2, 2)),
    }[layout]()
    name = str(dtype).removeprefix("torch.")
    # was accepted, then torch's NotImplementedError "addmm_out_sparse_csr_impl_mkl" at the product
    with pytest.raises(TypeError, match=rf"{layout.upper()} sparse matrix of dtype {name}") as e:
        TensorOperator(sparse)
    assert "to_sparse_coo()" in str(e.value) and "float32" in str(e.value)
    # the ways out named: COO in the same dtype, and a float32 copy, exact
    want = float(A.double().trace())
    assert float(exact_trace(TensorOperator(A.to_sparse_coo())).value) == want
    tr = float(exact_trace(TensorOperator(sparse.to(torch.float32))).value)
    assert tr == pytest.approx(want, rel=0, abs=12 * torch.finfo(torch.float32).eps * 12)


def test_sparse_compressed_supported_still_exact() -> None:
    A = _symmetric(DT)
    want = float(A.trace())
    for sparse in (A.to_sparse_csr(), A.to_sparse_csc(), A.to_sparse_bsr((2, 2))):
        tr = float(exact_trace(TensorOperator(sparse)).value)
        assert tr == pytest.approx(want, rel=0, abs=1e2 * EPS * float(A.abs().sum()))


# ----------------------------------------------------------------------------------- RX2-2


class _TimeMajor(nn.Module):
    """A sequence-first Transformer encoder fed a time-major batch ``(T, B, d)``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 6)
        layer = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(self.inp(x)))


class _TimeMajorLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 5), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_time_major_advice_matches_what_kfac_takes(kind: str) -> None:
    torch.manual_seed(0)
    model = (_TimeMajor() if kind == "transformer" else _TimeMajorLSTM()).to(DT)
    X = torch.randn(5, 4, 3, dtype=DT)
    y = torch.randint(0, 2, (5, 4))
    with pytest.raises(MixedExamplesError) as info:
        cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="empirical")
    text = str(info.value)
    assert "time-major" in text and "batch_first=True" in text
    note = "kfac and KFACNoise: for torch's Transformer layers, batch_first=True only"
    # was only "or keep the layer sequence-first and transpose inside forward", which kfac then
    # refuses for a Transformer layer's Linear layers
    assert (note in text) == (kind == "transformer")
    if kind == "transformer":
        assert "params=" in text


def test_sparse_bsc_refused_where_torch_has_no_product() -> None:
    A = _symmetric(DT)
    sparse = A.to_sparse_bsc((2, 2))
    try:
        with torch.no_grad():
            sparse @ torch.zeros(12, 1, dtype=DT)
    except RuntimeError:
        pass
    else:  # pragma: no cover - a torch that multiplies BSC on the CPU
        tr = float(exact_trace(TensorOperator(sparse)).value)
        assert tr == pytest.approx(float(A.trace()), rel=0, abs=1e2 * EPS * float(A.abs().sum()))
        return
    with pytest.raises(TypeError, match="BSC sparse matrix of dtype float64") as e:
        TensorOperator(sparse)
    assert "to_sparse_coo()" in str(e.value) and "float32 copy" not in str(e.value)
