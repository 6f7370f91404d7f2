"""Measure the energy of modules on this machine: J per input sample, ready for ``EnergyEstimator.fit``.

Sources, in order of preference (``source="auto"``):

* ``nvml`` (``device="cuda"``): ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since driver load, Volta+). The
  counter updates every 20-100 ms, so each op repeats in windows of >= 1 s; median of 3 windows; the idle
  power, measured first, is subtracted (recorded in meta).
* ``rapl`` (``device="cpu"``): ``/sys/class/powercap/intel-rapl:N/energy_uj`` package domains (wrap-around at
  ``max_energy_range_uj`` handled), idle power subtracted likewise.
* ``latency_x_watts``: median latency times the power ``watts`` the user states (e.g. the board's measured
  active power). Never a silent TDP guess: without a counter and without ``watts`` measuring fails with
  :class:`EnergyCounterUnavailable`.
"""
from __future__ import annotations

import copy
import glob
import math
import os
import platform
import statistics
import time
from typing import Callable, Iterable, Sequence

import torch
from torch import nn


class EnergyCounterUnavailable(RuntimeError):
    """No readable energy counter and no ``watts`` to fall back on."""


class Measurements(list):
    """Measured joules per sample, one per input sample, plus ``source`` and ``meta`` (idle power, ...)."""

    def __init__(self, values: Iterable[float], source: str, meta: dict):
        super().__init__(values)
        self.source = source
        self.meta = meta

    @property
    def joules(self) -> list[float]:
        """The measured joules per sample (the list itself, as a plain list)."""
        return list(self)


# ------------------------------------------------------------------------------------------- counters
class RaplCounter:
    """Sum of the package-level RAPL domains, in joules, wrap-around safe."""

    def __init__(self, root: str = "/sys/class/powercap"):
        self.paths = sorted(p for p in glob.glob(os.path.join(root, "intel-rapl:*"))
                            if os.path.basename(p).count(":") == 1)
        if not self.paths:
            raise EnergyCounterUnavailable(f"no RAPL package domain under {root}")
        self.max = []
        for p in self.paths:
            try:
                with open(os.path.join(p, "max_energy_range_uj")) as f:
                    self.max.append(int(f.read()))
                self._raw(p)
            except (OSError, ValueError) as e:
                raise EnergyCounterUnavailable(f"RAPL counter {p} is not readable ({e})") from None
        self.last = [self._raw(p) for p in self.paths]
        self.total_uj = 0

    @staticmethod
    def _raw(p: str) -> int:
        with open(os.path.join(p, "energy_uj")) as f:
            return int(f.read())

    def read(self) -> float:
        for i, p in enumerate(self.paths):
            v = self._raw(p)
            d = v - self.last[i]
            if d < 0:  # wrapped around
                d += self.max[i] + 1
            self.total_uj += d
            self.last[i] = v
        return self.total_uj * 1e-6

    def describe(self) -> str:
        return platform.platform()


