"""Measuring a pipeline call: NFE by a hook on the backbone, peak memory (CUDA's allocator peak on a GPU, the peak
resident-set growth on a CPU), latency (CUDA events on a GPU), and the environment a measurement was taken in."""

from __future__ import annotations

import ctypes
import datetime
import functools
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..teacher import backbone_of


@contextmanager
def count_nfe(model: torch.nn.Module, batch: int) -> Iterator[list[float]]:
    """Count network evaluations per sample: each forward adds (its batch / ``batch``), so batched CFG counts 2."""
    total = [0.0]

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        if x is not None:
            total[0] += x.shape[0] / batch

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield total
    finally:
        handle.remove()


def _status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` size field (VmRSS, VmHWM) in MB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim), so that a call's allocations show as
    resident-set growth instead of landing in memory an earlier, larger call left resident."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set (VmHWM) to the current one (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None


class PeakMemory:
    """Peak memory of a block in MB, above what was in use when it started.

    GPU: CUDA's allocator peak. CPU: the growth of the process's peak resident set (RSS). PyTorch's CPU tensors come
    from malloc, which keeps freed memory resident, so a call after a larger one would reuse it and show no growth at
    all: the free heap is first handed back (malloc_trim), then the kernel's high-water mark VmHWM is reset
    (/proc/self/clear_refs) and read after the block. Where that is not available (not Linux), the RSS is sampled
    every 2 ms instead."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        _release_free_heap()
        self._hwm = _reset_peak_rss()
        self._base = self._peak = self._rss_mb()
        self._stop = threading.Event()
        if self._hwm:
            return self

        def sample() -> None:
            while not self._stop.wait(0.002):
                self._peak = max(self._peak, self._rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._base
            return
        if self._hwm:
            self.peak_mb = max((_status_mb("VmHWM") or 0.0) - self._base, 0.0)
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self._peak, self._rss_mb()) - self._base


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall time of ``fn`` in ms, ``repeats`` times after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers

    from .. import __version__

    env: dict[str, Any] = {
        "fewstep": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


@dataclass
class Speed:
    nfe: int
    peak_mem_mb: float
    times_ms: list[float]


def measure_speed(
    pipe: Any, call: dict[str, Any], batch: int, device: torch.device, warmup: int, repeats: int
) -> Speed:
    """NFE and peak memory of one ``pipe(**call)`` producing ``batch`` samples, then its latency over ``repeats``
    runs. ``warmup`` calls come first, so that neither the memory nor the times see one-off work (torch.compile
    building this shape's graph, lazy CUDA initialisation); the counted call then warms the timed ones as well."""
    run = functools.partial(pipe, **call)
    for _ in range(warmup):
        run()
    with count_nfe(backbone_of(pipe), batch) as nfe, PeakMemory(device) as mem:
        run()
    return Speed(round(nfe[0]), mem.peak_mb, time_call(run, device, 0, repeats))
