"""Review s10 of ``curvlab.noise`` (sequence losses and a factor on the loss), against brute force.

* A loop that hands the loss torch's layout, ``loss_fn(out.transpose(1, 2), y)`` with ``(B, T, V)``
  logits, with ``T == V``: the separate pass NoisyOptimizer runs on the captured batch read the
  ``(B, T, V)`` output in torch's layout too, scoring positions as classes (the state 100% off,
  the output bias's noise exactly 0). Now the capture reads how the loss input was made from the
  model's output (the autograd graph between them) and tells the pass the classes are last.
* A loop that flattens its tokens time-major, ``loss_fn(out.transpose(0, 1).reshape(-1, V),
  y.t().reshape(-1))``: the separate pass rebuilt the targets batch-major and paired labels with
  other tokens' logits (the state up to 3.8 times off, no error). Now the targets are put back in
  the model output's order; a loss input made otherwise (scaled logits) is a clear error.
* ``loss = 0.25 * loss_fn(...)`` inside ``step(closure)``: ``FullFisherNoise``'s fold scaled its
  noise by the factor (``E|eps|^2`` 0.064 of ``Tr(scale^2 F)`` instead of 1). Now a step whose
  backward pass gives the loss another gradient than a GradScaler's scale draws in the separate
  pass (the same noise as ``step(inputs=, targets=)``), and ``step(closure, loss_factor=)`` keeps
  the fold.

The brute force is float64 autograd on one example at a time (per-example gradients) and dense
Jacobians and Hessians (the GGN), independent of curvlab.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from curvlab.noise import DiagFisherNoise, FullFisherNoise, KFACNoise, NoisyOptimizer

V = 5  # classes
SCALE = 0.5


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ models and brute force
class _TokenLM(nn.Module):
    """``(B, T)`` token ids -> ``(B, T, V)`` logits: an embedding (no tap: every kind measures
    in the separate pass), a learned position term, a head."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 3)
        self.pos = nn.Parameter(torch.randn(length, 3) * 0.5)
        self.head = nn.Linear(3, V)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(x) + self.pos[: x.shape[1]]))


class _LinSeq(nn.Module):
    """``(B, T, 3)`` -> ``(B, T, V)`` logits, Linear layers only."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, V)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def _tokens(length: int, seed: int = 1, n: int = 4) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, V, (n, length), generator=g)
    y = torch.randint(0, V, (n, length), generator=g)
    y[0, length - 2 :] = -100  # ignored positions, unevenly spread
    y[1, 1:] = -100
    y[3, :2] = -100
    return X, y


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _flat(tensors: Any) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _nll(out: Tensor, y: Tensor) -> Tensor:
    """Summed NLL of ``(N, T, V)`` logits (classes last), positions ``-100`` left out."""
    keep = y != -100
    lp = out.log_softmax(-1).gather(-1, torch.where(keep, y, 0).unsqueeze(-1)).squeeze(-1)
    return -(lp * keep).sum()


def _bf_empirical_diag(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """``diag(F_emp)``, ``F_emp = (N / M^2) sum_n s_n s_n^T`` over the ``M`` counted tokens."""
    rows = []
    for n in range(X.shape[0]):
        grads = torch.autograd.grad(_nll(model(X[n : n + 1]), y[n : n + 1]), _params(model))
        rows.append(_flat(grads))
    S = torch.stack(rows)
    M = int((y != -100).sum())
    return X.shape[0] / M**2 * (S**2).sum(0)


def _bf_ggn(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """The GGN of the mean loss, ``(1/M) J^T H J`` with ``H`` the Hessian of the summed NLL."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in _params(model)]
    theta = _flat(p.detach() for p in _params(model))

    def f(v: Tensor) -> Tensor:
        chunks = v.split([math.prod(s) for s in shapes])
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return functional_call(model, params, (X,))

    out = f(theta).detach()
    J = jacrev(f)(theta).reshape(out.numel(), -1)
    H = torch.autograd.functional.hessian(
        lambda o: _nll(o.reshape(out.shape), y), out.reshape(-1).clone()
    )
    return J.T @ H @ J / int((y != -100).sum())


def _state(noisy: NoisyOptimizer) -> Tensor:
    return _flat(noisy._state[n] for n, p in noisy.model.named_parameters() if p.requires_grad)


