"""Review sweep 16, K-FAC: layers called with a keyword input, the hint of a selection of layers
whose weight is frozen, the ``has_bias`` docstring.

The factors are checked against a brute force written here: each example's layer inputs and the
Jacobian of the logits with respect to the layer's output (``torch.func.jacrev``) run by hand,
and the loss Hessian ``diag(p) - p p^T`` of the softmax cross-entropy.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import jacrev

import curvlab as cl
from curvlab.noise import DiagFisherNoise, KFACNoise, NoisyOptimizer
from curvlab.quantities._kfac import KFACFactors


class _KeywordMLP(nn.Module):
    """``b(input=tanh(a(x)))``: the second layer gets its input by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(input=torch.tanh(self.a(x)))


def _batch(n: int = 6, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _brute_factors(model: _KeywordMLP, X: Tensor, y: Tensor, kind: str) -> dict[str, tuple]:
    """``A = (1/N) sum_n u_n u_n^T`` and ``G`` (``"exact"``: ``(1/N) sum_n J_n^T H_n J_n``;
    ``"empirical"``: ``(1/N) sum_n d_n d_n^T`` with ``d_n = J_n^T grad_n``, the weights of a mean
    cross-entropy over ``N`` examples) of both layers, one example at a time."""
    a, b = model.a, model.b
    acc = {name: [0.0, 0.0] for name in ("a", "b")}
    N = X.shape[0]
    with torch.no_grad():
        for x, label in zip(X, y):
            za = a(x)
            h = torch.tanh(za)
            f = b(h)
            p = torch.softmax(f, 0)
            H = torch.diag(p) - torch.outer(p, p)
            grad = p - torch.nn.functional.one_hot(label, 3).to(p)
            jac = {
                "a": jacrev(lambda z: b(torch.tanh(z)))(za),  # (3, 5): d logits / d z_a
                "b": torch.eye(3, dtype=X.dtype),  # the logits are b's output
            }
            inputs = {"a": x, "b": h}
            for name in ("a", "b"):
                J = jac[name]
                acc[name][0] = acc[name][0] + torch.outer(inputs[name], inputs[name]) / N
                if kind == "exact":
                    acc[name][1] = acc[name][1] + J.T @ H @ J / N
                else:
                    d = J.T @ grad
                    acc[name][1] = acc[name][1] + torch.outer(d, d) / N
    return {name: tuple(v) for name, v in acc.items()}


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_keyword_input_layer_gets_brute_force_factors(kind: str) -> None:
    """A Linear layer called as ``layer(input=h)`` gets its factors (the hook raised a raw
    IndexError before), equal to the brute force; no hook is left on the model."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _KeywordMLP().double()
    X, y = _batch()
    f = cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind=kind)
    assert sorted(f) == ["a", "b"]
    ref = _brute_factors(model, X, y, kind)
    for name in ("a", "b"):
        torch.testing.assert_close(f[name].A, ref[name][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f[name].G, ref[name][1], rtol=1e-10, atol=1e-12)
    for m in (model.a, model.b):
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_keyword_input_conv_and_hf_conv1d() -> None:
    """Conv2d (``input=``) and HuggingFace Conv1D (``x=``) called by keyword give the factors of
    the same model calling them positionally."""
    torch.set_num_threads(1)
    transformers = pytest.importorskip("transformers.pytorch_utils")

    class Net(nn.Module):
        def __init__(self, keyword: bool) -> None:
            super().__init__()
            self.keyword = keyword
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.proj = transformers.Conv1D(4, 3)  # (nf=out, nx=in)
            self.head = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.conv(input=x) if self.keyword else self.conv(x)
            h = torch.tanh(h).flatten(2).transpose(1, 2).contiguous()  # (N, T, 3)
            h = self.proj(x=h) if self.keyword else self.proj(h)
            return self.head(torch.tanh(h).mean(1))

    torch.manual_seed(0)
    kw = Net(True).double()
    pos = Net(False).double()
    pos.load_state_dict(kw.state_dict())
    g = torch.Generator().manual_seed(2)
    X = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    got = cl.kfac(kw, nn.CrossEntropyLoss(), (X, y), kind="exact")
    want = cl.kfac(pos, nn.CrossEntropyLoss(), (X, y), kind="exact")
    assert sorted(got) == sorted(want) == ["conv", "head", "proj"]
    for name in want:
        torch.testing.assert_close(got[name].A, want[name].A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got[name].G, want[name].G, rtol=1e-12, atol=1e-14)


def test_keyword_input_sequence_first_layer_still_refused() -> None:
    """The layout check still sees a keyword-called layer's input: a sequence-first call whose
    length equals the batch size (``T == N``, found only by the probe on fewer examples) is
    refused, naming the layer (the probe's own record reads positional inputs alone)."""
    torch.set_num_threads(1)

    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 5)
            self.b = nn.Linear(5, 2)

        def forward(self, x: Tensor) -> Tensor:  # x: (N, T, 3)
            h = torch.tanh(self.a(x)).transpose(0, 1)  # (T, N, 5): sequence-first
            return self.b(input=h).transpose(0, 1).mean(1)

    torch.manual_seed(0)
    model = SeqFirst().double()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(4, 4, 3, generator=g, dtype=torch.float64)  # T == N == 4
    y = torch.randint(0, 2, (4,), generator=g)
    with pytest.raises(ValueError, match="layer 'b'"):
        cl.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="exact")


