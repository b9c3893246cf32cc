"""Data consumption (review s10): the GPT layout decided per batch, kept batches overwritten
without a version bump, data changed under an operator, a loader's own generator advanced by
curvlab's readings, a one-shot iterator read outside the RNG guard or handed over mid-way, and
misleading messages for common data mistakes. Brute force: dense float64 autograd."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import curvlab as cl
from curvlab._losses import AmbiguousLayoutWarning

DT = torch.float64


# ------------------------------------------------------------------------------ brute force


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflat(model: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _objective(model: nn.Module, batches: list, gpt: bool) -> object:
    """``theta -> L``: mean cross-entropy over all labels of all batches; ``gpt``: the classes
    are the logits' last axis (flattened to (B*T, C), as a GPT training loop does)."""

    def L(theta: Tensor) -> Tensor:
        total, count = 0.0, 0
        for x, y in batches:
            out = functional_call(model, _unflat(model, theta), (x,))
            if gpt:
                out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
            total = total + nn.functional.cross_entropy(out, y, reduction="sum")
            count += y.numel()
        return total / count

    return L


def _hessian(model: nn.Module, batches: list, gpt: bool = False) -> Tensor:
    return torch.autograd.functional.hessian(_objective(model, batches, gpt), _flat(model))


def _empirical_fisher(model: nn.Module, batches: list) -> Tensor:
    """``N sum_n grad c_n grad c_n^T`` (mean convention) of the cross-entropy of (N, C) logits."""
    rows = []
    N = sum(int(y.shape[0]) for _, y in batches)
    theta = _flat(model)
    for x, y in batches:
        for n in range(x.shape[0]):

            def c(t: Tensor, x: Tensor = x, y: Tensor = y, n: int = n) -> Tensor:
                out = functional_call(model, _unflat(model, t), (x[n : n + 1],))
                return nn.functional.cross_entropy(out, y[n : n + 1], reduction="sum") / N

            rows.append(torch.func.grad(c)(theta))
    S = torch.stack(rows)
    return N * S.T @ S


def _cat(result: dict) -> Tensor:
    return torch.cat([v.reshape(-1) for v in result.values()])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _batches(k: int, n: int = 4, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, dtype=DT, generator=g), torch.randint(0, 3, (n,), generator=g))
        for _ in range(k)
    ]


# ------------------------------------------------------------------ 1. the GPT layout, per call


