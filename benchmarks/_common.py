"""Helpers the benchmark scripts share: device and autocast flags, syncs, peak memory, summary lines.

* ``--device cpu|cuda`` (``cuda`` fails at once, with "no CUDA device", when none is present);
* ``--autocast none|bf16|fp16``: the user's forward and loss run inside
  ``torch.autocast(device_type, dtype)`` (:func:`autocast`); curvlab's own passes switch it off;
* :func:`synchronizer`: ``torch.cuda.synchronize`` on CUDA, nothing on the CPU, around every timed
  region;
* :func:`cuda_peak_mib`: the peak ``torch.cuda.max_memory_allocated`` of one call above the memory
  allocated before it; :func:`status_kib` reads the CPU's resident set size (and its peak) on Linux;
* :func:`cpu_peak_mib`: the peak resident set size of one call above the resident size before it,
  in a process started with :func:`cpu_memory_env` (glibc hands every block over 128 KiB back at
  once, so memory freed by an earlier call cannot hide the call's peak; :data:`CPU_PEAK_METHOD`
  says so in a header);
* :func:`summary`: one ``SUMMARY | script | what | value | target | verdict`` line, the lines that
  ``benchmarks/gpu.sh`` collects into its final table.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def add_device_args(parser: argparse.ArgumentParser, autocast: bool = True) -> None:
    """``--device`` (default cpu) and, with ``autocast``, ``--autocast`` (default none)."""
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    if autocast:
        parser.add_argument(
            "--autocast",
            default="none",
            choices=sorted(AUTOCAST_DTYPES),
            help="run the user's forward and loss under torch.autocast with this dtype",
        )


def resolve_device(name: str) -> torch.device:
    """The device; ``cuda`` without a CUDA device exits with a clear message."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to run (pass --device cpu)")
    return device


def autocast(device: torch.device | str, name: str) -> AbstractContextManager[object]:
    """``torch.autocast(device_type, dtype)`` for ``name`` in bf16/fp16; a no-op for ``none``."""
    dtype = AUTOCAST_DTYPES[name]
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def in_autocast(fn: Callable[[], object], device: torch.device | str, name: str) -> Callable:
    """``fn`` wrapped so that it runs inside :func:`autocast` (itself when ``name`` is none)."""
    if AUTOCAST_DTYPES[name] is None:
        return fn

    def run() -> object:
        with autocast(device, name):
            return fn()

    return run


def precision(name: str) -> str:
    """``float32`` or ``bf16 autocast`` / ``fp16 autocast``, for headers and summary lines."""
    return "float32" if AUTOCAST_DTYPES[name] is None else f"{name} autocast"


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """What to call before reading the clock: waits for the GPU's queued work on CUDA."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def cuda_peak_mib(fn: Callable[[], object]) -> float:
    """MiB that one call of ``fn`` allocates at its peak above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``: resident now, ``VmHWM``: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
"""glibc's variable: blocks of at least this many bytes are mapped on their own and unmapped when
freed (it also switches off glibc's raising of the threshold and of its trim threshold)."""

MMAP_THRESHOLD = 131072

CPU_PEAK_METHOD = (
    "CPU peak: the peak resident set size (VmHWM) during the call above the resident size before "
    f"it, in a fresh process run with {MMAP_THRESHOLD_ENV}={MMAP_THRESHOLD} (glibc unmaps every "
    "freed block over 128 KiB at once, so memory a warm-up call freed cannot hide the call's "
    "peak; resolution about 0.5 MiB)"
)
"""How :func:`cpu_peak_mib` measures, for the benchmarks' printed headers."""


def cpu_memory_env(threads: int | None = None) -> dict[str, str]:
    """The environment of a child process that measures with :func:`cpu_peak_mib`.

    ``os.environ`` plus ``MALLOC_MMAP_THRESHOLD_=131072`` and, with ``threads``,
    ``OMP_NUM_THREADS``. glibc reads the variable when the process starts, so it must be set in
    the child's environment, not changed at run time.
    """
    env = {**os.environ, MMAP_THRESHOLD_ENV: str(MMAP_THRESHOLD)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def cpu_peak_mib(fn: Callable[[], object]) -> float:
    """Linux: the peak resident set size during ``fn`` above the resident size before it, MiB.

    Writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the current resident size, so
    the peak of the call alone is measured. It must run in a process started with
    :func:`cpu_memory_env`: with glibc's default (a mapping threshold that rises to the largest
    block freed so far), memory freed by an earlier call stays resident and is reused unseen, so
    the peak of a call after one warm-up forward+backward read too low (W2's plain
    forward+backward 0.0 MiB instead of 26, its ``diag_fisher`` 22 instead of 44). With the
    fixed threshold the peak agrees with the peak of live tensor bytes that torch's profiler
    records (W2 and W4, plain and ``diag_fisher``: within 1.6 MiB).

    Raises:
        RuntimeError: when ``MALLOC_MMAP_THRESHOLD_`` is not set in this process's environment.
    """
    if MMAP_THRESHOLD_ENV not in os.environ:
        raise RuntimeError(
            f"cpu_peak_mib needs a process started with {MMAP_THRESHOLD_ENV} set (glibc reads it "
            "at start-up); run the measurement in a child process with env=cpu_memory_env()"
        )
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    fn()
    return max(status_kib("VmHWM") - before, 0) / 1024


def summary(
    script: str, what: str, value: float, target: float | None = None, unit: str = "x"
) -> None:
    """Print one ``SUMMARY`` line; a target is an upper bound (``ok`` when ``value <= target``)."""
    shown = f"{value:.3g}{unit}" if unit == "x" else f"{value:.3g} {unit}".rstrip()
    if target is None:
        goal, verdict = "-", "-"
    else:
        goal = f"<= {target:g}{unit}" if unit == "x" else f"<= {target:g} {unit}"
        verdict = "ok" if value <= target else "MISSED"
    print(f"SUMMARY | {script} | {what} | {shown} | {goal} | {verdict}", flush=True)
