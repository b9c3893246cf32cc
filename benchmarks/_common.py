"""Helpers the benchmark scripts share: device and autocast flags, syncs, peak memory, summary lines.

* ``--device cpu|cuda`` (``cuda`` fails at once, with "no CUDA device", when none is present);
* ``--autocast none|bf16|fp16``: the user's forward and loss run inside
  ``torch.autocast(device_type, dtype)`` (:func:`autocast`); curvlab's own passes switch it off;
* :func:`synchronizer`: ``torch.cuda.synchronize`` on CUDA, nothing on the CPU, around every timed
  region;
* :func:`cuda_peak_mib`: the peak ``torch.cuda.max_memory_allocated`` of one call above the memory
  allocated before it; :func:`status_kib` reads the CPU's resident set size (and its peak) on Linux;
* :func:`summary`: one ``SUMMARY | script | what | value | target | verdict`` line, the lines that
  ``benchmarks/gpu.sh`` collects into its final table.
"""

from __future__ import annotations

import argparse
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


def cpu_peak_mib(fn: Callable[[], object]) -> float:
    """Linux: the peak resident set size during ``fn`` above the resident size before it, MiB.

    Writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the current resident size, so
    the peak of the call alone is measured. Run it in a fresh process: memory freed by earlier
    calls and kept by the allocator would hide part of the call's peak.
    """
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
