"""``fisher_norms`` on one chunk holds one parameter's per-example rows at a time.

A Conv layer's weight and bias rows were concatenated (``torch.cat``) after the weight's rows were
formed, so the folded path held its largest parameter's rows twice: twice the bound the streaming
sizing assumes (docs/scale.md). Peak memory is read from torch's profiler (CPU allocations).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.profiler import ProfilerActivity, profile

import curvlab as cl


def _peak_bytes(fn) -> int:  # type: ignore[no-untyped-def]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_one_chunk_holds_a_parameters_rows_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 128, 3), nn.Flatten(), nn.Linear(128 * 4, 3)).double()
    N = 64
    X = torch.randn(N, 16, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    loss_fn = nn.CrossEntropyLoss()
    got = cl.fisher_norms(model, loss_fn, (X, y))
    weight_rows = N * model[0].weight.numel() * 8  # 9 MiB, the largest tensor the call needs
    peak = _peak_bytes(lambda: cl.fisher_norms(model, loss_fn, (X, y)))
    assert peak < 1.3 * weight_rows, (peak / 2**20, weight_rows / 2**20)  # 2.1x before

    # brute force: F = (1/N) G^T G with G the per-example gradients (rows)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def nll(p, x, t):  # type: ignore[no-untyped-def]
        return loss_fn(functional_call(model, p, (x[None],)), t[None])

    per = vmap(grad(nll), in_dims=(None, 0, 0))(params, X, y)
    G = torch.cat([g.reshape(N, -1) for g in per.values()], dim=1)
    frob = torch.linalg.matrix_norm(G @ G.T) / N
    diag = torch.linalg.vector_norm(G.square().sum(0)) / N
    torch.testing.assert_close(got.frobenius, frob.item(), rtol=1e-10, atol=0)
    torch.testing.assert_close(got.diag_frobenius, diag.item(), rtol=1e-10, atol=0)
