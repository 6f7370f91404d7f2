"""Measure the energy of modules on this machine: J per input sample, ready for ``EnergyEstimator.fit``.

Sources (``source="auto"`` tries them in this order):

* ``zeus``: Zeus's ``ZeusMonitor`` measurement windows (package ``zeus``, imported lazily): NVIDIA and AMD GPUs
  (``device="cuda"``; NVML's energy counter, or its power samples on GPUs older than Volta), CPU packages and DRAM
  through RAPL (``device="cpu"``), and the whole SoC on Jetson and Apple silicon where no GPU or RAPL counter is
  found. Each op repeats in windows of >= 1 s (GPU) / 0.3 s (CPU), median of ``repeats``; the idle power,
  measured first over the same counter, is subtracted (recorded in meta).
* ``latency_x_watts``: median latency times the power ``watts`` the user states (e.g. the board's measured
  active power). Never a silent TDP guess: without a counter and without ``watts`` measuring fails with
  :class:`EnergyCounterUnavailable`, whose message says why each counter was unavailable.
"""
from __future__ import annotations

import copy
import importlib
import math
import platform
import time
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .runner import energy_problem, measure_item
from .trace import EnergyMemoryError, check_fits, is_oom

#: accepted for ``source`` by version 1.0 of this package (its own NVML and RAPL readers): Zeus reads both now
ALIASES = {"nvml": "zeus", "rapl": "zeus"}


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
_SOC_FIELDS = ("cpu_total_mj", "cpu_energy_mj", "gpu_mj", "gpu_energy_mj", "gpu_sram_mj", "ane_mj", "dram_mj")


def soc_joules(m) -> float | None:
    """Joules of a Zeus SoC measurement: Jetson's total rail if present, else the sum of its subsystems (Apple:
    CPU, GPU, GPU SRAM, neural engine, DRAM)."""
    total = getattr(m, "total_energy_mj", None)
    if total is not None:
        return float(total) * 1e-3
    parts = [getattr(m, k, None) for k in _SOC_FIELDS]
    parts = [float(p) for p in parts if isinstance(p, (int, float))]
    return sum(parts) * 1e-3 if parts else None


class ZeusCounter:
    """Energy of one measurement window through ``zeus.monitor.ZeusMonitor``, in joules.

    ``cuda``: the current GPU (else a Jetson-like SoC); ``cpu``: every RAPL package plus its DRAM domain (else an
    Apple-silicon-like SoC)."""

    def __init__(self, device: str):
        try:
            zm = importlib.import_module("zeus.monitor")
        except ImportError:
            raise EnergyCounterUnavailable("Zeus is not installed (pip install zeus)") from None
        except Exception as e:  # noqa: BLE001 - a broken install is the same "no counter" for the user
            raise EnergyCounterUnavailable(f"Zeus failed to import ({type(e).__name__}: {e})") from None
        self.kind, self.index, self.monitor = "", None, None
        reasons = []
        if device == "cuda":
            self.index = torch.cuda.current_device()
            try:
                self.monitor = zm.ZeusMonitor(gpu_indices=[self.index], cpu_indices=[], approx_instant_energy=True)
                self.kind = "gpu"
            except Exception as e:  # noqa: BLE001 - zeus raises its own types per vendor
                reasons.append(f"no GPU counter for cuda:{self.index} ({type(e).__name__}: {e})")
        else:
            try:
                mon = zm.ZeusMonitor(gpu_indices=[])
            except Exception as e:  # noqa: BLE001
                raise EnergyCounterUnavailable(f"Zeus could not start ({type(e).__name__}: {e})") from None
            if list(getattr(mon, "cpu_indices", []) or []):
                self.monitor, self.kind = mon, "cpu"
            else:
                reasons.append("no readable RAPL package (Zeus needs read access to "
                               "/sys/class/powercap/intel-rapl:*/energy_uj, root on recent kernels)")
                self.monitor = mon
        if not self.kind:
            if self.monitor is None:
                try:
                    self.monitor = zm.ZeusMonitor(gpu_indices=[], cpu_indices=[])
                except Exception as e:  # noqa: BLE001
                    raise EnergyCounterUnavailable(f"Zeus could not start ({type(e).__name__}: {e})") from None
            if getattr(self.monitor, "soc_is_present", False):
                self.kind = "soc"
            else:
                raise EnergyCounterUnavailable("Zeus found " + "; ".join(reasons + ["no SoC (Jetson, Apple)"]))
        self._n = 0

    def begin(self) -> None:
        self._n += 1
        self.monitor.begin_window(f"dl_energy_estimator-{self._n}")

    def end(self) -> float:
        """Joules since :meth:`begin`."""
        m = self.monitor.end_window(f"dl_energy_estimator-{self._n}")
        if self.kind == "gpu":
            return float(m.gpu_energy[self.index])
        if self.kind == "cpu":
            return float(sum((m.cpu_energy or {}).values()) + sum((m.dram_energy or {}).values()))
        j = soc_joules(getattr(m, "soc_energy", None))
        if j is None:
            raise EnergyCounterUnavailable("Zeus's SoC measurement holds no energy field this package knows")
        return j

    def describe(self) -> str:
        try:
            version = importlib.import_module("zeus").__version__
        except Exception:  # noqa: BLE001
            version = "?"
        return f"zeus {version} ({self.kind})"


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
    source = ALIASES.get(source, source)
    reasons = []
    if source in ("auto", "zeus"):
        try:
            return "zeus", ZeusCounter(device), ""
        except EnergyCounterUnavailable as e:
            reasons.append(str(e))
            if source == "zeus":
                raise
    if source in ("auto", "latency_x_watts"):
        if watts is not None:
            return "latency_x_watts", None, "; ".join(reasons)
        raise EnergyCounterUnavailable(
            "no energy counter is readable on this machine (" + ("; ".join(reasons) or "none for this device")
            + "); pass --watts W (the device's power while busy) to estimate energy as latency x watts")
    raise EnergyCounterUnavailable(f"unknown source {source!r}; valid: auto, zeus, latency_x_watts")


