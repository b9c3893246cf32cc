"""Matrix-free curvature operators: Hessian, GGN, Monte-Carlo Fisher and empirical Fisher.

One class per matrix (:mod:`curvlab.operators._matrices`) over one base that owns the parameter
layout, the graphs, the batching and the scaling (:mod:`curvlab.operators._base`); the registry
``MATRIX_CLASSES`` maps each ``matrix=`` name to its class. A :class:`CurvatureOperator` represents one symmetric ``D x D`` matrix of the objective
``L = w * sum_n NLL_n`` (see :mod:`curvlab._losses`) over all the data given, acting on flat vectors of
the selected trainable parameters concatenated in ``model.named_parameters()`` order:

* ``"hessian"``: ``H = d^2 L / d theta^2``, by double backward (Pearlmutter's trick);
* ``"ggn"``: ``G = w * sum_n J_n^T Lambda_n J_n`` with ``J_n`` the Jacobian of example ``n``'s output
  and ``Lambda_n`` the Hessian of ``NLL_n`` w.r.t. that output (the true Fisher for these losses);
* ``"fisher"``: the Monte-Carlo Fisher ``F = w * sum_n s_n s_n^T`` with ``s_n = grad NLL_n(y_hat_n)``
  and labels ``y_hat_n`` drawn *once* per operator from the model (``E[F] = G``);
* ``"empirical_fisher"``: ``(1/N) sum_n g_n g_n^T`` with ``g_n = grad NLL_n(y_n) / c`` under
  ``"mean"`` and ``sum_n s_n s_n^T`` under ``"sum"`` (``c`` loss terms per example);
* ``"residual"``: ``H - G = w * sum_n sum_k r_nk d^2 f_nk / d theta^2`` with ``r_n = dNLL_n / df_n``,
  the part of the Hessian the GGN drops (zero inside each layer's block for piecewise-linear nets).

Every product is exactly weighted over batches: raw NLL-sum products are accumulated batch by batch
and scaled once by ``w``. Under ``torch.distributed`` the batches are this rank's shard, and each
product's raw sum is added over the ranks by one all-reduce before the scaling, so every rank holds
the operator of all the data (docs/distributed.md); every rank must then apply the same products.
With one batch (or ``keep_graph=True``) the autograd graph of each batch is built once and reused
by every product, so a Hessian-vector product costs one extra backward pass.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> H = curvature_operator(model, nn.CrossEntropyLoss(), (X, y), matrix="hessian")
    >>> H.shape
    (26, 26)
    >>> (H @ torch.ones(26)).shape
    torch.Size([26])
"""

from curvlab._selection import select_parameters
from curvlab.operators._base import MATRIX_CLASSES, CurvatureOperator, register_matrix
from curvlab.operators._matrices import (
    MATRICES,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    ResidualOperator,
    curvature_operator,
)

__all__ = [
    "MATRICES",
    "MATRIX_CLASSES",
    "CurvatureOperator",
    "curvature_operator",
    "register_matrix",
    "select_parameters",
    "HessianOperator",
    "ResidualOperator",
    "GGNOperator",
    "FisherOperator",
    "EmpiricalFisherOperator",
]
