"""Review s13 (models): examples mixed along the batch axis, and sparse embeddings.

* A model that mixes the examples of a batch outside BatchNorm (feature centering
  ``z - z.mean(0)``, in-batch contrastive logits ``f(x) @ g(x').T``, a cumulative sum over the
  batch) has no per-example gradients; every per-example quantity answered with another wrong
  number per backend (func: the gradient's mean 60% off; hooks: a Fisher diagonal of 0.02 where
  every per-example gradient is 0). They now refuse it up front, naming where the examples mix.
  Models that keep the examples apart (train-mode Dropout, eval BatchNorm, noise from a
  generator of the model's own) are not refused.
* ``nn.Embedding(sparse=True)`` crashed inside torch in most quantities; they now give the
  dense model's numbers (brute force) and leave the flag as it was.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab as cl

LOSS = nn.CrossEntropyLoss()


class Center(nn.Module):
    """Feature centering over the batch (no BatchNorm module)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.h = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.a(x)
        z = z - z.mean(0, keepdim=True)
        return self.h(torch.tanh(z))


class Clip(nn.Module):
    """In-batch contrastive logits ``(N, N)``, labels ``arange(N)``."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(3, 4)
        self.g = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x[:, :3]) @ self.g(x[:, 3:]).T


class BatchMixer(nn.Module):
    """A module that mixes the examples itself: a cumulative sum over the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(0)


class Cumulative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.mix = BatchMixer()
        self.h = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(torch.tanh(self.mix(self.a(x))))


class OwnNoise(nn.Module):
    """Noise drawn from a generator of the model's own (the global RNG does not move)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.gen = torch.Generator().manual_seed(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.gen, dtype=x.dtype)
        return self.a(x + 0.1 * noise)


def _data(n: int = 6, d: int = 3, classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def _center() -> nn.Module:
    torch.manual_seed(0)
    return Center().double()


# ------------------------------------------------------------------------------ coupling refused
QUANTITIES = {
    "gradient_stats/auto": lambda m, d: cl.gradient_stats(m, LOSS, d),
    "gradient_stats/func": lambda m, d: cl.gradient_stats(m, LOSS, d, backend="func"),
    "diag_fisher/empirical": lambda m, d: cl.diag_fisher(m, LOSS, d),
    "diag_fisher/mc": lambda m, d: cl.diag_fisher(m, LOSS, d, kind="mc", seed=0),
    "diag_fisher/exact": lambda m, d: cl.diag_fisher(m, LOSS, d, kind="exact"),
    "diag_fisher/exact/func": lambda m, d: cl.diag_fisher(m, LOSS, d, kind="exact", backend="func"),
    "fisher_norms": lambda m, d: cl.fisher_norms(m, LOSS, d),
    "kfac": lambda m, d: cl.kfac(m, LOSS, d, seed=0),
}


@pytest.mark.parametrize("name", list(QUANTITIES))
def test_centering_over_the_batch_is_refused_naming_where(name: str) -> None:
    model = _center()
    with pytest.raises(ValueError) as err:
        QUANTITIES[name](model, _data())
    msg = str(err.value)
    assert "mixes the examples" in msg
    # the input of 'h' is the first thing that differs: the root's forward mixes before it
    assert "'h'" in msg and "Center" in msg, msg
    assert "cl.curvature_operator" in msg  # the way out


@pytest.mark.parametrize("name", ["gradient_stats/auto", "diag_fisher/exact/func", "kfac"])
def test_in_batch_contrastive_logits_are_refused(name: str) -> None:
    torch.manual_seed(0)
    model = Clip().double()
    X = torch.randn(6, 6, dtype=torch.float64)
    with pytest.raises(ValueError) as err:
        QUANTITIES[name](model, (X, torch.arange(6)))
    msg = str(err.value)
    assert "Clip" in msg and "grows with the number of examples" in msg, msg


def test_a_cumulative_sum_over_the_batch_is_refused_naming_the_module() -> None:
    """The first and the last example are run alone: a cumulative sum agrees on a prefix."""
    torch.manual_seed(0)
    model = Cumulative().double()
    with pytest.raises(ValueError, match=r"module 'mix' \(BatchMixer\) mixes them"):
        cl.gradient_stats(model, LOSS, _data())
    with pytest.raises(ValueError, match="'mix'"):  # a batch of two: each example alone
        cl.gradient_stats(model, LOSS, _data(n=2))


def test_refusal_leaves_no_trace() -> None:
    model = _center()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    state = torch.get_rng_state()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="mixes the examples"):
        cl.gradient_stats(model, LOSS, _data())
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert not model._forward_hooks and not model.h._forward_pre_hooks


def _hessian_diag(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    values = {n: p.detach() for n, p in model.named_parameters()}
    flat = torch.cat([v.reshape(-1) for v in values.values()])

    def loss(v: torch.Tensor) -> torch.Tensor:
        out, i = {}, 0
        for n in names:
            out[n] = v[i : i + values[n].numel()].reshape(values[n].shape)
            i += values[n].numel()
        return LOSS(torch.func.functional_call(model, out, (X,)), y)

    d, out, i = torch.func.hessian(loss)(flat).diagonal(), {}, 0
    for n in names:
        out[n] = d[i : i + values[n].numel()].reshape(values[n].shape)
        i += values[n].numel()
    return out


def test_the_whole_batch_loss_stays_available() -> None:
    """The Hessian of the batch's loss is defined for a coupled model: no refusal, brute force."""
    model = _center()
    X, y = _data()
    got = cl.diag_hessian(model, LOSS, (X, y))
    want = _hessian_diag(model, X, y)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