class _Tagger(nn.Module):
    """Token classification with C = 4 tags: logits (B, T, 4) against labels (B, T)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(10, 3)
        self.l = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.l(torch.tanh(self.e(x)))


def _padded(lengths: tuple[int, ...]) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (
            torch.randint(0, 10, (2 + i, T), generator=g),
            torch.randint(0, 4, (2 + i, T), generator=g),
        )
        for i, T in enumerate(lengths)
    ]


def test_a_batch_with_length_equal_to_the_classes_follows_the_gpt_layout_of_the_call() -> None:
    model, ce = _Tagger().to(DT), nn.CrossEntropyLoss()
    batches = _padded((3, 4))  # dynamic padding: the second batch has T == C == 4
    H = _hessian(model, batches, gpt=True)
    got = cl.trace(model, ce, batches, matrix="hessian", method="exact").value
    assert got == pytest.approx(H.trace().item(), rel=1e-10)  # was 0.826 for 1.462
    torch.testing.assert_close(_cat(cl.diag_hessian(model, ce, batches)), H.diagonal())


def test_an_ambiguous_batch_read_first_then_a_gpt_batch_names_classes_last() -> None:
    model, ce = _Tagger().to(DT), nn.CrossEntropyLoss()
    batches = _padded((4, 3))  # the ambiguous batch first: read in torch's layout
    with (
        pytest.raises(ValueError, match=r"earlier batch.*cl.*classes_last\(loss_fn\)"),
        pytest.warns(AmbiguousLayoutWarning, match=r"both torch's layout.*classes_last"),
    ):
        cl.trace(model, ce, batches, matrix="hessian", method="exact")
    marked = cl.classes_last(ce)
    assert marked is not ce and not hasattr(ce, "curvlab_classes_last")
    H = _hessian(model, batches, gpt=True)
    got = cl.trace(model, marked, batches, matrix="hessian", method="exact").value
    assert got == pytest.approx(H.trace().item(), rel=1e-10)
    torch.testing.assert_close(_cat(cl.diag_hessian(model, marked, batches)), H.diagonal())
    with pytest.raises(TypeError, match="marks a nn.CrossEntropyLoss, got MSELoss"):
        cl.classes_last(nn.MSELoss())


# ------------------------------------------------ 2./3. kept batches overwritten by a refill


def _refill_torch(batches: list) -> Iterator[tuple[Tensor, Tensor]]:
    bx, by = batches[0][0].clone(), batches[0][1].clone()
    for x, y in batches:
        bx.copy_(x)
        by.copy_(y)
        yield bx, by


def _refill_numpy(batches: list) -> Iterator[tuple[Tensor, Tensor]]:
    nx, ny = np.empty(tuple(batches[0][0].shape)), np.empty(len(batches[0][1]), dtype=np.int64)
    bx, by = torch.from_numpy(nx), torch.from_numpy(ny)  # written through NumPy: no version
    for x, y in batches:
        nx[...] = x.numpy()
        ny[...] = y.numpy()
        yield bx, by


def _refill_data(batches: list) -> Iterator[tuple[Tensor, Tensor]]:
    bx, by = batches[0][0].clone(), batches[0][1].clone()
    for x, y in batches:
        bx.data.copy_(x)  # .data: a version counter of its own
        by.data.copy_(y)
        yield bx, by


def test_fisher_norms_and_diag_hessian_refuse_a_refilling_iterator() -> None:
    model, ce, batches = _mlp(), nn.CrossEntropyLoss(), _batches(3)
    with pytest.raises(ValueError, match="batch 0 of data was overwritten in place by batch 1"):
        cl.fisher_norms(model, ce, _refill_torch(batches))  # was 1.2153 for 1.1615
    with pytest.raises(ValueError, match="batch 0 of data was overwritten in place by batch 1"):
        cl.diag_hessian(model, ce, _refill_torch(batches))  # was 85% off
    # fresh tensors per batch from a one-shot iterator: exact
    F = _empirical_fisher(model, batches)
    got = cl.fisher_norms(model, ce, iter(batches))
    assert got.frobenius == pytest.approx(F.norm().item(), rel=1e-10)
    assert got.diag_frobenius == pytest.approx(F.diagonal().norm().item(), rel=1e-10)
    H = _hessian(model, batches)
    torch.testing.assert_close(_cat(cl.diag_hessian(model, ce, iter(batches))), H.diagonal())


@pytest.mark.parametrize("refill", [_refill_numpy, _refill_data], ids=["numpy", "data"])
def test_a_refill_that_bypasses_the_version_counter_is_refused(refill: object) -> None:
    model, ce, batches = _mlp(), nn.CrossEntropyLoss(), _batches(3)
    with pytest.raises(ValueError, match="batch 0 of data was overwritten in place by batch 1"):
        cl.curvature_operator(model, ce, refill(batches), "hessian")  # trace was 2.0432 for 2.1744
    with pytest.raises(ValueError, match="overwritten in place"):
        cl.fisher_norms(model, ce, refill(batches))


def test_the_same_unchanged_batch_listed_three_times_counts_three_times() -> None:
    model, ce = _mlp(), nn.CrossEntropyLoss()
    b = _batches(1)[0]
    H = _hessian(model, [b] * 3)  # the mean over three copies: the batch's own Hessian
    op = cl.curvature_operator(model, ce, [b] * 3, "hessian")
    torch.testing.assert_close(op.to_dense(), H)
    assert op.num_examples == 12
    got = cl.fisher_norms(model, ce, iter([b] * 3))
    assert got.frobenius == pytest.approx(_empirical_fisher(model, [b] * 3).norm().item())


# ------------------------------------------------------- 4. data changed under an operator


@pytest.mark.parametrize("num_batches", [1, 2])
@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_an_operator_refuses_products_after_its_data_changed_in_place(
    num_batches: int, matrix: str
) -> None:
    model, ce = _mlp(), nn.CrossEntropyLoss()
    batches = _batches(num_batches)
    op = cl.curvature_operator(model, ce, batches if num_batches > 1 else batches[0], matrix)
    if matrix == "hessian":
        torch.testing.assert_close(op.to_dense(), _hessian(model, batches))
    batches[0][0].mul_(2.0)  # silently changed 2-batch products by 0.71 (relative) before
    v = torch.ones(op.shape[0], dtype=DT)
    with pytest.raises(RuntimeError, match="tensors of batch 0 of the data changed in place"):
        op @ v


# -------------------------------------------- 5. a DataLoader's own generators are put back


def _loader(X: Tensor, y: Tensor, seed: int) -> DataLoader:
    return DataLoader(
        TensorDataset(X, y),
        batch_size=4,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def test_a_loaders_generator_is_left_as_it_was_and_every_reading_sees_one_order() -> None:
    model, ce = _mlp(), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(10, 3, dtype=DT, generator=g), torch.arange(10) % 3
    reference = _loader(X, y, 0)
    first_epoch = list(reference)  # the order the next reading of a fresh loader gives
    second_epoch = [b[1].tolist() for b in reference]
    loader = _loader(X, y, 0)
    state = loader.generator.get_state()
    got = [cl.diag_fisher(model, ce, loader) for _ in range(2)]
    assert torch.equal(loader.generator.get_state(), state)
    assert [b[1].tolist() for b in loader] == [b[1].tolist() for b in first_epoch]
    assert [b[1].tolist() for b in loader] == second_epoch  # the user's epoch 2 unchanged
    F = _empirical_fisher(model, first_epoch)  # drop_last: only the examples of the order
    for result in got:
        torch.testing.assert_close(_cat(result), F.diagonal())


def test_a_samplers_own_generator_is_left_as_it_was() -> None:
    model, ce = _mlp(), nn.CrossEntropyLoss()
    X, y = torch.randn(10, 3, dtype=DT), torch.arange(10) % 3
    ds = TensorDataset(X, y)
    sampler_gen, loader_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    loader = DataLoader(
        ds, batch_size=3, sampler=RandomSampler(ds, generator=sampler_gen), generator=loader_gen
    )
    states = sampler_gen.get_state(), loader_gen.get_state()
    one = cl.trace(model, ce, loader, matrix="ggn", method="exact").value
    two = cl.trace(model, ce, loader, matrix="ggn", method="exact").value
    assert torch.equal(sampler_gen.get_state(), states[0])
    assert torch.equal(loader_gen.get_state(), states[1])
    assert one == two


# --------------------------------------------- 6. diag_hessian on a one-shot iterator: RNG


def test_diag_hessian_on_a_one_shot_iterator_leaves_the_global_rng() -> None:
    model, ce = _mlp(), nn.CrossEntropyLoss()

    def draws() -> Iterator[tuple[Tensor, Tensor]]:  # random batches from the global RNG
        for _ in range(3):
            yield torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))

    before = torch.get_rng_state()
    got = cl.diag_hessian(model, ce, draws())
    assert got.backend == "backpack"
    assert torch.equal(torch.get_rng_state(), before)
    batches = list(draws())  # what the generator drew from this very state
    torch.set_rng_state(before)
    torch.testing.assert_close(_cat(got), _hessian(model, batches).diagonal())


# ------------------------------------------ 7. a hand-over after the first chunk, one-shot data


class _Cond(nn.Module):
    """Changes a layer's input in place on batches of two far-out examples only: the hooks hand
    over there (each example alone takes the other branch, as it does in every other batch,
    so the examples stay apart: curvlab/_layout.py ExamplesApart)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        u = torch.tanh(x)
        h = self.a(u)
        if x.shape[0] == 2 and bool((x[:, 0] > 50).all()):
            u.mul_(2.0)
            h = h + u
        return self.b(torch.tanh(h))


