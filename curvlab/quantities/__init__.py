"""One-pass curvature quantities: diagonals, K-FAC factors, gradient statistics, Fisher norms."""

from curvlab.quantities._diagonal import diag_fisher, diag_hessian
from curvlab.quantities._gradients import GradientStats, LayerGradientStats, gradient_stats
from curvlab.quantities._kfac import KFACFactors, kfac
from curvlab.quantities._norms import FisherNorms, fisher_norms

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
