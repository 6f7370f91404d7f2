"""What both benchmarks share: interleaved timing of configurations and peak memory of one configuration."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(runners: Sequence, steps: int, warmup: int, device: torch.device) -> List[float]:
    """Median step time of each runner; one step of each in turn, so the machine's drift hits them alike."""
    from tqdm import tqdm
    times: Dict[int, List[float]] = {i: [] for i in range(len(runners))}
    for it in tqdm(range(warmup + steps), desc="interleaved steps"):
        for i, runner in enumerate(runners):
            sync(device)
            t0 = time.perf_counter()
            runner.step()
            sync(device)
            if it >= warmup:
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(times[i]) for i in range(len(runners))]


def _status_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in MiB. Unlike
    ru_maxrss, VmHWM starts afresh in an exec'd child instead of inheriting the forking parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_memory_mb(make_runner, device: torch.device, steps: int = 2) -> float:
    """Peak memory of building a runner and taking `steps` steps (call in a fresh process): max allocated on CUDA;
    on the CPU the peak RSS less the RSS before the runner was built (the libraries' own ~0.7 GB would hide the
    differences between configurations)."""
    base = _status_mb("VmRSS") if device.type == "cpu" else 0.0
    runner = make_runner()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        runner.step()
    sync(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return _status_mb("VmHWM") - base


def memory_in_child(script: str, index: int, child_args: List[str]) -> float:
    """Peak memory (MiB) of configuration `index`, measured by `script --_memory index ...` in a fresh process."""
    out = subprocess.run([sys.executable, script, "--_memory", str(index), *child_args], capture_output=True,
                         text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


class DispatchCount:
    """Counts what one step dispatches (a TorchDispatchMode, so it works on the CPU): every aten operator, host
    syncs (`_local_scalar_dense`: `.item()`, `float(t)`, `bool(t)`, `tolist()` of device tensors) and copies of host
    data onto the device (`lift_fresh`: `torch.tensor(python data)`, an H2D copy on an accelerator, plus copies
    from a CPU tensor to another device). `with DispatchCount() as c: step()` then `c.ops`, `c.syncs`, `c.h2d`.
    A scalar read inside torch.optim is not counted as a sync, nor a tensor made there from host data as a copy: both
    are the optimizers' step counters, which live on the host on a GPU too (unless capturable/fused), so they stall
    and copy nothing there."""

    def __init__(self) -> None:
        self.ops = self.syncs = self.h2d = 0
        self._mode = None

    def __enter__(self) -> "DispatchCount":
        from torch.utils._python_dispatch import TorchDispatchMode
        aten, counter = torch.ops.aten, self
        copies = {aten._to_copy.default, aten.copy_.default}

        def device_of(value):
            return value.device if isinstance(value, torch.Tensor) else None

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                counter.ops += 1
                if func is aten._local_scalar_dense.default:
                    counter.syncs += not _in_optimizer()
                elif func is aten.lift_fresh.default:  # (torch.optim's: `torch.tensor(1.0, device="cpu")`,
                    counter.h2d += not _in_optimizer()   # added to the host-side step counters)
                elif func in copies:
                    src = args[1] if func is aten.copy_.default else args[0]
                    dst = device_of(args[0]) if func is aten.copy_.default else kwargs.get("device")
                    if device_of(src) is not None and device_of(src).type == "cpu" and dst is not None \
                            and torch.device(dst).type != "cpu":
                        counter.h2d += 1
                return func(*args, **kwargs)

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def _in_optimizer() -> bool:
    import traceback
    return any(f"torch{os.sep}optim{os.sep}" in frame.filename for frame in traceback.extract_stack())


def count_step(runner, steps: int = 1, cuda_sync_debug: bool = False) -> Dict[str, float]:
    """Dispatched aten operators, host syncs and host-to-device copies per step of `runner` (after its warm-up);
    `cuda_sync_debug`: also the syncs CUDA itself reports (`torch.cuda.set_sync_debug_mode("warn")`, one warning
    per synchronizing call) over a step run without the dispatch mode."""
    with DispatchCount() as c:
        for _ in range(steps):
            runner.step()
    out = {"ops": c.ops / steps, "syncs": c.syncs / steps, "h2d": c.h2d / steps}
    if cuda_sync_debug and torch.cuda.is_available():
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    runner.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["cuda_syncs"] = sum("synchroniz" in str(w.message) for w in caught) / steps
    return out