# ------------------------------------------------------------------------------------------- measuring
def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _idle_power(counter, seconds: float) -> float:
    counter.begin()
    t0 = time.perf_counter()
    time.sleep(seconds)
    e, t1 = counter.end(), time.perf_counter()
    return max(0.0, e / (t1 - t0))


def measure(samples: Sequence[tuple[nn.Module, Sequence[int]]], device: str = "cpu", watts: float | None = None,
            batch_size: int = 1, source: str = "auto", window_s: float | None = None, repeats: int = 3,
            warmup_s: float | None = None, idle_s: float | None = None, progress: bool = False,
            seed: int = 0, threads: int | None = 1) -> Measurements:
    """Measured joules per sample of one forward of each ``(module, input_shape)``.

    The batch dimension of each shape is replaced by ``batch_size``. Modules are copied to ``device`` (the
    originals are untouched), run in eval() under no_grad on random inputs. Each op runs in windows of at least
    ``window_s`` (default 1 s on a GPU counter, 0.3 s on a CPU/SoC counter, 0.1 s for latency), median of
    ``repeats``. An input too large for this machine's memory raises :class:`EnergyMemoryError`.
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
    for _, shape in samples:
        check_fits((int(batch_size),) + tuple(int(s) for s in shape[1:]), what="measuring")
    src, counter, why = open_counter(device, source, watts)
    gpu = device == "cuda"
    window_s = window_s or (1.0 if counter and gpu else 0.3 if counter else 0.1)
    warmup_s = warmup_s if warmup_s is not None else (0.3 if gpu else 0.02)
    sync = _sync(device)
    idle_w = _idle_power(counter, idle_s or (3.0 if gpu else 1.0)) if counter else 0.0
    gen = torch.Generator().manual_seed(seed)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        values = _run(samples, device, batch_size, counter, watts, idle_w, window_s, warmup_s, repeats, sync, gen,
                      progress, src)
    except (MemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        raise EnergyMemoryError(f"measuring at batch size {batch_size} ran out of memory; use a smaller batch "
                                f"size") from None
    finally:
        torch.set_num_threads(old_threads)
    dev_name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    driver = counter.describe() if counter else (torch.version.cuda or platform.platform())
    src_detail = f"zeus:{counter.kind}" if counter else src
    meta = {"source": src, "counter": src_detail, "device": dev_name, "driver": driver, "idle_w": idle_w,
            "watts": watts,
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
            r = measure_item(m, x, counter, idle_w, watts, window_s, repeats, warmup_s, sync)
            problem = energy_problem(r, f"{type(module).__name__} at {tuple(shape)}", src)
            if problem:
                raise EnergyCounterUnavailable(problem)
            values.append(r["joules"])
            del m, x
    return values
