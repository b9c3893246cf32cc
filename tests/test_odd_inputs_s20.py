"""Clear errors (or exact results) for odd inputs, found in review s20: a model returning a
tuple/list/dict, ``params=`` given as a module, parameters or ``(name, parameter)`` pairs, the
second name of a tied weight, and ``fisher_trace`` on inputs that require grad."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import curvlab as cl


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _brute_empirical_diag(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    """diag((1/N) sum_n g_n g_n^T), g_n the gradient of example n's loss, in float64."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p: dict, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, t.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, y)
    return {n: v.pow(2).mean(0) for n, v in g.items()}


# 1. a model output that is neither a Tensor nor has .logits: its own type is named


class _Returns(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin, self.kind = nn.Linear(3, 3), kind

    def forward(self, x: torch.Tensor):
        o = self.lin(x)
        return {"tuple": (o, x), "list": [o], "dict": {"logits": o, "hidden": x}}[self.kind]


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("tuple", ["returned a tuple", "logits alone"]),
        ("list", ["returned a list", "logits alone"]),
        ("dict", ["returned a dict", "'logits'", "'hidden'"]),
    ],
)
def test_model_output_container_named(kind, said):
    X, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.raises(TypeError) as err:
        cl.diag_fisher(_Returns(kind), nn.CrossEntropyLoss(), (X, y))
    message = str(err.value)
    assert "NoneType" not in message
    for part in said:
        assert part in message, message


# 2. params= as a module, parameters, (name, parameter) pairs: the same block, exactly


def test_params_module_and_tensors_select_exactly():
    model, (X, y) = _mlp(), _batch()
    brute = _brute_empirical_diag(model, X, y)
    ce = nn.CrossEntropyLoss()
    forms = {
        "module": model[2],
        "module list": [model[2]],
        "parameter": model[2].weight,
        "parameters (a list)": list(model[2].parameters()),
        "named_parameters pairs": [(n, p) for n, p in model.named_parameters() if n[0] == "2"],
        "the module's own named_parameters": list(model[2].named_parameters()),
    }
    want = {"module": ["2.weight", "2.bias"], "parameter": ["2.weight"]}
    for what, params in forms.items():
        got = cl.diag_fisher(model, ce, (X, y), params=params, backend="func")
        names = want["parameter"] if what == "parameter" else want["module"]
        assert list(got) == names, what
        for n in names:
            # float64 sums of 6 squares of O(1) numbers: a few ulps of agreement
            torch.testing.assert_close(got[n], brute[n], rtol=1e-12, atol=1e-14, msg=what)
    # an operator (trace) too, which reads the selection more than once
    tr = cl.trace(model, ce, (X, y), matrix="empirical_fisher", method="exact", params=model[2])
    exact = sum(brute[n].sum() for n in want["module"])
    assert tr.value == pytest.approx(float(exact), rel=1e-12)


def test_params_one_pair_alone_is_one_entry():
    # one (name, parameter) pair, not in a list, is that parameter: its name half (a submodule's
    # own name, "2.weight") was read as an entry of its own and selected the model's "2.weight"
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 3)
    ).double()
    X, y = _batch()
    brute = _brute_empirical_diag(model, X, y)
    pair = list(model[0].named_parameters())[2]
    assert pair[0] == "2.weight" and pair[1] is model[0][2].weight
    ce = nn.CrossEntropyLoss()
    for params in (pair, [pair], ("0.2.weight", model[0][2].weight)):
        got = cl.diag_fisher(model, ce, (X, y), params=params, backend="func")
        assert list(got) == ["0.2.weight"], params[0]
        # float64 sums of 6 squares of O(1) numbers: a few ulps of agreement
        torch.testing.assert_close(got["0.2.weight"], brute["0.2.weight"], rtol=1e-12, atol=1e-14)


def test_params_odd_forms_refused_with_the_fix():
    model, batch, ce = _mlp(), _batch(), nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match=r"one-shot iterator.*\['2.weight', '2.bias'\]"):
        cl.trace(model, ce, batch, params=model[2].parameters())
    with pytest.raises(ValueError, match="not part of the model"):
        cl.diag_fisher(model, ce, batch, params=nn.Linear(3, 3))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        cl.diag_fisher(model, ce, batch, params=[torch.zeros(4, 3)])
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'0.weight'.*requires_grad=False"):
        cl.diag_fisher(model, ce, batch, params=model[0].weight)
    with pytest.raises(TypeError, match="got int"):
        cl.diag_fisher(model, ce, batch, params=[3])


# 3. the second name of a tied weight: the error names the weight to select


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x)))


@pytest.mark.parametrize("entry", ["head.weight", "head"])
def test_tied_alias_names_the_weight(entry):
    X, y = torch.randint(0, 5, (4,)), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match=r"same tensor as 'emb.weight'.*select 'emb.weight'"):
        cl.diag_fisher(_Tied(), nn.CrossEntropyLoss(), (X, y), params=entry)


def test_tied_module_selects_its_weight():
    torch.manual_seed(0)
    model = _Tied()
    X, y = torch.randint(0, 5, (4,)), torch.randint(0, 5, (4,))
    by_module = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), params=model.head)
    by_name = cl.diag_fisher(model, nn.CrossEntropyLoss(), (X, y), params="emb.weight")
    assert list(by_module) == ["emb.weight"]
    torch.testing.assert_close(by_module["emb.weight"], by_name["emb.weight"], rtol=0, atol=0)


# 4. fisher_trace on inputs that require grad: no autograd graph, no torch warning


def test_fisher_trace_inputs_requiring_grad_no_warning():
    model, (X, y) = _mlp(), _batch()
    want = cl.fisher_trace(model, nn.CrossEntropyLoss(), (X, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cl.fisher_trace(model, nn.CrossEntropyLoss(), (X.requires_grad_(True), y))
    assert got.value == want.value and got.per_batch == want.per_batch
    assert X.grad is None


def test_kfac_params_a_tensor_of_a_non_kfac_layer_on_a_tied_model_is_a_clear_error() -> None:
    # a single tensor selecting no K-FAC layer of a model with a tied head raised torch's raw
    # "Boolean value of Tensor with more than one value is ambiguous" (kfac's alias check)
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.norm = nn.Embedding(5, 4), nn.LayerNorm(4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.emb(x)))

    torch.manual_seed(0)
    model = Tied().double()
    x, y = torch.randint(0, 5, (6,)), torch.randint(0, 5, (6,))
    for params in (model.norm.weight, model.norm):
        with pytest.raises(ValueError, match=r"params selects no Linear/Conv1d/Conv2d weight"):
            cl.kfac(model, nn.CrossEntropyLoss(), (x, y), params=params)
