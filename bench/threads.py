"""Search steps at the thread counts `--threads` can pick, side by side on this machine as it is loaded now.

    nice -n 10 python bench/threads.py                  # digits-sized supernet (the search's digits defaults)
    python bench/threads.py --dataset cifar10 --layers 8 --init_channels 16 --batch_size 32

Rows: 1 thread, `utils.free_cpus()` (what `--threads 0`, the search's default, now picks: affinity and cgroup
quota less the load) and torch's own default (the physical cores, what `--threads 0` used to mean). Steps are
interleaved (one step of each row in turn, `torch.set_num_threads` before each) so the load hits them alike;
medians of `--steps` steps, ratios against the `free_cpus` row.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from plumbing import utils  # noqa: E402
from search_step import CONFIGS, Runner  # noqa: E402
from timing import interleaved_medians  # noqa: E402


class Threaded:
    """A search step run with `threads` torch threads."""

    def __init__(self, runner: Runner, threads: int) -> None:
        self.runner, self.threads = runner, threads

    def step(self) -> None:
        torch.set_num_threads(self.threads)
        self.runner.step()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--init_channels", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    args.amp = False
    device = torch.device("cpu")
    free, default = utils.free_cpus(), utils._TORCH_THREADS
    rows = [("free_cpus (--threads 0 now)", free), ("1 thread", 1), ("torch default (old --threads 0)", default)]
    runner = Runner(next(c for c in CONFIGS if c["name"] == "default"), args, device)
    medians = interleaved_medians([Threaded(runner, t) for _, t in rows], args.steps, args.warmup, device)
    load = os.getloadavg()[0]
    print(f"{len(os.sched_getaffinity(0))} CPUs this process may use, load {load:.1f}; {args.dataset} supernet, "
          f"{args.layers} layers, {args.init_channels} channels, batch {args.batch_size}")
    print(f"{'threads':<34} {'n':>3} {'step ms':>9} {'ratio':>6}")
    for (name, t), m in zip(rows, medians):
        print(f"{name:<34} {t:>3} {1e3 * m:>9.1f} {m / medians[0]:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
