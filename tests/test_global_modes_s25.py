"""Ambient global modes and settings (review s25, GM): an ambient
``torch.autograd.graph.saved_tensors_hooks`` context (activation compression) changed every
curvlab number; under ``detect_anomaly`` the batched products' failed attempt leaked torch's
"Error detected" warning; two threads calling curvlab at once left the process-wide SDPA flags
math-only and mixed the Dropout masks of one operator's passes (a non-symmetric "Hessian")."""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvlab as cl
from tests.problems import Problem
from tests.reference import (
    as_dict,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    per_example_grads,
    split_diag,
)


def _problem() -> Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    return Problem("mlp-ce-mean-one", model, nn.CrossEntropyLoss(), (X, y), X, y)


def _pack(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16) if t.is_floating_point() else t


def _unpack(t: Tensor) -> Tensor:
    return t.to(torch.float64) if t.is_floating_point() else t


@contextmanager
def _compressed() -> Iterator[None]:
    """A user's activation-compression context (saved activations kept in bfloat16)."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


def _flat(d: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


def _references(p: Problem) -> dict[str, Any]:
    H, G, EF = dense_hessian(p), dense_ggn(p), dense_empirical_fisher(p)
    grads = per_example_grads(p)
    return {
        "H": H,
        "G": G,
        "EF": EF,
        "tr_H": H.trace().item(),
        "tr_G": G.trace().item(),
        "eig_H": torch.linalg.eigvalsh(H).flip(0)[:2],
        "diag_H": _flat(as_dict(p.model, H)),
        "diag_G": _flat(as_dict(p.model, G)),
        "diag_EF": _flat(as_dict(p.model, EF)),
        "mean": _flat(split_diag(p.model, grads.mean(0))),
        "second": _flat(split_diag(p.model, (grads**2).mean(0))),
    }


CALLS: dict[str, tuple[Callable[[Problem], Any], str]] = {
    "trace hessian": (
        lambda p: cl.trace(p.model, p.loss_fn, p.data, matrix="hessian", method="exact").value,
        "tr_H",
    ),
    "trace ggn": (
        lambda p: cl.trace(p.model, p.loss_fn, p.data, matrix="ggn", method="exact").value,
        "tr_G",
    ),
    "eigenvalues": (
        lambda p: torch.as_tensor(cl.eigenvalues(p.model, p.loss_fn, p.data, k=2).values),
        "eig_H",
    ),
    "diag_hessian": (lambda p: _flat(cl.diag_hessian(p.model, p.loss_fn, p.data)), "diag_H"),
    "diag_fisher exact": (
        lambda p: _flat(cl.diag_fisher(p.model, p.loss_fn, p.data, kind="exact")),
        "diag_G",
    ),
    "diag_fisher exact func": (
        lambda p: _flat(cl.diag_fisher(p.model, p.loss_fn, p.data, kind="exact", backend="func")),
        "diag_G",
    ),
    "diag_fisher empirical": (
        lambda p: _flat(cl.diag_fisher(p.model, p.loss_fn, p.data, kind="empirical")),
        "diag_EF",
    ),
    "diag_fisher empirical func": (
        lambda p: _flat(
            cl.diag_fisher(p.model, p.loss_fn, p.data, kind="empirical", backend="func")
        ),
        "diag_EF",
    ),
    "diag_fisher empirical backpack": (
        lambda p: _flat(
            cl.diag_fisher(p.model, p.loss_fn, p.data, kind="empirical", backend="backpack")
        ),
        "diag_EF",
    ),
    "gradient_stats mean": (
        lambda p: _flat(cl.gradient_stats(p.model, p.loss_fn, p.data).mean),
        "mean",
    ),
    "gradient_stats second moment": (
        lambda p: _flat(cl.gradient_stats(p.model, p.loss_fn, p.data).second_moment),
        "second",
    ),
    "fisher_norms": (
        lambda p: cl.fisher_norms(p.model, p.loss_fn, p.data, kind="empirical").frobenius,
        "EF_frobenius",
    ),
    "curvature_operator hessian": (
        lambda p: cl.curvature_operator(p.model, p.loss_fn, p.data, matrix="hessian").matmat(
            torch.eye(43, dtype=torch.float64)
        ),
        "H",
    ),
    "curvature_operator ggn": (
        lambda p: cl.curvature_operator(p.model, p.loss_fn, p.data, matrix="ggn").matmat(
            torch.eye(43, dtype=torch.float64)
        ),
        "G",
    ),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_ambient_saved_tensors_hooks_leave_the_numbers_exact(name: str) -> None:
    p = _problem()
    ref = _references(p)
    ref["EF_frobenius"] = torch.linalg.matrix_norm(ref["EF"]).item()
    call, key = CALLS[name]
    with _compressed():
        got = call(p)
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    expected = ref[key]
    if isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-10, abs=1e-12), (got, expected)
    else:  # (Lanczos converges to its tolerance)
        rtol = 1e-6 if name == "eigenvalues" else 1e-9
        torch.testing.assert_close(got, expected, rtol=rtol, atol=1e-12)


def test_ambient_saved_tensors_hooks_stochastic_and_factored_calls_as_outside() -> None:
    """The calls without a dense closed form (K-FAC's factors, an MC estimate, a density) give
    the numbers of the call outside the hooks, bit for bit (those are checked against brute
    force elsewhere), and the user's hooks stack is as it was."""
    p = _problem()
    calls = {
        "kfac": lambda: torch.cat(
            [
                torch.cat([f.A.reshape(-1), f.G.reshape(-1)])
                for f in cl.kfac(p.model, p.loss_fn, p.data, kind="exact").values()
            ]
        ),
        "trace hutchinson": lambda: torch.tensor(
            cl.trace(p.model, p.loss_fn, p.data, matrix="ggn", method="hutchinson", seed=0).value
        ),
        "fisher_trace": lambda: torch.tensor(
            cl.fisher_trace(p.model, p.loss_fn, p.data, seed=0).value
        ),
        "diag_fisher mc": lambda: _flat(
            cl.diag_fisher(p.model, p.loss_fn, p.data, kind="mc", seed=1)
        ),
        "spectral_density": lambda: torch.as_tensor(
            cl.spectral_density(p.model, p.loss_fn, p.data, num_steps=10, seed=0).nodes
        ),
    }
    plain = {k: f() for k, f in calls.items()}
    for k, f in calls.items():
        with _compressed():
            got = f()
        assert torch.equal(got, plain[k]), k


def test_ambient_saved_tensors_hooks_in_the_training_loop() -> None:
    """In-loop: ``Diagnostics.step`` inside the user's compression context records the brute
    force traces, and the user's own backward pass keeps the user's hooks."""
    p = _problem()
    ref = _references(p)
    packed: list[int] = []

    def pack(t: Tensor) -> Tensor:
        packed.append(1)
        return _pack(t)

    names = ["trace_hessian", "sharpness"]
    plain = cl.Diagnostics(p.model, p.loss_fn, quantities=names, every=1).step(0, p.X, p.y)
    diag = cl.Diagnostics(p.model, p.loss_fn, quantities=names, every=1)
    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        p.loss_fn(p.model(p.X), p.y).backward()
        used = len(packed)
        rec = diag.step(0, p.X, p.y)
    assert used > 0  # the user's own pass packed its activations
    assert len(packed) == used  # curvlab's passes did not
    assert plain is not None and rec is not None
    assert rec["values"] == plain["values"]
    values = rec["values"]
    se = values["trace_hessian_stderr"]
    assert abs(values["trace_hessian"] - ref["tr_H"]) < 4 * se
    top = ref["eig_H"][0].item()
    assert abs(values["sharpness"] - top) <= 2 * values["sharpness_residual"] + 1e-10


def test_anomaly_mode_products_one_at_a_time_without_torch_warning() -> None:
    p = _problem()
    ref = _references(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autograd.detect_anomaly():
            res = cl.trace(p.model, p.loss_fn, p.data, matrix="hessian", method="exact")
            eig = cl.eigenvalues(p.model, p.loss_fn, p.data, k=2)
            sd = cl.spectral_density(p.model, p.loss_fn, p.data, num_steps=10, seed=0)
    leaked = [str(w.message).splitlines()[0] for w in caught if "Error detected" in str(w.message)]
    assert not leaked, leaked
    assert res.value == pytest.approx(ref["tr_H"], rel=1e-10)
    torch.testing.assert_close(torch.as_tensor(eig.values), ref["eig_H"], rtol=1e-8, atol=1e-10)
    assert "anomaly" in res.info["batched"]  # its k products ran one at a time, said so
    for r in (eig, sd):  # one vector per product anyway: nothing to say
        assert "batched" not in r.info, r.info
    plain = cl.trace(p.model, p.loss_fn, p.data, matrix="hessian", method="exact")
    assert "batched" not in plain.info  # outside anomaly mode: batched, nothing to say
    assert plain.value == res.value


def _dropout_model(seed: int) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for q in m.parameters():
            q.copy_(torch.randn(q.shape, generator=g, dtype=torch.float64))
    batches = [
        (
            torch.randn(16, 4, dtype=torch.float64, generator=g),
            torch.randint(0, 3, (16,), generator=g),
        )
        for _ in range(2)
    ]
    return m.train(), batches


@contextmanager
def _background(work: Callable[[], None]) -> Iterator[None]:
    """Run ``work`` over and over in a second thread for the block (thread switches every
    10 us, so that the two threads interleave)."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while not stop.is_set():
                work()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(interval)
    assert not errors, errors


def test_two_threads_keep_one_operators_dropout_masks() -> None:
    loss_fn = nn.CrossEntropyLoss()
    m0, data0 = _dropout_model(0)
    m1, data1 = _dropout_model(1)

    def dense(op: Any) -> Tensor:
        eye = torch.eye(op.shape[0], dtype=torch.float64)
        return torch.cat([op.matmat(eye[:, j : j + 1]) for j in range(op.shape[0])], dim=1)

    def operator() -> Any:
        return cl.curvature_operator(m0, loss_fn, data0, matrix="hessian", keep_graph=False)

    alone = dense(operator())
    assert (alone - alone.T).abs().max().item() < 1e-12
    with _background(lambda: cl.trace(m1, loss_fn, data1, matrix="hessian", method="exact")):
        op = operator()
        threaded = dense(op)
        again = dense(op)
    # one fixed matrix (the masks drawn from seeds of the global RNG, which the other thread's
    # call may have rewound: docs/conventions.md, so not necessarily the masks of `alone`)
    assert (threaded - threaded.T).abs().max().item() < 1e-12
    assert (threaded - again).abs().max().item() == 0.0, (threaded - again).abs().max().item()


def _sdpa_flags() -> tuple[bool, ...]:
    b = torch.backends.cuda
    return (
        b.flash_sdp_enabled(),
        b.mem_efficient_sdp_enabled(),
        b.cudnn_sdp_enabled(),
        b.math_sdp_enabled(),
    )


def test_two_threads_leave_the_sdpa_flags_as_they_were() -> None:
    loss_fn = nn.CrossEntropyLoss()
    before = _sdpa_flags()
    q = k = v = torch.randn(2, 4, 64, 32, generator=torch.Generator().manual_seed(0))
    out = F.scaled_dot_product_attention(q, k, v)
    jobs = []
    for i in range(2):
        torch.manual_seed(i)
        m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        g = torch.Generator().manual_seed(10 + i)
        data = (
            torch.randn(32, 4, dtype=torch.float64, generator=g),
            torch.randint(0, 3, (32,), generator=g),
        )
        jobs.append((m, data))

    def work(m: nn.Module, data: Any) -> None:
        for _ in range(30):
            cl.trace(m, loss_fn, data, matrix="hessian", method="exact")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=work, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert _sdpa_flags() == before
    assert torch.equal(F.scaled_dot_product_attention(q, k, v), out)
