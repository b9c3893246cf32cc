"""curvlab: curvature diagnostics for PyTorch.

The flat public API, grouped:

* one-pass quantities: :func:`diag_fisher`, :func:`diag_hessian`, :func:`kfac`,
  :func:`gradient_stats`, :func:`fisher_norms`;
* matrix-free operators and estimators: :func:`curvature_operator`, :func:`trace`,
  :func:`eigenvalues`, :func:`spectral_density`, :func:`fisher_trace`;
* the ways in: :func:`analyze` (-> :class:`Report`), :class:`Diagnostics`, :mod:`curvlab.noise`,
  :mod:`curvlab.regularizers`, and the model-free :mod:`curvlab.nqm`;
* :func:`classes_last`: say that cross-entropy logits hold the classes in the last axis;
* :func:`math_attention`: attention's math kernel for your backward of a penalty through a
  checkpointed attention block.

See docs/conventions.md for scaling (mean vs sum), names and the K-FAC convention.
"""

import torch

from curvlab import analysis, distributed, noise, nqm, regularizers
from curvlab._finite import NonFiniteError
from curvlab._losses import classes_last
from curvlab._math_attention import math_attention
from curvlab._results import ParamDict, allow_weights_only_load
from curvlab.analysis import Diagnostics, Report, analyze
from curvlab.estimators import (
    DensityResult,
    EigenResult,
    FisherTraceResult,
    TraceResult,
    eigenvalues,
    fisher_trace,
    spectral_density,
    trace,
)
from curvlab.operators import CurvatureOperator, curvature_operator
from curvlab.quantities import (
    FisherNorms,
    GradientStats,
    KFACFactors,
    LayerGradientStats,
    diag_fisher,
    diag_hessian,
    fisher_norms,
    gradient_stats,
    kfac,
)

# results saved with torch.save load with torch.load's default weights_only=True (torch >= 2.6;
# found in review s19). TorchVersion: a str subclass, in Report.meta["torch"]
allow_weights_only_load(
    ParamDict,
    KFACFactors,
    GradientStats,
    LayerGradientStats,
    FisherNorms,
    TraceResult,
    EigenResult,
    DensityResult,
    FisherTraceResult,
    Report,
    torch.torch_version.TorchVersion,
)

__version__ = "0.1.0"

__all__ = [
    # one-pass quantities
    "diag_fisher",
    "diag_hessian",
    "kfac",
    "gradient_stats",
    "fisher_norms",
    "ParamDict",
    "KFACFactors",
    "GradientStats",
    "LayerGradientStats",
    "FisherNorms",
    # operators and estimators
    "curvature_operator",
    "CurvatureOperator",
    "trace",
    "eigenvalues",
    "spectral_density",
    "fisher_trace",
    "TraceResult",
    "EigenResult",
    "DensityResult",
    "FisherTraceResult",
    # the ways in
    "analyze",
    "Report",
    "Diagnostics",
    "analysis",
    "noise",
    "distributed",
    "regularizers",
    "nqm",
    # the loss's class axis
    "classes_last",
    # attention's math kernel (a penalty's backward through checkpointed attention)
    "math_attention",
    # errors
    "NonFiniteError",
    "__version__",
]