def _noisy(model: nn.Module, sampler: Any, lf: nn.Module, seed: int = 0) -> NoisyOptimizer:
    return NoisyOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), sampler, model, lf, seed=seed
    )


def _closure_step(noisy: NoisyOptimizer, loss_of: Callable[[], Tensor], **kw: Any) -> None:
    def closure() -> Tensor:
        noisy.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss

    noisy.step(closure, **kw)


# ------------------------------------------------------------------ 1. the transposed loss
@pytest.mark.parametrize("kind", ["empirical", "exact"])
@pytest.mark.parametrize("length", [V, V + 1])
def test_separate_pass_of_a_loss_on_transposed_logits(kind: str, length: int) -> None:
    """``loss_fn(out.transpose(1, 2), y)`` (torch's class-axis-1 layout, the usual GPT loop): the
    separate pass's diagonal equals the brute force, also with ``T == V`` (was 100% off, the
    output bias's diagonal exactly 0)."""
    torch.manual_seed(0)
    m, lf = _TokenLM(length).double(), nn.CrossEntropyLoss()
    X, y = _tokens(length)
    noisy = _noisy(m, DiagFisherNoise(kind, scale=SCALE), lf)
    _closure_step(noisy, lambda: lf(m(X).transpose(1, 2), y))
    want = _bf_empirical_diag(m, X, y) if kind == "empirical" else torch.diagonal(_bf_ggn(m, X, y))
    torch.testing.assert_close(_state(noisy), want, rtol=1e-9, atol=1e-15)
    assert float(noisy._state["head.bias"].min()) > 0


# ------------------------------------------------------------------ 2. time-major tokens
@pytest.mark.parametrize("kind", ["empirical", "exact"])
@pytest.mark.parametrize("length", [V, V + 1])
@pytest.mark.parametrize(
    "how",
    [
        "time-major",  # out.transpose(0, 1).reshape(-1, V) against y.t().reshape(-1)
        "time-major-movedim",  # out.movedim(1, 0).flatten(0, 1), targets likewise
        "batch-major",  # the common flatten: unchanged
    ],
)
def test_separate_pass_of_a_loss_on_rearranged_tokens(kind: str, length: int, how: str) -> None:
    """Tokens flattened time-major before the loss: the separate pass pairs each label with its
    own token's logits (the state was 3.81 / 0.28 relative off, no error)."""
    torch.manual_seed(0)
    m, lf = _TokenLM(length).double(), nn.CrossEntropyLoss()
    X, y = _tokens(length)

    def loss() -> Tensor:
        out = m(X)
        if how == "time-major":
            return lf(out.transpose(0, 1).reshape(-1, V), y.t().reshape(-1))
        if how == "time-major-movedim":
            return lf(out.movedim(1, 0).flatten(0, 1), y.movedim(1, 0).flatten())
        return lf(out.reshape(-1, V), y.reshape(-1))

    noisy = _noisy(m, DiagFisherNoise(kind, scale=SCALE), lf)
    _closure_step(noisy, loss)
    want = _bf_empirical_diag(m, X, y) if kind == "empirical" else torch.diagonal(_bf_ggn(m, X, y))
    torch.testing.assert_close(_state(noisy), want, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize(
    ("loss_input", "named"),
    [
        (lambda out: out.reshape(-1, V) / 2.0, "DivBackward0"),  # scaled logits
        (lambda out: out.transpose(0, 2).reshape(-1, V), "splits the classes"),  # spread classes
    ],
)
def test_separate_pass_refuses_a_loss_input_it_cannot_rebuild(loss_input: Any, named: str) -> None:
    """A loss input made from the model's output by anything but a reshape, transpose or
    permutation that keeps the classes on one axis: a clear error naming it, before the
    optimizer steps (no silent noise of another objective)."""
    torch.manual_seed(0)
    m, lf = _TokenLM(V).double(), nn.CrossEntropyLoss()
    X, y = _tokens(V)
    noisy = NoisyOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.1), DiagFisherNoise("mc", scale=SCALE), m, lf
    )
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="not by a reshape, transpose or permutation"):
        _closure_step(noisy, lambda: lf(loss_input(m(X)), y.reshape(-1)))
    with pytest.raises(RuntimeError, match=named):
        _closure_step(noisy, lambda: lf(loss_input(m(X)), y.reshape(-1)))
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_separate_pass_of_a_logged_loss_on_a_detached_flattened_output() -> None:
    """The loss module called only on the detached, flattened output (logging) and the backward
    pass of another objective: the separate pass measures ``loss_fn`` on the logged targets."""
    torch.manual_seed(0)
    m, lf = _TokenLM(V).double(), nn.CrossEntropyLoss()
    X, y = _tokens(V)
    noisy = _noisy(m, DiagFisherNoise("empirical", scale=SCALE), lf)
    noisy.zero_grad()
    with noisy.capture():
        out = m(X)
        lf(out.detach().reshape(-1, V), y.reshape(-1))  # logged
        (out**2).mean().backward()
    noisy.step()
    torch.testing.assert_close(_state(noisy), _bf_empirical_diag(m, X, y), rtol=1e-9, atol=1e-15)


