"""What both benchmarks share: interleaved timing of configurations and peak memory of one configuration."""
from __future__ import annotations

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
