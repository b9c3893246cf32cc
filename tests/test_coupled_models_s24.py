"""Review s24: models that mix the examples of a batch, or draw random numbers in their forward,
where a per-example split or a refusal was missing.

* ``diag_hessian`` split a batch larger than ``chunk_size`` into chunks, each a batch of its own,
  so a functional batch norm normalised each chunk alone: another function's diagonal.
* ``NoisyOptimizer.capture()`` accepted a model that mixes the examples (the separate pass and
  ``sample()`` refuse it) and drew from a captured diagonal of no definition.
* ``fisher_trace`` and ``trace(method="exact")`` refused train-mode ``nn.Dropout`` modules only;
  ``F.dropout(x, p, self.training)`` went through and gave a biased trace.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl
from curvlab._layout import MixedExamplesError
from curvlab.noise import DiagFisherNoise, FisherTraceNoise, KFACNoise, NoisyOptimizer


class FunctionalBN(nn.Module):
    """A ghost/virtual batch norm written with ``F.batch_norm``: no module the scan knows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, training=True)


class FunctionalDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, self.training)


def _coupled(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), FunctionalBN(), nn.Tanh(), nn.Linear(4, 3)).double()


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, dtype=torch.float64, generator=g), torch.randint(
        0, 3, (n,), generator=g
    )


def _hessian_diagonal(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The whole batch's loss Hessian, dense, per parameter (float64 brute force)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    out = {}
    for name, p in params.items():

        def loss(w: torch.Tensor, name: str = name) -> torch.Tensor:
            return F.cross_entropy(functional_call(model, {**params, name: w}, (X,)), y)

        H = hessian(loss)(p).reshape(p.numel(), p.numel())
        out[name] = H.diagonal().reshape(p.shape)
    return out


# ------------------------------------------------------------------ 1. diag_hessian's chunks


def test_diag_hessian_keeps_a_coupled_batch_whole_across_chunks() -> None:
    # chunk_size=3 on a batch of 8: before the fix each chunk of 3, 3 and 2 examples was
    # normalised by itself (3.weight[0][0]: 0.1021 for 0.0782, whole diagonal 111% off)
    model = _coupled().eval()
    X, y = _batch()
    want = _hessian_diagonal(model, X, y)
    got = cl.diag_hessian(model, nn.CrossEntropyLoss(), (X, y), chunk_size=3)
    for name, ref in want.items():
        # float64 Hessian products against float64 autograd: rounding of a few ulps of the
        # largest entry, far below the 0.02 absolute difference of the defect
        tol = 1e-10 * max(1.0, float(ref.abs().max()))
        assert torch.allclose(got[name], ref, rtol=0, atol=tol), name


def test_diag_hessian_still_chunks_a_model_that_keeps_examples_apart() -> None:
    # the same numbers, whichever chunk size, for a model without coupling (chunks are exact)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = _batch()
    want = _hessian_diagonal(model, X, y)
    calls = []
    model[0].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    got = cl.diag_hessian(model, nn.CrossEntropyLoss(), (X, y), chunk_size=3, backend="columns")
    for name, ref in want.items():
        tol = 1e-10 * max(1.0, float(ref.abs().max()))
        assert torch.allclose(got[name], ref, rtol=0, atol=tol), name
    # every pass on at most a chunk of examples, the coupling check's included
    assert max(calls) == 3


def test_diag_hessian_coupling_check_stays_within_chunk_size() -> None:
    # a coupled batch is kept whole for the products, but the check itself runs on a chunk
    model = _coupled().eval()
    X, y = _batch()
    sizes = []
    model[1].register_forward_pre_hook(
        lambda m, a: sizes.append((a[0].shape[0], torch.is_grad_enabled()))
    )
    cl.diag_hessian(model, nn.CrossEntropyLoss(), (X, y), chunk_size=3)
    # the check's passes (without gradient) come first, on at most a chunk; then the operator's
    # on the whole batch
    whole = next(i for i, (n, _) in enumerate(sizes) if n == 8)
    assert whole >= 3 and all(n <= 3 and not grad for n, grad in sizes[:whole])
    assert all(n == 8 for n, grad in sizes if grad)  # the products' passes: the whole batch


# ------------------------------------------------------------------ 2. the capture path


@pytest.mark.parametrize("make", [DiagFisherNoise, KFACNoise, FisherTraceNoise])
def test_capture_refuses_a_model_that_mixes_examples(make: type) -> None:
    model = _coupled()
    X, y = _batch()
    lf = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noisy = NoisyOptimizer(opt, make(scale=1.0), model, lf, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    noisy.zero_grad()
    with noisy.capture():
        lf(model(X), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    gen = noisy.generator.get_state()
    with pytest.raises(MixedExamplesError, match="mixes the examples"):
        noisy.step()
    # no trace: the optimizer did not step, no noise reached .grad, the draw did not happen
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert torch.equal(p.grad, grads[n]), n
    assert torch.equal(noisy.generator.get_state(), gen)
    assert noisy.steps_taken == 0


def test_capture_checks_once_per_signature() -> None:
    # no extra forward (no host read) after the first check of a call signature
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = _batch()
    lf = nn.CrossEntropyLoss()
    noisy = NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), DiagFisherNoise(scale=1.0), model, lf, seed=0
    )
    forwards = []
    model.register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]))
    counts = []
    for _ in range(2):
        noisy.zero_grad()
        start = len(forwards)
        with noisy.capture():  # the check runs where the block ends (the parameters it saw)
            lf(model(X), y).backward()
        noisy.step()
        counts.append(len(forwards) - start - 1)  # beyond the step's own forward
    assert counts[0] >= 2  # the check's passes: two examples alone (and the layout probe)
    assert counts[1] == 0
    assert noisy.steps_taken == 2


