"""Time full search steps (architect step + weight step) of the supernet, configurations side by side.

    python bench/search_step.py                                  # CIFAR-10 shape, batch 32, 8 layers, 16 channels
    python bench/search_step.py --device cuda --batch_size 64 [--amp] --json bench.json

Steps of all configurations are interleaved (one step of each in turn) so the machine's drift hits them alike;
the median of `--steps` timed steps after warm-up is reported, with ratios against the first row (`plain`: every
fast path off, as the original DARTS code runs). Peak memory is measured for each configuration in a process of
its own (CPU: peak RSS; CUDA: max allocated).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from architect import Architect  # noqa: E402
from plumbing.datasets import known_info  # noqa: E402
from dl_energy_estimator import EnergyEstimator  # noqa: E402
from genotypes import PRIMITIVES  # noqa: E402
from model_search import Network  # noqa: E402
from plumbing.layout import want_channels_last  # noqa: E402
from timing import count_step, interleaved_medians, memory_in_child, peak_memory_mb as peak_memory_mb_here  # noqa: E402
from plumbing.utils import atomic_write_json, compile_cells  # noqa: E402
from train_search import weight_step  # noqa: E402

CONFIGS: List[Dict[str, Any]] = [
    {"name": "plain", "energy_weight": 0.05, "order": "first", "partial_channels": 1, "fast": False},
    {"name": "energy 0", "energy_weight": 0.0, "order": "first", "partial_channels": 1, "fast": True},
    {"name": "default", "energy_weight": 0.05, "order": "first", "partial_channels": 1, "fast": True},
    {"name": "K=2", "energy_weight": 0.05, "order": "first", "partial_channels": 2, "fast": True},
    {"name": "K=4", "energy_weight": 0.05, "order": "first", "partial_channels": 4, "fast": True},
    {"name": "second order", "energy_weight": 0.05, "order": "second", "partial_channels": 1, "fast": True},
    {"name": "second order K=4", "energy_weight": 0.05, "order": "second", "partial_channels": 4, "fast": True},
    # opt-in (--compile): the default configuration with every cell through torch.compile (compile time excluded)
    {"name": "compile", "energy_weight": 0.05, "order": "first", "partial_channels": 1, "fast": True,
     "compile": True},
]


class Runner:
    """One configuration: supernet, architect, optimizer and a fixed batch; `step()` is one search step."""

    def __init__(self, cfg: Dict[str, Any], args: argparse.Namespace, device: torch.device) -> None:
        info = known_info(args.dataset)
        torch.manual_seed(0)
        self.cfg, self.device, self.amp = cfg, device, args.amp and device.type == "cuda"
        self.model = Network(args.init_channels, info.num_classes, args.layers, PRIMITIVES, info.in_channels,
                             EnergyEstimator.default(), partial_channels=cfg["partial_channels"],
                             skip_none=cfg["fast"]).to(device)
        self.model.set_channels_last(want_channels_last("auto" if cfg["fast"] else "off", device, self.amp))
        if cfg.get("compile"):
            compile_cells(self.model, (1, info.in_channels, info.image_size, info.image_size), whole=True)
        self.arch = Architect(self.model, energy_weight=cfg["energy_weight"], unrolled=cfg["order"] == "second")
        # multi-tensor (foreach) optimizers on every device, as torch picks them on CUDA: the operator counts
        # measured on the CPU are then those a GPU dispatches
        self.opt = torch.optim.SGD(self.model.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4,
                                   foreach=True)
        for group in self.arch.optimizer.param_groups:
            group["foreach"] = True
        shape = (args.batch_size, info.in_channels, info.image_size, info.image_size)
        g = torch.Generator().manual_seed(1)
        self.x, self.xv = (torch.randn(shape, generator=g).to(device) for _ in range(2))
        self.y, self.yv = (torch.randint(0, info.num_classes, (args.batch_size,), generator=g).to(device)
                           for _ in range(2))

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.cfg["fast"]:
                self.arch.step(self.x, self.y, self.xv, self.yv, 0.025, self.opt)
                weight_step(self.model, self.model.weight_parameters(), self.opt, self.x, self.y, 5.0)
            else:  # as the original DARTS code: full backward() for both updates
                self.arch.optimizer.zero_grad()
                if self.arch.unrolled:
                    self.arch.step(self.x, self.y, self.xv, self.yv, 0.025, self.opt)
                else:
                    self.arch.objective(*self.model(self.xv), self.yv).backward()
                    self.arch.optimizer.step()
                self.opt.zero_grad()
                logits, _ = self.model(self.x)
                F.cross_entropy(logits, self.y).backward()
                torch.nn.utils.clip_grad_norm_(self.model.weight_parameters(), 5.0)
                self.opt.step()


def energy_term_s(runner: Runner, repeats: int = 30) -> float:
    """Median seconds of the energy term alone, forward and backward, as one architect step computes it (the
    energy weights, E(alpha) from the network's table, the normalization, the alphas' gradient): the part of the
    `default` row that `energy 0` does not pay, measured without the step's noise around it."""
    import time
    m, arch = runner.model, runner.arch
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        energy = m.expected_energy({k: m.arch_weights(k)[1] for k in (False, True)})
        torch.autograd.grad(arch.normalized_energy(energy), m.arch_parameters()[:2])
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def child_args(args: argparse.Namespace) -> List[str]:
    """The flags a memory-measuring child needs to rebuild the same configuration."""
    return ["--batch_size", str(args.batch_size), "--layers", str(args.layers), "--init_channels",
            str(args.init_channels), "--dataset", args.dataset, "--device", args.device] + (
        ["--amp"] if args.amp else []) + (["--compile"] if args.compile else [])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--init_channels", type=int, default=16)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true", help="add the `compile` row (minutes of compiling first)")
    p.add_argument("--only", default=None, help="comma list of configuration names to run")
    p.add_argument("--sync_debug", action="store_true",
                   help="CUDA: also count the syncs torch.cuda.set_sync_debug_mode('warn') reports")
    p.add_argument("--no_memory", action="store_true", help="skip the per-configuration memory processes")
    p.add_argument("--json", default=None)
    p.add_argument("--_memory", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args._memory is not None:
        print(peak_memory_mb_here(lambda: Runner(CONFIGS[args._memory], args, device), device))
        return 0
    chosen = [i for i, c in enumerate(CONFIGS) if (args.only is None or c["name"] in args.only.split(","))
              and (args.compile or not c.get("compile"))]
    runners = [Runner(CONFIGS[i], args, device) for i in chosen]
    medians = interleaved_medians(runners, args.steps, args.warmup, device)
    rows = []
    for i in chosen:
        c = CONFIGS[i]
        rows.append({"config": c["name"], "energy_weight": c["energy_weight"], "order": c["order"],
                     "partial_channels": c["partial_channels"], "device": args.device, "amp": args.amp,
                     "step_s": medians[chosen.index(i)],
                     # a TorchDispatchMode cannot run through compiled graphs: the compile row is timed, not counted
                     **(count_step(runners[chosen.index(i)], cuda_sync_debug=args.sync_debug) if not c.get("compile")
                        else dict.fromkeys(("ops", "syncs", "h2d"), float("nan"))),
                     "peak_mb": None if args.no_memory else memory_in_child(os.path.abspath(__file__), i,
                                                                              child_args(args))})
    base = rows[0]
    print(f"\nsearch step: {args.dataset} shape, batch {args.batch_size}, {args.layers} layers, "
          f"{args.init_channels} channels, {args.device}{' bf16' if args.amp else ''}, median of {args.steps}")
    print(f"{'config':<18}{'w_e':>6}{'order':>8}{'K':>3}{'step s':>9}{'x plain':>9}{'aten ops':>10}{'x ops':>7}"
          f"{'syncs':>7}{'h2d':>6}{'peak MB':>10}{'x mem':>7}")
    for r in rows:
        mem = f"{r['peak_mb']:>10.0f}{r['peak_mb'] / base['peak_mb']:>7.2f}" if r["peak_mb"] else ""
        print(f"{r['config']:<18}{r['energy_weight']:>6g}{r['order']:>8}{r['partial_channels']:>3}"
              f"{r['step_s']:>9.3f}{r['step_s'] / base['step_s']:>9.2f}{r['ops']:>10.0f}{r['ops'] / base['ops']:>7.2f}"
              f"{r['syncs']:>7.0f}{r['h2d']:>6.0f}{mem}"
              + (f"  cuda syncs {r['cuda_syncs']:.0f}" if "cuda_syncs" in r else ""))
    default = next((k for k, i in enumerate(chosen) if CONFIGS[i]["name"] == "default"), None)
    if default is not None:
        term = energy_term_s(runners[default])
        rows[default]["energy_term_s"] = term
        print(f"energy term alone (forward + backward, once per architect step): {1e3 * term:.1f} ms = "
              f"{100 * term / rows[default]['step_s']:.2f} % of the default step")
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
