"""Review s11 (interplay, resume): a held operator against changes of the model's modes, of
parameters outside its selection and buffers, ``Embedding(max_norm=...)``; ``analyze`` with
checkpoints leaves the user's version counters alone and copies live state dicts first."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import curvlab as cl

DT = torch.float64


def _batches(n: int, size: int = 5, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 4, generator=g, dtype=DT), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


def _dense_hessian(model: nn.Module, data: list, names: list[str] | None = None) -> torch.Tensor:
    """Brute force: the dense Hessian of the mean cross-entropy over all examples of ``data``
    with respect to ``names`` (default every trainable parameter), in the modes the model is in."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = names or [n for n, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([params[n].reshape(-1) for n in names])

    def loss(t: torch.Tensor) -> torch.Tensor:
        full, i = dict(params), 0
        for n in names:
            full[n] = t[i : i + params[n].numel()].view_as(params[n])
            i += params[n].numel()
        total, count = 0.0, 0
        for X, y in data:
            out = functional_call(model, full, (X,))
            total = total + nn.functional.cross_entropy(out, y, reduction="sum")
            count += len(y)
        return total / count

    return torch.func.hessian(loss)(theta)


def _mlp(dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 5)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(5))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(5, 3))
    model = nn.Sequential(*layers).to(DT)
    if batchnorm:  # running statistics that are not the defaults
        with torch.no_grad():
            layers[1].running_mean.uniform_(-0.5, 0.5)
            layers[1].running_var.uniform_(0.5, 2.0)
    return model


# ------------------------------------------------------------------ interplay 1: modes
@pytest.mark.parametrize("kind", ["dropout", "batchnorm"])
@pytest.mark.parametrize("num_batches", [1, 3])
@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_products_run_in_the_modes_the_operator_was_built_in(kind, num_batches, matrix):
    """Found in review: built in eval mode, then ``model.train()``: products of several batches
    used random Dropout masks (off by 1.0) or train-mode BatchNorm, which the build refuses (off
    by 16); one batch's kept graph stayed at eval mode. Now every product is the matrix as
    built (brute force in eval mode), and the model keeps the mode the user set."""
    model = _mlp(dropout=0.5) if kind == "dropout" else _mlp(batchnorm=True)
    model.eval()
    data = _batches(num_batches)
    op = cl.curvature_operator(
        model, nn.CrossEntropyLoss(), data[0] if num_batches == 1 else data, matrix=matrix
    )
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(3), dtype=DT)
    expected = op @ v
    if matrix == "hessian":
        torch.testing.assert_close(expected, _dense_hessian(model, data) @ v, rtol=1e-9, atol=1e-12)
    model.train()
    torch.testing.assert_close(op @ v, expected, rtol=1e-12, atol=1e-14)
    assert all(m.training for m in model.modules())  # the user's mode, put back


def test_dropout_masks_of_an_operator_built_in_train_mode_survive_eval():
    """Built in train mode (Dropout masks drawn per batch at construction), then ``model.eval()``:
    the products stay the ones of the masks (before: the eval-mode matrix with several batches)."""
    model = _mlp(dropout=0.5).train()
    data = _batches(3)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, matrix="ggn")
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(4), dtype=DT)
    before = op @ v
    model.eval()
    torch.testing.assert_close(op @ v, before, rtol=0, atol=0)
    assert not any(m.training for m in model.modules())


# ------------------------------------------------------------------ interplay 2: the rest
@pytest.mark.parametrize("num_batches", [1, 3])
def test_a_step_on_parameters_outside_params_is_refused(num_batches):
    """Found in review: an operator on the head (``params=``) after an optimizer step on the
    backbone gave the old matrix with one batch and the new one with three, silently."""
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    data = _batches(num_batches)
    sel = ["2.weight", "2.bias"]
    op = cl.curvature_operator(
        model, loss_fn, data[0] if num_batches == 1 else data, params=sel, matrix="hessian"
    )
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(5), dtype=DT)
    torch.testing.assert_close(op @ v, _dense_hessian(model, data, sel) @ v, rtol=1e-9, atol=1e-12)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.5)
    for X, y in data:
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    with pytest.raises(
        RuntimeError,
        match=r"parameters changed since this operator was built.*0\.weight.*outside the "
        r"operator's selection",
    ):
        op @ v


@pytest.mark.parametrize(("num_batches", "keep_graph"), [(1, None), (3, None), (3, True)])
def test_a_frozen_backbone_changed_in_place_is_refused(num_batches, keep_graph):
    """Found in review: a frozen (requires_grad=False) layer changed in place (an EMA, new
    weights) gave the old matrix (one batch, keep_graph=True) or the new one (three batches)."""
    model = _mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    data = _batches(num_batches)
    op = cl.curvature_operator(
        model, nn.CrossEntropyLoss(), data[0] if num_batches == 1 else data, keep_graph=keep_graph
    )
    v = torch.randn(op.shape[0], dtype=DT)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    with pytest.raises(
        RuntimeError, match=r"parameters changed since this operator was built.*'0\.weight'"
    ):
        op @ v
    with torch.no_grad():  # back to the values as built, but through a write the check sees
        model[0].weight.div_(1.5)
    with pytest.raises(RuntimeError, match="parameters changed"):
        op @ v


