"""Test-session set-up: one CPU thread per pytest-xdist worker.

``pytest -n N`` runs N worker processes; each would otherwise start as many torch (OpenMP) threads
as there are cores, N x cores threads on cores cores, and oversubscription makes the suite slower,
not faster. Each worker gets one thread; a plain ``pytest`` run keeps torch's default.
"""

from __future__ import annotations

import contextlib
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = "1"  # for libraries (and subprocesses) that read it when they start
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work has started
        torch.set_num_interop_threads(1)
