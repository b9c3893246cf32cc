"""Data the model or the loss cannot take gets a clear error, raised before expensive work.

dtype (float64 data on a float32 model), device, target shapes ((N, 1) class indices), class labels
for MSE, and batches that are dicts instead of (inputs, targets) pairs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab._data import check_inputs_fit, iter_batches

CE = nn.CrossEntropyLoss()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


ENTRY_POINTS = {
    "diag_fisher": lambda m, loss, d: cl.diag_fisher(m, loss, d),
    "diag_hessian": lambda m, loss, d: cl.diag_hessian(m, loss, d),
    "kfac": lambda m, loss, d: cl.kfac(m, loss, d),
    "gradient_stats": lambda m, loss, d: cl.gradient_stats(m, loss, d),
    "fisher_norms": lambda m, loss, d: cl.fisher_norms(m, loss, d),
    "trace": lambda m, loss, d: cl.trace(m, loss, d, num_probes=2),
    "eigenvalues": lambda m, loss, d: cl.eigenvalues(m, loss, d),
    "spectral_density": lambda m, loss, d: cl.spectral_density(m, loss, d, num_steps=4),
    "analyze": lambda m, loss, d: cl.analyze(m, loss, d, num_probes=2, num_steps=4, k=1),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_float64_data_on_a_float32_model(entry):
    X, y = _data()
    with pytest.raises(
        TypeError,
        match=r"inputs are float64 but the model's parameters are "
        r"float32, and the model failed on them; convert the data \(x.to\(torch.float32\)\)",
    ):
        ENTRY_POINTS[entry](_model(), CE, (X.double(), y))


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_class_indices_of_shape_n_by_1(entry):
    X, y = _data()
    with pytest.raises(ValueError, match=r"targets of shape \(\d+, 1\).*y.squeeze\(-1\)"):
        ENTRY_POINTS[entry](_model(), CE, (X, y[:, None]))


@pytest.mark.parametrize("entry", ["diag_fisher", "trace", "analyze"])
def test_class_labels_for_mse_point_to_cross_entropy(entry):
    with pytest.raises(ValueError, match=r"MSELoss needs floating-point targets.*class labels"):
        ENTRY_POINTS[entry](_model(), nn.MSELoss(), _data())


def test_mse_targets_of_another_shape_or_dtype():
    X = torch.randn(8, 4)
    model = nn.Linear(4, 1)
    with pytest.raises(ValueError, match=r"outputs of shape \(8, 1\) and targets of shape \(8,\)"):
        cl.diag_fisher(model, nn.MSELoss(), (X, torch.randn(8)))
    # narrower targets are refused; wider ones (float64 for float32 outputs) are scored as
    # torch's MSELoss scores them (review s14: Monte-Carlo labels are drawn in float64)
    with pytest.raises(TypeError, match=r"targets of dtype torch.float16 for outputs of dtype "):
        cl.diag_fisher(model, nn.MSELoss(), (X, torch.randn(8, 1).half()))


def test_int32_class_indices():
    X, y = _data()
    with pytest.raises(TypeError, match=r"class indices of dtype torch.int64.*y.long\(\)"):
        cl.diag_fisher(_model(), CE, (X, y.int()))


def test_inputs_on_another_device_are_named():
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="the inputs are on meta but the model's parameters are"):
        check_inputs_fit(model, torch.empty(3, 4, device="meta"))
    with pytest.raises(ValueError, match=r"inputs\['x'\] is on meta"):
        check_inputs_fit(model, {"x": torch.empty(3, 4, device="meta")})
    check_inputs_fit(model, torch.randn(3, 4))  # fits
    check_inputs_fit(model, torch.randint(0, 3, (3, 4)))  # integer inputs: any dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_data_on_the_cpu_is_moved_to_a_gpu_model():
    model = _model().cuda()
    X, y = _data()
    diag = cl.diag_fisher(model, CE, (X, y))
    assert diag["0.weight"].is_cuda
    ref = cl.diag_fisher(model.cpu(), CE, (X, y))
    torch.testing.assert_close(diag["0.weight"].cpu(), ref["0.weight"], rtol=1e-4, atol=1e-6)


def test_a_dict_batch_is_named_and_the_fix_shown():
    X, y = _data()
    with pytest.raises(TypeError, match=r"batch 0 of data is a dict with keys \['x', 'labels'\]"):
        cl.diag_fisher(_model(), CE, [{"x": X, "labels": y}])
    with pytest.raises(TypeError, match=r"data is a dict with keys"):
        cl.trace(_model(), CE, {"x": X, "labels": y})


def test_a_dict_of_inputs_holding_a_non_tensor_is_named():
    X, y = _data()
    with pytest.raises(TypeError, match=r"entries \['note'\] are not Tensors \(str\)"):
        list(iter_batches(({"x": X, "note": "hello"}, y)))


def test_a_string_batch_explains_what_happened():
    class Keys:  # a dict-like object that is not a Mapping: iterating it gives its keys
        def __iter__(self):
            return iter(["input_ids", "labels"])

    with pytest.raises(TypeError, match=r"batch 0 of data is the str 'input_ids'.*dict-like"):
        list(iter_batches(Keys()))


def test_the_error_comes_before_any_measurement():
    calls = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(torch.is_grad_enabled())
            return self.lin(x)

    X, y = _data()
    with pytest.raises(ValueError, match="squeeze"):
        cl.analyze(Counting(), CE, (X, y[:, None]))
    assert calls == [False]  # one forward without gradients, on a few examples