class _Scaled(nn.Module):
    """A linear layer whose input is multiplied by a buffer (a frozen table the forward reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 4, dtype=DT))
        self.inner = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.scale)


@pytest.mark.parametrize("num_batches", [1, 3])
def test_a_buffer_the_forward_reads_changed_in_place_is_refused(num_batches):
    torch.manual_seed(0)
    model = _Scaled()
    data = _batches(num_batches)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data[0] if num_batches == 1 else data)
    v = torch.randn(op.shape[0], dtype=DT)
    torch.testing.assert_close(op @ v, _dense_hessian(model, data) @ v, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        model.scale.mul_(2.0)
    with pytest.raises(
        RuntimeError, match=r"buffers changed since this operator was built.*'scale'"
    ):
        op @ v


def test_running_statistics_updated_by_the_users_forward_leave_the_operator_exact():
    """The operator's forward passes run on copies of the norm layers' statistics as built: a
    train-mode forward of the user's updates the model's, not the operator's (not refused)."""
    model = _mlp(batchnorm=True).eval()
    data = _batches(3)
    H = _dense_hessian(model, data)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 4, dtype=DT))  # moves running_mean/var
    model.eval()
    v = torch.randn(op.shape[0], dtype=DT)
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-9, atol=1e-12)


def test_fresh_measurements_between_optimizer_steps_still_work():
    """Diagnostics builds a fresh operator at each measurement: steps between are no change."""
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = cl.Diagnostics(model, loss_fn, every=1, quantities=["sharpness"], on_error="raise")
    X, y = _batches(1, size=8)[0]
    for step in range(3):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        rec = diag.step(step, X, y)
        lam = torch.linalg.eigvalsh(_dense_hessian(model, [(X, y)]))[-1].item()
        assert abs(rec["values"]["sharpness"] - lam) < 1e-5 * max(1.0, abs(lam))
        opt.step()


class _RunningMean(nn.Module):
    """A custom running input normaliser: every forward pass updates its buffers in place."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(4, dtype=DT))
        self.inner = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.mean.mul_(0.5).add_(x.mean(0), alpha=0.5)
        return self.inner(x - self.mean)


def test_a_forward_that_updates_a_buffer_at_every_pass_is_refused_with_a_way_out():
    """Products of several batches rebuild the graphs: each would see another running mean (the
    matrix drifted from product to product, silently). Refused, naming the buffer;
    keep_graph=True builds the graphs once and takes products."""
    torch.manual_seed(0)
    model, data = _RunningMean(), _batches(3)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], dtype=DT)
    with pytest.raises(
        RuntimeError, match=r"forward pass changes 'mean' in place.*keep_graph=True"
    ):
        op @ v
    kept = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, keep_graph=True)
    first = kept @ v
    torch.testing.assert_close(kept @ v, first, rtol=0, atol=0)


class _Rewrites(_Scaled):
    """Rewrites its buffer with the same values at every forward pass (``copy_``, as an
    observer that has seen its range): the version counter moves, the function does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.scale.copy_(self.scale.clone())
        return super().forward(x)


def test_a_forward_that_rewrites_a_buffer_with_the_same_values_is_accepted():
    torch.manual_seed(0)
    model, data = _Rewrites(), _batches(3)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data)
    twin = _Scaled()  # the same function without the rewrite (torch.func refuses it)
    twin.load_state_dict(model.state_dict())
    H = _dense_hessian(twin, data)
    v = torch.randn(op.shape[0], dtype=DT)
    for _ in range(2):
        torch.testing.assert_close(op @ v, H @ v, rtol=1e-9, atol=1e-12)
    model(data[0][0])  # the user's forward pass between products: the same values again
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ interplay 3: max_norm
class _Embedded(nn.Module):
    def __init__(self, max_norm: float | None) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, max_norm=max_norm)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x).sum(1)))


def _embedded() -> tuple[nn.Module, nn.Module, list]:
    """A max_norm model whose rows all lie inside the norm, and its max_norm=None twin (the same
    function at these weights); three batches of token ids."""
    torch.manual_seed(0)
    model = _Embedded(1.0).to(DT)
    with torch.no_grad():
        model.emb.weight.mul_(0.2)
    twin = _Embedded(None).to(DT)
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randint(0, 7, (6, 3), generator=g), torch.randint(0, 3, (6,), generator=g))
        for _ in range(3)
    ]
    return model, twin, data


def test_embedding_max_norm_models_are_measured_exactly():
    """Found in review: torch renormalises the weight in place at every forward pass (a version
    bump with the same values), and every Hessian quantity raised 'the model's parameters
    changed'. Now: exact Tr(H) and products against the brute force of the twin."""
    model, twin, data = _embedded()
    H = _dense_hessian(twin, data)
    trace = cl.trace(model, nn.CrossEntropyLoss(), data, method="exact").value
    assert abs(trace - H.trace().item()) < 1e-10
    for batches in (data[:1], data):
        op = cl.curvature_operator(model, nn.CrossEntropyLoss(), batches)
        Hb = _dense_hessian(twin, batches)
        v = torch.randn(op.shape[0], dtype=DT)
        torch.testing.assert_close(op @ v, Hb @ v, rtol=1e-9, atol=1e-12)
        model(data[0][0])  # the user's forward pass between products: renormalises again
        torch.testing.assert_close(op @ v, Hb @ v, rtol=1e-9, atol=1e-12)
    with torch.no_grad():  # a real change of the weight is still refused
        model.emb.weight[0].mul_(1.5)
    with pytest.raises(RuntimeError, match=r"parameters changed.*'emb\.weight'"):
        op @ v


