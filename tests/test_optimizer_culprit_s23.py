"""The sharpness measurements' refusal names the optimizer refused, not the known wrapper it came
in (review s23: the HF Trainer's accelerate ``AcceleratedOptimizer`` was named for an
Adafactor, ``NoisyOptimizer`` for an RMSprop)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.analysis._optimizer_state import check_optimizer
from curvlab.noise import DiagFisherNoise, NoisyOptimizer


class _MyAdam(torch.optim.Adam):
    pass


def _noisy(make: type) -> NoisyOptimizer:
    model = nn.Linear(2, 1)
    return NoisyOptimizer(make(model.parameters()), DiagFisherNoise(scale=0.1), model, nn.MSELoss())


def test_noisy_optimizer_around_rmsprop_names_rmsprop() -> None:
    with pytest.raises(TypeError, match=r"got RMSprop inside NoisyOptimizer \(only exactly"):
        check_optimizer(_noisy(torch.optim.RMSprop), "critical_sharpness")


def test_a_subclass_inside_a_wrapper_is_named_as_the_subclass() -> None:
    with pytest.raises(TypeError, match=r"got _MyAdam inside NoisyOptimizer \(a subclass"):
        check_optimizer(_noisy(_MyAdam), "preconditioned_sharpness", adam_only=True)


def test_an_unwrapped_optimizer_is_named_alone() -> None:
    with pytest.raises(TypeError, match=r"got Adagrad \(only exactly"):
        check_optimizer(torch.optim.Adagrad(nn.Linear(2, 1).parameters()), "critical_sharpness")
