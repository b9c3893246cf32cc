"""Review s12 (operator state): a held operator against changes of the model's structure (a
submodule replaced, ``Dropout.p``, hooks added), entries of dict inputs replaced after the
build, buffers a forward pass grows or rebuilds on its first pass over a batch (rotary caches),
and forward-mode products on a model that updates a buffer in place. Products are compared with
dense float64 brute force (``torch.func``)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvlab as cl

DT = torch.float64


def _flat_params(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    return names, torch.cat([params[n].detach().reshape(-1) for n in names])


def _unflat(model: nn.Module, names: list[str], theta: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    out, i = dict(params), 0
    for n in names:
        out[n] = theta[i : i + params[n].numel()].view_as(params[n])
        i += params[n].numel()
    return out


def _call(model: nn.Module, params: dict, x) -> torch.Tensor:
    if isinstance(x, dict):
        return functional_call(model, params, (), x)
    return functional_call(model, params, (x,))


def _ce_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.ndim == 3:  # (N, T, V) logits, (N, T) labels
        out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
    return nn.functional.cross_entropy(out, y, reduction="sum")


def _dense_hessian(model: nn.Module, data: list) -> torch.Tensor:
    """The dense Hessian of the mean cross-entropy over all loss terms of ``data``."""
    names, theta = _flat_params(model)
    count = sum(y.numel() for _, y in data)

    def loss(t: torch.Tensor) -> torch.Tensor:
        params = _unflat(model, names, t)
        return sum(_ce_sum(_call(model, params, x), y) for x, y in data) / count

    return hessian(loss)(theta)


def _dense_ggn(model: nn.Module, data: list) -> torch.Tensor:
    """The dense GGN ``(1/M) sum J^T Lambda J`` of the mean cross-entropy."""
    names, theta = _flat_params(model)
    count = sum(y.numel() for _, y in data)
    G = torch.zeros(theta.numel(), theta.numel(), dtype=DT)
    for x, y in data:

        def f(t: torch.Tensor, x=x) -> torch.Tensor:
            return _call(model, _unflat(model, names, t), x)

        out = f(theta).detach()
        J = jacrev(f)(theta).reshape(out.numel(), -1)
        Lam = hessian(lambda o, y=y, s=out.shape: _ce_sum(o.reshape(s), y))(out.reshape(-1))
        G += J.T @ Lam @ J
    return G / count


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _batches(n: int, size: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size + i, 3, generator=g, dtype=DT),
            torch.randint(0, 3, (size + i,), generator=g),
        )
        for i in range(n)
    ]


_CALLS = {"forward": 0}


class _Counted(nn.Module):
    """Counts the model's forward passes (in a module-level dict: no attribute of its own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _CALLS["forward"] += 1
        return x


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        _Counted(), nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.0), nn.LeakyReLU(0.5), nn.Linear(4, 3)
    ).to(DT)


def _double(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return 2 * output


def _relu_forward(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


_CHANGES = {
    "submodule replaced": (lambda m: m.__setitem__(2, nn.ReLU()), r"'2': Tanh replaced by a ReLU"),
    "Dropout.p": (lambda m: setattr(m[3], "p", 0.5), r"'3'\.p: 0\.0 -> 0\.5"),
    "negative_slope": (
        lambda m: setattr(m[4], "negative_slope", 0.1),
        r"'4'\.negative_slope: 0\.5 -> 0\.1",
    ),
    "forward hook": (lambda m: m[2].register_forward_hook(_double), r"'2': a forward hook added"),
    "forward pre-hook": (
        lambda m: m[5].register_forward_pre_hook(lambda mod, args: (2 * args[0],)),
        r"'5': a forward pre-hook added",
    ),
    "instance forward": (
        lambda m: setattr(m[2], "forward", _relu_forward),
        r"'2': its forward replaced",
    ),
}


# ------------------------------------------------------------------ finding 1: structure
@pytest.mark.parametrize("change", list(_CHANGES))
def test_a_structural_change_is_refused_before_products_that_run_the_forward(change):
    """Found in review: products of a three-batch operator (graphs rebuilt at every product)
    became the changed model's (off by 0.96 to 1.39 relative), silently."""
    model = _mlp().train()  # (train mode: Dropout's p matters)
    data = _batches(3)
    H = _dense_hessian(model, data)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], dtype=DT)
    _close(op @ v, H @ v)
    mutate, named = _CHANGES[change]
    mutate(model)
    calls = _CALLS["forward"]
    with pytest.raises(RuntimeError, match=r"changed since this operator was built") as err:
        op @ v
    assert _CALLS["forward"] == calls  # refused before any forward pass of the product
    assert re.search(named, str(err.value)), str(err.value)
    assert "keep_graph=True" in str(err.value)