def test_layer_without_its_input_tensor_is_named() -> None:
    """A layer whose input cannot be told (a ``forward(*args, **kwargs)`` called by keyword)
    raises a ValueError naming it and the way out, not a raw IndexError; no hook is left."""
    torch.set_num_threads(1)

    class Passthrough(nn.Linear):
        def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
            return super().forward(*args, **kwargs)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 5)
            self.b = Passthrough(5, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(input=torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = Net().double()
    with pytest.raises(
        ValueError, match=r"layer 'b' \(Passthrough\).*keyword arguments \['input'\]"
    ):
        cl.kfac(model, nn.CrossEntropyLoss(), _batch(), kind="exact")
    for m in (model.a, model.b):
        assert not m._forward_hooks


def test_kfac_noise_on_keyword_input_layer() -> None:
    """KFACNoise's separate pass (through kfac) works on a keyword-called layer: its factors are
    the brute force's (``C^T C = A``, ``B B^T = G``)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _KeywordMLP().double()
    X, y = _batch(8)
    sampler = KFACNoise("empirical", scale=0.1)
    state = sampler.estimate(model, nn.CrossEntropyLoss(), X, y, torch.Generator().manual_seed(0))
    ref = _brute_factors(model, X, y, "empirical")
    for name in ("a", "b"):
        B, C = state[name]["B"], state[name]["C"]
        torch.testing.assert_close(C.T @ C, ref[name][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(B @ B.T, ref[name][1], rtol=1e-9, atol=1e-12)
    eps = sampler.sample(model, nn.CrossEntropyLoss(), X, y)
    assert {k: tuple(v.shape) for k, v in eps.items()} == {
        n: tuple(p.shape) for n, p in model.named_parameters()
    }


class _PositionalMLP(_KeywordMLP):
    """The same layers called positionally: the reference for the keyword-called twin."""

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("sampler", ["kfac", "diagonal"])
def test_noise_capture_on_keyword_input_layer_equals_the_positional_twin(sampler: str) -> None:
    """Noise measured inside the training step (``NoisyOptimizer.capture``) on a keyword-called
    layer (its layer hook read ``args[0]``: a raw IndexError) takes the step the positional twin
    takes, draw for draw."""
    torch.set_num_threads(1)
    X, y = _batch(8)
    lf = nn.CrossEntropyLoss()
    steps = []
    for cls in (_KeywordMLP, _PositionalMLP):
        torch.manual_seed(0)
        model = cls().double()
        make = (
            (lambda: KFACNoise("empirical", scale=0.1))
            if sampler == "kfac"
            else (lambda: DiagFisherNoise("empirical", scale=0.1))
        )
        noisy = NoisyOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), make(), model, lf, seed=3
        )
        noisy.zero_grad()
        with noisy.capture():
            lf(model(X), y).backward()
        noisy.step()
        steps.append({k: p.detach().clone() for k, p in model.named_parameters()})
    for k in steps[0]:
        torch.testing.assert_close(steps[0][k], steps[1][k], rtol=1e-12, atol=1e-14)


# --- 2. params selecting only layers whose weight is frozen --------------------------------------


@pytest.mark.parametrize("params", [["2.bias"], "2"])
def test_frozen_weight_selection_is_named_and_not_suggested(params: object) -> None:
    """A selection of a layer whose weight is frozen says so, and the suggestions list only the
    layers with a trainable weight (layer 2 was suggested, and selecting it raised again)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[2].weight.requires_grad_(False)
    with pytest.raises(ValueError) as info:
        cl.kfac(model, nn.CrossEntropyLoss(), _batch(), kind="exact", params=params)
    msg = str(info.value)
    assert "layer '2' has its weight frozen (requires_grad=False)" in msg
    assert msg.endswith("e.g. one of ['0']")
    # the suggestion works
    f = cl.kfac(model, nn.CrossEntropyLoss(), _batch(), kind="exact", params="0")
    assert list(f) == ["0"]


def test_no_frozen_hint_for_a_selection_without_layers() -> None:
    """A selection of no layer's parameter (a LayerNorm) gets no frozen-weight hint."""
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    model[2].weight.requires_grad_(False)
    with pytest.raises(ValueError) as info:
        cl.kfac(model, nn.CrossEntropyLoss(), _batch(), kind="exact", params="1")
    assert "frozen" not in str(info.value)
    assert str(info.value).endswith("e.g. one of ['0']")


# --- 3. has_bias docstring ----------------------------------------------------------------------


def test_has_bias_doc_names_shared_weights() -> None:
    """``has_bias`` is documented as False for layers sharing a weight with biases of their own,
    which is what kfac gives them."""
    torch.set_num_threads(1)
    doc = " ".join((KFACFactors.__doc__ or "").split())
    assert "share a weight but each have a bias of their own get ``False``" in doc

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.head = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    f = cl.kfac(Shared().double(), nn.CrossEntropyLoss(), _batch(), kind="exact")
    assert sorted(f) == ["a", "head"]
    assert f["a"].has_bias is False and f["a"].bias_block() is None
    assert f["head"].has_bias is True


def test_hooks_backend_reads_a_keyword_input() -> None:
    """The hooks backend handed a keyword-called layer over ("called without a positional
    input"); it now reads the keyword and agrees with the func backend."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _KeywordMLP().double()
    data = _batch(7)
    lf = nn.CrossEntropyLoss()
    hooks = cl.diag_fisher(model, lf, data, backend="hooks")
    ref = cl.diag_fisher(model, lf, data, backend="func")
    for k in ref:
        torch.testing.assert_close(hooks[k], ref[k], rtol=1e-12, atol=1e-15)