# ------------------------------------------------------------------ 3. a factor on the loss
def _seq_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4, 6, 3, generator=g, dtype=torch.float64)
    _, y = _tokens(6)
    return X, y


FACTORS = {
    "times 0.25": lambda loss: 0.25 * loss,
    "over 4": lambda loss: loss / 4,
    "times a tensor": lambda loss: loss * torch.tensor(0.25, dtype=loss.dtype),
    "twice": lambda loss: loss + loss,
    "negated difference": lambda loss: 2.0 - loss,
}


@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("factor", list(FACTORS))
def test_full_fisher_closure_with_a_factor_on_the_loss(kind: str, factor: str) -> None:
    """``loss = 0.25 * loss_fn(...)`` (and the like) inside ``step(closure)``: the noise is that of
    the separate pass, ``step(inputs=, targets=)`` after the same backward (was ``0.25`` times
    it)."""
    torch.manual_seed(0)
    m, lf = _LinSeq().double(), nn.CrossEntropyLoss()
    X, y = _seq_batch()
    scaled = FACTORS[factor]

    def loss() -> Tensor:
        return scaled(lf(m(X).reshape(-1, V), y.reshape(-1)))

    m.zero_grad()
    loss().backward()
    clean = _flat(p.grad for p in m.parameters())
    noises = []
    for closure in (True, False):
        noisy = _noisy(m, FullFisherNoise(kind, scale=SCALE), lf, seed=3)
        if closure:
            _closure_step(noisy, loss)
        else:
            noisy.zero_grad()
            loss().backward()
            noisy.step(inputs=X, targets=y)
        noises.append(_flat(p.grad for p in m.parameters()) - clean)
    torch.testing.assert_close(noises[0], noises[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_full_fisher_closure_with_a_factor_has_the_fisher_covariance(kind: str) -> None:
    """Against brute force: ``E|eps|^2`` of the noise of ``step(closure)`` with ``0.25 * loss``
    equals ``Tr(scale^2 F)`` (F the GGN for ``"true"``, the empirical Fisher for ``"empirical"``)
    within 5 standard errors (was 0.0625 times it)."""
    torch.manual_seed(0)
    m, lf = _LinSeq().double(), nn.CrossEntropyLoss()
    X, y = _seq_batch()

    def loss() -> Tensor:
        return 0.25 * lf(m(X).reshape(-1, V), y.reshape(-1))

    m.zero_grad()
    loss().backward()
    clean = _flat(p.grad for p in m.parameters())
    noisy = _noisy(m, FullFisherNoise(kind, scale=SCALE), lf)
    total = []
    for _ in range(300):
        _closure_step(noisy, loss)
        total.append(float(((_flat(p.grad for p in m.parameters()) - clean) ** 2).sum()))
    if kind == "true":
        want = SCALE**2 * float(torch.trace(_bf_ggn(m, X, y)))
    else:
        want = SCALE**2 * float(_bf_empirical_diag(m, X, y).sum())
    got = torch.tensor(total, dtype=torch.float64)
    se = float(got.std()) / math.sqrt(got.numel())
    assert abs(float(got.mean()) - want) < 5 * se, (float(got.mean()), want, se)


def _folded(noisy: NoisyOptimizer, backward: Callable[[], None]) -> bool:
    """Run one captured step; whether its noise was folded into the backward pass."""
    noisy.zero_grad()
    with noisy.capture():
        backward()
    taps = noisy._pending
    noisy.step()
    return bool(taps is not None and taps.noise_added)


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_full_fisher_fold_stays_one_pass_without_a_factor(kind: str) -> None:
    """No factor on the loss (plain, a GradScaler's product, a weight penalty added, a dtype
    cast): the noise is still folded into the step's own backward pass; with a factor, or an
    explicit gradient for the root, it is not (and ``loss_factor=`` folds it again)."""
    torch.manual_seed(0)
    m, lf = _LinSeq().double(), nn.CrossEntropyLoss()
    X, y = _seq_batch()

    def loss() -> Tensor:
        return lf(m(X).reshape(-1, V), y.reshape(-1))

    noisy = _noisy(m, FullFisherNoise(kind, scale=SCALE), lf)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)

    def penalty() -> Tensor:
        return 1e-3 * sum((p**2).sum() for p in m.parameters())

    assert _folded(noisy, lambda: loss().backward())
    assert _folded(noisy, lambda: scaler.scale(loss()).backward())
    assert _folded(noisy, lambda: (loss() + penalty()).backward())
    assert _folded(noisy, lambda: loss().float().backward())
    assert _folded(noisy, lambda: torch.autograd.backward([loss()]))
    assert not _folded(noisy, lambda: (0.25 * loss()).backward())
    assert not _folded(noisy, lambda: scaler.scale(0.25 * loss()).backward())
    assert not _folded(noisy, lambda: loss().backward(torch.tensor(0.25, dtype=torch.float64)))
    taps = []

    def loss_seen() -> Tensor:
        taps.append(noisy._pending)
        return 0.25 * loss()

    _closure_step(noisy, loss_seen, loss_factor=0.25)
    assert taps[-1].noise_added


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_full_fisher_closure_loss_factor_equals_the_separate_pass(kind: str) -> None:
    """``step(closure, loss_factor=0.25)`` with ``0.25 * loss``: folded, and the noise the
    separate pass adds."""
    torch.manual_seed(0)
    m, lf = _LinSeq().double(), nn.CrossEntropyLoss()
    X, y = _seq_batch()

    def loss() -> Tensor:
        return 0.25 * lf(m(X).reshape(-1, V), y.reshape(-1))

    grads = []
    for closure in (True, False):
        noisy = _noisy(m, FullFisherNoise(kind, scale=SCALE), lf, seed=3)
        if closure:
            _closure_step(noisy, loss, loss_factor=0.25)
        else:
            noisy.zero_grad()
            loss().backward()
            noisy.step(inputs=X, targets=y)
        grads.append(_flat(p.grad for p in m.parameters()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_step_loss_factor_needs_a_closure() -> None:
    m, lf = _LinSeq().double(), nn.CrossEntropyLoss()
    noisy = _noisy(m, FullFisherNoise("true", scale=SCALE), lf)
    with pytest.raises(ValueError, match="goes with a closure"):
        noisy.step(loss_factor=0.5)
    with pytest.raises(ValueError, match="loss_factor"):
        noisy.step(lambda: None, loss_factor=-1.0)


def test_captured_samplers_are_unchanged_by_a_factor_on_the_loss() -> None:
    """The captured diagonal and K-FAC factors divide by the gradient at the loss output, so a
    factor on the loss leaves them exact and one pass (the roots check changes nothing there)."""
    torch.manual_seed(0)
    m, lf = _LinSeq().double(), nn.CrossEntropyLoss()
    X, y = _seq_batch()
    for made in (DiagFisherNoise, KFACNoise):
        noisy = _noisy(m, made("empirical", scale=SCALE), lf)
        noisy.zero_grad()
        with noisy.capture():
            (0.25 * lf(m(X).reshape(-1, V), y.reshape(-1))).backward()
        assert noisy._pending.result() is not None
        noisy.step()
    noisy = _noisy(m, DiagFisherNoise("empirical", scale=SCALE), lf)
    _closure_step(noisy, lambda: 0.25 * lf(m(X).reshape(-1, V), y.reshape(-1)))
    want = _bf_empirical_diag(m, X, y)
    torch.testing.assert_close(_state(noisy), want, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_separate_pass_of_a_squeezed_regression_output(loss: str) -> None:
    """``loss_fn(out.squeeze(-1), y)`` for an ``(N, 1)`` output (a common regression loop): the
    separate pass gets the targets as ``(N, 1)`` and equals the brute-force GGN diagonal (it was
    refused: targets ``(N,)`` against outputs ``(N, 1)``)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1)).double()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(8, 3, generator=g, dtype=torch.float64)
    if loss == "mse":
        lf: nn.Module = nn.MSELoss()
        y = torch.randn(8, generator=g, dtype=torch.float64)
    else:
        lf = nn.BCEWithLogitsLoss()
        y = torch.randint(0, 2, (8,), generator=g).double()
    noisy = _noisy(m, DiagFisherNoise("exact", scale=SCALE), lf)
    _closure_step(noisy, lambda: lf(m(X).squeeze(-1), y))
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for p in m.parameters()]
    theta = _flat(p.detach() for p in m.parameters())

    def f(v: Tensor) -> Tensor:
        chunks = v.split([math.prod(s) for s in shapes])
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return functional_call(m, params, (X,)).reshape(-1)

    J = jacrev(f)(theta)  # (N, D)
    with torch.no_grad():
        out = f(theta)
    # the output Hessian of the mean loss: 2/N for MSE, p(1 - p)/N for BCE
    h = torch.full_like(out, 2.0) if loss == "mse" else torch.sigmoid(out) * torch.sigmoid(-out)
    want = torch.diagonal(J.T @ (h[:, None] * J)) / out.numel()
    torch.testing.assert_close(_state(noisy), want, rtol=1e-9, atol=1e-15)


def test_separate_pass_refuses_class_probabilities_with_the_classes_last() -> None:
    """Class-probability targets for ``(B, T, C)`` logits flattened for the loss: curvlab reads
    class probabilities in torch's layout only, so a clear error (it was a shape error about
    ``(B, T*C)`` targets)."""
    torch.manual_seed(0)
    m, lf = _TokenLM(V).double(), nn.CrossEntropyLoss()
    X, _ = _tokens(V)
    p = torch.softmax(torch.randn(*X.shape, V, dtype=torch.float64), -1)
    noisy = _noisy(m, DiagFisherNoise("exact", scale=SCALE), lf)
    with pytest.raises(RuntimeError, match="class probabilities with the classes in axis 1"):
        _closure_step(noisy, lambda: lf(m(X).reshape(-1, V), p.reshape(-1, V)))


# ------------------------------------------------------------------ 4. a factor of exactly 1
# (found in review of the factor check above: these were taken for factors)
ONES = {
    "over one (accelerate)": lambda loss: (loss / 1).backward(),
    "times 1.0": lambda loss: (loss * 1.0).backward(),
    "1.0 times": lambda loss: (1.0 * loss).backward(),
    "times a CPU one": lambda loss: (loss * torch.ones((), dtype=loss.dtype)).backward(),
    "a CPU one before it": lambda loss: torch.mul(
        torch.ones((), dtype=loss.dtype), loss
    ).backward(),
    "gradient of ones": lambda loss: loss.backward(torch.ones((), dtype=loss.dtype)),
    "grad_tensors of ones": lambda loss: torch.autograd.backward(
        [loss], [torch.ones((), dtype=loss.dtype)]
    ),
    "stacked": lambda loss: torch.stack([loss]).sum().backward(),
    "concatenated": lambda loss: torch.cat([loss.reshape(1)]).sum().backward(),
}


def _clipped_run(kind: str, backward: Callable[[Tensor], None], shifted: bool) -> tuple[Any, ...]:
    """Two captured steps of ``FullFisherNoise(kind)`` with a clip between the backward pass and
    the step (as the HF Trainer clips): the parameters, the model calls, whether each step folded."""
    torch.manual_seed(0)
    m, lf = _LinSeq().double(), nn.CrossEntropyLoss()
    X, y = _seq_batch()
    calls = [0]
    m.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    noisy = NoisyOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.1), FullFisherNoise(kind, scale=SCALE), m, lf, seed=0
    )
    folded = []
    for _ in range(2):
        noisy.zero_grad()
        with noisy.capture():
            out = m(X)
            if shifted:
                loss = lf(out[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1))
            else:
                loss = lf(out.reshape(-1, V), y.reshape(-1))
            backward(loss)
        folded.append(noisy._pending.noise_added)
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
        noisy.step()
    return _flat(p.detach() for p in m.parameters()), calls[0], folded


@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("one", list(ONES))
def test_full_fisher_folds_a_factor_of_exactly_one(kind: str, shifted: bool, one: str) -> None:
    """``Accelerator.backward`` divides the loss by its accumulation steps also when that is 1,
    and ``loss * 1.0``, a CPU ``1`` as the root's gradient or ``torch.stack([loss]).sum()`` give
    the loss the gradient 1 as well: the noise is folded, the parameters bitwise those of
    ``loss.backward()`` (as before the factor check). They were taken for factors: a second
    forward pass and the noise added after the clip (the parameters moved), and with shifted
    tokens a RuntimeError."""
    want, want_calls, want_folded = _clipped_run(kind, lambda loss: loss.backward(), shifted)
    got, calls, folded = _clipped_run(kind, ONES[one], shifted)
    assert folded == want_folded == [True, True]
    assert calls == want_calls  # no separate pass ("empirical": plus its one layout probe)
    assert torch.equal(got, want)


def test_full_fisher_fold_other_factors_than_one_still_draw_in_the_separate_pass() -> None:
    """What is not exactly 1 (or cannot be read without a host synchronisation) stays a factor:
    the step draws in the separate pass."""
    from curvlab.noise._roots import _read_number

    def _exactly_one(value: object) -> bool:  # the fold's reading of a constant as 1
        number = _read_number(value)
        return number is not None and number[0] == 1

    torch.manual_seed(0)
    m, lf = _LinSeq().double(), nn.CrossEntropyLoss()
    X, y = _seq_batch()

    def loss() -> Tensor:
        return lf(m(X).reshape(-1, V), y.reshape(-1))

    noisy = _noisy(m, FullFisherNoise("true", scale=SCALE), lf)
    assert not _folded(noisy, lambda: (loss() * (1 + 2**-40)).backward())
    assert not _folded(noisy, lambda: (loss() / torch.tensor(2.0)).backward())
    assert not _folded(noisy, lambda: torch.stack([loss() for _ in range(1)] * 2).sum().backward())
    assert not _folded(noisy, lambda: loss().backward(torch.ones((), dtype=torch.float64) * 2))
    assert not _folded(
        noisy, lambda: (loss() * torch.ones(2, dtype=torch.float64)).sum().backward()
    )
    assert _folded(noisy, lambda: (loss() / 1).backward())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    assert _folded(noisy, lambda: scaler.scale(loss() / 1).backward())
    assert not _folded(noisy, lambda: scaler.scale(loss() / 2).backward())
    # a constant on an accelerator would need a host synchronisation to read: not 1
    assert not _exactly_one(torch.ones((), device="meta"))
    assert not _exactly_one(True) and not _exactly_one(torch.ones(2))
    assert _exactly_one(1) and _exactly_one(1.0) and _exactly_one(torch.ones(1, 1))


def test_full_fisher_fold_under_the_hf_trainer_recipe(tmp_path: Any) -> None:
    """docs/training-loops.md's HF Trainer recipe with FullFisherNoise: the Trainer's
    ``accelerator.backward(loss)`` divides by one accumulation step, which is no factor, so each
    step folds its noise (one model call per step, the Trainer's clip clipping gradient and noise
    together as documented); it drew in a second pass (two calls per step)."""
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    from curvlab.analysis.hf import causal_lm_targets

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    ids = torch.randint(0, 16, (8, 6), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)]
    lf = nn.CrossEntropyLoss()

    def causal_lm_loss(outputs: Any, labels: Tensor, num_items_in_batch: Any = None) -> Tensor:
        return lf(outputs.logits.flatten(0, 1), causal_lm_targets(labels).flatten())

    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    noisy = NoisyOptimizer(inner, FullFisherNoise("true", scale=0.1), model, lf, seed=0)
    folded: list[bool] = []

    class NoiseCapture(transformers.TrainerCallback):
        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            self.open = noisy.capture()
            self.open.__enter__()

        def on_pre_optimizer_step(self, *a: Any, **kw: Any) -> None:
            self.open.__exit__(None, None, None)
            folded.append(noisy._pending.noise_added)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        save_strategy="no",
        max_grad_norm=1.0,
        dataloader_num_workers=0,
        seed=0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 1.0)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizers=(noisy, scheduler),
        compute_loss_func=causal_lm_loss,
        callbacks=[NoiseCapture()],
    )
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    assert folded == [True, True, True]
    assert calls[0] == 3 and noisy.steps_taken == 3


# ------------------------------------------------------------------ 5. shifted tokens and a factor
@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_full_fisher_factor_with_shifted_tokens_names_the_factor(kind: str) -> None:
    """``(0.5 * loss).backward()`` on shifted tokens (``logits[:, :-1]``): the factor sends the
    step to the separate pass, which cannot rebuild the shifted loss input; the error names the
    factor as the cause and ``loss_factor=`` as the fix (it blamed the shifted tokens alone and
    suggested ``step(inputs=, targets=)``), before the optimizer steps. With ``loss_factor=0.5``
    the step folds the noise of the unscaled loss's step."""
    torch.manual_seed(0)
    m, lf = _LinSeq().double(), nn.CrossEntropyLoss()
    X, y = _seq_batch()

    def loss() -> Tensor:
        return lf(m(X)[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1))

    noisy = _noisy(m, FullFisherNoise(kind, scale=SCALE), lf, seed=3)
    before = [p.detach().clone() for p in m.parameters()]
    for backward in (
        lambda: (0.5 * loss()).backward(),
        lambda: loss().backward(torch.full((), 0.5, dtype=torch.float64)),
    ):
        noisy.zero_grad()
        with noisy.capture():
            backward()
        with pytest.raises(RuntimeError, match="factor on the loss") as err:
            noisy.step()
        assert "loss_factor=" in str(err.value) and "cannot rebuild" in str(err.value)
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p.detach(), b)
    m.zero_grad()
    loss().backward()
    clean = _flat(p.grad for p in m.parameters())
    noises = []
    for factor in (1.0, 0.5):
        noisy = _noisy(m, FullFisherNoise(kind, scale=SCALE), lf, seed=3)
        noisy.zero_grad()
        with noisy.capture(loss_factor=factor):
            (factor * loss()).backward()
        assert noisy._pending.noise_added
        noisy.step()
        noises.append(_flat(p.grad for p in m.parameters()) - factor * clean)
    torch.testing.assert_close(noises[1], noises[0], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ 6. no-op slices and expands
NO_OPS = {
    "out[:]": lambda out: out[:],
    "narrow over the whole axis": lambda out: out.narrow(1, 0, out.shape[1]),
    "negative start": lambda out: out[:, -out.shape[1] :],
    "narrow, negative axis": lambda out: out.narrow(-2, 0, out.shape[1]),
    "expand_as itself": lambda out: out.expand_as(out),
    "expand with -1": lambda out: out.expand(-1, -1, -1),
}


@pytest.mark.parametrize("how", list(NO_OPS))
def test_separate_pass_of_a_loss_on_a_no_op_slice_or_expand(how: str) -> None:
    """A slice over a whole axis or an expand to the same sizes between the model's output and
    the loss (the loss input is the output itself): the separate pass equals the brute force
    (they were refused by the path check, as a selection)."""
    torch.manual_seed(0)
    m, lf = _TokenLM(V + 1).double(), nn.CrossEntropyLoss()
    X, y = _tokens(V + 1)
    noisy = _noisy(m, DiagFisherNoise("empirical", scale=SCALE), lf)
    _closure_step(noisy, lambda: lf(NO_OPS[how](m(X)).reshape(-1, V), y.reshape(-1)))
    torch.testing.assert_close(_state(noisy), _bf_empirical_diag(m, X, y), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize(
    ("loss_input", "named"),
    [
        # the first position repeated over the sequence: as many values as the output
        (lambda out: out[:, :1].expand(-1, out.shape[1], -1), "ExpandBackward0"),
        # every position, in order, but by an index tensor: its indices are not read
        (
            lambda out: out.index_select(1, torch.arange(out.shape[1])),
            "selection's indices are not read",
        ),
    ],
)
def test_separate_pass_still_refuses_repeats_and_selections(loss_input: Any, named: str) -> None:
    """An expand that repeats entries and a selection by an index tensor stay refused."""
    torch.manual_seed(0)
    m, lf = _TokenLM(V + 1).double(), nn.CrossEntropyLoss()
    X, y = _tokens(V + 1)
    noisy = _noisy(m, DiagFisherNoise("empirical", scale=SCALE), lf)
    with pytest.raises(RuntimeError, match=named):
        _closure_step(noisy, lambda: lf(loss_input(m(X)).reshape(-1, V), y.reshape(-1)))