@pytest.mark.parametrize("change", list(_CHANGES))
def test_kept_graphs_keep_the_matrix_as_built_after_a_structural_change(change):
    model = _mlp().train()
    data = _batches(3)
    H = _dense_hessian(model, data)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, keep_graph=True)
    one = cl.curvature_operator(model, nn.CrossEntropyLoss(), data[:1])
    H1 = _dense_hessian(model, data[:1])
    _CHANGES[change][0](model)
    v = torch.randn(op.shape[0], dtype=DT)
    _close(op @ v, H @ v)  # no forward pass: the build-time graphs
    _close(one @ v, H1 @ v)


def test_products_under_flop_counter_mode_are_not_refused():
    """torch's FlopCounterMode registers global module hooks to watch: not a change of the model
    (they were refused as one, found in self-review)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, data = _mlp(), _batches(2)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], dtype=DT)
    with FlopCounterMode(display=False) as counter:
        got = op @ v
    assert counter.get_total_flops() > 0
    _close(got, _dense_hessian(model, data) @ v)
    with FlopCounterMode(display=False):  # built inside the mode, used after it
        inside = cl.curvature_operator(model, nn.CrossEntropyLoss(), data)
    _close(inside @ v, _dense_hessian(model, data) @ v)


class _Tracker(nn.Module):
    """Keeps plain state of its own: the longest input seen and a call count (no effect on the
    values), as rotary embeddings keep ``max_seq_len_cached``."""

    def __init__(self) -> None:
        super().__init__()
        self.longest = 4
        self.calls = 0
        self.inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.longest = max(self.longest, x.shape[0])
        self.calls += 1
        return self.inner(x)


def test_attributes_the_models_own_forward_changes_are_not_refused():
    """``calls`` changes at the build's pass, ``longest`` only at the first product's (batch
    sizes 4, 5, 6): both are the model's own state, also after a forward pass of the user's."""
    model, data = _Tracker(), _batches(3)
    H = _dense_hessian(copy.deepcopy(model), data)  # (its passes leave model.longest at 4)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], dtype=DT)
    for _ in range(2):
        _close(op @ v, H @ v)
    model(torch.randn(9, 3, dtype=DT))  # the user's own forward: longest 9, calls + 1
    _close(op @ v, H @ v)


def test_a_structural_change_refuses_forward_mode_products_whatever_keep_graph():
    """GGN products of a Hardsigmoid model compute J v in forward mode: a forward pass at every
    product, also on kept graphs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Hardsigmoid(), nn.Dropout(0.0), nn.Linear(4, 3))
    model = model.to(DT).train()
    data = _batches(1)
    G = _dense_ggn(model, data)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data[0], "ggn", keep_graph=True)
    late = cl.curvature_operator(model, nn.CrossEntropyLoss(), data[0], "ggn")
    v = torch.randn(op.shape[0], dtype=DT)
    _close(op @ v, G @ v)
    assert "jacobian" in op.info
    model[2].p = 0.5
    for o in (op, late):  # (late: forward mode found at its first product, after the change)
        for V in (torch.randn(op.shape[0], 3, dtype=DT), v):  # (batched, and one vector)
            with pytest.raises(RuntimeError, match=r"'2'\.p: 0\.0 -> 0\.5.*does not help"):
                o @ V


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, scale_grad_by_freq=True)
        self.act = nn.Hardsigmoid()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.emb(x).sum(1)))


