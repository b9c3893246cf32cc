"""curvlab: curvature diagnostics for PyTorch."""

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

__version__ = "0.1.0"
