"""Checkpoint analysis (:func:`analyze` -> :class:`Report`) and in-loop :class:`Diagnostics`."""

from curvlab.analysis._analyze import AnalysisError, AnalysisWarning, analyze
from curvlab.analysis._checkpoint import CheckpointError, CheckpointMismatchError
from curvlab.analysis._data_parallel import (
    DataParallelNoiseScale,
    data_parallel_noise_scale,
    noise_scale_from_gradients,
)
from curvlab.analysis._diagnostics import (
    Diagnostics,
    FisherExplosionWarning,
    MeasurementFailedWarning,
)
from curvlab.analysis._diagnostics_config import DiagnosticsConfig
from curvlab.analysis._measures import ANALYZE_DEFAULT, DIAGNOSTICS_DEFAULT, QUANTITIES
from curvlab.analysis._nqm_link import nqm_prediction
from curvlab.analysis._report import Report

# the callbacks' modules (they import neither transformers nor Lightning until called), so that
# curvlab.analysis.hf.diagnostics_callback works after `import curvlab` alone, as documented
from curvlab.analysis import hf, lightning  # noqa: E402, F401  (isort: skip)

__all__ = [
    "analyze",
    "nqm_prediction",
    "Report",
    "Diagnostics",
    "DiagnosticsConfig",
    "AnalysisError",
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