# ------------------------------------------------------------------ 3. random forwards


def _dropout_model(training: bool) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), FunctionalDropout(0.5), nn.Linear(5, 3))
    return model.double().train(training)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, d: cl.fisher_trace(m, nn.CrossEntropyLoss(), d, seed=0),
        lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, matrix="fisher", method="exact"),
        lambda m, d: cl.trace(m, nn.CrossEntropyLoss(), d, matrix="ggn", method="exact"),
        lambda m, d: cl.trace(
            m, nn.CrossEntropyLoss(), d, matrix="empirical_fisher", method="exact"
        ),
    ],
)
def test_exact_traces_refuse_a_forward_that_draws_random_numbers(call) -> None:  # noqa: ANN001
    # F.dropout in train mode: fisher_trace gave 2.853 +- 0.067 where E_mask Tr(G_mask) is
    # 2.317 +- 0.030 (labels from one pass's masks, per-example gradients from vmap's draws)
    model = _dropout_model(training=True)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="global RNG.*model.eval()"):
        call(model, _batch())
    assert torch.equal(torch.get_rng_state(), state)  # the probe drew nothing for good


def test_exact_ggn_trace_of_a_functional_dropout_in_eval_mode() -> None:
    # F.dropout(x, p, self.training) in eval mode draws nothing: accepted, and the value is
    # the dense GGN's trace
    model = _dropout_model(training=False)
    X, y = _batch(6)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def logits(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, ps, (X,))

    out = logits(params)
    J = jacrev(logits)(params)
    Jf = torch.cat([J[n].reshape(out.numel(), -1) for n in params], dim=1)
    p = out.softmax(-1)
    Hf = torch.block_diag(*[(torch.diag(r) - torch.outer(r, r)) / len(X) for r in p])
    want = float(torch.trace(Jf.T @ Hf @ Jf))
    got = cl.trace(model, nn.CrossEntropyLoss(), (X, y), matrix="ggn", method="exact").value
    assert got == pytest.approx(want, rel=1e-10)


def test_capture_check_sees_the_parameters_of_the_captured_pass() -> None:
    # two NoisyOptimizers on the body and the head of one model, captured together: the first
    # one's step moves the body before the second one steps, whose check must compare the
    # captured pass with passes at the same parameters (a false MixedExamplesError otherwise)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = _batch()
    lf = nn.CrossEntropyLoss()
    body = NoisyOptimizer(
        torch.optim.SGD(model[0].parameters(), lr=0.5),
        DiagFisherNoise(scale=0.1),
        model,
        lf,
        seed=1,
    )
    head = NoisyOptimizer(
        torch.optim.SGD(model[2].parameters(), lr=0.5),
        DiagFisherNoise(scale=0.1),
        model,
        lf,
        seed=2,
    )
    for _ in range(2):
        body.zero_grad()
        head.zero_grad()
        with body.capture(), head.capture():
            lf(model(X), y).backward()
        body.step()
        head.step()  # raised MixedExamplesError when its check ran after body's step
    assert body.steps_taken == head.steps_taken == 2
