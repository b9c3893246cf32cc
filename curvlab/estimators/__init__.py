"""Matrix-free estimators: traces, extreme eigenvalues and spectral densities.

The operator-level estimators (:func:`hutchinson`, :func:`hutchpp`, :func:`block_hutchinson`,
:func:`exact_trace`, :func:`lanczos_eigenvalues`, :func:`slq`) work on anything with ``shape``,
``dtype``, ``device`` and ``matmat``; :func:`trace`, :func:`eigenvalues` and :func:`spectral_density`
build the curvature operator of a model first. See ``docs/estimators.md`` for the math and the
memory of each estimator (:class:`EstimatorMemoryError` when a computation cannot fit).
"""

from curvlab.estimators._api import eigenvalues, spectral_density, trace
from curvlab.estimators._density import DensityResult, slq
from curvlab.estimators._fisher_trace import (
    FisherTraceResult,
    exact_trace_per_example,
    fisher_trace,
)
from curvlab.estimators._lanczos import EigenResult, lanczos_eigenvalues
from curvlab.estimators._memory import EstimatorMemoryError
from curvlab.estimators._protocol import LinearOperatorLike, TensorOperator
from curvlab.estimators._trace import (
    TraceResult,
    block_hutchinson,
    exact_trace,
    hutchinson,
    hutchpp,
)

__all__ = [
    "DensityResult",
    "EigenResult",
    "EstimatorMemoryError",
    "FisherTraceResult",
    "LinearOperatorLike",
    "TensorOperator",
    "TraceResult",
    "block_hutchinson",
    "eigenvalues",
    "exact_trace",
    "exact_trace_per_example",
    "fisher_trace",
    "hutchinson",
    "hutchpp",
    "lanczos_eigenvalues",
    "slq",
    "spectral_density",
    "trace",
]
