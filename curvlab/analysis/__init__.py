"""Checkpoint analysis (:func:`analyze` -> :class:`Report`) and in-loop :class:`Diagnostics`."""

from curvlab.analysis.analyze import AnalysisWarning, analyze
from curvlab.analysis.checkpoint import CheckpointError, CheckpointMismatchError
from curvlab.analysis.data_parallel import (
    DataParallelNoiseScale,
    data_parallel_noise_scale,
    noise_scale_from_gradients,
)
from curvlab.analysis.diagnostics import (
    Diagnostics,
    FisherExplosionWarning,
    MeasurementFailedWarning,
)
from curvlab.analysis.measures import ANALYZE_DEFAULT, DIAGNOSTICS_DEFAULT, QUANTITIES
from curvlab.analysis.nqm_link import nqm_prediction
from curvlab.analysis.report import Report

__all__ = [
    "analyze",
    "nqm_prediction",
    "Report",
    "Diagnostics",
    "AnalysisWarning",
    "CheckpointError",
    "CheckpointMismatchError",
    "FisherExplosionWarning",
    "MeasurementFailedWarning",
    "QUANTITIES",
    "ANALYZE_DEFAULT",
    "DIAGNOSTICS_DEFAULT",
    "DataParallelNoiseScale",
    "data_parallel_noise_scale",
    "noise_scale_from_gradients",
]
