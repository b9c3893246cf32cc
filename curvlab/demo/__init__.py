"""The embedded demo behind ``curvlab demo``: a small CNN on a generated dataset (no downloads)."""

from curvlab.demo.dataset import make_dataset
from curvlab.demo.train import DemoConfig, run_demo, small_cnn

__all__ = ["make_dataset", "small_cnn", "DemoConfig", "run_demo"]