def test_forward_mode_found_inside_a_product_is_not_refused_for_curvlabs_own_swaps():
    """The switch to forward mode inside a product that rebuilds graphs ran inside curvlab's
    passes, which turn scale_grad_by_freq off and call accelerate's original forward: those
    are no change of the user's."""
    torch.manual_seed(0)
    model = _Tokens().to(DT)
    wrapped = model.forward
    model._original_forward = wrapped  # as accelerate's mixed-precision wrapper leaves it
    model.forward = lambda *a, **k: wrapped(*a, **k)
    g = torch.Generator().manual_seed(4)
    data = [
        (torch.randint(0, 7, (5, 3), generator=g), torch.randint(0, 3, (5,), generator=g))
        for _ in range(3)
    ]
    model.emb.scale_grad_by_freq = False  # (it rescales autograd's gradient, not the loss's)
    G = _dense_ggn(model, data)
    model.emb.scale_grad_by_freq = True
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, "ggn")
    V = torch.randn(op.shape[0], 2, dtype=DT)
    for _ in range(2):
        _close(op @ V, G @ V)
    assert "jacobian" in op.info


# ------------------------------------------------------------------ finding 2: dict inputs
class _DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x) * scale))


@pytest.mark.parametrize("keep_graph", [None, True])
def test_an_entry_of_a_dict_of_inputs_replaced_after_the_build_changes_nothing(keep_graph):
    """Found in review: the operator kept the caller's dicts; ``inputs[1]["x"] = new`` gave a
    three-batch operator the new inputs with the old targets (off by 2.5), silently."""
    torch.manual_seed(0)
    model = _DictModel().to(DT)
    g = torch.Generator().manual_seed(2)
    inputs = [
        {"x": torch.randn(n, 3, generator=g, dtype=DT), "scale": torch.ones(n, 1, dtype=DT)}
        for n in (3, 4, 2)
    ]
    targets = [torch.randint(0, 3, (len(d["x"]),), generator=g) for d in inputs]
    data = list(zip(inputs, targets))
    H = _dense_hessian(model, [(dict(d), t) for d, t in data])
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, keep_graph=keep_graph)
    inputs[1]["x"] = torch.randn(4, 3, generator=g, dtype=DT)
    inputs[1]["scale"] = 3 * torch.ones(4, 1, dtype=DT)
    inputs[2].pop("scale")
    data[0] = (inputs[1], targets[1])  # the caller's list too
    v = torch.randn(op.shape[0], dtype=DT)
    _close(op @ v, H @ v)


def test_a_list_batch_changed_after_the_build_changes_nothing():
    model, data = _mlp(), [list(b) for b in _batches(3)]
    H = _dense_hessian(model, [tuple(b) for b in data])
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data)
    data[1][0] = torch.randn_like(data[1][0])
    v = torch.randn(op.shape[0], dtype=DT)
    _close(op @ v, H @ v)


# ------------------------------------------------------------------ finding 3: grown caches
class _Rotary(nn.Module):
    """GPT-NeoX / older HF style: cos/sin caches (non-persistent buffers) registered again,
    longer, when a longer sequence arrives (``rebuild``: whenever the length changes)."""

    def __init__(self, dim: int, rebuild: bool) -> None:
        super().__init__()
        inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=DT) / dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.seq_cached = 0
        self.rebuild = rebuild

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, T, D)
        T = x.shape[1]
        if self.seq_cached < T or (self.rebuild and self.seq_cached != T):
            f = torch.outer(torch.arange(T, dtype=DT), self.inv_freq)
            self.register_buffer("cos_cached", f.cos(), persistent=False)
            self.register_buffer("sin_cached", f.sin(), persistent=False)
            self.seq_cached = T
        c, s = self.cos_cached[:T], self.sin_cached[:T]
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)


class _TinyLM(nn.Module):
    def __init__(self, rebuild: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.rot = _Rotary(4, rebuild)
        self.out = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.rot(self.emb(x))))


