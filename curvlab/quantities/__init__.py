"""One-pass curvature quantities: diagonals, K-FAC factors, gradient statistics, Fisher norms."""

from curvlab.quantities.diagonal import diag_fisher, diag_hessian
from curvlab.quantities.gradients import GradientStats, LayerGradientStats, gradient_stats
from curvlab.quantities.kfac import KFACFactors, kfac
from curvlab.quantities.norms import FisherNorms, fisher_norms

__all__ = [
    "diag_fisher",
    "diag_hessian",
    "kfac",
    "KFACFactors",
    "gradient_stats",
    "GradientStats",
    "LayerGradientStats",
    "fisher_norms",
    "FisherNorms",
]
