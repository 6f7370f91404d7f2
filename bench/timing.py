"""What both benchmarks share: interleaved timing of configurations and peak memory of one configuration."""
from __future__ import annotations

import resource
import statistics
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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def peak_memory_mb(make_runner, device: torch.device, steps: int = 2) -> float:
    """Peak memory of building a runner and taking `steps` steps (call in a fresh process): max allocated on CUDA;
    on the CPU the peak RSS less the RSS before the runner was built (the libraries' own ~0.7 GB would hide the
    differences between configurations)."""
    base = _rss_mb() if device.type == "cpu" else 0.0
    runner = make_runner()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        runner.step()
    sync(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - base  # Linux reports KiB
