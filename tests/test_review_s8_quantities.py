"""Review of the first-order quantities and norms (eighth sweep): each case was wrong or crashed.

* ``fisher_norms`` counted every chunk's loss terms with the first example's output size: with
  MSE/BCE on sequences whose length differs between batches ``||F||_F`` was 3.45x too large;
* ``fisher_norms(kind="exact")`` on BackPACK crashed on a chunk whose labels are all ignored;
* when the streaming budget split one batch, each chunk's rows of all parameters exceeded the
  factor budget (about 12x on GPT-2 small);
* cross-entropy with class-probability targets that do not sum to 1 gave a GGN 0.53-0.98x the
  truth: now refused (normalised probabilities still work, exactly);
* ``Embedding(max_norm=...)``: a call renormalised the user's weight in place;
* ``gradient_stats`` on one example reported a noise scale of 0;
* ``KFACNoise`` on a model whose only Linear is never called raised kfac's error.

References: tests/bruteforce.py's dense float64 matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import curvlab as cl
import curvlab.quantities._norms as norms_module
from tests.bruteforce import Dense, assert_dicts_close

DT = torch.float64


@dataclass
class Problem:
    model: nn.Module
    loss_fn: nn.Module
    batches: list


def _frobenius(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M))


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.BCEWithLogitsLoss(reduction="sum")])
def test_fisher_norms_with_sequence_lengths_differing_between_batches(loss_fn: nn.Module) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(n, t, 3, generator=g, dtype=DT), torch.rand(n, t, 2, generator=g, dtype=DT))
        for n, t in ((3, 2), (4, 5))
    ]
    # by definition, one example at a time: L = sum_n l_n (l_n its summed entries, over M under
    # "mean"); empirical Fisher (1/N) sum g_n g_n^T with g_n = N grad l_n under "mean",
    # sum_n grad l_n grad l_n^T under "sum"; GGN sum_n J_n^T (d^2 l_n / d f_n^2) J_n
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    M = sum(y.numel() for _, y in batches)
    N = sum(x.shape[0] for x, _ in batches)
    scale = 1.0 / M if loss_fn.reduction == "mean" else 1.0
    elementwise = type(loss_fn)(reduction="sum")

    def out_of(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = dict(
            zip(names, (c.reshape(s) for c, s in zip(t.split([*map(_numel, shapes)]), shapes)))
        )
        return torch.func.functional_call(model, params, (x,))

    rows, ggn = [], torch.zeros(theta.numel(), theta.numel(), dtype=DT)
    for x, y in batches:
        for i in range(x.shape[0]):
            xi, yi = x[i : i + 1], y[i : i + 1]
            f = out_of(theta, xi).detach()

            def loss_of(
                t: torch.Tensor, xi: torch.Tensor = xi, yi: torch.Tensor = yi
            ) -> torch.Tensor:
                return scale * elementwise(out_of(t, xi), yi)

            def flat_out(t: torch.Tensor, xi: torch.Tensor = xi) -> torch.Tensor:
                return out_of(t, xi).reshape(-1)

            def loss_at(
                o: torch.Tensor, yi: torch.Tensor = yi, shape: torch.Size = f.shape
            ) -> torch.Tensor:
                return scale * elementwise(o.reshape(shape), yi)

            rows.append(torch.func.grad(loss_of)(theta))
            J = torch.func.jacrev(flat_out)(theta)
            H = torch.func.hessian(loss_at)(f.reshape(-1))
            ggn += J.T @ H @ J
    S = torch.stack(rows)
    emp_ref = (N * S).T @ (N * S) / N if loss_fn.reduction == "mean" else S.T @ S
    emp = cl.fisher_norms(model, loss_fn, batches)
    assert emp.frobenius == pytest.approx(_frobenius(emp_ref), rel=1e-10)
    exact = cl.fisher_norms(model, loss_fn, batches, kind="exact")
    assert exact.frobenius == pytest.approx(_frobenius(ggn), rel=1e-10)
    assert exact.diag_frobenius == pytest.approx(float(ggn.diagonal().norm()), rel=1e-10)


def _numel(shape: torch.Size) -> int:
    return int(torch.Size(shape).numel())


@pytest.mark.parametrize("backend", ["auto", "backpack", "func"])
def test_fisher_norms_exact_with_a_wholly_ignored_chunk(backend: str) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = torch.randn(7, 4, dtype=DT), torch.randint(0, 3, (7,))
    y[4:] = -100
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    ref = Dense(Problem(model, nn.CrossEntropyLoss(), batches))
    r = cl.fisher_norms(model, nn.CrossEntropyLoss(), batches, kind="exact", backend=backend)
    assert r.frobenius == pytest.approx(_frobenius(ref.ggn), rel=1e-10)
    one = cl.fisher_norms(model, nn.CrossEntropyLoss(), (X, y), kind="exact", chunk_size=4)
    assert one.frobenius == pytest.approx(_frobenius(ref.ggn), rel=1e-10)


def test_fisher_norms_chunks_split_by_the_streaming_budget_keep_the_factor_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(1, 50, 2), nn.Tanh(), nn.Flatten(), nn.Linear(150, 3)).to(DT)
    X, y = torch.randn(8, 1, 4, dtype=DT), torch.randint(0, 3, (8,))
    P = sum(p.numel() for p in model.parameters())
    W = max(p.numel() for p in model.parameters())
    monkeypatch.setattr(norms_module, "_FACTOR_BUDGET_BYTES", P * 8 * 2)  # 2 examples' rows
    monkeypatch.setattr(norms_module, "_CACHE_BUDGET_BYTES", W * 8 * 3)  # 3 widest-layer rows
    sizes: list[int] = []
    rows = norms_module._hook_rows

    def spy(be, s, inputs, label_sets, drawn=False, **kw):  # noqa: ANN001, ANN003, ANN202
        sizes.append(inputs.shape[0])
        return rows(be, s, inputs, label_sets, drawn, **kw)

    monkeypatch.setattr(norms_module, "_hook_rows", spy)
    r = cl.fisher_norms(model, nn.CrossEntropyLoss(), (X, y))
    assert sizes and max(sizes) <= 2  # all parameters' rows of a chunk within the factor budget
    ref = Dense(Problem(model, nn.CrossEntropyLoss(), [(X, y)]))
    assert r.frobenius == pytest.approx(_frobenius(ref.empirical_fisher), rel=1e-10)


def _soft_problem(targets: str) -> Problem:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    g = torch.Generator().manual_seed(5)
    X = torch.randn(6, 4, generator=g, dtype=DT)
    q = torch.rand(6, 3, generator=g, dtype=DT)
    if targets == "normalised":
        q = q / q.sum(1, keepdim=True)
    else:  # multi-hot
        q = (q > 0.4).to(DT)
        q[:, 0] = 1.0
    return Problem(model, nn.CrossEntropyLoss(), [(X, q)])


def test_cross_entropy_probability_targets_that_sum_to_one_are_exact() -> None:
    p = _soft_problem("normalised")
    ref = Dense(p)
    assert_dicts_close(cl.diag_fisher(p.model, p.loss_fn, p.batches, kind="exact"), ref.diag("ggn"))
    mc = cl.diag_fisher(p.model, p.loss_fn, p.batches, kind="mc", mc_samples=1, seed=0)
    assert set(mc) == set(ref.diag("ggn"))


@pytest.mark.parametrize(
    "call",
    [
        lambda p: cl.diag_fisher(p.model, p.loss_fn, p.batches, kind="exact"),
        lambda p: cl.diag_fisher(p.model, p.loss_fn, p.batches, kind="mc"),
        lambda p: cl.trace(p.model, p.loss_fn, p.batches, matrix="ggn", num_probes=2),
        lambda p: cl.kfac(p.model, p.loss_fn, p.batches, kind="exact"),
    ],
)
def test_cross_entropy_probability_targets_not_summing_to_one_are_refused(call) -> None:  # noqa: ANN001
    p = _soft_problem("multi_hot")
    with pytest.raises(ValueError, match=r"sums over the classes .* not 1.*BCEWithLogitsLoss"):
        call(p)


def test_embedding_max_norm_weight_is_left_as_it_was() -> None:
    torch.manual_seed(6)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e = nn.Embedding(5, 4, max_norm=1.0)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.e(x))

    model = Net().to(DT)
    with torch.no_grad():
        model.e.weight.mul_(3)  # rows longer than max_norm: a forward pass renormalises them
    before = model.e.weight.detach().clone()
    x, y = torch.randint(0, 5, (6,)), torch.randint(0, 3, (6,))
    cl.diag_fisher(model, nn.CrossEntropyLoss(), (x, y))
    cl.gradient_stats(model, nn.CrossEntropyLoss(), (x, y))
    assert torch.equal(model.e.weight.detach(), before)


def test_gradient_stats_refuses_one_example() -> None:
    model = nn.Linear(3, 2).to(DT)
    X, y = torch.randn(1, 3, dtype=DT), torch.randint(0, 2, (1,))
    with pytest.raises(ValueError, match="at least two examples"):
        cl.gradient_stats(model, nn.CrossEntropyLoss(), (X, y))


def test_kfac_noise_on_a_model_whose_linear_layers_never_run_gives_the_diagonal() -> None:
    torch.manual_seed(7)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.emb(x)
            return self.attn(h, h, h, need_weights=False)[0][..., :3].mean(1)

    model = Attn().to(DT).eval()
    x, y = torch.randint(0, 6, (5, 3)), torch.randint(0, 3, (5,))
    state = cl.noise.KFACNoise("empirical", scale=1.0).estimate(
        model, nn.CrossEntropyLoss(), x, y, torch.Generator().manual_seed(0)
    )
    assert set(state) == {"__diagonal__"}
    ref = Dense(Problem(model, nn.CrossEntropyLoss(), [(x, y)])).diag("empirical_fisher")
    assert_dicts_close(state["__diagonal__"], ref)


def test_diagnostics_noise_scales_of_one_example_are_errors_not_zeros() -> None:
    """One example (a packed batch): the noise scales are reported as failed, the rest kept."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X, y = torch.randn(1, 3, dtype=DT), torch.randint(0, 2, (1,))
    diag = cl.Diagnostics(
        model, nn.CrossEntropyLoss(), quantities=["loss", "noise_scale", "noise_scale_hessian"]
    )
    with pytest.warns(RuntimeWarning, match="noise_scale: ValueError: the batch holds one example"):
        record = diag.measure(0, X, y)
    assert set(record["errors"]) == {"noise_scale", "noise_scale_hessian"}
    assert "noise_scale" not in record["values"] and "noise_scale_hessian" not in record["values"]
    expected = float(nn.CrossEntropyLoss()(model(X), y))
    assert record["values"]["loss"] == pytest.approx(expected, rel=1e-12)