# ------------------------------------------------------------------------- no false refusals
class Plain(nn.Module):
    def __init__(self, dropout: float = 0.0, norm: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4) if norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.h = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(self.drop(torch.tanh(self.norm(self.a(x)))))


def _per_example_mean_and_trace(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, torch.Tensor], float]:
    rows = []
    for i in range(X.shape[0]):
        loss = F.cross_entropy(model(X[i : i + 1]), y[i : i + 1])
        g = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(rows)
    mean, i, out = G.mean(0), 0, {}
    for n, p in model.named_parameters():
        out[n] = mean[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out, float(((G - G.mean(0)) ** 2).mean(0).sum())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_model_that_keeps_the_examples_apart_is_computed(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = Plain(norm=True).to(dtype).eval()
    X, y = _data(n=8)
    X = X.to(dtype)
    for backend in ("auto", "func"):
        st = cl.gradient_stats(model, LOSS, (X, y), backend=backend)
        mean, trace = _per_example_mean_and_trace(model, X, y)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        for k in mean:
            torch.testing.assert_close(st.mean[k], mean[k], rtol=tol, atol=tol)
        assert st.trace_covariance == pytest.approx(trace, rel=tol * 10)


def test_random_forwards_are_not_refused() -> None:
    """Train-mode Dropout (the global RNG moves) and noise from a generator of the model's own
    differ between any two passes: no comparison can tell coupling, so none refuses."""
    torch.manual_seed(0)
    model = Plain(dropout=0.5).double().train()
    assert cl.gradient_stats(model, LOSS, _data()).num_examples == 6
    assert cl.kfac(model, LOSS, _data(), seed=0)
    torch.manual_seed(0)
    noisy = OwnNoise().double()
    assert cl.gradient_stats(noisy, LOSS, _data()).num_examples == 6


def test_the_check_runs_once_per_signature() -> None:
    """A repeated call (a training loop's measurement) runs no pass on fewer examples."""
    torch.manual_seed(0)
    model = Plain().double()
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        X, y = _data(n=5)
        cl.gradient_stats(model, LOSS, (X, y))
        assert 2 in seen  # the first call: the check's (and the layout probe's) two examples
        seen.clear()
        cl.gradient_stats(model, LOSS, (X + 1, y))
        assert seen and all(s == 5 for s in seen), seen
    finally:
        handle.remove()


# ------------------------------------------------------------------------ sparse embeddings
class LM(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.e = nn.Embedding(5, 4, sparse=sparse)
        self.h = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(torch.tanh(self.e(x)))


def _lm_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    sparse = LM(sparse=True).double()
    dense = LM(sparse=False).double()
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


def _lm_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 5, (4, 3), generator=g), torch.randint(0, 5, (4, 3), generator=g)


def _lm_per_example_grads(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(X.shape[0]):
        out = model(X[i : i + 1])
        loss = F.cross_entropy(out.reshape(-1, 5), y[i : i + 1].reshape(-1), reduction="sum")
        g = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([t.to_dense().reshape(-1) for t in g]))
    return torch.stack(rows)


SPARSE = {
    "diag_fisher": lambda m, d, b: cl.diag_fisher(m, LOSS, d, backend=b),
    "diag_fisher/mc": lambda m, d, b: cl.diag_fisher(m, LOSS, d, kind="mc", seed=0, backend=b),
    "diag_fisher/exact": lambda m, d, b: cl.diag_fisher(m, LOSS, d, kind="exact", backend=b),
    "gradient_stats": lambda m, d, b: cl.gradient_stats(m, LOSS, d, backend=b).second_moment,
    "diag_hessian": lambda m, d, b: cl.diag_hessian(m, LOSS, d),
}


@pytest.mark.parametrize("backend", ["auto", "func"])
@pytest.mark.parametrize("name", list(SPARSE))
def test_sparse_embedding_gives_the_dense_numbers(name: str, backend: str) -> None:
    sparse, dense = _lm_pair()
    data = _lm_data()
    got = SPARSE[name](sparse, data, backend)
    want = SPARSE[name](dense, data, backend)
    assert sparse.e.sparse is True  # the flag put back
    for k in want:
        assert not got[k].is_sparse, k
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["auto", "func"])
def test_sparse_embedding_against_brute_force(backend: str) -> None:
    sparse, _ = _lm_pair()
    X, y = _lm_data()
    G = _lm_per_example_grads(sparse, X, y)  # of each example's share of the sum
    M = y.numel()  # loss terms: under "mean" the objective is (1/M) sum of them
    fisher = cl.diag_fisher(sparse, LOSS, (X, y), backend=backend)
    flat = torch.cat([fisher[n].reshape(-1) for n, _ in sparse.named_parameters()])
    torch.testing.assert_close(flat, (G**2).sum(0) * X.shape[0] / M**2)
    norms = cl.fisher_norms(sparse, LOSS, (X, y), backend=backend)
    Fm = G.T @ G * X.shape[0] / M**2
    assert norms.frobenius == pytest.approx(float(Fm.norm()), rel=1e-10)
    assert norms.diag_frobenius == pytest.approx(float(Fm.diagonal().norm()), rel=1e-10)
    assert sparse.e.sparse is True


# ------------------------------------------------------------------------ torch.distributed
def _coupled_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: its first chunk has 6 examples on rank 0 and 1 (nothing to compare) on rank 1;
    every quantity must refuse on both (an error on rank 0 alone would leave rank 1 waiting in
    the quantity's collective)."""
    import json
    import os
    import sys
    from pathlib import Path

    from tests.distributed_checks import join_gloo

    join_gloo(rank, 2, init_file, 60)
    try:
        X, y = _data(n=6 if rank == 0 else 1)
        got = {}
        for name in ("kfac", "gradient_stats/auto", "fisher_norms", "diag_fisher/exact/func"):
            try:
                QUANTITIES[name](_center(), (X, y))
                got[name] = "answered"
            except ValueError as e:
                got[name] = str(e)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(got))
    finally:
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_under_ddp_every_rank_refuses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    import torch.multiprocessing as mp

    mp.spawn(_coupled_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        for name, got in json.loads((tmp_path / f"rank{rank}.json").read_text()).items():
            assert "mixes the examples" in got and "'h'" in got, (rank, name, got)


# ------------------------------------------------------------------- the check for captures
class Masked(nn.Module):
    def __init__(self, center: bool) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.center = center

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.a(x) * mask[:, None]
        return z - z.mean(0) if self.center else z


@pytest.mark.parametrize("center", [False, True])
def test_examples_apart_replays_a_captured_call(center: bool) -> None:
    """A capture of the user's own pass (:mod:`curvlab.noise`) has the call's arguments: every
    tensor with the batch's leading size is picked alike (here a mask beside the inputs)."""
    from curvlab._layout import ExamplesApart

    torch.manual_seed(0)
    model = Masked(center).double()
    X, _ = _data()
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    apart = ExamplesApart(model, X, {"a": model.a}, call=((X,), {"mask": mask}))
    assert apart.sizes == {"a": [(2, 2)]}
    why = apart.check(model(X, mask=mask))
    if center:
        assert why is not None and "the forward of the model (Masked) mixes them" in why, why
    else:
        assert why is None


# ------------------------------------------------- false refusals found in the session's review
class _TrimLM(nn.Module):
    """Drops the padding columns no example of the batch uses: a no-op on a batch collated to
    its longest sequence, but two examples alone get their own longest length."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(7, 8), nn.Linear(8, 7)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = int(attention_mask.sum(1).max())
        ids, mask = input_ids[:, :length], attention_mask[:, :length]
        return self.out(torch.tanh(self.emb(ids)) * mask[..., None])


def test_padding_trimmed_to_the_longest_sequence_is_not_a_growing_axis() -> None:
    """Four sequences collated to length 4, the first and last of lengths 2 and 1: the pair's
    output has 2 columns, as in-batch logits would; one example alone (its own length, not 1)
    shows the axis is no count of examples, and the model is measured (it was refused)."""
    torch.manual_seed(0)
    model = _TrimLM().double()
    ids = torch.randint(0, 7, (4, 4))
    mask = (torch.arange(4)[None] < torch.tensor([2, 4, 3, 1])[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    data = ({"input_ids": ids, "attention_mask": mask}, labels)
    got = cl.diag_fisher(model, LOSS, data)
    # brute force: g_n = N * grad of example n's share c_n = (its token losses) / M, from the
    # batch's own forward (the trim is a no-op there), (1/N) sum_n g_n^2
    logits = model(**data[0])
    per_token = nn.functional.cross_entropy(
        logits.reshape(-1, 7), labels.reshape(-1), reduction="none"
    ).reshape(4, 4)
    M = int((labels != -100).sum())
    want = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for n in range(4):
        grads = torch.autograd.grad(
            4 * per_token[n].sum() / M, list(model.parameters()), retain_graph=True
        )
        for (k, _), g in zip(model.named_parameters(), grads):
            want[k] += g.square() / 4
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-14)
    cl.gradient_stats(model, LOSS, data)


def test_float32_rounding_amplified_by_an_eval_batchnorm_is_not_coupling() -> None:
    """Raw longitudes (-122.42 +- 0.005) through a Linear and an eval BatchNorm fitted to them:
    the batch's and a pair's float32 rows differ by ~6e-3 from rounding alone, which the 5e-3
    float32 tolerance refused as coupling (naming the BatchNorm)."""
    torch.manual_seed(0)
    X = -122.42 + 0.005 * torch.randn(64, 256)
    y = torch.randint(0, 10, (64,))
    model = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        h = model[0](X)
        model[1].running_mean.copy_(h.mean(0))
        model[1].running_var.copy_(h.var(0))
    model.eval()
    cl.diag_fisher(model, LOSS, (X, y))
    cl.gradient_stats(model, LOSS, (X, y))
