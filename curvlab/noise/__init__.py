"""Fisher-structured gradient noise for large-batch training (Wen et al., AISTATS 2020).

Samplers share one interface, ``sampler.sample(model, loss_fn, inputs, targets, generator=g)``
returning ``dict`` name -> Tensor shaped like the trainable parameters, with a documented mean-zero
covariance (``scale**2`` times a Fisher structure). :class:`NoisyOptimizer` adds draws to the
gradients of any ``torch.optim`` optimizer. See docs/noise.md.
"""

from curvlab.noise._base import NoiseSampler, wen_scale
from curvlab.noise._diagonal import DiagFisherNoise, FisherTraceNoise
from curvlab.noise._full import FullFisherNoise
from curvlab.noise._isotropic import IsotropicNoise, MultiplicativeNoise
from curvlab.noise._kfac import KFACNoise
from curvlab.noise._optim import NoisyOptimizer

__all__ = [
    "DiagFisherNoise",
    "FisherTraceNoise",
    "FullFisherNoise",
    "IsotropicNoise",
    "KFACNoise",
    "MultiplicativeNoise",
    "NoiseSampler",
    "NoisyOptimizer",
    "wen_scale",
]
