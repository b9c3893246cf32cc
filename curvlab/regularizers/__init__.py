"""Gradient-norm regularisers: the Fisher penalty and GP, GP_x, GP_r (Jastrzębski et al., 2021).

Each penalty returns a differentiable scalar to add to the training loss, ``loss + penalty``.

* **Fisher penalty** (FP): ``alpha * || grad_theta L(x_{1:B}, y_hat) ||^2`` with labels ``y_hat``
  sampled from the model's predictive distribution ``p_theta(y | x)``. Under ``reduction="mean"``
  this is exactly ``alpha * || (1/B) sum_i g(x_i, y_hat_i) ||^2`` of the paper (eq. 2), a cheap
  proxy of ``Tr(F)`` that needs one extra backpropagation.
* **GP**: ``alpha * || grad_theta L(x_{1:B}, y) ||^2`` at the data labels.
* **GP_x**: ``alpha * (1/B) sum_i || d l_i / d x_i ||^2``, the mean squared norm of the per-example
  input gradients of the mean-convention losses ``l_i`` (input-output Jacobian regularisation).
* **GP_r**: ``alpha * || grad_theta L(x_{1:B}, y_r) ||^2`` with labels ``y_r`` drawn uniformly from
  the label set (classes for cross-entropy, {0, 1} for BCE; undefined for MSE).

``L`` is the objective ``loss_fn`` computes (its ``"mean"`` or ``"sum"`` reduction); the sampled
labels are constants, so only the dependence of the gradient on ``theta`` is differentiated.

The classes recompute the penalty every ``every`` calls and, in between, return a surrogate whose
value is the last penalty and whose gradient is the last computed gradient (appendix C of the paper
recomputes every 10 steps). Randomness comes from the penalty's own generator, never the global RNG.

A batch whose every target is ``ignore_index`` under ``"mean"`` gives the value NaN (0/0) and the
gradient 0, as torch's own loss; the classes do not keep such a recomputation (nor any that is not
finite): the next call recomputes. A penalty whose gradient needs a second derivative torch does not
have (``nn.Hardsigmoid`` with ``output=``, a fused attention kernel, ``nn.EmbeddingBag``) raises a
``NotImplementedError`` naming the way out before the caller's backward pass. So does a sharded
model (FSDP2 ``fully_shard``, FSDP1, DTensor parameters), before any forward pass: a penalty's
gradient is a double backward, which does not go through FSDP's hooks (pytorch#106637); under
``torch.distributed`` penalties run with ``DistributedDataParallel`` (each rank its own batch).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 3)
    >>> loss_fn = torch.nn.CrossEntropyLoss()
    >>> X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> fp = FisherPenalty(model, loss_fn, alpha=0.1, every=10, seed=0)
    >>> output = model(X)
    >>> total = loss_fn(output, y) + fp(X, output=output)
    >>> total.backward()
"""

from curvlab.regularizers._penalties import (
    fisher_penalty,
    gradient_penalty,
    input_gradient_penalty,
    random_label_penalty,
)
from curvlab.regularizers._recompute import FisherPenalty, GradientNormPenalty

__all__ = [
    "fisher_penalty",
    "gradient_penalty",
    "input_gradient_penalty",
    "random_label_penalty",
    "GradientNormPenalty",
    "FisherPenalty",
]