def _sequences(lengths: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randint(0, 10, (2, t), generator=g), torch.randint(0, 10, (2, t), generator=g))
        for t in lengths
    ]


@pytest.mark.parametrize("rebuild", [False, True])
@pytest.mark.parametrize("lengths", [(3, 5), (3, 5, 2), (5, 3)])
@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_a_cache_grown_by_the_forward_is_accepted_from_the_first_product(rebuild, lengths, matrix):
    """Found in review: the first product was refused ('changes rot.cos_cached (replaced) in
    place') and a retry accepted; products are exact: accepted at once, every time."""
    torch.manual_seed(0)
    model = _TinyLM(rebuild).to(DT)
    data = _sequences(lengths)
    twin = copy.deepcopy(model)
    twin(torch.zeros(1, max(lengths), dtype=torch.long))  # its caches at the longest length
    dense = _dense_hessian if matrix == "hessian" else _dense_ggn
    A = dense(twin, data)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, matrix)
    V = torch.randn(op.shape[0], 2, dtype=DT)
    for _ in range(3):
        _close(op @ V, A @ V)
    assert op.num_matvecs == 6
    _close(op.to_dense(), A)


def test_a_cache_the_users_own_forward_grows_is_refused_saying_so():
    """Between products a forward pass of the user's on a longer sequence grows the cache: that
    change is not the operator's (it cannot tell a cache from a buffer read whole), so it is
    refused as before, now saying what happened."""
    model, data = _TinyLM().to(DT), _sequences((3, 5))
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data)
    V = torch.randn(op.shape[0], 2, dtype=DT)
    op @ V
    model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"'rot\.cos_cached \(grown\)'.*longer inputs"):
        op @ V


class _NTKLike(nn.Module):
    """A table rebuilt for each input length with other values (as HF's dynamic RoPE rescales
    its frequencies for long inputs): a deterministic function of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.ones(3, dtype=DT), persistent=False)
        self.inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if x.shape[0] <= 4 else 0.5
        if float(self.table[0]) != scale:
            self.register_buffer("table", torch.full((3,), scale, dtype=DT), persistent=False)
        return self.inner(x * self.table)


def test_a_table_rebuilt_per_input_length_is_accepted_and_exact():
    model, data = _NTKLike(), _batches(3)  # batch sizes 4, 5, 6: the table changes at batch 1
    H = _dense_hessian(copy.deepcopy(model), data)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], dtype=DT)
    for _ in range(2):
        _close(op @ v, H @ v)


class _LongestSeen(nn.Module):
    """Scales its input by the largest batch seen so far: a one-time change that changes the
    function of the batches seen before (the matrix would depend on the order of the passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("longest", torch.tensor([4.0], dtype=DT), persistent=False)
        self.inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > float(self.longest):
            self.register_buffer("longest", torch.tensor([float(x.shape[0])], dtype=DT))
        return self.inner(x / self.longest)


class _Bank(nn.Module):
    """A memory bank that grows at every pass (read whole): never one fixed matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(1, 3, dtype=DT), persistent=False)
        self.inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x + self.bank.mean(0))
        self.register_buffer("bank", torch.cat([self.bank, x.detach()]), persistent=False)
        return out


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (_LongestSeen, r"changed 'longest \(replaced\)' on its first pass.*differs by"),
        (_Bank, r"changes 'bank \(grown\)' in place or replaces them, each time it runs"),
    ],
)
def test_a_forward_whose_own_change_alters_the_matrix_is_refused_for_good(module, message):
    model, data = module(), _batches(3)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], dtype=DT)
    for _ in range(2):  # the same refusal again: a retry is not the fix
        with pytest.raises(RuntimeError, match=message) as err:
            op @ v
        assert "a retry is not the fix" in str(err.value)
        assert "keep_graph=True" in str(err.value)


class _OnceInPlace(nn.Module):
    """Shifts its input by a buffer it bumps in place once, at the first batch of 6: a one-time
    change of the function (refused before on the first product only, then accepted)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.zeros(3, dtype=DT))
        self.inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 6 and float(self.offset[0]) == 0.0:
            with torch.no_grad():
                self.offset.add_(1.0)
        return self.inner(x + self.offset)


