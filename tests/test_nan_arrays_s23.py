"""A quantity that came out NaN leaves nothing of its own, its arrays included (review s23: a NaN
``top_eigenvalues`` kept its residuals in ``arrays``, which counted it as measured)."""

from __future__ import annotations

from curvlab.analysis._diagnostics import measured_quantities
from curvlab.analysis._measures import _drop_nan
from curvlab.analysis._registry import Measurement


def test_a_nan_top_eigenvalue_leaves_no_arrays_and_counts_as_failed() -> None:
    m = Measurement()
    m.values["top_eigenvalues"] = [float("nan"), 1.0]
    m.arrays["top_eigenvalues"] = {"residuals": [0.0, 0.0]}
    _drop_nan(m, "warn")
    assert m.values == {} and m.arrays == {}
    assert "top_eigenvalues" in m.errors
    assert measured_quantities(["top_eigenvalues"], m.values, m.per_layer, m.arrays, m.errors) == []