def test_a_later_hand_over_on_a_one_shot_iterator_is_a_clear_error() -> None:
    from curvlab.backends._choice import CHOICES

    CHOICES.clear()  # no remembered choice for this model: the hooks are tried first
    model, ce = _Cond().to(DT), nn.CrossEntropyLoss()
    batches = [_batches(1, n=4)[0], _batches(1, n=2, seed=2)[0]]
    far = batches[1][0].clone()
    far[:, 0] += 100.0
    batches[1] = (far, batches[1][1])
    with pytest.raises(ValueError, match=r"one-shot iterator.*'hooks'.*backend='func'"):
        cl.diag_fisher(model, ce, iter(batches))
    F = _empirical_fisher(model, batches)
    got = cl.diag_fisher(model, ce, batches)
    assert got.backend == "func"
    torch.testing.assert_close(_cat(got), F.diagonal())
    torch.testing.assert_close(
        _cat(cl.diag_fisher(model, ce, iter(batches), backend="func")), F.diagonal()
    )


# ---------------------------------------------------------------------------- 8. the messages


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(3, 3)

    def forward(self, x: Tensor, temperature: Tensor) -> Tensor:
        return self.l(x) / temperature


def test_common_data_mistakes_get_messages_naming_them() -> None:
    model, ce = _mlp(), nn.CrossEntropyLoss()
    X, y = _batches(1, n=5)[0]
    with pytest.raises(TypeError, match=r"targets of batch 0 of data are a list.*torch.tensor"):
        cl.diag_fisher(model, ce, (X, y.tolist()))
    with pytest.raises(TypeError, match=r"inputs and the targets .* numpy.ndarray.*from_numpy"):
        cl.diag_fisher(model, ce, (X.numpy(), y.numpy()))
    with pytest.raises(TypeError, match=r"tuple of 3 .*no third element"):
        cl.diag_fisher(model, ce, (X, y, torch.ones(5)))
    with pytest.raises(TypeError, match=r"batch 0 of data is a tuple of 3 .*no third element"):
        cl.diag_fisher(model, ce, ((X, y, None) for _ in range(2)))
    with pytest.raises(ValueError, match=r"inputs\['temperature'\].*0-dim tensor.*expand"):
        cl.diag_fisher(_Scaled().to(DT), ce, ({"x": X, "temperature": torch.tensor(2.0)}, y))
    with pytest.raises(TypeError, match=r"inputs, targets"):
        cl.diag_fisher(model, ce, [X])