def test_a_one_time_in_place_change_that_alters_the_matrix_stays_refused():
    model, data = _OnceInPlace(), _batches(3)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], dtype=DT)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"changed 'offset' on its first pass.*retry"):
            op @ v


class _FilledInPlace(nn.Module):
    """A position table of fixed size filled in place up to the longest input seen (a cache
    grown in place): the values read never change."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(8, 1, dtype=DT), persistent=False)
        self.filled = 0
        self.inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n > self.filled:
            with torch.no_grad():
                self.table[:n, 0] = torch.linspace(0.5, 1.5, 8, dtype=DT)[:n]
            self.filled = n
        return self.inner(x * self.table[:n])


class _Rewrites(_FilledInPlace):
    """Rewrites its table with the same values in place, at batches of more than 4 only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if x.shape[0] > 4:
            with torch.no_grad():
                self.table.copy_(self.table.clone())
        return out


@pytest.mark.parametrize("module", [_FilledInPlace, _Rewrites])
def test_a_cache_filled_or_rewritten_in_place_on_a_first_pass_is_accepted(module):
    model, data = module(), _batches(3)
    twin = _FilledInPlace()  # the same function, filled to the longest length
    twin.load_state_dict(model.state_dict())
    twin(torch.zeros(8, 3, dtype=DT))
    H = _dense_hessian(twin, data)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data)
    V = torch.randn(op.shape[0], 2, dtype=DT)
    for _ in range(3):
        _close(op @ V, H @ V)


# ------------------------------------------------------------------ finding 4: forward mode
class _RunningNorm(nn.Module):
    """A custom input normaliser: in train mode it normalises with the batch mean and updates
    a running mean in place."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(3, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mu = x.mean(0)
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * mu)
            return x - mu
        return x - self.running_mean


def _normalised() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(_RunningNorm(), nn.Linear(3, 4), nn.Hardsigmoid(), nn.Linear(4, 3)).to(DT)


@pytest.mark.parametrize("matrix", ["ggn", "fisher", "empirical_fisher"])
@pytest.mark.parametrize(("num_batches", "keep_graph"), [(1, None), (1, True), (3, None)])
def test_forward_mode_on_a_buffer_updating_train_mode_model_is_a_clear_error(
    matrix, num_batches, keep_graph
):
    """Found in review: torch.func's raw 'mutate a captured Tensor'. Now curvlab's error,
    naming the buffer and eval mode as the way out; the user's buffer is left alone."""
    model = _normalised().train()
    data = _batches(num_batches)
    op = cl.curvature_operator(
        model,
        nn.CrossEntropyLoss(),
        data if num_batches > 1 else data[0],
        matrix,
        keep_graph=keep_graph,
    )
    saved = model[0].running_mean.clone()
    for V in (torch.randn(op.shape[0], 1, dtype=DT), torch.randn(op.shape[0], 3, dtype=DT)):
        with pytest.raises(
            RuntimeError,
            match=r"forward mode.*'0\.running_mean' in place \(aten::mul_.*eval mode.*"
            r"keep_graph=True does not help",
        ):
            op @ V
    if num_batches == 1:  # (graphs rebuilt for several batches update it: documented)
        torch.testing.assert_close(model[0].running_mean, saved, rtol=0, atol=0)


def test_forward_mode_in_eval_mode_is_exact():
    model = _normalised().eval()
    with torch.no_grad():
        model[0].running_mean.uniform_(-0.5, 0.5)
    data = _batches(3)
    G = _dense_ggn(model, data)
    op = cl.curvature_operator(model, nn.CrossEntropyLoss(), data, "ggn")
    V = torch.randn(op.shape[0], 2, dtype=DT)
    _close(op @ V, G @ V)
    assert "jacobian" in op.info