# ------------------------------------------------------------------ interplay 4 and resume 1
def _versions(model: nn.Module) -> dict[str, int]:
    return {k: v._version for k, v in model.state_dict(keep_vars=True).items()}


def test_analyze_with_checkpoints_leaves_version_counters_alone():
    """Found in review: analyze(checkpoint=...) moved every parameter's version counter (1 -> 5)
    although the values came back bit-identical: a loss computed before the call could not run
    backward, an operator built before refused. Now neither: versions, values and the gradient
    of the earlier loss as without the call."""
    model, loss_fn = _mlp(batchnorm=True).eval(), nn.CrossEntropyLoss()
    X, y = _batches(1, size=8)[0]
    ck = {k: v.clone() + 0.01 for k, v in model.state_dict().items()}
    ck["1.num_batches_tracked"] = model[1].num_batches_tracked.clone()
    reference = copy.deepcopy(model)
    loss_fn(reference(X), y).backward()
    op = cl.curvature_operator(model, loss_fn, (X, y))
    v = torch.randn(op.shape[0], dtype=DT)
    Hv = _dense_hessian(model, [(X, y)]) @ v
    before = {k: t.clone() for k, t in model.state_dict().items()}
    versions = _versions(model)
    loss = loss_fn(model(X), y)
    report = cl.analyze(
        model,
        loss_fn,
        (X, y),
        checkpoint=[ck, None],
        quantities=["loss"],
        nqm=False,
        progress=False,
    )
    with torch.no_grad():
        shifted = copy.deepcopy(model)
        shifted.load_state_dict(ck)
        assert report.entries[0]["values"]["loss"] == pytest.approx(
            float(loss_fn(shifted(X), y)), rel=1e-12
        )
        assert report.entries[1]["values"]["loss"] == pytest.approx(
            float(loss_fn(model(X), y)), rel=1e-12
        )
    assert _versions(model) == versions
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(op @ v, Hv, rtol=1e-9, atol=1e-12)


def test_analyze_with_a_mismatched_checkpoint_leaves_version_counters_alone():
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    X, y = _batches(1)[0]
    good = {k: v.clone() + 0.01 for k, v in model.state_dict().items()}
    bad = {k: v for k, v in good.items() if k != "2.bias"}
    versions = _versions(model)
    with pytest.raises(cl.analysis.CheckpointMismatchError, match="2.bias"):
        cl.analyze(
            model, loss_fn, (X, y), checkpoint=[good, bad], quantities=["loss"], progress=False
        )
    assert _versions(model) == versions


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x).sum(1)))


def test_analyze_keeps_tied_weights_tied_while_it_measures_checkpoints():
    torch.manual_seed(0)
    model, loss_fn = _Tied().to(DT), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(2)
    X, y = torch.randint(0, 7, (6, 3), generator=g), torch.randint(0, 7, (6,), generator=g)
    ck = {k: v.clone() * 1.5 for k, v in model.state_dict().items()}
    other = copy.deepcopy(model)
    other.load_state_dict(ck)
    H = _dense_hessian(other, [(X, y)])
    report = cl.analyze(
        model,
        loss_fn,
        (X, y),
        checkpoint=ck,
        quantities=["trace_hessian"],
        num_probes=400,
        nqm=False,
        progress=False,
        seed=0,
    )
    value = report.entries[0]["values"]["trace_hessian"]
    stderr = report.entries[0]["values"]["trace_hessian_stderr"]
    assert abs(value - H.trace().item()) < 4 * stderr
    assert model.head.weight is model.emb.weight


@pytest.mark.parametrize("live", ["state_dict", "module"])
def test_analyze_copies_a_live_state_dict_before_loading_anything(live):
    """Found in review: ``[init, model.state_dict()]`` (or ``[init, model]``) measured init
    twice: the live state dict holds the model's memory, which loading init overwrote. Each
    checkpoint now gives what a separate copy gives (the loss, by brute force)."""
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    init = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    X, y = _batches(1, size=12)[0]
    current = model.state_dict() if live == "state_dict" else model
    report = cl.analyze(
        model,
        loss_fn,
        (X, y),
        checkpoint=[init, current],
        quantities=["loss"],
        nqm=False,
        progress=False,
    )
    with torch.no_grad():
        start = copy.deepcopy(model)
        start.load_state_dict(init)
        expected = [float(loss_fn(start(X), y)), float(loss_fn(model(X), y))]
    got = [e["values"]["loss"] for e in report.entries]
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected[0] != pytest.approx(expected[1], rel=1e-3)
