"""Two leftovers of review s19's fixes.

1. ``is_hf_conv1d`` read ``module.weight`` before the class name: on a layer with a
   ``parametrizations.spectral_norm`` weight in train mode that runs one power iteration and moves
   the layer's ``_u``/``_v`` vectors (any caller, not only ``KFACNoise``).
2. The NQM at a batch size in float64's subnormal range leaked numpy's overflow warning from
   ``NQM.effective`` (its noise is ``inf``, as it should be).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from curvlab import nqm
from curvlab.backends._rules import is_hf_conv1d


def test_is_hf_conv1d_leaves_a_parametrized_weight_alone():
    torch.manual_seed(0)
    layer = spectral_norm(nn.Linear(4, 3)).train()
    before = {k: v.clone() for k, v in layer.parametrizations.weight[0].named_buffers()}
    assert not is_hf_conv1d(layer)
    after = dict(layer.parametrizations.weight[0].named_buffers())
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_subnormal_batch_size_leaks_no_overflow_warning():
    model = nqm.NQM.paper()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, s = model.effective(1e-310)
    assert np.all(s >= 0) and np.isinf(s).any()