@pytest.mark.parametrize("kind", ["mse", "bce"])
def test_one_dimensional_outputs_go_through_the_operators(kind: str) -> None:
    # (N,) outputs (scalar regression, one logit) crashed with IndexError in the label-range
    # check every operator runs (found in review s10); the Hessian trace is exact
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(0)).double()
    X = torch.randn(200, 4, dtype=torch.float64)
    if kind == "mse":
        loss_fn, y = nn.MSELoss(), torch.randn(200, dtype=torch.float64)
    else:
        loss_fn, y = nn.BCEWithLogitsLoss(), torch.randint(0, 2, (200,)).double()
    params = dict(model.named_parameters())

    def f(flat: Tensor) -> Tensor:
        ps, i = {}, 0
        for k, p in params.items():
            ps[k] = flat[i : i + p.numel()].view_as(p)
            i += p.numel()
        return loss_fn(torch.func.functional_call(model, ps, (X,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    want = torch.autograd.functional.hessian(f, flat).trace()
    got = cl.trace(model, loss_fn, (X, y), method="exact")
    assert abs(float(got.value) - float(want)) <= 1e-10 * abs(float(want))
    res = cl.fisher_trace(model, loss_fn, (X, y), seed=0)
    ggn = float(cl.trace(model, loss_fn, (X, y), method="exact", matrix="ggn").value)
    assert res.stderr > 0 and abs(res.value - ggn) <= 5 * res.stderr  # unbiased for Tr(GGN)


def test_an_ambiguous_batch_alone_warns_once_and_a_marked_loss_does_not() -> None:
    # T == C in every batch: read in torch's layout, as torch's loss would, but never silently
    model, ce = _Tagger().to(DT), nn.CrossEntropyLoss()
    batches = _padded((4, 4))
    with pytest.warns(AmbiguousLayoutWarning) as record:
        cl.diag_fisher(model, ce, batches)
    assert sum(issubclass(w.category, AmbiguousLayoutWarning) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmbiguousLayoutWarning)
        cl.diag_fisher(model, cl.classes_last(ce), batches)


@pytest.mark.parametrize("first", ["relu", "hardtanh"])
def test_an_operator_of_a_model_that_rewrites_its_inputs_with_the_same_values_is_exact(
    first: str,
) -> None:
    # ReLU(inplace=True) as the first layer writes into the caller's inputs at every forward;
    # the data-change check refused such models from the second product on (self-review s10)
    torch.manual_seed(0)
    act = nn.ReLU(inplace=True) if first == "relu" else nn.Hardtanh(inplace=True)
    model = nn.Sequential(act, nn.Linear(3, 2)).to(DT)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 3, dtype=DT, generator=g), torch.randint(0, 2, (8,), generator=g)
    ce = nn.CrossEntropyLoss()
    batches = [(X[:4].clone(), y[:4]), (X[4:].clone(), y[4:])]
    plain = [(act(b[0].clone()), b[1]) for b in batches]  # what every forward sees
    lin = model[1]
    params = dict(lin.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss(v: Tensor) -> Tensor:
        w, b = v[:6].view(2, 3), v[6:]
        out = torch.cat([torch.nn.functional.linear(x, w, b) for x, _ in plain])
        return ce(out, torch.cat([t for _, t in plain]))

    H = torch.autograd.functional.hessian(loss, flat)
    res = cl.eigenvalues(model, ce, batches, "hessian", k=2, tol=1e-10)
    want = torch.linalg.eigvalsh(H).flip(0)[:2]
    torch.testing.assert_close(res.values, want, rtol=1e-8, atol=1e-10)
    op = cl.curvature_operator(model, ce, batches, "hessian")
    op @ torch.ones(op.shape[0], dtype=DT)
    batches[1][0].mul_(3.0)  # a real change by the caller is still refused
    with pytest.raises(RuntimeError, match="tensors of batch 1 of the data changed in place"):
        op @ torch.ones(op.shape[0], dtype=DT)


def test_windows_into_one_tensor_are_read_without_comparing_their_contents() -> None:
    # time-chunked language-model data, D[:, i:i + 8] of one (B, L) tensor: every window shares
    # the storage and overlaps the others' byte range; contents are compared only for the same
    # view read again (the self-review measured 16.9 s for 800 windows before)
    from curvlab._kept_batches import read_batches

    D = torch.randint(0, 7, (4, 1 + 8 * 300))
    data = [(D[:, i : i + 8], D[:, i + 1 : i + 9]) for i in range(0, 8 * 300, 8)]
    calls = []
    import curvlab._kept_batches as kb

    original = kb.same_fingerprint
    try:
        kb.same_fingerprint = lambda a, b: calls.append(1) or original(a, b)
        assert len(read_batches(data)) == 300
        assert not calls
        assert len(read_batches([data[0]] * 3)) == 3 and len(calls) == 4  # the same view again
    finally:
        kb.same_fingerprint = original


def test_a_refilled_buffer_cut_to_another_batch_size_is_refused() -> None:
    # self-review 2: a NumPy buffer refilled and yielded as buf[:8] then buf[:5] (same start,
    # other shape) was checked by version only, which NumPy writes do not bump (trace 26.31 for
    # 14.76)
    from curvlab._kept_batches import read_batches

    buf = np.zeros((8, 3))
    labels = np.zeros(8, dtype=np.int64)

    def loader() -> Iterator[tuple[Tensor, Tensor]]:
        g = np.random.default_rng(0)
        for n in (8, 5):
            buf[:] = g.standard_normal((8, 3))
            labels[:] = g.integers(0, 3, 8)
            yield torch.from_numpy(buf)[:n], torch.from_numpy(labels)[:n]

    with pytest.raises(ValueError, match="batch 0 of data was overwritten in place by batch 1"):
        read_batches(loader())


def test_an_operator_refuses_rows_swapped_where_a_fingerprint_would_not_look() -> None:
    # self-review 2: a data change that kept the sampled entries and the sum (two rows swapped)
    # was accepted by the fingerprint; only curvlab's own forwards re-record the data now
    model, ce = _mlp(), nn.CrossEntropyLoss()
    batches = _batches(2, n=128)  # 384 entries: the 64 a fingerprint samples miss rows 1 and 5
    x0, y0 = batches[0]
    y0[1], y0[5] = 0, 1  # the swap changes the loss
    op = cl.curvature_operator(model, ce, batches, "hessian")
    x0[[1, 5]] = x0[[5, 1]]
    with pytest.raises(RuntimeError, match="tensors of batch 0 of the data changed in place"):
        op @ torch.ones(op.shape[0], dtype=DT)


def test_an_operator_of_a_forward_that_changes_its_inputs_at_every_pass_is_exact() -> None:
    # x /= 2 in the forward: every product's forward halved the caller's data again, and the
    # re-recording after curvlab's own forwards (review s10) let Lanczos converge on a drifting
    # matrix (0.473, converged=True); review s10 refused it. Since review s22 every forward
    # pass of curvlab's runs on a copy of the inputs (curvlab._data.fresh_inputs): each product
    # sees the data as given, which the caller gets back unchanged
    class Halve(nn.Module):
        def __init__(self, inplace: bool) -> None:
            super().__init__()
            self.inplace = inplace

        def forward(self, x: Tensor) -> Tensor:
            if not self.inplace:
                return x / 2.0
            x /= 2.0
            return x

    torch.manual_seed(0)
    model = nn.Sequential(Halve(True), nn.Linear(3, 3)).to(DT)
    twin = nn.Sequential(Halve(False), nn.Linear(3, 3)).to(DT)
    twin.load_state_dict(model.state_dict())
    batches = _batches(2)
    kept = [(x.clone(), y.clone()) for x, y in batches]
    got = cl.eigenvalues(model, nn.CrossEntropyLoss(), batches, "ggn", k=1, tol=1e-10)
    # a model linear in its parameters: the Hessian of the cross-entropy is its GGN
    want = torch.linalg.eigvalsh(_hessian(twin, kept))[-1]
    assert got.converged and abs(float(got.values[0]) - float(want)) <= 1e-8 * float(want)
    assert all(torch.equal(x, x0) for (x, _), (x0, _) in zip(batches, kept))
