"""Throughput and memory of train.py's network (a training step: forward, backward, SGD), side by side.

    python bench/train_step.py                                   # DARTS_V2, 36 channels, 20 layers, CIFAR shape
    python bench/train_step.py --device cuda --batch_size 96 --json train_bench.json

Configurations are interleaved step by step; the median step time gives images per second, with ratios against
the first row (`fp32`); peak memory is measured per configuration in a process of its own.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import genotypes as G  # noqa: E402
from plumbing.datasets import known_info  # noqa: E402
from model import build_network  # noqa: E402
from timing import interleaved_medians, memory_in_child, peak_memory_mb  # noqa: E402
from plumbing.utils import atomic_write_json  # noqa: E402

CONFIGS: List[Dict[str, Any]] = [
    {"name": "fp32", "channels_last": False, "amp": False},
    {"name": "channels_last", "channels_last": True, "amp": False},
    {"name": "bf16 autocast", "channels_last": False, "amp": True},
    {"name": "bf16 + channels_last", "channels_last": True, "amp": True},
]


class Runner:
    def __init__(self, cfg: Dict[str, Any], args: argparse.Namespace, device: torch.device) -> None:
        info = known_info(args.dataset)
        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        self.model = build_network(G.named_genotype(args.arch), args.init_channels, info.num_classes, args.layers,
                                   args.auxiliary, info.in_channels, info.image_size,
                                   imagenet=args.dataset == "imagenet").to(device)
        self.model.set_channels_last(cfg["channels_last"])  # the network moves its input to its own layout
        self.model.drop_path_prob = 0.2
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
        self.x = torch.randn(args.batch_size, info.in_channels, info.image_size, info.image_size,
                             device=device)
        self.y = torch.randint(0, info.num_classes, (args.batch_size,), device=device)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg["amp"]):
            logits, aux = self.model(self.x)
            loss = nn.functional.cross_entropy(logits, self.y)
            if aux is not None:
                loss = loss + 0.4 * nn.functional.cross_entropy(aux, self.y)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.opt.step()


def child_args(args: argparse.Namespace) -> List[str]:
    return ["--batch_size", str(args.batch_size), "--layers", str(args.layers), "--init_channels",
            str(args.init_channels), "--dataset", args.dataset, "--device", args.device, "--arch", args.arch] + (
        ["--auxiliary"] if args.auxiliary else [])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="DARTS_V2")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--init_channels", type=int, default=36)
    p.add_argument("--auxiliary", action="store_true")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", default=None, help="comma list of configuration names")
    p.add_argument("--no_memory", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--_memory", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args._memory is not None:
        print(peak_memory_mb(lambda: Runner(CONFIGS[args._memory], args, device), device))
        return 0
    chosen = [i for i, c in enumerate(CONFIGS) if args.only is None or c["name"] in args.only.split(",")]
    medians = interleaved_medians([Runner(CONFIGS[i], args, device) for i in chosen], args.steps, args.warmup,
                                  device)
    rows = []
    for i in chosen:
        mem = None
        if not args.no_memory:
            mem = memory_in_child(os.path.abspath(__file__), i, child_args(args))
        step = medians[chosen.index(i)]
        rows.append({"config": CONFIGS[i]["name"], "device": args.device, "step_s": step,
                     "images_per_s": args.batch_size / step, "peak_mb": mem})
    base = rows[0]
    print(f"\ntrain step: {args.arch}, {args.init_channels} channels, {args.layers} layers, {args.dataset} shape, "
          f"batch {args.batch_size}, {args.device}, median of {args.steps}")
    print(f"{'config':<22}{'step s':>9}{'img/s':>9}{'x fp32':>8}{'peak MB':>10}")
    for r in rows:
        mem = f"{r['peak_mb']:>10.0f}" if r["peak_mb"] else ""
        print(f"{r['config']:<22}{r['step_s']:>9.3f}{r['images_per_s']:>9.1f}"
              f"{r['images_per_s'] / base['images_per_s']:>8.2f}{mem}")
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
