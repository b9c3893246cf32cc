"""NaN or inf in the inputs, targets, parameters or curvature products: one clear error everywhere.

Every public entry point raises :class:`curvlab.NonFiniteError` (a ``FloatingPointError``
and a ``ValueError``) naming the culprit, before any linear-algebra routine can fail on it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab._finite import NonFiniteError
from curvlab.estimators import hutchinson, lanczos_eigenvalues, slq
from curvlab.estimators._protocol import TensorOperator


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


CE = nn.CrossEntropyLoss()

ENTRY_POINTS = {
    "diag_fisher": lambda m, d: cl.diag_fisher(m, CE, d),
    "diag_fisher_exact": lambda m, d: cl.diag_fisher(m, CE, d, kind="exact"),
    "diag_hessian": lambda m, d: cl.diag_hessian(m, CE, d),
    "kfac": lambda m, d: cl.kfac(m, CE, d),
    "gradient_stats": lambda m, d: cl.gradient_stats(m, CE, d),
    "fisher_norms": lambda m, d: cl.fisher_norms(m, CE, d),
    "trace": lambda m, d: cl.trace(m, CE, d, num_probes=4),
    "trace_exact_ggn": lambda m, d: cl.trace(m, CE, d, matrix="ggn", method="exact"),
    "eigenvalues": lambda m, d: cl.eigenvalues(m, CE, d, k=2),
    "spectral_density": lambda m, d: cl.spectral_density(m, CE, d, num_steps=8),
    "curvature_operator": lambda m, d: cl.curvature_operator(m, CE, d),
    "fisher_trace": lambda m, d: cl.fisher_trace(m, CE, d),
    "analyze": lambda m, d: cl.analyze(m, CE, d, num_probes=4, num_steps=8, k=2),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_nan_in_the_inputs_is_named_with_its_batch(entry):
    model = _model()
    X, y = _data()
    X[5, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"the inputs of batch 0 of data hold 1 non-finite"):
        ENTRY_POINTS[entry](model, (X, y))
    # a later batch of several is named by its index
    X2, y2 = _data()
    X2[3, 0] = float("inf")
    batches = [_data(), (X2, y2)]
    with pytest.raises(NonFiniteError, match=r"inputs of batch 1 of data"):
        ENTRY_POINTS[entry](model, batches)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_nan_in_a_parameter_is_named(entry):
    model = _model()
    with torch.no_grad():
        model[2].weight[1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"parameter '2.weight' holds 1 non-finite"):
        ENTRY_POINTS[entry](model, _data())


def test_the_error_is_both_a_floating_point_and_a_value_error():
    assert issubclass(NonFiniteError, FloatingPointError)
    assert issubclass(NonFiniteError, ValueError)


def test_nan_in_float_targets_and_in_dict_inputs():
    model = nn.Linear(4, 2)
    X = torch.randn(8, 4)
    y = torch.randn(8, 2)
    y[1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="the targets of batch 0"):
        cl.diag_fisher(model, nn.MSELoss(), (X, y))

    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * scale

    inputs = {"x": X, "scale": torch.ones(8, 1)}
    inputs["scale"][4] = float("nan")
    with pytest.raises(NonFiniteError, match=r"inputs\['scale'\] of batch 0"):
        cl.trace(DictModel(), nn.MSELoss(), (inputs, torch.randn(8, 2)), num_probes=2)


def test_analyze_names_the_checkpoint_whose_parameters_are_not_finite():
    model = _model()
    good = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {k: v.clone() for k, v in good.items()}
    bad["0.bias"][2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"parameter '0.bias' of checkpoint 1 of the"):
        cl.analyze(model, CE, _data(), checkpoint=[good, bad], quantities=["loss"])
    assert torch.equal(model[0].bias, good["0.bias"])  # nothing was loaded for good


def test_nonfinite_curvature_products_are_named_by_step():
    A = torch.eye(6, dtype=torch.float64)
    A[2, 2] = float("inf")
    op = TensorOperator(A)
    with pytest.raises(NonFiniteError, match="the curvature product at Lanczos step 1"):
        lanczos_eigenvalues(op, k=1)
    with pytest.raises(NonFiniteError, match="Lanczos step 1"):
        slq(op, num_steps=4)
    with pytest.raises(NonFiniteError, match="Hutchinson probe 0"):
        hutchinson(op, num_probes=3)


def test_an_overflowing_measurement_is_an_error_not_a_nan_value():
    from curvlab.analysis._measures import Measurement, _drop_nan

    m = Measurement(values={"loss": float("nan"), "grad_norm": 1.0}, per_layer={"loss": {}})
    _drop_nan(m, "skip")
    assert "loss" not in m.values and "NonFiniteError" in m.errors["loss"]
    with pytest.raises(NonFiniteError, match="loss came out NaN"):
        _drop_nan(Measurement(values={"loss": float("nan")}), "raise")


def test_finite_data_gives_no_warning_and_no_error():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cl.diag_fisher(model, CE, _data())
        cl.trace(model, CE, _data(), num_probes=3)


def test_overflowing_logits_are_named_when_labels_are_sampled():
    from curvlab._losses import loss_spec

    logits = torch.tensor([[0.0, float("inf")], [1.0, 2.0]])
    with pytest.raises(NonFiniteError, match=r"outputs \(logits\) hold NaN or inf"):
        loss_spec(CE).sample_targets(logits, torch.Generator().manual_seed(0))


def test_the_finiteness_check_is_exact_when_a_sum_overflows():
    """The check adds each tensor's sum: finite values whose sum overflows are still finite, and a
    NaN or an infinity hidden among them (also +inf and -inf together) is still found."""
    from curvlab._finite import check_batch_finite, check_parameters_finite

    huge = torch.full((4,), 3e38)  # finite float32, sum 1.2e39 overflows to inf
    check_parameters_finite({"a": huge, "b": huge.double()})
    check_batch_finite(huge[None].expand(3, 4), torch.zeros(3), 0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteError, match="parameter 'b'"):
            check_parameters_finite({"a": huge, "b": torch.tensor([1.0, bad])})
    with pytest.raises(NonFiniteError, match="parameter 'a'"):
        check_parameters_finite(
            {"a": torch.tensor([float("inf"), -float("inf")]), "b": torch.ones(2)}
        )