class NvmlCounter:
    """GPU energy since driver load (nvidia-ml-py, imported lazily), in joules."""

    def __init__(self, cuda_index: int):
        try:
            import pynvml  # package nvidia-ml-py
        except ImportError:
            raise EnergyCounterUnavailable("pynvml is not installed (pip install nvidia-ml-py)") from None
        self.nv = pynvml
        try:
            pynvml.nvmlInit()
            self.handle = self._handle(cuda_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except pynvml.NVMLError as e:
            raise EnergyCounterUnavailable(f"NVML energy counter not available ({e})") from None

    def _handle(self, cuda_index: int):
        nv = self.nv
        try:  # map the CUDA device (CUDA_VISIBLE_DEVICES may reorder) to NVML by PCI bus id
            props = torch.cuda.get_device_properties(cuda_index)
            bus = "%08X:%02X:%02X.0" % (props.pci_domain_id, props.pci_bus_id, props.pci_device_id)
            return nv.nvmlDeviceGetHandleByPciBusId(bus)
        except Exception:
            return nv.nvmlDeviceGetHandleByIndex(cuda_index)

    def read(self) -> float:
        return self.nv.nvmlDeviceGetTotalEnergyConsumption(self.handle) * 1e-3

    def describe(self) -> str:
        try:
            v = self.nv.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        except Exception:
            return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def open_counter(device: str, source: str, watts: float | None):
    """(source, counter or None, why-not text). Raises EnergyCounterUnavailable when nothing can measure."""
    reasons = []
    if source in ("auto", "nvml") and device == "cuda":
        try:
            return "nvml", NvmlCounter(torch.cuda.current_device()), ""
        except EnergyCounterUnavailable as e:
            reasons.append(f"NVML: {e}")
            if source == "nvml":
                raise
    if source in ("auto", "rapl") and device == "cpu":
        try:
            return "rapl", RaplCounter(), ""
        except EnergyCounterUnavailable as e:
            reasons.append(f"RAPL: {e}")
            if source == "rapl":
                raise
    if source in ("auto", "latency_x_watts"):
        if watts is not None:
            return "latency_x_watts", None, "; ".join(reasons)
        raise EnergyCounterUnavailable(
            "no energy counter is readable on this machine (" + ("; ".join(reasons) or "none for this device")
            + "); pass --watts W (the device's power while busy) to estimate energy as latency x watts")
    raise EnergyCounterUnavailable(f"source {source!r} does not apply to device {device!r}")


# ------------------------------------------------------------------------------------------- measuring
def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _idle_power(counter, seconds: float) -> float:
    e0, t0 = counter.read(), time.perf_counter()
    time.sleep(seconds)
    e1, t1 = counter.read(), time.perf_counter()
    return max(0.0, (e1 - e0) / (t1 - t0))


def measure(samples: Sequence[tuple[nn.Module, Sequence[int]]], device: str = "cpu", watts: float | None = None,
            batch_size: int = 1, source: str = "auto", window_s: float | None = None, repeats: int = 3,
            warmup_s: float | None = None, idle_s: float | None = None, progress: bool = False,
            seed: int = 0, threads: int | None = 1) -> Measurements:
    """Measured joules per sample of one forward of each ``(module, input_shape)``.

    The batch dimension of each shape is replaced by ``batch_size``. Modules are copied to ``device`` (the
    originals are untouched), run in eval() under no_grad on random inputs. Each op runs in windows of at least
    ``window_s`` (default 1 s on NVML, 0.3 s on RAPL, 0.1 s for latency), median of ``repeats``.
    ``threads``: CPU intra-op threads while measuring (default 1: reproducible, and immune to the multi-ms
    stalls OpenMP barriers suffer on a busy or CPU-limited machine; None keeps torch's setting).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise EnergyCounterUnavailable("device 'cuda' requested but CUDA is not available")
    if watts is not None and (not math.isfinite(watts) or watts <= 0):
        raise ValueError(f"watts must be a positive number, got {watts!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    src, counter, why = open_counter(device, source, watts)
    window_s = window_s or {"nvml": 1.0, "rapl": 0.3}.get(src, 0.1)
    warmup_s = warmup_s if warmup_s is not None else (0.3 if device == "cuda" else 0.02)
    sync = _sync(device)
    idle_w = _idle_power(counter, idle_s or (3.0 if src == "nvml" else 1.0)) if counter else 0.0
    gen = torch.Generator().manual_seed(seed)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        values = _run(samples, device, batch_size, counter, watts, idle_w, window_s, warmup_s, repeats, sync, gen,
                      progress, src)
    finally:
        torch.set_num_threads(old_threads)
    dev_name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    driver = counter.describe() if counter else (torch.version.cuda or platform.platform())
    meta = {"source": src, "device": dev_name, "driver": driver, "idle_w": idle_w, "watts": watts,
            "window_s": window_s, "repeats": repeats, "batch_size": int(batch_size), "fallback_reason": why,
            "threads": torch.get_num_threads() if threads is None else int(threads)}
    return Measurements(values, src, meta)


def _run(samples, device, batch_size, counter, watts, idle_w, window_s, warmup_s, repeats, sync, gen, progress,
         src) -> list[float]:

    it = samples
    if progress:
        from tqdm import tqdm
        it = tqdm(samples, desc=f"measuring ({src})", unit="op")
    values = []
    with torch.no_grad():
        for module, shape in it:
            shape = (int(batch_size),) + tuple(int(s) for s in shape[1:])
            m = copy.deepcopy(module).to(device).eval()
            x = torch.randn(shape, generator=gen).to(device)
            n, t_start = 0, time.perf_counter()  # warm-up, and a first latency estimate
            while n < 3 or time.perf_counter() - t_start < warmup_s:
                m(x)
                sync()
                n += 1
            per = (time.perf_counter() - t_start) / n
            iters = max(1, math.ceil(window_s / max(per, 1e-7)))
            runs = []
            for _ in range(repeats):
                sync()
                e0 = counter.read() if counter else 0.0
                t0 = time.perf_counter()
                for _ in range(iters):
                    m(x)
                sync()
                t1 = time.perf_counter()
                e1 = counter.read() if counter else 0.0
                dt = t1 - t0
                joules = (e1 - e0) - idle_w * dt if counter else watts * dt
                runs.append(joules / iters)
            values.append(max(statistics.median(runs), 1e-12) / shape[0])
            del m, x
    return values
