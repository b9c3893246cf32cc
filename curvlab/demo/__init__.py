"""The embedded demo behind ``curvlab demo``: the MNIST-1D CNN on MNIST-1D (generated offline).

``make_dataset`` and ``small_cnn`` (a generated 2-D image task and its CNN) remain for examples
and tests that use them.
"""

from curvlab.demo._dataset import make_dataset, small_cnn
from curvlab.demo._train import DemoConfig, run_demo
from curvlab.demo.mnist1d import load_mnist1d, mnist1d_cnn, mnist1d_mlp

__all__ = [
    "make_dataset",
    "small_cnn",
    "DemoConfig",
    "run_demo",
    "load_mnist1d",
    "mnist1d_cnn",
    "mnist1d_mlp",
]
