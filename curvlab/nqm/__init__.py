"""The noisy quadratic model (Zhang et al., 2019) and related quadratic-model tools.

numpy/scipy only (matplotlib for plots). Public API::

    NQM(h, c, init_var=1.0, counts=None), NQM.paper(d, bins), NQM.from_spectrum(...)
    nqm.risk / steps_to_target / optimal / optimize_schedule / lower_bound / simulate
    batch_size_sweep, critical_batch_size, plot_sweep
    noise_trace_term, sqrt_noise_comparison, wen_bound, wen_expected_loss, wen_simulate,
    sgd_stationary_covariance, implicit_regularizer
"""

from curvlab.nqm._critical import critical_batch_from_steps, critical_batch_size
from curvlab.nqm._model import NQM
from curvlab.nqm._plotting import plot_optimal_lr, plot_sweep
from curvlab.nqm._quadratic import (
    WenBound,
    implicit_regularizer,
    noise_trace_term,
    sgd_stationary_covariance,
    sqrt_noise_comparison,
    wen_bound,
    wen_expected_loss,
    wen_simulate,
)
from curvlab.nqm._schedule import ScheduleResult, optimize_schedule, schedule_risk
from curvlab.nqm._simulate import SimulationResult, simulate
from curvlab.nqm._sweep import SweepResult, batch_size_sweep
from curvlab.nqm._tuning import OptimalResult, optimal

__all__ = [
    "NQM",
    "OptimalResult",
    "ScheduleResult",
    "SimulationResult",
    "SweepResult",
    "WenBound",
    "batch_size_sweep",
    "critical_batch_size",
    "critical_batch_from_steps",
    "implicit_regularizer",
    "noise_trace_term",
    "optimal",
    "optimize_schedule",
    "plot_optimal_lr",
    "plot_sweep",
    "schedule_risk",
    "sgd_stationary_covariance",
    "simulate",
    "sqrt_noise_comparison",
    "wen_bound",
    "wen_expected_loss",
    "wen_simulate",
]
